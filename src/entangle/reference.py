"""Where reference log-probs come from: a frozen copy, the LoRA base, a disk cache, or nothing.

    ref = make_reference("frozen", policy)          # .logps(batch) -> [N] (None for "none")
    ref = precompute_reference(policy, pairs, pad_id, batch_size=8)   # cached on disk by content

For LoRA policies the frozen reference is the base model with adapters disabled: no second copy.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import logging
import os
from typing import Sequence

import torch
from safetensors.torch import load_file, save_file

from entangle.data import TokenizedPair
from entangle.batching import Batch, collate
from entangle.config import check_trust_region
from entangle.errors import ConfigError
from entangle.logps import Policy, sequence_logps
from entangle.models import autocast_copy, autocast_now, cache_dir, is_peft
from entangle.sharding import clean_name, full_parameters, inner, sharding

log = logging.getLogger(__name__)


class Reference:
    """The protocol every reference follows; this base is "no reference" (reference-free losses).

    logps(batch) -> [N] | None            summed response log-probs, no autograd
    token_logps(batch) -> [N, T] | None   per-token log-probs (token-weighted margins)
    attach(prepared)                      once the policy is prepared (sharded runs)
    after_step(step, policy)              after each optimiser step that was taken: move on schedule
    metrics() -> {"ref/...": float}       logged every step
    state() -> (json dict, tensors)       what a checkpoint keeps; load_state(...) restores it
    initial_policy(...) -> Reference      log-probs of the policy training started from (KL to init)
    """

    kind = "none"

    def logps(self, batch: Batch) -> torch.Tensor | None:
        return None

    def token_logps(self, batch: Batch) -> torch.Tensor | None:
        """[N, T] per-token log-probs (0 off-response), for token-weighted margins; None without a reference."""
        if self.kind == "none":
            return None
        raise ConfigError(f"reference.type={self.kind} keeps sequence sums only; a token mask needs "
                          "reference.type=frozen or trust_region")

    def attach(self, prepared) -> None:
        """Called once the policy is prepared under FSDP/DeepSpeed (only references that run the policy act)."""

    def after_step(self, step: int, policy) -> None:
        """Optimiser step `step` (1-based) was taken; a moving reference updates itself when due."""

    def metrics(self) -> dict[str, float]:
        return {}

    def state(self) -> tuple[dict, dict[str, torch.Tensor]]:
        return {}, {}

    def load_state(self, state: dict, tensors: dict[str, torch.Tensor] | None) -> None:
        """Restore what `state()` returned (`state` is the checkpoint's trainer state)."""

    def initial_policy(self, policy, pairs, pad_id: int, batch_size: int, is_main: bool = True,
                       barrier=lambda: None, without_reference: bool = False) -> "Reference | None":
        """Log-probs of the *initial* policy on `pairs` (for `ref/kl_to_init`). Reference-free losses get a
        table computed once only when `without_reference` (the loop asks for it on the held-out pairs)."""
        return precompute_reference(policy, pairs, pad_id, batch_size, is_main, barrier) if without_reference else None


class _ModelReference(Reference):
    """A reference that runs a model (`self.model` under `self.context()`)."""

    def logps(self, batch: Batch) -> torch.Tensor:
        return self._forward(batch)

    def token_logps(self, batch: Batch) -> torch.Tensor:
        return self._forward(batch, token_level=True)

    shared = False                   # True when the reference is the policy itself (LoRA: adapters off)
    runner = None                    # what the forward calls when not `self.model` (see `attach`)
    no_grad = torch.inference_mode   # how the forward turns autograd off

    def attach(self, prepared) -> None:
        """A shared reference under sharding: under FSDP run through the prepared wrapper, whose forward
        gathers the parameters its root unit owns (embeddings, head); under ZeRO-3 use no_grad, since the
        parameters it gathers in inference mode would become inference tensors the next backward cannot use."""
        if not self.shared:
            return
        kind = sharding(self.model)
        if kind in ("fsdp", "fsdp2"):
            self.runner = prepared
        elif kind == "zero3":
            self.no_grad = torch.no_grad

    def _forward(self, batch: Batch, token_level: bool = False, context=None):
        """Reference forward without autograd; returns plain tensors usable as autograd constants."""
        with self.no_grad(), (context if context is not None else self.context()):
            out = sequence_logps(self.runner if self.runner is not None else self.model, batch, token_level)
        return out.token_logps.clone() if token_level else out.logps.clone()


class FrozenReference(_ModelReference):
    """A frozen copy of the initial policy; for PEFT models, the same model with adapters off."""

    kind = "frozen"

    def initial_policy(self, *args, **kwargs) -> Reference:
        return self   # a static reference is the initial policy

    def __init__(self, policy, autocast: torch.dtype | None = None):
        """`autocast`: the dtype of the autocast the policy trains under (mixed precision), or None. The copy then
        holds its linear layers in that dtype (`models.autocast_copy`: the same numbers, half their memory) and its
        forwards always run under that autocast."""
        self.autocast = None
        if is_peft(policy):
            self.model, self.shared = policy, True
        elif autocast is not None:
            self.model, self.shared, self.autocast = autocast_copy(policy, autocast), False, autocast
        else:
            self.model, self.shared = copy.deepcopy(policy), False
            self.model.eval().requires_grad_(False)

    def context(self):
        """The context `self.model` runs in as the initial policy: adapters off (LoRA), its autocast (mixed precision)."""
        if self.shared:
            return self.model.disable_adapter()
        if self.autocast is not None:
            return torch.autocast(next(self.model.parameters()).device.type, dtype=self.autocast)
        return contextlib.nullcontext()



class PrecomputedReference(Reference):
    """Reference log-probs looked up by example index from a table computed once."""

    kind = "precomputed"

    def initial_policy(self, *args, **kwargs) -> Reference:
        return self   # a static reference is the initial policy

    def __init__(self, index: torch.Tensor, chosen: torch.Tensor, rejected: torch.Tensor, path: str | None = None):
        self.table = {int(i): (float(c), float(r)) for i, c, r in zip(index, chosen, rejected)}
        self.path = path

    def logps(self, batch: Batch) -> torch.Tensor:
        rows = [self.table[int(i)] for i in batch.index]
        chosen = torch.tensor([c for c, _ in rows], dtype=torch.float32)
        rejected = torch.tensor([r for _, r in rows], dtype=torch.float32)
        return torch.cat([chosen, rejected]).to(batch.input_ids.device)


def fingerprint(model, pairs: Sequence[TokenizedPair], autocast: torch.dtype | None = None) -> str:
    """Content hash of the reference weights (LoRA adapters excluded), of the tokenised pairs and of the autocast
    the log-probs are computed under (None: the weights' own arithmetic, the key it always had)."""
    h = hashlib.blake2b(digest_size=16)
    if autocast is not None:
        h.update(f"autocast:{autocast}".encode())
    for name, t in sorted(model.state_dict().items()):
        if "lora_" in name:
            continue
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    for p in pairs:
        h.update(repr((p.index, p.rows())).encode())
    return h.hexdigest()


def precompute_reference(policy, pairs: Sequence[TokenizedPair], pad_id: int, batch_size: int = 8,
                         is_main: bool = True, barrier=lambda: None) -> PrecomputedReference:
    """Reference log-probs of every pair, reused from `$ENTANGLE_CACHE/refcache` when the weights,
    data, tokenisation and arithmetic (the autocast in force) are unchanged (any change gives a new key)."""
    device = next(policy.parameters()).device
    autocast = autocast_now(device)          # a table made under bf16 autocast is not float32's: its own key
    key = fingerprint(policy, pairs, autocast)
    path = os.path.join(cache_dir(), "refcache", f"{key}.safetensors")
    if not os.path.exists(path) and is_main:
        log.info("precomputing reference log-probs for %d pairs -> %s", len(pairs), path)
        frozen = FrozenReference(policy, autocast)
        chosen, rejected = [], []
        for s in range(0, len(pairs), batch_size):
            lp = frozen.logps(collate(pairs[s : s + batch_size], pad_id, pack=True).to(device)).float().cpu()
            c, r = lp.chunk(2)
            chosen.append(c)
            rejected.append(r)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp{os.getpid()}"
        save_file({"index": torch.tensor([p.index for p in pairs]), "chosen": torch.cat(chosen),
                   "rejected": torch.cat(rejected)}, tmp)
        os.replace(tmp, path)
        del frozen
    else:
        log.info("reusing cached reference log-probs %s", path)
    barrier()
    t = load_file(path)
    return PrecomputedReference(t["index"], t["chosen"], t["rejected"], path)


def make_reference(kind: str, policy, alpha: float = 0.0, tau: int = 1) -> Reference:
    """`frozen`, `trust_region` or `none`; `precomputed` needs the data (`precompute_reference`).

    Made under the autocast the policy trains in (mixed precision), a frozen copy holds its linear layers in
    that dtype (`FrozenReference`). A precomputed table cannot follow a moving reference, so the two never combine."""
    if kind == "none":
        return Reference()
    if kind == "frozen":
        return FrozenReference(policy, autocast_now(next(policy.parameters()).device))
    if kind == "trust_region":
        return TrustRegionReference(policy, alpha, tau)
    raise ValueError(f"reference type {kind!r} is built with precompute_reference")


class _Initial(Reference):
    kind = "initial"

    def __init__(self, fn):
        self.fn = fn

    def logps(self, batch: Batch) -> torch.Tensor:
        return self.fn(batch)


# ------------------------------------------------------------------------------------ trust region


class TrustRegionReference(_ModelReference):
    """A reference that moves: every `tau` optimiser steps, theta_ref <- alpha*theta + (1-alpha)*theta_ref.

    Blends happen in float32 whatever the model dtype (a float32 master copy is kept for lower
    precisions), parameters are paired by name. For PEFT/LoRA policies the reference is
    `W0 + delta_ref` per adapted module, with delta_ref <- alpha*(scaling*B*A) + (1-alpha)*delta_ref,
    exactly: a dense float32 delta per adapted module, applied by a forward hook on its base layer."""

    kind = "trust_region"

    def __init__(self, policy, alpha: float, tau: int):
        check_trust_region(alpha, tau, "trust-region reference: ")
        self.alpha, self.tau, self.updates = float(alpha), int(tau), 0
        self.lora = self.shared = is_peft(policy)
        if self.lora:
            check_lora_layers(policy)
            self.model = policy
            # adapters that start non-zero: the initial policy is W0 + BA
            self.delta = {n: d for n, d in lora_deltas(policy).items() if bool(d.any())}
        else:
            self.model = copy.deepcopy(policy).eval().requires_grad_(False)
            self.master = {n: p.detach().float().clone() if p.dtype in (torch.bfloat16, torch.float16) else None
                           for n, p in self.model.named_parameters()}
        self.initial_state = self.state_tensors()
        self._drift = 0.0

    # -- forward
    def context(self, delta: dict | None = None):
        """The context `self.model` runs in: for LoRA, the base with adapters off plus `delta` (default: the current blend)."""
        if not self.lora:
            return contextlib.nullcontext()
        delta = self.delta if delta is None else delta
        stack = contextlib.ExitStack()
        stack.enter_context(self.model.disable_adapter())
        for name, layer in _lora_layers(self.model):
            if name in delta:
                stack.enter_context(_add_delta(layer, delta[name]))
        return stack

    def initial_logps(self, batch: Batch) -> torch.Tensor:
        """LoRA only: log-probs under the initial policy (W0 + the initial deltas), at no memory cost."""
        return self._forward(batch, context=self.context(self.initial_state))

    def initial_policy(self, policy, pairs, pad_id: int, batch_size: int, is_main: bool = True,
                       barrier=lambda: None, without_reference: bool = False) -> Reference:
        """LoRA: W0 + the initial deltas, at no memory cost; full: a table computed once (cached on disk)."""
        if self.lora:
            return _Initial(self.initial_logps)
        return precompute_reference(policy, pairs, pad_id, batch_size, is_main, barrier)

    # -- update
    def after_step(self, step: int, policy) -> None:
        """Every tau optimiser steps (not micro-batches), blend the policy in."""
        if self.due(step):
            self.update(policy)   # sharded policies are gathered one piece at a time
            self._drift = self.drift()

    def metrics(self) -> dict[str, float]:
        return {"ref/updates": float(self.updates), "ref/drift": self._drift}

    def due(self, step: int) -> bool:
        """Whether optimiser step `step` (1-based, counted after the step) triggers an update."""
        return self.alpha > 0 and step % self.tau == 0

    @torch.no_grad()
    def update(self, policy) -> None:
        """Blend the current policy into the reference (float32), pairing parameters by name.

        `policy` may be sharded (FSDP, FSDP2, ZeRO-3): its parameters are then gathered one piece at a
        time (`sharding.full_parameters`), never the whole model; every process must call this."""
        a = self.alpha
        if self.lora:
            for name, d in lora_deltas(policy).items():
                old = self.delta.get(name)
                self.delta[name] = a * d if old is None else a * d + (1 - a) * old
        else:
            mine = dict(self.model.named_parameters())
            seen = set()
            for n, src in full_parameters(policy, prefix=_lm_prefix(policy)):
                p = mine.get(n)
                if p is None:
                    raise KeyError(f"trust-region update: the reference has no parameter {n!r}")
                if self.master[n] is None:          # float32/float64 reference: blend in place
                    p.mul_(1 - a).add_(src.to(p.dtype), alpha=a)
                else:                               # lower precision: blend the float32 master, then round
                    self.master[n].mul_(1 - a).add_(src.float(), alpha=a)
                    p.copy_(self.master[n])
                seen.add(n)
            if len(seen) != len(mine):
                missing = sorted(set(mine) - seen)[:3]
                raise KeyError(f"trust-region update: policy has no parameter {missing}")
        self.updates += 1

    # -- state
    def state(self) -> tuple[dict, dict[str, torch.Tensor]]:
        """For a checkpoint written at once: the tensors are the reference's own where they already are on the CPU
        in float32 (no second copy of the model while it is saved)."""
        return {"ref_updates": self.updates}, {k: self._exact(k) for k in self._state_names()}

    def load_state(self, state: dict, tensors: dict[str, torch.Tensor] | None) -> None:
        if tensors is None:
            raise ConfigError("the checkpoint has no reference.safetensors (it was not saved by a trust-region "
                              "run); resume it with the reference.type it was trained with")
        self.load_state_tensors(tensors, state["ref_updates"])
        self._drift = self.drift()

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The reference's exact state (float32): LoRA deltas, or the full parameters (copies on the CPU)."""
        return {k: self._exact(k).clone() for k in self._state_names()}

    def _state_names(self) -> list[str]:
        return list(self.delta) if self.lora else [n for n, _ in self.model.named_parameters()]

    def _exact(self, name: str) -> torch.Tensor:
        """One tensor of the state on the CPU, float32 at least (a float64 model keeps float64); not a copy where the
        tensor already is that."""
        if self.lora:
            return self.delta[name].detach().cpu()
        t = self.master[name] if self.master[name] is not None else self.model.get_parameter(name).detach()
        return (t if t.dtype == torch.float64 else t.float()).cpu()

    @torch.no_grad()
    def load_state_tensors(self, state: dict[str, torch.Tensor], updates: int) -> None:
        self.updates = updates
        if self.lora:
            device = next(self.model.parameters()).device
            self.delta = {k: v.to(device) for k, v in state.items()}
            return
        for n, p in self.model.named_parameters():
            if self.master[n] is not None:
                self.master[n].copy_(state[n])
            p.copy_(state[n])

    def drift(self) -> float:
        """L2 distance of the reference's parameters (LoRA: its deltas) from where they started, one tensor at a
        time (never a second copy of the whole state)."""
        total = 0.0
        for k in sorted(self._state_names()):   # a fixed order: resumed state loads in another
            v, start = self._exact(k), self.initial_state.get(k)
            total += float(((v - start) if start is not None else v).double().pow(2).sum())
        return total ** 0.5


def _lora_layers(model):
    from peft.tuners.lora import LoraLayer

    base = model.get_base_model() if is_peft(model) else model
    return [(clean_name(n), m) for n, m in base.named_modules() if isinstance(m, LoraLayer)]


PEFT_PREFIX = "base_model.model."


def check_lora_layers(model) -> None:
    """A trust region over LoRA needs plain low-rank matrices (Linear/Conv1D adapters, no DoRA)."""
    for name, layer in _lora_layers(model):
        for a in layer.active_adapters:
            if a not in getattr(layer, "lora_A", {}) or layer.lora_A[a].weight.ndim != 2:
                raise ConfigError(f"model.lora: {name} is a {type(layer).__name__} adapter; a trust-region "
                                  "reference supports Linear/Conv1D adapters only (set model.lora.target_modules)")
            if getattr(layer, "use_dora", {}).get(a):
                raise ConfigError(f"model.lora: {name} uses DoRA; a trust-region reference supports plain LoRA only")


def _lm_prefix(model) -> str:
    """Where the language model's parameters sit in `model` (a prepared `Policy` holds it as `model.`)."""
    return "model." if isinstance(inner(model), Policy) else ""


def lora_deltas(model) -> dict[str, torch.Tensor]:
    """scaling * B @ A of the active adapter(s) of every adapted module, float32, in the base weight's layout,
    keyed by module name under the base model. `model` is a PEFT model or a prepared `Policy` holding one.
    The adapter matrices are read through `full_parameters`, so a sharded model is gathered one piece at
    a time (and only its adapters)."""
    ab = {n.removeprefix(PEFT_PREFIX): t.float().clone()
          for n, t in full_parameters(model, keep=lambda n: ".lora_A." in n or ".lora_B." in n,
                                      prefix=_lm_prefix(model))}
    lm = inner(model)
    out = {}
    for name, layer in _lora_layers(lm.model if isinstance(lm, Policy) else lm):
        flip = getattr(layer, "fan_in_fan_out", False)   # GPT-2 Conv1D stores [in, out]
        total = None
        for a in layer.active_adapters:
            if f"{name}.lora_A.{a}.weight" not in ab:
                continue
            d = ab[f"{name}.lora_B.{a}.weight"] @ ab[f"{name}.lora_A.{a}.weight"]     # [out, in]
            d = (d.T if flip else d) * layer.scaling[a]
            total = d if total is None else total + d
        if total is None:
            shape = (layer.in_features, layer.out_features) if flip else (layer.out_features, layer.in_features)
            device = next(iter(ab.values())).device if ab else None
            total = torch.zeros(shape, dtype=torch.float32, device=device)
        out[name] = total
    return out


@contextlib.contextmanager
def _add_delta(layer, delta: torch.Tensor):
    """Make the base layer compute (W0 + delta) x for the duration (no change to W0 itself)."""
    base = layer.get_base_layer()
    transposed = getattr(layer, "fan_in_fan_out", False)  # GPT-2 Conv1D stores [in, out]

    def hook(module, args, output):
        x = args[0]
        d = delta.to(x.dtype)
        return output + (x @ d if transposed else torch.nn.functional.linear(x, d))

    handle = base.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()
