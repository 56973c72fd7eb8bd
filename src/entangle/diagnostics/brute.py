"""The exact slow path: one backward per row, flattened gradients. The reference for every test."""

from __future__ import annotations

import torch

from entangle.batching import Batch
from entangle.logps import sequence_logps


def row_gradients(model, batch: Batch, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Flattened gradient of each row's summed response log-prob: [N, n_trainable] (float64).
    With token `weights` [N, T] (held fixed), of the weighted sum `sum_t m_t log pi_t` instead."""

    params = [p for p in model.parameters() if p.requires_grad]
    out = sequence_logps(model, batch, token_level=weights is not None)
    logps = out.logps if weights is None else (out.token_logps * weights.to(out.token_logps.dtype)).sum(1)
    rows = []
    for r in range(batch.n_rows):
        grads = torch.autograd.grad(logps[r], params, retain_graph=r < batch.n_rows - 1, allow_unused=True)
        rows.append(torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1).double()
                               for g, p in zip(grads, params)]))
    return torch.stack(rows)


def brute_force_stats(model, batch: Batch, weights: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Per-pair `norm_w2`, `norm_l2`, `inner` from per-row backward passes (rows i and i+B pair)."""
    g = row_gradients(model, batch, weights)
    B = batch.n_rows // 2
    gw, gl = g[:B], g[B:]
    return {"norm_w2": (gw * gw).sum(1), "norm_l2": (gl * gl).sum(1), "inner": (gw * gl).sum(1)}
