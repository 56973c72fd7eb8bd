"""The gradient-entanglement paper's mitigations (spec sec. 5): the pairwise-normalised update and
the learned sparse token mask.

    normalizer = PairwiseNormalizer(model)      # optimizer.pairwise_normalized: true; a StepHook whose
    # after_backward adds each micro-batch's normalised directions and before_optimizer replaces .grad

Pairwise-normalised update: step along `sum_i d_w,i grad_w,i/|grad_w,i| - d_l,i grad_l,i/|grad_l,i|`
(for DPO d_w = d_l = the loss's scalar weight). To first order under a plain gradient step, a pair
alone then lands in case 1: `d log pi_w ~ |grad_w| (d_w - d_l cos) > 0` and
`d log pi_l ~ |grad_l| (d_w cos - d_l) < 0` whenever d_w = d_l and cos < 1.
The per-row norms and the weighted sum come from the training backward's own recorded activations
(the diagnostics' recorder); where it cannot apply, per-row backward passes give the same numbers.

Sparse token mask (`loss.token_mask: sparse`): `TokenMask` gives each scored response token a weight
`m_t = sigmoid(w . h_t + b)` in [0, 1] from the policy's hidden state `h_t` (detached: the mask learns
from the model's features but sends no gradient into it). The margin then uses
`sum_t m_t (log pi_t - log pi_ref,t)` for both responses, and `loss.mask_l1` times the pair's mean
weight is added to the loss, so that tokens which do not separate chosen from rejected drop out.
"""

from __future__ import annotations

import logging
import math

import torch

from entangle import losses
from entangle.batching import Batch
from entangle.diagnostics.brute import row_gradients
from entangle.diagnostics.ghost import wide
from entangle.diagnostics.recording import RowRecording
from entangle.errors import ModelError
from entangle.hooks import StepHook
from entangle.logps import MASK_NEEDS_LAYOUT, split_model

log = logging.getLogger(__name__)


class TokenMask(torch.nn.Module):
    """Per-token weights in [0, 1] from hidden states: `forward(h [K, d]) -> m [K]`.

    Starts at `init` for every token (zero weight vector), so step 0 is the unmasked loss scaled by `init`."""

    def __init__(self, hidden_size: int, init: float = 0.9):
        super().__init__()
        self.proj = torch.nn.Linear(hidden_size, 1)
        with torch.no_grad():
            self.proj.weight.zero_()
            self.proj.bias.fill_(math.log(init / (1 - init)))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        h = hidden.detach().to(self.proj.weight.dtype)
        return torch.sigmoid(self.proj(h)).squeeze(-1)        # [K]


def make_token_mask(model, loss_cfg, device):
    """The learned token mask of `loss.token_mask: sparse` (float32, on `device`), or None."""
    if loss_cfg.token_mask != "sparse":
        return None
    parts = split_model(model)
    if parts is None:
        raise ModelError(f"{type(model).__name__}: {MASK_NEEDS_LAYOUT}")
    return TokenMask(parts[1].weight.shape[1], loss_cfg.mask_init).to(device)


def mask_penalty(weights: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """L1 of the token weights per pair: the mean weight over both responses' scored tokens. [2B, T] -> [B]."""
    per_row = weights.sum(1)                                   # [2B]
    (sc, sr), (lc, lr) = per_row.chunk(2), lengths.chunk(2)
    return (sc + sr) / (lc + lr).clamp_min(1)


class PairwiseNormalizer(StepHook):
    """`optimizer.pairwise_normalized`: a `StepHook` that replaces the step's gradient before clipping."""

    reads_activations = True   # per-row gradients from the recorded activations (diagnostics.ghost)

    def __init__(self, model):
        self.model = model
        self.recording = RowRecording(model, "pairwise_normalized")
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.direction: dict[int, torch.Tensor] = {}

    def before_forward(self, batch: Batch) -> None:
        self.recording.begin(batch)

    def on_logps(self, scored: torch.Tensor) -> None:
        self.recording.watch(scored)

    def after_backward(self, batch: Batch, logps, loss_fn) -> None:
        """Add this micro-batch's pairs to the normalised direction."""
        d_w, d_l = losses.coefficients(loss_fn, *logps.args())
        d = torch.cat([d_w, -d_l]).double().cpu()                    # [N]: +d_w on chosen rows, -d_l on rejected
        got = self.recording.end()
        if got is None:
            part = self._exact(batch, d, logps.token_weights)
        else:
            norms = torch.cat([got.stats["norm_w2"], got.stats["norm_l2"]]).sqrt()
            ok = norms > 0
            # the recorded output gradients carry c_r = dL/dlog pi_r; 1/c_r turns them into grad log pi_r
            weights = torch.where(ok, d / torch.where(ok, norms * got.coef.double().cpu(), 1.0), 0.0)
            part = self.recording.recorder.weighted_sum(got.usages, weights)
        for pid, v in part.items():
            self.direction[pid] = self.direction[pid] + v if pid in self.direction else v

    def _exact(self, batch: Batch, d: torch.Tensor, weights=None) -> dict[int, torch.Tensor]:
        with torch.enable_grad():
            g = row_gradients(self.model, batch, weights)                      # [N, P]
        norms = g.norm(dim=1)
        ok = norms > 0
        flat = (torch.where(ok, d / torch.where(ok, norms, 1.0), 0.0)[:, None] * g).sum(0)   # [P]
        out, k = {}, 0
        for p in self.params:
            out[id(p)] = flat[k : k + p.numel()].view(p.shape).to(wide(p.dtype))
            k += p.numel()
        return out

    @torch.no_grad()
    def before_optimizer(self, accelerator, n_pairs: int) -> None:
        """Replace every trainable parameter's gradient by `-direction / n_pairs` (mean over processes)."""
        for p in self.params:
            v = self.direction.get(id(p))
            g = torch.zeros_like(p) if v is None else (-v / n_pairs).to(p.dtype)
            p.grad = accelerator.reduce(g, reduction="mean")
        self.direction = {}
