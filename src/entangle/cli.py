"""The `entangle` command: `train`, `generate`, `eval`, `label`, `scan`, `config`, `losses`, `reference`, `study`,
`report`. Errors print as one line, exit code 2."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from entangle import __version__
from entangle.errors import ConfigError, EntangleError, Interrupted

MEMORY_HELP = ("memory budget in GiB (default: 90 %% of what is free); batches shrink to fit it, and a command that "
               "cannot fit stops with one line before its work")
DTYPE_HELP = ("auto (float32 weights; bf16 autocast on CUDA, as training) | bf16-mixed (float32 weights, bf16 "
              "autocast on any device) | float32 | bfloat16 | float16")


def _train(args) -> int:
    from entangle import config
    from entangle.loop import train

    overrides = list(args.overrides) + (["train.resume=latest"] if args.resume else [])
    cfg = config.load(args.config, overrides)
    result = train(cfg)
    if result.status == "interrupted":
        if result.is_main:
            print(f"interrupted; checkpoint in {result.run_dir}/checkpoints (resume with --resume)", file=sys.stderr)
        return 143 if result.stop_signal == "SIGTERM" else 130
    if result.is_main:
        print(f"run directory: {result.run_dir}")
    return 0


def _config(args) -> int:
    from entangle import config

    print(config.to_yaml(config.load(args.config, args.overrides)), end="")
    return 0


def _losses(args) -> int:
    from entangle import losses

    for name in losses.names():
        s = losses.spec(name)
        fn = losses.get(name)
        params = ", ".join(f"{k}={v}" + (f" ({s.range(k)})" if s.range(k) and not isinstance(v, bool) else "")
                           for k, v in s.defaults.items())
        alias = f" (alias {', '.join(s.aliases)})" if s.aliases else ""
        print(f"{name}{alias}: reference={'yes' if fn.uses_reference else 'no'}, "
              f"length-normalised={'yes' if fn.length_normalized else 'no'}; {params}; {s.citation}")
    return 0


def _reference(args) -> int:
    from entangle.docgen import PAGES

    print(PAGES[args.page](), end="")
    return 0


def _study_trust_region(args) -> int:
    from entangle.studies import trust_region

    summary = trust_region.run(trust_region.settings_from_args(args))
    print(trust_region.format_table(summary))
    print(f"study: {args.out}/summary.json\nreport: {os.path.join(args.out, summary['report'])}")
    return 0


def _study_sentiment(args) -> int:
    from entangle.studies import sentiment

    s = sentiment.settings_from_args(args)
    summary = sentiment.run(s)
    print(sentiment.format_table(summary))
    print(f"study: {s.out}/summary.json\nreport: {os.path.join(s.out, summary['report'])}")
    return 0


def _study_compare(args) -> int:
    from entangle.studies import compare

    s = compare.settings_from_args(args)
    summary = compare.run(s)
    print(compare.format_table(summary))
    print(f"study: {s.out}/summary.json\nreport: {os.path.join(s.out, summary['report'])}")
    return 0


def _gen_settings(args) -> dict:
    """The sampling options the user gave (the rest keep `generation.SamplingSettings`'s defaults)."""
    from entangle.generation import SamplingSettings

    given = {k: v for k, v in vars(args).items() if k in SamplingSettings.__dataclass_fields__}
    return {**given, "progress": not args.quiet}


def _given(args, *names: str) -> dict:
    """The options among `names` the user gave (the others keep the Python function's defaults: one place)."""
    return {k: getattr(args, k) for k in names if hasattr(args, k)}


def _generate(args) -> int:
    from entangle.api import generate

    rows = generate(args.model, args.prompts, out=args.out, limit=args.limit,
                    **_given(args, "split", "device", "dtype"), **_gen_settings(args))
    print(f"{len(rows)} samples: {args.out}")
    return 0


def _eval(args) -> int:
    from entangle.api import evaluate

    if bool(args.prompts) == bool(args.samples):   # the samples carry their prompts: one source, never two
        raise ConfigError("eval: give --prompts (to sample) or --samples (to score a samples file), not both or neither")

    figures = evaluate(args.model, args.prompts, out=args.out, baseline=args.baseline, initial=args.initial,
                       samples=args.samples, limit=args.limit, judge_template=args.judge_template,
                       **_given(args, "scorer", "split", "device", "dtype"), **_gen_settings(args))
    for k in ("gold/mean", "gold/baseline", "kl/initial", "kl/reference", "win_rate", "length/mean"):
        if figures.get(k) is not None:
            print(f"{k:13} {figures[k]:10.4f} +- {figures[k + '_se']:.4f}  (n={figures[k + '_n']})")
    if figures.get("gold/baseline") is not None:
        print(f"gold/baseline is the gold of {args.baseline or args.initial or 'the initial policy'}'s samples "
              "of the same prompts")
    print(f"distinct_2    {figures['distinct_2']:10.4f}\nevaluation: {args.out}/eval.json, samples: {args.out}/samples.jsonl")
    return 0


def _label(args) -> int:
    from entangle.api import label

    if "n" in vars(args):   # an option either acts or is refused
        raise ConfigError("label: --n does not apply (labelling draws exactly two samples per prompt)")
    settings = _gen_settings(args)
    rows = label(args.model, args.prompts, out=args.out, limit=args.limit,
                 **_given(args, "scorer", "noise", "split", "device", "dtype"), **settings)
    gap = sum(r["score_chosen"] - r["score_rejected"] for r in rows) / len(rows)
    print(f"{len(rows)} pairs (mean gold gap chosen - rejected {gap:.4f}): {args.out}")
    return 0


def _scan(args) -> int:
    from entangle.api import scan

    from entangle.scanning import ScanSettings

    options = {k: v for k, v in vars(args).items() if k in ScanSettings.__dataclass_fields__}
    if "param" in vars(args):
        options["loss_params"] = _loss_params(args.param)
    if "keep" in vars(args):
        options["keep_path"] = args.keep
    if "drop_case" in options:
        options["drop_case"] = tuple(options["drop_case"])
    result = scan(args.model, args.data, out=args.out, progress=not args.quiet, **options)
    s = result["summary"]
    cases = s["cases"]
    print(f"{s['pairs']} pairs: case 1 {cases['1']:.1%}, case 2 {cases['2']:.1%}, case 3 {cases['3']:.1%}; "
          f"median cos {s['cos']['q50']:.3f}, median CHES (norm.) {s['ches_norm']['q50']:.4g}")
    if "filter" in s:
        print(f"kept {s['filter']['kept']} of {s['pairs']} pairs: {s['filter']['file']}")
    print(f"scan: {args.out}/scan.jsonl, report: {result['report']}")
    return 0


def _loss_params(items: list[str]) -> dict:
    """`--param beta=0.1` (repeatable) as a dict of numbers."""
    params = {}
    for item in items:
        key, sep, value = item.partition("=")
        try:
            params[key] = float(value) if sep else None
        except ValueError:
            params[key] = None
        if params[key] is None:
            raise ConfigError(f"--param {item!r}: give KEY=NUMBER, e.g. --param beta=0.1")
    return params


def _scan_parser(sub) -> None:
    from entangle.scanning import ScanSettings

    sc = sub.add_parser("scan", help="score every pair for entanglement (and CHES) at the initial model, before "
                        "training; optionally write the pairs that pass filters")
    sc.add_argument("model", metavar="MODEL_OR_RUN", help="any model.name (tiny, smollm2-135m, a folder, a hub id), "
                    "a run directory or a checkpoint folder")
    sc.add_argument("--data", required=True, help="preference pairs (any format `entangle train` reads)")
    sc.add_argument("--out", required=True, help="folder for scan.jsonl, summary.json, report.html")
    sc.add_argument("--loss", help="the loss whose d_w / d_l and predicted case are reported")
    sc.add_argument("--param", action="append", metavar="KEY=VALUE", help="a loss hyper-parameter")
    sc.add_argument("--method", help="fast (one backward per batch) | exact (per pair)")
    sc.add_argument("--tokens", type=int, help="token views of the N most entangled pairs (0: none)")
    sc.add_argument("--batch-size", type=int, help="pairs per forward/backward (on SmolLM2 at 512 tokens, batch 1 "
                    "peaks at 3.2 GiB and runs faster than batch 4 at 7.9 GiB)")
    sc.add_argument("--max-length", type=int, help="prompt + longest response, in tokens")
    sc.add_argument("--max-prompt-length", type=int)
    sc.add_argument("--limit", type=int, help="first N pairs")
    sc.add_argument("--split", help="split for datasets folders and hub ids")
    sc.add_argument("--lora-r", type=int, help="scan the gradients of fresh LoRA adapters of rank R")
    sc.add_argument("--layers", type=int, help="measure the gradient over the last K decoder layers only (faster: "
                    "the backward stops there)")
    sc.add_argument("--drop-case", type=int, nargs="+", metavar="CASE",
                    help="filter: drop pairs whose predicted case is one of these (2: both down)")
    sc.add_argument("--max-cos", type=float, help="filter: drop pairs whose gradient cosine is above this")
    sc.add_argument("--max-ches-quantile", type=float, help="filter: drop pairs with CHES above this quantile")
    sc.add_argument("--max-ches-norm-quantile", type=float, help="filter: the same for length-normalised CHES")
    sc.add_argument("--keep", help="where the pairs that pass go (default OUT/kept.<the input's extension>)")
    sc.add_argument("--device", help="auto | cpu | cuda")
    sc.add_argument("--dtype", help=DTYPE_HELP)
    sc.add_argument("--memory-gib", type=float, help=MEMORY_HELP)
    _defaults_from(sc, ScanSettings, {"keep": "keep_path", "param": "loss_params"})
    sc.set_defaults(func=_scan)


def _sampling_args(p, prompts_required: bool = True) -> None:
    p.add_argument("model", metavar="MODEL_OR_RUN", help="a run directory (its final/), a checkpoint folder, "
                   "or any model.name (tiny, smollm2-135m, a folder, a hub id)")
    p.add_argument("--prompts", required=prompts_required, help="prompt source: {prompt} JSONL, a preference file "
                   "(its prompts), chat messages, synthetic:NAME" + ("" if prompts_required else
                                                                     " (not with --samples)"))
    p.add_argument("--split", default=argparse.SUPPRESS, help="split for datasets folders and hub ids (default train)")
    p.add_argument("--limit", type=int, help="first N prompts")
    p.add_argument("--n", type=int, help="samples per prompt")
    p.add_argument("--max-new-tokens", type=int, help="tokens sampled at most per completion")
    p.add_argument("--max-prompt-length", type=int, help="longer prompts keep their last tokens")
    p.add_argument("--temperature", type=float, help="0: greedy")
    p.add_argument("--top-p", type=float, help="nucleus sampling")
    p.add_argument("--seed", type=int, help="the same seed and batch size give the same samples")
    p.add_argument("--batch-size", type=int, help="sequences per forward (shrinks to fit the memory budget)")
    p.add_argument("--device", default=argparse.SUPPRESS, help="auto | cpu | cuda (default auto)")
    p.add_argument("--dtype", default=argparse.SUPPRESS, help=DTYPE_HELP)
    p.add_argument("--memory-gib", type=float, help=MEMORY_HELP)
    from entangle.generation import SamplingSettings

    _defaults_from(p, SamplingSettings)


def _defaults_from(parser, settings, names: dict | None = None) -> None:
    """Options whose defaults live in a settings dataclass (the one place they are written): not passed unless
    given, and their help shows the dataclass's default. `names`: option dest -> field name where they differ."""
    fields = settings.__dataclass_fields__
    for action in parser._actions:
        name = (names or {}).get(action.dest, action.dest)
        if name in fields:
            action.default = argparse.SUPPRESS
            default = fields[name].default
            if isinstance(default, (int, float, str)) and not isinstance(default, bool) and action.help:
                action.help += f" (default {default})"


def _study_overoptimization(args) -> int:
    from entangle.studies import overoptimization

    summary = overoptimization.run(overoptimization.settings_from_args(args))
    print(overoptimization.format_table(summary))
    print(f"study: {args.out}/summary.json\nreport: {os.path.join(args.out, summary['report'])}")
    return 0


def _study_scan_filter(args) -> int:
    from entangle.studies import scan_filter

    summary = scan_filter.run(scan_filter.settings_from_args(args))
    print(scan_filter.format_table(summary))
    print(f"study: {args.out}/summary.json\nreport: {os.path.join(args.out, summary['report'])}")
    return 0


def _report(args) -> int:
    from entangle.report import write_report
    from entangle.studies import report_blocks

    out = args.out or (os.path.join(args.run_dirs[0], "report") if len(args.run_dirs) == 1 else "report")
    print(f"report: {write_report(args.run_dirs, out, args.title, study_blocks=report_blocks)}")
    return 0


class _Parser(argparse.ArgumentParser):
    """Command-line mistakes as one line (no usage block), exit 2, like every other input error."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="entangle", description="Margin-based preference optimisation with "
                                "gradient-entanglement diagnostics.")
    p.add_argument("--version", action="version", version=f"entangle {__version__}")
    p.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors, no progress bars")
    p.add_argument("-v", "--verbose", action="store_true", help="also the libraries' own notices (DeepSpeed, PEFT, "
                   "transformers' deprecations), hidden by default")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train from a YAML config with key=value overrides")
    t.add_argument("config", nargs="?", help="YAML config (defaults only when omitted)")
    t.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.max_steps=10 loss.params.beta=0.2")
    t.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in train.output_dir")
    t.set_defaults(func=_train)
    c = sub.add_parser("config", help="print the resolved config (defaults <- file <- overrides)")
    c.add_argument("config", nargs="?")
    c.add_argument("overrides", nargs="*")
    c.set_defaults(func=_config)
    _study_parsers(sub)
    r = sub.add_parser("report", help="HTML report (plots embedded) of run or study directories, overlaid")
    r.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    r.add_argument("--out", help="output folder (default: RUN_DIR/report for one directory, else ./report)")
    r.add_argument("--title")
    r.set_defaults(func=_report)
    _sampling_parsers(sub)
    _scan_parser(sub)
    losses_p = sub.add_parser("losses", help="list the registered losses and their defaults")
    losses_p.set_defaults(func=_losses)
    ref = sub.add_parser("reference", help="print a generated reference page (markdown): every config key, or "
                         "every loss (docs/reference/ is made by this)")
    ref.add_argument("page", choices=["config", "losses"])
    ref.set_defaults(func=_reference)
    _everywhere(p)
    return p


def _everywhere(parser) -> None:
    """`-q` / `-v` also after any subcommand (`entangle generate ... -q`), as before it."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                sub.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                                 help="only warnings and errors, no progress bars")
                sub.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                                 help="also the libraries' own notices")
                _everywhere(sub)


