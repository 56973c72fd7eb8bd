"""Gradient entanglement: per-pair inner products of the chosen and rejected log-prob gradients.

    from entangle.diagnostics import entanglement_stats
    stats = entanglement_stats(model, pairs)   # pairs: TokenizedPairs (tokenize_pairs) or dicts of the three id lists
    # -> {"inner", "norm_w2", "norm_l2", "cos"}: float tensors [len(pairs)]

The fast path (`ghost.GradientRecorder`) reads the statistics off one backward pass; where it cannot
be exact it raises `Unsupported` and the exact slow path (`brute.brute_force_stats`) is used instead.
"""

from __future__ import annotations

import logging

import torch

from entangle.data import TokenizedPair
from entangle.batching import collate
from entangle.diagnostics.brute import brute_force_stats
from entangle.diagnostics.ghost import GradientRecorder, Unsupported, row_layout
from entangle.logps import sequence_logps

log = logging.getLogger(__name__)

__all__ = ["entanglement_stats", "with_cos", "GradientRecorder", "Unsupported", "brute_force_stats",
           "classify", "predicted_changes"]


def with_cos(stats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    denom = (stats["norm_w2"] * stats["norm_l2"]).sqrt().clamp_min(1e-300)
    return {**stats, "cos": stats["inner"] / denom}


def _tokenized(pairs, tokenizer) -> list[TokenizedPair]:
    """`entanglement_stats`'s pairs as TokenizedPair, in order (text records tokenised with `tokenizer`)."""
    from entangle.data import encode_prompt_response, parse_pair
    from entangle.errors import DataError

    items = []
    for i, p in enumerate(pairs):
        if isinstance(p, TokenizedPair):
            items.append(TokenizedPair(list(p.prompt_ids), list(p.chosen_ids), list(p.rejected_ids), i))
        elif isinstance(p, dict) and "prompt_ids" in p:
            items.append(TokenizedPair(list(p["prompt_ids"]), list(p["chosen_ids"]), list(p["rejected_ids"]), i))
        elif isinstance(p, dict) and tokenizer is not None:
            ex = parse_pair(p, f"pair {i + 1}")
            prompt, chosen = encode_prompt_response(tokenizer, ex.prompt, ex.chosen, ex.where)
            _, rejected = encode_prompt_response(tokenizer, ex.prompt, ex.rejected, ex.where)
            items.append(TokenizedPair(prompt, chosen, rejected, i))
        else:
            raise DataError(f"pair {i + 1}: give prompt_ids/chosen_ids/rejected_ids, or a prompt/chosen/rejected "
                            "text record with tokenizer=...")
    return items


def entanglement_stats(model, pairs, method: str = "fast", pad_id: int | None = None,
                       tokenizer=None, pack: bool = True) -> dict[str, torch.Tensor]:
    """Exact <grad log pi_w, grad log pi_l>, norms and cosine per pair, over parameters with requires_grad.

    `pairs`: `TokenizedPair`s, dicts of `prompt_ids`/`chosen_ids`/`rejected_ids`, or text records
    (`prompt`/`chosen`/`rejected`, strings or chat messages, as `entangle train` reads them) with `tokenizer`
    (tokenised as training does, the response ending with EOS). `log pi(y|x)` is the sum of the log-probs of
    the response ids after the prompt ids. `method`: "fast" (one backward, falls back to "exact" where it
    cannot apply) or "exact". `pack`: the fast path runs each pair as one prefix-shared row where the model allows
    it (as training does), else two rows per pair. Returns tensors [n_pairs]: inner, norm_w2, norm_l2, cos."""
    items = _tokenized(pairs, tokenizer)
    if pad_id is None:
        pad_id = 0 if tokenizer is None or tokenizer.pad_token_id is None else tokenizer.pad_token_id
    device = next(model.parameters()).device
    batch = collate(items, pad_id, pack=pack).to(device)
    if method == "fast":
        rec = GradientRecorder(model)
        try:
            model.zero_grad(set_to_none=True)
            rec.start(batch.n_rows, *row_layout(batch))
            logps = sequence_logps(model, batch).logps
            rec.stop()
            rec.side_pass(logps)   # prefix-shared rows: the chosen part of the prompt's gradients
            logps.sum().backward()  # coefficient 1 per row: the output gradients are d log pi_r / d out
            stats = rec.result(torch.ones(batch.n_rows))
        except Unsupported as e:
            log.warning("entanglement_stats: fast path not applicable (%s); using the exact slow path", e)
            method = "exact"
        finally:
            rec.close()
            model.zero_grad(set_to_none=True)
    if method == "exact":
        stats = brute_force_stats(model, batch)
    elif method != "fast":
        raise ValueError(f"method must be 'fast' or 'exact', got {method!r}")
    return {k: v.float() if v.dtype == torch.float64 and next(model.parameters()).dtype != torch.float64 else v
            for k, v in with_cos(stats).items()}


def predicted_changes(stats, d_w, d_l, lr: float):
    """First-order changes of both log-probs for an SGD step of size lr on each pair alone (spec §3)."""
    pred_w = lr * (d_w * stats["norm_w2"] - d_l * stats["inner"])
    pred_l = lr * (d_w * stats["inner"] - d_l * stats["norm_l2"])
    return pred_w, pred_l


def classify(pred_w: torch.Tensor, pred_l: torch.Tensor) -> torch.Tensor:
    """1: chosen up, rejected down; 2: both down; 3: both up; 0: chosen down, rejected up."""
    up_w, up_l = pred_w > 0, pred_l > 0
    case = torch.zeros_like(pred_w, dtype=torch.long)
    case[up_w & ~up_l] = 1
    case[~up_w & ~up_l] = 2
    case[up_w & up_l] = 3
    return case
