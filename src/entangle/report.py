"""Run directories -> one self-contained HTML page (images embedded) plus its PNGs.

    html_path = write_report(["runs/sentiment"], "runs/sentiment/report")   # a study: its runs overlaid
    html_path = write_report(["runs/a", "runs/b"], "report")                  # several `entangle train` runs

A directory is a run (it has `metrics.jsonl`) or a study (its `summary.json` lists its runs, or its
sub-folders are runs). Panels appear only for the metrics the runs have.
"""

from __future__ import annotations

import base64
import glob
import html
import json
import logging
import os
import random
import re
import sys

from entangle.errors import DataError
from entangle.rundir import check_writable_folder
from entangle.plots import (has_any, plot_case_plane, plot_case_runs, plot_distributions, plot_gold_vs_kl,
                             plot_metrics, plot_position_views, plot_token_masks, plot_token_views)

log = logging.getLogger(__name__)

# (file, title, [(panel title, [(metric key, what its line is)])]): the curves of the report, in order. A panel's
# title names the line styles of the keys that some run has (solid, dashed, dotted in key order), nothing else.
FIGURES = [
    ("logps", "Log-probabilities", [
        ("train batch log-probs", [("logps/chosen", "chosen"), ("logps/rejected", "rejected")]),
        ("held-out log-probs", [("eval/logps/chosen", "chosen"), ("eval/logps/rejected", "rejected")])]),
    ("margins", "Margin, accuracy and loss", [
        ("reward margin", [("rewards/margins", "train"), ("eval/rewards/margins", "held-out")]),
        ("preference accuracy", [("rewards/accuracies", "train"), ("eval/rewards/accuracies", "held-out")]),
        ("loss", [("loss", "train"), ("eval/loss", "held-out")]),
        ("reward of chosen / rejected", [("rewards/chosen", "chosen"), ("rewards/rejected", "rejected")])]),
    ("entanglement", "Gradient entanglement", [
        ("cos(grad_w, grad_l)", [("entanglement/cos", "pair mean"), ("entanglement/batch_cos", "batch-mean grads")]),
        ("inner product <grad_w, grad_l>", [("entanglement/inner", "")]),
        ("gradient norms", [("entanglement/norm_w", "chosen"), ("entanglement/norm_l", "rejected")]),
        ("change of log pi(chosen) per step (see note)", [("entanglement/step_dlogp_w", "optimiser's update"),
                                                          ("entanglement/real_dlogp_w", "realised"),
                                                          ("entanglement/pred_dlogp_w", "gradient step")]),
        ("change of log pi(rejected) per step (see note)", [("entanglement/step_dlogp_l", "optimiser's update"),
                                                            ("entanglement/real_dlogp_l", "realised"),
                                                            ("entanglement/pred_dlogp_l", "gradient step")]),
        ("loss weights", [("entanglement/d_w", "d_w"), ("entanglement/d_l", "d_l")])]),
    ("reference", "Reference and drift", [
        ("log pi - log pi_init on the batch (KL estimate)", [("ref/kl_to_init", "")]),
        ("held-out log-ratio margin vs the initial policy (not beta-scaled)", [("eval/ref/margin_vs_init", "")]),
        ("reference drift from its start", [("ref/drift", "")]),
        ("KTO's reference point z0", [("kl", "train"), ("eval/kl", "held-out")]),
        ("reference updates", [("ref/updates", "")])]),
    ("mask", "Sparse token mask", [
        ("mean token weight m_t", [("mask/mean", "train"), ("eval/mask/mean", "held-out")]),
        ("share of response tokens with m_t < 0.1", [("mask/below_0.1", "")])]),
    ("generation", "Generated samples (gold scorer, KL from samples)", [
        ("gold reward of held-out samples", [("eval/gold/mean", "")]),
        ("KL(policy || initial) from samples", [("eval/kl/initial", "")]),
        ("win rate against the initial policy", [("eval/win_rate", "")]),
        ("completion length (tokens)", [("eval/length/mean", "")])]),
    ("speed", "Throughput", [("pairs (KTO: examples) per second", [("pairs_per_s", "pairs"),
                                                                   ("examples_per_s", "examples")]),
                             ("tokens per second", [("tokens_per_s", "")])]),
]
STYLE_NAMES = ("solid", "dashed", "dotted", "dash-dot")


