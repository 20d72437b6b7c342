"""offload_curve.png: hybrid accuracy against the share offloaded, every score, both splits.
Needs matplotlib (the ``calibrate`` extra), imported only here."""
from __future__ import annotations

from pathlib import Path

from ..scores import SCORES
from . import CalibrateError
from .compare import Calibration

PLOT_FILE = "offload_curve.png"
PLOT_EXTRA = "calibrate"   # pip install 'edge-infer[calibrate]' brings matplotlib
#: One colour per score, in the order of :data:`edge_infer.scores.SCORES`; a new score takes the next.
PALETTE = ("tab:blue", "tab:orange", "tab:green", "tab:purple", "tab:red", "tab:brown", "tab:pink", "tab:olive",
           "tab:cyan")


def plot_offload_curves(path: Path, cal: Calibration, picked: str | None) -> None:
    """The reference figure: hybrid accuracy against share offloaded, every score, both splits;
    the bottom row zooms in on the cloud's accuracy, where the threshold is chosen."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise CalibrateError(f"the plot needs matplotlib: pip install 'edge-infer[{PLOT_EXTRA}]', or pass "
                             "--no-plot") from None
    fig = Figure(figsize=(12, 9), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 2, sharex=True)
    colors = dict(zip(SCORES, PALETTE))
    result = cal.results.get(picked) if picked else None
    for col, split, title in ((0, "val", "validation (threshold chosen here)"),
                              (1, "test", "test (reported; untouched while choosing)")):
        edge, cloud = cal.edge_accuracy[split], cal.cloud_accuracy[split]
        best = max([c[split].accuracy.max() for c in cal.curves.values()] + [cloud])
        oracle_best = cal.oracle_curves[split].accuracy.max()
        for row, (lo, hi) in enumerate(((edge - 0.01, oracle_best + 0.005), (cloud - 0.015, best + 0.004))):
            ax = axes[row, col]
            for name, curves in cal.curves.items():
                c = curves[split]
                ax.plot(c.offloaded_share * 100, c.accuracy * 100, color=colors.get(name), lw=1.3,
                        label=name + (" (chosen)" if name == picked else ""))
            oc = cal.oracle_curves[split]
            ax.plot(oc.offloaded_share * 100, oc.accuracy * 100, color="gray", ls=":", lw=1,
                    label="oracle router (upper bound)")
            ax.axhline(edge * 100, color="gray", ls="--", lw=1, label=f"edge only {edge:.2%}")
            ax.axhline(cloud * 100, color="black", ls="--", lw=1, label=f"cloud only {cloud:.2%}")
            if cal.target.kind == "accuracy":
                ax.axhline(cal.target.value * 100, color="tab:red", ls=":", lw=1,
                           label=f"target {cal.target.value:.2%}")
                hi = max(hi, cal.target.value + 0.002)
            if cal.target.kind == "max_offload_share":
                ax.axvline(cal.target.value * 100, color="tab:red", ls=":", lw=1,
                           label=f"budget {cal.target.value:.0%}")
            pt = None if result is None else (result.val if split == "val" else result.test)
            if pt is not None:
                ax.plot([pt.offloaded_share * 100], [pt.accuracy * 100], marker="o", ms=9, mfc="none", mew=2,
                        color=colors.get(picked, "black"), label=f"chosen: {pt.kept_share:.1%} kept, {pt.accuracy:.2%}")
            ax.set_xlim(0, 100)
            ax.set_ylim(lo * 100, hi * 100)
            ax.grid(alpha=0.3)
            if row == 0:
                ax.set_title(f"{title}, n={cal.sizes[split]:,}")
                ax.legend(loc="lower right", fontsize=8)
            else:
                ax.set_title("zoom on the cloud's accuracy", fontsize=9)
                ax.set_xlabel("inputs offloaded to the cloud (%)")
        axes[0, 0].set_ylabel("hybrid accuracy (%)")
        axes[1, 0].set_ylabel("hybrid accuracy (%)")
    what = cal.target.describe()
    if cal.risk is not None:
        bound = (f"hybrid >= cloud - {cal.target.tolerance * 100:.2f} pp" if cal.target.kind == "cloud"
                 else f"hybrid >= {cal.target.value:.4f}")
        what = f"certified at --risk {cal.risk:g}: with {1 - cal.risk:.0%} confidence, {bound} on new inputs"
    fig.suptitle("edge-infer calibrate: hybrid accuracy vs share offloaded\n(" + what + ")",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
