"""The evaluation suite behind ``hf-fastattn eval``: several attention methods, one model, the same cases, one table.

:func:`run_eval` loads the model once, runs one task's harness with each method in turn (same seeds, same prompts,
same text) and writes, under ``output_dir``:

* ``<task>.json``: the environment, the resolved settings, the result rows and every harness record per method;
* ``summary.md``: the rows as a markdown table under a line with the versions and device (also returned);
* plots: ``needle_<method>.png`` heatmaps (niah), ``perplexity_vs_context.png`` (ppl) and ``pareto.png`` (every task).

Every row has the same columns, so methods compare side by side: see :data:`ROW_KEYS`. Method labels: ``dense`` and
``sdpa`` are the model's own SDPA attention (the baseline), ``eager`` is transformers' eager attention, and
``fastattn_<m>`` (or a registered method name other than ``dense``) is that hf_fastattn method patched in with
:func:`hf_fastattn.use`. A method label may carry settings, ``name:key=value[:key=value...]`` (e.g. ``bsfa:k=16``):
they go to ``use`` on top of ``method_config[name]`` (shared settings such as a thresholds artifact), and the row's
``setting`` column shows them.

Defaults come from :data:`DEFAULTS`: on a CPU, sizes that finish in a few minutes on 2 cores; on a GPU, the full grid
(up to SmolLM2's 8k positions). Every default can be overridden by a keyword argument (and a CLI flag).

Under ``accelerate launch --num_processes N`` every process loads the model and the causal tasks' harnesses share
their cases out (``hf_fastattn._distributed``): records and rows are those of one process on the same seeds, except
for the timing and memory fields. ``seconds`` is the main process's wall time of the sharded run (so
``tokens_per_second`` is the throughput of all processes together), ``peak_memory_mib`` its own GPU's peak. Only the
main process writes files. ``encoder`` is not sharded: every process runs all of it.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import os
import random
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase
from transformers.image_processing_base import ImageProcessingMixin

import hf_fastattn

from .._distributed import process_state
from .._io import atomic_write, check_writable
from ..assets.data import load_fashion_mnist, load_text
from ..assets.models import load_model, model_max_length, resolve_device, resolve_dtype
from ..patch import use
from .fidelity import _prefix_tokens, embedding_fidelity, knn_fidelity, vision_fidelity
from .perplexity import perplexity
from .plots import save_heatmap, save_pareto_plot, save_perplexity_plot
from .records import environment, write_json
from .retrieval import needle_grid, passkey
from .ruler import ruler_lite

TASKS = ("niah", "passkey", "ruler", "ppl", "encoder")
ROW_KEYS = (
    *("task", "method", "setting", "implementation", "context_length", "quality_metric", "quality", "density"),
    *("seconds", "tokens", "tokens_per_second", "peak_memory_mib", "device"),
)
DEFAULT_METHODS = ("dense", "fastattn_dense")
# transformers' own attention implementations, by label; any other label is an hf_fastattn method.
_BUILTIN_ATTENTION = {"dense": "sdpa", "sdpa": "sdpa", "eager": "eager"}
_RULER_TASKS = ("niah_single_2", "niah_multikey_1", "niah_multivalue", "niah_multiquery")
_ALL_RULER_TASKS = (
    "niah_single_1",
    "niah_single_2",
    "niah_single_3",
    "niah_multikey_1",
    "niah_multivalue",
    "niah_multiquery",
)

# Per task, per device kind: the CPU grid finishes in minutes on 2 cores, the GPU grid is the full one.
DEFAULTS: dict[str, dict[str, dict]] = {
    "niah": {
        "cpu": {
            "model": "smollm2",
            "context_lengths": [256, 512],
            "depth_percents": [0, 50, 100],
            "needles_per_cell": 1,
        },
        "gpu": {
            "model": "smollm2",
            "context_lengths": [1024, 2048, 4096, 8000],  # SmolLM2 has 8192 positions; the answer needs a few
            "depth_percents": [0, 10, 20, 30, 40, 50, 60, 70, 80, 90, 100],
            "needles_per_cell": 2,
        },
    },
    "passkey": {
        "cpu": {"model": "smollm2", "context_lengths": [256, 512], "depths": [0, 0.5, 1.0], "trials": 1},
        "gpu": {
            "model": "smollm2",
            "context_lengths": [1024, 2048, 4096, 8000],
            "depths": [0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0],
            "trials": 2,
        },
    },
    "ruler": {
        "cpu": {
            "model": "smollm2",
            "context_lengths": [1024],
            "tasks": list(_RULER_TASKS),
            "samples": 1,
            "max_new_tokens": None,
        },
        "gpu": {
            "model": "smollm2",
            "context_lengths": [4096, 8192],
            "tasks": list(_ALL_RULER_TASKS),
            "samples": 25,
            "max_new_tokens": None,
        },
    },
    "ppl": {
        "cpu": {
            "model": "smollm2",
            "context_lengths": [256, 512],
            "stride": None,
            "bucket_size": 128,
            "max_tokens": 2048,
        },
        # The whole held-out text (the essays: 154k tokens).
        "gpu": {
            "model": "smollm2",
            "context_lengths": [2048, 4096, 8192],
            "stride": None,
            "bucket_size": 1024,
            "max_tokens": None,
        },
    },
    "encoder": {
        "cpu": {
            "model": ["minilm", "dinov2-s"],
            "sentences": 64,
            "retrieval_documents": 16,
            "image_sizes": [224, 518],
            "images": 2,
            "knn_image_size": 56,
            "knn_train": 200,
            "knn_test": 100,
            "k": 5,
        },
        "gpu": {
            "model": ["minilm", "dinov2-s"],
            "sentences": 1000,
            "retrieval_documents": 48,
            "image_sizes": [224, 518],
            "images": 32,
            "knn_image_size": 224,
            "knn_train": 2000,
            "knn_test": 1000,
            "k": 5,
        },
    },
}
_RETRIEVAL_PASSAGE = 4  # sentences per retrieval document (after the query sentence)


def default_options(task: str, device: str | torch.device) -> dict:
    """The defaults of ``task`` for ``device`` (its CPU or its GPU grid), as a fresh dict."""
    _check_task(task)
    return copy.deepcopy(DEFAULTS[task]["gpu" if torch.device(device).type == "cuda" else "cpu"])


def method_labels() -> list[str]:
    """Every method label ``run_eval`` accepts."""
    specs = hf_fastattn.list_methods()
    return [
        *_BUILTIN_ATTENTION,
        *(spec.registered_name for spec in specs),
        *(spec.name for spec in specs if spec.name not in _BUILTIN_ATTENTION),
    ]


def run_eval(
    task: str = "niah",
    *,
    model=None,
    methods: Sequence[str] = DEFAULT_METHODS,
    output_dir: str | os.PathLike | None = None,
    text: str = "essays",
    text_file: str | os.PathLike | None = None,
    seed: int = 0,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    progress: bool = True,
    method_config: dict[str, dict] | None = None,
    **options,
) -> dict:
    """Run ``task`` (one of :data:`TASKS`) with each of ``methods`` on one model and write the results.

    ``model``: an asset name (``smollm2``, ``minilm``, ``dinov2-s``), a local folder, a hub id, or a loaded
    ``(model, tokenizer)`` pair; for ``encoder`` a list of them (at most one text and one vision model). Default: the
    task's (``DEFAULTS``). ``text`` names the held-out text asset (``essays`` or ``austen``), ``text_file`` a UTF-8
    file to use instead. ``output_dir`` defaults to ``eval_results/<task>``; it is checked before anything loads.
    ``options`` override the task's defaults (e.g. ``context_lengths=[1024]``). ``method_config`` maps a method name
    (``"bsfa"``) to settings every label of that method gets (e.g. ``{"bsfa": {"thresholds": "artifact/"}}``). Raises ``ValueError`` (bad input),
    ``OSError`` (unwritable output, unreadable text) or ``AssetUnavailable`` (a missing asset package).

    Returns the JSON payload (``environment``, ``task``, ``settings``, ``rows``, ``records``), ``summary`` and
    ``output_dir``.
    """
    _check_task(task)
    labels = _check_methods(methods)
    device = resolve_device(device)
    settings = default_options(task, device)
    unknown = sorted(set(options) - set(settings))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for {task}; valid options: {', '.join(sorted(settings))}")
    settings.update({name: value for name, value in options.items() if value is not None})
    if model is not None:
        settings["model"] = model
    settings["method_config"] = {
        name.removeprefix("fastattn_"): dict(cfg) for name, cfg in (method_config or {}).items()
    }
    dtype = resolve_dtype(dtype, device)
    state = process_state(device)
    output_dir = Path(output_dir or Path("eval_results") / task)
    if state.is_main_process:  # the only one that writes
        check_writable(output_dir)
    progress = progress and state.is_main_process

    run = _run_encoder if task == "encoder" else functools.partial(_run_causal, task)
    rows, records = run(settings, labels, text, text_file, seed, device, dtype, progress)

    settings["model"] = _describe_models(settings["model"])
    payload = {
        "environment": {**environment(), "processes": state.num_processes},
        "task": task,
        "settings": {
            **settings,
            "methods": labels,
            "seed": seed,
            "text": text if text_file is None else os.fspath(text_file),
            "device": str(device),
            "dtype": str(dtype).removeprefix("torch."),
        },
        "rows": rows,
        "records": records,
    }
    summary = summary_table(rows, payload["environment"])
    if state.is_main_process:
        write_json(output_dir / f"{task}.json", payload)
        atomic_write(output_dir / "summary.md", lambda path: Path(path).write_text(summary + "\n", encoding="utf-8"))
        _save_plots(task, rows, records, output_dir)
    return {**payload, "summary": summary, "output_dir": output_dir}


# --------------------------------------------------------------------------------------------------------------------
# Causal LM tasks: niah, passkey, ruler, ppl
# --------------------------------------------------------------------------------------------------------------------


def _niah(model, tokenizer, text, length, settings, seed, progress) -> dict:
    return needle_grid(
        model,
        tokenizer,
        text,
        context_lengths=[length],
        depth_percents=settings["depth_percents"],
        needles_per_cell=settings["needles_per_cell"],
        seed=seed,
        progress=progress,
    )


def _passkey(model, tokenizer, text, length, settings, seed, progress) -> dict:
    return passkey(
        model,
        tokenizer,
        context_lengths=[length],
        depths=settings["depths"],
        trials=settings["trials"],
        seed=seed,
        progress=progress,
    )


def _ruler(model, tokenizer, text, length, settings, seed, progress) -> dict:
    return ruler_lite(
        model,
        tokenizer,
        text,
        context_lengths=[length],
        tasks=settings["tasks"],
        samples=settings["samples"],
        seed=seed,
        max_new_tokens=settings["max_new_tokens"],
        progress=progress,
    )


def _perplexity(model, tokenizer, text, length, settings, seed, progress) -> dict:
    return perplexity(
        model,
        tokenizer,
        text,
        context_length=length,
        stride=settings["stride"],
        bucket_size=settings["bucket_size"],
        max_tokens=settings["max_tokens"],
        progress=progress,
    )


def _prompt_tokens(record: dict, cases: str) -> int:
    return sum(case["prompt_tokens"] for cell in record["cells"] for case in cell[cases])


@dataclass(frozen=True)
class _CausalTask:
    run: Callable[..., dict]  # the harness at one context length
    metric: str
    quality: Callable[[dict], float]
    tokens: Callable[[dict], int]  # tokens the model was given: the prompts, or the perplexity windows
    uses_text: bool = True
    overall_row: bool = True  # plus one row over every context length (each length has as many cases)


_CAUSAL_TASKS = {
    "niah": _CausalTask(
        _niah, "needle_accuracy", lambda record: record["mean_score"], lambda r: _prompt_tokens(r, "responses")
    ),
    "passkey": _CausalTask(
        _passkey,
        "passkey_accuracy",
        lambda record: record["mean_score"],
        lambda record: _prompt_tokens(record, "responses"),
        uses_text=False,
    ),
    "ruler": _CausalTask(
        _ruler, "ruler_string_match_all", lambda record: record["mean"], lambda r: _prompt_tokens(r, "samples")
    ),
    "ppl": _CausalTask(
        _perplexity,
        "perplexity",
        lambda record: record["perplexity"],
        lambda record: record["input_tokens"],
        overall_row=False,  # perplexities over different window lengths do not pool
    ),
}


def _run_causal(task, settings, labels, text_name, text_file, seed, device, dtype, progress) -> tuple[list, dict]:
    spec = _CAUSAL_TASKS[task]
    text = load_eval_text(text_name, text_file) if spec.uses_text else None
    model, tokenizer = _load(settings["model"], device, dtype)
    if not (callable(getattr(model, "can_generate", None)) and model.can_generate()):
        raise ValueError(f"{task} needs a causal language model (e.g. smollm2); {type(model).__name__} is not one")
    lengths = list(settings["context_lengths"])
    _check_context_lengths(model, lengths)
    device_name = _device_name(model)

    rows, records = [], {}
    for label in _methods_bar(labels, progress):
        records[label], method_rows = {}, []
        for length in lengths:
            with _attention(model, label, settings["method_config"]):
                _warm_up(model, length)
            # A fresh patch per timed run: realised statistics (density) cover this run only, not the warm-up.
            with _attention(model, label, settings["method_config"]):
                implementation = model.config._attn_implementation
                record = spec.run(model, tokenizer, text, length, settings, seed, progress)
            records[label][str(length)] = record
            method_rows.append(
                _row(
                    task,
                    label,
                    implementation,
                    context_length=length,
                    metric=spec.metric,
                    quality=spec.quality(record),
                    density=record["attention"]["density"],
                    seconds=record["seconds"],
                    tokens=spec.tokens(record),
                    peak=record["peak_memory_mib"],
                    device=device_name,
                )
            )
        if spec.overall_row:
            method_rows.append(_overall_row(method_rows))
        rows.extend(method_rows)
    return rows, records


def _warm_up(model: nn.Module, length: int) -> None:
    """One forward pass of ``length`` tokens outside the timed span: kernels compile and autotune for that length
    bucket, and first-call allocations happen, for every method alike."""
    parameter = next(model.parameters())
    input_ids = torch.zeros(1, length, dtype=torch.long, device=parameter.device)
    with torch.no_grad():
        model(input_ids=input_ids, use_cache=False)


def _overall_row(rows: list[dict]) -> dict:
    """One row over every context length: mean quality (each length has as many cases), summed time and tokens."""
    densities = [row["density"] for row in rows]
    tokens = sum(row["tokens"] for row in rows)
    peaks = [row["peak_memory_mib"] for row in rows if row["peak_memory_mib"] is not None]
    first = rows[0]
    label = first["method"] if first["setting"] is None else f"{first['method']}:{first['setting']}"
    return _row(
        first["task"],
        label,
        first["implementation"],
        context_length=None,
        metric=first["quality_metric"],
        quality=sum(row["quality"] for row in rows) / len(rows),
        density=None if None in densities else sum(d * row["tokens"] for d, row in zip(densities, rows)) / tokens,
        seconds=sum(row["seconds"] for row in rows),
        tokens=tokens,
        peak=max(peaks) if peaks else None,
        device=first["device"],
    )


def _check_context_lengths(model: nn.Module, lengths: list[int]) -> None:
    """Before any run: a length past the model's positions would otherwise fail only when its turn comes."""
    if not lengths:
        raise ValueError("no context lengths given")
    maximum = model_max_length(model)
    too_long = [length for length in lengths if maximum is not None and length > maximum]
    if too_long:
        raise ValueError(f"context length(s) {too_long} exceed the model's maximum of {maximum} positions")
    if min(lengths) < 2:
        raise ValueError(f"context lengths must be at least 2 tokens, got {min(lengths)}")


