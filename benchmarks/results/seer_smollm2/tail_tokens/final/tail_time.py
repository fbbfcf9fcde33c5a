"""fastattn_seer's exact tail (the last t query rows against every key, on the split-KV decode kernels) against dense
causal attention: Llama-3.1-8B attention shape (32 query / 8 KV heads, d128), bf16, batch 1. Eager timings include the
launches' CPU time (a split pass and a merge); CUDA-graph timings are the GPU's.

    python tail_time.py OUT.json
"""

import functools
import json
import sys

import torch
import triton

from hf_fastattn.ops.decode import decode_attention
from hf_fastattn.ops.dense import dense_attention


def main(out_path: str) -> None:
    rows = []
    for seq in (8192, 32768, 65536):
        q = torch.randn(1, 32, seq, 128, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(1, 8, seq, 128, device="cuda", dtype=torch.bfloat16)
        v = torch.randn_like(k)
        dense = functools.partial(dense_attention, q, k, v, causal=True)
        dense_ms = triton.testing.do_bench(dense, warmup=100, rep=300, return_mode="median")
        for tail in (16, 32, 64):
            tail_call = functools.partial(decode_attention, q[:, :, -tail:].contiguous(), k, v)
            eager = triton.testing.do_bench(tail_call, warmup=100, rep=300, return_mode="median")
            with torch.cuda.stream(torch.cuda.Stream()):
                graph = triton.testing.do_bench_cudagraph(tail_call, rep=300, return_mode="median")
            rows.append(
                {"seq": seq, "tail_tokens": tail, "tail_ms_eager": eager, "tail_ms_cuda_graph": graph,
                 "dense_ms": dense_ms}
            )  # fmt: skip
            print(f"N={seq} tail={tail}: eager {eager * 1e3:.1f} us, graph {graph * 1e3:.1f} us, dense "
                  f"{dense_ms:.2f} ms ({100 * graph / dense_ms:.2f}% of dense in a graph)", flush=True)  # fmt: skip
    environment = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__}
    with open(out_path, "w") as handle:
        json.dump({**environment, "command": "python " + " ".join(sys.argv), "rows": rows}, handle, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
