"""The report in a real headless browser (the system's Chromium) at 1400 px: no table pushes the page wider
than the window, every run has a headline, and the screenshots are kept in `test-artifacts/`."""

import html
import json
import os
import re
import shutil
import subprocess

import pytest

from entangle import config
from entangle.loop import train
from entangle.report import write_report

ROOT = os.path.join(os.path.dirname(__file__), "..")
ARTIFACTS = os.path.join(ROOT, "test-artifacts")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars"]
CHECK = """<script>
window.addEventListener('load', () => {
  const width = window.innerWidth, late = [];
  document.querySelectorAll('table').forEach((t, i) => {
    const box = (t.closest('.scroll') || t).getBoundingClientRect();
    if (box.right > width + 1) late.push(i);
  });
  const heads = [...document.querySelectorAll('.headline')].map(h => h.innerText);
  document.body.setAttribute('data-check', JSON.stringify({width, page: document.documentElement.scrollWidth,
    tables: document.querySelectorAll('table').length, overflowing: late, headlines: heads}));
});
</script>"""


def chromium() -> str:
    found = os.environ.get("ENTANGLE_CHROMIUM") or next(
        (p for p in (shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome")) if p), None)
    if found is None:
        if os.environ.get("ENTANGLE_NO_BROWSER") == "1":
            pytest.skip("ENTANGLE_NO_BROWSER=1: the browser test is off")
        pytest.fail("no Chromium: `make test` installs Debian's chromium where it can (apt-get install chromium); "
                    "set ENTANGLE_CHROMIUM=PATH, or ENTANGLE_NO_BROWSER=1 to skip this test")
    return found


def measure(report: str, tmp_path, shot: str) -> dict:
    """Load `report` at 1400 px in headless Chromium; the page's own measurements, and a screenshot."""
    browser = chromium()
    page = tmp_path / "checked.html"
    page.write_text(open(report).read().replace("</body>", CHECK + "</body>"))
    common = [browser, *FLAGS, f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000"]
    dom = subprocess.run([*common, "--window-size=1400,1000", "--dump-dom", f"file://{page}"], capture_output=True,
                         text=True, timeout=120)
    found = re.search(r'data-check="([^"]*)"', dom.stdout)
    assert found, dom.stderr[-2000:]
    os.makedirs(ARTIFACTS, exist_ok=True)
    subprocess.run([*common, "--window-size=1400,2400", f"--screenshot={os.path.join(ARTIFACTS, shot)}",
                    f"file://{os.path.abspath(report)}"], capture_output=True, timeout=120)
    assert os.path.getsize(os.path.join(ARTIFACTS, shot)) > 10_000
    return json.loads(html.unescape(found.group(1)))


def tiny_run(out, *extra):
    return train(config.load(None, [
        "model.name=tiny", "data.train=synthetic:sentiment?config=short&n=32",
        "data.eval=synthetic:sentiment?config=short&n=8&split=test", "data.max_length=64", "optimizer.lr=3e-3",
        "train.batch_size=4", "train.max_steps=4", "train.eval_every=2", "tracking.progress=false",
        "diagnostics.entanglement.every=2", f"train.output_dir={out}", *extra])).run_dir


@pytest.mark.slow   # two short runs and two browser starts (~20 s)
def test_a_report_of_several_runs_fits_1400_px_and_opens_with_what_happened(tmp_path):
    runs = [tiny_run(tmp_path / "dpo-with-a-long-descriptive-name"), tiny_run(tmp_path / "ipo", "loss.name=ipo")]
    trl = tmp_path / "trl-run"                       # what the TRL callback leaves: metrics, no summary.json
    trl.mkdir()
    (trl / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 0.69 - 0.01 * s, "logps/chosen": -50.0 - s,
                                                           "logps/rejected": -51.0 - 2 * s, "entanglement/case1": 0.5,
                                                           "entanglement/case2": 0.4, "entanglement/case3": 0.1})
                                               + "\n" for s in range(1, 5)))
    study = tmp_path / "study"                       # a study with a wide results table
    study.mkdir()
    results = {f"run-{i}": {**{f"a_rather_long_result_name_{k}": 0.123456 * k for k in range(18)},
                            "case_fractions": {"case1": 0.5, "case2": 0.3, "case3": 0.2}} for i in range(3)}
    (study / "summary.json").write_text(json.dumps({"study": "demo", "model": "tiny", "verdict": "it held; twice",
                                                    "results": results, "runs": {}}))
    report = write_report([*map(str, runs), str(trl), str(study)], str(tmp_path / "report"))
    got = measure(report, tmp_path, "report-1400.png")
    assert got["width"] == 1400 and got["tables"] >= 2
    assert got["page"] <= 1400, f"the page is {got['page']} px wide"
    assert got["overflowing"] == [], got
    what = next(h for h in got["headlines"] if h.startswith("What happened"))
    for name in ("dpo-with-a-long-descriptive-name", "ipo", "trl-run"):
        assert name in what
    assert "held-out log-probs: chosen" in what and "of pairs in case 2" in what
    assert any(h.startswith("Finding") for h in got["headlines"])
    text = open(report).read()
    assert "dashed: held-out" in text or "held-out" in text
    assert "running?" not in text and "no summary.json (a TRL run, or still running)" in text


@pytest.mark.slow
def test_a_scan_report_fits_1400_px(tmp_path):
    from entangle.api import scan

    result = scan("tiny", "synthetic:sentiment?config=long&n=6", out=str(tmp_path / "scan"), tokens=1, device="cpu")
    got = measure(result["report"], tmp_path, "scan-1400.png")
    assert got["page"] <= 1400 and got["overflowing"] == [], got
    assert got["headlines"] and got["headlines"][0].startswith("What the scan found")
