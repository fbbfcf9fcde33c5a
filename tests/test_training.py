"""Fine-tuning tiny models with ``transformers.Trainer`` on the CPU through ``fastattn_dense``.

With ``TRITON_INTERPRET=1`` (set by ``tests/conftest.py`` without a GPU) the Triton forward and backward kernels run in
Triton's interpreter, so the models and step counts are tiny. Each test checks that the loss falls, that the model was
on ``fastattn_dense`` while it trained, and (through a spy on the kernel launchers) that the fast path really ran
forward and backward rather than a fallback.
"""

from __future__ import annotations

import copy
import inspect
import logging

import pytest
import torch
from datasets import Dataset
from transformers import (
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    LlamaConfig,
    RobertaConfig,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

import hf_fastattn
import hf_fastattn.dispatch
import hf_fastattn.methods.dense
import hf_fastattn.ops.dense.attention
from hf_fastattn.ops._runtime import interpreter_enabled

FAST = "fastattn_dense"
VOCAB = 64
SEQ = 16
ROBERTA_PAD, ROBERTA_MASK = 1, 4

# transformers 5.x renamed gradient checkpointing to activation checkpointing (the old names warn, and go in v6).
_RENAMED = "activation_checkpointing" in inspect.signature(TrainingArguments).parameters
CHECKPOINTING_ARG = "activation_checkpointing" if _RENAMED else "gradient_checkpointing"
CHECKPOINTING_FLAG = "is_activation_checkpointing" if _RENAMED else "is_gradient_checkpointing"


class AttentionSpy:
    """Counts Triton kernel launches, reference calls and SDPA fallbacks made through hf_fastattn."""

    def __init__(self, monkeypatch):
        self.kernel_fwd = self.kernel_bwd = self.reference = self.fallbacks = 0
        attention, methods, dispatch = hf_fastattn.ops.dense.attention, hf_fastattn.methods.dense, hf_fastattn.dispatch
        originals = {
            (attention, "dense_fwd"): "kernel_fwd",
            (attention, "dense_bwd"): "kernel_bwd",
            (methods, "dense_attention_reference"): "reference",
            (dispatch, "sdpa_fallback"): "fallbacks",
        }
        for (module, name), counter in originals.items():
            monkeypatch.setattr(module, name, self._counting(getattr(module, name), counter))

    def _counting(self, function, counter):
        def wrapper(*args, **kwargs):
            setattr(self, counter, getattr(self, counter) + 1)
            return function(*args, **kwargs)

        return wrapper

    def assert_fast_path(self, *, backward: bool):
        assert self.fallbacks == 0, f"{self.fallbacks} calls fell back to SDPA"
        if interpreter_enabled():
            assert self.kernel_fwd > 0 and self.reference == 0
            assert (self.kernel_bwd > 0) == backward
        else:
            assert self.reference > 0


@pytest.fixture
def spy(monkeypatch):
    return AttentionSpy(monkeypatch)


class RecordImplementation(TrainerCallback):
    """Records, at every optimizer step, the attention implementation and whether checkpointing is on."""

    def __init__(self):
        self.implementations: list[str] = []
        self.checkpointing: list[bool] = []
        self.training: list[bool] = []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.implementations.append(model.config._attn_implementation)
        self.checkpointing.append(bool(getattr(model, CHECKPOINTING_FLAG, False)))
        self.training.append(model.training)


# --------------------------------------------------------------------------------------------------------------------
# Data: a handful of random sequences repeated, so there is a pattern to learn and the loss falls quickly
# --------------------------------------------------------------------------------------------------------------------


def causal_lm_dataset(num_patterns: int = 4, copies: int = 16) -> Dataset:
    generator = torch.Generator().manual_seed(0)
    patterns = torch.randint(3, VOCAB, (num_patterns, SEQ), generator=generator)
    ids = patterns.repeat(copies, 1)
    return Dataset.from_dict(
        {"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist(), "labels": ids.tolist()}
    )


def masked_lm_dataset(num_patterns: int = 4, copies: int = 16) -> Dataset:
    """Patterns with a fixed set of masked positions; every other row is right-padded by 3 tokens."""
    generator = torch.Generator().manual_seed(0)
    patterns = torch.randint(5, VOCAB, (num_patterns, SEQ), generator=generator)
    ids = patterns.repeat(copies, 1)
    labels = torch.full_like(ids, -100)
    masked = torch.rand(ids.shape, generator=generator) < 0.25
    masked[:, 0] = False  # keep <s>-like first token and make sure every row has something to predict
    masked[:, 1] = True
    labels[masked] = ids[masked]
    inputs = ids.masked_fill(masked, ROBERTA_MASK)
    attention = torch.ones_like(ids)
    attention[1::2, -3:] = 0
    inputs[1::2, -3:] = ROBERTA_PAD
    labels[1::2, -3:] = -100
    return Dataset.from_dict(
        {"input_ids": inputs.tolist(), "attention_mask": attention.tolist(), "labels": labels.tolist()}
    )


# --------------------------------------------------------------------------------------------------------------------
# Tiny models
# --------------------------------------------------------------------------------------------------------------------


def llama_config() -> LlamaConfig:
    return LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,  # GQA
        head_dim=16,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )


def roberta_config(attention_dropout: float = 0.0) -> RobertaConfig:
    return RobertaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        pad_token_id=ROBERTA_PAD,
        attention_probs_dropout_prob=attention_dropout,
        hidden_dropout_prob=0.0,
    )