def drawn_panels(metrics: dict[str, list[dict]], panels) -> list[tuple[str, list[str]]]:
    """The panels some run has data for, each titled with the line styles of only the keys that exist."""
    out = []
    for title, keyed in panels:
        present = [(k, role) for k, role in keyed if has_any(metrics, [k])]
        if not present:
            continue
        styles = ", ".join(f"{STYLE_NAMES[j]}: {role}" for j, (_, role) in enumerate(present) if role)
        out.append((f"{title} ({styles})" if len(present) > 1 else title, [k for k, _ in present]))
    return out


def load_metrics(run_dir: str) -> list[dict]:
    """The rows of `metrics.jsonl` (lenient: a torn last line from a killed run is skipped). Every row names the same
    few dozen metrics: one copy of each name (a 100,000-step log held in 0.42 GiB instead of 0.70)."""
    return [{sys.intern(k): v for k, v in row.items()} for row in _iter_jsonl(os.path.join(run_dir, "metrics.jsonl"))]


def read_jsonl(path: str) -> list[dict]:
    """The JSON rows of a log. A torn last line (a killed writer) is skipped with a warning; any other line that
    is not UTF-8 JSON is a DataError naming the file and line."""
    return list(_iter_jsonl(path))


def _iter_jsonl(path: str, warn: bool = True):
    """`read_jsonl`'s rows one at a time, read line by line (memory: one line); `warn`: say so of a torn last line."""
    if not os.path.exists(path):
        return
    bad = None                                   # (line number, error) of a line that may be the torn last one
    with open(path, "rb") as f:
        for i, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            if bad is not None:                  # a bad line with more after it: damaged, not torn
                raise DataError(f"{path}:{bad[0]}: not a JSON object ({bad[1]}); the file was edited or damaged: "
                                "remove or fix that line")
            try:
                row = json.loads(raw.decode("utf-8"))
                if not isinstance(row, dict):
                    raise ValueError("not an object")
            except (UnicodeDecodeError, ValueError) as e:
                bad = (i, type(e).__name__)
                continue
            yield row
    if bad is not None and warn:
        log.warning("%s:%d: a torn last line (skipped)", path, bad[0])


def _json(path: str) -> dict | None:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def discover(paths: list[str]) -> tuple[dict[str, str], list[tuple[str, dict]]]:
    """`({run name: run dir}, [(study dir, study summary)])` for the given run or study directories."""
    runs: dict[str, str] = {}
    studies = []
    for path in paths:
        if not os.path.isdir(path):
            raise DataError(f"{path}: no such directory; give a run directory (with metrics.jsonl) or a study's")
        summary = _json(os.path.join(path, "summary.json")) or {}
        if os.path.exists(os.path.join(path, "metrics.jsonl")):
            found = {os.path.basename(os.path.normpath(path)): path}
        elif "runs" in summary or "study" in summary:
            found = {name: os.path.join(path, sub) for name, sub in summary.get("runs", {}).items()}
            missing = [name for name, d in found.items() if not os.path.exists(os.path.join(d, "metrics.jsonl"))]
            if missing:
                log.warning("%s: %d of the study's runs are missing (%s); the report shows the others", path,
                            len(missing), ", ".join(missing))
                found = {k: v for k, v in found.items() if k not in missing}
            studies.append((path, summary))
        else:
            found = {d: os.path.join(path, d) for d in sorted(os.listdir(path))
                     if os.path.exists(os.path.join(path, d, "metrics.jsonl"))}
        if not found and "study" not in summary:
            raise DataError(f"{path}: neither a run directory (no metrics.jsonl) nor a study with runs in it")
        for name, run_dir in found.items():
            key = name if name not in runs else f"{os.path.basename(os.path.normpath(path))}/{name}"
            runs[key] = run_dir
    return runs, studies


