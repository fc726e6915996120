"""Draw the CRCKD overview figure used by the method page.

Usage: ``python docs/_scripts/draw_overview.py [OUTPUT]`` (default: ``docs/_static/overview.png``).
Needs matplotlib.
"""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402

STUDENT = "#dbe8f6"
TEACHER = "#fbe3cf"
BANK = "#e4f1de"
LOSS = "#f3dce8"
NEUTRAL = "#eeeeee"
EDGE = "#333333"


class Box:
    def __init__(self, ax, x, y, w, h, text, color, size=10):
        self.x, self.y, self.w, self.h = x, y, w, h
        ax.add_patch(
            FancyBboxPatch(
                (x - w / 2, y - h / 2), w, h,
                boxstyle="round,pad=0.02,rounding_size=0.12",
                facecolor=color, edgecolor=EDGE, linewidth=1.2,
            )
        )
        ax.text(x, y, text, ha="center", va="center", fontsize=size, linespacing=1.35)

    def side(self, where, shift=0.0):
        """A point on the box edge: 'l', 'r', 't', 'b', shifted along the edge."""
        return {
            "l": (self.x - self.w / 2, self.y + shift),
            "r": (self.x + self.w / 2, self.y + shift),
            "t": (self.x + shift, self.y + self.h / 2),
            "b": (self.x + shift, self.y - self.h / 2),
        }[where]


def arrow(ax, a, b, text=None, grad=True, rad=0.0, offset=(0.0, 0.0), size=8.5, color=EDGE):
    ax.add_patch(
        FancyArrowPatch(
            a, b, arrowstyle="-|>", mutation_scale=13, linewidth=1.3, color=color,
            linestyle="-" if grad else (0, (4, 3)), connectionstyle=f"arc3,rad={rad}",
            shrinkA=2, shrinkB=2,
        )
    )
    if text:
        mx, my = (a[0] + b[0]) / 2 + offset[0], (a[1] + b[1]) / 2 + offset[1]
        ax.text(mx, my, text, ha="center", va="center", fontsize=size,
                bbox=dict(facecolor="white", edgecolor="none", pad=0.6, alpha=0.9))


def elbow(ax, points, text, grad):
    """A polyline through ``points`` with an arrowhead on its last segment."""
    xs, ys = zip(*points[:-1])
    ax.plot(xs, ys, color=EDGE, linewidth=1.3, linestyle="-" if grad else (0, (4, 3)))
    arrow(ax, points[-2], points[-1], grad=grad)
    (x0, y), (x1, _) = points[1], points[2]
    ax.text((x0 + x1) / 2, y, text, ha="center", va="center", fontsize=8.5,
            bbox=dict(facecolor="white", edgecolor="none", pad=0.6))


