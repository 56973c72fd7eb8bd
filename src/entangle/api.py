"""The Python API of sampling, evaluation and the data scan, as the CLI runs them (`entangle generate`, `eval`,
`label`, `scan`).

    result = entangle.scan("smollm2-135m", "pairs.jsonl", out="runs/scan", drop_case=[2])   # rows, summary, kept

    rows = entangle.generate("runs/x", "prompts.jsonl", n=2, max_new_tokens=64, out="samples.jsonl")
    figures = entangle.evaluate("runs/x", "prompts.jsonl", "vader", out="runs/x/eval")
    # figures["gold/mean"], ["kl/initial"], ["win_rate"], ["length/mean"] (+ _se, _n), ["distinct_2"]

Inputs are checked before any model loads: the scorer string, the prompts, the run directory.
"""

from __future__ import annotations

import json
import logging
import os

import torch

from entangle import memory
from entangle.errors import DataError
from entangle.evaluation import check_scorer_source, check_scorer_spec, get_scorer, write_evaluation
from entangle.models import check_fits_context, check_source
from entangle.evaluation import evaluate_policy
from entangle.generation import generate as generate_rows
from entangle.generation import (check_sampling, load_initial, load_moving_reference, load_policy, load_prompts,
                                 resolve, write_samples)
from entangle.rundir import check_outputs

log = logging.getLogger(__name__)


def _device(device: str) -> str:
    return ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device


def _precision_rule(command):
    """Run `command` under `models.precision`'s rule for its `dtype` and `device` (bf16 autocast for auto on CUDA),
    the rule training follows."""
    import functools
    import inspect

    from entangle import models

    signature = inspect.signature(command)

    @functools.wraps(command)
    def run(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        given = {**bound.arguments.get("options", {}), **bound.arguments.get("settings", {}), **bound.arguments}
        with models.compute(given.get("dtype", "auto"), _device(given.get("device", "auto"))):
            return command(*args, **kwargs)
    return run


@_precision_rule
def generate(model: str, prompts: str | list, out: str | None = None, limit: int | None = None,
             split: str = "train", device: str = "auto", dtype: str = "auto", **settings) -> list[dict]:
    """Sample from a model or run (`settings`: n, max_new_tokens, temperature, top_p, seed, batch_size,
    max_prompt_length, progress); rows as `generation.generate`, written to `out` (JSONL) when given."""
    check_sampling(limit, **settings)
    check_outputs(files={"--out": out}, inputs={"prompts": prompts if isinstance(prompts, str) else None})
    texts = load_prompts(prompts, split, limit) if isinstance(prompts, str) else list(prompts)[:limit]
    resolve(model)
    policy = load_policy(model, dtype, _device(device))
    rows = generate_rows(policy.model, policy.tokenizer, texts, **settings)
    if out:
        write_samples(out, rows)
    return rows


def _read_samples(path: str) -> list[dict]:
    """The rows of a samples file written by `entangle generate`, every field checked (file and line named);
    a torn last line is skipped, as resume skips one."""
    from entangle.report import read_jsonl

    try:
        rows = read_jsonl(path)
    except OSError as e:
        raise DataError(f"{path}: cannot read samples ({e.strerror}); give a file written by entangle generate") \
            from None
    needed = {"prompt", "completion", "sample", "prompt_ids", "completion_ids", "tokens"}
    ids = lambda v: isinstance(v, list) and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0  # noqa: E731
                                                for t in v)
    for i, r in enumerate(rows, 1):
        if not needed <= set(r):
            raise DataError(f"{path}:{i}: fields {sorted(needed - set(r))} are missing; give a file written by "
                            "entangle generate")
        bad = [k for k in ("prompt_ids", "completion_ids") if not ids(r[k])] + \
            ([] if isinstance(r["completion"], str) else ["completion"]) + \
            ([] if r["tokens"] == len(r["completion_ids"]) else ["tokens"])
        if bad:
            raise DataError(f"{path}:{i}: field {bad[0]!r} does not hold what entangle generate wrote (edited?); "
                            "sample again")
    if not rows:
        raise DataError(f"{path}: no samples")
    return rows


