"""The StepHook protocol: everything that watches or alters a training step plugs in here.

    class NormLogger(StepHook):                 # a new diagnostic is one class like this
        def after_backward(self, batch, logps, loss_fn):
            self.sizes.append(logps.policy_chosen_logps.detach())
        def finish(self):
            m = Metrics(); m.add("my/chosen", torch.cat(self.sizes).sum()); self.sizes = []
            return m, None                  # None: no per-pair rows for entanglement.jsonl
    fit(build(cfg, hooks=[NormLogger()]))

Per optimiser step the step calls, for every hook with `due(step)`:
  on_step_start(step, lr)                   before the first micro-batch
  before_forward(batch)                     each micro-batch, before the policy forward
  on_logps(scored)                          the scored log-prob tensor [2B] (register gradient hooks here)
  after_backward(batch, logps, loss_fn)     each micro-batch, after its backward (`logps`: a PairLogps)
  before_optimizer(accelerator, n_pairs)    after the last backward, before clipping (may replace .grad)
  after_optimizer(policy, micro_batches)    after the optimiser step (not on skipped, non-finite steps)
  finish() -> (Metrics, rows | None)        this step's metric sums and per-pair rows (entanglement.jsonl)
and the loop calls, on every process:
  after_step(ctx, rows)                     with the step's rows (write files, views)
  evaluates(step) -> bool                   whether it asks for an evaluation at that step
  on_evaluate(ctx) -> dict                  at evaluation steps, policy in eval mode: extra `eval/...` metrics
  on_fit_end(ctx)                           once, after the final weights are saved
Hooks never branch on each other; the step loops over them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from entangle.metrics import Metrics


@dataclass
class HookContext:
    """What the loop hands its hooks: the run's pieces that a hook may read (never replace)."""

    accelerator: Any
    run_dir: str
    tokenizer: Any
    policy: Any                   # the prepared policy
    step: int                     # optimiser steps done (1-based after the first step; 0 before it)
    step_pairs: list = field(default_factory=list)    # TokenizedPairs of this step (all processes)
    eval_pairs: list = field(default_factory=list)
    train_pairs: list = field(default_factory=list)
    is_main: bool = True


class StepHook:
    """A no-op hook: subclasses override the call points they need."""

    needs_rows = False   # True: while due, the step runs two rows per pair (no prefix sharing, no recompute)

    def due(self, step: int) -> bool:
        """Whether the hook takes part in optimiser step `step` (1-based)."""
        return True

    def on_step_start(self, step: int, lr: float) -> None: ...

    def before_forward(self, batch) -> None: ...

    def on_logps(self, scored) -> None: ...

    def after_backward(self, batch, logps, loss_fn) -> None: ...

    def before_optimizer(self, accelerator, n_pairs: int) -> None: ...

    def after_optimizer(self, policy, micro_batches) -> None: ...

    def finish(self) -> tuple[Metrics, list[dict] | None]:
        return Metrics(), None

    def after_step(self, ctx: HookContext, rows: list[dict]) -> None: ...

    def evaluates(self, step: int) -> bool:
        """Whether the hook wants an evaluation at step `step` (0: before training, with train.eval_at_start)."""
        return False

    def on_evaluate(self, ctx: HookContext) -> dict:
        return {}

    def on_fit_end(self, ctx: HookContext) -> None: ...
