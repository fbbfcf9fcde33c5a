"""SeerAttention benchmark: our block-sparse kernel against FlexAttention with the identical BlockMask, SDPA and our
dense kernel, plus the gate's cost, in one run.

Shapes: Llama-3.1-8B attention (32 query heads, 8 KV heads, d128, bf16, batch 1), N = 8k/32k/64k, causal and
bidirectional. Block masks: 64 x 64 blocks, one mask per KV head (shared by its GQA group), built on the device by
``select_block_lists(scores, sparsity=s)`` (attention sink and diagonal always kept, each row keeps
``ceil((1 - s) * visible)`` blocks) from three kinds of block scores:

* ``random``: i.i.d. uniform scores, so the kept blocks are scattered;
* ``gate``: scores shaped like trained gates' output: a per-head recency decay ``exp(-|m - n| / tau_h)`` (tau from 2
  blocks to N/8 blocks over the heads) plus a few vertical stripes (key blocks every row favours) and a little noise;
* ``gate-head``: the ``gate`` scores as row log-probabilities (``log_softmax(GATE_HEAD_SHARPNESS * scores)`` over the
  visible blocks) selected with ``allocation="head"``: one budget per KV head, so query blocks keep unequal numbers
  of blocks, as with the rule that gave the best perplexity. How unequal depends on the stand-in scores' sharpness,
  not on a trained gate.

Every row reports the realised density (``selection_density``); the sparsity it is labelled with is the realised one
(the target is shown beside it). Compared with, at the same shape:

* ``flex``: ``torch.compile(flex_attention, dynamic=False)`` called with ``to_block_mask(selection)`` (built before
  timing) and ``enable_gqa=True``, for each ``--flex-configs`` tile (64-key blocks need BLOCK_M/BLOCK_N dividing 64;
  the fastest is reported). Its output is checked against ours (max abs diff, flagged above 2e-2);
* ``sdpa_flash`` (FA2) and ``sdpa_cudnn``: dense, ``enable_gqa=True``; ``dense_ours``: ``dense_attention``.

Gate: fastattn_seer's own per-layer pipeline, nothing inlined. ``hf_fastattn.methods.seer.gate_log_probs`` with an
``AttnGate`` as ``patch(model, "seer")`` builds it (fp32 weights, RoPE at block positions) and Llama-3.1's
``LlamaRotaryEmbedding``: cos/sin at the sequence's positions, the fused Triton pooling that undoes RoPE while pooling
Q (average) and K (average, max, min), and the gate's scores. Then the method's selection kernel
(``select_block_lists``) with ``--gate-rule``: ``row`` (default), ``head`` (``allocation="head"``) or ``budgets``
(``"head"`` with stand-in calibrated weights, :func:`stand_in_head_weights`). Timed separately (gate; selection per
sparsity), as one measured pipeline gate ->
selection -> our block-sparse kernel, and added to each row's end-to-end time. Gate + selection is also timed as
one CUDA graph replay: its GPU time without the CPU's launch cost, which a model forward hides behind the GPU work of
earlier layers (the gate is some twenty small launches).

Timing: ``triton.testing.do_bench`` medians (p20/p80 kept) after warm-up calls (our autotuning, flex's compile).
The (N, mode) group at N = 32768 causal (the acceptance shape) runs first; a report (JSON + markdown) is rewritten
after every case, and cases not started within ``--time-budget`` seconds are recorded as skipped.

    python benchmarks/bench_seer.py --out "$OUT/seer_{gpu}.json"                 # the full grid, one H100
    python benchmarks/bench_seer.py --lengths 32768 --modes causal               # the acceptance shape only
    TRITON_INTERPRET=1 python benchmarks/bench_seer.py --dry-run                 # tiny shapes on the CPU
"""

from __future__ import annotations

import sys
import time

START = time.monotonic()

import argparse
import datetime
import gc
import importlib.metadata
import json
import math
import os
import shlex
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

if "--dry-run" in sys.argv[1:] and not torch.cuda.is_available():
    # Triton decides at import time whether kernels are interpreted: set it before anything imports triton.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch.nn.functional as F
import triton
import triton.testing
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import BlockMask, flex_attention

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from bench_dense import (
    DO_BENCH,
    collect_metadata,
    describe_error,
    gpu_slug,
    guarded,
    markdown_table,
    number,
)

import hf_fastattn
from hf_fastattn.ops.dense import dense_attention
from hf_fastattn.ops.seer import (
    BlockSelection,
    block_sparse_attention,
    block_sparse_attention_reference,
    select_block_lists,
    selection_density,
    selection_mask,
    to_block_mask,
    visible_blocks,
)

Q_HEADS, KV_HEADS, HEAD_DIM, BLOCK = 32, 8, 128, 64
DRY_Q_HEADS, DRY_KV_HEADS, DRY_HEAD_DIM = 4, 2, 64
LENGTHS = (8192, 32768, 65536)
DRY_LENGTHS = (256,)
SPARSITIES = (0.5, 0.8, 0.9)
MASKS = ("random", "gate", "gate-head")
GATE_HEAD_SHARPNESS = 8.0  # gate-head: scale of the stand-in scores before the row softmax
MODES = ("causal", "bidirectional")
BASELINES = ("flex", "sdpa_flash", "sdpa_cudnn", "dense_ours")
# BLOCK_MxBLOCK_N:num_warps:num_stages. The H100 default for d128 bf16 (128x64) does not divide 64-row blocks.
FLEX_CONFIGS = ("64x64:4:3", "64x64:8:3")
GATE_DIM = 128
ROPE_THETA = 500000.0  # Llama-3.1
MAX_FLEX_DIFF = 2e-2  # bf16
MAX_REFERENCE_DIFF = 2e-2  # dry run: ours against the fp32 reference
WARMUP_CALLS = 2  # before do_bench: the first call autotunes (ours) or compiles (flex)
TIME_BUDGET_S = 360.0  # leaves ~2 min of an 8-min call for the case in flight and the last group's set-up
SEED = 0

