"""Exact per-token attribution: one backward per response token (the GE paper's token view).

    view = token_gradients(model, prompt_ids, chosen_ids, rejected_ids, tokenizer)
    view["inner"]   # [len(chosen), len(rejected)]: <grad log p(y_w,i), grad log p(y_l,j)>
    view["cos"]     # the same as cosines; rows sum (inner) to <grad log p(y_w,i), grad log pi_l>

Token gradients sum to the response gradients, so `inner.sum()` is the pair's `<grad_w, grad_l>`.
Cost: len(chosen) + len(rejected) backward passes; meant for a few pairs. Memory is bounded (`TOKEN_BUDGET`):
past it, each token gradient is sketched (CountSketch, stated error) instead of held.
"""

from __future__ import annotations

import torch

from entangle.logps import response_logps


def _token_grads(model, prompt_ids: list[int], response_ids: list[int], dtype=torch.float64, reduce=None):
    """Yield the gradient of each response token's log-prob, one at a time: flattened ([n_trainable]), or
    `reduce(grads)` of the per-parameter gradients when given (no flat copy is made)."""
    params = [p for p in model.parameters() if p.requires_grad]
    device = params[0].device
    ids = torch.tensor([list(prompt_ids) + list(response_ids)], device=device)
    resp = torch.zeros_like(ids, dtype=torch.bool)
    resp[0, len(prompt_ids):] = True
    tok = response_logps(model, ids, torch.ones_like(ids), resp).tokens         # [R], with the graph
    for k in range(len(response_ids)):
        g = torch.autograd.grad(tok[k], params, retain_graph=k < len(response_ids) - 1, allow_unused=True)
        g = [torch.zeros_like(p) if x is None else x for x, p in zip(g, params)]
        yield reduce(g) if reduce is not None else torch.cat([x.reshape(-1).to(dtype) for x in g])
        del g


SKETCH_DIM = 2**16   # buckets of the CountSketch used when exact token gradients exceed the budget
TOKEN_BUDGET = 2**30  # bytes of per-token gradients held at once (1 GiB)


class _CountSketch:
    """A seeded CountSketch of [n] vectors into [k]: coordinate i goes to bucket h(i) with sign s(i). For any a, b,
    <S a, S b> is an unbiased estimate of <a, b> with variance at most (|a|^2 |b|^2 + <a, b>^2) / k, so a cosine
    is within about sqrt(2 / k) (one standard deviation; 0.0055 at k = 2^16)."""

    CHUNK = 2**24   # coordinates hashed at a time (the int64 index of a chunk is 128 MiB)

    def __init__(self, n: int, k: int, seed: int, device):
        if not 2 <= k <= 2**16:
            raise ValueError(f"sketch_dim must be in [2, 65536] (got {k})")
        g = torch.Generator(device="cpu").manual_seed(seed)
        self.k = k
        # bucket - 2^15 fits int16: 2 bytes a coordinate (270 MB for a 135M model), signs 1 byte
        self.bucket = (torch.randint(0, k, (n,), generator=g, dtype=torch.int32) - 2**15).to(torch.int16).to(device)
        self.sign = torch.randint(0, 2, (n,), generator=g, dtype=torch.int8).to(device)               # [n] 0/1

    def __call__(self, grads: list[torch.Tensor]) -> torch.Tensor:
        """Per-parameter gradients (in the order of `model.parameters()`, modified in place) -> [k] float64."""
        out = torch.zeros(self.k, dtype=torch.float32, device=grads[0].device)
        offset = 0
        for x in grads:
            flat = x.reshape(-1)
            for a in range(0, flat.numel(), self.CHUNK):
                part, at = flat[a : a + self.CHUNK].float(), offset + a
                part.mul_(self.sign[at : at + part.numel()] * 2 - 1)                                 # random signs
                out.index_add_(0, self.bucket[at : at + part.numel()].long() + 2**15, part)
            offset += flat.numel()
        return out.double()


def token_gradients(model, prompt_ids, chosen_ids, rejected_ids, tokenizer=None, max_bytes: int = TOKEN_BUDGET,
                    sketch_dim: int = SKETCH_DIM, seed: int = 0) -> dict:
    """The per-token view of one pair, in bounded memory. Exact when the rejected tokens' gradients fit in
    `max_bytes` (held as [len(rejected), n_trainable], float64 if that fits, else float32; the chosen ones are
    streamed). Otherwise every token gradient is reduced to a `sketch_dim` CountSketch as it is made (`method`:
    "sketch", with `sketch_error`: one standard deviation of a cosine), so memory is a few gradients whatever
    the model size and the number of tokens."""
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    exact_bytes = n_params * len(rejected_ids)
    if exact_bytes * 4 <= max_bytes:
        dtype = torch.float64 if exact_bytes * 8 <= max_bytes else torch.float32
        reduce, info = None, {"method": "exact"}
    else:
        device = next(p for p in model.parameters() if p.requires_grad).device
        dtype, reduce = torch.float32, _CountSketch(n_params, sketch_dim, seed, device)
        info = {"method": "sketch", "sketch_dim": sketch_dim, "sketch_error": (2 / sketch_dim) ** 0.5}
    gl = torch.stack(list(_token_grads(model, prompt_ids, rejected_ids, dtype, reduce)))          # [Tl, P or k]
    gl_sum = gl.sum(0)
    rows, gw_sum, gw_norms = [], torch.zeros_like(gl_sum), []
    for g in _token_grads(model, prompt_ids, chosen_ids, dtype, reduce):                           # [P or k]
        rows.append((gl @ g).double())                                                              # [Tl]
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
            "total_inner": pair_inner, "pair_cos": pair_inner / max(float(norm_w * norm_l), 1e-300), **info}


def to_json(view: dict) -> dict:
    return {k: (v.tolist() if isinstance(v, torch.Tensor) else v) for k, v in view.items()}
