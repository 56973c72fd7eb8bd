"""Median training-step time with entanglement diagnostics off, fast, and exact (one backward per row).

Every mode runs the training step's own layout (each pair one prefix-shared row, `train.prefix_sharing`);
`fast+ rows` is `fast+` on two rows per pair, the layout diagnostic steps ran before they read prefix-shared rows.

    python benchmarks/entanglement_overhead.py [--models tiny,smollm2-135m] [--steps 5] [--hh PATH]

Prints one table; every row of a model is measured in the same process, alternating the modes
step by step so that machine noise hits all of them alike.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile

import torch
import time

from entangle import config
from entangle.checkpoint import hf_model
from entangle.batching import collate
from entangle.diagnostics.probe import EntanglementProbe
from entangle.step import train_step

HH = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "hh-rlhf", "helpful-base.train.jsonl")


def build_parts(model_name: str, lora: bool, data: str, batch: int, max_length: int):
    """The run entangle's own assembly makes (`entangle.build`), with the probe variants to swap in."""
    from entangle.assembly import build

    lora_keys = ["model.lora.r=16", "model.lora.alpha=32"] if lora else []
    cfg = config.load(None, [f"model.name={model_name}", f"data.train={data}", f"data.max_length={max_length}",
                             "data.max_train_examples=64", "optimizer.lr=1e-7", "schedule.decay=constant",
                             f"train.batch_size={batch}", "train.output_dir=" + tempfile.mkdtemp(), *lora_keys])
    run = build(cfg)
    lm = hf_model(run.accelerator, run.policy)
    probes = {"off": None, "fast": EntanglementProbe(lm, 1, method="fast", update=False, batch_mean=False),
              "fast+": EntanglementProbe(lm, 1, method="fast"),
              "fast+ rows": EntanglementProbe(lm, 1, method="fast"),
              "exact": EntanglementProbe(lm, 1, method="exact", update=False, batch_mean=False)}
    pairs = run.train_pairs
    batches = {pack: [collate(pairs[i : i + batch], run.tokenizer.pad_token_id, pack)
                      for i in range(0, len(pairs) - batch + 1, batch)] for pack in (True, False)}
    return run.step_parts, probes, batches


def measure(model_name, lora, data, batch, max_length, steps):
    parts, probes, batches = build_parts(model_name, lora, data, batch, max_length)
    times = {k: [] for k in probes}
    train_step(parts, [batches[True][0]], 1)  # warm-up
    for i in range(steps):
        for mode, probe in probes.items():
            parts.hooks = [probe] if probe is not None else []
            layout = batches[mode != "fast+ rows"]
            t = time.perf_counter()
            train_step(parts, [layout[(i + 1) % len(layout)]], i + 1)
            times[mode].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    return med


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="tiny,smollm2-135m")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--params", default="full,lora", help="full, lora or both (comma-separated)")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--hh", default=HH, help="HH pairs for smollm2 (generated sentiment pairs are used for tiny)")
    ap.add_argument("--default-allocator", action="store_true",
                    help="no transparent huge pages for large tensors (the command line asks for them: "
                         "memory.use_huge_pages)")
    args = ap.parse_args()
    if not args.default_allocator:
        from entangle.memory import use_huge_pages

        use_huge_pages()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch} pairs, "
          f"max_length {args.max_length}, {args.steps} timed steps per mode (median)")
    print("fast: per-pair statistics; fast+: also step_dlogp (the optimiser's update) and the batch-mean quantities")
    print("fast+ rows: fast+ on two rows per pair instead of one prefix-shared row")
    print(f"{'model':14} {'params':6} {'off s':>8} {'fast s':>8} {'fast+ s':>8} {'rows s':>8} {'exact s':>8} "
          f"{'fast/off':>9} {'fast+/off':>10} {'rows/off':>9} {'exact/off':>10}")
    for name in args.models.split(","):
        data = args.hh if name != "tiny" else "synthetic:sentiment?config=long&n=64"
        if name != "tiny" and not os.path.exists(data):
            print(f"{name}: skipped ({data} not found; pass --hh)")
            continue
        for lora in [kind == "lora" for kind in args.params.split(",")]:
            med = measure(name, lora, data, args.batch, args.max_length, args.steps)
            r = {k: v / med["off"] for k, v in med.items()}
            print(f"{name:14} {'LoRA' if lora else 'full':6} {med['off']:8.3f} {med['fast']:8.3f} {med['fast+']:8.3f} "
                  f"{med['fast+ rows']:8.3f} {med['exact']:8.3f} {r['fast']:8.2f}x {r['fast+']:9.2f}x "
                  f"{r['fast+ rows']:8.2f}x {r['exact']:9.2f}x")


if __name__ == "__main__":
    main()
