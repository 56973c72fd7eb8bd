"""The report's figures, one PNG each: metric curves of several runs overlaid, the case plane, token heatmaps.

    plot_metrics({"dpo": rows, "ipo": rows2}, [("log-probs", ["logps/chosen", "logps/rejected"])], "a.png")
    plot_case_plane({"dpo": pair_rows}, "cases.png")
    plot_token_views(views, "tokens.png", title="long suffix, held-out pairs")
"""

from __future__ import annotations

import gc
import math


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, path: str) -> None:
    """Write the PNG and free the figure now: a figure's objects refer to each other, and a report of a long run
    left them to the cycle collector one figure after another (`benchmarks/report_memory.py`)."""
    fig.savefig(path, dpi=110)
    plt.close(fig)
    gc.collect()


def _finish(plt, fig, path: str, title: str | None) -> str:
    """Title, layout, write the PNG, free the figure; return its path."""
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    _save(plt, fig, path)
    return path


def series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], r[key]) for r in rows if key in r and r[key] is not None]
    return [s for s, _ in pts], [v for _, v in pts]


def key_label(key: str) -> str:
    """`eval/rewards/margins` -> `held-out margins`; `entanglement/pred_dlogp_w` -> `pred_dlogp_w`."""
    return ("held-out " if key.startswith("eval/") else "") + key.split("/")[-1]


def has_any(runs: dict[str, list[dict]], keys: list[str]) -> bool:
    return any(key in r for rows in runs.values() for r in rows for key in keys)


def run_colours(plt, n: int) -> list:
    """One colour per run: the default cycle up to 10 runs, tab20 beyond."""
    base = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    return base if n <= len(base) else list(plt.cm.tab20.colors)


def plot_metrics(runs: dict[str, list[dict]], panels: list[tuple[str, list[str]]], path: str,
                 title: str | None = None) -> str:
    """One panel per (title, keys); each run one colour, each key one line style. Saves a PNG.
    With more than 4 runs the panels share one legend of run colours below them."""
    plt = _pyplot()
    from matplotlib.lines import Line2D

    cols = min(2, len(panels))
    rows_n = (len(panels) + cols - 1) // cols
    many = len(runs) > 4
    legend_rows = (len(runs) + 5) // 6 if many else 0
    fig, axes = plt.subplots(rows_n, cols, figsize=(6.4 * cols, 3.6 * rows_n + 0.3 * legend_rows), squeeze=False)
    colours = run_colours(plt, len(runs))
    styles = ["-", "--", ":", "-."]
    for ax, (panel_title, keys) in zip(axes.flat, panels):
        for i, (name, rows) in enumerate(runs.items()):
            for j, key in enumerate(keys):
                x, y = series(rows, key)
                if x:
                    label = name if len(keys) == 1 else f"{name}: {key_label(key)}"
                    marker = "o" if len(x) <= 12 else None
                    ax.plot(x, y, styles[j % len(styles)], color=colours[i % len(colours)], label=label, lw=1.6,
                            marker=marker, ms=3)
        ax.set_title(panel_title, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.lines and not many:
            ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    if many:   # one legend of the runs actually drawn in this figure
        drawn = [i for i, rows in enumerate(runs.values()) if any(series(rows, k)[0] for _, keys in panels for k in keys)]
        handles = [Line2D([0], [0], color=colours[i % len(colours)], lw=2.5) for i in drawn]
        fig.legend(handles, [list(runs)[i] for i in drawn], loc="lower center", ncol=min(6, len(drawn)), fontsize=9,
                   frameon=False)
        fig.tight_layout(rect=(0, 0.12 * legend_rows / rows_n, 1, 1))
    else:
        fig.tight_layout()
    _save(plt, fig, path)
    return path


CASE_COLOURS = {"case1": "#4caf50", "case2": "#e57373", "case3": "#64b5f6", "case0": "#bdbdbd"}


def plot_case_runs(runs: dict[str, list[dict]], path: str, prefix: str = "entanglement/") -> str:
    """Small multiples: one panel per run, the shares of pairs in each case stacked over the steps (the
    plain-gradient-step prediction; case 0 is what is left)."""
    plt = _pyplot()
    drawn = {name: rows for name, rows in runs.items() if series(rows, f"{prefix}case1")[0]}
    cols = min(3, len(drawn))
    rows_n = math.ceil(len(drawn) / cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(4.6 * cols, 2.9 * rows_n), squeeze=False, sharey=True)
    for ax, (name, rows) in zip(axes.flat, drawn.items()):
        steps, shares = series(rows, f"{prefix}case1")[0], {}
        for case in ("case1", "case2", "case3"):
            lookup = dict(zip(*series(rows, f"{prefix}{case}")))
            shares[case] = [lookup.get(s, 0.0) for s in steps]
        shares["case0"] = [max(0.0, 1 - sum(v[i] for v in shares.values())) for i in range(len(steps))]
        ax.stackplot(steps, *shares.values(), colors=[CASE_COLOURS[c] for c in shares],
                     labels=["case 1: chosen up, rejected down", "case 2: both down", "case 3: both up",
                             "chosen down, rejected up"], step="post" if len(steps) < 3 else None)
        ax.set_title(name, fontsize=10)
        ax.set_ylim(0, 1)
        ax.set_xlabel("step")
    axes.flat[0].set_ylabel("share of pairs")
    for ax in list(axes.flat)[len(drawn):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.1 / rows_n, 1, 1))
    _save(plt, fig, path)
    return path


