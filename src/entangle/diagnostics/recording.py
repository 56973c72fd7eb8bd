"""One owner of a `GradientRecorder` per step hook: per-row gradient data of one micro-batch's backward.

    rec = RowRecording(model, "entanglement")
    rec.begin(batch); rec.watch(scored_logps); <backward>; got = rec.end()
    # got.stats {"norm_w2","norm_l2","inner"} [B], got.usages, got.coef [2B]; None where the fast path
    # cannot be exact (said once; the caller takes its exact per-row path)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from entangle.diagnostics.ghost import GradientRecorder, Unsupported, row_layout

log = logging.getLogger(__name__)


@dataclass
class Recorded:
    stats: dict[str, torch.Tensor]   # per pair: norm_w2, norm_l2, inner (float64, coefficients divided out)
    usages: dict                     # id(param) -> recorded usages (for weighted sums and directions)
    coef: torch.Tensor               # [2B] dL/d log pi_r of each row
    sums: dict                       # with sums=True: {"w"|"l": {id(param): batch sum}} (GradientRecorder.result)


class RowRecording:
    def __init__(self, model, what: str, sums: bool = False):
        self.recorder = GradientRecorder(model)
        self.what, self.sums = what, sums
        self.coef: torch.Tensor | None = None
        self._warned = False

    @property
    def params(self) -> dict[int, torch.nn.Parameter]:
        return self.recorder.params

    def begin(self, batch) -> None:
        """Record the next forward (a concatenated pair batch)."""
        self.coef = None
        self.recorder.start(batch.n_rows, *row_layout(batch))

    def watch(self, scored: torch.Tensor) -> None:
        """Capture dL/d log pi_r of every row during the backward."""
        if scored.requires_grad:
            self.recorder.side_pass(scored)      # prefix-shared rows: the chosen part of the shared gradients
            scored.register_hook(lambda g: setattr(self, "coef", g.detach()))

    def end(self) -> Recorded | None:
        """After the backward: the recorded per-row data, or None where the fast path cannot be exact."""
        self.recorder.stop()
        try:
            if self.coef is None:
                raise Unsupported("the scored log-probs received no gradient")
            stats = self.recorder.result(self.coef, self.sums)
        except Unsupported as e:
            if not self._warned:
                log.warning("%s: fast path not applicable (%s); using exact per-row backward passes", self.what, e)
                self._warned = True
            self.recorder.take()
            return None
        return Recorded(stats, self.recorder.take(), self.coef, self.recorder.sums)
