"""The run directory: made or checked before anything loads, its append-only logs, its provenance.

    prepare_run_dir("runs/x", overwrite=False, resuming=False, is_main=True)
    log = JsonlLog("runs/x/metrics.jsonl", enabled=True); log.write({"step": 1, ...})

A run directory holds `config.yaml`, `metrics.jsonl`, `entanglement.jsonl`, `checkpoints/step-N/`,
`final/`, `samples/` and `summary.json`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess

from entangle.errors import TrainingError


# What entangle writes into a run directory: the only entries `train.overwrite` (or a fresh start under
# `train.resume`) ever deletes.
RUN_ENTRIES = ("config.yaml", "metrics.jsonl", "entanglement.jsonl", "summary.json", "resumes.jsonl", "checkpoints",
               "final", "samples", "entanglement_tokens", "entanglement_positions", "token_masks", "report")


def is_run(path: str) -> bool:
    """A folder entangle trained into (its config.yaml beside its logs or checkpoints)."""
    return os.path.isfile(os.path.join(path, "config.yaml")) and any(
        os.path.exists(os.path.join(path, n)) for n in ("metrics.jsonl", "checkpoints", "summary.json"))


def check_output_dir(path: str) -> None:
    """A folder that can be written, checked before anything loads."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise TrainingError(f"train.output_dir={path} is a file; give a folder")
    parent = path
    while not os.path.exists(parent):
        parent = os.path.dirname(os.path.abspath(parent))
    if not os.access(parent, os.W_OK | os.X_OK):
        raise TrainingError(f"train.output_dir={path}: {parent} is not writable; give a folder you can write")


LOCK = ".entangle.lock"


class RunLock:
    """The run directory's writer lock, held while one process writes it: `flock` on `PATH/.entangle.lock`,
    which the kernel releases when the process ends however it ends, so a stale lock never blocks a later run.
    The file names the holder (pid and host) for the refusal message."""

    def __init__(self, path: str):
        import fcntl
        import socket

        self.file = open(os.path.join(path, LOCK), "a+")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.file.seek(0)
            holder = self.file.read().strip() or "another process"
            self.file.close()
            raise TrainingError(f"{path} is being written by another entangle process ({holder}); wait for it to "
                                "finish or give another train.output_dir") from None
        self.file.seek(0)
        self.file.truncate()
        self.file.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        self.file.flush()

    def release(self) -> None:
        if not self.file.closed:
            import fcntl

            fcntl.flock(self.file, fcntl.LOCK_UN)
            self.file.close()


def check_writable_folder(out: str, option: str = "--out") -> None:
    """`out` can be written as a folder (it, or its nearest existing parent, is a writable folder), checked before
    any work; nothing is created. A one-line DataError naming `option` otherwise."""
    from entangle.errors import DataError

    if os.path.exists(out) and not os.path.isdir(out):
        raise DataError(f"{option} {out} is a file; give a folder")
    here = os.path.abspath(out)
    while not os.path.exists(here):
        here = os.path.dirname(here)
    if not os.path.isdir(here):
        raise DataError(f"{option} {out}: {here} is a file, not a folder; give another path")
    if not os.access(here, os.W_OK):
        raise DataError(f"{option} {out} is not writable ({here}); give a folder you can write")


def check_outputs(folders: dict[str, str | None] = {}, files: dict[str, str | None] = {},  # noqa: B006
                  inputs: dict[str, str | None] = {}) -> None:  # noqa: B006
    """The one output-path check of every command, before any model loads: each output folder and file can be
    written where it is asked for (a file is not a folder, a folder is not a file, no parent is a file, the nearest
    existing parent is writable) and none is one of the inputs. Option name -> path (None: not given)."""
    from entangle.errors import DataError

    refuse_overwriting_inputs({**folders, **files}, inputs)
    for option, path in folders.items():
        if path:
            check_writable_folder(path, option)
    for option, path in files.items():
        if path:
            if os.path.isdir(path):
                raise DataError(f"{option} {path} is a folder; give a file path")
            parent = os.path.dirname(os.path.abspath(path))
            if os.path.isfile(parent):
                raise DataError(f"{option} {path}: {parent} is a file, not a folder; give another path")
            check_writable_folder(parent, option)


