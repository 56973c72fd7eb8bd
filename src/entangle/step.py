"""One optimisation step: the maths, nothing else. `train_step` and `eval_batch` return metric sums.

Metric sums are tensors reduced over processes by the caller's `finish_metrics`, so that means are
exact under gradient accumulation and multi-process runs (accuracies can never exceed 1).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from entangle.data import Batch
from entangle.logps import sequence_logps
from entangle.losses import Loss
from entangle.mitigations import mask_penalty
from entangle.reference import Reference

SUM_KEYS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
            "logps/chosen", "logps/rejected", "ref/kl_to_init", "ref/margin_vs_init", "ref/accuracy_vs_init",
            "mask/mean", "mask/below_0.1", "n_pairs", "n_tokens")


@dataclass
class StepParts:
    accelerator: Any
    model: Any                  # prepared (possibly DDP/FSDP-wrapped) policy
    optimizer: Any
    scheduler: Any
    loss_fn: Loss
    reference: Reference
    max_grad_norm: float | None
    initial: Reference | None = None   # the initial policy, for ref/kl_to_init
    probe: Any = None                  # diagnostics.probe.EntanglementProbe, or None
    normalizer: Any = None             # mitigations.PairwiseNormalizer, or None
    mask_l1: float = 0.0               # loss.mask_l1 (only read when the policy holds a token mask)


def pair_forward(model, loss_fn: Loss, reference: Reference, batch: Batch, initial: Reference | None = None,
                 *watchers, mask_l1: float = 0.0, pack: bool = True):
    """Policy and reference log-probs of a concatenated batch -> (per-pair loss [B], metric sums, inputs).
    `watchers` (diagnostics, mitigations) see the scored log-prob tensor's gradient during the backward.
    With a token mask (a `Policy` holding one) the margin uses the masked sums and `mask_l1` times
    each pair's mean token weight is added to its loss."""
    out = sequence_logps(model, batch, pack=pack)             # logps [2B]
    scored = out.scored                                       # masked sums under loss.token_mask, else logps
    for w in watchers:
        if w is not None:
            w.watch(scored)
    pc, pr = scored.chunk(2)                                  # [B], [B]
    lc, lr = out.lengths.chunk(2)
    if out.weights is None:
        ref = ref_full = reference.logps(batch)               # [2B] or None
    else:
        # Token mask: the reference's token log-probs weighted by the same m_t (the mask learns from both).
        ref_tok = reference.token_logps(batch)                # [2B, T] or None
        ref = None if ref_tok is None else (ref_tok * out.weights).sum(1)
        ref_full = None if ref_tok is None else ref_tok.sum(1)
    rc, rr = ref.chunk(2) if ref is not None else (None, None)
    loss_fn.observe(pc, pr, rc, rr, lc, lr)                   # running state (BCO) sees the batch first
    per_pair = loss_fn(pc, pr, rc, rr, lc, lr)                # [B]
    rw, rl = loss_fn.rewards(pc, pr, rc, rr, lc, lr)
    fc, fr = out.logps.detach().chunk(2)                      # the full log-probs, masked or not
    sums = {
        "loss": per_pair.detach().sum(),
        "rewards/chosen": rw.sum(),
        "rewards/rejected": rl.sum(),
        "rewards/margins": (rw - rl).sum(),
        "rewards/accuracies": (rw > rl).float().sum(),
        "logps/chosen": fc.sum(),
        "logps/rejected": fr.sum(),
        "n_pairs": torch.tensor(float(pc.numel())),
        "n_tokens": batch.attention_mask.sum().float(),
    }
    if out.weights is not None:
        penalty = mask_penalty(out.weights, out.lengths)     # [B] mean token weight of each pair
        per_pair = per_pair + mask_l1 * penalty
        sums["mask/mean"] = penalty.detach().sum()
        low = (out.weights[:, 1:] < 0.1) & batch.response_mask[:, 1:]                     # [2B, T-1]
        sums["mask/below_0.1"] = mask_penalty(low.float(), out.lengths).sum()
    if initial is not None:
        # KL(policy || initial) estimated on the batch's responses: mean of log pi - log pi_init.
        init = ref_full if initial is reference else initial.logps(batch)
        sums["ref/kl_to_init"] = (out.logps.detach() - init).sum() / 2
        # The preference measured against the initial policy: comparable across moving references.
        ic, ir = init.chunk(2)
        margin = (fc - ic) - (fr - ir)
        sums["ref/margin_vs_init"] = margin.sum()
        sums["ref/accuracy_vs_init"] = (margin > 0).float().sum()
    weights = None if out.weights is None else out.weights.detach()
    return per_pair, sums, {"pc": pc, "pr": pr, "rc": rc, "rr": rr, "lc": lc, "lr": lr, "weights": weights}


def _add(acc: dict, sums: dict) -> None:
    for k, v in sums.items():
        v = v.detach().float().cpu() if isinstance(v, torch.Tensor) else torch.tensor(float(v))
        acc[k] = acc[k] + v if k in acc else v


@contextlib.contextmanager
def _accumulating(acc, model, last: bool):
    """Gradients synchronise (DeepSpeed: the engine steps) only on a step's last micro-batch."""
    if last:
        yield
    elif acc.distributed_type.name == "DEEPSPEED":   # ZeRO-2/3 engines have no no_sync; Accelerate's flag does it
        acc.gradient_state._set_sync_gradients(False)
        try:
            yield
        finally:
            acc.gradient_state._set_sync_gradients(True)
    else:
        with acc.no_sync(model):
            yield


