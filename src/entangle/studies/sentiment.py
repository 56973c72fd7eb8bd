"""`entangle study sentiment`: the gradient-entanglement paper's sentiment experiment (GE sec. 4.2, spec sec. 7).

    summary = run(Settings(out="runs/sentiment", model="tiny"))     # ~2-3 minutes on 2 CPU cores

For each response format (single token, short suffix, long suffix): a short SFT warm-up on the
true-sentiment responses, then DPO with the entanglement diagnostics every step. Writes
`OUT/sft-CONFIG/` and `OUT/CONFIG/` (ordinary run directories), per-token views of a few held-out
pairs of the long-suffix configuration, `OUT/summary.json` with what the paper predicts and whether
it held, and `OUT/report/report.html`. The predictions are checked as measured. The SFT length and learning
rates are design choices that shape the outcome (a long SFT leaves the single-token chosen at probability
0.99, where it cannot rise), so each chosen-direction prediction is also reported at every stopping point.
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass, field
from statistics import mean
from typing import Optional

from entangle import synthetic
from entangle.config import load_saved
from entangle.errors import ConfigError
from entangle.studies import given_settings, make_study_folder, run_once, write_summary

log = logging.getLogger(__name__)

CONFIGS = tuple(synthetic.RESPONSES)  # single, short, long

# Per model: data sizes, the SFT warm-up and the DPO phase. `tiny` is a small Llama trained from
# scratch on the statements (word-level tokenizer, so `Positive` is one token as in GPT-2).
PRESETS = {
    "tiny": {"n_train": 512, "n_test": 64, "batch": 16, "sft_steps": 40, "sft_lr": 3e-3,
             "steps": 60, "lr": 3e-5, "beta": 0.1, "hidden": 64, "layers": 2},
    "smollm2-135m": {"n_train": 512, "n_test": 32, "batch": 8, "sft_steps": 12, "sft_lr": 1e-5,
                     "steps": 40, "lr": 5e-6, "beta": 0.1},
    # Any other model (e.g. gpt2 where the hub is reachable): the paper's DPO settings (GE sec. 4.2).
    "other": {"n_train": 1024, "n_test": 64, "batch": 32, "sft_steps": 50, "sft_lr": 2e-5,
              "steps": 60, "lr": 5e-6, "beta": 0.1},
}
TOKEN_PAIRS = 3  # held-out pairs of the long-suffix configuration in the token view
# The paper's mitigations (spec sec. 5), each as config overrides of the long-suffix DPO run.
MITIGATION_OVERRIDES = {"pairwise": ["optimizer.pairwise_normalized=true"], "sparse": ["loss.token_mask=sparse"]}
MITIGATIONS = tuple(MITIGATION_OVERRIDES)


def settings(model: str, **overrides) -> dict:
    """The model's preset (`PRESETS`) with the given values (None: the preset's)."""
    s = dict(PRESETS.get(model, PRESETS["other"]))
    s.update({k: v for k, v in overrides.items() if v is not None})
    return s


@dataclass
class Settings:
    """The study's settings and their valid ranges (checked by `validate` before any work). The sizes, steps and
    learning rates left None take the model's preset (`PRESETS`, the one place they are written)."""

    out: str = "runs/sentiment"
    model: str = "tiny"                       # tiny (built here, ~1 minute) | smollm2-135m | a folder or hub id
    configs: tuple = CONFIGS                  # response formats, among single, short, long
    seed: int = 0                             # >= 0
    steps: Optional[int] = None               # DPO steps per configuration; >= 1
    sft_steps: Optional[int] = None           # SFT warm-up steps per configuration; >= 1
    lr: Optional[float] = None                # DPO learning rate; > 0
    sft_lr: Optional[float] = None            # SFT learning rate; > 0
    beta: Optional[float] = None              # DPO beta; > 0
    batch: Optional[int] = None               # pairs per step; >= 1
    n_train: Optional[int] = None             # generated training statements; >= 1
    n_test: Optional[int] = None              # generated held-out statements; >= 1
    mitigations: tuple = MITIGATIONS          # long-suffix re-runs, among pairwise, sparse
    optimizers: tuple = ("adamw",)            # adamw, and sgd for the side-by-side plain-gradient-descent runs
    extra: list = field(default_factory=list)  # config overrides for every run

    def resolved(self) -> dict:
        """The preset with this study's values: every size, step count and rate."""
        return settings(self.model, **{k: getattr(self, k) for k in PRESETS["other"]})

    def validate(self) -> "Settings":
        """Every setting in its range and the extra overrides valid, one line each (a 0 is refused, never
        replaced by the preset)."""
        from entangle import config
        from entangle.studies import check_positive, check_whole

        for name, valid in (("configs", CONFIGS), ("mitigations", MITIGATIONS), ("optimizers", ("adamw", "sgd"))):
            values = tuple(getattr(self, name))
            if any(v not in valid for v in values) or (name != "mitigations" and not values):
                raise ConfigError(f"study sentiment: {name} = {values!r}: valid: {', '.join(valid)}")
        if "adamw" not in self.optimizers:
            raise ConfigError(f"study sentiment: optimizers = {tuple(self.optimizers)!r}: adamw always runs "
                              "(sgd is calibrated against it)")
        s = self.resolved()
        check_whole("sentiment", {**s, "seed": self.seed}, {"n_train": 1, "n_test": 1, "batch": 1, "sft_steps": 1,
                                                            "steps": 1, "seed": 0})
        check_positive("sentiment", s, ("sft_lr", "lr", "beta"))
        config.load(None, ["loss.name=dpo", f"loss.params.beta={s['beta']}", f"optimizer.lr={s['lr']}",
                           *self.extra])
        return self