def _check_samples_match(path: str, rows: list[dict], tokenizer) -> None:
    """Every completion's ids decode to its text under the policy's tokenizer (a samples file whose text was
    edited, or made by another model, would be scored on one text and its log-probs taken on another)."""
    vocab = len(tokenizer)
    for i, r in enumerate(rows, 1):
        if any(t >= vocab for t in r["prompt_ids"] + r["completion_ids"]):
            raise DataError(f"{path}:{i}: token ids beyond this model's vocabulary of {vocab}; the samples came from "
                            "another model")
        if tokenizer.decode(r["completion_ids"], skip_special_tokens=True) != r["completion"]:
            raise DataError(f"{path}:{i}: the completion text is not what its completion_ids decode to (edited, or "
                            "another tokenizer); sample again")


def _check_same_tokenizer(policy, other, what: str) -> None:
    """KL and win rates compare token ids across models: they must share one vocabulary."""
    if policy.tokenizer.get_vocab() != other.tokenizer.get_vocab():
        raise DataError(f"{what} {other.source}: its tokenizer differs from the policy's ({len(other.tokenizer)} vs "
                        f"{len(policy.tokenizer)} tokens); KL needs the same token ids: give a model of the same family")


@_precision_rule
def evaluate(model: str, prompts: str | list | None, scorer: str = "vader", out: str | None = None,
             baseline: str | None = None, initial: str | None = None, samples: str | None = None,
             limit: int | None = None, split: str = "train", device: str = "auto", dtype: str = "auto",
             judge_template: str | None = None, **settings) -> dict:
    """Generate (or reuse a samples file), score, KL to the initial policy, win rate against the baseline
    (default: the initial policy); writes `out/eval.json` and `out/samples.jsonl` when `out` is given."""
    check_scorer_spec(scorer)
    check_sampling(limit, **settings)
    if judge_template and not scorer.startswith("judge:"):
        from entangle.errors import ConfigError

        raise ConfigError(f"--judge-template applies to a judge:PATH scorer, not {scorer}")
    if out:
        check_outputs(folders={"--out": out}, files={"--out": os.path.join(out, "samples.jsonl"),
                                                      "--out ": os.path.join(out, "eval.json")},
                      inputs={"--samples": samples, "prompts": prompts if isinstance(prompts, str) else None})
    reused = _read_samples(samples) if samples else None
    texts = None if reused else load_prompts(prompts, split, limit) if isinstance(prompts, str) else list(prompts)
    template = None
    if judge_template:
        try:
            template = open(judge_template).read()
        except OSError as e:
            raise DataError(f"{judge_template}: cannot read the judge template ({e.strerror})") from None
    check_scorer_source(scorer)
    for spec, what in ((model, "MODEL_OR_RUN"), (initial, "--initial"), (baseline, "--baseline")):
        if spec:
            if resolve(spec)[0] == "model":
                check_source(spec, what)
    dev = _device(device)
    policy = load_policy(model, dtype, dev)
    if reused:
        _check_samples_match(samples, reused, policy.tokenizer)
    start = load_policy(initial, dtype, dev) if initial else load_initial(policy, dtype, dev)
    _check_same_tokenizer(policy, start, "--initial")
    base = load_policy(baseline, dtype, dev) if baseline else None   # compared on text: any tokenizer
    moving = load_moving_reference(model, policy)   # a trust-region run: KL to where its reference ended too
    figures, rows = evaluate_policy(policy, texts, get_scorer(scorer, dev, template), start, base, reused, moving,
                                    **settings)
    used = {k: v for k, v in settings.items() if k not in ("progress", "memory_gib")}
    # With --samples the policy's samples were made elsewhere: the sampling settings made only the baseline's.
    meta = {"model": model, "initial": start.source, "baseline": baseline or start.source, "scorer": scorer,
            "prompts": prompts if isinstance(prompts, str) else None, "samples_file": samples,
            "baseline_sampling" if samples else "settings": used}
    if out:
        write_evaluation(out, figures, rows, meta)
    return figures


