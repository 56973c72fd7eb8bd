"""`entangle study overoptimization`: gold reward against KL as a frontier over beta, with a positive control.

    summary = run(Settings(out="runs/overopt"))                   # default: tiny, 3 seeds, about 20 min here
    summary = run(Settings.quick(out="runs/overopt-quick"))       # one seed, fewer betas, about 2 min

The design (Gao et al. 2022; Rafailov et al. 2024, arXiv:2406.02900; the trust-region paper's claim):
1. An SFT policy on the verdict task (`synthetic:verdict`: a label word then 0-8 filler words), whose
   samples have entropy in label, length and words, so KL from it grows gradually.
2. Per seed and arm, preference pairs: two SFT samples per prompt, labelled by Bradley-Terry draws on
   `gold` (arm "gold") or on `proxy` = gold + a length bonus (arm "proxy", the positive control in which
   over-optimisation must appear: proxy keeps paying for words gold charges for). A seed is a new label
   draw and data order; every run samples its evaluations with the same seed (paired comparisons).
3. Static DPO over a sweep of beta, and trust-region runs (soft: tau 1, alpha grid; hard: tau grid) at two
   betas, each evaluated at several checkpoints on held-out prompts: gold and KL(pi || pi_SFT) from samples.
4. The pre-set statistic (`frontier`): fit g(d) = g0 + d (a - b d), d = sqrt(KL), to the static points;
   the positive control passes when the proxy arm's static frontier rises above SFT and falls after its
   peak (bootstrap intervals over seeds then prompts above zero), else "the control failed: no conclusion";
   each trust-region kind's frontier minus the static one, averaged over d from the static peak to the
   largest d both reach, with its interval; a verdict only when the interval excludes zero.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import asdict, dataclass, field

import numpy as np

from entangle.errors import ConfigError
from entangle.studies import (given_settings, check_positive, check_reference_loss, check_whole, make_study_folder,
                              run_once, write_summary)
from entangle.studies.frontier import Curves, compare, describe_fit, positive_control

log = logging.getLogger(__name__)

SCORERS = {"gold": "python:entangle.synthetic:gold", "proxy": "python:entangle.synthetic:proxy"}
CONTROL_ARM = "proxy"


@dataclass
class Settings:
    """Every setting of the study, with its valid range (checked by `validate` before any work)."""

    out: str = "runs/overoptimization"
    model: str = "tiny"                 # tiny (built here) | a local folder or hub id (SFT on the same task)
    seeds: int = 3                      # label draws and data orders; >= 1 (>= 2 for an interval over seeds)
    arms: tuple = ("gold", "proxy")     # labellers: gold | proxy (the positive control)
    betas: tuple = (0.01, 0.03, 0.1, 0.3, 1.0)   # the static frontier's sweep; each > 0
    tr_betas: tuple = (0.1, 0.3)        # betas of the trust-region runs; each > 0
    soft_alphas: tuple = (0.01, 0.05)   # soft updates every step (tau 1); each in (0, 1]
    hard_taus: tuple = (50, 100)        # hard updates (alpha 1) every tau steps; each >= 1
    loss: str = "dpo"                   # any loss with a reference and a beta
    steps: int = 300                    # optimiser steps per run; >= 1
    lr: float = 1e-4                    # constant after warmup_steps; > 0
    warmup_steps: int = 10              # >= 0
    batch_size: int = 16                # >= 1
    evals: int = 6                      # checkpoints after step 0 (every steps / evals); >= 2
    n_label: int = 512                  # prompts labelled per seed and arm; >= 8
    n_eval: int = 256                   # held-out prompts; >= 8
    samples: int = 2                    # samples per held-out prompt; >= 1
    noise: float = 0.5                  # Bradley-Terry temperature of the labels; >= 0
    max_new_tokens: int = 20            # >= 1
    sft_steps: int = 200                # >= 1
    sft_lr: float = 3e-3                # > 0
    reps: int = 1000                    # bootstrap draws; >= 100
    extra: list = field(default_factory=list)   # config overrides for every DPO run

    @classmethod
    def quick(cls, **kw) -> "Settings":
        """One seed, the proxy arm, three betas, one soft and one hard run (about 2 minutes here)."""
        return cls(**{"seeds": 1, "arms": ("proxy",), "betas": (0.03, 0.1, 1.0), "tr_betas": (0.1,),
                      "soft_alphas": (0.05,), "hard_taus": (100,), **kw})

    def validate(self) -> "Settings":
        def need(ok: bool, name: str, what: str):
            if not ok:
                raise ConfigError(f"study overoptimization: {name} = {getattr(self, name)!r}: {what}")

        finite = (lambda x: isinstance(x, (int, float)) and math.isfinite(x))
        need(isinstance(self.seeds, int) and self.seeds >= 1, "seeds", "must be a whole number >= 1")
        need(len(self.arms) >= 1 and set(self.arms) <= set(SCORERS), "arms", f"choose from {', '.join(SCORERS)}")
        for name in ("betas", "tr_betas"):
            need(len(getattr(self, name)) >= 1 and all(finite(b) and b > 0 for b in getattr(self, name)), name,
                 "every value must be a number > 0")
        need(len(self.betas) >= 2, "betas", "a frontier needs at least 2 betas")
        need(all(finite(a) and 0 < a <= 1 for a in self.soft_alphas), "soft_alphas", "each must be in (0, 1]")
        need(all(isinstance(t, int) and t >= 1 for t in self.hard_taus), "hard_taus", "each must be a whole number >= 1")
        check_whole("overoptimization", self, {"steps": 1, "warmup_steps": 0, "batch_size": 1, "evals": 2,
                                               "n_label": 8, "n_eval": 8, "samples": 1, "max_new_tokens": 1,
                                               "sft_steps": 1, "reps": 100})
        need(self.evals <= self.steps, "evals", "must not exceed steps")
        check_positive("overoptimization", self, ("lr", "sft_lr"))
        need(finite(self.noise) and self.noise >= 0, "noise", "must be a number >= 0")
        check_reference_loss("overoptimization", self.loss)
        return self


def runs(s: Settings) -> dict[str, list[str]]:
    """Run name -> its overrides: the static sweep, then soft and hard runs at each of `tr_betas`."""
    out = {f"static-b{b:g}": ["reference.type=frozen", f"loss.params.beta={b}"] for b in s.betas}
    for b in s.tr_betas:
        out.update({f"soft-b{b:g}-a{a:g}": ["reference.type=soft", "reference.tau=1", f"reference.alpha={a}",
                                            f"loss.params.beta={b}"] for a in s.soft_alphas})
        out.update({f"hard-b{b:g}-t{t}": ["reference.type=hard", f"reference.tau={t}", f"loss.params.beta={b}"]
                    for t in s.hard_taus})
    return out


def kind(run_name: str) -> str:
    return run_name.split("-", 1)[0]


def sft_policy(s: Settings) -> str:
    """The SFT policy: the base model (tiny: built here, tokenizer trained on the task) after `sft_steps` on
    the verdict demonstrations."""
    from entangle import synthetic

    base = s.model
    if s.model == "tiny":
        from entangle.models import save_tiny, trained_tokenizer

        base = os.path.join(s.out, "base-tiny")
        if not os.path.exists(os.path.join(base, "config.json")):
            texts = [e.prompt + r for e in synthetic.verdict_pairs(1024, "train", 0) for r in (e.chosen, e.rejected)]
            save_tiny(base, trained_tokenizer(texts), seed=0)
    sft_dir = os.path.join(s.out, "sft")
    run_once([f"model.name={base}", "loss.name=sft", "reference.type=none", f"optimizer.lr={s.sft_lr}",
              f"train.max_steps={s.sft_steps}", "data.train=synthetic:verdict?n=512&split=train", "data.max_length=64",
              f"train.batch_size={s.batch_size}", "schedule.decay=constant", "schedule.warmup_steps=10",
              "train.seed=0"], sft_dir)
    return os.path.join(sft_dir, "final")


def make_preferences(path: str, policy: str, scorer: str, s: Settings, seed: int, split: str = "train",
                     n: int | None = None) -> dict:
    """Label `n` (default `n_label`) prompts of `split` once (reused while the settings match `PATH.meta.json`)."""
    from entangle.api import label

    n = n or s.n_label
    meta = {"policy": policy, "scorer": scorer, "n": n, "split": split, "noise": s.noise, "seed": seed,
            "max_new_tokens": s.max_new_tokens}
    meta_path = path + ".meta.json"
    if os.path.exists(path) and os.path.exists(meta_path):
        with open(meta_path) as f:
            saved = json.load(f)
        if {k: saved.get(k) for k in meta} == meta:
            return saved
    dropped: dict = {}
    rows = label(policy, f"synthetic:verdict?n={n}&split={split}&seed={seed}", scorer, out=path,
                 noise=s.noise, seed=seed, dropped=dropped, max_new_tokens=s.max_new_tokens, temperature=1.0,
                 batch_size=64, max_prompt_length=64)
    saved = {**meta, "pairs": len(rows), "dropped": dropped}
    with open(meta_path, "w") as f:
        json.dump(saved, f)
    return saved


def dpo_overrides(s: Settings, policy: str, data: str, seed: int) -> list[str]:
    every = max(1, s.steps // s.evals)
    return [f"model.name={policy}", f"data.train={data}", "data.max_length=64", f"loss.name={s.loss}",
            f"optimizer.lr={s.lr}", "schedule.decay=constant", f"schedule.warmup_steps={s.warmup_steps}",
            f"train.batch_size={s.batch_size}", f"train.max_steps={s.steps}", f"train.seed={seed}",
            "train.eval_at_start=true", f"eval.generate.every={every}",
            f"eval.generate.prompts=synthetic:verdict?n={s.n_eval}&split=test", f"eval.generate.n_prompts={s.n_eval}",
            f"eval.generate.n={s.samples}", f"eval.generate.max_new_tokens={s.max_new_tokens}",
            f"eval.generate.scorer={SCORERS['gold']}", "eval.generate.seed=0", "eval.generate.batch_size=128",
            "reference.kl_to_init=false", *s.extra]


def per_prompt(run_dir: str, n_prompts: int) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """(gold [C, P], KL [C, P], steps [C]) of a run's evaluation samples, averaged over each prompt's samples."""
    folder = os.path.join(run_dir, "samples")
    steps = sorted(int(f[len("step-"):-len(".jsonl")]) for f in os.listdir(folder) if f.startswith("step-"))
    gold, kl = np.zeros((len(steps), n_prompts)), np.zeros((len(steps), n_prompts))
    count = np.zeros((len(steps), n_prompts))
    for c, step in enumerate(steps):
        with open(os.path.join(folder, f"step-{step}.jsonl")) as f:
            for line in f:
                r = json.loads(line)
                i = r["prompt_index"]
                gold[c, i] += r["score"]
                kl[c, i] += r["logp"] - r["logp_initial"]
                count[c, i] += 1
    return gold / count, kl / count, steps


def train_metrics(rows: list[dict]) -> dict:
    """The last logged training values of the loss's chosen weight and the log-ratio to the current reference."""
    last = [r for r in rows if "loss/d_w" in r]
    first = last[0] if last else {}
    end = last[-1] if last else {}
    return {"d_w_start": first.get("loss/d_w"), "d_w_end": end.get("loss/d_w"),
            "logratio_end": end.get("ref/logratio")}