def settings_from_args(args) -> Settings:
    """`entangle study sentiment`'s options: what was given, the rest the dataclass's defaults."""
    given = given_settings(Settings, args, commas=("configs",))
    if getattr(args, "optimizer", None) == "sgd":
        given["optimizers"] = ("adamw", "sgd")
    if getattr(args, "no_mitigations", False):
        given["mitigations"] = ()
    return Settings(**given)


def source(config: str, split: str, n: int, seed: int) -> str:
    return f"synthetic:sentiment?config={config}&n={n}&split={split}&seed={seed}"


def base_model(out: str, model: str, s: dict, seed: int) -> str:
    """`tiny`: a random-init Llama with a tokenizer trained on the training statements, as a folder."""
    if model != "tiny":
        return model
    from entangle.models import save_tiny, trained_tokenizer

    folder = os.path.join(out, "base-tiny")
    if not os.path.exists(os.path.join(folder, "config.json")):
        texts = [e.prompt + r for c in CONFIGS for e in synthetic.sentiment_pairs(s["n_train"], c, "train", seed)
                 for r in (e.chosen, e.rejected)]
        save_tiny(folder, trained_tokenizer(texts), seed=seed, hidden=s["hidden"], layers=s["layers"])
    return folder


CALIBRATION_STEPS = 5   # the AdamW steps whose margin movement the SGD learning rate matches (`sgd_lr`)


