"""The over-optimisation study's pre-set statistic on synthetic numbers: a known gap is found, no gap is
"indistinguishable", a frontier that never falls fails the positive control, and the study then draws no conclusion."""

import numpy as np
import pytest

from entangle.studies import frontier
from entangle.studies.frontier import Curves


def _curves(shape_fn, seeds=3, runs=4, checkpoints=6, prompts=64, noise=0.3, seed=0, top=2.5):
    """Runs that reach d = sqrt KL up to `top` at their last checkpoint (run r reaches top * (r + 1) / runs);
    per-prompt gold = shape(d) + noise. KL per prompt = d^2 + small noise, so sqrt of the prompt mean is ~d."""
    rng = np.random.default_rng(seed)
    d = np.array([[top * (r + 1) / runs * c / (checkpoints - 1) for c in range(checkpoints)] for r in range(runs)])
    gold = shape_fn(d)[None, :, :, None] + noise * rng.standard_normal((seeds, runs, checkpoints, prompts))
    kl = (d ** 2)[None, :, :, None] + 0.05 * rng.standard_normal((seeds, runs, checkpoints, prompts))
    return Curves(gold, kl)


def peaked(d):       # g(d) = -0.8 + d (0.8 - 0.4 d): peak at d = 1 (gold -0.4), -1.3 at d = 2.5
    return -0.8 + d * (0.8 - 0.4 * d)


def test_fit_recovers_both_forms_exactly():
    """Noise-free points of each form give back its coefficients (the forms are linear in them)."""
    d = np.linspace(0, 3, 20)
    assert frontier.fit(d, -0.8 + d * (0.8 - 0.4 * d)) == pytest.approx([-0.8, 0.8, 0.4], abs=1e-9)
    g = 0.1 + d * (0.5 - 0.3 * np.log(np.where(d > 0, d, 1)))
    assert frontier.fit(d, g, "log") == pytest.approx([0.1, 0.5, 0.3], abs=1e-9)


def test_positive_control_passes_on_a_peaked_frontier_and_fails_on_a_rising_one():
    """Peaked: rise = -0.4 - (-0.8) = 0.4, fall = -0.4 - (-1.3) = 0.9, both well outside the noise. Rising
    (g = 0.3 d): the maximum is at the largest d, so the fall is 0 and the control fails."""
    got = frontier.positive_control(_curves(peaked), reps=200)
    assert got["passed"] and got["peak_d"] == pytest.approx(1.0, abs=0.15)
    assert got["rise"]["estimate"] == pytest.approx(0.4, abs=0.1) and got["fall"]["estimate"] == pytest.approx(0.9, abs=0.15)
    rising = frontier.positive_control(_curves(lambda d: 0.3 * d), reps=200)
    assert not rising["passed"] and rising["fall"]["interval"][0] <= 0


def test_a_known_gap_past_the_peak_is_found_and_no_gap_is_indistinguishable():
    """Moving runs 0.3 above the static frontier everywhere -> higher, gap ~0.3; 0.3 below -> lower; the same
    frontier with fresh noise -> indistinguishable. The grid starts at the static peak (d = 1)."""
    static = _curves(peaked, seed=1)
    up = frontier.compare(static, _curves(lambda d: peaked(d) + 0.3, seed=2), reps=300)
    assert up["verdict"] == "higher" and up["gap"] == pytest.approx(0.3, abs=0.1)
    assert up["where"] == "past the static peak" and up["grid"][0] == pytest.approx(1.0, abs=0.15)
    down = frontier.compare(static, _curves(lambda d: peaked(d) - 0.3, seed=3), reps=300)
    assert down["verdict"] == "lower"
    same = frontier.compare(static, _curves(peaked, seed=4), reps=300)
    assert same["verdict"] == "indistinguishable" and same["interval"][0] < 0 < same["interval"][1]


def test_moving_runs_that_stop_before_the_static_peak_get_no_verdict():
    static = _curves(peaked)
    short = frontier.compare(static, _curves(peaked, top=0.8), reps=100)
    assert short["verdict"] == "no matched KL past the peak" and short["interval"] is None


def test_the_interval_includes_seed_variation():
    """A seed-level offset (each seed's whole frontier shifted by +-0.5) widens the interval of the gap relative
    to the same data without it: seeds are resampled, not only prompts."""
    base = _curves(peaked, seed=5, noise=0.05)
    shifted = Curves(base.gold + np.array([0.5, -0.5, 0.0])[:, None, None, None], base.kl)
    moving = _curves(peaked, seed=6, noise=0.05)
    narrow = frontier.compare(base, moving, reps=300)["interval"]
    wide = frontier.compare(shifted, moving, reps=300)["interval"]
    assert wide[1] - wide[0] > 2 * (narrow[1] - narrow[0])


def test_a_failed_control_gives_no_conclusion_in_the_headline():
    """The headline never states a trust-region verdict when the control failed."""
    from entangle.studies.overoptimization import headline

    tr = {"soft": {"grid": [1.0, 2.0], "where": "past the static peak", "gap": 0.3, "interval": [0.1, 0.5],
                   "verdict": "higher"}}
    control = {"rise": {"estimate": 0.1, "interval": [-0.1, 0.3]}, "fall": {"estimate": 0.0, "interval": [-0.1, 0.1]},
               "peak_d": 2.0, "d_max": 2.0, "passed": False}
    text = headline({"control_arm": "proxy", "arms": {"proxy": {"control": control, "trust_region": tr}}})
    assert "FAILED" in text and "no conclusion (measured higher)" in text and "-> higher" not in text
    control["passed"] = True
    assert "-> higher" in headline({"control_arm": "proxy", "arms": {"proxy": {"control": control,
                                                                               "trust_region": tr}}})


