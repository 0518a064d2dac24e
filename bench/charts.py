"""PNG charts for the benchmark report, with matplotlib (the ``bench`` extra).

matplotlib is imported only inside :func:`render`, so the suite and everything else in
``bench`` work without it; :func:`available` says whether charts can be drawn.

A chart is a figure of one or more :class:`Panel` s side by side: grouped bars (with
optional min-max whiskers and value labels) or lines (optional log axes), each with
optional horizontal reference lines (a goal, a limit). Every figure carries a footer
``stamp`` naming the command, the machine and the date, so a PNG seen on its own still
says where its numbers came from.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path

import attrs

COLORS = ("#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3")
# One color per variant in every chart, whichever series a panel happens to show.
LABEL_COLORS = {"limits off": COLORS[0], "memory store": COLORS[1], "Redis store": COLORS[2]}


def _color(label: str, index: int) -> str:
    return LABEL_COLORS.get(label, COLORS[index % len(COLORS)])


def available() -> bool:
    """True if matplotlib can be imported (``pip install -e '.[bench]'``)."""
    return importlib.util.find_spec("matplotlib") is not None


@attrs.frozen
class Panel:
    """One plot. ``kind`` is ``"bar"`` (``x`` are category names, one group of bars per
    category, one bar per series) or ``"line"`` (``x`` numeric). ``series`` maps a
    label to one value per ``x`` (``None``: no point). ``spread`` maps a label to
    ``(low, high)`` per ``x`` for whiskers. ``hlines`` are ``(y, label)`` reference
    lines."""

    kind: str
    title: str
    x: Sequence[object]
    series: dict[str, Sequence[float | None]]
    xlabel: str = ""
    ylabel: str = ""
    spread: dict[str, Sequence[tuple[float, float] | None]] = attrs.field(factory=dict)
    hlines: Sequence[tuple[float, str]] = ()
    logx: bool = False
    logy: bool = False
    labels: bool = False
    value_format: str = "{:,.0f}"
    ymin: float | None = None


def _bar(ax: object, panel: Panel) -> None:
    n = max(1, len(panel.series))
    width = 0.8 / n
    positions = list(range(len(panel.x)))
    for s, (label, values) in enumerate(panel.series.items()):
        offs = [p - 0.4 + width * (s + 0.5) for p in positions]
        heights = [0.0 if v is None else v for v in values]
        spread = panel.spread.get(label)
        yerr = None
        if spread is not None:
            lows = [
                0.0 if sp is None else max(0.0, h - sp[0])
                for h, sp in zip(heights, spread, strict=False)
            ]
            highs = [
                0.0 if sp is None else max(0.0, sp[1] - h)
                for h, sp in zip(heights, spread, strict=False)
            ]
            yerr = [lows, highs]
        bars = ax.bar(  # type: ignore[attr-defined]
            offs, heights, width * 0.95, label=label, color=_color(label, s), yerr=yerr,
            capsize=3, error_kw={"elinewidth": 0.8, "alpha": 0.7},
        )  # fmt: skip
        if panel.labels:
            for bar, value in zip(bars, values, strict=False):
                if value is not None:
                    ax.annotate(  # type: ignore[attr-defined]
                        panel.value_format.format(value),
                        (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center", va="bottom", fontsize=7, xytext=(0, 2),
                        textcoords="offset points",
                    )  # fmt: skip
    ax.set_xticks(positions)  # type: ignore[attr-defined]
    ax.set_xticklabels([str(x) for x in panel.x], fontsize=8)  # type: ignore[attr-defined]


def _line(ax: object, panel: Panel) -> None:
    for s, (label, values) in enumerate(panel.series.items()):
        points = [(x, v) for x, v in zip(panel.x, values, strict=False) if v is not None]
        if not points:
            continue
        xs, ys = zip(*points, strict=True)
        ax.plot(  # type: ignore[attr-defined]
            xs,
            ys,
            marker="o" if len(xs) <= 30 else None,
            markersize=3,
            label=label,
            color=_color(label, s),
        )
    if panel.logx:
        ax.set_xscale("log", base=2)  # type: ignore[attr-defined]
        ax.set_xticks(list(panel.x))  # type: ignore[attr-defined]
        ax.set_xticklabels([str(x) for x in panel.x], fontsize=8)  # type: ignore[attr-defined]


def _width(panel: Panel) -> float:
    """Inches for one panel: wider for bar charts with many bars."""
    if panel.kind != "bar":
        return 5.2
    return max(5.2, 0.55 * len(panel.x) * max(1, len(panel.series)) + 1.5)


def render(path: str | Path, title: str, panels: Sequence[Panel], stamp: str) -> Path:
    """Draw ``panels`` side by side into a PNG at ``path`` (directories are created)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    widths = [_width(panel) for panel in panels]
    fig, axes = plt.subplots(
        1,
        len(panels),
        figsize=(sum(widths), 4.2),
        squeeze=False,
        gridspec_kw={"width_ratios": widths},
    )
    try:
        for ax, panel in zip(axes[0], panels, strict=True):
            (_bar if panel.kind == "bar" else _line)(ax, panel)
            for i, (y, label) in enumerate(panel.hlines):
                ax.axhline(y, linestyle="--", linewidth=1, color="#555555" if i == 0 else "#999999")
                ax.annotate(
                    label, (0.01, y), xycoords=("axes fraction", "data"), fontsize=7,
                    va="bottom", color="#333333",
                )  # fmt: skip
            if panel.logy:
                ax.set_yscale("log")
            elif panel.ymin is not None:
                ax.set_ylim(bottom=panel.ymin)
            ax.set_title(panel.title, fontsize=10)
            ax.set_xlabel(panel.xlabel, fontsize=9)
            ax.set_ylabel(panel.ylabel, fontsize=9)
            ax.tick_params(labelsize=8)
            ax.grid(axis="y", alpha=0.3)
            if len(panel.series) > 1 or panel.kind == "line":
                ax.legend(fontsize=7)
        fig.suptitle(title, fontsize=11)
        fig.text(0.01, 0.01, stamp, fontsize=6.5, color="#555555")
        fig.tight_layout(rect=(0, 0.04, 1, 1))
        fig.savefig(path, dpi=110)
    finally:
        plt.close(fig)
    return path