def run(s: Settings | None = None, report: bool = True) -> dict:
    s = (s or Settings()).validate()
    make_study_folder(s.out)
    policy = sft_policy(s)
    plan = runs(s)
    gold: dict = {}     # arm -> run name -> [seeds] of [C, P]
    kl: dict = {}
    table: dict = {}    # arm -> run name -> per-checkpoint means over seeds
    labels: dict = {}
    for seed in range(s.seeds):
        for arm in s.arms:
            folder = os.path.join(s.out, f"seed-{seed}", arm)
            os.makedirs(folder, exist_ok=True)
            data = os.path.join(folder, "preferences.jsonl")
            labels[f"seed-{seed}/{arm}"] = make_preferences(data, policy, SCORERS[arm], s, seed)
            for name, ref in plan.items():
                log.info("over-optimisation study: seed %d, %s arm, %s (%d steps)", seed, arm, name, s.steps)
                rows = run_once([*dpo_overrides(s, policy, os.path.abspath(data), seed), *ref],
                                os.path.join(folder, name))
                g, k, steps = per_prompt(os.path.join(folder, name), s.n_eval)
                gold.setdefault(arm, {}).setdefault(name, []).append(g)
                kl.setdefault(arm, {}).setdefault(name, []).append(k)
                table.setdefault(arm, {}).setdefault(name, {"steps": steps, "train": []})["train"].append(
                    train_metrics(rows))
    summary = {"study": "overoptimization", "model": s.model, "settings": asdict(s),
               "policy": policy, "scorers": SCORERS, "control_arm": CONTROL_ARM, "labels": labels,
               "arms": {arm: analyse(gold[arm], kl[arm], table[arm], s) for arm in s.arms}}
    summary["verdict"] = headline(summary)
    from entangle.plots import plot_frontier

    summary["figures"] = [os.path.basename(plot_frontier(summary["arms"], os.path.join(s.out, "frontier.png"),
                                                         "Gold against sqrt KL from the SFT policy"))]
    # the report's training curves: the first seed's static sweep of the control arm (or the first arm)
    arm = CONTROL_ARM if CONTROL_ARM in s.arms else s.arms[0]
    summary["runs"] = {f"{arm}/{n}": os.path.join("seed-0", arm, n) for n in plan if kind(n) == "static"}
    return write_summary(s.out, summary, report, f"Over-optimisation frontier: {s.model}, {len(s.betas)} betas, "
                         f"{s.seeds} seed(s)")


