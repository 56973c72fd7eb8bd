"""`entangle study compare`: the same model, data, seed and budget under several losses (GE Fig. 1).

    summary = run(Settings(out="runs/compare", losses=("dpo", "ipo", "cpo"), quick=True))

Writes `OUT/LOSS/` (ordinary run directories, each resumable and skipped once finished with the
same settings), `OUT/summary.json` (a table per loss and the theory check of spec sec. 3) and
`OUT/report/report.html`, whose plots overlay the losses' `logps/chosen` and `logps/rejected`.
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass, field
from statistics import mean
from typing import Optional

from entangle import losses as loss_registry
from entangle.errors import ConfigError
from entangle.data import missing_file
from entangle.studies import default_data, given_settings, make_study_folder, run_once, sentiment, write_summary

log = logging.getLogger(__name__)

DEFAULT_LOSSES = ("dpo", "ipo", "simpo", "cpo", "slic", "rdpo", "dpop", "rrhf", "orpo", "sppo")

# quick: `tiny` after a short SFT on generated sentiment pairs (seconds per loss; for tests and a first look).
# default: the real SmolLM2-135M with LoRA on short HH pairs (~2 minutes per loss on 2 CPU cores).
PRESETS = {
    "quick": {"model": "tiny", "steps": 30, "lr": 3e-5, "batch": 16, "lora": 0, "max_length": 96,
              "every": 1, "n_eval": 64},
    "default": {"model": "smollm2-135m", "steps": 20, "lr": 5e-5, "batch": 2, "lora": 8, "max_length": 160,
                "every": 2, "n_eval": 24},
}


@dataclass
class Settings:
    """The study's settings and their valid ranges (checked by `validate` before any work). `steps` and `lr` left
    None take the preset's (`PRESETS`: `quick` or `default`, the one place they are written)."""

    out: str = "runs/compare"
    losses: tuple = DEFAULT_LOSSES            # registered loss names or aliases
    quick: bool = False                       # tiny model after a short SFT on generated pairs (about a minute)
    model: Optional[str] = None               # default: the preset's (smollm2-135m with LoRA r 8; tiny with quick)
    data: Optional[str] = None                # training pairs (default: HH helpful-base, found by `default_data`)
    eval_data: Optional[str] = None           # held-out pairs (default: the matching .test.jsonl)
    steps: Optional[int] = None               # >= 1
    lr: Optional[float] = None                # > 0
    seed: int = 0                             # >= 0
    params: list = field(default_factory=list)  # LOSS.PARAM=VALUE for one loss, e.g. dpop.lam=50
    mitigate: tuple = ("dpo",)                # losses also run with each mitigation (among `losses`)
    extra: list = field(default_factory=list)   # config overrides for every run

    def preset(self) -> dict:
        return dict(PRESETS["quick" if self.quick else "default"])

    def budget(self) -> tuple[int, float]:
        """(steps, lr): the given ones, else the preset's (a 0 is kept, and refused by `validate`)."""
        p = self.preset()
        return p["steps"] if self.steps is None else self.steps, p["lr"] if self.lr is None else self.lr

    def names(self) -> tuple[str, ...]:
        """The losses' registered names (aliases resolved; an unknown name is a one-line error)."""
        return tuple(loss_registry.spec(n).name for n in self.losses)

    def validate(self) -> "Settings":
        """Every setting in its range before any work: steps, lr, seed, the losses to mitigate (among the losses),
        and each loss's overrides as a config would take them (a 0 is refused, never replaced by the preset)."""
        from entangle import config
        from entangle.studies import check_positive, check_whole

        names = self.names()
        if not names:
            raise ConfigError("study compare: losses = (): give at least one loss")
        steps, lr = self.budget()
        check_whole("compare", {"steps": steps, "seed": self.seed}, {"steps": 1, "seed": 0})
        check_positive("compare", {"lr": lr}, ("lr",))
        unknown = [m for m in self.mitigate if m not in names]
        if unknown:
            raise ConfigError(f"--mitigate {','.join(unknown)}: not among --losses ({', '.join(names)}); give losses "
                              "that run, or '' for none")
        per_loss = parse_overrides(list(self.params), names)
        for name in names:
            config.load(None, [f"loss.name={name}", *per_loss.get(name, []), *self.extra])
        return self


def settings_from_args(args) -> Settings:
    """`entangle study compare`'s options: what was given, the rest the dataclass's defaults."""
    return Settings(**given_settings(Settings, args, commas=("losses", "mitigate")))