def _study_parsers(sub) -> None:
    """`entangle study NAME`: one subcommand per study."""
    st = sub.add_parser("study", help="the papers' experiments").add_subparsers(dest="study", required=True)
    _trust_region_parser(st)
    _sentiment_parser(st)
    _compare_parser(st)
    _overoptimization_parser(st)
    _scan_filter_parser(st)


def _trust_region_parser(st) -> None:
    """`entangle study trust-region`."""
    tr = st.add_parser("trust-region", help="static vs soft vs hard reference from the same SFT policy, over seeds: "
                       "held-out log-probs and margin, gold and KL from samples")
    tr.add_argument("--model", help="tiny (default: built here) | a folder or hub id, SFT on the verdict task first")
    tr.add_argument("--seeds", type=int, help="label draws and data orders (default 3)")
    tr.add_argument("--loss", help="any loss with a reference and a beta (default dpo: TR-DPO; ipo, kto ...)")
    tr.add_argument("--beta", type=float, help="default 0.1")
    tr.add_argument("--steps", type=int, help="optimiser steps per variant (default 300)")
    tr.add_argument("--lr", type=float, help="default 1e-4 (constant after 10 warm-up steps)")
    tr.add_argument("--soft-alpha", type=float, help="soft update weight, every step (default 0.05)")
    tr.add_argument("--hard-tau", type=int, help="steps between hard updates (default 100)")
    tr.add_argument("--lora-r", type=int, help="LoRA rank (default: full fine-tuning)")
    tr.add_argument("--out", default="runs/study-trust-region")
    tr.add_argument("overrides", nargs="*", help="extra config overrides for every variant")
    tr.set_defaults(func=_study_trust_region)