def run(st: Settings | None = None, report: bool = True) -> dict:
    """Train every configuration, check the paper's predictions, write summary.json and the report.
    `mitigations` re-run the long-suffix DPO phase with each mitigation (`OUT/long-NAME/`). With "sgd" in
    `optimizers`, each configuration's DPO phase also runs with plain gradient descent (`OUT/CONFIG-sgd/`: no
    momentum, no clipping, no weight decay) at the learning rate that moves the margin as the AdamW run does
    (`sgd_lr`), and the predictions are checked under each optimiser."""
    st = (st or Settings()).validate()
    s, out, model, seed, extra, configs = st.resolved(), st.out, st.model, st.seed, list(st.extra), tuple(st.configs)
    mitigations, optimizers = tuple(st.mitigations), tuple(st.optimizers)
    make_study_folder(out)
    base = base_model(out, model, s, seed)
    results, mitigated, sgd, sgd_lrs = {}, {}, {}, {}
    for c in configs:
        data = [f"data.train={source(c, 'train', s['n_train'], seed)}",
                f"data.eval={source(c, 'test', s['n_test'], seed)}", "data.max_length=96",
                f"train.batch_size={s['batch']}", f"train.eval_batch_size={s['batch']}", f"train.seed={seed}",
                "schedule.warmup_steps=0", "schedule.decay=constant"]
        sft_dir, dpo_dir = os.path.join(out, f"sft-{c}"), os.path.join(out, c)
        log.info("sentiment study, %s: SFT warm-up (%d steps), then DPO (%d steps)", c, s["sft_steps"], s["steps"])
        run_once([f"model.name={base}", "loss.name=sft", "reference.type=none", f"optimizer.lr={s['sft_lr']}",
                  f"train.max_steps={s['sft_steps']}", *data, *extra], sft_dir)
        dpo = [f"model.name={os.path.join(sft_dir, 'final')}", "loss.name=dpo",
               f"loss.params.beta={s['beta']}", "reference.type=frozen", f"optimizer.lr={s['lr']}",
               f"train.max_steps={s['steps']}", f"train.eval_every={max(1, s['steps'] // 10)}",
               "train.eval_at_start=true", "diagnostics.entanglement.every=1",
               "diagnostics.entanglement.realised=true", *data, *extra]
        start, test = os.path.join(sft_dir, "final"), source(c, "test", s["n_test"], seed)
        adamw_rows = run_once(dpo, dpo_dir)
        results[c] = config_result(adamw_rows)
        start_view = heldout_token_logps(start, *heldout_key(dpo_dir))   # the SFT model's view, made once
        results[c]["heldout_token_changes"] = token_changes(start_view, dpo_dir)
        if "sgd" in optimizers:
            sgd_lrs[c] = sgd_lr(adamw_rows, CALIBRATION_STEPS)
            log.info("sentiment study, %s: DPO with SGD at lr %.4g (matched to AdamW's margin movement)", c, sgd_lrs[c])
            sgd_dir = os.path.join(out, f"{c}-sgd")
            sgd[f"{c}-sgd"] = config_result(run_once([*dpo, "optimizer.name=sgd", f"optimizer.lr={sgd_lrs[c]:.6g}",
                                                  "optimizer.momentum=0", "optimizer.weight_decay=0",
                                                  "train.max_grad_norm=null"], sgd_dir))
            sgd[f"{c}-sgd"]["heldout_token_changes"] = token_changes(start_view, sgd_dir)
        if c == "long":
            token_views(dpo_dir, start, test)
            for m in mitigations:
                log.info("sentiment study, long suffix with the %s mitigation", m)
                m_dir = os.path.join(out, f"long-{m}")
                mitigated[f"long-{m}"] = config_result(run_once([*dpo, *MITIGATION_OVERRIDES[m]], m_dir))
                mitigated[f"long-{m}"]["heldout_token_changes"] = token_changes(start_view, m_dir)
    summary = {"study": "sentiment", "model": model, "seed": seed, "settings": s, "study_settings": asdict(st),
               "responses": {c: list(synthetic.RESPONSES[c]) for c in configs},
               "runs": {c: c for c in [*configs, *mitigated, *sgd]}, "results": {**results, **mitigated, **sgd},
               "predictions": predictions(results), "mitigations": mitigation_outcomes(results, mitigated)}
    summary["verdict"] = finding(summary)
    if sgd:
        summary["sgd_lr"] = sgd_lrs
        summary["predictions_sgd"] = predictions({k[: -len("-sgd")]: v for k, v in sgd.items()})
    return write_summary(out, summary, report, f"Sentiment study: {model}")


def sgd_lr(adamw_rows: list[dict], steps: int = 5) -> float:
    """The SGD learning rate that moves the batch-mean margin, to first order, as much as the AdamW run's
    update did over its first `steps` steps. AdamW's move: the mean over pairs of `step_dlogp_w - step_dlogp_l`
    (along its actual update); SGD's per unit learning rate on the batch-mean loss, with the batch-mean
    gradients ḡ_w, ḡ_l and the batch's mean d_w, d_l: d_w|ḡ_w|² - (d_w + d_l)<ḡ_w, ḡ_l> + d_l|ḡ_l|²."""
    use = [r for r in adamw_rows if "entanglement/step_dlogp_w" in r and "entanglement/batch_inner" in r][:steps]
    if not use:
        raise ValueError("the AdamW run has no step_dlogp / batch statistics to calibrate SGD against")
    moved = mean(r["entanglement/step_dlogp_w"] - r["entanglement/step_dlogp_l"] for r in use)
    per_lr = mean(r["entanglement/d_w"] * r["entanglement/batch_norm_w"] ** 2
                  - (r["entanglement/d_w"] + r["entanglement/d_l"]) * r["entanglement/batch_inner"]
                  + r["entanglement/d_l"] * r["entanglement/batch_norm_l"] ** 2 for r in use)
    if moved <= 0 or per_lr <= 0:
        raise ValueError(f"cannot match margins: AdamW moved the margin by {moved:.3g} per step and SGD's "
                         f"first-order move per unit learning rate is {per_lr:.3g}")
    return moved / per_lr


