"""Preference data made from a policy and a gold scorer: labels agree with the scorer and the noise model."""

import json
import math
import random

import pytest

from entangle.generation import load_policy
from entangle.labeling import label_pairs, preference_probability


class Length:
    """A gold scorer with known numbers: the completion's length in characters."""

    pairwise = False

    def score(self, prompts, completions):
        return [float(len(c)) for c in completions]


def test_bradley_terry_probability_by_hand():
    """sigmoid((s_a - s_b) / T): scores 1 and 0 at T = 0.5 -> sigmoid(2) = 0.8808; T = 0 is a step."""
    assert preference_probability(1.0, 0.0, 0.5) == pytest.approx(1 / (1 + math.exp(-2)))
    assert preference_probability(0.0, 1.0, 0.5) == pytest.approx(1 / (1 + math.exp(2)))
    assert [preference_probability(a, b, 0) for a, b in ((2, 1), (1, 2), (1, 1))] == [1.0, 0.0, 0.5]


def test_noiseless_labels_prefer_the_higher_score():
    policy = load_policy("tiny")
    rows = label_pairs(policy, ["Hello"] * 12, Length(), noise=0.0, seed=0, max_new_tokens=6, temperature=1.0)
    assert rows and all(r["score_chosen"] > r["score_rejected"] and r["p_chosen"] == 1.0 for r in rows)
    assert all(len(r["chosen"]) == r["score_chosen"] for r in rows)
    assert set(rows[0]) >= {"prompt", "chosen", "rejected"}


def test_noisy_labels_follow_the_noise_model_in_expectation():
    """Over many pairs the share of labels that agree with the higher score equals the mean Bradley-Terry
    probability of agreeing, within 3 standard errors of a binomial."""
    policy = load_policy("tiny")
    rows = label_pairs(policy, ["Q"] * 150, Length(), noise=2.0, seed=1, max_new_tokens=8, temperature=1.0)
    rows = [r for r in rows if r["score_chosen"] != r["score_rejected"]]
    agree = [r["score_chosen"] > r["score_rejected"] for r in rows]
    expected = [preference_probability(max(r["score_chosen"], r["score_rejected"]),
                                       min(r["score_chosen"], r["score_rejected"]), 2.0) for r in rows]
    n = len(rows)
    mean_p = sum(expected) / n
    assert n > 50 and 0 < sum(agree) < n        # noise flipped some labels, not all
    assert abs(sum(agree) / n - mean_p) < 3 * math.sqrt(mean_p * (1 - mean_p) / n)
    # p_chosen is the probability of the label that was drawn
    for r in rows:
        p = preference_probability(r["score_chosen"], r["score_rejected"], 2.0)
        assert r["p_chosen"] == pytest.approx(p)


def test_label_cli_writes_a_preference_file_that_trains(tmp_path):
    from entangle import config
    from entangle.api import label
    from entangle.loop import train

    out = tmp_path / "pairs.jsonl"
    rows = label("tiny", "synthetic:sentiment?config=short&n=24", "python:test_labeling:length_scorer",
                 out=str(out), noise=0.0, max_new_tokens=6, progress=False)
    written = [json.loads(x) for x in out.read_text().splitlines()]
    assert written == rows and len(rows) >= 8
    train(config.load(None, ["model.name=tiny", f"data.train={out}", "train.batch_size=2", "train.max_steps=2",
                             "tracking.progress=false", f"train.output_dir={tmp_path / 'run'}"]))
    assert (tmp_path / "run" / "final").exists()


def length_scorer(prompts, completions):
    random.seed(0)
    return [len(c) for c in completions]
