"""`entangle scan`: score every preference pair for entanglement at the initial model, before training.

    rows = scan(model, tokenizer, pairs, loss="dpo")        # one dict per pair (entanglement.jsonl's names)
    kept = keep(rows, drop_case=[2], max_cos=0.9, max_ches_quantile=0.9)     # the indices that pass
    write_filtered("pairs.jsonl", kept, "kept.jsonl")        # the same records, in the input's format

Per pair: the inner product, norms and cosine of the chosen and rejected log-prob gradients (the exact
machinery of `entanglement_stats`, batched), the loss's d_w / d_l at the start (policy = reference),
the predicted case of a plain gradient step and its first-order changes per unit learning rate, the
CHES score of Razin et al. (2024, "Unintentional Unalignment", eq. 3) and its length-normalised form,
the share of tokens the two responses have in common, and lengths.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from dataclasses import dataclass, field, fields
from typing import Sequence

import torch

from entangle import losses
from entangle.batching import Batch, collate
from entangle.data import TokenizedPair, iter_records
from entangle.diagnostics import classify, entanglement_stats, predicted_changes, with_cos
from entangle.diagnostics.ghost import GradientRecorder, Unsupported, row_layout
from entangle.errors import DataError
from entangle.logps import response_logps, split_model

log = logging.getLogger(__name__)


@dataclass
class ScanSettings:
    """Every option of `entangle scan` and `entangle.scan(model, data, out, **options)`: the one place of their
    defaults and valid ranges (`validate`, one line each, before anything loads)."""

    loss: str = "dpo"                       # the loss whose d_w / d_l and predicted case are reported
    loss_params: dict = field(default_factory=dict)
    method: str = "fast"                    # fast (one backward per batch) | exact (per pair)
    tokens: int = 3                         # token views of the N most entangled pairs (0: none)
    batch_size: int = 1                     # pairs per forward/backward (shrinks to fit memory_gib)
    max_length: int | None = 512
    max_prompt_length: int | None = None
    limit: int | None = None                # the first N pairs
    split: str = "train"                    # split for datasets folders and hub ids
    lora_r: int = 0                         # scan the gradients of fresh LoRA adapters of rank R
    layers: int | None = None               # the gradient over the last K decoder layers only
    drop_case: tuple = ()                   # filter: drop pairs whose predicted case is one of these
    max_cos: float | None = None            # filter: drop pairs whose gradient cosine is above this
    max_ches_quantile: float | None = None  # filter: drop pairs with CHES above this quantile
    max_ches_norm_quantile: float | None = None
    keep_path: str | None = None            # where the pairs that pass go (default OUT/kept.<ext>)
    device: str = "auto"
    dtype: str = "auto"
    memory_gib: float | None = None         # memory budget (default: 90 % of what is free)
    progress: bool = False

    @classmethod
    def of(cls, options: dict) -> "ScanSettings":
        """Settings from keyword options; an unknown option is one line naming the valid ones."""
        from entangle.errors import ConfigError

        names = [f.name for f in fields(cls)]
        unknown = sorted(set(options) - set(names))
        if unknown:
            raise ConfigError(f"scan: unknown option {unknown[0]!r}; valid: {', '.join(names)}")
        return cls(**options).validate()

    @property
    def filtering(self) -> bool:
        return bool(self.drop_case) or any(v is not None for v in (self.max_cos, self.max_ches_quantile,
                                                                   self.max_ches_norm_quantile))

    def validate(self) -> "ScanSettings":
        from entangle import memory
        from entangle.errors import ConfigError

        whole = lambda v, low: isinstance(v, int) and not isinstance(v, bool) and v >= low   # noqa: E731
        checks = [(self.method in ("fast", "exact"), f"--method must be fast or exact (got {self.method!r})"),
                  (whole(self.batch_size, 1), f"--batch-size must be >= 1 (got {self.batch_size})"),
                  (self.limit is None or whole(self.limit, 1), f"--limit must be a whole number >= 1 (got {self.limit})"),
                  (whole(self.tokens, 0), f"--tokens must be >= 0 (got {self.tokens})"),
                  (self.max_length is None or whole(self.max_length, 2), f"--max-length must be >= 2 (got {self.max_length})"),
                  (self.max_prompt_length is None or whole(self.max_prompt_length, 1),
                   f"--max-prompt-length must be >= 1 (got {self.max_prompt_length})"),
                  (whole(self.lora_r, 0), f"--lora-r must be >= 0 (got {self.lora_r})"),
                  (self.layers is None or whole(self.layers, 1), f"--layers must be >= 1 (got {self.layers})"),
                  (all(c in (0, 1, 2, 3) for c in self.drop_case),
                   f"--drop-case takes cases 0-3 (got {list(self.drop_case)})"),
                  (self.max_cos is None or -1 <= self.max_cos <= 1, f"--max-cos must be in [-1, 1] (got {self.max_cos})")]
        for q, name in ((self.max_ches_quantile, "--max-ches-quantile"),
                        (self.max_ches_norm_quantile, "--max-ches-norm-quantile")):
            checks.append((q is None or 0 < q <= 1, f"{name} must be in (0, 1] (got {q})"))
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        memory.check_gib(self.memory_gib)
        return self


@torch.no_grad()
def response_states(model, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One forward without gradient -> (log-prob sums [N], sums of the last-layer hidden states that predict
    each row's response tokens [N, d], response lengths [N]). The hidden states are the LM head's input."""
    out = response_logps(model, batch.input_ids, batch.attention_mask, batch.response_mask, features=True)
    sums = torch.zeros(batch.n_rows, out.features.shape[1], dtype=torch.float64, device=out.features.device)
    sums.index_add_(0, out.rows, out.features.double())
    return out.logps, sums, out.lengths


