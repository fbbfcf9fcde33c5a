"""RULER-lite: RULER's needle-in-a-haystack tasks (NVIDIA/RULER), synthesised locally, scored with ``string_match_all``.

The six NIAH tasks that need no external data (evaluation conventions §4.1–§4.2), generated as RULER's
``scripts/data/synthetic/niah.py`` does:

=================== ========= ====== ============ ==========================================
task                haystack  keys   values       needles
=================== ========= ====== ============ ==========================================
``niah_single_1``   noise     words  numbers      1
``niah_single_2``   essay     words  numbers      1
``niah_single_3``   essay     words  UUIDs        1
``niah_multikey_1`` essay     words  numbers      4 keys (3 distractor needles), 1 queried
``niah_multivalue`` essay     words  numbers      4 values for the one key, all asked for
``niah_multiquery`` essay     words  numbers      4 keys, all 4 queried
=================== ========= ====== ============ ==========================================

- Needles are ``NEEDLE`` (``"One of the special magic {type_needle_v} for {key} is: {value}."``); keys are
  ``adjective-noun`` words, numbers have 7 digits, UUIDs are version-4 UUIDs drawn from the sample's seeded
  ``random.Random``. The needles are shuffled and inserted at distinct depths drawn from RULER's 40 depths
  (0–100 %), at sentence boundaries: between the repeats of ``NOISE_HAYSTACK`` (one per line) for the noise
  haystack, between sentences of the caller's text for the essay haystack.
- The prompt is completion-style (no chat template): an instruction, the haystack, the question, then an answer prefix
  that the model continues (``"... for {query} given in the text are"``).
- ``context_length`` is RULER's ``max_seq_length``: the prompt (special tokens included) plus the tokens to generate
  fit in it. The haystack is the longest whole number of sentences (repeats) that fits; the essay text is cycled if it
  is too short.
- Greedy decoding of ``tokens_to_generate`` (RULER's 128 for NIAH, or ``max_new_tokens``); only the generated tokens
  are scored, by ``string_match_all``: the mean over samples of the fraction of references found in the prediction
  (case-insensitive), × 100.
- Every sample draws from its own ``random.Random`` seeded by (task, ``seed``, context length, sample index), never
  from global RNG state: the same ``seed`` gives the same prompts for every attention method.
"""

from __future__ import annotations

import random
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .._distributed import run_sharded
from .metrics import load_metric
from .records import Measure, attention_summary, environment
from .retrieval import greedy_continuation

NEEDLE = "One of the special magic {type_needle_v} for {key} is: {value}."
NOISE_HAYSTACK = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
TOKENS_TO_GENERATE = 128  # RULER's tokens_to_generate for every NIAH task
# RULER's insertion depths in percent: np.round(np.linspace(0, 100, num=40)).
DEPTHS = tuple(round(100 * index / 39) for index in range(40))

# Completion-style prompt in RULER's structure (instruction, haystack, question, answer prefix), own wording.
# {kind} is the value type in the number the question needs: "number"/"numbers", "uuid"/"uuids".
_INSTRUCTION = {
    "one": "The text below hides a special magic {kind}. Read it carefully and remember the {kind}: you will be asked "
    "for it after the text.",
    "many": "The text below hides special magic {kind}. Read it carefully and remember the {kind}: you will be asked "
    "for them after the text.",
}
_QUESTION = {
    "one": "Question: what is the special magic {kind} for {query} given in the text?",
    "many": "Question: what are all the special magic {kind} for {query} given in the text?",
}
_ANSWER_PREFIX = {
    "one": "Answer: the special magic {kind} for {query} given in the text is",
    "many": "Answer: the special magic {kind} for {query} given in the text are",
}

# Key words "adjective-noun", as RULER's wonderwords pairs.
ADJECTIVES = (
    "amber", "ancient", "bitter", "bold", "brave", "bright", "calm", "clever", "crimson", "curious", "damp", "eager",
    "fancy", "fierce", "fragile", "gentle", "glossy", "golden", "hollow", "humble", "icy", "jolly", "kind", "lively",
    "lucky", "mellow", "misty", "narrow", "noble", "odd", "pale", "proud", "quiet", "rapid", "rusty", "shiny", "silent",
    "silver", "sleepy", "smooth", "steady", "sturdy", "swift", "tender", "tiny", "vivid", "wary", "wild", "witty",
    "young",
)  # fmt: skip
NOUNS = (
    "anchor", "apple", "badger", "basket", "beacon", "bridge", "candle", "canyon", "castle", "cellar", "comet",
    "copper", "dragon", "falcon", "feather", "forest", "garden", "glacier", "hammer", "harbor", "helmet", "island",
    "jacket", "kettle", "lantern", "meadow", "mirror", "needle", "orchard", "otter", "pebble", "pepper", "pillow",
    "planet", "pocket", "puzzle", "rabbit", "river", "saddle", "shadow", "spoon", "summit", "thistle", "tiger",
    "tunnel", "valley", "violin", "walnut", "willow", "window",
)  # fmt: skip
KEY_WORDS = tuple(f"{adjective}-{noun}" for adjective in ADJECTIVES for noun in NOUNS)