@_precision_rule
def label(model: str, prompts: str | list, scorer: str = "vader", out: str | None = None, noise: float = 0.0,
          limit: int | None = None, split: str = "train", device: str = "auto", dtype: str = "auto",
          dropped: dict | None = None, **settings) -> list[dict]:
    """Preference pairs made by sampling twice per prompt from `model` and labelling with `scorer`
    (Bradley-Terry noise of temperature `noise`); written to `out` (TRL's prompt/chosen/rejected JSONL).
    Prompts left out (identical or empty samples, ties) are counted per reason in `dropped` and logged."""
    from entangle.errors import ConfigError
    from entangle.labeling import label_pairs, write_preferences

    check_scorer_source(scorer)
    if noise < 0 or noise != noise:
        raise ConfigError(f"--noise must be >= 0 (got {noise})")
    if scorer.startswith("judge:"):
        raise ConfigError("labelling needs a pointwise gold scorer (vader, rm:PATH, python:module:function)")
    check_sampling(limit, **{k: v for k, v in settings.items() if k != "n"})
    check_outputs(files={"--out": out}, inputs={"prompts": prompts if isinstance(prompts, str) else None})
    texts = load_prompts(prompts, split, limit) if isinstance(prompts, str) else list(prompts)[:limit]
    resolve(model)
    dev = _device(device)
    policy = load_policy(model, dtype, dev)
    seed = settings.pop("seed", 0)
    settings.pop("n", None)
    dropped: dict = {} if dropped is None else dropped
    rows = label_pairs(policy, texts, get_scorer(scorer, dev), noise, seed, dropped, **settings)
    if dropped:
        from entangle.labeling import DROP_REASONS

        log.warning("labelled %d of %d prompts; left out: %s", len(rows), len(texts),
                    "; ".join(f"{n} because {DROP_REASONS[k]}" for k, n in sorted(dropped.items())))
    if not rows:
        raise DataError(f"{model}: every pair of samples was identical or tied; raise the temperature or "
                        "max_new_tokens")
    if out:
        write_preferences(out, rows)
    return rows