def write_report(paths: list[str], out: str, title: str | None = None, study_blocks=None) -> str:
    """Write `out/report.html` (self-contained) and `out/*.png`; return the HTML path. `study_blocks(summary)`
    gives what a study renders itself (`studies.report_blocks`; the command line passes it): report.py draws runs
    and plain blocks, and knows no study."""
    run_dirs, studies = discover(paths)
    metrics = {name: load_metrics(d) for name, d in run_dirs.items()}
    check_writable_folder(out)
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise DataError(f"--out {out}: cannot create it ({e.strerror})") from None
    sections = []
    for study_dir, summary in studies:
        sections.append(_study_section(study_dir, summary, study_blocks(summary) if study_blocks else []))
    if run_dirs:
        sections.append(_headlines(run_dirs, metrics))
        sections.append(_runs_table(run_dirs, metrics))
    for fname, heading, panels in FIGURES:
        panels = drawn_panels(metrics, panels)
        if panels:
            png = plot_metrics(metrics, panels, os.path.join(out, f"{fname}.png"))
            sections.append(_figure(heading, png, NOTES.get(fname, "")))
        if fname == "entanglement" and has_any(metrics, ["entanglement/case1"]):
            png = plot_case_runs(metrics, os.path.join(out, "cases.png"))
            sections.append(_figure("Case fractions" + (": one panel per run" if len(metrics) > 1 else ""), png,
                                    NOTES["cases"]))
    sections += _generation_sections(run_dirs, metrics, out)
    planes = {name: _case_plane_rows(os.path.join(d, "entanglement.jsonl")) for name, d in run_dirs.items()}
    planes = {k: v for k, v in planes.items() if v[0]}
    if planes:
        pairs = {k: rows for k, (rows, _, _) in planes.items()}
        kinds = set.intersection(*(kinds for _, _, kinds in planes.values()))   # what every pair-step has
        which = "real" if "real" in kinds else "step" if "step" in kinds else "pred"
        totals = {k: total for k, (_, total, _) in planes.items()}
        png = plot_case_plane(pairs, os.path.join(out, "case_plane.png"), which=which, totals=totals)
        drawn = "" if all(len(pairs[k]) == totals[k] for k in pairs) else \
            f" Runs with more than {PLANE_POINTS:,} pair-steps show a uniform sample of that many (the legend counts all)."
        sections.append(_figure("Per-pair changes: which case each pair is in", png, CASE_NOTE + drawn))
    sections += _view_sections(run_dirs, out)
    sections.append(_configs(run_dirs))
    title = title or f"entangle report: {', '.join(run_dirs)}"
    page = PAGE.format(title=html.escape(title), body="\n".join(sections))
    path = os.path.join(out, "report.html")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(page)
    os.replace(tmp, path)
    return path



def _view_sections(run_dirs: dict[str, str], out: str) -> list[str]:
    """Each run's token views, learned token mask and per-position view, as figures."""
    sections = []
    for name, d in run_dirs.items():
        for view_path in _token_files(d):
            label = os.path.splitext(os.path.basename(view_path))[0]
            views = _json(view_path)
            if views:
                png = plot_token_views(views, os.path.join(out, f"tokens-{_slug(name)}-{label}.png"),
                                       title=f"{name}: per-token gradient cosines ({label})")
                sections.append(_figure(f"Token view: {name}, {label}", png, TOKEN_NOTE))
    for name, d in run_dirs.items():
        masks = os.path.join(d, "token_masks")
        path = os.path.join(masks, "final.json")
        path = path if os.path.exists(path) else (_step_files(masks) or [None])[-1]
        views = _json(path) if path else None
        if views:
            label = os.path.splitext(os.path.basename(path))[0]
            png = plot_token_masks(views, os.path.join(out, f"masks-{_slug(name)}-{label}.png"),
                                   title=f"{name}: learned token mask ({label})")
            sections.append(_figure(f"Token mask: {name}, {label}", png, MASK_NOTE))
    for name, d in run_dirs.items():
        files = _step_files(os.path.join(d, "entanglement_positions"))
        views = _json(files[-1]) if files else None
        if views:
            label = os.path.splitext(os.path.basename(files[-1]))[0]
            png = plot_position_views(views, os.path.join(out, f"positions-{_slug(name)}-{label}.png"),
                                      title=f"{name}: per-position shares of <grad_w, grad_l> ({label})")
            sections.append(_figure(f"Position view: {name}, {label}", png, POSITION_NOTE))
    return sections