def refuse_overwriting_inputs(outputs: dict[str, str | None], inputs: dict[str, str | None]) -> None:
    """One line, before any work, when an output path is one of the inputs (the same path, or the same file by
    another name: a link, `./x` vs `x`). `outputs` / `inputs`: option name -> path (None: not given)."""
    from entangle.errors import DataError

    def same(a: str, b: str) -> bool:
        if os.path.realpath(a) == os.path.realpath(b):
            return True
        try:
            return os.path.samefile(a, b)
        except OSError:
            return False

    for out_name, out in outputs.items():
        for in_name, given in inputs.items():
            if out and isinstance(given, str) and os.path.exists(given) and same(out, given):
                raise DataError(f"{out_name} {out} is the input {in_name}; writing it would destroy the input: "
                                "give another path")


def prepare_run_dir(path: str, overwrite: bool, resume_requested: bool, has_checkpoint: bool,
                    is_main: bool) -> RunLock | None:
    """Make the run directory and lock it for this process (`RunLock`; other processes of a launch write
    nothing and take none). Continuing from a checkpoint keeps it; otherwise a non-empty folder must be an
    entangle run and `train.overwrite` (or a resume that found no checkpoint: a fresh start) removes only
    what entangle wrote (`RUN_ENTRIES`); anything else in it stays."""
    check_output_dir(path)
    if not is_main:
        return None
    entries = [e for e in os.listdir(path) if e != LOCK] if os.path.isdir(path) else []
    if entries and not is_run(path):   # refused before anything is written into someone else's folder
        raise TrainingError(f"{path} is not empty and is not an entangle run (no config.yaml); entangle deletes only "
                            "what it wrote: give a new or empty folder")
    os.makedirs(path, exist_ok=True)
    lock = RunLock(path)
    try:
        _clear(path, entries, overwrite, resume_requested, has_checkpoint)
    except BaseException:
        lock.release()
        raise
    return lock


def _clear(path: str, entries: list[str], overwrite: bool, resume_requested: bool, has_checkpoint: bool) -> None:
    if entries and not has_checkpoint:
        if not (overwrite or resume_requested):
            raise TrainingError(f"{path} is not empty; set train.overwrite=true to replace it, "
                                "or train.resume=latest to continue it")
        for name in entries:
            p = os.path.join(path, name)
            if name in RUN_ENTRIES or name.endswith(".tmp"):
                shutil.rmtree(p) if os.path.isdir(p) else os.remove(p)


def git_sha() -> str | None:
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        out = subprocess.run(["git", "-C", here, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


class JsonlLog:
    """Append-only JSON lines; on resume, lines past the checkpoint's step are dropped atomically."""

    def __init__(self, path: str, enabled: bool):
        self.path, self.enabled = path, enabled

    def truncate_after(self, step: int) -> None:
        if not self.enabled or not os.path.exists(self.path):
            return
        with open(self.path, encoding="utf-8", errors="replace") as f:
            keep = [ln if ln.endswith("\n") else ln + "\n" for ln in f if _step(ln) is not None and _step(ln) <= step]
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(keep)
        os.replace(tmp, self.path)

    def write(self, row: dict) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")

    def write_all(self, rows: list[dict]) -> None:
        if self.enabled and rows:
            with open(self.path, "a") as f:
                f.writelines(json.dumps(r) + "\n" for r in rows)


def _step(line: str) -> int | None:
    """The step of a log line; None for a torn or foreign line (a kill mid-write leaves one at the end)."""
    try:
        return int(json.loads(line).get("step", 0))
    except (ValueError, AttributeError, TypeError):
        return None
