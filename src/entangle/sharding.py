"""Reading a sharded model's parameters one piece at a time: FSDP, FSDP2 and DeepSpeed ZeRO-3.

    for name, full in full_parameters(model):      # name as in the unwrapped model
        use(full)                                  # valid until the next item; copy what you keep

Every process must iterate in step (each gather is a collective). At most one piece is gathered at
any time: one FSDP unit (`summon_full_params(unit, recurse=False)`), one FSDP2 parameter
(`DTensor.full_tensor()`), or one module's own ZeRO-3 parameters (`GatheredParameters`). The full
model is never materialised. FSDP2 gathers the float32 shards, not the mixed-precision copies.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch

# Module names that wrappers insert into parameter names (FSDP, activation checkpointing, torch.compile).
WRAPPER_PARTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


def clean_name(name: str) -> str:
    """A parameter name as the unwrapped model spells it."""
    for part in WRAPPER_PARTS:
        name = name.replace(part, "")
    return name


def sharding(model) -> str:
    """`fsdp` (FSDP1 units inside), `fsdp2` (DTensor parameters), `zero3` (partitioned DeepSpeed
    parameters) or `none`."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.tensor import DTensor

    if any(isinstance(m, FSDP) for m in model.modules()):
        return "fsdp"
    for p in model.parameters():
        if isinstance(p, DTensor):
            return "fsdp2"
        if hasattr(p, "ds_id"):
            return "zero3"
    return "none"


def outer(model):
    """Below DDP/DeepSpeed-engine wrappers (which shard nothing themselves), but not below an FSDP root:
    its unit owns the parameters outside the nested units."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    while not isinstance(model, FSDP) and isinstance(getattr(model, "module", None), torch.nn.Module):
        model = model.module
    return model


def inner(model):
    """The module inside every wrapper (DDP, DeepSpeed engine, FSDP root)."""
    while isinstance(getattr(model, "module", None), torch.nn.Module):
        model = model.module
    return model


def full_parameters(model, keep: Callable[[str], bool] = lambda name: True,
                    prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """`(name, full tensor)` for the parameters under `prefix` (which is removed from the names) whose
    name passes `keep`, in a fixed order; pieces holding no such parameter are not gathered at all.
    `model` may be the prepared wrapper: names are those of the module inside it."""
    model = outer(model)

    def wanted(name):
        return name.startswith(prefix) and keep(name[len(prefix):])

    kind = sharding(model)
    if kind == "fsdp":
        pieces = _fsdp_units(model, wanted)
    elif kind == "zero3":
        pieces = _zero3_modules(model, wanted)
    else:  # plain, or FSDP2: one DTensor at a time
        pieces = ((clean_name(n), p) for n, p in model.named_parameters() if wanted(clean_name(n)))
    for name, p in pieces:
        yield name[len(prefix):], (p.full_tensor() if hasattr(p, "full_tensor") else p).detach()


def _owned(module, prefix: str, stop: Callable[[torch.nn.Module], bool]):
    """(name, parameter) of `module` and its children, not descending into modules where `stop`."""
    for name, p in module.named_parameters(recurse=False):
        yield f"{prefix}{name}", p
    for name, child in module.named_children():
        if not stop(child):
            yield from _owned(child, f"{prefix}{name}.", stop)


def _first_time(pieces, seen: set):
    """Tied parameters (embeddings and head) once, under their first name, as `named_parameters` does."""
    for name, p in pieces:
        if id(p) not in seen:
            seen.add(id(p))
            yield name, p


def _fsdp_units(model, keep):
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    units = [(name, m) for name, m in model.named_modules() if isinstance(m, FSDP)]
    if not isinstance(model, FSDP):  # parameters above the outermost units (none under accelerate's wrapping)
        units.insert(0, ("", model))
    for unit_name, unit in units:
        prefix = f"{unit_name}." if unit_name else ""

        def owned():
            return [(clean_name(prefix + n), p) for n, p in _owned(unit, "", lambda m: isinstance(m, FSDP))
                    if "flat_param" not in n]

        def fresh():  # inside the gather: the unit's original parameters at full size. FSDP keeps tied
            return _first_time(((n, p) for n, p in owned() if keep(n)), set())  # parameters in one unit

        with torch.no_grad():
            names = [n for n, _ in owned()]
            if names and not any(keep(n) for n in names):  # orig-params units: names known without gathering
                continue
            ctx = FSDP.summon_full_params(unit, recurse=False, writeback=False) if isinstance(unit, FSDP) \
                else contextlib.nullcontext()
            with ctx:
                yield from fresh()


def _zero3_modules(model, keep):
    import deepspeed

    seen: set = set()
    for mod_name, module in model.named_modules():
        prefix = f"{mod_name}." if mod_name else ""
        mine = [(clean_name(prefix + n), p) for n, p in module.named_parameters(recurse=False)]
        mine = list(_first_time([(n, p) for n, p in mine if keep(n)], seen))
        if not mine:
            continue
        with deepspeed.zero.GatheredParameters([p for _, p in mine], modifier_rank=None):
            yield from mine
