"""Entanglement inside the training step, as a `StepHook`: read the statistics off the backward, summarise.

    probe = EntanglementProbe(model, every=1, realised=True)
    fit(build(cfg, hooks=[probe]))        # build adds it itself for diagnostics.entanglement.every > 0

Nothing here changes the gradients or the update. Per-pair rows go to `entanglement.jsonl`.
"""

from __future__ import annotations

import torch

from entangle import losses
from entangle.batching import Batch
from entangle.diagnostics import brute_force_stats, classify, predicted_changes, with_cos
from entangle.diagnostics.ghost import wide
from entangle.diagnostics.recording import RowRecording
from entangle.hooks import HookContext, LoopCallback, StepHook
from entangle.logps import PairLogps, sequence_logps
from entangle.metrics import Metrics


class EntanglementProbe(StepHook, LoopCallback):
    """Per-pair `<grad_w, grad_l>`, norms, cosine, d_w, d_l, case and predicted changes, every `every` steps."""

    reads_activations = True   # per-row gradients from the recorded activations (diagnostics.ghost)

    def __init__(self, model, every: int, realised: bool = False, method: str = "fast", update: bool = True,
                 batch_mean: bool = True, positions: bool = False, tokens: int = 0):
        self.model, self.every, self.realised, self.method = model, every, realised, method
        self.update, self.batch_mean, self.positions, self.tokens = update, batch_mean, positions, tokens
        self.position_rows: list[dict] = []
        self.recording = RowRecording(model, "entanglement", sums=batch_mean) if method == "fast" else None
        self.pairs: list[dict] = []
        self.fallbacks = 0
        self.lr = 0.0

    def due(self, step: int) -> bool:
        """`step` is 1-based."""
        return self.every > 0 and step % self.every == 0

    def on_step_start(self, step: int, lr: float) -> None:
        self.pairs, self.fallbacks, self.position_rows, self.lr = [], 0, [], lr
        self.kept: list[tuple[dict, torch.Tensor, int]] = []   # (recorded usages, row coefficients, first pair)
        self.batch_sums: dict[str, dict[int, torch.Tensor]] = {}
        self.before: dict[int, torch.Tensor] | None = None

    def before_forward(self, batch: Batch) -> None:
        if self.recording is not None:
            self.recording.begin(batch)

    def on_logps(self, scored: torch.Tensor) -> None:
        if self.recording is not None:
            self.recording.watch(scored)

    def after_backward(self, batch: Batch, logps: PairLogps, loss_fn) -> None:
        """Per-pair statistics from the recorder, or the exact path."""
        got = self.recording.end() if self.recording is not None else None
        if got is not None:
            stats = got.stats
            if self.update:
                self.kept.append((got.usages, got.coef, len(self.pairs)))
            if self.batch_mean:
                self._accumulate_batch_sums(got.usages, got.coef, got.sums)
            if self.positions:
                self._split_positions(batch, got)
        else:
            self.fallbacks += 1
            stats = brute_force_stats(self.model, batch, logps.token_weights)
        stats = with_cos({k: v.double() for k, v in stats.items()})
        d_w, d_l = losses.coefficients(loss_fn, *logps.args())
        d_w, d_l = d_w.double().cpu(), d_l.double().cpu()
        pred_w, pred_l = predicted_changes(stats, d_w, d_l, self.lr)
        case = classify(pred_w, pred_l)
        full_w, full_l = (t.detach().double().cpu() for t in logps.unmasked())
        for i in range(len(d_w)):
            self.pairs.append({
                "pair": int(batch.index[i]), "inner": float(stats["inner"][i]), "norm_w2": float(stats["norm_w2"][i]),
                "norm_l2": float(stats["norm_l2"][i]), "cos": float(stats["cos"][i]), "d_w": float(d_w[i]),
                "d_l": float(d_l[i]), "case": int(case[i]), "pred_dlogp_w": float(pred_w[i]),
                "pred_dlogp_l": float(pred_l[i]), "_logp_w": float(full_w[i]), "_logp_l": float(full_l[i]),
            })

    @torch.no_grad()
    def _split_positions(self, batch: Batch, got) -> None:
        """Per pair, each position's share of <grad_w, grad_l> (chosen and rejected rows, real tokens only)."""
        B = batch.n_rows // 2
        lengths = batch.attention_mask.sum(1).tolist()
        for i, part in enumerate(self.recording.recorder.position_split(got.coef, got.usages)):
            self.position_rows.append({
                "pair": int(batch.index[i]), "chosen": part["chosen"][: lengths[i]].tolist(),
                "rejected": part["rejected"][: lengths[B + i]].tolist(), "other": part["other"],
                "chosen_ids": batch.input_ids[i, : lengths[i]].tolist(),
                "rejected_ids": batch.input_ids[B + i, : lengths[B + i]].tolist()})

    @torch.no_grad()
    def _accumulate_batch_sums(self, usages, coef: torch.Tensor, done: dict) -> None:
        """Running `sum_i grad log pi_w,i` and `sum_i grad log pi_l,i` over the step's micro-batches; `done`:
        the parameters' sums the recorder's products already gave."""
        B = coef.numel() // 2
        inv = 1.0 / coef.double()
        zeros = torch.zeros_like(inv)
        for side, w in (("w", torch.cat([inv[:B], zeros[B:]])), ("l", torch.cat([zeros[:B], inv[B:]]))):
            part = self.recording.recorder.weighted_sum(usages, w, skip=done[side])
            part.update(done[side])
            into = self.batch_sums.setdefault(side, {})
            for pid, v in part.items():
                into[pid] = into[pid] + v if pid in into else v

    def _batch_mean_stats(self) -> dict[str, float] | None:
        """inner / norms / cos of the batch-mean chosen and rejected gradients (this process's pairs)."""
        sw, sl = self.batch_sums.get("w"), self.batch_sums.get("l")
        if not sw or self.fallbacks:
            return None
        n = len(self.pairs)
        wl, ww, ll = (float(x) for x in sum(dot3(sw[k], sl[k]) for k in sw))
        inner, nw, nl = wl / n ** 2, ww ** 0.5 / n, ll ** 0.5 / n
        return {"batch_inner": inner, "batch_norm_w": nw, "batch_norm_l": nl,
                "batch_cos": inner / max(nw * nl, 1e-300)}

    @torch.no_grad()
    def before_optimizer(self, accelerator, n_pairs: int) -> None:
        """Snapshot the trainable parameters, so that the optimiser's actual update can be measured."""
        if self.kept:
            self.before = {id(p): p.detach().clone() for p in self.recording.params.values()}

    @torch.no_grad()
    def _after_update(self, micro_batches) -> None:
        """First-order changes along the update the optimiser actually made (AdamW, clipping, weight
        decay included): `step_dlogp_* = <grad log pi, theta_after - theta_before>` per pair; then, if
        asked, the realised changes of the (unmasked) log-probs, by re-evaluating the step's batches."""
        if self.kept and self.before is not None:
            deltas = {pid: p.detach().to(wide(p.dtype)) - self.before[pid].to(wide(p.dtype))
                      for pid, p in self.recording.params.items()}
            for usages, coef, first in self.kept:
                change = self.recording.recorder.directional(usages, deltas, coef)
                B = coef.numel() // 2
                for i in range(B):
                    self.pairs[first + i]["step_dlogp_w"] = float(change[i])
                    self.pairs[first + i]["step_dlogp_l"] = float(change[B + i])
        self.kept, self.before = [], None
        if self.realised:
            k = 0
            for batch in micro_batches:
                lp = sequence_logps(self.model, batch, pack=False).logps.double().cpu()
                B = batch.n_rows // 2
                for i in range(B):
                    row = self.pairs[k + i]
                    row["real_dlogp_w"] = float(lp[i]) - row["_logp_w"]
                    row["real_dlogp_l"] = float(lp[i + B]) - row["_logp_l"]
                k += B

    def finish(self, policy, micro_batches, stepped: bool) -> tuple[Metrics, list[dict]]:
        """After the optimiser step (the update's first-order and realised changes; none on a skipped step): metric
        sums (per-pair means once reduced) and the per-pair rows."""
        if stepped:
            self._after_update(micro_batches)
        batch = self._batch_mean_stats()
        self.kept, self.before, self.batch_sums = [], None, {}
        rows = [{k: v for k, v in r.items() if not k.startswith("_")} for r in self.pairs]
        m = Metrics()
        if not rows:
            return m, []
        t = {k: torch.tensor([r[k] for r in rows], dtype=torch.float64) for k in rows[0] if all(k in r for r in rows)}
        sums = {
            "inner": t["inner"].sum(), "cos": t["cos"].sum(), "norm_w": t["norm_w2"].sqrt().sum(),
            "norm_l": t["norm_l2"].sqrt().sum(), "pred_dlogp_w": t["pred_dlogp_w"].sum(),
            "pred_dlogp_l": t["pred_dlogp_l"].sum(), "d_w": t["d_w"].sum(), "d_l": t["d_l"].sum(),
            **_case_counts("case", t["case"]),
        }
        for kind in ("step", "real"):   # along the optimiser's own update; what actually happened
            if f"{kind}_dlogp_w" in t:
                w, lo = t[f"{kind}_dlogp_w"], t[f"{kind}_dlogp_l"]
                sums.update({f"{kind}_dlogp_w": w.sum(), f"{kind}_dlogp_l": lo.sum(),
                             **_case_counts(f"{kind}_case", classify(w, lo))})
        for k, v in sums.items():
            m.add(f"entanglement/{k}", v)
        m.add("entanglement/exact_fallback", float(self.fallbacks), "sum")
        for k, v in (batch or {}).items():   # this process's batch-mean quantities, averaged over processes
            m.add(f"entanglement/{k}", v, "process_mean")
        return m, rows

    def after_step(self, ctx: HookContext, rows: list[dict]) -> None:
        """Views written beside the run on the main process: per-position splits, exact token views."""
        from entangle.diagnostics.views import save_position_views, save_token_views

        if not self.due(ctx.step):
            return
        if self.positions and ctx.is_main:
            save_position_views(ctx.run_dir, ctx.step, ctx.tokenizer, self.position_rows, self.pairs)
        if self.tokens and ctx.is_main:
            save_token_views(ctx.run_dir, f"step-{ctx.step}", ctx.accelerator.unwrap_model(ctx.policy),
                             ctx.tokenizer, ctx.step_pairs[: self.tokens])


def dot3(a: torch.Tensor, b: torch.Tensor, chunk: int = 1 << 16) -> torch.Tensor:
    """`[<a,b>, <a,a>, <b,b>]` in float64 (a [3] tensor), one pass over a and b in cache-sized float64 pieces: the
    widened copies of whole gradients (and the products' temporaries) cost more than the products themselves."""
    a, b = a.reshape(-1), b.reshape(-1)
    out = torch.zeros(3, dtype=torch.float64, device=a.device)
    for start in range(0, a.numel(), chunk):
        x, y = a[start : start + chunk].double(), b[start : start + chunk].double()
        out += torch.stack([x @ y, x @ x, y @ y])
    return out


def _case_counts(prefix: str, case: torch.Tensor) -> dict[str, torch.Tensor]:
    return {f"{prefix}{c}": (case == c).double().sum() for c in (1, 2, 3)}
