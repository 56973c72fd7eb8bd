"""Preference data made from a policy and a gold scorer: two samples per prompt, labelled by their scores.

    rows = label_pairs(policy, prompts, get_scorer("vader"), noise=0.1, seed=0, max_new_tokens=48)
    write_preferences("pairs.jsonl", rows)      # TRL's prompt/chosen/rejected format, scores beside

With `noise` T > 0 the label is drawn from a Bradley-Terry model of the gold scores,
P(a preferred over b) = sigmoid((s_a - s_b) / T), as a finite, noisy human preference set would be;
T = 0 prefers the higher score. Pairs whose two samples are the same text, or tie at T = 0, are dropped.
"""

from __future__ import annotations

import math
import random
from typing import Sequence

from entangle.errors import ConfigError
from entangle.evaluation import Scorer, checked_scores
from entangle.generation import LoadedPolicy, generate, write_samples


def preference_probability(score_a: float, score_b: float, noise: float) -> float:
    """P(a is preferred to b): Bradley-Terry with temperature `noise` (0: a step function, ties 0.5)."""
    if noise == 0:
        return 1.0 if score_a > score_b else 0.0 if score_a < score_b else 0.5
    return 1.0 / (1.0 + math.exp(-(score_a - score_b) / noise))


DROP_REASONS = {"identical": "the two samples were the same text",
                "empty": "a sample was empty (EOS first)",
                "tie": "the two scores tied and noise is 0 (no preference to draw)"}


def label_pairs(policy: LoadedPolicy, prompts: Sequence, scorer: Scorer, noise: float = 0.0, seed: int = 0,
                dropped: dict | None = None, **gen) -> list[dict]:
    """Sample two completions per prompt, score both, label; returns preference rows
    `{prompt, chosen, rejected, score_chosen, score_rejected, p_chosen}` (p_chosen: the model's probability
    of the label that was drawn). `dropped`, when given, receives the count of prompts left out per reason
    (`DROP_REASONS`)."""
    if scorer.pairwise:
        raise ConfigError("labelling needs a pointwise gold scorer (vader, rm:, python:), not a judge")
    samples = generate(policy.model, policy.tokenizer, prompts, **{**gen, "n": 2, "seed": seed}, logps=False)
    scores = checked_scores(scorer, [s["prompt"] for s in samples], [s["completion"] for s in samples])
    rng = random.Random(seed)
    rows = []
    for k in range(0, len(samples), 2):
        a, b = samples[k], samples[k + 1]
        sa, sb = scores[k], scores[k + 1]
        p = preference_probability(sa, sb, noise)
        reason = "empty" if not a["completion"].strip() or not b["completion"].strip() else \
            "identical" if a["completion"].strip() == b["completion"].strip() else \
            "tie" if noise == 0 and sa == sb else None
        if reason:
            if dropped is not None:
                dropped[reason] = dropped.get(reason, 0) + 1
            continue
        a_wins = rng.random() < p
        chosen, rejected = (a, b) if a_wins else (b, a)
        rows.append({"prompt": a["prompt"], "chosen": chosen["completion"], "rejected": rejected["completion"],
                     "score_chosen": sa if a_wins else sb, "score_rejected": sb if a_wins else sa,
                     "p_chosen": p if a_wins else 1 - p})
    return rows


def write_preferences(path: str, rows: Sequence[dict]) -> None:
    """A preference JSONL that `entangle train` (and TRL) read directly."""
    write_samples(path, rows)
