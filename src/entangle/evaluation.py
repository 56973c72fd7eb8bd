"""Judging a policy on its own samples: gold scorers, KL from the initial policy, win rate, length, diversity.

    scorer = get_scorer("vader")                     # vader | rm:PATH | python:module:function | judge:PATH
    figures, samples = evaluate_policy(policy, prompts, scorer, initial=initial, n=1, max_new_tokens=64)
    figures["gold/mean"], figures["kl/initial"], figures["win_rate"]     # each with _se and _n

KL(pi || pi_init) is estimated from the policy's own samples y ~ pi(.|x) as the mean over samples of
log pi(y|x) - log pi_init(y|x), summed over the completion's tokens (the sequence-level estimator of the
DPO and trust-region papers): unbiased for the sequence KL, and its standard error is reported with it.
"""

from __future__ import annotations

import importlib
import logging
import math
import os
from typing import Callable, Sequence

import torch

from entangle.config import check_scorer_spec
from entangle.errors import ConfigError, ModelError
from entangle.generation import LoadedPolicy, completion_logps, generate, standard_error, write_samples
from entangle.hooks import LoopCallback

log = logging.getLogger(__name__)

JUDGE_TEMPLATE = ("Which response answers the user's prompt better?\n\nPrompt:\n{prompt}\n\nResponse A:\n{a}\n\n"
                  "Response B:\n{b}\n\nAnswer with one letter, A or B.")


class Scorer:
    """Pointwise: `score(prompts, completions) -> list[float]`. Pairwise scorers (judges) set `pairwise`
    and give `compare(prompts, a, b) -> list[float]` (1: a better, 0: b better, 0.5: a tie)."""

    pairwise = False
    name = "scorer"

    def score(self, prompts: Sequence, completions: Sequence[str]) -> list[float]:
        raise NotImplementedError


def checked_scores(scorer, prompts: Sequence, completions: Sequence[str]) -> list[float]:
    """`scorer.score`, refused in one line unless it gives one finite number per completion (never averaged)."""
    got = scorer.score(prompts, completions)
    name = getattr(scorer, "name", type(scorer).__name__)
    if len(got) != len(completions):
        raise ConfigError(f"scorer {name} returned {len(got)} scores for {len(completions)} completions")
    for i, v in enumerate(got):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ConfigError(f"scorer {name}: score {i} is {v!r} (for {completions[i][:40]!r}); every score "
                              "must be a finite number")
    return [float(v) for v in got]


class Vader(Scorer):
    """VADER compound sentiment of the completion, in [-1, 1] (lexicon shipped with `vadersentiment`)."""

    name = "vader"

    def __init__(self):
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        self.analyzer = SentimentIntensityAnalyzer()

    def score(self, prompts, completions):
        return [float(self.analyzer.polarity_scores(c)["compound"]) for c in completions]


def _prompt_text(prompt) -> str:
    return prompt if isinstance(prompt, str) else "\n".join(f"{m['role']}: {m['content']}" for m in prompt)


class RewardModel(Scorer):
    """A local reward model: `AutoModelForSequenceClassification` with one label; the chat template is
    applied to (prompt, completion) when the tokenizer has one, else prompt + completion."""

    def __init__(self, path: str, batch_size: int = 8, device: str = "cpu"):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from entangle.models import hub_options

        self.name, self.batch_size = f"rm:{path}", batch_size
        options = hub_options(path)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path, **options)
            self.model = AutoModelForSequenceClassification.from_pretrained(path, **options).to(device).eval()
        except (OSError, ValueError) as e:
            raise ModelError(f"rm:{path}: cannot load a reward model there ({type(e).__name__}); give a local "
                             "folder of an AutoModelForSequenceClassification") from None
        if self.model.config.num_labels != 1:
            raise ModelError(f"rm:{path}: the model has {self.model.config.num_labels} labels; a reward model "
                             "has exactly one (num_labels=1)")
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model.config.pad_token_id = self.tokenizer.pad_token_id

    def _text(self, prompt, completion: str) -> str:
        if getattr(self.tokenizer, "chat_template", None):
            msgs = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
            return self.tokenizer.apply_chat_template(msgs + [{"role": "assistant", "content": completion}],
                                                      tokenize=False)
        return _prompt_text(prompt) + completion

    @torch.no_grad()
    def score(self, prompts, completions):
        out = []
        for b in range(0, len(completions), self.batch_size):
            texts = [self._text(p, c) for p, c in zip(prompts[b : b + self.batch_size],
                                                      completions[b : b + self.batch_size])]
            enc = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
            enc = {k: v.to(self.model.device) for k, v in enc.items()}
            out += self.model(**enc).logits[:, 0].float().tolist()
        return out