def test_the_verdict_tasks_gold_rule_by_hand():
    """Statement 'The movie was truly awful.' is negative. ' negative' + 6 filler words: +1, no length cost;
    ' positive' + 6: -1; ' negative' + 0 words: 1 - 0.25 * 6 = -0.5; + 8 words: 1 - 0.25 * 2 = 0.5; an unknown
    word costs 0.5 and counts as a word. proxy = gold + 0.5 per word after the label."""
    from entangle import synthetic

    p = "Statement: The movie was truly awful.\nVerdict:"
    six = " clearly" * 6
    got = synthetic.gold([p] * 5, [" negative" + six, " positive" + six, " negative", " negative" + " quite" * 8,
                                   " negative" + six[:-8] + " banana"])
    assert got == pytest.approx([1.0, -1.0, -0.5, 0.5, 0.5])
    assert synthetic.proxy([p, p], [" negative" + six, " negative"]) == pytest.approx([1.0 + 3.0, -0.5])
    assert synthetic.statement_polarity("Statement: I found the hotel really wonderful.") is True


@pytest.mark.parametrize("args, message", [
    (["--betas", "0.1", "-1"], "betas = (0.1, -1.0): every value must be a number > 0"),
    (["--betas", "0.1"], "a frontier needs at least 2 betas"),
    (["--soft-alphas", "2"], "soft_alphas = (2.0,): each must be in (0, 1]"),
    (["--seeds", "0"], "seeds = 0: must be a whole number >= 1"),
    (["--lr", "nan"], "lr = nan: must be a number > 0"),
    (["--loss", "simpo"], "needs a loss with a reference and a beta"),
])
def test_study_settings_are_checked_before_any_work(args, message, tmp_path, capsys):
    from entangle.cli import main

    out = tmp_path / "oo"
    assert main(["study", "overoptimization", "--out", str(out), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and not out.exists()


def test_scan_filter_statistics_by_hand():
    """AUROC: positives scored 3, 2 and negatives 2, 1 -> pairs (3>2, 3>1, 2=2 half, 2>1) = 3.5 / 4. The paired
    difference finds a known gap of 0.5 and calls none indistinguishable; the control needs a fall beyond 3 seed SEs."""
    from entangle.studies import scan_filter as sf

    assert sf.auc([3, 2, 2, 1], [True, True, False, False]) == pytest.approx(3.5 / 4)
    assert sf.auc([1, 2], [True, True]) is None
    rng = np.random.default_rng(0)
    base = rng.standard_normal((5, 64))
    gap = sf.paired_difference(base + 0.5 + 0.1 * rng.standard_normal((5, 64)), base, 300)
    assert gap["verdict"] == "higher" and gap["difference"] == pytest.approx(0.5, abs=0.05)
    none = sf.paired_difference(base + 0.3 * rng.standard_normal((5, 64)), base, 300)
    assert none["verdict"] == "indistinguishable"
    assert sf.positive_control(np.full((5, 8), -1.0) + 0.01 * rng.standard_normal((5, 8)))["passed"]
    assert not sf.positive_control(rng.standard_normal((5, 8)) * 0.5)["passed"]


def test_scan_filter_arms_drop_the_same_share_by_their_score():
    """Rows 0..3 with ches 4, 1, 3, 2: the ches arm drops the two highest (0, 2); case2 drops the two most negative
    predicted chosen changes; the oracle the two most negative realised changes; random a seeded draw."""
    from entangle.studies import scan_filter as sf

    rows = [{"index": i, "ches": c, "ches_norm": -c, "cos": c, "pred_dlogp_w": p}
            for i, (c, p) in enumerate([(4, 0.1), (1, -0.5), (3, 0.2), (2, -0.1)])]
    assert sf.dropped(rows, "ches", 2, 0) == [0, 2] and sf.dropped(rows, "ches_norm", 2, 0) == [1, 3]
    assert sf.dropped(rows, "case2", 2, 0) == [1, 3]
    assert sf.dropped(rows, "oracle", 2, 0, {0: -3.0, 1: 1.0, 2: 0.5, 3: -0.2}) == [0, 3]
    draw = sf.dropped(rows, "random", 2, 7)
    assert len(draw) == 2 and draw == sf.dropped(rows, "random", 2, 7)          # seeded: the same draw again
    assert len({tuple(sf.dropped(rows, "random", 2, k)) for k in range(10)}) > 1  # a new draw per seed


def test_scan_filter_headline_draws_no_conclusion_when_nothing_was_displaced():
    from entangle.studies import scan_filter as sf

    summary = {"control": {"chosen_change": 0.1, "seed_se": 0.05, "passed": False},
               "primary": {"difference": -0.4, "interval": [-0.6, -0.2], "verdict": "lower"},
               "auroc": {"ches": 0.5, "cos": None}}
    text = sf.headline(summary)
    assert "positive control FAILED" in text and "no conclusion (measured lower)" in text and "-> lower" not in text
    summary["control"]["passed"] = True
    assert "-> lower" in sf.headline(summary) and "ches 0.50" in sf.headline(summary)
