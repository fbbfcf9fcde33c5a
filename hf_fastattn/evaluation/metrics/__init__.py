"""Our scores as local ``evaluate`` metric modules: each folder here holds ``<name>/<name>.py``, loaded from its path.

Nothing is fetched from a hub, so scoring works offline (``HF_HUB_OFFLINE=1``, or no network at all). ``evaluate`` is
imported on first use only: importing it pulls in ``transformers.pipelines`` and takes seconds.
"""

from __future__ import annotations

import functools
from pathlib import Path

_FOLDER = Path(__file__).resolve().parent


def available_metrics() -> list[str]:
    """The names ``load_metric`` accepts: the folders here that hold a metric script of the same name."""
    return sorted(folder.name for folder in _FOLDER.iterdir() if (folder / f"{folder.name}.py").is_file())


@functools.cache
def load_metric(name: str):
    """The ``evaluate.Metric`` ``name`` (see :func:`available_metrics`), loaded once from this package's folder.

    The metric keeps its inputs in memory (no cache files). One instance is shared per process: ``compute`` on it is
    not thread-safe.
    """
    names = available_metrics()
    if name not in names:
        raise ValueError(f"unknown metric {name!r}; available metrics: {', '.join(names)}")
    import evaluate

    # Not keep_in_memory: an in-memory Arrow table is fingerprinted by pickling it, which fails with dill on Python
    # 3.12 (pyarrow's MonthDayNano); a cache file is fingerprinted by its path.
    return evaluate.load(str(_FOLDER / name))