def _sentiment_parser(st) -> None:
    """`entangle study sentiment`."""
    se = st.add_parser("sentiment", help="the GE paper's sentiment experiment: single token vs short vs long "
                       "suffix (SFT warm-up, then DPO with entanglement diagnostics every step)")
    se.add_argument("--model", help="tiny (~1 minute) | smollm2-135m | a folder or hub id")
    se.add_argument("--out", help="folder for the runs, summary.json and the report")
    se.add_argument("--configs", help="response formats to run, comma-separated among single, short, long "
                    "(default: all three)")
    se.add_argument("--steps", type=int, help="DPO steps per configuration (default: the model's preset)")
    se.add_argument("--sft-steps", type=int, help="SFT warm-up steps per configuration (default: the preset)")
    se.add_argument("--lr", type=float, help="DPO learning rate (default: the preset)")
    se.add_argument("--sft-lr", type=float, help="SFT learning rate (default: the preset)")
    se.add_argument("--beta", type=float, help="DPO beta (default: the preset, 0.1)")
    se.add_argument("--batch-size", dest="batch", type=int, help="pairs per step (default: the preset)")
    se.add_argument("--n-train", type=int, help="generated training statements (default: the preset)")
    se.add_argument("--n-test", type=int, help="generated held-out statements (default: the preset)")
    se.add_argument("--seed", type=int)
    se.add_argument("--optimizer", default="adamw", choices=("adamw", "sgd"),
                    help="sgd: also run each DPO phase with plain gradient descent (no momentum, clipping or decay) "
                    "at the learning rate that moves the margin as the AdamW run does, side by side")
    se.add_argument("--no-mitigations", action="store_true",
                    help="skip the long-suffix re-runs with the mitigations (pairwise-normalised update, "
                         "sparse token mask)")
    se.add_argument("overrides", nargs="*", help="extra config overrides for every run")
    from entangle.studies.sentiment import Settings

    _defaults_from(se, Settings)
    se.set_defaults(func=_study_sentiment)


