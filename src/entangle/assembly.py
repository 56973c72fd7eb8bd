"""Assembly: `build(cfg) -> Run`, every component of a training run made once, in one place.

    run = build(config.load("configs/tiny-dpo.yaml"))     # model, data, loss, references, optimiser, hooks
    fit(run)                                               # loop.py

The loop, the studies, the benchmarks and the TRL integration all start from a `Run`.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import logging
import math
import os
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from omegaconf import DictConfig, OmegaConf

from entangle import losses, synthetic
from entangle.checkpoint import hf_model, resolve_resume
from entangle.engine import is_deepspeed, is_sharded
from entangle.engine import kind as engine_kind
from entangle.config import reference_type, trust_region, validate
from entangle.data import (check_labels, missing_file, parse_kto, parse_pair, read_examples, tokenize_pairs,
                           tokenize_unpaired)
from entangle.diagnostics.probe import EntanglementProbe
from entangle.diagnostics.views import TokenMaskViews
from entangle.errors import DataError, TrainingError
from entangle.hooks import HookContext, LoopCallback, StepHook, split
from entangle.logps import Policy
from entangle.mitigations import PairwiseNormalizer, make_token_mask
from entangle.models import LoraConfig, check_fits_context, count_parameters, is_peft, load_model
from entangle.reference import FrozenReference, Reference, make_reference, precompute_reference
from entangle.rundir import check_output_dir, git_sha, is_run, prepare_run_dir
from entangle.step import Objective, StepParts, objective
from entangle.version import __version__

log = logging.getLogger("entangle")


@dataclass
class Run:
    """Everything a training run is made of; `fit(run)` trains it."""

    cfg: DictConfig
    accelerator: Any
    policy: Any                      # the prepared `Policy` (DDP/FSDP/DeepSpeed-wrapped where launched so)
    tokenizer: Any
    train_pairs: list
    eval_pairs: list
    loss_fn: losses.Loss
    reference: Reference             # what the training loss reads (moves itself when it is a trust region)
    eval_reference: Reference | None
    initial: Reference | None        # the initial policy on the training pairs (ref/kl_to_init), or None
    eval_initial: Reference | None
    optimizer: Any
    scheduler: Any
    hooks: list                      # step hooks and loop callbacks (hooks.py); an object may be both
    global_batch: int
    steps_per_epoch: int
    total_steps: int
    resume_from: str | None
    info: dict = field(default_factory=dict)   # version, geometry, data statistics: summary.json and the log
    objective: Objective | None = None          # what a batch item is: the loss's (`step.objective`)
    lock: Any = None                            # the run directory's writer lock (main process), released by fit

    def __post_init__(self):
        if self.objective is None:
            self.objective = objective(self.loss_fn)

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def mask_l1(self) -> float:
        return self.cfg.loss.mask_l1 if self.accelerator.unwrap_model(self.policy).token_mask is not None else 0.0

    @property
    def step_hooks(self) -> list[StepHook]:
        return split(self.hooks)[0]

    @property
    def loop_callbacks(self) -> list[LoopCallback]:
        return split(self.hooks)[1]

    @property
    def step_parts(self) -> StepParts:
        return StepParts(self.accelerator, self.policy, self.optimizer, self.scheduler, self.loss_fn, self.reference,
                         self.cfg.train.max_grad_norm, self.initial, self.step_hooks, self.mask_l1, self.objective)

    def context(self, step: int, step_pairs: list | None = None) -> HookContext:
        return HookContext(self.accelerator, self.cfg.train.output_dir, self.tokenizer, self.policy, step,
                           step_pairs or [], self.eval_pairs, self.train_pairs, self.is_main)


def load_pairs(source, tokenizer, cfg: DictConfig, split: str, limit: int | None, unpaired: bool = False,
               seed: int = 0):
    """Read, validate and tokenise one source (`cfg` is the `data` section) -> (items, stats dict): preference
    pairs, or with `unpaired` KTO examples (unpaired rows, or pairs split in two; `seed` picks their KL rows).
    `source` is what `data.train` accepts, or in-memory records (a `datasets.Dataset`, a list of dicts)."""
    parse = parse_kto if unpaired else (lambda *a: [parse_pair(*a)])
    if not isinstance(source, str):
        examples, skipped = [], 0
        for i, rec in enumerate(source):
            try:
                examples.extend(parse(dict(rec), f"in-memory record {i + 1}", dict(cfg.columns)))
            except DataError:
                if not cfg.skip_bad:
                    raise
                skipped += 1
            if limit and len(examples) >= limit:
                break
        examples, source = examples[:limit] if limit else examples, "in-memory data"
    elif source.startswith("synthetic:"):
        examples, skipped = synthetic.from_source(source), 0
        examples = examples[:limit] if limit else examples
        if unpaired:
            examples = [e for p in examples for e in parse_kto(p.__dict__, p.where)]
    else:
        examples, skipped = read_examples(source, dict(cfg.columns), cfg.skip_bad, split, limit, unpaired)
    if unpaired:
        items, stats = tokenize_unpaired(examples, tokenizer, cfg.max_length, cfg.max_prompt_length, seed)
    else:
        items, stats = tokenize_pairs(examples, tokenizer, cfg.max_length, cfg.max_prompt_length)
    stats.n_skipped = skipped
    kind = "examples" if unpaired else "pairs"
    if not items:
        raise TrainingError(f"{source}: every one of the {kind} was dropped by truncation; raise data.max_length")
    if stats.n_dropped:
        log.warning("%s: %d of %d %s dropped (a response truncated to nothing, or chosen = rejected after "
                    "truncation); raise data.max_length or lower data.max_prompt_length", source, stats.n_dropped,
                    stats.n_examples, kind)
    return items, stats.as_dict()


def check_inputs(cfg: DictConfig) -> None:
    """Input files and models exist, before any model loads (`synthetic:` sources pass through; a hub id must be
    cached or reachable)."""
    for key in ("data.train", "data.eval", "eval.generate.prompts"):
        source = OmegaConf.select(cfg, key)
        if source and missing_file(source):
            raise TrainingError(f"{key}={source}: no such file or folder")
    from entangle.evaluation import check_scorer_source
    from entangle.models import check_source

    check_source(cfg.model.name, "model.name")
    if cfg.eval.generate.every:
        check_scorer_source(cfg.eval.generate.scorer, "eval.generate.scorer")


# Keys a resumed run may change without breaking exact resume: where and how long it runs, what it logs.
RESUME_FREE = ("train.output_dir", "train.overwrite", "train.resume", "train.resume_allow_changes", "train.max_steps",
               "train.epochs", "train.save_every", "train.keep_checkpoints", "train.log_every", "train.eval_every",
               "train.eval_at_start", "train.eval_batch_size", "train.device", "tracking", "data.eval",
               "data.eval_split", "data.max_eval_examples", "eval", "diagnostics")


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def check_resume_config(cfg: DictConfig, run_dir: str, checkpoint: str, is_main: bool) -> None:
    """Refuse a resume whose config computes something else than the run's saved one (batch size, loss, ...),
    unless `train.resume_allow_changes`; then the changes are recorded in `resumes.jsonl`."""
    from entangle.config import load_saved

    if not is_run(run_dir):
        raise TrainingError(f"{run_dir} is not an entangle run (no config.yaml); resume a run directory")
    saved = _flat(OmegaConf.to_container(load_saved(run_dir), resolve=True))
    now = _flat(OmegaConf.to_container(cfg, resolve=True))
    changed = {k: [saved.get(k), now.get(k)] for k in sorted(set(saved) | set(now))
               if saved.get(k) != now.get(k) and not k.startswith(RESUME_FREE)}
    if not changed:
        return
    listing = ", ".join(f"{k}: {a} -> {b}" for k, (a, b) in changed.items())
    if not cfg.train.resume_allow_changes:
        raise TrainingError(f"resuming {checkpoint} with a different config ({listing}) would not continue the same "
                            "run; undo the change, or set train.resume_allow_changes=true to continue anyway")
    if is_main:
        log.warning("resuming with changed settings: %s (recorded in resumes.jsonl)", listing)
        import json

        with open(os.path.join(run_dir, "resumes.jsonl"), "a") as f:
            f.write(json.dumps({"checkpoint": checkpoint, "changed": changed}) + "\n")


def precision(dtype: str, cuda: bool) -> tuple[str, str]:
    """`(weights dtype, Accelerate mixed_precision)` of a training run. `auto` on CUDA is mixed precision as HF
    Trainer and TRL run it: float32 master weights, bf16 autocast (pure bf16 loses small updates: at lr 1e-6 most
    weights never change); `auto` on CPU is float32; `bf16-mixed` is mixed precision on any device. Any other
    dtype is pure."""
    from entangle.models import precision as rule

    autocast = rule(dtype, "cuda" if cuda else "cpu")[1]     # bf16 for auto on CUDA and for bf16-mixed
    return ("float32", "bf16") if autocast is not None else (dtype if dtype != "auto" else "float32", "no")


def make_accelerator(cfg: DictConfig):
    from accelerate import Accelerator

    cpu = cfg.train.device == "cpu" or (cfg.train.device == "auto" and not torch.cuda.is_available())
    if cfg.train.device == "cuda" and not torch.cuda.is_available():
        raise TrainingError("train.device=cuda but no CUDA device is visible; use train.device=auto")
    trackers = list(cfg.tracking.report_to)
    for t in trackers:
        if importlib.util.find_spec(t) is None and not (t == "tensorboard" and importlib.util.find_spec("tensorboardX")):
            raise TrainingError(f"tracking.report_to={t} needs the {t} package: pip install {t}")
    settings = dict(cpu=cpu, log_with=trackers or None, project_dir=cfg.train.output_dir,
                    mixed_precision=precision(cfg.model.dtype, not cpu)[1])
    try:
        acc = Accelerator(**settings)
    except ValueError as e:   # an earlier run in this process set another precision (Accelerate keeps one state)
        from accelerate.state import AcceleratorState, PartialState

        if PartialState().num_processes > 1:
            raise TrainingError(f"model.dtype={cfg.model.dtype} asks for mixed precision "
                                f"{settings['mixed_precision']}, but this launch set another: {e}") from None
        AcceleratorState._reset_state()
        acc = Accelerator(**settings)
    if is_deepspeed(acc):
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


def make_references(cfg: DictConfig, model, train_pairs, eval_pairs, pad_id: int, acc):
    """(reference, eval reference, initial policy on train pairs, initial policy on eval pairs)."""
    kind, bs, main, barrier = reference_type(cfg), cfg.train.eval_batch_size, acc.is_main_process, acc.wait_for_everyone
    if kind == "precomputed":
        ref = precompute_reference(model, train_pairs, pad_id, bs, main, barrier)
        eval_ref = precompute_reference(model, eval_pairs, pad_id, bs, main, barrier) if eval_pairs else None
    else:
        alpha, tau = trust_region(cfg) if kind == "trust_region" else (0.0, 1)
        ref = eval_ref = make_reference(kind, model, alpha, tau)
    initial = eval_initial = None
    if cfg.reference.kl_to_init:
        initial = ref.initial_policy(model, train_pairs, pad_id, bs, main, barrier)
        if eval_pairs:
            eval_initial = eval_ref.initial_policy(model, eval_pairs, pad_id, bs, main, barrier, without_reference=True)
    return ref, eval_ref, initial, eval_initial


def make_optimizer(cfg: DictConfig, model, token_mask, total_steps: int, sharded: bool = False):
    """AdamW or SGD over the trainable parameters (the token mask: its own learning rate, no decay) + schedule.
    AdamW runs PyTorch's fused kernel where it can (unsharded parameters: on this CPU a SmolLM2 step's update
    takes 0.07 s instead of 0.40 s); the same update, summed in another order."""
    from transformers import get_scheduler

    params = [{"params": [p for p in model.parameters() if p.requires_grad]}]
    if token_mask is not None:
        params.append({"params": list(token_mask.parameters()), "lr": cfg.loss.mask_lr, "weight_decay": 0.0})
    oc = cfg.optimizer
    if oc.name == "sgd":
        optimizer = torch.optim.SGD(params, lr=oc.lr, momentum=oc.momentum, weight_decay=oc.weight_decay)
    else:
        settings = dict(lr=oc.lr, betas=tuple(oc.betas), weight_decay=oc.weight_decay, eps=oc.eps)
        try:
            optimizer = torch.optim.AdamW(params, **settings, fused=None if sharded else True)
        except (RuntimeError, ValueError):   # a device or dtype the fused kernel does not take
            optimizer = torch.optim.AdamW(params, **settings)
    warmup = cfg.schedule.warmup_steps or int(cfg.schedule.warmup_ratio * total_steps)
    name = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}[cfg.schedule.decay]
    return optimizer, get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)


def make_hooks(cfg: DictConfig, lm, token_mask, sharded: str | None) -> list:
    """The hooks the config asks for: entanglement probe, pairwise-normalised update, token-mask views."""
    ec, hooks = cfg.diagnostics.entanglement, []
    if sharded and (ec.every or cfg.optimizer.pairwise_normalized):
        raise TrainingError(f"diagnostics.entanglement.every and optimizer.pairwise_normalized read whole per-row "
                            f"gradients, which {sharded} shards; run them with DDP or one process")
    # They see the language model's parameters (not the mask head's).
    if ec.every:
        hooks.append(EntanglementProbe(lm, ec.every, ec.realised, ec.method, ec.step_changes, ec.batch_mean,
                                       ec.positions, ec.tokens))
    if cfg.optimizer.pairwise_normalized:
        hooks.append(PairwiseNormalizer(lm))
    if token_mask is not None:
        hooks.append(TokenMaskViews(max(ec.tokens, 8)))
    return hooks


def make_generation_eval(cfg: DictConfig, model, tokenizer, total_steps: int, acc,
                         reference: Reference | None = None) -> LoopCallback:
    """`eval.generate`: the hook that samples at evaluation steps; the initial policy is the LoRA base with
    adapters off, the frozen `reference`'s own copy, or else a frozen copy made before the first step (one more
    model in memory)."""
    from entangle.evaluation import GenerationEval, get_scorer
    from entangle.generation import load_prompts

    g = cfg.eval.generate
    if is_sharded(acc):
        raise TrainingError(f"eval.generate samples from the whole model, which {engine_kind(acc)} shards; "
                            "run it with DDP or one process, or evaluate final/ with entangle eval")
    prompts = load_prompts(g.prompts or cfg.data.eval, cfg.data.eval_split, g.n_prompts, dict(cfg.data.columns))
    if is_peft(model):
        initial, context = model, model.disable_adapter
    elif isinstance(reference, FrozenReference):   # the initial policy already: no second copy
        initial, context = reference.model, reference.context
    else:
        initial, context = copy.deepcopy(model).eval().requires_grad_(False), contextlib.nullcontext
    settings = {"n": g.n, "max_new_tokens": g.max_new_tokens, "temperature": g.temperature, "top_p": g.top_p,
                "seed": g.seed, "batch_size": g.batch_size, "max_prompt_length": cfg.data.max_length}
    return GenerationEval(initial, context, tokenizer, prompts, get_scorer(g.scorer, str(acc.device)), settings,
                          g.every, total_steps)


def build(cfg: DictConfig, hooks: Sequence = (), train_data=None, eval_data=None) -> Run:
    """Assemble the run `cfg` describes (its directory checked first); `hooks` join the configured ones.
    `train_data` / `eval_data`: in-memory records (a `datasets.Dataset`, a list of dicts) instead of
    `data.train` / `data.eval`."""
    validate(cfg)   # again: a config edited in Python after loading is checked like a loaded one
    tc = cfg.train
    acc = make_accelerator(cfg)
    check_inputs(cfg)
    check_output_dir(tc.output_dir)
    resume_from = resolve_resume(tc.output_dir, tc.resume) if tc.resume else None
    if tc.resume and resume_from is None and acc.is_main_process:
        log.info("train.resume=%s: no checkpoint in %s yet; starting fresh", tc.resume, tc.output_dir)
    if resume_from is not None:
        check_resume_config(cfg, tc.output_dir, resume_from, acc.is_main_process)
    lock = prepare_run_dir(tc.output_dir, tc.overwrite, bool(tc.resume), resume_from is not None, acc.is_main_process)
    try:
        run = _assemble(cfg, acc, resume_from, hooks, train_data, eval_data)
    except BaseException:
        if lock is not None:   # a failed build frees the folder at once (a caller may retry in this process)
            lock.release()
        raise
    run.lock = lock
    return run


def check_training_memory(model, tc: DictConfig, max_length: int, acc, recorder: bool = False) -> None:
    """The estimated peak of a training step (gradients and Adam's two moments of the trainable weights, the
    activations of one micro-batch, and with a gradient `recorder` what it keeps) against `train.memory_gib`
    (default: 90 % of what is free with the model loaded): a one-line error before the first step, else a log line."""
    from entangle import memory

    need = 3 * memory.trainable(model) + memory.forward(model, 2 * tc.batch_size, max_length,
                                                        grad=not tc.activation_checkpointing or recorder)
    if recorder:   # diagnostic steps run without activation checkpointing and keep every module's gradient
        need += memory.recorded(model, 2 * tc.batch_size, max_length)
    what = f"training (batch {tc.batch_size} pairs of up to {max_length} tokens)"
    memory.check(need, memory.work_budget(model, str(acc.device), tc.memory_gib, "train.memory_gib"), what,
                 "lower train.batch_size or data.max_length, set train.activation_checkpointing=true, "
                 "or raise train.memory_gib")


def _assemble(cfg: DictConfig, acc, resume_from: str | None, hooks: Sequence, train_data, eval_data) -> Run:
    """The model, data, loss, references, optimiser and hooks of a run whose directory is ready."""
    from accelerate.utils import set_seed

    tc, mc = cfg.train, cfg.model
    acc.wait_for_everyone()
    set_seed(tc.seed)
    lora = LoraConfig(**OmegaConf.to_container(mc.lora))
    dtype = precision(mc.dtype, acc.device.type == "cuda")[0]
    model, tokenizer = load_model(mc.name, dtype, str(acc.device), lora, mc.trust_remote_code, seed=tc.seed)
    check_fits_context(model, cfg.data.max_length, "data.max_length")
    check_training_memory(model, tc, cfg.data.max_length, acc,
                          recorder=bool(cfg.diagnostics.entanglement.every or cfg.optimizer.pairwise_normalized))
    loss_fn = losses.get(cfg.loss.name, **OmegaConf.to_container(cfg.loss.params))
    unpaired, unit = not loss_fn.paired, objective(loss_fn).unit
    train_pairs, train_stats = load_pairs(cfg.data.train if train_data is None else train_data, tokenizer, cfg.data,
                                          cfg.data.split, cfg.data.max_train_examples, unpaired, tc.seed)
    eval_pairs, eval_stats = [], None
    if cfg.data.eval or eval_data is not None:
        eval_pairs, eval_stats = load_pairs(cfg.data.eval if eval_data is None else eval_data, tokenizer, cfg.data,
                                            cfg.data.eval_split, cfg.data.max_eval_examples, unpaired, tc.seed + 1)
    if unpaired:
        train_stats["desirable"], train_stats["undesirable"] = check_labels(
            train_pairs, "data.train" if train_data is None else "train_data", loss_fn.params["desirable_weight"],
            loss_fn.params["undesirable_weight"])
    with acc.autocast():   # mixed precision: every reference in the arithmetic the policy trains in
        refs = make_references(cfg, model, train_pairs, eval_pairs, tokenizer.pad_token_id, acc)
    global_batch = tc.batch_size * tc.grad_accum * acc.num_processes
    steps_per_epoch = len(train_pairs) // global_batch
    if steps_per_epoch == 0:
        raise TrainingError(f"{len(train_pairs)} training {unit} cannot fill one step "
                            f"of {global_batch} (batch_size x grad_accum x processes); lower train.batch_size")
    total_steps = tc.max_steps or max(1, math.ceil(tc.epochs * steps_per_epoch))
    if cfg.eval.generate.every:
        hooks = [make_generation_eval(cfg, model, tokenizer, total_steps, acc, refs[0]), *hooks]
    token_mask = make_token_mask(model, cfg.loss, acc.device)
    optimizer, scheduler = make_optimizer(cfg, model, token_mask, total_steps, is_sharded(acc))
    policy, optimizer = acc.prepare(Policy(model, token_mask), optimizer)
    sharded = engine_kind(acc) if is_sharded(acc) else None
    if sharded:  # a LoRA reference is the policy itself: it runs the way the prepared policy runs
        for ref in refs:
            if ref is not None:
                ref.attach(policy)
    all_hooks = make_hooks(cfg, hf_model(acc, policy), token_mask, sharded) + list(hooks)
    trainable, total = count_parameters(hf_model(acc, policy))
    info = {"version": __version__, "git_sha": git_sha(), "processes": acc.num_processes,
            "global_batch_pairs": global_batch, "total_steps": total_steps, "steps_per_epoch": steps_per_epoch,
            "trainable_parameters": trainable, "total_parameters": total, "reference": refs[0].kind,
            "data": {"train": train_stats, "eval": eval_stats}}
    return Run(cfg, acc, policy, tokenizer, train_pairs, eval_pairs, loss_fn, *refs, optimizer, scheduler, all_hooks,
               global_batch, steps_per_epoch, total_steps, resume_from, info)
