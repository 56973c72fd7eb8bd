"""entangle inside TRL's `DPOTrainer`: entanglement diagnostics and an exact trust-region reference as callbacks.

    from entangle.integrations.trl import EntanglementCallback, TrustRegionCallback
    trainer = DPOTrainer(model=..., args=DPOConfig(...), train_dataset=...,
                         callbacks=[EntanglementCallback(every=1), TrustRegionCallback(alpha=0.6, tau=1)])

`EntanglementCallback` measures, on every `every`-th optimiser step, entangle's per-pair statistics of the
pairs of that step from the trainer's own forward and backward: on those steps the policy's forward computes
the response log-probs through entangle's response-only LM head (the same numbers TRL's fused head gives, to
float rounding) while entangle's gradient recorder listens on the policy's modules. The means go into TRL's
own logs (`entanglement/*`, so every `report_to` sees them); `entanglement.jsonl` and `metrics.jsonl` go to
the output directory, so `entangle report OUTPUT_DIR` draws a TRL run.

`TrustRegionCallback` makes the reference move (TR-DPO): soft `θ_ref ← αθ + (1−α)θ_ref` every `tau` steps, with
entangle's `TrustRegionReference` (float32 blends; for LoRA, base + the reference's own dense adapter delta,
exactly), and feeds its log-probs to the trainer as precomputed reference log-probs.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass

import torch
from transformers import TrainerCallback

from entangle import losses
from entangle.batching import Batch
from entangle.diagnostics.probe import EntanglementProbe
from entangle.config import check_trust_region
from entangle.errors import ConfigError
from entangle.logps import PairLogps, response_logps, split_model
from entangle.models import is_peft, set_activation_checkpointing

# TRL loss_type -> (entangle loss, the trainer attributes its hyper-parameters come from)
LOSS_TYPES = {
    "sigmoid": ("dpo", {"beta": "beta", "label_smoothing": "label_smoothing"}),
    "ipo": ("ipo", {"beta": "beta"}),
    "hinge": ("slic", {"beta": "beta"}),
    "robust": ("robust", {"beta": "beta", "label_smoothing": "label_smoothing"}),
    "exo_pair": ("exo", {"beta": "beta", "label_smoothing": "label_smoothing"}),
    "nca_pair": ("nca", {"beta": "beta"}),
    "sppo_hard": ("sppo", {"beta": "beta"}),
    "apo_zero": ("apo_zero", {"beta": "beta"}),
    "apo_down": ("apo_down", {"beta": "beta"}),
    "discopop": ("discopop", {"beta": "beta", "discopop_tau": "args.discopop_tau"}),
}

log = logging.getLogger(__name__)


TESTED_TRL = ("1.16",)   # the TRL releases tests/test_trl.py runs against (the private hooks below are theirs)


class TrainerHooks:
    """The one place entangle reaches into a TRL trainer's private parts: its `_compute_loss` (to see each
    micro-batch and feed a moving reference's log-probs), its `_metrics` (to put `entanglement/*` into TRL's own
    logs), and finding the trainer when a callback was not given one. Public callback arguments cover the rest.
    Checked once: a TRL without these parts is one line; a TRL release that was not tested is said once."""

    def __init__(self, trainer, who: str):
        import trl

        missing = [a for a in ("_compute_loss", "_metrics") if not hasattr(trainer, a)]
        if missing:
            raise ConfigError(f"{who}: this TRL ({trl.__version__}) has no trainer.{missing[0]}; entangle's callbacks "
                              f"were tested with TRL {', '.join(TESTED_TRL)}")
        if ".".join(trl.__version__.split(".")[:2]) not in TESTED_TRL:
            log.warning("%s: TRL %s is not a tested release (tested: %s); if the trainer's private parts changed, "
                        "the callback says so in one line", who, trl.__version__, ", ".join(TESTED_TRL))
        self.trainer, self.original = trainer, trainer._compute_loss

    @staticmethod
    def find(trainer, who: str):
        """`trainer` when given, else the `transformers.Trainer` whose callback is running (from the call stack:
        TRL passes callbacks the model, never the trainer)."""
        if trainer is not None:
            return trainer
        import inspect

        from transformers import Trainer

        for frame in inspect.stack()[2:]:
            candidate = frame.frame.f_locals.get("self")
            if isinstance(candidate, Trainer):
                return candidate
        raise ConfigError(f"{who} runs inside a Trainer; pass trainer=... when calling it by hand")

    def wrap_compute_loss(self, wrapper) -> None:
        """`trainer._compute_loss(model, inputs, return_outputs)` becomes `wrapper(original, model, inputs, ...)`."""
        original = self.trainer._compute_loss
        self.trainer._compute_loss = lambda model, inputs, return_outputs=False: wrapper(original, model, inputs,
                                                                                         return_outputs)

    def log(self, key: str, value: float) -> None:
        """A number in TRL's own training logs (averaged over its logging steps, as TRL's own metrics)."""
        self.trainer._metrics["train"][key].append(value)

    def restore(self) -> None:
        self.trainer._compute_loss = self.original


def trainer_loss(trainer) -> losses.Loss:
    """entangle's loss for the trainer's loss_type, or a ConfigError saying what is supported."""
    types = list(getattr(trainer, "loss_types", None) or [getattr(trainer.args, "loss_type", "sigmoid")])
    supported = ", ".join(sorted(LOSS_TYPES))
    if len(types) != 1 or types[0] not in LOSS_TYPES:
        raise ConfigError(f"EntanglementCallback: loss_type {types} is not supported; one of: {supported}")
    for attr, ok, why in (("f_divergence_type", "reverse_kl", "f_divergence_type"), ("ld_alpha", None, "ld_alpha"),
                          ("use_weighting", False, "use_weighting")):
        value = getattr(trainer, attr, ok)
        if value != ok and not (ok is False and not value):
            raise ConfigError(f"EntanglementCallback: {why}={value!r} is not supported (its per-token weights are "
                              "not one coefficient per response); use the defaults")
    name, params = LOSS_TYPES[types[0]]

    def read(path):
        obj = trainer
        for part in path.split("."):
            obj = getattr(obj, part)
        return obj

    return losses.get(name, **{k: read(v) for k, v in params.items()})


def pair_batch(inputs: dict) -> Batch:
    """entangle's view of a TRL DPO batch: rows chosen then rejected; completion_mask marks the responses."""
    resp = inputs["completion_mask"].bool()
    return Batch(inputs["input_ids"], inputs["attention_mask"], resp,
                 torch.arange(inputs["input_ids"].shape[0] // 2))


def split_rows(batch: Batch) -> list:
    """The pairs of a concatenated batch as entangle's `TokenizedPair`s (prompt, chosen, rejected token ids)."""
    from entangle.data import TokenizedPair

    B, out = batch.n_rows // 2, []
    for i in range(B):
        parts = []
        for r in (i, B + i):
            ids = batch.input_ids[r][batch.attention_mask[r].bool()].tolist()
            resp = batch.response_mask[r][batch.attention_mask[r].bool()]
            start = int(resp.float().argmax())
            parts.append((ids[:start], ids[start:]))
        out.append(TokenizedPair(parts[0][0], parts[0][1], parts[1][1], i))
    return out


@dataclass
class _Output:
    """What TRL's DPO loss reads off a fused-head forward (`FusedCausalLMOutput`), per token [N, T-1]."""

    log_probs: torch.Tensor
    entropy: torch.Tensor
    mean_logits: torch.Tensor
    is_top1: torch.Tensor
    label_mask: torch.Tensor
    loss: torch.Tensor
    log_sum_sq_probs: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None


def scored_forward(lm, input_ids, attention_mask=None, labels=None, **kwargs) -> tuple[_Output, torch.Tensor]:
    """TRL's fused-head forward through entangle's response-only head -> (output, target mask [N, T-1]).
    The LM head runs as a module on the K scored positions, so a gradient recorder sees it."""
    target = (labels != -100)[:, 1:]                                                    # [N, T-1]
    kwargs.pop("use_cache", None)
    out = response_logps(lm, input_ids, attention_mask, labels != -100, logits=True, **kwargs)
    logits, tok, targets = out.logits, out.tokens, input_ids[:, 1:][target]             # [K, V], [K], [K]
    logp = torch.log_softmax(logits.detach(), -1)

    def spread(x):
        return x.new_zeros(target.shape).masked_scatter(target, x)

    with torch.no_grad():
        entropy = -(logp.exp() * logp).sum(-1)
        extra = {"entropy": spread(entropy), "mean_logits": spread(logits.mean(-1)),
                 "is_top1": spread(logits.argmax(-1) == targets)}
    per_token = spread(tok)
    loss = -per_token.sum() / target.sum().clamp(min=1)
    return _Output(per_token, label_mask=target, loss=loss, **extra), target


class EntanglementCallback(TrainerCallback):
    """entangle's per-pair entanglement statistics inside TRL's DPOTrainer, every `every` optimiser steps.

    method: "fast" (the recorder on the trainer's own backward; falls back to one backward per response where
    it cannot be exact) or "exact". tokens: exact per-token views of that many pairs of each measured step
    (`entanglement_tokens/step-N.json`). output_dir: where `entanglement.jsonl` and `metrics.jsonl` go (default:
    the trainer's output_dir). batch_mean: also the batch-mean gradient quantities (`entanglement/batch_*`; two
    gradient-sized sums more per measured step)."""

    def __init__(self, every: int = 1, method: str = "fast", tokens: int | bool = False, output_dir: str | None = None,
                 batch_mean: bool = False, trainer=None):
        if not isinstance(every, int) or every < 1:
            raise ConfigError(f"EntanglementCallback: every must be an integer >= 1 (got {every!r})")
        if method not in ("fast", "exact"):
            raise ConfigError(f"EntanglementCallback: method must be 'fast' or 'exact' (got {method!r})")
        self.every, self.method, self.tokens = every, method, int(tokens)
        self.output_dir, self.trainer, self.batch_mean = output_dir, trainer, batch_mean
        self.probe = None
        self.active = False

    # -- set-up
    def on_train_begin(self, args, state, control, **kwargs):
        trainer = self.trainer = TrainerHooks.find(self.trainer, type(self).__name__)
        import trl.trainer.utils as trl_utils

        if not hasattr(trl_utils, "add_fused_lm_head"):
            raise ConfigError("EntanglementCallback needs a TRL whose DPOTrainer computes log-probs with its fused LM "
                              "head (TRL 1.16 does); upgrade trl")
        self.loss_fn = trainer_loss(trainer)
        self.output_dir = self.output_dir or args.output_dir
        lm = trainer.accelerator.unwrap_model(trainer.model)
        self.lm = lm
        target = lm.get_base_model() if is_peft(lm) else lm
        if split_model(target) is None:
            raise ConfigError(f"EntanglementCallback: {type(target).__name__} has no decoder/LM-head layout entangle "
                              "knows (transformers causal LMs without logit scaling)")
        self.checkpointing = bool(getattr(args, "gradient_checkpointing", False))
        self.probe = EntanglementProbe(lm, self.every, realised=False, method=self.method, batch_mean=self.batch_mean,
                                       tokens=0)
        self._patch(target, policy=True)
        if getattr(trainer, "ref_model", None) is not None:
            ref = trainer.accelerator.unwrap_model(trainer.ref_model)
            self._patch(ref, policy=False)
        self.hooks = TrainerHooks(trainer, "EntanglementCallback")
        self.hooks.wrap_compute_loss(self._wrapped_compute_loss)
        if trainer.accelerator.is_main_process:
            os.makedirs(self.output_dir, exist_ok=True)
            for name in ("entanglement.jsonl", "metrics.jsonl"):
                if state.global_step == 0 and os.path.exists(os.path.join(self.output_dir, name)):
                    _set_aside(os.path.join(self.output_dir, name))

    def _patch(self, module, policy: bool) -> None:
        fused = module.forward

        def forward(*args, fused_lm_head=False, labels=None, **kw):
            if not (self.active and fused_lm_head):
                return fused(*args, fused_lm_head=fused_lm_head, labels=labels, **kw)
            kw.pop("shift_labels", None), kw.pop("num_items_in_batch", None)
            ids = args[0] if args else kw.pop("input_ids")
            out, target = scored_forward(module, ids, labels=labels, **kw)
            sums = out.log_probs.sum(1)
            if policy and torch.is_grad_enabled():
                self.policy_sums, self.lengths = sums.detach(), target.sum(1)
                first = target.float().argmax(1)                      # a response position of each row
                rec = self.probe.recording
                if rec is not None:
                    out.log_probs.register_hook(
                        lambda g: setattr(rec, "coef", g[torch.arange(g.shape[0]), first].detach()))
            elif not torch.is_grad_enabled():
                self.reference_sums = sums.detach()
            return out

        module.forward = forward
        self._restore = getattr(self, "_restore", []) + [(module, fused)]

    def _wrapped_compute_loss(self, compute_loss, model, inputs, return_outputs=False):
        if self.active and model.training:
            self.batch = pair_batch(inputs)
            self.reference_sums = self.policy_sums = None
            if "ref_chosen_logps" in inputs:
                self.reference_sums = torch.cat([inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]]).detach()
            self.probe.before_forward(self.batch)
        return compute_loss(model, inputs, return_outputs)

    # -- each step
    def on_step_begin(self, args, state, control, **kwargs):
        step = state.global_step + 1
        self.active = self.probe is not None and self.probe.due(step)
        if self.active:
            if self.checkpointing:   # recomputed forwards would be recorded twice
                set_activation_checkpointing(self.lm, False)
            self.n_pairs, self.offset, self.token_pairs = 0, 0, []
            self.probe.on_step_start(step, self.trainer.lr_scheduler.get_last_lr()[0])

    def _after_backward(self) -> None:
        if not self.active or getattr(self, "batch", None) is None:
            return
        if getattr(self, "policy_sums", None) is None:
            raise ConfigError("EntanglementCallback: the policy's forward did not take TRL's fused-head path this "
                              "version of TRL uses; entangle cannot see the response log-probs")
        pc, pr = self.policy_sums.chunk(2)
        ref = self.reference_sums.to(pc.device).chunk(2) if self.reference_sums is not None else (None, None)
        lc, lr = self.lengths.chunk(2)
        logps = PairLogps(pc, pr, *ref, lc, lr)
        B = len(pc)
        if self.tokens and not self.token_pairs:
            self.token_pairs = split_rows(self.batch)[: self.tokens]
        self.batch.index = torch.arange(B) + self.offset
        self.probe.after_backward(self.batch, logps, self.loss_fn)
        self.offset += B
        self.n_pairs += B
        self.batch = None

    def on_substep_end(self, args, state, control, **kwargs):
        self._after_backward()

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self._after_backward()
        if self.active:
            self.probe.before_optimizer(self.trainer.accelerator, self.n_pairs)

    def on_optimizer_step(self, args, state, control, **kwargs):
        if not self.active:
            return
        from accelerate.utils import gather_object

        metrics, rows = self.probe.finish(self.trainer.model, [], True)
        metrics.add("n_pairs", float(self.n_pairs), "sum")
        acc = self.trainer.accelerator
        means = metrics.reduce(acc)
        step = state.global_step + 1
        for key, value in means.items():
            if key.startswith("entanglement/"):
                self.hooks.log(key, value)
        rows = gather_object([{"step": step, "process": acc.process_index, **r} for r in rows])
        if acc.is_main_process:
            with open(os.path.join(self.output_dir, "entanglement.jsonl"), "a") as f:
                for r in rows:
                    f.write(json.dumps(r) + "\n")
        if self.token_pairs and acc.is_main_process:
            from entangle.diagnostics.views import save_token_views

            save_token_views(self.output_dir, f"step-{step}", self.lm, self.trainer.processing_class, self.token_pairs)

    def on_step_end(self, args, state, control, **kwargs):
        if self.active and self.checkpointing:
            set_activation_checkpointing(self.lm, True)
        self.active = False

    # -- logs: TRL's rows as metrics.jsonl, so `entangle report` reads the run
    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and self.trainer is not None and self.trainer.accelerator.is_main_process and "loss" in logs:
            row = {"step": state.global_step, **{k: v for k, v in logs.items() if isinstance(v, (int, float))}}
            with open(os.path.join(self.output_dir, "metrics.jsonl"), "a") as f:
                f.write(json.dumps(row) + "\n")

    def on_train_end(self, args, state, control, **kwargs):
        for module, fused in getattr(self, "_restore", []):
            module.forward = fused
        self._restore = []
        if getattr(self, "hooks", None) is not None:
            self.hooks.restore()


REFERENCE_FILE = "entangle_reference.safetensors"


class TrustRegionCallback(TrainerCallback):
    """TR-DPO for TRL, LoRA included: the reference moves by `θ_ref ← αθ + (1−α)θ_ref` every `tau` optimiser steps
    (entangle's `TrustRegionReference`: float32 blends; LoRA: base + its own dense adapter delta, exactly), and its
    log-probs reach the loss as TRL's precomputed reference log-probs."""

    def __init__(self, alpha: float = 0.6, tau: int = 1, trainer=None):
        check_trust_region(alpha, tau, "TrustRegionCallback: ")
        self.alpha, self.tau, self.trainer = alpha, tau, trainer
        self.reference = None

    def on_train_begin(self, args, state, control, **kwargs):
        from entangle.reference import TrustRegionReference

        trainer = self.trainer = TrainerHooks.find(self.trainer, type(self).__name__)
        if getattr(args, "sync_ref_model", False):
            raise ConfigError("TrustRegionCallback replaces TRL's sync_ref_model; set sync_ref_model=False")
        lm = trainer.accelerator.unwrap_model(trainer.model)
        self.reference = TrustRegionReference(lm, self.alpha, self.tau)
        if state.global_step > 0:   # resumed: the reference where the checkpoint left it
            self._load(os.path.join(args.output_dir, f"checkpoint-{state.global_step}"))
        self.hooks = TrainerHooks(trainer, "TrustRegionCallback")
        self._precompute = trainer.precompute_ref_logps
        trainer.precompute_ref_logps = True          # the loss reads the reference from the inputs we fill
        self.hooks.wrap_compute_loss(self._wrapped_compute_loss)

    def _wrapped_compute_loss(self, compute_loss, model, inputs, return_outputs=False):
        with torch.no_grad():
            ref = self.reference.logps(pair_batch(inputs)).detach()
        chosen, rejected = ref.chunk(2)
        return compute_loss(model, {**inputs, "ref_chosen_logps": chosen, "ref_rejected_logps": rejected},
                            return_outputs)

    def on_step_end(self, args, state, control, **kwargs):
        self.reference.after_step(state.global_step, self.trainer.accelerator.unwrap_model(self.trainer.model))
        for key, value in self.reference.metrics().items():
            self.hooks.log(key, value)

    def on_save(self, args, state, control, **kwargs):
        """The reference beside TRL's checkpoint (`checkpoint-N/entangle_reference.safetensors`), so a resumed run
        continues from it."""
        from entangle.checkpoint import save_tensors

        if self.reference is not None and self.trainer.accelerator.is_main_process:
            meta, tensors = self.reference.state()
            folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            os.makedirs(folder, exist_ok=True)
            save_tensors(os.path.join(folder, REFERENCE_FILE), tensors, meta)

    def _load(self, folder: str) -> None:
        from safetensors import safe_open

        path = os.path.join(folder, REFERENCE_FILE)
        if not os.path.exists(path):
            raise ConfigError(f"{folder} has no {REFERENCE_FILE}: it was saved without TrustRegionCallback, so the "
                              "moving reference cannot continue; start over, or resume a checkpoint saved with it")
        with safe_open(path, "pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
            updates = int((f.metadata() or {}).get("ref_updates", 0))
        self.reference.load_state({"ref_updates": updates}, tensors)

    def on_train_end(self, args, state, control, **kwargs):
        if getattr(self, "hooks", None) is not None:
            self.hooks.restore()
            self.trainer.precompute_ref_logps = self._precompute


__all__ = ["EntanglementCallback", "TrustRegionCallback", "LOSS_TYPES", "TESTED_TRL"]


def _set_aside(path: str) -> str:
    """A fresh run's log would mix with an earlier run's: the earlier file becomes `PATH.N` (the first free N),
    never deleted. Returns the new name."""
    n = 1
    while os.path.exists(f"{path}.{n}"):
        n += 1
    os.replace(path, f"{path}.{n}")
    log.warning("%s: an earlier run's log; kept as %s.%d", path, path, n)
    return f"{path}.{n}"
