"""`entangle study trust-region`: a static, a soft and a hard reference from the same SFT policy, over seeds.

    summary = run(Settings(out="runs/study-tr"))            # tiny: 3 seeds x 3 variants, about 4 minutes here

Starts from an SFT policy of the verdict task (the over-optimisation study's, `overoptimization.sft_policy`),
never from random weights. Per seed: preference pairs labelled on the gold rule with Bradley-Terry noise
(training prompts, and held-out prompts for the log-prob figures), then one run per variant with the same
data, seed and budget. Measured per variant, mean and standard error over seeds: held-out chosen and
rejected log-prob change, held-out margin against the initial policy, and on held-out *samples* the gold
reward and KL(pi || pi_SFT) (spec sec. 8; a difference of log-probs on fixed responses is not a KL). The
finding at the top says which variant kept what, at what KL; differences inside two standard errors are
reported as such. Note: held-out responses are SFT samples, so their log-probs are expected to fall by
about KL(pi_SFT || pi) as the policy moves, whatever the reference does.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field

import numpy as np

from entangle.errors import ConfigError
from entangle.studies import (given_settings, check_positive, check_reference_loss, check_whole, make_study_folder,
                              run_once, write_summary)
from entangle.studies import overoptimization as oo

VARIANTS = ("static", "soft", "hard")
FIGURES = ("heldout_chosen_change", "heldout_rejected_change", "heldout_margin_vs_init", "gold", "gold_gain",
           "kl", "ref_updates")


@dataclass
class Settings:
    """The study's settings and their valid ranges (checked by `validate` before any work). Field names match
    `overoptimization.Settings` where they mean the same thing (the SFT policy and labelling are shared)."""

    out: str = "runs/study-trust-region"
    model: str = "tiny"             # tiny (built here) | a folder or hub id, SFT on the verdict task first
    seeds: int = 3                  # >= 1 (>= 2 for standard errors)
    loss: str = "dpo"               # any loss with a reference and a beta (TR-DPO, TR-IPO, TR-KTO ...)
    beta: float = 0.1               # > 0
    soft_alpha: float = 0.05        # soft: theta_ref <- alpha theta + (1 - alpha) theta_ref every step; (0, 1]
    hard_tau: int = 100             # hard: theta_ref <- theta every tau steps; >= 1
    steps: int = 300                # >= 1
    lr: float = 1e-4                # constant after warmup_steps; > 0
    warmup_steps: int = 10
    batch_size: int = 16
    evals: int = 6                  # evaluations after step 0; >= 1
    n_label: int = 512              # training prompts labelled per seed; >= 8
    n_heldout: int = 128            # held-out prompts labelled per seed (log-prob figures); >= 8
    n_eval: int = 256               # held-out prompts sampled (gold, KL); >= 8
    samples: int = 2
    noise: float = 0.5              # Bradley-Terry temperature on gold; >= 0
    max_new_tokens: int = 20
    sft_steps: int = 200
    sft_lr: float = 3e-3
    lora_r: int = 0                 # LoRA rank of the DPO runs (0: full fine-tuning)
    extra: list = field(default_factory=list)

    def validate(self) -> "Settings":
        def need(ok: bool, name: str, what: str):
            if not ok:
                raise ConfigError(f"study trust-region: {name} = {getattr(self, name)!r}: {what}")

        check_whole("trust-region", self, {"seeds": 1, "hard_tau": 1, "steps": 1, "warmup_steps": 0,
                                           "batch_size": 1, "evals": 1, "n_label": 8, "n_heldout": 8, "n_eval": 8,
                                           "samples": 1, "max_new_tokens": 1, "sft_steps": 1, "lora_r": 0})
        need(self.evals <= self.steps, "evals", "must not exceed steps")
        check_positive("trust-region", self, ("beta", "lr", "sft_lr"))
        need(math.isfinite(self.soft_alpha) and 0 < self.soft_alpha <= 1, "soft_alpha", "must be in (0, 1]")
        need(math.isfinite(self.noise) and self.noise >= 0, "noise", "must be a number >= 0")
        check_reference_loss("trust-region", self.loss)
        return self


def variants(s: Settings) -> dict[str, list[str]]:
    return {"static": ["reference.type=frozen"],
            "soft": ["reference.type=soft", "reference.tau=1", f"reference.alpha={s.soft_alpha}"],
            "hard": ["reference.type=hard", f"reference.tau={s.hard_tau}"]}


def run(s: Settings | None = None, report: bool = True) -> dict:
    s = (s or Settings()).validate()
    make_study_folder(s.out)
    policy = oo.sft_policy(s)
    per_seed: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    for seed in range(s.seeds):
        folder = os.path.join(s.out, f"seed-{seed}")
        os.makedirs(folder, exist_ok=True)
        train = os.path.join(folder, "preferences.jsonl")
        heldout = os.path.join(folder, "heldout-preferences.jsonl")
        oo.make_preferences(train, policy, oo.SCORERS["gold"], s, seed)
        oo.make_preferences(heldout, policy, oo.SCORERS["gold"], s, seed, split="test", n=s.n_heldout)
        base = [*oo.dpo_overrides(s, policy, os.path.abspath(train), seed), f"data.eval={os.path.abspath(heldout)}",
                f"train.eval_every={max(1, s.steps // s.evals)}", f"loss.params.beta={s.beta}",
                f"model.lora.r={s.lora_r}", "reference.kl_to_init=true"]
        for name, ref in variants(s).items():
            rows = run_once([*base, *ref], os.path.join(folder, name))
            per_seed[name].append(measure(rows))
    results = {name: aggregate(values) for name, values in per_seed.items()}
    summary = {"study": "trust-region", "model": s.model, "policy": policy, "settings": asdict(s),
               "variants": {k: " ".join(v) for k, v in variants(s).items()}, "per_seed": per_seed,
               "results": results, "runs": {f"{v}": os.path.join("seed-0", v) for v in VARIANTS}}
    summary["verdict"] = finding(results, s.seeds)
    return write_summary(s.out, summary, report, f"Trust-region study: {s.model}, {s.loss}, beta {s.beta:g}")


def measure(rows: list[dict]) -> dict:
    """One run's figures: held-out log-prob changes and margin vs the initial policy (pairs), gold and KL from
    samples at the end, and the reference's update count."""
    pairs = [r for r in rows if "eval/logps/chosen" in r]
    samples = [r for r in rows if "eval/kl/initial" in r]
    first, last, end = pairs[0], pairs[-1], samples[-1]
    updates = [r["ref/updates"] for r in rows if "ref/updates" in r]
    return {"heldout_chosen_change": last["eval/logps/chosen"] - first["eval/logps/chosen"],
            "heldout_rejected_change": last["eval/logps/rejected"] - first["eval/logps/rejected"],
            "heldout_margin_vs_init": last.get("eval/ref/margin_vs_init"),
            "gold": end["eval/gold/mean"], "gold_gain": end["eval/gold/mean"] - samples[0]["eval/gold/mean"],
            "kl": end["eval/kl/initial"], "kl_se": end.get("eval/kl/initial_se"),
            "ref_updates": updates[-1] if updates else 0}


