"""Two small protocols for what watches or alters training: step hooks inside one optimisation step, loop
callbacks between steps.

    class NormLogger(StepHook):                 # a new diagnostic is one class like this
        def after_backward(self, batch, logps, loss_fn):
            self.sizes.append(logps.policy_chosen_logps.detach())
        def finish(self, policy, micro_batches, stepped):
            m = Metrics(); m.add("my/chosen", torch.cat(self.sizes).sum()); self.sizes = []
            return m, None                  # None: no per-pair rows for entanglement.jsonl
    fit(build(cfg, hooks=[NormLogger()]))

`StepHook`: for every hook with `due(step)` (and, if any such hook `reads_activations`, without activation
checkpointing), the step calls, in order:
  on_step_start(step, lr)                   before the first micro-batch
  before_forward(batch)                     each micro-batch, before the policy forward
  on_logps(scored)                          the scored log-prob tensor [2B] (register gradient hooks here)
  after_backward(batch, logps, loss_fn)     each micro-batch, after its backward (`logps`: a PairLogps)
  before_optimizer(accelerator, n_pairs)    after the last backward, before clipping (may replace .grad)
  finish(policy, micro_batches, stepped)    after the optimiser step (`stepped` False on a skipped, non-finite
                                            step) -> (Metrics, rows | None): metric sums, per-pair rows

`LoopCallback`: the loop calls, on every process:
  after_step(ctx, rows)                     after every step, with the step's per-pair rows (write files, views)
  on_evaluate(ctx) -> dict                  at evaluation steps (`evaluates(step)`), policy in eval mode: extra
                                            `eval/...` metrics
  on_fit_end(ctx)                           once, after the final weights are saved

A class may be both (the entanglement probe measures inside steps and writes views after them). Hooks never
branch on each other; the step and the loop loop over them.
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
    """Inside one optimisation step: a no-op hook; subclasses override the call points they need."""

    reads_activations = False   # True: while due, the step keeps every activation (no activation checkpointing)

    def due(self, step: int) -> bool:
        """Whether the hook takes part in optimiser step `step` (1-based)."""
        return True

    def on_step_start(self, step: int, lr: float) -> None: ...

    def before_forward(self, batch) -> None: ...

    def on_logps(self, scored) -> None: ...

    def after_backward(self, batch, logps, loss_fn) -> None: ...

    def before_optimizer(self, accelerator, n_pairs: int) -> None: ...

    def finish(self, policy, micro_batches, stepped: bool) -> tuple[Metrics, list[dict] | None]:
        return Metrics(), None


class LoopCallback:
    """Between optimisation steps: a no-op callback; subclasses override what they need."""

    def after_step(self, ctx: HookContext, rows: list[dict]) -> None: ...

    def evaluates(self, step: int) -> bool:
        """Whether the callback wants an evaluation at step `step` (0: before training, with train.eval_at_start)."""
        return False

    def on_evaluate(self, ctx: HookContext) -> dict:
        return {}

    def on_fit_end(self, ctx: HookContext) -> None: ...


def split(hooks) -> tuple[list[StepHook], list[LoopCallback]]:
    """The step hooks and the loop callbacks among `hooks` (an object may be both)."""
    return [h for h in hooks if isinstance(h, StepHook)], [h for h in hooks if isinstance(h, LoopCallback)]


def activations_read(hooks, step: int) -> bool:
    """Whether some step hook due at step `step` reads the forward's activations, so that the step must run
    without activation checkpointing (decided here only)."""
    return any(isinstance(h, StepHook) and h.reads_activations and h.due(step) for h in hooks)
