"""Predict what the causal schedule of the dense forward can gain: replay the GPU's block scheduler on the tile costs.

The hardware hands out a grid's programs in order, each to the first free slot (SMs x co-resident programs). A causal
query tile's cost is the number of key tiles it visits plus a fixed prologue/epilogue, so the order decides how long
the last, lonely programs run after every other slot has gone idle. This script computes the makespan of

- ``head order``: each head's tiles heavy first, one head after another (the old 2-D grid);
- ``sections``: equal sections of consecutive heads, each starting all its heavy tiles first (``schedule_tile`` in
  hf_fastattn/ops/dense/fwd.py); shown for the largest divisor of the head count whose K/V fit half the L2 (the
  library itself uses one section of every head when they all fit, else the head-major order),

and reports the idle share of each (1 - work / (slots x makespan)), and the predicted speed-up of sections over head
order. It models the tail only: no L2 misses, no clock changes, equal cost per key tile. CPU only, no GPU needed.

    python benchmarks/causal_schedule_sim.py
"""

from __future__ import annotations

import argparse
import heapq
import math

H100_SMS = 132
H100_L2_BYTES = 50 * 1024 * 1024


def tile_costs(seq: int, block_m: int, block_n: int, prologue: float) -> list[float]:
    """Cost of each causal query tile, in key-tile visits (tile i sees keys up to its last row)."""
    return [prologue + math.ceil(min(seq, (i + 1) * block_m) / block_n) for i in range(math.ceil(seq / block_m))]


def head_order(num_heads: int, costs: list[float]) -> list[float]:
    heavy_first = costs[::-1]
    return [cost for _ in range(num_heads) for cost in heavy_first]


def section_order(num_heads: int, costs: list[float], section_heads: int) -> list[float]:
    """Sections of ``section_heads`` consecutive heads, each rank-major (every head's heaviest tile first)."""
    heavy_first = costs[::-1]
    return [cost for _ in range(num_heads // section_heads) for cost in heavy_first for _ in range(section_heads)]


def idle_share(order: list[float], slots: int) -> float:
    """1 - busy / (slots x makespan) with in-order dispatch to the earliest free slot."""
    free_at = [0.0] * slots
    for cost in order:
        heapq.heappush(free_at, heapq.heappop(free_at) + cost)
    return 1.0 - sum(order) / (slots * max(free_at))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--programs-per-sm", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--prologue", type=float, default=2.0, help="fixed cost per program, in key-tile visits")
    args = parser.parse_args()

    # (label, batch, q heads, kv heads, head dim, seq, block_m, block_n)
    cases = [
        *((f"bench grid d128 N={n}", max(1, 16384 // n), 32, 32, 128, n, 128, 64) for n in (4096, 8192, 16384, 32768)),
        *((f"bench grid d64 N={n}", max(1, 16384 // n), 32, 32, 64, n, 128, 64) for n in (4096, 8192, 16384, 32768)),
        *((f"SmolLM2 B=1 9/3 d64 N={n}", 1, 9, 3, 64, n, 128, 64) for n in (2048, 4096, 8192)),
        *((f"Llama-8B B=1 32/8 d128 N={n}", 1, 32, 8, 128, n, 128, 64) for n in (4096, 8192, 32768)),
    ]
    print("| case | programs/SM | heads/section | idle, head order | idle, sections | predicted speed-up |")
    print("|---|---|---|---|---|---|")
    for label, batch, q_heads, kv_heads, head_dim, seq, block_m, block_n in cases:
        heads = batch * q_heads
        bytes_per_head = 2 * seq * head_dim * 2 / (q_heads // kv_heads)  # K and V in bf16, shared by the group
        fits = max(1, int(H100_L2_BYTES // 2 // bytes_per_head))
        per_section = max(size for size in range(1, heads + 1) if heads % size == 0 and size <= fits)
        costs = tile_costs(seq, block_m, block_n, args.prologue)
        for per_sm in args.programs_per_sm:
            slots = H100_SMS * per_sm
            old = idle_share(head_order(heads, costs), slots)
            new = idle_share(section_order(heads, costs, per_section), slots)
            print(f"| {label} | {per_sm} | {per_section} | {old:.1%} | {new:.1%} | {(1 - new) / (1 - old):.2f}x |")


if __name__ == "__main__":
    main()