def write_scan_report(rows: list[dict], summary: dict, out: str, texts: dict[int, tuple[str, str, str]],
                      token_views: list[dict], title: str, top: int = 12) -> str:
    """`out/report.html` of `entangle scan`: distributions, the case split, the most entangled pairs."""
    cases = summary["cases"]
    head = (f"<section class=headline><b>What the scan found</b><ul><li>{summary['pairs']} pairs: "
            f"{cases['2']:.0%} would have both log-probs fall (case 2) under a plain gradient step on the pair "
            f"alone, {cases['1']:.0%} the chosen rise and the rejected fall (case 1), {cases['3']:.0%} both rise "
            f"(case 3) {case_bar({f'case{k}': v for k, v in cases.items()})}</li>"
            f"<li>median cosine of the chosen and rejected gradients {summary['cos']['q50']:.3f}</li></ul></section>"
            f"<section><h2>Quantiles</h2>{_quantile_table(summary)}</section>")
    sections = [head]
    png = plot_distributions(rows, [("cos", "cos(grad log pi_w, grad log pi_l)"), ("ches_norm", "CHES (length-normalised)"),
                                    ("shared_tokens", "share of tokens in common"), ("d_w", "d_w at the start"),
                                    ("inner", "<grad log pi_w, grad log pi_l>"), ("ches", "CHES")],
                             os.path.join(out, "distributions.png"))
    sections.append(_figure("Distributions (stacked by predicted case)", png, SCAN_NOTE))
    png = plot_case_plane({"pairs": rows}, os.path.join(out, "case_plane.png"), "pred",
                          title="Per-pair first-order changes of one SGD step (per unit learning rate)")
    sections.append(_figure("Predicted changes: which case each pair is in", png))
    ranked = sorted(rows, key=lambda r: r["cos"], reverse=True)[:top]
    table = [[str(r["index"]), f"{r['cos']:.3f}", str(r["case"]), f"{r['ches_norm']:.4g}", f"{r['shared_tokens']:.2f}",
              *[html.escape(_clip(t)) for t in texts[r["index"]]]] for r in ranked]
    sections.append("<section><h2>The most entangled pairs (highest cosine)</h2>" + _table(
        ["index", "cos", "case", "CHES (norm.)", "shared", "prompt (end)", "chosen", "rejected"], table, "samples")
        + "</section>")
    if token_views:
        png = plot_token_views(token_views, os.path.join(out, "tokens.png"),
                               title="per-token gradient cosines, most entangled pairs (first tokens of each response)")
        sections.append(_figure("Token view of the most entangled pairs", png, TOKEN_NOTE))
    page = PAGE.format(title=html.escape(title), body="\n".join(sections))
    path = os.path.join(out, "report.html")
    with open(path + ".tmp", "w") as f:
        f.write(page)
    os.replace(path + ".tmp", path)
    return path


def _clip(text: str, n: int = 160) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def _quantile_table(summary: dict) -> str:
    keys = [k for k in ("cos", "inner", "ches", "ches_norm", "shared_tokens", "d_w", "d_l") if summary.get(k)]
    return _table(["statistic", "10%", "median", "90%"],
                  [[k, *[_fmt(summary[k][q]) for q in ("q10", "q50", "q90")]] for k in keys])


def _generation_sections(run_dirs: dict[str, str], metrics: dict[str, list[dict]], out: str) -> list[str]:
    """The gold-vs-KL paths of the runs that sampled during training, and their samples side by side."""
    sections = []
    if has_any(metrics, ["eval/kl/initial"]):
        png = plot_gold_vs_kl(metrics, os.path.join(out, "gold_vs_kl.png"))
        sections.append(_figure("Gold reward and win rate against KL from the initial policy", png, GOLD_NOTE))
    for name, d in run_dirs.items():
        files = sorted(glob.glob(os.path.join(d, "samples", "step-*.jsonl")),
                       key=lambda f: int(os.path.basename(f)[5:-6]) if os.path.basename(f)[5:-6].isdigit() else -1)
        if files:
            sections.append(_samples_table(name, files[0], files[-1]))
    return sections


def _samples_table(name: str, first: str, last: str, n: int = 4) -> str:
    """A few held-out prompts: the initial policy's completion beside the policy's at the first and last
    evaluation (every string escaped)."""
    def rows_of(path):
        return {r["prompt_index"]: r for r in read_jsonl(path) if r.get("sample", 0) == 0}

    a, b = rows_of(first), rows_of(last)
    label = lambda p: os.path.basename(p)[:-6]  # noqa: E731
    body = []
    for i in sorted(b)[:n]:
        prompt = b[i]["prompt"] if isinstance(b[i]["prompt"], str) else json.dumps(b[i]["prompt"])

        def cell(r):
            if r is None:
                return ""
            score = f"<br><small>score {r['score']:.3f}</small>" if isinstance(r.get("score"), (int, float)) else ""
            return f"<pre>{html.escape(r['completion'])}</pre>{score}"
        base = b[i].get("baseline_completion")
        base_cell = f"<pre>{html.escape(base)}</pre>" if base is not None else ""
        body.append([f"<pre>{html.escape(prompt[-600:])}</pre>", base_cell, cell(a.get(i)), cell(b[i])])
    return (f"<h2>Samples: {html.escape(name)}</h2>"
            + _table(["prompt", "initial policy", f"policy at {label(first)}", f"policy at {label(last)}"], body,
                     "samples")
            + "<p class=note>The prompt's last 600 characters; the initial policy's completion is sampled with the "
            "same seed as the policy's.</p>")


