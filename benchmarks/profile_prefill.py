"""Where a whole-model prefill's time goes: host (Python and launches), GPU kernels, host syncs; SDPA against ours.

A random-weight model of a real model's shapes (weights do not change the time) runs one prefill of ``--tokens``
tokens at batch 1, bf16, for each attention implementation and each cache kind:

* ``none``: ``model(ids, use_cache=False, logits_to_keep=1)``;
* ``dynamic``: the same with a fresh ``DynamicCache`` (what ``generate()`` does by default);
* ``static``: the same into a fresh ``StaticCache`` (``generate(cache_implementation="static")``'s prefill, eager);

each without an attention mask (``--masks none``, as a perplexity evaluation runs) and with an all-ones one (``ones``,
as ``generate()`` passes a tokenizer's mask).

Per case: the wall time of a synchronised forward (median), the host time until the forward returns without
synchronising (if it is close to the wall time, the GPU waits on the host), the sum of GPU kernel time from
``torch.profiler`` with the slowest kernels, and the number of host syncs that ``torch.cuda.set_sync_debug_mode``
reports inside the forward. Writes ``prefill_profile.json`` and ``prefill_profile.md`` to ``--out-dir``.

    python benchmarks/profile_prefill.py --model smollm2 --tokens 8192 --out-dir benchmarks/results/prefill_profile
"""

from __future__ import annotations

import argparse
import collections
import copy
import json
import pathlib
import statistics
import sys
import time
import warnings

import torch
from transformers import AutoModelForCausalLM, DynamicCache, LlamaConfig, StaticCache

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
import hf_fastattn  # noqa: F401 - registers the fastattn_* implementations
from hf_fastattn._compat import cache_argument
from hf_fastattn.evaluation.records import environment

SHAPES = {
    "smollm2": {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
                "num_key_value_heads": 3, "vocab_size": 49152, "max_position_embeddings": 8192,
                "rope_theta": 100000.0, "tie_word_embeddings": True},
    "llama8b": {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
                "num_key_value_heads": 8, "vocab_size": 128256, "max_position_embeddings": 131072,
                "rope_theta": 500000.0},
}  # fmt: skip
CACHES = ("none", "dynamic", "static")
MASKS = ("none", "ones")
TOP_KERNELS = 6


def build_model(name: str, layers: int | None) -> torch.nn.Module:
    shape = dict(SHAPES[name])
    if layers:
        shape["num_hidden_layers"] = layers
    torch.manual_seed(0)
    with torch.device("cuda"):
        return AutoModelForCausalLM.from_config(copy.deepcopy(LlamaConfig(**shape)), dtype=torch.bfloat16).eval()


def prefill_call(model, ids: torch.Tensor, cache: str, mask: str = "none"):
    """A function building a fresh cache of the given kind and one running the prefill into it (the cache is built
    outside the timing)."""
    masking = {"attention_mask": torch.ones_like(ids)} if mask == "ones" else {}

    def make_cache():
        if cache == "dynamic":
            return DynamicCache(config=model.config)
        if cache == "static":
            return StaticCache(config=model.config, max_cache_len=ids.shape[1] + 64)
        return None

    def run(past):
        kwargs = {"use_cache": False} if past is None else {**cache_argument(model, past), "use_cache": True}
        return model(ids, logits_to_keep=1, **masking, **kwargs)

    return make_cache, run


def median_times(make_cache, run, repeats: int) -> tuple[float, float]:
    """(wall ms of a synchronised forward, host ms until the forward returns), medians over ``repeats``."""
    walls, hosts = [], []
    for _ in range(repeats):
        past = make_cache()
        torch.cuda.synchronize()
        start = time.perf_counter()
        run(past)
        hosts.append(time.perf_counter() - start)
        torch.cuda.synchronize()
        walls.append(time.perf_counter() - start)
    return statistics.median(walls) * 1e3, statistics.median(hosts) * 1e3


def count_syncs(make_cache, run) -> tuple[int, list[str]]:
    """Host syncs inside one forward, as ``set_sync_debug_mode("warn")`` reports them, with the first few sites."""
    past = make_cache()
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            run(past)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    syncs = [str(w.message).splitlines()[0] for w in caught if "synchroniz" in str(w.message).lower()]
    return len(syncs), sorted(set(syncs))[:3]


