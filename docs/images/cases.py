"""Draws docs/images/cases.png, the concepts page's figure: the four cases of one DPO step on one pair, as the
first-order changes of the chosen and rejected log-probs. Run: python docs/images/cases.py"""

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

fig, ax = plt.subplots(figsize=(6.4, 4.6), dpi=110)
regions = [((0, -1), "#d8f0d8", "case 1\nchosen up, rejected down\n(what the loss asks for)"),
           ((-1, -1), "#f7d9d4", "case 2\nboth down\n" + r"($d_w\|g_w\|^2 < d_l\langle g_w,g_l\rangle$)"),
           ((0, 0), "#dde6f5", "case 3\nboth up\n" + r"($d_l\|g_l\|^2 < d_w\langle g_w,g_l\rangle$)"),
           ((-1, 0), "#eeeeee", "case 0\nchosen down, rejected up\n(never for one pair alone)")]
for (x, y), colour, text in regions:
    ax.add_patch(plt.Rectangle((x, y), 1, 1, color=colour, zorder=0))
    ax.text(x + 0.5, y + 0.5, text, ha="center", va="center", fontsize=8.5)
ax.axhline(0, color="black", lw=0.8)
ax.axvline(0, color="black", lw=0.8)
ax.plot([-1, 1], [-1, 1], ls="--", color="grey", lw=0.8)
ax.text(0.62, 0.82, "margin unchanged", color="grey", fontsize=8, rotation=36)
ax.set(xlim=(-1, 1), ylim=(-1, 1), xticks=[], yticks=[],
       xlabel=r"$\Delta\log\pi_w \approx \eta(d_w\|g_w\|^2 - d_l\langle g_w,g_l\rangle)$",
       ylabel=r"$\Delta\log\pi_l \approx \eta(d_w\langle g_w,g_l\rangle - d_l\|g_l\|^2)$")
ax.set_title("One step on one pair: where the two log-probs go", fontsize=10)
fig.tight_layout()
fig.savefig(os.path.join(os.path.dirname(os.path.abspath(__file__)), "cases.png"))
