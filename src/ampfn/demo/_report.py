"""Layer 7, the demo: the table and the figure."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any


def table(rows: Sequence[dict[str, str]]) -> str:
    cols = list(rows[0])
    widths = [max(len(c), *(len(r[c]) for r in rows)) for c in cols]

    def line(cells: Sequence[str]) -> str:
        padded = (
            c.rjust(w) if i else c.ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )
        return "  ".join(padded)

    return "\n".join(
        [
            line(cols),
            line(["-" * w for w in widths]),
            *(line([r[c] for c in cols]) for r in rows),
        ]
    )


def _against_fp32(rows: list[dict[str, str]]) -> None:
    """Fill "vs fp32": the test accuracy's distance from the fp32 run, in points."""
    fp32 = next((r for r in rows if r["pipeline"] == "fp32"), None)
    for r in rows:
        if fp32 is None or r is fp32:
            r["vs fp32"] = "-"
        else:
            r["vs fp32"] = (
                f"{100 * (float(r['test acc']) - float(fp32['test acc'])):+.1f} pt"
            )


# --------------------------------------------------------------------------- the figure

FIGURE_INCHES, FIGURE_DPI = (13.0, 4.0), 100  # a 1300 x 400 pixel PNG


def plot(history: dict[str, Any], path: str, title: str) -> None:
    """Training loss, loss-scale history (log axis) with skipped steps marked, test
    accuracy per pipeline: one PNG."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise SystemExit(
            f"ampfn.demo --plot needs matplotlib ({e}): pip install -e '.[demo]'"
        ) from e
    fig, (ax_loss, ax_scale, ax_acc) = plt.subplots(
        1,
        3,
        figsize=FIGURE_INCHES,
        dpi=FIGURE_DPI,
        gridspec_kw={"width_ratios": [2.2, 1.6, 1.2]},
    )
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (name, h) in enumerate(history.items()):
        color = colors[i % len(colors)]
        loss = h["loss"]
        window = max(1, len(loss) // 40)
        smooth = [
            sum(loss[max(0, j - window + 1) : j + 1])
            / len(loss[max(0, j - window + 1) : j + 1])
            for j in range(len(loss))
        ]
        ax_loss.plot(smooth, label=name, color=color, lw=1.4)
        if h["skipped"]:
            ax_loss.plot(
                h["skipped"], [smooth[s] for s in h["skipped"]], "x", color=color, ms=6
            )
        if any(s is not None for s in h["loss_scale"]):
            ax_scale.plot(
                h["loss_scale"], label=name, color=color, lw=1.4, drawstyle="steps-post"
            )
            if h["skipped"]:
                ax_scale.plot(
                    h["skipped"],
                    [h["loss_scale"][s] for s in h["skipped"]],
                    "x",
                    color=color,
                    ms=7,
                )
        ax_acc.bar(i, 100 * h["test_acc"], color=color)
    ax_loss.set(
        title="training loss (moving average; x: skipped step)",
        xlabel="step",
        ylabel="cross-entropy",
        yscale="log",
    )
    ax_loss.legend(fontsize=8)
    ax_scale.set(title="loss scale (x: skipped step)", xlabel="step", yscale="log")
    if not ax_scale.lines:
        ax_scale.text(
            0.5,
            0.5,
            "no pipeline here scales the loss",
            ha="center",
            transform=ax_scale.transAxes,
        )
    else:
        ax_scale.legend(fontsize=8)
    names = list(history)
    accs = [100 * history[n]["test_acc"] for n in names]
    ax_acc.set_xticks(range(len(names)), names, rotation=35, ha="right", fontsize=8)
    low = math.floor(min(accs)) - 2
    ax_acc.set(title="test accuracy (%)", ylim=(max(0, low), 100))
    for i, a in enumerate(accs):
        ax_acc.text(i, a + 0.2, f"{a:.1f}", ha="center", fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=FIGURE_DPI)
    plt.close(fig)
