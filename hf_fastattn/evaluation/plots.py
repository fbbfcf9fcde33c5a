"""Figures of evaluation results, written as PNGs: the retrieval heatmap, perplexity by context length, and quality
against speed with its Pareto frontier.

matplotlib is imported on first use (the ``plots`` extra), so the package imports without it. Figures are drawn on
the Agg canvas without pyplot (no global figure state, no interactive backend) and every file is written through
:func:`hf_fastattn._io.atomic_write`: a reader never sees a partial image, and an unwritable location raises
``OSError`` naming the path.

The perplexity and Pareto plots take result *rows*, one dict per (task, method, setting, context length) run::

    {"task": str, "method": str, "setting": str | None, "implementation": str, "context_length": int | None,
     "quality_metric": str, "quality": float, "density": float | None, "seconds": float, "tokens": int,
     "tokens_per_second": float, "peak_memory_mib": float | None, "device": str}
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

from .._io import atomic_write

_HEATMAP_COLOURS = ["#F0496E", "#EBB839", "#0CD79F"]  # red, amber, green: the original needle notebook's colormap
_TASK_TITLES = {"needle": "Needle in a haystack", "passkey": "Passkey retrieval"}
_NO_DENSITY_COLOUR = "0.6"  # grey


# --------------------------------------------------------------------------------------------------------------------
# Retrieval heatmap
# --------------------------------------------------------------------------------------------------------------------


def save_heatmap(result: dict, path: str | os.PathLike, *, title: str | None = None) -> None:
    """gkamradt-style heatmap (evaluation conventions §2.4) of ``result`` (from ``needle_grid`` or ``passkey``).

    Rows are depth percent (0 at the top), columns context length, each cell the mean score with its value written in
    it. The colour scale is fixed to [0, 1] (red = 0, green = 1) so that heatmaps of different methods compare at a
    glance. The title is ``title`` (default: the task's name; put the dense reference score there) over a line with
    the attention implementation, its density and the mean score.
    """
    lengths, depths, scores = _pivot(result["cells"])
    # The original's (17.5, 8) inches for a 35 × 35 grid, shrunk for small grids so the cells stay readable.
    figure = _new_figure("save_heatmap", (min(17.5, 3 + 0.9 * len(lengths)), min(8.0, 2 + 0.5 * len(depths))))
    from matplotlib.colors import LinearSegmentedColormap

    axes = figure.add_subplot()
    colormap = LinearSegmentedColormap.from_list("needle", _HEATMAP_COLOURS)
    image = axes.imshow(scores, cmap=colormap, vmin=0, vmax=1, aspect="auto", interpolation="nearest")
    figure.colorbar(image, ax=axes, label="Score")
    for row, column_scores in enumerate(scores):
        for column, score in enumerate(column_scores):
            if not math.isnan(score):  # a cell the grid did not run stays blank
                axes.text(column, row, f"{score:.2g}", ha="center", va="center", fontsize=8)

    axes.set_xticks(range(len(lengths)), [str(length) for length in lengths], rotation=45, ha="right")
    axes.set_yticks(range(len(depths)), [f"{depth:g}" for depth in depths])
    axes.set_xlabel("Token Limit")
    axes.set_ylabel("Depth Percent")
    axes.set_title(f"{title or _TASK_TITLES.get(result.get('task'), 'Retrieval')}\n{_method_line(result)}")
    figure.tight_layout()
    _save(figure, path, what="heatmap")


def _pivot(cells: list[dict]) -> tuple[list[int], list[float], list[list[float]]]:
    """Sorted context lengths, sorted depth percents, and the mean score per (depth, length) (NaN where absent)."""
    lengths = sorted({cell["context_length"] for cell in cells})
    depths = sorted({cell["depth_percent"] for cell in cells})
    totals: dict[tuple[float, int], list[float]] = {}
    for cell in cells:
        totals.setdefault((cell["depth_percent"], cell["context_length"]), []).append(cell["score"])
    scores = [
        [sum(values) / len(values) if (values := totals.get((depth, length))) else float("nan") for length in lengths]
        for depth in depths
    ]
    return lengths, depths, scores


def _method_line(result: dict) -> str:
    attention = result.get("attention", {})
    density = attention.get("density")
    density_text = f"{density:.3g}" if isinstance(density, (int, float)) else "n/a"
    return (
        f"{attention.get('implementation', 'unknown method')}, density {density_text}, "
        f"mean score {result['mean_score']:.2f}"
    )


# --------------------------------------------------------------------------------------------------------------------
# Perplexity by context length
# --------------------------------------------------------------------------------------------------------------------


def save_perplexity_plot(rows: Sequence[dict], path: str | os.PathLike, *, title: str | None = None) -> None:
    """Perplexity against context length, one line per (method, setting), from the rows whose ``quality_metric`` is
    ``"perplexity"``.

    The x axis is log2-scaled with a tick at every context length. Rows without a (finite) context length or quality
    are skipped; a ValueError says so when no row is left to plot.
    """
    lines: dict[tuple[str, str | None], list[tuple[int, float]]] = {}
    for row in rows:
        if row.get("quality_metric") == "perplexity" and _known(row, "context_length", "quality"):
            lines.setdefault((row["method"], row.get("setting")), []).append((row["context_length"], row["quality"]))
    if not lines:
        raise ValueError("no perplexity rows with a context length and a quality to plot")

    figure = _new_figure("save_perplexity_plot", (7, 4.5))
    from matplotlib.ticker import NullLocator

    axes = figure.add_subplot()
    for (method, setting), points in lines.items():
        lengths, perplexities = zip(*sorted(points))
        axes.plot(lengths, perplexities, marker="o", label=_label(method, setting))
    lengths = sorted({length for points in lines.values() for length, _ in points})
    axes.set_xscale("log", base=2)
    axes.xaxis.set_minor_locator(NullLocator())  # only the measured lengths are ticked
    axes.set_xticks(lengths, [str(length) for length in lengths])
    axes.set_xlabel("Context length (tokens)")
    axes.set_ylabel("Perplexity (lower is better)")
    axes.set_title(title or "Perplexity by context length")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    _save(figure, path, what="perplexity plot")


# --------------------------------------------------------------------------------------------------------------------
# Quality against speed, with the Pareto frontier
# --------------------------------------------------------------------------------------------------------------------


def pareto_front(points: Sequence[tuple[float, float]], higher_is_better: bool = True) -> list[tuple[float, float]]:
    """The non-dominated ``(speed, quality)`` points, sorted by speed.

    Higher speed is always better; higher quality is better when ``higher_is_better``, lower otherwise. A point is
    dominated when another is at least as good on both axes and better on one; equal points do not dominate each
    other, so both stay.
    """
    sign = 1 if higher_is_better else -1  # compare sign * quality, always "higher is better"

    def dominates(a: tuple[float, float], b: tuple[float, float]) -> bool:
        return a[0] >= b[0] and sign * a[1] >= sign * b[1] and (a[0] > b[0] or sign * a[1] > sign * b[1])

    return sorted(point for point in points if not any(dominates(other, point) for other in points))


def save_pareto_plot(
    rows: Sequence[dict],
    path: str | os.PathLike,
    *,
    quality_label: str,
    title: str | None = None,
    higher_is_better: bool = True,
) -> None:
    """Quality (y, labelled ``quality_label``) against speed (x, ``tokens_per_second``), one point per row.

    Each point is labelled with its method (and setting, if any) and coloured by attention density (1.0 = dense;
    grey where unknown); the Pareto frontier is a step line through the non-dominated points (see
    :func:`pareto_front`). Rows without a (finite) quality or speed are skipped; a ValueError says so when none is
    left, or when the rows mix quality metrics.
    """
    rows = [row for row in rows if _known(row, "quality", "tokens_per_second")]
    if not rows:
        raise ValueError("no rows with both a quality and a tokens_per_second to plot")
    metrics = sorted({str(row.get("quality_metric")) for row in rows})
    if len(metrics) > 1:  # one y axis: points of different metrics would not compare
        raise ValueError(f"the rows mix quality metrics {metrics}: pass the rows of one metric")

    figure = _new_figure("save_pareto_plot", (8, 5))
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    axes = figure.add_subplot()
    colour_scale = ScalarMappable(norm=Normalize(vmin=0, vmax=1), cmap="viridis")
    for row in rows:
        density = row.get("density")
        colour = _NO_DENSITY_COLOUR if density is None else colour_scale.to_rgba(density)
        speed, quality = row["tokens_per_second"], row["quality"]
        axes.scatter([speed], [quality], color=[colour], edgecolors="black", linewidths=0.5, s=60, zorder=3)
        label = _label(row["method"], row.get("setting"))
        axes.annotate(label, (speed, quality), xytext=(5, 5), textcoords="offset points", fontsize=8)

    front = pareto_front([(row["tokens_per_second"], row["quality"]) for row in rows], higher_is_better)
    speeds, qualities = zip(*front)
    # "pre": between two frontier speeds the line holds the faster point's quality, the edge of the dominated region.
    axes.step(speeds, qualities, where="pre", color="black", linestyle="--", linewidth=1, label="Pareto frontier")

    figure.colorbar(colour_scale, ax=axes, label="Attention density (1.0 = dense; grey: unknown)")
    axes.set_xlabel("Speed (tokens/s)")
    axes.set_ylabel(f"{quality_label} ({'higher' if higher_is_better else 'lower'} is better)")
    axes.set_title(title or f"{quality_label} against speed")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    _save(figure, path, what="Pareto plot")


# --------------------------------------------------------------------------------------------------------------------
# Shared
# --------------------------------------------------------------------------------------------------------------------


def _new_figure(caller: str, figsize: tuple[float, float]):
    """A matplotlib ``Figure`` on the Agg canvas, or an ImportError saying how to install matplotlib."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as error:
        raise ImportError(
            f'{caller} needs matplotlib: pip install matplotlib (or pip install "hf-fastattn[plots]")'
        ) from error
    figure = Figure(figsize=figsize)
    FigureCanvasAgg(figure)
    return figure


def _known(row: dict, *keys: str) -> bool:
    """Whether the row has a finite number at every key (a failed or unmeasured run has None, or a NaN)."""
    return all(row.get(key) is not None and math.isfinite(row[key]) for key in keys)


def _label(method: str, setting: str | None) -> str:
    return method if setting is None else f"{method} ({setting})"


def _save(figure, path: str | os.PathLike, *, what: str) -> None:
    atomic_write(path, lambda temporary: figure.savefig(temporary, format="png", dpi=100), what=what)
