"""The studies drive the loop and write a summary, plots and a report; the summary logic by hand."""

import json
import os

import pytest

from entangle.studies import sentiment, trust_region

pytestmark = pytest.mark.study   # whole studies: the slow tier


def test_trust_region_study_on_tiny(tmp_path):
    """From an SFT policy (not random weights), over 2 seeds: every variant has gold and KL from held-out samples
    with seed standard errors; soft updates every step, hard every tau steps; step 0 is the same policy for all."""
    out = tmp_path / "study"
    s = trust_region.Settings(out=str(out), seeds=2, steps=6, evals=2, hard_tau=3, n_label=16, n_heldout=8, batch_size=4,
                              n_eval=8, samples=1, sft_steps=5, max_new_tokens=6)
    summary = trust_region.run(s)
    saved = json.loads((out / "summary.json").read_text())
    assert saved == json.loads(json.dumps(summary))
    res = saved["results"]
    assert [res[k]["ref_updates"] for k in ("static", "soft", "hard")] == [0, 6, 2]
    for r in res.values():
        assert r["kl_se"] is not None and r["gold_se"] is not None and abs(r["kl"]) < 5   # 6 steps: near 0
    assert saved["policy"].endswith(os.path.join("sft", "final"))
    # every variant of a seed starts from the same SFT policy: the same held-out samples at step 0
    from entangle.report import load_metrics

    starts = {v: next(r for r in load_metrics(str(out / "seed-0" / v)) if "eval/gold/mean" in r)["eval/gold/mean"]
              for v in trust_region.VARIANTS}
    assert len(set(starts.values())) == 1 and starts["static"] is not None
    assert "soft vs static over 2 seed(s)" in saved["verdict"] and "static" in trust_region.format_table(saved)
    page = (out / saved["report"]).read_text()
    assert "Finding" in page and page.count("<td>finished</td>") == 3


def _result(cos, chosen_start, chosen_end):
    return {"cos_last_half": cos, "heldout_logps_chosen": [chosen_start, chosen_end]}


def test_predictions_follow_the_paper_and_report_failures_plainly():
    """single: cos -0.2 < 0 holds, chosen -1.0 -> -0.8 rises (+0.2) holds;
    short: cos +0.3, chosen -1 -> -1.5 (falls 0.5); long: cos +0.1 (< short: fails), chosen -1 -> -3 (falls 2)."""
    results = {"single": _result(-0.2, -1.0, -0.8), "short": _result(0.3, -1.0, -1.5), "long": _result(0.1, -1.0, -3.0)}
    got = {(p["config"], p["claim"]): p["held"] for p in sentiment.predictions(results)}
    assert got == {
        ("single", "cosine < 0"): True, ("single", "chosen log-prob rises"): True,
        ("short", "cosine > 0"): True, ("short", "chosen log-prob falls"): True,
        ("long", "cosine > 0"): True, ("long", "chosen log-prob falls"): True,
        ("long vs short", "cosine larger for the long suffix"): False,
        ("long vs short", "chosen falls more for the long suffix"): True,
    }
    # only the configurations that ran are judged
    only = sentiment.predictions({"single": _result(0.4, -1.0, -2.0)})
    assert [(p["claim"], p["held"]) for p in only] == [("cosine < 0", False), ("chosen log-prob rises", False)]
    assert only[0]["measured"] == "cos +0.400"


def test_chosen_predictions_are_reported_at_every_stopping_point():
    """Chosen path -1.0 (start), -0.9, -1.2, -0.8: it rose at 2 of the 3 stopping points after the start."""
    r = {**_result(-0.2, -1.0, -0.8), "heldout_chosen_path": [[0, -1.0], [10, -0.9], [20, -1.2], [30, -0.8]]}
    got = {p["claim"]: p["measured"] for p in sentiment.predictions({"single": r})}
    assert got["chosen log-prob rises"] == "chosen +0.200; held at 2 of 3 stopping points"


