"""``calibrate_bsfa`` on a tiny random Llama: threshold tables, measured skip fractions, target-skip mode, artifacts.

Windows of 96 token ids with 16 x 16 tiles: query tile m (0-5) of a causal window visits key tiles 0..m, of which the
first and the diagonal are always kept, so it has ``max(0, m - 1)`` skippable tiles (10 per head in all). Expected
thresholds and fractions are recomputed here from the tile maxima of the captured queries and keys.
"""

from __future__ import annotations

import copy
import json
import logging

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

import hf_fastattn
import hf_fastattn.methods.bsfa as bsfa_method
from hf_fastattn import ArtifactError
from hf_fastattn.artifacts import CONFIG_NAME, TENSORS_NAME
from hf_fastattn.calibration import BsfaCalibration, calibrate_bsfa, token_windows
from hf_fastattn.calibration.bsfa import TARGET_SKIP_K, _pick_k
from hf_fastattn.evaluation.records import attention_summary
from hf_fastattn.ops.bsfa import bsfa_attention_reference

pytestmark = pytest.mark.skipif(
    torch.cuda.is_available(), reason="fp32 tiny models run the kernels only on the CPU interpreter"
)

SEQ, BLOCK = 96, 16
TILES = SEQ // BLOCK
K = (1, 2, 4)
SKIPPABLE = [max(0, m - 1) for m in range(TILES)]  # per query tile, per head
VOCAB = 128
NEG_INF = float("-inf")


def llama_config(**overrides) -> LlamaConfig:
    fields = {
        "vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 128, "initializer_range": 0.2,
    }  # fmt: skip
    return LlamaConfig(**{**fields, **overrides})


CONFIG = llama_config()
LAYERS, HEADS = CONFIG.num_hidden_layers, CONFIG.num_attention_heads
IDS = torch.randint(3, VOCAB, (3, SEQ), generator=torch.Generator().manual_seed(7))


def tiny_llama(config=CONFIG):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation="sdpa").eval()
    assert model.config._attn_implementation == "sdpa"
    return model


class Capture:
    """Records every call of the BSFA kernel through the method: (query, key, thresholds, result)."""

    def __init__(self, monkeypatch):
        self.calls = []
        real = bsfa_method.bsfa_attention

        def wrapper(query, key, value, thresholds, **kwargs):
            result = real(query, key, value, thresholds, **kwargs)
            self.calls.append({"query": query, "key": key, "value": value, "thresholds": thresholds,
                               "kwargs": kwargs, "result": result})  # fmt: skip
            return result

        monkeypatch.setattr(bsfa_method, "bsfa_attention", wrapper)


def reference_tile_max(call) -> torch.Tensor:
    """(H, M, N) tile maxima of one captured single-window call, recomputed by the PyTorch reference."""
    kwargs = {**call["kwargs"], "record_tile_max": True}
    return bsfa_attention_reference(call["query"], call["key"], call["value"], NEG_INF, **kwargs).tile_max[0]


def window_thresholds(tile_max: torch.Tensor, k: int) -> torch.Tensor:
    """(H, M): per query tile, the midpoint between the k-th and (k+1)-th largest maxima of its skippable tiles
    (key tiles 1..m-1), or -inf when it has k or fewer."""
    out = torch.full(tile_max.shape[:2], NEG_INF)
    for m in range(TILES):
        if SKIPPABLE[m] > k:
            largest = tile_max[:, m, 1:m].sort(dim=-1, descending=True).values
            out[:, m] = (largest[:, k - 1] + largest[:, k]) / 2
    return out


def counted_skips(tile_max: torch.Tensor, thresholds: torch.Tensor) -> int:
    """Skippable tiles of one window below their query tile's threshold (``thresholds`` (H, M))."""
    return sum(int((tile_max[:, m, 1:m] < thresholds[:, m, None]).sum()) for m in range(TILES))


