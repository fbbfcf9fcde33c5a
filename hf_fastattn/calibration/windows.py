"""Token windows for calibration and training, from the training split only (never the evaluation text)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

# The default calibration mix: the training split's two sources, alternated window by window.
DEFAULT_SOURCES = ("austen", "pydocs")
# Characters read per requested token: generous, so a source's text covers its windows after tokenisation.
_CHARS_PER_TOKEN = 8


def token_windows(dataset, tokenizer, *, samples: int, length: int) -> tuple[torch.Tensor, str]:
    """``(samples, length)`` token ids and a description of where they came from.

    ``dataset``: ``"default"`` (the Austen training novels and the Python docs, alternating), a text asset name
    (``"austen"``, ``"pydocs"``: their ``train`` split), a list of strings, a ``datasets.Dataset`` with a ``text`` or
    ``input_ids`` column, or a ``(N, L)`` tensor of token ids. Texts are concatenated in order and cut into
    non-overlapping windows, so the windows are deterministic.
    """
    if samples < 1 or length < 1:
        raise ValueError(f"need at least one sample of at least one token, got samples={samples}, length={length}")
    if isinstance(dataset, torch.Tensor):
        return _from_ids(dataset.reshape(-1), samples, length, "token ids"), "token ids"
    if isinstance(dataset, str):
        from ..assets.data import load_documents

        names = DEFAULT_SOURCES if dataset == "default" else (dataset,)
        per_source = -(-samples // len(names))
        streams = []
        for name in names:
            text = _head("\n\n".join(text for _, text in load_documents(name, "train")), per_source * length)
            streams.append(_from_ids(_encode(tokenizer, text), per_source, length, f"{name} (train split)"))
        interleaved = torch.stack(streams, dim=1).reshape(-1, length)[:samples]
        return interleaved, " + ".join(f"{name} (train split)" for name in names)
    column_names = getattr(dataset, "column_names", None)
    if column_names is not None and "input_ids" in column_names:
        ids = torch.tensor([token for row in dataset["input_ids"] for token in row])
        return _from_ids(ids, samples, length, "dataset"), "datasets.Dataset (input_ids)"
    if column_names is not None and "text" in column_names:
        texts, description = list(dataset["text"]), "datasets.Dataset (text)"
    elif isinstance(dataset, Sequence) and all(isinstance(text, str) for text in dataset):
        texts, description = list(dataset), f"{len(dataset)} texts"
    else:
        raise TypeError(
            "dataset must be 'default', a text asset name, a list of strings, a datasets.Dataset with a 'text' or "
            f"'input_ids' column, or a tensor of token ids; got {type(dataset).__name__}"
        )
    text = _head("\n\n".join(texts), samples * length)
    return _from_ids(_encode(tokenizer, text), samples, length, description), description


def _head(text: str, tokens: int) -> str:
    return text[: tokens * _CHARS_PER_TOKEN]


def _encode(tokenizer, text: str) -> torch.Tensor:
    if tokenizer is None:
        raise ValueError("text needs a tokenizer: pass tokenizer=...")
    return torch.tensor(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])


def _from_ids(ids: torch.Tensor, samples: int, length: int, what: str) -> torch.Tensor:
    if ids.numel() < samples * length:
        raise ValueError(
            f"{what} has {ids.numel()} tokens, fewer than samples x length = {samples} x {length}: "
            "pass fewer samples or a shorter length"
        )
    return ids[: samples * length].reshape(samples, length).long()


__all__: Sequence[str] = ["DEFAULT_SOURCES", "token_windows"]