def test_summarise_uses_the_second_half_and_held_out_rows():
    """Four diagnostic steps with cos 0.9, 0.7, 0.2, 0.4: the last half's mean is 0.3;
    case1 fractions 1, 1, 0.5, 0.5 -> mean 0.75."""
    rows = [{"step": 0, "eval/logps/chosen": -1.0, "eval/logps/rejected": -2.0, "eval/rewards/margins": 0.0,
             "eval/rewards/accuracies": 0.0}]
    for step, cos, c1 in [(1, 0.9, 1.0), (2, 0.7, 1.0), (3, 0.2, 0.5), (4, 0.4, 0.5)]:
        rows.append({"step": step, "entanglement/cos": cos, "entanglement/inner": 2 * cos,
                     "entanglement/case1": c1, "entanglement/case2": 1 - c1, "entanglement/case3": 0.0,
                     "entanglement/real_case1": 0.0, "entanglement/real_case2": 1.0, "entanglement/real_case3": 0.0,
                     "entanglement/step_case1": 0.5, "entanglement/step_case2": 0.5, "entanglement/step_case3": 0.0,
                     "entanglement/step_dlogp_w": -0.05, "entanglement/step_dlogp_l": -0.25,
                     "entanglement/pred_dlogp_w": 0.1, "entanglement/real_dlogp_w": -0.1,
                     "entanglement/pred_dlogp_l": -0.2, "entanglement/real_dlogp_l": -0.3})
    rows[-1].update({"eval/logps/chosen": -1.5, "eval/logps/rejected": -4.0, "eval/rewards/margins": 0.2,
                     "eval/rewards/accuracies": 0.75})
    s = sentiment.config_result(rows)
    assert s["cos_last_half"] == pytest.approx(0.3) and s["inner_last_half"] == pytest.approx(0.6)
    assert s["heldout_logps_chosen"] == [-1.0, -1.5] and s["heldout_logps_rejected"] == [-2.0, -4.0]
    assert s["case_fractions"]["case1"] == pytest.approx(0.75)
    assert s["real_case_fractions"] == {"case1": 0.0, "case2": 1.0, "case3": 0.0}
    assert s["heldout_accuracy_final"] == 0.75 and s["steps"] == 4


def test_sentiment_study_on_tiny_writes_summary_token_views_and_report(tmp_path):
    out = tmp_path / "sent"
    kw = dict(steps=3, sft_steps=3, n_train=64, batch=8, extra=["data.max_eval_examples=8"])
    summary = sentiment.run(sentiment.Settings(out=str(out), model="tiny", configs=("short", "long"), **kw))
    saved = json.loads((out / "summary.json").read_text())
    runs = ["short", "long", "long-pairwise", "long-sparse"]
    assert saved["runs"] == {r: r for r in runs} and set(saved["results"]) == set(runs)
    m = saved["mitigations"]
    assert [x["run"] for x in m] == ["long-pairwise", "long-sparse"]
    assert all(isinstance(x["chosen_still_falls"], bool) for x in m)
    assert "pairwise_normalized: true" in (out / "long-pairwise" / "config.yaml").read_text()
    assert "token_mask: sparse" in (out / "long-sparse" / "config.yaml").read_text()
    # where the held-out log-probs moved: the sentiment word (differing) vs the shared suffix
    t = saved["results"]["long"]["heldout_token_changes"]
    whole = saved["results"]["long"]["heldout_logps_chosen"]
    assert t["chosen_differing"] + t["chosen_shared"] == pytest.approx(whole[1] - whole[0], abs=1e-4)
    for r in saved["results"].values():
        assert r["steps"] == 3 and -1 <= r["cos_last_half"] <= 1
        assert sum(r["case_fractions"].values()) <= 1 + 1e-6
        assert r["heldout_logps_chosen"][0] < 0
    assert len(saved["predictions"]) == 6 and all(isinstance(p["held"], bool) for p in saved["predictions"])
    # the DPO phase starts from the SFT model and uses it as the frozen reference
    dpo_cfg = (out / "long" / "config.yaml").read_text()
    assert os.path.join(str(out), "sft-long", "final") in dpo_cfg and "name: dpo" in dpo_cfg
    # per-token views of held-out pairs before and after DPO, with the words as tokens
    view = json.loads((out / "long" / "entanglement_tokens" / "heldout-end.json").read_text())
    assert len(view) == sentiment.TOKEN_PAIRS
    assert [t.strip() for t in view[0]["chosen_tokens"][1:6]] == ["sentiment", "based", "on", "my", "judgement"]
    assert (out / "long" / "entanglement_tokens" / "heldout-start.json").exists()
    page = (out / summary["report"]).read_text()
    assert "The paper's predictions" in page and "Token view: long, heldout-end" in page
    assert "Where the held-out log-probs moved" in page
    assert "Mitigation long-pairwise: held-out chosen" in page and "Token mask: long-sparse, final" in page
    assert page.count("data:image/png;base64,") >= 6
    # a second run with the same settings reuses every finished run
    before = (out / "long" / "metrics.jsonl").stat().st_mtime_ns
    sentiment.run(sentiment.Settings(out=str(out), model="tiny", configs=("long",), **kw), report=False)
    assert (out / "long" / "metrics.jsonl").stat().st_mtime_ns == before
    assert "held-out chosen logp" in sentiment.format_table(saved)


