"""Pieces every evaluation record shares: environment, attention summary, time and peak memory, atomic JSON output.

A record puts quality next to attention density, time and peak memory, with the versions, date and command that
produced it (evaluation conventions §6.3).
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import time
from datetime import datetime, timezone
from importlib import metadata
from typing import TYPE_CHECKING, Any

import torch
import transformers
from torch import nn

import hf_fastattn
from hf_fastattn._io import atomic_write

if TYPE_CHECKING:
    from typing_extensions import Self  # typing.Self needs Python 3.11


def environment() -> dict:
    """GPU name (or ``"cpu"``), library versions, UTC date and the exact command line of this run."""
    return {
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "triton": _installed_version("triton"),
        "transformers": transformers.__version__,
        "hf_fastattn": hf_fastattn.__version__,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join(sys.argv),
    }


def attention_summary(model: nn.Module) -> dict:
    """The model's attention implementation, each patched layer's method, config and realised statistics, and the
    attention density: the mean over layers of the fraction of attention work done (1.0 for exact methods; None if a
    sparse layer has not run). Statistics accumulate from :func:`reset_attention_statistics` or from patching."""
    states = hf_fastattn.layer_states(model)
    implementation = model.config._attn_implementation
    if not states:
        # Not patched: transformers' own attention or ``attn_implementation="fastattn_<m>"`` with that method's
        # defaults. Only exact methods run without a per-layer state.
        return {"implementation": implementation, "layers": [], "density": 1.0}
    layers, densities = [], []
    for state in states:
        statistics = state.spec.statistics(state) if state.spec is not None and state.spec.statistics else None
        density = 1.0 if statistics is None else statistics["density"]
        densities.append(density)
        entry = {"index": state.layer_index, "method": state.method, "config": state.config, "density": density}
        if statistics is not None:
            entry["statistics"] = statistics
        layers.append(entry)
    density = None if None in densities else sum(densities) / len(densities)
    return {"implementation": implementation, "layers": layers, "density": density}


def reset_attention_statistics(model: nn.Module) -> None:
    """Start counting realised attention work (e.g. skipped tiles) afresh, so a harness reports only its own run."""
    for state in hf_fastattn.layer_states(model):
        state.reset_statistics()


class Measure:
    """Wall time (``seconds``) and peak CUDA memory (``peak_memory_mib``, None on CPU) of the ``with`` block.

    On CUDA the device is synchronised on entry and exit, so queued kernels are inside the timed span.
    """

    def __init__(self) -> None:
        self.seconds: float | None = None
        self.peak_memory_mib: float | None = None
        self._start = 0.0

    def __enter__(self) -> Self:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc_info: object) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            self.peak_memory_mib = torch.cuda.max_memory_allocated() / 2**20
        self.seconds = time.perf_counter() - self._start


def write_json(path: str | os.PathLike, payload: Any) -> None:
    """Write ``payload`` as JSON to ``path`` atomically; parent folders are created (see ``hf_fastattn._io``)."""

    def write(temporary: str) -> None:
        with open(temporary, "w", encoding="utf-8") as handle:
            json.dump(payload, handle, indent=2)
            handle.write("\n")

    atomic_write(path, write, what="results")


def _installed_version(distribution: str) -> str | None:
    """A distribution's version from its metadata, without importing it (importing triton has side effects)."""
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None
