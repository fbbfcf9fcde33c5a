"""GPU check of the Gluon wgmma forward (gluon_fwd_kernel.py, beside this file): correctness against an fp32
reference, then speed against our Triton forward, SDPA-cuDNN and SDPA-flash (do_bench medians, same run).

Run from the repository root on a Hopper GPU:
    PYTHONPATH=$PWD python benchmarks/results/raw/gluon_overlap/check_gluon_fwd.py out.json
(h100_run1.json is that run, at aa5d4ec, triton 3.6.0, torch 2.11.0+cu130, 2026-11-25.)
"""

import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

from hf_fastattn.ops._runtime import ensure_triton_allocator
from hf_fastattn.ops.dense.attention import _kv_bytes_per_query_head, _schedule, dense_fwd, empty_hf_output

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gluon_fwd_kernel import _dense_fwd_wgmma_kernel

ensure_triton_allocator()
out_path = sys.argv[1]
results = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__, "rows": []}


def gluon_fwd(q, k, v, causal, block_n=128, stages=2, block_m=128, warps=8):
    batch, hq, sq, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    out = empty_hf_output(q)
    lse = torch.empty(batch, hq, sq, device=q.device, dtype=torch.float32)
    group = hq // hkv
    section = _schedule(q.device, causal, batch * hq, _kv_bytes_per_query_head(k, group))
    grid = (triton.cdiv(sq, block_m) * batch * hq,)
    _dense_fwd_wgmma_kernel[grid](
        q,
        k,
        v,
        out,
        lse,
        q.stride(0),
        q.stride(1),
        q.stride(2),
        k.stride(0),
        k.stride(1),
        k.stride(2),
        v.stride(0),
        v.stride(1),
        v.stride(2),
        out.stride(0),
        out.stride(1),
        out.stride(2),
        hq,
        group,
        sq,
        sk,
        1.0 / math.sqrt(d),
        section,
        HEAD_DIM=d,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        NUM_STAGES=stages,
        CAUSAL=causal,
        num_warps=warps,
    )
    return out, lse


def reference(q, k, v, causal):
    group = q.shape[1] // k.shape[1]
    kf = k.float().repeat_interleave(group, 1)
    vf = v.float().repeat_interleave(group, 1)
    s = q.float() @ kf.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if causal:
        sq, sk = q.shape[2], k.shape[2]
        keep = torch.arange(sk, device=q.device)[None, :] <= torch.arange(sq, device=q.device)[:, None] + (sk - sq)
        s = s.masked_fill(~keep, float("-inf"))
    lse = torch.logsumexp(s, -1)
    p = torch.softmax(s, -1).nan_to_num(0.0)
    return p @ vf, lse


CONFIGS = {128: [(128, 2), (64, 2)], 64: [(128, 2), (128, 3)]}
ok = True
print("== correctness", flush=True)
for b, hq, hkv, sq, sk, d, causal in [
    (2, 4, 4, 256, 256, 128, False),
    (1, 4, 2, 1000, 1000, 128, True),
    (2, 6, 2, 77, 301, 64, True),
    (1, 3, 3, 300, 129, 64, True),
    (1, 8, 2, 513, 2049, 128, False),
    (2, 9, 3, 1500, 1500, 64, True),
    (1, 4, 4, 1, 700, 128, True),
]:
    torch.manual_seed(0)
    q = torch.randn(b, sq, hq, d, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
    k = torch.randn(b, hkv, sk, d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(b, hkv, sk, d, device="cuda", dtype=torch.bfloat16)
    ref, ref_lse = reference(q, k, v, causal)
    tri, _ = dense_fwd(q, k, v, None, causal, 1.0 / math.sqrt(d))
    tri_err = (tri.float() - ref).abs().max().item()
    for block_n, stages in CONFIGS[d]:
        out, lse = gluon_fwd(q, k, v, causal, block_n, stages)
        torch.cuda.synchronize()
        err = (out.float() - ref).abs().max().item()
        finite = torch.isfinite(ref_lse)
        lse_err = (lse[finite] - ref_lse[finite]).abs().max().item() if finite.any() else 0.0
        lse_inf_ok = bool((lse[~finite] == float("-inf")).all())
        good = err <= max(2 * tri_err, 2e-2) and lse_err < 1e-2 and lse_inf_ok
        ok &= good
        row = dict(
            kind="correctness",
            b=b,
            hq=hq,
            hkv=hkv,
            sq=sq,
            sk=sk,
            d=d,
            causal=causal,
            block_n=block_n,
            stages=stages,
            max_err=err,
            triton_max_err=tri_err,
            lse_err=lse_err,
            lse_inf_ok=lse_inf_ok,
            ok=good,
        )
        results["rows"].append(row)
        print(row, flush=True)
json.dump(results, open(out_path, "w"), indent=1)
if not ok:
    print("CORRECTNESS FAILED; skipping speed", flush=True)
    sys.exit(1)

print("== speed", flush=True)


def bench(fn):
    return triton.testing.do_bench(fn, warmup=25, rep=100, quantiles=[0.5, 0.2, 0.8])[0]


for d in (128, 64):
    for n in (4096, 8192, 16384):
        for causal in (False, True):
            b = 16384 // n
            h = 32
            q = torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16)
            k = torch.randn_like(q)
            v = torch.randn_like(q)
            flops = 4 * b * h * n * n * d / (2 if causal else 1)
            row = dict(kind="speed", d=d, n=n, b=b, causal=causal)
            t = time.time()
            row["triton_ms"] = bench(lambda: dense_fwd(q, k, v, None, causal, 1.0 / math.sqrt(d)))
            for block_n, stages in CONFIGS[d]:
                row[f"gluon_{block_n}_{stages}_ms"] = bench(lambda: gluon_fwd(q, k, v, causal, block_n, stages))
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                row["cudnn_ms"] = bench(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal))
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                row["flash_ms"] = bench(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal))
            best = min(v_ for k_, v_ in row.items() if k_.startswith("gluon"))
            row["gluon_tflops"] = flops / best / 1e9
            row["gluon_vs_cudnn"] = row["cudnn_ms"] / best
            row["triton_vs_cudnn"] = row["cudnn_ms"] / row["triton_ms"]
            row["gluon_vs_triton"] = row["triton_ms"] / best
            row["secs"] = round(time.time() - t, 1)
            results["rows"].append(row)
            print(row, flush=True)
            json.dump(results, open(out_path, "w"), indent=1)
