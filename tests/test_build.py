"""build: a run is assembled from a config with its geometry stated, and every input is checked before any
model loads."""

import pytest

from entangle import assembly as build_module
from entangle import config
from entangle.errors import ModelError, TrainingError
from entangle.loop import build


def cfg(out, *extra):
    return config.load(None, ["model.name=tiny", "data.train=synthetic:sentiment?config=short&n=24",
                              "data.max_length=48", "train.batch_size=4", "train.grad_accum=2",
                              "tracking.progress=false", f"train.output_dir={out}", *extra])


def test_a_run_states_its_geometry_and_pieces(tmp_path):
    run = build(cfg(tmp_path / "run", "train.epochs=2", "reference.type=soft"))
    try:
        assert run.global_batch == 8 and run.steps_per_epoch == 3 and run.total_steps == 6
        assert run.info["reference"] == "trust_region" and run.info["processes"] == 1
        assert 0 < run.info["trainable_parameters"] == run.info["total_parameters"]
        assert run.step_hooks == [] and run.loop_callbacks == []
    finally:
        run.lock.release()


def test_inputs_are_checked_before_any_model_loads(tmp_path, monkeypatch):
    monkeypatch.setattr(build_module, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(TrainingError, match="data.train=nope.jsonl: no such file"):
        build(cfg(tmp_path / "a", "data.train=nope.jsonl"))
    with pytest.raises(ModelError, match="model.name '/no/such/model': no such folder"):
        build(cfg(tmp_path / "b", "model.name=/no/such/model"))
    (tmp_path / "file").write_text("x")
    with pytest.raises(TrainingError, match="is a file; give a folder"):
        build(cfg(tmp_path / "file"))


def test_too_little_data_for_one_step_is_one_line(tmp_path):
    with pytest.raises(TrainingError, match="cannot fill one step of 8"):
        build(cfg(tmp_path / "run", "data.train=synthetic:sentiment?config=short&n=6"))
