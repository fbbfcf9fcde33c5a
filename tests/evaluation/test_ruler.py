"""RULER-lite: synthesised samples, ``string_match_all``, scoring of generated tokens only, and method parity.

Tiny random Llama models and a word-level tokenizer built here: no downloads.
"""

from __future__ import annotations

import copy
import itertools
import json
import random
import re
import uuid

import pytest
import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

import hf_fastattn  # noqa: F401  (registers fastattn_dense)
from hf_fastattn.evaluation import ruler
from hf_fastattn.evaluation.ruler import make_sample, ruler_lite, string_match_all

ESSAY_WORDS = (
    "the", "a", "people", "startup", "founders", "work", "ideas", "good", "make", "money", "time", "often", "users",
    "build", "think", "write", "company", "program", "hard", "new", "way", "best", "most", "great", "small",
    "problem", "software", "investors",
)  # fmt: skip
# Word pieces with their leading whitespace (one token each), single digits and single punctuation marks: numbers
# and UUIDs round-trip through encode/decode, and the Fuse decoder joins pieces without inserting spaces.
PIECE = r"\s?[A-Za-z]+|\s?[0-9]|\s?[^\sA-Za-z0-9]|\s"
MAX_POSITIONS = 512


def essay(num_sentences=80, seed=0):
    rng = random.Random(seed)
    sentences = []
    for _ in range(num_sentences):
        words = [rng.choice(ESSAY_WORDS) for _ in range(rng.randint(4, 9))]
        sentences.append(" ".join(words).capitalize() + rng.choice([".", ".", "?", "!"]))
    return "\n".join(" ".join(sentences[i : i + 5]) for i in range(0, num_sentences, 5))


