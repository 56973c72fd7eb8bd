"""The Python API of sampling and evaluation, as the CLI runs them (`entangle generate`, `entangle eval`).

    rows = entangle.generate("runs/x", "prompts.jsonl", n=2, max_new_tokens=64, out="samples.jsonl")
    figures = entangle.evaluate("runs/x", "prompts.jsonl", "vader", out="runs/x/eval")
    # figures["gold/mean"], ["kl/initial"], ["win_rate"], ["length/mean"] (+ _se, _n), ["distinct_2"]

Inputs are checked before any model loads: the scorer string, the prompts, the run directory.
"""

from __future__ import annotations

import json

import torch

from entangle.errors import DataError
from entangle.evaluation import check_scorer_spec, get_scorer, write_evaluation
from entangle.evaluation import evaluate as evaluate_policy
from entangle.generation import generate as generate_rows
from entangle.generation import (load_initial, load_moving_reference, load_policy, load_prompts, resolve,
                                 write_samples)


def _device(device: str) -> str:
    return ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device


def generate(model: str, prompts: str | list, out: str | None = None, limit: int | None = None,
             split: str = "train", device: str = "auto", dtype: str = "auto", **settings) -> list[dict]:
    """Sample from a model or run (`settings`: n, max_new_tokens, temperature, top_p, seed, batch_size,
    max_prompt_length, progress); rows as `generation.generate`, written to `out` (JSONL) when given."""
    texts = load_prompts(prompts, split, limit) if isinstance(prompts, str) else list(prompts)[:limit]
    resolve(model)
    policy = load_policy(model, dtype, _device(device))
    rows = generate_rows(policy.model, policy.tokenizer, texts, **settings)
    if out:
        write_samples(out, rows)
    return rows


def _read_samples(path: str) -> list[dict]:
    try:
        with open(path) as f:
            rows = [json.loads(x) for x in f if x.strip()]
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: cannot read samples ({type(e).__name__}); give a file written by entangle "
                        "generate") from None
    needed = {"prompt", "completion", "sample", "prompt_ids", "completion_ids", "tokens"}
    for i, r in enumerate(rows, 1):
        if not needed <= set(r):
            raise DataError(f"{path}:{i}: fields {sorted(needed - set(r))} are missing; give a file written by "
                            "entangle generate")
    if not rows:
        raise DataError(f"{path}: no samples")
    return rows


def evaluate(model: str, prompts: str | list | None, scorer: str = "vader", out: str | None = None,
             baseline: str | None = None, initial: str | None = None, samples: str | None = None,
             limit: int | None = None, split: str = "train", device: str = "auto", dtype: str = "auto",
             judge_template: str | None = None, **settings) -> dict:
    """Generate (or reuse a samples file), score, KL to the initial policy, win rate against the baseline
    (default: the initial policy); writes `out/eval.json` and `out/samples.jsonl` when `out` is given."""
    check_scorer_spec(scorer)
    reused = _read_samples(samples) if samples else None
    texts = None if reused else load_prompts(prompts, split, limit) if isinstance(prompts, str) else list(prompts)
    template = None
    if judge_template:
        try:
            template = open(judge_template).read()
        except OSError as e:
            raise DataError(f"{judge_template}: cannot read the judge template ({e.strerror})") from None
    for spec in (model, initial, baseline):
        if spec:
            resolve(spec)
    dev = _device(device)
    policy = load_policy(model, dtype, dev)
    start = load_policy(initial, dtype, dev) if initial else load_initial(policy, dtype, dev)
    base = load_policy(baseline, dtype, dev) if baseline else None
    moving = load_moving_reference(model, policy)   # a trust-region run: KL to where its reference ended too
    figures, rows = evaluate_policy(policy, texts, get_scorer(scorer, dev, template), start, base, reused, moving,
                                    **settings)
    meta = {"model": model, "initial": start.source, "baseline": baseline or start.source, "scorer": scorer,
            "prompts": prompts if isinstance(prompts, str) else None, "samples_file": samples,
            "settings": settings}
    if out:
        write_evaluation(out, figures, rows, {k: v for k, v in meta.items() if k != "settings"} |
                         {"settings": {k: v for k, v in settings.items() if k != "progress"}})
    return figures


def label(model: str, prompts: str | list, scorer: str = "vader", out: str | None = None, noise: float = 0.0,
          limit: int | None = None, split: str = "train", device: str = "auto", dtype: str = "auto",
          **settings) -> list[dict]:
    """Preference pairs made by sampling twice per prompt from `model` and labelling with `scorer`
    (Bradley-Terry noise of temperature `noise`); written to `out` (TRL's prompt/chosen/rejected JSONL)."""
    from entangle.errors import ConfigError
    from entangle.labeling import label_pairs, write_preferences

    check_scorer_spec(scorer)
    if noise < 0 or noise != noise:
        raise ConfigError(f"--noise must be >= 0 (got {noise})")
    if scorer.startswith("judge:"):
        raise ConfigError("labelling needs a pointwise gold scorer (vader, rm:PATH, python:module:function)")
    texts = load_prompts(prompts, split, limit) if isinstance(prompts, str) else list(prompts)[:limit]
    resolve(model)
    dev = _device(device)
    policy = load_policy(model, dtype, dev)
    seed = settings.pop("seed", 0)
    settings.pop("n", None)
    rows = label_pairs(policy, texts, get_scorer(scorer, dev), noise, seed, **settings)
    if not rows:
        raise DataError(f"{model}: every pair of samples was identical or tied; raise the temperature or "
                        "max_new_tokens")
    if out:
        write_preferences(out, rows)
    return rows
