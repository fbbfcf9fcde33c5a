"""BSFA benchmark: the kernel at Llama-3.1-8B attention shapes, and whole-model prefill (TTFT), in one run.

Kernel: 32 query heads, 8 KV heads, d128, bf16, batch 1, N = 8k/32k/64k. Thresholds are set per (head, query tile)
to the given quantile of that row's skippable tile maxima (recorded by the kernel itself), so each row skips about
25/50/75% of its skippable P V tiles; the realised fraction is measured from the kernel's counters and reported.
Compared with our dense kernel, SDPA-flash (FA2) and SDPA-cuDNN (GQA through ``enable_gqa``).

TTFT: SmolLM2-135M at 8k with calibrated thresholds (``--smollm2-thresholds DIR``, skipped when the model asset is
missing), and a random-weight model with Llama-3.1-8B's attention and MLP shapes (``--llama-layers`` layers) at 32k,
calibrated on random tokens to ``--ttft-skip`` per layer. Prefill runs ``use_cache=False, logits_to_keep=1``.

    python benchmarks/bench_bsfa.py --out-dir benchmarks/results          # needs a CUDA GPU
    python benchmarks/bench_bsfa.py --seqlens 8192 --skips 0.5 --no-ttft   # part of it
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import triton.testing
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from bench_dense import collect_metadata, describe_error, gpu_slug, markdown_table, number

import hf_fastattn
from hf_fastattn.ops.bsfa import bsfa_attention
from hf_fastattn.ops.bsfa.naive import tile_geometry
from hf_fastattn.ops.dense import dense_attention

DEVICE = "cuda"
Q_HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128
DO_BENCH = {"warmup": 25, "rep": 100, "return_mode": "median"}
TTFT_BENCH = {"warmup": 3, "rep": 20, "return_mode": "median"}


def thresholds_for_skip(q, k, skip: float, block_m: int, block_n: int) -> torch.Tensor:
    """(H_q, M) thresholds at the ``skip`` quantile of each (head, query tile)'s skippable tile maxima."""
    record = bsfa_attention(q, k, k, float("-inf"), causal=True, block_m=block_m, block_n=block_n, record_tile_max=True)
    tile_max = record.tile_max[0]  # (H, M, N)
    num_m, num_n = tile_max.shape[1:]
    visited, always = tile_geometry(
        torch.arange(num_m, device=q.device), num_n, q.shape[2], k.shape[2], block_m, block_n, True
    )
    candidates = tile_max.masked_fill(~(visited & ~always), float("nan"))
    # nanquantile has an input-size limit: one head at a time.
    thresholds = torch.stack([torch.nanquantile(head, skip, dim=-1) for head in candidates])
    return thresholds.nan_to_num(nan=float("-inf"))


def sdpa(backend):
    def attend(q, k, v):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    return attend


def bench(fn) -> float | dict:
    try:
        fn()
        torch.cuda.synchronize()
        return triton.testing.do_bench(fn, **DO_BENCH)
    except Exception as exc:  # noqa: BLE001 - an unsupported backend is a row entry, not the end of the run
        torch.cuda.empty_cache()
        return {"error": describe_error(exc)}


def kernel_rows(args) -> list[dict]:
    rows = []
    for seqlen in args.seqlens:
        rows += seqlen_rows(seqlen, args)
        torch.cuda.empty_cache()
    return rows


