"""SeerAttention gate training: the KL loss by hand, ``train_gates`` on a tiny Llama (frozen base, learning gates, the
artifact), resuming from a checkpoint, the configuration file and the ``train-gates`` CLI's error path.

``train_gates`` runs ``transformers.Trainer`` on the CPU; every attention layer runs the ground-truth kernel in Triton's
interpreter (``tests/conftest.py``), so the model is tiny (hidden 64, 2 layers, 16-token blocks) and runs are a few
optimizer steps.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, LlamaConfig

import hf_fastattn
import hf_fastattn.dispatch
import hf_fastattn.training
from hf_fastattn import cli
from hf_fastattn.artifacts import read_artifact
from hf_fastattn.methods import seer
from hf_fastattn.ops.seer import attention_with_block_target_reference, normalise_target, pool_blocks_reference
from hf_fastattn.training import GateTrainingConfig, gate_kl_loss, prepare_for_gate_training, train_gates
from hf_fastattn.training.seer_gates import GateLoss

pytestmark = pytest.mark.skipif(
    torch.cuda.is_available(), reason="fp32 tiny models run the kernels only on the CPU interpreter"
)

BLOCK = 16
GATE_DIM = 16
VOCAB = 128
SEQ = 32  # resumed runs: 2 blocks (only the result's equality matters there)
LLAMA = LlamaConfig(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    initializer_range=0.2,
)  # fmt: skip


# --------------------------------------------------------------------------------------------------------------------
# gate_kl_loss and GateLoss
# --------------------------------------------------------------------------------------------------------------------


def causal_gate_inputs(batch=2, heads=2, blocks=8, seed=0):
    """(log_probs, valid, target) as a causal layer produces them: -inf log-probabilities and zero target on invalid
    (future) blocks, a normalised strictly positive target on valid ones, and one row with no target at all."""
    generator = torch.Generator().manual_seed(seed)
    valid = torch.ones(blocks, blocks, dtype=torch.bool).tril().expand(batch, heads, -1, -1)
    scores = torch.randn(batch, heads, blocks, blocks, generator=generator) * 2
    log_probs = torch.log_softmax(scores.masked_fill(~valid, float("-inf")), dim=-1)
    target = torch.rand(batch, heads, blocks, blocks, generator=generator).add(0.05).masked_fill(~valid, 0.0)
    target[1, 0, 5] = 0.0  # e.g. a padded query block: no target
    target = target / target.sum(-1, keepdim=True).clamp(min=1e-30)
    return log_probs, valid, target


def hand_kl(log_probs, valid, target, skip_first_fraction):
    """Plain-Python mean of KL(target || gate) over the rows that carry a loss."""
    batch, heads, rows, cols = target.shape
    first = int(rows * skip_first_fraction)
    total, count = 0.0, 0
    for b in range(batch):
        for h in range(heads):
            for r in range(first, rows):
                row = target[b, h, r].tolist()
                if sum(row) == 0:
                    continue
                kl = 0.0
                for c in range(cols):
                    if row[c] > 0:
                        assert valid[b, h, r, c]
                        kl += row[c] * (math.log(row[c]) - float(log_probs[b, h, r, c]))
                total += kl
                count += 1
    return total / count


@pytest.mark.parametrize("skip", [0.25, 0.0, 0.5])
def test_gate_kl_loss_by_hand(skip):
    log_probs, valid, target = causal_gate_inputs()
    log_probs.requires_grad_(True)
    loss = gate_kl_loss(log_probs, valid, target, skip)
    assert torch.isfinite(loss) and loss > 0
    assert loss.item() == pytest.approx(hand_kl(log_probs.detach(), valid, target, skip), rel=1e-5)
    loss.backward()
    grad = log_probs.grad
    assert torch.isfinite(grad).all(), "invalid (-inf) blocks must not produce NaN"
    first = int(8 * skip)
    assert (grad[..., :first, :] == 0).all()  # skipped rows carry no loss
    assert (grad[1, 0, 5] == 0).all()  # neither does a row without target
    assert (grad[~valid] == 0).all()
    if first:
        # Changing a skipped row changes nothing.
        changed = log_probs.detach().clone()
        changed[..., 0, 0] = -3.0
        assert gate_kl_loss(changed, valid, target, skip) == loss.detach()


def test_gate_kl_loss_is_zero_when_the_gate_equals_the_target():
    _, valid, target = causal_gate_inputs()
    log_probs = torch.log_softmax(torch.log(target).masked_fill(~valid, float("-inf")), dim=-1)
    # The row without target is log(0) throughout (NaN after log_softmax); any finite gate row will do there, as it
    # carries no loss.
    log_probs = torch.where(torch.isnan(log_probs), torch.zeros_like(log_probs), log_probs)
    loss = gate_kl_loss(log_probs, valid, target)
    assert torch.isfinite(loss) and abs(loss.item()) < 1e-6


def test_gate_kl_loss_with_fully_invalid_rows():
    """A fully padded query block: the gate returns a uniform row marked invalid everywhere, with no target."""
    log_probs, valid, target = causal_gate_inputs()
    valid = valid.clone()
    valid[0, 1, 6] = False
    log_probs = log_probs.clone()
    log_probs[0, 1, 6] = -math.log(8)
    target = target.clone()
    target[0, 1, 6] = 0.0
    loss = gate_kl_loss(log_probs, valid, target)
    assert loss.item() == pytest.approx(hand_kl(log_probs, valid, target, 0.25), rel=1e-5)
    # Nothing valid and nothing to learn anywhere: zero, not NaN.
    empty = gate_kl_loss(log_probs, torch.zeros_like(valid), torch.zeros_like(target))
    assert empty.item() == 0.0


def test_gate_loss_collects_layers():
    log_probs, valid, target = causal_gate_inputs()
    collector = GateLoss(0.25)
    collector(log_probs, valid, target)
    collector(log_probs, valid, target * 0)  # a layer without target adds zero
    collector(log_probs.roll(1, dims=0), valid, target)
    expected = gate_kl_loss(log_probs, valid, target) + gate_kl_loss(log_probs.roll(1, dims=0), valid, target)
    torch.testing.assert_close(collector.pop_total(), expected)
    with pytest.raises(RuntimeError, match="no SeerAttention layer produced a gate loss"):
        collector.pop_total()  # popped: empty again
    with pytest.raises(ValueError, match=r"skip_first_fraction must be in \[0, 1\), got 1.0"):
        GateLoss(1.0)


# --------------------------------------------------------------------------------------------------------------------
# train_gates on a tiny Llama
# --------------------------------------------------------------------------------------------------------------------


def peaked_llama(seed: int = 0):
    """A tiny Llama whose q/k projections are scaled up: peaked attention, a target far from uniform."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(copy.deepcopy(LLAMA), attn_implementation="sdpa")
    assert model.config._attn_implementation == "sdpa"
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(3.0)
            layer.self_attn.k_proj.weight.mul_(3.0)
    return model


