"""`entangle study overoptimization`: gold reward against KL for a static, a soft and a hard reference.

    summary = run(out="runs/overopt", model="tiny", losses=("dpo", "ipo"))     # --quick: about 3 minutes here

A controlled, offline version of the trust-region paper's claim (quality held at larger KL): a known gold
scorer plays the human judge. (1) An SFT policy (SmolLM2-135M-Instruct; for `tiny`, a small model trained
on the sentiment statements). (2) Preference data made by the study: two samples per prompt from the SFT
policy, labelled by the gold scorer with Bradley-Terry noise (`OUT/preferences.jsonl`, TRL's format).
(3) For each loss, the same budget, seed and data with a static, a soft and a hard reference, sampling
held-out prompts at several points (`eval.generate`), so each run traces a path of (KL from the SFT policy,
gold reward). (4) `OUT/summary.json` with every point, and per loss whether the trust-region variants
reached a higher gold reward than the static reference at matched KL. Reported as measured.
"""

from __future__ import annotations

import json
import logging
import os

from entangle.studies import run_once, write_summary

log = logging.getLogger(__name__)

HH = os.path.join(os.path.dirname(__file__), "..", "..", "..", "..", "shared", "data", "hh-rlhf")
PRESETS = {
    # tiny: the sentiment statements; the gold scorer (VADER) likes "Positive sentiment.", dislikes "Negative ..."
    "tiny": {"prompts": "synthetic:sentiment?config=short&n=256&split=train&seed=0",
             "eval_prompts": "synthetic:sentiment?config=short&n=64&split=test&seed=0", "n_label": 256,
             "n_heldout": 32, "steps": 60, "lr": 1e-3, "batch": 16, "max_length": 96, "evals": 6, "n_eval": 32,
             "max_new_tokens": 8, "sft_steps": 40, "sft_lr": 3e-3},
    # smollm2: lr 5e-5 so that 40 steps move the policy measurably (at 1e-5 the static run ended at a KL
    # of 0.26 +- 0.17 nats from samples, indistinguishable from the SFT policy)
    "smollm2-135m": {"prompts": os.path.join(HH, "helpful-base.train.jsonl"),
                     "eval_prompts": os.path.join(HH, "helpful-base.test.jsonl"), "n_label": 192, "n_heldout": 32,
                     "steps": 40, "lr": 5e-5, "batch": 4, "max_length": 224, "evals": 4, "n_eval": 32,
                     "max_new_tokens": 48},
}
DEFAULT_LOSSES = ("dpo", "ipo")


def variants(steps: int, soft_alpha: float, soft_tau: int | None, hard_tau: int | None) -> dict[str, list[str]]:
    """The paper's soft (alpha 0.6) and hard (tau 512) updates are for thousands of steps; here tau is scaled
    to the run so the reference moves several times: soft every steps/10, hard every steps/4 steps."""
    return {"static": ["reference.type=frozen"],
            "soft": ["reference.type=soft", f"reference.alpha={soft_alpha}",
                     f"reference.tau={soft_tau or max(1, steps // 10)}"],
            "hard": ["reference.type=hard", f"reference.tau={hard_tau or max(1, steps // 4)}"]}


def sft_policy(out: str, model: str, p: dict, seed: int) -> str:
    """`tiny`: the sentiment study's small model after a short SFT on true-sentiment responses; else `model`."""
    if model != "tiny":
        return model
    from entangle.studies import sentiment

    base = sentiment.base_model(out, "tiny", sentiment.settings("tiny"), seed)
    sft_dir = os.path.join(out, "sft")
    run_once([f"model.name={base}", "loss.name=sft", "reference.type=none", f"optimizer.lr={p['sft_lr']}",
              f"train.max_steps={p['sft_steps']}", f"data.train={p['prompts']}",
              "data.max_length=96", f"train.batch_size={p['batch']}", f"train.seed={seed}",
              "schedule.decay=constant"], sft_dir)
    return os.path.join(sft_dir, "final")