def llama_pair() -> tuple[torch.nn.Module, torch.nn.Module]:
    """(eager reference, copy patched with ``hf_fastattn.patch``) with identical initial weights."""
    torch.manual_seed(0)
    reference = AutoModelForCausalLM.from_config(copy.deepcopy(llama_config()), attn_implementation="eager")
    model = AutoModelForCausalLM.from_config(copy.deepcopy(llama_config()), attn_implementation="eager")
    model.load_state_dict(reference.state_dict())
    hf_fastattn.patch(model, "dense")
    assert model.config._attn_implementation == FAST
    assert reference.config._attn_implementation == "eager"
    assert [state.method for state in hf_fastattn.layer_states(model)] == ["dense", "dense"]
    return reference, model


def roberta_pair(attention_dropout: float = 0.0) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(eager reference, ``from_config(..., attn_implementation="fastattn_dense")``) with identical initial weights."""
    config = roberta_config(attention_dropout)
    torch.manual_seed(0)
    reference = AutoModelForMaskedLM.from_config(copy.deepcopy(config), attn_implementation="eager")
    model = AutoModelForMaskedLM.from_config(copy.deepcopy(config), attn_implementation=FAST)
    model.load_state_dict(reference.state_dict())
    assert model.config._attn_implementation == FAST
    assert reference.config._attn_implementation == "eager"
    return reference, model


def train(model, dataset, tmp_path, *, max_steps: int, learning_rate: float = 1e-2, **extra):
    args = TrainingArguments(
        output_dir=str(tmp_path),
        use_cpu=True,
        report_to=[],
        max_steps=max_steps,
        learning_rate=learning_rate,
        per_device_train_batch_size=4,
        logging_steps=1,
        save_strategy="no",
        lr_scheduler_type="constant",
        seed=0,
        dataloader_pin_memory=False,
        disable_tqdm=True,
        **extra,
    )
    recorder = RecordImplementation()
    trainer = Trainer(model=model, args=args, train_dataset=dataset, callbacks=[recorder])
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == max_steps, trainer.state.log_history
    assert all(torch.isfinite(torch.tensor(losses)))
    assert recorder.implementations == [model.config._attn_implementation] * max_steps
    assert all(recorder.training)
    return losses, recorder


def assert_same_losses(losses, reference_losses):
    """Same initial weights, data order and optimizer: the kernel path trains like eager attention, step by step."""
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(reference_losses), atol=1e-4, rtol=1e-4)


def assert_loss_falls(losses):
    assert losses[-1] < losses[0], losses
    # Not a single lucky batch: the last few steps are clearly below the first few.
    assert sum(losses[-3:]) / 3 < 0.9 * sum(losses[:3]) / 3, losses


# --------------------------------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------------------------------


def test_trainer_causal_lm_llama(tmp_path, spy):
    reference, model = llama_pair()
    losses, _ = train(model, causal_lm_dataset(), tmp_path / "fast", max_steps=12)
    assert model.config._attn_implementation == FAST
    assert_loss_falls(losses)
    spy.assert_fast_path(backward=True)
    reference_losses, _ = train(reference, causal_lm_dataset(), tmp_path / "eager", max_steps=12)
    assert_same_losses(losses, reference_losses)


def test_trainer_masked_lm_roberta(tmp_path, spy):
    reference, model = roberta_pair(attention_dropout=0.0)
    losses, _ = train(model, masked_lm_dataset(), tmp_path / "fast", max_steps=12)
    assert model.config._attn_implementation == FAST
    assert_loss_falls(losses)
    spy.assert_fast_path(backward=True)
    reference_losses, _ = train(reference, masked_lm_dataset(), tmp_path / "eager", max_steps=12)
    assert_same_losses(losses, reference_losses)


def test_trainer_gradient_checkpointing_llama(tmp_path, spy):
    reference, model = llama_pair()
    checkpointing = {CHECKPOINTING_ARG: True, f"{CHECKPOINTING_ARG}_kwargs": {"use_reentrant": False}}
    losses, recorder = train(model, causal_lm_dataset(), tmp_path / "fast", max_steps=10, **checkpointing)
    assert all(recorder.checkpointing), "gradient checkpointing was not enabled during training"
    assert_loss_falls(losses)
    spy.assert_fast_path(backward=True)
    if interpreter_enabled():
        # Checkpointing recomputes each layer's forward in the backward pass: more forward launches than backward.
        assert spy.kernel_fwd > spy.kernel_bwd
    reference_losses, _ = train(reference, causal_lm_dataset(), tmp_path / "eager", max_steps=10, **checkpointing)
    assert_same_losses(losses, reference_losses)


def test_trainer_attention_dropout_falls_back_with_one_warning(tmp_path, spy, caplog):
    """Attention dropout in training is outside the kernel: SDPA does it, with exactly one logged warning."""
    hf_fastattn.dispatch.reset_warnings()
    _, model = roberta_pair(attention_dropout=0.1)
    with caplog.at_level(logging.WARNING, logger="hf_fastattn"):
        losses, _ = train(model, masked_lm_dataset(), tmp_path, max_steps=4)
    assert len(losses) == 4  # train() checked they are finite
    dropout_warnings = [
        record for record in caplog.records if record.name == "hf_fastattn" and "dropout" in record.getMessage()
    ]
    assert len(dropout_warnings) == 1, [record.getMessage() for record in caplog.records]
    assert "0.1" in dropout_warnings[0].getMessage()
    assert spy.fallbacks > 0
    if interpreter_enabled():
        assert spy.kernel_fwd == 0 and spy.kernel_bwd == 0  # every training call had dropout

    # In eval mode dropout is off, so the same model goes back to the kernel.
    model.eval()
    spy.fallbacks = 0
    batch = masked_lm_dataset()[:3]
    with torch.no_grad():
        model(**{key: torch.tensor(value) for key, value in batch.items()})
    spy.assert_fast_path(backward=False)
