"""Figures: each writes a PNG atomically, the Pareto frontier is right, and an unwritable path says which one."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

pytest.importorskip("matplotlib", reason='install the "plots" extra')

from hf_fastattn.evaluation.plots import pareto_front, save_heatmap, save_pareto_plot, save_perplexity_plot

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _row(method, quality, *, setting=None, context_length=None, metric="perplexity", density=1.0, speed=1000.0):
    """A result row of the shared schema."""
    return {
        "task": "essay_perplexity" if metric == "perplexity" else "needle",
        "method": method,
        "setting": setting,
        "implementation": method,
        "context_length": context_length,
        "quality_metric": metric,
        "quality": quality,
        "density": density,
        "seconds": 1.0,
        "tokens": int(speed),
        "tokens_per_second": speed,
        "peak_memory_mib": None,
        "device": "cpu",
    }


def _needle_result(task="needle"):
    """A record shaped like ``needle_grid``'s (and ``passkey``'s): cells over a (context length × depth) grid."""
    cells = [
        {"context_length": length, "depth_percent": depth, "trials": 2, "correct": correct, "score": correct / 2}
        for length, depth, correct in [(64, 0, 2), (64, 50, 1), (64, 100, 0), (96, 0, 1), (96, 50, 2)]  # one cell unrun
    ]
    attention = {"implementation": "fastattn_dense", "density": 1.0}
    return {"task": task, "cells": cells, "mean_score": 0.6, "attention": attention}


PERPLEXITY_ROWS = [
    _row("dense", 12.0, context_length=256),
    _row("dense", 10.5, context_length=1024),
    _row("dense", 11.0, context_length=512),
    _row("fastattn_dense", 12.0, context_length=256),
    _row("fastattn_dense", 11.0, context_length=512),
    _row("sparse", 13.0, setting="keep 25%", context_length=256, density=0.25),
    _row("sparse", 12.5, setting="keep 50%", context_length=256, density=0.5),
    _row("sparse", None, setting="keep 50%", context_length=512, density=0.5),  # failed run: skipped
    _row("sparse", float("inf"), setting="keep 50%", context_length=1024, density=0.5),  # overflow: skipped
    _row("dense", 0.4, context_length=256, metric="needle_accuracy"),  # not perplexity: not plotted
]

PARETO_ROWS = [
    _row("dense", 0.9, metric="needle_accuracy", density=1.0, speed=1000.0),
    _row("fastattn_dense", 0.9, metric="needle_accuracy", density=1.0, speed=1500.0),
    _row("sparse", 0.8, setting="keep 50%", metric="needle_accuracy", density=0.5, speed=2500.0),
    _row("sparse", 0.5, setting="keep 25%", metric="needle_accuracy", density=0.25, speed=2000.0),  # dominated
    _row("other", 0.7, metric="needle_accuracy", density=None, speed=3000.0),  # unknown density: grey
    _row("failed", None, metric="needle_accuracy", density=None, speed=3000.0),  # no quality: skipped
    _row("diverged", float("nan"), metric="needle_accuracy", density=0.1, speed=4000.0),  # NaN quality: skipped
    {**_row("unmeasured", 0.95, metric="needle_accuracy"), "tokens_per_second": None},  # no speed: skipped
]


def _assert_single_png(path):
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 1000
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp file left behind


# --------------------------------------------------------------------------------------------------------------------
# Writing PNGs
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("task", ["needle", "passkey"])
def test_save_heatmap_writes_a_png(tmp_path, task):
    path = tmp_path / "plots" / "needle.png"
    save_heatmap(_needle_result(task), path, title="tiny Llama (dense reference 0.00)")
    _assert_single_png(path)


def test_save_perplexity_plot_writes_a_png(tmp_path):
    path = tmp_path / "plots" / "perplexity.png"
    save_perplexity_plot(PERPLEXITY_ROWS, path, title="tiny Llama")
    _assert_single_png(path)


def test_save_pareto_plot_writes_a_png(tmp_path):
    path = tmp_path / "plots" / "pareto.png"
    save_pareto_plot(PARETO_ROWS, path, quality_label="Needle accuracy")
    _assert_single_png(path)


def test_save_pareto_plot_lower_is_better(tmp_path):
    rows = [
        _row("dense", 10.0, density=1.0, speed=1000.0),
        _row("sparse", 11.0, setting="keep 50%", density=0.5, speed=1800.0),
        _row("sparse", 14.0, setting="keep 25%", density=0.25, speed=2600.0),
    ]
    path = tmp_path / "pareto_perplexity.png"
    save_pareto_plot(rows, path, quality_label="Perplexity", higher_is_better=False, title="Perplexity at 4k")
    _assert_single_png(path)


def test_nothing_to_plot_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="no perplexity rows"):
        save_perplexity_plot(PARETO_ROWS, tmp_path / "perplexity.png")
    with pytest.raises(ValueError, match="no rows with both a quality and a tokens_per_second"):
        save_pareto_plot([_row("failed", None)], tmp_path / "pareto.png", quality_label="Perplexity")
    with pytest.raises(ValueError, match=r"mix quality metrics \['needle_accuracy', 'perplexity'\]"):
        save_pareto_plot(PERPLEXITY_ROWS, tmp_path / "pareto.png", quality_label="Perplexity")
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------------------------------------------
# Pareto frontier
# --------------------------------------------------------------------------------------------------------------------


def test_pareto_front_higher_is_better():
    points = [(1000, 0.9), (1500, 0.9), (2500, 0.8), (2000, 0.5), (3000, 0.7), (500, 0.95), (400, 0.95)]
    # (1000, 0.9) is as accurate as (1500, 0.9) but slower; (2000, 0.5) is beaten by (2500, 0.8) on both;
    # (400, 0.95) is as accurate as (500, 0.95) but slower.
    assert pareto_front(points) == [(500, 0.95), (1500, 0.9), (2500, 0.8), (3000, 0.7)]


def test_pareto_front_lower_is_better():
    points = [(1000, 10.0), (1500, 10.0), (2500, 12.0), (2000, 15.0), (3000, 11.0), (500, 9.0)]
    # Perplexity: (3000, 11.0) is faster and better than (2500, 12.0) and (2000, 15.0).
    assert pareto_front(points, higher_is_better=False) == [(500, 9.0), (1500, 10.0), (3000, 11.0)]


def test_pareto_front_keeps_equal_points_and_handles_small_inputs():
    assert pareto_front([(1.0, 1.0), (1.0, 1.0)]) == [(1.0, 1.0), (1.0, 1.0)]
    assert pareto_front([(1.0, 2.0)]) == [(1.0, 2.0)]
    assert pareto_front([]) == []


# --------------------------------------------------------------------------------------------------------------------
# Unwritable paths
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "save",
    [
        lambda path: save_heatmap(_needle_result(), path),
        lambda path: save_perplexity_plot(PERPLEXITY_ROWS, path),
        lambda path: save_pareto_plot(PARETO_ROWS, path, quality_label="Needle accuracy"),
    ],
    ids=["heatmap", "perplexity", "pareto"],
)
def test_unwritable_path_names_the_path(tmp_path, save):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    path = blocker / "plot.png"
    with pytest.raises(OSError, match=r"cannot write .* to " + re.escape(str(path))):
        save(path)
    assert [p.name for p in tmp_path.iterdir()] == ["a_file"]


def test_missing_matplotlib_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)  # None: the import fails
    with pytest.raises(ImportError, match=r"save_pareto_plot needs matplotlib: pip install matplotlib .*\[plots\]"):
        save_pareto_plot(PARETO_ROWS, tmp_path / "pareto.png", quality_label="Needle accuracy")


def test_the_module_imports_without_matplotlib():
    script = "import sys; import hf_fastattn.evaluation.plots; assert 'matplotlib' not in sys.modules"
    subprocess.run([sys.executable, "-c", script], check=True, timeout=300)
