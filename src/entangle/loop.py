"""The training loop: iterate, evaluate, checkpoint, log. No maths (that is `step.py`).

    result = train(config.load("configs/tiny-dpo.yaml"))     # -> RunResult(run_dir, summary)

The run directory holds `config.yaml`, `metrics.jsonl`, `checkpoints/step-N/`, `final/` and
`summary.json`. The same code runs on one CPU, one GPU or many processes under `accelerate launch`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from omegaconf import DictConfig, OmegaConf

from entangle import __version__, losses, synthetic
from entangle.checkpoint import (hf_model, is_sharded, list_checkpoints, load_checkpoint, load_extra, resolve_resume,
                                 save_checkpoint, save_weights, write_json)
from entangle.config import reference_type, trust_region
from entangle.data import TokenizedPair, collate_pairs, read_examples, tokenize_pairs
from entangle.errors import TrainingError
from entangle.diagnostics.probe import EntanglementProbe
from entangle.diagnostics.views import save_mask_views, save_position_views, save_token_views
from entangle.logps import Policy
from entangle.mitigations import PairwiseNormalizer, make_token_mask
from entangle.models import LoraSettings, count_parameters, load_model, set_activation_checkpointing
from entangle.reference import TrustRegionReference, initial_policy, make_reference, precompute_reference
from entangle.step import StepParts, eval_batch, finish_metrics, train_step

log = logging.getLogger("entangle")


@dataclass
class RunResult:
    run_dir: str
    summary: dict
    status: str  # finished | interrupted
    stop_signal: str | None = None   # SIGINT | SIGTERM | requested, when interrupted
    is_main: bool = True


# ------------------------------------------------------------------------------------ data


def load_pairs(source: str, tokenizer, cfg: DictConfig, split: str, limit: int | None):
    """Read, validate and tokenise one source -> (pairs, stats dict)."""
    if source.startswith("synthetic:"):
        examples, skipped = synthetic.from_source(source), 0
        examples = examples[:limit] if limit else examples
    else:
        examples, skipped = read_examples(source, dict(cfg.columns), cfg.skip_bad, split, limit)
    pairs, stats = tokenize_pairs(examples, tokenizer, cfg.max_length, cfg.max_prompt_length)
    stats.n_skipped = skipped
    if not pairs:
        raise TrainingError(f"{source}: every pair was dropped by truncation; raise data.max_length")
    return pairs, stats.as_dict()


def batch_indices(n: int, step: int, global_batch: int, seed: int) -> list[int]:
    """The example indices of optimiser step `step` (0-based): a seeded permutation per epoch."""
    per_epoch = n // global_batch
    epoch, j = divmod(step, per_epoch)
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    perm = torch.randperm(n, generator=g)
    return perm[j * global_batch : (j + 1) * global_batch].tolist()


# ------------------------------------------------------------------------------------ run dir


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


# ------------------------------------------------------------------------------------ train


class StopFlag:
    """Set by SIGINT/SIGTERM or a callback; the loop saves a checkpoint and exits after the step."""

    def __init__(self):
        self.reason: str | None = None

    def __call__(self, signum=None, frame=None):
        self.reason = signal.Signals(signum).name if signum else "requested"


def _accelerator(cfg: DictConfig):
    from accelerate import Accelerator

    cpu = cfg.train.device == "cpu" or (cfg.train.device == "auto" and not torch.cuda.is_available())
    if cfg.train.device == "cuda" and not torch.cuda.is_available():
        raise TrainingError("train.device=cuda but no CUDA device is visible; use train.device=auto")
    trackers = list(cfg.tracking.report_to)
    import importlib.util

    for t in trackers:
        if importlib.util.find_spec(t) is None and not (t == "tensorboard" and importlib.util.find_spec("tensorboardX")):
            raise TrainingError(f"tracking.report_to={t} needs the {t} package: pip install {t}")
    acc = Accelerator(cpu=cpu, log_with=trackers or None, project_dir=cfg.train.output_dir)
    if acc.distributed_type.name == "DEEPSPEED":
        _deepspeed_settings(acc, cfg.train)
    return acc


def _deepspeed_settings(acc, tc) -> None:
    """DeepSpeed's engine takes the batch geometry and clipping from its config; entangle's train.* set
    them (an explicit, different value in the user's DeepSpeed config is an error, not overridden)."""
    ds = acc.state.deepspeed_plugin.deepspeed_config
    ours = {"train_micro_batch_size_per_gpu": tc.batch_size, "gradient_accumulation_steps": tc.grad_accum,
            "train_batch_size": tc.batch_size * tc.grad_accum * acc.num_processes,
            "gradient_clipping": float(tc.max_grad_norm or 0.0)}
    for key, value in ours.items():
        theirs = ds.get(key, "auto")
        # Accelerate's plugin writes gradient_accumulation_steps=1 when the user set nothing
        if theirs not in ("auto", value) and not (key == "gradient_accumulation_steps" and theirs == 1):
            raise TrainingError(f"DeepSpeed config {key}={theirs}, but train.* gives {value}: set it to \"auto\"")
        ds[key] = value
    zero = ds.setdefault("zero_optimization", {})
    if zero.get("stage") == 3:  # final/ and checkpoints hold the gathered weights
        zero["stage3_gather_16bit_weights_on_model_save"] = True


def train(cfg: DictConfig, callbacks: Sequence[Callable[[dict, StopFlag], None]] = ()) -> RunResult:
    """Train `cfg` to completion, or until interrupted (then a checkpoint is saved)."""
    from accelerate.utils import gather_object, set_seed
    from transformers import get_scheduler

    t0 = time.time()
    tc = cfg.train
    acc = _accelerator(cfg)
    main = acc.is_main_process
    run_dir = tc.output_dir
    resume_from = None
    if tc.resume:
        resume_from = resolve_resume(run_dir, tc.resume)
        if resume_from is None and main:
            log.info("train.resume=%s: no checkpoint in %s yet; starting fresh", tc.resume, run_dir)
    prepare_run_dir(run_dir, tc.overwrite, resume_from is not None or bool(tc.resume), main)
    acc.wait_for_everyone()
    set_seed(tc.seed)

    # Model, data, loss, reference.
    mc = cfg.model
    lora = LoraSettings(**OmegaConf.to_container(mc.lora))
    model, tokenizer = load_model(mc.name, mc.dtype, str(acc.device), lora, mc.trust_remote_code, seed=tc.seed)
    pad_id = tokenizer.pad_token_id
    train_pairs, train_stats = load_pairs(cfg.data.train, tokenizer, cfg.data, cfg.data.split,
                                          cfg.data.max_train_examples)
    eval_pairs, eval_stats = ([], None)
    if cfg.data.eval:
        eval_pairs, eval_stats = load_pairs(cfg.data.eval, tokenizer, cfg.data, cfg.data.eval_split,
                                            cfg.data.max_eval_examples)
    loss_fn = losses.get(cfg.loss.name, **OmegaConf.to_container(cfg.loss.params))
    ref_kind = reference_type(cfg)
    barrier = acc.wait_for_everyone
    if ref_kind == "precomputed":
        train_ref = precompute_reference(model, train_pairs, pad_id, tc.eval_batch_size, main, barrier)
        eval_ref = precompute_reference(model, eval_pairs, pad_id, tc.eval_batch_size, main, barrier) \
            if eval_pairs else None
    else:
        alpha, tau = trust_region(cfg) if ref_kind == "trust_region" else (0.0, 1)
        train_ref = eval_ref = make_reference(ref_kind, model, alpha, tau)
    moving = train_ref if isinstance(train_ref, TrustRegionReference) else None
    sharded = is_sharded(acc)   # forwards are collectives
    if sharded and (cfg.diagnostics.entanglement.every or cfg.optimizer.pairwise_normalized):
        raise TrainingError(f"diagnostics.entanglement.every and optimizer.pairwise_normalized read whole per-row "
                            f"gradients, which {acc.distributed_type.name} shards; run them with DDP or one process")
    initial = eval_initial = None
    if cfg.reference.kl_to_init:
        initial = initial_policy(train_ref, model, train_pairs, pad_id, tc.eval_batch_size, main, barrier)
        if eval_pairs:
            eval_initial = initial_policy(eval_ref, model, eval_pairs, pad_id, tc.eval_batch_size, main, barrier,
                                          without_reference=True)

    # Optimiser and schedule.
    world = acc.num_processes
    global_batch = tc.batch_size * tc.grad_accum * world
    steps_per_epoch = len(train_pairs) // global_batch
    if steps_per_epoch == 0:
        raise TrainingError(f"{len(train_pairs)} training pairs cannot fill one step of {global_batch} "
                            "(batch_size x grad_accum x processes); lower train.batch_size")
    total_steps = tc.max_steps or max(1, math.ceil(tc.epochs * steps_per_epoch))
    params = [{"params": [p for p in model.parameters() if p.requires_grad]}]
    token_mask = make_token_mask(model, cfg.loss, acc.device)
    if token_mask is not None:  # loss.token_mask: its own learning rate, no weight decay, the same schedule
        params.append({"params": list(token_mask.parameters()), "lr": cfg.loss.mask_lr, "weight_decay": 0.0})
    oc = cfg.optimizer
    if oc.name == "sgd":
        optimizer = torch.optim.SGD(params, lr=oc.lr, momentum=oc.momentum, weight_decay=oc.weight_decay)
    else:
        optimizer = torch.optim.AdamW(params, lr=oc.lr, betas=tuple(oc.betas), weight_decay=oc.weight_decay,
                                      eps=oc.eps)
    warmup = cfg.schedule.warmup_steps or int(cfg.schedule.warmup_ratio * total_steps)
    sched_name = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}[cfg.schedule.decay]
    scheduler = get_scheduler(sched_name, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)
    model, optimizer = acc.prepare(Policy(model, token_mask), optimizer)
    if sharded:  # a LoRA reference is the policy itself: it runs the way the prepared policy runs
        for ref in (train_ref, eval_ref, initial, eval_initial):
            if ref is not None:
                ref.attach(model)
    ec = cfg.diagnostics.entanglement
    # Diagnostics and the normalised update see the language model's parameters (not the mask head's).
    probe = EntanglementProbe(hf_model(acc, model), ec.every, ec.realised, ec.method, ec.step_changes,
                              ec.batch_mean, ec.positions) if ec.every else None
    normalizer = PairwiseNormalizer(hf_model(acc, model)) if oc.pairwise_normalized else None
    mask_l1 = cfg.loss.mask_l1 if token_mask is not None else 0.0
    parts = StepParts(acc, model, optimizer, scheduler, loss_fn, train_ref, tc.max_grad_norm, initial, probe,
                      normalizer, mask_l1)

    # Run directory, resume.
    metrics_log = JsonlLog(os.path.join(run_dir, "metrics.jsonl"), main)
    pair_log = JsonlLog(os.path.join(run_dir, "entanglement.jsonl"), main)
    start_step, nonfinite_run = 0, 0
    if resume_from:
        state = load_checkpoint(resume_from, acc, model, optimizer, scheduler)
        start_step, nonfinite_run = state["step"], state.get("nonfinite_run", 0)
        loss_fn.state = state.get("loss_state", loss_fn.state)
        if moving is not None:
            moving.load_state_tensors(load_extra(resume_from, "reference"), state["ref_updates"])
        metrics_log.truncate_after(start_step)
        pair_log.truncate_after(start_step)
        if main:
            log.info("resumed from %s at step %d", resume_from, start_step)
    trainable, total = count_parameters(hf_model(acc, model))
    info = {"version": __version__, "git_sha": git_sha(), "processes": world, "global_batch_pairs": global_batch,
            "total_steps": total_steps, "steps_per_epoch": steps_per_epoch, "trainable_parameters": trainable,
            "total_parameters": total, "reference": ref_kind, "data": {"train": train_stats, "eval": eval_stats}}
    if main:
        resolved = OmegaConf.to_container(cfg, resolve=True)
        with open(os.path.join(run_dir, "config.yaml"), "w") as f:
            f.write(OmegaConf.to_yaml({**resolved, "_run": {k: info[k] for k in ("version", "git_sha")}}))
        log.info("%s | %d/%d trainable parameters | %d train pairs (%d truncated, %d dropped, %d skipped) | "
                 "global batch %d pairs | %d steps (%d per epoch) | reference: %s", mc.name, trainable, total,
                 len(train_pairs), train_stats["n_truncated"], train_stats["n_dropped"], train_stats["n_skipped"],
                 global_batch, total_steps, steps_per_epoch, ref_kind)
    if cfg.tracking.report_to:
        acc.init_trackers(cfg.tracking.project, config={k: str(v) for k, v in OmegaConf.to_container(cfg).items()})

    stop = StopFlag()
    old_handlers = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)} \
        if _in_main_thread() else {}
    progress = _progress(main and cfg.tracking.progress, start_step, total_steps)

    def save(step: int) -> None:
        tstate = {"step": step, "nonfinite_run": nonfinite_run, "loss_state": loss_fn.state,
                  "epoch": step / steps_per_epoch}
        extra = {}
        if moving is not None:
            tstate["ref_updates"] = moving.updates
            extra["reference"] = moving.state_tensors()
        save_checkpoint(run_dir, step, acc, model, optimizer, scheduler, tstate, extra, keep=tc.keep_checkpoints)

    def evaluate(step: int) -> dict:
        model.eval()
        sums: dict = {}
        mine = eval_pairs[acc.process_index :: world]
        for s in range(0, math.ceil(len(eval_pairs) / world), tc.eval_batch_size):
            chunk = mine[s : s + tc.eval_batch_size]
            # A process out of pairs still runs a batch (sharded forwards gather across processes) and adds
            # zeros, so that every process reduces the same metrics.
            batch = collate_pairs(chunk or eval_pairs[:1], pad_id, tc.prefix_sharing).to(acc.device)
            for k, v in eval_batch(model, loss_fn, eval_ref, batch, eval_initial, mask_l1).items():
                sums[k] = sums.get(k, 0) + (v if chunk else torch.zeros_like(v))
        model.train()
        m = finish_metrics(acc, sums)
        return {f"eval/{k}": v for k, v in m.items() if k not in ("n_pairs", "n_tokens")}

    last: dict = {}
    last_eval: dict = {}
    ref_drift = moving.drift() if moving is not None else 0.0
    status = "finished"
    if eval_pairs and tc.eval_at_start and start_step == 0:
        metrics_log.write({"step": 0, "epoch": 0.0, **evaluate(0)})
    try:
        for step in range(start_step, total_steps):
            t_step = time.time()
            idx = batch_indices(len(train_pairs), step, global_batch, tc.seed)
            per_rank = tc.batch_size * tc.grad_accum
            mine = idx[acc.process_index * per_rank : (acc.process_index + 1) * per_rank]
            micro = [collate_pairs([train_pairs[i] for i in mine[k : k + tc.batch_size]], pad_id,
                                   tc.prefix_sharing).to(acc.device) for k in range(0, per_rank, tc.batch_size)]
            if tc.activation_checkpointing:
                # The recorder reads activations off the forward pass: no recompute on steps it watches.
                watched = normalizer is not None or (probe is not None and probe.due(step + 1))
                set_activation_checkpointing(hf_model(acc, model), not watched)
            sums, pair_rows = train_step(parts, micro, step + 1)
            if probe is not None and probe.due(step + 1):
                for r in gather_object(pair_rows):
                    pair_log.write({"step": step + 1, **r})
                if ec.positions and main:
                    save_position_views(run_dir, step + 1, tokenizer, probe.position_rows, pair_rows)
                if ec.tokens and main:
                    save_token_views(run_dir, f"step-{step + 1}", acc.unwrap_model(model), tokenizer,
                                     [train_pairs[i] for i in idx[: ec.tokens]])
            m = finish_metrics(acc, sums)
            dt = time.time() - t_step
            nonfinite_run = nonfinite_run + 1 if m["skipped"] else 0
            if moving is not None:
                # Trust region: every tau optimiser steps (not micro-batches), blend the policy in.
                if not m["skipped"] and moving.due(step + 1):
                    moving.update(model)  # sharded policies are gathered one piece at a time
                    ref_drift = moving.drift()
                m["ref/updates"], m["ref/drift"] = float(moving.updates), ref_drift
            row = {"step": step + 1, "epoch": round((step + 1) / steps_per_epoch, 4),
                   **{k: v for k, v in m.items() if k not in ("n_pairs", "n_tokens", "skipped")},
                   "tokens_per_s": m["n_tokens"] / dt, "pairs_per_s": m["n_pairs"] / dt, "step_time_s": dt}
            if m["skipped"]:
                row["skipped_nonfinite"] = 1
                if main:
                    log.warning("step %d: non-finite loss or gradient; step skipped (%d in a row)",
                                step + 1, nonfinite_run)
            is_last = step + 1 == total_steps
            if eval_pairs and (is_last or (tc.eval_every and (step + 1) % tc.eval_every == 0)):
                last_eval = evaluate(step + 1)
                row.update(last_eval)
            if (step + 1) % tc.log_every == 0 or step + 1 == total_steps or m["skipped"]:
                metrics_log.write(row)
                if cfg.tracking.report_to:
                    acc.log({k: v for k, v in row.items() if isinstance(v, (int, float))}, step=step + 1)
            last = row
            progress.update(row)
            if nonfinite_run >= tc.max_nonfinite:
                raise TrainingError(f"{nonfinite_run} consecutive steps had a non-finite loss or gradient "
                                    f"(last at step {step + 1}); lower optimizer.lr or check the data "
                                    f"(train.max_nonfinite={tc.max_nonfinite})")
            for cb in callbacks:
                cb(row, stop)
            if tc.save_every and (step + 1) % tc.save_every == 0 and step + 1 < total_steps:
                save(step + 1)
            if stop.reason is not None:
                save(step + 1)
                status = "interrupted"
                if main:
                    log.warning("%s: checkpoint saved at step %d; continue with train.resume=latest",
                                stop.reason, step + 1)
                break
    finally:
        progress.close()
        for s, h in old_handlers.items():
            signal.signal(s, h)

    if status == "finished":
        save_weights(acc, model, os.path.join(run_dir, "final"))
        if main:
            tokenizer.save_pretrained(os.path.join(run_dir, "final"))
        if token_mask is not None:  # the learned weights on a few held-out (else training) pairs; every
            save_mask_views(run_dir, "final", model, tokenizer,  # process joins the forward, one writes
                            (eval_pairs or train_pairs)[: max(ec.tokens, 8)], pad_id, acc.device, write=main)
    summary = {"status": status, "stop_reason": stop.reason, "steps": last.get("step", start_step), "total_steps": total_steps,
               "runtime_s": round(time.time() - t0, 2), **info,
               "final": {k: v for k, v in last.items() if not k.startswith("eval/")}, "eval": last_eval}
    if main:
        write_json(os.path.join(run_dir, "summary.json"), summary)
    if cfg.tracking.report_to:
        acc.end_training()
    acc.wait_for_everyone()
    return RunResult(run_dir, summary, status, stop.reason, main)


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


class _progress:
    """A tqdm bar with ETA and the live loss and margin (silent when disabled)."""

    def __init__(self, enabled: bool, start: int, total: int):
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True)

    def update(self, row: dict) -> None:
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{row['loss']:.4f}", margin=f"{row['rewards/margins']:.3f}",
                                 acc=f"{row['rewards/accuracies']:.2f}", refresh=False)
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def latest_checkpoint(run_dir: str) -> str | None:
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


__all__ = ["train", "RunResult", "load_pairs", "batch_indices", "TokenizedPair"]