def _compare_parser(st) -> None:
    """`entangle study compare`."""
    co = st.add_parser("compare", help="several losses on the same model, data, seed and budget (GE Fig. 1)")
    co.add_argument("--losses", help="comma-separated loss names (default: dpo,ipo,simpo,cpo,slic,rdpo,dpop,rrhf,"
                    "orpo,sppo)")
    co.add_argument("--quick", action="store_true", default=None, help="tiny model on generated pairs (about a minute)")
    co.add_argument("--model", help="default: smollm2-135m with LoRA r 8 (tiny with --quick)")
    co.add_argument("--data", help="training pairs (default: hh-rlhf/helpful-base.train.jsonl under $ENTANGLE_DATA "
                    "or the shared/data folder beside the repository)")
    co.add_argument("--eval-data", help="held-out pairs (default: the matching .test.jsonl)")
    co.add_argument("--steps", type=int, help="optimiser steps per loss (default: the preset's)")
    co.add_argument("--lr", type=float, help="learning rate (default: the preset's)")
    co.add_argument("--seed", type=int, help="data order and initialisation")
    co.add_argument("--set", dest="params", action="append", metavar="LOSS.PARAM=VALUE",
                    help="a hyper-parameter for one loss, e.g. --set dpop.lam=50 (repeatable)")
    co.add_argument("--mitigate", help="losses also run with each mitigation: optimizer.pairwise_normalized=true as "
                    "LOSS-pairwise, loss.token_mask=sparse as LOSS-sparse ('' for none; default dpo)")
    co.add_argument("--out", help="folder for the runs, summary.json and the report")
    co.add_argument("overrides", nargs="*", help="extra config overrides for every run")
    from entangle.studies.compare import Settings

    _defaults_from(co, Settings)
    co.set_defaults(func=_study_compare)


