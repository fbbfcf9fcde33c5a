"""``fastattn_bsfa``: block-sparse FlashAttention with calibrated per-(layer, head, query-tile) thresholds.

Prefill runs the BSFA kernel (:mod:`hf_fastattn.ops.bsfa`): ``Q K^T`` exactly for every key tile, the ``P V`` work
skipped for tiles whose maximum scaled score is below the layer's threshold for that head and query-tile position.
Skipped tiles leave the softmax denominator too. Decode steps run the shared exact decode kernels (the ``decode``
setting every method takes; ``decode="off"`` keeps them on this method's kernels), and other queries shorter than
``min_query_len`` (default one query tile) run the dense kernel. Forward only: a call that needs gradients falls back
to SDPA.

Configuration (``patch(model, "bsfa", ...)``):

* ``thresholds``: a calibration artifact directory (from :func:`hf_fastattn.calibrate_bsfa` or
  ``hf-fastattn calibrate bsfa``), a :class:`~hf_fastattn.calibration.bsfa.BsfaCalibration`, or one number (natural-log
  units of scaled scores) for every layer, head and position. Required.
* ``k``: which calibrated k (kept skippable tiles per query tile) to use for every layer, or ``"layer"`` (the
  default) for each layer's own calibrated choice (in target-skip mode, the k that reaches the target there).
* ``block_m``, ``block_n``: the tile shape (default 128 x 64). Thresholds are calibrated for one tile shape: an
  artifact made for another is refused.
* ``min_query_len``: queries shorter than this run dense (default ``block_m``).
* ``decode``: the decode-step strategy (``"auto"``, ``"single"``, ``"split"``, ``"streamk"`` or ``"off"``).

Every layer counts, on the device and without a host synchronisation, the key tiles it visited, could skip and
skipped; :func:`bsfa_statistics` reads them (that read synchronises) and ``LayerState.reset_statistics`` clears them.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from ..capabilities import Capabilities, MethodSpec
from ..dispatch import dispatch_attention
from ..masks import fastattn_mask
from ..ops.bsfa import (
    DEFAULT_BLOCK_M,
    DEFAULT_BLOCK_N,
    SUPPORTED_DTYPES,
    SUPPORTED_HEAD_DIMS,
    bsfa_attention,
    bsfa_attention_reference,
)
from ..ops.dense import dense_attention, dense_attention_reference
from ..state import LayerState

# Key of the (H_q, 3) int64 tile counters in LayerState.counters: visited, skippable, skipped.
_COUNTS = "bsfa_tiles"
# Attribute set by calibration: a callable that receives each prefill's tile maxima (B, H_q, M, N).
TILE_MAX_SINK = "bsfa_tile_max_sink"


def _run(bsfa, dense, query, key, value, *, causal, scale, key_padding, state):
    config = state.config if state is not None else {}
    block_m = config.get("block_m", DEFAULT_BLOCK_M)
    if query.shape[2] < config.get("min_query_len", block_m):
        return dense(query, key, value, causal=causal, scale=scale, key_padding=key_padding)
    thresholds = getattr(state, "thresholds", None) if state is not None else None
    if thresholds is None:
        raise ValueError(
            "fastattn_bsfa has no thresholds for this layer: use hf_fastattn.patch(model, 'bsfa', thresholds=...) "
            "with a calibration artifact (hf-fastattn calibrate bsfa) or a number"
        )
    sink = getattr(state, TILE_MAX_SINK, None)
    result = bsfa(
        query, key, value, thresholds, causal=causal, scale=scale, key_padding=key_padding,
        block_m=block_m, block_n=config.get("block_n", DEFAULT_BLOCK_N), record_tile_max=sink is not None,
    )  # fmt: skip
    counts = result.stats.sum(dim=(0, 2), dtype=torch.int64)  # (H_q, 3), stays on the device
    previous = state.counters.get(_COUNTS)
    state.counters[_COUNTS] = counts if previous is None else previous + counts
    if sink is not None:
        sink(result.tile_max)
    return result.out


def _kernel(query, key, value, **kwargs):
    return _run(bsfa_attention, dense_attention, query, key, value, **kwargs)


def _reference(query, key, value, **kwargs):
    return _run(bsfa_attention_reference, dense_attention_reference, query, key, value, **kwargs)


def bsfa_statistics(state: LayerState) -> dict:
    """What one BSFA layer realised since it was patched (or since ``state.reset_statistics()``).

    ``density``: fraction of visited key tiles whose ``P V`` was computed; ``skip_fraction``: skipped / skippable
    (non-diagonal, non-sink) tiles; both overall and per head. None before the layer's first prefill.
    """
    counts = state.counters.get(_COUNTS)
    if counts is None:
        return {"density": None, "skip_fraction": None}
    counts = counts.cpu().double()
    visited, skippable, skipped = counts.unbind(-1)
    per_head_skip = torch.where(skippable > 0, skipped / skippable.clamp(min=1), torch.zeros_like(skipped))
    return {
        "density": 1.0 - float(skipped.sum() / visited.sum().clamp(min=1)),
        "skip_fraction": float(skipped.sum() / skippable.sum().clamp(min=1)),
        "tiles": {"visited": int(visited.sum()), "skippable": int(skippable.sum()), "skipped": int(skipped.sum())},
        "skip_fraction_per_head": per_head_skip.tolist(),
    }


# Settings a user may pass, and those an artifact's saved layer config carries back through load_state.
_USER_KEYS = {"thresholds", "k", "block_m", "block_n", "min_query_len"}
_SAVED_KEYS = {"k_values", "source", "threshold"}


def _prepare(model, states: list[LayerState]) -> None:
    """Install each layer's threshold table from the ``thresholds`` configuration and check the tile shape."""
    for state in states:
        unknown = sorted(set(state.config) - _USER_KEYS - _SAVED_KEYS)
        if unknown:
            raise ValueError(f"unknown fastattn_bsfa setting(s) {unknown}; valid: {sorted(_USER_KEYS)}")
    # Layers usually share one source: read an artifact once.
    sources = {id(state.config.get("thresholds")): state.config.get("thresholds") for state in states}
    loaded = {key: _load_tables(model, source) for key, source in sources.items() if source is not None}
    for state in states:
        config = state.config
        source = config.pop("thresholds", None)
        user_tiles = {name: config[name] for name in ("block_m", "block_n") if name in config}
        if source is None:
            # Tables come later (load_state, calibration); the tile shape must still be known.
            config.setdefault("block_m", DEFAULT_BLOCK_M)
            config.setdefault("block_n", DEFAULT_BLOCK_N)
            continue
        tables = loaded[id(source)]
        if tables["tiles"] is None:  # one constant threshold: any tile shape
            config.setdefault("block_m", DEFAULT_BLOCK_M)
            config.setdefault("block_n", DEFAULT_BLOCK_N)
            heads = model.config.num_attention_heads
            state.set_tensor("thresholds", torch.full((heads, 1), tables["constant"], dtype=torch.float32))
            config["threshold"] = tables["constant"]
            continue
        for name, value in user_tiles.items():
            if value != tables["tiles"][name]:
                raise _artifact_error(
                    f"BSFA thresholds were calibrated with {name}={tables['tiles'][name]}, but {name}={value} was "
                    "requested: recalibrate for this tile shape"
                )
        config.update(tables["tiles"])
        layer = tables["layers"].get(state.layer_index)
        if layer is None:
            raise _artifact_error(f"the BSFA thresholds have no table for attention layer {state.layer_index}")
        k_values = layer["k_values"]
        k = config.get("k", "layer")
        k = layer["k"] if k == "layer" else k
        if k not in k_values:
            raise ValueError(f"k={k} was not calibrated for layer {state.layer_index}; calibrated k: {k_values}")
        table = layer["table"]
        state.set_tensor("threshold_table", table.clone())
        state.set_tensor("thresholds", table[k_values.index(k)].clone())
        config.update({"k": k, "k_values": list(k_values), "source": tables["source"]})
    device = next(model.parameters()).device
    for state in states:
        state.to(device)


