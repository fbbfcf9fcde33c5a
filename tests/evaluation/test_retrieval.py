"""Needle-in-a-haystack and passkey harnesses on a tiny random Llama with a local tokenizer.

A random model retrieves nothing, so these tests check the mechanics: prompt construction (insertion on a sentence
boundary, depth, length, seeding), scoring of the generated tokens only (through a fake ``generate`` that answers
right or wrong), determinism, the record's keys, and that ``fastattn_dense`` (the real Triton kernels under
``TRITON_INTERPRET=1``) generates exactly what eager attention does on the same cases. No downloads.

The tokenizer is a WordLevel model whose tokens are words with their leading space or newline, single digits, single
punctuation marks and single whitespace characters, with a fusing decoder: decoding gives back the exact text, so the
prompts can be checked character by character.
"""

from __future__ import annotations

import copy
import random
import re

import pytest
import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

import hf_fastattn
import hf_fastattn.dispatch
import hf_fastattn.ops.decode.attention
import hf_fastattn.ops.dense.attention
from hf_fastattn.evaluation.retrieval import (
    CITIES,
    NEEDLE,
    NEEDLE_QUESTION,
    PASSKEY_GARBAGE,
    PASSKEY_INFORMATION,
    PASSKEY_QUESTION,
    PASSKEY_TASK,
    needle_grid,
    needle_prompt,
    passkey,
    passkey_prompt,
)
from hf_fastattn.ops._runtime import interpreter_enabled

HAYSTACK = (
    "Rivers carve valleys over many thousands of years. Farmers plant barley in the spring, and harvest it before "
    "the first frost. A lighthouse keeper writes down the weather every morning. Old maps show roads that no longer "
    "exist. The library opens early on market days."
)
MAX_POSITIONS = 512
NEEDLE_ANSWER = re.compile(r"special magic number for \w+ is: (\d+)\.")
PASSKEY_ANSWER = re.compile(r"The pass key is (\d+)\.")
# Tiny grids covering both depth ends; a buffer of 8 leaves the needle grid's prompts room for some haystack.
NEEDLE_GRID = {"context_lengths": [64, 96], "depth_percents": [0, 50, 100], "needles_per_cell": 2, "buffer": 8}
PASSKEY_GRID = {"context_lengths": [96, 128], "depths": [0, 0.5, 1.0], "trials": 1}


# --------------------------------------------------------------------------------------------------------------------
# Tiny tokenizer and model
# --------------------------------------------------------------------------------------------------------------------


def _build_tokenizer() -> PreTrainedTokenizerFast:
    templates = [NEEDLE, NEEDLE_QUESTION, PASSKEY_TASK, PASSKEY_GARBAGE, PASSKEY_INFORMATION, PASSKEY_QUESTION]
    corpus = " ".join([HAYSTACK, *templates, *CITIES])
    words = set(re.findall(r"[A-Za-z]+", corpus))
    symbols = set(re.findall(r"[^\w\s]", corpus)) | set("0123456789") | {" ", "\n"}
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for token in sorted({prefix + word for word in words for prefix in ("", " ", "\n")} | symbols):
        vocab[token] = len(vocab)
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"\s?[A-Za-z]+|\d|\s|[^\w\s]"), behavior="isolated")
    backend.decoder = decoders.Fuse()  # tokens carry their own spaces: concatenation restores the text
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        clean_up_tokenization_spaces=False,
    )


TOKENIZER = _build_tokenizer()