def _overoptimization_parser(st) -> None:
    """`entangle study overoptimization`."""
    oo = st.add_parser("overoptimization", help="gold reward against sqrt KL from the SFT policy as a frontier over "
                       "beta, with a positive control, against soft and hard trust-region runs (pre-set statistic)")
    oo.add_argument("--quick", action="store_true", help="one seed, the proxy arm, 3 betas, one soft and one hard run "
                    "(about 2 min)")
    oo.add_argument("--model", help="tiny (default: built here) | a local folder or hub id, SFT on the same task")
    oo.add_argument("--seeds", type=int, help="label draws and data orders (default 3)")
    oo.add_argument("--arms", nargs="+", choices=("gold", "proxy"), help="labellers (default: gold proxy)")
    oo.add_argument("--betas", nargs="+", type=float, help="the static sweep (default 0.01 0.03 0.1 0.3 1)")
    oo.add_argument("--tr-betas", nargs="+", type=float, help="betas of the trust-region runs (default 0.1 0.3)")
    oo.add_argument("--soft-alphas", nargs="+", type=float, help="soft updates every step (default 0.01 0.05)")
    oo.add_argument("--hard-taus", nargs="+", type=int, help="hard update intervals (default 50 100)")
    oo.add_argument("--loss", help="a loss with a reference and a beta (default dpo)")
    oo.add_argument("--steps", type=int, help="optimiser steps per run (default 300)")
    oo.add_argument("--lr", type=float, help="constant learning rate after warm-up (default 1e-4)")
    oo.add_argument("--noise", type=float, help="Bradley-Terry label temperature (default 0.5)")
    oo.add_argument("--n-eval", type=int, help="held-out prompts (default 256)")
    oo.add_argument("--samples", type=int, help="samples per held-out prompt (default 2)")
    oo.add_argument("--reps", type=int, help="bootstrap draws (default 1000)")
    oo.add_argument("--out", default="runs/overoptimization")
    oo.add_argument("overrides", nargs="*", help="extra config overrides for every DPO run")
    oo.set_defaults(func=_study_overoptimization)


