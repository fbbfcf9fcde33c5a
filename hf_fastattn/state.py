"""Per-layer state that :func:`hf_fastattn.patch` attaches to every attention module.

The state is an ``nn.Module`` child of the attention module, so its tensors follow ``model.to(...)``. Method tensors
(calibrated thresholds, gates) are registered here: thresholds as non-persistent buffers (kept out of the model's
``state_dict``), trainable gates as parameters of a submodule. :mod:`hf_fastattn.artifacts` saves and loads them.
"""

from __future__ import annotations

import torch
from torch import nn

from .capabilities import DECODE_SETTINGS, MethodSpec

STATE_ATTRIBUTE = "fastattn_state"


class LayerState(nn.Module):
    """Method, configuration and tensors of one attention layer.

    ``layer_index`` is hf_fastattn's own, stable index: the attention module's position in ``model.modules()``
    order. ViT, DINOv2 and BERT-style encoders carry no usable ``layer_idx``, so we never rely on theirs.
    ``spec`` is None for a layer explicitly left on transformers' SDPA. ``decode`` is the layer's decode strategy
    (``"off"``: decode steps run the method's own kernel); ``config`` holds the method's own settings.
    """

    def __init__(self, layer_index: int, spec: MethodSpec | None, config: dict | None = None):
        super().__init__()
        self.layer_index = layer_index
        self.spec = spec
        self.config = dict(config or {})
        self.decode = _decode_setting(spec, self.config.pop("decode", None))
        # Realised-work counters a method accumulates (e.g. BSFA's skipped tiles): device tensors, so nothing
        # synchronises, or plain ints for counts known on the host; not saved. Sums only: a sharded evaluation adds
        # up the processes' counters (hf_fastattn._distributed).
        self.counters: dict[str, torch.Tensor | int] = {}

    def reset_statistics(self) -> None:
        self.counters.clear()

    @property
    def method(self) -> str:
        return self.spec.name if self.spec is not None else "sdpa"

    def set_tensor(self, name: str, tensor: torch.Tensor) -> None:
        """Attach (or replace) a non-persistent buffer that moves with the model and is saved in artifacts."""
        self.register_buffer(name, tensor, persistent=False)

    def artifact_tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor of this layer's state (buffers and parameters), by dotted name."""
        tensors = {name: buf for name, buf in self.named_buffers()}
        tensors.update({name: param.detach() for name, param in self.named_parameters()})
        return tensors

    def extra_repr(self) -> str:
        return f"layer_index={self.layer_index}, method={self.method!r}, decode={self.decode!r}, config={self.config}"


def _decode_setting(spec: MethodSpec | None, requested: str | None) -> str:
    if spec is None:
        return "off"
    if requested is None:
        return spec.default_decode
    if requested not in DECODE_SETTINGS:
        raise ValueError(
            f"unknown decode setting {requested!r} for fastattn_{spec.name}; choose from {DECODE_SETTINGS}"
        )
    if requested != "off" and not spec.capabilities.decode:
        raise ValueError(f"fastattn_{spec.name} does not run the shared decode kernels; use decode='off'")
    return requested
