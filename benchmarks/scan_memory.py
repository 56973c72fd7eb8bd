"""Peak memory (resident set) of `entangle scan` with its default token views, in a child process.

    python benchmarks/scan_memory.py [--model smollm2-135m] [--data HH_TRAIN] [--pairs 24] [--tokens 3]

Runs the command line as a user would (`entangle scan MODEL --data FILE --limit N --out DIR`) and prints the
child's peak RSS (getrusage of the children) and its wall time, beside the scan's own estimate (its
`memory:` line: the work beyond the weights, `entangle.memory`). The token views are exact while the rejected
tokens' gradients fit `diagnostics.tokens.TOKEN_BUDGET`, else sketched.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

HH = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "hh-rlhf", "helpful-base.test.jsonl")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", default=HH)
    ap.add_argument("--pairs", type=int, default=24)
    ap.add_argument("--tokens", type=int, default=3)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as out:
        t0 = time.perf_counter()
        p = subprocess.run([sys.executable, "-m", "entangle.cli", "scan", a.model, "--data", a.data, "--limit",
                            str(a.pairs), "--tokens", str(a.tokens), "--out", os.path.join(out, "scan")],
                           capture_output=True, text=True)
        seconds = time.perf_counter() - t0
        peak_gb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20   # KiB on Linux
        if p.returncode != 0:
            sys.exit(f"scan failed ({p.returncode}): {p.stderr.strip()[-400:]}")
        rows = sum(1 for _ in open(os.path.join(out, "scan", "scan.jsonl")))
        methods = json.load(open(os.path.join(out, "scan", "summary.json"))).get("token_views", "?")
        estimate = next((x.split("memory: ", 1)[1] for x in p.stderr.splitlines() if "memory: " in x), "none")
    print(f"{a.model}: {rows} pairs scanned, {a.tokens} token views ({methods}); peak RSS {peak_gb:.2f} GiB, "
          f"wall {seconds:.0f} s; estimate: {estimate}")


if __name__ == "__main__":
    main()
