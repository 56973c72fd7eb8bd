"""Exact per-token attribution: one backward per response token (the GE paper's token view).

    view = token_gradients(model, prompt_ids, chosen_ids, rejected_ids, tokenizer)
    view["inner"]   # [len(chosen), len(rejected)]: <grad log p(y_w,i), grad log p(y_l,j)>
    view["cos"]     # the same as cosines; rows sum (inner) to <grad log p(y_w,i), grad log pi_l>

Token gradients sum to the response gradients, so `inner.sum()` is the pair's `<grad_w, grad_l>`.
Cost: len(chosen) + len(rejected) backward passes; meant for a few pairs.
"""

from __future__ import annotations

import torch


def _token_grads(model, prompt_ids: list[int], response_ids: list[int], dtype=torch.float64):
    """Yield the flattened gradient of each response token's log-prob, one at a time ([n_trainable])."""
    params = [p for p in model.parameters() if p.requires_grad]
    device = params[0].device
    ids = torch.tensor([list(prompt_ids) + list(response_ids)], device=device)
    n = len(prompt_ids)
    logits = model(input_ids=ids).logits[0, n - 1 : -1]                       # [R, V]
    lp = torch.log_softmax(logits.float() if logits.dtype not in (torch.float32, torch.float64) else logits, -1)
    tok = lp.gather(1, ids[0, n:, None])[:, 0]                                  # [R]
    for k in range(len(response_ids)):
        g = torch.autograd.grad(tok[k], params, retain_graph=k < len(response_ids) - 1, allow_unused=True)
        yield torch.cat([(torch.zeros_like(p) if x is None else x).reshape(-1).to(dtype) for x, p in zip(g, params)])


def token_gradients(model, prompt_ids, chosen_ids, rejected_ids, tokenizer=None, max_bytes: int = 2**31) -> dict:
    """The rejected tokens' gradients are held ([len(rejected), n_trainable]); the chosen ones are streamed.
    float64 while that fits in `max_bytes`, else float32 (a 135M model: 0.5 GB per token)."""
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    dtype = torch.float64 if n_params * len(rejected_ids) * 8 <= max_bytes else torch.float32
    gl = torch.stack(list(_token_grads(model, prompt_ids, rejected_ids, dtype)))   # [Tl, P]
    gl_sum = gl.sum(0)
    rows, gw_sum, gw_norms = [], torch.zeros_like(gl_sum), []
    for g in _token_grads(model, prompt_ids, chosen_ids, dtype):
        rows.append((gl @ g).double())                                          # [Tl]
        gw_norms.append(g.double().norm())
        gw_sum += g
        del g
    inner = torch.stack(rows)                                                   # [Tw, Tl]
    cos = inner / (torch.stack(gw_norms)[:, None] * gl.double().norm(dim=1)[None, :]).clamp_min(1e-300)
    norm_w, norm_l = gw_sum.double().norm(), gl_sum.double().norm()             # |grad log pi_w|, |grad log pi_l|
    pair_inner = float(gw_sum.double() @ gl_sum.double())
    decode = (lambda ids: [tokenizer.decode([i]) for i in ids]) if tokenizer is not None else (lambda ids: list(ids))
    return {"chosen_tokens": decode(chosen_ids), "rejected_tokens": decode(rejected_ids),
            "inner": inner, "cos": cos,
            "chosen_share": inner.sum(1), "rejected_share": inner.sum(0),      # per-token shares of <grad_w, grad_l>
            "total_inner": pair_inner, "pair_cos": pair_inner / max(float(norm_w * norm_l), 1e-300)}


def to_json(view: dict) -> dict:
    return {k: (v.tolist() if isinstance(v, torch.Tensor) else v) for k, v in view.items()}
