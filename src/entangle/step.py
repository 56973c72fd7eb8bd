"""One optimisation step, in numbered stages; whatever watches or alters it is a `StepHook` (hooks.py).

    metrics, rows = train_step(parts, micro_batches, step)    # Metrics (reduced by the caller), rows or None
    metrics = eval_batch(model, loss_fn, reference, batch)     # held-out items, no gradient, no loss state

What a batch item is comes from the loss: a preference pair (`pair_forward`, the margin family) or a
KTO example with its KL row (`unpaired_forward`); `objective(loss_fn)` picks the one.

Metric sums stay on the device and are reduced over processes once per step (`Metrics.reduce`), so
means are exact under gradient accumulation and several processes (accuracies never exceed 1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from entangle.batching import Batch
from entangle import engine
from entangle.hooks import StepHook
from entangle.logps import CompletionLogps, PairLogps, sequence_logps
from entangle.losses import Loss, UnpairedLoss, coefficients
from entangle.metrics import Metrics
from entangle.mitigations import mask_penalty
from entangle.reference import Reference


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
    hooks: Sequence[StepHook] = field(default_factory=tuple)
    mask_l1: float = 0.0               # loss.mask_l1 (only read when the policy holds a token mask)
    objective: "Objective | None" = None   # what an item is (default: the loss's, `objective(loss_fn)`)

    def __post_init__(self):
        if self.objective is None:
            self.objective = objective(self.loss_fn)


def pair_logps(model, reference: Reference, batch: Batch,
               hooks: Sequence[StepHook] = ()) -> tuple[PairLogps, torch.Tensor | None, torch.Tensor | None]:
    """Policy forward and reference log-probs of a pair batch -> (PairLogps, the reference's plain sums [2B],
    the token weights [2B, T] with their graph, or None without a token mask).

    Under a token mask (a `Policy` holding one) the policy and reference sums are weighted by the same m_t."""
    out = sequence_logps(model, batch)                         # logps [2B]
    for h in hooks:
        h.on_logps(out.scored)                                  # masked sums under loss.token_mask, else logps
    if out.weights is None:
        ref = ref_full = reference.logps(batch)                 # [2B] or None
    else:
        ref_tok = reference.token_logps(batch)                  # [2B, T] or None
        ref = None if ref_tok is None else (ref_tok * out.weights).sum(1)
        ref_full = None if ref_tok is None else ref_tok.sum(1)
    policy_chosen, policy_rejected = out.scored.chunk(2)        # [B], [B]
    ref_chosen, ref_rejected = ref.chunk(2) if ref is not None else (None, None)
    chosen_lengths, rejected_lengths = out.lengths.chunk(2)
    weights = None if out.weights is None else out.weights.detach()
    unmasked = None if out.masked is None else out.logps.detach()
    return PairLogps(policy_chosen, policy_rejected, ref_chosen, ref_rejected, chosen_lengths, rejected_lengths,
                     weights, unmasked), ref_full, out.weights


def pair_forward(model, loss_fn: Loss, reference: Reference, batch: Batch, initial: Reference | None = None,
                 hooks: Sequence[StepHook] = (), mask_l1: float = 0.0, train: bool = True):
    """Log-probs, per-pair loss [B] and metric sums of a pair batch -> (loss [B], Metrics, PairLogps).

    Only training batches (`train`) add to a stateful loss's statistics (BCO's running baseline, folded in at
    the step's end by `Loss.commit`). With a token mask,
    `mask_l1` times each pair's mean token weight is added to its loss."""
    logps, ref_full, live_weights = pair_logps(model, reference, batch, hooks)
    if train:
        loss_fn.observe(*logps.args())                          # this step's statistics (BCO)
    per_pair = loss_fn(*logps.args())                           # [B]  (the loss's equation, losses.py)
    rewards_chosen, rewards_rejected = loss_fn.rewards(*logps.args())
    full_chosen, full_rejected = (t.detach() for t in logps.unmasked())
    m = Metrics()
    m.add("loss", per_pair.detach().sum())
    m.add("rewards/chosen", rewards_chosen.sum())
    m.add("rewards/rejected", rewards_rejected.sum())
    m.add("rewards/margins", (rewards_chosen - rewards_rejected).sum())
    m.add("rewards/accuracies", (rewards_chosen > rewards_rejected).float().sum())
    m.add("logps/chosen", full_chosen.sum())
    m.add("logps/rejected", full_rejected.sum())
    m.add("n_pairs", float(logps.n_pairs), "sum")
    m.add("n_tokens", batch.attention_mask.sum(), "sum")
    # The weight the loss gives each pair's chosen log-prob (DPO: beta * sigmoid(-beta z)): a trust region
    # can only differ from a static reference once this has fallen.
    m.add("loss/d_w", coefficients(loss_fn, *logps.args())[0].sum())
    for key, value in loss_fn.state.items():                    # a stateful loss's state (BCO's baseline)
        m.add(f"loss_state/{key}", float(value), "last")
    if ref_full is not None:
        # log pi - log pi_ref on the batch's responses: how far the policy is from the *current* reference.
        m.add("ref/logratio", (torch.cat([full_chosen, full_rejected]) - ref_full.detach()).sum() / 2)
    if live_weights is not None:
        penalty = mask_penalty(live_weights, _lengths(logps))   # [B] mean token weight of each pair
        per_pair = per_pair + mask_l1 * penalty
        m.add("mask/mean", penalty.detach().sum())
        low = (logps.token_weights[:, 1:] < 0.1) & batch.response_mask[:, 1:]                  # [2B, T-1]
        m.add("mask/below_0.1", mask_penalty(low.float(), _lengths(logps)).sum())
    if initial is not None:
        # KL(policy || initial) estimated on the batch's responses: mean of log pi - log pi_init.
        init = ref_full if initial is reference else initial.logps(batch)
        init_chosen, init_rejected = init.chunk(2)
        m.add("ref/kl_to_init", (torch.cat([full_chosen, full_rejected]) - init).sum() / 2)
        # The preference measured against the initial policy: comparable across moving references.
        margin = (full_chosen - init_chosen) - (full_rejected - init_rejected)
        m.add("ref/margin_vs_init", margin.sum())
        m.add("ref/accuracy_vs_init", (margin > 0).float().sum())
    return per_pair, m, logps