def kernel_profile(make_cache, run) -> dict:
    """GPU kernel time of one forward: total, and the slowest kernels by total time (name, count, ms)."""
    past = make_cache()
    torch.cuda.synchronize()
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as profile:
        run(past)
        torch.cuda.synchronize()
    per_kernel: dict[str, list[float]] = collections.defaultdict(list)
    for event in profile.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            per_kernel[event.name].append(event.time_range.elapsed_us() / 1e3)
    ranked = sorted(per_kernel.items(), key=lambda item: -sum(item[1]))
    return {
        "kernel_ms": sum(sum(times) for times in per_kernel.values()),
        "kernel_launches": sum(len(times) for times in per_kernel.values()),
        "top": [{"name": name[:90], "count": len(times), "ms": sum(times)} for name, times in ranked[:TOP_KERNELS]],
    }


def profile_case(model, ids, implementation: str, cache: str, mask: str, repeats: int) -> dict:
    model.set_attn_implementation(implementation)
    if model.config._attn_implementation != implementation:
        raise RuntimeError(f"model runs {model.config._attn_implementation}, not {implementation}")
    make_cache, run = prefill_call(model, ids, cache, mask)
    with torch.no_grad():
        for _ in range(3):  # warm-up: Triton JIT and autotuning, cuBLAS heuristics
            run(make_cache())
        wall_ms, host_ms = median_times(make_cache, run, repeats)
        syncs, sync_sites = count_syncs(make_cache, run)
        kernels = kernel_profile(make_cache, run)
    row = {"implementation": implementation, "cache": cache, "mask": mask, "wall_ms": wall_ms, "host_ms": host_ms,
           "syncs": syncs, "sync_sites": sync_sites, **kernels}  # fmt: skip
    print(json.dumps({key: value for key, value in row.items() if key != "top"}), flush=True)
    return row


def markdown(report: dict) -> str:
    env, args = report["environment"], report["args"]
    lines = [
        f"# Whole-model prefill profile: random {args['model']} shapes, {args['tokens']} tokens, batch 1, bf16",
        "",
        (
            f"{env['gpu']}, torch {env['torch']}, triton {env['triton']}, transformers {env['transformers']}, "
            f"hf_fastattn {env['hf_fastattn']}, {env['date']}."
        ),
        f"Command: `{env['command']}`",
        "",
        (
            "wall = synchronised forward (median); host = time until the forward returns, unsynchronised (median); "
            "kernels = GPU kernel time summed over one profiled forward; syncs = host syncs inside one forward."
        ),
        "",
        "| implementation | cache | mask | wall ms | host ms | kernels ms | launches | syncs | slowest kernel (count, ms) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in report["rows"]:
        top = row["top"][0] if row["top"] else {"name": "-", "count": 0, "ms": 0.0}
        lines.append(
            f"| {row['implementation']} | {row['cache']} | {row['mask']} | {row['wall_ms']:.2f} | {row['host_ms']:.2f} | "
            f"{row['kernel_ms']:.2f} | {row['kernel_launches']} | {row['syncs']} | "
            f"`{top['name'][:48]}` ({top['count']}, {top['ms']:.2f}) |"
        )
    lines += ["", "## Slowest kernels per case", ""]
    for row in report["rows"]:
        lines.append(f"- **{row['implementation']}, {row['cache']} cache, mask {row['mask']}**: " + "; ".join(
            f"`{kernel['name'][:60]}` x{kernel['count']} {kernel['ms']:.2f} ms" for kernel in row["top"]
        ))  # fmt: skip
        if row["sync_sites"]:
            lines.append(f"  - sync sites: {row['sync_sites']}")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(SHAPES), default="smollm2")
    parser.add_argument("--layers", type=int, default=None, help="override the number of layers")
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--implementations", nargs="+", default=["sdpa", "fastattn_dense"])
    parser.add_argument("--caches", nargs="+", choices=CACHES, default=list(CACHES))
    parser.add_argument("--masks", nargs="+", choices=MASKS, default=list(MASKS))
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out-dir", type=pathlib.Path, required=True)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.error("this profile needs a CUDA GPU")
    model = build_model(args.model, args.layers)
    generator = torch.Generator(device="cuda").manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (1, args.tokens), device="cuda", generator=generator)
    rows = [profile_case(model, ids, implementation, cache, mask, args.repeats)
            for cache in args.caches for mask in args.masks for implementation in args.implementations]  # fmt: skip
    report = {"environment": environment(), "args": {**vars(args), "out_dir": str(args.out_dir)}, "rows": rows}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "prefill_profile.json").write_text(json.dumps(report, indent=1))
    (args.out_dir / "prefill_profile.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
