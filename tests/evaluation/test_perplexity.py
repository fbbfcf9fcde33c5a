"""The perplexity harness against direct ``model(..., labels=...)`` computations, and the shared record helpers.

Tiny random Llama models and a word-level tokenizer built here: no downloads.
"""

from __future__ import annotations

import copy
import json
import math
import random

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

import hf_fastattn
from hf_fastattn.evaluation.perplexity import perplexity, perplexity_sweep
from hf_fastattn.evaluation.records import attention_summary, write_json

WORDS = [f"w{i}" for i in range(60)]
MAX_POSITIONS = 128


CONFIG = LlamaConfig(
    vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, max_position_embeddings=MAX_POSITIONS,
)  # fmt: skip


def tiny_llama(attn_implementation="eager"):
    torch.manual_seed(0)
    # A deep copy per model: the attention implementation is stored on the config.
    config = copy.deepcopy(CONFIG)
    return AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation).eval()


def word_tokenizer(with_bos=True):
    """One token per whitespace-separated word of ``WORDS``; ``<s>`` is the BOS token when ``with_bos``."""
    vocab = {"[UNK]": 0, "<s>": 1} | {word: index + 2 for index, word in enumerate(WORDS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    special = {"bos_token": "<s>"} if with_bos else {}
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", **special)


def sample_text(num_words=150, seed=0):
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(num_words))


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


@pytest.fixture(scope="module")
def tokenizer():
    return word_tokenizer()


def token_tensor(tokenizer, text):
    return torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])


def hf_doc_loop(model, input_ids, max_length, stride):
    """The transformers documentation's strided loop: (perplexity, scored tokens, the doc's own token count).

    The doc counts ``(labels != -100).sum() - batch_size`` per window, but after the first window the first input
    position is not labelled, so the shift drops nothing and the loss averages all ``trg_len`` labels
    (huggingface/transformers#34138). Here each loss is weighted by the positions it actually averages.
    """
    seq_len = input_ids.size(1)
    nll_sum, n_tokens, doc_count, prev_end = 0.0, 0, 0, 0
    for begin in range(0, seq_len, stride):
        end = min(begin + max_length, seq_len)
        trg_len = end - prev_end
        window = input_ids[:, begin:end]
        labels = window.clone()
        labels[:, :-trg_len] = -100
        with torch.no_grad():
            loss = model(window, labels=labels).loss
        scored = (labels[:, 1:] != -100).sum().item()
        nll_sum += loss.item() * scored
        n_tokens += scored
        doc_count += (labels != -100).sum().item() - labels.size(0)
        prev_end = end
        if end == seq_len:
            break
    return math.exp(nll_sum / n_tokens), n_tokens, doc_count


def test_non_overlapping_matches_direct_loss(model, tokenizer):
    text = sample_text()
    input_ids = token_tensor(tokenizer, text)
    nll_sum = scored_sum = 0
    for begin in range(0, input_ids.size(1), 32):
        window = input_ids[:, begin : begin + 32]
        scored = window.size(1) - 1
        with torch.no_grad():
            nll_sum += model(window, labels=window).loss.item() * scored
        scored_sum += scored

    result = perplexity(model, tokenizer, text, context_length=32, progress=False)

    assert result["tokens"] == 150 and result["windows"] == 5 and result["stride"] == 32
    assert result["scored_tokens"] == scored_sum == 150 - 5
    assert result["perplexity"] == pytest.approx(math.exp(nll_sum / scored_sum), rel=1e-5)
    assert result["nll"] == pytest.approx(math.log(result["perplexity"]), rel=1e-9)
    json.dumps(result)  # the record is JSON-able as it stands


@pytest.mark.parametrize(("stride", "batch_size"), [(8, 1), (12, 3), (31, 2)])
def test_strided_matches_hf_doc_loop(model, tokenizer, stride, batch_size):
    text = sample_text()
    expected_ppl, expected_scored, doc_count = hf_doc_loop(model, token_tensor(tokenizer, text), 32, stride)

    result = perplexity(model, tokenizer, text, context_length=32, stride=stride, batch_size=batch_size, progress=False)

    # Every token is labelled exactly once; only the first window's first token is lost to the shift.
    assert result["scored_tokens"] == expected_scored == 150 - 1
    assert result["windows"] == math.ceil((150 - 32) / stride) + 1
    assert doc_count == expected_scored - (result["windows"] - 1)
    assert result["perplexity"] == pytest.approx(expected_ppl, rel=1e-5)


@pytest.mark.parametrize("stride", [None, 10])
def test_buckets_partition_scored_tokens(model, tokenizer, stride):
    result = perplexity(
        model, tokenizer, sample_text(), context_length=32, stride=stride, bucket_size=12, progress=False
    )

    buckets = result["buckets"]
    assert [(b["start"], b["end"]) for b in buckets] == [(0, 12), (12, 24), (24, 32)]
    assert sum(b["scored_tokens"] for b in buckets) == result["scored_tokens"]
    combined_nll = sum(b["scored_tokens"] * math.log(b["perplexity"]) for b in buckets) / result["scored_tokens"]
    assert combined_nll == pytest.approx(result["nll"], rel=1e-6)


