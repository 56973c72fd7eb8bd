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

from entangle.errors import DataError
from entangle.rundir import check_writable_folder
from entangle.plots import (has_any, plot_case_plane, plot_distributions, plot_gold_vs_kl, plot_metrics,
                             plot_position_views, plot_token_masks, plot_token_views)

log = logging.getLogger(__name__)

# (file, title, [(panel title, metric keys)]): the curves of the report, in order.
FIGURES = [
    ("logps", "Log-probabilities", [
        ("train batch log-probs (solid: chosen, dashed: rejected)", ["logps/chosen", "logps/rejected"]),
        ("held-out log-probs (solid: chosen, dashed: rejected)", ["eval/logps/chosen", "eval/logps/rejected"])]),
    ("margins", "Margin, accuracy and loss", [
        ("reward margin (solid: train, dashed: held-out)", ["rewards/margins", "eval/rewards/margins"]),
        ("preference accuracy (solid: train, dashed: held-out)", ["rewards/accuracies", "eval/rewards/accuracies"]),
        ("loss (solid: train, dashed: held-out)", ["loss", "eval/loss"]),
        ("reward of chosen / rejected (solid / dashed)", ["rewards/chosen", "rewards/rejected"])]),
    ("entanglement", "Gradient entanglement", [
        ("cos(grad_w, grad_l): pair mean (solid), batch-mean grads (dashed)",
         ["entanglement/cos", "entanglement/batch_cos"]),
        ("inner product <grad_w, grad_l>", ["entanglement/inner"]),
        ("gradient norms (solid: chosen, dashed: rejected)", ["entanglement/norm_w", "entanglement/norm_l"]),
        ("change of log pi(chosen) per step (see note)",
         ["entanglement/step_dlogp_w", "entanglement/real_dlogp_w", "entanglement/pred_dlogp_w"]),
        ("change of log pi(rejected) per step (see note)",
         ["entanglement/step_dlogp_l", "entanglement/real_dlogp_l", "entanglement/pred_dlogp_l"]),
        ("loss weights d_w (solid), d_l (dashed)", ["entanglement/d_w", "entanglement/d_l"])]),
    ("cases", "Case fractions", [
        ("case 1: chosen up, rejected down", ["entanglement/case1", "entanglement/step_case1",
                                              "entanglement/real_case1"]),
        ("case 2: both down", ["entanglement/case2", "entanglement/step_case2", "entanglement/real_case2"]),
        ("case 3: both up", ["entanglement/case3", "entanglement/step_case3", "entanglement/real_case3"])]),
    ("reference", "Reference and drift", [
        ("log pi - log pi_init on the batch (KL estimate)", ["ref/kl_to_init"]),
        ("held-out log-ratio margin vs the initial policy (not beta-scaled)", ["eval/ref/margin_vs_init"]),
        ("reference drift from its start", ["ref/drift"]),
        ("KTO's reference point z0 (solid: train, dashed: held-out)", ["kl", "eval/kl"]),
        ("reference updates", ["ref/updates"])]),
    ("mask", "Sparse token mask", [
        ("mean token weight m_t (solid: train, dashed: held-out)", ["mask/mean", "eval/mask/mean"]),
        ("share of response tokens with m_t < 0.1", ["mask/below_0.1"])]),
    ("generation", "Generated samples (gold scorer, KL from samples)", [
        ("gold reward of held-out samples", ["eval/gold/mean"]),
        ("KL(policy || initial) from samples", ["eval/kl/initial"]),
        ("win rate against the initial policy", ["eval/win_rate"]),
        ("completion length (tokens)", ["eval/length/mean"])]),
    ("speed", "Throughput", [("pairs (KTO: examples) per second", ["pairs_per_s", "examples_per_s"]),
                             ("tokens per second", ["tokens_per_s"])]),
]


