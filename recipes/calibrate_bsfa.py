"""Calibrate BSFA thresholds: ``python recipes/calibrate_bsfa.py --model smollm2 --out artifacts/bsfa_smollm2``.

A thin entry point: the same options and code as ``hf-fastattn calibrate bsfa`` (``hf_fastattn.calibrate_bsfa``).
The artifact then serves ``hf_fastattn.patch(model, "bsfa", thresholds=DIR)`` and
``hf-fastattn eval ppl --methods dense,bsfa:k=16 --config bsfa.thresholds=DIR``.
"""

import sys

from hf_fastattn.cli import main

if __name__ == "__main__":
    sys.exit(main(["calibrate", "bsfa", *sys.argv[1:]]))