ACCEPT_N = 32768
ACCEPT_VS_FLEX = 1.15  # at every density, N = 32k causal
ACCEPT_VS_FA2 = 12.0  # at 90% sparsity
ACCEPT_VS_FA2_SPARSITY = 0.9
ACCEPT_GATE_FRACTION = 0.05  # (gate + selection) / dense_ours at 32k


def elapsed() -> float:
    return time.monotonic() - START


def log(message: str) -> None:
    print(f"[{elapsed():6.1f}s] {message}", flush=True)


@dataclass(frozen=True)
class Setup:
    q_heads: int
    kv_heads: int
    head_dim: int
    device: str
    dry: bool
    block: int = BLOCK
    dtype: torch.dtype = torch.bfloat16

    def dense_flops(self, seqlen: int, causal: bool) -> float:
        return 4 * self.q_heads * seqlen * seqlen * self.head_dim * (0.5 if causal else 1.0)

    def sync(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()

    def free(self) -> None:
        gc.collect()
        if self.device == "cuda":
            torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------------------------------
# Timing: do_bench medians on the GPU; one wall-clock call in a dry run.


def timed(fn: Callable[[], object], setup: Setup) -> dict:
    if setup.dry:  # one call: the interpreter has nothing to warm up, and is slow
        start = time.perf_counter()
        fn()
        setup.sync()
        return {"ms": (time.perf_counter() - start) * 1e3}
    for _ in range(WARMUP_CALLS):
        fn()
    torch.cuda.synchronize()
    median, p20, p80 = triton.testing.do_bench(fn, **DO_BENCH)
    return {"ms": median, "ms_p20": p20, "ms_p80": p80}


def graph_timed(fn: Callable[[], object]) -> dict:
    """``fn``'s GPU time without its CPU launch cost: captured once in a CUDA graph, the replay timed by do_bench. In
    a model forward the CPU queues a layer's launches while the GPU still runs earlier layers, so this is the time
    the launches add there."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(WARMUP_CALLS):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    median, p20, p80 = triton.testing.do_bench(graph.replay, **DO_BENCH)
    return {"ms": median, "ms_p20": p20, "ms_p80": p80}


def measure(fn: Callable[[], object], setup: Setup) -> dict:
    return guarded(lambda: timed(fn, setup))


def ms_of(result: dict | None) -> float | None:
    return None if not result else result.get("ms")


def with_tflops(result: dict, flops: float, key: str = "tflops_effective") -> dict:
    if result.get("ms"):
        result[key] = flops / (result["ms"] * 1e-3) / 1e12
    return result


# ---------------------------------------------------------------------------------------------------------------------
# Block scores and selections.


def block_scores(kind: str, setup: Setup, seqlen: int, causal: bool, generator: torch.Generator) -> torch.Tensor:
    """``(1, H_kv, NQ, NK)`` float scores: ``random`` uniform, or ``gate``-like (recency decay + vertical stripes)."""
    nb = -(-seqlen // setup.block)
    heads, device = setup.kv_heads, setup.device
    if kind == "random":
        return torch.rand((1, heads, nb, nb), device=device, generator=generator)
    if kind not in ("gate", "gate-head"):
        raise ValueError(f"unknown mask kind {kind!r}")
    blocks = torch.arange(nb, device=device, dtype=torch.float32)
    distance = (blocks[:, None] - blocks[None, :]).abs()
    taus = torch.logspace(math.log10(2.0), math.log10(max(2.0, nb / 8)), heads, device=device)
    local = torch.exp(-distance[None] / taus[:, None, None])
    stripes_per_head = max(1, nb // 32)
    columns = torch.randint(0, nb, (heads, stripes_per_head), device=device, generator=generator)
    weights = 0.3 + 0.7 * torch.rand((heads, stripes_per_head), device=device, generator=generator)
    stripes = torch.zeros(heads, nb, device=device).scatter_(-1, columns, weights)
    noise = 0.05 * torch.rand((heads, nb, nb), device=device, generator=generator)
    scores = (local + stripes[:, None, :] + noise)[None]
    if kind == "gate-head":
        visible, _ = visible_blocks(seqlen, seqlen, causal=causal, block_size=setup.block, device=device)
        scores = torch.log_softmax((GATE_HEAD_SHARPNESS * scores).masked_fill(~visible, float("-inf")), dim=-1)
    return scores


def make_selection(
    scores: torch.Tensor, sparsity: float, seqlen: int, causal: bool, block: int, **rule
) -> BlockSelection:
    """The selection kernel fastattn_seer runs (the same result as ``select_blocks`` + ``selection_from_mask``);
    ``rule``: ``allocation`` and ``head_weights``."""
    return select_block_lists(
        scores, seq_q=seqlen, seq_k=seqlen, causal=causal, block_size=block, sparsity=sparsity, **rule
    )


def stand_in_head_weights(heads: int) -> tuple[float, ...]:
    """Budget weights in the spread calibration gave SmolLM2 at 80% (0.15-2.27, mean 1), evenly spaced: the selection
    cost depends on the largest head's need, not on which head has it."""
    weights = torch.linspace(0.15, 2.3, heads, dtype=torch.float64)
    return tuple((weights / weights.mean()).tolist())


def gate_rule(name: str, kv_heads: int) -> dict:
    """``select_block_lists`` keywords of a ``--gate-rule``."""
    return {"row": {}, "head": {"allocation": "head"},
            "budgets": {"allocation": "head", "head_weights": stand_in_head_weights(kv_heads)}}[name]  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------------
# Gate: fastattn_seer's per-layer pipeline, from the library.


def library_gate(setup: Setup) -> tuple[torch.nn.Module, torch.nn.Module]:
    """``(gate, rotary)``: ``AttnGate`` as ``patch(model, "seer")`` builds it (``.to(device)``: fp32 weights, RoPE at
    block positions; random weights) and Llama-3.1's rotary embedding, the module the method hands the gate."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    from hf_fastattn.methods.seer import AttnGate

    torch.manual_seed(SEED)
    gate = AttnGate(
        setup.q_heads, setup.kv_heads, setup.head_dim, gate_dim=GATE_DIM, block_size=setup.block, rope_theta=ROPE_THETA
    ).to(setup.device)
    config = LlamaConfig(
        hidden_size=setup.q_heads * setup.head_dim, num_attention_heads=setup.q_heads,
        num_key_value_heads=setup.kv_heads, head_dim=setup.head_dim, max_position_embeddings=131072,
        rope_parameters={"rope_type": "default", "rope_theta": ROPE_THETA},
    )  # fmt: skip
    rotary = LlamaRotaryEmbedding(config).to(setup.device)
    return gate.eval(), rotary


def gate_selection(
    log_probs: torch.Tensor, sparsity: float, seqlen: int, causal: bool, block: int, rule: dict
) -> BlockSelection:
    """fastattn_seer's selection from the gate: its log-probabilities rank the blocks directly."""
    return make_selection(log_probs, sparsity, seqlen, causal, block, **rule)


# ---------------------------------------------------------------------------------------------------------------------
# Baselines.


def sdpa(backend: SDPBackend, causal: bool):
    def attend(q, k, v):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)

    return attend