def _loss_result(dw_over_dl, rose):
    return {"dw_over_dl": dw_over_dl, "chosen_rose_fraction": rose}


def test_compare_theory_check_groups_losses_by_their_measured_weights():
    """cpo (d_w/d_l 1.4) and rrhf (2.0) rose in 0.6 and 0.4 of pair-steps: mean 0.5; dpo and ipo (1.0)
    in 0.2 and 0.4: mean 0.3 -> held. A loss at 1.03 counts as balanced (tolerance 0.05)."""
    from entangle.studies import compare

    res = {"cpo": _loss_result(1.4, 0.6), "rrhf": _loss_result(2.0, 0.4), "dpo": _loss_result(1.0, 0.2),
           "ipo": _loss_result(1.03, 0.4)}
    t = compare.theory_check(res)
    assert t["held"] is True and t["explicit"] == ["cpo", "rrhf"] and t["balanced"] == ["dpo", "ipo"]
    assert t["chosen_rose_fraction_explicit"] == pytest.approx(0.5)
    assert t["chosen_rose_fraction_balanced"] == pytest.approx(0.3)
    res["dpo"] = _loss_result(1.0, 0.9)
    assert compare.theory_check(res)["held"] is False
    assert compare.theory_check({"dpo": _loss_result(1.0, 0.2)})["held"] is None


def test_compare_per_loss_overrides_are_checked():
    from entangle.errors import ConfigError
    from entangle.studies import compare

    assert compare.parse_overrides(["dpop.lam=10", "ipo.beta=0.5"], ("dpo", "dpop", "ipo")) == {
        "dpop": ["loss.params.lam=10"], "ipo": ["loss.params.beta=0.5"]}
    with pytest.raises(ConfigError, match="LOSS.PARAM=VALUE"):
        compare.parse_overrides(["simpo.gamma=1"], ("dpo",))


def test_compare_quick_on_tiny(tmp_path):
    from entangle.studies import compare

    out = tmp_path / "cmp"
    summary = compare.run(compare.Settings(out=str(out), losses=("dpo", "cpo", "simpo"), quick=True, steps=3,
                                           params=["cpo.lam=2.0"]))
    saved = json.loads((out / "summary.json").read_text())
    assert set(saved["results"]) == {"dpo", "cpo", "simpo", "dpo-pairwise", "dpo-sparse"}
    assert saved["runs"]["cpo"] == "cpo" and "dpo-pairwise" not in saved["theory"]["balanced"]
    assert "lam: 2.0" in (out / "cpo" / "config.yaml").read_text()
    for name, r in saved["results"].items():
        assert 0 <= r["heldout_accuracy_vs_init"] <= 1, name   # reference-free losses too
        assert r["dw_over_dl"] > 0 and 0 <= r["chosen_rose_fraction"] <= 1
    assert saved["results"]["dpo"]["dw_over_dl"] == pytest.approx(1.0)
    assert saved["results"]["cpo"]["dw_over_dl"] > 1.0    # CPO's NLL term on the chosen
    # every loss starts from the same SFT model on the same held-out pairs
    starts = {json.loads((out / n / "metrics.jsonl").read_text().splitlines()[0])["eval/logps/chosen"]
              for n in ("dpo", "cpo", "simpo")}
    assert len(starts) == 1
    page = (out / summary["report"]).read_text()
    assert "Loss comparison" in page and page.count("<td>finished</td>") == 5 and "Theory check" in page
    assert "theory check" in compare.format_table(saved)


