"""Seer diagnostics at 32k causal (32/8 heads, d128): gate cost (eager, CUDA graph, profiler), the sparse kernel per
launch config, all-blocks vs our dense kernel, Flex at 50/80%."""

import json
import os
import sys

import torch
import triton
import triton.testing

sys.path.insert(0, "benchmarks")
import bench_seer as bs

from hf_fastattn.methods.seer import gate_log_probs
from hf_fastattn.ops.dense import dense_attention
from hf_fastattn.ops.seer import attention as seer_attention
from hf_fastattn.ops.seer import block_sparse_attention, select_block_lists, to_block_mask

out_dir = os.environ.get("OUT", "/tmp")
N = 32768
setup = bs.Setup(32, 8, 128, "cuda", False)
torch.manual_seed(0)
q = torch.randn(1, 32, N, 128, device="cuda", dtype=torch.bfloat16)
k = torch.randn(1, 8, N, 128, device="cuda", dtype=torch.bfloat16)
v = torch.randn(1, 8, N, 128, device="cuda", dtype=torch.bfloat16)
results = {}


def bench(fn):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    return triton.testing.do_bench(fn, warmup=25, rep=100, quantiles=[0.5, 0.2, 0.8])


dense_ms = bench(lambda: dense_attention(q, k, v, causal=True))
results["dense_ours"] = dense_ms
print("dense", dense_ms, flush=True)

# --- gate
gate, rotary = bs.library_gate(setup)


def run_gate():
    return gate_log_probs(gate, q, k, causal=True, rotary=rotary)[0]


with torch.no_grad():
    results["gate_eager"] = bench(run_gate)
    print("gate eager", results["gate_eager"], flush=True)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            run_gate()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run_gate()
    results["gate_graph"] = bench(graph.replay)
    print("gate graph", results["gate_graph"], flush=True)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            run_gate()
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40)
    table_cuda = prof.key_averages().table(sort_by="cuda_time_total", row_limit=25)
    with open(f"{out_dir}/gate_profile.txt", "w") as file:
        file.write(table + "\n\n" + table_cuda)
    print(table_cuda, flush=True)
    log_probs = run_gate()

# --- sparse kernel per config, random and gate masks
gen = torch.Generator(device="cuda").manual_seed(0)
configs = [(4, 2), (4, 3), (4, 4), (8, 2), (8, 3), (8, 4), (8, 5)]
for kind in ("random", "gate"):
    scores = bs.block_scores(kind, setup, N, gen)
    for sparsity in (0.0, 0.5, 0.8):
        sel = select_block_lists(scores, seq_q=N, seq_k=N, causal=True, block_size=64, sparsity=sparsity)
        row = {}
        for warps, stages in configs:
            seer_attention._LAUNCH_CONFIGS[:] = [(warps, stages)]
            seer_attention._sparse_tuned = seer_attention._tuned(
                seer_attention._block_sparse_fwd_kernel, [*seer_attention._AUTOTUNE_KEY, "HEADS_PER_PROGRAM"]
            )
            try:
                row[f"w{warps}s{stages}"] = bench(lambda sel=sel: block_sparse_attention(q, k, v, sel, causal=True))
            except Exception as exc:  # noqa: BLE001
                row[f"w{warps}s{stages}"] = repr(exc)[:200]
        if sparsity > 0:
            compiled = torch.compile(bs.flex_attention, dynamic=False)
            mask = to_block_mask(sel, num_q_heads=32, seq_q=N, seq_k=N, causal=True)
            for cfg in ({"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4}, {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 8}):
                try:
                    row[f"flex_w{cfg['num_warps']}"] = bench(
                        lambda cfg=cfg, compiled=compiled, mask=mask: compiled(
                            q, k, v, block_mask=mask, enable_gqa=True, kernel_options=cfg
                        )
                    )
                except Exception as exc:  # noqa: BLE001
                    row[f"flex_w{cfg['num_warps']}"] = repr(exc)[:200]
        results[f"{kind}_{sparsity}"] = row
        print(kind, sparsity, row, flush=True)
        with open(f"{out_dir}/seer_diag.json", "w") as file:
            json.dump(results, file, indent=1)

# --- selection and the gate pipeline in a graph
sel_ms = bench(lambda: select_block_lists(log_probs, seq_q=N, seq_k=N, causal=True, block_size=64, sparsity=0.5))
results["selection"] = sel_ms
with open(f"{out_dir}/seer_diag.json", "w") as file:
    json.dump(results, file, indent=1)
print(json.dumps(results, indent=1))