def model_at_rng(seed: int):
    """``peaked_llama()`` (always the same weights), then the global RNG at ``seed``: a run's result must depend on
    its config's seed only."""
    model = peaked_llama()
    torch.manual_seed(seed)
    return model


def token_dataset(rows: int, seq: int, *, distinct: bool, seed: int = 1) -> Dataset:
    generator = torch.Generator().manual_seed(seed)
    if distinct:
        ids = torch.randint(3, VOCAB, (rows, seq), generator=generator)
    else:
        ids = torch.randint(3, VOCAB, (1, seq), generator=generator).repeat(rows, 1)
    return Dataset.from_dict({"input_ids": ids.tolist()})


def training_config(output_dir, **overrides) -> GateTrainingConfig:
    settings = {
        "output_dir": str(output_dir), "block_size": BLOCK, "gate_dim": GATE_DIM, "global_batch_size": 2,
        "learning_rate": 1e-2, "progress": False, "logging_steps": 1, "save_steps": 2,
    }  # fmt: skip
    return GateTrainingConfig(**{**settings, **overrides})


def gates_of(model) -> dict[str, torch.Tensor]:
    return {
        f"{state.layer_index}.{name}": parameter.detach().clone()
        for state in hf_fastattn.layer_states(model)
        for name, parameter in state.gate.named_parameters()
    }


