"""``calibrate_seer_budgets`` on a tiny random Llama: weights from a brute-force model-wide budget, the artifact, the
interpolation, and the per-head budgets the method then applies.

Windows of 96 token ids in blocks of 16 with ``sink_blocks=0``: query block m of a causal window sees key blocks 0..m,
the diagonal is always kept, so each (layer, KV head) has 15 free blocks out of 21 visible. Expected weights are
recomputed here from the ground-truth block maps the method produced during calibration, with Python sorting.
"""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch
from method_helpers import rewrite_artifact_config
from transformers import AutoModelForCausalLM, LlamaConfig

import hf_fastattn
from hf_fastattn import ArtifactError, SeerBudgets, calibrate_seer_budgets
from hf_fastattn.methods import seer
from hf_fastattn.ops.seer import selection_mask

pytestmark = pytest.mark.skipif(
    torch.cuda.is_available(), reason="fp32 tiny models run the kernels only on the CPU interpreter"
)

SEQ, BLOCK = 96, 16
NB = SEQ // BLOCK
VISIBLE = NB * (NB + 1) // 2  # 21
FREE = [(m, n) for m in range(NB) for n in range(m)]  # below the diagonal: 15
GEOMETRY = {"block_size": BLOCK, "sink_blocks": 0, "local_blocks": 1}
GRID = (0.0, 0.3, 0.5, 0.8)
CONFIG = LlamaConfig(
    vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=128, initializer_range=0.2,
)  # fmt: skip
LAYERS, KV_HEADS = CONFIG.num_hidden_layers, CONFIG.num_key_value_heads
IDS = torch.randint(3, 128, (2, SEQ), generator=torch.Generator().manual_seed(3))


def tiny_llama(config=CONFIG):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation="sdpa").eval()
    assert model.config._attn_implementation == "sdpa"
    return model


def uniform_need(sparsity: float) -> int:
    return max(0, min(len(FREE), math.ceil((1 - sparsity) * VISIBLE - 1e-9) - NB))


@pytest.fixture(scope="module")
def calibrated():
    """``(model, budgets, targets)``: targets[w][l] is layer l's ground-truth map ``(1, H_kv, NB, NB)`` in window w."""
    model = tiny_llama()
    targets = []
    real = seer.normalise_target

    def recording(target, heads):
        out = real(target, heads)
        if len(targets[-1]) == LAYERS:
            raise AssertionError("more target maps than layers in one window")
        targets[-1].append(out.clone())
        return out

    seer.normalise_target = recording
    try:
        windows = [row[None] for row in IDS]
        budgets = None
        for window in windows:  # one call per window so that the recording knows where a window starts
            targets.append([])
            single = calibrate_seer_budgets(
                model, window, samples=1, sequence_length=SEQ, sparsities=GRID, progress=False, **GEOMETRY
            )
            budgets = single if budgets is None else _averaged(budgets, single)
    finally:
        seer.normalise_target = real
    return model, budgets, targets


def _averaged(first: SeerBudgets, second: SeerBudgets) -> SeerBudgets:
    weights = {index: (first.weights[index] + second.weights[index]) / 2 for index in first.weights}
    return dataclasses.replace(first, weights=weights)


def expected_weights(window_targets, sparsity: float) -> torch.Tensor:
    """``(layers, heads)``: every free block of every (layer, head) ranked together; the best ``need * L * H`` taken."""
    need = uniform_need(sparsity)
    if need == 0:
        return torch.ones(LAYERS, KV_HEADS)
    candidates = [
        (float(window_targets[layer][0, head, m, n]), layer, head)
        for layer in range(LAYERS)
        for head in range(KV_HEADS)
        for m, n in FREE
    ]
    taken = torch.zeros(LAYERS, KV_HEADS)
    for _, layer, head in sorted(candidates, key=lambda item: -item[0])[: need * LAYERS * KV_HEADS]:
        taken[layer, head] += 1
    return taken / need


def test_weights_spend_one_model_wide_budget(calibrated):
    _, budgets, targets = calibrated
    assert budgets.sparsities == list(GRID) and sorted(budgets.weights) == list(range(LAYERS))
    assert all(len(window) == LAYERS for window in targets)
    for g, sparsity in enumerate(GRID):
        expected = sum(expected_weights(window, sparsity) for window in targets) / len(targets)
        got = torch.stack([budgets.weights[layer][g] for layer in range(LAYERS)])
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
        assert got.mean().item() == pytest.approx(1.0, abs=1e-6)
    table = torch.stack(list(budgets.weights.values()))
    assert (table[:, GRID.index(0.5)] != 1).any(), "the heads should get different shares on these inputs"


def test_interpolation_between_grid_points(calibrated):
    _, budgets, _ = calibrated
    at = {s: torch.tensor(budgets.head_weights(1, s)) for s in (0.3, 0.5, 0.4)}
    torch.testing.assert_close(at[0.5], budgets.weights[1][GRID.index(0.5)])
    torch.testing.assert_close(at[0.4], (at[0.3] + at[0.5]) / 2)
    with pytest.raises(ValueError, match=r"calibrated for sparsities 0.0..0.8, not 0.9"):
        budgets.head_weights(0, 0.9)


