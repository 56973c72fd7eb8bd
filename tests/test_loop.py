"""The training loop: run directory, exact resume, accumulation, faults, multi-process."""

import json
import os
import subprocess
import sys

import pytest
import torch

from entangle import config, losses
from entangle.errors import TrainingError
from entangle.loop import train

TIMING = {"tokens_per_s", "pairs_per_s", "step_time_s"}


def cfg_for(out, *overrides):
    base = ["model.name=tiny", "data.train=synthetic:sentiment?config=short&n=64",
            "data.eval=synthetic:sentiment?config=short&n=16&split=test", "data.max_length=64",
            "optimizer.lr=3e-3", "train.batch_size=4", "train.max_steps=6", "tracking.progress=false", "train.eval_at_start=false",
            f"train.output_dir={out}"]
    return config.load(None, base + list(overrides))


def rows(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in f]


def test_run_directory_contents_and_metric_names(tmp_path):
    out = tmp_path / "run"
    result = train(cfg_for(out, "train.save_every=3", "train.eval_every=3"))
    assert result.status == "finished"
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "final/model.safetensors",
                 "checkpoints/step-3/model/model.safetensors", "checkpoints/step-3/optimizer.pt"):
        assert (out / name).exists(), name
    r = rows(out)
    for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                "logps/chosen", "logps/rejected", "grad_norm", "learning_rate", "step", "epoch"):
        assert key in r[0], key
    assert "eval/rewards/accuracies" in r[2] and "tokens_per_s" in json.loads((out / "metrics.jsonl").open().readline())
    assert "version: 0.1.0" in (out / "config.yaml").read_text()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["data"]["train"]["n_examples"] == 64
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out / "final")
    assert sum(p.numel() for p in model.parameters()) == summary["total_parameters"]


@pytest.mark.parametrize("extra", [[], ["model.lora.r=4", "model.lora.dropout=0.1", "optimizer.lr=1e-2"],
                                   ["loss.token_mask=sparse", "loss.mask_lr=0.05"], ["loss.name=bco"]],
                         ids=["full", "lora-dropout", "sparse-mask", "bco-baseline"])
def test_interrupted_and_resumed_run_equals_uninterrupted(tmp_path, extra):
    a = cfg_for(tmp_path / "a", "train.eval_every=2", *extra)
    train(a)

    def stop_at_3(row, stop):
        if row["step"] == 3:
            stop()  # the same path SIGINT/SIGTERM take

    b = cfg_for(tmp_path / "b", "train.eval_every=2", *extra)
    first = train(b, callbacks=[stop_at_3])
    assert first.status == "interrupted" and (tmp_path / "b/checkpoints/step-3").is_dir()
    train(cfg_for(tmp_path / "b", "train.eval_every=2", "train.resume=latest", *extra))
    assert rows(tmp_path / "a") == rows(tmp_path / "b")  # exact on CPU, every logged number


def test_gradient_accumulation_matches_a_large_batch(tmp_path):
    big = rows(train(cfg_for(tmp_path / "big", "train.batch_size=4")).run_dir)
    acc = rows(train(cfg_for(tmp_path / "acc", "train.batch_size=2", "train.grad_accum=2")).run_dir)
    for x, y in zip(big, acc):
        for k in ("loss", "rewards/margins", "grad_norm", "rewards/accuracies"):
            assert x[k] == pytest.approx(y[k], rel=1e-4, abs=1e-6), k
        assert 0 <= y["rewards/accuracies"] <= 1


def test_refuses_a_non_empty_run_directory(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "keep.txt").write_text("precious")
    with pytest.raises(TrainingError, match="not empty and is not an entangle run"):
        train(cfg_for(tmp_path / "run"))
    with pytest.raises(TrainingError, match="not empty and is not an entangle run"):   # overwrite never deletes it
        train(cfg_for(tmp_path / "run", "train.overwrite=true"))
    with pytest.raises(TrainingError, match="not empty and is not an entangle run"):   # nor does a resume append
        train(cfg_for(tmp_path / "run", "train.resume=latest"))
    assert (tmp_path / "run" / "keep.txt").read_text() == "precious"
    assert sorted(os.listdir(tmp_path / "run")) == ["keep.txt"]


