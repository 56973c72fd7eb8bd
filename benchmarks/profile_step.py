"""Where a training step spends its time: torch.profiler over a few entangle steps (SmolLM2, HH pairs).

    python benchmarks/profile_step.py --max-length 256 --batch 2 --steps 3

Prints the stages (policy forward+backward, reference forward, optimiser, clipping) and the top operators by
self CPU time over the profiled steps (the first step is not profiled). Not a test: run it by hand.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from vs_trl import HH, select_pairs, sequential  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--precision", choices=("float32", "bf16-mixed"), default="float32")
    a = ap.parse_args()
    from entangle.memory import use_huge_pages

    use_huge_pages()       # what the `entangle` command line does for itself
    from transformers import AutoTokenizer

    from entangle import config, models
    from entangle.loop import build, fit

    folder = models.smollm2_folder()
    pairs = select_pairs(AutoTokenizer.from_pretrained(folder), HH, a.max_length, a.batch * (a.steps + 1))
    with tempfile.TemporaryDirectory() as out:
        path = os.path.join(out, "pairs.jsonl")
        with open(path, "w") as f:
            f.writelines(json.dumps({k: p[k] for k in ("prompt", "chosen", "rejected")}) + "\n" for p in pairs)
        cfg = config.load(None, [f"model.name={folder}", f"model.dtype={a.precision}", f"data.train={path}",
                                 f"data.max_length={a.max_length}", "reference.type=frozen", "reference.kl_to_init=false",
                                 "optimizer.lr=5e-6", "schedule.decay=constant", f"train.batch_size={a.batch}",
                                 f"train.max_steps={a.steps + 1}", "tracking.progress=false", f"train.output_dir={out}/r",
                                 "train.eval_at_start=false"])
        sequential(cfg)
        run = build(cfg)
        times: list[float] = []
        prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                      schedule=torch.profiler.schedule(wait=1, warmup=0, active=a.steps),
                                      record_shapes=bool(os.environ.get("SHAPES")))

        def step_done(row, stop):
            times.append(row["step_time_s"])
            prof.step()

        t0 = time.perf_counter()
        with prof:
            fit(run, callbacks=[step_done])
        print(f"# {a.max_length} tokens, batch {a.batch}: steps {[round(t, 2) for t in times]} s "
              f"({time.perf_counter() - t0:.0f} s in all)")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=a.top))
        if os.environ.get("SHAPES"):
            print(prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=a.top))


if __name__ == "__main__":
    main()