def parse_overrides(items: list[str], names: tuple[str, ...]) -> dict[str, list[str]]:
    """`["dpop.lam=50", "ipo.beta=0.5"]` -> `{"dpop": ["loss.params.lam=50"], ...}` (one-line errors)."""
    out: dict[str, list[str]] = {}
    for item in items:
        head, _, value = item.partition("=")
        loss, _, key = head.partition(".")
        if not value or not key or loss not in names:
            raise ConfigError(f"--set {item!r}: expected LOSS.PARAM=VALUE with LOSS one of {', '.join(names)}")
        out.setdefault(loss, []).append(f"loss.params.{key}={value}")
    return out


def run(st: Settings | None = None, report: bool = True) -> dict:
    st = (st or Settings()).validate()
    names, p, out, quick, seed, extra, mitigate = st.names(), st.preset(), st.out, st.quick, st.seed, st.extra, \
        tuple(st.mitigate)
    per_loss = parse_overrides(list(st.params), names)
    model, data, eval_data = st.model or p["model"], st.data, st.eval_data
    label = f"{model} after SFT" if quick and model == "tiny" and not data else model
    steps, lr = st.budget()
    if not (quick and model == "tiny" and not data):
        data, eval_data = data or default_data("hh-rlhf/helpful-base.train.jsonl", "--data"), \
            eval_data or default_data("hh-rlhf/helpful-base.test.jsonl", "--eval-data")
        for flag, path in (("--data", data), ("--eval-data", eval_data)):
            if missing_file(path):
                raise ConfigError(f"{flag} {path}: no such file or folder")
    make_study_folder(out)
    if quick and model == "tiny" and not data:
        # A tiny model needs a warm-up before preferences mean anything: the sentiment study's SFT.
        s = sentiment.settings("tiny")
        base = sentiment.base_model(out, "tiny", s, seed)
        train_src, eval_src = (sentiment.source("long", "train", s["n_train"], seed),
                               sentiment.source("long", "test", p["n_eval"], seed))
        run_once([f"model.name={base}", "loss.name=sft", "reference.type=none", f"optimizer.lr={s['sft_lr']}",
                  f"train.max_steps={s['sft_steps']}", f"data.train={train_src}", f"data.eval={eval_src}",
                  f"train.batch_size={p['batch']}", "data.max_length=96",
                  "schedule.warmup_steps=0", "schedule.decay=constant", f"train.seed={seed}"],
                 os.path.join(out, "sft"))
        model = os.path.join(out, "sft", "final")
    else:
        train_src, eval_src = data, eval_data
    base = [f"model.name={model}", f"data.train={train_src}", f"data.eval={eval_src}",
            f"data.max_length={p['max_length']}", f"data.max_eval_examples={p['n_eval']}",
            f"model.lora.r={p['lora']}", f"optimizer.lr={lr}", f"train.batch_size={p['batch']}",
            f"train.eval_batch_size={p['batch']}", f"train.max_steps={steps}", f"train.seed={seed}",
            f"train.eval_every={max(1, steps // 5)}", "train.eval_at_start=true",
            f"diagnostics.entanglement.every={p['every']}", "diagnostics.entanglement.realised=true",
            "reference.type=auto", "reference.kl_to_init=true"]
    results = {}
    runs = [(name, [f"loss.name={name}", *per_loss.get(name, [])]) for name in names]
    # The mitigations (spec sec. 5) on the losses in `mitigate`: LOSS-pairwise, LOSS-sparse.
    runs += [(f"{name}-{m}", [f"loss.name={name}", *per_loss.get(name, []), *extra_m])
             for name in names if name in mitigate for m, extra_m in sentiment.MITIGATION_OVERRIDES.items()]
    for name, own in runs:
        log.info("compare: %s (%d steps)", name, steps)
        rows = run_once([*base, *own, *extra], os.path.join(out, name))
        results[name] = loss_result(rows, _pair_rows(os.path.join(out, name)))
    summary = {"study": "compare", "model": label, "steps": steps, "lr": lr, "seed": seed, "settings": asdict(st),
               "data": {"train": train_src, "eval": eval_src}, "params": per_loss,
               "runs": {n: n for n in results}, "results": results,
               "theory": theory_check({n: r for n, r in results.items() if n in names})}
    summary["verdict"] = "; ".join(b["text"] for b in report_blocks(summary)) or "no theory check (too few losses)"
    return write_summary(out, summary, report, f"Loss comparison: {label}")


def _pair_rows(run_dir: str) -> list[dict]:
    from entangle.report import read_jsonl   # a torn last line skipped, a damaged one named

    return read_jsonl(os.path.join(run_dir, "entanglement.jsonl"))