@dataclass(frozen=True)
class NiahTask:
    """One RULER NIAH configuration (``synthetic.yaml``): haystack kind, value type and needle counts."""

    haystack: str  # "noise" (NOISE_HAYSTACK repeated) or "essay" (the caller's text)
    value_type: str  # "numbers" or "uuids" (keys are always words)
    num_keys: int = 1  # needle keys in the haystack
    num_values: int = 1  # values (needles) per key
    num_queries: int = 1  # keys asked for; the others are distractors


TASKS: dict[str, NiahTask] = {
    "niah_single_1": NiahTask("noise", "numbers"),
    "niah_single_2": NiahTask("essay", "numbers"),
    "niah_single_3": NiahTask("essay", "uuids"),
    "niah_multikey_1": NiahTask("essay", "numbers", num_keys=4),
    "niah_multivalue": NiahTask("essay", "numbers", num_values=4),
    "niah_multiquery": NiahTask("essay", "numbers", num_keys=4, num_queries=4),
}
DEFAULT_TASKS = tuple(TASKS)


def ruler_lite(
    model: nn.Module,
    tokenizer,
    haystack: str,
    *,
    context_lengths: Sequence[int],
    tasks: Sequence[str] = DEFAULT_TASKS,
    samples: int = 25,
    seed: int = 0,
    max_new_tokens: int | None = None,
    progress: bool = True,
) -> dict:
    """RULER-lite scores per task and context length, as a JSON-able record (see the module docstring).

    ``haystack`` is the essay text (e.g. the Paul Graham essays concatenated); ``niah_single_1`` uses the generated
    noise haystack instead. ``samples`` prompts per (task, context length); ``max_new_tokens`` overrides RULER's
    ``tokens_to_generate`` (128), and the prompt then leaves room for that many tokens instead.

    Record: ``scores[task][str(context_length)]`` (``string_match_all``, 0–100), ``length_means`` (mean over tasks per
    length), ``task_means``, ``mean`` (over every task × length cell), ``cells`` (every sample's references,
    prediction, score and prompt length), ``attention``, ``seconds`` and ``peak_memory_mib`` (generation and scoring),
    ``environment`` and ``settings``.
    """
    tasks = _check_tasks(tasks)
    context_lengths = list(context_lengths)
    if not context_lengths:
        raise ValueError("context_lengths is empty: give at least one context length in tokens")
    if len(set(context_lengths)) != len(context_lengths):
        raise ValueError(f"context_lengths has repeats: {context_lengths}")
    for context_length in context_lengths:
        _check_context_length(model, context_length)
    if samples < 1:
        raise ValueError(f"samples must be at least 1, got {samples}")
    if max_new_tokens is not None and max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    essay_tasks = [task for task in tasks if TASKS[task].haystack == "essay"]
    sentences = _essay_sentences(haystack, essay_tasks) if essay_tasks else []
    tokens_to_generate = max_new_tokens or TOKENS_TO_GENERATE

    # Every prompt is built before any generation: a context too small for a task fails at once, not hours in.
    cases: dict[tuple[str, int], list[tuple[str, list[str]]]] = {}
    for task in tasks:
        for context_length in context_lengths:
            cases[task, context_length] = [
                _make_sample(task, tokenizer, sentences, context_length, rng, tokens_to_generate)
                for rng in (_sample_rng(task, seed, context_length, index) for index in range(samples))
            ]

    # (task, context length, prompt, references), cell by cell: under ``accelerate launch`` the processes share them.
    samples_to_run = [
        (*cell, prompt, references) for cell, cell_cases in cases.items() for prompt, references in cell_cases
    ]
    device = next(model.parameters()).device

    def run_sample(sample: tuple) -> dict:
        _, _, prompt, references = sample
        prediction, prompt_tokens = _greedy_continuation(model, tokenizer, prompt, tokens_to_generate, device)
        score = string_match_all([prediction], [references])
        return {"references": references, "prediction": prediction, "score": score, "prompt_tokens": prompt_tokens}

    was_training = model.training
    model.eval()
    try:
        with Measure() as measure, torch.no_grad():
            records = run_sharded(
                samples_to_run,
                run_sample,
                model,
                describe=lambda sample: f"{sample[0]} @ {sample[1]}",
                progress=progress,
            )
    finally:
        model.train(was_training)

    cells = []
    for cell_index, (task, context_length) in enumerate(cases):
        cell_records = records[cell_index * samples : (cell_index + 1) * samples]
        score = string_match_all([r["prediction"] for r in cell_records], [r["references"] for r in cell_records])
        cells.append({"task": task, "context_length": context_length, "score": score, "samples": cell_records})

    scores = {task: {} for task in tasks}
    for cell in cells:
        scores[cell["task"]][str(cell["context_length"])] = cell["score"]
    length_means = {str(length): _mean([scores[task][str(length)] for task in tasks]) for length in context_lengths}
    return {
        "task": "ruler_lite",
        "metric": "string_match_all",
        "scores": scores,
        "length_means": length_means,
        "task_means": {task: _mean(list(scores[task].values())) for task in tasks},
        "mean": _mean([cell["score"] for cell in cells]),
        "cells": cells,
        "attention": attention_summary(model),
        "seconds": measure.seconds,
        "peak_memory_mib": measure.peak_memory_mib,
        "environment": environment(),
        "settings": {
            "tasks": list(tasks),
            "context_lengths": context_lengths,
            "samples": samples,
            "seed": seed,
            "tokens_to_generate": tokens_to_generate,
            "max_new_tokens": max_new_tokens,
            "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
            "needle": NEEDLE,
            "noise_haystack": NOISE_HAYSTACK,
            "essay_sentences": len(sentences),
            "context_length_includes_generated_tokens": True,
            "decoding": "greedy",
        },
    }