def artifact_gates(directory) -> dict[str, torch.Tensor]:
    _, tensors = read_artifact(directory)
    return tensors


class TrainingSpy:
    """Per micro-batch losses, the gates before the first update, and the kernel calls of gate training."""

    def __init__(self, monkeypatch, model, *, crash_at: int | None = None):
        self.losses, self.initial_gates, self.targets, self.fallbacks = [], None, 0, 0
        real_pop = GateLoss.pop_total

        def pop_total(collector):
            if crash_at is not None and len(self.losses) + 1 == crash_at:
                raise RuntimeError("simulated crash")
            if self.initial_gates is None and model is not None:
                self.initial_gates = gates_of(model)
            total = real_pop(collector)
            self.losses.append(total.item())
            return total

        monkeypatch.setattr(GateLoss, "pop_total", pop_total)
        real_target = seer._KERNELS.target

        def target(*args, **kwargs):
            self.targets += 1
            return real_target(*args, **kwargs)

        monkeypatch.setattr(seer, "_KERNELS", dataclasses.replace(seer._KERNELS, target=target))
        real_fallback = hf_fastattn.dispatch.sdpa_fallback

        def fallback(*args, **kwargs):
            self.fallbacks += 1
            return real_fallback(*args, **kwargs)

        monkeypatch.setattr(hf_fastattn.dispatch, "sdpa_fallback", fallback)


