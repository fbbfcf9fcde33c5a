"""Experiment: needle grid with the last query block kept dense (a post-processed selection), 4-epoch gates."""

import dataclasses
import sys

from hf_fastattn.evaluation.suite import run_eval
from hf_fastattn.methods import seer
from hf_fastattn.ops.seer import selection_from_mask, selection_mask, visible_blocks

real = seer._KERNELS.select


def select_dense_tail(scores, *, seq_q, seq_k, causal, block_size, **kw):
    selection = real(scores, seq_q=seq_q, seq_k=seq_k, causal=causal, block_size=block_size, **kw)
    mask = selection_mask(selection)
    visible, _ = visible_blocks(seq_q, seq_k, causal=causal, block_size=block_size, device=scores.device)
    mask[..., -1, :] = visible[-1]
    return selection_from_mask(mask, seq_q=seq_q, seq_k=seq_k, causal=causal, block_size=block_size)


seer._KERNELS = dataclasses.replace(seer._KERNELS, select=select_dense_tail)
out, gates, budgets = sys.argv[1:4]
result = run_eval(
    "niah",
    model="smollm2",
    methods=["seer:sparsity=0.5", f"seer:sparsity=0.5:budgets={budgets}", "seer:sparsity=0.5:allocation=head"],
    method_config={"seer": {"gates": gates}},
    output_dir=out,
    progress=False,
)
