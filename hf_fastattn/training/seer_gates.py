"""SeerAttention gate training: self-distillation of the block gates with ``transformers.Trainer``.

The base model is frozen; only the per-layer :class:`~hf_fastattn.methods.seer.AttnGate` parameters train. Every
attention layer runs the ground-truth kernel (:func:`hf_fastattn.ops.seer.attention_with_block_target`): exact dense
attention, so the model's activations are the dense model's, plus the 2-D max-pooled attention map, max-pooled over
each GQA group and row-normalised. The loss is the KL divergence from that target to the gate's block distribution,
averaged over query-block rows, summed over layers. The first ``skip_first_fraction`` of query-block rows (a quarter,
as in SeerAttention) carry no loss: their rows have few blocks and an easy, noisy target.

Scaling out is ``accelerate launch``'s job: DDP (``recipes/accelerate/2gpu.yaml``), or FSDP2 for a model too large to
replicate (``recipes/accelerate/2gpu_fsdp.yaml``; FSDP1 is refused). :class:`GateTrainingConfig` holds the *global*
batch, and the gradient accumulation is derived from the number of processes, so the effective batch does not depend
on how many processes run. Only the main process writes the gate artifact, into a new folder that then replaces
``<output_dir>/gates`` whole.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import inspect
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..calibration.windows import token_windows
from ..methods.seer import GATE_FORMAT_VERSION, GATE_LOSS_SINK
from ..patch import layer_states, patch

GATES_DIRNAME = "gates"


@dataclass
class GateTrainingConfig:
    """Settings of one gate-training run; :meth:`from_file` reads them from JSON or YAML.

    The defaults train SmolLM2-135M's gates at 8k tokens on one H100.
    """

    model: str = "smollm2"
    data: str = "default"  # token_windows: "default" (Austen train + Python docs), "austen", "pydocs"
    sequence_length: int = 8192
    samples: int = 160
    epochs: float = 8.0
    max_steps: int = -1
    global_batch_size: int = 4
    per_device_batch_size: int = 1
    learning_rate: float = 1e-3
    lr_scheduler: str = "cosine"
    warmup_steps: int = 10
    weight_decay: float = 0.0
    block_size: int = 64
    gate_dim: int = 128
    skip_first_fraction: float = 0.25
    seed: int = 0
    logging_steps: int = 5
    save_steps: int = 25
    save_total_limit: int = 2
    output_dir: str = "artifacts/seer_gates"
    resume: bool = True
    device: str | None = None
    dtype: str | None = None
    progress: bool = True
    extra_training_arguments: dict = field(default_factory=dict)

    @classmethod
    def from_file(cls, path: str | Path, **overrides) -> GateTrainingConfig:
        path = Path(path)
        text = path.read_text()
        if path.suffix in (".yaml", ".yml"):
            import yaml

            try:
                values = yaml.safe_load(text) or {}
            except yaml.YAMLError as error:
                raise ValueError(f"{path} is not valid YAML ({error})") from error
        else:
            try:
                values = json.loads(text)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path} is not valid JSON ({error})") from error
        if not isinstance(values, dict):
            raise TypeError(f"{path} must hold a mapping of settings, not a {type(values).__name__}")
        values.update({key: value for key, value in overrides.items() if value is not None})
        unknown = sorted(set(values) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"{path}: unknown gate-training setting(s) {unknown}")
        return cls(**values)

    def gradient_accumulation(self, num_processes: int) -> int:
        per_step = self.per_device_batch_size * num_processes
        if self.global_batch_size % per_step:
            raise ValueError(
                f"global_batch_size={self.global_batch_size} is not a multiple of per_device_batch_size "
                f"({self.per_device_batch_size}) x processes ({num_processes})"
            )
        return self.global_batch_size // per_step


class GateLoss:
    """Collects each layer's gate loss during one forward; installed on every SeerAttention layer's state."""

    def __init__(self, skip_first_fraction: float):
        if not 0.0 <= skip_first_fraction < 1.0:
            raise ValueError(f"skip_first_fraction must be in [0, 1), got {skip_first_fraction}")
        self.skip_first_fraction = skip_first_fraction
        self.layer_losses: list[torch.Tensor] = []

    def __call__(self, log_probs: torch.Tensor, valid: torch.Tensor, target: torch.Tensor) -> None:
        self.layer_losses.append(gate_kl_loss(log_probs, valid, target, self.skip_first_fraction))

    def pop_total(self) -> torch.Tensor:
        if not self.layer_losses:
            raise RuntimeError("no SeerAttention layer produced a gate loss: is the model patched with 'seer'?")
        total = torch.stack(self.layer_losses).sum()
        self.layer_losses = []
        return total


def gate_kl_loss(log_probs, valid, target, skip_first_fraction: float = 0.25) -> torch.Tensor:
    """Mean over query-block rows of ``KL(target || gate)``; rows without target and the first rows are left out."""
    rows = target.shape[-2]
    weight = (torch.arange(rows, device=target.device) >= int(rows * skip_first_fraction)).float()
    weight = weight * (target.sum(-1) > 0)
    target = target.float()
    log_target = torch.log(target.clamp(min=torch.finfo(torch.float32).tiny))
    kl = (target * (log_target - log_probs.masked_fill(~valid, 0.0))).sum(-1)
    return (kl * weight).sum() / weight.sum().clamp(min=1.0)


def _trainer_class():
    from transformers import Trainer

    class GateTrainer(Trainer):
        """``Trainer`` whose loss is the summed per-layer gate KL (no language-model loss)."""

        def __init__(self, *args, gate_loss: GateLoss, **kwargs):
            super().__init__(*args, **kwargs)
            self.gate_loss = gate_loss

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            inputs = {name: value for name, value in inputs.items() if name != "labels"}
            # The logits are not needed: ask a causal LM for the last position only.
            if "logits_to_keep" in inspect.signature(self.accelerator.unwrap_model(model).forward).parameters:
                inputs["logits_to_keep"] = 1
            outputs = model(**inputs)
            loss = self.gate_loss.pop_total()
            return (loss, outputs) if return_outputs else loss

    return GateTrainer


def prepare_for_gate_training(model: nn.Module, *, block_size: int = 64, gate_dim: int = 128, gates=None) -> list:
    """Freeze ``model``, patch it with fresh (or ``gates``) SeerAttention gates in fp32; returns the gate parameters."""
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    config = {"block_size": block_size, "gate_dim": gate_dim}
    if gates is not None:
        config["gates"] = gates
    patch(model, "seer", **config)
    parameters = []
    for state in layer_states(model):
        state.gate.float()
        for parameter in state.gate.parameters():
            parameter.requires_grad_(True)
            parameters.append(parameter)
    return parameters


def train_gates(
    model: nn.Module | None = None,
    tokenizer=None,
    config: GateTrainingConfig | None = None,
    *,
    dataset=None,
) -> Path:
    """Train SeerAttention gates for ``model`` and save them; returns the gate artifact directory.

    Without ``model`` the one named by ``config.model`` is loaded (asset name, folder or hub id). ``dataset`` is a
    ``datasets.Dataset`` with ``input_ids`` rows of ``config.sequence_length`` tokens; by default it is built from the
    training split of the local text (never the evaluation text). Checkpoints go to ``config.output_dir``; with
    ``config.resume`` a run continues from the newest one. The artifact is ``<output_dir>/gates``: load it with
    ``hf_fastattn.patch(model, "seer", gates=...)``.
    """
    from transformers import TrainingArguments, default_data_collator, set_seed
    from transformers.trainer_utils import get_last_checkpoint

    from .._distributed import process_state
    from .._io import atomic_directory
    from ..artifacts import save_state
    from ..assets.models import load_model, resolve_device, resolve_dtype

    config = config or GateTrainingConfig()
    device = resolve_device(config.device) if model is None else next(model.parameters()).device
    state = process_state(device)
    if model is None:
        model, tokenizer = load_model(config.model, dtype=resolve_dtype(config.dtype, device), device=device)
    if dataset is None:
        dataset = _windows_dataset(tokenizer, config)
    set_seed(config.seed)  # the gates' initialisation too (Trainer seeds only once the gates exist)
    prepare_for_gate_training(model, block_size=config.block_size, gate_dim=config.gate_dim)
    gate_loss = GateLoss(config.skip_first_fraction)
    for layer in layer_states(model):
        setattr(layer, GATE_LOSS_SINK, gate_loss)

    output_dir = Path(config.output_dir)
    arguments = TrainingArguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=config.per_device_batch_size,
        gradient_accumulation_steps=config.gradient_accumulation(state.num_processes),
        learning_rate=config.learning_rate,
        lr_scheduler_type=config.lr_scheduler,
        warmup_steps=config.warmup_steps,
        weight_decay=config.weight_decay,
        num_train_epochs=config.epochs,
        max_steps=config.max_steps,
        logging_steps=config.logging_steps,
        save_steps=config.save_steps,
        save_total_limit=config.save_total_limit,
        seed=config.seed,
        report_to=[],
        disable_tqdm=not config.progress,
        remove_unused_columns=False,
        # Every gate trains in every forward, but through the loss sink, not the model's outputs: DDP's search for
        # unused parameters starts from the outputs, so it would mark every gate unused (then ready twice).
        ddp_find_unused_parameters=False,
        use_cpu=device.type == "cpu",
        **config.extra_training_arguments,
    )
    trainer = _trainer_class()(
        model=model, args=arguments, train_dataset=dataset, data_collator=default_data_collator, gate_loss=gate_loss
    )
    if trainer.is_fsdp_enabled and not trainer.accelerator.is_fsdp2:
        # FSDP1 flattens each wrapped layer's parameters into one tensor of one dtype: the fp32 gates sit beside the
        # model's bf16 weights.
        raise ValueError("gate training under FSDP needs fsdp_version: 2 (see recipes/accelerate/2gpu_fsdp.yaml)")
    checkpoint = get_last_checkpoint(str(output_dir)) if config.resume and output_dir.is_dir() else None
    start = time.perf_counter()
    try:
        result = trainer.train(resume_from_checkpoint=checkpoint)
    finally:
        for layer in layer_states(model):
            delattr(layer, GATE_LOSS_SINK)
    gates_dir = output_dir / GATES_DIRNAME
    with _whole_gates(model):
        if trainer.is_world_process_zero():
            losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
            metadata = {
                "seer_gate_version": GATE_FORMAT_VERSION,
                "training": {
                    **{k: v for k, v in dataclasses.asdict(config).items() if k != "extra_training_arguments"},
                    "processes": state.num_processes,
                    "steps": trainer.state.global_step,
                    "resumed_from": checkpoint,
                    "seconds": time.perf_counter() - start,
                    "train_loss": result.training_loss,
                    "first_logged_loss": losses[0] if losses else None,
                    "last_logged_loss": losses[-1] if losses else None,
                },
            }
            with atomic_directory(gates_dir, replace=True) as staging:
                save_state(model, staging, metadata=metadata)
    state.wait_for_everyone()
    return gates_dir


@contextlib.contextmanager
def _whole_gates(model: nn.Module) -> Iterator[None]:
    """The gates' parameters whole inside the block, every process taking part in gathering them.

    Under FSDP2 each process holds a shard of every parameter (a ``DTensor``). Only the gates are gathered, not the
    model (that might not fit on one GPU); the shards are back in place after the block. Without FSDP: nothing to do.
    """
    from torch.distributed.tensor import DTensor

    sharded = [
        (module, name, parameter)
        for layer in layer_states(model)
        for module in layer.gate.modules()
        for name, parameter in module.named_parameters(recurse=False)
        if isinstance(parameter, DTensor)
    ]
    for module, name, parameter in sharded:
        setattr(module, name, nn.Parameter(parameter.full_tensor(), requires_grad=False))
    try:
        yield
    finally:
        for module, name, parameter in sharded:
            setattr(module, name, parameter)


def _windows_dataset(tokenizer, config: GateTrainingConfig):
    from datasets import Dataset
    from datasets.table import InMemoryTable

    windows, source = token_windows(config.data, tokenizer, samples=config.samples, length=config.sequence_length)
    # The fingerprint is the windows' content hash: the same text gives the same fingerprint, and datasets need not
    # pickle the table to derive one (its dill hashing of pyarrow types fails on Python 3.12 with pyarrow 26).
    fingerprint = hashlib.sha256(windows.numpy().tobytes()).hexdigest()[:16]
    dataset = Dataset(InMemoryTable.from_pydict({"input_ids": windows.tolist()}), fingerprint=fingerprint)
    dataset.info.description = f"{len(windows)} windows of {config.sequence_length} tokens from {source}"
    return dataset