def test_overoptimization_study_on_tiny_reads_real_evaluations_and_reuses_runs(tmp_path):
    """A reduced --quick: few steps, tiny sets. Every point is an in-training evaluation of held-out samples; the
    last one's gold equals `entangle eval` of the run's final/ with the same prompts and settings; the frontier,
    control and comparisons are in the summary; a second call reuses every run."""
    from entangle.api import evaluate
    from entangle.studies import overoptimization as oo

    out = tmp_path / "oo"
    s = oo.Settings.quick(out=str(out), steps=4, evals=2, n_label=16, n_eval=8, samples=1, sft_steps=5,
                          max_new_tokens=6, reps=100, hard_taus=(2,), betas=(0.1, 1.0), batch_size=4)
    summary = oo.run(s)
    arm = summary["arms"]["proxy"]
    assert set(arm["points"]) == {"static-b0.1", "static-b1", "soft-b0.1-a0.05", "hard-b0.1-t2"}
    static = arm["points"]["static-b0.1"]
    # step 0 is the SFT policy: KL 0 up to float32 rounding between the sampling forward and a full forward
    assert [p["step"] for p in static] == [0, 2, 4] and abs(static[0]["kl"]) < 1e-4
    assert static[0]["gold"] == arm["points"]["hard-b0.1-t2"][0]["gold"]      # all start at the SFT policy
    assert summary["labels"]["seed-0/proxy"]["pairs"] + sum(summary["labels"]["seed-0/proxy"]["dropped"].values()) \
        == 16
    run_dir = out / "seed-0" / "proxy" / "static-b0.1"
    f = evaluate(str(run_dir), "synthetic:verdict?n=8&split=test", oo.SCORERS["gold"], n=1, max_new_tokens=6,
                 seed=0, batch_size=128, max_prompt_length=None, progress=False)
    assert f["gold/mean"] == pytest.approx(static[-1]["gold"], rel=1e-9)
    assert set(arm["control"]) >= {"rise", "fall", "passed"} and set(arm["trust_region"]) == {"soft", "hard"}
    assert summary["verdict"].startswith("positive control (proxy arm)")
    assert (out / "frontier.png").stat().st_size > 10_000
    stamp = os.path.getmtime(run_dir / "summary.json")
    again = oo.run(s)
    assert os.path.getmtime(run_dir / "summary.json") == stamp and again["arms"]["proxy"]["points"] == arm["points"]
    page = (out / again["report"]).read_text()
    assert "Finding" in page and "positive control" in page
    assert "static frontier" in oo.format_table(again)


def test_sgd_learning_rate_matches_the_margin_movement_by_hand():
    """AdamW moved the margin by 0.3 per step; SGD's move per unit lr is d_w|g_w|^2 - (d_w+d_l)<g_w,g_l> + d_l|g_l|^2."""
    rows = [{"step": 0}] + [{"entanglement/step_dlogp_w": 0.1, "entanglement/step_dlogp_l": -0.2,
                             "entanglement/batch_inner": 2.0, "entanglement/batch_norm_w": 2.0,
                             "entanglement/batch_norm_l": 3.0, "entanglement/d_w": 0.05, "entanglement/d_l": 0.05}] * 3
    per_lr = 0.05 * 4 - 0.1 * 2.0 + 0.05 * 9
    assert sentiment.sgd_lr(rows) == pytest.approx(0.3 / per_lr)
    with pytest.raises(ValueError, match="cannot match margins"):
        sentiment.sgd_lr([{**rows[1], "entanglement/step_dlogp_w": -0.5}])