def aggregate(values: list[dict]) -> dict:
    """Mean and standard error over seeds of every figure (SE None with one seed)."""
    out = {}
    for k in FIGURES:
        xs = np.array([v[k] for v in values if v.get(k) is not None], float)
        if xs.size:
            out[k] = float(xs.mean())
            out[f"{k}_se"] = float(xs.std(ddof=1) / np.sqrt(xs.size)) if xs.size > 1 else None
    return out


def _differs(results: dict, a: str, b: str, key: str) -> str:
    """'a > b', 'a < b' or 'a ~ b' (difference within two combined seed standard errors)."""
    ra, rb = results[a], results[b]
    sa, sb = ra.get(f"{key}_se"), rb.get(f"{key}_se")
    diff = ra[key] - rb[key]
    if sa is None or sb is None:
        return f"{a} - {b} = {diff:+.3f} (one seed: no error bar)"
    se = math.hypot(sa, sb)
    rel = "above" if diff > 2 * se else "below" if diff < -2 * se else "within two standard errors of"
    return f"{a} {rel} {b} ({diff:+.3f} +- {se:.3f})"


def finding(results: dict, seeds: int) -> str:
    """The study's headline: per variant, gold gain and KL from samples, then each moving variant against static
    on gold, KL and the held-out chosen log-prob."""
    parts = []
    for v, r in results.items():
        se = (lambda k: f" +- {r[f'{k}_se']:.3f}" if r.get(f"{k}_se") is not None else "")
        parts.append(f"{v}: gold {r['gold_gain']:+.3f}{se('gold_gain')} vs SFT at KL {r['kl']:.2f}{se('kl')} nats, "
                     f"held-out chosen {r['heldout_chosen_change']:+.2f}{se('heldout_chosen_change')}, margin vs "
                     f"init {r['heldout_margin_vs_init']:+.2f}{se('heldout_margin_vs_init')}")
    for v in ("soft", "hard"):
        parts.append(f"{v} vs static over {seeds} seed(s): gold {_differs(results, v, 'static', 'gold')}; KL "
                     f"{_differs(results, v, 'static', 'kl')}; held-out chosen "
                     f"{_differs(results, v, 'static', 'heldout_chosen_change')}")
    return "; ".join(parts)


def format_table(summary: dict) -> str:
    lines = [f"{'variant':8} {'gold gain':>16} {'KL (samples)':>16} {'chosen change':>16} {'rejected change':>16} "
             f"{'margin vs init':>16} {'updates':>8}"]

    def cell(r, k):
        se = r.get(f"{k}_se")
        return f"{r[k]:+.3f}" + (f" +- {se:.3f}" if se is not None else "")
    for name, r in summary["results"].items():
        lines.append(f"{name:8} {cell(r, 'gold_gain'):>16} {cell(r, 'kl'):>16} {cell(r, 'heldout_chosen_change'):>16} "
                     f"{cell(r, 'heldout_rejected_change'):>16} {cell(r, 'heldout_margin_vs_init'):>16} "
                     f"{r['ref_updates']:8.0f}")
    lines.append("(means +- standard errors over seeds; gold and KL from held-out samples at the last step)")
    lines.append("")
    lines.append(summary["verdict"].replace("; ", "\n"))
    return "\n".join(lines)


def settings_from_args(args) -> Settings:
    return Settings(**given_settings(Settings, args))