def kl_log_ratio(model, reference: Reference, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, int]:
    """KTO's KL rows, without gradient: (sum over them of log pi - log pi_ref, the reference log-probs of all
    2B rows [2B], B)."""
    B = batch.n_rows // 2
    with torch.no_grad():
        reference_logps = reference.logps(batch).detach()                            # [2B]
        policy_kl = sequence_logps(model, batch.select(slice(B, 2 * B)), pack=False).logps   # [B]
    return (policy_kl.detach() - reference_logps[B:]).sum(), reference_logps, B


def unpaired_forward(model, loss_fn: UnpairedLoss, reference: Reference, batch: Batch, z0=None,
                     reference_logps=None, initial: Reference | None = None, hooks: Sequence[StepHook] = ()):
    """KTO on B examples (rows 0..B-1; their KL rows B..2B-1) -> (loss [B], Metrics, CompletionLogps).

    `z0`: the step's reference point (`Unpaired.begin_step`); None estimates it from this batch's own KL rows
    (held-out batches). Metric names are TRL's KTOTrainer's: rewards/chosen is the mean over desirable rows."""
    B = batch.n_rows // 2
    if z0 is None or reference_logps is None:
        kl_sum, reference_logps, n = kl_log_ratio(model, reference, batch)
        z0 = loss_fn.reference_point(kl_sum, n)
    out = sequence_logps(model, batch.select(slice(0, B)), pack=False)        # logps [B]
    for h in hooks:
        h.on_logps(out.logps)
    labels = batch.extra["labels"]
    logps = CompletionLogps(out.logps, reference_logps[:B], labels, out.lengths, z0)
    per_example = loss_fn(*logps.args())                                      # [B]  (losses.kto_loss)
    rewards = loss_fn.rewards(out.logps, reference_logps[:B])
    policy = out.logps.detach()
    m = Metrics()
    m.add("loss", per_example.detach().sum())
    for side, mask in (("chosen", labels), ("rejected", ~labels)):
        m.add(f"rewards/{side}", (rewards * mask).sum(), per=f"count/{side}")
        m.add(f"logps/{side}", (policy * mask).sum(), per=f"count/{side}")
        m.add(f"count/{side}", mask.float().sum(), "sum")
    m.add("kl", z0 * B)                                                       # the mean z0 over the rows
    m.add("n_pairs", float(B), "sum")
    m.add("n_tokens", batch.attention_mask[:B].sum(), "sum")
    if initial is not None:
        delta = policy - initial.logps(batch)[:B]                             # [B] log pi - log pi_init
        m.add("ref/kl_to_init", delta.sum())
        m.add("ref/chosen_vs_init", (delta * labels).sum(), per="count/chosen")
        m.add("ref/rejected_vs_init", (delta * ~labels).sum(), per="count/rejected")
    return per_example, m, logps