def make_sample(
    task: str,
    tokenizer,
    haystack: str,
    context_length: int,
    rng: random.Random,
    *,
    tokens_to_generate: int = TOKENS_TO_GENERATE,
) -> tuple[str, list[str]]:
    """One RULER-lite prompt for ``task`` and its reference strings (the values the answer must contain).

    The prompt, tokenised with the tokenizer's special tokens, plus ``tokens_to_generate`` fits in ``context_length``
    tokens; it ends with the answer prefix. Everything random comes from ``rng``, so a fresh ``random.Random(seed)``
    gives the same sample every time.
    """
    (task,) = _check_tasks([task])
    sentences = _essay_sentences(haystack, [task]) if TASKS[task].haystack == "essay" else []
    if tokens_to_generate < 0:
        raise ValueError(f"tokens_to_generate must be non-negative, got {tokens_to_generate}")
    return _make_sample(task, tokenizer, sentences, context_length, rng, tokens_to_generate)


def string_match_all(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """RULER's ``string_match_all``: mean over samples of the fraction of references in the prediction, × 100.

    Matching is case-insensitive substring search. The rule lives in the ``string_match_all`` metric module
    (:func:`hf_fastattn.evaluation.metrics.load_metric`).
    """
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} reference lists")
    metric = load_metric("string_match_all")
    return metric.compute(predictions=list(predictions), references=[list(refs) for refs in references])["score"]


# --------------------------------------------------------------------------------------------------------------------
# Sample synthesis
# --------------------------------------------------------------------------------------------------------------------


def _make_sample(
    task: str, tokenizer, sentences: list[str], context_length: int, rng: random.Random, tokens_to_generate: int
) -> tuple[str, list[str]]:
    spec = TASKS[task]
    # Every random draw happens here, before the haystack is sized: the sample does not depend on the fitting.
    keys = rng.sample(KEY_WORDS, spec.num_keys)
    values = _distinct_values(spec.value_type, spec.num_keys * spec.num_values, rng)
    values_per_key = [values[i * spec.num_values : (i + 1) * spec.num_values] for i in range(spec.num_keys)]
    needles = [
        NEEDLE.format(type_needle_v=spec.value_type, key=key, value=value)
        for key, key_values in zip(keys, values_per_key)
        for value in key_values
    ]
    rng.shuffle(needles)
    depths = sorted(rng.sample(DEPTHS, len(needles)))
    queried = rng.sample(range(spec.num_keys), spec.num_queries)
    queries = [keys[index] for index in queried]
    references = [value for index in queried for value in values_per_key[index]]

    number = "one" if len(references) == 1 else "many"
    kind = spec.value_type[:-1] if number == "one" else spec.value_type
    query = queries[0] if len(queries) == 1 else ", ".join(queries[:-1]) + ", and " + queries[-1]
    head = _INSTRUCTION[number].format(kind=kind)
    tail = (
        _QUESTION[number].format(kind=kind, query=query) + "\n" + _ANSWER_PREFIX[number].format(kind=kind, query=query)
    )

    if spec.haystack == "noise":
        units, separator = None, "\n"
    else:
        units, separator = sentences, " "

    def build(count: int) -> str:
        haystack_units = [NOISE_HAYSTACK] * count if units is None else [units[i % len(units)] for i in range(count)]
        return "\n".join([head, _insert_needles(haystack_units, needles, depths, separator), tail])

    budget = context_length - tokens_to_generate

    def length(count: int) -> int:
        # Counted as generation will tokenise it; quiet: the search tries prompts longer than the model takes.
        return len(tokenizer(build(count), verbose=False)["input_ids"])

    base = length(0)
    if base > budget:
        raise ValueError(
            f"context_length {context_length} is too small for {task}: the prompt without haystack takes {base} "
            f"tokens and {tokens_to_generate} more are generated"
        )
    return build(_largest_fitting(length, budget, base)), references


