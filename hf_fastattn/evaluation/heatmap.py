"""gkamradt-style retrieval heatmap (evaluation conventions §2.4) of a needle or passkey result, matplotlib only.

Rows are depth percent (0 at the top), columns context length, each cell the mean score with its value written in it.
The colour scale is fixed to [0, 1] (red = 0, green = 1) so that heatmaps of different methods compare at a glance.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from .._io import atomic_write

_COLOURS = ["#F0496E", "#EBB839", "#0CD79F"]  # red, amber, green: the original notebook's colormap
_TASK_TITLES = {"needle": "Needle in a haystack", "passkey": "Passkey retrieval"}


def save_heatmap(result: dict, path: str | os.PathLike, *, title: str | None = None) -> None:
    """Plot ``result`` (from ``needle_grid`` or ``passkey``) as a PNG at ``path``, written atomically.

    The title is ``title`` (default: the task's name; put the dense reference score there) over a line with the
    attention implementation, its density and the mean score. Raises OSError naming ``path`` when it cannot be written.
    """
    try:
        from matplotlib.colors import LinearSegmentedColormap
        from matplotlib.figure import Figure  # no pyplot: no global figure state, no interactive backend
    except ImportError as e:
        raise ImportError('save_heatmap needs matplotlib: pip install "hf-fastattn[plots]"') from e

    lengths, depths, scores = _pivot(result["cells"])
    # The original's (17.5, 8) inches for a 35 × 35 grid, shrunk for small grids so the cells stay readable.
    figure = Figure(figsize=(min(17.5, 3 + 0.9 * len(lengths)), min(8.0, 2 + 0.5 * len(depths))))
    axes = figure.add_subplot()
    colormap = LinearSegmentedColormap.from_list("needle", _COLOURS)
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
    _save_atomically(figure, Path(path))


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


def _save_atomically(figure, path: Path) -> None:
    """A reader never sees a partial image (see ``hf_fastattn._io.atomic_write``)."""
    atomic_write(path, lambda temporary: figure.savefig(temporary, format="png", dpi=100), what="heatmap")