def _curves(gold: dict, kl: dict, names: list[str]) -> Curves:
    return Curves(np.stack([np.stack(gold[n]) for n in names], 1), np.stack([np.stack(kl[n]) for n in names], 1))


def analyse(gold: dict, kl: dict, table: dict, s: Settings) -> dict:
    """One arm: the static frontier (both fitted forms), the positive control, each trust-region kind against
    the static frontier, and the per-run points (means over seeds, with the seed standard error of gold)."""
    static_names = [n for n in gold if kind(n) == "static"]
    static = _curves(gold, kl, static_names)
    d, g = static.points()
    out = {"static_fit": describe_fit(d, g), "control": positive_control(static, s.reps), "trust_region": {},
           "points": {}}
    for k in ("soft", "hard"):
        names = [n for n in gold if kind(n) == k]
        if names:
            moving = _curves(gold, kl, names)
            out["trust_region"][k] = {"runs": names, **compare(static, moving, s.reps),
                                      "fit": describe_fit(*moving.points())}
    for name in gold:
        G, K = np.stack(gold[name]), np.stack(kl[name])              # [S, C, P]
        seed_gold = G.mean(-1)                                       # [S, C]
        se = seed_gold.std(0, ddof=1) / np.sqrt(len(G)) if len(G) > 1 else np.full(G.shape[1], np.nan)
        out["points"][name] = [{"step": st, "sqrt_kl": float(np.sqrt(max(K[:, c].mean(), 0.0))),
                                "kl": float(K[:, c].mean()), "gold": float(seed_gold[:, c].mean()),
                                "gold_seed_se": None if np.isnan(se[c]) else float(se[c])}
                               for c, st in enumerate(table[name]["steps"])]
        out.setdefault("train", {})[name] = table[name]["train"]
    return out