def test_overwrite_removes_only_what_entangle_wrote(tmp_path):
    out = tmp_path / "run"
    train(cfg_for(out, "train.max_steps=2"))
    with pytest.raises(TrainingError, match="not empty; set train.overwrite=true"):
        train(cfg_for(out, "train.max_steps=2"))
    (out / "thesis.txt").write_text("mine")
    train(cfg_for(out, "train.max_steps=3", "train.overwrite=true"))
    assert (out / "thesis.txt").read_text() == "mine" and [r["step"] for r in rows(out)] == [1, 2, 3]


def test_resume_without_a_checkpoint_starts_over_with_fresh_logs(tmp_path):
    """Killed before its first checkpoint (save_every 0): --resume starts over, and the old run's lines go."""
    out = tmp_path / "run"
    train(cfg_for(out, "train.max_steps=2"))
    (out / "final").rename(out / "gone")   # as if killed: no checkpoint, no final
    train(cfg_for(out, "train.max_steps=3", "train.resume=latest"))
    assert [r["step"] for r in rows(out)] == [1, 2, 3]


def test_resume_with_a_changed_config_is_refused_unless_allowed(tmp_path):
    out = tmp_path / "run"
    train(cfg_for(out, "train.save_every=2"))
    (out / "final").rename(out / "gone")
    for change, key in (("train.batch_size=2", "train.batch_size: 4 -> 2"), ("loss.name=ipo", "loss.name: dpo -> ipo")):
        with pytest.raises(TrainingError, match="with a different config") as e:
            train(cfg_for(out, "train.save_every=2", "train.resume=latest", change))
        assert key in str(e.value) and "\n" not in str(e.value)
    # where and how long it runs may change; what it computes may change only when asked, and is recorded
    train(cfg_for(out, "train.save_every=2", "train.resume=latest", "train.max_steps=6", "train.log_every=2",
                  "loss.params.beta=0.2", "train.resume_allow_changes=true"))
    recorded = [json.loads(x) for x in (out / "resumes.jsonl").read_text().splitlines()]
    assert recorded[0]["changed"] == {"loss.params.beta": [None, 0.2]}


def test_a_torn_log_line_and_a_damaged_checkpoint_fall_back(tmp_path):
    """A kill mid-write leaves a torn last line in metrics.jsonl; a truncated optimizer.pt in the newest
    checkpoint: resume=latest warns and continues from the one before, and equals the uninterrupted run."""
    train(cfg_for(tmp_path / "a"))
    out = tmp_path / "b"
    train(cfg_for(out, "train.save_every=2"), callbacks=[lambda row, stop: stop() if row["step"] == 4 else None])
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "loss": 0.6')
    opt = out / "checkpoints" / "step-4" / "optimizer.pt"
    opt.write_bytes(opt.read_bytes()[:100])
    train(cfg_for(out, "train.save_every=2", "train.resume=latest"))
    assert rows(out) == rows(tmp_path / "a")
    opt.write_bytes(opt.read_bytes()[:100])      # the resumed run wrote step 4 again: damage it once more
    with pytest.raises(TrainingError, match="the checkpoint is damaged"):   # an explicit folder does not fall back
        train(cfg_for(out, "train.save_every=2", f"train.resume={out / 'checkpoints' / 'step-4'}",
                      "train.overwrite=true"))


def test_lora_on_a_full_checkpoint_is_one_line(tmp_path):
    out = tmp_path / "run"
    train(cfg_for(out, "train.save_every=2", "train.max_steps=4"))
    (out / "final").rename(out / "gone")
    with pytest.raises(TrainingError, match="holds full weights, but model.lora.r > 0"):
        train(cfg_for(out, "train.save_every=2", "train.max_steps=4", "train.resume=latest", "model.lora.r=4",
                      "train.resume_allow_changes=true"))


