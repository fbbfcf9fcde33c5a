"""Selection time at 32k causal, 8 KV heads: row, head, head with calibrated-like weights (0.15-2.3, mean 1)."""
import torch, triton.testing
from hf_fastattn.ops.seer import select_block_lists, selection_density
N = 32768; nb = N // 64
g = torch.Generator("cuda").manual_seed(0)
logits = torch.randn(1, 8, nb, nb, device="cuda", generator=g) * 3
vis = torch.ones(nb, nb, device="cuda", dtype=torch.bool).tril()
log_probs = torch.log_softmax(logits.masked_fill(~vis, float("-inf")), -1)
weights = (0.15, 0.4, 0.7, 0.9, 1.0, 1.2, 1.35, 2.3)
for allocation, hw in (("row", None), ("head", None), ("head", weights)):
    for s in (0.5, 0.8, 0.9):
        kw = dict(seq_q=N, seq_k=N, causal=True, block_size=64, sparsity=s, allocation=allocation)
        if hw: kw["head_weights"] = hw
        f = lambda: select_block_lists(log_probs, **kw)
        sel = f(); d = selection_density(sel, seq_q=N, seq_k=N, causal=True).item()
        ms = triton.testing.do_bench(f, warmup=25, rep=300, return_mode="median")
        print(f"{allocation}{' weighted' if hw else ''} s={s}: {ms:.3f} ms, density {d:.4f}", flush=True)
