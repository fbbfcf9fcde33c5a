"""Dense attention benchmark: hf_fastattn's Triton kernel against SDPA (flash, cuDNN) and compiled FlexAttention.

Times forward and forward+backward over head dims x sequence lengths (16384 tokens per batch, 32 heads; or
``--batch``, ``--heads``, ``--kv-heads``) x causal/non-causal, spot-checks our forward against SDPA once per shape, and
measures peak memory at N = 32768 (every N with ``--memory``). Writes ``dense_<gpu>.json`` and ``dense_<gpu>.md`` under
``--out-dir`` after every shape (a run cut short keeps its rows) and prints the markdown at the end.

    python benchmarks/bench_dense.py                              # full grid (needs a CUDA GPU)
    python benchmarks/bench_dense.py --head-dims 128 --modes fwd  # part of it
    python benchmarks/bench_dense.py --dry-run                    # print the plan, runs on CPU
    python benchmarks/bench_dense.py --batch 1 --heads 9 --kv-heads 3 --head-dims 64 --seqlens 4096 8192 \\
        --causal true --providers fastattn_dense fastattn_dense_head_order  # causal schedule vs head-major order
    python benchmarks/bench_dense.py --merge a.json b.json        # combine runs that split the grid, on CPU
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import functools
import gc
import importlib.metadata
import itertools
import json
import os
import shlex
import sys
import unittest.mock
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
import triton.testing
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import hf_fastattn
import hf_fastattn.ops.dense.attention as dense_launchers
from hf_fastattn.ops.dense import dense_attention
from hf_fastattn.ops.dense.fp8 import dense_attention_fp8

DEVICE = "cuda"
TOKENS_PER_BATCH = 16384
HEADS = 32  # query and key/value heads alike (no GQA) unless --heads / --kv-heads
HEAD_DIMS = (64, 128)
SEQLENS = (1024, 2048, 4096, 8192, 16384, 32768)
MODES = ("fwd", "fwd_bwd")
CAUSAL_CHOICES = {"both": (False, True), "false": (False,), "true": (True,)}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
MAX_ABS_ERR = {torch.bfloat16: 0.05, torch.float16: 0.01}
MEMORY_SEQLEN = 32768  # peak memory is always measured here; --memory adds every other N
BWD_FLOP_FACTOR = 3.5  # forward + backward, the backward doing 2.5x the forward's matmul work
DO_BENCH = {"warmup": 25, "rep": 100, "quantiles": [0.5, 0.2, 0.8]}
WARMUP_CALLS = 3  # before do_bench: our first call autotunes, flex's first call compiles

OURS = "fastattn_dense"
BASELINES = ("sdpa_flash", "sdpa_cudnn", "flex")
MEMORY_BASELINES = ("sdpa_flash", "sdpa_cudnn")
MEMORY_PROVIDERS = (OURS, *MEMORY_BASELINES)

Attention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclasses.dataclass(frozen=True)
class Shape:
    head_dim: int
    seqlen: int
    causal: bool
    dtype: torch.dtype
    heads: int = HEADS
    kv_heads: int = HEADS
    fixed_batch: int | None = None  # --batch; None: TOKENS_PER_BATCH sequences' worth of tokens

    @property
    def batch(self) -> int:
        return self.fixed_batch or max(1, TOKENS_PER_BATCH // self.seqlen)  # N = 32768 still needs one sequence

    @property
    def gqa(self) -> bool:
        return self.kv_heads != self.heads

    def flops(self, mode: str) -> float:
        forward = 4 * self.batch * self.heads * self.seqlen**2 * self.head_dim * (0.5 if self.causal else 1.0)
        return forward * (BWD_FLOP_FACTOR if mode == "fwd_bwd" else 1.0)

    def fields(self) -> dict:
        """The shape's columns of a result row."""
        return {
            "head_dim": self.head_dim,
            "seqlen": self.seqlen,
            "batch": self.batch,
            "heads": self.heads,
            "kv_heads": self.kv_heads,
            "causal": self.causal,
            "dtype": str(self.dtype).removeprefix("torch."),
        }

    def __str__(self) -> str:
        heads = f"{self.heads}/{self.kv_heads}" if self.gqa else str(self.heads)
        return f"D={self.head_dim} N={self.seqlen} B={self.batch} H={heads} causal={self.causal}"


