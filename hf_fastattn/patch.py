"""Swap a model's attention for hf_fastattn methods: ``patch``, ``unpatch`` and the ``use`` context manager.

``patch`` sets the model's attention implementation to ``fastattn_<method>`` (so transformers builds our masks) and
attaches a :class:`~hf_fastattn.state.LayerState` to every attention module, in model order. Per-layer assignment
overrides the method or its configuration for chosen layer indices; ``"sdpa"`` leaves a layer on transformers' SDPA.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

from torch import nn

from .registry import get_method
from .state import STATE_ATTRIBUTE, LayerState

# A per-layer entry: a method name, or (method name, config overrides).
LayerAssignment = str | tuple[str, Mapping[str, Any]]
_PREVIOUS_IMPLEMENTATION = "_fastattn_previous_attn_implementation"


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The modules that call transformers' attention interface, in model order (this order is the layer index).

    Every target architecture's attention module carries ``scaling`` and ``is_causal`` and dispatches through
    ``ALL_ATTENTION_FUNCTIONS``; state modules attached by hf_fastattn are skipped.
    """
    return [
        module
        for module in model.modules()
        if not isinstance(module, LayerState) and hasattr(module, "scaling") and hasattr(module, "is_causal")
    ]


def patch(
    model: nn.Module,
    method: str = "dense",
    *,
    layers: Mapping[int, LayerAssignment] | None = None,
    **config: Any,
) -> nn.Module:
    """Run ``model``'s attention with ``method`` (e.g. ``"dense"``); returns the model, patched in place.

    ``config`` is the method's configuration for every layer. ``layers`` maps layer indices to another method name,
    ``"sdpa"``, or ``(method, config_overrides)``. Patching an already patched model replaces its assignment.
    """
    modules = attention_modules(model)
    if not modules:
        raise ValueError(
            f"{type(model).__name__} has no attention module that dispatches through transformers' "
            "AttentionInterface (transformers >= 5.0 is required)"
        )
    default_spec = get_method(method)
    layers = dict(layers or {})
    unknown = sorted(set(layers) - set(range(len(modules))))
    if unknown:
        raise ValueError(f"layer indices {unknown} out of range: the model has {len(modules)} attention layers")

    previous_states = [getattr(module, STATE_ATTRIBUTE, None) for module in modules]
    for index, module in enumerate(modules):
        spec, layer_config = default_spec, dict(config)
        if index in layers:
            name, overrides = _split_assignment(layers[index])
            spec = None if name == "sdpa" else get_method(name)
            layer_config.update(overrides)
        state = LayerState(index, spec, layer_config)
        reference = next(module.parameters(), None)
        if reference is not None:
            state.to(reference.device)
        setattr(module, STATE_ATTRIBUTE, state)

    states = layer_states(model)
    try:
        specs = {state.spec.name: state.spec for state in states if state.spec is not None}
        for spec in (spec for spec in specs.values() if spec.prepare is not None):
            spec.prepare(model, [state for state in states if state.spec is spec])
    except Exception:
        # A bad configuration (e.g. unreadable thresholds) leaves the model exactly as it was.
        for module, state in zip(modules, previous_states):
            if state is None:
                delattr(module, STATE_ATTRIBUTE)
            else:
                setattr(module, STATE_ATTRIBUTE, state)
        raise

    if not hasattr(model, _PREVIOUS_IMPLEMENTATION):
        setattr(model, _PREVIOUS_IMPLEMENTATION, model.config._attn_implementation)
    _set_implementation(model, default_spec.registered_name)
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Remove every hf_fastattn state and restore the attention implementation the model had before ``patch``."""
    for module in model.modules():
        if isinstance(getattr(module, STATE_ATTRIBUTE, None), LayerState):
            delattr(module, STATE_ATTRIBUTE)
    previous = getattr(model, _PREVIOUS_IMPLEMENTATION, None)
    if previous is not None:
        _set_implementation(model, previous)
        delattr(model, _PREVIOUS_IMPLEMENTATION)
    return model


@contextlib.contextmanager
def use(
    model: nn.Module, method: str = "dense", *, layers: Mapping[int, LayerAssignment] | None = None, **config: Any
) -> Iterator[nn.Module]:
    """``with hf_fastattn.use(model, "dense"):`` patches for the block, then restores the model exactly as it was."""
    saved_states = {module: getattr(module, STATE_ATTRIBUTE, None) for module in attention_modules(model)}
    saved_implementation = model.config._attn_implementation
    saved_previous = getattr(model, _PREVIOUS_IMPLEMENTATION, None)
    patch(model, method, layers=layers, **config)
    try:
        yield model
    finally:
        unpatch(model)
        for module, state in saved_states.items():
            if state is not None:
                setattr(module, STATE_ATTRIBUTE, state)
        _set_implementation(model, saved_implementation)
        if saved_previous is not None:
            setattr(model, _PREVIOUS_IMPLEMENTATION, saved_previous)


def layer_states(model: nn.Module) -> list[LayerState]:
    """The attached states, in layer order (empty if the model is not patched)."""
    states = [getattr(module, STATE_ATTRIBUTE, None) for module in attention_modules(model)]
    return [state for state in states if isinstance(state, LayerState)]


def _split_assignment(assignment: LayerAssignment) -> tuple[str, Mapping[str, Any]]:
    if isinstance(assignment, str):
        return assignment, {}
    name, overrides = assignment
    return name, overrides


def _set_implementation(model: nn.Module, name: str) -> None:
    """Switch the attention implementation and check that it took (``set_attn_implementation`` may only warn)."""
    model.set_attn_implementation(name)
    if model.config._attn_implementation != name:
        raise RuntimeError(
            f"transformers refused to switch {type(model).__name__} to {name!r} "
            f"(it kept {model.config._attn_implementation!r})"
        )
