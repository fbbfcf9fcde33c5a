"""Save and load per-layer hf_fastattn state (thresholds, gates): safetensors for tensors, JSON for the rest.

A directory holds ``fastattn_config.json`` (format version, library versions, the model fingerprint, each layer's
method and configuration, free-form metadata) and ``fastattn_state.safetensors`` (tensors keyed
``layers.<index>.<name>``). Loading checks the fingerprint and refuses a mismatched model or a damaged file with a clear
error. Files are written atomically (temporary file, then rename), so a crash never leaves half an artifact.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
import transformers
from torch import nn

from ._io import atomic_write
from ._version import __version__
from .patch import attention_modules, layer_states, patch
from .state import LayerState

CONFIG_NAME = "fastattn_config.json"
TENSORS_NAME = "fastattn_state.safetensors"
FORMAT_VERSION = 1
_FINGERPRINT_FIELDS = (
    "model_type",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "hidden_size",
    "max_position_embeddings",
    "image_size",
    "patch_size",
)


class ArtifactError(ValueError):
    """An artifact that does not belong to this model, or cannot be read."""


def model_fingerprint(model: nn.Module) -> dict[str, Any]:
    """Identity of the model shapes an artifact was made for (not its weights)."""
    config = model.config
    fields = {name: getattr(config, name) for name in _FINGERPRINT_FIELDS if getattr(config, name, None) is not None}
    fields["attention_layers"] = len(attention_modules(model))
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return {**fields, "hash": digest}


def save_state(model: nn.Module, directory: str | os.PathLike, metadata: dict[str, Any] | None = None) -> Path:
    """Write the patched model's per-layer state to ``directory``; returns the directory."""
    states = layer_states(model)
    if not states:
        raise ValueError("the model is not patched: call hf_fastattn.patch(model, ...) first")
    tensors = {
        f"layers.{state.layer_index}.{name}": tensor
        for state in states
        for name, tensor in state.artifact_tensors().items()
    }
    layers = [{"index": s.layer_index, "method": s.method, "config": s.config} for s in states]
    return write_artifact(directory, model_fingerprint(model), layers, tensors, metadata)


def write_artifact(
    directory: str | os.PathLike,
    fingerprint: dict[str, Any],
    layers: list[dict[str, Any]],
    tensors: dict[str, torch.Tensor],
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Write an artifact directory (tensors keyed ``layers.<index>.<name>``, the JSON config) atomically."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {name: tensor.detach().to("cpu").contiguous() for name, tensor in tensors.items()}
    config = {
        "format_version": FORMAT_VERSION,
        "versions": {"hf_fastattn": __version__, "torch": torch.__version__, "transformers": transformers.__version__},
        "fingerprint": fingerprint,
        "layers": layers,
        "tensors": sorted(tensors),
        "metadata": metadata or {},
    }
    atomic_write(directory / TENSORS_NAME, lambda path: safetensors.torch.save_file(tensors, path), what="artifact")
    atomic_write(
        directory / CONFIG_NAME,
        lambda path: Path(path).write_text(json.dumps(config, indent=2, default=str)),
        what="artifact",
    )
    return directory


def read_artifact(directory: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The JSON config and the tensors of an artifact directory, checked for completeness."""
    directory = Path(directory)
    config_path, tensors_path = directory / CONFIG_NAME, directory / TENSORS_NAME
    for path in (config_path, tensors_path):
        if not path.is_file():
            raise ArtifactError(f"{path} is missing: not an hf_fastattn artifact directory")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as error:
        raise ArtifactError(f"{config_path} is not valid JSON ({error})") from error
    if config.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(
            f"{config_path} has format version {config.get('format_version')!r}; this hf_fastattn reads {FORMAT_VERSION}"
        )
    try:
        tensors = safetensors.torch.load_file(tensors_path)
    except Exception as error:  # safetensors raises several error types for damaged files
        raise ArtifactError(f"{tensors_path} cannot be read ({error})") from error
    if sorted(tensors) != config.get("tensors"):
        raise ArtifactError(f"{tensors_path} does not hold the tensors {config_path} lists")
    return config, tensors


def check_fingerprint(model: nn.Module, config: dict[str, Any], directory: str | os.PathLike) -> None:
    """Raise :class:`ArtifactError` unless the artifact (its JSON ``config``) was made for ``model``'s shapes."""
    expected, actual = config["fingerprint"], model_fingerprint(model)
    if expected != actual:
        differing = sorted(k for k in set(expected) | set(actual) if expected.get(k) != actual.get(k) and k != "hash")
        raise ArtifactError(
            f"artifact {directory} was made for a different model: fields {differing} differ "
            f"(artifact {[expected.get(k) for k in differing]}, model {[actual.get(k) for k in differing]})"
        )


def load_state(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Patch ``model`` as the artifact describes and restore its per-layer tensors; refuses a mismatched model."""
    config, tensors = read_artifact(directory)
    check_fingerprint(model, config, directory)
    layers = config["layers"]
    # The registered name only selects the mask builder, which every method shares; each layer's own entry wins.
    default_method = next((entry["method"] for entry in layers if entry["method"] != "sdpa"), "dense")
    patch(model, default_method, layers={entry["index"]: (entry["method"], entry["config"]) for entry in layers})
    states: dict[int, LayerState] = {state.layer_index: state for state in layer_states(model)}
    device = next(model.parameters()).device
    for name, tensor in tensors.items():
        _, index, tensor_name = name.split(".", 2)
        state = states[int(index)]
        existing = dict(state.named_parameters()) | dict(state.named_buffers())
        if tensor_name in existing:  # created by the method at patch time (e.g. gate weights): fill it in place
            if existing[tensor_name].shape != tensor.shape:
                raise ArtifactError(
                    f"{name} has shape {tuple(tensor.shape)}, the model expects {tuple(existing[tensor_name].shape)}"
                )
            with torch.no_grad():
                existing[tensor_name].copy_(tensor)
        elif "." in tensor_name:
            raise ArtifactError(
                f"{name} belongs to a submodule that fastattn_{state.method} does not create for layer {index}"
            )
        else:
            state.set_tensor(tensor_name, tensor.to(device))
    return model
