"""Per-row gradient inner products from one backward pass, without per-row backward passes.

While a `GradientRecorder` is attached, every module that owns trainable parameters records its
input (forward hook) and the gradient of its output (tensor hook). Because row r of a batch reaches
the loss only through its log-prob, that output gradient is `c_r * d log pi_r / d output`; the
recorder divides `c_r` out at the end. Per kind of module:

- Linear / Conv1D (LoRA A and B included): `<G_r^T A_r, G_s^T A_s> = sum((A_r A_s^T) * (G_r G_s^T))`
  ("ghost" Gram products), or the per-row weight gradients materialised when that is cheaper.
- Embedding: `sum((G_r G_s^T) * [id_r == id_s])`.
- Anything else (RMSNorm, LayerNorm, ...): per-row gradients by `torch.func.vjp` of the module.
- Tied parameters (GPT-2 / SmolLM2 embeddings = LM head): the sum over usages, with cross terms.

`result()` returns, for each pair i (rows i and i+B), `<g_w,g_w>`, `<g_l,g_l>`, `<g_w,g_l>`.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn
from torch.func import functional_call, jvp, vjp, vmap

from entangle.logps import head_layout, listen, packed_layout, split_model
from entangle.models import module_kind


def wide(dtype: torch.dtype) -> torch.dtype:
    """The dtype gradient sums and updates are measured in: float64 stays, bf16/fp16/fp32 become float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def row_layout(batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Real tokens per row [N] and prompt length per pair [B] of a concatenated pair batch."""
    B = batch.n_rows // 2
    return batch.attention_mask.sum(1), batch.response_mask[:B].int().argmax(1)


class Unsupported(Exception):
    """The recorder cannot give exact numbers for this model or batch; use the exact slow path."""


class _Usage:
    __slots__ = ("module", "kind", "x", "g", "n", "pos", "out", "g_chosen", "lengths", "dense")

    def __init__(self, module, kind, x, n, pos=None, out=None, lengths=None):
        self.module, self.kind, self.x, self.g, self.n, self.pos = module, kind, x, None, n, pos
        self.out, self.g_chosen = out, None   # prefix-shared rows only: the output, d sum(log pi_w) / d output
        self.lengths = lengths                # [N] real tokens per row (right padding), None: every position
        self.dense: dict[int, torch.Tensor] = {}   # id(param) -> per-row gradients of a small generic module


def _emb_grad(use) -> torch.Tensor:
    """The embedding output gradient, zero where the id is the padding index (which gets no gradient)."""
    ids, g = use.x[0], use.g
    pad = use.module.padding_idx
    return g if pad is None else g * (ids != pad).unsqueeze(-1).to(g.dtype)


def _rows3d(x: torch.Tensor, n: int, rows: torch.Tensor | None) -> torch.Tensor:
    """[N, T, ...] as is; a 2-D [K, d] activation with its row map -> zero-padded [N, Kmax, d]."""
    if x.dim() >= 3 or (x.dim() == 2 and rows is None):
        return x
    counts = torch.bincount(rows, minlength=n)
    out = x.new_zeros((n, int(counts.max()), x.shape[-1]))
    pos = torch.arange(len(rows), device=rows.device) - torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
    out[rows, pos] = x
    return out


def _full(t: torch.Tensor) -> torch.Tensor:
    """A captured activation or output gradient in float32 when autocast made it bf16/fp16: under CUDA mixed
    precision a linear's input stays float32 while its output (and so its gradient) is bf16, and their
    products must share a dtype (measured failing on an H200 before this)."""
    return t.float() if t.dtype in (torch.bfloat16, torch.float16) else t


class GradientRecorder:
    """Attach around one forward+backward of a concatenated pair batch (chosen rows, then rejected)."""

    QUIET = "entangle_recorders_quiet"   # on the model: > 0 while a recorder re-runs one of its modules (vjp)
    KEEP_DENSE = 1 << 22                 # per-row gradients of a generic module kept up to this many numbers

    def __init__(self, model: nn.Module):
        self.model = model
        parts = split_model(model)
        self.head = parts[1] if parts is not None else None    # carries the row layout of the response-only head
        self.handles: list = []
        self.usages: dict[int, list[_Usage]] = {}   # id(param) -> usages
        self.params: dict[int, nn.Parameter] = {}
        self.n_rows = 0
        self.sums: dict[str, dict[int, torch.Tensor]] = {"w": {}, "l": {}}   # see result(sums=True)
        self.recording = False
        self.problems: list[str] = []
        for module in model.modules():
            own = [p for p in module.parameters(recurse=False) if p.requires_grad]
            if own:
                for p in own:
                    self.params[id(p)] = p
                self.handles.append(module.register_forward_hook(self._forward_hook))

    def start(self, n_rows: int, lengths: torch.Tensor | None = None, prompt_lengths: torch.Tensor | None = None):
        """Record the next forward of `n_rows` rows (chosen rows first, then rejected), or of the same pairs in
        the prefix-shared layout (`batching.PackedPairs`, which the forward announces on the LM head).

        `lengths` [N] (real tokens per row) and `prompt_lengths` [B] let the products skip padding and
        compute the prompt positions, which chosen and rejected share, once."""
        self.n_rows = n_rows
        self.packed, self.packed_uses = None, []
        self.row_lengths = None if lengths is None else lengths.detach().long()
        self.lengths = None if lengths is None else [int(x) for x in lengths]
        self.prompt_lengths = None if prompt_lengths is None else [int(x) for x in prompt_lengths]
        if not self.recording and self.head is not None:
            listen(self.head, True)
        self.recording = True
        self.usages = {}
        self.problems = []

    def stop(self) -> None:
        """Stop recording (what was recorded stays readable until the next `start`)."""
        if self.recording and self.head is not None:
            listen(self.head, False)
        self.recording = False

    def take(self) -> dict:
        """The usages recorded since `start` (id(param) -> usages), handed over and forgotten here."""
        usages, self.usages = self.usages, {}
        return usages

    def close(self) -> None:
        self.stop()
        for h in self.handles:
            h.remove()
        self.handles = []

    # -- capture
    def _forward_hook(self, module, args, output):
        if not self.recording or getattr(self.model, self.QUIET, 0) or not torch.is_grad_enabled():
            return None
        if not isinstance(output, torch.Tensor) or len(args) != 1 or not isinstance(args[0], torch.Tensor):
            self.problems.append(f"{type(module).__name__}: forward with several inputs or outputs")
            return None
        x, n, kind = args[0], self.n_rows, module_kind(module)
        layout = head_layout(self.head) if self.head is not None and x.dim() == 2 and kind != "embedding" else None
        rows = layout.rows if layout is not None else None
        packed = packed_layout(self.head) if self.head is not None and rows is None else None
        if packed is not None and output.dim() >= 2 and output.shape[0] == packed.input_ids.shape[0]:
            # a prefix-shared row [prompt, chosen, rejected]: unpacked into two rows after the backward (`_unpack`)
            self.packed = packed
            use = _Usage(module, kind, (_full(x.detach()), None), n, out=output, lengths=self.row_lengths)
            self.packed_uses.append(use)
            self._keep(module, use, output)
            return output
        if output.dim() >= 2 and output.shape[0] == 1 and n > 1 and rows is None:
            # A batch-broadcast output (GPT-2 position embeddings): expand so each row's gradient is kept.
            output = output.expand(n, *output.shape[1:])
            x = x.expand(n, *x.shape[1:])
        elif rows is None and output.shape[0] != n:
            self.problems.append(f"{type(module).__name__}: output batch {output.shape[0]} != rows {n}")
            return None
        use = _Usage(module, kind, (_full(x.detach()), rows), n, layout.positions if layout is not None else None,
                     lengths=self.row_lengths)
        self._keep(module, use, output)
        return output

    def _keep(self, module, use: _Usage, output: torch.Tensor) -> None:
        for p in module.parameters(recurse=False):
            if p.requires_grad:
                self.usages.setdefault(id(p), []).append(use)
        output.register_hook(lambda g, use=use: setattr(use, "g", _full(g.detach())))

    # -- prefix-shared rows
    def side_pass(self, scored: torch.Tensor) -> None:
        """After a prefix-shared forward, before its backward: `d sum_i log pi_w,i / d output` of every recorded
        module (one backward to the activations only, no parameter gradients; the graph is kept for training).

        In a row `[prompt, chosen, rejected]` the chosen positions reach only log pi_w and the rejected positions
        only log pi_l, but the prompt positions reach both; the training backward's output gradient there is
        `c_w g_w + c_l g_l`, and this pass gives `g_w`, so `_unpack` can split it exactly."""
        if not self.packed_uses or not scored.requires_grad:
            return
        B = self.packed.input_ids.shape[0]
        grads = torch.autograd.grad(scored[:B].sum(), [u.out for u in self.packed_uses], retain_graph=True,
                                    allow_unused=True)
        for u, g in zip(self.packed_uses, grads):
            u.g_chosen = None if g is None else _full(g.detach())
            u.g, u.out = None, None            # the output hooks fired in this pass too: the backward sets g

    @torch.no_grad()
    def _unpack(self, coef: torch.Tensor) -> None:
        """Rewrite the prefix-shared usages in the concatenated layout [2B, Tc, ...] (zeros at padding), so that
        every product below reads them like two rows per pair: chosen row `c_w g_w`, rejected row the rest."""
        packed, uses = self.packed, self.packed_uses
        self.packed_uses = []
        if packed is None:
            return
        B, T = packed.input_ids.shape
        index = packed.unpack.to(coef.device)                                        # [2B, Tc]
        pad, (N, Tc) = index < 0, index.shape
        flat = index.clamp(min=0).view(-1)                                           # [2B * Tc] into [B * T]
        chosen, rejected = flat[: B * Tc], flat[B * Tc :]
        c_w = coef[:B].view(B, 1, 1)
        for u in uses:   # a new tensor per usage for x and g, every other step in place on those (few page faults)
            x = u.x[0]
            x = x.reshape(B * T, -1).index_select(0, flat).view(N, Tc, *x.shape[2:])
            u.x = (x.masked_fill_(pad.view(N, Tc, *[1] * (x.dim() - 2)), 0), None)
            if u.g is None:
                continue                                                           # result() says so
            G, g_w = u.g.reshape(B * T, -1), u.g_chosen
            out = torch.empty((N * Tc, G.shape[1]), dtype=G.dtype, device=G.device)
            torch.index_select(G, 0, rejected, out=out[B * Tc :])                # c_w g_w + c_l g_l ...
            if g_w is None:
                out[: B * Tc].zero_()
            else:
                g_w = g_w.reshape(B * T, -1)
                torch.index_select(g_w, 0, chosen, out=out[: B * Tc])
                out[: B * Tc].view(B, Tc, -1).mul_(c_w.to(G))                   # chosen rows: c_w g_w
                out[B * Tc :].view(B, Tc, -1).sub_(g_w.index_select(0, rejected).view(B, Tc, -1).mul_(c_w.to(G)))
            out = out.view(N, Tc, -1).masked_fill_(pad[..., None], 0)            # ... minus c_w g_w: c_l g_l
            u.g, u.g_chosen = out.view(N, Tc, *u.g.shape[2:]), None

    # -- per-usage helpers
    def _factors(self, use: _Usage):
        """(A [N,T,din], G [N,T,dout]) of a linear-like usage; Conv1D is x @ W so the same holds."""
        x, rows = use.x
        return _rows3d(x, use.n, rows), _rows3d(use.g, use.n, rows)

    def _dense(self, use: _Usage, p: nn.Parameter) -> torch.Tensor:
        """Per-row gradient of parameter `p` from this usage, materialised: [N, *p.shape]."""
        n = use.n
        if use.kind in ("linear", "conv1d"):
            A, G = self._factors(use)
            if p is use.module.bias:
                return G.sum(1)
            W = torch.einsum("ntd,nte->ned", A, G) if use.kind == "linear" else torch.einsum("ntd,nte->nde", A, G)
            return W
        if use.kind == "embedding":
            ids, G = use.x[0], _emb_grad(use)
            out = G.new_zeros((n, *p.shape))
            for r in range(n):
                out[r].index_add_(0, ids[r].reshape(-1), G[r].reshape(-1, G.shape[-1]))
            return out
        # generic: vjp of the module on each row alone, vectorised over the rows where vmap can batch the module;
        # kept on the usage when small (norm scales), for the update's first-order change and the batch sums
        if id(p) in use.dense:
            return use.dense[id(p)]
        mine, key = self._own(use, p)

        def row(xr, gr):
            _, pull = vjp(lambda params: functional_call(use.module, params, (xr[None],)), mine)
            return pull(gr[None])[0][key]

        with self._quiet():
            try:
                rows = vmap(row)(use.x[0], use.g)
            except (RuntimeError, NotImplementedError, ValueError):   # an operation vmap cannot batch
                rows = torch.stack([row(use.x[0][r], use.g[r]) for r in range(n)])
        if rows.numel() <= self.KEEP_DENSE:
            use.dense[id(p)] = rows
        return rows

    @staticmethod
    def _own(use: _Usage, p: nn.Parameter) -> tuple[dict, str]:
        """The module's own parameters (detached, by name) and the name of `p` among them."""
        mine = {k: v.detach() for k, v in use.module.named_parameters(recurse=False)}
        return mine, next(k for k, v in use.module.named_parameters(recurse=False) if v is p)

    @contextmanager
    def _quiet(self):
        """Re-run a recorded module without recording it."""
        object.__setattr__(self.model, self.QUIET, getattr(self.model, self.QUIET, 0) + 1)
        try:
            yield
        finally:
            object.__setattr__(self.model, self.QUIET, getattr(self.model, self.QUIET) - 1)

    def _generic_sum(self, use: _Usage, p: nn.Parameter, w: torch.Tensor) -> torch.Tensor:
        """`sum_r w[r] grad_r` of `p` through a module without a closed form: one vjp over every row, since
        each row of its output depends on that row of its input alone (the recorder checked the batch)."""
        mine, key = self._own(use, p)
        with self._quiet():
            _, pull = vjp(lambda params: functional_call(use.module, params, (use.x[0],)), mine)
            return pull(use.g * w.to(use.g).view(-1, *[1] * (use.g.dim() - 1)))[0][key]

    def _generic_along(self, use: _Usage, p: nn.Parameter, d: torch.Tensor) -> torch.Tensor:
        """`<grad_r, d>` [N] of `p` through a module without a closed form: one jvp over every row."""
        mine, key = self._own(use, p)
        tangents = {k: d if k == key else torch.zeros_like(v) for k, v in mine.items()}
        with self._quiet():
            _, change = jvp(lambda params: functional_call(use.module, params, (use.x[0],)), (mine,), (tangents,))
        return (use.g.to(change.dtype) * change).flatten(1).sum(1)

    def _pair_block(self, u: _Usage, v: _Usage, p: nn.Parameter, ri: torch.Tensor, si: torch.Tensor,
                    inverse: torch.Tensor | None = None):
        """<grad_r from usage u, grad_s from usage v> for row index vectors ri, si (same length). `inverse` [N]
        (1/c_r): also this usage's batch sums of a linear weight, kept in `self.sums` (see `result`)."""
        if u is v and u.kind in ("linear", "conv1d") and p is u.module.weight:
            x, rows = u.x
            if rows is not None:  # the response-only LM head: [K, d] rows of several sequences
                return self._gram_2d(x, u.g, rows)[ri, si]
            return self._linear_pairs(x, u.g, inverse if u.kind == "linear" else None, p)
        if u is v and u.kind == "embedding":
            ids, G = u.x[0], _emb_grad(u)
            gg = torch.bmm(G[ri], G[si].transpose(1, 2))
            same = ids[ri][:, :, None] == ids[si][:, None, :]
            return (gg * same).sum((1, 2))
        if u.kind == "embedding" and v.kind == "linear" and p is v.module.weight:
            return self._emb_lin(u, v, ri, si)
        if v.kind == "embedding" and u.kind == "linear" and p is u.module.weight:
            return self._emb_lin(v, u, si, ri)
        du, dv = self._dense(u, p), (self._dense(v, p) if v is not u else None)
        dv = du if dv is None else dv
        return (du[ri] * dv[si]).flatten(1).sum(1)

    def _linear_pairs(self, A: torch.Tensor, G: torch.Tensor, inverse: torch.Tensor | None = None,
                      p: nn.Parameter | None = None) -> torch.Tensor:
        """[ww..., ll..., wl...] weight-gradient products of a linear layer, pair by pair.

        Per pair, whichever is cheaper: Gram ("ghost") products sum((A_r A_s^T) * (G_r G_s^T)), with
        the shared prompt positions' activations counted once, or the two per-row gradients materialised.
        With `inverse` [N] (1/c_r) the batch sums `sum_i grad log pi_w,i` and `sum_i grad log pi_l,i` are
        wanted too (`self.sums`): those need the per-row gradients materialised anyway, so every pair takes
        that branch and the sums come from it at no further cost."""
        B, T = self.n_rows // 2, A.shape[1]
        din, dout = A.shape[-1], G.shape[-1]
        out = A.new_zeros(3 * B, dtype=torch.float64)
        sum_w = sum_l = None
        for i in range(B):
            lw = self.lengths[i] if self.lengths else T
            ll = self.lengths[B + i] if self.lengths else T
            P = self.prompt_lengths[i] if self.prompt_lengths else 0
            Aw, Al, Gw, Gl = A[i, :lw], A[B + i, :ll], G[i, :lw], G[B + i, :ll]
            shared = P > 0 and torch.equal(Aw[:P], Al[:P])
            U = lw + ll - (P if shared else 0)
            if inverse is None and U * U * din + (lw * lw + ll * ll + lw * ll) * dout < (lw + ll) * din * dout:
                X = torch.cat([Aw, Al[P:] if shared else Al])                     # [U, din]
                XX = X @ X.T
                il = torch.cat([torch.arange(P), torch.arange(lw, U)]) if shared else torch.arange(lw, U)
                aww, all_, awl = XX[:lw, :lw], XX[il][:, il], XX[:lw][:, il]
                ww = torch.linalg.vecdot(aww.flatten(), (Gw @ Gw.T).flatten())
                lL = torch.linalg.vecdot(all_.flatten(), (Gl @ Gl.T).flatten())
                wl = torch.linalg.vecdot(awl.flatten(), (Gw @ Gl.T).flatten())
            else:
                Ww, Wl = Gw.T @ Aw, Gl.T @ Al                                      # [dout, din]
                ww, lL, wl = (Ww * Ww).sum(), (Wl * Wl).sum(), (Ww * Wl).sum()
                if inverse is not None:
                    dt, iw, il_ = wide(p.dtype), float(inverse[i]), float(inverse[B + i])
                    if sum_w is None:
                        sum_w, sum_l = Ww.to(dt) * iw, Wl.to(dt) * il_
                    else:
                        sum_w.add_(Ww.to(dt), alpha=iw)
                        sum_l.add_(Wl.to(dt), alpha=il_)
            out[i], out[B + i], out[2 * B + i] = ww, lL, wl
        if inverse is not None:
            self.sums["w"][id(p)], self.sums["l"][id(p)] = sum_w, sum_l
        return out

    def _gram_2d(self, A: torch.Tensor, G: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """[N, N] weight-gradient Gram of a linear layer applied to gathered rows (A [K, din], G [K, dout])."""
        m = (A @ A.T) * (G @ G.T)                                        # [K, K]
        onehot = torch.nn.functional.one_hot(rows, self.n_rows).to(m.dtype)  # [K, N]
        return onehot.T @ m @ onehot

    def _emb_lin(self, e: _Usage, h: _Usage, ri, si):
        """<E_r, H_s> for a tied embedding (rows of W at ids) and linear head (G^T A), shapes [V, d]."""
        ids, Ge = e.x[0], _emb_grad(e)              # [N, T], [N, T, d]
        A, Gh = h.x[0], h.g
        rows = h.x[1]
        out = []
        for r, s in zip(ri.tolist(), si.tolist()):
            mine = rows == s if rows is not None else slice(None)
            As, Gs = (A[mine], Gh[mine]) if rows is not None else (A[s], Gh[s])   # [K_s, d], [K_s, V]
            P = Ge[r] @ As.T                        # [T, K_s]
            M = Gs[:, ids[r]].T                     # [T, K_s]
            out.append((P * M).sum())
        return torch.stack(out)

    # -- the first-order change along a given update
    def directional(self, usages: dict[int, list[_Usage]], deltas: dict[int, torch.Tensor],
                    coef: torch.Tensor) -> torch.Tensor:
        """Per row r, `<grad log pi_r, delta>` (float64, [N]) from a micro-batch's recorded `usages`:
        the first-order change of each log-prob under the parameter update `delta` (id(param) -> tensor)."""
        n = coef.numel()
        total = torch.zeros(n, dtype=torch.float64)
        for pid, uses in usages.items():
            p, d = self.params[pid], deltas[pid]
            for u in uses:
                total += self._along(u, p, d).double().cpu()
        return total / coef.double().cpu()

    def _tokens(self, use: _Usage, keep: torch.Tensor | None = None):
        """(inputs [M, ...], output gradients [M, ...], row [M]) of a linear or embedding usage's real tokens
        (padding, whose gradient is zero, left out), of the rows where `keep` [N] is True only."""
        x, rows = use.x
        g = _emb_grad(use) if use.kind == "embedding" else use.g
        if rows is not None:                                              # the head's gathered rows [K]
            if keep is None:
                return x, g, rows
            mine = keep.to(rows.device)[rows]
            return x[mine], g[mine], rows[mine]
        N, T = g.shape[:2]
        real = torch.ones(N, T, dtype=torch.bool, device=g.device)
        if use.lengths is not None:
            real = torch.arange(T, device=g.device)[None] < use.lengths.to(g.device)[:, None]
        if keep is not None:
            real &= keep.to(g.device)[:, None]
        return x[real], g[real], torch.arange(N, device=g.device)[:, None].expand(N, T)[real]

    def _along(self, use: _Usage, p: nn.Parameter, d: torch.Tensor) -> torch.Tensor:
        """`<per-row gradient of p from this usage, d>`: [N], without materialising per-row gradients."""
        if use.kind not in ("linear", "conv1d", "embedding"):
            if d.dtype == p.dtype and id(p) not in use.dense:
                return self._generic_along(use, p, d)
            return (self._dense(use, p) * d).flatten(1).sum(1)
        x, g, row = self._tokens(use)
        g = g.to(d.dtype)
        if use.kind == "embedding":
            per = (g * d[x]).sum(-1)
        elif p is use.module.bias:
            per = g @ d
        else:
            per = (g * (x.to(d.dtype) @ (d.T if use.kind == "linear" else d))).sum(-1)   # the output's change
        return per.new_zeros(use.n).index_add_(0, row, per)

    # -- batch-mean gradients
    def weighted_sum(self, usages: dict[int, list[_Usage]], weights: torch.Tensor,
                     skip=()) -> dict[int, torch.Tensor]:
        """`sum_r weights[r] * (output-gradient-carried) grad_r` per parameter (id -> tensor, float32/64), the
        parameters in `skip` left out. With weights `1/c_r` on the chosen rows and 0 elsewhere this is
        `sum_i grad log pi_w,i`."""
        out: dict[int, torch.Tensor] = {}
        for pid, uses in usages.items():
            if pid in skip:
                continue
            p = self.params[pid]
            dt = wide(p.dtype)
            acc = torch.zeros(p.shape, dtype=dt, device=p.device)
            for u in uses:
                acc += self._weighted(u, p, weights.to(device=p.device, dtype=dt), dt)
            out[pid] = acc
        return out

    def _weighted(self, use: _Usage, p: nn.Parameter, w: torch.Tensor, dt) -> torch.Tensor:
        """`sum_r w[r] * grad_r` of `p` from this usage, over the real tokens of the rows with a weight only."""
        if use.kind not in ("linear", "conv1d", "embedding"):
            if id(p) in use.dense:
                dense = use.dense[id(p)]
                return (dense.to(dt) * w.view(-1, *[1] * (dense.dim() - 1))).sum(0)
            return self._generic_sum(use, p, w).to(dt)
        x, g, row = self._tokens(use, w != 0)
        G = g.to(dt) * w[row][:, None]
        if use.kind == "embedding":
            return torch.zeros(p.shape, dtype=dt, device=p.device).index_add_(0, x, G)
        if p is use.module.bias:
            return G.sum(0)
        return G.T @ x.to(dt) if use.kind == "linear" else x.to(dt).T @ G

    # -- per-position split of <grad_w, grad_l>
    def position_split(self, coef: torch.Tensor, usages: dict[int, list[_Usage]] | None = None) -> list[dict]:
        """Per pair: `chosen` [T] and `rejected` [T] contributions of each sequence position to
        `<grad log pi_w, grad log pi_l>` (position t: the parameter-gradient terms its activations deposit,
        `G_t A_t^T` per linear layer; for the LM head, the prediction of token t+1), and `other`, the part
        of modules without a per-position form (norms). `sum(chosen) + other == inner == sum(rejected) + other`.
        Call after `result()`; costs about one more set of the ghost products (each module without a per-position
        form gives its per-row gradients once for all pairs)."""
        usages = self.usages if usages is None else usages
        B = coef.numel() // 2
        T = max(u.g.shape[1] if u.g.dim() == 3 else int(u.pos.max()) + 1 if u.pos is not None else 0
                for uses in usages.values() for u in uses)
        c = coef.double().cpu()
        out, dense = [], {}   # per-row gradients of the modules without a per-position form: made once, not per pair

        def rows_of(u: _Usage, p) -> torch.Tensor:
            key = (id(u), id(p))
            if key not in dense:
                dense[key] = self._dense(u, p)
            return dense[key]

        for i in range(B):
            w, l = i, B + i
            cw = torch.zeros(T, dtype=torch.float64)
            cl = torch.zeros(T, dtype=torch.float64)
            other = 0.0
            for pid, uses in usages.items():
                p = self.params[pid]
                for u in uses:
                    for v in uses:
                        got = self._split(u, v, p, w, l)
                        if got is None:
                            other += float((rows_of(u, p)[w] * rows_of(v, p)[l]).sum())
                        else:
                            pw, pl = got
                            cw[pw[0]] += pw[1].double().cpu()
                            cl[pl[0]] += pl[1].double().cpu()
            scale = float(c[w] * c[l])
            out.append({"chosen": cw / scale, "rejected": cl / scale, "other": other / scale})
        return out

    def _positions(self, u: _Usage, r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(positions [P], activations [P, din], output grads [P, dout]) of row r in a linear usage."""
        x, rows = u.x
        if rows is not None:
            mine = rows == r
            return u.pos[mine].cpu(), x[mine], u.g[mine]
        return torch.arange(x.shape[1]), x[r], u.g[r]

    def _split(self, u: _Usage, v: _Usage, p, w: int, l: int):
        """((positions of w, contributions), (positions of l, contributions)) of the <u-part of grad_w,
        v-part of grad_l> term, or None when the term has no per-position form here."""
        linear = ("linear", "conv1d")
        if u.kind in linear and v.kind in linear:
            pw, Aw, Gw = self._positions(u, w)
            pl, Al, Gl = self._positions(v, l)
            if p is u.module.bias:
                return (pw, Gw @ Gl.sum(0)), (pl, Gl @ Gw.sum(0))
            M = (Aw @ Al.T) * (Gw @ Gl.T)                                       # [Pw, Pl]
            return (pw, M.sum(1)), (pl, M.sum(0))
        if u.kind == "embedding" and v.kind == "embedding":
            ids = u.x[0]
            Gw, Gl = _emb_grad(u)[w], _emb_grad(v)[l]
            M = (Gw @ Gl.T) * (ids[w][:, None] == v.x[0][l][None, :])
            idx = torch.arange(M.shape[0])
            return (idx, M.sum(1)), (torch.arange(M.shape[1]), M.sum(0))
        if {u.kind, v.kind} == {"embedding", "linear"} and p is (v.module.weight if v.kind == "linear" else
                                                                  u.module.weight):
            # tied input/output embeddings: E deposits at token ids, the head deposits G^T A at rows
            e_is_w = u.kind == "embedding"
            e, h = (u, v) if e_is_w else (v, u)
            re, rh = (w, l) if e_is_w else (l, w)
            ids, Ge = e.x[0][re], _emb_grad(e)[re]                               # [T], [T, d]
            ph, Ah, Gh = self._positions(h, rh)                                  # [P], [P, d], [P, V]
            M = (Ge @ Ah.T) * Gh[:, ids].T                                       # [T, P]
            pe = torch.arange(M.shape[0])
            we, wh = (pe, M.sum(1)), (ph, M.sum(0))
            return (we, wh) if e_is_w else (wh, we)
        return None

    # -- result
    def result(self, coef: torch.Tensor, sums: bool = False) -> dict[str, torch.Tensor]:
        """Per-pair `norm_w2`, `norm_l2`, `inner` (float64) with the row coefficients divided out.

        `sums`: also `self.sums` = {"w": {id(param): sum_i grad log pi_w,i}, "l": {...}} for the weights of
        linear layers used once (the products materialise their per-row gradients then); `weighted_sum` gives
        the other parameters'."""
        n = self.n_rows
        self.stop()  # vjp below runs module forwards: do not record them
        if self.problems:
            raise Unsupported("; ".join(sorted(set(self.problems))[:3]))
        self._unpack(coef)
        missing = [k for k in self.params if k not in self.usages]
        if missing:
            raise Unsupported(f"{len(missing)} trainable parameter(s) not used through a module forward")
        for uses in self.usages.values():
            for u in uses:
                if u.g is None:
                    raise Unsupported(f"{type(u.module).__name__}: no output gradient was recorded")
        if bool((coef == 0).any()):
            raise Unsupported("a row has a zero loss coefficient (e.g. a hinge past its margin)")
        B = n // 2
        w, l = torch.arange(B), torch.arange(B, n)
        ri = torch.cat([w, l, w])
        si = torch.cat([w, l, l])
        total = torch.zeros(3 * B, dtype=torch.float64)
        self.sums = {"w": {}, "l": {}}
        inverse = 1.0 / coef.double().cpu() if sums else None
        for pid, uses in self.usages.items():
            p = self.params[pid]
            for u in uses:
                for v in uses:
                    total += self._pair_block(u, v, p, ri, si, inverse if len(uses) == 1 else None).double().cpu()
        c = coef.double().cpu()
        scale = c[ri] * c[si]
        total = total / scale
        return {"norm_w2": total[:B], "norm_l2": total[B : 2 * B], "inner": total[2 * B :]}
