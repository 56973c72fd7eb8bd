"""The typed config tree: every default lives here; YAML files and `key=value` overrides only override.

    cfg = config.load("configs/tiny-dpo.yaml", ["train.max_steps=20", "loss.params.beta=0.2"])

Unknown keys and wrong types raise ConfigError naming the key and the valid choices. Loading has
no side effects. The field comments document each key; `entangle config` prints the resolved tree.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, Dict, List, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from entangle import losses
from entangle.errors import ConfigError


@dataclass
class LoraConfig:
    r: int = 0                      # LoRA rank; 0 trains all parameters
    alpha: float = 16.0             # LoRA scaling numerator (scaling = alpha / r)
    dropout: float = 0.0            # LoRA dropout on the adapters' input
    target_modules: List[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])  # LoRA


@dataclass
class ModelConfig:
    name: str = "tiny"              # tiny | tiny-gpt2 | smollm2-135m | a local folder | a hub id
    dtype: str = "auto"             # auto: float32 weights, with bf16 autocast on CUDA (training and every
                                    # other command); bf16-mixed: the same autocast on any device (fast on
                                    # CPUs with AMX); float32 / bfloat16 / float16: pure (no float32 master weights)
    trust_remote_code: bool = False   # run a hub model's own code; only from your command line or config,
                                      # never from a run folder's saved config
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class DataConfig:
    train: str = "synthetic:sentiment"   # .jsonl/.json/.parquet file, datasets folder, hub id, or synthetic:NAME
    eval: Optional[str] = None           # same forms; evaluated every train.eval_every steps
    split: str = "train"                 # split for folders and hub ids
    eval_split: str = "test"             # split of data.eval for folders and hub ids
    columns: Dict[str, str] = field(default_factory=dict)   # e.g. {prompt: question, chosen: good}
    max_length: Optional[int] = 512      # prompt + longest response, in tokens
    max_prompt_length: Optional[int] = None   # prompts keep at most their last N tokens (null: only a pair that
                                              # does not fit max_length keeps its last max_length // 2, as TRL)
    max_train_examples: Optional[int] = None   # the first N training records (null: all)
    max_eval_examples: Optional[int] = None    # the first N held-out records (null: all)
    skip_bad: bool = False               # count and skip malformed records instead of stopping


@dataclass
class LossConfig:
    name: str = "dpo"                    # any name of `entangle losses`
    params: Dict[str, Any] = field(default_factory=dict)    # hyper-parameters; unset ones keep published defaults
    # none | sparse: learned token weights m_t in [0, 1] inside the margin, sum_t m_t (log pi_t - log pi_ref,t),
    # from a linear head on the policy's (detached) hidden states, with an L1 penalty (SparsePO-style)
    token_mask: str = "none"
    mask_l1: float = 0.01          # sparse: weight of the L1 penalty on the pair's mean token weight
    mask_lr: float = 1e-2          # sparse: learning rate of the mask head (same schedule as the policy)
    mask_init: float = 0.9         # sparse: every token weight's value at step 0


@dataclass
class ReferenceConfig:
    # auto (frozen if the loss uses one, else none) | frozen | precomputed | none
    # | trust_region (needs alpha, tau) | soft (alpha 0.6, tau 1) | hard (alpha 1, tau 512)
    type: str = "auto"
    alpha: Optional[float] = None  # trust region: weight of the policy in each blend
    tau: Optional[int] = None      # trust region: optimiser steps between blends
    kl_to_init: bool = True        # log ref/kl_to_init (full-parameter trust region: one extra pass over the data)


@dataclass
class OptimizerConfig:
    name: str = "adamw"          # adamw | sgd
    lr: float = 1e-6
    momentum: float = 0.0        # sgd only
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.0
    eps: float = 1e-8
    pairwise_normalized: bool = False   # step along sum_i d_w grad_w/|grad_w| - d_l grad_l/|grad_l| (GE sec. 5)


@dataclass
class ScheduleConfig:
    decay: str = "linear"        # linear | cosine | constant (after warm-up)
    warmup_steps: int = 0
    warmup_ratio: float = 0.0    # used when warmup_steps is 0


@dataclass
class TrainConfig:
    output_dir: str = "runs/entangle"   # the run directory (locked while a process writes it)
    batch_size: int = 4          # pairs per micro-batch per process
    grad_accum: int = 1          # micro-batches per optimiser step
    max_grad_norm: Optional[float] = 1.0   # null disables clipping (the norm is still logged)
    max_steps: Optional[int] = None        # optimiser steps; overrides epochs
    epochs: float = 1.0          # passes over the training data when max_steps is null
    seed: int = 0                # model init (tiny), data order, dropout
    log_every: int = 1           # optimiser steps between metrics.jsonl rows
    eval_every: int = 0          # 0: only at the end (when data.eval is set)
    eval_at_start: bool = True   # also evaluate before the first step (logged as step 0): where training began
    eval_batch_size: int = 8     # held-out pairs per forward
    save_every: int = 0          # 0: only the final model (and on interruption)
    keep_checkpoints: int = 0    # 0 keeps all
    overwrite: bool = False      # replace the entangle run in output_dir (only the files entangle wrote)
    resume: Optional[str] = None # latest | a checkpoint folder
    resume_allow_changes: bool = False   # resume although the config changed (recorded in resumes.jsonl)
    max_nonfinite: int = 3       # consecutive non-finite steps before the run stops
    activation_checkpointing: bool = False  # recompute each layer in the backward: less memory, slower
                                            # (off on steps that measure entanglement)
    prefix_sharing: bool = True  # each pair as one row [prompt, chosen, rejected] where the model allows it
                                 # (token masks and unknown architectures use two rows)
    device: str = "auto"         # auto | cpu | cuda
    memory_gib: Optional[float] = None   # memory budget; null: 90 % of what is free at start. A run whose
                                         # estimated peak exceeds it stops in one line before the first step


@dataclass
class TrackingConfig:
    report_to: List[str] = field(default_factory=list)   # tensorboard | wandb | mlflow (all off by default)
    project: str = "entangle"    # the trackers' project name
    progress: bool = True        # progress bar on the terminal


@dataclass
class EntanglementConfig:
    every: int = 0               # measure every N optimiser steps; 0 = off
    realised: bool = False       # also re-evaluate the batch after the step (one more forward)
    method: str = "fast"         # fast (from the training backward; exact) | exact (one backward per row)
    tokens: int = 0              # on diagnostic steps, exact per-token views of this many pairs (one backward per token)
    step_changes: bool = True    # first-order changes along the optimiser's actual update (step_dlogp_*, step_case*)
    batch_mean: bool = True      # inner/norms/cos of the batch-mean chosen and rejected gradients (batch_*)
    positions: bool = False      # per-position split of each pair's inner product (entanglement_positions/step-N.json)


@dataclass
class DiagnosticsConfig:
    entanglement: EntanglementConfig = field(default_factory=EntanglementConfig)


@dataclass
class GenerateEvalConfig:
    every: int = 0               # sample from held-out prompts every N optimiser steps (and at the end; at step 0
                                 # with train.eval_at_start); 0 = off. Logs eval/gold/mean, eval/kl/initial, ...
    prompts: Optional[str] = None   # prompt source (any data source, synthetic:NAME too); default: data.eval
    n_prompts: int = 16          # the first N prompts
    n: int = 1                   # samples per prompt
    max_new_tokens: int = 48
    temperature: float = 1.0     # 0: greedy
    top_p: float = 1.0
    scorer: str = "vader"        # vader | rm:PATH | python:module:function | judge:PATH
    batch_size: int = 16
    seed: int = 0


@dataclass
class EvalConfig:
    generate: GenerateEvalConfig = field(default_factory=GenerateEvalConfig)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    diagnostics: DiagnosticsConfig = field(default_factory=DiagnosticsConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


CHOICES = {
    "optimizer.name": ("adamw", "sgd"),
    "loss.token_mask": ("none", "sparse"),
    "reference.type": ("auto", "frozen", "precomputed", "none", "trust_region", "soft", "hard"),
    "schedule.decay": ("linear", "cosine", "constant"),
    "train.device": ("auto", "cpu", "cuda"),
    "diagnostics.entanglement.method": ("fast", "exact"),
    "model.dtype": ("auto", "bf16-mixed", "float32", "bfloat16", "float16", "float64", "fp32", "bf16", "fp16"),
}
TRACKERS = ("tensorboard", "wandb", "mlflow")
_R = losses.Range
_POS, _NONNEG, _COUNT, _ATLEAST1 = _R(0.0), _R(0.0, low_closed=True), _R(0.0, low_closed=True), _R(1.0, low_closed=True)
# Every numeric key's valid values (null stays allowed where the field is optional). A value outside
# would silently change what training does: a negative clip norm ascends, -1 for "every" means every step.
RANGES = {
    "model.lora.r": _COUNT, "model.lora.alpha": _POS, "model.lora.dropout": _R(0.0, 1.0, low_closed=True),
    "data.max_length": _R(2.0, low_closed=True), "data.max_prompt_length": _ATLEAST1,
    "data.max_train_examples": _ATLEAST1, "data.max_eval_examples": _ATLEAST1,
    "loss.mask_l1": _NONNEG, "loss.mask_lr": _POS, "loss.mask_init": _R(0.0, 1.0),
    "reference.alpha": _R(0.0, 1.0, True, True), "reference.tau": _ATLEAST1,
    "optimizer.lr": _POS, "optimizer.momentum": _R(0.0, 1.0, True, True), "optimizer.betas": _R(0.0, 1.0, True),
    "optimizer.weight_decay": _NONNEG, "optimizer.eps": _POS,
    "schedule.warmup_steps": _COUNT, "schedule.warmup_ratio": _R(0.0, 1.0, True, True),
    "train.batch_size": _ATLEAST1, "train.grad_accum": _ATLEAST1, "train.max_grad_norm": _POS,
    "train.max_steps": _ATLEAST1, "train.epochs": _POS, "train.seed": _R(0.0, 2.0 ** 32, low_closed=True),
    "train.log_every": _ATLEAST1, "train.eval_every": _COUNT, "train.eval_batch_size": _ATLEAST1,
    "train.save_every": _COUNT, "train.keep_checkpoints": _COUNT, "train.max_nonfinite": _ATLEAST1,
    "train.memory_gib": _POS,
    "diagnostics.entanglement.every": _COUNT, "diagnostics.entanglement.tokens": _COUNT,
    "eval.generate.every": _COUNT, "eval.generate.n_prompts": _ATLEAST1, "eval.generate.n": _ATLEAST1,
    "eval.generate.max_new_tokens": _ATLEAST1, "eval.generate.temperature": _NONNEG,
    "eval.generate.top_p": _R(0.0, 1.0, high_closed=True), "eval.generate.batch_size": _ATLEAST1,
    "eval.generate.seed": _R(0.0, 2.0 ** 32, low_closed=True),
}


def _check_ranges(cfg: DictConfig) -> None:
    for key, r in RANGES.items():
        value = OmegaConf.select(cfg, key)
        for v in (value if isinstance(value, (list, tuple)) or OmegaConf.is_list(value) else [value]):
            if v is not None and float(v) not in r:
                null = " or null" if _optional(key) else ""
                raise ConfigError(f"config key {key!r} must be {r}{null} (got {value})")


def _optional(key: str) -> bool:
    """Whether the dataclass field behind `key` is declared Optional (null allowed)."""
    section, _, name = key.rpartition(".")
    node = Config()
    for part in section.split("."):
        node = getattr(node, part)
    return "Optional" in str(next(f.type for f in fields(node) if f.name == name))


def all_keys(cls=Config, prefix: str = "") -> list[str]:
    out = []
    for f in fields(cls):
        key = f"{prefix}{f.name}"
        default = f.default_factory() if callable(f.default_factory) else f.default
        out += all_keys(type(default), key + ".") if is_dataclass(default) else [key]
    return out


def _explain(e: OmegaConfBaseException, source: str) -> ConfigError:
    key = getattr(e, "full_key", None) or ""
    msg = str(e).splitlines()[0]
    if "not in" in msg or "Key" in type(e).__name__ or "not found" in msg:
        valid = all_keys()
        close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
        parent = key.rsplit(".", 1)[0] + "." if "." in key else ""
        depth = key.count(".")   # the names at the unknown key's level: sections at the top, keys below
        siblings = sorted({".".join(k.split(".")[: depth + 1]) for k in valid if k.startswith(parent)})
        hint = f"did you mean {close[0]!r}? " if close else ""
        return ConfigError(f"{source}: unknown config key {key!r}; {hint}valid: {', '.join(siblings)}")
    return ConfigError(f"{source}: config key {key!r}: {msg}")


def load(path: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """Defaults <- YAML file <- dotted overrides, validated. Returns a DictConfig typed as Config."""
    cfg = OmegaConf.structured(Config)
    if path is not None:
        try:
            data = OmegaConf.load(path)
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such config file") from None
        except Exception as e:
            raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(data, DictConfig):
            raise ConfigError(f"{path}: the config must be a mapping of sections (model, data, loss, ...)")
        unresolved = _unresolved_paths(data, path)
        cfg = _merge(cfg, _relative_to(data, path), path)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value (e.g. train.max_steps=10)")
        cfg = _merge(cfg, OmegaConf.from_dotlist([item]), f"override {item!r}")
    for key in (*INPUT_PATHS, "train.output_dir"):   # `~/x` is the user's home, never a folder named `~`
        value = OmegaConf.select(cfg, key, default=None)
        if isinstance(value, str) and value.startswith("~"):
            OmegaConf.update(cfg, key, os.path.expanduser(value))
    given = {item.split("=", 1)[0].strip() for item in overrides}
    if "data.train" in given and "data.eval" not in given and cfg.data.eval is not None:
        # the file's held-out set belongs to the file's training data, not to the user's own
        cfg.data.eval = None
    for key, value in (unresolved.items() if path is not None else ()):
        if key not in given and OmegaConf.select(cfg, key) == value:   # data that lives elsewhere on this machine
            raise ConfigError(f"{path}: {key}={value} is not there relative to this file; give your own on the "
                              f"command line ({key}=PATH) or edit the file")
    validate(cfg)
    return cfg


INPUT_PATHS = ("model.name", "data.train", "data.eval", "eval.generate.prompts")


def _unresolved_paths(data: DictConfig, path: str) -> dict[str, str]:
    """Input paths of a YAML file written as relative (`./`, `../`) that exist neither beside the file nor from
    the working folder."""
    import os

    here = os.path.dirname(os.path.abspath(path))
    out = {}
    for key in INPUT_PATHS:
        value = OmegaConf.select(data, key, default=None)
        if isinstance(value, str) and value.startswith(".") and \
                not os.path.exists(os.path.join(here, value)) and not os.path.exists(value):   # ./ or ../: no hub id
            out[key] = value
    return out


def _relative_to(data: DictConfig, path: str) -> DictConfig:
    """Input paths written in a YAML file are relative to that file, so a config works from any folder: a
    relative path that exists beside the file becomes absolute (hub ids and `synthetic:` stay as they are)."""
    import os

    here = os.path.dirname(os.path.abspath(path))
    for key in INPUT_PATHS:
        value = OmegaConf.select(data, key, default=None)
        if isinstance(value, str) and value and not os.path.isabs(value) and ":" not in value:
            candidate = os.path.normpath(os.path.join(here, value))
            if os.path.exists(candidate):
                OmegaConf.update(data, key, candidate)
    return data


def _merge(cfg: DictConfig, other: DictConfig, source: str) -> DictConfig:
    try:
        return OmegaConf.merge(cfg, other)
    except OmegaConfBaseException as e:
        raise _explain(e, source) from None


def _validate_unpaired(cfg: DictConfig, name: str) -> None:
    """What needs a pair (a chosen and a rejected response of one prompt in the same batch) cannot run with an
    unpaired loss; the README's KTO section says why the entanglement diagnostics are refused."""
    paired_only = {"diagnostics.entanglement.every": bool(cfg.diagnostics.entanglement.every),
                   "optimizer.pairwise_normalized": cfg.optimizer.pairwise_normalized,
                   "loss.token_mask": cfg.loss.token_mask != "none"}
    for key, on in paired_only.items():
        if on:
            raise ConfigError(f"config key {key!r} needs preference pairs in one batch, and loss {name!r} trains "
                              "unpaired examples; turn it off (see the README's KTO section)")


