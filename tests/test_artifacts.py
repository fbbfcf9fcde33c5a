"""``save_state`` / ``load_state``: round trip, fingerprint checks, damaged files, atomic writes."""

from __future__ import annotations

import json

import pytest
import safetensors.torch
import torch
from torch import nn
from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM

import hf_fastattn
from hf_fastattn import ArtifactError
from hf_fastattn.artifacts import CONFIG_NAME, FORMAT_VERSION, TENSORS_NAME, model_fingerprint, read_artifact

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def tiny_llama(layers=3, heads=2, kv_heads=1):
    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv_heads, head_dim=16, max_position_embeddings=64,
    )  # fmt: skip
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval().to(DEVICE)


def calibrated(model=None):
    """A patched model with per-layer methods, configs and tensors, as a calibration would leave it."""
    model = model if model is not None else tiny_llama()
    hf_fastattn.patch(model, "dense", layers={1: "sdpa", 2: ("dense", {"fast_exp": False})}, fast_exp="all", fp8=False)
    states = hf_fastattn.layer_states(model)
    states[0].set_tensor("thresholds", torch.tensor([0.1, 0.2, 0.3], device=DEVICE))
    states[0].set_tensor("counts", torch.arange(4, device=DEVICE))
    states[2].set_tensor("thresholds", torch.randn(2, 5, generator=torch.Generator().manual_seed(3)).to(DEVICE))
    states[2].set_tensor("mixed", torch.ones(3, dtype=torch.bfloat16, device=DEVICE))
    return model


def layer_summary(model):
    return [
        (s.layer_index, s.method, s.config, {k: (t.dtype, t.cpu().tolist()) for k, t in s.artifact_tensors().items()})
        for s in hf_fastattn.layer_states(model)
    ]


@pytest.fixture
def artifact(tmp_path):
    model = calibrated()
    directory = hf_fastattn.save_state(model, tmp_path / "artifact", metadata={"dataset": "wikitext", "samples": 8})
    return model, directory


# --------------------------------------------------------------------------------------------------------------------


def test_round_trip(artifact):
    model, directory = artifact
    assert directory.is_dir()
    fresh = tiny_llama()
    assert hf_fastattn.load_state(fresh, directory) is fresh
    assert layer_summary(fresh) == layer_summary(model)
    assert fresh.config._attn_implementation == "fastattn_dense"
    for state in hf_fastattn.layer_states(fresh):
        for tensor in state.artifact_tensors().values():
            assert tensor.device.type == DEVICE
    # The loaded tensors are state (non-persistent buffers), not weights.
    assert not any("fastattn" in key for key in fresh.state_dict())


def test_round_trip_output_matches(artifact, tmp_path):
    model, directory = artifact
    fresh = tiny_llama()
    hf_fastattn.load_state(fresh, directory)
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=ids).logits, model(input_ids=ids).logits, atol=0, rtol=0)


def test_config_json_contents(artifact):
    model, directory = artifact
    config = json.loads((directory / CONFIG_NAME).read_text())
    assert config["format_version"] == FORMAT_VERSION
    assert config["metadata"] == {"dataset": "wikitext", "samples": 8}
    assert config["layers"] == [
        {"index": 0, "method": "dense", "config": {"fast_exp": "all", "fp8": False}},
        {"index": 1, "method": "sdpa", "config": {"fast_exp": "all", "fp8": False}},
        {"index": 2, "method": "dense", "config": {"fast_exp": False, "fp8": False}},
    ]
    assert config["fingerprint"] == model_fingerprint(model)
    assert config["fingerprint"]["attention_layers"] == 3
    assert set(config["versions"]) == {"hf_fastattn", "torch", "transformers"}
    assert config["tensors"] == sorted(
        ["layers.0.thresholds", "layers.0.counts", "layers.2.thresholds", "layers.2.mixed"]
    )
    _, tensors = read_artifact(directory)
    assert tensors["layers.2.mixed"].dtype == torch.bfloat16


def test_load_into_patched_model_replaces_its_assignment(artifact):
    _, directory = artifact
    other = tiny_llama()
    hf_fastattn.patch(other, "dense", layers={0: "sdpa"})
    hf_fastattn.layer_states(other)[1].set_tensor("stale", torch.zeros(1, device=DEVICE))
    hf_fastattn.load_state(other, directory)
    assert [s.method for s in hf_fastattn.layer_states(other)] == ["dense", "sdpa", "dense"]
    assert "stale" not in hf_fastattn.layer_states(other)[1].artifact_tensors()


def test_save_unpatched_model_raises(tmp_path):
    with pytest.raises(ValueError, match="not patched"):
        hf_fastattn.save_state(tiny_llama(), tmp_path / "x")


def test_save_without_tensors_or_metadata(tmp_path):
    model = tiny_llama()
    hf_fastattn.patch(model, "dense")
    directory = hf_fastattn.save_state(model, tmp_path / "plain")
    config, tensors = read_artifact(directory)
    assert tensors == {} and config["metadata"] == {}
    fresh = tiny_llama()
    hf_fastattn.load_state(fresh, directory)
    assert [s.method for s in hf_fastattn.layer_states(fresh)] == ["dense"] * 3