def load_metrics(run_dir: str) -> list[dict]:
    """The rows of `metrics.jsonl` (lenient: a torn last line from a killed run is skipped)."""
    return _jsonl(os.path.join(run_dir, "metrics.jsonl"))


def _jsonl(path: str) -> list[dict]:
    rows = []
    if not os.path.exists(path):
        return rows
    with open(path) as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


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


def write_report(paths: list[str], out: str, title: str | None = None) -> str:
    """Write `out/report.html` (self-contained) and `out/*.png`; return the HTML path."""
    run_dirs, studies = discover(paths)
    metrics = {name: load_metrics(d) for name, d in run_dirs.items()}
    check_writable_folder(out)
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise DataError(f"--out {out}: cannot create it ({e.strerror})") from None
    sections = []
    for study_dir, summary in studies:
        sections.append(_study_section(study_dir, summary))
    if run_dirs:
        sections.append(_runs_table(run_dirs))
    for fname, heading, panels in FIGURES:
        panels = [(t, keys) for t, keys in panels if has_any(metrics, keys)]
        if panels:
            png = plot_metrics(metrics, panels, os.path.join(out, f"{fname}.png"))
            sections.append(_figure(heading, png, NOTES.get(fname, "")))
    sections += _generation_sections(run_dirs, metrics, out)
    pairs = {name: _second_half(_jsonl(os.path.join(d, "entanglement.jsonl"))) for name, d in run_dirs.items()}
    pairs = {k: v for k, v in pairs.items() if v}
    if pairs:
        rows_all = [r for rows in pairs.values() for r in rows]
        which = "real" if all("real_dlogp_w" in r for r in rows_all) else \
            "step" if all("step_dlogp_w" in r for r in rows_all) else "pred"
        png = plot_case_plane(pairs, os.path.join(out, "case_plane.png"), which=which)
        sections.append(_figure("Per-pair changes: which case each pair is in", png, CASE_NOTE))
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
    head = (f"<section><h2>{summary['pairs']} pairs</h2><p>Predicted case of a plain gradient step on each pair "
            f"alone: case 1 (chosen up, rejected down) {cases['1']:.1%}, case 2 (both down) {cases['2']:.1%}, "
            f"case 3 (both up) {cases['3']:.1%}, chosen down and rejected up {cases['0']:.1%}.</p>"
            + _quantile_table(summary) + "</section>")
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
    cells = "".join(
        f"<tr><td>{r['index']}</td><td>{r['cos']:.3f}</td><td>{r['case']}</td><td>{r['ches_norm']:.4g}</td>"
        f"<td>{r['shared_tokens']:.2f}</td>" + "".join(f"<td>{html.escape(_clip(t))}</td>" for t in texts[r['index']])
        + "</tr>" for r in ranked)
    sections.append("<section><h2>The most entangled pairs (highest cosine)</h2><table><tr><th>index</th><th>cos</th>"
                    "<th>case</th><th>CHES (norm.)</th><th>shared</th><th>prompt (end)</th><th>chosen</th>"
                    f"<th>rejected</th></tr>{cells}</table></section>")
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
    body = "".join(f"<tr><td>{k}</td>" + "".join(f"<td>{_fmt(summary[k][q])}</td>" for q in ("q10", "q50", "q90"))
                   + "</tr>" for k in keys)
    return f"<table><tr><th>statistic</th><th>10%</th><th>median</th><th>90%</th></tr>{body}</table>"


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
        return {r["prompt_index"]: r for r in _jsonl(path) if r.get("sample", 0) == 0}

    a, b = rows_of(first), rows_of(last)
    label = lambda p: os.path.basename(p)[:-6]  # noqa: E731
    head = (f"<tr><th>prompt</th><th>initial policy</th><th>policy at {label(first)}</th>"
            f"<th>policy at {label(last)}</th></tr>")
    body = []
    for i in sorted(b)[:n]:
        prompt = b[i]["prompt"] if isinstance(b[i]["prompt"], str) else json.dumps(b[i]["prompt"])

        def cell(r):
            if r is None:
                return "<td></td>"
            score = f"<br><small>score {r['score']:.3f}</small>" if isinstance(r.get("score"), (int, float)) else ""
            return f"<td><pre>{html.escape(r['completion'])}</pre>{score}</td>"
        base = b[i].get("baseline_completion")
        base_cell = f"<td><pre>{html.escape(base)}</pre></td>" if base is not None else "<td></td>"
        body.append(f"<tr><td><pre>{html.escape(prompt[-600:])}</pre></td>{base_cell}{cell(a.get(i))}{cell(b[i])}</tr>")
    return (f"<h2>Samples: {html.escape(name)}</h2><table class=samples>{head}{''.join(body)}</table>"
            "<p class=note>The prompt's last 600 characters; the initial policy's completion is sampled with the "
            "same seed as the policy's.</p>")


