"""Calibration and training recipes' library code (thresholds, gates), driven by ``recipes/`` and the CLI."""

from .bsfa import BsfaCalibration, calibrate_bsfa
from .windows import token_windows

__all__ = ["BsfaCalibration", "calibrate_bsfa", "token_windows"]