class PythonScorer(Scorer):
    """The user's own `f(prompts, completions) -> list[float]`, named `python:module:function`."""

    def __init__(self, module: str, function: str):
        self.name = f"python:{module}:{function}"
        try:
            self.fn: Callable = getattr(importlib.import_module(module), function)
        except (Exception, SystemExit) as e:   # a module that fails (or exits) as it loads is user code too
            raise ConfigError(f"scorer {self.name}: cannot import it ({type(e).__name__}: {e})") from None
        if not callable(self.fn):
            raise ConfigError(f"scorer {self.name}: {function} is not a function of (prompts, completions)")

    def score(self, prompts, completions):
        try:   # user code: any failure is one line naming it, never a traceback or a silent exit
            got = self.fn(list(prompts), list(completions))
            got = list(got)
        except (Exception, SystemExit) as e:
            raise ConfigError(f"scorer {self.name} failed on {len(completions)} completions: "
                              f"{type(e).__name__}: {e}") from None
        out = []
        for i, x in enumerate(got):
            try:
                if isinstance(x, (str, bytes, bool)) or x is None:
                    raise TypeError
                out.append(float(x))          # numpy and torch scalars too
            except (TypeError, ValueError):
                raise ConfigError(f"scorer {self.name}: score {i} is {x!r}, not a number") from None
        return out


class Judge(Scorer):
    """Pairwise judging by a local instruct model: the two answers are shown in both orders (A/B, then B/A)
    and the judge's next-token preference between "A" and "B" is read each time; a verdict that flips with
    the order is a tie (0.5), which cancels position bias."""

    pairwise = True

    def __init__(self, path: str, template: str = JUDGE_TEMPLATE, device: str = "cpu"):
        from entangle.models import load_model

        self.name, self.template = f"judge:{path}", template
        for key in ("{prompt}", "{a}", "{b}"):
            if key not in template:
                raise ConfigError(f"judge template: it must contain {key}")
        self.model, self.tokenizer = load_model(path, "auto", device)
        self.model.eval()
        self.ids = [self._letter(x) for x in ("A", "B")]

    def _letter(self, letter: str) -> int:
        ids = self.tokenizer(letter, add_special_tokens=False)["input_ids"]
        return ids[-1]

    def _prefers_first(self, prompt, first: str, second: str) -> bool:
        from entangle.data import encode_prompt

        text = self.template.format(prompt=_prompt_text(prompt), a=first, b=second)
        use_chat = getattr(self.tokenizer, "chat_template", None) is not None
        ids = encode_prompt(self.tokenizer, [{"role": "user", "content": text}] if use_chat else text)
        device = next(self.model.parameters()).device
        logits = self.model(input_ids=torch.tensor([ids], device=device)).logits[0, -1]
        return bool(logits[self.ids[0]] > logits[self.ids[1]])

    @torch.no_grad()
    def compare(self, prompts, a: Sequence[str], b: Sequence[str]) -> list[float]:
        out = []
        for p, x, y in zip(prompts, a, b):
            ab = self._prefers_first(p, x, y)            # True: x (shown as A) wins
            ba = not self._prefers_first(p, y, x)        # True: x (shown as B) wins
            out.append(1.0 if ab and ba else 0.0 if not ab and not ba else 0.5)
        return out


def check_scorer_source(spec: str, what: str = "--scorer") -> None:
    """A scorer string's syntax and, for rm:PATH / judge:PATH, its model (`models.check_source`), before anything
    loads."""
    from entangle.models import check_source

    check_scorer_spec(spec)
    kind, _, rest = spec.partition(":")
    if kind in ("rm", "judge"):
        check_source(rest, f"{what} {kind}:")


def get_scorer(spec: str, device: str = "cpu", judge_template: str | None = None) -> Scorer:
    """The scorer a string names (`SCORERS`)."""
    check_scorer_source(spec)
    kind, _, rest = spec.partition(":")
    if spec == "vader":
        return Vader()
    if kind == "rm":
        return RewardModel(rest, device=device)
    if kind == "judge":
        return Judge(rest, judge_template or JUDGE_TEMPLATE, device=device)
    module, function = rest.split(":")
    return PythonScorer(module, function)


def distinct_2(texts: Sequence[str]) -> float:
    """Distinct word bigrams over all completions / all word bigrams (0 when there are none)."""
    bigrams = [tuple(w[i : i + 2]) for w in (t.split() for t in texts) for i in range(len(w) - 1)]
    return len(set(bigrams)) / len(bigrams) if bigrams else 0.0


