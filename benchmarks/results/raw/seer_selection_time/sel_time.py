"""Selection time at 32k causal, 8 KV heads: row, head, head with calibrated-like weights (0.15-2.3, mean 1)."""

import torch
import triton.testing

from hf_fastattn.ops.seer import select_block_lists, selection_density

N = 32768
NB = N // 64
WEIGHTS = (0.15, 0.4, 0.7, 0.9, 1.0, 1.2, 1.35, 2.3)

generator = torch.Generator("cuda").manual_seed(0)
logits = torch.randn(1, 8, NB, NB, device="cuda", generator=generator) * 3
visible = torch.ones(NB, NB, device="cuda", dtype=torch.bool).tril()
log_probs = torch.log_softmax(logits.masked_fill(~visible, float("-inf")), -1)
for allocation, head_weights in (("row", None), ("head", None), ("head", WEIGHTS)):
    for sparsity in (0.5, 0.8, 0.9):
        kw = {"seq_q": N, "seq_k": N, "causal": True, "block_size": 64, "sparsity": sparsity, "allocation": allocation}
        if head_weights:
            kw["head_weights"] = head_weights

        def select(kw=kw):
            return select_block_lists(log_probs, **kw)

        density = selection_density(select(), seq_q=N, seq_k=N, causal=True).item()
        ms = triton.testing.do_bench(select, warmup=25, rep=300, return_mode="median")
        label = f"{allocation}{' weighted' if head_weights else ''}"
        print(f"{label} s={sparsity}: {ms:.3f} ms, density {density:.4f}", flush=True)
