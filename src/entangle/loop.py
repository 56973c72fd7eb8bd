"""The training loop: iterate, evaluate, checkpoint, log. Assembly is `assembly.py`, the maths `step.py`.

    result = fit(build(config.load("configs/tiny-dpo.yaml")))     # -> RunResult(run_dir, summary, status)
    result = train(cfg)                                            # the same, in one call

The same code runs on one CPU, one GPU or many processes under `accelerate launch`.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import threading
import time
from dataclasses import dataclass
from typing import Callable, Sequence

from omegaconf import DictConfig, OmegaConf

from entangle import batching, models
from entangle.assembly import Run, build
from entangle.checkpoint import (hf_model, list_checkpoints, load_checkpoint, load_extra, save_checkpoint,
                                 save_tensors, save_weights, write_json)
from entangle.errors import TrainingError
from entangle.hooks import activations_read
from entangle.metrics import Metrics
from entangle.models import set_activation_checkpointing
from entangle.rundir import JsonlLog
from entangle.step import eval_batch, train_step

log = logging.getLogger("entangle")
FINAL_REFERENCE = "reference-final.safetensors"   # beside final/: the moving reference where training ended


@dataclass
class RunResult:
    run_dir: str
    summary: dict
    status: str  # finished | interrupted
    stop_signal: str | None = None   # SIGINT | SIGTERM | requested, when interrupted
    is_main: bool = True

    @property
    def metrics(self) -> dict:
        """The last logged training row and the last held-out evaluation (`eval/...`), merged."""
        return {**self.summary.get("final", {}), **self.summary.get("eval", {})}

    @property
    def metrics_path(self) -> str:
        """The run's `metrics.jsonl` (one row per logged step)."""
        return os.path.join(self.run_dir, "metrics.jsonl")


class StopFlag:
    """Set by SIGINT/SIGTERM or a callback; the loop saves a checkpoint and exits after the step."""

    def __init__(self):
        self.reason: str | None = None

    def __call__(self, signum=None, frame=None):
        self.reason = signal.Signals(signum).name if signum else "requested"


def train(cfg: DictConfig, callbacks: Sequence[Callable[[dict, StopFlag], None]] = ()) -> RunResult:
    """Train `cfg` to completion, or until interrupted (then a checkpoint is saved)."""
    return fit(build(cfg), callbacks)