PLANE_POINTS = 20_000   # pair-steps drawn per run in the case plane; a uniform sample of them beyond that


def _case_plane_rows(path: str) -> tuple[list[dict], int, set[str]]:
    """The second half of training's per-pair changes in `entanglement.jsonl`, read in two passes line by line and
    kept only as the plane's numbers: (at most `PLANE_POINTS` rows, a uniform sample beyond that (seeded); how many
    there are; the kinds of change, of real/step/pred, that every one of them has). Memory: the sample, whatever
    the log's length."""
    last = max((r["step"] for r in _iter_jsonl(path, warn=False)), default=None)   # the second pass says it
    if last is None:
        return [], 0, set()
    keys = [f"{k}_dlogp_{s}" for k in ("real", "step", "pred") for s in ("w", "l")]
    kinds, kept, seen = {"real", "step", "pred"}, [], 0
    draw = random.Random(0)
    for r in _iter_jsonl(path):
        if r["step"] <= last / 2:
            continue
        kinds &= {k for k in ("real", "step", "pred") if f"{k}_dlogp_w" in r}
        row = {k: r[k] for k in keys if k in r}
        seen += 1
        if len(kept) < PLANE_POINTS:                 # reservoir sampling: each row kept with chance N / seen
            kept.append(row)
        else:
            j = draw.randrange(seen)
            if j < PLANE_POINTS:
                kept[j] = row
    return kept, seen, kinds


def _token_files(run_dir: str) -> list[str]:
    """Held-out views (the studies'), else the latest training-step view."""
    files = glob.glob(os.path.join(run_dir, "entanglement_tokens", "*.json"))
    held = sorted(f for f in files if os.path.basename(f).startswith("heldout-"))
    held.sort(key=lambda f: ("end" in f, f))  # start before end
    return held or _step_files(os.path.join(run_dir, "entanglement_tokens"))[-1:]


def _step_files(folder: str) -> list[str]:
    """`folder/step-N.json` files in step order."""
    files = glob.glob(os.path.join(folder, "step-*.json"))
    return sorted(files, key=lambda f: int(os.path.basename(f)[5:-5]) if os.path.basename(f)[5:-5].isdigit() else -1)


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)


def _img(png: str) -> str:
    with open(png, "rb") as f:
        data = base64.b64encode(f.read()).decode()
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(os.path.basename(png))}">'


def _figure(heading: str, png: str, note: str = "") -> str:
    note = f"<p class=note>{note}</p>" if note else ""
    return f"<section><h2>{html.escape(heading)}</h2>{note}{_img(png)}</section>"


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return html.escape(str(v))


def _last(rows: list[dict], key: str):
    """(step, value) of the last row that has `key`, else None."""
    return next(((r["step"], r[key]) for r in reversed(rows) if isinstance(r.get(key), (int, float))), None)


def _first(rows: list[dict], key: str):
    return next(((r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))), None)


def run_headline(rows: list[dict]) -> str:
    """What happened in a run, in one plain sentence per fact, from its metrics alone: how the chosen and
    rejected log-probs moved (held-out where measured), the cases at the last diagnostic step, the held-out
    margin and accuracy, and the gold reward of samples."""
    facts = []
    side = "held-out " if _first(rows, "eval/logps/chosen") else "train-batch "
    prefix = "eval/" if side == "held-out " else ""
    moved = []
    for what in ("chosen", "rejected"):
        a, b = _first(rows, f"{prefix}logps/{what}"), _last(rows, f"{prefix}logps/{what}")
        if a and b and b[0] > a[0]:
            change = b[1] - a[1]
            moved.append(f"{what} {'fell' if change < 0 else 'rose'} {abs(change):.2f} nats")
    if moved:
        facts.append(f"{side}log-probs: {' and '.join(moved)} (step {_first(rows, prefix + 'logps/chosen')[0]} to "
                     f"{_last(rows, prefix + 'logps/chosen')[0]})")
    cases = _last(rows, "entanglement/case2")
    if cases:
        row = next(r for r in reversed(rows) if "entanglement/case2" in r)
        facts.append(f"{row['entanglement/case2']:.0%} of pairs in case 2 (both down), "
                     f"{row.get('entanglement/case1', 0):.0%} in case 1 at step {cases[0]}")
    margin, accuracy = _last(rows, "eval/rewards/margins"), _last(rows, "eval/rewards/accuracies")
    if margin:
        facts.append(f"held-out margin {margin[1]:+.2f}" + (f", accuracy {accuracy[1]:.2f}" if accuracy else "")
                     + f" at step {margin[0]}")
    gold0, gold1, kl = _first(rows, "eval/gold/mean"), _last(rows, "eval/gold/mean"), _last(rows, "eval/kl/initial")
    if gold0 and gold1 and gold1[0] > gold0[0]:
        facts.append(f"gold {gold0[1]:.3f} to {gold1[1]:.3f}" + (f" at KL {kl[1]:.2f} from the initial policy"
                                                                 if kl else ""))
    steps = _last(rows, "loss")
    return "; ".join(facts) if facts else (f"{steps[0]} steps logged, loss {steps[1]:.4f}" if steps else
                                           "no training steps logged yet")