def config_result(rows: list[dict]) -> dict:
    """Held-out log-probs at the start and end, the last half's mean cosine, the case fractions."""
    evals = [r for r in rows if "eval/logps/chosen" in r]
    diag = [r for r in rows if "entanglement/cos" in r]
    half = diag[len(diag) // 2 :]
    first, last = evals[0], evals[-1]
    return {
        "heldout_logps_chosen": [first["eval/logps/chosen"], last["eval/logps/chosen"]],
        "heldout_chosen_path": [[r["step"], r["eval/logps/chosen"]] for r in evals],   # every stopping point
        "heldout_logps_rejected": [first["eval/logps/rejected"], last["eval/logps/rejected"]],
        "heldout_margin_final": last["eval/rewards/margins"],
        "heldout_accuracy_final": last["eval/rewards/accuracies"],
        "cos_last_half": mean(r["entanglement/cos"] for r in half),
        "inner_last_half": mean(r["entanglement/inner"] for r in half),
        **{f"{kind}_dlogp_{side}": _mean(diag, f"entanglement/{kind}_dlogp_{s}")
           for kind in ("pred", "step", "real") for side, s in (("chosen", "w"), ("rejected", "l"))},
        "case_fractions": _fractions(diag, "entanglement/"),
        "step_case_fractions": _fractions(diag, "entanglement/step_"),
        "real_case_fractions": _fractions(diag, "entanglement/real_"),
        "steps": diag[-1]["step"] if diag else 0,
    }


def _mean(rows: list[dict], key: str) -> float | None:
    """The mean of `key` over the rows that have it (None when none do: e.g. exact-path steps)."""
    vals = [r[key] for r in rows if key in r]
    return mean(vals) if vals else None


def _fractions(rows: list[dict], prefix: str) -> dict | None:
    got = {k: _mean(rows, f"{prefix}{k}") for k in ("case1", "case2", "case3")}
    return None if None in got.values() else got


def _change(r: dict, key: str) -> float:
    start, end = r[key]
    return end - start


def predictions(results: dict) -> list[dict]:
    """The paper's predictions (GE sec. 4.2) against what was measured; `held` is True or False."""
    out = []

    def claim(config, text, held, measured):
        out.append({"config": config, "claim": text, "held": bool(held), "measured": measured})

    if "single" in results:
        r = results["single"]
        claim("single", "cosine < 0", r["cos_last_half"] < 0, f"cos {r['cos_last_half']:+.3f}")
        d = _change(r, "heldout_logps_chosen")
        claim("single", "chosen log-prob rises", d > 0, f"chosen {d:+.3f}{_at_stops(r, +1)}")
    for c in ("short", "long"):
        if c in results:
            r = results[c]
            claim(c, "cosine > 0", r["cos_last_half"] > 0, f"cos {r['cos_last_half']:+.3f}")
            d = _change(r, "heldout_logps_chosen")
            claim(c, "chosen log-prob falls", d < 0, f"chosen {d:+.3f}{_at_stops(r, -1)}")
    if "short" in results and "long" in results:
        cs, cl = results["short"]["cos_last_half"], results["long"]["cos_last_half"]
        claim("long vs short", "cosine larger for the long suffix", cl > cs, f"cos {cl:+.3f} vs {cs:+.3f}")
        ds, dl = _change(results["short"], "heldout_logps_chosen"), _change(results["long"], "heldout_logps_chosen")
        claim("long vs short", "chosen falls more for the long suffix", dl < ds, f"chosen {dl:+.3f} vs {ds:+.3f}")
    return out


def _at_stops(r: dict, sign: int) -> str:
    """'; held at k of n stopping points': the chosen-direction prediction checked at every held-out evaluation
    after step 0, so a verdict that depends on when training stops says so."""
    path = r.get("heldout_chosen_path") or []
    if len(path) < 2:
        return ""
    start = path[0][1]
    held = sum(sign * (v - start) > 0 for _, v in path[1:])
    return f"; held at {held} of {len(path) - 1} stopping points"


def mitigation_outcomes(results: dict, mitigated: dict) -> list[dict]:
    """Does the chosen log-prob still fall on held-out pairs with the mitigation (vs plain long-suffix DPO)?"""
    if "long" not in results:
        return []
    base = _change(results["long"], "heldout_logps_chosen")
    return [{"run": name, "chosen_change": _change(r, "heldout_logps_chosen"), "chosen_change_without": base,
             "rejected_change": _change(r, "heldout_logps_rejected"), "chosen_still_falls":
             _change(r, "heldout_logps_chosen") < 0} for name, r in mitigated.items()]


def token_views(run_dir: str, start_model: str, eval_source: str) -> None:
    """Exact per-token views of a few held-out pairs, before DPO (the SFT model) and after it."""
    from entangle import config
    from entangle.diagnostics.views import save_token_views
    from entangle.assembly import load_pairs
    from entangle.models import load_model

    data_cfg = config.load(None, ["data.max_length=96"]).data
    for label, path in (("start", start_model), ("end", os.path.join(run_dir, "final"))):
        model, tok = load_model(path, dtype="float32")
        pairs, _ = load_pairs(eval_source, tok, data_cfg, "test", TOKEN_PAIRS)
        save_token_views(run_dir, f"heldout-{label}", model, tok, pairs)


def heldout_key(run_dir: str) -> tuple:
    """What selects and cuts a run's held-out pairs (its saved data config)."""
    d = load_saved(run_dir).data
    return d.eval, d.eval_split, d.max_eval_examples, d.max_length, d.max_prompt_length


def token_changes(start_view: tuple, run_dir: str) -> dict:
    """Where the held-out log-probs of `run_dir` (its eval pairs) moved from the start model's view
    (`heldout_token_logps(start_model, *heldout_key(run_dir))`, computed once per configuration): each
    response's change split into the tokens where chosen and rejected differ (the sentiment word) and
    the tokens they share (suffix, EOS); means over pairs."""
    pairs, batch, start = start_view
    _, _, end = heldout_token_logps(os.path.join(run_dir, "final"), *heldout_key(run_dir))
    change, resp, B = end - start, batch.response_mask, len(pairs)                       # [2B, T]
    sums = {f"{side}_{kind}": 0.0 for side in ("chosen", "rejected") for kind in ("differing", "shared")}
    for i, p in enumerate(pairs):
        for side, row, own, other in (("chosen", i, p.chosen_ids, p.rejected_ids),
                                      ("rejected", B + i, p.rejected_ids, p.chosen_ids)):
            for k, d in enumerate(change[row][resp[row]].tolist()):
                shared = k < len(other) and own[k] == other[k]
                sums[f"{side}_{'shared' if shared else 'differing'}"] += d / B
    return sums


def heldout_token_logps(model_path: str, source: str, split: str, limit, max_length, max_prompt_length):
    """(pairs, concatenated batch, per-token log-probs [2B, T]) of a model on held-out pairs."""
    import torch

    from entangle import config
    from entangle.batching import collate
    from entangle.logps import sequence_logps
    from entangle.assembly import load_pairs
    from entangle.models import load_model

    model, tok = load_model(model_path, dtype="float32")
    data_cfg = config.load().data
    data_cfg.max_length, data_cfg.max_prompt_length = max_length, max_prompt_length
    pairs, _ = load_pairs(source, tok, data_cfg, split, limit)
    batch = collate(pairs, tok.pad_token_id)
    with torch.no_grad():
        return pairs, batch, sequence_logps(model, batch, token_level=True).token_logps


def format_table(summary: dict) -> str:
    """Held-out log-probs, last-half cosine, and the case fractions (c1 c2 c3) three ways: a plain gradient
    step to first order, the optimiser's actual update to first order, and realised."""
    lines = ["case fractions c1 c2 c3 to first order along a plain gradient step, along the optimiser's update, "
             "and realised",
             f"{'config':13} {'held-out chosen logp':>20} {'held-out rejected':>19} {'cos':>6}   "
             f"{'grad step':<15}{'update':<15}{'realised':<15}{'acc':>4} {'margin':>7}"]
    for c, r in summary["results"].items():
        ch, rj = r["heldout_logps_chosen"], r["heldout_logps_rejected"]
        cases = [" ".join(f"{f[k]:.2f}" for k in ("case1", "case2", "case3")) if f else "-"
                 for f in (r.get("case_fractions"), r.get("step_case_fractions"), r.get("real_case_fractions"))]
        lines.append(f"{c:13} {ch[0]:8.3f} -> {ch[1]:8.3f} {rj[0]:8.3f} -> {rj[1]:8.3f} {r['cos_last_half']:+6.3f}   "
                     f"{cases[0]:<15}{cases[1]:<15}{cases[2]:<15}{r['heldout_accuracy_final']:4.2f} "
                     f"{r['heldout_margin_final']:7.3f}")
    lines.append("")
    for p in summary["predictions"]:
        lines.append(f"{'held  ' if p['held'] else 'FAILED'} {p['config']}: {p['claim']} ({p['measured']})")
    for p in summary.get("predictions_sgd", []):
        lr = summary["sgd_lr"].get(p["config"])
        lines.append(f"{'held  ' if p['held'] else 'FAILED'} {p['config']} (SGD{f', lr {lr:.3g}' if lr else ''}): "
                     f"{p['claim']} ({p['measured']})")
    for c, r in summary["results"].items():
        t = r.get("heldout_token_changes")
        if t:
            lines.append(f"{c}: held-out change at the tokens where chosen/rejected differ {t['chosen_differing']:+.3f}"
                         f"/{t['rejected_differing']:+.3f}, at the shared tokens {t['chosen_shared']:+.3f}"
                         f"/{t['rejected_shared']:+.3f}")
    for m in summary.get("mitigations", []):
        lines.append(f"mitigation {m['run']}: held-out chosen {m['chosen_change']:+.3f} (without: "
                     f"{m['chosen_change_without']:+.3f}), rejected {m['rejected_change']:+.3f}; chosen "
                     f"{'still falls' if m['chosen_still_falls'] else 'no longer falls'}")
    return "\n".join(lines)


def report_blocks(summary: dict) -> list[dict]:
    """The report's view of this study beyond its results table (`studies.report_blocks`): the paper's
    predictions as measured, where the held-out log-probs moved, what each mitigation did."""
    blocks = []
    preds = summary.get("predictions") or []
    if preds:
        blocks.append({"heading": "The paper's predictions, as measured", "claims": [
            {"label": "held" if p["held"] else "did not hold", "held": p["held"],
             "text": f"{p['config']}: {p['claim']}", "measured": p["measured"]} for p in preds]})
    moved = {n: r["heldout_token_changes"] for n, r in (summary.get("results") or {}).items()
             if r.get("heldout_token_changes")}
    if moved:
        keys = ("chosen_differing", "chosen_shared", "rejected_differing", "rejected_shared")
        blocks.append({"heading": "Where the held-out log-probs moved",
                       "note": "Change of each response's log-prob, split into the tokens where chosen and rejected "
                               "differ and the tokens they share (means over held-out pairs).",
                       "table": {"columns": ["run", *[f"{k.replace('_', ' at ')} tokens" for k in keys]],
                                 "rows": [[n, *[round(t[k], 3) for k in keys]] for n, t in moved.items()]}})
    for m in summary.get("mitigations") or []:
        blocks.append({"held": not m["chosen_still_falls"], "text":
                       f"Mitigation {m['run']}: held-out chosen log-prob {m['chosen_change']:+.3f} (without: "
                       f"{m['chosen_change_without']:+.3f}), rejected {m['rejected_change']:+.3f}: the chosen "
                       f"{'still falls' if m['chosen_still_falls'] else 'no longer falls'}."})
    return blocks


def finding(summary: dict) -> str:
    """The study's headline: how many of the paper's predictions held, which did not, what the mitigations did
    ("; " separates the lines)."""
    preds = summary.get("predictions") or []
    failed = [f"{p['config']}: {p['claim']} ({p['measured'].replace('; ', ', ')})" for p in preds if not p["held"]]
    lines = [f"{sum(p['held'] for p in preds)} of {len(preds)} of the paper's predictions held"]
    lines += [f"did not hold: {f}" for f in failed]
    for m in summary.get("mitigations") or []:
        lines.append(f"{m['run']}: held-out chosen {m['chosen_change']:+.3f} (without {m['chosen_change_without']:+.3f})"
                     f", the chosen {'still falls' if m['chosen_still_falls'] else 'no longer falls'}")
    return "; ".join(lines)