def _figure(out: dict, name: str, values: Sequence[float]) -> None:
    out[name] = sum(values) / len(values) if values else None
    out[f"{name}_se"] = standard_error(values)
    out[f"{name}_n"] = len(values)


def sample_figures(samples: Sequence[dict]) -> dict:
    """The evaluation figures of scored samples (`score`, `logp`, `logp_initial`, `win`, `tokens`, `completion`)."""
    out: dict = {}
    if samples and "score" in samples[0]:
        _figure(out, "gold/mean", [s["score"] for s in samples])
    if samples and "baseline_score" in samples[0]:   # the baseline's (default: the initial policy's) gold, beside
        _figure(out, "gold/baseline", [s["baseline_score"] for s in samples])
    if samples and "logp_initial" in samples[0]:
        _figure(out, "kl/initial", [s["logp"] - s["logp_initial"] for s in samples])
    if samples and "logp_reference" in samples[0]:
        _figure(out, "kl/reference", [s["logp"] - s["logp_reference"] for s in samples])
    if samples and "win" in samples[0]:
        _figure(out, "win_rate", [s["win"] for s in samples])
    _figure(out, "length/mean", [s["tokens"] for s in samples])
    out["distinct_2"] = distinct_2([s["completion"] for s in samples])
    return out


def score_samples(samples: list[dict], scorer: Scorer, baseline: list[dict] | None = None) -> None:
    """Add `score` (pointwise scorers) and, against baseline samples of the same prompts, `win` (ties half)."""
    prompts = [s["prompt"] for s in samples]
    if not scorer.pairwise:
        for s, v in zip(samples, checked_scores(scorer, prompts, [s["completion"] for s in samples])):
            s["score"] = v
        if baseline is not None and "score" not in baseline[0]:
            for s, v in zip(baseline, checked_scores(scorer, prompts, [b["completion"] for b in baseline])):
                s["score"] = v
    if baseline is None:
        return
    if scorer.pairwise:
        wins = scorer.compare(prompts, [s["completion"] for s in samples], [b["completion"] for b in baseline])
    else:
        wins = [1.0 if s["score"] > b["score"] else 0.5 if s["score"] == b["score"] else 0.0
                for s, b in zip(samples, baseline)]
    for s, b, w in zip(samples, baseline, wins):
        s["win"], s["baseline_completion"] = w, b["completion"]
        if "score" in b:
            s["baseline_score"] = b["score"]


def baseline_samples(model, tokenizer, prompts: Sequence, gen: dict) -> list[dict]:
    """A baseline's samples (no log-probs), cached on disk under `$ENTANGLE_CACHE/samples/`, keyed by the
    model's weights and arithmetic (the autocast in force), the prompts and the sampling settings: every evaluation
    against the same initial policy (several checkpoints, a study's runs) samples it once."""
    import hashlib
    import json

    from entangle.models import autocast_now, cache_dir
    from entangle.reference import fingerprint

    settings = {k: v for k, v in gen.items() if k != "progress"}
    h = hashlib.blake2b(digest_size=16)
    h.update(fingerprint(model, [], autocast_now(next(model.parameters()).device)).encode())   # and its arithmetic
    h.update(json.dumps([list(prompts), settings, tokenizer.eos_token_id], sort_keys=True, default=str).encode())
    path = os.path.join(cache_dir(), "samples", f"{h.hexdigest()}.jsonl")
    if os.path.exists(path):
        with open(path) as f:
            rows = [json.loads(x) for x in f if x.strip()]
        if len(rows) == len(prompts) * settings.get("n", 1):
            log.info("reusing the baseline's samples %s", path)
            return rows
    rows = generate(model, tokenizer, prompts, **{**settings, "progress": False}, logps=False)
    write_samples(path, rows)
    return rows


