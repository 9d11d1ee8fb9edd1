"""The one plotting helper: headless matplotlib, atomic PNG writes, and labelled curve panels.

Every picture the tools write (loss curves, reconstructions, overlays, corpus overviews) goes
through `pyplot` and `save_figure`, so they render without a display and a killed run never
leaves half a PNG behind.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from pumit_seg.atomic import atomic_path

__all__ = ["CurvePanel", "plot_curve_panels", "pyplot", "save_figure"]


def pyplot():
    """matplotlib.pyplot on the headless Agg backend (imported late: matplotlib is slow to import)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(figure, path: str | os.PathLike, dpi: int = 100) -> None:
    """Write `figure` as a PNG atomically and close it."""
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=dpi)
    pyplot().close(figure)


@dataclass
class CurvePanel:
    """One axes: named series of (x, y) points with the axis labels they need."""

    title: str
    xlabel: str
    ylabel: str
    series: Mapping[str, tuple[Sequence[float], Sequence[float]]] = field(default_factory=dict)
    log_y: bool = False


def plot_curve_panels(
    panels: Sequence[CurvePanel], path: str | os.PathLike, columns: int = 4, title: str | None = None
) -> bool:
    """Draw `panels` in a grid (at most `columns` wide) to `path`; False (nothing written) if none has data."""
    panels = [panel for panel in panels if any(len(x) for x, _ in panel.series.values())]
    if not panels:
        return False
    plt = pyplot()
    columns = min(columns, len(panels))
    rows = math.ceil(len(panels) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(3.4 * columns, 2.7 * rows), squeeze=False)
    for axis, panel in zip(axes.flat, panels, strict=False):
        for label, (x, y) in panel.series.items():
            axis.plot(list(x), list(y), lw=1, marker="." if len(x) < 30 else None, label=label)
        axis.set_title(panel.title, fontsize=8)
        axis.set_xlabel(panel.xlabel, fontsize=7)
        axis.set_ylabel(panel.ylabel, fontsize=7)
        if panel.log_y:
            axis.set_yscale("log")
        axis.tick_params(labelsize=7)
        axis.grid(alpha=0.3)
        if len(panel.series) > 1:
            axis.legend(fontsize=6)
    for axis in axes.flat[len(panels) :]:
        axis.axis("off")
    if title:
        figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    save_figure(figure, path, dpi=90)
    return True