def _second_half(rows: list[dict]) -> list[dict]:
    if not rows:
        return rows
    last = max(r["step"] for r in rows)
    return [r for r in rows if r["step"] > last / 2]


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


def _runs_table(run_dirs: dict[str, str]) -> str:
    keys = ["steps", "loss", "logps/chosen", "logps/rejected", "rewards/margins", "eval/logps/chosen",
            "eval/logps/rejected", "eval/rewards/accuracies", "entanglement/cos", "pairs_per_s"]
    head = "".join(f"<th>{html.escape(k)}</th>" for k in ["run", "status", *keys])
    body = []
    for name, d in run_dirs.items():
        s = _json(os.path.join(d, "summary.json")) or {}
        final = {**s.get("final", {}), **s.get("eval", {}), "steps": s.get("steps", "")}
        cells = "".join(f"<td>{_fmt(final.get(k, ''))}</td>" for k in keys)
        body.append(f"<tr><td>{html.escape(name)}</td><td>{html.escape(str(s.get('status', 'running?')))}</td>"
                    f"{cells}</tr>")
    return (f"<section><h2>Runs (values at the last step)</h2><div class=scroll><table><tr>{head}</tr>"
            f"{''.join(body)}</table></div></section>")


def _study_section(study_dir: str, summary: dict) -> str:
    parts = [f"<section><h2>Study: {html.escape(str(summary.get('study', '')))} "
             f"({html.escape(str(summary.get('model', '')))})</h2>"]
    if summary.get("verdict"):      # a study's own headline: what it found, first
        items = "".join(f"<li>{html.escape(x)}</li>" for x in str(summary["verdict"]).split("; "))
        parts.append(f"<div class=headline><b>Finding</b><ul>{items}</ul></div>")
    for png in summary.get("figures") or []:      # figures the study drew itself, relative to its folder
        parts.append(_img(os.path.join(study_dir, png)))
    preds = summary.get("predictions") or []
    if preds:
        items = "".join(f"<li class={'held' if p['held'] else 'failed'}><b>{'held' if p['held'] else 'did not hold'}"
                        f"</b>: {html.escape(p['config'])}: {html.escape(p['claim'])} "
                        f"<span class=m>({html.escape(p['measured'])})</span></li>" for p in preds)
        parts.append(f"<h3>The paper's predictions, as measured</h3><ul class=preds>{items}</ul>")
    theory = summary.get("theory")
    if theory:
        if theory.get("held") is None:
            text = f"not decided ({html.escape(str(theory.get('why', '')))})"
        else:
            text = (f"<b>{'held' if theory['held'] else 'did not hold'}</b>: the chosen log-prob rose in "
                    f"{theory['chosen_rose_fraction_explicit']:.2f} of pair-steps for losses with d_w &gt; d_l "
                    f"({html.escape(', '.join(theory['explicit']))}) vs {theory['chosen_rose_fraction_balanced']:.2f}"
                    f" for d_w = d_l ({html.escape(', '.join(theory['balanced']))})")
        parts.append(f"<h3>Theory check (spec &sect;3)</h3><p class={'held' if theory.get('held') else 'failed'}>"
                     f"{text}</p>")
    for m in summary.get("mitigations") or []:
        parts.append(f"<p>Mitigation <b>{html.escape(m['run'])}</b>: held-out chosen log-prob "
                     f"{m['chosen_change']:+.3f} (without: {m['chosen_change_without']:+.3f}), rejected "
                     f"{m['rejected_change']:+.3f}: the chosen {'still falls' if m['chosen_still_falls'] else 'no longer falls'}."
                     "</p>")
    for loss, by_variant in (summary.get("verdicts") or {}).items():
        for name, v in by_variant.items():
            gap = "no matched KL" if v["mean_gap"] is None else f"{v['mean_gap']:+.4f} &plusmn; {v['gap_se']:.4f}"
            parts.append(f"<p class={'held' if v['verdict'] == 'higher' else 'failed'}>{html.escape(loss)}, "
                         f"<b>{html.escape(name)}</b> reference vs static at matched KL: gold gap {gap} over "
                         f"{v['matched_points']} points ({v['beyond_static_kl']} beyond the static run's KL): "
                         f"<b>{html.escape(v['verdict'])}</b></p>")
    results = summary.get("results") or {}
    moved = {n: r["heldout_token_changes"] for n, r in results.items() if r.get("heldout_token_changes")}
    if moved:
        keys = ("chosen_differing", "chosen_shared", "rejected_differing", "rejected_shared")
        head = "".join(f"<th>{k.replace('_', ' at ')} tokens</th>" for k in keys)
        rows = "".join(f"<tr><td>{html.escape(n)}</td>{''.join(f'<td>{t[k]:+.3f}</td>' for k in keys)}</tr>"
                       for n, t in moved.items())
        parts.append("<h3>Where the held-out log-probs moved</h3><p class=note>Change of each response's log-prob, "
                     "split into the tokens where chosen and rejected differ and the tokens they share "
                     f"(means over held-out pairs).</p><table><tr><th>run</th>{head}</tr>{rows}</table>")
        results = {n: {k: v for k, v in r.items() if k != "heldout_token_changes"} for n, r in results.items()}
    if results:
        present = {k for r in results.values() for k in r}
        cols = [k for k in RESULT_ORDER if k in present] + sorted(present - set(RESULT_ORDER))
        head = "".join(f"<th>{html.escape(c)}</th>" for c in ["run", *cols])
        rows = "".join(f"<tr><td>{html.escape(n)}</td>{''.join(f'<td>{_cell(r.get(c))}</td>' for c in cols)}</tr>"
                       for n, r in results.items())
        parts.append(f"<h3>Results</h3><div class=scroll><table><tr>{head}</tr>{rows}</table></div>")
    parts.append(f"<p class=note>Study folder: {html.escape(os.path.abspath(study_dir))}</p></section>")
    return "".join(parts)


def _cell(v) -> str:
    if isinstance(v, list) and len(v) == 2 and all(isinstance(x, (int, float)) for x in v):
        return f"{v[0]:.4g} &rarr; {v[1]:.4g}"
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


RESULT_ORDER = ["heldout_logps_chosen", "heldout_logps_rejected", "eval_logps_chosen", "eval_logps_rejected",
                "cos_last_half", "inner_last_half", "case_fractions", "step_case_fractions", "real_case_fractions", "real_dlogp_chosen", "real_dlogp_rejected",
                "step_dlogp_chosen", "step_dlogp_rejected", "pred_dlogp_chosen", "pred_dlogp_rejected", "heldout_margin_final", "heldout_accuracy_final"]
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
    "cases": "Solid: the cases of the plain-gradient-step prediction; dashed: of the first-order change along "
             "the optimiser's update; dotted: of the realised change.",
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
th {{ background: #f5f5f7; }} td:first-child {{ text-align: left; font-weight: 600; }}
.scroll {{ overflow-x: auto; }}
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
