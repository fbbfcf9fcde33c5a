"""The one place where methods are listed and registered with transformers.

Importing :mod:`hf_fastattn` registers each method as ``fastattn_<name>`` with both ``AttentionInterface`` (the
attention function) and ``AttentionMaskInterface`` (its mask builder; without one, transformers silently drops
padding). Names never contain ``flash``, ``sdpa``, ``flex`` or ``paged``, which transformers treats specially.
"""

from __future__ import annotations

from transformers import AttentionInterface, AttentionMaskInterface

from .capabilities import MethodSpec
from .methods import bsfa, dense, lean, seer

_METHOD_MODULES = (dense, bsfa, lean, seer)
METHODS: dict[str, MethodSpec] = {module.SPEC.name: module.SPEC for module in _METHOD_MODULES}
_RESERVED_SUBSTRINGS = ("flash", "sdpa", "flex", "paged", "/")


def get_method(name: str) -> MethodSpec:
    """The spec of a method, by short name (``"dense"``) or registered name (``"fastattn_dense"``)."""
    short = name.removeprefix("fastattn_")
    if short not in METHODS:
        raise KeyError(f"unknown hf_fastattn method {name!r}; available: {sorted(METHODS)}")
    return METHODS[short]


def list_methods() -> list[MethodSpec]:
    return [METHODS[name] for name in sorted(METHODS)]


def register_all() -> None:
    for module in _METHOD_MODULES:
        name = module.SPEC.registered_name
        if any(bad in name for bad in _RESERVED_SUBSTRINGS):
            raise ValueError(f"method name {name!r} contains a substring transformers reserves")
        AttentionInterface.register(name, getattr(module, f"{module.SPEC.name}_attention_forward"))
        AttentionMaskInterface.register(name, module.mask_builder)
