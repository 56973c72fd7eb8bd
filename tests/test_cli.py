"""The command line: one-line errors with exit 2 and no traceback; signals save a checkpoint."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import write_jsonl

ROOT = os.path.join(os.path.dirname(__file__), "..")


def entangle(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "entangle.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def test_losses_lists_the_registry():
    out = entangle("losses").stdout
    assert "dpo (alias sigmoid): reference=yes" in out and "simpo: reference=no, length-normalised=yes" in out


@pytest.mark.slow   # one process start each (~2 s of imports)
@pytest.mark.parametrize("args, message", [
    (["train", "train.batchsize=3"], "did you mean 'train.batch_size'"),
    (["train", "configs/nope.yaml"], "no such config file"),
    (["config", "loss.name=nope"], "unknown loss 'nope'"),
    (["study", "sentiment", "--configs", "single,huge"], "configs = ('single', 'huge'): valid: single, short, long"),
    (["report", "no/such/run"], "no/such/run: no such directory"),
])
def test_config_errors_are_one_line(args, message):
    p = entangle(*args)
    assert p.returncode == 2 and message in p.stderr
    assert "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1


@pytest.mark.slow   # a process start
def test_bad_data_names_file_line_and_field(tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "a", "chosen": "b", "rejected": "c"},
                                                  {"prompt": "a", "chosen": "b"}])
    p = entangle("-q", "train", f"data.train={path}", f"train.output_dir={tmp_path / 'run'}")
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert "pairs.jsonl:2: field 'rejected' is missing" in p.stderr


@pytest.mark.slow   # a real signal to a real process: several seconds
def test_sigterm_saves_a_checkpoint_and_resume_finishes(tmp_path):
    out = tmp_path / "run"
    args = ["-q", "train", "configs/tiny-dpo.yaml", f"train.output_dir={out}", "train.max_steps=100000",
            "tracking.progress=false", "data.eval=null"]
    proc = subprocess.Popen([sys.executable, "-m", "entangle.cli", *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143 and "Traceback" not in err and "resume" in err
    step = json.loads((out / "summary.json").read_text())["steps"]
    assert (out / "checkpoints" / f"step-{step}").is_dir()
    p = entangle("-q", "train", "configs/tiny-dpo.yaml", f"train.output_dir={out}", f"train.max_steps={step + 2}",
                 "tracking.progress=false", "data.eval=null", "--resume")
    assert p.returncode == 0, p.stderr
    lines = [json.loads(x) for x in metrics.read_text().splitlines()]
    assert [r["step"] for r in lines][-3:] == [step, step + 1, step + 2]


@pytest.mark.slow   # a process start
def test_missing_tracker_package_is_an_install_hint(tmp_path):
    import importlib.util

    if importlib.util.find_spec("mlflow") is not None:
        pytest.skip("mlflow is installed here")
    p = entangle("-q", "train", "tracking.report_to=[mlflow]", f"train.output_dir={tmp_path / 'run'}")
    assert p.returncode == 2 and "pip install mlflow" in p.stderr and "Traceback" not in p.stderr


@pytest.mark.parametrize("args", [["study", "sentiment", "--optimizer", "lbfgs"], ["nope"], ["scan", "tiny"],
                                  ["scan", "tiny", "--data", "x.jsonl", "--out", "o", "--layers", "two"]])
def test_command_line_mistakes_are_one_line_too(args, capsys):
    from entangle.cli import main

    with pytest.raises(SystemExit) as e:
        main(args)
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1 and "--help" in err, err


@pytest.mark.slow   # a process start and a short training run
def test_quiet_means_no_progress_bars(tmp_path):
    p = entangle("-q", "train", "configs/tiny-dpo.yaml", "train.max_steps=2", f"train.output_dir={tmp_path / 'r'}")
    assert p.returncode == 0, p.stderr
    assert "step/s" not in p.stderr and "it/s" not in p.stderr and "%|" not in p.stderr


@pytest.mark.parametrize("case", ["generate", "label", "scan-keep", "eval-samples"])
def test_no_command_overwrites_its_input(case, tmp_path, capsys):
    """An output that resolves to an input (the same path, or the same file through a link) is refused in one
    line before any model loads, and the input is left as it was."""
    from entangle.cli import main

    from pathlib import Path

    data = Path(write_jsonl(tmp_path / "in.jsonl", [{"prompt": "Hi", "chosen": " a", "rejected": " b"}] * 4))
    link = tmp_path / "link.jsonl"
    link.symlink_to(data)
    before = data.read_text()
    args = {"generate": ["generate", "tiny", "--prompts", str(data), "--out", str(link)],
            "label": ["label", "tiny", "--prompts", str(data), "--out", f"{tmp_path}/./in.jsonl"],
            "scan-keep": ["scan", "tiny", "--data", str(data), "--keep", str(data), "--max-cos", "0.5", "--out",
                          str(tmp_path / "scan")],
            "eval-samples": ["eval", "tiny", "--samples", str(tmp_path / "samples.jsonl"), "--out", str(tmp_path)]}[case]
    if case == "eval-samples":
        data = Path(write_jsonl(tmp_path / "samples.jsonl", [{"prompt": "Hi", "completion": " a"}]))
        before = data.read_text()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "would destroy the input" in err and len(err.strip().splitlines()) == 1, err
    assert data.read_text() == before


def test_eval_takes_prompts_or_samples_never_both(tmp_path, capsys):
    """--samples carries its prompts; with --prompts beside it one would be silently unused: refused."""
    from entangle.cli import main

    samples = write_jsonl(tmp_path / "s.jsonl", [{"prompt": "Hi", "completion": " a"}])
    assert main(["eval", "tiny", "--samples", str(samples), "--prompts", str(samples), "--out", str(tmp_path / "e")]) == 2
    assert "not both or neither" in capsys.readouterr().err and not (tmp_path / "e").exists()


@pytest.mark.parametrize("args, message", [
    (["generate", "tiny", "--prompts", "synthetic:sentiment?n=4", "--temperature", "nan"], "--temperature must be"),
    (["generate", "tiny", "--prompts", "synthetic:sentiment?n=4", "--limit", "0"], "--limit must be a whole number >= 1"),
    (["generate", "tiny", "--prompts", "synthetic:sentiment?n=4", "--limit", "-1"], "--limit must be a whole number"),
    (["generate", "tiny", "--prompts", "synthetic:sentiment?n=4", "--max-prompt-length", "0"], "--max-prompt-length"),
    (["generate", "tiny", "--prompts", "synthetic:sentiment?n=4", "--top-p", "0"], "--top-p must be in (0, 1]"),
    (["eval", "tiny", "--prompts", "synthetic:sentiment?n=4", "--n", "0"], "--n must be a whole number >= 1"),
    (["eval", "tiny", "--prompts", "synthetic:sentiment?n=4", "--judge-template", "t.txt"], "applies to a judge"),
    (["label", "tiny", "--prompts", "synthetic:sentiment?n=4", "--n", "3"], "--n does not apply"),
])
def test_sampling_options_out_of_range_are_refused_before_any_work(args, message, tmp_path, capsys):
    from entangle.cli import main

    assert main([*args, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and not (tmp_path / "o").exists(), err


@pytest.mark.slow
def test_the_console_shows_no_library_notices_and_q_no_progress_bars(tmp_path):
    run = ["train", "configs/tiny-dpo.yaml", "train.max_steps=2", "model.lora.r=4", "data.eval=null"]
    p = entangle(*run, f"train.output_dir={tmp_path / 'a'}")
    assert p.returncode == 0, p.stderr[-2000:]
    for notice in ("FutureWarning", "Setting accelerator", "UserWarning", "warnings.warn"):
        assert notice not in p.stderr
    assert "step/s" in p.stderr                                  # the progress bar, without -q
    q = entangle("-q", *run, f"train.output_dir={tmp_path / 'b'}")
    assert q.returncode == 0 and "step/s" not in q.stderr and "%|" not in q.stderr
    assert entangle("-v", *run, f"train.output_dir={tmp_path / 'c'}").returncode == 0


def test_study_options_take_their_defaults_from_the_settings_dataclasses():
    """`entangle study sentiment|compare` pass only what was given; the rest is the dataclass's (one place)."""
    from entangle.cli import build_parser
    from entangle.studies import compare, sentiment

    for study, module in (("sentiment", sentiment), ("compare", compare)):
        assert module.settings_from_args(build_parser().parse_args(["study", study])) == module.Settings()
    s = sentiment.settings_from_args(build_parser().parse_args(
        ["study", "sentiment", "--configs", "long", "--optimizer", "sgd", "--no-mitigations", "--batch-size", "4"]))
    assert s.configs == ("long",) and s.optimizers == ("adamw", "sgd") and s.mitigations == () and s.batch == 4
    assert s.resolved()["batch"] == 4 and s.resolved()["steps"] == sentiment.PRESETS["tiny"]["steps"]
    c = compare.settings_from_args(build_parser().parse_args(
        ["study", "compare", "--losses", "dpo,ipo", "--set", "ipo.beta=0.5", "--mitigate", "", "--quick"]))
    assert c.losses == ("dpo", "ipo") and c.params == ["ipo.beta=0.5"] and c.mitigate == () and c.quick
    assert c.validate() is c
    page = subprocess.run([sys.executable, "-m", "entangle.cli", "study", "sentiment", "--help"], capture_output=True,
                          text=True).stdout
    assert "(default tiny)" in " ".join(page.split())             # the help shows the dataclass's default