def fit(run: Run, callbacks: Sequence[Callable[[dict, StopFlag], None]] = ()) -> RunResult:
    """Train a built run; `callbacks(row, stop)` see every step's logged row and may stop the run."""
    from accelerate.utils import gather_object

    t0, tc, acc = time.time(), run.cfg.train, run.accelerator
    metrics_log = JsonlLog(os.path.join(tc.output_dir, "metrics.jsonl"), run.is_main)
    pair_log = JsonlLog(os.path.join(tc.output_dir, "entanglement.jsonl"), run.is_main)
    start_step, nonfinite_run = resume(run, [metrics_log, pair_log])
    announce(run)
    stop, parts, last, last_eval, status = StopFlag(), run.step_parts, {}, {}, "finished"
    handlers = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)} \
        if threading.current_thread() is threading.main_thread() else {}
    name = os.path.join(*os.path.normpath(os.path.abspath(tc.output_dir)).split(os.sep)[-2:])
    progress = Progress(run.is_main and run.cfg.tracking.progress, start_step, run.total_steps, name)
    if tc.eval_at_start and start_step == 0 and (run.eval_pairs or any(h.evaluates(0) for h in run.loop_callbacks)):
        metrics_log.write({"step": 0, "epoch": 0.0, **evaluate_heldout(run, 0)})
    try:
        for step in range(start_step + 1, run.total_steps + 1):
            t_step = time.time()
            # 1. This step's pairs: a seeded permutation per epoch; this process's share, in micro-batches.
            idx, micro = step_batches(run, step)
            if tc.activation_checkpointing:  # hooks that read activations off the forward: no recompute
                set_activation_checkpointing(hf_model(acc, run.policy),
                                             not activations_read(run.hooks, step))
            # 2. One optimisation step; the hooks' per-pair rows and views.
            metrics, rows = train_step(parts, micro, step)
            if rows is not None:
                pair_log.write_all([{"step": step, **r} for r in gather_object(rows)])
            ctx = run.context(step, [run.train_pairs[i] for i in idx])
            for h in run.loop_callbacks:
                h.after_step(ctx, rows or [])
            # 3. One reduction over processes; evaluate, log, checkpoint.
            row = step_row(run, step, metrics, time.time() - t_step)
            nonfinite_run = nonfinite_run + 1 if row.get("skipped_nonfinite") else 0
            if (run.eval_pairs and (step == run.total_steps or (tc.eval_every and step % tc.eval_every == 0))) \
                    or any(h.evaluates(step) for h in run.loop_callbacks):
                last_eval = evaluate_heldout(run, step)
                row.update(last_eval)
            if step % tc.log_every == 0 or step == run.total_steps or row.get("skipped_nonfinite"):
                log_row(run, metrics_log, row, step)
            last = row
            progress.update(row)
            check_nonfinite(nonfinite_run, step, tc.max_nonfinite)
            for cb in callbacks:
                cb(row, stop)
            if (tc.save_every and step % tc.save_every == 0 and step < run.total_steps) or stop.reason:
                save(run, step, nonfinite_run)
            if stop.reason is not None:
                status = "interrupted"
                if run.is_main:
                    log.warning("%s: checkpoint saved at step %d; continue with train.resume=latest", stop.reason, step)
                break
    finally:
        progress.close()
        for s, h in handlers.items():
            signal.signal(s, h)
    return finish(run, status, stop.reason, last, last_eval, start_step, t0)


def log_row(run: Run, metrics_log: JsonlLog, row: dict, step: int) -> None:
    """The step's row to metrics.jsonl and to the configured trackers."""
    metrics_log.write(row)
    if run.cfg.tracking.report_to:
        run.accelerator.log({k: v for k, v in row.items() if isinstance(v, (int, float))}, step=step)


def check_nonfinite(count: int, step: int, limit: int) -> None:
    if count >= limit:
        raise TrainingError(f"{count} consecutive steps had a non-finite loss or gradient (last at step {step}); "
                            f"lower optimizer.lr or check the data (train.max_nonfinite={limit})")


def step_batches(run: Run, step: int):
    """(the step's pair indices over all processes, this process's micro-batches)."""
    tc, acc = run.cfg.train, run.accelerator
    idx = batching.batch_indices(len(run.train_pairs), step - 1, run.global_batch, tc.seed)
    mine = batching.process_share(idx, acc.process_index, tc.batch_size * tc.grad_accum)
    return idx, batching.micro_batches(run.train_pairs, mine, tc.batch_size, run.tokenizer.pad_token_id,
                                       tc.prefix_sharing, acc.device)


def step_row(run: Run, step: int, metrics: Metrics, seconds: float) -> dict:
    """The logged row of one step: reduced metrics, the reference's own, throughput; warns on a skipped step."""
    m = metrics.reduce(run.accelerator)
    goal = run.objective
    row = {"step": step, "epoch": round(step / run.steps_per_epoch, 4),
           **{k: v for k, v in m.items() if k not in ("n_pairs", "n_tokens", "skipped")}, **run.reference.metrics(),
           "tokens_per_s": m["n_tokens"] / seconds, f"{goal.unit}_per_s": m["n_pairs"] / seconds,
           "step_time_s": seconds}
    goal.complete(row)
    if m["skipped"]:
        row["skipped_nonfinite"] = 1
        if run.is_main:
            log.warning("step %d: non-finite loss or gradient; step skipped", step)
    return row


