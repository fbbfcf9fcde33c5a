"""``fastattn_bsfa`` on a tiny random Llama: thresholds at -inf are dense attention, realised density, decode steps on
the dense path, fallbacks and configuration errors.

The models are fp32 on the CPU, where ``tests/conftest.py`` runs the Triton kernels in the interpreter (on a GPU, fp32
would fall back to SDPA: ``tests/ops/test_bsfa.py`` covers the kernel there), with 16 x 16 tiles so that a 40-token
prompt spans three query tiles.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from method_helpers import fresh_warnings, greedy_generate_pair, left_padded_prompt, warnings_of  # noqa: F401 (autouse fixture)
from method_helpers import model_pair as shared_model_pair
from transformers import AutoModelForCausalLM, DynamicCache, LlamaConfig

import hf_fastattn
import hf_fastattn.dispatch
import hf_fastattn.methods.bsfa as bsfa_method
from hf_fastattn._compat import cache_argument
from hf_fastattn.evaluation.records import attention_summary, reset_attention_statistics

pytestmark = pytest.mark.skipif(
    torch.cuda.is_available(), reason="fp32 tiny models run the kernels only on the CPU interpreter"
)

BLOCK = 16
VOCAB = 128
PAD_ID = 0
TOL = {"atol": 1e-4, "rtol": 1e-4}
HIGH = 1e4  # above every tile maximum: every skippable tile is skipped
CONFIG = LlamaConfig(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=128, pad_token_id=PAD_ID, bos_token_id=1, eos_token_id=2,
    initializer_range=0.2,  # larger scores than the default: tile maxima differ, greedy decoding does not repeat
)  # fmt: skip
LAYERS, HEADS = CONFIG.num_hidden_layers, CONFIG.num_attention_heads


def model_pair(implementation: str = "sdpa"):
    return shared_model_pair(CONFIG, AutoModelForCausalLM, implementation)


def prompt(seq: int = 40, pad: int = 0, batch: int = 2, seed: int = 1):
    return left_padded_prompt(VOCAB, PAD_ID, seq, pad, batch, seed)


def logits(model, ids, mask, **kwargs):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, **kwargs).logits


def tile_counts(seq: int, block: int = BLOCK) -> tuple[int, int]:
    """(visited, skippable) key tiles of one causal (batch row, head) over a prompt of ``seq`` tokens: query tile m
    visits key tiles 0..m, of which the first and the diagonal are always kept."""
    tiles = math.ceil(seq / block)
    return sum(m + 1 for m in range(tiles)), sum(max(0, m - 1) for m in range(tiles))


def bsfa_tiles(model) -> list[dict]:
    return [layer["statistics"]["tiles"] for layer in attention_summary(model)["layers"]]


# --------------------------------------------------------------------------------------------------------------------
# Thresholds at -inf: dense attention; a high threshold: fewer tiles, the reference's answer
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pad", [0, 9], ids=["no-padding", "left-padding"])
def test_minus_inf_thresholds_match_eager(pad, caplog):
    reference, model = model_pair()
    hf_fastattn.patch(model, "bsfa", thresholds=float("-inf"), block_m=BLOCK, block_n=BLOCK)
    assert model.config._attn_implementation == "fastattn_bsfa"
    assert reference.config._attn_implementation == "eager"
    ids, mask = prompt(pad=pad)
    got, expected = logits(model, ids, mask), logits(reference, ids, mask)
    valid = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
    torch.testing.assert_close(got[valid], expected[valid], **TOL)
    assert warnings_of(caplog) == []  # the BSFA kernel ran, nothing fell back

    summary = attention_summary(model)
    assert summary["density"] == 1.0
    visited, skippable = tile_counts(40)
    per_layer = {"visited": 2 * HEADS * visited, "skippable": 2 * HEADS * skippable, "skipped": 0}
    assert bsfa_tiles(model) == [per_layer] * LAYERS
    assert [layer["config"]["block_m"] for layer in summary["layers"]] == [BLOCK] * LAYERS
    reset_attention_statistics(model)
    assert attention_summary(model)["density"] is None


def test_high_threshold_skips_tiles_as_the_reference(monkeypatch):
    """A threshold above every tile maximum skips every skippable tile: density 1 - skippable / visited, a different
    output from dense attention, and the same output as the plain-PyTorch reference path."""
    reference, model = model_pair()
    hf_fastattn.patch(model, "bsfa", thresholds=HIGH, block_m=BLOCK, block_n=BLOCK)
    ids, mask = prompt(pad=9)
    valid = mask.bool()
    got = logits(model, ids, mask)
    visited, skippable = tile_counts(40)
    assert attention_summary(model)["density"] == pytest.approx(1 - skippable / visited)
    per_layer = {"visited": 2 * HEADS * visited, "skippable": 2 * HEADS * skippable, "skipped": 2 * HEADS * skippable}
    assert bsfa_tiles(model) == [per_layer] * LAYERS
    for layer in attention_summary(model)["layers"]:
        assert layer["statistics"]["skip_fraction"] == 1.0
        assert layer["statistics"]["skip_fraction_per_head"] == [1.0] * HEADS
    assert (got[valid] - logits(reference, ids, mask)[valid]).abs().max() > 1e-3, "skipping should change the output"

    # The same layers through bsfa_attention_reference (the dispatcher's path where Triton cannot run); the counts
    # accumulate over calls until reset.
    monkeypatch.setattr(hf_fastattn.dispatch, "triton_supports", lambda device: False)
    torch.testing.assert_close(logits(model, ids, mask)[valid], got[valid], **TOL)
    assert bsfa_tiles(model) == [{name: 2 * count for name, count in per_layer.items()}] * LAYERS
    reset_attention_statistics(model)
    assert attention_summary(model)["density"] is None
    logits(model, ids, mask)
    assert bsfa_tiles(model) == [per_layer] * LAYERS


def test_per_layer_thresholds():
    """Layer 1 skips, layer 0 keeps everything: the model's density is the mean of the layers'."""
    _, model = model_pair()
    layers = {1: ("bsfa", {"thresholds": HIGH})}
    hf_fastattn.patch(model, "bsfa", thresholds=float("-inf"), block_m=BLOCK, block_n=BLOCK, layers=layers)
    logits(model, *prompt())
    visited, skippable = tile_counts(40)
    densities = [layer["density"] for layer in attention_summary(model)["layers"]]
    assert densities == [1.0, pytest.approx(1 - skippable / visited)]
    assert attention_summary(model)["density"] == pytest.approx((1.0 + 1 - skippable / visited) / 2)


# --------------------------------------------------------------------------------------------------------------------
# Decode: short queries take the dense kernel, cached decoding equals the full forward
# --------------------------------------------------------------------------------------------------------------------


class Spy:
    """Records the query length of every call to the method's BSFA and dense kernels and to the decode kernels."""

    def __init__(self, monkeypatch):
        self.bsfa, self.dense, self.decode = [], [], []
        targets = (
            (bsfa_method, "bsfa_attention", self.bsfa),
            (bsfa_method, "dense_attention", self.dense),
            (hf_fastattn.dispatch, "decode_attention", self.decode),
        )
        for module, name, calls in targets:
            real = getattr(module, name)

            def wrapper(query, *args, _real=real, _calls=calls, **kwargs):
                _calls.append(query.shape[2])
                return _real(query, *args, **kwargs)

            monkeypatch.setattr(module, name, wrapper)


