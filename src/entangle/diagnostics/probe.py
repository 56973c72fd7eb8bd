"""Entanglement inside the training step: attach, read the statistics off the backward, summarise.

The step calls `begin(batch)` before a micro-batch's forward, `watch(logps)` on its log-prob
tensor (to capture each row's loss coefficient), `end(...)` after its backward, and, if asked,
`realise(...)` after the optimiser step. Nothing here changes the gradients or the update.
"""

from __future__ import annotations

import logging

import torch

from entangle import losses
from entangle.data import Batch
from entangle.diagnostics import brute_force_stats, classify, predicted_changes, with_cos
from entangle.diagnostics.ghost import GradientRecorder, Unsupported, row_layout, wide

log = logging.getLogger(__name__)


class EntanglementProbe:
    """Per-pair `<grad_w, grad_l>`, norms, cosine, d_w, d_l, case and predicted changes, every `every` steps."""

    def __init__(self, model, every: int, realised: bool = False, method: str = "fast", update: bool = True,
                 batch_mean: bool = True, positions: bool = False):
        self.model, self.every, self.realised, self.method = model, every, realised, method
        self.update, self.batch_mean, self.positions = update, batch_mean, positions
        self.position_rows: list[dict] = []
        self.recorder = GradientRecorder(model) if method == "fast" else None
        self.active = False
        self.coef: torch.Tensor | None = None
        self.pairs: list[dict] = []
        self.fallbacks = 0
        self._warned = False

    def due(self, step: int) -> bool:
        """`step` is 1-based."""
        return self.every > 0 and step % self.every == 0

    def start_step(self) -> None:
        self.active, self.pairs, self.fallbacks, self.position_rows = True, [], 0, []
        self.kept: list[tuple[dict, torch.Tensor, int]] = []   # (recorded usages, row coefficients, first pair)
        self.batch_sums: dict[str, dict[int, torch.Tensor]] = {}
        self.before: dict[int, torch.Tensor] | None = None

    def begin(self, batch: Batch) -> None:
        if self.active and self.recorder is not None:
            self.recorder.start(batch.n_rows, *row_layout(batch))

    def watch(self, logps: torch.Tensor) -> None:
        """Capture dL/d log pi_r for every row during the backward."""
        if self.active and logps.requires_grad:
            logps.register_hook(lambda g: setattr(self, "coef", g.detach()))

    def end(self, batch: Batch, aux: dict, loss_fn, lr: float) -> None:
        """After a micro-batch's backward: per-pair statistics from the recorder, or the exact path."""
        if not self.active:
            return
        stats = None
        if self.recorder is not None:
            try:
                stats = self.recorder.result(self.coef)
                if self.update:
                    self.kept.append((self.recorder.usages, self.coef, len(self.pairs)))
                if self.batch_mean:
                    self._accumulate_batch_sums(self.recorder.usages, self.coef)
                if self.positions:
                    self._split_positions(batch)
            except Unsupported as e:
                if not self._warned:
                    log.warning("entanglement: fast path not applicable (%s); using the exact slow path", e)
                    self._warned = True
            self.recorder.recording = False
        if stats is None:
            self.fallbacks += 1
            stats = brute_force_stats(self.model, batch, aux.get("weights"))
        stats = with_cos({k: v.double() for k, v in stats.items()})
        d_w, d_l = losses.coefficients(loss_fn, aux["pc"], aux["pr"], aux["rc"], aux["rr"], aux["lc"], aux["lr"])
        d_w, d_l = d_w.double().cpu(), d_l.double().cpu()
        pred_w, pred_l = predicted_changes(stats, d_w, d_l, lr)
        case = classify(pred_w, pred_l)
        logps = torch.cat([aux["pc"], aux["pr"]]).detach().double().cpu()
        for i in range(len(d_w)):
            self.pairs.append({
                "pair": int(batch.index[i]), "inner": float(stats["inner"][i]), "norm_w2": float(stats["norm_w2"][i]),
                "norm_l2": float(stats["norm_l2"][i]), "cos": float(stats["cos"][i]), "d_w": float(d_w[i]),
                "d_l": float(d_l[i]), "case": int(case[i]), "pred_dlogp_w": float(pred_w[i]),
                "pred_dlogp_l": float(pred_l[i]), "_logp_w": float(logps[i]), "_logp_l": float(logps[i + len(d_w)]),
            })

    @torch.no_grad()
    def _split_positions(self, batch: Batch) -> None:
        """Per pair, each position's share of <grad_w, grad_l> (chosen and rejected rows, real tokens only)."""
        B = batch.n_rows // 2
        lengths = batch.attention_mask.sum(1).tolist()
        for i, part in enumerate(self.recorder.position_split(self.coef)):
            self.position_rows.append({
                "pair": int(batch.index[i]), "chosen": part["chosen"][: lengths[i]].tolist(),
                "rejected": part["rejected"][: lengths[B + i]].tolist(), "other": part["other"],
                "chosen_ids": batch.input_ids[i, : lengths[i]].tolist(),
                "rejected_ids": batch.input_ids[B + i, : lengths[B + i]].tolist()})

    @torch.no_grad()
    def _accumulate_batch_sums(self, usages, coef: torch.Tensor) -> None:
        """Running `sum_i grad log pi_w,i` and `sum_i grad log pi_l,i` over the step's micro-batches."""
        B = coef.numel() // 2
        inv = 1.0 / coef.double()
        zeros = torch.zeros_like(inv)
        for side, w in (("w", torch.cat([inv[:B], zeros[B:]])), ("l", torch.cat([zeros[:B], inv[B:]]))):
            part = self.recorder.weighted_sum(usages, w)
            into = self.batch_sums.setdefault(side, {})
            for pid, v in part.items():
                into[pid] = into[pid] + v if pid in into else v

    def _batch_mean_stats(self) -> dict[str, float] | None:
        """inner / norms / cos of the batch-mean chosen and rejected gradients (this process's pairs)."""
        sw, sl = self.batch_sums.get("w"), self.batch_sums.get("l")
        if not sw or self.fallbacks:
            return None
        n = len(self.pairs)
        inner = sum(float((sw[k].double() * sl[k].double()).sum()) for k in sw) / n ** 2
        nw = sum(float((v.double() ** 2).sum()) for v in sw.values()) ** 0.5 / n
        nl = sum(float((v.double() ** 2).sum()) for v in sl.values()) ** 0.5 / n
        return {"batch_inner": inner, "batch_norm_w": nw, "batch_norm_l": nl,
                "batch_cos": inner / max(nw * nl, 1e-300)}

    @torch.no_grad()
    def before_step(self) -> None:
        """Snapshot the trainable parameters, so that the optimiser's actual update can be measured."""
        if self.active and self.kept:
            self.before = {id(p): p.detach().clone() for p in self.recorder.params.values()}

    @torch.no_grad()
    def after_step(self) -> None:
        """First-order changes along the update the optimiser actually made (AdamW, clipping, weight
        decay included): `step_dlogp_* = <grad log pi, theta_after - theta_before>` per pair."""
        if not (self.active and self.kept and self.before is not None):
            return
        deltas = {pid: p.detach().to(wide(p.dtype)) - self.before[pid].to(wide(p.dtype))
                  for pid, p in self.recorder.params.items()}
        for usages, coef, first in self.kept:
            change = self.recorder.directional(usages, deltas, coef)
            B = coef.numel() // 2
            for i in range(B):
                self.pairs[first + i]["step_dlogp_w"] = float(change[i])
                self.pairs[first + i]["step_dlogp_l"] = float(change[B + i])
        self.kept, self.before = [], None

    @torch.no_grad()
    def realise(self, policy, micro_batches) -> None:
        """Re-evaluate the step's batches after the optimiser step: realised log-prob changes."""
        if not (self.active and self.realised):
            return
        from entangle.logps import sequence_logps

        k = 0
        for batch in micro_batches:
            lp = sequence_logps(policy, batch, pack=False).logps.double().cpu()
            B = batch.n_rows // 2
            for i in range(B):
                row = self.pairs[k + i]
                row["real_dlogp_w"] = float(lp[i]) - row["_logp_w"]
                row["real_dlogp_l"] = float(lp[i + B]) - row["_logp_l"]
            k += B

    def finish(self) -> tuple[dict[str, torch.Tensor], list[dict]]:
        """Metric sums (reduced over processes by the caller) and the per-pair rows."""
        batch = self._batch_mean_stats()
        self.active, self.kept, self.before, self.batch_sums = False, [], None, {}
        rows = [{k: v for k, v in r.items() if not k.startswith("_")} for r in self.pairs]
        t = {k: torch.tensor([r[k] for r in rows], dtype=torch.float64) for k in rows[0]
             if all(k in r for r in rows)} if rows else {}
        if not rows:
            return {}, []
        sums = {
            "entanglement/inner": t["inner"].sum(), "entanglement/cos": t["cos"].sum(),
            "entanglement/norm_w": t["norm_w2"].sqrt().sum(), "entanglement/norm_l": t["norm_l2"].sqrt().sum(),
            "entanglement/case1": (t["case"] == 1).double().sum(), "entanglement/case2": (t["case"] == 2).double().sum(),
            "entanglement/case3": (t["case"] == 3).double().sum(),
            "entanglement/pred_dlogp_w": t["pred_dlogp_w"].sum(), "entanglement/pred_dlogp_l": t["pred_dlogp_l"].sum(),
            "entanglement/d_w": t["d_w"].sum(), "entanglement/d_l": t["d_l"].sum(),
            "entanglement/exact_fallback": torch.tensor(float(self.fallbacks)),
        }
        if batch is not None:
            # Per-process batch-mean quantities; scaled by the pair count so that the loop's
            # per-pair normalisation returns them (averaged over processes under DDP).
            for k, v in batch.items():
                sums[f"entanglement/{k}"] = torch.tensor(v * len(rows), dtype=torch.float64)
        if "step_dlogp_w" in t:
            sums["entanglement/step_dlogp_w"] = t["step_dlogp_w"].sum()
            sums["entanglement/step_dlogp_l"] = t["step_dlogp_l"].sum()
            step_case = classify(t["step_dlogp_w"], t["step_dlogp_l"])
            for c in (1, 2, 3):  # the cases of the first-order changes along the optimiser's own update
                sums[f"entanglement/step_case{c}"] = (step_case == c).double().sum()
        if "real_dlogp_w" in t:
            sums["entanglement/real_dlogp_w"] = t["real_dlogp_w"].sum()
            sums["entanglement/real_dlogp_l"] = t["real_dlogp_l"].sum()
            real_case = classify(t["real_dlogp_w"], t["real_dlogp_l"])
            for c in (1, 2, 3):  # the cases of the changes that actually happened (the optimiser's own step)
                sums[f"entanglement/real_case{c}"] = (real_case == c).double().sum()
        return {k: v.float() for k, v in sums.items()}, rows