def _headlines(run_dirs: dict[str, str], metrics: dict[str, list[dict]]) -> str:
    items = "".join(f"<li><b>{html.escape(name)}</b>: {html.escape(run_headline(metrics[name]))}</li>"
                    for name in run_dirs)
    return f"<section class=headline><b>What happened</b><ul>{items}</ul></section>"


def case_bar(shares: dict) -> str:
    """Case fractions as one small stacked bar (the numbers on hover and beside it)."""
    colours = {"case1": "#4caf50", "case2": "#e57373", "case3": "#64b5f6", "case0": "#bdbdbd"}
    shares = {k: float(v) for k, v in shares.items() if k in colours and isinstance(v, (int, float))}
    if not shares:
        return ""
    parts = "".join(f'<span style="width:{100 * v:.1f}%;background:{colours[k]}" title="{k} {v:.1%}"></span>'
                    for k, v in sorted(shares.items(), key=lambda kv: "1230".index(kv[0][-1])))
    text = " ".join(f"{k[-1]}:{v:.0%}" for k, v in sorted(shares.items()) if k != "case0")
    return f'<span class=bar>{parts}</span> <small>{text}</small>'


def _header(name: str) -> str:
    """A column name, escaped, that wraps after "_" and "/" (metric names) and never inside a word."""
    return re.sub(r"([_/])", r"\1<wbr>", html.escape(name))