# ---------------------------------------------------------------------------------------------------------------
# Providers: factory(shape) -> attention(q, k, v), all in HF layout (B, H, N, D). Set-up runs here, untimed.


def make_fastattn_dense(shape: Shape, **options) -> Attention:
    return functools.partial(dense_attention, causal=shape.causal, **options)


def make_fastattn_dense_without_tma(shape: Shape) -> Attention:
    """Our kernel on its pre-Hopper path (pointer loads, no TMA or warp specialisation), as on an A100."""

    def attend(q, k, v):
        previous = os.environ.get("HF_FASTATTN_TMA")
        os.environ["HF_FASTATTN_TMA"] = "0"
        try:
            return dense_attention(q, k, v, causal=shape.causal)
        finally:
            os.environ.pop("HF_FASTATTN_TMA") if previous is None else os.environ.update(HF_FASTATTN_TMA=previous)

    return attend


def make_fastattn_dense_key_padding(shape: Shape) -> Attention:
    """Our kernel given an all-ones ``(B, N)`` key-padding mask: the cost of per-key masking that a padded batch pays
    (a mask without padding never reaches the kernel from a model: the mask builder drops it)."""
    return make_fastattn_dense(
        shape, key_padding=torch.ones(shape.batch, shape.seqlen, dtype=torch.bool, device=DEVICE)
    )


def head_major_order() -> contextlib.AbstractContextManager:
    """While active, the dense kernels run their programs head by head (no L2 budget: one head per section), as
    before the causal schedule; the baseline that schedule is measured against."""
    return unittest.mock.patch.object(dense_launchers, "section_budget_bytes", lambda device: 0)


def make_sdpa(backend: SDPBackend, shape: Shape) -> Attention:
    def attend(q, k, v):
        # The context picks the forward kernel; autograd then runs that backend's own backward.
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=shape.causal, enable_gqa=shape.gqa)

    return attend


def causal_mask(batch, head, q_idx, kv_idx):
    return q_idx >= kv_idx


def make_flex(shape: Shape) -> Attention:
    # A fresh dynamo cache per shape: past the recompile limit, flex would silently fall back to its slow eager path.
    torch.compiler.reset()
    compiled_flex = torch.compile(flex_attention, dynamic=False)
    block_mask = None
    if shape.causal:
        block_mask = create_block_mask(
            causal_mask, B=None, H=None, Q_LEN=shape.seqlen, KV_LEN=shape.seqlen, device=DEVICE
        )
    return lambda q, k, v: compiled_flex(q, k, v, block_mask=block_mask, enable_gqa=shape.gqa)


def make_fastattn_dense_fp8(shape: Shape, **options) -> Attention:
    """The FP8 (e4m3) forward, quantisation of Q, K and V (and Q smoothing's bias) included in the time. Forward
    only."""
    return functools.partial(dense_attention_fp8, causal=shape.causal, **options)


PROVIDERS: dict[str, Callable[[Shape], Attention]] = {
    OURS: make_fastattn_dense,
    f"{OURS}_head_order": make_fastattn_dense,  # run inside head_major_order (PROVIDER_SCOPES)
    f"{OURS}_no_tma": make_fastattn_dense_without_tma,
    f"{OURS}_key_padding": make_fastattn_dense_key_padding,
    f"{OURS}_fast_exp_half": functools.partial(make_fastattn_dense, fast_exp="half"),
    f"{OURS}_fast_exp_all": functools.partial(make_fastattn_dense, fast_exp="all"),
    f"{OURS}_fp8": make_fastattn_dense_fp8,
    f"{OURS}_fp8_accurate": functools.partial(make_fastattn_dense_fp8, smooth_q=True),
    "sdpa_flash": functools.partial(make_sdpa, SDPBackend.FLASH_ATTENTION),
    "sdpa_cudnn": functools.partial(make_sdpa, SDPBackend.CUDNN_ATTENTION),
    "flex": make_flex,
}
# Context a provider's calls run in, backward included (autograd runs it after the provider's call has returned).
PROVIDER_SCOPES: dict[str, Callable[[], contextlib.AbstractContextManager]] = {f"{OURS}_head_order": head_major_order}
# Our variants that change the backward too; the others are timed in fwd mode only.
BACKWARD_VARIANTS = (f"{OURS}_head_order", f"{OURS}_key_padding")