def test_training_forward_feeds_the_loss_exact_targets_and_gate_scores(monkeypatch):
    """With the loss sink installed (as ``train_gates`` does), each layer computes exact attention (eager's logits)
    and hands the loss the gate's log-probabilities on the pre-RoPE pools and the normalised, GQA max-pooled ground
    truth: both recomputed here with the plain-PyTorch references on the recorded q/k/v, on a left-padded batch."""
    model = peaked_llama()
    reference = AutoModelForCausalLM.from_config(copy.deepcopy(LLAMA), attn_implementation="eager").eval()
    reference.load_state_dict(model.state_dict())
    assert reference.config._attn_implementation == "eager"
    parameters = prepare_for_gate_training(model, block_size=BLOCK, gate_dim=GATE_DIM)
    assert len(parameters) == 4
    assert all(parameter.requires_grad and parameter.dtype == torch.float32 for parameter in parameters)
    assert [name for name, p in model.named_parameters() if p.requires_grad] == [
        name for name in dict(model.named_parameters()) if ".fastattn_state.gate." in name
    ]
    spy = TrainingSpy(monkeypatch, model)
    calls = []
    real_target = seer._KERNELS.target

    def target_kernel(query, key, value, **kwargs):
        calls.append((query, key, value, kwargs))
        return real_target(query, key, value, **kwargs)

    monkeypatch.setattr(seer, "_KERNELS", dataclasses.replace(seer._KERNELS, target=target_kernel))
    received = []
    states = hf_fastattn.layer_states(model)
    for state in states:
        setattr(
            state, seer.GATE_LOSS_SINK, lambda log_probs, valid, target: received.append((log_probs, valid, target))
        )
    ids = torch.randint(3, VOCAB, (2, 48), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    mask[1, :19] = 0
    logits = model(input_ids=ids, attention_mask=mask).logits
    with torch.no_grad():
        expected_logits = reference(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(logits.detach()[mask.bool()], expected_logits[mask.bool()], atol=1e-4, rtol=1e-4)
    assert len(calls) == len(received) == 2 and spy.fallbacks == 0
    for state, (query, key, value, kwargs), (log_probs, valid, target) in zip(states, calls, received):
        assert log_probs.requires_grad and not target.requires_grad
        _, block_target = attention_with_block_target_reference(
            query, key, value, causal=True, scale=kwargs["scale"], key_padding=kwargs["key_padding"], block_size=BLOCK
        )
        torch.testing.assert_close(target, normalise_target(block_target, 2), atol=1e-5, rtol=1e-5)
        expected_log_probs, expected_valid = seer.gate_log_probs(
            state.gate, query, key, causal=True, key_padding=mask, rotary=model.model.rotary_emb,
            pool=pool_blocks_reference,
        )  # fmt: skip
        assert torch.equal(valid, expected_valid) and not valid[1, :, 0].any()  # row 1's first block is all padding
        torch.testing.assert_close(log_probs, expected_log_probs, atol=1e-4, rtol=1e-4)
        assert torch.isfinite(gate_kl_loss(log_probs, valid, target))


def test_train_gates_learns_with_a_frozen_model(tmp_path, monkeypatch):
    """A fixed repeated batch, constant learning rate: the gate loss falls, only gate parameters move, the ground-truth
    kernel (not SDPA) ran every layer, and the artifact loads with ``patch(..., gates=...)``."""
    model = peaked_llama()
    base = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    spy = TrainingSpy(monkeypatch, model)
    steps = 6
    config = training_config(
        tmp_path, max_steps=steps, save_steps=100, lr_scheduler="constant", warmup_steps=0, learning_rate=5e-3
    )
    gates_dir = train_gates(model, None, config, dataset=token_dataset(8, 48, distinct=False))
    assert gates_dir == Path(tmp_path) / "gates"

    # Two micro-batches of one row per step (global batch 2), every layer on the ground-truth kernel.
    assert len(spy.losses) == 2 * steps and spy.targets == 2 * steps * 2 and spy.fallbacks == 0
    per_step = spy.losses[::2]
    assert all(loss > 0 for loss in spy.losses), "a KL divergence"
    assert spy.losses[1::2] == pytest.approx(per_step)  # the same batch, no update between micro-batches
    # Measured (seeds 0 and 1): 2.9 -> 0.5 and 2.8 -> 0.3; at 1e-2 the first steps overshoot.
    assert per_step[-1] < 0.5 * per_step[0], per_step
    assert sum(per_step[-2:]) < 0.5 * sum(per_step[:2]), per_step

    state, parameters = model.state_dict(), dict(model.named_parameters())
    added = sorted(name for name in state if name not in base)
    assert len(added) == 4 and all(".fastattn_state.gate." in name for name in added), added
    for name, tensor in base.items():
        assert torch.equal(state[name], tensor), f"{name} changed: the base model must stay frozen"
        if name in parameters:
            assert not parameters[name].requires_grad
    trained = gates_of(model)
    assert trained.keys() == spy.initial_gates.keys() and len(trained) == 4
    for name in trained:
        assert (trained[name] - spy.initial_gates[name]).abs().max() > 1e-3, f"gate {name} did not train"
    for state in hf_fastattn.layer_states(model):
        assert not hasattr(state, seer.GATE_LOSS_SINK)  # removed after training

    config_json, _ = read_artifact(gates_dir)
    metadata = config_json["metadata"]
    assert metadata["seer_gate_version"] == seer.GATE_FORMAT_VERSION == 1
    training = metadata["training"]
    assert training["steps"] == steps and training["resumed_from"] is None and training["processes"] == 1
    assert training["block_size"] == BLOCK and training["gate_dim"] == GATE_DIM
    assert training["first_logged_loss"] == pytest.approx(per_step[0], rel=1e-3)
    assert training["last_logged_loss"] == pytest.approx(per_step[-1], rel=1e-3)

    fresh = peaked_llama(seed=3)
    hf_fastattn.patch(fresh, "seer", gates=gates_dir)
    loaded = gates_of(fresh)
    assert all(torch.equal(loaded[name], trained[name]) for name in trained)
    assert [state.config["block_size"] for state in hf_fastattn.layer_states(fresh)] == [BLOCK] * 2


def test_resume_from_a_shorter_run(tmp_path):
    """A 2-step run leaves checkpoint-2; a 4-step run with ``resume`` continues from it. With a constant learning
    rate the result is that of an uninterrupted 4-step run (a decaying schedule would not be: the 2-step run decays
    over 2 steps). The runs start from different global RNG states: the config's seed alone fixes the gates' start."""
    dataset = token_dataset(8, SEQ, distinct=True)
    constant = {"lr_scheduler": "constant", "warmup_steps": 0}
    train_gates(model_at_rng(123), None, training_config(tmp_path / "run", max_steps=2, **constant), dataset=dataset)
    assert (tmp_path / "run" / "checkpoint-2").is_dir()
    resumed = train_gates(
        model_at_rng(456), None, training_config(tmp_path / "run", max_steps=4, resume=True, **constant),
        dataset=dataset,
    )  # fmt: skip
    training = read_artifact(resumed)[0]["metadata"]["training"]
    assert training["resumed_from"].endswith("checkpoint-2") and training["steps"] == 4
    straight = train_gates(
        model_at_rng(789), None, training_config(tmp_path / "straight", max_steps=4, **constant), dataset=dataset
    )
    assert read_artifact(straight)[0]["metadata"]["training"]["resumed_from"] is None
    got, expected = artifact_gates(resumed), artifact_gates(straight)
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-6, rtol=1e-6)


def test_resume_after_a_crash_matches_an_uninterrupted_run(tmp_path, monkeypatch):
    """The default cosine schedule with warm-up: a run killed during step 3 resumes from checkpoint-2 (optimizer,
    scheduler, data order) and ends where an uninterrupted run with the same config ends."""
    dataset = token_dataset(8, SEQ, distinct=True)
    config = training_config(tmp_path / "run", max_steps=4, warmup_steps=1, seed=5)
    assert config.lr_scheduler == "cosine"
    with monkeypatch.context() as patched:
        TrainingSpy(patched, None, crash_at=5)  # the first micro-batch of step 3
        with pytest.raises(RuntimeError, match="simulated crash"):
            train_gates(model_at_rng(1), None, config, dataset=dataset)
    assert sorted(path.name for path in (tmp_path / "run").iterdir()) == ["checkpoint-2"]
    resumed = train_gates(model_at_rng(2), None, config, dataset=dataset)
    assert read_artifact(resumed)[0]["metadata"]["training"]["resumed_from"].endswith("checkpoint-2")
    straight = train_gates(
        model_at_rng(3), None, dataclasses.replace(config, output_dir=str(tmp_path / "straight")), dataset=dataset
    )
    got, expected = artifact_gates(resumed), artifact_gates(straight)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-6, rtol=1e-6)