CHANGE_KINDS = {"real": "realised", "step": "first-order (optimiser's update)", "pred": "first-order (gradient step)"}


def plot_case_plane(pairs: dict[str, list[dict]], path: str, which: str = "pred", title: str | None = None,
                    totals: dict[str, int] | None = None) -> str:
    """Per-pair (d log pi_w, d log pi_l) of one step each, one colour per run; the quadrants are the cases.
    `which`: `real` (realised), `step` (first order along the optimiser's update), `pred` (SGD step). `totals`: how
    many pair-steps each run has when `pairs` holds a sample of them (the legend counts those)."""
    plt = _pyplot()
    kw, kl = f"{which}_dlogp_w", f"{which}_dlogp_l"
    fig, ax = plt.subplots(figsize=(6.4, 5.2))
    colours = run_colours(plt, len(pairs))
    lim = 1e-12
    for i, (name, rows) in enumerate(pairs.items()):
        x = [r[kw] for r in rows if kw in r]
        y = [r[kl] for r in rows if kl in r]
        if x:
            lim = max(lim, max(map(abs, x)), max(map(abs, y)))
            total = (totals or {}).get(name, len(x))
            shown = f"{total:,} pair-steps" + (f", {len(x):,} drawn" if total != len(x) else "")
            ax.scatter(x, y, s=9, alpha=0.45, color=colours[i % len(colours)], label=f"{name} ({shown})")
    lim *= 1.08
    ax.set_xlim(-lim, lim)
    ax.set_ylim(-lim, lim)
    ax.axhline(0, color="k", lw=0.8)
    ax.axvline(0, color="k", lw=0.8)
    for (tx, ty), text in {(0.97, 0.03): "case 1\nchosen up, rejected down", (0.03, 0.03): "case 2\nboth down",
                           (0.97, 0.97): "case 3\nboth up", (0.03, 0.97): "chosen down,\nrejected up"}.items():
        ax.text(tx, ty, text, transform=ax.transAxes, ha="right" if tx > 0.5 else "left",
                va="bottom" if ty < 0.5 else "top", fontsize=8, color="0.35")
    what = CHANGE_KINDS[which]
    ax.set_xlabel(f"{what} change of log pi(chosen)")
    ax.set_ylabel(f"{what} change of log pi(rejected)")
    ax.set_title(title or f"Per-pair log-prob changes, second half of training\n({what})", fontsize=10)
    ax.grid(alpha=0.3)
    if ax.collections:
        ax.legend(fontsize=8, loc="upper center")
    fig.tight_layout()
    _save(plt, fig, path)
    return path


def plot_distributions(rows: list[dict], panels: list[tuple[str, str]], path: str, title: str | None = None) -> str:
    """One histogram per (key, panel title) over `rows`, split by predicted case (stacked)."""
    plt = _pyplot()
    cols = min(3, len(panels))
    n_rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(n_rows, cols, figsize=(4.6 * cols, 3.4 * n_rows), squeeze=False)
    names = {1: "case 1: chosen up", 2: "case 2: both down", 3: "case 3: both up", 0: "chosen down, rejected up"}
    cases = [c for c in (1, 2, 3, 0) if any(r["case"] == c for r in rows)]
    for ax, (key, panel_title) in zip(axes.flat, panels):
        ax.hist([[r[key] for r in rows if r["case"] == c] for c in cases], bins=30, stacked=True,
                label=[names[c] for c in cases])
        ax.set_title(panel_title, fontsize=9)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    _save(plt, fig, path)
    return path