def provider_scope(name: str) -> contextlib.AbstractContextManager:
    return PROVIDER_SCOPES.get(name, contextlib.nullcontext)()


# ---------------------------------------------------------------------------------------------------------------
# Measurements. Each returns a result dict; a failure becomes {"error": ...} and the run carries on.


@dataclasses.dataclass
class Inputs:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    dout: torch.Tensor

    @property
    def leaves(self) -> list[torch.Tensor]:
        return [self.q, self.k, self.v]

    def clear_grads(self) -> None:
        for tensor in self.leaves:
            tensor.grad = None


def make_inputs(shape: Shape, requires_grad: bool) -> Inputs:
    def randn(heads):
        size = (shape.batch, heads, shape.seqlen, shape.head_dim)
        return torch.randn(size, device=DEVICE, dtype=shape.dtype, requires_grad=requires_grad)

    q, k, v = randn(shape.heads), randn(shape.kv_heads), randn(shape.kv_heads)
    return Inputs(q, k, v, dout=torch.randn_like(q))


def make_step(attend: Attention, inputs: Inputs, mode: str) -> Callable[[], object]:
    if mode == "fwd":
        return lambda: attend(inputs.q, inputs.k, inputs.v)
    return lambda: attend(inputs.q, inputs.k, inputs.v).backward(inputs.dout)


def describe_error(exc: BaseException) -> str:
    return " ".join(f"{type(exc).__name__}: {exc}".split())[:500]


def guarded(measure: Callable[[], dict]) -> dict:
    try:
        return measure()
    except Exception as exc:  # noqa: BLE001 - unsupported shape, OOM, compile error: record it and move on
        torch.cuda.empty_cache()
        return {"error": describe_error(exc)}


def warm_up(step: Callable[[], object], inputs: Inputs) -> None:
    for _ in range(WARMUP_CALLS):
        step()
    inputs.clear_grads()
    torch.cuda.synchronize()


def time_step(attend: Attention, inputs: Inputs, mode: str, flops: float) -> dict:
    step = make_step(attend, inputs, mode)
    warm_up(step, inputs)
    median, p20, p80 = triton.testing.do_bench(step, grad_to_none=inputs.leaves, **DO_BENCH)
    inputs.clear_grads()
    return {"ms": median, "ms_p20": p20, "ms_p80": p80, "tflops": flops / (median * 1e-3) / 1e12}


def peak_memory(attend: Attention, inputs: Inputs, mode: str) -> dict:
    """Peak bytes allocated by one call above what was already live (the inputs), in MiB."""
    step = make_step(attend, inputs, mode)
    warm_up(step, inputs)
    # Garbage left by earlier providers (reference cycles of their graphs) must not be freed inside the measurement:
    # that made the figure drift between runs, once below zero.
    gc.collect()
    gc.disable()
    try:
        torch.cuda.reset_peak_memory_stats()
        allocated_before = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    finally:
        gc.enable()
    inputs.clear_grads()
    return {"peak_mib": (peak - allocated_before) / 2**20}


def spot_check(shape: Shape, variants: dict[str, Attention]) -> dict:
    """Our forward against SDPA (flash, else math) on fresh inputs; with the max and mean error of each of our
    variants (fast exp, FP8: their accuracy cost next to their time)."""
    inputs = make_inputs(shape, requires_grad=False)
    with torch.no_grad():
        ours = dense_attention(inputs.q, inputs.k, inputs.v, causal=shape.causal)
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]):
            reference = F.scaled_dot_product_attention(
                inputs.q, inputs.k, inputs.v, is_causal=shape.causal, enable_gqa=shape.gqa
            )
        errors = {}
        for name, attend in variants.items():
            with provider_scope(name):
                diff = (attend(inputs.q, inputs.k, inputs.v).float() - reference.float()).abs()
            errors[name] = {"max_abs_err": diff.max().item(), "mean_abs_err": diff.mean().item()}
    max_abs_err = (ours.float() - reference.float()).abs().max().item()
    return {"max_abs_err": max_abs_err, "err_ok": max_abs_err <= MAX_ABS_ERR[shape.dtype], "variants": errors}