# --------------------------------------------------------------------------------------------------------------------
# Encoders: fidelity against a dense copy
# --------------------------------------------------------------------------------------------------------------------


def _run_encoder(settings, labels, text_name, text_file, seed, device, dtype, progress) -> tuple[list, dict]:
    names = settings["model"]
    names = [names] if isinstance(names, (str, os.PathLike, tuple)) else list(names)
    loaded = [_load(name, device, dtype) for name in names]
    text_models = [(model, tokenizer) for model, tokenizer in loaded if _is_tokenizer(tokenizer)]
    vision_models = [(model, preprocess) for model, preprocess in loaded if not _is_tokenizer(preprocess)]
    if len(text_models) > 1 or len(vision_models) > 1:
        raise ValueError("encoder takes at most one text model and one vision model")
    for model, preprocess in vision_models:
        if not callable(preprocess) or _is_image_processor(preprocess):
            raise ValueError(
                f"{type(model).__name__}: vision fidelity needs the dinov2-s asset's preprocessing; pass a text "
                "encoder with a tokenizer, or dinov2-s"
            )
    checks = []  # (run name, model, check(model, reference) -> record)
    if text_models:
        checks.extend(_text_checks(*text_models[0], load_eval_text(text_name, text_file), settings, seed))
    if vision_models:
        checks.extend(_vision_checks(*vision_models[0], settings, seed))

    references = {id(model): _dense_copy(model) for model, _ in loaded}
    rows, records = [], {}
    for label in _methods_bar(labels, progress):
        records[label] = {}
        for run_name, model, check in checks:
            with _attention(model, label, settings["method_config"]):
                implementation = model.config._attn_implementation
                record = check(model, references[id(model)])
            records[label][run_name] = record
            for result in _encoder_results(run_name, record):
                rows.append(_row("encoder", label, implementation, device=_device_name(model), **result))
    return rows, records