# --------------------------------------------------------------------------------------------------------------------
# Fixtures: calibrations shared by the module (each costs two passes over its windows)
# --------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """One window (samples=1), saved with ``output_dir``: the thresholds are that window's own."""
    model = tiny_llama()
    directory = tmp_path_factory.mktemp("bsfa") / "artifact"
    calibration = calibrate_bsfa(
        model, IDS, k=K, samples=1, sequence_length=SEQ, block_m=BLOCK, block_n=BLOCK, output_dir=directory,
        progress=False,
    )  # fmt: skip
    # Calibration leaves the model as it found it.
    assert model.config._attn_implementation == "sdpa" and hf_fastattn.layer_states(model) == []
    return model, calibration, directory


@pytest.fixture(scope="module")
def averaged():
    """Two windows, mean aggregation, with every kernel call captured."""
    model = tiny_llama()
    monkeypatch = pytest.MonkeyPatch()
    capture = Capture(monkeypatch)
    try:
        calibration = calibrate_bsfa(
            model, IDS, k=K, samples=2, sequence_length=SEQ, block_m=BLOCK, block_n=BLOCK, progress=False
        )
    finally:
        monkeypatch.undo()
    return model, calibration, capture.calls


# --------------------------------------------------------------------------------------------------------------------
# Tables and skip fractions
# --------------------------------------------------------------------------------------------------------------------


def test_tables_shape_and_keep_all_rows(single):
    _, calibration, _ = single
    assert isinstance(calibration, BsfaCalibration)
    assert calibration.k_values == list(K) and (calibration.block_m, calibration.block_n) == (BLOCK, BLOCK)
    assert sorted(calibration.tables) == list(range(LAYERS))
    for table in calibration.tables.values():
        assert table.shape == (len(K), HEADS, TILES) and table.dtype == torch.float32
        for i, k in enumerate(K):
            keep_all = torch.tensor([SKIPPABLE[m] <= k for m in range(TILES)])
            assert torch.equal(torch.isneginf(table[i]), keep_all.expand(HEADS, -1)), f"k={k}"
            assert torch.isfinite(table[i][:, ~keep_all]).all()
    # Default mode: the middle k for every layer.
    assert calibration.layer_k == {index: K[1] for index in range(LAYERS)}
    assert calibration.details["samples"] == 1 and calibration.details["data"] == "token ids"


def test_single_window_skip_fraction_is_exact(single):
    """With one window its own midpoints keep exactly the top k skippable tiles of each query tile."""
    _, calibration, _ = single
    total = sum(SKIPPABLE)
    expected = [sum(s - min(k, s) for s in SKIPPABLE) / total for k in K]  # 6/10, 3/10, 0
    for index in range(LAYERS):
        assert calibration.skip_fraction[index] == pytest.approx(expected)
        assert calibration.skip_fraction[index] == sorted(calibration.skip_fraction[index], reverse=True)


def test_thresholds_and_fractions_from_the_tile_maxima(averaged):
    """The table is the mean over windows of each window's midpoints; the measured fraction is the share of skippable
    tiles below it, both recomputed from the reference's tile maxima of the captured calls."""
    _, calibration, calls = averaged
    # Pass 1 then pass 2, each window through every layer.
    assert len(calls) == 2 * 2 * LAYERS
    assert all(call["kwargs"]["record_tile_max"] for call in calls)
    first_pass = calls[: 2 * LAYERS]
    for index in range(LAYERS):
        maxima = [reference_tile_max(call) for call in first_pass[index::LAYERS]]
        torch.testing.assert_close(first_pass[index]["result"].tile_max[0], maxima[0], rtol=1e-5, atol=1e-5)
        table = calibration.tables[index]
        fractions = []
        for i, k in enumerate(K):
            expected = torch.stack([window_thresholds(tm, k) for tm in maxima]).mean(dim=0)
            torch.testing.assert_close(table[i], expected, rtol=1e-4, atol=1e-4)
            fractions.append(sum(counted_skips(tm, table[i]) for tm in maxima) / (2 * HEADS * sum(SKIPPABLE)))
        assert calibration.skip_fraction[index] == pytest.approx(fractions)
        assert fractions == sorted(fractions, reverse=True), "the skip fraction must not grow with k"