def train_step(parts: StepParts, micro_batches: Sequence[Batch], step: int = 0) -> tuple[dict, list[dict]]:
    """Forward/backward over the micro-batches, clip, step (`step` is 1-based).

    Returns this process's metric sums and, on diagnostic steps, the per-pair entanglement rows."""
    acc = parts.accelerator
    model, optimizer = parts.model, parts.optimizer
    probe = parts.probe if parts.probe is not None and parts.probe.due(step) else None
    if probe is not None:
        probe.start_step()
    # 1. Learning rate for this step (the scheduler advanced after the previous step).
    lr = parts.scheduler.get_last_lr()[0]
    n_pairs = sum(b.n_rows // 2 for b in micro_batches)
    # The recorder reads per-row statistics off the concatenated rows: no prefix sharing on such steps.
    watched = probe is not None or parts.normalizer is not None
    deepspeed = acc.distributed_type.name == "DEEPSPEED"
    sums: dict[str, torch.Tensor] = {}
    for i, batch in enumerate(micro_batches):
        # 2. Gradients synchronise across processes only on the last micro-batch.
        last = i == len(micro_batches) - 1
        with _accumulating(acc, model, last):
            # 3. Policy forward, reference log-probs, per-pair loss.
            if probe is not None:
                probe.begin(batch)
            if parts.normalizer is not None:
                parts.normalizer.begin(batch)
            per_pair, batch_sums, inputs = pair_forward(model, parts.loss_fn, parts.reference, batch,
                                                        parts.initial, probe, parts.normalizer,
                                                        mask_l1=parts.mask_l1, pack=not watched)
            # 4. Backward of this micro-batch's share of the step's mean loss (DeepSpeed's engine divides
            #    by its accumulation count itself, and steps inside the last backward).
            scale = len(micro_batches) if deepspeed else 1
            acc.backward(per_pair.sum() * scale / n_pairs)
        # 5. Diagnostics (read-only): per-pair gradient inner products from that backward.
        if probe is not None:
            probe.end(batch, inputs, parts.loss_fn, lr)
        if parts.normalizer is not None:
            parts.normalizer.end(batch, inputs, parts.loss_fn)
        _add(sums, batch_sums)
    # 5b. Mitigation (optimizer.pairwise_normalized): the update becomes the sum of the pairs'
    #     normalised directions, d_w grad_w/|grad_w| - d_l grad_l/|grad_l|.
    if parts.normalizer is not None:
        parts.normalizer.apply(acc, n_pairs)
    # 6. Clip (or just measure) the gradient norm.
    params = [p for p in model.parameters() if p.requires_grad]
    max_norm = parts.max_grad_norm if parts.max_grad_norm is not None else math.inf
    grad_norm = acc.clip_grad_norm_(params, max_norm)
    grad_norm = torch.as_tensor(grad_norm).detach().float().cpu()
    # 7. Optimiser step, unless the loss or gradient is not finite; then the step is skipped.
    finite = bool(torch.isfinite(grad_norm)) and bool(torch.isfinite(sums["loss"]))
    if finite:
        if probe is not None:
            probe.before_step()
        optimizer.step()
        if probe is not None:
            probe.after_step()
        parts.scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    sums["grad_norm"] = grad_norm
    sums["learning_rate"] = torch.tensor(lr)
    sums["skipped"] = torch.tensor(0.0 if finite else 1.0)
    rows: list[dict] = []
    if probe is not None:
        # 8. Optionally the realised log-prob changes, by re-evaluating the same batches.
        probe.realise(probe.model, micro_batches)
        probe_sums, rows = probe.finish()
        sums.update(probe_sums)
    return sums, rows


@torch.no_grad()
def eval_batch(model, loss_fn: Loss, reference: Reference, batch: Batch,
               initial: Reference | None = None, mask_l1: float = 0.0) -> dict[str, torch.Tensor]:
    _, sums, _ = pair_forward(model, loss_fn, reference, batch, initial, mask_l1=mask_l1)
    out: dict[str, torch.Tensor] = {}
    _add(out, sums)
    return out


MEAN_KEYS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
             "logps/chosen", "logps/rejected", "ref/kl_to_init", "ref/margin_vs_init", "ref/accuracy_vs_init",
             "mask/mean", "mask/below_0.1")


def finish_metrics(accelerator, sums: dict[str, torch.Tensor]) -> dict[str, float]:
    """Sum over processes, then divide by the global pair count: exact means."""
    keys = [k for k in SUM_KEYS if k in sums] + sorted(k for k in sums if k.startswith("entanglement/"))
    vec = torch.stack([sums[k] for k in keys]).to(accelerator.device)
    vec = accelerator.reduce(vec, reduction="sum").cpu()
    total = dict(zip(keys, vec.tolist()))
    n = max(total["n_pairs"], 1.0)
    out = {k: total[k] / n for k in MEAN_KEYS if k in total}
    for k in total:
        if k.startswith("entanglement/"):  # per-pair means; the fallback count stays a count
            out[k] = total[k] if k == "entanglement/exact_fallback" else total[k] / n
    out["n_pairs"] = total["n_pairs"]
    out["n_tokens"] = total["n_tokens"]
    for k in ("grad_norm", "learning_rate", "skipped"):
        if k in sums:
            out[k] = float(sums[k])
    return out