def validate(cfg: DictConfig) -> None:
    """Checks that need more than types: choices, ranges, loss hyper-parameters."""
    for key, choices in CHOICES.items():
        value = OmegaConf.select(cfg, key)
        if value not in choices:
            raise ConfigError(f"config key {key!r} is {value!r}; valid: {', '.join(choices)}")
    for t in cfg.tracking.report_to:
        if t not in TRACKERS:
            raise ConfigError(f"config key 'tracking.report_to' has {t!r}; valid: {', '.join(TRACKERS)}")
    _check_ranges(cfg)
    for key in INPUT_PATHS:
        value = OmegaConf.select(cfg, key)
        if isinstance(value, str) and "\n" in value:   # str() of an object assigned in Python (a Dataset, a model)
            raise ConfigError(f"config key {key!r} holds the text of a Python object ({value.splitlines()[0][:40]}...); "
                              "give a path or name, or pass in-memory data as entangle.build(cfg, train_data=..., "
                              "eval_data=...)")
    if len(cfg.optimizer.betas) != 2:
        raise ConfigError("config key 'optimizer.betas' must be a pair like [0.9, 0.999]")
    try:
        fn = losses.get(cfg.loss.name, **OmegaConf.to_container(cfg.loss.params))
    except ConfigError as e:
        raise ConfigError(f"config key 'loss': {e}") from None
    if not fn.paired:
        _validate_unpaired(cfg, fn.name)
    if cfg.reference.type not in ("auto", "none") and not fn.uses_reference:
        raise ConfigError(f"loss {fn.name!r} uses no reference model; set reference.type=none (or auto)")
    if cfg.reference.type == "none" and fn.uses_reference:
        raise ConfigError(f"loss {fn.name!r} needs a reference; set reference.type=frozen or precomputed (or auto)")
    if cfg.loss.token_mask == "sparse":
        if cfg.reference.type == "precomputed":
            raise ConfigError("loss.token_mask=sparse weights each token's reference log-prob, but "
                              "reference.type=precomputed keeps sequence sums; use reference.type=frozen (or auto)")
    _validate_generation(cfg.eval.generate, cfg.data.eval)
    if cfg.reference.type in TR_PRESETS:
        alpha, tau = trust_region(cfg)
        if alpha is None or tau is None:
            raise ConfigError("reference.type=trust_region needs reference.alpha and reference.tau "
                              "(or use the presets soft / hard)")
        check_trust_region(alpha, tau)
    elif cfg.reference.alpha is not None or cfg.reference.tau is not None:
        raise ConfigError("reference.alpha and reference.tau apply only to reference.type=trust_region, "
                          "soft or hard; a precomputed or frozen reference never moves")


