"""Perplexity on held-out text per context length, several attention methods side by side: ``python eval/perplexity.py --methods dense,fastattn_dense``.

A thin entry point: the same options and code as ``hf-fastattn eval ppl`` (see ``hf_fastattn/evaluation/suite.py``).
"""

import sys

from hf_fastattn.cli import main

if __name__ == "__main__":
    sys.exit(main(["eval", "ppl", *sys.argv[1:]]))
