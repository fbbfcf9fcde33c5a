"""Encoder fidelity: patched (``fastattn_dense``) vs dense (``eager``) copies of tiny BERT and DINOv2, and k-NN.

Tiny random models and a word-level tokenizer built here: no downloads. With ``TRITON_INTERPRET=1`` the patched
models run the real Triton kernels in the interpreter, on padded batches for BERT.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import AutoModel, BertConfig, Dinov2Config, PreTrainedTokenizerFast

import hf_fastattn  # noqa: F401  (registers fastattn_dense)
from hf_fastattn.evaluation.fidelity import (
    embedding_fidelity,
    extract_features,
    knn_accuracy,
    knn_fidelity,
    retrieval_check,
    sentence_embeddings,
    vision_fidelity,
)

FAST = "fastattn_dense"
WORDS = [f"w{i}" for i in range(40)]
SENTENCES = [
    "w1 w2 w3",
    "w4 w5 w6 w7 w8 w9 w10 w11 w12 w13 w14",
    "w15 w16",
    "w17 w18 w19 w20 w21 w22",
    "w23 w24 w25 w26 w27 w28 w29 w30 w31",
    "w32",
]  # lengths 3..11 words: every batch is padded
IMAGE, PATCH = 32, 8  # 16 patches + CLS


def word_tokenizer():
    vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3} | {word: i + 4 for i, word in enumerate(WORDS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]"
    )


TOKENIZER = word_tokenizer()
BERT = BertConfig(
    vocab_size=len(TOKENIZER), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
    max_position_embeddings=64, pad_token_id=0,
)  # fmt: skip
DINOV2 = Dinov2Config(
    image_size=IMAGE, patch_size=PATCH, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2
)


def pair(config, seed=0):
    """(patched model, dense reference) with the same weights, each from its own config copy."""
    torch.manual_seed(seed)
    reference = AutoModel.from_config(copy.deepcopy(config), attn_implementation="eager").eval()
    model = AutoModel.from_config(copy.deepcopy(config), attn_implementation=FAST).eval()
    model.load_state_dict(reference.state_dict())
    assert model.config is not reference.config
    assert model.config._attn_implementation == FAST
    assert reference.config._attn_implementation == "eager"
    return model, reference


def other_model(config, seed):
    torch.manual_seed(seed)
    return AutoModel.from_config(copy.deepcopy(config), attn_implementation="eager").eval()


@pytest.fixture(scope="module")
def bert_pair():
    return pair(BERT)


QUERIES, RELEVANT = [SENTENCES[3], SENTENCES[0], SENTENCES[5]], [3, 0, 5]  # each query is its relevant document


@pytest.fixture(scope="module")
def bert_record(bert_pair):
    """One run of the patched model (every interpreted kernel launch costs), shared by the tests that read it."""
    model, reference = bert_pair
    return embedding_fidelity(
        model, reference, TOKENIZER, SENTENCES, batch_size=4, queries=QUERIES, documents=SENTENCES,
        relevant_index=RELEVANT,
    )  # fmt: skip


# --------------------------------------------------------------------------------------------------------------------
# Text
# --------------------------------------------------------------------------------------------------------------------


def test_embedding_fidelity_patched_vs_dense(bert_record):
    result = bert_record
    assert result["sentences"] == len(SENTENCES) and result["batch_size"] == 4
    assert result["cosine"]["min"] >= 0.9999
    assert result["cosine"]["mean"] >= result["cosine"]["min"]
    assert len(result["cosine"]["per_sentence"]) == len(SENTENCES)
    assert result["relative_error"]["max"] < 1e-3
    assert result["implementations"] == {"model": FAST, "reference": "eager"}
    assert result["attention"]["model"]["implementation"] == FAST
    assert result["attention"]["reference"]["implementation"] == "eager"
    assert result["seconds"] > 0 and set(result["timing"]) == {"model", "reference"}
    json.dumps(result)


def test_embeddings_pool_non_padding_tokens_only(bert_pair):
    _, reference = bert_pair
    batched = sentence_embeddings(reference, TOKENIZER, SENTENCES, batch_size=len(SENTENCES))
    one_by_one = sentence_embeddings(reference, TOKENIZER, SENTENCES, batch_size=1)  # no padding at all
    torch.testing.assert_close(batched, one_by_one, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        hidden = reference(**TOKENIZER(SENTENCES[2:3], return_tensors="pt")).last_hidden_state
    torch.testing.assert_close(batched[2], hidden[0].mean(dim=0), atol=1e-5, rtol=1e-5)


def test_a_different_model_fails_the_check(bert_pair):
    _, reference = bert_pair
    different = other_model(BERT, seed=1)
    result = embedding_fidelity(different, reference, TOKENIZER, SENTENCES, batch_size=4)
    assert result["cosine"]["min"] < 0.9
    assert result["implementations"] == {"model": "eager", "reference": "eager"}


def test_retrieval_check_for_both_models(bert_pair, bert_record):
    model, reference = bert_pair
    retrieval = bert_record["retrieval"]
    assert retrieval["model"]["top1_accuracy"] == retrieval["reference"]["top1_accuracy"] == 1.0
    assert retrieval["model"]["top1"] == RELEVANT
    assert retrieval["top1_agreement"] == 1.0
    assert retrieval["model"]["attention"]["implementation"] == FAST
    assert retrieval["reference"]["attention"]["implementation"] == "eager"

    wrong = retrieval_check(reference, TOKENIZER, QUERIES, SENTENCES, [0, 1, 2])
    assert wrong["top1_accuracy"] == 0.0 and wrong["top1"] == RELEVANT
    with pytest.raises(ValueError, match="relevant_index has 2 entries for 3 queries"):
        retrieval_check(reference, TOKENIZER, QUERIES, SENTENCES, [0, 1])
    with pytest.raises(ValueError, match="needs queries, documents and relevant_index together"):
        embedding_fidelity(model, reference, TOKENIZER, SENTENCES, queries=QUERIES)


def test_same_object_or_shared_config_is_refused(bert_pair):
    model, _ = bert_pair
    with pytest.raises(ValueError, match="same object"):
        embedding_fidelity(model, model, TOKENIZER, SENTENCES)
    torch.manual_seed(0)
    config = copy.deepcopy(BERT)
    first = AutoModel.from_config(config, attn_implementation="eager")
    second = copy.copy(first)  # a shallow copy shares the config that holds the attention implementation
    with pytest.raises(ValueError, match="share one config object"):
        embedding_fidelity(first, second, TOKENIZER, SENTENCES)
    pixel_values = torch.randn(1, 3, IMAGE, IMAGE)
    vision = other_model(DINOV2, seed=0)
    with pytest.raises(ValueError, match="same object"):
        vision_fidelity(vision, vision, pixel_values)
    with pytest.raises(ValueError, match="same object"):
        knn_fidelity(vision, vision, pixel_values, torch.tensor([0]), pixel_values, torch.tensor([0]), k=1)


# --------------------------------------------------------------------------------------------------------------------
# Vision
# --------------------------------------------------------------------------------------------------------------------


def test_vision_fidelity_patched_vs_dense():
    model, reference = pair(DINOV2)
    pixel_values = torch.randn(2, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(0))
    result = vision_fidelity(model, reference, pixel_values)  # one batch: each interpreted kernel launch costs

    assert result["cls_cosine"]["min"] >= 0.9999
    assert result["patch_cosine"]["min"] >= 0.9999 and result["patch_cosine"]["mean"] >= 0.9999
    assert len(result["cls_cosine"]["per_image"]) == 2
    assert result["tokens"] == 17 and result["patch_tokens"] == 16
    assert result["implementations"] == {"model": FAST, "reference": "eager"}
    json.dumps(result)

    different = vision_fidelity(other_model(DINOV2, seed=1), reference, pixel_values)
    assert different["patch_cosine"]["mean"] < 0.9


def test_extract_features_is_the_cls_token():
    model = other_model(DINOV2, seed=0)
    images = torch.randn(5, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(1))
    features = extract_features(model, images, batch_size=2)
    with torch.no_grad():
        expected = model(pixel_values=images).last_hidden_state[:, 0]
    assert features.shape == (5, 32) and features.dtype == torch.float32
    torch.testing.assert_close(features, expected, atol=1e-5, rtol=1e-5)


def test_knn_fidelity_patched_vs_dense():
    model, reference = pair(DINOV2)
    generator = torch.Generator().manual_seed(2)
    images = torch.randn(6, 3, IMAGE, IMAGE, generator=generator)
    labels = torch.tensor([0, 1, 0, 1, 0, 1])
    result = knn_fidelity(model, reference, images[:4], labels[:4], images[4:], labels[4:], k=3, batch_size=8)
    assert result["accuracy"] == result["reference_accuracy"]
    assert result["test_feature_cosine"]["min"] >= 0.9999
    assert result["implementations"] == {"model": FAST, "reference": "eager"}
    json.dumps(result)


# --------------------------------------------------------------------------------------------------------------------
# k-NN
# --------------------------------------------------------------------------------------------------------------------


def clusters(num_per_class, seed, num_classes=4, dim=16):
    """Points around orthogonal directions (separable by angle), and their class labels."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(num_classes).repeat_interleave(num_per_class)
    centres = 5.0 * torch.eye(dim)[:num_classes]
    return centres[labels] + torch.randn(len(labels), dim, generator=generator), labels