SCORERS = "vader | rm:PATH | python:module:function | judge:PATH"


def check_scorer_spec(spec: str) -> None:
    """Syntax of a scorer string (evaluation.get_scorer), checked before anything loads."""
    kind, _, rest = spec.partition(":")
    ok = spec == "vader" or (kind in ("rm", "judge") and rest) or (kind == "python" and rest.count(":") == 1
                                                                      and all(rest.split(":")))
    if not ok:
        raise ConfigError(f"unknown scorer {spec!r}; valid: {SCORERS}")


def _validate_generation(g, eval_data) -> None:
    if g.every and not (g.prompts or eval_data):
        raise ConfigError("eval.generate.every needs prompts: set eval.generate.prompts or data.eval")
    try:
        check_scorer_spec(g.scorer)
    except ConfigError as e:
        raise ConfigError(f"config key 'eval.generate.scorer': {e}") from None


TR_PRESETS = {"trust_region": (None, None), "soft": (0.6, 1), "hard": (1.0, 512)}


def check_trust_region(alpha, tau, where: str = "reference.") -> None:
    """The one check of a moving reference's settings (config, `TrustRegionReference`, TRL's callback): alpha in
    `RANGES["reference.alpha"]`, tau a whole number in `RANGES["reference.tau"]`."""
    import math

    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or \
            alpha not in RANGES["reference.alpha"]:
        raise ConfigError(f"{where}alpha must be {RANGES['reference.alpha']} (got {alpha!r})")
    if isinstance(tau, bool) or not isinstance(tau, int) or tau not in RANGES["reference.tau"]:
        raise ConfigError(f"{where}tau must be a whole number {RANGES['reference.tau']} (got {tau!r})")


