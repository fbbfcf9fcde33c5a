"""Perplexity of a causal LM on local text: the Hugging Face strided sliding-window protocol, with position buckets.

Protocol (evaluation conventions §5.1, transformers ``docs/source/en/perplexity.md``): the text is tokenised once;
for ``begin`` in ``range(0, n, stride)`` the window is ``tokens[begin:end]`` with ``end = min(begin + window, n)``,
and only its last ``end - prev_end`` tokens (those no earlier window scored) are labelled. A labelled token is scored
when some position before it in the window predicts it, so without BOS a window's first token never is. Perplexity is
``exp(total NLL / scored tokens)``; ``stride == window`` gives non-overlapping windows.

The NLL is computed here from the logits rather than by ``model(..., labels=...)`` so that it can also be reported per
bucket of position within the window: sparse attention tends to lose quality at later positions (§5.3).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .._distributed import run_sharded
from .records import Measure, attention_summary, environment


@dataclass(frozen=True)
class _Window:
    begin: int  # first text token of the window
    end: int  # one past its last text token
    target_length: int  # its last tokens that no earlier window labelled


def perplexity(
    model: nn.Module,
    tokenizer,
    text: str,
    *,
    context_length: int,
    stride: int | None = None,
    bucket_size: int | None = None,
    add_bos: bool = False,
    max_tokens: int | None = None,
    batch_size: int = 1,
    progress: bool = True,
) -> dict:
    """Perplexity of ``model`` on ``text`` with windows of ``context_length`` input tokens, as a JSON-able record.

    ``context_length`` is the model's input length: with ``add_bos`` each window holds ``context_length - 1`` text
    tokens after the tokenizer's BOS (which then predicts the window's first token). ``stride`` (default: the window's
    text length, i.e. non-overlapping windows) is the step between window starts. ``bucket_size`` adds perplexity per
    bucket of the predicted token's position in the input window. ``max_tokens`` truncates the tokenised text.
    Up to ``batch_size`` consecutive windows of equal length run in one forward pass.
    """
    window_tokens = context_length - int(add_bos)
    stride = window_tokens if stride is None else stride
    _check_arguments(model, context_length, stride, window_tokens, bucket_size, batch_size)
    prefix = [_bos_token_id(tokenizer)] if add_bos else []

    token_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if max_tokens is not None:
        token_ids = token_ids[:max_tokens]
    if len(token_ids) < 2:
        source = "the text is empty" if not text else f"the text has {len(token_ids)} token(s)"
        limit = f" with max_tokens={max_tokens}" if max_tokens is not None else ""
        raise ValueError(f"perplexity needs at least 2 tokens, but {source}{limit}")

    windows = _sliding_windows(len(token_ids), window_tokens, stride)
    # NLL sums and scored counts per position bucket; without bucket_size a single bucket holds every position.
    num_buckets = math.ceil(context_length / bucket_size) if bucket_size else 1
    bucket_nll = torch.zeros(num_buckets, dtype=torch.float64)
    bucket_scored = torch.zeros(num_buckets, dtype=torch.int64)

    parameter = next(model.parameters())

    def score_batch(batch: list[_Window]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each window's scored tokens: their position buckets and NLL (float64), on the CPU."""
        input_ids = torch.tensor([prefix + token_ids[w.begin : w.end] for w in batch], device=parameter.device)
        logits = model(input_ids=input_ids, use_cache=False).logits
        scored = []
        for row, window in enumerate(batch):
            positions, nll = _scored_nll(logits[row], input_ids[row], window.target_length)
            buckets = positions // bucket_size if bucket_size else torch.zeros_like(positions)
            scored.append((buckets.cpu(), nll.double().cpu()))
        return scored

    was_training = model.training
    model.eval()
    try:
        with Measure() as measure, torch.no_grad():
            # A batch is the unit of work: under ``accelerate launch`` the processes share the batches out.
            scored_batches = run_sharded(
                list(_batches(windows, batch_size)),
                score_batch,
                model,
                describe=lambda _: f"perplexity @ {context_length}",
                progress=progress,
            )
    finally:
        model.train(was_training)
    # Summed in window order, whichever process scored a window: the float sums of a single process.
    for buckets, nll in itertools.chain.from_iterable(scored_batches):
        bucket_nll.index_add_(0, buckets, nll)
        bucket_scored.index_add_(0, buckets, torch.ones_like(buckets))

    scored_tokens = int(bucket_scored.sum())
    mean_nll = float(bucket_nll.sum()) / scored_tokens
    return {
        "task": "perplexity",
        "context_length": context_length,
        "stride": stride,
        "add_bos": add_bos,
        "batch_size": batch_size,
        "dtype": str(parameter.dtype).removeprefix("torch."),
        "tokens": len(token_ids),
        "input_tokens": sum(len(prefix) + window.end - window.begin for window in windows),  # what the model read
        "scored_tokens": scored_tokens,
        "windows": len(windows),
        "nll": mean_nll,
        "perplexity": math.exp(mean_nll),
        "buckets": _bucket_records(bucket_nll, bucket_scored, bucket_size, context_length) if bucket_size else None,
        "attention": attention_summary(model),
        "seconds": measure.seconds,
        "peak_memory_mib": measure.peak_memory_mib,
        "environment": environment(),
    }


