"""The papers' experiments, each a small module that drives the training loop and writes a report.

    rows = run_once(["model.name=tiny", ...], "runs/study/static")   # trains, resumes, or reuses

A study is a set of ordinary run directories plus its own `summary.json`. Re-running a study skips
a run that already finished with the same settings and resumes one that was interrupted.
"""

from __future__ import annotations

import json
import logging
import os

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from entangle import config
from entangle.errors import ConfigError, Interrupted

log = logging.getLogger(__name__)

# Keys that say where and how a run is written, not what it computes.
_BOOKKEEPING = ("output_dir", "overwrite", "resume", "save_every", "keep_checkpoints")
# Every study run keeps its newest checkpoint every 50 steps: a study killed outright (kill -9, a lost machine)
# continues from there when run again, instead of redoing the run.
CHECKPOINTS = {"train.save_every": 50, "train.keep_checkpoints": 1}


def _settings(cfg) -> dict:
    data = OmegaConf.to_container(cfg, resolve=True) if not isinstance(cfg, dict) else dict(cfg)
    data.pop("_run", None)
    data["train"] = {k: v for k, v in data.get("train", {}).items() if k not in _BOOKKEEPING}
    data.get("tracking", {}).pop("progress", None)
    return data


def _status(run_dir: str) -> str | None:
    """`finished` / `interrupted` from the run's summary, None when it has none."""
    try:
        with open(os.path.join(run_dir, "summary.json")) as f:
            return json.load(f).get("status")
    except (OSError, ValueError):
        return None


def same_settings(run_dir: str, cfg) -> bool:
    """True when the config saved in `run_dir` computes the same thing as `cfg`."""
    try:
        saved = OmegaConf.to_container(config.load_saved(run_dir), resolve=True)
    except (OSError, ValueError, OmegaConfBaseException):
        return False
    return _settings(saved) == _settings(cfg)


def _get(settings, name: str):
    return settings[name] if isinstance(settings, dict) else getattr(settings, name)


def given_settings(settings_cls, args, commas: tuple[str, ...] = ()) -> dict:
    """The fields of a study's settings dataclass that the command line gave (an option left None is not given,
    so the dataclass keeps the one default), `extra` from the positional overrides; the options in `commas`
    ("dpo,ipo") split into tuples."""
    from dataclasses import fields

    given = {f.name: getattr(args, f.name) for f in fields(settings_cls)
             if f.name != "extra" and getattr(args, f.name, None) is not None}
    for name in commas:
        if isinstance(given.get(name), str):
            given[name] = tuple(x.strip() for x in given[name].split(",") if x.strip())
    return {**given, "extra": list(args.overrides)}


def check_whole(study: str, settings, lows: dict[str, int]) -> None:
    """Each named setting (an attribute or a key) a whole number at least its low end, else a one-line
    ConfigError naming it."""
    for name, low in lows.items():
        v = _get(settings, name)
        if not (isinstance(v, int) and not isinstance(v, bool) and v >= low):
            raise ConfigError(f"study {study}: {name} = {v!r}: must be a whole number >= {low}")


def check_positive(study: str, settings, names: tuple[str, ...]) -> None:
    """Each named setting a finite number > 0, else a one-line ConfigError naming it."""
    import math

    for name in names:
        v = _get(settings, name)
        if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
            raise ConfigError(f"study {study}: {name} = {v!r}: must be a number > 0")


def check_reference_loss(study: str, name: str) -> None:
    """`name` is a registered loss with a reference and a beta (the studies sweep beta and move the reference)."""
    from entangle import losses

    try:
        spec = losses.get(name)
    except ConfigError as e:
        raise ConfigError(f"study {study}: loss: {e}") from None
    if not (spec.uses_reference and "beta" in spec.params):
        raise ConfigError(f"study {study}: loss = {name!r}: needs a loss with a reference and a beta")


def write_summary(out: str, summary: dict, report: bool, title: str) -> dict:
    """`OUT/summary.json`, then (if `report`) `OUT/report/report.html`, whose path joins the summary."""
    from entangle.checkpoint import write_json

    write_json(os.path.join(out, "summary.json"), summary)
    if report:
        from entangle.report import write_report

        page = write_report([out], os.path.join(out, "report"), title=title, study_blocks=report_blocks)
        summary["report"] = os.path.relpath(page, out)
        write_json(os.path.join(out, "summary.json"), summary)
    return summary


def run_once(overrides: list[str], run_dir: str) -> list[dict]:
    """Train `overrides` into `run_dir` unless it already finished with these settings; return its metrics."""
    from entangle.checkpoint import list_checkpoints
    from entangle.loop import train
    from entangle.report import load_metrics

    cfg = config.load(None, [*overrides, f"train.output_dir={run_dir}"])
    same, status = same_settings(run_dir, cfg), _status(run_dir)
    if same and status == "finished":
        log.info("%s: finished earlier with the same settings; reusing it", run_dir)
        return load_metrics(run_dir)
    resumable = same and (status == "interrupted" or (status is None and bool(list_checkpoints(run_dir))))
    extra = ["train.resume=latest"] if resumable else ["train.overwrite=true"]
    given = {o.split("=", 1)[0] for o in overrides}
    periodic = [f"{k}={v}" for k, v in CHECKPOINTS.items() if k not in given]   # a killed study loses little
    result = train(config.load(None, [*overrides, *periodic, f"train.output_dir={run_dir}", *extra]))
    if result.status != "finished":
        raise Interrupted(f"study interrupted in {run_dir}; run the same command again to continue from its "
                          "checkpoint", result.stop_signal)
    return load_metrics(run_dir)


# The studies that render blocks of their own beside the generic headline, figures and results table.
_RENDERERS = {"sentiment": "entangle.studies.sentiment", "compare": "entangle.studies.compare"}


def report_blocks(summary: dict) -> list[dict]:
    """What a study shows in the report beyond its `verdict`, `figures` and `results`, as plain blocks that
    `report.py` draws without knowing the study: `{"heading", "note", "claims": [{"label", "text", "held",
    "measured"}]}`, `{"heading", "table": {"columns", "rows"}}` or `{"heading", "text", "held"}`."""
    import importlib

    module = _RENDERERS.get(str(summary.get("study", "")))
    return importlib.import_module(module).report_blocks(summary) if module else []


def default_data(name: str, flag: str) -> str:
    """Where a study's default data set `name` (e.g. `hh-rlhf/helpful-base.train.jsonl`) lives, found in one
    place whatever the working folder: `$ENTANGLE_DATA/NAME`, else the `shared/data/` folder beside the
    repository (`../shared/data`); a one-line ConfigError naming `flag` when neither has it."""
    here = os.path.dirname(os.path.abspath(__file__))
    roots = [os.environ.get("ENTANGLE_DATA", "")] + [os.path.normpath(os.path.join(here, *[".."] * k, "shared", "data"))
                                                      for k in (3, 4)]
    for root in roots:
        if root and os.path.exists(os.path.join(root, name)):
            return os.path.join(root, name)
    raise ConfigError(f"the default data {name} is not on this machine (looked in $ENTANGLE_DATA and "
                      f"{roots[1]}); give {flag} FILE")


def make_study_folder(out: str) -> None:
    """The study's output folder, checked as every command's output is (`rundir.check_outputs`), then made."""
    from entangle.rundir import check_outputs

    check_outputs(folders={"--out": out})
    os.makedirs(out, exist_ok=True)
