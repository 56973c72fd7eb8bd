"""Peak memory (resident set) of `entangle report` on a long run's logs, in a child process.

    python benchmarks/report_memory.py [--steps 100000] [--pairs 0] [--metrics 40]

Writes a synthetic run directory (`--steps` rows of `metrics.jsonl` with `--metrics` entanglement-style metrics
each; `--pairs` per-pair rows per step in `entanglement.jsonl`, as `diagnostics.entanglement.every=1` writes
them), runs `entangle report RUN --out DIR` as a user would and prints the child's peak RSS and wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time


def write_run(folder: str, steps: int, pairs: int, n_metrics: int) -> None:
    rng = random.Random(0)
    keys = ["loss", "logps/chosen", "logps/rejected", "rewards/margins", "rewards/accuracies", "grad_norm",
            "pairs_per_s", "entanglement/cos", "entanglement/case1", "entanglement/case2", "entanglement/case3"]
    keys += [f"entanglement/extra_{i}" for i in range(max(0, n_metrics - len(keys)))]
    with open(os.path.join(folder, "metrics.jsonl"), "w") as f:
        for s in range(1, steps + 1):
            f.write(json.dumps({"step": s, **{k: rng.random() for k in keys}}) + "\n")
    with open(os.path.join(folder, "entanglement.jsonl"), "w") as f:
        for s in range(1, steps + 1):
            for i in range(pairs):
                f.write(json.dumps({"step": s, "pair": i, "inner": rng.random(), "cos": rng.random(),
                                    "pred_dlogp_w": rng.gauss(0, 1e-3), "pred_dlogp_l": rng.gauss(0, 1e-3),
                                    "step_dlogp_w": rng.gauss(0, 1e-3), "step_dlogp_l": rng.gauss(0, 1e-3)}) + "\n")
    with open(os.path.join(folder, "summary.json"), "w") as f:
        json.dump({"status": "finished", "steps": steps}, f)
    with open(os.path.join(folder, "config.yaml"), "w") as f:
        f.write("loss:\n  name: dpo\n")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=100_000)
    ap.add_argument("--pairs", type=int, default=0, help="per-pair rows per step in entanglement.jsonl")
    ap.add_argument("--metrics", type=int, default=40)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        run = os.path.join(tmp, "run")
        os.makedirs(run)
        write_run(run, a.steps, a.pairs, a.metrics)
        sizes = {f: os.path.getsize(os.path.join(run, f)) / 2**20 for f in ("metrics.jsonl", "entanglement.jsonl")}
        entangle = os.path.join(os.path.dirname(sys.executable), "entangle")
        t = time.perf_counter()
        subprocess.run([entangle, "-q", "report", run, "--out", os.path.join(tmp, "report")], check=True)
        wall = time.perf_counter() - t
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20   # KiB -> GiB
    print(f"{a.steps} steps, {a.pairs} pairs per step: metrics.jsonl {sizes['metrics.jsonl']:.0f} MiB, "
          f"entanglement.jsonl {sizes['entanglement.jsonl']:.0f} MiB | peak RSS {peak:.2f} GiB | {wall:.1f} s")


if __name__ == "__main__":
    main()