def _load_tables(model, source) -> dict:
    """``{"tiles", "constant", "layers": {index: {"table", "k_values", "k"}}, "source"}`` from any accepted source
    (``tiles`` is None for a constant, which fits any tile shape)."""
    if isinstance(source, (int, float)) and not isinstance(source, bool):
        if math.isnan(source):
            raise ValueError("a BSFA threshold cannot be NaN")
        return {"tiles": None, "constant": float(source), "layers": {}, "source": f"constant {source}"}
    if isinstance(source, (str, Path)):
        return _tables_from_artifact(model, Path(source))
    to_tables = getattr(source, "to_tables", None)
    if to_tables is None:
        raise TypeError(
            f"thresholds must be an artifact directory, a BsfaCalibration or a number, not {type(source).__name__}"
        )
    return to_tables(model)


def _tables_from_artifact(model, directory: Path) -> dict:
    from ..artifacts import check_fingerprint, read_artifact  # artifacts imports patch, which imports this module

    config, tensors = read_artifact(directory)
    check_fingerprint(model, config, directory)
    layers, tiles = {}, None
    for entry in config["layers"]:
        if entry["method"] != "bsfa":
            continue
        layer_config = entry["config"]
        layer_tiles = {"block_m": layer_config["block_m"], "block_n": layer_config["block_n"]}
        if tiles not in (None, layer_tiles):
            raise _artifact_error(f"artifact {directory} mixes tile shapes {tiles} and {layer_tiles}")
        tiles = layer_tiles
        name = f"layers.{entry['index']}.threshold_table"
        if name not in tensors or "k_values" not in layer_config:
            raise _artifact_error(f"artifact {directory} has no BSFA threshold table for layer {entry['index']}")
        table = tensors[name]
        if table.dim() != 3 or table.shape[0] != len(layer_config["k_values"]):
            raise _artifact_error(f"{name} in {directory} has shape {tuple(table.shape)}, not (len(k_values), H, P)")
        layers[entry["index"]] = {"table": table, "k_values": layer_config["k_values"], "k": layer_config["k"]}
    if not layers:
        raise _artifact_error(f"artifact {directory} holds no BSFA thresholds")
    return {"tiles": tiles, "constant": None, "layers": layers, "source": str(directory)}


def _artifact_error(message: str):
    from ..artifacts import ArtifactError

    return ArtifactError(message)


SPEC = MethodSpec(
    name="bsfa",
    description="Block-sparse FlashAttention: exact QK^T per tile, P V skipped below calibrated thresholds (prefill).",
    kernel=_kernel,
    reference=_reference,
    capabilities=Capabilities(head_dims=SUPPORTED_HEAD_DIMS, dtypes=SUPPORTED_DTYPES, backward=False),
    prepare=_prepare,
    statistics=bsfa_statistics,
    # -inf keeps every tile, so the kernel must reproduce exact attention; 16-row tiles make the 19-token inputs run it.
    selftest_config={"thresholds": float("-inf"), "block_m": 16, "block_n": 16},
)

mask_builder = fastattn_mask


def bsfa_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention function for ``attn_implementation="fastattn_bsfa"``."""
    return dispatch_attention(SPEC, module, query, key, value, attention_mask, scaling, dropout, **kwargs)