def _scan_filter_parser(st) -> None:
    """`entangle study scan-filter`."""
    sf = st.add_parser("scan-filter", help="where likelihood displacement happens: DPO on all pairs and on the pairs "
                       "left after dropping the same share by CHES, normalised CHES, cosine, predicted case 2, at "
                       "random and by an oracle, over seeds")
    sf.add_argument("--model", help="tiny (default: built here) | a folder or hub id, SFT on the sentiment answers")
    sf.add_argument("--seeds", type=int, help="data orders and random draws (default 5)")
    sf.add_argument("--n-train", type=int, help="training pairs, four types in turn (default 256)")
    sf.add_argument("--n-test", type=int, help="held-out pairs (default 128)")
    sf.add_argument("--share", type=float, help="share of training pairs every arm drops (default 0.25)")
    sf.add_argument("--steps", type=int, help="optimiser steps per run (default 100)")
    sf.add_argument("--lr", type=float, help="default 1e-4")
    sf.add_argument("--reps", type=int, help="bootstrap draws (default 1000)")
    sf.add_argument("--out", default="runs/scan-filter")
    sf.add_argument("overrides", nargs="*", help="extra config overrides for every DPO run")
    sf.set_defaults(func=_study_scan_filter)


def _sampling_parsers(sub) -> None:
    """`entangle generate`, `entangle eval`, `entangle label`."""
    g = sub.add_parser("generate", help="sample completions from a model or run (batched, KV cache, seeded)")
    _sampling_args(g)
    g.add_argument("--out", required=True, help="output JSONL, one row per sample")
    g.set_defaults(func=_generate)
    e = sub.add_parser("eval", help="sample, score with a gold scorer, KL to the initial policy, win rate")
    _sampling_args(e, prompts_required=False)
    e.add_argument("--scorer", default=argparse.SUPPRESS,
                   help="vader | rm:PATH | python:module:function | judge:PATH (default vader)")
    e.add_argument("--judge-template", help="file with the judge prompt ({prompt}, {a}, {b})")
    e.add_argument("--initial", help="the initial policy (default: a run's starting model; a model: itself)")
    e.add_argument("--baseline", help="win rate against this model or run (default: the initial policy)")
    e.add_argument("--samples", help="score this samples JSONL (from entangle generate) instead of sampling")
    e.add_argument("--out", required=True, help="output folder: eval.json, samples.jsonl")
    e.set_defaults(func=_eval)
    la = sub.add_parser("label", help="make preference pairs: two samples per prompt, labelled by a gold scorer")
    _sampling_args(la)
    la.add_argument("--scorer", default=argparse.SUPPRESS,
                    help="vader | rm:PATH | python:module:function (default vader)")
    la.add_argument("--noise", type=float, default=argparse.SUPPRESS, help="Bradley-Terry temperature: P(a > b) = "
                    "sigmoid((s_a - s_b) / T); 0 (the default): the higher score wins")
    la.add_argument("--out", required=True, help="output preference JSONL (prompt/chosen/rejected)")
    la.set_defaults(func=_label)


