"""checkpoint: checkpoints are found in step order, resume picks the newest complete one, files are atomic."""

import json
import os

import pytest
import torch

from entangle.checkpoint import (list_checkpoints, load_extra, resolve_resume, rng_state, save_tensors,
                                 set_rng_state, write_json)
from entangle.errors import TrainingError


def test_checkpoints_in_step_order_and_resume_takes_the_newest_complete_one(tmp_path):
    for step in (10, 2, 30):
        folder = tmp_path / "checkpoints" / f"step-{step}"
        folder.mkdir(parents=True)
        (folder / "trainer_state.json").write_text("{}")
    (tmp_path / "checkpoints" / ".tmp-step-40").mkdir()     # a write that never finished: not a checkpoint
    assert [s for s, _ in list_checkpoints(str(tmp_path))] == [2, 10, 30]
    assert resolve_resume(str(tmp_path), "latest").endswith("step-30")
    assert resolve_resume(str(tmp_path / "none"), "latest") is None
    with pytest.raises(TrainingError, match="not a checkpoint folder"):
        resolve_resume(str(tmp_path), str(tmp_path / "checkpoints"))


def test_json_and_tensors_are_written_whole_and_read_back(tmp_path):
    write_json(str(tmp_path / "s.json"), {"a": 1})
    assert json.loads((tmp_path / "s.json").read_text()) == {"a": 1}
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]
    save_tensors(str(tmp_path / "extra.safetensors"), {"w": torch.arange(3.0)}, {"ref_updates": "2"})
    assert load_extra(str(tmp_path), "extra")["w"].tolist() == [0.0, 1.0, 2.0]
    assert load_extra(str(tmp_path), "missing") is None


def test_random_states_round_trip():
    state = rng_state()
    a = torch.rand(3)
    set_rng_state(state)
    assert torch.equal(torch.rand(3), a)
