"""Train SeerAttention gates: ``python recipes/train_seer_gates.py --config recipes/configs/seer_smollm2_8k.yaml``.

A thin entry point: the same options and code as ``hf-fastattn train-gates`` (``hf_fastattn.train_gates``). It runs
unchanged under ``accelerate launch``. The artifact (``<output_dir>/gates``) then serves
``hf_fastattn.patch(model, "seer", gates=DIR)`` and ``hf-fastattn eval ppl --methods dense,seer --config seer.gates=DIR``.
"""

import sys

from hf_fastattn.cli import main

if __name__ == "__main__":
    sys.exit(main(["train-gates", *sys.argv[1:]]))