def plot_token_views(views: list[dict], path: str, title: str) -> str:
    """Heatmaps of per-token gradient cosines: rows the chosen tokens, columns the rejected tokens."""
    plt = _pyplot()
    n = len(views)
    cols = min(3, n)
    rows_n = math.ceil(n / cols)
    width = max(len(v["rejected_tokens"]) for v in views)
    height = max(len(v["chosen_tokens"]) for v in views)
    cell = 0.42
    fig, axes = plt.subplots(rows_n, cols, squeeze=False, layout="constrained",
                             figsize=(max(4.2, cols * (2.4 + cell * width)), rows_n * (1.8 + cell * height)))
    image = None
    for ax, v in zip(axes.flat, views):
        cos = v["cos"]
        image = ax.imshow(cos, cmap="RdBu_r", vmin=-1, vmax=1, aspect="equal")
        ax.set_xticks(range(len(v["rejected_tokens"])), [_label(t) for t in v["rejected_tokens"]], rotation=60,
                      ha="right", fontsize=8)
        ax.set_yticks(range(len(v["chosen_tokens"])), [_label(t) for t in v["chosen_tokens"]], fontsize=8)
        ax.set_xlabel("rejected token", fontsize=8)
        ax.set_ylabel("chosen token", fontsize=8)
        ax.set_title(f"pair {v.get('pair', '?')}: pair cos {_pair_cos(v):+.2f}", fontsize=9)
        for i, j in strongest_cells(cos, STRONGEST):   # numbers only where they matter; the colour says the rest
            ax.text(j, i, f"{cos[i][j]:.1f}", ha="center", va="center", fontsize=7,
                    color="white" if abs(cos[i][j]) > 0.6 else "black")
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    if image is not None:
        fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.8, label="cos(grad log p(chosen token), "
                     "grad log p(rejected token))")
    fig.suptitle(title, fontsize=10)
    _save(plt, fig, path)
    return path


STRONGEST = 5   # cells of a token heat map that carry their value as text


def strongest_cells(matrix, k: int) -> list[tuple[int, int]]:
    """The `k` cells of largest |value|, as (row, column)."""
    cells = [(abs(v), i, j) for i, row in enumerate(matrix) for j, v in enumerate(row)]
    return [(i, j) for _, i, j in sorted(cells, reverse=True)[:k]]


def _pair_bars(views: list[dict], path: str, title: str, width: float, row_height: float, draw) -> str:
    """One bar panel per response, the chosen above the rejected, for each pair; `draw(ax, view, side)`
    fills a panel."""
    plt = _pyplot()
    fig, axes = plt.subplots(2 * len(views), 1, squeeze=False, layout="constrained",
                             figsize=(width, row_height * 2 * len(views)))
    for k, v in enumerate(views):
        for j, side in enumerate(("chosen", "rejected")):
            draw(axes[2 * k + j, 0], v, side)
    fig.suptitle(title, fontsize=10)
    _save(plt, fig, path)
    return path


def _token_bars(ax, vals: list[float], toks: list, colors: list) -> None:
    ax.bar(range(len(vals)), vals, color=colors)
    ax.set_xticks(range(len(vals)), [_label(t) for t in toks], rotation=70, ha="right", fontsize=7)
    ax.grid(alpha=0.3, axis="y")


def plot_position_views(views: list[dict], path: str, title: str, last: int = 40, pairs: int = 3) -> str:
    """Per pair, bars of each position's share of <grad_w, grad_l>: chosen row above, rejected row below
    (the last `last` positions of each row, where the responses are)."""
    def draw(ax, v, side):
        vals, toks = v[side][-last:], v[f"{side}_tokens"][-last:]
        _token_bars(ax, vals, toks, ["#c62828" if x > 0 else "#1565c0" for x in vals])
        ax.axhline(0, color="k", lw=0.6)
        inner = v.get("inner")
        ax.set_title(f"pair {v['pair']}, {side} row: share of <grad_w, grad_l> per position"
                     + (f" (pair total {inner:.3g}; norms etc. {v['other']:.3g})" if inner is not None else ""),
                     fontsize=8)

    return _pair_bars(views[:pairs], path, title, max(6.4, 0.28 * last), 2.4, draw)