# --------------------------------------------------------------------------------------------------------------------
# Configuration files, batch arithmetic, the CLI
# --------------------------------------------------------------------------------------------------------------------


def test_config_from_yaml_and_json(tmp_path):
    yaml_path = tmp_path / "seer.yaml"
    yaml_path.write_text(
        "block_size: 32\ngate_dim: 64\nlearning_rate: 5.0e-4\nextra_training_arguments:\n  bf16: false\n"
    )
    config = GateTrainingConfig.from_file(yaml_path)
    assert (config.block_size, config.gate_dim, config.learning_rate) == (32, 64, 5e-4)
    assert config.extra_training_arguments == {"bf16": False}
    assert config.sequence_length == GateTrainingConfig().sequence_length  # untouched defaults
    # Flags win over the file; None means "not given".
    config = GateTrainingConfig.from_file(yaml_path, block_size=16, gate_dim=None)
    assert (config.block_size, config.gate_dim) == (16, 64)

    json_path = tmp_path / "seer.json"
    json_path.write_text(json.dumps({"max_steps": 7, "global_batch_size": 8, "resume": False}))
    config = GateTrainingConfig.from_file(json_path)
    assert (config.max_steps, config.global_batch_size, config.resume) == (7, 8, False)

    (tmp_path / "empty.yaml").write_text("")
    assert GateTrainingConfig.from_file(tmp_path / "empty.yaml") == GateTrainingConfig()