def recorded_pass(model, batch: Batch):
    """The fast path in one forward and one backward: (gradient statistics, log-prob sums [N], hidden-state sums
    [N, d], lengths [N]), the hidden states read off the LM head's input; None where the recorder cannot apply."""
    if split_model(model) is None:
        return None
    rec = GradientRecorder(model)
    try:
        model.zero_grad(set_to_none=True)
        rec.start(batch.n_rows, *row_layout(batch))
        out = response_logps(model, batch.input_ids, batch.attention_mask, batch.response_mask, features=True)
        rec.stop()
        out.logps.sum().backward()   # coefficient 1 per row: the output gradients are d log pi_r / d out
        stats = with_cos(rec.result(torch.ones(batch.n_rows)))
    except Unsupported as e:
        log.info("scan: fast path not applicable (%s); using the exact one", e)
        return None
    finally:
        rec.close()
        model.zero_grad(set_to_none=True)
    x = out.features.detach()
    sums = torch.zeros(batch.n_rows, x.shape[1], dtype=torch.float64, device=x.device).index_add(0, out.rows,
                                                                                                x.double())
    return stats, out.logps.detach(), sums, out.lengths


def last_layers_only(model, k: int) -> str:
    """Make only the last `k` decoder layers (and the final norm) trainable, so that the scan measures the gradient
    over them and the backward stops at layer L - k. Returns what is measured, in words. A LoRA model keeps only
    those layers' adapters."""
    parts = split_model(model)
    decoder = parts[0] if parts is not None else None
    layers = getattr(decoder, "layers", None) or getattr(decoder, "h", None)
    if layers is None:
        raise DataError(f"--layers: {type(model).__name__} has no decoder layer list entangle knows")
    if not 1 <= k <= len(layers):
        raise DataError(f"--layers must be in [1, {len(layers)}] for this model (got {k})")
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    keep = set()
    for module in [*layers[-k:], getattr(decoder, "norm", None) or getattr(decoder, "ln_f", None)]:
        if module is not None:
            keep |= {id(p) for p in module.parameters() if id(p) in trainable}
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)
    return f"the last {k} of {len(layers)} decoder layers and the final norm"


def ches(chosen_sums: torch.Tensor, rejected_sums: torch.Tensor, chosen_lengths, rejected_lengths):
    """CHES = <sum h(y+), sum h(y-)> - |sum h(y+)|^2, and the length-normalised form with the means
    (sum h / |y|) in place of the sums; shapes [B, d] -> [B], [B]."""
    raw = (chosen_sums * rejected_sums).sum(1) - (chosen_sums ** 2).sum(1)
    mw = chosen_sums / chosen_lengths.double().clamp_min(1)[:, None]
    ml = rejected_sums / rejected_lengths.double().clamp_min(1)[:, None]
    return raw, (mw * ml).sum(1) - (mw ** 2).sum(1)


def shared_tokens(a: Sequence[int], b: Sequence[int]) -> float:
    """The share of tokens two responses have in common: 2 |a ∩ b| / (|a| + |b|), as multisets."""
    common = sum((Counter(a) & Counter(b)).values())
    return 2 * common / max(len(a) + len(b), 1)


