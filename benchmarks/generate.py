"""Sampling speed: `entangle generate` at several batch sizes against a plain `model.generate` loop over
single prompts (the same model, prompts, token budget and sampling settings).

    python benchmarks/generate.py [--model smollm2-135m] [--prompts N] [--max-new-tokens 64] [--batches 1,8,32]

Prints one table: new tokens per second (completion tokens, EOS included) and seconds, median of --repeats.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from entangle.generation import generate, load_policy, load_prompts

HH = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "hh-rlhf", "helpful-base.test.jsonl")


def plain_loop(model, tok, prompts, max_new_tokens: int, seed: int) -> int:
    """One prompt at a time through `model.generate`, as a script would do without batching."""
    from entangle.data import encode_prompt

    new = 0
    torch.manual_seed(seed)
    for p in prompts:
        ids = torch.tensor([encode_prompt(tok, p)[-512:]])
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=True, top_k=0, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        toks = out[0, ids.shape[1]:].tolist()
        new += toks.index(tok.eos_token_id) + 1 if tok.eos_token_id in toks else len(toks)
    return new


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", default=HH, help="prompt source (default: HH helpful-base test prompts)")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--repeats", type=int, default=1)
    args = ap.parse_args()
    data = args.data if os.path.exists(args.data) else "synthetic:sentiment?config=short&n=64"
    policy = load_policy(args.model, "float32", "cpu")
    prompts = load_prompts(data, limit=args.prompts)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.model}, {len(prompts)} prompts from "
          f"{os.path.basename(data)}, {args.max_new_tokens} new tokens max, temperature 1")
    print(f"{'method':28} {'median s':>9} {'new tokens':>11} {'tokens/s':>9} {'speed-up':>9}")
    with torch.no_grad():
        times, tokens = [], 0
        for r in range(args.repeats):
            t = time.perf_counter()
            tokens = plain_loop(policy.model, policy.tokenizer, prompts, args.max_new_tokens, r)
            times.append(time.perf_counter() - t)
        base = tokens / statistics.median(times)
        print(f"{'model.generate, one prompt':28} {statistics.median(times):9.1f} {tokens:11d} {base:9.1f} {1.0:9.2f}")
        for b in (int(x) for x in args.batches.split(",")):
            times = []
            for r in range(args.repeats):
                t = time.perf_counter()
                rows = generate(policy.model, policy.tokenizer, prompts, max_new_tokens=args.max_new_tokens,
                                seed=r, batch_size=b, logps=False)
                times.append(time.perf_counter() - t)
            tokens = sum(x["tokens"] for x in rows)
            rate = tokens / statistics.median(times)
            print(f"{'entangle generate, batch ' + str(b):28} {statistics.median(times):9.1f} {tokens:11d} "
                  f"{rate:9.1f} {rate / base:9.2f}")


if __name__ == "__main__":
    main()
