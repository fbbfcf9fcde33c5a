import sys

import torch

sys.path.insert(0, "benchmarks")
from bench_seer_prefill import llama_8b_shaped
from torch.profiler import ProfilerActivity, profile

import hf_fastattn

n = int(sys.argv[1]) if len(sys.argv) > 1 else 32768
model = llama_8b_shaped(4)
ids = torch.randint(0, 1000, (1, n), device="cuda")
for method, cfg in (("dense", {}), ("seer", {"sparsity": 0.0})):
    hf_fastattn.patch(model, method, **cfg)
    with torch.no_grad():
        for _ in range(3):
            model(ids, use_cache=False, logits_to_keep=1)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                model(ids, use_cache=False, logits_to_keep=1)
            torch.cuda.synchronize()
    ka = prof.key_averages()
    print(f"===== {method} n={n}")
    print(ka.table(sort_by="cuda_time_total", row_limit=22, max_name_column_width=60))
    for e in ka:
        if any(
            s in e.key for s in ("Synchronize", "Memcpy", "item", "local_scalar", "cudaMalloc", "nonzero", "is_nonzero")
        ):
            print("SYNC?", e.key, e.count, f"{e.cpu_time_total / 1e3:.2f} ms cpu")
