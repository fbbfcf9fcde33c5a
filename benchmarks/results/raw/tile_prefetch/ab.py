"""A/B of the per-tile prefetch: dense fwd (and fwd+bwd) with and without an all-ones key mask; FP8 accurate/default.
Run with PYTHONPATH at the tree under test and HF_FASTATTN_AUTOTUNE=0 (the same fixed tiles in both trees)."""
import json, os, sys
import torch, triton
from hf_fastattn.ops.dense import dense_attention
from hf_fastattn.ops.dense.fp8 import dense_attention_fp8

tag = sys.argv[1]
out = {}
torch.manual_seed(0)
def bench(fn):
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
dense_shapes = [] if "fp8" in sys.argv[2:] else [(1, 9, 3, 8192, 64), (1, 32, 8, 8192, 128)]
for (b, hq, hkv, n, d) in dense_shapes:
    q = torch.randn(b, hq, n, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(b, hkv, n, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(b, hkv, n, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    pad = torch.ones(b, n, dtype=torch.bool, device="cuda")
    do = torch.randn_like(q)
    for name, kp in (("nopad", None), ("ones", pad)):
        with torch.no_grad():
            fwd = bench(lambda: dense_attention(q, k, v, causal=True, key_padding=kp))
        def fb():
            o = dense_attention(q, k, v, causal=True, key_padding=kp)
            torch.autograd.grad(o, (q, k, v), do)
        fwdbwd = bench(fb)
        key = f"{hq}/{hkv} d{d} N{n} causal {name}"
        out[key] = {"fwd_ms": fwd, "fwd_bwd_ms": fwdbwd}
        print(tag, key, f"fwd {fwd:.3f} ms  fwd+bwd {fwdbwd:.3f} ms", flush=True)
for n in (8192, 32768):
    b = 16384 // n if n <= 16384 else 1
    q, k, v = (torch.randn(b, 32, n, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    for causal in (False, True):
        for mode, kw in (("bf16", None), ("fp8", {}), ("fp8_accurate", {"smooth_q": True})):
            with torch.no_grad():
                if kw is None:
                    ms = bench(lambda: dense_attention(q, k, v, causal=causal))
                else:
                    ms = bench(lambda: dense_attention_fp8(q, k, v, causal=causal, **kw))
            key = f"32 d128 N{n} B{b} causal={causal} {mode}"
            out[key] = {"fwd_ms": ms}
            print(tag, key, f"fwd {ms:.3f} ms", flush=True)
    del q, k, v
json.dump(out, open(os.path.join(os.environ["OUT"], f"ab_{tag}.json"), "w"), indent=1)