def evaluate_policy(policy: LoadedPolicy, prompts: Sequence, scorer: Scorer, initial: LoadedPolicy | None = None,
             baseline: LoadedPolicy | None = None, samples: list[dict] | None = None, reference=None,
             **gen) -> tuple[dict, list[dict]]:
    """Sample (or reuse `samples`), score, and compare with the initial policy -> (figures, samples).

    `baseline` (default: the initial policy) is sampled with the same settings and seed for the win rate.
    `reference`: a run's moved trust-region reference (`generation.load_moving_reference`): adds `kl/reference`.
    `gen`: n, max_new_tokens, temperature, top_p, seed, batch_size, max_prompt_length, progress, memory_gib."""
    pad = policy.tokenizer.pad_token_id
    from entangle.generation import SamplingSettings

    sampling = SamplingSettings.of(gen)
    scoring = {"batch_size": sampling.batch_size, "memory_gib": sampling.memory_gib}
    if samples is None:
        samples = generate(policy.model, policy.tokenizer, prompts, **gen)
    initial = initial or policy
    # KL from one numeric path: both sides teacher-forced in the same batches (the sampling forward's own
    # log-probs differ from a full forward by ~1e-2 per token in bf16, a bias of tenths of a nat per sample)
    for s, lp in zip(samples, completion_logps(policy.model, samples, pad, **scoring).tolist()):
        s["logp"] = lp
    same = initial.model is policy.model   # a model against itself: KL exactly 0
    init_logps = [s["logp"] for s in samples] if same else \
        completion_logps(initial.model, samples, pad, **scoring).tolist()
    for s, lp in zip(samples, init_logps):
        s["logp_initial"] = lp
    if reference is not None:
        for s, lp in zip(samples, completion_logps(reference, samples, pad, **scoring).tolist()):
            s["logp_reference"] = lp
    baseline = baseline or initial
    if baseline.model is policy.model:   # the same model, seed and batches: the same samples
        base_rows = [{k: s[k] for k in ("prompt", "completion", "tokens")} for s in samples]
    else:
        n = max(s["sample"] for s in samples) + 1
        base_rows = baseline_samples(baseline.model, baseline.tokenizer,
                                     [s["prompt"] for s in samples if s["sample"] == 0], {**gen, "n": n})
    score_samples(samples, scorer, base_rows)
    return sample_figures(samples), samples


def write_evaluation(out: str, figures: dict, samples: list[dict], meta: dict) -> str:
    """`OUT/eval.json` (figures + what was evaluated) and `OUT/samples.jsonl`."""
    from entangle.checkpoint import write_json

    os.makedirs(out, exist_ok=True)
    write_json(os.path.join(out, "eval.json"), {**meta, **figures})
    write_samples(os.path.join(out, "samples.jsonl"), samples)
    return os.path.join(out, "eval.json")


class GenerationEval(LoopCallback):
    """`eval.generate`: at evaluation steps, sample from held-out prompts and log `eval/gold/mean`,
    `eval/kl/initial`, `eval/win_rate` (against the initial policy's samples, made once), `eval/length/mean`;
    the samples go to `samples/step-N.jsonl`. Every process samples its share of the prompts."""

    def __init__(self, initial_model, initial_context, tokenizer, prompts: list, scorer: Scorer, settings: dict,
                 every: int, total_steps: int):
        self.initial_model, self.initial_context = initial_model, initial_context
        self.tokenizer, self.prompts, self.scorer, self.settings = tokenizer, prompts, scorer, settings
        self.every, self.total_steps = every, total_steps
        self.baseline: list[dict] | None = None

    def evaluates(self, step: int) -> bool:
        return step == 0 or step == self.total_steps or step % self.every == 0

    @torch.no_grad()
    def on_evaluate(self, ctx) -> dict:
        from accelerate.utils import gather_object

        if not self.evaluates(ctx.step):
            return {}
        acc = ctx.accelerator
        lm = acc.unwrap_model(ctx.policy).model
        mine = self.prompts[acc.process_index :: acc.num_processes]
        settings = {**self.settings, "seed": self.settings["seed"] * 1009 + acc.process_index}
        rows = generate(lm, self.tokenizer, mine, **settings) if mine else []
        # the policy's log-probs teacher-forced, as the initial policy's are: KL from one numeric path
        policy_logps = completion_logps(lm, rows, self.tokenizer.pad_token_id, self.settings["batch_size"])
        for s, lp in zip(rows, policy_logps.tolist()):
            s["logp"] = lp
        with self.initial_context():
            init = completion_logps(self.initial_model, rows, self.tokenizer.pad_token_id, self.settings["batch_size"])
            for s, lp in zip(rows, init.tolist()):
                s["logp_initial"] = lp
            if self.baseline is None:   # the initial policy's samples: the same prompts and seeds, made once
                self.baseline = baseline_samples(self.initial_model, self.tokenizer, mine, settings) if mine else []
        if rows:
            score_samples(rows, self.scorer, self.baseline)
        rows = gather_object(rows) if acc.num_processes > 1 else rows
        if ctx.is_main:
            write_samples(os.path.join(ctx.run_dir, "samples", f"step-{ctx.step}.jsonl"), rows)
        return {f"eval/{k}": v for k, v in sample_figures(rows).items()}
