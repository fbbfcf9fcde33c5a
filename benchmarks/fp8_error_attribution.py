"""Which e4m3 rounding costs the FP8 forward its perplexity: SmolLM2 on the held-out essays, on the CPU.

Runs ``fastattn_dense`` with ``fp8=True`` through the plain-PyTorch path, whose FP8 reference rounds the same operands
the kernel does (Q and K per 128-row block, V per channel, P with its 2**8 gain); each variant rounds a subset, with or
without the kernel's Hadamard rotation of Q and K, its smoothing of K (its mean over the sequence removed) and of Q
(each 128-row block's mean removed, its scores added back exactly). No GPU
needed: the reference path is the CPU fallback of the method, and the kernel's own error matches the reference's
(``tests/ops/test_dense_hopper.py``).

    python benchmarks/fp8_error_attribution.py --context 2048 --windows 16
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import hf_fastattn
from hf_fastattn.assets.models import load_model
from hf_fastattn.evaluation.perplexity import perplexity
from hf_fastattn.evaluation.suite import load_eval_text
from hf_fastattn.methods import dense as dense_method
from hf_fastattn.ops.dense.naive import dense_attention_fp8_reference

# name -> (operands rounded to e4m3, Q and K rotated by a Hadamard matrix first, K less its sequence mean first,
# Q less each 128-row block's mean first, with that mean's exact scores added back)
VARIANTS = {
    "none": ((), False, False, False),
    "qk": (("qk",), False, False, False),
    "v": (("v",), False, False, False),
    "p": (("p",), False, False, False),
    "all": (("qk", "v", "p"), False, False, False),
    "qk rotated": (("qk",), True, False, False),
    "all, qk rotated": (("qk", "v", "p"), True, False, False),
    "qk smoothed": (("qk",), False, True, False),
    "all, qk smoothed": (("qk", "v", "p"), False, True, False),
    "qk rotated + smoothed": (("qk",), True, True, False),
    "all, qk rotated + smoothed": (("qk", "v", "p"), True, True, False),  # the kernel with fp8=True
    "qk rotated + smoothed, q smoothed": (("qk",), True, True, True),
    "all, qk rotated + smoothed, q smoothed": (("qk", "v", "p"), True, True, True),  # with fp8="accurate"
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--windows", type=int, default=16, help="non-overlapping windows scored")
    parser.add_argument(
        "--out", type=Path, default=Path("benchmarks/results/dense_hopper_smollm2/fp8_attribution.json")
    )
    args = parser.parse_args()

    torch.manual_seed(0)
    model, tokenizer = load_model("smollm2", device="cpu")
    text = load_eval_text("essays")
    rows, width = [], max(map(len, VARIANTS))
    for name, (rounded, rotate_qk, smooth_k, smooth_q) in VARIANTS.items():
        reference = functools.partial(
            dense_attention_fp8_reference, rounded=rounded, rotate_qk=rotate_qk, smooth_k=smooth_k, smooth_q=smooth_q
        )
        with torch.no_grad(), hf_fastattn.use(model, "dense", fp8=True):
            dense_method.dense_attention_fp8_reference = reference
            try:
                record = perplexity(
                    model, tokenizer, text, context_length=args.context, max_tokens=args.context * args.windows
                )
            finally:
                dense_method.dense_attention_fp8_reference = dense_attention_fp8_reference
        rows.append({"rounded": name, "perplexity": record["perplexity"]})
        print(f"rounded {name:>{width}}: perplexity {record['perplexity']:.4f}", flush=True)
    exact = rows[0]["perplexity"]
    for row in rows:
        row["vs_exact"] = row["perplexity"] / exact
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"command": " ".join(sys.argv), "context": args.context, "rows": rows}, indent=2))
    print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