def test_cached_greedy_decode_equals_full_forward(monkeypatch, caplog):
    """Left-padded batch, DynamicCache: the prefill runs BSFA, each single-token step the decode kernels. At -inf the
    generated tokens are eager's, and every step's logits are those of one uncached forward over the whole prefix."""
    reference, model = model_pair()
    hf_fastattn.patch(model, "bsfa", thresholds=float("-inf"), block_m=BLOCK, block_n=BLOCK)
    ids, mask = prompt(seq=20, pad=6, seed=3)
    spy = Spy(monkeypatch)
    new = 5
    actual, expected = greedy_generate_pair(model, reference, ids, mask, new_tokens=new, pad_id=PAD_ID)
    assert spy.bsfa == [20] * LAYERS and spy.decode == [1] * (LAYERS * (new - 1)) and spy.dense == []
    assert torch.equal(actual.sequences, expected.sequences)
    assert len(set(actual.sequences[:, 20:].flatten().tolist())) > 1, "degenerate model: the test would prove little"
    steps = torch.stack(actual.logits, dim=1)  # (B, new, V)
    torch.testing.assert_close(steps, torch.stack(expected.logits, dim=1), **TOL)

    sequences = actual.sequences[:, :-1]
    full_mask = torch.cat([mask, torch.ones(2, new - 1, dtype=mask.dtype)], dim=1)
    full = logits(model, sequences, full_mask, use_cache=False)[:, 20 - 1 :]
    torch.testing.assert_close(steps, full, **TOL)
    assert warnings_of(caplog) == []