def test_artifact_round_trip_and_patch(calibrated, tmp_path):
    model, budgets, _ = calibrated
    directory = budgets.save(tmp_path / "budgets")
    loaded = SeerBudgets.load(directory)
    assert loaded.sparsities == budgets.sparsities and loaded.fingerprint == budgets.fingerprint
    assert (loaded.block_size, loaded.sink_blocks, loaded.local_blocks) == (BLOCK, 0, 1)
    for layer in budgets.weights:
        assert torch.equal(loaded.weights[layer], budgets.weights[layer])
    for source in (directory, budgets):
        with hf_fastattn.use(model, "seer", budgets=source, sparsity=0.5, gate_dim=16, **GEOMETRY):
            states = hf_fastattn.layer_states(model)
            assert [state.config["allocation"] for state in states] == ["head"] * LAYERS
            assert [state.__dict__["_head_weights"] for state in states] == [
                budgets.head_weights(layer, 0.5) for layer in range(LAYERS)
            ]


def test_selection_gives_each_head_its_weighted_budget(calibrated, monkeypatch):
    """Each gated prefill's selection keeps, per (batch, KV head), the diagonal plus ``round(w * need)`` blocks, where
    ``need`` is the uniform one less the exact tail's work (8 rows of 96 keys: 2.9 blocks of 16x16, 3 reserved)."""
    model, budgets, _ = calibrated
    calls = []
    real_select = seer._KERNELS.select

    def select(scores, **kwargs):
        out = real_select(scores, **kwargs)
        calls.append((kwargs, out))
        return out

    monkeypatch.setattr(seer, "_KERNELS", dataclasses.replace(seer._KERNELS, select=select))
    sparsity, config = 0.3, {"budgets": budgets, "gate_dim": 16, "tail_tokens": 8, **GEOMETRY}
    with hf_fastattn.use(model, "seer", sparsity=sparsity, **config), torch.no_grad():
        model(IDS)
    assert len(calls) == LAYERS
    for layer, (kwargs, selection) in enumerate(calls):
        weights = budgets.head_weights(layer, sparsity)
        assert kwargs["head_weights"] == weights and kwargs["allocation"] == "head" and kwargs["reserved_blocks"] == 3
        kept = selection_mask(selection).sum((-2, -1))  # (B, H_kv)
        need = uniform_need(sparsity) - 3
        expected = torch.tensor([NB + min(len(FREE), math.floor(w * need + 0.5)) for w in weights])
        assert torch.equal(kept, expected.expand_as(kept)), f"layer {layer}: {kept} != {expected}"


def test_mismatches_are_refused(calibrated, tmp_path):
    model, budgets, _ = calibrated
    directory = budgets.save(tmp_path / "budgets")
    with pytest.raises(ArtifactError, match=r"calibrated with block_size=16, but block_size=32 was requested"):
        hf_fastattn.patch(model, "seer", budgets=directory, block_size=32, sink_blocks=0)
    with pytest.raises(
        ArtifactError, match=r"with local_blocks=1, sink_blocks=0, but local_blocks=2, sink_blocks=1 was"
    ):
        hf_fastattn.patch(model, "seer", budgets=directory, block_size=BLOCK, local_blocks=2)
    # An earlier version's artifact, calibrated with dense last query blocks, is refused by name.
    rewrite_artifact_config(directory, lambda config: config["metadata"].update(tail_blocks=1))
    with pytest.raises(ArtifactError, match=r"calibrated with tail_blocks=1, a selection this version no longer has"):
        hf_fastattn.patch(model, "seer", budgets=directory, **GEOMETRY)
    directory = budgets.save(tmp_path / "budgets")
    bigger_config = copy.deepcopy(CONFIG)
    bigger_config.num_hidden_layers = 3
    with pytest.raises(ArtifactError, match="different model"):
        hf_fastattn.patch(tiny_llama(bigger_config), "seer", budgets=directory, **GEOMETRY)
    with pytest.raises(ValueError, match=r"calibrated for sparsities 0.0..0.8, not 0.9"):
        hf_fastattn.patch(model, "seer", budgets=directory, sparsity=0.9, **GEOMETRY)
    assert hf_fastattn.layer_states(model) == [] and model.config._attn_implementation == "sdpa"
    with hf_fastattn.use(model, "seer", block_size=BLOCK, gate_dim=16):
        gates = hf_fastattn.save_state(model, tmp_path / "gates", metadata={"seer_gate_version": 1})
    with pytest.raises(ArtifactError, match="is not a Seer budget artifact of version 1"):
        hf_fastattn.patch(model, "seer", budgets=gates, **GEOMETRY)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"topk": 2}, "budgets apply to the sparsity rule, not topk"),
        ({"allocation": "row"}, "budgets share blocks between heads: they need allocation='head'"),
    ],
)
def test_budgets_with_another_rule_are_refused(calibrated, config, message):
    model, budgets, _ = calibrated
    with pytest.raises(ValueError, match=message):
        hf_fastattn.patch(model, "seer", budgets=budgets, **GEOMETRY, **config)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"sparsities": [1.0]}, r"sparsities must be a non-empty list of fractions in \[0, 1\)"),
        ({"sparsities": []}, r"sparsities must be a non-empty list"),
        ({"sequence_length": 16}, "spans fewer than two blocks of 16 tokens"),
    ],
)
def test_calibrate_argument_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        calibrate_seer_budgets(tiny_llama(), IDS, samples=1, **{"sequence_length": SEQ, **GEOMETRY, **kwargs})
