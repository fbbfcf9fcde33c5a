"""SeerAttention end to end: whole-model prefill of a Llama-3.1-8B-shaped model (random weights, a few layers, bf16),
so the gate's cost is measured where it runs, inside a forward whose other layers keep the GPU busy.

Configurations, on the same model and the same tokens, one forward without cache (``logits_to_keep=1``):
* ``sdpa`` (transformers' own) and ``fastattn_dense``;
* ``seer`` at sparsity 0: every visible block is computed, so against ``fastattn_dense`` the difference is the gate,
  the selection and the block-sparse kernel's indexing; this is the gate overhead in a real prefill;
* ``seer`` at the benchmark's sparsities (fresh gates: the selections are as dense as asked, their quality is not
  the point here).
The overhead is reported as a fraction of the model's dense attention time: ``layers x`` our dense kernel alone at
the same shape. Timing: ``triton.testing.do_bench`` medians over ``--rep-ms`` per configuration.

    python benchmarks/bench_seer_prefill.py --out "$OUT/seer_prefill_{gpu}.json"
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import shlex
import sys
from pathlib import Path

import torch
import triton
import triton.testing

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from bench_decode import LLAMA8B
from bench_dense import gpu_slug, markdown_table

import hf_fastattn
from hf_fastattn.ops.dense import dense_attention


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seqlen", type=int, default=32768)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.5, 0.8, 0.9])
    parser.add_argument(
        "--rep-ms",
        type=float,
        default=3000.0,
        help="do_bench time per configuration (a forward "
        "takes 50-200 ms, so do_bench's default 100 ms would time one or two)",
    )
    parser.add_argument("--out", default="seer_prefill_{gpu}.json", help="JSON path ({gpu} is filled in); .md beside")
    return parser.parse_args(argv)


def llama_8b_shaped(layers: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(num_hidden_layers=layers, attn_implementation="sdpa", **LLAMA8B)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).to(device="cuda", dtype=torch.bfloat16).eval()


def bench(fn, rep_ms: float) -> float:
    return triton.testing.do_bench(fn, warmup=max(25, rep_ms / 10), rep=rep_ms, return_mode="median")


def dense_kernel_time(n: int, rep_ms: float) -> float:
    """Our dense causal kernel alone on one layer's attention (32 / 8 heads, d128)."""
    q = torch.randn(1, 32, n, 128, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(1, 8, n, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    return bench(lambda: dense_attention(q, k, v, causal=True), rep_ms)


def time_forward(model, ids, rep_ms: float) -> float:
    with torch.no_grad():
        for _ in range(2):  # the first call autotunes our kernels
            model(ids, use_cache=False, logits_to_keep=1)
        torch.cuda.synchronize()
        return bench(lambda: model(ids, use_cache=False, logits_to_keep=1), rep_ms)


def main(argv=None) -> None:
    args = parse_args(argv)
    model = llama_8b_shaped(args.layers)
    n = args.seqlen
    ids = torch.randint(0, model.config.vocab_size, (1, n), device="cuda", generator=torch.Generator("cuda"))
    dense_kernel_ms = dense_kernel_time(n, args.rep_ms)

    rows = {}
    assert model.config._attn_implementation == "sdpa"
    rows["sdpa"] = time_forward(model, ids, args.rep_ms)
    hf_fastattn.patch(model, "dense")
    assert model.config._attn_implementation == "fastattn_dense"
    rows["fastattn_dense"] = time_forward(model, ids, args.rep_ms)
    for sparsity in [0.0, *args.sparsities]:
        hf_fastattn.patch(model, "seer", sparsity=sparsity)
        assert model.config._attn_implementation == "fastattn_seer"
        rows[f"seer sparsity={sparsity:g}"] = time_forward(model, ids, args.rep_ms)
        print(f"seer {sparsity}: {rows[f'seer sparsity={sparsity:g}']:.2f} ms", flush=True)

    dense_attention_ms = args.layers * dense_kernel_ms
    overhead_ms = rows["seer sparsity=0"] - rows["fastattn_dense"]
    report = {
        "environment": {
            "gpu": torch.cuda.get_device_name(),
            "torch": torch.__version__,
            "triton": triton.__version__,
            "transformers": importlib.metadata.version("transformers"),
            "hf_fastattn": hf_fastattn.__version__,
        },
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join(["python", *sys.argv]),
        "shape": {"seqlen": n, "layers": args.layers, "q_heads": 32, "kv_heads": 8, "head_dim": 128, "causal": True},
        "prefill_ms": rows,
        "dense_kernel_ms_per_layer": dense_kernel_ms,
        "gate_overhead": {"ms": overhead_ms, "fraction_of_dense_attention": overhead_ms / dense_attention_ms},
    }
    out = Path(args.out.format(gpu=gpu_slug(torch.cuda.get_device_name())))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    table = markdown_table(
        ["configuration", "prefill ms", "vs fastattn_dense", "vs sdpa"],
        [
            [name, f"{ms:.2f}", f"{rows['fastattn_dense'] / ms:.2f}x", f"{rows['sdpa'] / ms:.2f}x"]
            for name, ms in rows.items()
        ],
    )
    lines = [
        f"# SeerAttention prefill, Llama-3.1-8B-shaped, {args.layers} layers, {n} tokens",
        "",
        (
            f"{report['environment']['gpu']} · torch {torch.__version__} · triton {triton.__version__} · "
            f"transformers {report['environment']['transformers']} · {report['date']} · `{report['command']}`"
        ),
        "",
        *table,
        "",
        (
            f"Dense attention in this model: {args.layers} x {dense_kernel_ms:.2f} ms (our dense kernel alone). Gate "
            f"overhead (seer at sparsity 0 minus fastattn_dense): {overhead_ms:.2f} ms = "
            f"{report['gate_overhead']['fraction_of_dense_attention']:.1%} of it."
        ),
    ]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
