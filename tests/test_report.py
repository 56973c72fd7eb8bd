"""Metric loading, plotting, and the HTML report of run and study directories."""

import json

import pytest

from entangle.cli import main
from entangle.errors import DataError
from entangle.plots import plot_metrics, series
from entangle.report import discover, load_metrics, write_report


def test_load_skips_a_torn_last_line_and_plots(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    rows = [{"step": i, "loss": 1.0 / i, "logps/chosen": -i} for i in range(1, 6)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 6, "lo')
    loaded = load_metrics(str(run))
    assert loaded == rows
    assert series(loaded, "logps/chosen") == ([1, 2, 3, 4, 5], [-1, -2, -3, -4, -5])
    path = plot_metrics({"a": loaded, "b": loaded}, [("loss", ["loss"]), ("logps", ["logps/chosen"])],
                        str(tmp_path / "p.png"))
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG" and path.endswith("p.png")


def fake_run(path, shift=0.0, entangled=True):
    path.mkdir(parents=True)
    rows = []
    for s in range(1, 7):
        r = {"step": s, "loss": 0.7 - 0.01 * s, "logps/chosen": -10 - s * shift, "logps/rejected": -12 - s,
             "rewards/margins": 0.1 * s, "rewards/accuracies": 0.5, "pairs_per_s": 3.0}
        if entangled:
            r.update({"entanglement/cos": 0.1 * s, "entanglement/inner": s, "entanglement/case1": 0.5,
                      "entanglement/case2": 0.5, "entanglement/case3": 0.0})
        rows.append(r)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (path / "config.yaml").write_text("loss:\n  name: dpo <beta>\n")
    (path / "summary.json").write_text(json.dumps({"status": "finished", "steps": 6, "final": rows[-1]}))
    if entangled:
        pairs = [{"step": s, "pair": i, "pred_dlogp_w": 0.01 * (i - 1), "pred_dlogp_l": -0.01} for s in range(1, 7)
                 for i in range(3)]
        (path / "entanglement.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
        (path / "entanglement_tokens").mkdir()
        view = [{"pair": 0, "chosen_tokens": [" Positive", "."], "rejected_tokens": [" Negative", "."],
                 "inner": [[-1.0, 0.5], [0.5, 2.0]], "cos": [[-0.5, 0.2], [0.2, 0.99]], "pair_cos": 0.4}]
        for step in (2, 10):
            (path / "entanglement_tokens" / f"step-{step}.json").write_text(json.dumps(view))
        (path / "entanglement_positions").mkdir()
        pos = [{"pair": 0, "inner": 1.5, "other": 0.5, "chosen_tokens": ["a", " Positive", "."], "chosen": [0.1, -0.6, 1.5],
                "rejected_tokens": ["a", " Negative", "."], "rejected": [0.1, -0.4, 1.3]}]
        (path / "entanglement_positions" / "step-3.json").write_text(json.dumps(pos))


def test_report_overlays_runs_and_embeds_everything(tmp_path):
    fake_run(tmp_path / "a")
    fake_run(tmp_path / "b", shift=0.5, entangled=False)
    html_path = write_report([str(tmp_path / "a"), str(tmp_path / "b")], str(tmp_path / "out"), title="two runs")
    page = open(html_path).read()
    # self-contained: images inline, nothing fetched
    assert "src=\"http" not in page and "<link" not in page
    assert page.count("data:image/png;base64,") >= 5
    for heading in ("Log-probabilities", "Gradient entanglement", "Case fractions", "Per-pair changes",
                    "Token view: a, step-10", "Position view: a, step-3", "Configurations"):
        assert heading in page
    assert "Token view: a, step-2" not in page  # only the newest training-step view
    assert "dpo &lt;beta&gt;" in page  # configs shown, escaped
    assert page.count("<td>finished</td>") == 2
    # metric names as column headers wrap at their separators, not inside a word
    assert "<th>eval/<wbr>rewards/<wbr>accuracies</th>" in page and "<th>pairs_<wbr>per_<wbr>s</th>" in page
    assert "overflow-wrap: anywhere" not in page
    for png in ("logps.png", "entanglement.png", "cases.png", "case_plane.png", "tokens-a-step-10.png",
                "positions-a-step-3.png"):
        assert (tmp_path / "out" / png).read_bytes()[:4] == b"\x89PNG"


def test_discover_study_folders_and_bad_paths(tmp_path):
    fake_run(tmp_path / "study" / "x")
    fake_run(tmp_path / "study" / "y")
    runs, studies = discover([str(tmp_path / "study")])
    assert list(runs) == ["x", "y"] and studies == []
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty: neither a run directory"):
        discover([str(tmp_path / "empty")])
    with pytest.raises(DataError, match="no such directory"):
        discover([str(tmp_path / "missing")])


def test_report_cli(tmp_path, capsys):
    fake_run(tmp_path / "run")
    assert main(["-q", "report", str(tmp_path / "run")]) == 0
    assert (tmp_path / "run" / "report" / "report.html").exists()
    assert "report.html" in capsys.readouterr().out
    assert main(["-q", "report", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("entangle: error:") and "no such directory" in err and "\n" not in err


def test_a_masked_run_shows_its_learned_token_weights(tmp_path):
    from entangle import config
    from entangle.loop import train

    out = tmp_path / "run"
    train(config.load(None, ["model.name=tiny", "data.train=synthetic:sentiment?config=short&n=16",
                             "data.max_length=64", "loss.token_mask=sparse", "train.batch_size=4",
                             "train.max_steps=2", "tracking.progress=false", f"train.output_dir={out}"]))
    page = open(write_report([str(out)], str(tmp_path / "rep"))).read()
    assert "Token mask: run, final" in page and "Sparse token mask" in page
    assert (tmp_path / "rep" / "masks-run-final.png").exists() and (tmp_path / "rep" / "mask.png").exists()


def test_the_case_plane_reads_a_long_log_as_a_bounded_sample_of_its_second_half(tmp_path, monkeypatch):
    """A long run's entanglement.jsonl is read line by line and drawn as a uniform sample (seeded) of the second
    half's pair-steps, counted in full: the report's memory does not grow with the log."""
    import entangle.report as report

    fake_run(tmp_path / "a")
    rows = [{"step": s, "pair": i, "pred_dlogp_w": 0.01 * i, "pred_dlogp_l": -0.01, "step_dlogp_w": 0.02 * s,
             "step_dlogp_l": -0.02, "inner": 1.0} for s in range(1, 41) for i in range(8)]
    (tmp_path / "a" / "entanglement.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 4')
    monkeypatch.setattr(report, "PLANE_POINTS", 50)
    kept, total, kinds = report._case_plane_rows(str(tmp_path / "a" / "entanglement.jsonl"))
    assert total == 20 * 8 and len(kept) == 50 and kinds == {"step", "pred"}        # steps 21..40; torn line skipped
    assert set(kept[0]) == {"pred_dlogp_w", "pred_dlogp_l", "step_dlogp_w", "step_dlogp_l"}
    assert min(r["step_dlogp_w"] for r in kept) > 0.02 * 20 and len({r["step_dlogp_w"] for r in kept}) > 10
    assert report._case_plane_rows(str(tmp_path / "a" / "entanglement.jsonl"))[0] == kept          # seeded
    page = open(write_report([str(tmp_path / "a")], str(tmp_path / "out"))).read()
    assert "show a uniform sample of that many" in page
    (tmp_path / "a" / "entanglement.jsonl").write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(DataError, match="entanglement.jsonl:2: not a JSON object"):
        report._case_plane_rows(str(tmp_path / "a" / "entanglement.jsonl"))
