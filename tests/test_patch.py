"""``patch`` / ``unpatch`` / ``use`` on tiny decoder (Llama) and encoder (ViT, BERT) models."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM, ViTConfig, ViTModel

import hf_fastattn
import hf_fastattn.dispatch
from hf_fastattn.methods.dense import SPEC
from hf_fastattn.state import STATE_ATTRIBUTE, LayerState

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# fp32 models: the interpreter's fp32 tl.dot is exact-ish; on a GPU the kernels take bf16 (fp32 falls back to SDPA).
TOL = {"atol": 1e-4, "rtol": 1e-4}


def tiny_llama(layers=3):
    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, max_position_embeddings=64,
    )  # fmt: skip
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval().to(DEVICE)


def tiny_vit():
    config = ViTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=16, patch_size=8
    )
    torch.manual_seed(0)
    return ViTModel(config, add_pooling_layer=False).eval().to(DEVICE)


def tiny_bert():
    config = BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=64,
    )  # fmt: skip
    torch.manual_seed(0)
    return BertModel(config, add_pooling_layer=False).eval().to(DEVICE)


MODELS = {"llama": tiny_llama, "vit": tiny_vit, "bert": tiny_bert}


def model_inputs(name):
    gen = torch.Generator().manual_seed(1)
    if name == "vit":
        return {"pixel_values": torch.randn(2, 3, 16, 16, generator=gen).to(DEVICE)}
    ids = torch.randint(0, 64, (2, 7), generator=gen)
    attention_mask = torch.ones(2, 7, dtype=torch.long)
    attention_mask[0, :2] = 0  # left padding (Llama)
    if name == "bert":
        attention_mask = attention_mask.flip(-1)  # right padding (BERT)
    return {"input_ids": ids.to(DEVICE), "attention_mask": attention_mask.to(DEVICE)}


def run(model, name):
    inputs = model_inputs(name)
    with torch.no_grad():
        out = model(**inputs)
    hidden = out.logits if name == "llama" else out.last_hidden_state
    if name == "vit":
        return hidden
    return hidden[inputs["attention_mask"].bool()]  # padded positions are unspecified


def eager_output(name):
    model = MODELS[name]()
    model.set_attn_implementation("eager")
    return run(model, name)


# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(MODELS))
def test_patch_sets_implementation_and_states(name, caplog):
    hf_fastattn.dispatch.reset_warnings()
    model = MODELS[name]()
    modules = hf_fastattn.attention_modules(model)
    assert len(modules) >= 2
    assert hf_fastattn.patch(model, "dense") is model
    assert model.config._attn_implementation == "fastattn_dense"
    states = hf_fastattn.layer_states(model)
    assert [s.layer_index for s in states] == list(range(len(modules)))
    for module, state in zip(modules, states):
        # Our own index, in model order, never the module's (ViT has no layer_idx at all).
        assert getattr(module, STATE_ATTRIBUTE) is state
        assert isinstance(state, LayerState) and state.spec is SPEC and state.method == "dense"
        assert state in module.children()  # an nn.Module child: moves with the model
    with caplog.at_level("WARNING", logger="hf_fastattn"):
        torch.testing.assert_close(run(model, name), eager_output(name), **TOL)
    if DEVICE == "cpu":  # the kernel ran (interpreted): no fallback, no warning (fp32 on a GPU would fall back)
        assert [r for r in caplog.records if r.name == "hf_fastattn"] == []


@pytest.mark.parametrize("name", list(MODELS))
def test_per_layer_sdpa_assignment(name):
    model = MODELS[name]()
    hf_fastattn.patch(model, "dense", layers={1: "sdpa"})
    methods = [s.method for s in hf_fastattn.layer_states(model)]
    assert methods[1] == "sdpa" and all(m == "dense" for i, m in enumerate(methods) if i != 1)
    assert hf_fastattn.layer_states(model)[1].spec is None
    assert model.config._attn_implementation == "fastattn_dense"
    torch.testing.assert_close(run(model, name), eager_output(name), **TOL)


def test_per_layer_config_overrides():
    model = tiny_llama()
    hf_fastattn.patch(
        model, "dense", layers={0: ("dense", {"fast_exp": "all"}), 2: ("sdpa", {})}, fast_exp="half", fp8=False
    )
    configs = [s.config for s in hf_fastattn.layer_states(model)]
    expected = [
        {"fast_exp": "all", "fp8": False},
        {"fast_exp": "half", "fp8": False},
        {"fast_exp": "half", "fp8": False},
    ]
    assert configs == expected
    assert [s.method for s in hf_fastattn.layer_states(model)] == ["dense", "dense", "sdpa"]


@pytest.mark.parametrize("bad", [3, -1, 100])
def test_out_of_range_layer_raises(bad):
    model = tiny_llama()
    with pytest.raises(ValueError, match="out of range"):
        hf_fastattn.patch(model, "dense", layers={bad: "sdpa"})
    assert hf_fastattn.layer_states(model) == []  # nothing half-applied
    assert model.config._attn_implementation == "sdpa"


def test_unknown_method_raises():
    model = tiny_llama()
    with pytest.raises(KeyError, match="no_such_method"):
        hf_fastattn.patch(model, "no_such_method")
    with pytest.raises(KeyError, match="no_such_method"):
        hf_fastattn.patch(model, "dense", layers={0: "no_such_method"})
    assert model.config._attn_implementation == "sdpa"


def test_registered_name_is_accepted():
    model = tiny_llama()
    hf_fastattn.patch(model, "fastattn_dense")
    assert model.config._attn_implementation == "fastattn_dense"
    assert {s.method for s in hf_fastattn.layer_states(model)} == {"dense"}


def test_model_without_attention_modules_raises():
    with pytest.raises(ValueError, match="no attention module"):
        hf_fastattn.patch(nn.Sequential(nn.Linear(4, 4)), "dense")


@pytest.mark.parametrize("previous", ["eager", "sdpa"])
def test_unpatch_restores_previous_implementation(previous):
    model = tiny_llama()
    model.set_attn_implementation(previous)
    hf_fastattn.patch(model, "dense", layers={1: "sdpa"})
    hf_fastattn.patch(model, "dense")  # patching again replaces the assignment, and remembers the *original*
    assert [s.method for s in hf_fastattn.layer_states(model)] == ["dense"] * 3
    assert hf_fastattn.unpatch(model) is model
    assert model.config._attn_implementation == previous
    assert hf_fastattn.layer_states(model) == []
    assert not any(isinstance(m, LayerState) for m in model.modules())
    assert not any(hasattr(m, STATE_ATTRIBUTE) for m in model.modules())
    hf_fastattn.unpatch(model)  # idempotent
    assert model.config._attn_implementation == previous


def _snapshot(model):
    return (
        model.config._attn_implementation,
        [getattr(m, STATE_ATTRIBUTE, None) for m in hf_fastattn.attention_modules(model)],
        getattr(model, "_fastattn_previous_attn_implementation", None),
    )


def test_use_restores_an_unpatched_model():
    model = tiny_llama()
    before = _snapshot(model)
    with hf_fastattn.use(model, "dense", layers={2: "sdpa"}) as patched:
        assert patched is model
        assert model.config._attn_implementation == "fastattn_dense"
        assert [s.method for s in hf_fastattn.layer_states(model)] == ["dense", "dense", "sdpa"]
    assert _snapshot(model) == before
    assert not any(isinstance(m, LayerState) for m in model.modules())


def test_use_restores_a_patched_model_exactly():
    model = tiny_llama()
    model.set_attn_implementation("eager")
    hf_fastattn.patch(model, "dense", layers={0: "sdpa"}, fast_exp="half")
    states = hf_fastattn.layer_states(model)
    before = _snapshot(model)
    with hf_fastattn.use(model, "dense", fast_exp="all"):
        assert all(s.config == {"fast_exp": "all"} for s in hf_fastattn.layer_states(model))
    after = _snapshot(model)
    assert after[0] == before[0] and after[2] == before[2] == "eager"
    assert all(a is b for a, b in zip(after[1], states))  # the very same state objects
    assert [s.config for s in hf_fastattn.layer_states(model)] == [{"fast_exp": "half"}] * 3
    hf_fastattn.unpatch(model)
    assert model.config._attn_implementation == "eager"


def test_use_restores_on_exception():
    model = tiny_llama()
    before = _snapshot(model)
    with pytest.raises(RuntimeError, match="boom"), hf_fastattn.use(model, "dense"):
        assert model.config._attn_implementation == "fastattn_dense"
        raise RuntimeError("boom")
    assert _snapshot(model) == before


def test_use_output_matches_eager():
    model = tiny_llama()
    with hf_fastattn.use(model, "dense"):
        inside = run(model, "llama")
    torch.testing.assert_close(inside, eager_output("llama"), **TOL)


# --------------------------------------------------------------------------------------------------------------------
# State tensors follow the model, stay out of its state_dict
# --------------------------------------------------------------------------------------------------------------------


def test_state_tensors_move_with_the_model():
    model = tiny_llama()
    hf_fastattn.patch(model, "dense")
    state = hf_fastattn.layer_states(model)[1]
    state.set_tensor("thresholds", torch.zeros(3, device=DEVICE))
    state.set_tensor("counts", torch.arange(3, device=DEVICE))
    model.to(torch.float64)  # .to(dtype) casts floating buffers only
    assert state.thresholds.dtype == torch.float64
    assert state.counts.dtype == torch.int64
    model.to("meta")
    assert state.thresholds.device.type == "meta" and state.counts.device.type == "meta"
    assert set(state.artifact_tensors()) == {"thresholds", "counts"}


def test_state_tensors_not_in_state_dict():
    model = tiny_llama()
    keys_before = set(model.state_dict())
    hf_fastattn.patch(model, "dense")
    hf_fastattn.layer_states(model)[0].set_tensor("thresholds", torch.zeros(3, device=DEVICE))
    assert set(model.state_dict()) == keys_before
    assert not any("fastattn" in key for key in model.state_dict())
    # Loading the original checkpoint into the patched model is strict-clean.
    model.load_state_dict(tiny_llama().state_dict(), strict=True)


def test_set_tensor_replaces():
    state = LayerState(0, SPEC, {})
    state.set_tensor("thresholds", torch.zeros(3))
    state.set_tensor("thresholds", torch.ones(5))
    assert torch.equal(state.thresholds, torch.ones(5))
    assert "method='dense'" in repr(state) and "layer_index=0" in repr(state)


def test_fp8_modes_reach_the_fp8_forward(monkeypatch):
    """``fp8=True`` runs the FP8 forward as it is, ``fp8="accurate"`` with its Q smoothing; other values raise."""
    from hf_fastattn.methods import dense as dense_method
    from hf_fastattn.ops.dense import dense_attention_reference

    calls = []

    def spy(query, key, value, *, causal, scale, key_padding, smooth_q):
        calls.append(smooth_q)
        return dense_attention_reference(query, key, value, causal=causal, scale=scale, key_padding=key_padding)

    monkeypatch.setattr(dense_method, "dense_attention_fp8", spy)
    monkeypatch.setattr(dense_method, "dense_attention_fp8_reference", spy)
    for mode, smooth_q in ((True, False), ("accurate", True)):
        model = tiny_llama().cpu()  # fp32: on a GPU it would fall back before reaching either FP8 entry
        hf_fastattn.patch(model, "dense", fp8=mode)
        calls.clear()
        with torch.no_grad():
            model(torch.randint(0, model.config.vocab_size, (1, 9)))
        assert calls and set(calls) == {smooth_q}
    with pytest.raises(ValueError, match="fp8 must be one of"):
        hf_fastattn.patch(tiny_llama(), "dense", fp8="fast")
