"""Gold reward against d = sqrt(KL) as a frontier: fitted forms, a bootstrap over seeds then prompts, verdicts.

    static, soft = Curves(gold=g1, kl=k1), Curves(gold=g2, kl=k2)          # each [seeds, runs, checkpoints, prompts]
    control = positive_control(static)                                     # peaks above SFT and falls after?
    result = compare(static, soft)                                         # TR minus static past the static peak

Everything here is fixed before a study runs (the statistic is pre-set): the fitted form, the d grid, the
interval and the verdict rule. The forms are those of Gao et al. 2022 (arXiv:2210.10760) for best-of-n and
Rafailov et al. 2024 (arXiv:2406.02900) for direct alignment: g(d) = g0 + d (a - b d) ("quadratic") and
g(d) = g0 + d (a - b log d) ("log"). Both are linear in their coefficients, so a least-squares fit is exact
and cheap enough to refit in every bootstrap draw. The primary statistic uses the quadratic form.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

FORMS = ("quadratic", "log")
LEVEL = 0.95           # two-sided interval of every verdict
GRID_POINTS = 5        # d values between the static peak and the largest d both frontiers reach
DENSE = 64             # points on which a fitted curve's maximum is located


@dataclass
class Curves:
    """Per-prompt evaluations of a group of runs: `gold` and `kl` (log pi - log pi_SFT of the samples, summed
    over tokens, averaged over a prompt's samples), each [seeds, runs, checkpoints, prompts]."""

    gold: np.ndarray
    kl: np.ndarray

    def points(self, seeds: np.ndarray | None = None, prompts: np.ndarray | None = None):
        """(d, gold) of every run and checkpoint, flattened: means over prompts (resampled by `prompts`
        [len(seeds), P] when given) of the seeds `seeds` (all when None). d = sqrt(max(KL, 0))."""
        gold, kl = (self.gold, self.kl) if seeds is None else (self.gold[seeds], self.kl[seeds])
        if prompts is not None:
            idx = prompts[:, None, None, :]                                        # [S, 1, 1, P]
            gold = np.take_along_axis(gold, np.broadcast_to(idx, gold.shape), -1)
            kl = np.take_along_axis(kl, np.broadcast_to(idx, kl.shape), -1)
        g, k = gold.mean(-1).ravel(), kl.mean(-1).ravel()                           # [S * R * C]
        return np.sqrt(np.clip(k, 0, None)), g

    @property
    def n_prompts(self) -> int:
        return self.gold.shape[-1]


def _design(d: np.ndarray, form: str) -> np.ndarray:
    if form == "quadratic":
        return np.stack([np.ones_like(d), d, -d * d], 1)
    safe = np.where(d > 0, d, 1.0)
    return np.stack([np.ones_like(d), d, -d * np.log(safe)], 1)   # d log d -> 0 as d -> 0


def fit(d: np.ndarray, g: np.ndarray, form: str = "quadratic") -> np.ndarray:
    """Least-squares (g0, a, b) of g = g0 + d (a - b d) (quadratic) or g0 + d (a - b log d) (log)."""
    return np.linalg.lstsq(_design(np.asarray(d, float), form), np.asarray(g, float), rcond=None)[0]


def predict(coef: np.ndarray, d, form: str = "quadratic") -> np.ndarray:
    return _design(np.atleast_1d(np.asarray(d, float)), form) @ coef


def describe_fit(d: np.ndarray, g: np.ndarray) -> dict:
    """Both forms' coefficients and residual RMS (for the summary; the verdicts use the quadratic form)."""
    out = {}
    for form in FORMS:
        coef = fit(d, g, form)
        rms = float(np.sqrt(np.mean((predict(coef, d, form) - g) ** 2)))
        out[form] = {"g0": float(coef[0]), "a": float(coef[1]), "b": float(coef[2]), "rms": rms}
    return out


def peak(coef: np.ndarray, d_max: float) -> tuple[float, float]:
    """(d, g) where the fitted quadratic is highest on [0, d_max]."""
    grid = np.linspace(0.0, d_max, DENSE)
    values = predict(coef, grid)
    i = int(np.argmax(values))
    return float(grid[i]), float(values[i])


def draws(n_seeds: int, n_prompts: int, reps: int, seed: int = 0):
    """Bootstrap indices: seeds with replacement, then prompts with replacement within each drawn seed (the same
    prompt draw for every run of a seed, so paired runs stay paired). Yields (seeds [S], prompts [S, P])."""
    rng = np.random.default_rng(seed)
    for _ in range(reps):
        yield rng.integers(0, n_seeds, n_seeds), rng.integers(0, n_prompts, (n_seeds, n_prompts))


def interval(values, level: float = LEVEL) -> tuple[float, float]:
    lo, hi = np.quantile(np.asarray(values, float), [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def sign_verdict(lo: float, hi: float, above: str = "higher", below: str = "lower") -> str:
    """`above` when the interval lies above zero, `below` when below, else indistinguishable."""
    return above if lo > 0 else below if hi < 0 else "indistinguishable"


def positive_control(static: Curves, reps: int = 1000, seed: int = 0) -> dict:
    """Does the static frontier peak above the SFT policy and fall after the peak? `rise`: the fitted peak
    minus the fitted gold at d = 0; `fall`: the peak minus the fitted gold at the largest d measured. Passed
    when both intervals (bootstrap over seeds then prompts) lie above zero."""
    d, g = static.points()
    d_max = float(d.max())
    coef = fit(d, g)
    d_peak, g_peak = peak(coef, d_max)
    est = {"rise": g_peak - float(predict(coef, 0.0)[0]), "fall": g_peak - float(predict(coef, d_max)[0])}
    boot = {"rise": [], "fall": []}
    for s, p in draws(static.gold.shape[0], static.n_prompts, reps, seed):
        bd, bg = static.points(s, p)
        c = fit(bd, bg)
        _, top = peak(c, d_max)
        boot["rise"].append(top - float(predict(c, 0.0)[0]))
        boot["fall"].append(top - float(predict(c, d_max)[0]))
    out = {"peak_d": d_peak, "peak_gold": g_peak, "d_max": d_max}
    for k in ("rise", "fall"):
        out[k] = {"estimate": est[k], "interval": interval(boot[k])}
    out["passed"] = out["rise"]["interval"][0] > 0 and out["fall"]["interval"][0] > 0
    return out


def comparison_grid(static: Curves, moving: Curves) -> tuple[np.ndarray, str]:
    """The d values at which a trust-region frontier is compared with the static one, fixed from the point
    estimates: from the static peak to the largest d both reach. When the static fit peaks at its largest d
    (no fall), the upper half of the common range instead; empty when the moving runs stop before the peak."""
    d_s, g_s = static.points()
    d_m, _ = moving.points()
    top = float(min(d_s.max(), d_m.max()))
    d_peak, _ = peak(fit(d_s, g_s), float(d_s.max()))
    if d_peak >= float(d_s.max()) - 1e-9:
        return np.linspace(top / 2, top, GRID_POINTS), "upper half of the common KL range (no static peak)"
    if top <= d_peak:
        return np.empty(0), "the trust-region runs stop before the static peak"
    return np.linspace(d_peak, top, GRID_POINTS), "past the static peak"


def compare(static: Curves, moving: Curves, reps: int = 1000, seed: int = 0) -> dict:
    """Mean over the comparison grid of (moving frontier - static frontier), both refitted in every bootstrap
    draw of seeds then prompts (the same draw for both: paired). `verdict`: higher / lower when the interval
    excludes zero, else indistinguishable; no verdict when the grid is empty."""
    grid, where = comparison_grid(static, moving)
    if grid.size == 0:
        return {"grid": [], "where": where, "gap": None, "interval": None, "verdict": "no matched KL past the peak"}

    def gap(s=None, p=None) -> float:
        (ds, gs), (dm, gm) = static.points(s, p), moving.points(s, p)
        return float(np.mean(predict(fit(dm, gm), grid) - predict(fit(ds, gs), grid)))

    boot = [gap(s, p) for s, p in draws(static.gold.shape[0], static.n_prompts, reps, seed)]
    lo, hi = interval(boot)
    return {"grid": grid.tolist(), "where": where, "gap": gap(), "interval": [lo, hi],
            "verdict": sign_verdict(lo, hi)}