def _llama_config() -> LlamaConfig:
    return LlamaConfig(
        vocab_size=len(TOKENIZER),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=MAX_POSITIONS,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny matmuls: with ``-n 2`` on two cores, intra-op threads only contend (generation runs ~15x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    """A random tiny Llama with eager attention, shared by the module's tests (none of them changes its weights)."""
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(_llama_config(), attn_implementation="eager")


def _token_length(text: str) -> int:
    """Tokens of ``text`` as a prompt (with BOS)."""
    return len(TOKENIZER(text)["input_ids"])


def _text_length(text: str) -> int:
    """Tokens of ``text`` alone."""
    return len(TOKENIZER(text, add_special_tokens=False)["input_ids"])


def _record_prompts(monkeypatch, model) -> list[list[int]]:
    """Wrap ``model.generate`` to record every prompt's token ids, still generating for real (in eval mode)."""
    prompts: list[list[int]] = []
    generate = model.generate

    def recording_generate(**kwargs):
        assert not model.training and not torch.is_grad_enabled()
        prompts.append(kwargs["input_ids"][0].tolist())
        return generate(**kwargs)

    monkeypatch.setattr(model, "generate", recording_generate)
    return prompts


# --------------------------------------------------------------------------------------------------------------------
# Needle prompt
# --------------------------------------------------------------------------------------------------------------------


def _needle_of(answer: str, prompt: str) -> tuple[str, str]:
    """The needle text and question for the city the prompt asks about."""
    city = re.search(r"What is the special magic number for (\w+)\?", prompt).group(1)
    return NEEDLE.format(city=city, number=answer), NEEDLE_QUESTION.format(city=city)


@pytest.mark.parametrize("depth_percent", [10, 25, 50, 75, 90])
@pytest.mark.parametrize("buffer", [0, 64])
def test_needle_starts_after_a_sentence_end(depth_percent, buffer):
    context_length = 200
    prompt, answer = needle_prompt(TOKENIZER, HAYSTACK, context_length, depth_percent, random.Random(1), buffer=buffer)
    needle, question = _needle_of(answer, prompt)

    assert re.fullmatch(r"\d{7}", answer)
    assert prompt.count(needle) == 1
    start = prompt.index(needle)
    assert prompt[:start].endswith(".")
    assert prompt.endswith(question)
    assert _token_length(prompt) <= context_length - buffer
    # Near its depth: not after it (the point only moves back), at most one sentence before. Re-tokenising the text
    # can merge a few tokens where haystack copies join, hence the small slack.
    depth_point = _text_length(prompt[: -len(question)].replace(needle, "")) * depth_percent / 100
    longest_sentence = max(_text_length(sentence + ".") for sentence in HAYSTACK.split(". "))
    assert depth_point - longest_sentence - 4 <= _text_length(prompt[:start]) <= depth_point + 4


def test_needle_depth_0_and_100_put_it_at_start_and_end():
    first, answer = needle_prompt(TOKENIZER, HAYSTACK, 160, 0, random.Random(2))
    needle, _ = _needle_of(answer, first)
    assert first.startswith(needle)

    last, answer = needle_prompt(TOKENIZER, HAYSTACK, 160, 100, random.Random(2))
    needle, question = _needle_of(answer, last)
    assert last.endswith(needle + question)
    assert last.count(needle) == 1


def test_needle_prompt_repeats_the_haystack_to_fill_the_context():
    prompt, _ = needle_prompt(TOKENIZER, HAYSTACK, 400, 50, random.Random(3), buffer=0)
    copies = prompt.count("Rivers carve valleys")
    assert copies >= 3
    # Filled to the token, less one token per join of copies ("\n" + "Rivers" re-tokenises as "\nRivers").
    assert 400 - copies <= _token_length(prompt) <= 400


def test_needle_prompt_is_seeded():
    same = [needle_prompt(TOKENIZER, HAYSTACK, 160, 40, random.Random(7)) for _ in range(2)]
    assert same[0] == same[1]
    answers = {needle_prompt(TOKENIZER, HAYSTACK, 160, 40, random.Random(seed))[1] for seed in range(5)}
    assert len(answers) == 5


# --------------------------------------------------------------------------------------------------------------------
# Passkey prompt
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("context_length", [120, 200, 333])
@pytest.mark.parametrize("depth", [0, 0.25, 0.5, 1.0])
def test_passkey_prompt_format_and_length(context_length, depth):
    prompt, answer = passkey_prompt(TOKENIZER, context_length, depth, random.Random(4))

    assert 1 <= int(answer) <= 50000
    assert prompt.startswith(PASSKEY_TASK + "\n")
    assert PASSKEY_INFORMATION.format(pass_key=answer) in prompt
    assert prompt.endswith("\n" + PASSKEY_QUESTION)
    garbage_length = _text_length(" " + PASSKEY_GARBAGE)
    assert context_length - garbage_length < _token_length(prompt) <= context_length


def test_passkey_depth_places_the_information_line():
    start, answer = passkey_prompt(TOKENIZER, 200, 0, random.Random(5))
    information = PASSKEY_INFORMATION.format(pass_key=answer)
    assert start.startswith(f"{PASSKEY_TASK}\n\n{information}\n{PASSKEY_GARBAGE}")

    end, answer = passkey_prompt(TOKENIZER, 200, 1.0, random.Random(5))
    information = PASSKEY_INFORMATION.format(pass_key=answer)
    assert end.endswith(f"{PASSKEY_GARBAGE}\n{information}\n\n{PASSKEY_QUESTION}")


def test_passkey_prompt_is_seeded():
    same = [passkey_prompt(TOKENIZER, 150, 0.5, random.Random(8)) for _ in range(2)]
    assert same[0] == same[1]
    answers = {passkey_prompt(TOKENIZER, 150, 0.5, random.Random(seed))[1] for seed in range(5)}
    assert len(answers) == 5


# --------------------------------------------------------------------------------------------------------------------
# Scoring: only the generated tokens count
# --------------------------------------------------------------------------------------------------------------------


def _fake_generate(answer_pattern: re.Pattern, reply: str):
    """A ``generate`` that reads the answer off the prompt and appends ``reply`` (formatted with it) as new tokens."""

    def generate(*, input_ids, attention_mask, do_sample, max_new_tokens, **kwargs):
        assert do_sample is False and attention_mask.shape == input_ids.shape
        answer = answer_pattern.search(TOKENIZER.decode(input_ids[0])).group(1)
        new_tokens = TOKENIZER(reply.format(answer=answer, other=int(answer) + 1), add_special_tokens=False)
        new_ids = torch.tensor([new_tokens["input_ids"][:max_new_tokens]], dtype=input_ids.dtype)
        return torch.cat([input_ids, new_ids], dim=1)

    return generate


SCORING_CASES = [
    (" {answer}.", 1),  # the right number
    (" {other}.", 0),  # a wrong number
    ("", 0),  # nothing generated: the prompt, which holds the answer, must not count
]


@pytest.mark.parametrize(("reply", "expected"), SCORING_CASES)
def test_needle_scores_the_generated_tokens(monkeypatch, model, reply, expected):
    monkeypatch.setattr(model, "generate", _fake_generate(NEEDLE_ANSWER, reply))
    result = needle_grid(model, TOKENIZER, HAYSTACK, **NEEDLE_GRID, progress=False)

    assert result["mean_score"] == expected
    for cell in result["cells"]:
        assert cell["score"] == expected and cell["correct"] == expected * cell["trials"]
        for entry in cell["responses"]:
            assert entry["response"] == reply.format(answer=entry["answer"], other=int(entry["answer"]) + 1)


@pytest.mark.parametrize(("reply", "expected"), [*SCORING_CASES, (" {answer}0", 0)])  # digits must match exactly
def test_passkey_scores_the_generated_tokens(monkeypatch, model, reply, expected):
    monkeypatch.setattr(model, "generate", _fake_generate(PASSKEY_ANSWER, reply))
    result = passkey(model, TOKENIZER, **PASSKEY_GRID, progress=False)

    assert result["mean_score"] == expected
    assert all(cell["score"] == expected for cell in result["cells"])


# --------------------------------------------------------------------------------------------------------------------
# End to end on the tiny random model
# --------------------------------------------------------------------------------------------------------------------


def _check_record(result: dict, task: str, lengths, depth_percents, trials: int) -> None:
    keys = {"task", "cells", "mean_score", "attention", "seconds", "peak_memory_mib", "environment", "settings"}
    assert set(result) == keys
    assert result["task"] == task
    assert result["attention"]["implementation"] == "eager" and result["attention"]["density"] == 1.0
    assert result["seconds"] > 0 and "torch" in result["environment"]
    assert [(c["context_length"], c["depth_percent"]) for c in result["cells"]] == [
        (length, depth) for length in lengths for depth in depth_percents
    ]
    for cell in result["cells"]:
        assert set(cell) == {"context_length", "depth_percent", "trials", "correct", "score", "responses"}
        assert cell["trials"] == len(cell["responses"]) == trials
        assert cell["score"] == cell["correct"] / trials
        assert all(entry["prompt_tokens"] <= cell["context_length"] for entry in cell["responses"])
    assert 0 <= result["mean_score"] <= 1


def test_needle_grid_end_to_end_is_deterministic(monkeypatch, model):
    prompts = _record_prompts(monkeypatch, model)
    first = needle_grid(model, TOKENIZER, HAYSTACK, **NEEDLE_GRID, progress=False)
    first_prompts = list(prompts)
    prompts.clear()
    second = needle_grid(model, TOKENIZER, HAYSTACK, **NEEDLE_GRID, progress=False)

    _check_record(first, "needle", [64, 96], [0, 50, 100], trials=2)
    assert first["settings"]["needles_per_cell"] == 2 and first["settings"]["seed"] == 0
    assert len(first_prompts) == 12 and first_prompts == prompts
    assert first["cells"] == second["cells"]
    assert model.training  # eval mode inside the harness only: from_config's training mode is restored


def test_passkey_end_to_end_is_deterministic(monkeypatch, model):
    prompts = _record_prompts(monkeypatch, model)
    first = passkey(model, TOKENIZER, **PASSKEY_GRID, progress=False)
    first_prompts = list(prompts)
    prompts.clear()
    second = passkey(model, TOKENIZER, **PASSKEY_GRID, progress=False)

    _check_record(first, "passkey", [96, 128], [0, 50, 100], trials=1)
    assert first_prompts == prompts and first["cells"] == second["cells"]
    other_seed = passkey(model, TOKENIZER, **PASSKEY_GRID, seed=1, progress=False)
    assert [e["answer"] for c in other_seed["cells"] for e in c["responses"]] != [
        e["answer"] for c in first["cells"] for e in c["responses"]
    ]


def test_fastattn_dense_generates_what_eager_does(monkeypatch):
    """Same seeds, same prompts, same greedy responses: the real kernels (interpreted on CPU) against eager."""
    config = _llama_config()
    torch.manual_seed(0)
    eager = AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation="eager")
    fast = AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation="fastattn_dense")
    fast.load_state_dict(eager.state_dict())
    assert eager.config._attn_implementation == "eager"
    assert fast.config._attn_implementation == "fastattn_dense"

    kernels = hf_fastattn.ops.dense.attention
    decode_kernels = hf_fastattn.ops.decode.attention
    kernel_query_lengths = []  # (B, H, S_q, D) queries: prompt prefill (dense), then one token per step (decode)
    dense_fwd, decode_fwd = kernels.dense_fwd, decode_kernels.decode_fwd

    def recording_dense_fwd(q, *args, **kwargs):
        kernel_query_lengths.append(q.shape[2])
        return dense_fwd(q, *args, **kwargs)

    def recording_decode_fwd(q, *args, **kwargs):
        kernel_query_lengths.append(q.shape[2])
        return decode_fwd(q, *args, **kwargs)

    def no_fallback(*args, **kwargs):
        raise AssertionError("fastattn_dense fell back to SDPA")

    monkeypatch.setattr(kernels, "dense_fwd", recording_dense_fwd)
    monkeypatch.setattr(decode_kernels, "decode_fwd", recording_decode_fwd)
    monkeypatch.setattr(hf_fastattn.dispatch, "sdpa_fallback", no_fallback)

    # One case: each interpreted kernel call takes a fraction of a second.
    grid = {**NEEDLE_GRID, "context_lengths": [64], "depth_percents": [50], "needles_per_cell": 1}
    results = {}
    for name, model in (("eager", eager), ("fast", fast)):
        prompts = _record_prompts(monkeypatch, model)
        results[name] = (needle_grid(model, TOKENIZER, HAYSTACK, **grid, max_new_tokens=4, progress=False), prompts)

    (expected, expected_prompts), (actual, actual_prompts) = results["eager"], results["fast"]
    assert actual_prompts == expected_prompts
    assert actual["cells"] == expected["cells"]
    assert actual["attention"]["implementation"] == "fastattn_dense"
    if interpreter_enabled():  # otherwise CPU tensors take the PyTorch reference path
        assert 1 in kernel_query_lengths and max(kernel_query_lengths) > 32, "prefill and decode must use the kernel"


