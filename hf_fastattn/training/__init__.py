"""Training recipes' library code: SeerAttention gate training."""

from .seer_gates import GateTrainingConfig, gate_kl_loss, prepare_for_gate_training, train_gates

__all__ = ["GateTrainingConfig", "gate_kl_loss", "prepare_for_gate_training", "train_gates"]
