"""Encoder fidelity against dense (MiniLM, DINOv2-S, Fashion-MNIST kNN), several attention methods side by side: ``python eval/encoder.py --methods dense,fastattn_dense``.

A thin entry point: the same options and code as ``hf-fastattn eval encoder`` (see ``hf_fastattn/evaluation/suite.py``).
"""

import sys

from hf_fastattn.cli import main

if __name__ == "__main__":
    sys.exit(main(["eval", "encoder", *sys.argv[1:]]))
