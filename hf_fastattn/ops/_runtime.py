"""Where Triton kernels can run, decided once per tensor device.

Triton kernels run on CUDA tensors, or on CPU tensors when ``TRITON_INTERPRET=1`` (Triton's interpreter executes the
same kernels with NumPy). Anything else takes a method's declared fallback.
"""

from __future__ import annotations

import functools
import os

import torch


def interpreter_enabled() -> bool:
    """True when Triton kernels are interpreted on the CPU (the variable must be set before Triton is imported)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def autotune_enabled() -> bool:
    """Kernels autotune their tiles on first use per shape bucket unless ``HF_FASTATTN_AUTOTUNE=0``."""
    return os.environ.get("HF_FASTATTN_AUTOTUNE", "1") != "0"


@functools.cache
def triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def triton_supports(device: torch.device) -> bool:
    """Whether the Triton kernels can run on tensors living on ``device``."""
    if not triton_importable():
        return False
    if interpreter_enabled():
        return device.type == "cpu"
    return device.type == "cuda"


def next_power_of_2(n: int) -> int:
    return 1 << (max(int(n), 1) - 1).bit_length()


def patch_interpreter_bf16_dot() -> None:
    """Make ``tl.dot`` on bf16 operands correct in Triton's interpreter.

    The interpreter stores bf16 as raw uint16 bits and its ``create_dot`` multiplies those integers (seen in
    triton 3.6-3.9), so every bf16 kernel would return garbage on the CPU. bf16 -> fp32 is exact (a 16-bit shift),
    so widening the operands first gives the product the GPU's fp32-accumulating tensor cores compute.
    """
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    builder_cls = interpreter.InterpreterBuilder
    if getattr(builder_cls, "_hf_fastattn_bf16_dot", False):
        return
    original_create_dot = builder_cls.create_dot

    def widen(handle):
        if handle.dtype.scalar != tl.bfloat16:
            return handle
        bits = handle.data.astype(np.uint32) << 16
        return interpreter.TensorHandle(bits.view(np.float32), tl.float32)

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return original_create_dot(self, widen(a), widen(b), d, input_precision, max_num_imprecise_acc)

    builder_cls.create_dot = create_dot
    builder_cls._hf_fastattn_bf16_dot = True