def test_output_dir_that_is_a_file_or_read_only_fails_before_loading(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(TrainingError, match="is a file; give a folder"):
        train(cfg_for(tmp_path / "file"))
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if os.access(ro, os.W_OK):
            pytest.skip("running as a user who can write anywhere (root)")
        with pytest.raises(TrainingError, match="is not writable"):
            train(cfg_for(ro / "run"))
    finally:
        ro.chmod(0o700)


def test_a_missing_data_file_fails_before_the_model_loads(tmp_path, monkeypatch):
    from entangle import assembly as build

    monkeypatch.setattr(build, "load_model", lambda *a, **k: pytest.fail("the model loaded first"))
    with pytest.raises(TrainingError, match="data.train=.*nope.jsonl: no such file"):
        train(cfg_for(tmp_path / "run", f"data.train={tmp_path / 'nope.jsonl'}"))


def test_non_finite_steps_are_skipped_then_the_run_stops(tmp_path):
    spec = losses.LossSpec("test_nan", uses_reference=False, length_normalized=False, citation="arXiv:0",
                           defaults={}, loss=lambda p: p.pc * float("nan"))
    losses.register(spec)
    try:
        cfg = cfg_for(tmp_path / "run", "loss.name=test_nan", "train.max_nonfinite=2")
        with pytest.raises(TrainingError, match="2 consecutive steps had a non-finite loss"):
            train(cfg)
        r = rows(tmp_path / "run")
        assert [x.get("skipped_nonfinite") for x in r] == [1, 1]
    finally:
        losses._REGISTRY.pop("test_nan")


def test_a_failed_checkpoint_write_leaves_the_previous_one_intact(tmp_path, monkeypatch):
    from entangle import checkpoint

    out = tmp_path / "run"
    real_save = torch.save
    calls = {"n": 0}

    def flaky(obj, path, *a, **k):
        if str(path).endswith("optimizer.pt"):
            calls["n"] += 1
            if calls["n"] == 2:
                raise OSError(28, "No space left on device")
        return real_save(obj, path, *a, **k)

    monkeypatch.setattr(checkpoint.torch, "save", flaky)
    with pytest.raises(TrainingError, match="could not write checkpoint step-4 .*disk full.*previous checkpoints"):
        train(cfg_for(out, "train.save_every=2"))
    assert checkpoint.resolve_resume(str(out), "latest").endswith("step-2")
    assert sorted(os.listdir(out / "checkpoints")) == ["step-2"]     # the partial one is removed
    monkeypatch.setattr(checkpoint.torch, "save", real_save)
    train(cfg_for(out, "train.save_every=2", "train.resume=latest"))
    assert rows(out)[-1]["step"] == 6


def test_lora_final_is_a_peft_adapter(tmp_path):
    out = tmp_path / "run"
    train(cfg_for(out, "model.lora.r=4"))
    assert (out / "final" / "adapter_config.json").exists()
    from peft import PeftModel

    from entangle.models import load_model

    base, _ = load_model("tiny")
    model = PeftModel.from_pretrained(base, out / "final")
    assert any("lora_A" in n for n, _ in model.named_parameters())


@pytest.mark.distributed
@pytest.mark.parametrize("loss", ["dpo", "bco"])   # bco: a running baseline summed across processes each step
def test_two_processes_match_one_with_the_same_global_batch(tmp_path, loss):
    common = ["data.eval=null", "train.max_steps=4", "train.device=cpu", "diagnostics.entanglement.every=2",
              f"loss.name={loss}"]
    one = rows(train(cfg_for(tmp_path / "one", "train.batch_size=4", *common)).run_dir)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "entangle.cli", "-q",
           "train", "model.name=tiny", "data.train=synthetic:sentiment?config=short&n=64", "data.max_length=64",
           "optimizer.lr=3e-3", "train.batch_size=2", "tracking.progress=false",
           f"train.output_dir={tmp_path / 'two'}", *common]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    two = rows(tmp_path / "two")
    assert json.loads((tmp_path / "two" / "summary.json").read_text())["processes"] == 2
    assert len(one) == len(two) == 4
    state = ["loss_state/delta"] if loss == "bco" else []
    assert not state or one[-1]["loss_state/delta"] != 0.0
    for x, y in zip(one, two):
        for k in ("loss", "rewards/margins", "logps/chosen", "grad_norm", *state):
            assert x[k] == pytest.approx(y[k], rel=1e-4, abs=1e-6), (x["step"], k)
    assert two[1]["entanglement/cos"] == pytest.approx(one[1]["entanglement/cos"], rel=1e-4)
    pairs_one = [json.loads(x) for x in (tmp_path / "one" / "entanglement.jsonl").read_text().splitlines()]
    pairs_two = [json.loads(x) for x in (tmp_path / "two" / "entanglement.jsonl").read_text().splitlines()]
    assert len(pairs_two) == len(pairs_one) == 8  # both processes' pairs, gathered
    by_pair = {(r["step"], r["pair"]): r["inner"] for r in pairs_one}
    for r in pairs_two:
        assert r["inner"] == pytest.approx(by_pair[(r["step"], r["pair"])], rel=1e-4)


