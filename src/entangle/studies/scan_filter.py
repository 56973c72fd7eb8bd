"""`entangle study scan-filter`: does filtering by the scan prevent likelihood displacement, better than chance?

    summary = run(Settings(out="runs/scan-filter"))          # tiny: 5 seeds x 7 runs, about 5 minutes here

Where displacement happens (Razin et al. 2024, "Unintentional Unalignment", arXiv:2410.08847): an SFT policy
on sentiment answers, then DPO on a mix of four pair types (`synthetic:displacement`): opposite single words,
a long shared suffix (where the chosen is known to fall), same-polarity near-synonyms (both acceptable) and
dissimilar formats. The training pairs are scanned once at the SFT policy (`entangle scan`). Per seed (data
order, and the random arm's draw): DPO on all pairs ("full"), then on the pairs left after each arm drops
the same share: the highest CHES, normalised CHES, cosine, the most negative predicted chosen change (case 2
direction), a random draw, and an oracle (the pairs whose chosen fell most in that seed's full run).
Outcome, measured exactly on held-out pairs of the same mix: the change of the chosen log-prob from the SFT
policy (by pair type too), and the probability of a wrong-polarity first word. Pre-set statistic: the paired
difference CHES minus random in the mean held-out chosen change, with a bootstrap interval over seeds then
prompts; a verdict only when it excludes zero. Positive control: the full run's held-out chosen change must
be negative beyond 3 seed standard errors, else "no conclusion". Also: the AUROC of each initial score for
"this training pair's chosen fell" in the full run.
"""

from __future__ import annotations

import logging
import os
import random
from dataclasses import asdict, dataclass, field

import numpy as np

from entangle import scanning, synthetic
from entangle.errors import ConfigError
from entangle.studies import given_settings, check_positive, check_whole, make_study_folder, run_once, write_summary
from entangle.studies.frontier import draws, interval, sign_verdict

log = logging.getLogger(__name__)

# arm -> (scan field, sign): the arm drops the pairs with the largest sign * field
SCORES = {"ches": ("ches", 1.0), "ches_norm": ("ches_norm", 1.0), "cos": ("cos", 1.0),
          "case2": ("pred_dlogp_w", -1.0)}
ARMS = ("full", *SCORES, "random", "oracle")
PRIMARY = ("ches", "random")


@dataclass
class Settings:
    """The study's settings and valid ranges (checked by `validate` before any work)."""

    out: str = "runs/scan-filter"
    model: str = "tiny"         # tiny (built here) | a folder or hub id, SFT on the sentiment answers first
    seeds: int = 5              # >= 2
    n_train: int = 256          # training pairs (all four types in turn); >= 16
    n_test: int = 128           # held-out pairs; >= 8
    share: float = 0.25         # share of training pairs every arm drops; in (0, 1)
    steps: int = 100
    lr: float = 1e-4
    beta: float = 0.1
    batch_size: int = 16
    sft_steps: int = 150
    sft_lr: float = 3e-3
    reps: int = 1000
    extra: list = field(default_factory=list)

    def validate(self) -> "Settings":
        check_whole("scan-filter", self, {"seeds": 2, "n_train": 16, "n_test": 8, "steps": 1, "batch_size": 1,
                                          "sft_steps": 1, "reps": 100})
        check_positive("scan-filter", self, ("lr", "beta", "sft_lr", "share"))
        if not self.share < 1:
            raise ConfigError(f"study scan-filter: share = {self.share!r}: must be in (0, 1)")
        if round(self.n_train * (1 - self.share)) < self.batch_size:
            raise ConfigError(f"study scan-filter: {self.n_train} pairs less a share of {self.share} cannot fill a "
                              f"batch of {self.batch_size}; lower batch_size or share")
        return self


def source(s: Settings, split: str) -> str:
    n = s.n_train if split == "train" else s.n_test
    return f"synthetic:displacement?n={n}&split={split}"


def sft_policy(s: Settings) -> str:
    base = s.model
    if s.model == "tiny":
        from entangle.models import save_tiny, trained_tokenizer

        base = os.path.join(s.out, "base-tiny")
        if not os.path.exists(os.path.join(base, "config.json")):
            texts = [e.prompt + r for part in ("pairs", "sft") for e in synthetic.displacement_pairs(512, "train", 0, part)
                     for r in (e.chosen, e.rejected)]
            save_tiny(base, trained_tokenizer(texts), seed=0)
    run_once([f"model.name={base}", "loss.name=sft", "reference.type=none", f"optimizer.lr={s.sft_lr}",
              f"train.max_steps={s.sft_steps}", "data.train=synthetic:displacement?n=512&part=sft",
              "data.max_length=64", f"train.batch_size={s.batch_size}", "schedule.decay=constant",
              "schedule.warmup_steps=10", "train.seed=0"], os.path.join(s.out, "sft"))
    return os.path.join(s.out, "sft", "final")


