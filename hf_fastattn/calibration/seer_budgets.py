"""SeerAttention block budgets per (layer, KV head), calibrated on training text.

With ``allocation="head"`` every (batch, KV head) of every layer keeps the same fraction of its visible blocks. Some
heads spread their attention over many blocks and others over a few, so an equal share over-serves the second kind.
Calibration measures the spread with the ground-truth block map (the oracle's ranking: max-pooled attention
probabilities, row-normalised) on training windows:

* for each window and each sparsity of a grid, the model-wide budget (the uniform per-head need beyond the always-kept
  blocks, times the number of layers and heads) goes to the best free blocks of *all* layers and heads together;
* head ``h`` of layer ``l`` gets the weight ``w = blocks it took / uniform need``; weights are averaged over windows and
  have mean 1 over all (layer, head), so the model's density stays the requested one.

At patch time (``patch(model, "seer", gates=..., budgets=DIR, sparsity=s)``) each layer's weights for ``s`` are
interpolated linearly between grid points, and head ``h`` chooses ``round(w * need)`` blocks beyond the always-kept
ones (:func:`~hf_fastattn.ops.seer.blocks.head_needs`; the exact tail rows' work, ``tail_tokens``, is taken off
``need`` first). Weights are relative, so they apply at other lengths
too; they are calibrated for one length, and the realised density (reported by the method) is the check.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from .._version import __version__
from ..ops.seer import DEFAULT_BLOCK_SIZE
from ..ops.seer.blocks import free_blocks, head_needs
from ..patch import layer_states, use
from .windows import token_windows

BUDGET_FORMAT_VERSION = 1
DEFAULT_SPARSITIES = (0.0, 0.3, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)


@dataclass
class SeerBudgets:
    """Per-(layer, KV head) budget weights for a grid of sparsities: pass it (or the directory :meth:`save` writes) as
    ``patch(model, "seer", budgets=...)``."""

    sparsities: list[float]
    weights: dict[int, torch.Tensor]  # layer index -> (len(sparsities), H_kv) fp32, mean 1 over all layers and heads
    block_size: int
    sink_blocks: int
    local_blocks: int
    fingerprint: dict
    details: dict = field(default_factory=dict)  # samples, length, data source, seconds

    def head_weights(self, layer: int, sparsity: float) -> tuple[float, ...]:
        """Layer ``layer``'s weights at ``sparsity``, interpolated linearly between the calibrated grid points."""
        low, high = self.sparsities[0], self.sparsities[-1]
        if not low <= sparsity <= high:
            raise ValueError(f"these Seer budgets were calibrated for sparsities {low}..{high}, not {sparsity}")
        if layer not in self.weights:
            raise ValueError(f"these Seer budgets hold no weights for attention layer {layer}")
        table = self.weights[layer]
        upper = next(i for i, point in enumerate(self.sparsities) if point >= sparsity)
        if self.sparsities[upper] == sparsity:
            return tuple(table[upper].tolist())
        s0, s1 = self.sparsities[upper - 1], self.sparsities[upper]
        mix = (sparsity - s0) / (s1 - s0)
        return tuple(torch.lerp(table[upper - 1], table[upper], mix).tolist())

    def check(self, model: nn.Module, *, block_size: int, sink_blocks: int, local_blocks: int, source) -> None:
        """Raise :class:`~hf_fastattn.ArtifactError` unless these budgets fit ``model`` and the selection geometry."""
        from ..artifacts import ArtifactError, check_fingerprint

        check_fingerprint(model, {"fingerprint": self.fingerprint}, source)
        names = ("block_size", "sink_blocks", "local_blocks")
        calibrated = {name: getattr(self, name) for name in names}
        requested = dict(zip(names, (block_size, sink_blocks, local_blocks)))
        if calibrated != requested:
            differing = sorted(name for name in calibrated if calibrated[name] != requested[name])
            raise ArtifactError(
                f"Seer budgets {source} were calibrated with {', '.join(f'{n}={calibrated[n]}' for n in differing)}, "
                f"but {', '.join(f'{n}={requested[n]}' for n in differing)} was requested"
            )

    def save(self, directory: str | Path) -> Path:
        """Write the artifact (safetensors + JSON, with the model fingerprint) to ``directory``."""
        from ..artifacts import write_artifact

        tensors = {f"layers.{index}.budget_weights": table for index, table in self.weights.items()}
        metadata = {
            "seer_budget_version": BUDGET_FORMAT_VERSION,
            "hf_fastattn": __version__,
            "sparsities": self.sparsities,
            "block_size": self.block_size,
            "sink_blocks": self.sink_blocks,
            "local_blocks": self.local_blocks,
            **self.details,
        }
        return write_artifact(directory, self.fingerprint, [], tensors, metadata)

    @classmethod
    def load(cls, directory: str | Path) -> SeerBudgets:
        from ..artifacts import ArtifactError, read_artifact

        config, tensors = read_artifact(directory)
        metadata = config.get("metadata", {})
        version = metadata.get("seer_budget_version")
        if version != BUDGET_FORMAT_VERSION:
            raise ArtifactError(
                f"{directory} is not a Seer budget artifact of version {BUDGET_FORMAT_VERSION} (found {version!r})"
            )
        weights = {int(name.split(".")[1]): tensor.float() for name, tensor in tensors.items()}
        if metadata.get("tail_blocks", 0):
            # An earlier version counted dense last query blocks among the always-kept ones (now ``tail_tokens``).
            raise ArtifactError(
                f"{directory} was calibrated with tail_blocks={metadata['tail_blocks']}, a selection this version no "
                "longer has; recalibrate with hf-fastattn calibrate seer"
            )
        geometry = ("sparsities", "block_size", "sink_blocks", "local_blocks")
        details = {key: value for key, value in metadata.items() if key not in (*geometry, "seer_budget_version")}
        values = {name: metadata[name] for name in geometry}
        return cls(**values, weights=weights, fingerprint=config["fingerprint"], details=details)


