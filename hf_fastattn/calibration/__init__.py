"""Calibration and training recipes' library code (thresholds, budgets, gates), driven by ``recipes/`` and the CLI."""

from .bsfa import BsfaCalibration, calibrate_bsfa
from .seer_budgets import SeerBudgets, calibrate_seer_budgets
from .windows import token_windows

__all__ = ["BsfaCalibration", "SeerBudgets", "calibrate_bsfa", "calibrate_seer_budgets", "token_windows"]