def test_single_window_run_keeps_exactly_k_tiles(single, monkeypatch):
    """BSFA with the window's own thresholds, on that window: every query tile keeps min(k, skippable) skippable tiles
    (kernel and reference counts). Layer 0 sees the same inputs whatever the later layers do; layer 1 is checked with
    layer 0 kept dense, as during calibration. (k=4 keeps every tile of a 96-token window: see the table test.)"""
    model, calibration, _ = single
    window = IDS[:1]
    for index, k in [(0, 1), (1, 2)]:
        layers = {0: ("bsfa", {"thresholds": NEG_INF})} if index == 1 else None
        capture = Capture(monkeypatch)
        config = {"thresholds": calibration, "k": k, "block_m": BLOCK, "block_n": BLOCK}
        with hf_fastattn.use(model, "bsfa", layers=layers, **config), torch.no_grad():
            model(input_ids=window, use_cache=False)
        call = capture.calls[index]
        reference = bsfa_attention_reference(
            call["query"], call["key"], call["value"], call["thresholds"], **call["kwargs"]
        )
        stats = call["result"].stats
        assert torch.equal(stats, reference.stats)
        skippable, skipped = stats[0, :, :, 1], stats[0, :, :, 2]
        assert torch.equal(skippable, torch.tensor(SKIPPABLE, dtype=torch.int32).expand(HEADS, -1))
        assert torch.equal(skippable - skipped, skippable.clamp(max=k)), f"layer {index}, k={k}"


def test_target_skip_picks_k_per_layer(single):
    """Target-skip mode (default fine k grid): the largest k whose measured fraction reaches the target."""
    model, _, _ = single
    calibration = calibrate_bsfa(
        model, IDS, samples=1, sequence_length=SEQ, target_skip=0.25, block_m=BLOCK, block_n=BLOCK, progress=False
    )
    assert calibration.k_values == sorted(TARGET_SKIP_K)
    for index in range(LAYERS):
        fractions = dict(zip(calibration.k_values, calibration.skip_fraction[index]))
        assert fractions[2] == pytest.approx(0.3) and fractions[3] == pytest.approx(0.1)
        assert calibration.layer_k[index] == 2
    assert calibration.details["target_skip"] == 0.25


def test_unreachable_target_warns_and_keeps_fewest(caplog):
    with caplog.at_level(logging.WARNING, logger="hf_fastattn"):
        assert _pick_k([1, 2, 4], [0.6, 0.3, 0.0], 0.7, 3) == 1
    [record] = [r for r in caplog.records if r.name == "hf_fastattn"]
    assert "layer 3" in record.getMessage() and "60.0%" in record.getMessage() and "70.0%" in record.getMessage()
    assert _pick_k([1, 2, 4], [0.6, 0.3, 0.0], 0.3, 0) == 2
    assert _pick_k([1, 2, 4], [0.6, 0.3, 0.0], None, 0) == 2


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"aggregate": "max"}, "aggregate must be 'mean' or 'median'"),
        ({"target_skip": 1.5}, r"target_skip must be a fraction in \(0, 1\)"),
        ({"target_skip": 0.0}, r"target_skip must be a fraction in \(0, 1\)"),
        ({"k": 0}, "k counts kept tiles and must be >= 1"),
        ({"k": [4, -1]}, "k counts kept tiles and must be >= 1"),
        ({"samples": 4}, "fewer than samples x length"),
        ({"sequence_length": 15, "block_m": 16}, "sequence_length=15 is shorter than one query tile"),
        ({"block_m": 128}, f"sequence_length={SEQ} is shorter than one query tile \\(block_m=128\\)"),
    ],
    ids=["aggregate", "target-high", "target-zero", "k-zero", "k-negative", "too-few-tokens", "short", "long-tile"],
)
def test_calibrate_argument_errors(kwargs, message):
    model = tiny_llama()
    base = {"samples": 1, "sequence_length": SEQ, "block_m": BLOCK, "block_n": BLOCK, "progress": False}
    with pytest.raises(ValueError, match=message):
        calibrate_bsfa(model, IDS, **{**base, **kwargs})
    assert hf_fastattn.layer_states(model) == []