def _text_checks(model, tokenizer, text: str, settings: dict, seed: int) -> list:
    sentences = _split_sentences(text)
    held_out = _sample_sentences(sentences, settings["sentences"], seed)
    queries, documents = _retrieval_pairs(sentences, settings["retrieval_documents"])

    def check(model, reference):
        record = embedding_fidelity(
            model,
            reference,
            tokenizer,
            held_out,
            queries=queries,
            documents=documents,
            relevant_index=list(range(len(queries))),
        )
        # What the model embedded, in tokens, for the rows' speed (the records count sentences).
        record["tokens"] = _text_tokens(tokenizer, held_out)
        record["retrieval"]["model"]["tokens"] = _text_tokens(tokenizer, [*queries, *documents])
        return record

    return [("embedding", model, check)]


def _vision_checks(model, preprocess, settings: dict, seed: int) -> list:
    test_images, test_labels = load_fashion_mnist("test")
    train_images, train_labels = load_fashion_mnist("train")
    rng = random.Random(seed)
    shown = rng.sample(range(len(test_images)), settings["images"])
    knn_train = rng.sample(range(len(train_images)), settings["knn_train"])
    knn_test = rng.sample(range(len(test_images)), settings["knn_test"])

    def pixels(images: torch.Tensor, indices: list[int], size: int) -> torch.Tensor:
        return preprocess([images[index].numpy() for index in indices], size)

    checks = []
    for size in settings["image_sizes"]:
        shown_pixels = pixels(test_images, shown, size)
        checks.append((f"vision_{size}", model, functools.partial(vision_fidelity, pixel_values=shown_pixels)))

    knn_size = settings["knn_image_size"]
    knn_inputs = {
        "train_images": pixels(train_images, knn_train, knn_size),
        "train_labels": train_labels[knn_train],
        "test_images": pixels(test_images, knn_test, knn_size),
        "test_labels": test_labels[knn_test],
    }

    def knn(model, reference):
        record = knn_fidelity(model, reference, **knn_inputs, k=settings["k"])
        record["image_size"] = knn_size
        record["tokens_per_image"] = _prefix_tokens(model) + (knn_size // model.config.patch_size) ** 2
        return record

    checks.append(("knn", model, knn))
    return checks


def _encoder_results(run_name: str, record: dict) -> list[dict]:
    """The row fields each encoder record gives: its metric(s), quality, time, tokens, sequence length, memory."""
    model_run = {
        "density": record["attention"]["model"]["density"],
        "seconds": record["timing"]["model"]["seconds"],
        "peak": record["timing"]["model"]["peak_memory_mib"],
    }
    if run_name == "embedding":
        retrieval = record["retrieval"]["model"]
        return [
            {
                "metric": "embedding_cosine_mean",
                "quality": record["cosine"]["mean"],
                "tokens": record["tokens"],
                "context_length": None,
                **model_run,
            },
            {
                "metric": "retrieval_top1_accuracy",
                "quality": retrieval["top1_accuracy"],
                "tokens": retrieval["tokens"],
                "context_length": None,
                "density": retrieval["attention"]["density"],
                "seconds": retrieval["seconds"],
                "peak": retrieval["peak_memory_mib"],
            },
        ]
    if run_name == "knn":
        tokens = (record["train_images"] + record["test_images"]) * record["tokens_per_image"]
        return [
            {
                "metric": "knn_accuracy",
                "quality": record["accuracy"],
                "tokens": tokens,
                "context_length": record["tokens_per_image"],
                **model_run,
            }
        ]
    size, length = record["image_size"][0], record["tokens"]
    return [
        {
            "metric": f"{part}_cosine_mean_{size}",
            "quality": record[f"{part}_cosine"]["mean"],
            "tokens": record["images"] * length,
            "context_length": length,
            **model_run,
        }
        for part in ("cls", "patch")
    ]


def _dense_copy(model: nn.Module) -> nn.Module:
    """The reference: a deep copy (own config, own weights) with transformers' SDPA attention."""
    reference = copy.deepcopy(model)
    reference.set_attn_implementation("sdpa")
    return reference


def _split_sentences(text: str) -> list[str]:
    return [s for s in re.split(r"(?<=[.!?])\s+", " ".join(text.split())) if len(s.split()) >= 5]


def _sample_sentences(sentences: list[str], count: int, seed: int) -> list[str]:
    """``count`` sentences of at most 60 words, drawn with ``seed``, in text order."""
    candidates = [s for s in sentences if len(s.split()) <= 60]
    if not 1 <= count <= len(candidates):
        raise ValueError(f"sentences must be between 1 and {len(candidates)} for this text, got {count}")
    return [candidates[i] for i in sorted(random.Random(seed).sample(range(len(candidates)), count))]


def _retrieval_pairs(sentences: list[str], count: int) -> tuple[list[str], list[str]]:
    """Query ``i`` is a sentence, document ``i`` the few sentences that follow it; passages spread over the text."""
    step = len(sentences) // max(count, 1)
    if count < 2 or step < _RETRIEVAL_PASSAGE + 1:
        limit = len(sentences) // (_RETRIEVAL_PASSAGE + 1)
        raise ValueError(f"retrieval_documents must be between 2 and {limit} for this text, got {count}")
    starts = [index * step for index in range(count)]
    queries = [sentences[start] for start in starts]
    documents = [" ".join(sentences[start + 1 : start + 1 + _RETRIEVAL_PASSAGE]) for start in starts]
    return queries, documents


def _text_tokens(tokenizer, texts: list[str]) -> int:
    return sum(len(ids) for ids in tokenizer(texts, truncation=True)["input_ids"])


def _is_tokenizer(preprocessor) -> bool:
    return isinstance(preprocessor, PreTrainedTokenizerBase)


def _is_image_processor(preprocessor) -> bool:
    return isinstance(preprocessor, ImageProcessingMixin)


# --------------------------------------------------------------------------------------------------------------------
# Shared: methods, loading, rows, outputs
# --------------------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _attention(model: nn.Module, label: str, method_config: dict[str, dict]) -> Iterator[None]:
    """Run ``model`` with the method ``label`` inside the block; the model's attention is restored afterwards."""
    name, label_settings, _ = split_label(label)
    builtin = _BUILTIN_ATTENTION.get(name)
    if builtin is None:
        config = {**method_config.get(name.removeprefix("fastattn_"), {}), **label_settings}
        with use(model, name, **config):
            yield
        return
    previous = model.config._attn_implementation
    model.set_attn_implementation(builtin)
    try:
        yield
    finally:
        model.set_attn_implementation(previous)


def _check_task(task: str) -> None:
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; valid tasks: {', '.join(TASKS)}")


def _check_methods(methods: Sequence[str]) -> list[str]:
    labels = [methods] if isinstance(methods, str) else list(methods)
    if not labels:
        raise ValueError(f"no methods given; valid methods: {', '.join(method_labels())}")
    valid = method_labels()
    unknown = [label for label in labels if split_label(label)[0] not in valid]
    if unknown:
        raise ValueError(f"unknown method(s) {', '.join(unknown)}; valid methods: {', '.join(valid)}")
    with_settings = [label for label in labels if split_label(label)[0] in _BUILTIN_ATTENTION and ":" in label]
    if with_settings:
        raise ValueError(f"transformers' own attention takes no settings: {', '.join(with_settings)}")
    repeated = sorted({label for label in labels if labels.count(label) > 1})
    if repeated:
        raise ValueError(f"method(s) {', '.join(repeated)} given more than once")
    return labels


def split_label(label: str) -> tuple[str, dict, str | None]:
    """``"bsfa:k=16:thresholds=a/b"`` -> ``("bsfa", {"k": 16, "thresholds": "a/b"}, "k=16:thresholds=a/b")``.

    Values that read as numbers (``16``, ``0.5``, ``-inf``) become numbers; everything else stays a string.
    """
    name, _, setting = label.partition(":")
    settings = {}
    for item in filter(None, setting.split(":")):
        key, equals, value = item.partition("=")
        if not equals or not key:
            raise ValueError(f"method setting {item!r} in {label!r} is not key=value")
        settings[key] = _setting_value(value)
    return name, settings, setting or None


def _setting_value(text: str) -> int | float | str:
    for parse in (int, float):
        try:
            return parse(text)
        except ValueError:
            continue
    return text


def load_eval_text(name: str, path: str | os.PathLike | None = None) -> str:
    """The held-out text: the file at ``path`` if given (UTF-8, not empty), else the text asset ``name``."""
    if path is None:
        return load_text(name, "eval")
    with open(path, encoding="utf-8") as handle:
        text = handle.read()
    if not text.strip():
        raise ValueError(f"text file {path} is empty")
    return text


def _load(model, device, dtype) -> tuple[nn.Module, object]:
    """An asset name, folder or hub id loaded onto ``device``; a loaded ``(model, preprocessor)`` pair as it is."""
    if isinstance(model, tuple):
        return model
    return load_model(model, dtype=dtype, device=device)


def _describe_models(model) -> str | list[str]:
    """What the JSON records as the model: its name, or a loaded model's class and source."""
    if isinstance(model, list):
        return [_describe_models(item) for item in model]
    if isinstance(model, tuple):
        module = model[0]
        return f"{type(module).__name__} ({getattr(module.config, '_name_or_path', '') or 'in memory'})"
    return os.fspath(model)


def _device_name(model: nn.Module) -> str:
    device = next(model.parameters()).device
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def _methods_bar(labels: list[str], progress: bool) -> Iterator[str]:
    """The method loop, with a bar over the methods above the harnesses' own bars."""
    bar = tqdm(labels, desc="methods", unit="method", disable=not progress)
    for label in bar:
        bar.set_postfix_str(label)
        yield label


def _row(task, label, implementation, *, context_length, metric, quality, density, seconds, tokens, peak, device):
    method, _, setting = split_label(label)
    return {
        "task": task,
        "method": method,
        "setting": setting,
        "implementation": implementation,
        "context_length": context_length,
        "quality_metric": metric,
        "quality": float(quality),
        "density": density,
        "seconds": seconds,
        "tokens": int(tokens),
        "tokens_per_second": tokens / seconds if seconds else None,
        "peak_memory_mib": peak,
        "device": device,
    }


def summary_table(rows: list[dict], env: dict) -> str:
    """Markdown: a line with the versions and device (and process count, if several), then one row per result row."""
    processes = f" × {env['processes']} processes" if env.get("processes", 1) > 1 else ""
    header = (
        f"hf_fastattn {env['hf_fastattn']} · torch {env['torch']} · triton {env['triton'] or 'n/a'} · "
        f"transformers {env['transformers']} · {env['gpu']}{processes} · {env['date']}"
    )
    lines = [
        header,
        "",
        "| method | setting | ctx | quality metric | quality | density | seconds | tokens/s | peak MiB | device |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        cells = [
            row["method"],
            row["setting"] or "",
            _context(row),
            row["quality_metric"],
            f"{row['quality']:.6g}",
            _number(row["density"], ".3f"),
            _number(row["seconds"], ".2f"),
            _number(row["tokens_per_second"], ".0f"),
            _number(row["peak_memory_mib"], ".0f"),
            row["device"],
        ]
        lines.append("| " + " | ".join(str(cell) for cell in cells) + " |")
    return "\n".join(lines)


def _context(row: dict) -> str:
    """The ctx cell: no length is the row over every length, or for encoders, texts of varying length."""
    if row["context_length"] is not None:
        return str(row["context_length"])
    return "-" if row["task"] == "encoder" else "all"


def _number(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def _save_plots(task: str, rows: list[dict], records: dict, output_dir: Path) -> None:
    if task == "niah":
        grids = {label: _merged_grid(list(by_length.values())) for label, by_length in records.items()}
        baseline = next((label for label in grids if _BUILTIN_ATTENTION.get(label) == "sdpa"), None)
        for label, grid in grids.items():
            title = f"Needle in a haystack: {label}"
            if baseline is not None and label != baseline:
                title += f" ({baseline}: {grids[baseline]['mean_score']:.2f})"
            file_label = re.sub(r"[^\w.-]+", "_", label)  # settings may hold paths and '='; keep names portable
            save_heatmap(grid, output_dir / f"needle_{file_label}.png", title=title)
    if task == "ppl":
        save_perplexity_plot(rows, output_dir / "perplexity_vs_context.png")
    pareto_rows, label = _pareto_rows(task, rows)
    save_pareto_plot(
        pareto_rows,
        output_dir / "pareto.png",
        quality_label=label,
        title=f"{task}: quality against speed",
        higher_is_better=task != "ppl",
    )


def _pareto_rows(task: str, rows: list[dict]) -> tuple[list[dict], str]:
    """The rows of one quality metric to plot against speed: the overall rows, the longest perplexity window, or the
    encoder's longest-sequence check (vision at the largest size, else the text embeddings)."""
    if task == "ppl":
        longest = max(row["context_length"] for row in rows)
        chosen = [row for row in rows if row["context_length"] == longest]
        return chosen, f"perplexity at {longest} tokens"
    if task == "encoder":
        sizes = [
            int(row["quality_metric"].removeprefix("cls_cosine_mean_"))
            for row in rows
            if row["quality_metric"].startswith("cls_cosine_mean_")
        ]
        metric = f"cls_cosine_mean_{max(sizes)}" if sizes else "embedding_cosine_mean"
        return [row for row in rows if row["quality_metric"] == metric], metric
    chosen = [row for row in rows if row["context_length"] is None]
    return chosen, chosen[0]["quality_metric"]


def _merged_grid(records: list[dict]) -> dict:
    """One needle record over every context length (the suite runs one length at a time), for the heatmap."""
    cells = [cell for record in records for cell in record["cells"]]
    score = sum(cell["correct"] for cell in cells) / sum(cell["trials"] for cell in cells)
    return {**records[0], "cells": cells, "mean_score": score}
