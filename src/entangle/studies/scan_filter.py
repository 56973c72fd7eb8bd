"""`entangle study scan-filter`: does the scan predict anything? DPO on the full set and on filtered sets.

    summary = run(out="runs/scan-filter", model="smollm2-135m", n_train=200, steps=30)

Scans the first `n_train` training pairs at the initial model (`OUT/scan/`), writes one filtered file per
criterion (`OUT/scan/kept-NAME.jsonl`), then trains DPO from the same model with the same seed and the same
number of steps on the full set and on each filtered set (`OUT/NAME/`, entanglement diagnostics with
realised changes), and compares the held-out chosen log-prob change and the realised case fractions.
Whatever it finds is reported; "filtering does not help" is a result.
"""

from __future__ import annotations

import logging
import os
from statistics import mean

from entangle import scanning
from entangle.checkpoint import write_json
from entangle.studies import run_once, write_summary

log = logging.getLogger(__name__)

HH = "../shared/data/hh-rlhf/helpful-base"
PRESETS = {
    "tiny": {"data": "synthetic:sentiment?config=long&n=128&split=train",
             "eval": "synthetic:sentiment?config=long&n=32&split=test", "lr": 3e-3, "batch": 8, "steps": 20,
             "max_length": 128, "n_train": 128, "every": 1},
    "smollm2-135m": {"data": f"{HH}.train.jsonl", "eval": f"{HH}.test.jsonl", "lr": 5e-6, "batch": 2,
                     "steps": 30, "max_length": 256, "n_train": 200, "every": 2},
}
# name -> what it drops (quantiles over the scanned pairs)
CRITERIA = {"full": {}, "no-case2": {"drop_case": [2]}, "cos-q75": {"max_cos_quantile": 0.75},
            "ches-q75": {"max_ches_norm_quantile": 0.75}}


def kept(rows: list[dict], criterion: dict) -> list[int]:
    cos_q = criterion.get("max_cos_quantile")
    return scanning.keep(rows, criterion.get("drop_case", ()),
                         scanning.quantile([r["cos"] for r in rows], cos_q) if cos_q else None,
                         max_ches_norm_quantile=criterion.get("max_ches_norm_quantile"))


def run(out: str = "runs/scan-filter", model: str = "smollm2-135m", data: str | None = None,
        eval_data: str | None = None, n_train: int | None = None, steps: int | None = None, seed: int = 0,
        extra: list[str] = (), report: bool = True) -> dict:
    from entangle.api import scan

    p = dict(PRESETS.get(model, PRESETS["smollm2-135m"]))
    data, eval_data = data or p["data"], eval_data or p["eval"]
    n_train, steps = n_train or p["n_train"], steps or p["steps"]
    os.makedirs(out, exist_ok=True)
    scan_dir = os.path.join(out, "scan")
    cached = os.path.join(scan_dir, "scan.jsonl")
    if os.path.exists(cached) and _scanned(scan_dir) == {"model": model, "data": data, "n": n_train}:
        import json

        with open(cached) as f:
            rows = [json.loads(x) for x in f]
        log.info("%s: reusing the scan of %d pairs", scan_dir, len(rows))
    else:
        rows = scan(model, data, out=scan_dir, max_length=p["max_length"], limit=n_train, tokens=0, device="cpu",
                    progress=True)["rows"]
        write_json(os.path.join(scan_dir, "scanned.json"), {"model": model, "data": data, "n": n_train})
    base = [f"model.name={model}", f"data.eval={eval_data}", f"data.max_length={p['max_length']}",
            "data.max_eval_examples=32", f"optimizer.lr={p['lr']}", f"train.batch_size={p['batch']}",
            f"train.max_steps={steps}", f"train.eval_every={max(1, steps // 3)}", "train.eval_at_start=true",
            f"train.seed={seed}", f"diagnostics.entanglement.every={p['every']}",
            "diagnostics.entanglement.realised=true", *extra]
    results, runs = {}, {}
    for name, criterion in CRITERIA.items():
        keep = kept(rows, criterion)
        path = os.path.join(scan_dir, f"kept-{name}.jsonl")
        scanning.write_filtered(data, keep, path)
        log.info("scan-filter: %s keeps %d of %d pairs", name, len(keep), len(rows))
        if name != "full" and len(keep) == len(rows):   # it drops nothing: the full set's run is this run
            results[name] = {**results["full"], "same_as": "full"}
            continue
        metrics = run_once([*base, f"data.train={os.path.abspath(path)}"], os.path.join(out, name))
        results[name] = {"pairs": len(keep), **summarise(metrics)}
        runs[name] = name
    summary = {"study": "scan-filter", "model": model, "data": data, "scanned": len(rows), "steps": steps,
               "criteria": CRITERIA, "runs": runs, "results": results}
    return write_summary(out, summary, report, f"Scan filters: {model}")


def _scanned(scan_dir: str) -> dict | None:
    import json

    try:
        with open(os.path.join(scan_dir, "scanned.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def summarise(rows: list[dict]) -> dict:
    evals = [r for r in rows if "eval/logps/chosen" in r]
    diag = [r for r in rows if "entanglement/real_case1" in r]
    first, last = evals[0], evals[-1]
    return {"heldout_chosen_change": last["eval/logps/chosen"] - first["eval/logps/chosen"],
            "heldout_rejected_change": last["eval/logps/rejected"] - first["eval/logps/rejected"],
            "heldout_margin_final": last["eval/rewards/margins"],
            "heldout_accuracy_final": last["eval/rewards/accuracies"],
            "real_case_fractions": {f"case{c}": mean(r[f"entanglement/real_case{c}"] for r in diag)
                                    for c in (1, 2, 3)} if diag else None,
            "cos_mean": mean(r["entanglement/cos"] for r in diag) if diag else None}


def format_table(summary: dict) -> str:
    lines = [f"{'set':9} {'pairs':>5} {'held-out chosen':>15} {'rejected':>9} {'margin':>7} {'acc':>5} "
             f"{'cos':>6}   realised c1 c2 c3"]
    for name, r in summary["results"].items():
        f = r["real_case_fractions"] or {}
        cases = " ".join(f"{f.get(f'case{c}', float('nan')):.2f}" for c in (1, 2, 3))
        cos = r["cos_mean"] if r["cos_mean"] is not None else float("nan")
        lines.append(f"{name:9} {r['pairs']:5d} {r['heldout_chosen_change']:+15.3f} {r['heldout_rejected_change']:+9.3f} "
                     f"{r['heldout_margin_final']:7.3f} {r['heldout_accuracy_final']:5.2f} {cos:+6.3f}   {cases}")
    return "\n".join(lines)
