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


def prepare_run_dir(path: str, overwrite: bool, resuming: bool, is_main: bool) -> None:
    if is_main and os.path.isdir(path) and os.listdir(path) and not resuming:
        if not overwrite:
            raise TrainingError(f"{path} is not empty; set train.overwrite=true to replace it, "
                                "or train.resume=latest to continue it")
        for name in os.listdir(path):
            p = os.path.join(path, name)
            shutil.rmtree(p) if os.path.isdir(p) else os.remove(p)
    if is_main:
        os.makedirs(path, exist_ok=True)


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
        with open(self.path) as f:
            keep = [ln for ln in f if ln.strip() and json.loads(ln).get("step", 0) <= step]
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