def piece_tokenizer():
    """A WordLevel tokenizer over every word the harness and the essay use, plus digits, hex pairs and punctuation."""
    templates = " ".join(
        [ruler.NEEDLE, ruler.NOISE_HAYSTACK, *ruler._INSTRUCTION.values(), *ruler._QUESTION.values()]
        + [*ruler._ANSWER_PREFIX.values(), "numbers uuids number uuid and garbage"]
    )
    words = set(re.findall(r"[A-Za-z]+", templates)) | {w.capitalize() for w in ESSAY_WORDS} | set(ESSAY_WORDS)
    words |= set(ruler.ADJECTIVES) | set(ruler.NOUNS)
    words |= {"".join(pair) for pair in itertools.product("abcdef", repeat=2)}
    symbols = set("0123456789.,:?!-{}")
    pieces = ["[UNK]", "<s>", "</s>", "[PAD]", " ", "\n"]
    for piece in sorted(words | symbols):
        pieces += [piece, " " + piece, "\n" + piece]
    backend = Tokenizer(models.WordLevel({piece: i for i, piece in enumerate(pieces)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(PIECE), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="[UNK]", bos_token="<s>", eos_token="</s>", pad_token="[PAD]"
    )


TOKENIZER = piece_tokenizer()
# One head of 32: the interpreted kernel's cost grows with heads x query tiles, and a test has 10 s.
CONFIG = LlamaConfig(
    vocab_size=len(TOKENIZER), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=1,
    num_key_value_heads=1, head_dim=32, max_position_embeddings=MAX_POSITIONS, bos_token_id=TOKENIZER.bos_token_id,
    eos_token_id=TOKENIZER.eos_token_id, pad_token_id=TOKENIZER.pad_token_id, initializer_range=0.2,
)  # fmt: skip


def tiny_llama(attn_implementation="eager", seed=0):
    torch.manual_seed(seed)
    # A deep copy per model: the attention implementation is stored on the config.
    return AutoModelForCausalLM.from_config(copy.deepcopy(CONFIG), attn_implementation=attn_implementation).eval()


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


def prompt_length(prompt):
    return len(TOKENIZER(prompt)["input_ids"])


# --------------------------------------------------------------------------------------------------------------------
# Sample synthesis
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("task", list(ruler.TASKS))
def test_sample_holds_references_ends_with_prefix_and_fits(task):
    spec = ruler.TASKS[task]
    for context_length, tokens_to_generate in ((400, 128), (300, 8)):
        prompt, references = make_sample(
            task, TOKENIZER, essay(), context_length, random.Random(0), tokens_to_generate=tokens_to_generate
        )
        assert len(references) == spec.num_queries * spec.num_values
        for reference in references:
            assert reference in prompt
            # Each reference is hidden in exactly one needle.
            assert prompt.count(f"is: {reference}.") == 1
        assert re.search(r"\nAnswer: the special magic \w+ for [a-z, -]+ given in the text (is|are)$", prompt)
        assert prompt.endswith(" is" if len(references) == 1 else " are")
        length = prompt_length(prompt)
        assert length + tokens_to_generate <= context_length
        # The haystack fills the context: one more noise repeat or essay sentence would not fit.
        assert length + tokens_to_generate > context_length - 40
        assert "[UNK]" not in TOKENIZER.decode(TOKENIZER(prompt)["input_ids"]) or spec.value_type == "uuids"
        # The needle count and haystack kind are RULER's.
        assert prompt.count("One of the special magic") == spec.num_keys * spec.num_values
        assert (ruler.NOISE_HAYSTACK in prompt) == (spec.haystack == "noise")


@pytest.mark.parametrize("task", list(ruler.TASKS))
def test_sample_is_deterministic_per_seed(task):
    first = make_sample(task, TOKENIZER, essay(), 300, random.Random(7), tokens_to_generate=16)
    again = make_sample(task, TOKENIZER, essay(), 300, random.Random(7), tokens_to_generate=16)
    other = make_sample(task, TOKENIZER, essay(), 300, random.Random(8), tokens_to_generate=16)
    assert first == again
    assert first != other


def needle_pairs(prompt):
    return re.findall(r"One of the special magic (\w+) for ([a-z-]+) is: ([0-9a-f-]+)\.", prompt)


def test_multikey_has_four_distinct_keys_one_queried():
    for seed in range(5):
        prompt, references = make_sample("niah_multikey_1", TOKENIZER, essay(), 400, random.Random(seed))
        needles = needle_pairs(prompt)
        keys = [key for _, key, _ in needles]
        assert len(keys) == len(set(keys)) == 4
        queried = re.search(r"for ([a-z-]+) given in the text is$", prompt).group(1)
        assert queried in keys
        assert references == [value for _, key, value in needles if key == queried]
        assert len(references) == 1


def test_multivalue_has_four_values_of_one_key():
    prompt, references = make_sample("niah_multivalue", TOKENIZER, essay(), 400, random.Random(3))
    needles = needle_pairs(prompt)
    assert len({key for _, key, _ in needles}) == 1
    values = [value for _, _, value in needles]
    assert len(set(values)) == 4
    assert sorted(references) == sorted(values)
    assert all(re.fullmatch(r"\d{7}", value) for value in values)


def test_multiquery_asks_for_all_four_keys():
    prompt, references = make_sample("niah_multiquery", TOKENIZER, essay(), 400, random.Random(3))
    needles = needle_pairs(prompt)
    query = re.search(r"for ([a-z, -]+) given in the text are$", prompt).group(1)
    queried = re.split(r", and |, ", query)
    assert sorted(queried) == sorted(key for _, key, _ in needles)
    value_of = {key: value for _, key, value in needles}
    assert references == [value_of[key] for key in queried]


def test_uuid_values_are_version_4():
    _, references = make_sample("niah_single_3", TOKENIZER, essay(), 300, random.Random(1), tokens_to_generate=8)
    assert uuid.UUID(references[0]).version == 4


def test_needles_sit_at_sentence_boundaries():
    prompt, _ = make_sample("niah_multivalue", TOKENIZER, essay(), 400, random.Random(2), tokens_to_generate=8)
    for match in re.finditer(r"One of the special magic", prompt):
        before = prompt[: match.start()]
        assert before.endswith(("\n", ". ", "? ", "! ")), before[-20:]
    prompt, _ = make_sample("niah_single_1", TOKENIZER, "", 300, random.Random(2), tokens_to_generate=8)
    needle_line = next(line for line in prompt.split("\n") if line.startswith("One of the special magic"))
    assert re.fullmatch(r"One of the special magic numbers for [a-z-]+ is: \d{7}\.", needle_line)


def test_validation_errors(model):
    with pytest.raises(ValueError, match=r"unknown RULER-lite task.*'niah_single_9'.*valid tasks: niah_single_1"):
        ruler_lite(model, TOKENIZER, essay(), context_lengths=[96], tasks=["niah_single_9"], progress=False)
    with pytest.raises(
        ValueError, match=f"context length 1024 exceeds the model's max_position_embeddings {MAX_POSITIONS}"
    ):
        ruler_lite(model, TOKENIZER, essay(), context_lengths=[96, 1024], progress=False)
    with pytest.raises(ValueError, match="haystack text is empty"):
        ruler_lite(model, TOKENIZER, "  \n", context_lengths=[96], tasks=["niah_single_2"], progress=False)
    with pytest.raises(ValueError, match="context_length 64 is too small for niah_multikey_1"):
        make_sample("niah_multikey_1", TOKENIZER, essay(), 64, random.Random(0), tokens_to_generate=4)
    # The noise-haystack task does not read the essay text.
    prompt, _ = make_sample("niah_single_1", TOKENIZER, "", 200, random.Random(0), tokens_to_generate=4)
    assert ruler.NOISE_HAYSTACK in prompt


# --------------------------------------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------------------------------------


def test_string_match_all_math():
    references = ["1111111", "2222222", "3333333", "4444444"]
    assert string_match_all(["the numbers are 1111111 and 3333333"], [references]) == 50.0
    assert string_match_all(["4444444 3333333 2222222 1111111"], [references]) == 100.0
    assert string_match_all(["none"], [references]) == 0.0
    # Case-insensitive, and the mean over samples.
    assert string_match_all(["ABC-def", "x"], [["abc-DEF"], ["x", "y"]]) == pytest.approx(75.0)
    with pytest.raises(ValueError, match="2 predictions but 1 reference lists"):
        string_match_all(["a", "b"], [["a"]])


def test_scores_only_generated_tokens(model, monkeypatch):
    """The prompt holds every reference: a model that writes the needle's value scores 100, one that writes garbage 0."""
    original_generate = model.generate

    def generate_then_append(text):
        def generate(input_ids, **kwargs):
            output = original_generate(input_ids=input_ids, **kwargs)
            if text is None:  # echo the value that the prompt's needle holds
                prompt = TOKENIZER.decode(input_ids[0])
                (value,) = re.findall(r"is: (\d{7})\.", prompt)
                appended = " " + value
            else:
                appended = text
            extra = torch.tensor([TOKENIZER(appended, add_special_tokens=False)["input_ids"]])
            return torch.cat([output, extra], dim=1)

        return generate

    kwargs = {"context_lengths": [96], "tasks": ["niah_single_1", "niah_single_2"], "samples": 2, "max_new_tokens": 2}
    monkeypatch.setattr(model, "generate", generate_then_append(None))
    assert ruler_lite(model, TOKENIZER, essay(), progress=False, **kwargs)["mean"] == 100.0
    monkeypatch.setattr(model, "generate", generate_then_append(" garbage and garbage"))
    result = ruler_lite(model, TOKENIZER, essay(), progress=False, **kwargs)
    assert result["mean"] == 0.0
    assert all(
        sample["prediction"].endswith("garbage and garbage") for cell in result["cells"] for sample in cell["samples"]
    )


# --------------------------------------------------------------------------------------------------------------------
# End to end
# --------------------------------------------------------------------------------------------------------------------

KEYS = {"task", "metric", "scores", "length_means", "task_means", "mean", "cells", "attention", "seconds",
        "peak_memory_mib", "environment", "settings"}  # fmt: skip


def test_end_to_end_record(model):
    tasks = ["niah_single_1", "niah_single_2"]
    result = ruler_lite(
        model, TOKENIZER, essay(), context_lengths=[96, 128], tasks=tasks, samples=2, max_new_tokens=4, progress=False
    )
    assert set(result) == KEYS
    assert result["task"] == "ruler_lite" and result["metric"] == "string_match_all"
    assert set(result["scores"]) == set(tasks)
    assert all(set(per_length) == {"96", "128"} for per_length in result["scores"].values())
    assert set(result["length_means"]) == {"96", "128"}
    for length in ("96", "128"):
        assert result["length_means"][length] == pytest.approx(sum(result["scores"][t][length] for t in tasks) / 2)
    assert result["mean"] == pytest.approx(sum(cell["score"] for cell in result["cells"]) / 4)
    assert len(result["cells"]) == 4 and all(len(cell["samples"]) == 2 for cell in result["cells"])
    for cell in result["cells"]:
        for sample in cell["samples"]:
            assert sample["prompt_tokens"] + 4 <= cell["context_length"]
            assert 0.0 <= sample["score"] <= 100.0
    assert result["attention"]["implementation"] == "eager"
    assert result["settings"]["tokens_to_generate"] == 4 and result["settings"]["seed"] == 0
    assert result["seconds"] > 0
    json.dumps(result)  # the record is JSON-able as it stands


def test_dense_kernel_and_eager_give_identical_predictions():
    eager = tiny_llama("eager")
    fast = tiny_llama("fastattn_dense", seed=1)
    fast.load_state_dict(eager.state_dict())
    assert eager.config is not fast.config
    assert eager.config._attn_implementation == "eager"
    assert fast.config._attn_implementation == "fastattn_dense"

    # Two prompts, four new tokens: each interpreted kernel launch costs, and a test has 10 s.
    kwargs = {"context_lengths": [96], "tasks": ["niah_single_1", "niah_single_2"], "samples": 1, "max_new_tokens": 4}
    expected = ruler_lite(eager, TOKENIZER, essay(), progress=False, **kwargs)
    actual = ruler_lite(fast, TOKENIZER, essay(), progress=False, **kwargs)
    assert actual["attention"]["implementation"] == "fastattn_dense"
    for expected_cell, actual_cell in zip(expected["cells"], actual["cells"]):
        for expected_sample, actual_sample in zip(expected_cell["samples"], actual_cell["samples"]):
            assert actual_sample["references"] == expected_sample["references"]  # same prompts
            assert actual_sample["prediction"] == expected_sample["prediction"]
    assert actual["scores"] == expected["scores"]