# --------------------------------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------------------------------


def test_empty_haystack_is_rejected(model):
    with pytest.raises(ValueError, match="haystack text is empty"):
        needle_grid(model, TOKENIZER, "  \n", context_lengths=[64], depth_percents=[50], progress=False)
    with pytest.raises(ValueError, match="haystack text is empty"):
        needle_prompt(TOKENIZER, "", 64, 50, random.Random(0))


def test_context_above_max_positions_is_rejected(model):
    message = f"context length 1024 exceeds the model's max_position_embeddings {MAX_POSITIONS}"
    with pytest.raises(ValueError, match=message):
        needle_grid(model, TOKENIZER, HAYSTACK, context_lengths=[64, 1024], depth_percents=[50], progress=False)
    with pytest.raises(ValueError, match=message):
        passkey(model, TOKENIZER, context_lengths=[1024], progress=False)
    with pytest.raises(ValueError, match=r"context length 510 \+ max_new_tokens 8 exceeds .* 512"):
        passkey(model, TOKENIZER, context_lengths=[510], progress=False)


def test_depth_out_of_range_is_rejected(model):
    with pytest.raises(ValueError, match="depth_percent must be between 0 and 100, got 150"):
        needle_grid(model, TOKENIZER, HAYSTACK, context_lengths=[64], depth_percents=[50, 150], progress=False)
    with pytest.raises(ValueError, match="depth_percent must be between 0 and 100, got -1"):
        needle_prompt(TOKENIZER, HAYSTACK, 200, -1, random.Random(0))
    with pytest.raises(ValueError, match="depth must be between 0 and 1, got 50"):
        passkey(model, TOKENIZER, context_lengths=[128], depths=[50], progress=False)


def test_context_too_small_is_rejected(model):
    with pytest.raises(ValueError, match=r"context_length 64 is too small to hold the needle .* buffer \(64 tokens\)"):
        needle_grid(model, TOKENIZER, HAYSTACK, context_lengths=[64], depth_percents=[50], progress=False)
    with pytest.raises(ValueError, match="context_length 40 is too small for the passkey prompt"):
        passkey_prompt(TOKENIZER, 40, 0.5, random.Random(0))