def loss_result(rows: list[dict], pairs: list[dict]) -> dict:
    """Held-out log-prob changes and accuracy vs the initial policy; case fractions; mean d_w/d_l;
    how often a pair's chosen log-prob actually rose in a step."""
    evals = [r for r in rows if "eval/logps/chosen" in r]
    diag = [r for r in rows if "entanglement/cos" in r]
    first, last = evals[0], evals[-1]
    d_l = mean(p["d_l"] for p in pairs) if pairs else 0.0
    rose = [p["real_dlogp_w"] > 0 for p in pairs if "real_dlogp_w" in p]
    return {
        "heldout_dlogp_chosen": last["eval/logps/chosen"] - first["eval/logps/chosen"],
        "heldout_dlogp_rejected": last["eval/logps/rejected"] - first["eval/logps/rejected"],
        "heldout_accuracy_vs_init": last.get("eval/ref/accuracy_vs_init"),
        "cos_mean": mean(r["entanglement/cos"] for r in diag) if diag else None,
        "case_fractions": {k: mean(r[f"entanglement/{k}"] for r in diag) for k in ("case1", "case2", "case3")}
        if diag else None,
        "real_case_fractions": {k: mean(r[f"entanglement/real_{k}"] for r in diag) for k in ("case1", "case2", "case3")}
        if diag and "entanglement/real_case1" in diag[0] else None,
        # mean d_w / mean d_l: a per-pair ratio explodes where d_l -> 0 (a confident pair)
        "dw_over_dl": mean(p["d_w"] for p in pairs) / d_l if pairs and d_l > 0 else None,
        "chosen_rose_fraction": mean(rose) if rose else None,
    }


def theory_check(results: dict, tol: float = 0.05) -> dict:
    """Spec sec. 3: losses with an explicit chosen term (mean d_w/d_l > 1 + tol) should keep the chosen
    log-prob rising more often than losses with d_w = d_l. Compared on the per-step realised rises."""
    explicit = {n: r for n, r in results.items() if r["dw_over_dl"] is not None and r["dw_over_dl"] > 1 + tol
                and r["chosen_rose_fraction"] is not None}
    balanced = {n: r for n, r in results.items() if r["dw_over_dl"] is not None and abs(r["dw_over_dl"] - 1) <= tol
                and r["chosen_rose_fraction"] is not None}
    if not explicit or not balanced:
        return {"held": None, "why": "needs at least one loss with d_w > d_l and one with d_w = d_l",
                "explicit": sorted(explicit), "balanced": sorted(balanced)}
    a = mean(r["chosen_rose_fraction"] for r in explicit.values())
    b = mean(r["chosen_rose_fraction"] for r in balanced.values())
    return {"held": a > b, "explicit": sorted(explicit), "balanced": sorted(balanced),
            "chosen_rose_fraction_explicit": a, "chosen_rose_fraction_balanced": b}


def format_table(summary: dict) -> str:
    lines = [f"{'loss':13} {'d chosen':>9} {'d rejected':>10} {'acc':>5} {'cos':>7} {'case1/2/3 (realised)':>21} "
             f"{'dw/dl':>6} {'chosen rose':>11}"]

    def f(x, spec):
        return format(x, spec) if x is not None else "-"

    for n, r in summary["results"].items():
        c = r["real_case_fractions"] or r["case_fractions"]
        cases = " ".join(f"{c[k]:.2f}" for k in ("case1", "case2", "case3")) if c else "-"
        lines.append(f"{n:13} {r['heldout_dlogp_chosen']:+9.3f} {r['heldout_dlogp_rejected']:+10.3f} "
                     f"{f(r['heldout_accuracy_vs_init'], '5.2f')} {f(r['cos_mean'], '+7.3f')} {cases:>21} "
                     f"{f(r['dw_over_dl'], '6.2f')} {f(r['chosen_rose_fraction'], '11.2f')}")
    t = summary["theory"]
    if t["held"] is None:
        lines.append(f"theory check: not decided ({t['why']})")
    else:
        lines.append(f"theory check ({'held' if t['held'] else 'did not hold'}): chosen rose in "
                     f"{t['chosen_rose_fraction_explicit']:.2f} of pair-steps with d_w > d_l "
                     f"({', '.join(t['explicit'])}) vs {t['chosen_rose_fraction_balanced']:.2f} with d_w = d_l "
                     f"({', '.join(t['balanced'])})")
    return "\n".join(lines)


def report_blocks(summary: dict) -> list[dict]:
    """The report's view of this study beyond its results table: the theory check of spec sec. 3."""
    theory = summary.get("theory")
    if not theory:
        return []
    if theory.get("held") is None:
        text = f"not decided ({theory.get('why', '')})"
    else:
        text = (f"{'held' if theory['held'] else 'did not hold'}: the chosen log-prob rose in "
                f"{theory['chosen_rose_fraction_explicit']:.2f} of pair-steps for losses with d_w > d_l "
                f"({', '.join(theory['explicit'])}) vs {theory['chosen_rose_fraction_balanced']:.2f} for d_w = d_l "
                f"({', '.join(theory['balanced'])})")
    return [{"heading": "Theory check (d_w > d_l keeps the chosen rising)", "text": text, "held": theory.get("held")}]
