"""RULER-lite needle tasks, several attention methods side by side: ``python eval/ruler.py --methods dense,fastattn_dense``.

A thin entry point: the same options and code as ``hf-fastattn eval ruler`` (see ``hf_fastattn/evaluation/suite.py``).
"""

import sys

from hf_fastattn.cli import main

if __name__ == "__main__":
    sys.exit(main(["eval", "ruler", *sys.argv[1:]]))
