"""Encoder fidelity: a patched model against a dense copy of itself (evaluation conventions §6.4).

- Text: cosine similarity of mean-pooled sentence embeddings (the all-MiniLM-L6-v2 recipe: the last hidden state
  averaged over the non-padding tokens), per sentence, plus a small retrieval check (top-1 accuracy of cosine ranking)
  run with both models.
- Vision: cosine of the CLS feature and of every patch feature of ``last_hidden_state`` (DINOv2).
- k-NN: cosine k-nearest-neighbour accuracy on extracted CLS features (e.g. Fashion-MNIST), for both models.

A fidelity number compares two different model objects, each with its own config: passing one object twice (or two
models that share one config, so that one ``set_attn_implementation`` switches both) raises ``ValueError``, and every
record names both attention implementations. Models run in eval mode without gradients; their training flag is
restored afterwards. Every record is JSON-able, with both models' attention summaries, time and peak memory.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .records import Measure, attention_summary, environment

# Elements of one (test chunk x train) similarity block in knn_accuracy: 2**24 float32 = 64 MiB.
_KNN_BLOCK_ELEMENTS = 2**24


# --------------------------------------------------------------------------------------------------------------------
# Text embeddings
# --------------------------------------------------------------------------------------------------------------------


def embedding_fidelity(
    model: nn.Module,
    reference_model: nn.Module,
    tokenizer,
    sentences: Sequence[str],
    *,
    batch_size: int = 16,
    queries: Sequence[str] | None = None,
    documents: Sequence[str] | None = None,
    relevant_index: Sequence[int] | None = None,
) -> dict:
    """Cosine similarity of ``model``'s mean-pooled sentence embeddings with ``reference_model``'s, as a record.

    Sentences run in padded batches of ``batch_size``. Record: ``cosine`` (``min``, ``mean`` and ``per_sentence``),
    ``relative_error`` (``|a - b| / |b|`` per sentence: ``max``, ``mean``), and, when ``queries``, ``documents`` and
    ``relevant_index`` are given, ``retrieval``: :func:`retrieval_check` for both models and the fraction of queries on
    which their top-1 documents agree. ``seconds`` and ``timing`` cover the sentence embeddings; each retrieval record
    has its own.
    """
    _check_pair(model, reference_model)
    sentences = _check_texts(sentences, "sentences")
    _check_batch_size(batch_size)
    retrieval_inputs = (queries, documents, relevant_index)
    if any(value is not None for value in retrieval_inputs) and any(value is None for value in retrieval_inputs):
        raise ValueError("the retrieval check needs queries, documents and relevant_index together")

    with Measure() as model_measure:
        embeddings = sentence_embeddings(model, tokenizer, sentences, batch_size=batch_size)
    with Measure() as reference_measure:
        reference = sentence_embeddings(reference_model, tokenizer, sentences, batch_size=batch_size)
    result = {
        "task": "embedding_fidelity",
        "sentences": len(sentences),
        "batch_size": batch_size,
        "pooling": "mean over non-padding tokens of last_hidden_state",
        **_similarity(embeddings, reference, "per_sentence"),
    }
    if queries is not None:
        retrieval = {
            "model": retrieval_check(model, tokenizer, queries, documents, relevant_index, batch_size=batch_size),
            "reference": retrieval_check(
                reference_model, tokenizer, queries, documents, relevant_index, batch_size=batch_size
            ),
        }
        for record in retrieval.values():
            del record["environment"]  # the enclosing record has it
        same_top1 = [a == b for a, b in zip(retrieval["model"]["top1"], retrieval["reference"]["top1"])]
        retrieval["top1_agreement"] = sum(same_top1) / len(same_top1)
        result["retrieval"] = retrieval
    return result | _pair_record(model, reference_model, model_measure, reference_measure)


def retrieval_check(
    model: nn.Module,
    tokenizer,
    queries: Sequence[str],
    documents: Sequence[str],
    relevant_index: Sequence[int],
    *,
    batch_size: int = 16,
) -> dict:
    """Top-1 accuracy of ranking ``documents`` by cosine similarity to each query's mean-pooled embedding.

    ``relevant_index[i]`` is the index in ``documents`` of query ``i``'s relevant document. Record: ``top1_accuracy``,
    ``top1`` (each query's best document), ``relevant_index``, counts, ``attention``, ``seconds``, ``peak_memory_mib``
    and ``environment``.
    """
    queries = _check_texts(queries, "queries")
    documents = _check_texts(documents, "documents")
    _check_batch_size(batch_size)
    relevant_index = [int(index) for index in relevant_index]
    if len(relevant_index) != len(queries):
        raise ValueError(f"relevant_index has {len(relevant_index)} entries for {len(queries)} queries")
    out_of_range = [index for index in relevant_index if not 0 <= index < len(documents)]
    if out_of_range:
        raise ValueError(f"relevant_index entries {out_of_range} are not document indices (0..{len(documents) - 1})")

    with Measure() as measure:
        query_embeddings = sentence_embeddings(model, tokenizer, queries, batch_size=batch_size)
        document_embeddings = sentence_embeddings(model, tokenizer, documents, batch_size=batch_size)
    similarity = F.normalize(query_embeddings.double(), dim=-1) @ F.normalize(document_embeddings.double(), dim=-1).T
    top1 = similarity.argmax(dim=-1).tolist()
    return {
        "task": "retrieval_check",
        "queries": len(queries),
        "documents": len(documents),
        "top1_accuracy": sum(best == relevant for best, relevant in zip(top1, relevant_index)) / len(queries),
        "top1": top1,
        "relevant_index": relevant_index,
        "attention": attention_summary(model),
        "seconds": measure.seconds,
        "peak_memory_mib": measure.peak_memory_mib,
        "environment": environment(),
    }


def sentence_embeddings(model: nn.Module, tokenizer, texts: Sequence[str], *, batch_size: int = 16) -> torch.Tensor:
    """Mean-pooled last hidden states over the non-padding tokens, ``(len(texts), hidden)`` float32 on the CPU."""
    device = next(model.parameters()).device
    chunks = []
    with _inference(model):
        for start in range(0, len(texts), batch_size):
            encoded = tokenizer(
                list(texts[start : start + batch_size]), padding=True, truncation=True, return_tensors="pt"
            )
            encoded = {name: tensor.to(device) for name, tensor in encoded.items()}
            hidden = _last_hidden_state(model, encoded).float()
            mask = encoded["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            chunks.append(((hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1)).cpu())
    return torch.cat(chunks)


# --------------------------------------------------------------------------------------------------------------------
# Vision features
# --------------------------------------------------------------------------------------------------------------------


def vision_fidelity(
    model: nn.Module, reference_model: nn.Module, pixel_values: torch.Tensor, *, batch_size: int | None = None
) -> dict:
    """CLS and patch-feature cosine between two vision encoders' ``last_hidden_state`` on ``pixel_values``.

    ``pixel_values`` is ``(N, channels, height, width)``, already preprocessed; it runs in batches of ``batch_size``
    (default: all at once). Token 0 is the CLS token; the patch tokens follow the model's register tokens, if any
    (``config.num_register_tokens``). Record: ``cls_cosine`` (``min``, ``mean``, ``per_image``), ``patch_cosine``
    (``min``, ``mean`` over every patch of every image), relative errors, shapes, attention summaries, time and memory.
    """
    _check_pair(model, reference_model)
    if pixel_values.dim() != 4 or pixel_values.shape[0] == 0:
        raise ValueError(
            f"pixel_values must be a non-empty (N, channels, height, width) batch, got {tuple(pixel_values.shape)}"
        )
    batch_size = pixel_values.shape[0] if batch_size is None else batch_size
    _check_batch_size(batch_size)

    with Measure() as model_measure:
        hidden = _image_hidden_states(model, pixel_values, batch_size)
    with Measure() as reference_measure:
        reference = _image_hidden_states(reference_model, pixel_values, batch_size)
    if hidden.shape != reference.shape:
        raise ValueError(
            f"the models' last_hidden_state shapes differ: {tuple(hidden.shape)} and {tuple(reference.shape)}"
        )
    prefix = _prefix_tokens(model)
    cls = _similarity(hidden[:, 0], reference[:, 0], "per_image")
    patches = _similarity(hidden[:, prefix:].flatten(0, 1), reference[:, prefix:].flatten(0, 1), None)
    return {
        "task": "vision_fidelity",
        "images": pixel_values.shape[0],
        "image_size": list(pixel_values.shape[-2:]),
        "tokens": hidden.shape[1],
        "patch_tokens": hidden.shape[1] - prefix,
        "batch_size": batch_size,
        "cls_cosine": cls["cosine"],
        "cls_relative_error": cls["relative_error"],
        "patch_cosine": patches["cosine"],
        "patch_relative_error": patches["relative_error"],
    } | _pair_record(model, reference_model, model_measure, reference_measure)


def extract_features(model: nn.Module, images: torch.Tensor, *, batch_size: int = 64) -> torch.Tensor:
    """CLS features (token 0 of ``last_hidden_state``) of ``images``, ``(N, hidden)`` float32 on the CPU."""
    _check_batch_size(batch_size)
    return _image_hidden_states(model, images, batch_size, cls_only=True)


def knn_accuracy(
    features_train: torch.Tensor,
    labels_train: torch.Tensor,
    features_test: torch.Tensor,
    labels_test: torch.Tensor,
    k: int = 5,
) -> float:
    """Accuracy of cosine k-nearest-neighbour classification of the test features by the training features.

    Each test point takes the majority label of its ``k`` most cosine-similar training points; a tie goes to the
    tied label with the larger summed similarity. Similarities are computed in blocks of test rows, so memory stays
    bounded (about 64 MiB per block) whatever the training set's size.
    """
    features_train, features_test = features_train.float(), features_test.float()
    labels_train, labels_test = torch.as_tensor(labels_train).flatten(), torch.as_tensor(labels_test).flatten()
    if features_train.dim() != 2 or features_test.dim() != 2 or features_train.shape[1] != features_test.shape[1]:
        raise ValueError(
            f"features must be (N, dim) with one dim, got train {tuple(features_train.shape)} and test "
            f"{tuple(features_test.shape)}"
        )
    if len(labels_train) != len(features_train) or len(labels_test) != len(features_test):
        raise ValueError(
            f"labels and features disagree: {len(labels_train)} train labels for {len(features_train)} features, "
            f"{len(labels_test)} test labels for {len(features_test)} features"
        )
    if len(features_test) == 0:
        raise ValueError("knn_accuracy needs at least one test point")
    if not 1 <= k <= len(features_train):
        raise ValueError(f"k must be between 1 and the number of training points ({len(features_train)}), got {k}")

    classes, train_classes = torch.unique(labels_train, return_inverse=True)
    train = F.normalize(features_train, dim=-1)
    train_classes = train_classes.to(train.device)
    rows = max(1, _KNN_BLOCK_ELEMENTS // len(train))
    predicted = []
    for start in range(0, len(features_test), rows):
        test = F.normalize(features_test[start : start + rows].to(train.device), dim=-1)
        similarity, neighbours = (test @ train.T).topk(k, dim=-1)
        neighbour_classes = train_classes[neighbours]
        votes = torch.zeros(len(test), len(classes), dtype=torch.float64, device=train.device)
        votes.scatter_add_(1, neighbour_classes, torch.ones_like(similarity, dtype=torch.float64))
        summed = torch.zeros_like(votes).scatter_add_(1, neighbour_classes, similarity.double())
        # One vote outweighs any similarity sum (|sum| <= k): the summed similarity only breaks ties.
        predicted.append((votes * (2 * k + 1) + summed).argmax(dim=-1).cpu())
    predicted_labels = classes.cpu()[torch.cat(predicted)]
    return float((predicted_labels == labels_test.cpu()).double().mean())


def knn_fidelity(
    model: nn.Module,
    reference_model: nn.Module,
    train_images: torch.Tensor,
    train_labels: torch.Tensor,
    test_images: torch.Tensor,
    test_labels: torch.Tensor,
    *,
    k: int = 5,
    batch_size: int = 64,
) -> dict:
    """:func:`knn_accuracy` on both models' CLS features, with the test features' cosine between the models."""
    _check_pair(model, reference_model)
    if not 1 <= k <= len(train_images):
        raise ValueError(f"k must be between 1 and the number of training images ({len(train_images)}), got {k}")
    with Measure() as model_measure:
        train = extract_features(model, train_images, batch_size=batch_size)
        test = extract_features(model, test_images, batch_size=batch_size)
    with Measure() as reference_measure:
        reference_train = extract_features(reference_model, train_images, batch_size=batch_size)
        reference_test = extract_features(reference_model, test_images, batch_size=batch_size)
    return {
        "task": "knn_fidelity",
        "k": k,
        "train_images": len(train),
        "test_images": len(test),
        "accuracy": knn_accuracy(train, train_labels, test, test_labels, k=k),
        "reference_accuracy": knn_accuracy(reference_train, train_labels, reference_test, test_labels, k=k),
        "test_feature_cosine": _similarity(test, reference_test, None)["cosine"],
    } | _pair_record(model, reference_model, model_measure, reference_measure)


# --------------------------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------------------------


def _check_pair(model: nn.Module, reference_model: nn.Module) -> None:
    if model is reference_model:
        raise ValueError(
            "model and reference_model are the same object: a model compared with itself always agrees. Pass a "
            "separate dense copy (e.g. from_config/from_pretrained with attn_implementation='eager' and the same "
            "weights)"
        )
    if getattr(model, "config", None) is not None and model.config is getattr(reference_model, "config", None):
        raise ValueError(
            "model and reference_model share one config object, which holds the attention implementation: both would "
            "run the same attention. Give each model its own config (copy.deepcopy(config))"
        )


def _pair_record(model: nn.Module, reference_model: nn.Module, model_measure: Measure, reference_measure: Measure):
    peaks = [m.peak_memory_mib for m in (model_measure, reference_measure) if m.peak_memory_mib is not None]
    return {
        "implementations": {
            "model": model.config._attn_implementation,
            "reference": reference_model.config._attn_implementation,
        },
        "attention": {"model": attention_summary(model), "reference": attention_summary(reference_model)},
        "seconds": model_measure.seconds + reference_measure.seconds,
        "peak_memory_mib": max(peaks) if peaks else None,
        "timing": {
            "model": {"seconds": model_measure.seconds, "peak_memory_mib": model_measure.peak_memory_mib},
            "reference": {"seconds": reference_measure.seconds, "peak_memory_mib": reference_measure.peak_memory_mib},
        },
        "environment": environment(),
    }


def _similarity(actual: torch.Tensor, expected: torch.Tensor, per_item: str | None) -> dict:
    """Cosine and relative L2 error per row, in float64: min/mean (and per row under ``per_item``)."""
    actual, expected = actual.double(), expected.double()
    cosine = F.cosine_similarity(actual, expected, dim=-1)
    relative = (actual - expected).norm(dim=-1) / expected.norm(dim=-1).clamp_min(1e-12)
    result = {
        "cosine": {"min": cosine.min().item(), "mean": cosine.mean().item()},
        "relative_error": {"max": relative.max().item(), "mean": relative.mean().item()},
    }
    if per_item is not None:
        result["cosine"][per_item] = cosine.tolist()
    return result


def _last_hidden_state(model: nn.Module, inputs: dict) -> torch.Tensor:
    output = model(**inputs)
    hidden = getattr(output, "last_hidden_state", None)
    if hidden is None:  # a model with a head (e.g. ...ForMaskedLM): ask for the hidden states
        hidden = model(**inputs, output_hidden_states=True).hidden_states[-1]
    return hidden


def _image_hidden_states(
    model: nn.Module, pixel_values: torch.Tensor, batch_size: int, *, cls_only: bool = False
) -> torch.Tensor:
    parameter = next(model.parameters())
    chunks = []
    with _inference(model):
        for start in range(0, len(pixel_values), batch_size):
            batch = pixel_values[start : start + batch_size].to(parameter.device, parameter.dtype)
            hidden = _last_hidden_state(model, {"pixel_values": batch}).float()
            chunks.append((hidden[:, 0] if cls_only else hidden).cpu())
    return torch.cat(chunks)


def _prefix_tokens(model: nn.Module) -> int:
    """Tokens before the patches: CLS plus register tokens (DINOv2 with registers)."""
    return 1 + int(getattr(model.config, "num_register_tokens", 0) or 0)


@contextlib.contextmanager
def _inference(model: nn.Module) -> Iterator[None]:
    """Eval mode and no gradients inside the block; the training flag is restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def _check_texts(texts: Sequence[str], name: str) -> list[str]:
    if isinstance(texts, str):
        raise TypeError(f"{name} must be a sequence of strings, not one string")
    texts = list(texts)
    if not texts:
        raise ValueError(f"{name} is empty")
    return texts


def _check_batch_size(batch_size: int) -> None:
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