@_precision_rule
def scan(model: str, data: str, out: str | None = None, **options) -> dict:
    """`entangle scan`: every pair of `data` scored at `model` before training (`scanning.py`); `options` are the
    fields of `scanning.ScanSettings` (their defaults and ranges live there). With `out`: `out/scan.jsonl`,
    `out/summary.json`, `out/report.html`; with any filter, the pairs that pass are written in the input's format
    to `keep_path` (default `out/kept.<ext>`). `batch_size` shrinks to fit `memory_gib`, a one-line error before the
    scan when one pair does not fit; the token views stay within a quarter of the budget (1 GiB at most).
    Returns {"rows", "summary", "kept", "report"}."""
    from entangle import losses, scanning
    from entangle.data import tokenize_pairs
    from entangle.errors import ConfigError

    s = scanning.ScanSettings.of(options)
    if not losses.get(s.loss, **s.loss_params).paired:
        raise ConfigError(f"--loss {s.loss}: the scan scores preference pairs; give a paired loss")
    if (s.filtering or s.keep_path) and not (out or s.keep_path):
        raise ConfigError("a filter writes the pairs that pass: give --out (or --keep PATH)")
    examples = _scan_examples(data, s)
    check_outputs(folders={"--out": out}, files={"--keep": s.keep_path}, inputs={"--data": data})
    lm, tokenizer, measured = _scan_model(model, s.lora_r, s.layers, s.dtype, _device(s.device))
    check_fits_context(lm, s.max_length, "--max-length")
    pairs, stats = tokenize_pairs(examples, tokenizer, s.max_length, s.max_prompt_length)
    if not pairs:
        raise DataError(f"{data}: every pair was dropped by truncation; raise --max-length")
    budget = memory.work_budget(lm, _device(s.device), s.memory_gib)
    rows = scanning.scan(lm, tokenizer, pairs, s.loss, s.loss_params, s.method, _scan_batch(lm, pairs, s, budget),
                         s.progress)
    summary = {"model": model, "data": data, "loss": s.loss, "method": s.method, "max_length": s.max_length,
               "gradient_over": measured, "pairs_read": len(examples), "pairs_dropped": stats.n_dropped,
               **scanning.scan_summary(rows)}
    result = {"rows": rows, "summary": summary, "kept": None}
    if s.filtering or s.keep_path:
        result["kept"] = _write_kept(rows, summary, data, out, s)
    if out:
        result["report"] = _write_scan(out, rows, summary, pairs, examples, lm, tokenizer, s.tokens,
                                       f"entangle scan: {model} on {data}", max(budget // 4, 0))
    return result


def _scan_examples(data: str, s) -> list:
    """The scan's records, every one checked before any model loads."""
    from entangle.data import missing_file, read_examples

    if missing_file(data):
        raise DataError(f"--data {data}: no such file or folder")
    if data.startswith("synthetic:"):
        from entangle import synthetic

        return synthetic.from_source(data)[: s.limit]
    return read_examples(data, split=s.split, limit=s.limit)[0]


def _scan_batch(lm, pairs, s, budget: int) -> int:
    """The largest batch <= `s.batch_size` that fits the memory budget (`memory.largest_batch`)."""
    length = max(len(p.prompt_ids) + max(len(p.chosen_ids), len(p.rejected_ids)) for p in pairs)
    grads = memory.trainable(lm) * (3 if s.method == "exact" else 1)   # exact: per-pair gradient copies

    def need(b: int) -> int:   # fast: the gradient recorder keeps every module's output gradient
        return grads + memory.forward(lm, 2 * b, length, grad=True) + \
            (memory.recorded(lm, 2 * b, length) if s.method == "fast" else 0)

    return memory.largest_batch(need, budget,
                                min(s.batch_size, len(pairs)), f"scan of {len(pairs)} pairs of up to {length} tokens",
                                "--batch-size")


def _write_kept(rows: list[dict], summary: dict, data: str, out: str | None, s) -> list[dict]:
    """The pairs that pass the filters, in the input's format, and what was kept in the summary."""
    from entangle import scanning

    kept = scanning.keep(rows, s.drop_case, s.max_cos, s.max_ches_quantile, s.max_ches_norm_quantile)
    target = s.keep_path or os.path.join(out, scanning.filtered_name(data))
    os.makedirs(os.path.dirname(os.path.abspath(target)), exist_ok=True)
    scanning.write_filtered(data, kept, target, s.split)
    summary["filter"] = {"drop_case": list(s.drop_case), "max_cos": s.max_cos, "max_ches_quantile": s.max_ches_quantile,
                         "max_ches_norm_quantile": s.max_ches_norm_quantile, "kept": len(kept), "file": target}
    return kept


def _scan_model(model: str, lora_r: int, layers: int | None, dtype: str, device: str):
    """(model, tokenizer, what the gradient is over) for the scan: fresh LoRA adapters on a plain model when
    `lora_r`, else the model or run as it is; `layers` keeps only the last K decoder layers trainable."""
    from entangle import scanning
    from entangle.models import LoraConfig, load_model

    if lora_r and resolve(model)[0] == "model":
        lm, tokenizer = load_model(model, dtype, device, LoraConfig(r=lora_r))
    else:
        loaded = load_policy(model, dtype, device)
        lm, tokenizer = loaded.model, loaded.tokenizer
    measured = "all trainable parameters" if not lora_r else f"fresh LoRA adapters of rank {lora_r}"
    return lm, tokenizer, scanning.last_layers_only(lm, layers) if layers else measured

def _write_scan(out: str, rows: list[dict], summary: dict, pairs, examples, lm, tokenizer, tokens: int,
                title: str, view_bytes: int) -> str:
    """`out/scan.jsonl` (first: the rows survive whatever follows), the token views of the `tokens` most entangled
    pairs, the report and `out/summary.json`; returns the report's path."""
    from entangle.checkpoint import write_json
    from entangle.diagnostics.tokens import TOKEN_BUDGET, to_json, token_gradients
    from entangle.report import write_scan_report

    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "scan.jsonl.tmp"), "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    os.replace(os.path.join(out, "scan.jsonl.tmp"), os.path.join(out, "scan.jsonl"))
    by_index = {p.index: p for p in pairs}
    views = []
    for r in sorted(rows, key=lambda r: r["cos"], reverse=True)[:tokens]:
        p = by_index[r["index"]]   # the first 24 tokens of each response: exact (a token sees only its past)
        views.append({"pair": p.index, **to_json(token_gradients(lm, p.prompt_ids, p.chosen_ids[:24],
                                                                 p.rejected_ids[:24], tokenizer,
                                                                 min(TOKEN_BUDGET, view_bytes)))})
    lm.zero_grad(set_to_none=True)
    texts = {i: tuple(_flat_text(t)[-160:] if k == 0 else _flat_text(t) for k, t in
                      enumerate((ex.prompt, ex.chosen, ex.rejected))) for i, ex in enumerate(examples)}
    summary["token_views"] = sorted({v["method"] for v in views}) if views else []
    report = write_scan_report(rows, summary, out, texts, views, title)
    write_json(os.path.join(out, "summary.json"), summary)
    return report


def _flat_text(t) -> str:
    return t if isinstance(t, str) else " | ".join(f"{m['role']}: {m['content']}" for m in t)