def test_bos_is_prepended_inside_the_context(model, tokenizer):
    text = sample_text()
    ids = token_tensor(tokenizer, text)
    bos = torch.tensor([[tokenizer.bos_token_id]])
    nll_sum = 0.0
    for begin in range(0, ids.size(1), 31):  # 31 text tokens + BOS = 32 inputs; BOS predicts the first token
        window = torch.cat([bos, ids[:, begin : begin + 31]], dim=1)
        labels = window.clone()
        labels[:, 0] = -100
        with torch.no_grad():
            nll_sum += model(window, labels=labels).loss.item() * (window.size(1) - 1)

    result = perplexity(model, tokenizer, text, context_length=32, add_bos=True, progress=False)

    assert result["add_bos"] is True and result["stride"] == 31
    assert result["scored_tokens"] == 150
    assert result["perplexity"] == pytest.approx(math.exp(nll_sum / 150), rel=1e-5)


def test_max_tokens_and_sweep(model, tokenizer):
    records = perplexity_sweep(model, tokenizer, sample_text(), [16, 32], max_tokens=100, progress=False)

    assert [r["context_length"] for r in records] == [16, 32]
    assert all(r["tokens"] == 100 for r in records)
    assert records[0]["scored_tokens"] == 100 - math.ceil(100 / 16)


def test_fastattn_dense_matches_eager():
    eager = tiny_llama("eager")
    dense = tiny_llama("fastattn_dense")
    dense.load_state_dict(eager.state_dict())
    assert eager.config._attn_implementation == "eager"
    assert dense.config._attn_implementation == "fastattn_dense"
    tokenizer, text = word_tokenizer(), sample_text(100)

    eager_result = perplexity(eager, tokenizer, text, context_length=32, stride=16, progress=False)
    dense_result = perplexity(dense, tokenizer, text, context_length=32, stride=16, progress=False)

    assert dense_result["perplexity"] == pytest.approx(eager_result["perplexity"], rel=1e-4)
    assert dense_result["attention"]["implementation"] == "fastattn_dense"


@pytest.mark.parametrize(
    ("kwargs", "text", "message"),
    [
        ({"context_length": 32}, "", "empty"),
        ({"context_length": 32}, "w1", "at least 2 tokens"),
        ({"context_length": MAX_POSITIONS + 1}, None, f"{MAX_POSITIONS + 1}.*max_position_embeddings {MAX_POSITIONS}"),
        ({"context_length": 32, "stride": 0}, None, "stride"),
        ({"context_length": 32, "stride": 33}, None, "stride"),
    ],
)
def test_invalid_arguments(model, tokenizer, kwargs, text, message):
    with pytest.raises(ValueError, match=message):
        perplexity(model, tokenizer, sample_text() if text is None else text, progress=False, **kwargs)


def test_add_bos_without_bos_token(model):
    with pytest.raises(ValueError, match="add_bos.*no BOS token"):
        perplexity(model, word_tokenizer(with_bos=False), sample_text(), context_length=32, add_bos=True)


def test_training_flag_is_restored(model, tokenizer):
    model.train()
    try:
        perplexity(model, tokenizer, sample_text(40), context_length=32, progress=False)
        assert model.training
    finally:
        model.eval()


def test_write_json_atomic(tmp_path):
    path = tmp_path / "results" / "ppl.json"
    write_json(path, {"perplexity": 1.5})

    assert json.loads(path.read_text()) == {"perplexity": 1.5}
    assert [p.name for p in path.parent.iterdir()] == ["ppl.json"]  # no temp file left behind


def test_write_json_unwritable_directory(tmp_path):
    (tmp_path / "file.txt").write_text("not a directory")
    path = tmp_path / "file.txt" / "x.json"

    with pytest.raises(OSError, match="cannot write results to .*file.txt/x.json"):
        write_json(path, {})


def test_attention_summary():
    model = tiny_llama()
    assert attention_summary(model) == {"implementation": "eager", "layers": [], "density": 1.0}

    hf_fastattn.patch(model, "dense")
    summary = attention_summary(model)
    assert summary["implementation"] == "fastattn_dense" and summary["density"] == 1.0
    assert [(layer["index"], layer["method"]) for layer in summary["layers"]] == [(0, "dense"), (1, "dense")]

    hf_fastattn.patch(model, "dense", layers={0: "sdpa"})
    summary = attention_summary(model)
    assert summary["density"] == 1.0
    assert [(layer["index"], layer["method"]) for layer in summary["layers"]] == [(0, "sdpa"), (1, "dense")]


def test_patched_model_keeps_per_layer_config_in_record(tokenizer):
    model = tiny_llama()
    hf_fastattn.patch(model, "dense", layers={1: "sdpa"})
    result = perplexity(model, tokenizer, sample_text(40), context_length=32, progress=False)

    assert result["attention"]["layers"][1]["method"] == "sdpa"
    assert result["attention"]["density"] == 1.0
