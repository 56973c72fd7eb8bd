"""Exact per-token attribution: one backward per response token (the GE paper's token view).

    view = token_gradients(model, prompt_ids, chosen_ids, rejected_ids, tokenizer)
    view["inner"]   # [len(chosen), len(rejected)]: <grad log p(y_w,i), grad log p(y_l,j)>
    view["cos"]     # the same as cosines; rows sum (inner) to <grad log p(y_w,i), grad log pi_l>

Token gradients sum to the response gradients, so `inner.sum()` is the pair's `<grad_w, grad_l>`.
Cost: len(chosen) + len(rejected) backward passes; meant for a few pairs.
"""

from __future__ import annotations

import torch


def _token_grads(model, prompt_ids: list[int], response_ids: list[int]) -> torch.Tensor:
    """[len(response), n_trainable]: gradient of each response token's log-prob (float64)."""
    params = [p for p in model.parameters() if p.requires_grad]
    device = params[0].device
    ids = torch.tensor([list(prompt_ids) + list(response_ids)], device=device)
    n = len(prompt_ids)
    logits = model(input_ids=ids).logits[0, n - 1 : -1]                       # [R, V]
    lp = torch.log_softmax(logits.float() if logits.dtype not in (torch.float32, torch.float64) else logits, -1)
    tok = lp.gather(1, ids[0, n:, None])[:, 0]                                  # [R]
    rows = []
    for k in range(len(response_ids)):
        g = torch.autograd.grad(tok[k], params, retain_graph=k < len(response_ids) - 1, allow_unused=True)
        rows.append(torch.cat([(torch.zeros_like(p) if x is None else x).reshape(-1).double()
                               for x, p in zip(g, params)]))
    return torch.stack(rows)


def token_gradients(model, prompt_ids, chosen_ids, rejected_ids, tokenizer=None) -> dict:
    gw = _token_grads(model, prompt_ids, chosen_ids)                            # [Tw, P]
    gl = _token_grads(model, prompt_ids, rejected_ids)                          # [Tl, P]
    inner = gw @ gl.T                                                           # [Tw, Tl]
    cos = inner / (gw.norm(dim=1)[:, None] * gl.norm(dim=1)[None, :]).clamp_min(1e-300)
    norm_w, norm_l = gw.sum(0).norm(), gl.sum(0).norm()                          # |grad log pi_w|, |grad log pi_l|
    decode = (lambda ids: [tokenizer.decode([i]) for i in ids]) if tokenizer is not None else (lambda ids: list(ids))
    return {"chosen_tokens": decode(chosen_ids), "rejected_tokens": decode(rejected_ids),
            "inner": inner, "cos": cos,
            "chosen_share": inner.sum(1), "rejected_share": inner.sum(0),      # per-token shares of <grad_w, grad_l>
            "total_inner": float(inner.sum()), "pair_cos": float(inner.sum() / (norm_w * norm_l).clamp_min(1e-300))}


def to_json(view: dict) -> dict:
    return {k: (v.tolist() if isinstance(v, torch.Tensor) else v) for k, v in view.items()}