def _table(columns: list[str], rows: list[list[str]], css: str = "") -> str:
    """A table inside its own scrolling box (never wider than the page); cells are HTML already escaped."""
    head = "".join(f"<th>{_header(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<div class=scroll><table{' class=' + css if css else ''}><tr>{head}</tr>{body}</table></div>"


def _runs_table(run_dirs: dict[str, str], metrics: dict[str, list[dict]]) -> str:
    keys = ["loss", "logps/chosen", "logps/rejected", "rewards/margins", "eval/logps/chosen",
            "eval/logps/rejected", "eval/rewards/accuracies", "entanglement/cos", "pairs_per_s"]
    rows = []
    for name, d in run_dirs.items():
        s = _json(os.path.join(d, "summary.json"))
        logged = metrics[name]
        last = {k: v for r in logged for k, v in r.items()}          # each metric's last logged value
        final = {**last, **(s or {}).get("final", {}), **(s or {}).get("eval", {})}
        steps = (s or {}).get("steps", max((r.get("step", 0) for r in logged), default=0))
        status = s.get("status", "") if s else "no summary.json (a TRL run, or still running)"
        cases = {k.split("/")[-1]: v for k, v in last.items() if k.startswith("entanglement/case")}
        rows.append([html.escape(name), html.escape(str(status)), _fmt(steps),
                     *[_fmt(final[k]) if k in final else "" for k in keys], case_bar(cases)])
    return ("<section><h2>Runs (values at the last step)</h2>"
            + _table(["run", "status", "steps", *keys, "cases (last diagnostic step)"], rows, "runs") + "</section>")


def _study_section(study_dir: str, summary: dict, blocks: list[dict]) -> str:
    """A study's headline (`verdict`), its own figures, the blocks it renders itself, and its results table."""
    parts = [f"<section><h2>Study: {html.escape(str(summary.get('study', '')))} "
             f"({html.escape(str(summary.get('model', '')))})</h2>"]
    if summary.get("verdict"):      # a study's own headline: what it found, first
        items = "".join(f"<li>{html.escape(x)}</li>" for x in str(summary["verdict"]).split("; "))
        parts.append(f"<div class=headline><b>Finding</b><ul>{items}</ul></div>")
    for png in summary.get("figures") or []:      # figures the study drew itself, relative to its folder
        parts.append(_img(os.path.join(study_dir, png)))
    for block in blocks:
        parts.append(_block(block))
    # scalars, [start, end] pairs and case fractions; any other mapping or list is a table or a series of its own
    # (the study's blocks and figures show those)
    results = {n: {k: v for k, v in r.items() if _is_cell(v)} for n, r in (summary.get("results") or {}).items()}
    if results:
        cols = list(dict.fromkeys(k for r in results.values() for k in r))   # the study's own order
        rows = [[html.escape(n), *[_cell(r.get(c)) for c in cols]] for n, r in results.items()]
        parts.append("<h3>Results</h3>" + _table(["run", *cols], rows))
    parts.append(f"<p class=note>Study folder: {html.escape(os.path.abspath(study_dir))}</p></section>")
    return "".join(parts)


def _text(value) -> str:
    """Text content escaped for HTML (quotes stay as they are: they are not inside an attribute)."""
    return html.escape(str(value), quote=False)


def _block(block: dict) -> str:
    """One block a study renders itself: a heading, then claims (held / did not hold), a table or a text."""
    out = f"<h3>{_text(block['heading'])}</h3>" if block.get("heading") else ""
    if block.get("note"):
        out += f"<p class=note>{_text(block['note'])}</p>"
    state = lambda held: "" if held is None else (" class=held" if held else " class=failed")  # noqa: E731
    if "claims" in block:
        items = "".join(f"<li{state(c.get('held'))}><b>{_text(c.get('label', ''))}</b>"
                        f"{': ' if c.get('label') else ''}{_text(c['text'])}"
                        + (f" <span class=m>({_text(c['measured'])})</span>" if c.get("measured") else "")
                        + "</li>" for c in block["claims"])
        out += f"<ul class=preds>{items}</ul>"
    if "table" in block:
        out += _table(block["table"]["columns"], [[_cell(v) if i else _text(str(v)) for i, v in enumerate(r)]
                                                  for r in block["table"]["rows"]])
    if "text" in block:
        out += f"<p{state(block.get('held'))}>{_text(block['text'])}</p>"
    return out


def _is_cell(v) -> bool:
    if isinstance(v, dict):
        return _is_cases(v)
    if isinstance(v, (list, tuple)):
        return len(v) == 2 and all(isinstance(x, (int, float)) for x in v)
    return True


def _is_cases(v: dict) -> bool:
    return bool(v) and all(str(k).startswith("case") for k in v)


def _cell(v) -> str:
    if isinstance(v, list) and len(v) == 2 and all(isinstance(x, (int, float)) for x in v):
        return f"{v[0]:.4g} &rarr; {v[1]:.4g}"
    if isinstance(v, dict) and _is_cases(v):
        return case_bar(v)
    if isinstance(v, dict):
        return ", ".join(f"{html.escape(str(k))} {_fmt(x)}" for k, x in v.items())
    return _fmt(v) if v is not None else ""


def _configs(run_dirs: dict[str, str]) -> str:
    blocks = []
    for name, d in run_dirs.items():
        try:
            with open(os.path.join(d, "config.yaml")) as f:
                text = f.read()
        except OSError:
            text = "(no config.yaml)"
        blocks.append(f"<details><summary>{html.escape(name)}: config.yaml</summary><pre>{html.escape(text)}</pre>"
                      "</details>")
    return f"<section><h2>Configurations</h2>{''.join(blocks)}</section>"


NOTES = {
    "reference": "ref/kl_to_init: mean log pi - log pi_init over the batch's (training) responses, not a KL divergence "
                 "(those are not samples of the policy; see the generated-samples panels for one). The held-out "
                 "margin vs the initial policy is a log-ratio margin, not scaled by beta (rewards/margins is), and "
                 "the accuracy vs the initial policy is 0 at step 0 by construction (the margin is exactly 0 there).",
    "entanglement": "Means over the step's pairs. Changes of the log-probs per step, three ways: step_dlogp "
                    "(solid) is the first-order change along the update the optimiser actually made "
                    "(&lt;grad log pi, theta_after - theta_before&gt;); real_dlogp (dashed) is the realised change of "
                    "the same batch (with diagnostics.entanglement.realised); pred_dlogp (dotted) is the "
                    "paper's formula for a plain gradient step eta (d_w |grad_w|^2 - d_l &lt;grad_w, grad_l&gt;).",
    "cases": "The share of the step's pairs in each case, from the first-order change of a plain gradient step on "
             "each pair alone (grey: chosen down and rejected up, which one pair alone cannot do: the rest of the "
             "batch did it).",
}
POSITION_NOTE = ("Each bar: what the activations at that position contribute to the pair's inner product "
                 "&lt;grad log pi(chosen), grad log pi(rejected)&gt; (linear layers, embeddings and the LM head, "
                 "which at position t predicts token t+1). Red adds to the entanglement, blue reduces it. "
                 "From the training step's own statistics (diagnostics.entanglement.positions=true).")
CASE_NOTE = ("Each dot is one pair at one step of the second half of training. Right of the vertical line the "
             "chosen log-prob rises; below the horizontal line the rejected one falls. Case 2 (both fall) is "
             "what gradient entanglement produces when the chosen and rejected gradients point the same way.")
MASK_NOTE = ("loss.token_mask=sparse: the weight m_t in [0, 1] that the learned mask gives each response token "
             "inside the margin, sum_t m_t (log pi_t - log pi_ref,t), for a few held-out pairs (training pairs when "
             "the run had no eval data). An L1 penalty pulls every weight down; tokens that separate chosen from "
             "rejected keep theirs.")
GOLD_NOTE = ("Each point is one evaluation of held-out prompts (eval.generate): the policy's own samples scored by "
             "the gold scorer (left) or compared with the initial policy's samples of the same prompts (right), "
             "against sqrt(KL) where KL(policy || initial) is the mean over samples of log pi(y|x) - log pi_init(y|x). "
             "The square marks the first evaluation; error bars are one standard error. Over-optimisation shows as a "
             "path that bends down as KL grows.")
TOKEN_NOTE = ("Cell (i, j): cosine between the gradient of the i-th chosen token's log-prob and that of the j-th "
              "rejected token's log-prob. Red: the two tokens pull the model the same way (entangled); blue: "
              "opposite ways (the contrast DPO wants).")

SCAN_NOTE = ("Measured at the model as given, before any training step, one pair at a time: cos is the cosine of "
             "the chosen and rejected log-prob gradients; CHES (Razin et al. 2024) compares the last-layer hidden "
             "states of the two responses (high: the rejected response's states resemble the chosen one's, the "
             "pairs that paper filters out); case is the sign pattern of the first-order changes of one plain "
             "gradient step on the pair alone.")

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2rem auto; max-width: 1400px;
       padding: 0 1.5rem; color: #1d1d1f; line-height: 1.45; }}
h1 {{ font-size: 1.6rem; }} h2 {{ font-size: 1.25rem; border-bottom: 1px solid #ddd; padding-bottom: .2rem; }}
section {{ margin-bottom: 2.2rem; }}
img {{ max-width: 100%; height: auto; border: 1px solid #eee; }}
table {{ border-collapse: collapse; font-size: .85rem; }}
th, td {{ border: 1px solid #ddd; padding: .25rem .5rem; text-align: right; white-space: nowrap; }}
th {{ background: #f5f5f7; white-space: normal; overflow-wrap: break-word; min-width: 4rem; }} td:first-child {{ text-align: left; font-weight: 600; }}
.scroll {{ overflow-x: auto; max-width: 100%; }}
.bar {{ display: inline-flex; width: 7rem; height: .8rem; vertical-align: middle; border: 1px solid #ccc; }}
.bar span {{ display: block; height: 100%; }}
.headline li {{ margin: .15rem 0; }}
.note {{ color: #555; font-size: .9rem; max-width: 70rem; }}
.preds li {{ margin: .2rem 0; }} .held b {{ color: #1a7f37; }} .failed b {{ color: #c62828; }}
.headline {{ background: #f3f6fb; border-left: 4px solid #3b6fb6; padding: .4rem .8rem; margin: .6rem 0; }}
table.samples td, table.samples th {{ white-space: normal; text-align: left; vertical-align: top; max-width: 28rem; }}
table.samples pre {{ white-space: pre-wrap; padding: .3rem; margin: 0; }}
.m {{ color: #555; font-family: ui-monospace, monospace; font-size: .85rem; }}
pre {{ background: #f7f7f9; padding: .8rem; overflow-x: auto; font-size: .8rem; }}
</style></head>
<body><h1>{title}</h1>
{body}
</body></html>
"""
