"""``exp2`` as the attention kernels compute it, applied elementwise: for measuring the fast exponential's error."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .fwd import softmax_exp2

_BLOCK = 1024


@triton.jit
def _exp2_kernel(X, Y, n, FAST_EXP: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(X + offs, mask=offs < n, other=0.0)
    # A 2-D tile, as in the kernels, so FAST_EXP=1 splits its columns the same way.
    y = softmax_exp2(tl.reshape(x, [BLOCK // 64, 64]), FAST_EXP)
    tl.store(Y + offs, tl.reshape(y, [BLOCK]), mask=offs < n)


def kernel_exp2(x: torch.Tensor, fast_exp: int) -> torch.Tensor:
    """``2**x`` (fp32) through the kernels' :func:`~hf_fastattn.ops.dense.fwd.softmax_exp2` with ``FAST_EXP``."""
    x = x.to(torch.float32).contiguous().view(-1)
    y = torch.empty_like(x)
    _exp2_kernel[(triton.cdiv(x.numel(), _BLOCK),)](x, y, x.numel(), FAST_EXP=fast_exp, BLOCK=_BLOCK)
    return y