def dropped(rows: list[dict], arm: str, n_drop: int, seed: int, realised: dict[int, float] | None = None) -> list[int]:
    """The `index` of the pairs `arm` drops: the `n_drop` highest by its score (random: a seeded draw; oracle:
    the most negative realised chosen change of the full run)."""
    if arm == "random":
        return sorted(random.Random(seed).sample([r["index"] for r in rows], n_drop))
    if arm == "oracle":
        score = {i: -v for i, v in realised.items()}
    else:
        key, sign = SCORES[arm]
        score = {r["index"]: sign * r[key] for r in rows}
    return sorted(sorted(score, key=lambda i: -score[i])[:n_drop])


def outcomes(model_path: str, src: str, split: str) -> dict[str, np.ndarray]:
    """Per pair of `src`: the chosen log-prob, and the probability of a wrong-polarity first word after the
    prompt (both exact, from one forward of the pairs and one of the prompts)."""
    import torch

    from entangle import config
    from entangle.batching import collate
    from entangle.assembly import load_pairs
    from entangle.logps import sequence_logps
    from entangle.models import load_model

    model, tok = load_model(model_path, dtype="float32")
    model.eval()
    pairs, _ = load_pairs(src, tok, config.load(None, ["data.max_length=64"]).data, split, None)
    examples = synthetic.from_source(src)
    with torch.no_grad():
        chosen = sequence_logps(model, collate(pairs, tok.pad_token_id)).logps[: len(pairs)]            # [P]
        wrong = []
        for p, e in zip(pairs, examples):
            positive = e.chosen.split()[0].strip(".") == "Positive"
            ids = [tok(" " + w, add_special_tokens=False)["input_ids"][0] for w in synthetic.wrong_polarity_words(positive)]
            probs = torch.softmax(model(input_ids=torch.tensor([p.prompt_ids])).logits[0, -1].float(), -1)
            wrong.append(float(probs[ids].sum()))
    return {"chosen": chosen.double().numpy(), "wrong": np.array(wrong)}


def run(s: Settings | None = None, report: bool = True) -> dict:
    from entangle.api import scan

    s = (s or Settings()).validate()
    make_study_folder(s.out)
    policy = sft_policy(s)
    train_src, test_src = source(s, "train"), source(s, "test")
    rows = scan(policy, train_src, out=os.path.join(s.out, "scan"), max_length=64, tokens=0, device="cpu")["rows"]
    start, start_train = outcomes(policy, test_src, "test"), outcomes(policy, train_src, "train")["chosen"]
    n_drop = round(s.share * len(rows))
    change = {arm: [] for arm in ARMS}        # arm -> [seeds] of held-out chosen change [P]
    wrong = {arm: [] for arm in ARMS}
    drops: dict = {arm: [] for arm in ARMS if arm != "full"}
    auroc: dict = {arm: [] for arm in SCORES}
    for seed in range(s.seeds):
        base = [f"model.name={policy}", "loss.name=dpo", f"loss.params.beta={s.beta}", f"optimizer.lr={s.lr}",
                f"train.max_steps={s.steps}", "data.max_length=64", f"train.batch_size={s.batch_size}",
                "schedule.decay=constant", "schedule.warmup_steps=5", f"train.seed={seed}", *s.extra]
        realised = None
        os.makedirs(os.path.join(s.out, f"seed-{seed}"), exist_ok=True)
        for arm in ARMS:
            folder = os.path.join(s.out, f"seed-{seed}", arm)
            data = train_src
            if arm != "full":
                drop = dropped(rows, arm, n_drop, seed, realised)
                drops[arm].append(drop)
                data = os.path.join(os.path.abspath(os.path.dirname(folder)), f"kept-{arm}.jsonl")
                scanning.write_filtered(train_src, sorted(set(range(len(rows))) - set(drop)), data)
            log.info("scan-filter study: seed %d, %s", seed, arm)
            run_once([*base, f"data.train={data}"], folder)
            end = outcomes(os.path.join(folder, "final"), test_src, "test")
            change[arm].append(end["chosen"] - start["chosen"])
            wrong[arm].append(end["wrong"])
            if arm == "full":
                fell = outcomes(os.path.join(folder, "final"), train_src, "train")["chosen"] - start_train
                realised = {r["index"]: float(fell[r["index"]]) for r in rows}
                for a, (key, sign) in SCORES.items():
                    auroc[a].append(auc([sign * r[key] for r in rows], [realised[r["index"]] < 0 for r in rows]))
    summary = analyse(change, wrong, drops, auroc, start, s)
    summary.update({"study": "scan-filter", "model": s.model, "policy": policy, "settings": asdict(s),
                    "scan": scanning.scan_summary(rows), "runs": {arm: os.path.join("seed-0", arm) for arm in ARMS}})
    summary["verdict"] = headline(summary)
    return write_summary(s.out, summary, report, f"Scan filters against likelihood displacement: {s.model}")


def auc(scores: list[float], positive: list[bool]) -> float | None:
    """Area under the ROC curve of `scores` for `positive` (ties count half); None when one class is empty."""
    pos = [x for x, p in zip(scores, positive) if p]
    neg = [x for x, p in zip(scores, positive) if not p]
    if not pos or not neg:
        return None
    wins = sum((a > b) + 0.5 * (a == b) for a in pos for b in neg)
    return wins / (len(pos) * len(neg))