def ratios(results: dict[str, dict], key: str, baselines, *, ours_over_baseline: bool) -> dict[str, float | None]:
    """ours/baseline (memory) or baseline/ours (speed-up) for each baseline run; None where either side failed."""
    if OURS not in results:
        return {}
    ours = results[OURS].get(key)
    out = {}
    for name in (name for name in baselines if name in results):
        theirs = results[name].get(key)
        if ours is None or theirs is None:
            out[name] = None
        else:
            out[name] = ours / theirs if ours_over_baseline else theirs / ours
    return out


# ---------------------------------------------------------------------------------------------------------------
# The run.


def planned_shapes(args) -> list[Shape]:
    causal_values = CAUSAL_CHOICES[args.causal]
    return [
        Shape(head_dim, seqlen, causal, DTYPES[args.dtype], args.heads, args.kv_heads, args.batch)
        for head_dim, seqlen, causal in itertools.product(args.head_dims, args.seqlens, causal_values)
    ]


def measures_memory(shape: Shape, args) -> bool:
    return args.memory or shape.seqlen == MEMORY_SEQLEN


def build_providers(shape: Shape, names: list[str]) -> dict[str, Attention | dict]:
    """name -> attention, or the {"error": ...} its factory raised."""
    built = {}
    for name in names:
        try:
            built[name] = PROVIDERS[name](shape)
        except Exception as exc:  # noqa: BLE001 - e.g. a block mask that does not fit
            built[name] = {"error": describe_error(exc)}
    return built


def run_or_report(built: Attention | dict, measure: Callable[[Attention], dict]) -> dict:
    return built if isinstance(built, dict) else guarded(lambda: measure(built))


def benchmark_shape(shape: Shape, args, report: dict) -> None:
    print(f"== {shape}", flush=True)
    providers = build_providers(shape, args.providers)
    variants = {name: attend for name, attend in providers.items() if name.startswith(OURS) and callable(attend)}
    check = guarded(lambda: spot_check(shape, variants)) if OURS in args.providers else {}
    if check:
        print(f"   spot check vs sdpa: {format_check(check)}", flush=True)
    for mode in args.modes:
        benchmark_mode(shape, mode, providers, check, args, report)
        torch.cuda.empty_cache()  # the mode's inputs are gone; hand their memory back before the next allocation


def benchmark_mode(shape: Shape, mode: str, providers: dict, check: dict, args, report: dict) -> None:
    inputs = make_inputs(shape, requires_grad=mode == "fwd_bwd")
    flops = shape.flops(mode)
    timings = {}
    for name, built in providers.items():
        if mode != "fwd" and name.startswith(f"{OURS}_") and name not in BACKWARD_VARIANTS:
            continue  # variants that change only the forward (the backward is fastattn_dense's)
        with provider_scope(name):
            timings[name] = run_or_report(built, functools.partial(time_step, inputs=inputs, mode=mode, flops=flops))
        print(f"   {mode:<8} {name:<15} {format_timing(timings[name])}", flush=True)
    report["rows"].append(
        {**shape.fields(), "mode": mode, "tflop": flops / 1e12, "spot_check": check, "providers": timings,
         "speedup_vs": ratios(timings, "ms", BASELINES, ours_over_baseline=False)}
    )  # fmt: skip

    memory_providers = [name for name in MEMORY_PROVIDERS if name in providers]
    if not (measures_memory(shape, args) and memory_providers):
        return
    measure = functools.partial(peak_memory, inputs=inputs, mode=mode)
    peaks = {name: run_or_report(providers[name], measure) for name in memory_providers}
    print(f"   {mode:<8} peak memory: " + ", ".join(f"{n} {format_peak(r)}" for n, r in peaks.items()), flush=True)
    report["memory"].append(
        {**shape.fields(), "mode": mode, "providers": peaks,
         "ratio_ours_vs": ratios(peaks, "peak_mib", MEMORY_BASELINES, ours_over_baseline=True)}
    )  # fmt: skip