def test_prefix_sharing_trains_the_same_numbers_as_two_rows(tmp_path):
    """float64: every logged number of a run with [prompt, chosen, rejected] rows equals the run with
    concatenated rows (diagnostic steps use the concatenated rows either way), up to the float32
    attention softmax inside transformers (~1e-8 per step, grown by six AdamW steps)."""
    common = ["model.dtype=float64", "train.eval_every=3", "diagnostics.entanglement.every=2"]
    train(cfg_for(tmp_path / "one", "train.prefix_sharing=true", *common))
    train(cfg_for(tmp_path / "two", "train.prefix_sharing=false", *common))
    a, b = rows(tmp_path / "one"), rows(tmp_path / "two")
    assert len(a) == len(b) == 6 and a[0].keys() == b[0].keys()
    for x, y in zip(a, b):
        for k in x:
            assert x[k] == pytest.approx(y[k], rel=1e-4, abs=1e-6), k


def test_activation_checkpointing_trains_the_same_numbers(tmp_path):
    """Recomputing activations in the backward changes memory, not results; on diagnostic steps it is
    off (the recorder reads the forward's activations), so the entanglement rows match as well."""
    common = ["model.dtype=float64", "diagnostics.entanglement.every=2"]
    train(cfg_for(tmp_path / "ckpt", "train.activation_checkpointing=true", *common))
    train(cfg_for(tmp_path / "plain", *common))
    a, b = rows(tmp_path / "ckpt"), rows(tmp_path / "plain")
    assert len(a) == len(b) == 6
    for x, y in zip(a, b):
        for k in x:
            assert x[k] == pytest.approx(y[k], rel=1e-9, abs=1e-12), k
    from entangle import models

    model, _ = models.load_model("tiny", dtype="float64")
    models.set_activation_checkpointing(model, True)
    assert model.is_activation_checkpointing
    models.set_activation_checkpointing(model, False)
    assert not model.is_activation_checkpointing