def evaluate_heldout(run: Run, step: int) -> dict:
    """Held-out pair metrics (`eval/...`), every process over its share, plus what hooks add."""
    acc, tc, pairs = run.accelerator, run.cfg.train, run.eval_pairs
    run.policy.eval()
    out = {}
    for h in run.loop_callbacks:
        with acc.autocast():   # sampling and scoring in the policy's arithmetic (`entangle eval`'s rule for auto)
            out.update(h.on_evaluate(run.context(step)))
    if not pairs:
        run.policy.train()
        return out
    total = Metrics()
    mine = pairs[acc.process_index :: acc.num_processes]
    for s in range(0, math.ceil(len(pairs) / acc.num_processes), tc.eval_batch_size):
        chunk = mine[s : s + tc.eval_batch_size]
        # A process out of pairs still runs a batch (sharded forwards gather across processes) and adds
        # zeros, so that every process reduces the same metrics.
        batch = batching.collate(chunk or pairs[:1], run.tokenizer.pad_token_id, tc.prefix_sharing).to(acc.device)
        with acc.autocast():   # mixed precision: the references' forwards as the prepared policy's
            m = eval_batch(run.policy, run.loss_fn, run.eval_reference, batch, run.eval_initial, run.mask_l1)
        total.update(m if chunk else m.zeros_like())
    run.policy.train()
    metrics = {f"eval/{k}": v for k, v in total.reduce(acc).items() if k not in ("n_pairs", "n_tokens")}
    return run.objective.complete(metrics) | out


def resume(run: Run, logs: Sequence[JsonlLog]) -> tuple[int, int]:
    """Restore a checkpoint into the run (weights, optimiser, schedule, RNG, loss and reference state) ->
    (steps done, consecutive non-finite steps); the logs lose lines past it."""
    if not run.resume_from:
        return 0, 0
    state = None
    candidates = [run.resume_from]
    if run.cfg.train.resume == "latest":   # a damaged newest checkpoint falls back to the one before it
        candidates += [p for _, p in reversed(list_checkpoints(run.cfg.train.output_dir)) if p != run.resume_from]
    for folder in candidates:
        try:
            state = load_checkpoint(folder, run.accelerator, run.policy, run.optimizer, run.scheduler)
            run.resume_from = folder
            break
        except TrainingError:
            raise
        except Exception as e:   # torch/safetensors/json errors of a torn or truncated file
            why = f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
            if folder == candidates[-1] or run.cfg.train.resume != "latest":
                raise TrainingError(f"{folder}: the checkpoint is damaged ({why}); resume from an earlier one "
                                    "(train.resume=FOLDER) or start over") from None
            log.warning("%s is damaged (%s); resuming from the checkpoint before it", folder, why)
    run.loss_fn.state = state.get("loss_state", run.loss_fn.state)
    run.reference.load_state(state, load_extra(run.resume_from, "reference"))
    for jsonl in logs:
        jsonl.truncate_after(state["step"])
    if run.is_main:
        log.info("resumed from %s at step %d", run.resume_from, state["step"])
    return state["step"], state.get("nonfinite_run", 0)


def save(run: Run, step: int, nonfinite_run: int) -> None:
    ref_state, ref_tensors = run.reference.state()
    state = {"step": step, "nonfinite_run": nonfinite_run, "loss_state": run.loss_fn.state,
             "epoch": step / run.steps_per_epoch, **ref_state}
    save_checkpoint(run.cfg.train.output_dir, step, run.accelerator, run.policy, run.optimizer, run.scheduler, state,
                    {"reference": ref_tensors} if ref_tensors else {}, keep=run.cfg.train.keep_checkpoints)