def format_check(check: dict) -> str:
    if "error" in check:
        return f"error: {check['error'][:160]}"
    variants = "; ".join(
        f"{name} max {err['max_abs_err']:.4f} mean {err['mean_abs_err']:.2e}" for name, err in check["variants"].items()
    )
    return f"max abs err {check['max_abs_err']:.4f}" + ("" if check["err_ok"] else " FLAGGED") + f" ({variants})"


def format_peak(result: dict) -> str:
    return "error" if "error" in result else f"{result['peak_mib']:.1f} MiB"


def format_timing(result: dict) -> str:
    if "error" in result:
        return f"error: {result['error'][:160]}"
    return f"{result['ms']:9.3f} ms  {result['tflops']:6.1f} TFLOP/s"


def collect_metadata(args) -> dict:
    return {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "transformers": importlib.metadata.version("transformers"),
        "hf_fastattn": getattr(hf_fastattn, "__version__", "unknown"),
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
        "dtype": args.dtype,
        "do_bench": DO_BENCH,
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join(sys.argv),
    }


def grid_metadata(args) -> dict:
    """This benchmark's batch shape (the other benchmarks share :func:`collect_metadata`, not this)."""
    return {
        "tokens_per_batch": TOKENS_PER_BATCH,
        "batch": args.batch,  # None: tokens_per_batch // N
        "heads": args.heads,
        "kv_heads": args.kv_heads,
    }


# ---------------------------------------------------------------------------------------------------------------
# Output.


def gpu_slug(gpu_name: str) -> str:
    return gpu_name.lower().replace(" ", "_")


def ordered_providers(rows: list[dict]) -> list[str]:
    present = {name for row in rows for name in row["providers"]}
    return [name for name in PROVIDERS if name in present]


def markdown_table(header: list[str], body: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(cells) + " |" for cells in body]


def number(value: float | None, fmt: str, suffix: str = "") -> str:
    return "n/a" if value is None else format(value, fmt) + suffix


def check_cell(check: dict) -> str:
    if not check:
        return ""
    if "error" in check:
        return "error"
    return number(check["max_abs_err"], ".4f") + ("" if check["err_ok"] else " FLAGGED")


def shape_cells(row: dict) -> list[str]:
    return [str(row[field]) for field in ("head_dim", "seqlen", "batch", "causal", "mode")]


def timing_table(rows: list[dict]) -> list[str]:
    providers = ordered_providers(rows)
    baselines = [name for name in BASELINES if name in providers] if OURS in providers else []
    header = ["D", "N", "B", "causal", "mode", "max err"]
    header += [f"{name} {unit}" for name in providers for unit in ("ms", "TFLOP/s")]
    header += [f"speed-up vs {name}" for name in baselines]
    body = []
    for row in rows:
        cells = [*shape_cells(row), check_cell(row["spot_check"])]
        for name in providers:
            result = row["providers"].get(name, {})
            cells += [number(result.get("ms"), ".3f"), number(result.get("tflops"), ".1f")]
        cells += [number(row["speedup_vs"].get(name), ".2f", "x") for name in baselines]
        body.append(cells)
    return markdown_table(header, body)


def memory_table(memory_rows: list[dict]) -> list[str]:
    providers = ordered_providers(memory_rows)
    baselines = [name for name in MEMORY_BASELINES if name in providers] if OURS in providers else []
    header = ["D", "N", "B", "causal", "mode"] + [f"{name} MiB" for name in providers]
    header += [f"ours / {name}" for name in baselines]
    body = []
    for row in memory_rows:
        cells = shape_cells(row)
        cells += [number(row["providers"].get(name, {}).get("peak_mib"), ".1f") for name in providers]
        cells += [number(row["ratio_ours_vs"].get(name), ".2f") for name in baselines]
        body.append(cells)
    return markdown_table(header, body)


