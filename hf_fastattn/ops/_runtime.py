"""Where Triton kernels can run, decided once per tensor device.

Triton kernels run on CUDA tensors, or on CPU tensors when ``TRITON_INTERPRET=1`` (Triton's interpreter executes the
same kernels with NumPy). Anything else takes a method's declared fallback.
"""

from __future__ import annotations

import importlib.util
import os

import torch


def interpreter_enabled() -> bool:
    """True when Triton kernels are interpreted on the CPU (the variable must be set before Triton is imported)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def autotune_enabled() -> bool:
    """Kernels autotune their tiles on first use per shape bucket unless ``HF_FASTATTN_AUTOTUNE=0``."""
    return os.environ.get("HF_FASTATTN_AUTOTUNE", "1") != "0"


# Whether Triton is installed, decided once: a plain constant, which torch.compile reads without tracing a cache.
TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def key_padding_bytes(key_padding: torch.Tensor | None) -> torch.Tensor | None:
    """A ``(B, S_kv)`` bool key mask as the uint8 bytes the kernels load. Eager calls reinterpret it (free); under
    torch.compile a cast, because inductor cannot lower a bool-to-uint8 ``view`` (torch 2.11)."""
    if key_padding is None:
        return None
    return key_padding.to(torch.uint8) if torch.compiler.is_compiling() else key_padding.view(torch.uint8)


def triton_supports(device: torch.device) -> bool:
    """Whether the Triton kernels can run on tensors living on ``device``."""
    if not TRITON_INSTALLED:
        return False
    if interpreter_enabled():
        return device.type == "cpu"
    return device.type == "cuda"


def tma_usable(*tensors: torch.Tensor) -> bool:
    """Whether kernels may read these tensors through TMA tensor descriptors.

    ``HF_FASTATTN_TMA``: ``auto`` (default) uses TMA on CUDA GPUs of compute capability 9.0 (Hopper) and newer;
    ``0`` never; ``1`` also in Triton's interpreter (tests). TMA needs 16-byte aligned base pointers and strides.
    """
    mode = os.environ.get("HF_FASTATTN_TMA", "auto")
    if mode == "0":
        return False
    device = tensors[0].device
    if interpreter_enabled():
        wanted = mode == "1"
    else:
        wanted = device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9
    return wanted and all(_tma_aligned(t) for t in tensors)


def _tma_aligned(t: torch.Tensor) -> bool:
    size = t.element_size()
    return t.stride(-1) == 1 and t.data_ptr() % 16 == 0 and all(s * size % 16 == 0 for s in t.stride()[:-1])


def ensure_triton_allocator() -> None:
    """Kernels that build TMA descriptors in-kernel need Triton's scratch allocator; set a torch-backed one unless the
    caller already set theirs."""
    import triton
    from triton.runtime import _allocation

    if isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
        triton.set_allocator(_torch_scratch)


def _torch_scratch(size: int, alignment: int, stream):
    device = "cpu" if interpreter_enabled() else "cuda"
    return torch.empty(size, dtype=torch.int8, device=device)


def next_power_of_2(n: int) -> int:
    return 1 << (max(int(n), 1) - 1).bit_length()


def check_tile_size(name: str, size: int) -> None:
    """Tile sizes are powers of two (``tl.arange``) and at least 16 (the smallest ``tl.dot``); raises ValueError."""
    if size < 16 or size & (size - 1):
        raise ValueError(f"{name} must be a power of two >= 16, got {size}")


def patch_interpreter_low_precision() -> None:
    """Make bf16 and fp8 (e4m3) arithmetic in Triton's interpreter match the GPU's (seen wrong in triton 3.6-3.9).

    The interpreter stores bf16 as raw uint16 bits. Its ``create_dot`` multiplies those integers, so every bf16 kernel
    would return garbage on the CPU: widening the operands to fp32 first (exact, a 16-bit shift) gives the product the
    GPU's fp32-accumulating tensor cores compute. Its fp32 -> bf16 cast truncates, where the GPU rounds to nearest
    even: that bias would make every bf16 rounding inside a kernel cost up to a whole ulp. e4m3 is stored as uint8
    bits with the same dot problem, and its fp32 -> e4m3 cast gets exponents wrong (-126.5 came out as -64); torch's
    conversions, which round to nearest even as the GPU does, stand in for both.
    """
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    builder_cls = interpreter.InterpreterBuilder
    if getattr(builder_cls, "_hf_fastattn_bf16", False):
        return
    original_create_dot = builder_cls.create_dot
    original_cast_impl = builder_cls.cast_impl
    original_create_fp_to_fp = builder_cls.create_fp_to_fp

    def widen(handle):
        if handle.dtype.scalar == tl.float8e4nv:
            values = torch.from_numpy(np.ascontiguousarray(handle.data, dtype=np.uint8)).view(torch.float8_e4m3fn)
            return interpreter.TensorHandle(values.float().numpy(), tl.float32)
        if handle.dtype.scalar != tl.bfloat16:
            return handle
        bits = handle.data.astype(np.uint32) << 16
        return interpreter.TensorHandle(bits.view(np.float32), tl.float32)

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return original_create_dot(self, widen(a), widen(b), d, input_precision, max_num_imprecise_acc)

    def create_fp_to_fp(self, src, dst_type, rounding_mode):
        if src.dtype.scalar != tl.float32 or dst_type.scalar != tl.float8e4nv:
            return original_create_fp_to_fp(self, src, dst_type, rounding_mode)
        values = torch.from_numpy(np.ascontiguousarray(src.data, dtype=np.float32)).to(torch.float8_e4m3fn)
        return interpreter.TensorHandle(values.view(torch.uint8).numpy(), tl.float8e4nv)

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar != tl.float32 or dst_type.scalar != tl.bfloat16:
            return original_cast_impl(self, src, dst_type)
        bits = np.ascontiguousarray(src.data, dtype=np.float32).view(np.uint32)
        rounded = (bits + np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1))) >> 16  # round half to even
        rounded = np.where(np.isnan(src.data), np.uint32(0x7FC0), rounded)
        return interpreter.TensorHandle(rounded.astype(np.uint16), tl.bfloat16)

    builder_cls.create_dot = create_dot
    builder_cls.cast_impl = cast_impl
    builder_cls.create_fp_to_fp = create_fp_to_fp
    builder_cls._hf_fastattn_bf16 = True