def scan(model, tokenizer, pairs: Sequence[TokenizedPair], loss: str = "dpo", loss_params: dict | None = None,
         method: str = "fast", batch_size: int = 4, progress: bool = False) -> list[dict]:
    """One row per pair, in the order given (see the module docstring for the fields)."""
    fn = losses.get(loss, **(loss_params or {}))
    if not fn.paired:
        raise DataError(f"loss {loss!r} is unpaired; the scan scores preference pairs (use a paired loss)")
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id
    rows: list[dict] = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(pairs), desc="scan", unit="pair", dynamic_ncols=True)
    model.eval()   # no dropout: the statistics of the model as it is
    for s in range(0, len(pairs), batch_size):
        chunk = list(pairs[s : s + batch_size])
        batch = collate(chunk, pad).to(device)
        B = len(chunk)
        got = recorded_pass(model, batch) if method == "fast" else None
        if got is None:
            stats = entanglement_stats(model, chunk, "exact", pad)
            logps, sums, lengths = response_states(model, batch)
        else:
            stats, logps, sums, lengths = got
        pc, pr = logps[:B].double(), logps[B:].double()
        lc, lr = lengths[:B], lengths[B:]
        ref = (pc, pr) if fn.uses_reference else (None, None)   # at the start the reference is the policy
        d_w, d_l = (t.double().cpu() for t in losses.coefficients(fn, pc, pr, *ref, lc, lr))
        stats = {k: v.double().cpu() for k, v in stats.items()}
        pred_w, pred_l = predicted_changes(stats, d_w, d_l, 1.0)
        case = classify(pred_w, pred_l)
        raw, norm = (t.cpu() for t in ches(sums[:B], sums[B:], lc, lr))
        for i, p in enumerate(chunk):
            rows.append({
                "index": p.index, "inner": float(stats["inner"][i]), "norm_w2": float(stats["norm_w2"][i]),
                "norm_l2": float(stats["norm_l2"][i]), "cos": float(stats["cos"][i]), "d_w": float(d_w[i]),
                "d_l": float(d_l[i]), "case": int(case[i]), "pred_dlogp_w": float(pred_w[i]),
                "pred_dlogp_l": float(pred_l[i]), "ches": float(raw[i]), "ches_norm": float(norm[i]),
                "shared_tokens": shared_tokens(p.chosen_ids, p.rejected_ids), "len_w": int(lc[i]),
                "len_l": int(lr[i]), "len_prompt": len(p.prompt_ids), "logp_w": float(pc[i]),
                "logp_l": float(pr[i])})
        if bar is not None:
            bar.update(B)
    if bar is not None:
        bar.close()
    return rows


def quantile(values: Sequence[float], q: float) -> float:
    return float(torch.quantile(torch.tensor(values, dtype=torch.float64), q))


def keep(rows: Sequence[dict], drop_case: Sequence[int] = (), max_cos: float | None = None,
         max_ches_quantile: float | None = None, max_ches_norm_quantile: float | None = None) -> list[int]:
    """The `index` of every row that passes all the filters given (quantiles over the scanned rows)."""
    limits = {}
    if max_ches_quantile is not None:
        limits["ches"] = quantile([r["ches"] for r in rows], max_ches_quantile)
    if max_ches_norm_quantile is not None:
        limits["ches_norm"] = quantile([r["ches_norm"] for r in rows], max_ches_norm_quantile)
    if max_cos is not None:
        limits["cos"] = max_cos
    return [r["index"] for r in rows
            if r["case"] not in set(drop_case) and all(r[k] <= v for k, v in limits.items())]


def source_records(source: str, split: str = "train") -> list:
    """The records of a data source as read (generated `synthetic:` pairs as prompt/chosen/rejected dicts)."""
    if source.startswith("synthetic:"):
        from entangle import synthetic

        return [{"prompt": e.prompt, "chosen": e.chosen, "rejected": e.rejected} for e in synthetic.from_source(source)]
    return [rec for _, rec in iter_records(source, split)]


def write_filtered(source: str, indices: Sequence[int], out: str, split: str = "train") -> int:
    """Write the records of `source` at `indices` (record positions) to `out`, in `out`'s format: JSONL, JSON (a
    list) or Parquet. Written to a temporary file and renamed, so `out` is never half-written."""
    wanted = set(indices)
    records = [rec for i, rec in enumerate(source_records(source, split)) if i in wanted]
    tmp = f"{out}.tmp{os.getpid()}"
    if out.endswith(".parquet"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(records), tmp)
    elif out.endswith(".json"):
        with open(tmp, "w") as f:
            json.dump(records, f, ensure_ascii=False)
    else:
        with open(tmp, "w") as f:
            for rec in records:
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    os.replace(tmp, out)
    return len(records)


def filtered_name(source: str) -> str:
    """`kept.<ext>` with the input's extension (a folder or hub dataset is written as JSONL)."""
    for ext in (".jsonl", ".json", ".parquet"):
        if source.endswith(ext) or source.endswith(ext + ".gz"):
            return f"kept{ext}"
    return "kept.jsonl"


def scan_summary(rows: Sequence[dict]) -> dict:
    """Counts, case shares and quantiles of the main statistics."""
    n = len(rows)
    out = {"pairs": n, "cases": {str(c): sum(r["case"] == c for r in rows) / max(n, 1) for c in (0, 1, 2, 3)}}
    for key in ("cos", "inner", "ches", "ches_norm", "shared_tokens", "d_w", "d_l"):
        vals = [r[key] for r in rows]
        out[key] = {f"q{int(q * 100)}": quantile(vals, q) for q in (0.1, 0.5, 0.9)} if vals else {}
    return out
