"""The CUDA paths, on a GPU machine: prints figures, asserts nothing (run by hand).

    python benchmarks/gpu_checks.py [--out DIR] [--only kl,memory,step,train]

1. `kl`: dtype=auto on CUDA is float32 weights with bf16 autocast for generate/eval too (one rule): a model against
   a separate copy of itself gives KL 0 from one numeric path; the sampling forward's own log-probs beside it.
2. `memory`: entangle.memory's estimates against torch.cuda.max_memory_allocated for a training step, sampling
   and a scan on a SmolLM2-shaped model (random weights: the shapes are what matter).
3. `step`: step time of the packed (prefix-shared) step and of a step with every-step diagnostics, bf16 autocast,
   fused AdamW on CUDA; and the chunked LM head's peak memory against the whole head at once.
4. `train`: a 2-step `entangle train` with mixed precision, diagnostics and in-training sampling.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

GIB = 2**30


def smollm2_shaped(folder: str) -> str:
    """A random-init model with SmolLM2-135M's shapes (hidden 576, 30 layers, 9 heads, vocab 49152), saved."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from entangle import models

    if not os.path.exists(os.path.join(folder, "config.json")):
        cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                          num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
                          tie_word_embeddings=True)
        torch.manual_seed(0)
        LlamaForCausalLM(cfg).save_pretrained(folder)
        tok = models.byte_tokenizer()
        tok.save_pretrained(folder)
    return folder


def kl_check(out: str) -> None:
    from entangle.api import evaluate
    from entangle.generation import completion_logps, generate, load_policy, load_prompts
    from entangle.models import compute

    prompts = load_prompts("synthetic:verdict?n=64&split=test")
    policy = load_policy("tiny", "auto", "cuda")
    with compute("auto", "cuda"):
        rows = generate(policy.model, policy.tokenizer, prompts, n=2, max_new_tokens=32, seed=0, batch_size=32)
        forced = completion_logps(policy.model, rows, policy.tokenizer.pad_token_id, 32)
    bias = [r["logp"] - f for r, f in zip(rows, forced.tolist())]
    figures = evaluate("tiny", prompts, "python:entangle.synthetic:gold", initial="tiny", n=2, max_new_tokens=32,
                       seed=0, batch_size=32, device="cuda", dtype="auto")
    print(f"1. dtype=auto on CUDA: weights {next(policy.model.parameters()).dtype}, bf16 autocast; self-KL from one "
          f"numeric path {figures['kl/initial']:.3g} (n={figures['kl/initial_n']}); sampling forward minus "
          f"teacher-forced: mean {statistics.mean(bias):+.4f}, max |.| {max(abs(b) for b in bias):.4f} nats/sample")