def error_lines(report: dict) -> list[str]:
    lines = []
    for kind, rows in (("time", report["rows"]), ("memory", report["memory"])):
        for row in rows:
            failures = {name: result for name, result in row["providers"].items() if "error" in result}
            if "error" in row.get("spot_check", {}):
                failures["spot check"] = row["spot_check"]
            where = f"D={row['head_dim']} N={row['seqlen']} causal={row['causal']} {row['mode']}"
            lines += [f"- {kind} {where} `{name}`: {result['error'][:300]}" for name, result in failures.items()]
    return lines


def variant_table(rows: list[dict]) -> list[str]:
    fwd_rows = [row for row in rows if row["mode"] == "fwd" and row["spot_check"].get("variants")]
    if not fwd_rows:
        return []
    names = list(dict.fromkeys(name for row in fwd_rows for name in row["spot_check"]["variants"] if name != OURS))
    header = ["D", "N", "B", "causal", f"{OURS} max / mean err"]
    header += [f"{name} {what}" for name in names for what in ("speed-up", "max / mean err")]
    body = []
    for row in fwd_rows:
        errors, timings = row["spot_check"]["variants"], row["providers"]
        ours_ms = timings.get(OURS, {}).get("ms")
        cells = [str(row[field]) for field in ("head_dim", "seqlen", "batch", "causal")]
        cells.append(error_pair(errors.get(OURS)))
        for name in names:
            ms = timings.get(name, {}).get("ms")
            cells += [number(ours_ms / ms if ours_ms and ms else None, ".2f", "x"), error_pair(errors.get(name))]
        body.append(cells)
    return markdown_table(header, body)


def error_pair(error: dict | None) -> str:
    return "n/a" if error is None else f"{error['max_abs_err']:.4f} / {error['mean_abs_err']:.1e}"


def render_markdown(report: dict) -> str:
    meta = report["metadata"]
    lines = [f"# Dense attention benchmark: {meta['gpu']}", ""]
    lines += [f"- {key}: `{value}`" for key, value in meta.items() if key != "sources"]
    lines += [f"- source run: `{source['command']}` ({source['date_utc']})" for source in meta.get("sources", [])]
    tokens = f"B x N = {meta['tokens_per_batch']} tokens (B = 1 beyond)"
    batch = f"B = {meta['batch']}" if meta.get("batch") else tokens
    lines += [
        "",
        (
            f"{batch}, H = {meta['heads']}, H_kv = {meta.get('kv_heads', meta['heads'])}. "
            f"FLOPs = 4·B·H·N²·D, halved when causal, x{BWD_FLOP_FACTOR} for fwd_bwd. ms is the median of do_bench; "
            "speed-up = baseline ms / fastattn_dense ms (> 1: ours is faster). "
            "max err = max |ours - sdpa| of one forward."
        ),
        "",
        "## Time",
        "",
        *timing_table(report["rows"]),
    ]
    variant_rows = variant_table(report["rows"])
    if variant_rows:
        intro = (
            "Forward time of each variant over fastattn_dense's (> 1: the variant is faster), and its error "
            "against SDPA on the spot-check inputs (max / mean abs)."
        )
        lines += ["", "## Our variants: speed and accuracy", "", intro, "", *variant_rows]
    if report["memory"]:
        lines += ["", "## Peak memory", "", "Peak allocated during one call, above the live inputs.", ""]
        lines += memory_table(report["memory"])
    errors = error_lines(report)
    if errors:
        lines += ["", "## Errors", "", *errors]
    return "\n".join(lines) + "\n"


def write_report(report: dict, out_dir: Path) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"dense_{gpu_slug(report['metadata']['gpu'])}"
    json_path, md_path = stem.with_suffix(".json"), stem.with_suffix(".md")
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    md_path.write_text(render_markdown(report))
    return json_path, md_path


MERGE_MUST_MATCH = ("gpu", "dtype", "torch", "triton", "cuda", "tokens_per_batch", "batch", "heads", "kv_heads")
# The set-up of runs from before --batch and --kv-heads existed.
LEGACY_METADATA = {"batch": None, "kv_heads": HEADS}


def row_key(row: dict) -> tuple:
    return tuple(row[field] for field in ("head_dim", "seqlen", "causal", "mode", "dtype"))


