"""Time of `entangle scan` per pair, and the projected time of a whole file.

    python benchmarks/scan_speed.py [--model smollm2-135m] [--data HH_TRAIN] [--pairs 64] [--batch-size 4]
                                    [--max-length 512] [--method fast] [--layers K]

Scans the first --pairs pairs (0 = all) in one process, prints seconds per pair (median over batches)
and the projection for the whole file. The model loads before the clock starts.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

from entangle import data, models, scanning

HH = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "hh-rlhf", "helpful-base.train.jsonl")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", default=HH)
    ap.add_argument("--pairs", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--method", default="fast")
    ap.add_argument("--layers", type=int, help="the gradient over the last K decoder layers only")
    args = ap.parse_args()
    examples, _ = data.read_examples(args.data)
    model, tok = models.load_model(args.model)
    what = scanning.last_layers_only(model, args.layers) if args.layers else "all parameters"
    pairs, stats = data.tokenize_pairs(examples, tok, args.max_length)
    chosen = pairs[: args.pairs] if args.pairs else pairs
    per_batch = []
    t0 = time.time()
    for s in range(0, len(chosen), args.batch_size):
        t = time.time()
        scanning.scan(model, tok, chosen[s : s + args.batch_size], method=args.method, batch_size=args.batch_size)
        per_batch.append((time.time() - t) / len(chosen[s : s + args.batch_size]))
    total = time.time() - t0
    med = statistics.median(per_batch)
    print(f"{args.model} ({what}), {len(chosen)} pairs of {len(pairs)} ({stats.n_dropped} dropped at max length "
          f"{args.max_length}), batch {args.batch_size}, {args.method}: {total:.1f} s, median {med:.3f} s/pair; "
          f"projected for all {len(pairs)} pairs: {med * len(pairs) / 60:.1f} min")


if __name__ == "__main__":
    main()