class Objective:
    """What one item of a batch is, and how a step reads it. `unit` names the items in the log."""

    unit = "pairs"

    def begin_step(self, parts: StepParts, micro_batches: Sequence[Batch]) -> None:
        """Whatever the whole step's batch decides before the first micro-batch's loss."""

    def forward(self, parts: StepParts, batch: Batch, hooks: Sequence[StepHook]):
        return pair_forward(parts.model, parts.loss_fn, parts.reference, batch, parts.initial, hooks, parts.mask_l1)

    def heldout_metrics(self, model, loss_fn, reference, batch, initial, mask_l1) -> Metrics:
        return pair_forward(model, loss_fn, reference, batch, initial, mask_l1=mask_l1, train=False)[1]

    def complete(self, row: dict) -> dict:
        """Metrics derived after the reduction (KTO's margin of the two means)."""
        return row


class Unpaired(Objective):
    """KTO: z0 is estimated once per step over the KL rows of every micro-batch on every process (exact under
    gradient accumulation and DDP; TRL estimates it per micro-batch, which is the same with grad_accum=1)."""

    unit = "examples"

    def __init__(self):
        self.z0, self.reference_logps = None, {}

    def begin_step(self, parts: StepParts, micro_batches: Sequence[Batch]) -> None:
        total, n, self.reference_logps = 0.0, 0, {}
        for batch in micro_batches:
            kl_sum, self.reference_logps[id(batch)], b = kl_log_ratio(parts.model, parts.reference, batch)
            total, n = total + kl_sum, n + b
        summed = parts.accelerator.reduce(torch.stack([torch.as_tensor(total, dtype=torch.float32),
                                                       torch.tensor(float(n))]).to(parts.accelerator.device), "sum")
        self.z0 = parts.loss_fn.reference_point(summed[0], float(summed[1]))

    def forward(self, parts: StepParts, batch: Batch, hooks: Sequence[StepHook]):
        return unpaired_forward(parts.model, parts.loss_fn, parts.reference, batch, self.z0,
                                self.reference_logps.pop(id(batch)), parts.initial, hooks)

    def heldout_metrics(self, model, loss_fn, reference, batch, initial, mask_l1) -> Metrics:
        return unpaired_forward(model, loss_fn, reference, batch, initial=initial)[1]

    def complete(self, row: dict) -> dict:
        """rewards/margins and ref/margin_vs_init: the desirable mean minus the undesirable mean."""
        for prefix in ("", "eval/"):
            for margin, (chosen, rejected) in (("rewards/margins", ("rewards/chosen", "rewards/rejected")),
                                               ("ref/margin_vs_init", ("ref/chosen_vs_init", "ref/rejected_vs_init"))):
                if f"{prefix}{chosen}" in row and f"{prefix}{rejected}" in row:
                    row[f"{prefix}{margin}"] = row[f"{prefix}{chosen}"] - row[f"{prefix}{rejected}"]
        return row