def plot_token_masks(views: list[dict], path: str, title: str, pairs: int = 3) -> str:
    """Per pair, the learned token weights m_t of the chosen (above) and rejected (below) response."""
    views = views[:pairs]
    width = max(len(v[f"{side}_tokens"]) for v in views for side in ("chosen", "rejected"))
    cmap = _pyplot().get_cmap("viridis")

    def draw(ax, v, side):
        vals = v[f"{side}_mask"]
        _token_bars(ax, vals, v[f"{side}_tokens"], [cmap(x) for x in vals])
        ax.set_ylim(0, 1.05)
        ax.set_xlim(-0.6, width - 0.4)
        ax.set_ylabel("m_t", fontsize=8)
        ax.set_title(f"pair {v['pair']}, {side}: learned token weights (mean {sum(vals) / max(len(vals), 1):.2f})",
                     fontsize=8)

    return _pair_bars(views, path, title, max(6.4, 0.3 * width + 1.5), 2.2, draw)


def _label(token) -> str:
    text = str(token).replace("\n", "\\n")
    return text if text.strip() else repr(text)


def _pair_cos(view: dict) -> float:
    return view.get("pair_cos", float("nan"))


def plot_gold_vs_kl(runs: dict[str, list[dict]], path: str, title: str | None = None) -> str:
    """Gold reward against sqrt(KL(pi || pi_init)) estimated from samples, one path per run (its evaluations
    in step order, the first marked with a square): the frontier figure of the over-optimisation studies.
    Error bars: one standard error of each figure."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12.8, 4.2))
    colours = run_colours(plt, len(runs))
    for ax, (key, label) in zip(axes, (("eval/gold/mean", "gold reward"), ("eval/win_rate", "win rate vs initial"))):
        for i, (name, rows) in enumerate(runs.items()):
            pts = [r for r in rows if r.get(key) is not None and r.get("eval/kl/initial") is not None]
            if not pts:
                continue
            x = [max(r["eval/kl/initial"], 0.0) ** 0.5 for r in pts]
            y = [r[key] for r in pts]
            ax.errorbar(x, y, yerr=[r.get(f"{key}_se", 0.0) for r in pts], color=colours[i % len(colours)],
                        marker="o", ms=4, lw=1.6, capsize=2, label=name)
            ax.plot(x[:1], y[:1], "s", color=colours[i % len(colours)], ms=7)
        ax.set_xlabel("sqrt(KL(policy || initial)) from samples (nats^0.5)")
        ax.set_ylabel(label)
        ax.set_title(f"{label} against distance from the initial policy", fontsize=10)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    return _finish(plt, fig, path, title)


def plot_frontier(arms: dict[str, dict], path: str, title: str | None = None) -> str:
    """One panel per arm: gold against sqrt KL, the static sweep's points and fitted frontier, each trust-region
    kind's points and fit, and the d range where the pre-set statistic compares them."""
    import numpy as np

    plt = _pyplot()
    fig, axes = plt.subplots(1, len(arms), figsize=(6.4 * len(arms), 4.6), squeeze=False)
    styles = {"static": ("tab:blue", "o"), "soft": ("tab:orange", "^"), "hard": ("tab:green", "s")}
    for ax, (arm, a) in zip(axes[0], arms.items()):
        d_all = [p["sqrt_kl"] for pts in a["points"].values() for p in pts]
        grid = np.linspace(0, max(d_all) if d_all else 1.0, 100)
        for kind, (colour, marker) in styles.items():
            pts = [p for name, ps in a["points"].items() if name.startswith(kind + "-") for p in ps]
            if not pts:
                continue
            ax.scatter([p["sqrt_kl"] for p in pts], [p["gold"] for p in pts], s=14, color=colour, marker=marker,
                       alpha=0.55, label=f"{kind} runs")
            fit = a["static_fit"] if kind == "static" else a["trust_region"][kind]["fit"]
            q = fit["quadratic"]
            ax.plot(grid, q["g0"] + grid * (q["a"] - q["b"] * grid), color=colour, lw=2,
                    label=f"{kind} frontier (fit)")
        for kind, t in a["trust_region"].items():
            if t.get("grid"):
                ax.axvspan(t["grid"][0], t["grid"][-1], color=styles[kind][0], alpha=0.06)
        ax.axhline(a["static_fit"]["quadratic"]["g0"], color="grey", lw=0.8, ls=":")
        ax.set_xlabel("sqrt KL(policy || SFT), nats^0.5, from samples")
        ax.set_ylabel("gold reward (held-out samples)")
        ax.set_title(f"{arm} labels")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    return _finish(plt, fig, path, title)