def _split_config_arg(args) -> None:
    # `entangle train key=value` (no file): argparse puts the first override in `config`.
    if getattr(args, "config", None) and "=" in args.config and not args.config.endswith((".yaml", ".yml")):
        args.overrides = [args.config, *args.overrides]
        args.config = None


def quiet_libraries() -> None:
    """Hide the third-party notices a user cannot act on: transformers' and PEFT's deprecations
    (FutureWarning), PEFT's failed hub look-up when saving offline, DeepSpeed's "Setting accelerator to CPU"
    (its logger resets its own level on import, so a filter on the logger object does it)."""
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=r".*Unable to fetch remote file.*")
    warnings.filterwarnings("ignore", message=r".*fan_in_fan_out is set to False.*")
    logging.getLogger("DeepSpeed").addFilter(lambda record: record.levelno >= logging.ERROR)


HEAVY = ("train", "scan", "study", "generate", "eval", "label")   # commands that run a model


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _split_config_arg(args)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    for noisy in ("httpx", "urllib3", "datasets", "accelerate", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if not args.verbose:
        quiet_libraries()
    if args.command in HEAVY:   # large tensors on huge pages: fewer page faults per step (the CLI owns the process)
        from entangle.memory import use_huge_pages

        use_huge_pages()
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    if args.quiet:   # -q: no progress bars at all, ours or a library's (the command line owns the process)
        import functools

        from tqdm import std

        std.tqdm.__init__ = functools.partialmethod(std.tqdm.__init__, disable=True)
    try:
        return args.func(args)
    except Interrupted as e:
        print(f"entangle: {e}", file=sys.stderr)
        return e.exit_code
    except EntangleError as e:
        print(f"entangle: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("entangle: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:   # `entangle losses | head`: the reader left
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