def seqlen_rows(seqlen: int, args) -> list[dict]:
    generator = torch.Generator(device=DEVICE).manual_seed(seqlen)
    q, k, v = (
        torch.randn((1, heads, seqlen, HEAD_DIM), device=DEVICE, dtype=torch.bfloat16, generator=generator)
        for heads in (Q_HEADS, KV_HEADS, KV_HEADS)
    )
    tiles = {"block_m": args.block_m, "block_n": args.block_n}
    rows = []
    with torch.no_grad():
        baselines = {
            "fastattn_dense": bench(lambda: dense_attention(q, k, v, causal=True)),
            "sdpa_flash": bench(lambda: sdpa(SDPBackend.FLASH_ATTENTION)(q, k, v)),
            "sdpa_cudnn": bench(lambda: sdpa(SDPBackend.CUDNN_ATTENTION)(q, k, v)),
        }
        dense_out = dense_attention(q, k, v, causal=True)
        for skip in (0.0, *args.skips):
            if skip == 0.0:
                tau = torch.full((Q_HEADS, 1), float("-inf"), device=DEVICE)
            else:
                tau = thresholds_for_skip(q, k, skip, args.block_m, args.block_n)
            result = bsfa_attention(q, k, v, tau, causal=True, **tiles)
            visited, skippable, skipped = result.stats.sum(dim=(0, 1, 2)).tolist()
            ms = bench(functools.partial(bsfa_attention, q, k, v, tau, causal=True, **tiles))
            row = {
                "seqlen": seqlen, "target_skip": skip, "skip_fraction": skipped / max(skippable, 1),
                "density": 1 - skipped / max(visited, 1), "bsfa_ms": ms, "baselines_ms": baselines,
            }  # fmt: skip
            if skip == 0.0:
                row["max_abs_diff_vs_dense"] = (result.out.float() - dense_out.float()).abs().max().item()
            if isinstance(ms, float):
                row["speedup"] = {name: base / ms for name, base in baselines.items() if isinstance(base, float)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def prefill_ms(model, ids) -> float:
    with torch.no_grad():
        return triton.testing.do_bench(lambda: model(ids, use_cache=False, logits_to_keep=1), **TTFT_BENCH)


def ttft_rows(model, ids, thresholds, label: str) -> list[dict]:
    """sdpa, fastattn_dense and bsfa (with ``thresholds``) prefill of ``ids`` on ``model``."""
    from hf_fastattn.evaluation.records import attention_summary, reset_attention_statistics

    rows = []
    for name, method, config in (("sdpa", None, {}), ("fastattn_dense", "dense", {}), ("bsfa", "bsfa", thresholds)):
        if method is None:
            ms = prefill_ms(model, ids)
            density = 1.0
        else:
            with hf_fastattn.use(model, method, **config):
                ms = prefill_ms(model, ids)
                reset_attention_statistics(model)
                with torch.no_grad():
                    model(ids, use_cache=False, logits_to_keep=1)
                density = attention_summary(model)["density"]
        rows.append({"model": label, "seqlen": ids.shape[1], "method": name, "ms": ms, "density": density})
        print(json.dumps(rows[-1]), flush=True)
    sdpa_ms = rows[0]["ms"]
    for row in rows:
        row["speedup_vs_sdpa"] = sdpa_ms / row["ms"]
        row["speedup_vs_fastattn_dense"] = rows[1]["ms"] / row["ms"]
    return rows


def llama8b_rows(args) -> list[dict]:
    from transformers import AutoModelForCausalLM, LlamaConfig

    from hf_fastattn.calibration import calibrate_bsfa

    config = LlamaConfig(
        hidden_size=4096, intermediate_size=14336, num_attention_heads=Q_HEADS, num_key_value_heads=KV_HEADS,
        num_hidden_layers=args.llama_layers, vocab_size=128256, max_position_embeddings=131072, rope_theta=500000.0,
    )  # fmt: skip
    torch.manual_seed(0)
    with torch.device(DEVICE):
        model = AutoModelForCausalLM.from_config(copy.deepcopy(config), dtype=torch.bfloat16).eval()
    model.set_attn_implementation("sdpa")
    ids = torch.randint(0, config.vocab_size, (1, args.llama_seqlen), device=DEVICE)
    calibration = calibrate_bsfa(
        model, ids[0].cpu(), samples=1, sequence_length=args.llama_seqlen, target_skip=args.ttft_skip, progress=False
    )
    rows = ttft_rows(model, ids, {"thresholds": calibration}, f"random Llama-3.1-8B shapes, {args.llama_layers} layers")
    for row in rows:
        row["calibration_seconds"] = calibration.details["seconds"]
    del model
    torch.cuda.empty_cache()
    return rows


def smollm2_rows(args) -> list[dict]:
    from hf_fastattn.assets import AssetUnavailable
    from hf_fastattn.assets.data import load_text
    from hf_fastattn.assets.models import load_model

    try:
        model, tokenizer = load_model("smollm2", dtype=torch.bfloat16, device=DEVICE)
    except AssetUnavailable as error:
        print(f"SmolLM2 TTFT skipped: {error}", flush=True)
        return []
    text = load_text("essays", "eval")
    ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"][:8192]], device=DEVICE)
    config = {"thresholds": args.smollm2_thresholds}
    if args.smollm2_setting:
        key, _, value = args.smollm2_setting.partition("=")
        config[key] = int(value) if value.isdigit() else value
    return ttft_rows(model, ids, config, f"SmolLM2-135M {args.smollm2_setting or 'k=layer'}")


def render(report: dict) -> str:
    meta = report["metadata"]
    lines = [
        f"# BSFA on {meta['gpu']}",
        "",
        (
            f"torch {meta['torch']}, triton {meta['triton']}, transformers {meta['transformers']}, "
            f"hf_fastattn {meta['hf_fastattn']}, {meta['date_utc']}. Command: `{meta['command']}`"
        ),
        "",
        (
            f"## Kernel: causal, {Q_HEADS} query / {KV_HEADS} KV heads, d{HEAD_DIM}, bf16, batch 1, "
            f"tiles {report['tiles']} (do_bench median)"
        ),
        "",
    ]
    body = []
    for row in report["kernel"]:
        base, speed = row["baselines_ms"], row.get("speedup", {})
        body.append([
            str(row["seqlen"]), f"{row['target_skip']:.0%}", f"{row['skip_fraction']:.1%}", f"{row['density']:.3f}",
            number(row["bsfa_ms"] if isinstance(row["bsfa_ms"], float) else None, ".3f"),
            *[number(base[name] if isinstance(base[name], float) else None, ".3f") for name in base],
            *[number(speed.get(name), ".2f", "x") for name in base],
        ])  # fmt: skip
    names = list(report["kernel"][0]["baselines_ms"]) if report["kernel"] else []
    header = ["N", "target skip", "realised skip", "PV density", "bsfa ms", *[f"{n} ms" for n in names]]
    lines += markdown_table(header + [f"vs {n}" for n in names], body)
    if report["ttft"]:
        lines += ["", "## Whole-model prefill (TTFT), `use_cache=False, logits_to_keep=1`", ""]
        body = [
            [row["model"], str(row["seqlen"]), row["method"], number(row["density"], ".3f"), f"{row['ms']:.2f}",
             f"{row['speedup_vs_sdpa']:.2f}x", f"{row['speedup_vs_fastattn_dense']:.2f}x"]
            for row in report["ttft"]
        ]  # fmt: skip
        header = ["model", "N", "attention", "density", "ms", "vs sdpa", "vs fastattn_dense"]
        lines += markdown_table(header, body)
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seqlens", type=int, nargs="+", default=[8192, 32768, 65536])
    parser.add_argument("--skips", type=float, nargs="+", default=[0.25, 0.5, 0.75])
    parser.add_argument("--block-m", type=int, default=128)
    parser.add_argument("--block-n", type=int, default=64)
    parser.add_argument("--no-ttft", action="store_true", help="kernel rows only")
    parser.add_argument("--smollm2-setting", default="", help="e.g. k=16 (default: the artifact's per-layer k)")
    parser.add_argument("--smollm2-thresholds", help="calibration artifact for the SmolLM2 TTFT rows")
    parser.add_argument("--ttft-skip", type=float, default=0.5, help="per-layer skip target of the 8B-shape model")
    parser.add_argument("--llama-layers", type=int, default=4)
    parser.add_argument("--llama-seqlen", type=int, default=32768)
    parser.add_argument("--out-dir", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)
    args.dtype = "bf16"
    if not torch.cuda.is_available():
        raise SystemExit("bench_bsfa.py needs a CUDA GPU")
    # The dense benchmark's batch-shape fields do not describe these runs.
    metadata = collect_metadata(args)
    report = {"metadata": metadata, "tiles": f"{args.block_m}x{args.block_n}", "kernel": [], "ttft": []}
    report["kernel"] = kernel_rows(args)
    if not args.no_ttft:
        if args.smollm2_thresholds:
            report["ttft"] += smollm2_rows(args)
        report["ttft"] += llama8b_rows(args)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = args.out_dir / f"bsfa_{gpu_slug(report['metadata']['gpu'])}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    markdown = render(report)
    stem.with_suffix(".md").write_text(markdown)
    print(markdown)


if __name__ == "__main__":
    main()