def test_recipe_config_spells_out_the_defaults():
    (path,) = Path(__file__).resolve().parents[2].glob("recipes/configs/seer_smollm2_8k.yaml")
    config = GateTrainingConfig.from_file(path)
    assert dataclasses.replace(config, output_dir=GateTrainingConfig().output_dir) == GateTrainingConfig()


@pytest.mark.parametrize(
    ("name", "text", "error", "message"),
    [
        ("typo.yaml", "block_size: 32\nlearning_rat: 0.1\n", ValueError, r"setting\(s\) \['learning_rat'\]"),
        ("typo.json", '{"blok_size": 32}', ValueError, r"unknown gate-training setting\(s\) \['blok_size'\]"),
        ("bad.json", '{"block_size": 32', ValueError, r"bad\.json is not valid JSON"),
        ("bad.yaml", "block_size: [32\n", ValueError, r"bad\.yaml is not valid YAML"),
        ("list.yaml", "- block_size\n", TypeError, r"list\.yaml must hold a mapping of settings, not a list"),
    ],
)
def test_bad_config_files_are_refused(tmp_path, name, text, error, message):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(error, match=message):
        GateTrainingConfig.from_file(path)


@pytest.mark.parametrize(
    ("global_batch", "per_device", "processes", "accumulation"),
    [(4, 1, 1, 4), (4, 1, 2, 2), (4, 2, 1, 2), (4, 2, 2, 1), (8, 2, 4, 1), (6, 1, 3, 2)],
)
def test_gradient_accumulation_keeps_the_global_batch(global_batch, per_device, processes, accumulation):
    config = GateTrainingConfig(global_batch_size=global_batch, per_device_batch_size=per_device)
    assert config.gradient_accumulation(processes) == accumulation
    assert accumulation * per_device * processes == global_batch


@pytest.mark.parametrize(("global_batch", "per_device", "processes"), [(4, 1, 3), (4, 3, 1), (2, 2, 2), (5, 2, 1)])
def test_gradient_accumulation_refuses_an_uneven_global_batch(global_batch, per_device, processes):
    config = GateTrainingConfig(global_batch_size=global_batch, per_device_batch_size=per_device)
    with pytest.raises(ValueError, match=f"global_batch_size={global_batch} is not a multiple of"):
        config.gradient_accumulation(processes)


@pytest.mark.parametrize(
    ("name", "text"),
    [("typo.yaml", "learning_rat: 0.1\n"), ("bad.json", "{"), ("bad.yaml", "a: [1\n"), ("list.yaml", "- 1\n")],
)
def test_cli_bad_config_file_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys, name, text):
    def no_training(*args, **kwargs):
        raise AssertionError("a bad config file must not start a training run")

    monkeypatch.setattr(hf_fastattn.training, "train_gates", no_training)
    path = tmp_path / name
    path.write_text(text)
    assert cli.main(["train-gates", "--config", str(path), "--out", str(tmp_path / "out")]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hf-fastattn train-gates: "), captured.err
    assert "Traceback" not in captured.err and captured.out == ""
    assert not (tmp_path / "out").exists()


def test_cli_missing_config_file(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(hf_fastattn.training, "train_gates", lambda *args, **kwargs: pytest.fail("must not train"))
    assert cli.main(["train-gates", "--config", str(tmp_path / "nowhere.yaml")]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("hf-fastattn train-gates: ") and "nowhere.yaml" in line
