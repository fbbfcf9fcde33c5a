"""BSFA threshold calibration: tile maxima from the inference kernel, one threshold per (layer, head, query tile).

For each calibration window the model runs BSFA with every tile kept (dense attention) while the kernel records each
visited tile's maximum scaled score, at the inference tile shape. For a query tile ``i`` and a kept-tile budget ``k``,
the candidates are its skippable key tiles (visited, not diagonal, not the first); with ``v_1 >= v_2 >= ...`` their
maxima, the window's threshold is ``(v_k + v_{k+1}) / 2``, which keeps exactly its top ``k``, or ``-inf`` (keep all)
when it has ``k`` or fewer. Windows are aggregated with the mean (or median) per (layer, head, position); positions
past the calibrated length reuse the last one. The result keeps a table for every requested ``k``.

Target-skip mode then picks, per layer, the largest ``k`` whose thresholds skip at least the requested fraction of
skippable tiles on the calibration windows (a second pass measures it exactly, with the same kernel rule).
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from .._version import __version__
from ..methods.bsfa import TILE_MAX_SINK
from ..ops.bsfa import DEFAULT_BLOCK_M, DEFAULT_BLOCK_N
from ..ops.bsfa.naive import tile_geometry
from ..patch import layer_states, use
from .windows import token_windows

logger = logging.getLogger("hf_fastattn")

DEFAULT_K = (4, 8, 16, 32, 64)
# A fine grid for target-skip mode, so each layer lands close to the requested fraction.
TARGET_SKIP_K = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128)


@dataclass
class BsfaCalibration:
    """Calibrated BSFA thresholds for one model: pass it (or the directory :meth:`save` writes) as ``thresholds=``."""

    k_values: list[int]
    block_m: int
    block_n: int
    tables: dict[int, torch.Tensor]  # layer index -> (len(k_values), H_q, positions) fp32, natural-log units
    layer_k: dict[int, int]  # the k each layer uses by default
    skip_fraction: dict[int, list[float]]  # layer index -> measured skip fraction for each k on the windows
    fingerprint: dict
    details: dict = field(default_factory=dict)  # samples, length, data source, aggregate, target, seconds

    def to_tables(self, model: nn.Module) -> dict:
        """The tables in the form ``patch(model, "bsfa", thresholds=...)`` installs; refuses another model."""
        from ..artifacts import ArtifactError, model_fingerprint

        if model_fingerprint(model) != self.fingerprint:
            raise ArtifactError("these BSFA thresholds were calibrated for a model of other shapes")
        layers = {
            index: {"table": table, "k_values": self.k_values, "k": self.layer_k[index]}
            for index, table in self.tables.items()
        }
        tiles = {"block_m": self.block_m, "block_n": self.block_n}
        return {"tiles": tiles, "constant": None, "layers": layers, "source": "calibration (in memory)"}

    def metadata(self) -> dict:
        return {
            "method": "bsfa",
            "hf_fastattn": __version__,
            "k_values": self.k_values,
            "layer_k": {str(index): k for index, k in self.layer_k.items()},
            "block_m": self.block_m,
            "block_n": self.block_n,
            "calibration_skip_fraction": {str(index): values for index, values in self.skip_fraction.items()},
            **self.details,
        }

    def save(self, model: nn.Module, directory: str | Path) -> Path:
        """Write the artifact (safetensors + JSON, with the model fingerprint) to ``directory``."""
        from ..artifacts import save_state

        with use(model, "bsfa", thresholds=self):
            return save_state(model, directory, metadata=self.metadata())


def calibrate_bsfa(
    model: nn.Module,
    dataset="default",
    *,
    tokenizer=None,
    k: int | Sequence[int] | None = None,
    samples: int = 16,
    sequence_length: int | None = None,
    target_skip: float | None = None,
    aggregate: str = "mean",
    block_m: int = DEFAULT_BLOCK_M,
    block_n: int = DEFAULT_BLOCK_N,
    output_dir: str | Path | None = None,
    progress: bool = True,
) -> BsfaCalibration:
    """Calibrate BSFA thresholds for ``model`` on ``samples`` windows of ``sequence_length`` tokens.

    ``dataset`` is anything :func:`~hf_fastattn.calibration.windows.token_windows` takes (default: the training split).
    ``k``: kept skippable tiles per query tile, one value or several (default :data:`DEFAULT_K`, or the finer
    :data:`TARGET_SKIP_K` with ``target_skip``). ``target_skip`` in (0, 1): pick k per layer to skip that fraction.
    ``sequence_length`` defaults to the model's maximum, capped at 8192. With ``output_dir`` the artifact is saved.
    """
    if aggregate not in ("mean", "median"):
        raise ValueError(f"aggregate must be 'mean' or 'median', not {aggregate!r}")
    if target_skip is not None and not 0.0 < target_skip < 1.0:
        raise ValueError(f"target_skip must be a fraction in (0, 1), got {target_skip}")
    k_values = sorted(set([k] if isinstance(k, int) else (k or (TARGET_SKIP_K if target_skip else DEFAULT_K))))
    if k_values[0] < 1:
        raise ValueError(f"k counts kept tiles and must be >= 1, got {k_values}")
    if sequence_length is None:
        sequence_length = min(getattr(model.config, "max_position_embeddings", 8192) or 8192, 8192)
    if sequence_length < block_m:
        # Shorter prefills run the dense kernel (min_query_len = block_m): no tile maximum would ever be recorded.
        raise ValueError(
            f"sequence_length={sequence_length} is shorter than one query tile (block_m={block_m}): BSFA only runs on "
            "prefills of at least block_m tokens; calibrate on longer windows or with a smaller block_m"
        )
    start = time.perf_counter()
    windows, source = token_windows(dataset, tokenizer, samples=samples, length=sequence_length)
    device = next(model.parameters()).device
    tiles = {"block_m": block_m, "block_n": block_n}

    # Pass 1: every window's thresholds per (layer, k, head, position).
    per_window: dict[int, list[torch.Tensor]] = {}
    geometry = _Geometry(sequence_length, block_m, block_n)

    def collect(index: int):
        def sink(tile_max: torch.Tensor) -> None:
            per_window.setdefault(index, []).append(_window_thresholds(tile_max, geometry, k_values))

        return sink

    _run_windows(model, windows, device, float("-inf"), tiles, collect, "BSFA calibration: tile maxima", progress)
    if not per_window:
        raise RuntimeError("no BSFA layer ran during calibration: does the model dispatch through AttentionInterface?")
    reduce = (lambda x: x.mean(dim=0)) if aggregate == "mean" else (lambda x: x.median(dim=0).values)
    tables = {index: reduce(torch.cat(values, dim=0)).float().cpu() for index, values in per_window.items()}

    # Pass 2: the skip fraction each k realises on the windows, with the aggregated thresholds.
    skipped: dict[int, torch.Tensor] = {}
    skippable: dict[int, torch.Tensor] = {}

    def measure(index: int):
        table = tables[index].to(device)

        def sink(tile_max: torch.Tensor) -> None:
            gateable = geometry.skippable(tile_max.device)
            below = tile_max[:, None] < table[None, :, :, :, None]  # (B, K, H, M, N)
            skipped[index] = skipped.get(index, 0) + (below & gateable).sum(dim=(0, 3, 4))
            skippable[index] = skippable.get(index, 0) + gateable.sum() * tile_max.shape[0]

        return sink

    _run_windows(model, windows, device, float("-inf"), tiles, measure, "BSFA calibration: skip check", progress)
    skip_fraction = {
        index: (skipped[index].double().sum(dim=1) / (skippable[index] * skipped[index].shape[1]).clamp(min=1)).tolist()
        for index in tables
    }
    layer_k = {index: _pick_k(k_values, skip_fraction[index], target_skip, index) for index in tables}

    from ..artifacts import model_fingerprint

    calibration = BsfaCalibration(
        k_values=k_values, block_m=block_m, block_n=block_n, tables=tables, layer_k=layer_k,
        skip_fraction=skip_fraction, fingerprint=model_fingerprint(model),
        details={
            "model": getattr(model.config, "_name_or_path", "") or type(model).__name__,
            "samples": samples, "sequence_length": sequence_length, "data": source, "aggregate": aggregate,
            "target_skip": target_skip, "seconds": round(time.perf_counter() - start, 2),
        },
    )  # fmt: skip
    if output_dir is not None:
        calibration.save(model, output_dir)
    return calibration


@dataclass
class _Geometry:
    """Which (query tile, key tile) pairs a causal window of ``length`` tokens may skip."""

    length: int
    block_m: int
    block_n: int

    def skippable(self, device) -> torch.Tensor:
        num_m, num_n = -(-self.length // self.block_m), -(-self.length // self.block_n)
        query_tiles = torch.arange(num_m, device=device)
        visited, always = tile_geometry(query_tiles, num_n, self.length, self.length, self.block_m, self.block_n, True)
        return visited & ~always


def _window_thresholds(tile_max: torch.Tensor, geometry: _Geometry, k_values: list[int]) -> torch.Tensor:
    """``(B, len(k_values), H, M)``: per window, the midpoint between the k-th and (k+1)-th skippable tile maxima."""
    gateable = geometry.skippable(tile_max.device)
    candidates = tile_max.masked_fill(~gateable, float("-inf"))
    count = gateable.sum(dim=-1)  # (M,)
    largest = candidates.topk(min(k_values[-1] + 1, candidates.shape[-1]), dim=-1).values
    thresholds = []
    for k in k_values:
        if k >= largest.shape[-1]:
            thresholds.append(torch.full_like(candidates[..., 0], float("-inf")))
            continue
        midpoint = (largest[..., k - 1] + largest[..., k]) / 2
        thresholds.append(torch.where(count > k, midpoint, float("-inf")))
    return torch.stack(thresholds, dim=1)


def _run_windows(model, windows, device, threshold, tiles, make_sink, description, progress) -> None:
    """Run every window through ``model`` with BSFA keeping all tiles and a tile-maximum sink on each layer."""
    with use(model, "bsfa", thresholds=threshold, **tiles), torch.no_grad():
        for state in layer_states(model):
            if state.method == "bsfa":
                setattr(state, TILE_MAX_SINK, make_sink(state.layer_index))
        # Only the attention layers matter: skip the full-vocabulary logits where the model allows it.
        extra = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
        for window in tqdm(windows, desc=description, disable=not progress, unit="window"):
            model(input_ids=window[None].to(device), use_cache=False, **extra)


def _pick_k(k_values: list[int], skip_fraction: list[float], target: float | None, index: int) -> int:
    """Default k for a layer: the middle value, or in target mode the largest k that reaches the target skip."""
    if target is None:
        return k_values[len(k_values) // 2]
    reaching = [k for k, fraction in zip(k_values, skip_fraction) if fraction >= target]
    if reaching:
        return max(reaching)
    logger.warning(
        "hf_fastattn: BSFA layer %d reaches at most %.1f%% skipped at k=%d, short of the %.1f%% target",
        index, 100 * max(skip_fraction), k_values[0], 100 * target,
    )  # fmt: skip
    return k_values[0]