def perplexity_sweep(model: nn.Module, tokenizer, text: str, context_lengths: Iterable[int], **kwargs) -> list[dict]:
    """One :func:`perplexity` record per context length (same text and options); lengths are checked before any run."""
    context_lengths = list(context_lengths)
    for context_length in context_lengths:
        _check_context_length(model, context_length)
    return [perplexity(model, tokenizer, text, context_length=length, **kwargs) for length in context_lengths]


def _check_arguments(
    model: nn.Module, context_length: int, stride: int, window_tokens: int, bucket_size: int | None, batch_size: int
) -> None:
    _check_context_length(model, context_length)
    if window_tokens < 1:
        raise ValueError(f"context_length={context_length} leaves no room for text after the BOS token")
    if not 1 <= stride <= window_tokens:
        # A stride longer than the window would skip tokens that no window ever scores.
        limit = "context_length" if window_tokens == context_length else "context_length - 1 (BOS takes a position)"
        raise ValueError(f"stride must be between 1 and {limit} = {window_tokens}, got {stride}")
    if bucket_size is not None and bucket_size < 1:
        raise ValueError(f"bucket_size must be a positive number of positions, got {bucket_size}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")


def _check_context_length(model: nn.Module, context_length: int) -> None:
    if context_length < 2:
        raise ValueError(f"context_length must be at least 2 tokens (one to predict from), got {context_length}")
    max_positions = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    if max_positions is not None and context_length > max_positions:
        raise ValueError(f"context_length {context_length} exceeds the model's max_position_embeddings {max_positions}")


def _bos_token_id(tokenizer) -> int:
    if tokenizer.bos_token_id is None:
        raise ValueError(f"add_bos=True but the tokenizer ({type(tokenizer).__name__}) has no BOS token")
    return tokenizer.bos_token_id


def _sliding_windows(num_tokens: int, window_tokens: int, stride: int) -> list[_Window]:
    """The HF protocol's windows, each with the number of its last tokens that are labelled."""
    windows, previous_end = [], 0
    for begin in range(0, num_tokens, stride):
        end = min(begin + window_tokens, num_tokens)
        windows.append(_Window(begin, end, end - previous_end))
        previous_end = end
        if end == num_tokens:
            break
    return windows


def _batches(windows: list[_Window], batch_size: int) -> Iterable[list[_Window]]:
    """Consecutive windows of equal length, at most ``batch_size`` at a time (no padding is ever needed)."""
    batch: list[_Window] = []
    for window in windows:
        if batch and (len(batch) == batch_size or window.end - window.begin != batch[0].end - batch[0].begin):
            yield batch
            batch = []
        batch.append(window)
    yield batch


def _scored_nll(logits: torch.Tensor, input_ids: torch.Tensor, target_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Input positions of one window's scored tokens and their NLL in float32.

    The labelled tokens are the last ``target_length``; position 0 has nothing before it to predict it from.
    """
    length = input_ids.shape[0]
    positions = torch.arange(max(1, length - target_length), length, device=input_ids.device)
    # Cross-entropy of float32 logits = float32 log-softmax, then gather of the target's log-probability.
    nll = F.cross_entropy(logits[positions - 1].float(), input_ids[positions], reduction="none")
    return positions, nll


def _bucket_records(
    bucket_nll: torch.Tensor, bucket_scored: torch.Tensor, bucket_size: int, context_length: int
) -> list[dict]:
    records = []
    for index, (nll_sum, scored) in enumerate(zip(bucket_nll.tolist(), bucket_scored.tolist())):
        start = index * bucket_size
        records.append(
            {
                "start": start,
                "end": min(start + bucket_size, context_length),
                "scored_tokens": scored,
                "perplexity": math.exp(nll_sum / scored) if scored else None,
            }
        )
    return records
