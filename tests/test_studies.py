"""The studies drive the loop and write a summary and plots."""

import json

from entangle.studies import trust_region


def test_trust_region_study_on_tiny(tmp_path):
    out = tmp_path / "study"
    summary = trust_region.run(str(out), model="tiny", steps=6, hard_tau=3,
                               extra=["tracking.progress=false", "train.batch_size=4"])
    assert (out / "trust_region.png").stat().st_size > 10_000
    saved = json.loads((out / "summary.json").read_text())
    assert saved == json.loads(json.dumps(summary))
    res = saved["results"]
    assert [res[k]["ref_updates"] for k in ("static", "soft", "hard")] == [0, 6, 2]
    for r in res.values():
        assert 0 <= r["eval_accuracy_vs_init_final"] <= 1 and r["kl_to_init_final"] is not None
    # all three start from the same initial policy on the same held-out pairs
    assert len({r["eval_logps_chosen"][0] for r in res.values()}) == 1
    assert "static" in trust_region.format_table(saved)