# --------------------------------------------------------------------------------------------------------------------
# Artifacts
# --------------------------------------------------------------------------------------------------------------------


def run(model, ids=IDS[1:2]):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def installed_tables(model) -> dict[int, torch.Tensor]:
    return {state.layer_index: state.threshold_table for state in hf_fastattn.layer_states(model)}


def test_artifact_round_trip(single):
    model, calibration, directory = single
    config = json.loads((directory / CONFIG_NAME).read_text())
    assert config["metadata"]["k_values"] == list(K) and config["metadata"]["block_m"] == BLOCK
    assert config["metadata"]["layer_k"] == {str(i): K[1] for i in range(LAYERS)}
    assert config["metadata"]["calibration_skip_fraction"]["0"] == pytest.approx(calibration.skip_fraction[0])

    with hf_fastattn.use(model, "bsfa", thresholds=calibration):
        expected = run(model)
        expected_density = attention_summary(model)["density"]
    assert expected_density < 1.0, "the calibrated thresholds should skip tiles on these inputs"

    from_directory = hf_fastattn.patch(tiny_llama(), "bsfa", thresholds=directory)
    loaded = hf_fastattn.load_state(tiny_llama(), directory)
    for other in (from_directory, loaded):
        assert other.config._attn_implementation == "fastattn_bsfa"
        tables = installed_tables(other)
        assert sorted(tables) == list(range(LAYERS))
        for index, table in tables.items():
            assert torch.equal(table, calibration.tables[index])
        for state in hf_fastattn.layer_states(other):
            assert state.config["k"] == K[1] and (state.config["block_m"], state.config["block_n"]) == (BLOCK, BLOCK)
            assert torch.equal(state.thresholds, calibration.tables[state.layer_index][1])
        torch.testing.assert_close(run(other), expected, atol=0, rtol=0)
        assert attention_summary(other)["density"] == expected_density

    # Another calibrated k from the same artifact, for every layer; k="layer" is each layer's own (the default).
    k4 = hf_fastattn.patch(tiny_llama(), "bsfa", thresholds=directory, k=4)
    assert all(torch.equal(s.thresholds, calibration.tables[s.layer_index][2]) for s in hf_fastattn.layer_states(k4))
    own = hf_fastattn.patch(tiny_llama(), "bsfa", thresholds=directory, k="layer")
    assert [s.config["k"] for s in hf_fastattn.layer_states(own)] == [calibration.layer_k[i] for i in range(LAYERS)]


def test_artifact_for_another_model_is_refused(single):
    _, calibration, directory = single
    other = tiny_llama(llama_config(num_hidden_layers=3))
    with pytest.raises(ArtifactError, match="made for a different model"):
        hf_fastattn.patch(other, "bsfa", thresholds=directory)
    with pytest.raises(ArtifactError, match="made for a different model"):
        hf_fastattn.load_state(other, directory)
    with pytest.raises(ArtifactError, match="calibrated for a model of other shapes"):
        hf_fastattn.patch(other, "bsfa", thresholds=calibration)


@pytest.mark.parametrize("name", ["block_m", "block_n"])
def test_artifact_for_another_tile_shape_is_refused(single, name):
    _, calibration, directory = single
    for source in (directory, calibration):
        with pytest.raises(ArtifactError, match=f"calibrated with {name}=16, but {name}=32 was requested"):
            hf_fastattn.patch(tiny_llama(), "bsfa", thresholds=source, **{name: 32})


def test_uncalibrated_k_is_refused(single):
    _, calibration, directory = single
    for source in (directory, calibration):
        with pytest.raises(ValueError, match=r"k=3 was not calibrated for layer 0; calibrated k: \[1, 2, 4\]"):
            hf_fastattn.patch(tiny_llama(), "bsfa", thresholds=source, k=3)