def objective(loss_fn: Loss) -> Objective:
    """The objective of a loss: pairs for the margin family, examples for KTO."""
    return Objective() if loss_fn.paired else Unpaired()


def _lengths(logps: PairLogps) -> torch.Tensor:
    return torch.cat([logps.chosen_lengths, logps.rejected_lengths])


def train_step(parts: StepParts, micro_batches: Sequence[Batch], step: int) -> tuple[Metrics, list[dict] | None]:
    """Forward/backward over the micro-batches, clip, step, move the reference (`step` is 1-based).

    Returns this process's metric sums and the per-pair rows of the hooks that write them (None if none)."""
    acc, model, optimizer = parts.accelerator, parts.model, parts.optimizer
    hooks = [h for h in parts.hooks if isinstance(h, StepHook) and h.due(step)]
    # 1. Learning rate for this step (the scheduler advanced after the previous step); what the step's
    #    whole batch decides first (KTO's reference point z0).
    lr = parts.scheduler.get_last_lr()[0]
    for h in hooks:
        h.on_step_start(step, lr)
    goal = parts.objective
    with acc.autocast():   # mixed precision: the reference's forwards as the prepared policy's
        goal.begin_step(parts, micro_batches)
    n_pairs = sum(b.n_rows // 2 for b in micro_batches)
    scale = engine.loss_scale(acc, len(micro_batches))
    metrics = Metrics()
    for i, batch in enumerate(micro_batches):
        # 2. Gradients synchronise across processes only on the last micro-batch.
        with engine.accumulating(acc, model, last=i == len(micro_batches) - 1):
            # 3. Policy forward, reference log-probs if the loss has one, per-pair (per-example) loss.
            for h in hooks:
                h.before_forward(batch)
            with acc.autocast():
                per_pair, batch_metrics, logps = goal.forward(parts, batch, hooks)
            # 4. Backward of this micro-batch's share of the step's mean loss.
            acc.backward(per_pair.sum() * scale / n_pairs)
        # 5. Hooks read (or add to) what that backward left.
        for h in hooks:
            h.after_backward(batch, logps, parts.loss_fn)
        metrics.update(batch_metrics)
    # 6. Hooks may replace the gradient (pairwise-normalised update); then clip (or just measure) its norm.
    for h in hooks:
        h.before_optimizer(acc, n_pairs)
    params = [p for p in model.parameters() if p.requires_grad]
    max_norm = parts.max_grad_norm if parts.max_grad_norm is not None else math.inf
    grad_norm = torch.as_tensor(acc.clip_grad_norm_(params, max_norm)).detach().float()
    # 7. Optimiser step, unless the loss or gradient is not finite (then the step is skipped);
    #    hooks see the update; the reference moves on its schedule.
    finite = bool(torch.isfinite(grad_norm) & torch.isfinite(metrics["loss"]))   # the step's one host sync
    # A stateful loss (BCO's baseline) folds in this step's statistics from every micro-batch and process.
    parts.loss_fn.commit(lambda sums: acc.reduce(sums.to(acc.device), "sum") if finite else sums * math.nan)
    if finite:
        optimizer.step()
        parts.reference.after_step(step, model)
        parts.scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    metrics.add("grad_norm", grad_norm, "last")
    metrics.add("learning_rate", lr, "last")
    metrics.add("skipped", 0.0 if finite else 1.0, "last")
    # 8. What the hooks measured.
    rows = None
    for h in hooks:
        hook_metrics, hook_rows = h.finish(parts.model, micro_batches, finite)
        metrics.update(hook_metrics)
        rows = rows if hook_rows is None else (rows or []) + hook_rows
    return metrics, rows


@torch.no_grad()
def eval_batch(model, loss_fn: Loss, reference: Reference, batch: Batch, initial: Reference | None = None,
               mask_l1: float = 0.0) -> Metrics:
    """Metric sums of one held-out batch (never updates loss state)."""
    return objective(loss_fn).heldout_metrics(model, loss_fn, reference, batch, initial, mask_l1)