def test_decode_steps_do_not_count_tiles(monkeypatch):
    """With a sparse threshold, the counters hold the prefill's tiles only: decode steps run the exact decode kernels."""
    _, model = model_pair()
    hf_fastattn.patch(model, "bsfa", thresholds=HIGH, block_m=BLOCK, block_n=BLOCK)
    ids, mask = prompt(seq=40, pad=6)
    spy = Spy(monkeypatch)
    with torch.no_grad():
        model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=3, min_new_tokens=3, do_sample=False,
            pad_token_id=PAD_ID, **cache_argument(model, DynamicCache(config=model.config)),
        )  # fmt: skip
    assert spy.bsfa == [40] * LAYERS and spy.decode == [1] * (LAYERS * 2) and spy.dense == []
    visited, skippable = tile_counts(40)
    assert bsfa_tiles(model) == [{"visited": 8 * visited, "skippable": 8 * skippable, "skipped": 8 * skippable}] * 2


def test_bsfa_decode_step_reads_absolute_positions():
    """With ``decode="off"`` and ``min_query_len=1`` a decode step runs BSFA too. After a tile-aligned prompt, the
    step's query forms a query tile of its own at the same absolute position as in a full forward: the same
    decisions, the same logits."""
    _, model = model_pair()
    hf_fastattn.patch(model, "bsfa", thresholds=HIGH, block_m=BLOCK, block_n=BLOCK, min_query_len=1, decode="off")
    ids, mask = prompt(seq=33, pad=5, seed=4)
    cache = DynamicCache(config=model.config)
    logits(model, ids[:, :32], mask[:, :32], **cache_argument(model, cache), use_cache=True)
    reset_attention_statistics(model)
    step = logits(model, ids[:, 32:], mask, **cache_argument(model, cache), use_cache=True)[:, -1]
    # The step's query tile (position 2) visits key tiles 0-2 and may skip tile 1: 3 visited, 1 skipped per head.
    assert bsfa_tiles(model) == [{"visited": 2 * HEADS * 3, "skippable": 2 * HEADS, "skipped": 2 * HEADS}] * LAYERS
    full = logits(model, ids, mask, use_cache=False)[:, -1]
    torch.testing.assert_close(step, full, **TOL)


# --------------------------------------------------------------------------------------------------------------------
# Fallbacks and errors
# --------------------------------------------------------------------------------------------------------------------


def test_gradients_fall_back_to_sdpa_with_one_warning(caplog):
    """BSFA is forward only: a call that needs gradients runs SDPA (dense: eager's answer), warning once."""
    reference, model = model_pair()
    hf_fastattn.patch(model, "bsfa", thresholds=HIGH, block_m=BLOCK, block_n=BLOCK)
    ids, mask = prompt(pad=9)
    valid = mask.bool()
    for _ in range(2):
        out = model(input_ids=ids, attention_mask=mask).logits
        assert out.requires_grad
        torch.testing.assert_close(out.detach()[valid], logits(reference, ids, mask)[valid], **TOL)
    out[valid].sum().backward()
    assert model.model.layers[0].self_attn.q_proj.weight.grad is not None
    [message] = warnings_of(caplog)
    assert "fastattn_bsfa" in message and "backward pass" in message and "sdpa" in message
    assert attention_summary(model)["density"] is None  # BSFA never ran
    # Without gradients the kernel runs again, silently.
    logits(model, ids, mask)
    assert len(warnings_of(caplog)) == 1 and attention_summary(model)["density"] < 1.0


