"""Where converted assets live (written whole by ``hf_fastattn._io.atomic_directory``), and what to say when a source package is missing.

Assets come only from package registries (PyPI wheels, Debian packages); nothing loads from a model hub. Each is
converted once into ``<cache root>/<asset>/<source package version>/`` so a new package version never reuses a stale
conversion. The root is ``$HF_FASTATTN_CACHE`` if set, else ``$XDG_CACHE_HOME/hf_fastattn`` (``~/.cache/hf_fastattn``).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
from pathlib import Path


class AssetUnavailable(RuntimeError):
    """A source package is not installed; the message says exactly how to install it."""


def cache_root() -> Path:
    explicit = os.environ.get("HF_FASTATTN_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "hf_fastattn"


def asset_dir(asset: str, version: str) -> Path:
    """The cache folder of one asset at one source-package version (not created)."""
    return cache_root() / asset / version


def python_package(distribution: str, module: str, install: str) -> tuple[Path, str]:
    """(install folder, version) of a PyPI package, located without importing it; ``install`` is the exact command."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise AssetUnavailable(f"the asset needs the Python package {distribution!r}; install it with: {install}")
    return Path(next(iter(spec.submodule_search_locations))), importlib.metadata.version(distribution)
