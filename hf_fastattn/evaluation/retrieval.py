"""Long-context retrieval: needle in a haystack (gkamradt style) and passkey retrieval (Landmark-attention format).

Both harnesses share one protocol (evaluation conventions §2–§3):

- a completion-style prompt (no chat template) that ends in the answer prefix, so a base model can answer;
- greedy decoding, ``model.generate(..., do_sample=False, max_new_tokens=...)``, model in eval mode, no gradients;
- every case draws its randomness from its own ``random.Random`` seeded by (task, ``seed``, context length, depth,
  trial), never from global RNG state: the same ``seed`` gives the same prompts for every attention method, so dense
  and sparse runs score the same cases;
- substring scoring of the generated tokens only (the prompt itself contains the answer), no LLM judge.

A result is one JSON-able record: per-cell scores and responses, the mean score, the attention summary (method,
density), time, peak memory and the environment (§6.3). :func:`hf_fastattn.evaluation.plots.save_heatmap` plots it.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Callable, Sequence

import torch
from torch import nn

from .._distributed import run_sharded
from .metrics import load_metric
from .records import Measure, attention_summary, environment

# Needle in a haystack: MInference-style substring scoring, completion prompt ending in the answer prefix.
NEEDLE = "\nThe special magic number for {city} is: {number}.\n"
NEEDLE_QUESTION = "\nWhat is the special magic number for {city}? The special magic number for {city} is:"
CITIES = (
    "Amsterdam",
    "Athens",
    "Bangkok",
    "Berlin",
    "Cairo",
    "Chicago",
    "Dublin",
    "Helsinki",
    "Istanbul",
    "Jakarta",
    "Lagos",
    "Lima",
    "Lisbon",
    "London",
    "Madrid",
    "Montreal",
    "Mumbai",
    "Nairobi",
    "Oslo",
    "Paris",
    "Prague",
    "Seoul",
    "Sydney",
    "Tokyo",
    "Toronto",
    "Vienna",
)

# Passkey retrieval, verbatim from the Landmark-attention / LongLoRA prompt.
PASSKEY_TASK = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
    "I will quiz you about the important information there."
)
PASSKEY_GARBAGE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
PASSKEY_INFORMATION = "The pass key is {pass_key}. Remember it. {pass_key} is the pass key."
PASSKEY_QUESTION = "What is the pass key? The pass key is"

# (context_length, depth, rng) -> (prompt, answer)
_PromptBuilder = Callable[[int, float, random.Random], tuple[str, str]]


# --------------------------------------------------------------------------------------------------------------------
# Needle in a haystack
# --------------------------------------------------------------------------------------------------------------------


def needle_grid(
    model: nn.Module,
    tokenizer,
    haystack: str,
    *,
    context_lengths: Sequence[int],
    depth_percents: Sequence[float],
    needles_per_cell: int = 3,
    seed: int = 0,
    max_new_tokens: int = 16,
    buffer: int = 64,
    progress: bool = True,
) -> dict:
    """Needle-in-a-haystack accuracy over a (context length × depth percent) grid, as a JSON-able record.

    Each cell holds ``needles_per_cell`` cases, each with its own city and 7-digit number (see :func:`needle_prompt`
    for the prompt). A case scores 1 when the number appears in the generated continuation. Context lengths are prompt
    budgets in tokens: ``buffer`` tokens stay free for the answer and re-tokenisation slack.
    """
    _check_grid(model, context_lengths, needles_per_cell, max_new_tokens, "needles_per_cell")
    _check_depths(depth_percents, upper=100, name="depth_percent")
    if buffer < 0:
        raise ValueError(f"buffer must be a non-negative number of tokens, got {buffer}")
    haystack_tokens = _haystack_tokens(tokenizer, haystack)

    def build(context_length: int, depth_percent: float, rng: random.Random) -> tuple[str, str]:
        return _needle_prompt(tokenizer, haystack_tokens, context_length, depth_percent, rng, buffer)

    settings = {
        "context_lengths": list(context_lengths),
        "depth_percents": list(depth_percents),
        "needles_per_cell": needles_per_cell,
        "seed": seed,
        "max_new_tokens": max_new_tokens,
        "buffer": buffer,
        "haystack_tokens": len(haystack_tokens),
        "needle": NEEDLE,
        "question": NEEDLE_QUESTION,
        "scoring": "number as a substring of the generated text",
    }
    return _run_grid(
        model,
        tokenizer,
        task="needle",
        build=build,
        context_lengths=context_lengths,
        depths=depth_percents,
        depth_percents=depth_percents,
        trials=needles_per_cell,
        seed=seed,
        max_new_tokens=max_new_tokens,
        is_correct=_contains_answer,
        progress=progress,
        settings=settings,
    )


def needle_prompt(
    tokenizer, haystack: str, context_length: int, depth_percent: float, rng: random.Random, *, buffer: int = 64
) -> tuple[str, str]:
    """One needle-in-a-haystack prompt and its answer (the needle's number, a string), gkamradt's insertion.

    The needle ``NEEDLE`` (a city from ``CITIES`` and a 7-digit number, both drawn from ``rng``) is inserted into the
    haystack tokens, repeated as needed and trimmed to ``context_length - buffer - len(needle) - len(question)``
    (less the tokenizer's special tokens, such as BOS, so that ``context_length`` bounds the whole prompt):

    - depth 100 appends it at the end;
    - otherwise ``insertion_point = int(len(context_tokens) * depth_percent / 100)``, moved backwards until the token
      before it ends a sentence (its decoded text ends with '.'), so that the needle starts on a sentence boundary
      (depth 0, or no sentence end before the point, puts it at the start).

    The tokens are decoded back to text and ``NEEDLE_QUESTION``, which ends in the answer prefix, is appended.
    """
    _check_depths([depth_percent], upper=100, name="depth_percent")
    return _needle_prompt(tokenizer, _haystack_tokens(tokenizer, haystack), context_length, depth_percent, rng, buffer)


def _needle_prompt(
    tokenizer,
    haystack_tokens: list[int],
    context_length: int,
    depth_percent: float,
    rng: random.Random,
    buffer: int,
) -> tuple[str, str]:
    city = rng.choice(CITIES)
    number = str(rng.randint(1_000_000, 9_999_999))
    needle_tokens = _encode(tokenizer, NEEDLE.format(city=city, number=number))
    question = NEEDLE_QUESTION.format(city=city)
    question_length = len(_encode(tokenizer, question))
    special_length = len(tokenizer("")["input_ids"])  # BOS etc., added when the prompt is tokenised for generation
    context_budget = context_length - buffer - len(needle_tokens) - question_length - special_length
    if context_budget < 1:
        raise ValueError(
            f"context_length {context_length} is too small to hold the needle ({len(needle_tokens)} tokens), "
            f"the question ({question_length} tokens), special tokens ({special_length}) and the buffer ({buffer} "
            "tokens) with any haystack"
        )
    copies = math.ceil(context_budget / len(haystack_tokens))
    context_tokens = (haystack_tokens * copies)[:context_budget]
    insertion_point = _needle_insertion_point(tokenizer, context_tokens, depth_percent)
    tokens = context_tokens[:insertion_point] + needle_tokens + context_tokens[insertion_point:]
    return tokenizer.decode(tokens, clean_up_tokenization_spaces=False) + question, number


def _contains_answer(answer: str, response: str) -> bool:
    """The needle's rule: the answer appears verbatim in the response (the ``substring_match`` metric module)."""
    return load_metric("substring_match").compute(predictions=[response], references=[answer])["per_sample"][0] == 1


def _needle_insertion_point(tokenizer, context_tokens: list[int], depth_percent: float) -> int:
    if depth_percent == 100:
        return len(context_tokens)
    point = int(len(context_tokens) * depth_percent / 100)
    while point > 0 and not tokenizer.decode([context_tokens[point - 1]]).rstrip().endswith("."):
        point -= 1
    return point


def _haystack_tokens(tokenizer, haystack: str) -> list[int]:
    """The haystack's tokens, ending in a paragraph break so that repeated copies join cleanly."""
    if not haystack.strip():
        raise ValueError("the haystack text is empty: pass the text to hide the needle in (e.g. concatenated essays)")
    return _encode(tokenizer, haystack.strip() + "\n\n")


# --------------------------------------------------------------------------------------------------------------------
# Passkey retrieval
# --------------------------------------------------------------------------------------------------------------------


def passkey(
    model: nn.Module,
    tokenizer,
    *,
    context_lengths: Sequence[int],
    depths: Sequence[float] = (0, 0.25, 0.5, 0.75, 1.0),
    trials: int = 4,
    seed: int = 0,
    max_new_tokens: int = 8,
    progress: bool = True,
) -> dict:
    """Passkey retrieval accuracy over a (context length × depth) grid, as a JSON-able record.

    ``depths`` are fractions in [0, 1] of the garbage placed before the information line (see
    :func:`passkey_prompt`); cells record them as ``depth_percent``. A case scores 1 when the pass key's digits appear
    as a whole number in the generated continuation.
    """
    _check_grid(model, context_lengths, trials, max_new_tokens, "trials")
    _check_depths(depths, upper=1, name="depth")
    # No buffer here: the prompt fills the context length, so the generated tokens must fit after it.
    max_positions = _max_positions(model)
    longest = max(context_lengths)
    if max_positions is not None and longest + max_new_tokens > max_positions:
        raise ValueError(
            f"context length {longest} + max_new_tokens {max_new_tokens} exceeds the model's "
            f"max_position_embeddings {max_positions}"
        )

    def build(context_length: int, depth: float, rng: random.Random) -> tuple[str, str]:
        return passkey_prompt(tokenizer, context_length, depth, rng)

    settings = {
        "context_lengths": list(context_lengths),
        "depths": list(depths),
        "trials": trials,
        "seed": seed,
        "max_new_tokens": max_new_tokens,
        "garbage": PASSKEY_GARBAGE,
        "question": PASSKEY_QUESTION,
        "scoring": "pass key digits as a whole number in the generated text",
    }
    return _run_grid(
        model,
        tokenizer,
        task="passkey",
        build=build,
        context_lengths=context_lengths,
        depths=depths,
        depth_percents=[100 * depth for depth in depths],
        trials=trials,
        seed=seed,
        max_new_tokens=max_new_tokens,
        is_correct=lambda answer, response: answer in re.findall(r"\d+", response),
        progress=progress,
        settings=settings,
    )


def passkey_prompt(tokenizer, context_length: int, depth: float, rng: random.Random) -> tuple[str, str]:
    """One passkey prompt of about ``context_length`` tokens and its answer (the pass key, a string).

    ``"\\n".join([task, garbage_prefix, information_line, garbage_suffix, final_question])`` with
    ``pass_key = rng.randint(1, 50000)``. The garbage sentence is repeated as many times as fits in
    ``context_length`` tokens (measured with the tokenizer, special tokens included), and the repeats are split at
    ``round(repeats * depth)``: the prompt is at most ``context_length`` tokens and short of it by less than about one
    garbage sentence.
    """
    _check_depths([depth], upper=1, name="depth")
    pass_key = rng.randint(1, 50000)
    information = PASSKEY_INFORMATION.format(pass_key=pass_key)

    def build(repeats: int) -> str:
        prefix = round(repeats * depth)
        garbage_prefix = " ".join([PASSKEY_GARBAGE] * prefix)
        garbage_suffix = " ".join([PASSKEY_GARBAGE] * (repeats - prefix))
        lines = [PASSKEY_TASK, garbage_prefix, information, garbage_suffix, PASSKEY_QUESTION]
        return "\n".join(lines)

    def fits(repeats: int) -> bool:
        return len(tokenizer(build(repeats))["input_ids"]) <= context_length

    fixed_length = len(tokenizer(build(0))["input_ids"])
    if fixed_length > context_length:
        raise ValueError(
            f"context_length {context_length} is too small for the passkey prompt without garbage ({fixed_length} "
            "tokens: task description, information line and question)"
        )
    # Estimate from the sentence's token count, then correct for merges at the joins.
    repeats = (context_length - fixed_length) // len(_encode(tokenizer, " " + PASSKEY_GARBAGE))
    while fits(repeats + 1):
        repeats += 1
    while repeats > 0 and not fits(repeats):
        repeats -= 1
    return build(repeats), str(pass_key)


# --------------------------------------------------------------------------------------------------------------------
# Shared grid runner
# --------------------------------------------------------------------------------------------------------------------


def _run_grid(
    model: nn.Module,
    tokenizer,
    *,
    task: str,
    build: _PromptBuilder,
    context_lengths: Sequence[int],
    depths: Sequence[float],
    depth_percents: Sequence[float],
    trials: int,
    seed: int,
    max_new_tokens: int,
    is_correct: Callable[[str, str], bool],
    progress: bool,
    settings: dict,
) -> dict:
    """Generate and score ``trials`` cases per (context length, depth) cell; see the module docstring.

    Under ``accelerate launch`` the cases are shared out over the processes (``hf_fastattn._distributed``).
    """
    device = next(model.parameters()).device
    # (context length, depth, depth percent, trial), cell by cell.
    cases = [
        (context_length, depth, depth_percent, trial)
        for context_length in context_lengths
        for depth, depth_percent in zip(depths, depth_percents)
        for trial in range(trials)
    ]

    def run_case(case: tuple) -> dict:
        context_length, depth, _, trial = case
        prompt, answer = build(context_length, depth, _case_rng(task, seed, context_length, depth, trial))
        response, prompt_tokens = greedy_continuation(model, tokenizer, prompt, max_new_tokens, device)
        correct = is_correct(answer, response)
        return {"answer": answer, "response": response, "correct": correct, "prompt_tokens": prompt_tokens}

    was_training = model.training
    model.eval()
    try:
        with Measure() as measure, torch.no_grad():
            responses = run_sharded(
                cases, run_case, model, describe=lambda case: f"{task} @ {case[0]}", progress=progress
            )
    finally:
        model.train(was_training)

    cells = []
    for start in range(0, len(cases), trials):
        context_length, _, depth_percent, _ = cases[start]
        cell_responses = responses[start : start + trials]
        correct = sum(entry["correct"] for entry in cell_responses)
        cells.append(
            {
                "context_length": context_length,
                "depth_percent": depth_percent,
                "trials": trials,
                "correct": correct,
                "score": correct / trials,
                "responses": cell_responses,
            }
        )
    return {
        "task": task,
        "cells": cells,
        "mean_score": sum(cell["correct"] for cell in cells) / sum(cell["trials"] for cell in cells),
        "attention": attention_summary(model),
        "seconds": measure.seconds,
        "peak_memory_mib": measure.peak_memory_mib,
        "environment": environment(),
        "settings": settings,
    }


def _case_rng(task: str, seed: int, context_length: int, depth: float, trial: int) -> random.Random:
    # A string seed is hashed deterministically (SHA-512), independent of PYTHONHASHSEED; float() makes 50 == 50.0.
    return random.Random(f"{task}/{seed}/{context_length}/{float(depth)}/{trial}")


def greedy_continuation(
    model: nn.Module, tokenizer, prompt: str, max_new_tokens: int, device: torch.device
) -> tuple[str, int]:
    """The decoded text of the generated tokens only, and the prompt's length in tokens."""
    encoded = tokenizer(prompt, return_tensors="pt")
    input_ids = encoded["input_ids"].to(device)
    attention_mask = encoded.get("attention_mask", torch.ones_like(encoded["input_ids"])).to(device)
    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    output = model.generate(
        input_ids=input_ids,
        attention_mask=attention_mask,
        do_sample=False,
        max_new_tokens=max_new_tokens,
        pad_token_id=pad_token_id,
    )
    # Only what the model wrote counts: the prompt itself contains the answer.
    new_tokens = output[0, input_ids.shape[1] :]
    return tokenizer.decode(new_tokens, skip_special_tokens=True), input_ids.shape[1]


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _max_positions(model: nn.Module) -> int | None:
    return getattr(model.config.get_text_config(), "max_position_embeddings", None)


def _check_grid(
    model: nn.Module, context_lengths: Sequence[int], trials: int, max_new_tokens: int, trials_name: str
) -> None:
    if not context_lengths:
        raise ValueError("context_lengths is empty: give at least one context length in tokens")
    max_positions = _max_positions(model)
    for context_length in context_lengths:
        if context_length < 1:
            raise ValueError(f"context lengths must be positive numbers of tokens, got {context_length}")
        if max_positions is not None and context_length > max_positions:
            raise ValueError(
                f"context length {context_length} exceeds the model's max_position_embeddings {max_positions}"
            )
    if trials < 1:
        raise ValueError(f"{trials_name} must be at least 1, got {trials}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")


def _check_depths(depths: Sequence[float], *, upper: float, name: str) -> None:
    if not depths:
        raise ValueError(f"no {name} values given")
    for depth in depths:
        if not 0 <= depth <= upper:
            raise ValueError(f"{name} must be between 0 and {upper}, got {depth}")
