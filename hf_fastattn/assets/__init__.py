"""Real weights and text, resolved offline from package registries and cached once (see ``cache.py``)."""

from .cache import AssetUnavailable, asset_dir, cache_root

__all__ = ["AssetUnavailable", "asset_dir", "cache_root"]