def test_sentiment_study_with_sgd_matches_adamws_first_step_exactly(tmp_path, monkeypatch):
    """At the first DPO step policy = reference, so every pair has d = beta/2 and the calibration is exact:
    the SGD run's first-order margin move along its own update equals AdamW's at step 1."""
    monkeypatch.setattr(sentiment, "CALIBRATION_STEPS", 1)
    out = tmp_path / "sent"
    summary = sentiment.run(sentiment.Settings(out=str(out), model="tiny", configs=("single",), steps=2, sft_steps=3,
                                               n_train=64, batch=8, extra=["data.max_eval_examples=8"],
                                               mitigations=(), optimizers=("adamw", "sgd")))
    assert set(summary["runs"]) == {"single", "single-sgd"} and len(summary["predictions_sgd"]) == 2
    cfg = (out / "single-sgd" / "config.yaml").read_text()
    assert "name: sgd" in cfg and "max_grad_norm: null" in cfg and "momentum: 0" in cfg
    from entangle.report import load_metrics

    first = {name: next(r for r in load_metrics(str(out / name)) if r.get("step") == 1) for name in summary["runs"]}
    move = {k: r["entanglement/step_dlogp_w"] - r["entanglement/step_dlogp_l"] for k, r in first.items()}
    assert move["single-sgd"] == pytest.approx(move["single"], rel=1e-3)
    assert "(SGD, lr" in sentiment.format_table(summary)


def test_scan_filter_study_on_tiny_trains_each_arm_on_the_same_share(tmp_path):
    """Two seeds, every arm: each drops the same number of pairs, the random arm draws anew per seed, the oracle
    drops by the full run's realised changes; the held-out outcomes start from the SFT policy for every arm; the
    primary comparison, control and AUROCs are in the summary and the report opens with the finding."""
    from entangle.studies import scan_filter

    out = tmp_path / "sf"
    s = scan_filter.Settings(out=str(out), seeds=2, n_train=32, n_test=8, steps=3, batch_size=4, sft_steps=5, reps=100)
    summary = scan_filter.run(s)
    assert set(summary["arms"]) == set(scan_filter.ARMS)
    for seed in (0, 1):
        kept = {arm: (out / f"seed-{seed}" / f"kept-{arm}.jsonl").read_text().count("\n")
                for arm in scan_filter.ARMS if arm != "full"}
        assert set(kept.values()) == {24}                           # 32 pairs less a share of 0.25
    first = [json.loads(x) for x in (out / "seed-0" / "kept-random.jsonl").read_text().splitlines()]
    second = [json.loads(x) for x in (out / "seed-1" / "kept-random.jsonl").read_text().splitlines()]
    assert first != second                                          # a new random draw per seed
    assert summary["primary"]["arms"] == ["ches", "random"] and summary["primary"]["verdict"] in (
        "higher", "lower", "indistinguishable")
    assert set(summary["auroc"]) == set(scan_filter.SCORES) and "positive control" in summary["verdict"]
    assert "held-out chosen" in scan_filter.format_table(summary)
    assert "Finding" in (out / summary["report"]).read_text()

def test_study_runs_keep_periodic_checkpoints_and_a_rerun_reuses_them(tmp_path):
    from entangle.studies import run_once

    common = ["model.name=tiny", "data.train=synthetic:sentiment?config=short&n=32", "data.max_length=48",
              "train.batch_size=4", "train.max_steps=3", "tracking.progress=false"]
    rows = run_once(common, str(tmp_path / "run"))
    saved = open(tmp_path / "run" / "config.yaml").read()
    assert "save_every: 50" in saved and "keep_checkpoints: 1" in saved and rows[-1]["step"] == 3
    assert run_once(common, str(tmp_path / "run")) == rows          # the same settings: reused, not redone


@pytest.mark.slow
def test_a_study_stopped_by_a_signal_exits_130_or_143_and_continues(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    cmd = [sys.executable, "-m", "entangle.cli", "-q", "study", "compare", "--quick", "--losses", "dpo",
           "--mitigate", "", "--steps", "400", "--out", str(tmp_path / "cmp")]
    p = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    time.sleep(12)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 143, err[-2000:]
    assert "study interrupted in" in err and "Traceback" not in err
    p = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    time.sleep(8)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130 and "continue from its checkpoint" in err, err[-2000:]