def make_preferences(path: str, policy: str, prompts: str, n: int, scorer: str, noise: float, seed: int,
                     gen: dict) -> dict:
    """Label `n` prompts once; reused while the settings are the same (`PATH.meta.json` records them)."""
    from entangle.api import label

    meta = {"policy": policy, "prompts": prompts, "n": n, "scorer": scorer, "noise": noise, "seed": seed, **gen}
    meta_path = path + ".meta.json"
    if os.path.exists(path) and os.path.exists(meta_path):
        with open(meta_path) as f:
            if json.load(f) == meta:
                return meta
    rows = label(policy, prompts, scorer, out=path, noise=noise, limit=n, seed=seed, progress=True, **gen)
    meta_out = {**meta, "pairs": len(rows)}
    with open(meta_path, "w") as f:
        json.dump({k: v for k, v in meta_out.items() if k != "pairs"}, f)
    return meta_out


def run(out: str = "runs/overoptimization", model: str = "tiny", losses: tuple[str, ...] = DEFAULT_LOSSES,
        scorer: str = "vader", noise: float = 0.2, steps: int | None = None, seed: int = 0, soft_alpha: float = 0.6,
        soft_tau: int | None = None, hard_tau: int | None = None, extra: list[str] = (), report: bool = True,
        **overrides) -> dict:
    p = {**PRESETS.get(model, PRESETS["smollm2-135m"]), **{k: v for k, v in overrides.items() if v is not None}}
    steps = steps or p["steps"]
    os.makedirs(out, exist_ok=True)
    policy = sft_policy(out, model, p, seed)
    gen = {"max_new_tokens": p["max_new_tokens"], "temperature": 1.0, "batch_size": 16,
           "max_prompt_length": p["max_length"] - p["max_new_tokens"]}
    log.info("over-optimisation study: labelling %d prompts with %s (noise %s)", p["n_label"], scorer, noise)
    train_meta = make_preferences(os.path.join(out, "preferences.jsonl"), policy, p["prompts"], p["n_label"], scorer,
                                  noise, seed, gen)
    make_preferences(os.path.join(out, "heldout-preferences.jsonl"), policy, p["eval_prompts"], p["n_heldout"],
                     scorer, noise, seed + 1, gen)
    every = max(1, steps // p["evals"])
    base = [f"model.name={policy}", f"data.train={os.path.join(out, 'preferences.jsonl')}",
            f"data.eval={os.path.join(out, 'heldout-preferences.jsonl')}", f"data.max_length={p['max_length']}",
            f"optimizer.lr={p['lr']}", f"train.batch_size={p['batch']}", f"train.max_steps={steps}",
            f"train.seed={seed}", f"train.eval_every={every}", "train.eval_at_start=true",
            f"eval.generate.every={every}", f"eval.generate.prompts={p['eval_prompts']}",
            f"eval.generate.n_prompts={p['n_eval']}", f"eval.generate.max_new_tokens={p['max_new_tokens']}",
            f"eval.generate.scorer={scorer}", f"eval.generate.seed={seed}",
            f"diagnostics.entanglement.every={every}", *extra]
    runs, points = {}, {}
    for loss in losses:
        for name, ref in variants(steps, soft_alpha, soft_tau, hard_tau).items():
            key = f"{loss}-{name}"
            log.info("over-optimisation study: %s (%d steps)", key, steps)
            rows = run_once([*base, f"loss.name={loss}", *ref], os.path.join(out, key))
            runs[key], points[key] = key, curve(rows)
    verdicts = {loss: {v: frontier_gap(points[f"{loss}-static"], points[f"{loss}-{v}"]) for v in ("soft", "hard")}
                for loss in losses}
    summary = {"study": "overoptimization", "model": model, "policy": policy, "losses": list(losses),
               "scorer": scorer, "noise": noise, "steps": steps, "preferences": train_meta,
               "variants": {k: " ".join(v) for k, v in variants(steps, soft_alpha, soft_tau, hard_tau).items()},
               "runs": runs, "points": points, "verdicts": verdicts}
    return write_summary(out, summary, report, f"Over-optimisation study: {model}, gold = {scorer}")


def curve(rows: list[dict]) -> list[dict]:
    """The run's evaluation points in step order: gold, KL, win rate, length (each with its standard error),
    held-out chosen/rejected log-probs, and the entanglement case fractions logged nearest before it."""
    out, cases = [], {}
    for r in rows:
        if "entanglement/case1" in r:   # predicted for a plain gradient step, and along the optimiser's update
            cases = {f"{kind}case{c}": r[f"entanglement/{kind}case{c}"] for c in (1, 2, 3) for kind in ("", "step_")
                     if f"entanglement/{kind}case{c}" in r}
        if "eval/kl/initial" not in r:
            continue
        point = {"step": r["step"]}
        for k in ("gold/mean", "kl/initial", "win_rate", "length/mean"):
            point[k], point[f"{k}_se"] = r.get(f"eval/{k}"), r.get(f"eval/{k}_se")
        point["logps/chosen"], point["logps/rejected"] = r.get("eval/logps/chosen"), r.get("eval/logps/rejected")
        out.append({**point, **cases})
    return out


def _interpolate(points: list[dict], kl: float) -> float | None:
    """The static run's gold at `kl`, linear between its points sorted by KL; None outside their range."""
    pts = sorted((p["kl/initial"], p["gold/mean"]) for p in points if p.get("gold/mean") is not None)
    for (k0, g0), (k1, g1) in zip(pts, pts[1:]):
        if k0 <= kl <= k1:
            return g0 if k1 == k0 else g0 + (g1 - g0) * (kl - k0) / (k1 - k0)
    return None


def frontier_gap(static: list[dict], moving: list[dict]) -> dict:
    """Gold of a trust-region run minus the static run's gold at the same KL, over the trust-region points
    inside the static run's KL range (step 0 excluded: both are the SFT policy there). `verdict`: higher or
    lower when the mean gap exceeds twice its typical standard error, else indistinguishable; `beyond`: the
    trust-region points at a larger KL than the static run ever reached."""
    gaps, ses, beyond = [], [], 0
    top = max((p["kl/initial"] for p in static), default=0.0)
    for p in moving:
        if p["step"] == 0 or p.get("gold/mean") is None:
            continue
        g = _interpolate(static, p["kl/initial"])
        if g is None:
            beyond += p["kl/initial"] > top
            continue
        gaps.append(p["gold/mean"] - g)
        ses.append(p.get("gold/mean_se") or 0.0)
    if not gaps:
        return {"matched_points": 0, "beyond_static_kl": beyond, "mean_gap": None, "verdict": "no matched KL"}
    mean_gap = sum(gaps) / len(gaps)
    se = (sum(s * s for s in ses) / len(ses)) ** 0.5 * 2 ** 0.5   # both curves carry sampling error
    verdict = "higher" if mean_gap > 2 * se else "lower" if mean_gap < -2 * se else "indistinguishable"
    return {"matched_points": len(gaps), "beyond_static_kl": beyond, "mean_gap": mean_gap, "gap_se": se,
            "verdict": verdict}


def format_table(summary: dict) -> str:
    lines = [f"{'run':12} {'step':>5} {'sqrt KL':>8} {'gold':>15} {'win vs SFT':>11} {'length':>7} "
             f"{'chosen logp':>12} {'rejected':>9} {'case2 (AdamW step)':>18}"]
    for key, pts in summary["points"].items():
        for p in pts:
            def f(v, spec):
                return format(v, spec) if isinstance(v, (int, float)) else "-"
            gold = f"{f(p['gold/mean'], '.3f')} +- {f(p['gold/mean_se'], '.3f')}"
            lines.append(f"{key:12} {p['step']:5d} {f(max(p['kl/initial'], 0) ** 0.5, '8.3f')} {gold:>15} "
                         f"{f(p['win_rate'], '11.2f')} {f(p['length/mean'], '7.1f')} {f(p['logps/chosen'], '12.2f')} "
                         f"{f(p['logps/rejected'], '9.2f')} {f(p.get('step_case2'), '18.2f')}")
    lines.append("")
    for loss, v in summary["verdicts"].items():
        for name, r in v.items():
            gap = "-" if r["mean_gap"] is None else f"{r['mean_gap']:+.4f} +- {r['gap_se']:.4f}"
            lines.append(f"{loss}: {name} vs static at matched KL: gold gap {gap} over {r['matched_points']} "
                         f"points ({r['beyond_static_kl']} beyond the static run's KL) -> {r['verdict']}")
    return "\n".join(lines)