def headline(summary: dict) -> str:
    """One paragraph: the control's outcome, then each arm's trust-region verdicts (or why there is none)."""
    arms = summary["arms"]
    control = arms.get(summary["control_arm"], {}).get("control")
    parts = []
    if control is None:
        parts.append(f"no positive control (the {summary['control_arm']} arm was not run): verdicts are unchecked")
        ok = True
    else:
        r, f = control["rise"], control["fall"]
        ok = control["passed"]
        parts.append(f"positive control ({summary['control_arm']} arm) {'passed' if ok else 'FAILED'}: static gold "
                     f"rises {r['estimate']:+.3f} [{r['interval'][0]:+.3f}, {r['interval'][1]:+.3f}] above SFT to "
                     f"its peak at sqrt KL {control['peak_d']:.2f}, then falls {f['estimate']:+.3f} "
                     f"[{f['interval'][0]:+.3f}, {f['interval'][1]:+.3f}] by sqrt KL {control['d_max']:.2f}")
        if not ok:
            parts.append("the control failed: no conclusion about the trust region")
    for arm, a in arms.items():
        for k, t in a["trust_region"].items():
            if t["interval"] is None:
                parts.append(f"{arm} arm, {k}: {t['verdict']}")
                continue
            verdict = t["verdict"] if ok else f"no conclusion (measured {t['verdict']})"
            parts.append(f"{arm} arm, {k} minus static gold {t['where']} (sqrt KL {t['grid'][0]:.2f}-{t['grid'][-1]:.2f})"
                         f": {t['gap']:+.3f} [{t['interval'][0]:+.3f}, {t['interval'][1]:+.3f}] -> {verdict}")
    return "; ".join(parts)


def format_table(summary: dict) -> str:
    lines = []
    for arm, a in summary["arms"].items():
        q = a["static_fit"]["quadratic"]
        lines.append(f"{arm} arm: static frontier g(d) = {q['g0']:+.3f} + d ({q['a']:+.3f} - {q['b']:.3f} d), "
                     f"rms {q['rms']:.3f}; log form rms {a['static_fit']['log']['rms']:.3f}")
        lines.append(f"  {'run':22} " + " ".join(f"{'step ' + str(p['step']):>13}" for p in
                                                 next(iter(a['points'].values()))))
        for name, pts in a["points"].items():
            lines.append(f"  {name:22} " + " ".join(f"{p['sqrt_kl']:5.2f}:{p['gold']:+6.3f} " for p in pts))
    lines.append("(each cell: sqrt KL from the SFT policy : gold, means over seeds)")
    lines.append("")
    lines.append(summary["verdict"].replace("; ", "\n"))
    return "\n".join(lines)


def settings_from_args(args) -> Settings:
    """Settings from `entangle study overoptimization` arguments (None keeps the default or --quick's)."""
    given = given_settings(Settings, args)
    for name in ("arms", "betas", "tr_betas", "soft_alphas", "hard_taus"):
        if name in given:
            given[name] = tuple(given[name])
    return Settings.quick(**given) if args.quick else Settings(**given)
