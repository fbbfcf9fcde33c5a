"""A/B of the tile-ahead loads: our dense forward and forward+backward with and without an all-ones key mask, and the
FP8 forward (default and ``"accurate"``) next to bf16. Run once per tree, with PYTHONPATH at the tree under test:

    python ab.py TAG [fp8]      # "fp8": the FP8 part only; writes $OUT/ab_TAG.json

``HF_FASTATTN_AUTOTUNE=0`` gives the bf16 kernels the same fixed tiles in both trees (the FP8 forward autotunes).
"""

import functools
import json
import os
import sys

import torch
import triton

from hf_fastattn.ops.dense import dense_attention
from hf_fastattn.ops.dense.fp8 import dense_attention_fp8

DENSE_SHAPES = [(1, 9, 3, 8192, 64), (1, 32, 8, 8192, 128)]  # (batch, query heads, KV heads, N, head dim)
FP8_SEQLENS = (8192, 32768)


def median_ms(fn) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def forward_backward(forward, inputs, dout) -> None:
    torch.autograd.grad(forward(), inputs, dout)


def dense_rows(tag: str, results: dict) -> None:
    for batch, q_heads, kv_heads, seqlen, head_dim in DENSE_SHAPES:
        q = torch.randn(batch, q_heads, seqlen, head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        k, v = (
            torch.randn(batch, kv_heads, seqlen, head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            for _ in range(2)
        )
        dout = torch.randn_like(q)
        all_ones = torch.ones(batch, seqlen, dtype=torch.bool, device="cuda")
        for mask_name, key_padding in (("nopad", None), ("ones", all_ones)):
            forward = functools.partial(dense_attention, q, k, v, causal=True, key_padding=key_padding)
            with torch.no_grad():
                fwd_ms = median_ms(forward)
            fwd_bwd_ms = median_ms(functools.partial(forward_backward, forward, (q, k, v), dout))
            key = f"{q_heads}/{kv_heads} d{head_dim} N{seqlen} causal {mask_name}"
            results[key] = {"fwd_ms": fwd_ms, "fwd_bwd_ms": fwd_bwd_ms}
            print(tag, key, f"fwd {fwd_ms:.3f} ms  fwd+bwd {fwd_bwd_ms:.3f} ms", flush=True)


def fp8_rows(tag: str, results: dict) -> None:
    for seqlen in FP8_SEQLENS:
        batch = max(1, 16384 // seqlen)
        q, k, v = (torch.randn(batch, 32, seqlen, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        for causal in (False, True):
            variants = {
                "bf16": functools.partial(dense_attention, q, k, v, causal=causal),
                "fp8": functools.partial(dense_attention_fp8, q, k, v, causal=causal),
                "fp8_accurate": functools.partial(dense_attention_fp8, q, k, v, causal=causal, smooth_q=True),
            }
            for name, attend in variants.items():
                with torch.no_grad():
                    ms = median_ms(attend)
                key = f"32 d128 N{seqlen} B{batch} causal={causal} {name}"
                results[key] = {"fwd_ms": ms}
                print(tag, key, f"fwd {ms:.3f} ms", flush=True)
        del q, k, v


def main() -> None:
    tag = sys.argv[1]
    results: dict = {}
    torch.manual_seed(0)
    if "fp8" not in sys.argv[2:]:
        dense_rows(tag, results)
    fp8_rows(tag, results)
    with open(os.path.join(os.environ["OUT"], f"ab_{tag}.json"), "w") as file:
        json.dump(results, file, indent=1)


if __name__ == "__main__":
    main()