def calibrate_seer_budgets(
    model: nn.Module,
    dataset="default",
    *,
    tokenizer=None,
    samples: int = 4,
    sequence_length: int | None = None,
    sparsities: Sequence[float] | None = None,
    block_size: int = DEFAULT_BLOCK_SIZE,
    sink_blocks: int = 1,
    local_blocks: int = 1,
    output_dir: str | Path | None = None,
    progress: bool = True,
) -> SeerBudgets:
    """Calibrate Seer budget weights for ``model`` on ``samples`` windows of ``sequence_length`` tokens.

    ``dataset`` is anything :func:`~hf_fastattn.calibration.windows.token_windows` takes (default: the training split).
    ``sequence_length`` defaults to the model's maximum, capped at 8192: calibrate at the length you will run.
    ``sparsities`` is the grid patch-time sparsities are interpolated on (default :data:`DEFAULT_SPARSITIES`). With
    ``output_dir`` the artifact is saved.
    """
    sparsities = sorted({float(s) for s in (DEFAULT_SPARSITIES if sparsities is None else sparsities)})
    if not sparsities or not all(0.0 <= s < 1.0 for s in sparsities):
        raise ValueError(f"sparsities must be a non-empty list of fractions in [0, 1), got {sparsities}")
    if sequence_length is None:
        sequence_length = min(getattr(model.config, "max_position_embeddings", 8192) or 8192, 8192)
    if sequence_length < 2 * block_size:
        raise ValueError(f"sequence_length={sequence_length} spans fewer than two blocks of {block_size} tokens")
    start = time.perf_counter()
    windows, source = token_windows(dataset, tokenizer, samples=samples, length=sequence_length)
    device = next(model.parameters()).device
    geometry = {"block_size": block_size, "sink_blocks": sink_blocks, "local_blocks": local_blocks}
    window_targets: dict[int, tuple[torch.Tensor, bool]] = {}  # layer index -> (target, causal), one window
    totals: torch.Tensor | None = None
    layer_indices: list[int] = []

    def collect(index: int):
        def sink(target: torch.Tensor, causal: bool) -> None:
            window_targets[index] = (target, causal)

        return sink

    from ..methods.seer import TARGET_SINK

    with use(model, "seer", **geometry), torch.no_grad():
        for state in layer_states(model):
            if state.method == "seer":
                setattr(state, TARGET_SINK, collect(state.layer_index))
        # Only the attention layers matter: skip the full-vocabulary logits where the model allows it.
        extra = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
        for window in tqdm(windows, desc="Seer budget calibration", disable=not progress, unit="window"):
            window_targets.clear()
            model(input_ids=window[None].to(device), use_cache=False, **extra)
            if not window_targets:
                raise RuntimeError("no SeerAttention layer ran: does the model dispatch through AttentionInterface?")
            layer_indices = sorted(window_targets)
            causal = window_targets[layer_indices[0]][1]
            targets = [window_targets[index][0] for index in layer_indices]
            weights = _window_weights(targets, sparsities, sequence_length, causal, **geometry)
            totals = weights if totals is None else totals + weights
    mean = totals / len(windows)
    from ..artifacts import model_fingerprint

    budgets = SeerBudgets(
        sparsities=sparsities, weights={index: mean[:, i].cpu() for i, index in enumerate(layer_indices)},
        fingerprint=model_fingerprint(model), **geometry,
        details={
            "model": getattr(model.config, "_name_or_path", "") or type(model).__name__,
            "samples": samples, "sequence_length": sequence_length, "data": source,
            "seconds": round(time.perf_counter() - start, 2),
        },
    )  # fmt: skip
    if output_dir is not None:
        budgets.save(output_dir)
    return budgets


def _window_weights(targets, sparsities, length, causal, *, block_size, **always_kept) -> torch.Tensor:
    """``(len(sparsities), layers, H_kv)``: one window's weights, each layer's target ``(1, H_kv, NQ, NK)``;
    ``always_kept``: ``sink_blocks``, ``local_blocks``."""
    free = free_blocks(length, length, causal=causal, block_size=block_size, device=targets[0].device, **always_kept)
    free = free.flatten()
    # Every free block's target value, per (layer, head); heads from all layers compete for one budget.
    values = torch.stack([target[0].flatten(-2)[:, free] for target in targets]).float()
    layers, heads, num_free = values.shape
    weights = torch.ones(len(sparsities), layers, heads, device=values.device)
    for g, sparsity in enumerate(sparsities):
        (need,) = head_needs(length, length, causal=causal, block_size=block_size, sparsity=sparsity, heads=1,
                             **always_kept)  # fmt: skip
        if need == 0:
            continue  # nothing beyond the always-kept blocks: every head equal
        taken = values.flatten().topk(need * layers * heads).indices // num_free
        weights[g] = torch.bincount(taken, minlength=layers * heads).view(layers, heads).float() / need
    return weights