# --------------------------------------------------------------------------------------------------------------------
# A model of another shape
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make_other, field",
    [
        (lambda: tiny_llama(layers=2), "num_hidden_layers"),
        (lambda: tiny_llama(heads=4, kv_heads=2), "num_attention_heads"),
        (lambda: tiny_llama(kv_heads=2), "num_key_value_heads"),
        (
            lambda: BertModel(
                BertConfig(
                    vocab_size=64, hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64
                )
            ),
            "model_type",
        ),
    ],
    ids=["layers", "heads", "kv_heads", "architecture"],
)
def test_mismatched_model_raises(artifact, make_other, field):
    _, directory = artifact
    other = make_other()
    implementation = other.config._attn_implementation
    with pytest.raises(ArtifactError, match=field) as info:
        hf_fastattn.load_state(other, directory)
    assert "different model" in str(info.value)
    assert "hash" not in str(info.value).split("fields")[1].split("differ")[0]
    # Refused before touching the model.
    assert hf_fastattn.layer_states(other) == []
    assert other.config._attn_implementation == implementation


def test_artifact_error_is_a_value_error():
    assert issubclass(ArtifactError, ValueError)


# --------------------------------------------------------------------------------------------------------------------
# Damaged or incomplete artifacts
# --------------------------------------------------------------------------------------------------------------------


def test_truncated_safetensors_raises(artifact):
    _, directory = artifact
    path = directory / TENSORS_NAME
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ArtifactError, match="cannot be read"):
        hf_fastattn.load_state(tiny_llama(), directory)


def test_corrupted_safetensors_header_raises(artifact):
    _, directory = artifact
    path = directory / TENSORS_NAME
    data = bytearray(path.read_bytes())
    data[8:24] = b"\xff" * 16  # inside the JSON header
    path.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="cannot be read"):
        hf_fastattn.load_state(tiny_llama(), directory)


def test_garbage_safetensors_raises(artifact):
    _, directory = artifact
    (directory / TENSORS_NAME).write_bytes(b"not a safetensors file")
    with pytest.raises(ArtifactError):
        hf_fastattn.load_state(tiny_llama(), directory)


def test_tensors_not_matching_config_raise(artifact):
    _, directory = artifact
    _, tensors = read_artifact(directory)
    tensors.pop("layers.0.counts")
    safetensors.torch.save_file(tensors, directory / TENSORS_NAME)
    with pytest.raises(ArtifactError, match="does not hold the tensors"):
        hf_fastattn.load_state(tiny_llama(), directory)


@pytest.mark.parametrize("missing", [CONFIG_NAME, TENSORS_NAME])
def test_missing_file_raises(artifact, missing):
    _, directory = artifact
    (directory / missing).unlink()
    with pytest.raises(ArtifactError, match="missing"):
        hf_fastattn.load_state(tiny_llama(), directory)


def test_missing_directory_raises(tmp_path):
    with pytest.raises(ArtifactError, match="missing"):
        hf_fastattn.load_state(tiny_llama(), tmp_path / "does_not_exist")


def test_invalid_json_raises(artifact):
    _, directory = artifact
    (directory / CONFIG_NAME).write_text("{ not json")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        hf_fastattn.load_state(tiny_llama(), directory)


@pytest.mark.parametrize("version", [FORMAT_VERSION + 1, 0, "1", None])
def test_wrong_format_version_raises(artifact, version):
    _, directory = artifact
    path = directory / CONFIG_NAME
    config = json.loads(path.read_text())
    if version is None:
        del config["format_version"]
    else:
        config["format_version"] = version
    path.write_text(json.dumps(config))
    with pytest.raises(ArtifactError, match="format version"):
        hf_fastattn.load_state(tiny_llama(), directory)


# --------------------------------------------------------------------------------------------------------------------
# Atomic writes
# --------------------------------------------------------------------------------------------------------------------


def test_no_temporary_files_left(tmp_path):
    model = calibrated()
    directory = tmp_path / "artifact"
    hf_fastattn.save_state(model, directory)
    hf_fastattn.save_state(model, directory, metadata={"again": True})  # overwriting is fine too
    assert sorted(p.name for p in directory.iterdir()) == sorted([CONFIG_NAME, TENSORS_NAME])
    assert json.loads((directory / CONFIG_NAME).read_text())["metadata"] == {"again": True}


def test_failed_save_leaves_previous_artifact_intact(tmp_path, monkeypatch):
    model = calibrated()
    directory = tmp_path / "artifact"
    hf_fastattn.save_state(model, directory, metadata={"version": 1})
    before = {p.name: p.read_bytes() for p in directory.iterdir()}

    def failing_save(tensors, path, *args, **kwargs):
        with open(path, "wb") as handle:
            handle.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", failing_save)
    hf_fastattn.layer_states(model)[0].set_tensor("thresholds", torch.zeros(3, device=DEVICE))
    with pytest.raises(OSError, match="disk full"):
        hf_fastattn.save_state(model, directory, metadata={"version": 2})
    assert {p.name: p.read_bytes() for p in directory.iterdir()} == before  # no temp file, nothing half-written


def test_submodule_tensors_the_method_does_not_create_are_refused(tmp_path):
    model = tiny_llama()
    hf_fastattn.patch(model, "dense")
    hf_fastattn.layer_states(model)[0].gate = nn.Linear(2, 2).to(DEVICE)  # trainable gates live in a submodule
    directory = hf_fastattn.save_state(model, tmp_path / "gates")
    assert "layers.0.gate.weight" in read_artifact(directory)[0]["tensors"]
    with pytest.raises(ArtifactError, match="submodule"):
        hf_fastattn.load_state(tiny_llama(), directory)
