"""Gate training over 2 CPU processes: ``recipes/train_seer_gates.py`` unchanged under ``accelerate launch`` (DDP).

A tiny random Llama (``tests/distributed_helpers.py``) trains 2 optimizer steps of a global batch of 2 windows: one
window per process per step. The gates load with ``patch(model, "seer", gates=...)`` and run a forward, and they are
those of one process training the same config (2 micro-batches per step): the effective batch does not depend on the
process count. Both runs take the PyTorch reference path on one thread each.
"""

from __future__ import annotations

import pytest
import torch
from distributed_helpers import REPO, cpu_processes_only, launch_two_processes, tiny_llama_folder

import hf_fastattn
from hf_fastattn.artifacts import read_artifact
from hf_fastattn.assets.models import load_model
from hf_fastattn.evaluation.records import attention_summary
from hf_fastattn.training import GateTrainingConfig, train_gates

pytestmark = [cpu_processes_only, pytest.mark.usefixtures("real_model_on_cpu")]  # see tests/conftest.py

SETTINGS = {"sequence_length": 64, "samples": 4, "max_steps": 2, "global_batch_size": 2, "block_size": 16,
            "gate_dim": 16, "save_steps": 1}  # fmt: skip


def test_two_processes_train_the_gates_one_process_trains(tmp_path):
    model_dir = tiny_llama_folder(tmp_path / "model")
    flags = [f"--{name.replace('_', '-')}={value}" for name, value in SETTINGS.items()]
    recipe = REPO / "recipes" / "train_seer_gates.py"
    two = tmp_path / "two_processes"
    launched = launch_two_processes(
        [str(recipe), "--model", str(model_dir), *flags, "--out", str(two)], triton_interpret=False
    )
    assert launched.stdout.count("gates written to") == 1  # by the main process only
    assert sorted(path.name for path in two.iterdir()) == ["checkpoint-1", "checkpoint-2", "gates"]  # nothing staged
    config, gates = read_artifact(two / "gates")
    training = config["metadata"]["training"]
    assert (training["processes"], training["steps"]) == (2, 2)

    model, tokenizer = load_model(model_dir)
    hf_fastattn.patch(model, "seer", gates=two / "gates", tail_tokens=0)  # the tail would be most of this prompt
    input_ids = tokenizer("It is a truth universally acknowledged. " * 12, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=input_ids).logits
    assert torch.isfinite(logits).all() and 0 < attention_summary(model)["density"] < 1  # gated blocks were skipped

    one = train_gates(config=GateTrainingConfig(model=str(model_dir), output_dir=str(tmp_path / "one"), **SETTINGS))
    assert read_artifact(one)[0]["metadata"]["training"]["processes"] == 1
    expected = read_artifact(one)[1]
    assert gates.keys() == expected.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(gates[name], tensor, atol=1e-6, rtol=1e-5)
