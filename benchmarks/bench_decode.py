"""Decode attention benchmark: a few query tokens per sequence against a long KV cache, kernel and ``generate()``.

Kernel grid: batch {1, 4, 16} x KV length {8k, 32k, 128k, 512k} x heads {32/8 d128, 32/8 d64, 9/3 d64 (SmolLM2),
9/3 d128}, q_len 1 (``--q-lens`` adds more; causal, bottom-right), bf16. hf_fastattn's decode kernels (strategies
single, split, streamk and auto) against SDPA (flash, cuDNN, ``enable_gqa``) and compiled FlexAttention. GB/s counts
K and V read once and is compared with a device-to-device copy measured at the start of the run.

End-to-end: greedy ``generate()`` decode tokens/s of SmolLM2-135M (8k prompt from the essays) and of a random-weight
model with Llama-3.1-8B's shapes (32k random-token prompt), transformers' SDPA against our patches, and whether the
greedy tokens match eager (SmolLM2) or SDPA (8B shapes).

``--tune`` instead sweeps the split and stream-K kernels' tiles, warps, stages and programs per SM at a few shapes.

Writes ``decode_<gpu>.json`` and ``.md`` (``decode_tune_<gpu>`` with ``--tune``) under ``--out-dir`` after every
shape and model, so a run cut short keeps its rows, and prints the markdown at the end.

    python benchmarks/bench_decode.py --out-dir "$OUT"                       # kernel grid + generate(); CUDA GPU
    python benchmarks/bench_decode.py --no-e2e --batches 1 --kv-lens 32768    # part of the kernel grid
    python benchmarks/bench_decode.py --e2e-only --e2e-models smollm2         # generate() only
    python benchmarks/bench_decode.py --tune --max-configs 12                  # config sweep
    python benchmarks/bench_decode.py --dry-run [--tune]                      # print the plan, runs on CPU
    python benchmarks/bench_decode.py --merge a.json b.json                   # combine runs, on CPU
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import functools
import itertools
import json
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
import triton.testing
from torch.backends.cuda import SDPAParams, can_use_flash_attention
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right
from torch.nn.attention.flex_attention import create_block_mask, flex_attention
from transformers.generation.streamers import BaseStreamer

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from bench_dense import collect_metadata, describe_error, gpu_slug, markdown_table, number

import hf_fastattn

DEVICE = "cuda"
BATCHES = (1, 4, 16)
KV_LENS = (8192, 32768, 131072, 524288)
HEAD_CONFIGS = ((32, 8, 128), (32, 8, 64), (9, 3, 64), (9, 3, 128))  # (query heads, KV heads, head dim)
Q_LENS = (1,)
MAX_Q_LEN = 16  # hf_fastattn.ops.decode.DECODE_MAX_QUERY, not imported so that --dry-run needs no kernels
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
MAX_ABS_ERR = {torch.bfloat16: 2e-2, torch.float16: 5e-3}
MAX_KV_GB = 40.0
DO_BENCH = {"warmup": 25, "rep": 100, "quantiles": [0.5, 0.2, 0.8]}
WARMUP_CALLS = 3  # before do_bench: the first call compiles (flex) or JITs the Triton kernels
MAX_ROTATION = 8  # input copies cycled through by the CUDA-graph timing (see rotation_inputs)
GRAPH_PASSES = 20
GRAPH_REPLAYS = 10
COPY_BYTES = 2**30  # size of the copy-bandwidth source (the destination is as large)

# --tune: shapes and the kernel keywords swept (decode_attention's own keyword names).
TUNE_BATCHES = (1,)
TUNE_KV_LENS = (8192, 32768, 131072)
TUNE_HEAD_CONFIGS = ((32, 8, 128), (9, 3, 64))
TUNE_STRATEGIES = ("split", "streamk")
BLOCK_NS, NUM_WARPS, NUM_STAGES, PROGRAMS_PER_SM = (32, 64, 128), (4, 8), (2, 3, 4), (1, 2, 3)

# End-to-end: name -> (hf_fastattn method, patch config), None for the model left on transformers' SDPA.
E2E_METHODS: dict[str, tuple[str, dict] | None] = {
    "sdpa": None,
    "fastattn_dense_decode_off": ("dense", {"decode": "off"}),  # our prefill kernel also runs the decode steps
    "fastattn_dense": ("dense", {}),  # decode="auto"
    "fastattn_lean": ("lean", {}),  # decode="streamk"
}
E2E_MODELS = ("smollm2", "llama8b")
E2E_CACHES = ("dynamic", "static")
TOKEN_CHECK_METHODS = ("fastattn_lean", "fastattn_dense")
LLAMA8B = {
    "hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32, "num_key_value_heads": 8,
    "vocab_size": 128256, "max_position_embeddings": 131072, "rope_theta": 500000.0,
}  # fmt: skip

BASELINE = "sdpa_flash"
BASELINES = ("sdpa_flash", "sdpa_cudnn", "flex")
STRATEGY_OF = {"fastattn_single": "single", "fastattn_split": "split", "fastattn_streamk": "streamk",
               "fastattn_auto": "auto"}  # fmt: skip
AUTO = "fastattn_auto"

Attention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclasses.dataclass(frozen=True)
class Shape:
    batch: int
    seq_k: int
    q_heads: int
    kv_heads: int
    head_dim: int
    seq_q: int
    dtype: torch.dtype

    @property
    def kv_bytes(self) -> int:
        """K and V read once: what a decode step must move, q and the output being negligible."""
        return 2 * self.batch * self.kv_heads * self.seq_k * self.head_dim * self.dtype.itemsize

    def fields(self) -> dict:
        return {
            "batch": self.batch, "seq_k": self.seq_k, "q_heads": self.q_heads, "kv_heads": self.kv_heads,
            "head_dim": self.head_dim, "seq_q": self.seq_q, "dtype": str(self.dtype).removeprefix("torch."),
            "kv_gb": self.kv_bytes / 1e9,
        }  # fmt: skip

    def __str__(self) -> str:
        return f"B={self.batch} N_kv={self.seq_k} H={self.q_heads}/{self.kv_heads} D={self.head_dim} q_len={self.seq_q}"


def planned_shapes(args) -> list[Shape]:
    return [
        Shape(batch, seq_k, q_heads, kv_heads, head_dim, seq_q, DTYPES[args.dtype])
        for (q_heads, kv_heads, head_dim), batch, seq_k, seq_q in itertools.product(
            args.head_configs, args.batches, args.kv_lens, args.q_lens
        )
    ]


def fits(shape: Shape, args) -> bool:
    return shape.kv_bytes <= args.max_kv_gb * 1e9


def make_inputs(shape: Shape) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator(device=DEVICE).manual_seed(shape.seq_k + shape.batch)

    def randn(heads: int, seq: int) -> torch.Tensor:
        size = (shape.batch, heads, seq, shape.head_dim)
        return torch.randn(size, device=DEVICE, dtype=shape.dtype, generator=generator)

    return randn(shape.q_heads, shape.seq_q), randn(shape.kv_heads, shape.seq_k), randn(shape.kv_heads, shape.seq_k)


# ---------------------------------------------------------------------------------------------------------------
# Providers: factory(shape) -> attention(q, k, v) in HF layout (B, H, S, D), GQA without repeating K/V.


def flash_runs_lower_right(shape: Shape) -> bool:
    """Whether CausalBias can reach flash (else it silently takes the memory-efficient kernel or a dense mask)."""
    probe = [torch.empty((1, heads, seq, shape.head_dim), device=DEVICE, dtype=shape.dtype)
             for heads, seq in ((shape.q_heads, shape.seq_q), (shape.kv_heads, 8), (shape.kv_heads, 8))]  # fmt: skip
    return can_use_flash_attention(SDPAParams(*probe, None, 0.0, False, True))


def make_sdpa_flash(shape: Shape) -> Attention:
    mask = None
    if shape.seq_q > 1:
        # SDPA's is_causal is top-left; a lower-right CausalBias calls flash with flash's own bottom-right causality.
        if not flash_runs_lower_right(shape):
            raise RuntimeError("not applicable: flash cannot run lower-right causal attention for this shape")
        mask = causal_lower_right(shape.seq_q, shape.seq_k)

    def attend(q, k, v):
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)

    return attend


def make_sdpa_cudnn(shape: Shape) -> Attention:
    mask = None
    if shape.seq_q > 1:  # cuDNN has no bottom-right causal flag: a boolean (S_q, S_kv) mask, or cuDNN refuses
        ones = torch.ones((shape.seq_q, shape.seq_k), dtype=torch.bool, device=DEVICE)
        mask = ones.tril(diagonal=shape.seq_k - shape.seq_q)

    def attend(q, k, v):
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)

    return attend


def make_flex(shape: Shape) -> Attention:
    # A fresh dynamo cache per shape: past the recompile limit, flex would silently fall back to its slow eager path.
    torch.compiler.reset()
    compiled_flex = torch.compile(flex_attention, dynamic=False)
    block_mask = None
    if shape.seq_q > 1:
        offset = shape.seq_k - shape.seq_q

        def bottom_right_causal(batch, head, q_idx, kv_idx):
            return q_idx + offset >= kv_idx

        block_mask = create_block_mask(
            bottom_right_causal, B=None, H=None, Q_LEN=shape.seq_q, KV_LEN=shape.seq_k, device=DEVICE
        )
    return lambda q, k, v: compiled_flex(q, k, v, block_mask=block_mask, enable_gqa=True)


def make_fastattn(strategy: str, **tuning) -> Attention:
    """decode_attention with ``strategy``; ``tuning`` overrides the launch (block_n, num_warps, ...)."""
    # Imported here so that --help, --dry-run and --merge work without the decode kernels.
    from hf_fastattn.ops.decode import decode_attention

    return functools.partial(decode_attention, strategy=strategy, **tuning)


def fastattn_provider(strategy: str) -> Callable[[Shape], Attention]:
    return lambda shape: make_fastattn(strategy)  # the op plans its launch from the tensors themselves


PROVIDERS: dict[str, Callable[[Shape], Attention]] = {
    "sdpa_flash": make_sdpa_flash,
    "sdpa_cudnn": make_sdpa_cudnn,
    "flex": make_flex,
    **{name: fastattn_provider(strategy) for name, strategy in STRATEGY_OF.items()},
}


def decode_plan(shape: Shape, strategy: str, **tuning) -> dict:
    """plan_decode's launch for ``strategy`` at ``shape`` (the concrete strategy, splits, grid, tiles), as JSON."""
    from hf_fastattn.ops.decode import plan_decode

    plan = plan_decode(shape.batch, shape.q_heads, shape.kv_heads, shape.seq_q, shape.seq_k, shape.head_dim,
                       torch.device(DEVICE), strategy, **tuning)  # fmt: skip
    return json.loads(json.dumps(dataclasses.asdict(plan), default=str))