def test_two_writers_cannot_share_a_run_directory(tmp_path):
    """While one process holds a run folder, another `entangle train` into it is refused in one line naming the
    holder; after the holder dies (kill -9: no clean-up) the folder is free again (the kernel drops the lock);
    a finished run releases it."""
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom entangle.rundir import RunLock\n"
                               f"lock = RunLock({str(out)!r})\nprint('locked', flush=True)\ntime.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        p = subprocess.run([sys.executable, "-m", "entangle.cli", "-q", "train", "model.name=tiny",
                            "train.max_steps=1", f"train.output_dir={out}"], capture_output=True, text=True,
                           timeout=300)
        assert p.returncode == 2 and "is being written by another entangle process (pid" in p.stderr
        assert len(p.stderr.strip().splitlines()) == 1 and "Traceback" not in p.stderr
    finally:
        holder.kill()
        holder.wait()
    train(cfg_for(out, "train.max_steps=2"))               # the dead holder's lock is gone
    train(cfg_for(out, "train.max_steps=2", "train.overwrite=true"))   # and the finished run released its own
    assert len(rows(out)) == 2


def test_the_start_up_lines_name_every_data_source_and_say_loudly_when_nothing_is_held_out(tmp_path, caplog):
    import logging

    with caplog.at_level(logging.INFO):
        train(cfg_for(tmp_path / "a", "train.max_steps=1"))
    assert "data: train synthetic:sentiment?config=short&n=64 (64 pairs) | eval synthetic:sentiment?config=short&" \
           "n=16&split=test (16 pairs)" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO):
        train(cfg_for(tmp_path / "b", "train.max_steps=1", "data.eval=null"))
    warned = [r for r in caplog.records if r.levelno == logging.WARNING and "eval: NONE" in r.getMessage()]
    assert len(warned) == 1 and "give data.eval=FILE" in warned[0].getMessage()


def test_a_run_evaluates_at_step_0_by_default_and_fit_returns_its_metrics(tmp_path):
    from entangle.loop import build, fit

    result = fit(build(cfg_for(tmp_path / "run", "train.eval_at_start=true", "train.max_steps=2")))
    logged = rows(result.run_dir)
    assert config.load(None, []).train.eval_at_start is True
    assert logged[0]["step"] == 0 and "eval/loss" in logged[0] and "loss" not in logged[0]
    assert result.metrics_path == os.path.join(result.run_dir, "metrics.jsonl")
    assert result.metrics["step"] == 2 and result.metrics["loss"] == logged[-1]["loss"]
    assert result.metrics["eval/loss"] == logged[-1]["eval/loss"]


@pytest.mark.parametrize("reference", ["frozen", "precomputed"])
def test_mixed_precision_runs_the_reference_in_the_policys_arithmetic(tmp_path, reference):
    """`bf16-mixed` (float32 weights, bf16 autocast): at the start the policy is its reference, so the held-out
    and step-1 DPO losses are exactly log 2 only if the reference's forwards run under the same autocast as
    the prepared policy's (a float32 reference against a bf16 policy gives a bf16-noise margin instead)."""
    import math

    logged = {}
    for dtype in ("bf16-mixed", "float32"):
        train(cfg_for(tmp_path / dtype, f"model.dtype={dtype}", f"reference.type={reference}", "train.max_steps=1",
                      "train.eval_at_start=true"))
        with open(tmp_path / dtype / "metrics.jsonl") as f:
            logged[dtype] = [json.loads(line) for line in f]
    mixed = logged["bf16-mixed"]
    assert mixed[0]["eval/loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert mixed[1]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    # the autocast is on: the policy's log-probs are not float32's
    assert mixed[1]["logps/chosen"] != pytest.approx(logged["float32"][1]["logps/chosen"], abs=1e-4)


@pytest.mark.parametrize("amx", [True, False])
def test_the_start_up_line_points_a_cpu_with_amx_to_bf16_mixed(tmp_path, caplog, monkeypatch, amx):
    import logging

    from entangle import models

    monkeypatch.setattr(models, "fast_cpu_bf16", lambda: amx)
    for dtype in ("auto", "float32"):
        caplog.clear()
        with caplog.at_level(logging.INFO):
            train(cfg_for(tmp_path / dtype, "train.max_steps=1", f"model.dtype={dtype}"))
        assert ("model.dtype=bf16-mixed" in caplog.text) == (amx and dtype == "auto")
