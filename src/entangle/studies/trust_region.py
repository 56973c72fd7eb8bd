"""`entangle study trust-region`: the same model and data with a static, a soft and a hard reference.

    summary = run(out="runs/study-tr", model="tiny", steps=200)

Writes `OUT/{static,soft,hard}/` (ordinary run directories), `OUT/summary.json` and
`OUT/trust_region.png`: held-out log-probs, margins and preference accuracy, and KL to the initial
policy, against steps. Whatever the outcome, it is reported as measured.
"""

from __future__ import annotations

import os

from entangle.plots import plot_metrics
from entangle.studies import run_once, write_summary

PRESETS = {
    "tiny": {"data": "synthetic:sentiment?config=long&n=256&split=train",
             "eval": "synthetic:sentiment?config=long&n=64&split=test",
             "lr": 3e-3, "steps": 200, "batch": 8, "max_length": 128, "lora": 0},
    "smollm2-135m": {"data": "../shared/data/hh-rlhf/helpful-base.train.jsonl",
                     "eval": "../shared/data/hh-rlhf/helpful-base.test.jsonl",
                     "lr": 5e-6, "steps": 40, "batch": 2, "max_length": 192, "lora": 0},
}


def variants(steps: int, soft_alpha: float, hard_tau: int | None) -> dict[str, list[str]]:
    tau = hard_tau or max(1, steps // 4)
    return {"static": ["reference.type=frozen"],
            "soft": ["reference.type=soft", f"reference.alpha={soft_alpha}"],
            "hard": ["reference.type=hard", f"reference.tau={tau}"]}


def run(out: str, model: str = "tiny", data: str | None = None, eval_data: str | None = None,
        steps: int | None = None, loss: str = "dpo", soft_alpha: float = 0.6, hard_tau: int | None = None,
        lora_r: int | None = None, extra: list[str] = ()) -> dict:
    p = PRESETS.get(model, PRESETS["smollm2-135m"])
    steps = steps or p["steps"]
    base = [f"model.name={model}", f"data.train={data or p['data']}", f"data.eval={eval_data or p['eval']}",
            f"data.max_length={p['max_length']}", "data.max_eval_examples=64", f"loss.name={loss}",
            f"optimizer.lr={p['lr']}", f"train.batch_size={p['batch']}", f"train.max_steps={steps}",
            f"train.eval_every={max(1, steps // 10)}", f"model.lora.r={p['lora'] if lora_r is None else lora_r}",
            "train.eval_at_start=true", *extra]
    os.makedirs(out, exist_ok=True)
    runs, table = {}, {}
    for name, ref in variants(steps, soft_alpha, hard_tau).items():
        rows = run_once(base + ref, os.path.join(out, name))
        runs[name] = rows
        table[name] = _summarise(rows)
    plot = plot_metrics(runs, [("held-out log-probs (solid: chosen, dashed: rejected)",
                                ["eval/logps/chosen", "eval/logps/rejected"]),
                               ("held-out margin vs the initial policy", ["eval/ref/margin_vs_init"]),
                               ("held-out preference accuracy (vs the initial policy)",
                                ["eval/ref/accuracy_vs_init"]),
                               ("log pi - log pi_init on train responses (KL estimate)", ["ref/kl_to_init"])],
                        os.path.join(out, "trust_region.png"), title=f"Trust-region reference: {model}, {loss}")
    summary = {"study": "trust-region", "model": model, "loss": loss, "steps": steps,
               "variants": {k: " ".join(v) for k, v in variants(steps, soft_alpha, hard_tau).items()},
               "runs": {k: k for k in runs}, "results": table, "plot": os.path.basename(plot)}
    return write_summary(out, summary, True, f"Trust-region study: {model}, {loss}")


def _summarise(rows: list[dict]) -> dict:
    evals = [r for r in rows if "eval/logps/chosen" in r]
    train_rows = [r for r in rows if "ref/kl_to_init" in r]
    first, last = evals[0], evals[-1]
    return {"eval_logps_chosen": [first["eval/logps/chosen"], last["eval/logps/chosen"]],
            "eval_logps_rejected": [first["eval/logps/rejected"], last["eval/logps/rejected"]],
            "eval_margin_vs_init_final": last["eval/ref/margin_vs_init"],
            "eval_accuracy_vs_init_final": last.get("eval/ref/accuracy_vs_init"),   # pairs only (None for KTO)
            "kl_to_init_final": train_rows[-1]["ref/kl_to_init"] if train_rows else None,
            "ref_updates": train_rows[-1].get("ref/updates", 0) if train_rows else 0}


def format_table(summary: dict) -> str:
    lines = [f"{'variant':8} {'chosen logp (start->end)':>26} {'rejected logp':>22} {'margin':>8} {'acc':>6} {'KL':>8}"]
    for name, r in summary["results"].items():
        c, j = r["eval_logps_chosen"], r["eval_logps_rejected"]
        kl, acc = r["kl_to_init_final"], r["eval_accuracy_vs_init_final"]
        acc = f"{acc:6.2f}" if acc is not None else f"{'-':>6}"     # KTO's examples have no per-pair accuracy
        lines.append(f"{name:8} {c[0]:11.2f} -> {c[1]:9.2f} {j[0]:9.2f} -> {j[1]:9.2f} "
                     f"{r['eval_margin_vs_init_final']:8.3f} {acc} {kl if kl is not None else float('nan'):8.3f}")
    return "\n".join(lines)