def trust_region(cfg: DictConfig) -> tuple[float | None, int | None]:
    """(alpha, tau) of a moving reference: the preset's numbers unless overridden."""
    alpha, tau = TR_PRESETS[cfg.reference.type]
    r = cfg.reference
    return (r.alpha if r.alpha is not None else alpha), (r.tau if r.tau is not None else tau)


def reference_type(cfg: DictConfig) -> str:
    """The one place that reads a loss's `uses_reference`: auto -> frozen or none."""
    if cfg.reference.type in TR_PRESETS:
        return "trust_region"
    if cfg.reference.type != "auto":
        return cfg.reference.type
    fn = losses.get(cfg.loss.name, **OmegaConf.to_container(cfg.loss.params))
    return "frozen" if fn.uses_reference else "none"


def load_saved(run_dir: str) -> DictConfig:
    """The config a run saved (`RUN/config.yaml`) over today's defaults: keys added since that run keep
    their defaults, which compute what the run computed. Lenient: its `_run` provenance is dropped."""
    import os

    import logging

    saved = OmegaConf.to_container(OmegaConf.load(os.path.join(run_dir, "config.yaml")))
    saved.pop("_run", None)
    base = OmegaConf.structured(Config)
    removed = _drop_unknown(base, saved, "")
    if removed:
        logging.getLogger(__name__).warning("%s: ignoring key(s) this version no longer has: %s", run_dir,
                                            ", ".join(removed))
    return OmegaConf.merge(base, saved)


def _drop_unknown(node: DictConfig, saved: dict, prefix: str) -> list[str]:
    """Remove (in place) the keys of `saved` that the structured `node` does not have; free-form dict fields
    (data.columns, loss.params) keep every key. Returns the dotted names removed."""
    removed = []
    for key in list(saved):
        if key not in node:
            removed.append(prefix + str(key))
            del saved[key]
            continue
        child = node[key]
        if isinstance(child, DictConfig) and isinstance(saved[key], dict) and OmegaConf.get_type(child) is not dict:
            removed += _drop_unknown(child, saved[key], f"{prefix}{key}.")
    return removed


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg)