def merge_reports(paths: list[Path]) -> dict:
    """One report from several runs of one set-up; a later file's row replaces an earlier one with the same key."""
    reports = [json.loads(path.read_text()) for path in paths]
    for field in MERGE_MUST_MATCH:
        values = {str(report["metadata"].get(field, LEGACY_METADATA.get(field))) for report in reports}
        if len(values) != 1:
            raise SystemExit(f"refusing to merge runs with different {field}: {sorted(values)}")
    rows, memory = {}, {}
    for report in reports:
        rows.update((row_key(row), row) for row in report["rows"])
        memory.update((row_key(row), row) for row in report["memory"])
    metadata = {**reports[-1]["metadata"], "command": shlex.join(sys.argv)}
    metadata["sources"] = [
        {"file": path.name, "command": report["metadata"]["command"], "date_utc": report["metadata"]["date_utc"]}
        for path, report in zip(paths, reports)
    ]
    return {"metadata": metadata, "rows": sorted(rows.values(), key=row_key),
            "memory": sorted(memory.values(), key=row_key)}  # fmt: skip


def print_plan(args) -> None:
    heads = f"H = {args.heads}, H_kv = {args.kv_heads}"
    print(f"dry run: {args.dtype}, {heads}, providers {', '.join(args.providers)}, modes {', '.join(args.modes)}")
    header = ["D", "N", "B", "causal", "mode", "GFLOP", "peak memory"]
    body = [
        [str(shape.head_dim), str(shape.seqlen), str(shape.batch), str(shape.causal), mode,
         f"{shape.flops(mode) / 1e9:.0f}", "yes" if measures_memory(shape, args) else ""]
        for shape in planned_shapes(args)
        for mode in args.modes
    ]  # fmt: skip
    print("\n".join(markdown_table(header, body)))
    print(f"{len(body)} rows x {len(args.providers)} providers = {len(body) * len(args.providers)} timings")


def positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--head-dims", type=int, nargs="+", default=list(HEAD_DIMS), metavar="D")
    parser.add_argument("--seqlens", type=int, nargs="+", default=list(SEQLENS), metavar="N",
                        help=f"B = {TOKENS_PER_BATCH} // N (at least 1) unless --batch")  # fmt: skip
    parser.add_argument("--batch", type=positive_int, metavar="B", help="B at every N")
    parser.add_argument("--heads", type=positive_int, default=HEADS, metavar="H", help="query heads")
    parser.add_argument("--kv-heads", type=positive_int, metavar="H_KV", help="key/value heads (default: --heads)")
    parser.add_argument("--causal", choices=list(CAUSAL_CHOICES), default="both")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--providers", nargs="+", choices=list(PROVIDERS), default=list(PROVIDERS))
    parser.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    parser.add_argument("--memory", action="store_true", help=f"peak memory at every N, not only N = {MEMORY_SEQLEN}")
    parser.add_argument("--out-dir", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--dry-run", action="store_true", help="print the planned grid and exit (no GPU needed)")
    parser.add_argument("--merge", type=Path, nargs="+", metavar="JSON",
                        help="combine these result files into one report under --out-dir (no GPU needed)")  # fmt: skip
    args = parser.parse_args(argv)
    if any(n <= 0 for n in args.seqlens):
        parser.error("--seqlens must be positive")
    if args.kv_heads is None:
        args.kv_heads = args.heads
    if args.heads % args.kv_heads:
        parser.error("--heads must be a multiple of --kv-heads")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.dry_run:
        print_plan(args)
        return
    if args.merge:
        report = merge_reports(args.merge)
    else:
        if not torch.cuda.is_available():
            raise SystemExit("bench_dense.py needs a CUDA GPU; --dry-run prints the plan without one")
        report = {"metadata": {**collect_metadata(args), **grid_metadata(args)}, "rows": [], "memory": []}
        for shape in planned_shapes(args):
            benchmark_shape(shape, args, report)
            write_report(report, args.out_dir)
    json_path, md_path = write_report(report, args.out_dir)
    print()
    print(render_markdown(report), flush=True)
    print(f"wrote {json_path} and {md_path}", flush=True)


if __name__ == "__main__":
    main()