def test_missing_thresholds_raise_at_call_time():
    reference, model = model_pair()
    hf_fastattn.patch(model, "bsfa", block_m=BLOCK, block_n=BLOCK)  # tables may come later (load_state)
    short_ids, _ = prompt(seq=BLOCK - 1)
    # Shorter than one query tile: the dense path, no thresholds needed.
    torch.testing.assert_close(logits(model, short_ids, None), logits(reference, short_ids, None), **TOL)
    with pytest.raises(ValueError, match=r"no thresholds for this layer.*patch\(model, 'bsfa', thresholds=\.\.\.\)"):
        logits(model, *prompt(seq=BLOCK))


def test_registered_name_without_patch_needs_thresholds():
    """``attn_implementation="fastattn_bsfa"`` without ``patch``: default 128-wide tiles, dense below that, and an
    error (not dense attention in disguise) for a prefill that would need thresholds."""
    reference, model = model_pair("fastattn_bsfa")
    ids, _ = prompt(seq=20)
    torch.testing.assert_close(logits(model, ids, None), logits(reference, ids, None), **TOL)
    with pytest.raises(ValueError, match="no thresholds"):
        logits(model, *prompt(seq=128, batch=1))


@pytest.mark.parametrize(
    ("thresholds", "error", "message"),
    [
        ([0.5, 1.0], TypeError, "thresholds must be an artifact directory, a BsfaCalibration or a number, not list"),
        (torch.tensor(0.5), TypeError, "not Tensor"),
        (True, TypeError, "not bool"),
        ({"k": 4}, TypeError, "not dict"),
        (float("nan"), ValueError, "cannot be NaN"),
    ],
    ids=["list", "tensor", "bool", "dict", "nan"],
)
def test_bad_thresholds_are_refused_at_patch_time(thresholds, error, message):
    _, model = model_pair()
    with pytest.raises(error, match=message):
        hf_fastattn.patch(model, "bsfa", thresholds=thresholds, block_m=BLOCK, block_n=BLOCK)
    assert model.config._attn_implementation == "sdpa"


def test_unknown_setting_is_refused():
    _, model = model_pair()
    with pytest.raises(ValueError, match=r"unknown fastattn_bsfa setting\(s\) \['blok_n'\]"):
        hf_fastattn.patch(model, "bsfa", thresholds=0.0, block_m=BLOCK, blok_n=BLOCK)


@pytest.mark.parametrize("block", [24, 8])
def test_bad_tile_shape_is_refused_at_call_time(block):
    _, model = model_pair()
    hf_fastattn.patch(model, "bsfa", thresholds=0.0, block_m=BLOCK, block_n=block)
    with pytest.raises(ValueError, match=f"block_n must be a power of two >= 16, got {block}"):
        logits(model, *prompt(seq=BLOCK))


def test_failed_prepare_leaves_the_model_as_it_was():
    """A bad BSFA configuration raises and keeps the previous patch (states and implementation) untouched."""
    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
    )  # fmt: skip
    model = AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation="sdpa").eval()
    hf_fastattn.patch(model, "dense")
    before = hf_fastattn.layer_states(model)
    with pytest.raises(TypeError):
        hf_fastattn.patch(model, "bsfa", thresholds=[0.5])
    assert hf_fastattn.layer_states(model) == before
    assert [state.method for state in hf_fastattn.layer_states(model)] == ["dense", "dense"]
    assert model.config._attn_implementation == "fastattn_dense"
