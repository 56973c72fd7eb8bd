"""The CUDA paths of this round's features, on a GPU machine: prints figures, asserts nothing (run by hand).

    python benchmarks/gpu_checks.py [--out DIR]

1. KL from one numeric path in bf16: a tiny model against a separate copy of itself (both teacher-forced: 0), and
   the bias the sampling forward's own log-probs would have had (mean of sampling-forward minus teacher-forced
   log-prob per sample).
2. Token views: the CountSketch against the exact view on CUDA (max |cos error| against its stated sigma).
3. A 2-step `entangle train` with mixed precision, diagnostics and in-training sampling (the new metrics present).
4. A reduced over-optimisation study end to end (time, and its headline).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch


def kl_check() -> None:
    from entangle.evaluation import evaluate, get_scorer
    from entangle.generation import completion_logps, generate, load_policy, load_prompts

    prompts = load_prompts("synthetic:verdict?n=64&split=test")
    policy, initial = load_policy("tiny", "bfloat16", "cuda"), load_policy("tiny", "bfloat16", "cuda")
    rows = generate(policy.model, policy.tokenizer, prompts, n=2, max_new_tokens=32, seed=0, batch_size=32)
    forced = completion_logps(policy.model, rows, policy.tokenizer.pad_token_id, 32)
    bias = [r["logp"] - f for r, f in zip(rows, forced.tolist())]
    figures, _ = evaluate(policy, prompts, get_scorer("python:entangle.synthetic:gold"), initial=initial, n=2,
                          max_new_tokens=32, seed=0, batch_size=32)
    print(f"1. bf16 self-KL, one numeric path: {figures['kl/initial']:.3g} (n={figures['kl/initial_n']}); the sampling "
          f"forward's log-probs minus teacher-forced: mean {sum(bias) / len(bias):+.4f}, max |.| "
          f"{max(abs(b) for b in bias):.4f} nats per sample")


def sketch_check() -> None:
    from entangle import models
    from entangle.diagnostics.tokens import token_gradients

    model, tok = models.load_model("tiny", dtype="float32", device="cuda")
    prompt = tok("Statement: the movie was awful.\nSentiment:", add_special_tokens=False)["input_ids"]
    chosen = tok(" Negative sentiment based on my judgement.", add_special_tokens=False)["input_ids"]
    rejected = tok(" Positive sentiment based on my judgement.", add_special_tokens=False)["input_ids"]
    t0 = time.perf_counter()
    exact = token_gradients(model, prompt, chosen, rejected)
    t1 = time.perf_counter()
    sketch = token_gradients(model, prompt, chosen, rejected, max_bytes=1, sketch_dim=8192)
    t2 = time.perf_counter()
    err = (sketch["cos"] - exact["cos"]).abs()
    print(f"2. token view on CUDA: exact {t1 - t0:.2f} s, sketch {t2 - t1:.2f} s; |cos error| max {float(err.max()):.4f}"
          f", mean {float(err.mean()):.4f}; stated sigma {sketch['sketch_error']:.4f}")


def train_check(out: str) -> None:
    from entangle import config
    from entangle.loop import train

    t0 = time.perf_counter()
    cfg = config.load(os.path.join(os.path.dirname(__file__), "..", "configs", "tiny-dpo.yaml"),
                      ["train.max_steps=2", f"train.output_dir={out}/train", "tracking.progress=false",
                       "diagnostics.entanglement.every=1", "eval.generate.every=1", "eval.generate.n_prompts=8",
                       "eval.generate.scorer=python:entangle.synthetic:gold", "train.eval_at_start=true"])
    result = train(cfg)
    rows = [json.loads(x) for x in open(os.path.join(out, "train", "metrics.jsonl"))]
    keys = ("loss/d_w", "ref/logratio", "entanglement/cos", "eval/kl/initial", "eval/gold/mean")
    seen = {k: next((r[k] for r in rows if k in r), None) for k in keys}
    print(f"3. 2-step train on {torch.cuda.get_device_name()}: {result.status} in {time.perf_counter() - t0:.1f} s; "
          + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in seen.items()))


def study_check(out: str) -> None:
    from entangle.studies import overoptimization as oo

    t0 = time.perf_counter()
    s = oo.Settings.quick(out=f"{out}/oo", steps=60, evals=3, n_label=128, n_eval=64, reps=200)
    summary = oo.run(s)
    print(f"4. reduced over-optimisation study on CUDA: {time.perf_counter() - t0:.0f} s; {summary['verdict']}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="runs/gpu-checks")
    out = ap.parse_args().out
    os.makedirs(out, exist_ok=True)
    for name, fn in (("kl", kl_check), ("sketch", sketch_check), ("train", lambda: train_check(out)),
                     ("study", lambda: study_check(out))):
        try:
            fn()
        except Exception as e:   # report and go on: each check stands alone
            print(f"{name}: FAILED {type(e).__name__}: {str(e)[:300]}")


if __name__ == "__main__":
    main()