def dense_providers(causal: bool, names: list[str]) -> dict[str, Callable]:
    providers = {"dense_ours": lambda q, k, v: dense_attention(q, k, v, causal=causal)}
    if "sdpa_flash" in names:
        providers["sdpa_flash"] = sdpa(SDPBackend.FLASH_ATTENTION, causal)
    if "sdpa_cudnn" in names:
        providers["sdpa_cudnn"] = sdpa(SDPBackend.CUDNN_ATTENTION, causal)
    return providers


def parse_flex_config(text: str) -> dict:
    try:
        tile, warps, stages = text.split(":")
        block_m, block_n = (int(x) for x in tile.lower().split("x"))
        return {"BLOCK_M": block_m, "BLOCK_N": block_n, "num_warps": int(warps), "num_stages": int(stages)}
    except ValueError as exc:
        raise ValueError(f"flex config {text!r} is not BLOCK_MxBLOCK_N:num_warps:num_stages") from exc


def eager_flex_mask(block_mask: BlockMask, causal: bool, block: int) -> BlockMask:
    """Dry run: eager flex applies only ``mask_mod`` (it ignores the block lists), so encode the BlockMask's own dense
    reading of its block lists in the mask_mod, to check the export (layout, head order, GQA) end to end."""
    dense = block_mask.to_dense().bool()

    def mask_mod(b, h, q_index, kv_index):
        keep = dense[b, h, q_index // block, kv_index // block]
        return keep & (kv_index <= q_index) if causal else keep

    return BlockMask.from_kv_blocks(
        block_mask.kv_num_blocks, block_mask.kv_indices, block_mask.full_kv_num_blocks, block_mask.full_kv_indices,
        BLOCK_SIZE=block_mask.BLOCK_SIZE, mask_mod=mask_mod, seq_lengths=block_mask.seq_lengths,
    )  # fmt: skip


def reset_compiler() -> None:
    """A fresh dynamo cache per (N, mode): past the recompile limit flex would fall back to its unfused eager path."""
    import torch._dynamo

    torch.compiler.reset()
    # Each flex config is one more compiled graph of the same function; keep well clear of the limit (default 8).
    name = next(n for n in ("recompile_limit", "cache_size_limit") if hasattr(torch._dynamo.config, n))
    setattr(torch._dynamo.config, name, max(64, getattr(torch._dynamo.config, name)))


# ---------------------------------------------------------------------------------------------------------------------
# The run.


@dataclass
class Group:
    seqlen: int
    causal: bool

    @property
    def mode(self) -> str:
        return "causal" if self.causal else "bidirectional"

    def __str__(self) -> str:
        return f"N={self.seqlen} {self.mode}"


def planned_groups(args) -> list[Group]:
    groups = [Group(n, mode == "causal") for n in args.lengths for mode in args.modes]
    # The acceptance shape first, so that a run cut short still answers the acceptance checks.
    return sorted(groups, key=lambda g: not (g.seqlen == ACCEPT_N and g.causal))


def over_budget(args) -> bool:
    return elapsed() > args.time_budget


def run_group(group: Group, setup: Setup, args, report: dict, flex_configs: dict[str, dict]) -> None:
    n, causal = group.seqlen, group.causal
    log(f"== {group}")
    generator = torch.Generator(device=setup.device).manual_seed(SEED + n + int(causal))
    q, k, v = (
        torch.randn((1, heads, n, setup.head_dim), device=setup.device, dtype=setup.dtype, generator=generator)
        for heads in (setup.q_heads, setup.kv_heads, setup.kv_heads)
    )
    flops = setup.dense_flops(n, causal)
    entry = {"seqlen": n, "mode": group.mode, "causal": causal, "dense_tflop": flops / 1e12, "dense": {}, "gate": {}}
    report["groups"].append(entry)

    with torch.no_grad():
        for name, attend in dense_providers(causal, args.providers).items():
            entry["dense"][name] = with_tflops(measure(lambda attend=attend: attend(q, k, v), setup), flops)
            log(f"   {name:<11} {format_result(entry['dense'][name])}")
        if not args.no_gate:
            entry["gate"] = gate_section(group, setup, q, k, v, report)
        write_report(report, args)

        compiled = None
        if "flex" in args.providers and not setup.dry:
            reset_compiler()
            gc.collect()
            compiled = torch.compile(
                flex_attention, dynamic=False, **({"mode": args.flex_mode} if args.flex_mode else {})
            )
        for kind in args.masks:
            for sparsity in args.sparsities:
                if over_budget(args):
                    report["skipped"].append({"seqlen": n, "mode": group.mode, "mask": kind, "target_sparsity": sparsity,
                                              "reason": f"time budget {args.time_budget:.0f} s spent"})  # fmt: skip
                    continue
                row = run_case(group, kind, sparsity, setup, args, q, k, v, entry, compiled, flex_configs, generator)
                report["rows"].append(row)
                write_report(report, args)


def run_case(group, kind, sparsity, setup, args, q, k, v, entry, compiled, flex_configs, generator) -> dict:
    n, causal = group.seqlen, group.causal
    row = {"seqlen": n, "mode": group.mode, "causal": causal, "mask": kind, "target_sparsity": sparsity}
    try:
        scores = block_scores(kind, setup, n, causal, generator)
        allocation = "head" if kind == "gate-head" else "row"
        selection = make_selection(scores, sparsity, n, causal, setup.block, allocation=allocation)
        density = selection_density(selection, seq_q=n, seq_k=n, causal=causal).item()
        selected = int(selection.selected_blocks().sum().item())
    except Exception as exc:  # noqa: BLE001
        row["error"] = f"mask construction: {describe_error(exc)}"
        log(f"   {kind} s={sparsity}: {row['error']}")
        return row
    row.update(density=density, realised_sparsity=1.0 - density, selected_blocks=selected)
    row["selection_ms"] = ms_of(
        measure(lambda: make_selection(scores, sparsity, n, causal, setup.block, allocation=allocation), setup)
    )
    flops = setup.dense_flops(n, causal)
    computed_flops = 4 * setup.block * setup.block * setup.head_dim * selected * (setup.q_heads // setup.kv_heads)
    providers = {}

    ours = with_tflops(measure(lambda: block_sparse_attention(q, k, v, selection, causal=causal), setup), flops)
    providers["ours"] = with_tflops(ours, computed_flops, "tflops_realised")
    out = None
    if "error" not in ours:
        out = block_sparse_attention(q, k, v, selection, causal=causal)
        row["ours_finite"] = bool(torch.isfinite(out).all().item())
        if setup.dry:
            row["max_abs_diff_vs_reference"] = dry_reference_check(q, k, v, selection, setup, n, causal)

    if "flex" in args.providers:
        providers["flex"] = flex_case(selection, setup, n, causal, q, k, v, out, compiled, flex_configs, row)
    for name, result in entry["dense"].items():
        providers[name] = result
    row["providers"] = providers
    ours_ms = ms_of(ours)
    row["speedup_vs"] = {
        name: (ms_of(providers.get(name)) / ours_ms if ours_ms and ms_of(providers.get(name)) else None)
        for name in BASELINES if name in providers
    }  # fmt: skip
    gate_ms = ms_of(entry.get("gate", {}).get("gate"))
    if ours_ms and gate_ms is not None and row["selection_ms"] is not None:
        row["e2e_ms"] = gate_ms + row["selection_ms"] + ours_ms
    row["acceptance"] = row_acceptance(row)
    log(f"   {kind:<6} s={sparsity:.2f} realised {row['realised_sparsity']:.3f}: {case_summary(row)}")
    return row


def flex_case(selection, setup, n, causal, q, k, v, ours_out, compiled, flex_configs, row) -> dict:
    try:
        start = time.perf_counter()
        block_mask = to_block_mask(selection, num_q_heads=setup.q_heads, seq_q=n, seq_k=n, causal=causal)
        setup.sync()
        row["blockmask_build_ms"] = (time.perf_counter() - start) * 1e3  # one call, untimed by do_bench
    except Exception as exc:  # noqa: BLE001
        return {"error": f"to_block_mask: {describe_error(exc)}"}
    if setup.dry:
        expected = selection_mask(selection).repeat_interleave(setup.q_heads // selection.shape[1], dim=1)
        row["blockmask_layout_ok"] = bool(torch.equal(block_mask.to_dense().bool(), expected))
        eager_mask = eager_flex_mask(block_mask, causal, setup.block)
        configs = {"eager (dry run)": lambda: flex_attention(q, k, v, block_mask=eager_mask, enable_gqa=True)}
    elif compiled is None:
        return {"error": "flex not compiled"}
    else:
        configs = {
            name: (lambda opts=opts: compiled(q, k, v, block_mask=block_mask, enable_gqa=True, kernel_options=opts))
            for name, opts in flex_configs.items()
        }
    per_config, diffs = {}, []
    for name, call in configs.items():

        def attempt(call=call):
            start = time.perf_counter()
            out = call()  # the group's first case compiles here
            setup.sync()
            first_call_s = time.perf_counter() - start
            result = timed(call, setup)
            result["first_call_s"] = first_call_s
            if ours_out is not None:
                result["max_abs_diff_vs_ours"] = (out.float() - ours_out.float()).abs().max().item()
            return result

        per_config[name] = attempt_result = guarded(attempt)
        if "max_abs_diff_vs_ours" in attempt_result:
            diffs.append(attempt_result["max_abs_diff_vs_ours"])
    if diffs:
        row["max_abs_diff_vs_flex"] = max(diffs)
        row["flex_diff_ok"] = max(diffs) <= MAX_FLEX_DIFF
    timed_configs = {name: r for name, r in per_config.items() if r.get("ms")}
    if not timed_configs:
        errors = "; ".join(f"{name}: {r.get('error', 'no timing')}" for name, r in per_config.items())
        return {"error": errors[:500], "configs": per_config}
    best = min(timed_configs, key=lambda name: timed_configs[name]["ms"])
    result = {key: value for key, value in timed_configs[best].items() if key.startswith("ms")}
    result = with_tflops(result, setup.dense_flops(n, causal))
    return {**result, "config": best, "configs": per_config}


def dry_reference_check(q, k, v, selection, setup, n, causal) -> float:
    ours = block_sparse_attention(q, k, v, selection, causal=causal)
    reference = block_sparse_attention_reference(
        q, k, v, selection_mask(selection), causal=causal, block_size=setup.block
    )
    return (ours.float() - reference.float()).abs().max().item()


@torch.no_grad()
def gate_section(group: Group, setup: Setup, q, k, v, report: dict) -> dict:
    """fastattn_seer's per-layer gating on the (rotated) ``q``/``k`` its attention function receives: ``gate`` =
    ``gate_log_probs`` (cos/sin from the rotary embedding, the fused pooling + un-rotation kernel, AttnGate); per
    sparsity ``selection`` (``select_block_lists``) and ``pipeline`` = gate -> selection
    -> our block-sparse kernel, measured as one call."""
    from hf_fastattn.methods.seer import gate_log_probs

    n, causal = group.seqlen, group.causal
    rule = gate_rule(report["gate_rule"], setup.kv_heads)
    section = {"per_sparsity": {}, "rule": report["gate_rule"]}
    try:
        gate, rotary = library_gate(setup)
        log_probs = gate_log_probs(gate, q, k, causal=causal, rotary=rotary)[0]
        section["finite"] = bool(torch.isfinite(log_probs.exp()).all().item())
    except Exception as exc:  # noqa: BLE001 - the method's API may have changed: record it, time the rest
        section["error"] = describe_error(exc)
        log(f"   gate           error: {section['error'][:200]}")
        return section
    section["gate"] = measure(lambda: gate_log_probs(gate, q, k, causal=causal, rotary=rotary), setup)
    log(f"   gate           {format_result(section['gate'])}")
    for sparsity in report["sparsities"]:
        selection = measure(lambda s=sparsity: gate_selection(log_probs, s, n, causal, setup.block, rule), setup)

        def pipeline(sparsity=sparsity):
            scores = gate_log_probs(gate, q, k, causal=causal, rotary=rotary)[0]
            selection = gate_selection(scores, sparsity, n, causal, setup.block, rule)
            return block_sparse_attention(q, k, v, selection, causal=causal)

        def gate_and_selection(sparsity=sparsity):
            scores = gate_log_probs(gate, q, k, causal=causal, rotary=rotary)[0]
            return gate_selection(scores, sparsity, n, causal, setup.block, rule)

        values = {"selection": selection, "pipeline": measure(pipeline, setup)}
        if not setup.dry:
            values["gate_selection_graph"] = guarded(lambda: graph_timed(gate_and_selection))
        section["per_sparsity"][str(sparsity)] = values
        texts = format_result(selection), format_result(values["pipeline"])
        log(f"   s={sparsity:.2f} selection {texts[0]}; gate+sel.+kernel {texts[1]}")
    return section


# ---------------------------------------------------------------------------------------------------------------------
# Acceptance.


def is_acceptance_row(row: dict) -> bool:
    return row["seqlen"] == ACCEPT_N and row["causal"]


def row_acceptance(row: dict) -> dict:
    if not is_acceptance_row(row):
        return {}
    checks = {f"vs_flex>={ACCEPT_VS_FLEX}": row["speedup_vs"].get("flex")}
    if abs(row["target_sparsity"] - ACCEPT_VS_FA2_SPARSITY) < 1e-9:
        checks[f"vs_sdpa_flash>={ACCEPT_VS_FA2:g}"] = row["speedup_vs"].get("sdpa_flash")
    thresholds = {f"vs_flex>={ACCEPT_VS_FLEX}": ACCEPT_VS_FLEX, f"vs_sdpa_flash>={ACCEPT_VS_FA2:g}": ACCEPT_VS_FA2}
    return {
        name: {"value": value, "pass": None if value is None else value >= thresholds[name]}
        for name, value in checks.items()
    }


def gate_fractions(entry: dict) -> list[dict]:
    """Per sparsity: gate, gate + selection and the measured pipeline, gate and gate + selection as fractions of
    dense_ours."""
    dense_ms = ms_of(entry["dense"].get("dense_ours"))
    gate = entry.get("gate") or {}
    gate_ms = ms_of(gate.get("gate"))
    out = []
    for sparsity, values in gate.get("per_sparsity", {}).items():
        selection_ms = ms_of(values["selection"])
        graph_ms = ms_of(values.get("gate_selection_graph"))
        item = {"sparsity": float(sparsity), "gate_ms": gate_ms, "selection_ms": selection_ms,
                "pipeline_ms": ms_of(values["pipeline"]), "dense_ours_ms": dense_ms,
                "gate_selection_graph_ms": graph_ms}  # fmt: skip
        if dense_ms and gate_ms is not None:
            item["gate_fraction"] = gate_ms / dense_ms
            if selection_ms is not None:
                item["gate_selection_fraction"] = (gate_ms + selection_ms) / dense_ms
        if dense_ms and graph_ms is not None:
            item["gate_selection_graph_fraction"] = graph_ms / dense_ms
        out.append(item)
    return out


def acceptance(report: dict) -> dict:
    rows = [row for row in report["rows"] if is_acceptance_row(row) and "error" not in row]
    summary = {}
    flex = [row["speedup_vs"].get("flex") for row in rows]
    summary["vs_flex"] = verdict(flex, ACCEPT_VS_FLEX, f"ours >= {ACCEPT_VS_FLEX}x flex at every density, 32k causal")
    fa2_rows = [row for row in rows if abs(row["target_sparsity"] - ACCEPT_VS_FA2_SPARSITY) < 1e-9]
    fa2 = [row["speedup_vs"].get("sdpa_flash") for row in fa2_rows]
    summary["vs_sdpa_flash"] = verdict(fa2, ACCEPT_VS_FA2, f"ours >= {ACCEPT_VS_FA2:g}x SDPA-flash at 90%, 32k causal")
    entry = next((g for g in report["groups"] if g["seqlen"] == ACCEPT_N and g["causal"]), None)
    fractions = gate_fractions(entry) if entry else []
    values = [item.get("gate_selection_fraction") for item in fractions]
    rule = report.get("gate_rule", "row")
    gate = {"description": f"(gate + {rule} selection) <= {ACCEPT_GATE_FRACTION:.0%} of dense_ours, 32k causal",
            "values": values, "worst": max(values) if values and None not in values else None}  # fmt: skip
    gate["pass"] = None if gate["worst"] is None else gate["worst"] <= ACCEPT_GATE_FRACTION
    gate_only = [item.get("gate_fraction") for item in fractions]
    gate["gate_only"] = gate_only[0] if gate_only else None
    summary["gate_overhead"] = gate
    values = [item.get("gate_selection_graph_fraction") for item in fractions]
    graph = {"description": f"(gate + {rule} selection) GPU time (CUDA graph) <= {ACCEPT_GATE_FRACTION:.0%} of dense_ours, "
             "32k causal", "values": values, "worst": max(values) if values and None not in values else None}  # fmt: skip
    graph["pass"] = None if graph["worst"] is None else graph["worst"] <= ACCEPT_GATE_FRACTION
    summary["gate_overhead_gpu"] = graph
    return summary


def verdict(values: list, threshold: float, description: str) -> dict:
    if not values:
        return {"description": description, "pass": None, "worst": None, "values": []}
    worst = None if None in values else min(values)
    return {"description": description, "values": values, "worst": worst,
            "pass": None if worst is None else worst >= threshold}  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------------
# Output.


def format_result(result: dict) -> str:
    if "error" in result:
        return f"error: {result['error'][:200]}"
    text = f"{result['ms']:9.3f} ms"
    return text + (f"  {result['tflops_effective']:6.1f} TFLOP/s" if "tflops_effective" in result else "")


def case_summary(row: dict) -> str:
    parts = []
    for name, result in row["providers"].items():
        if name in ("dense_ours", "sdpa_cudnn"):
            continue
        speed = row["speedup_vs"].get(name)
        parts.append(f"{name} " + ("error" if "error" in result else f"{result['ms']:.3f} ms")
                     + (f" ({speed:.2f}x)" if speed else ""))  # fmt: skip
    if "max_abs_diff_vs_flex" in row:
        parts.append(f"diff vs flex {row['max_abs_diff_vs_flex']:.4f}" + ("" if row["flex_diff_ok"] else " FLAGGED"))
    if "max_abs_diff_vs_reference" in row:
        parts.append(f"diff vs reference {row['max_abs_diff_vs_reference']:.4f}")
    if "blockmask_layout_ok" in row:
        parts.append(f"BlockMask layout {'ok' if row['blockmask_layout_ok'] else 'MISMATCH'}")
    if "ours" in row["providers"] and "error" in row["providers"]["ours"]:
        parts.append(f"ours error: {row['providers']['ours']['error'][:200]}")
    return ", ".join(parts)


def pass_text(value: bool | None) -> str:
    return "n/a" if value is None else ("PASS" if value else "FAIL")


def acceptance_cell(row: dict) -> str:
    cells = []
    for name, check in row.get("acceptance", {}).items():
        label = "flex" if "flex" in name else "FA2"
        cells.append(f"{label} {pass_text(check['pass'])}")
    return ", ".join(cells)


def main_table(rows: list[dict]) -> list[str]:
    header = ["N", "mode", "mask", "target", "realised sparsity", "ours ms", "flex ms", "FA2 ms", "cuDNN ms",
              "dense ms", "vs flex", "vs FA2", "vs cuDNN", "vs dense", "eff. TFLOP/s", "realised TFLOP/s",
              "sel. ms", "e2e ms", "diff vs flex", "acceptance"]  # fmt: skip
    body = []
    for row in rows:
        if "error" in row:
            body.append([str(row["seqlen"]), row["mode"], row["mask"], f"{row['target_sparsity']:.0%}",
                         "error", *["" for _ in header[5:]]])  # fmt: skip
            continue
        providers, speed = row["providers"], row["speedup_vs"]
        ours = providers.get("ours", {})
        diff = row.get("max_abs_diff_vs_flex")
        body.append([
            str(row["seqlen"]), row["mode"], row["mask"], f"{row['target_sparsity']:.0%}",
            f"{row['realised_sparsity']:.3f}",
            *[number(ms_of(providers.get(name)), ".3f") for name in ("ours", *BASELINES)],
            *[number(speed.get(name), ".2f", "x") for name in BASELINES],
            number(ours.get("tflops_effective"), ".0f"), number(ours.get("tflops_realised"), ".0f"),
            number(row.get("selection_ms"), ".3f"), number(row.get("e2e_ms"), ".3f"),
            number(diff, ".4f") + ("" if row.get("flex_diff_ok", True) else " FLAGGED"),
            acceptance_cell(row),
        ])  # fmt: skip
    return markdown_table(header, body)


def dense_table(groups: list[dict]) -> list[str]:
    names = ("dense_ours", "sdpa_flash", "sdpa_cudnn")
    header = ["N", "mode", *[f"{name} ms (TFLOP/s)" for name in names]]
    body = []
    for entry in groups:
        cells = [str(entry["seqlen"]), entry["mode"]]
        for name in names:
            result = entry["dense"].get(name)
            if result is None:
                cells.append("")
            elif "error" in result:
                cells.append("error")
            else:
                cells.append(f"{result['ms']:.3f} ({result.get('tflops_effective', 0):.0f})")
        body.append(cells)
    return markdown_table(header, body)


def gate_tables(groups: list[dict]) -> list[str]:
    header = ["N", "mode", "sparsity", "gate ms", "selection ms", "gate % dense", "gate+sel. % dense",
              "gate+sel. in a CUDA graph ms", "% dense", "pipeline ms (measured)", "dense_ours / pipeline"]  # fmt: skip
    body = []
    for entry in groups:
        for item in gate_fractions(entry):
            dense_ms, pipeline = item["dense_ours_ms"], item["pipeline_ms"]
            body.append([
                str(entry["seqlen"]), entry["mode"], f"{item['sparsity']:.0%}", number(item["gate_ms"], ".3f"),
                number(item["selection_ms"], ".3f"), number(item.get("gate_fraction"), ".1%"),
                number(item.get("gate_selection_fraction"), ".1%"), number(item["gate_selection_graph_ms"], ".3f"),
                number(item.get("gate_selection_graph_fraction"), ".1%"), number(pipeline, ".3f"),
                number(dense_ms / pipeline if dense_ms and pipeline else None, ".2f", "x"),
            ])  # fmt: skip
    return markdown_table(header, body)


def acceptance_lines(summary: dict) -> list[str]:
    lines = []
    for key in ("vs_flex", "vs_sdpa_flash"):
        check = summary[key]
        worst = number(check["worst"], ".2f", "x")
        lines.append(f"- {check['description']}: **{pass_text(check['pass'])}** (worst {worst}, "
                     f"{len(check['values'])} rows)")  # fmt: skip
    gate = summary["gate_overhead"]
    lines.append(
        f"- {gate['description']}: **{pass_text(gate['pass'])}** (worst {number(gate['worst'], '.1%')}; gate alone "
        f"{number(gate['gate_only'], '.1%')})"
    )
    graph = summary.get("gate_overhead_gpu")
    if graph:
        lines.append(
            f"- {graph['description']}: **{pass_text(graph['pass'])}** (worst {number(graph['worst'], '.1%')})"
        )
    return lines


def render_markdown(report: dict) -> str:
    meta = report["metadata"]
    setup = report["setup"]
    lines = [f"# SeerAttention block-sparse attention: {meta['gpu']}", ""]
    lines += [f"- {key}: `{value}`" for key, value in meta.items()]
    lines += [
        "",
        (
            f"{setup['q_heads']} query / {setup['kv_heads']} KV heads, d{setup['head_dim']}, {setup['dtype']}, "
            f"batch 1, {setup['block']}x{setup['block']} blocks, one mask per KV head. ms: do_bench median. "
            "realised sparsity = 1 - selection_density (fraction of visible blocks skipped). vs X = X ms / ours ms "
            "(> 1: ours faster). eff. TFLOP/s = dense-equivalent FLOPs (4·H·N²·d, halved when causal) / ours time; "
            "realised TFLOP/s = FLOPs of the computed blocks / ours time. sel. ms = the selection kernel "
            "(select_block_lists) on the row's scores; e2e = gate + sel. + ours. diff vs flex = max |ours - flex| "
            f"(flagged above {MAX_FLEX_DIFF}). Flex: {', '.join(report['flex_configs'])} (best shown)."
        ),
        "",
        f"## Acceptance (N = {ACCEPT_N}, causal)",
        "",
        *acceptance_lines(report["acceptance"]),
        "",
        "## Block-sparse attention",
        "",
        *main_table(report["rows"]),
        "",
        "## Dense baselines",
        "",
        *dense_table(report["groups"]),
    ]
    if any(entry.get("gate") for entry in report["groups"]):
        lines += ["", "## Gate", "", *gate_tables(report["groups"])]
    errors = error_lines(report)
    if errors or report["skipped"] or report["notes"]:
        lines += ["", "## Errors, skipped cases, notes", "", *errors]
        lines += [f"- skipped N={s['seqlen']} {s['mode']} {s['mask']} {s['target_sparsity']:.0%}: {s['reason']}"
                  for s in report["skipped"]]  # fmt: skip
        lines += [f"- note: {note}" for note in report["notes"]]
    return "\n".join(lines) + "\n"


def gate_results(gate: dict) -> list[tuple[str, dict]]:
    """A group's gate timings (and set-up failure) as ``(label, result)`` pairs."""
    if not gate:
        return []
    if "error" in gate:
        return [("gate set-up", gate)]
    results = [("gate", gate.get("gate", {"error": "not measured"}))]
    for sparsity, values in gate.get("per_sparsity", {}).items():
        results += [(f"gate {name} at {sparsity}", values[name]) for name in ("selection", "pipeline")]
    return results


def error_lines(report: dict) -> list[str]:
    lines, seen = [], set()
    for entry in report["groups"]:
        where = f"N={entry['seqlen']} {entry['mode']}"
        for name, result in entry["dense"].items():
            if "error" in result:
                lines.append(f"- {where} `{name}`: {result['error'][:300]}")
        for name, result in gate_results(entry.get("gate") or {}):
            if "error" in result:
                lines.append(f"- {where} {name}: {result['error'][:300]}")
    for row in report["rows"]:
        where = f"N={row['seqlen']} {row['mode']} {row['mask']} {row['target_sparsity']:.0%}"
        if "error" in row:
            lines.append(f"- {where}: {row['error'][:300]}")
            continue
        for name, result in row["providers"].items():
            if "error" in result and name not in ("sdpa_flash", "sdpa_cudnn", "dense_ours"):
                lines.append(f"- {where} `{name}`: {result['error'][:300]}")
            for config, sub in result.get("configs", {}).items():
                key = (where, config)
                if "error" in sub and key not in seen:
                    seen.add(key)
                    lines.append(f"- {where} flex `{config}`: {sub['error'][:300]}")
    return lines


def environment(args, setup: Setup) -> dict:
    if setup.device == "cuda":
        meta = collect_metadata(args)
    else:
        try:
            transformers_version = importlib.metadata.version("transformers")
        except importlib.metadata.PackageNotFoundError:
            transformers_version = "missing"
        meta = {
            "gpu": f"cpu (dry run, TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')})",
            "torch": torch.__version__, "triton": triton.__version__, "transformers": transformers_version,
            "hf_fastattn": getattr(hf_fastattn, "__version__", "unknown"), "dtype": args.dtype,
            "do_bench": "none (one wall-clock call)",
            "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": shlex.join(sys.argv),
        }  # fmt: skip
    return meta


def output_paths(args, gpu: str, dry: bool) -> tuple[Path, Path]:
    slug = gpu_slug(gpu) if not dry else "dry_run"
    if args.out is None:
        base = Path(tempfile.gettempdir()) if dry else Path("benchmarks/results")
        path = base / f"seer_{slug}.json"
    else:
        text = str(args.out).replace("{gpu}", slug).replace("<gpu>", slug)
        path = Path(text)
        if path.is_dir() or text.endswith("/"):
            path = path / f"seer_{slug}.json"
    return path.with_suffix(".json"), path.with_suffix(".md")


def write_report(report: dict, args) -> None:
    report["acceptance"] = acceptance(report)
    json_path, md_path = args.paths
    json_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = json_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=2, default=str) + "\n")
    tmp.replace(json_path)
    md_path.write_text(render_markdown(report))


def dry_run_problems(report: dict) -> list[str]:
    """What a dry run must not show: failing kernels or mask plumbing (baselines missing on a CPU are fine)."""
    problems = []
    for entry in report["groups"]:
        where = f"N={entry['seqlen']} {entry['mode']}"
        if "error" in entry["dense"].get("dense_ours", {}):
            problems.append(f"{where} dense_ours: {entry['dense']['dense_ours']['error']}")
        gate = entry.get("gate") or {}
        for name, result in gate_results(gate):
            if "error" in result or result.get("ms") is None:
                problems.append(f"{where} {name}: {result.get('error', 'no timing')}")
        if gate and "error" not in gate and not gate.get("finite", False):
            problems.append(f"{where} gate: probabilities not finite")
    for row in report["rows"]:
        where = f"N={row['seqlen']} {row['mode']} {row['mask']} {row['target_sparsity']}"
        if "error" in row:
            problems.append(f"{where}: {row['error']}")
            continue
        if "error" in row["providers"]["ours"]:
            problems.append(f"{where} ours: {row['providers']['ours']['error']}")
        if not row.get("ours_finite", False):
            problems.append(f"{where}: ours not finite")
        if row.get("max_abs_diff_vs_reference", 0.0) > MAX_REFERENCE_DIFF:
            problems.append(f"{where}: ours vs reference {row['max_abs_diff_vs_reference']}")
        if row.get("blockmask_layout_ok") is False:
            problems.append(f"{where}: to_block_mask layout differs from the selection")
        if "flex" in row["providers"] and not row.get("flex_diff_ok", False):
            problems.append(f"{where}: flex vs ours {row.get('max_abs_diff_vs_flex')}")
    return problems


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--lengths",
        type=int,
        nargs="+",
        metavar="N",
        help=f"sequence lengths (default {' '.join(map(str, LENGTHS))}; dry run {DRY_LENGTHS[0]})",
    )
    parser.add_argument("--sparsities", type=float, nargs="+", default=list(SPARSITIES), metavar="S")
    parser.add_argument("--masks", nargs="+", choices=MASKS, default=list(MASKS))
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument(
        "--providers",
        nargs="+",
        choices=BASELINES[:3],
        default=list(BASELINES[:3]),
        help="baselines besides ours and dense_ours (always run)",
    )
    parser.add_argument(
        "--flex-configs",
        nargs="+",
        default=list(FLEX_CONFIGS),
        metavar="MxN:W:S",
        help="flex kernel_options BLOCK_MxBLOCK_N:num_warps:num_stages; each compiles once per "
        "(N, mode) and the fastest is reported",
    )
    parser.add_argument(
        "--flex-mode",
        default=None,
        help="torch.compile mode for flex, e.g. max-autotune-no-cudagraphs (slow to compile)",
    )
    parser.add_argument("--no-gate", action="store_true", help="skip the gate timings")
    parser.add_argument(
        "--gate-rule",
        choices=("row", "head", "budgets"),
        default="row",
        help="the gate timings' selection rule (budgets: allocation='head' with stand-in weights)",
    )
    parser.add_argument(
        "--time-budget",
        type=float,
        default=TIME_BUDGET_S,
        metavar="SECONDS",
        help="cases not started by then (counted from the script's start) are recorded as skipped",
    )
    parser.add_argument(
        "--out",
        default=None,
        help="JSON path ({gpu} or <gpu> is replaced; .md beside it); "
        "default benchmarks/results/seer_<gpu>.json, a temporary directory for --dry-run",
    )
    parser.add_argument("--dry-run", action="store_true",
                        help=f"tiny shapes ({DRY_Q_HEADS}/{DRY_KV_HEADS} heads, d{DRY_HEAD_DIM}) on the CPU with "
                             "TRITON_INTERPRET=1 (or the GPU), eager flex, no do_bench: checks the pipeline")  # fmt: skip
    args = parser.parse_args(argv)
    args.dtype = "bf16"
    if args.lengths is None:
        args.lengths = list(DRY_LENGTHS if args.dry_run else LENGTHS)
    if any(n <= 0 for n in args.lengths) or any(not 0.0 <= s < 1.0 for s in args.sparsities):
        parser.error("lengths must be positive and sparsities in [0, 1)")
    try:
        args.flex_options = {text: parse_flex_config(text) for text in args.flex_configs}
    except ValueError as exc:
        parser.error(str(exc))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda and not args.dry_run:
        raise SystemExit("bench_seer.py needs a CUDA GPU; --dry-run checks the pipeline on the CPU")
    if args.dry_run:
        setup = Setup(DRY_Q_HEADS, DRY_KV_HEADS, DRY_HEAD_DIM, "cuda" if cuda else "cpu", dry=True)
        if not cuda and os.environ.get("TRITON_INTERPRET") != "1":
            raise SystemExit("a CPU dry run needs TRITON_INTERPRET=1 set before triton is imported")
    else:
        setup = Setup(Q_HEADS, KV_HEADS, HEAD_DIM, "cuda", dry=False)
    metadata = environment(args, setup)
    args.paths = output_paths(args, metadata["gpu"], args.dry_run)
    report = {
        "metadata": metadata,
        "setup": {
            "q_heads": setup.q_heads,
            "kv_heads": setup.kv_heads,
            "head_dim": setup.head_dim,
            "block": setup.block,
            "dtype": str(setup.dtype).removeprefix("torch."),
            "batch": 1,
            "device": setup.device,
            "dry_run": setup.dry,
        },
        "flex_configs": args.flex_configs if not setup.dry else ["eager (dry run)"],
        "sparsities": args.sparsities,
        "gate_rule": args.gate_rule,
        "groups": [],
        "rows": [],
        "skipped": [],
        "notes": [],
    }
    groups = planned_groups(args)
    log(f"{len(groups)} (N, mode) groups x {len(args.masks)} masks x {len(args.sparsities)} sparsities; "
        f"writing {args.paths[0]}")  # fmt: skip
    for group in groups:
        if over_budget(args):
            for kind in args.masks:
                report["skipped"] += [{"seqlen": group.seqlen, "mode": group.mode, "mask": kind, "target_sparsity": s,
                                       "reason": f"time budget {args.time_budget:.0f} s spent"}
                                      for s in args.sparsities]  # fmt: skip
            continue
        try:
            run_group(group, setup, args, report, args.flex_options)
        except Exception as exc:  # noqa: BLE001 - e.g. OOM allocating the inputs: record it, go on
            report["notes"].append(f"{group}: group aborted: {describe_error(exc)}")
            log(f"   group aborted: {describe_error(exc)}")
        setup.free()  # the group's inputs, outputs and compiled flex graphs are out of scope now
        write_report(report, args)
    write_report(report, args)
    print()
    print(render_markdown(report), flush=True)
    log(f"wrote {args.paths[0]} and {args.paths[1]}")
    if args.dry_run:
        problems = dry_run_problems(report)
        for problem in problems:
            print(f"DRY RUN PROBLEM: {problem}", flush=True)
        print("dry run: " + ("FAILED" if problems else "pipeline OK"), flush=True)
        return 1 if problems else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