def copy_artifact(directory, tmp_path):
    target = tmp_path / "copy"
    target.mkdir()
    for name in (CONFIG_NAME, TENSORS_NAME):
        (target / name).write_bytes((directory / name).read_bytes())
    return target


def test_damaged_artifacts_are_refused(single, tmp_path):
    _, _, directory = single
    truncated = copy_artifact(directory, tmp_path)
    data = (truncated / TENSORS_NAME).read_bytes()
    (truncated / TENSORS_NAME).write_bytes(data[: len(data) // 2])
    with pytest.raises(ArtifactError, match="cannot be read"):
        hf_fastattn.patch(tiny_llama(), "bsfa", thresholds=truncated)
    (truncated / TENSORS_NAME).unlink()
    with pytest.raises(ArtifactError, match=f"{TENSORS_NAME} is missing"):
        hf_fastattn.patch(tiny_llama(), "bsfa", thresholds=truncated)
    with pytest.raises(ArtifactError, match="is missing"):
        hf_fastattn.patch(tiny_llama(), "bsfa", thresholds=tmp_path / "no_such_directory")


def test_artifact_of_another_method_is_refused(tmp_path):
    dense = hf_fastattn.patch(tiny_llama(), "dense")
    hf_fastattn.layer_states(dense)[0].set_tensor("thresholds", torch.zeros(HEADS, 1))
    directory = hf_fastattn.save_state(dense, tmp_path / "dense")
    with pytest.raises(ArtifactError, match="holds no BSFA thresholds"):
        hf_fastattn.patch(tiny_llama(), "bsfa", thresholds=directory)
    # A BSFA artifact of one constant threshold has no calibrated tables to choose k from.
    constant = hf_fastattn.patch(tiny_llama(), "bsfa", thresholds=0.5, block_m=BLOCK, block_n=BLOCK)
    directory = hf_fastattn.save_state(constant, tmp_path / "constant")
    with pytest.raises(ArtifactError, match="has no BSFA threshold table for layer 0"):
        hf_fastattn.patch(tiny_llama(), "bsfa", thresholds=directory)


# --------------------------------------------------------------------------------------------------------------------
# token_windows
# --------------------------------------------------------------------------------------------------------------------


class WordTokenizer:
    """One id per whitespace-separated word (its length), as a tokenizer's ``__call__`` returns them."""

    def __call__(self, text, add_special_tokens=True, verbose=True):
        return {"input_ids": [len(word) for word in text.split()]}


def test_token_windows_from_ids_and_texts():
    ids = torch.arange(50)
    windows, source = token_windows(ids.reshape(5, 10), None, samples=3, length=12)
    assert source == "token ids" and windows.dtype == torch.long
    assert torch.equal(windows, ids[:36].reshape(3, 12))
    texts = ["a bb ccc", "dddd eeeee f", "unused"]
    windows, source = token_windows(texts, WordTokenizer(), samples=2, length=3)
    assert source == "3 texts" and windows.tolist() == [[1, 2, 3], [4, 5, 1]]


@pytest.mark.parametrize(
    ("dataset", "tokenizer", "error", "message"),
    [
        (torch.arange(20), None, ValueError, "token ids has 20 tokens, fewer than samples x length = 2 x 12"),
        (["some text to encode"], None, ValueError, "text needs a tokenizer"),
        (["too short"], WordTokenizer(), ValueError, "has 2 tokens, fewer than"),
        (42, None, TypeError, "dataset must be 'default'.*got int"),
        ({"text": ["a"]}, None, TypeError, "got dict"),
        (["text", 3], WordTokenizer(), TypeError, "got list"),
    ],
    ids=["few-ids", "no-tokenizer", "few-tokens", "int", "dict", "mixed-list"],
)
def test_token_windows_errors(dataset, tokenizer, error, message):
    with pytest.raises(error, match=message):
        token_windows(dataset, tokenizer, samples=2, length=12)


def test_token_windows_needs_a_sample():
    with pytest.raises(ValueError, match="at least one sample"):
        token_windows(torch.arange(20), None, samples=0, length=4)