def draw(path: Path) -> None:
    fig, ax = plt.subplots(figsize=(14, 8.2))
    ax.set_xlim(0, 14)
    ax.set_ylim(-1.0, 8.2)
    ax.axis("off")

    img = Box(ax, 0.85, 3.6, 1.3, 1.1, "image $x$\nindex $i$\nlabel $y$", NEUTRAL)
    s = Box(ax, 3.1, 5.4, 2.1, 1.1, "Student $S$\nbackbone $\\to f_S$, logits", STUDENT)
    t = Box(ax, 3.1, 1.8, 2.1, 1.1, "Teacher $T$ = EMA($S$)\nbackbone $\\to f_T$, logits", TEACHER)
    wce = Box(ax, 3.1, 6.85, 2.1, 0.5, "$L_{WCE}$(logits$_S$, $y$)", LOSS, 9)
    kl = Box(
        ax, 3.75, 3.6, 1.3, 0.75, "$\\lambda_{KL}(e)\\,L_{KL}$\n$KL(p_T\\,\\|\\,p_S)$", LOSS, 9
    )
    hs = Box(ax, 5.75, 5.4, 1.7, 1.0, "head$_S$\n$g_S=$ norm$(W f_S)$", STUDENT)
    ht = Box(ax, 5.75, 1.8, 1.7, 1.0, "head$_T$\n$g_T=$ norm$(W f_T)$", TEACHER)
    ms = Box(ax, 8.25, 5.4, 1.9, 1.1, "bank $M_S$\n$N\\times d$ + labels", BANK)
    mt = Box(ax, 8.25, 1.8, 1.9, 1.1, "bank $M_T$\n$N\\times d$ + labels", BANK)
    smp = Box(
        ax, 8.25, 3.6, 2.3, 1.2,
        "class-guided sampling\nidx $[B, P{+}K]$: own row,\n$P{-}1$ same class, $K$ other",
        NEUTRAL, 9,
    )
    ccd = Box(
        ax, 10.9, 3.6, 2.0, 1.35,
        "CCD (NCE)\n$L_S$: $g_S$ vs $M_T$[idx]\n$L_T$: $g_T$ vs $M_S$[idx]", LOSS, 9.5,
    )
    cs = Box(ax, 10.9, 6.3, 2.0, 0.9, "centroids $C_S$\nnorm(mean ReLU($M_S$))", BANK, 9)
    ct = Box(ax, 10.9, 0.9, 2.0, 0.9, "centroids $C_T$\nnorm(mean ReLU($M_T$))", BANK, 9)
    crp = Box(
        ax, 13.05, 3.6, 1.6, 1.9,
        "CRP\n$r_S = g_S C_S^\\top/\\tau$\n$r_T = g_T C_T^\\top/\\tau$\n"
        "KL(softmax $r_T$\n$\\|$ softmax $r_S$)",
        LOSS, 9,
    )

    arrow(ax, img.side("t"), s.side("l"), "view 1", offset=(-0.25, 0.15), rad=-0.25)
    arrow(ax, img.side("b"), t.side("l"), "view 2\n+ flip, rot $k\\cdot90°$",
          offset=(-0.3, -0.35), rad=0.25, grad=False)
    arrow(ax, s.side("t"), wce.side("b"))
    arrow(ax, s.side("b", 0.45), kl.side("t", -0.2))
    arrow(ax, t.side("t", 0.45), kl.side("b", -0.2), grad=False)
    arrow(ax, s.side("b", -0.55), t.side("t", -0.55), "EMA\n$\\alpha_t$", grad=False,
          offset=(-0.05, 0.0))
    arrow(ax, s.side("r"), hs.side("l"), "$f_S$", offset=(0, 0.22))
    arrow(ax, t.side("r"), ht.side("l"), "$f_T$", offset=(0, 0.22), grad=False)
    arrow(ax, hs.side("r"), ms.side("l"), "update\n$m=0.5$", offset=(0, 0.33), grad=False)
    arrow(ax, ht.side("r"), mt.side("l"), "update\n$m=0.5$", offset=(0, -0.33), grad=False)
    arrow(ax, hs.side("b", 0.3), ccd.side("l", 0.35), "$g_S$", offset=(-1.1, 0.42))
    arrow(ax, ht.side("t", 0.3), ccd.side("l", -0.35), "$g_T$", offset=(-1.1, -0.42))
    arrow(ax, ms.side("b"), smp.side("t"), grad=False)
    arrow(ax, smp.side("r"), ccd.side("l"), grad=False)
    arrow(ax, ms.side("r"), ccd.side("t", -0.35), "$M_S$[idx]", grad=False, offset=(0.05, 0.15))
    arrow(ax, mt.side("r"), ccd.side("b", -0.35), "$M_T$[idx]", grad=False, offset=(0.05, -0.15))
    arrow(ax, ms.side("t", 0.5), cs.side("l"), grad=False, rad=-0.2)
    arrow(ax, mt.side("b", 0.5), ct.side("l"), grad=False, rad=0.2)
    arrow(ax, cs.side("r"), crp.side("t", -0.35), "$C_S$", grad=False, rad=-0.25,
          offset=(0.2, 0.2))
    arrow(ax, ct.side("r"), crp.side("b", -0.35), "$C_T$", grad=False, rad=0.25,
          offset=(0.2, -0.2))
    # g_S and g_T reach CRP around the outside, clear of the other boxes.
    elbow(ax, [hs.side("t"), (hs.x, 7.6), (13.45, 7.6), crp.side("t", 0.4)], "$g_S$", True)
    elbow(ax, [ht.side("b"), (ht.x, -0.4), (13.45, -0.4), crp.side("b", 0.4)],
          "$g_T$ (detached)", False)

    ax.text(
        0.05, -0.95,
        "$L = L_{WCE} + \\lambda_{KL}(e)\\,L_{KL} + \\lambda_{CCD}(L_S + L_T)"
        " + \\lambda_{CRP}\\,L_{CRP}$      solid: gradient flows      dashed: no gradient"
        "      banks are updated after the CCD scores, before the centroids",
        fontsize=9.5, ha="left", va="bottom",
    )
    fig.tight_layout(pad=0.2)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    default = Path(__file__).resolve().parent.parent / "_static" / "overview.png"
    draw(Path(sys.argv[1]) if len(sys.argv) > 1 else default)
