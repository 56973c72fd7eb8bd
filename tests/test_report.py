"""Metric loading and plotting."""

import json

from entangle.plots import plot_metrics, series
from entangle.report import load_metrics


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
