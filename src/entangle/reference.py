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

from entangle.data import Batch, TokenizedPair, collate_pairs
from entangle.logps import sequence_logps
from entangle.models import cache_dir, is_peft

log = logging.getLogger(__name__)


class Reference:
    """No reference (reference-free losses): `logps` returns None."""

    kind = "none"

    def logps(self, batch: Batch) -> torch.Tensor | None:
        return None


class FrozenReference(Reference):
    """A frozen copy of the initial policy; for PEFT models, the same model with adapters off."""

    kind = "frozen"

    def __init__(self, policy):
        if is_peft(policy):
            self.model, self.shared = policy, True
        else:
            self.model, self.shared = copy.deepcopy(policy), False
            self.model.eval().requires_grad_(False)

    def context(self):
        return self.model.disable_adapter() if self.shared else contextlib.nullcontext()

    def logps(self, batch: Batch) -> torch.Tensor:
        with torch.inference_mode(), self.context():
            out = sequence_logps(self.model, batch).logps
        return out.clone()  # a normal tensor, usable in autograd graphs as a constant


class PrecomputedReference(Reference):
    """Reference log-probs looked up by example index from a table computed once."""

    kind = "precomputed"

    def __init__(self, index: torch.Tensor, chosen: torch.Tensor, rejected: torch.Tensor, path: str | None = None):
        self.table = {int(i): (float(c), float(r)) for i, c, r in zip(index, chosen, rejected)}
        self.path = path

    def logps(self, batch: Batch) -> torch.Tensor:
        rows = [self.table[int(i)] for i in batch.index]
        chosen = torch.tensor([c for c, _ in rows], dtype=torch.float32)
        rejected = torch.tensor([r for _, r in rows], dtype=torch.float32)
        return torch.cat([chosen, rejected]).to(batch.input_ids.device)


def fingerprint(model, pairs: Sequence[TokenizedPair]) -> str:
    """Content hash of the reference weights (LoRA adapters excluded) and of the tokenised pairs."""
    h = hashlib.blake2b(digest_size=16)
    for name, t in sorted(model.state_dict().items()):
        if "lora_" in name:
            continue
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    for p in pairs:
        h.update(repr((p.index, p.prompt_ids, p.chosen_ids, p.rejected_ids)).encode())
    return h.hexdigest()


def precompute_reference(policy, pairs: Sequence[TokenizedPair], pad_id: int, batch_size: int = 8,
                         is_main: bool = True, barrier=lambda: None) -> PrecomputedReference:
    """Reference log-probs of every pair, reused from `$ENTANGLE_CACHE/refcache` when the weights,
    data and tokenisation are unchanged (any change gives a new key)."""
    key = fingerprint(policy, pairs)
    path = os.path.join(cache_dir(), "refcache", f"{key}.safetensors")
    if not os.path.exists(path) and is_main:
        log.info("precomputing reference log-probs for %d pairs -> %s", len(pairs), path)
        frozen = FrozenReference(policy)
        device = next(policy.parameters()).device
        chosen, rejected = [], []
        for s in range(0, len(pairs), batch_size):
            lp = frozen.logps(collate_pairs(pairs[s : s + batch_size], pad_id).to(device)).float().cpu()
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


def make_reference(kind: str, policy) -> Reference:
    """`frozen` or `none`; `precomputed` needs the data and goes through `precompute_reference`."""
    if kind == "none":
        return Reference()
    if kind == "frozen":
        return FrozenReference(policy)
    raise ValueError(f"reference type {kind!r} is built with precompute_reference")