# ---------------------------------------------------------------------------------------------------------------
# Measurements. A failure becomes {"error": ...} and the run carries on.


def guarded(measure: Callable[[], dict]) -> dict:
    try:
        return measure()
    except Exception as exc:  # noqa: BLE001 - unsupported shape, OOM, compile error: record it and move on
        torch.cuda.empty_cache()
        return {"error": describe_error(exc)}


def copy_bandwidth() -> dict:
    """Device-to-device copy of a large bf16 tensor, bytes read + written: the achievable streaming bandwidth."""
    src = torch.randn(COPY_BYTES // 2, device=DEVICE, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    median, p20, p80 = triton.testing.do_bench(functools.partial(dst.copy_, src), **DO_BENCH)
    moved = 2 * src.nbytes
    del src, dst
    torch.cuda.empty_cache()
    gbps = moved / (median * 1e-3) / 1e9
    return {"bytes": moved, "ms": median, "ms_p20": p20, "ms_p80": p80, "gbps": gbps, "tbps": gbps / 1e3}


def rotation_inputs(inputs, shape: Shape) -> list[tuple[torch.Tensor, ...]]:
    """``inputs`` plus copies, so that one pass over all of them is at least twice the L2 cache: a decode step reads
    a K/V cache that is not in L2 (the previous layer's was), and timing one small cache in a loop would not."""
    l2_bytes = torch.cuda.get_device_properties(DEVICE).L2_cache_size
    copies = min(MAX_ROTATION, -(-2 * l2_bytes // shape.kv_bytes))
    return [inputs] + [tuple(t.clone() for t in inputs) for _ in range(copies - 1)]


def graph_ms(attend: Attention, rotation) -> tuple[float, float, float]:
    """GPU time per call, without launch overhead: one CUDA graph holds ``GRAPH_PASSES`` passes over the rotation;
    median, p20, p80 over ``GRAPH_REPLAYS`` replays."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for inputs in rotation:  # warm-up off the capture, as torch.cuda.graph requires
            attend(*inputs)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(GRAPH_PASSES):
            for inputs in rotation:
                attend(*inputs)
    calls = GRAPH_PASSES * len(rotation)
    times = []
    for _ in range(GRAPH_REPLAYS):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / calls)
    del graph
    p20, median, p80 = (float(x) for x in torch.tensor(times).quantile(torch.tensor([0.2, 0.5, 0.8])))
    return median, p20, p80


def measure(
    build: Callable[[], Attention], rotation, shape: Shape, copy_gbps: float
) -> tuple[dict, torch.Tensor | None]:
    """(timing, output of the first call) of the attention ``build()`` returns; ({"error"}, None) if it fails.

    ``ms`` is the GPU time from a CUDA graph (the kernel's own speed); ``eager_ms`` the do_bench median of plain calls,
    which adds the Python and launch overhead when that exceeds the GPU time."""
    inputs = rotation[0]
    try:
        attend = build()
        output = attend(*inputs)
        for _ in range(WARMUP_CALLS - 1):
            attend(*inputs)
        torch.cuda.synchronize()
        median, p20, p80 = graph_ms(attend, rotation)
        eager = triton.testing.do_bench(lambda: attend(*inputs), **DO_BENCH)[0]
    except Exception as exc:  # noqa: BLE001 - see guarded
        torch.cuda.empty_cache()
        return {"error": describe_error(exc)}, None
    gbps = shape.kv_bytes / (median * 1e-3) / 1e9
    result = {"ms": median, "ms_p20": p20, "ms_p80": p80, "eager_ms": eager, "gbps": gbps}
    return {**result, "copy_fraction": gbps / copy_gbps}, output


def spot_check(output: torch.Tensor | None, reference: torch.Tensor | None, dtype: torch.dtype) -> dict:
    """max |output - sdpa_flash|; empty when either failed (the failure is recorded with its timing)."""
    if output is None or reference is None:
        return {}
    max_abs_err = (output.float() - reference.float()).abs().max().item()
    return {"max_abs_err": max_abs_err, "err_ok": max_abs_err <= MAX_ABS_ERR[dtype]}  # NaN is not ok


def speedups(results: dict[str, dict]) -> dict[str, float | None]:
    """sdpa_flash ms / provider ms for every other provider (> 1: faster than sdpa_flash)."""
    base = results.get(BASELINE, {}).get("ms")
    return {
        name: None if base is None or "ms" not in result else base / result["ms"]
        for name, result in results.items()
        if name != BASELINE
    }


def auto_vs_best_baseline(results: dict[str, dict]) -> dict:
    """fastattn_auto against the fastest baseline that ran at this shape."""
    timed = {name: results[name]["ms"] for name in BASELINES if "ms" in results.get(name, {})}
    if not timed or "ms" not in results.get(AUTO, {}):
        return {}
    best = min(timed, key=timed.get)
    return {"baseline": best, "speedup": timed[best] / results[AUTO]["ms"]}


def benchmark_shape(shape: Shape, args, copy_gbps: float, report: dict) -> None:
    print(f"== {shape} (K+V {shape.kv_bytes / 1e9:.2f} GB)", flush=True)
    row = shape.fields()
    if not fits(shape, args):
        print(f"   skipped: K+V above --max-kv-gb {args.max_kv_gb}", flush=True)
        report["rows"].append({**row, "skipped": "memory"})
        return
    try:
        inputs = make_inputs(shape)
    except Exception as exc:  # noqa: BLE001 - e.g. out of memory: the shape's row says so
        torch.cuda.empty_cache()
        report["rows"].append({**row, "error": describe_error(exc)})
        return
    rotation = rotation_inputs(inputs, shape)
    results, outputs = {}, {}
    for name in args.providers:
        results[name], outputs[name] = measure(functools.partial(PROVIDERS[name], shape), rotation, shape, copy_gbps)
        print(f"   {name:<17} {format_timing(results[name])}", flush=True)
    ours = [name for name in args.providers if name in STRATEGY_OF]
    row["plans"] = {name: guarded(functools.partial(decode_plan, shape, STRATEGY_OF[name])) for name in ours}
    row["spot_check"] = {name: spot_check(outputs[name], outputs.get(BASELINE), shape.dtype) for name in ours}
    row["providers"] = results
    row["speedup_vs_sdpa_flash"] = speedups(results)
    row["auto_vs_best_baseline"] = auto_vs_best_baseline(results)
    if AUTO in row["plans"]:
        print(f"   auto plan: {plan_cell(row['plans'][AUTO])}", flush=True)
    print("   spot check vs sdpa_flash: " + ", ".join(f"{n} {check_cell(c)}" for n, c in row["spot_check"].items()))
    report["rows"].append(row)
    del inputs, outputs, rotation
    torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------------------------
# --tune: one row per (shape, strategy, config); the kernel's defaults ("default", no overrides) come first.


def tune_configs(strategy: str, args) -> list[dict]:
    """The swept keyword overrides of ``strategy``, evenly thinned to ``--max-configs``."""
    sweep = {"block_n": args.block_ns, "num_warps": args.num_warps, "num_stages": args.num_stages,
             "tma": args.tma, "pdl": args.pdl}  # fmt: skip
    if strategy == "streamk":
        sweep["programs_per_sm"] = args.programs_per_sm
    elif strategy == "split":
        sweep["num_splits"] = args.num_splits
    # None (e.g. --num-splits' default) leaves that keyword to the kernel's own heuristic.
    configs = [
        {key: value for key, value in zip(sweep, values) if value is not None}
        for values in itertools.product(*sweep.values())
    ]
    if args.max_configs is not None and len(configs) > args.max_configs:
        configs = [configs[i * len(configs) // args.max_configs] for i in range(args.max_configs)]
    return configs


def tune_shape(shape: Shape, args, copy_gbps: float, report: dict) -> None:
    start = time.perf_counter()
    print(f"== tune {shape} (K+V {shape.kv_bytes / 1e9:.2f} GB)", flush=True)
    entry = {**shape.fields(), "configs": []}
    report["tune"].append(entry)
    if not fits(shape, args):
        entry["error"] = "skipped: memory"
        return
    try:
        inputs = make_inputs(shape)
    except Exception as exc:  # noqa: BLE001 - the shape's entry records it
        torch.cuda.empty_cache()
        entry["error"] = describe_error(exc)
        return
    rotation = rotation_inputs(inputs, shape)
    entry[BASELINE], reference = measure(functools.partial(make_sdpa_flash, shape), rotation, shape, copy_gbps)
    print(f"   {BASELINE:<8} {format_timing(entry[BASELINE])}", flush=True)
    for strategy in args.strategies:
        for overrides in [None, *tune_configs(strategy, args)]:  # None: the kernel's defaults
            tuning = overrides or {}
            result, output = measure(functools.partial(make_fastattn, strategy, **tuning), rotation, shape, copy_gbps)
            row = {"strategy": strategy, "config": tuning, "default": overrides is None, **result,
                   "plan": guarded(functools.partial(decode_plan, shape, strategy, **tuning)),
                   "spot_check": spot_check(output, reference, shape.dtype)}  # fmt: skip
            entry["configs"].append(row)
            print(f"   {strategy:<8} {config_label(row):<56} {format_timing(result)}", flush=True)
    entry["seconds"] = time.perf_counter() - start
    print(f"   shape done in {entry['seconds']:.0f} s", flush=True)
    del inputs, reference, rotation
    torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------------------------
# End-to-end generate(): prefill up to the first new token and decode tokens/s over the N after it, timed inside one
# generate() by a streamer (StepClock); medians of --e2e-runs.


def attention_method(model, name: str):
    """Context in which ``model`` runs ``name``; the model must be on its reference implementation outside."""
    spec = E2E_METHODS[name]
    return contextlib.nullcontext() if spec is None else hf_fastattn.use(model, spec[0], **spec[1])


def greedy(model, prompt: torch.Tensor, new_tokens: int, pad_token_id: int | None, cache: str, **extra) -> torch.Tensor:
    """``cache``: "dynamic" (DynamicCache, eager decode) or "static" (StaticCache: on CUDA, transformers compiles the
    decode step, CUDA graphs included). ``extra`` goes to ``generate`` (the step clock)."""
    static = {"cache_implementation": "static"} if cache == "static" else {}
    # min_new_tokens holds the length fixed (no early end of sequence), so every method does the same work.
    return model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                          min_new_tokens=new_tokens, do_sample=False, pad_token_id=pad_token_id, **static, **extra)  # fmt: skip


class StepClock(BaseStreamer):
    """A ``generate`` streamer that notes the wall-clock time of every token it is handed (the prompt first, then each
    new token), the GPU synchronised first. generate() already waits for each step's token to decide whether to stop,
    so the synchronisation adds no stall of its own."""

    def __init__(self):
        self.times: list[float] = []

    def put(self, value) -> None:
        torch.cuda.synchronize()
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def timed_generate(model, prompt, new_tokens: int, pad_token_id, cache: str) -> tuple[float, float]:
    """``(prefill s, decode s per token)`` of one greedy generate() of ``new_tokens + 1`` tokens: the prefill runs
    from the call to the first new token, decode over the ``new_tokens`` after it, both timed inside the same call, so
    the prefill's variance does not leak into the per-token figure."""
    clock = StepClock()
    torch.cuda.synchronize()
    start = time.perf_counter()
    greedy(model, prompt, new_tokens + 1, pad_token_id, cache, streamer=clock)
    if len(clock.times) != new_tokens + 2:
        raise RuntimeError(
            f"generate() streamed {len(clock.times)} times, expected the prompt and {new_tokens + 1} tokens"
        )
    first_token, last_token = clock.times[1], clock.times[-1]
    return first_token - start, (last_token - first_token) / new_tokens


def generate_row(model, prompt, pad_token_id, name: str, cache: str, args) -> dict:
    # Compiled decode: a fresh dynamo state per method, so switching methods never runs into the recompile limit.
    torch._dynamo.reset()
    with attention_method(model, name):
        implementation = model.config._attn_implementation
        timed_generate(model, prompt, args.new_tokens, pad_token_id, cache)  # warm-up: Triton JIT, compilation
        torch.cuda.reset_peak_memory_stats()
        runs = [timed_generate(model, prompt, args.new_tokens, pad_token_id, cache) for _ in range(args.e2e_runs)]
        peak = torch.cuda.max_memory_allocated()
    prefill_s = statistics.median(prefill for prefill, _ in runs)
    decode_s = statistics.median(per_token for _, per_token in runs)
    return {
        "attn_implementation": implementation, "prefill_ms": prefill_s * 1e3,
        "decode_ms_per_token": decode_s * 1e3, "decode_tokens_per_s": 1 / decode_s,
        "peak_gib": peak / 2**30, "runs_s": [{"prefill": prefill, "decode_per_token": per_token} for prefill, per_token in runs],
    }  # fmt: skip


def throughput_rows(model, prompt, pad_token_id, label: str, args, report: dict) -> None:
    for cache in args.e2e_caches:
        baseline = None
        for name in args.e2e_methods:
            row = {"model": label, "prompt_tokens": prompt.shape[1], "new_tokens": args.new_tokens, "method": name,
                   "cache": cache}  # fmt: skip
            row.update(guarded(functools.partial(generate_row, model, prompt, pad_token_id, name, cache, args)))
            if name == "sdpa" and "error" not in row:
                baseline = row
            if baseline is not None and "error" not in row:
                row["decode_speedup_vs_sdpa"] = baseline["decode_ms_per_token"] / row["decode_ms_per_token"]
                row["prefill_speedup_vs_sdpa"] = baseline["prefill_ms"] / row["prefill_ms"]
            report["e2e"].append(row)
            print(json.dumps({key: value for key, value in row.items() if key != "runs_s"}), flush=True)
            torch.cuda.empty_cache()
            write_report(report, args.out_dir)


def first_difference(reference: list[int], tokens: list[int]) -> int | None:
    """Index of the first differing new token, None if the sequences are identical."""
    for index, (expected, actual) in enumerate(zip(reference, tokens)):
        if expected != actual:
            return index
    return None if len(reference) == len(tokens) else min(len(reference), len(tokens))


def token_check_rows(model, prompt, pad_token_id, label: str, reference_name: str, args, report: dict,
                     note: str = "") -> None:  # fmt: skip
    """Greedy new tokens of each TOKEN_CHECK_METHODS patch, with each of --e2e-cache, against the model's current
    implementation with a DynamicCache."""

    def new_tokens(cache: str) -> list[int]:
        return greedy(model, prompt, args.check_tokens, pad_token_id, cache)[0, prompt.shape[1] :].tolist()

    base = {"model": label, "prompt_tokens": prompt.shape[1], "new_tokens": args.check_tokens,
            "reference": reference_name, "note": note}  # fmt: skip
    try:
        reference = new_tokens("dynamic")
    except Exception as exc:  # noqa: BLE001 - no reference, no comparison
        torch.cuda.empty_cache()
        report["token_check"].append({**base, "method": reference_name, "error": describe_error(exc)})
        return
    methods = [name for name in TOKEN_CHECK_METHODS if name in args.e2e_methods]
    for cache, name in itertools.product(args.e2e_caches, methods):
        row = {**base, "method": name, "cache": cache}
        torch._dynamo.reset()
        try:
            with attention_method(model, name):
                tokens = new_tokens(cache)
        except Exception as exc:  # noqa: BLE001 - see guarded
            torch.cuda.empty_cache()
            row["error"] = describe_error(exc)
        else:
            difference = first_difference(reference, tokens)
            row.update(identical=difference is None, first_difference=difference)
        report["token_check"].append(row)
        print(f"   token check: {token_check_line(row)}", flush=True)
    write_report(report, args.out_dir)


def smollm2_e2e(args, report: dict) -> None:
    from hf_fastattn.assets import AssetUnavailable
    from hf_fastattn.assets.data import load_text
    from hf_fastattn.assets.models import load_model

    try:
        model, tokenizer = load_model("smollm2", dtype=torch.bfloat16, device=DEVICE)
    except AssetUnavailable as error:
        report["notes"].append(f"SmolLM2-135M skipped: {describe_error(error)}")
        print(report["notes"][-1], flush=True)
        return
    token_ids = tokenizer(load_text("essays", "eval"), add_special_tokens=False)["input_ids"]
    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    model.set_attn_implementation("sdpa")
    prompt = torch.tensor([token_ids[: args.smollm2_prompt]], device=DEVICE)
    throughput_rows(model, prompt, pad_token_id, "SmolLM2-135M", args, report)
    model.set_attn_implementation("eager")
    prompt = torch.tensor([token_ids[: args.check_prompt]], device=DEVICE)
    token_check_rows(model, prompt, pad_token_id, "SmolLM2-135M", "eager", args, report)
    del model
    torch.cuda.empty_cache()


def llama8b_e2e(args, report: dict) -> None:
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(num_hidden_layers=args.llama_layers, **LLAMA8B)
    torch.manual_seed(0)
    with torch.device(DEVICE):
        model = AutoModelForCausalLM.from_config(copy.deepcopy(config), dtype=torch.bfloat16).eval()
    model.set_attn_implementation("sdpa")
    generator = torch.Generator(device=DEVICE).manual_seed(0)
    prompt = torch.randint(0, config.vocab_size, (1, args.llama_prompt), device=DEVICE, generator=generator)
    label = f"random Llama-3.1-8B shapes, {args.llama_layers} layers"
    throughput_rows(model, prompt, config.eos_token_id, label, args, report)
    note = "eager attention at this length would hold O(N²) weights per layer: the reference is sdpa"
    token_check_rows(model, prompt, config.eos_token_id, label, "sdpa", args, report, note)
    del model
    torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------------------------
# Output.


def metadata(args, bandwidth: dict) -> dict:
    meta = {k: v for k, v in collect_metadata(args).items() if k != "do_bench"}
    return {**meta, "sm_count": torch.cuda.get_device_properties(DEVICE).multi_processor_count, "do_bench": DO_BENCH,
            "copy_bandwidth": bandwidth, "max_kv_gb": args.max_kv_gb}  # fmt: skip


def format_timing(result: dict) -> str:
    if "error" in result:
        return f"error: {result['error'][:160]}"
    return (
        f"{result['ms']:9.4f} ms  {result['gbps']:7.1f} GB/s  ({result['copy_fraction']:.0%} of copy)  "
        f"eager {result['eager_ms']:.4f} ms"
    )


def check_cell(check: dict) -> str:
    if not check:
        return "n/a"
    return f"{check['max_abs_err']:.2e}" + ("" if check["err_ok"] else " FLAGGED")


def plan_cell(plan: dict) -> str:
    if not plan or "error" in plan:
        return "error" if plan else ""
    grid = "x".join(str(size) for size in plan["grid"])
    return f"{plan['strategy']}, splits {plan['splits_per_segment']}, grid {grid}"


def short(name: str) -> str:
    return name.removeprefix("fastattn_")


def shape_cells(row: dict) -> list[str]:
    return [str(row["batch"]), str(row["seq_k"]), f"{row['q_heads']}/{row['kv_heads']}", str(row["head_dim"]),
            str(row["seq_q"])]  # fmt: skip


SHAPE_HEADER = ["B", "N_kv", "H_q/H_kv", "D", "q_len"]


def present(rows: list[dict], names) -> list[str]:
    seen = {name for row in rows for name in row.get("providers", {})}
    return [name for name in names if name in seen]


def worst_check(row: dict) -> str:
    """The largest fastattn error of the row, with the providers above the threshold."""
    checks = {name: check for name, check in row.get("spot_check", {}).items() if "max_abs_err" in check}
    if not checks:
        return "n/a"
    worst = max(check["max_abs_err"] for check in checks.values())
    flagged = [short(name) for name, check in checks.items() if not check["err_ok"]]
    return f"{worst:.2e}" + (f" FLAGGED ({', '.join(flagged)})" if flagged else "")


def kernel_tables(rows: list[dict]) -> list[str]:
    timed = [row for row in rows if "providers" in row]
    providers = present(timed, PROVIDERS)
    ours = [name for name in providers if name in STRATEGY_OF]
    header = [*SHAPE_HEADER, "auto plan", "max err"] + [f"{name} ms" for name in providers]
    header += [f"{short(name)} speed-up" for name in ours] + ["auto vs best baseline"]
    body = []
    for row in timed:
        cells = [*shape_cells(row), plan_cell(row["plans"].get(AUTO, {})), worst_check(row)]
        cells += [number(row["providers"].get(name, {}).get("ms"), ".4f") for name in providers]
        cells += [number(row["speedup_vs_sdpa_flash"].get(name), ".2f", "x") for name in ours]
        best = row["auto_vs_best_baseline"]
        cells.append(f"{best['speedup']:.2f}x ({best['baseline']})" if best else "n/a")
        body.append(cells)
    lines = ["## Kernel: GPU time (ms, CUDA graph, median)", "", *markdown_table(header, body)]

    header = [*SHAPE_HEADER] + [f"{name} eager ms" for name in providers]
    body = [
        [*shape_cells(row)] + [number(row["providers"].get(name, {}).get("eager_ms"), ".4f") for name in providers]
        for row in timed
    ]
    lines += ["", "## Eager calls: time with Python and launch overhead (ms, do_bench median)", ""]
    lines += markdown_table(header, body)

    header = [*SHAPE_HEADER, "K+V GB"] + [f"{name} GB/s" for name in providers]
    header += [f"{short(name)} % copy" for name in ours]
    body = []
    for row in timed:
        results = row["providers"]
        cells = [*shape_cells(row), f"{row['kv_gb']:.2f}"]
        cells += [number(results.get(name, {}).get("gbps"), ".0f") for name in providers]
        cells += [number(results.get(name, {}).get("copy_fraction"), ".0%") for name in ours]
        body.append(cells)
    lines += ["", "## Kernel: bandwidth (K and V read once)", "", *markdown_table(header, body)]
    skipped = [" ".join(shape_cells(row)) for row in rows if row.get("skipped")]
    if skipped:
        lines += ["", "Skipped for memory (B N_kv H_q/H_kv D q_len): " + "; ".join(skipped)]
    return lines


def e2e_table(rows: list[dict]) -> list[str]:
    header = ["model", "prompt", "cache", "method", "attention", "prefill ms", "decode ms/token", "decode tok/s",
              "decode vs sdpa", "prefill vs sdpa", "peak GiB"]  # fmt: skip
    body = [
        [row["model"], str(row["prompt_tokens"]), row.get("cache", "dynamic"), row["method"],
         row.get("attn_implementation", "error"),
         number(row.get("prefill_ms"), ".1f"), number(row.get("decode_ms_per_token"), ".2f"),
         number(row.get("decode_tokens_per_s"), ".1f"), number(row.get("decode_speedup_vs_sdpa"), ".2f", "x"),
         number(row.get("prefill_speedup_vs_sdpa"), ".2f", "x"), number(row.get("peak_gib"), ".2f")]
        for row in rows
    ]  # fmt: skip
    return markdown_table(header, body)


def token_check_line(row: dict) -> str:
    where = f"{row['model']}, {row['prompt_tokens']}-token prompt, {row['new_tokens']} greedy new tokens"
    pair = f"{row['reference']} vs {row['method']} ({row.get('cache', 'dynamic')} cache)"
    if "error" in row:
        return f"{where}, {pair}: error (see Errors)"
    verdict = "identical" if row["identical"] else f"differ from new token {row['first_difference']}"
    return f"{where}, {pair}: {verdict}" + (f" ({row['note']})" if row.get("note") else "")


def error_lines(report: dict) -> list[str]:
    lines = []
    for row in report["rows"]:
        where = " ".join(f"{key}={value}" for key, value in zip(SHAPE_HEADER, shape_cells(row)))
        if "error" in row:
            lines.append(f"- kernel {where}: {row['error'][:300]}")
        for part in ("providers", "plans"):
            for name, result in row.get(part, {}).items():
                if "error" in result:
                    lines.append(f"- kernel {where} `{name}` ({part}): {result['error'][:300]}")
    for kind in ("e2e", "token_check"):
        lines += [f"- {kind} {row['model']} `{row['method']}`: {row['error'][:300]}"
                  for row in report[kind] if "error" in row]  # fmt: skip
    return lines


def metadata_lines(meta: dict) -> list[str]:
    bandwidth = meta["copy_bandwidth"]
    lines = [f"- {key}: `{value}`" for key, value in meta.items() if key not in ("copy_bandwidth", "sources")]
    lines.append(f"- copy bandwidth: {bandwidth['tbps']:.2f} TB/s (`dst.copy_(src)` of "
                 f"{bandwidth['bytes'] / 2 / 2**30:.0f} GiB, read + write counted, do_bench median "
                 f"{bandwidth['ms']:.3f} ms)")  # fmt: skip
    lines += [f"- source run: `{source['command']}` ({source['date_utc']}, copy {source['copy_tbps']:.2f} TB/s)"
              for source in meta.get("sources", [])]  # fmt: skip
    return lines


def render_markdown(report: dict) -> str:
    meta = report["metadata"]
    threshold = MAX_ABS_ERR[DTYPES[meta["dtype"]]]
    lines = [f"# Decode attention benchmark: {meta['gpu']}", "", *metadata_lines(meta), ""]
    lines.append(
        "Decode: q_len query tokens per sequence (causal, bottom-right) against N_kv cached keys, GQA without "
        "repeating K/V. ms = GPU time per call from a CUDA graph of repeated calls that cycle through enough input "
        "copies to exceed twice the L2 cache (a real step's cache is not L2-resident); eager ms = do_bench median "
        "of plain calls, L2 flushed, where Python and launch overhead show when they exceed the GPU time. "
        "GB/s = K and V bytes read once (2·B·H_kv·N_kv·D·2) / time; % copy = "
        "that over the copy bandwidth above. speed-up = sdpa_flash ms / ours (> 1: faster than sdpa_flash); auto vs "
        "best baseline = the fastest of sdpa_flash, sdpa_cudnn and flex over fastattn_auto. max err = largest "
        f"|fastattn - sdpa_flash| over our strategies (n/a where sdpa_flash did not run), FLAGGED above "
        f"{threshold:g}. auto plan = what plan_decode picked: strategy, splits (the most programs one (batch, KV "
        "head, query-row tile) segment is spread over) and grid."
    )
    if report["rows"]:
        lines += ["", *kernel_tables(report["rows"])]
    if report["e2e"]:
        lines += ["", "## End-to-end greedy `generate()`", ""]
        lines.append(
            "Each run is one `generate()` of N + 1 new tokens, timed at every token (GPU synchronised): prefill ms = "
            "from the call to the first new token, decode = the N tokens after it, per token; medians of the runs "
            "after one warm-up; speed-ups are sdpa / method with the same cache; "
            "peak GiB = peak allocated during the timed runs, weights and KV cache included. Cache `static`: a "
            "StaticCache, whose decode step transformers compiles (`torch.compile`, mode `reduce-overhead`: CUDA "
            "graphs); the warm-up includes the compilation."
        )
        lines += ["", *e2e_table(report["e2e"])]
    if report["token_check"]:
        lines += ["", "## Greedy token check", "", *[f"- {token_check_line(row)}" for row in report["token_check"]]]
    if report["notes"]:
        lines += ["", "## Notes", "", *[f"- {note}" for note in report["notes"]]]
    errors = error_lines(report)
    if errors:
        lines += ["", "## Errors", "", *errors]
    return "\n".join(lines) + "\n"


def config_label(row: dict) -> str:
    return "default" if row["default"] else " ".join(f"{key}={value}" for key, value in row["config"].items())


def tune_tables(entry: dict) -> list[str]:
    ok = sorted((row for row in entry["configs"] if "ms" in row), key=lambda row: row["ms"])
    header = ["#", "strategy", "config", "plan", "ms", "p20-p80 ms", "GB/s", "% copy", "max err"]
    body = [
        [str(rank), row["strategy"], config_label(row), plan_cell(row["plan"]), f"{row['ms']:.4f}",
         f"{row['ms_p20']:.4f}-{row['ms_p80']:.4f}", f"{row['gbps']:.0f}", f"{row['copy_fraction']:.0%}",
         check_cell(row["spot_check"])]
        for rank, row in enumerate(ok, start=1)
    ]  # fmt: skip
    where = " ".join(f"{key}={value}" for key, value in zip(SHAPE_HEADER, shape_cells(entry)))
    lines = [f"## {where} ({entry.get('seconds', 0):.0f} s)", ""]
    if "error" in entry:
        return lines + [f"error: {entry['error']}"]
    lines += [f"{BASELINE}: {number(entry[BASELINE].get('ms'), '.4f', ' ms')}", "", *markdown_table(header, body)]
    failed = len(entry["configs"]) - len(ok)
    return lines + (["", f"{failed} config(s) failed: see Errors."] if failed else [])


def tune_summary(entries: list[dict]) -> list[str]:
    header = [*SHAPE_HEADER, "strategy", "default plan", "default ms", "best ms", "best config", "default / best",
              "best vs sdpa_flash"]  # fmt: skip
    body = []
    for entry in (entry for entry in entries if "error" not in entry):
        for strategy in dict.fromkeys(row["strategy"] for row in entry["configs"]):
            rows = [row for row in entry["configs"] if row["strategy"] == strategy and "ms" in row]
            if not rows:
                continue
            best = min(rows, key=lambda row: row["ms"])
            default = next((row for row in rows if row["default"]), {})
            base = entry[BASELINE].get("ms")
            body.append([*shape_cells(entry), strategy, plan_cell(default.get("plan", {})),
                         number(default.get("ms"), ".4f"), f"{best['ms']:.4f}", config_label(best),
                         number(default["ms"] / best["ms"] if default else None, ".2f", "x"),
                         number(base / best["ms"] if base else None, ".2f", "x")])  # fmt: skip
    return markdown_table(header, body)


def render_tune_markdown(report: dict) -> str:
    meta = report["metadata"]
    lines = [f"# Decode kernel tuning: {meta['gpu']}", "", *metadata_lines(meta), ""]
    lines.append(
        "Each config's GPU time (CUDA graph median, see the main report) at each shape; `default` = the kernel's own launch (no overrides). "
        "GB/s and % copy as in `decode_<gpu>.md`; max err = |config - sdpa_flash|."
    )
    lines += ["", "## Summary", "", *tune_summary(report["tune"])]
    for entry in report["tune"]:
        lines += ["", *tune_tables(entry)]
    errors = [f"- {' '.join(shape_cells(entry))} {row['strategy']} {config_label(row)}: {row['error'][:300]}"
              for entry in report["tune"] for row in entry["configs"] if "error" in row]  # fmt: skip
    if errors:
        lines += ["", "## Errors", "", *errors]
    return "\n".join(lines) + "\n"


def write_report(report: dict, out_dir: Path) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    tuning = "tune" in report
    stem = out_dir / f"{'decode_tune' if tuning else 'decode'}_{gpu_slug(report['metadata']['gpu'])}"
    json_path, md_path = stem.with_suffix(".json"), stem.with_suffix(".md")
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    md_path.write_text(render_tune_markdown(report) if tuning else render_markdown(report))
    return json_path, md_path


MERGE_MUST_MATCH = ("gpu", "dtype", "torch", "triton", "cuda")


def merge_reports(paths: list[Path]) -> dict:
    """One report from several runs of one set-up (e.g. the kernel grid and --e2e-only); later rows win."""
    reports = [json.loads(path.read_text()) for path in paths]
    if any("tune" in report for report in reports):
        raise SystemExit("--merge combines kernel/e2e reports, not --tune ones")
    for field in MERGE_MUST_MATCH:
        values = {str(report["metadata"][field]) for report in reports}
        if len(values) != 1:
            raise SystemExit(f"refusing to merge runs with different {field}: {sorted(values)}")
    keys = {"rows": lambda row: tuple(row[field] for field in ("batch", "seq_k", "q_heads", "kv_heads", "head_dim",
                                                                 "seq_q", "dtype")),
            "e2e": lambda row: (row["model"], row["method"], row.get("cache", "dynamic")),
            "token_check": lambda row: (row["model"], row["method"], row.get("cache", "dynamic"))}  # fmt: skip
    merged = {part: {} for part in keys}
    for report in reports:
        for part, key in keys.items():
            merged[part].update((key(row), row) for row in report[part])
    meta = {**reports[-1]["metadata"], "command": shlex.join(sys.argv)}
    meta["sources"] = [{"file": path.name, "command": report["metadata"]["command"],
                        "date_utc": report["metadata"]["date_utc"],
                        "copy_tbps": report["metadata"]["copy_bandwidth"]["tbps"]}
                       for path, report in zip(paths, reports)]  # fmt: skip
    notes = list(dict.fromkeys(note for report in reports for note in report["notes"]))
    return {"metadata": meta, **{part: list(rows.values()) for part, rows in merged.items()}, "notes": notes}


# ---------------------------------------------------------------------------------------------------------------
# The run.


def print_plan(args) -> None:
    shapes = planned_shapes(args)
    header = [*SHAPE_HEADER, "K+V GB", "run"]
    body = [[*shape_cells(shape.fields()), f"{shape.kv_bytes / 1e9:.2f}",
             "yes" if fits(shape, args) else "skipped: memory"] for shape in shapes]  # fmt: skip
    if args.tune:
        print(f"dry run, --tune: {args.dtype}, strategies {', '.join(args.strategies)}")
        print("\n".join(markdown_table(header, body)))
        counts = {strategy: 1 + len(tune_configs(strategy, args)) for strategy in args.strategies}
        print("configs per shape (default included): " + ", ".join(f"{s} {n}" for s, n in counts.items()))
        print(f"{len(shapes)} shapes x {sum(counts.values())} configs = {len(shapes) * sum(counts.values())} timings")
        return
    if not args.e2e_only:
        print(f"dry run: kernel grid, {args.dtype}, providers {', '.join(args.providers)}")
        print("\n".join(markdown_table(header, body)))
        runs = sum(fits(shape, args) for shape in shapes)
        print(f"{runs} shapes ({len(shapes) - runs} skipped) x {len(args.providers)} providers")
    if args.e2e_only or not args.no_e2e:
        prompts = {"smollm2": f"SmolLM2-135M, {args.smollm2_prompt}-token essay prompt",
                   "llama8b": f"random Llama-3.1-8B shapes, {args.llama_layers} layers, "
                              f"{args.llama_prompt}-token random prompt"}  # fmt: skip
        print(f"generate(): {'; '.join(prompts[m] for m in args.e2e_models)}; methods {', '.join(args.e2e_methods)}; "
              f"{', '.join(args.e2e_caches)} cache; {args.new_tokens} new tokens, median of {args.e2e_runs} runs "
              "after one warm-up")  # fmt: skip
        print(f"token check: {args.check_tokens} greedy tokens, SmolLM2 at {args.check_prompt} tokens vs eager, "
              f"the 8B shapes at {args.llama_prompt} vs sdpa; methods "
              f"{', '.join(m for m in TOKEN_CHECK_METHODS if m in args.e2e_methods)}")  # fmt: skip


def head_config(text: str) -> tuple[int, int, int]:
    try:
        q_heads, kv_heads, head_dim = (int(part) for part in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HQ/HKV/D, e.g. 32/8/128, got {text!r}") from None
    if q_heads % kv_heads:
        raise argparse.ArgumentTypeError(f"query heads must be a multiple of KV heads, got {text!r}")
    return q_heads, kv_heads, head_dim


def on_off(text: str) -> bool:
    if text not in ("0", "1"):
        raise argparse.ArgumentTypeError(f"expected 0 or 1, got {text!r}")
    return text == "1"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    shapes = parser.add_argument_group("shapes (defaults: the kernel grid, or the --tune shapes)")
    shapes.add_argument("--batches", type=int, nargs="+", metavar="B", help=f"{BATCHES}; --tune {TUNE_BATCHES}")
    shapes.add_argument("--kv-lens", type=int, nargs="+", metavar="N", help=f"{KV_LENS}; --tune {TUNE_KV_LENS}")
    shapes.add_argument("--head-configs", type=head_config, nargs="+", metavar="HQ/HKV/D",
                        help="query heads/KV heads/head dim; default 32/8/128 32/8/64 9/3/64 9/3/128, "
                             "--tune 32/8/128 9/3/64")  # fmt: skip
    shapes.add_argument(
        "--q-lens",
        type=int,
        nargs="+",
        default=list(Q_LENS),
        metavar="S",
        help=f"query tokens per sequence, 1..{MAX_Q_LEN} (causal bottom-right when > 1)",
    )
    shapes.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    shapes.add_argument("--max-kv-gb", type=float, default=MAX_KV_GB, help="skip shapes whose K+V exceed this")
    parser.add_argument("--providers", nargs="+", choices=list(PROVIDERS), default=list(PROVIDERS))

    tune = parser.add_argument_group("--tune: sweep the decode kernels' launch settings instead of the grid")
    tune.add_argument("--tune", action="store_true", help="writes decode_tune_<gpu>.json/.md")
    tune.add_argument("--strategies", nargs="+", choices=("single", "split", "streamk"), default=list(TUNE_STRATEGIES))
    tune.add_argument("--block-ns", type=int, nargs="+", default=list(BLOCK_NS), metavar="N")
    tune.add_argument("--num-warps", type=int, nargs="+", default=list(NUM_WARPS), metavar="W")
    tune.add_argument("--num-stages", type=int, nargs="+", default=list(NUM_STAGES), metavar="S")
    tune.add_argument("--programs-per-sm", "--ctas-per-sm", type=int, nargs="+", default=list(PROGRAMS_PER_SM),
                      metavar="P", help="stream-K's persistent programs per SM")  # fmt: skip
    tune.add_argument(
        "--num-splits",
        type=int,
        nargs="+",
        default=[None],
        metavar="S",
        help="split-KV splits per segment (default: the kernel's heuristic)",
    )
    for flag, what in (("--tma", "K/V reads through TMA descriptors"), ("--pdl", "programmatic dependent launch")):
        tune.add_argument(flag, type=on_off, nargs="+", default=[None], metavar="0|1",
                          help=f"{what} off (0) and/or on (1); default: the kernel's own choice")  # fmt: skip
    tune.add_argument(
        "--max-configs",
        type=int,
        metavar="K",
        help="at most K swept configs per (shape, strategy), evenly spread over the sweep",
    )

    e2e = parser.add_argument_group("end-to-end generate()")
    e2e.add_argument("--no-e2e", action="store_true", help="kernel grid only")
    e2e.add_argument("--e2e-only", action="store_true", help="generate() and the token check only")
    e2e.add_argument("--e2e-models", nargs="+", choices=E2E_MODELS, default=list(E2E_MODELS))
    e2e.add_argument("--e2e-methods", nargs="+", choices=list(E2E_METHODS), default=list(E2E_METHODS))
    e2e.add_argument(
        "--e2e-cache",
        dest="e2e_caches",
        nargs="+",
        choices=E2E_CACHES,
        default=["dynamic"],
        help="static: a StaticCache, whose decode steps transformers compiles on CUDA (CUDA graphs)",
    )
    e2e.add_argument("--new-tokens", type=int, default=64, metavar="N", help="decode tokens/s over N new tokens")
    e2e.add_argument("--e2e-runs", type=int, default=3, help="timed runs per length (median), after one warm-up")
    e2e.add_argument("--smollm2-prompt", type=int, default=8192, metavar="N")
    e2e.add_argument("--llama-prompt", type=int, default=32768, metavar="N")
    e2e.add_argument("--llama-layers", type=int, default=32)
    e2e.add_argument("--check-prompt", type=int, default=4096, metavar="N", help="SmolLM2's token-check prompt")
    e2e.add_argument("--check-tokens", type=int, default=32, metavar="N", help="greedy tokens compared")

    parser.add_argument("--out-dir", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--dry-run", action="store_true", help="print the plan and exit (no GPU needed)")
    parser.add_argument(
        "--merge",
        type=Path,
        nargs="+",
        metavar="JSON",
        help="combine these decode_<gpu>.json files into one report under --out-dir (no GPU needed)",
    )
    args = parser.parse_args(argv)

    args.batches = args.batches or list(TUNE_BATCHES if args.tune else BATCHES)
    args.kv_lens = args.kv_lens or list(TUNE_KV_LENS if args.tune else KV_LENS)
    args.head_configs = args.head_configs or list(TUNE_HEAD_CONFIGS if args.tune else HEAD_CONFIGS)
    if any(n <= 0 for n in (*args.batches, *args.kv_lens, args.new_tokens, args.e2e_runs, args.check_tokens)):
        parser.error("batches, KV lengths, --new-tokens, --e2e-runs and --check-tokens must be positive")
    if any(not 1 <= s <= min(MAX_Q_LEN, *args.kv_lens) for s in args.q_lens):
        parser.error(f"--q-lens must lie in 1..{MAX_Q_LEN} and not exceed the KV lengths")
    if args.no_e2e and args.e2e_only:
        parser.error("--no-e2e and --e2e-only exclude each other")
    if args.tune and args.e2e_only:
        parser.error("--tune runs the kernel sweep alone; drop --e2e-only")
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
            raise SystemExit("bench_decode.py needs a CUDA GPU; --dry-run prints the plan without one")
        start = time.perf_counter()
        bandwidth = copy_bandwidth()
        print(f"copy bandwidth: {bandwidth['tbps']:.2f} TB/s", flush=True)
        report = {"metadata": metadata(args, bandwidth)}
        if args.tune:
            report["tune"] = []
            for shape in planned_shapes(args):
                tune_shape(shape, args, bandwidth["gbps"], report)
                write_report(report, args.out_dir)
                print(f"   elapsed {time.perf_counter() - start:.0f} s", flush=True)
        else:
            report.update(rows=[], e2e=[], token_check=[], notes=[])
            if not args.e2e_only:
                for shape in planned_shapes(args):
                    shape_start = time.perf_counter()
                    benchmark_shape(shape, args, bandwidth["gbps"], report)
                    write_report(report, args.out_dir)
                    print(f"   {time.perf_counter() - shape_start:.0f} s (elapsed {time.perf_counter() - start:.0f} s)",
                          flush=True)  # fmt: skip
            if not args.no_e2e:
                if "smollm2" in args.e2e_models:
                    smollm2_e2e(args, report)
                if "llama8b" in args.e2e_models:
                    llama8b_e2e(args, report)
                print(f"   elapsed {time.perf_counter() - start:.0f} s", flush=True)
    json_path, md_path = write_report(report, args.out_dir)
    print()
    print(render_tune_markdown(report) if "tune" in report else render_markdown(report), flush=True)
    print(f"wrote {json_path} and {md_path}", flush=True)


if __name__ == "__main__":
    main()
