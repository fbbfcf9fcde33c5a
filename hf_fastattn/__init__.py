"""hf_fastattn: Triton-backed sparse and structured attention for Hugging Face transformers.

Importing the package registers every method with transformers as ``fastattn_<method>``::

    import hf_fastattn
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="fastattn_dense")
    hf_fastattn.patch(model, "dense")            # or: with hf_fastattn.use(model, "dense"): ...
"""

from ._version import __version__
from .artifacts import ArtifactError, load_state, save_state
from .calibration import BsfaCalibration, SeerBudgets, calibrate_bsfa, calibrate_seer_budgets
from .capabilities import Capabilities, MethodSpec
from .patch import attention_modules, layer_states, patch, unpatch, use
from .registry import get_method, list_methods, register_all
from .training import GateTrainingConfig, train_gates

register_all()

__all__ = [
    "ArtifactError",
    "BsfaCalibration",
    "Capabilities",
    "GateTrainingConfig",
    "MethodSpec",
    "SeerBudgets",
    "__version__",
    "attention_modules",
    "calibrate_bsfa",
    "calibrate_seer_budgets",
    "get_method",
    "layer_states",
    "list_methods",
    "load_state",
    "patch",
    "save_state",
    "train_gates",
    "unpatch",
    "use",
]
