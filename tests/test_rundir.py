"""rundir: one writer per run folder, output paths checked before any work, logs that survive a kill."""

import json
import os

import pytest

from entangle.errors import DataError, TrainingError
from entangle.rundir import JsonlLog, RunLock, check_outputs, is_run, refuse_overwriting_inputs


def test_a_second_writer_is_refused_and_the_lock_goes_with_its_holder(tmp_path):
    first = RunLock(str(tmp_path))
    with pytest.raises(TrainingError, match=r"being written by another entangle process \(pid \d+ on "):
        RunLock(str(tmp_path))
    first.release()
    RunLock(str(tmp_path)).release()                       # free again once the holder let go


def test_outputs_are_checked_as_files_folders_and_never_inputs(tmp_path):
    data = tmp_path / "pairs.jsonl"
    data.write_text("{}\n")
    os.link(data, tmp_path / "same-file.jsonl")
    with pytest.raises(DataError, match="is the input --data"):
        refuse_overwriting_inputs({"--keep": str(tmp_path / "same-file.jsonl")}, {"--data": str(data)})
    with pytest.raises(DataError, match="is a file; give a folder"):
        check_outputs(folders={"--out": str(data)})
    with pytest.raises(DataError, match="is a folder; give a file path"):
        check_outputs(files={"--out": str(tmp_path)})
    with pytest.raises(DataError, match="is a file, not a folder"):
        check_outputs(files={"--out": str(data / "x.jsonl")})
    check_outputs(folders={"--out": str(tmp_path / "new" / "deeper")}, files={"--keep": str(tmp_path / "k.jsonl")},
                  inputs={"--data": str(data)})
    assert not (tmp_path / "new").exists()                 # checked, nothing made


def test_a_log_truncated_after_a_checkpoint_keeps_earlier_steps_and_drops_a_torn_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    log = JsonlLog(str(path), enabled=True)
    log.write_all([{"step": s, "loss": 1.0 / s} for s in (1, 2, 3)])
    with open(path, "a") as f:
        f.write('{"step": 4, "lo')                          # killed mid-write
    log.truncate_after(2)
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [1, 2]
    JsonlLog(str(tmp_path / "other.jsonl"), enabled=False).write({"step": 1})
    assert not (tmp_path / "other.jsonl").exists()          # only the main process writes


def test_a_run_folder_is_recognised_by_its_config_beside_its_logs(tmp_path):
    assert not is_run(str(tmp_path))
    (tmp_path / "config.yaml").write_text("model: {}\n")
    assert not is_run(str(tmp_path))
    (tmp_path / "metrics.jsonl").write_text("")
    assert is_run(str(tmp_path))