def _largest_fitting(length, budget: int, base: int) -> int:
    """The largest haystack unit count whose prompt fits ``budget`` tokens (``length(0) == base`` fits)."""
    # Estimate from one unit's cost, gallop up to a count that does not fit, then bisect. Every unit (a sentence) costs
    # at least one token, so more than ``budget`` units never fit: that bounds the search.
    per_unit = max(1, length(1) - base)
    low, high = 0, max(1, (budget - base) // per_unit + 1)
    while high <= budget and length(high) <= budget:
        low, high = high, 2 * high
    while high - low > 1:
        middle = (low + high) // 2
        if length(middle) <= budget:
            low = middle
        else:
            high = middle
    return low


def _insert_needles(units: list[str], needles: list[str], depths: list[int], separator: str) -> str:
    """``units`` joined by ``separator`` with the needles inserted between units at the given depths (percent)."""
    positions = [len(units) * depth // 100 for depth in depths]  # sorted, as the depths are
    pieces, previous = [], 0
    for position, needle in zip(positions, needles):
        pieces.extend(units[previous:position])
        pieces.append(needle)
        previous = position
    pieces.extend(units[previous:])
    return separator.join(pieces)


def _distinct_values(value_type: str, count: int, rng: random.Random) -> list[str]:
    values: list[str] = []
    while len(values) < count:
        if value_type == "numbers":
            value = str(rng.randint(1_000_000, 9_999_999))
        else:
            value = str(uuid.UUID(int=rng.getrandbits(128), version=4))
        if value not in values:
            values.append(value)
    return values


def _essay_sentences(haystack: str, tasks: Sequence[str]) -> list[str]:
    """The essay text as sentences (whitespace collapsed, split after '.', '!' or '?')."""
    text = re.sub(r"\s+", " ", haystack).strip()
    if not text:
        raise ValueError(
            f"the haystack text is empty, but {', '.join(tasks)} hide(s) the needles in it: pass the essay text "
            "(e.g. the Paul Graham essays concatenated)"
        )
    return re.split(r"(?<=[.!?]) ", text)


def _sample_rng(task: str, seed: int, context_length: int, index: int) -> random.Random:
    # A string seed is hashed deterministically (SHA-512), independent of PYTHONHASHSEED.
    return random.Random(f"ruler/{task}/{seed}/{context_length}/{index}")


# --------------------------------------------------------------------------------------------------------------------
# Checks, generation
# --------------------------------------------------------------------------------------------------------------------


def _check_tasks(tasks: Sequence[str]) -> list[str]:
    if isinstance(tasks, str):
        tasks = [tasks]
    tasks = list(tasks)
    if not tasks:
        raise ValueError(f"tasks is empty: choose from {', '.join(TASKS)}")
    unknown = [task for task in tasks if task not in TASKS]
    if unknown:
        raise ValueError(f"unknown RULER-lite task(s) {unknown}; valid tasks: {', '.join(TASKS)}")
    duplicates = sorted({task for task in tasks if tasks.count(task) > 1})
    if duplicates:
        raise ValueError(f"task(s) {duplicates} given more than once")
    return tasks


def _check_context_length(model: nn.Module, context_length: int) -> None:
    if context_length < 1:
        raise ValueError(f"context lengths must be positive numbers of tokens, got {context_length}")
    max_positions = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    if max_positions is not None and context_length > max_positions:
        raise ValueError(f"context length {context_length} exceeds the model's max_position_embeddings {max_positions}")


def _greedy_continuation(
    model: nn.Module, tokenizer, prompt: str, max_new_tokens: int, device: torch.device
) -> tuple[str, int]:
    """The generated text only (control characters as newlines, stripped, as RULER's post-processing), and the
    prompt's length in tokens."""
    text, prompt_tokens = greedy_continuation(model, tokenizer, prompt, max_new_tokens, device)
    return re.sub(r"[\x00-\x1f]", "\n", text).strip(), prompt_tokens


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)