def announce(run: Run) -> None:
    """`config.yaml` (resolved, with version and git SHA), the start-up line, trackers."""
    cfg, info = run.cfg, run.info
    if run.is_main:
        resolved = OmegaConf.to_container(cfg, resolve=True)
        with open(os.path.join(cfg.train.output_dir, "config.yaml"), "w") as f:
            f.write(OmegaConf.to_yaml({**resolved, "_run": {k: info[k] for k in ("version", "git_sha")}}))
        st, unit = info["data"]["train"], run.objective.unit
        labels = f" ({st['desirable']} desirable, {st['undesirable']} undesirable)" if "desirable" in st else ""
        log.info("%s | %d/%d trainable parameters | %d train %s%s (%d truncated, %d dropped, %d skipped) | "
                 "global batch %d %s | %d steps (%d per epoch) | reference: %s", cfg.model.name,
                 info["trainable_parameters"], info["total_parameters"], len(run.train_pairs), unit, labels,
                 st["n_truncated"], st["n_dropped"], st["n_skipped"], run.global_batch, unit, run.total_steps,
                 run.steps_per_epoch, info["reference"])
        ev, source = info["data"]["eval"], cfg.data.train or "in-memory data"
        if ev is not None:
            log.info("data: train %s (%d %s) | eval %s (%d %s)", source, len(run.train_pairs), unit,
                     cfg.data.eval or "in-memory data", len(run.eval_pairs), unit)
        else:
            log.warning("data: train %s (%d %s) | eval: NONE, no held-out figures (give data.eval=FILE; a "
                        "config's own eval set is never used with your data.train)", source, len(run.train_pairs),
                        unit)
        if cfg.model.dtype == "auto" and run.accelerator.device.type == "cpu" and models.fast_cpu_bf16():
            log.info("this CPU has AMX bf16 units: model.dtype=bf16-mixed (float32 weights, bf16 autocast) "
                     "trains faster than the float32 that auto means on a CPU")
    if cfg.tracking.report_to:
        run.accelerator.init_trackers(cfg.tracking.project,
                                      config={k: str(v) for k, v in OmegaConf.to_container(cfg).items()})


def finish(run: Run, status: str, reason: str | None, last: dict, last_eval: dict, start_step: int,
           t0: float) -> RunResult:
    """`_finish`, then the run directory's writer lock is released (also when writing fails)."""
    try:
        return _finish(run, status, reason, last, last_eval, start_step, t0)
    finally:
        if run.lock is not None:
            run.lock.release()


def _finish(run: Run, status: str, reason: str | None, last: dict, last_eval: dict, start_step: int,
            t0: float) -> RunResult:
    """Final weights and hooks' end-of-run views (when finished), `summary.json`."""
    acc, run_dir = run.accelerator, run.cfg.train.output_dir
    if status == "finished":
        save_weights(acc, run.policy, os.path.join(run_dir, "final"))
        ref_state, ref_tensors = run.reference.state()
        if run.is_main:
            run.tokenizer.save_pretrained(os.path.join(run_dir, "final"))
            if ref_tensors:   # a moving reference's final state: `entangle eval` reports kl/reference with it
                save_tensors(os.path.join(run_dir, FINAL_REFERENCE), ref_tensors, ref_state)
        for h in run.loop_callbacks:
            h.on_fit_end(run.context(last.get("step", start_step)))
    summary = {"status": status, "stop_reason": reason, "steps": last.get("step", start_step),
               "total_steps": run.total_steps, "runtime_s": round(time.time() - t0, 2), **run.info,
               "final": {k: v for k, v in last.items() if not k.startswith("eval/")}, "eval": last_eval}
    if run.is_main:
        write_json(os.path.join(run_dir, "summary.json"), summary)
    if run.cfg.tracking.report_to:
        acc.end_training()
    acc.wait_for_everyone()
    return RunResult(run_dir, summary, status, reason, run.is_main)


class Progress:
    """A tqdm bar with ETA and the live loss and margin (silent when disabled)."""

    def __init__(self, enabled: bool, start: int, total: int, name: str = "train"):
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=start, desc=name, unit="step", dynamic_ncols=True)

    def update(self, row: dict) -> None:
        if self.bar is not None:
            shown = {"loss": ("loss", ".4f"), "margin": ("rewards/margins", ".3f"),
                     "acc": ("rewards/accuracies", ".2f"), "kl": ("kl", ".3f")}
            self.bar.set_postfix({k: format(row[key], f) for k, (key, f) in shown.items() if key in row}, refresh=False)
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


__all__ = ["train", "fit", "build", "RunResult", "StopFlag", "evaluate_heldout"]
