"""The main job: how much faster, at what quality? Dense attention and one hf_fastattn method, side by side.

Runs the same perplexity windows and the same needle grid (same seeds, same prompts) first with the model's own dense
attention (SDPA) and then with the method patched in, and writes:

* ``results.json``: every record (quality next to density, time and peak memory, with the environment);
* ``needle_<implementation>.png``: one gkamradt-style heatmap per run, on a shared colour scale;
* ``summary.md``: the side-by-side table, also printed.

Defaults are sized for a CPU (SmolLM2 at 256-512 tokens); pass longer context lengths on a GPU.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from pathlib import Path

from ..patch import use
from .perplexity import perplexity
from .plots import save_heatmap
from .records import environment, write_json
from .retrieval import needle_grid


def run_quickstart(
    model,
    tokenizer,
    *,
    method: str = "dense",
    eval_text: str,
    output_dir: str | os.PathLike,
    context_lengths: Sequence[int] = (256, 512),
    depth_percents: Sequence[float] = (0, 50, 100),
    needles_per_cell: int = 1,
    perplexity_context: int = 512,
    perplexity_tokens: int = 2048,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Evaluate dense vs ``method`` on ``model``; returns the records and writes them under ``output_dir``."""
    output_dir = Path(output_dir)
    _check_writable(output_dir)
    runs = {}
    for patch_method in (None, method):  # the model's own attention first, then the method patched in
        with _maybe_patched(model, patch_method):
            ppl = perplexity(
                model, tokenizer, eval_text, context_length=perplexity_context, max_tokens=perplexity_tokens,
                progress=progress,
            )  # fmt: skip
            needle = needle_grid(
                model, tokenizer, eval_text, context_lengths=context_lengths, depth_percents=depth_percents,
                needles_per_cell=needles_per_cell, seed=seed, progress=progress,
            )  # fmt: skip
        implementation = needle["attention"]["implementation"]
        save_heatmap(needle, output_dir / f"needle_{implementation}.png")
        runs[implementation] = {"perplexity": ppl, "needle": needle}
    summary = summary_table(runs)
    write_json(output_dir / "results.json", {"environment": environment(), "runs": runs})
    (output_dir / "summary.md").write_text(summary + "\n")
    return {"runs": runs, "summary": summary}


def summary_table(runs: dict[str, dict]) -> str:
    """Markdown: one row per attention implementation, quality next to density, time and memory."""
    header = (
        "| attention | density | perplexity (ctx) | needle score | perplexity s | needle s | peak MiB |\n"
        "|---|---|---|---|---|---|---|"
    )
    rows = []
    for implementation, run in runs.items():
        ppl, needle = run["perplexity"], run["needle"]
        peaks = [p for p in (ppl["peak_memory_mib"], needle["peak_memory_mib"]) if p is not None]
        rows.append(
            f"| {implementation} | {_number(ppl['attention']['density'], '.3f')} "
            f"| {ppl['perplexity']:.3f} ({ppl['context_length']}) | {needle['mean_score']:.3f} "
            f"| {ppl['seconds']:.1f} | {needle['seconds']:.1f} | {_number(max(peaks) if peaks else None, '.0f')} |"
        )
    return "\n".join([header, *rows])


def _number(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def _maybe_patched(model, method: str | None):
    return use(model, method) if method else contextlib.nullcontext(model)


def _check_writable(directory: Path) -> None:
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / ".write_test"
        probe.write_text("")
        probe.unlink()
    except OSError as error:
        raise OSError(f"cannot write results to {directory}: {error.strerror or error}") from error
