"""The distribution `entangle-po`: a wheel installs into another environment and the TRL callback runs there;
the namesake `entangle` (an unrelated project) is detected in one line."""

import os
import subprocess
import sys
import sysconfig
import textwrap

import pytest

ROOT = os.path.join(os.path.dirname(__file__), "..")

TRL_RUN = textwrap.dedent("""
    import json, os, sys, entangle, trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from entangle import models, synthetic
    from entangle.integrations.trl import EntanglementCallback
    assert entangle.__file__.startswith(sys.prefix), entangle.__file__     # the wheel's copy, not the clone's
    out = sys.argv[1]
    folder = models.save_tiny(os.path.join(out, "base"), models.byte_tokenizer())
    pairs = synthetic.from_source("synthetic:sentiment?config=short&n=4")
    data = Dataset.from_list([{"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected} for p in pairs])
    args = trl.DPOConfig(output_dir=out, per_device_train_batch_size=2, max_steps=1, report_to=[], use_cpu=True,
                         save_strategy="no", disable_tqdm=True, max_length=64)
    trainer = trl.DPOTrainer(model=AutoModelForCausalLM.from_pretrained(folder), args=args, train_dataset=data,
                             processing_class=models.byte_tokenizer(), callbacks=[EntanglementCallback(every=1)])
    trainer.train()
    print(len(open(os.path.join(out, "entanglement.jsonl")).readlines()), "pairs measured")
""")


@pytest.mark.slow   # builds a wheel and a venv (~40 s)
def test_the_wheel_installs_into_a_fresh_environment_and_runs_the_trl_callback(tmp_path):
    pytest.importorskip("trl")
    wheels = tmp_path / "wheels"
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                            str(wheels), ROOT], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-2000:]
    (wheel,) = os.listdir(wheels)
    assert wheel.startswith("entangle_po-") and wheel.endswith(".whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    # the dependencies come from this project's environment (no index here); entangle itself only from the wheel
    (open(os.path.join(site, "project-deps.pth"), "w")).write(sysconfig.get_paths()["purelib"] + "\n")
    install = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps",
                              "--no-index", str(wheels / wheel)], capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stderr[-2000:]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"OMP_NUM_THREADS": "1"}
    version = subprocess.run([venv / "bin" / "entangle", "--version"], capture_output=True, text=True, env=env,
                             cwd=tmp_path)
    assert version.returncode == 0 and "entangle 0.1.0" in version.stdout, version.stderr[-2000:]
    run = subprocess.run([python, "-c", TRL_RUN, str(tmp_path / "trl")], capture_output=True, text=True, env=env,
                         cwd=tmp_path, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "2 pairs measured" in run.stdout


def test_the_namesake_entangle_distribution_is_refused_in_one_line(tmp_path):
    from entangle import _refuse_namesake

    _refuse_namesake([str(tmp_path)])                       # nothing there: fine
    info = tmp_path / "entangle-0.0.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: entangle\nVersion: 0.0.0\n")
    with pytest.raises(ImportError, match="another package named 'entangle' .* pip uninstall entangle"):
        _refuse_namesake([str(tmp_path)])


def test_the_launcher_prints_an_import_failure_as_one_line(tmp_path):
    shadow = tmp_path / "entangle"                           # a broken `entangle` earlier on the path
    shadow.mkdir()
    (shadow / "__init__.py").write_text("raise ImportError('the other entangle')\n")
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.path.join(ROOT, 'src')}"}
    p = subprocess.run([sys.executable, "-c", "import sys, entangle_po; sys.exit(entangle_po.main())", "--version"],
                       capture_output=True, text=True, env=env, cwd=tmp_path)
    assert p.returncode == 2 and p.stderr.strip() == "entangle: error: the other entangle"