def test_knn_separable_is_perfect():
    train, train_labels = clusters(50, seed=0)
    test, test_labels = clusters(25, seed=1)
    assert knn_accuracy(train, train_labels, test, test_labels, k=5) == 1.0
    # Labels need not be 0..C-1.
    assert knn_accuracy(train, train_labels * 10 + 3, test, test_labels * 10 + 3, k=1) == 1.0


def test_knn_shuffled_labels_is_near_chance():
    train, train_labels = clusters(100, seed=0)
    test, test_labels = clusters(100, seed=1)
    shuffled = train_labels[torch.randperm(len(train_labels), generator=torch.Generator().manual_seed(3))]
    accuracy = knn_accuracy(train, shuffled, test, test_labels, k=5)
    assert 0.1 < accuracy < 0.45  # chance is 0.25


def test_knn_blocks_and_ties(monkeypatch):
    from hf_fastattn.evaluation import fidelity

    train, train_labels = clusters(30, seed=0)
    test, test_labels = clusters(20, seed=1)
    test_labels = test_labels[torch.randperm(len(test_labels), generator=torch.Generator().manual_seed(0))]
    whole = knn_accuracy(train, train_labels, test, test_labels, k=7)
    monkeypatch.setattr(fidelity, "_KNN_BLOCK_ELEMENTS", 3 * len(train))  # three test rows per block
    assert knn_accuracy(train, train_labels, test, test_labels, k=7) == whole

    # Brute force: majority of the k nearest by cosine, ties to the larger summed similarity.
    similarity = F.normalize(test, dim=-1) @ F.normalize(train, dim=-1).T
    values, neighbours = similarity.topk(7, dim=-1)
    expected = []
    for row_values, row_neighbours in zip(values, neighbours):
        tally = {}
        for value, neighbour in zip(row_values.tolist(), row_neighbours.tolist()):
            count, total = tally.get(int(train_labels[neighbour]), (0, 0.0))
            tally[int(train_labels[neighbour])] = (count + 1, total + value)
        expected.append(max(tally, key=lambda label: tally[label]))
    assert whole == pytest.approx((torch.tensor(expected) == test_labels).double().mean().item())

    # A 2-2 tie with k=4: the class whose two neighbours are closer wins.
    tie_train = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.8, 0.6], [0.6, 0.8]])
    assert (
        knn_accuracy(tie_train, torch.tensor([0, 0, 1, 1]), torch.tensor([[1.0, 0.05]]), torch.tensor([0]), k=4) == 1.0
    )
    with pytest.raises(ValueError, match="k must be between 1 and the number of training points"):
        knn_accuracy(tie_train, torch.tensor([0, 0, 1, 1]), tie_train, torch.tensor([0, 0, 1, 1]), k=5)
