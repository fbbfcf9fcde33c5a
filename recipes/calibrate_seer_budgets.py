"""Calibrate SeerAttention budgets: ``python recipes/calibrate_seer_budgets.py --model smollm2 --out artifacts/budgets``.

A thin entry point: the same options and code as ``hf-fastattn calibrate seer`` (``hf_fastattn.calibrate_seer_budgets``).
The artifact then serves ``hf_fastattn.patch(model, "seer", gates=GATES, budgets=DIR, sparsity=0.8)`` and
``hf-fastattn eval ppl --methods dense,seer:sparsity=0.8 --config seer.gates=GATES --config seer.budgets=DIR``.
"""

import sys

from hf_fastattn.cli import main

if __name__ == "__main__":
    sys.exit(main(["calibrate", "seer", *sys.argv[1:]]))