def _peak(fn) -> int:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def memory_check(out: str) -> None:
    from entangle import batching, data, memory
    from entangle.generation import generate
    from entangle.logps import sequence_logps
    from entangle.models import compute, load_model

    model, tok = load_model(smollm2_shaped(os.path.join(out, "smollm2-shaped")), "auto", "cuda")
    for rows, length in ((4, 512), (8, 1024)):
        exs = [data.PreferenceExample("x" * (length // 2), "y" * (length // 2 - 2), "z" * (length // 2 - 2))] * rows
        batch = batching.collate(data.tokenize_pairs(exs, tok, max_length=length)[0], tok.pad_token_id).to("cuda")

        def step():
            with compute("auto", "cuda"):
                sequence_logps(model, batch, pack=False).logps.sum().backward()
            model.zero_grad(set_to_none=True)

        measured = _peak(step)
        estimate = memory.trainable(model) + memory.forward(model, batch.n_rows, batch.input_ids.shape[1], grad=True)
        print(f"2. training forward+backward, {batch.n_rows} rows x {batch.input_ids.shape[1]} tokens: measured "
              f"{measured / GIB:.2f} GiB beyond the weights, estimate {estimate / GIB:.2f} GiB")
    prompts = ["w" * 400] * 16
    measured = _peak(lambda: generate(model, tok, prompts, max_new_tokens=64, batch_size=16, logps=True))
    est = memory.forward(model, 16, 464, grad=False, logits_rows=1) + memory.kv_cache(model, 16, 464) + \
        16 * memory.shape(model)["vocab"] * 4 * 64
    print(f"2. sampling 16 x (400 + 64 tokens): measured {measured / GIB:.2f} GiB, estimate {est / GIB:.2f} GiB")


def step_check(out: str) -> None:
    from entangle import config
    from entangle.loop import build, fit

    folder = smollm2_shaped(os.path.join(out, "smollm2-shaped"))
    pairs = os.path.join(out, "pairs.jsonl")
    with open(pairs, "w") as f:
        for i in range(64):
            f.write(json.dumps({"prompt": f"Question {i}: " + "tell me about the weather " * 12,
                                "chosen": " It is sunny and warm today." * 6, "rejected": " No." * 20}) + "\n")
    figures = {}
    for name, extra in (("packed", []), ("two rows", ["train.prefix_sharing=false"]),
                        ("diagnostics every step", ["diagnostics.entanglement.every=1"])):
        times = []
        cfg = config.load(None, [f"model.name={folder}", f"data.train={pairs}", "data.max_length=512",
                                 "train.batch_size=8", "train.max_steps=6", "tracking.progress=false",
                                 "train.eval_at_start=false", f"train.output_dir={out}/step-{len(figures)}",
                                 "train.overwrite=true", *extra])
        fit(build(cfg), callbacks=[lambda row, stop: times.append(row["step_time_s"])])
        figures[name] = statistics.median(times[1:])
    print("3. SmolLM2-shaped, batch 8, bf16 autocast, fused AdamW: " + ", ".join(
        f"{k} {v:.3f} s/step" for k, v in figures.items()) + f"; diagnostics / packed "
        f"{figures['diagnostics every step'] / figures['packed']:.2f}x")
    from entangle import logps
    from entangle.models import load_model

    model, tok = load_model(folder, "auto", "cuda")
    ids = torch.randint(0, 49152, (8, 1024), device="cuda")
    resp = torch.zeros_like(ids, dtype=torch.bool)
    resp[:, 256:] = True
    attn = torch.ones_like(ids)
    peaks, default = {}, logps.HEAD_CHUNK_BYTES
    for label, chunk in (("chunked", default), ("whole", 2**40)):
        logps.HEAD_CHUNK_BYTES = chunk
        peaks[label] = _peak(lambda: logps.response_logps(model, ids, attn, resp).logps.sum().backward())
        model.zero_grad(set_to_none=True)
    logps.HEAD_CHUNK_BYTES = default
    print(f"3. LM head over 8 x 768 response tokens: chunked peak {peaks['chunked'] / GIB:.2f} GiB, whole "
          f"{peaks['whole'] / GIB:.2f} GiB")


def train_check(out: str) -> None:
    from entangle import config
    from entangle.loop import train

    t0 = time.perf_counter()
    cfg = config.load(os.path.join(os.path.dirname(__file__), "..", "configs", "tiny-dpo.yaml"),
                      ["train.max_steps=2", f"train.output_dir={out}/train", "tracking.progress=false",
                       "diagnostics.entanglement.every=1", "eval.generate.every=1", "eval.generate.n_prompts=8",
                       "eval.generate.scorer=python:entangle.synthetic:gold", "train.overwrite=true"])
    result = train(cfg)
    rows = [json.loads(x) for x in open(result.metrics_path)]
    keys = ("loss/d_w", "ref/logratio", "entanglement/cos", "eval/kl/initial", "eval/gold/mean")
    seen = {k: next((r[k] for r in rows if k in r), None) for k in keys}
    print(f"4. 2-step train on {torch.cuda.get_device_name()}: {result.status} in {time.perf_counter() - t0:.1f} s; "
          + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in seen.items()))


CHECKS = {"kl": kl_check, "memory": memory_check, "step": step_check, "train": train_check}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="runs/gpu-checks")
    ap.add_argument("--only", default=",".join(CHECKS))
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    for name in a.only.split(","):
        try:
            CHECKS[name](a.out)
        except Exception as e:   # report and go on: each check stands alone
            print(f"{name}: FAILED {type(e).__name__}: {str(e)[:400]}", flush=True)


if __name__ == "__main__":
    main()