def positive_control(full: np.ndarray) -> dict:
    """`full` [seeds, prompts] held-out chosen change: displacement when its seed mean is below zero by more than
    three seed standard errors."""
    per_seed = full.mean(1)
    se = float(per_seed.std(ddof=1) / np.sqrt(len(per_seed)))
    mean = float(per_seed.mean())
    return {"chosen_change": mean, "seed_se": se, "passed": mean < -3 * se}


def paired_difference(a: np.ndarray, b: np.ndarray, reps: int) -> dict:
    """Mean of a - b ([seeds, prompts] each, paired) with a bootstrap interval over seeds then prompts."""
    diff = a - b
    boot = [float(np.take_along_axis(diff[si], pi, 1).mean()) for si, pi in draws(*diff.shape, reps)]
    lo, hi = interval(boot)
    return {"difference": float(diff.mean()), "interval": [lo, hi], "verdict": sign_verdict(lo, hi)}


def analyse(change: dict, wrong: dict, drops: dict, auroc: dict, start: dict, s: Settings) -> dict:
    types = np.arange(s.n_test) % len(synthetic.DISPLACEMENT_TYPES)                     # held-out pair types
    train_types = np.arange(s.n_train) % len(synthetic.DISPLACEMENT_TYPES)
    arms = {}
    for arm in ARMS:
        c, w = np.stack(change[arm]), np.stack(wrong[arm])                              # [S, P]
        per_seed = c.mean(1)
        arms[arm] = {"chosen_change": float(per_seed.mean()),
                     "chosen_change_seed_se": float(per_seed.std(ddof=1) / np.sqrt(len(per_seed))),
                     "by_type": {t: float(c[:, types == k].mean()) for k, t in enumerate(synthetic.DISPLACEMENT_TYPES)},
                     "wrong_polarity": float(w.mean()), "wrong_polarity_start": float(start["wrong"].mean())}
        if arm in drops:
            dropped_types = train_types[np.concatenate([np.array(d, int) for d in drops[arm]])]
            arms[arm]["dropped_types"] = {t: float((dropped_types == k).mean())
                                          for k, t in enumerate(synthetic.DISPLACEMENT_TYPES)}
            arms[arm]["vs_random"] = paired_difference(np.stack(change[arm]), np.stack(change["random"]), s.reps) \
                if arm != "random" else None
    return {"arms": arms, "control": positive_control(np.stack(change["full"])),
            "primary": {"arms": list(PRIMARY), **paired_difference(np.stack(change[PRIMARY[0]]),
                                                                   np.stack(change[PRIMARY[1]]), s.reps)},
            "auroc": {a: (float(np.mean([x for x in v if x is not None])) if any(x is not None for x in v) else None)
                      for a, v in auroc.items()}}


def headline(summary: dict) -> str:
    c, p = summary["control"], summary["primary"]
    parts = [f"positive control {'passed' if c['passed'] else 'FAILED'}: the full run moved the held-out chosen "
             f"log-prob {c['chosen_change']:+.3f} +- {c['seed_se']:.3f} (seed SE) from the SFT policy"]
    verdict = p["verdict"] if c["passed"] else f"no conclusion (measured {p['verdict']})"
    parts.append(f"CHES filter minus random filter, held-out chosen change: {p['difference']:+.3f} "
                 f"[{p['interval'][0]:+.3f}, {p['interval'][1]:+.3f}] -> {verdict}")
    if not c["passed"]:
        parts.append("the control failed: no displacement to prevent, so no conclusion about the filters")
    auc_text = ", ".join(f"{a} {v:.2f}" for a, v in summary["auroc"].items() if v is not None)
    parts.append(f"AUROC of the initial score for 'this training pair's chosen fell': {auc_text}")
    return "; ".join(parts)


def format_table(summary: dict) -> str:
    types = synthetic.DISPLACEMENT_TYPES
    lines = [f"{'arm':10} {'held-out chosen':>18} " + " ".join(f"{t:>9}" for t in types) +
             f" {'wrong pol.':>10} {'vs random':>26}  dropped (by type)"]
    for arm, r in summary["arms"].items():
        vr = r.get("vs_random")
        vs = f"{vr['difference']:+.3f} [{vr['interval'][0]:+.3f}, {vr['interval'][1]:+.3f}]" if vr else "-"
        drop = " ".join(f"{r['dropped_types'][t]:.2f}" for t in types) if "dropped_types" in r else "-"
        lines.append(f"{arm:10} {r['chosen_change']:+9.3f} +- {r['chosen_change_seed_se']:.3f} " +
                     " ".join(f"{r['by_type'][t]:+9.3f}" for t in types) +
                     f" {r['wrong_polarity']:10.4f} {vs:>26}  {drop}")
    lines.append("(held-out chosen log-prob change from the SFT policy, mean over seeds +- seed SE, and by pair type; "
                 "wrong pol.: probability of a wrong-polarity first word)")
    lines.append("")
    lines.append(summary["verdict"].replace("; ", "\n"))
    return "\n".join(lines)


def settings_from_args(args) -> Settings:
    return Settings(**given_settings(Settings, args))
