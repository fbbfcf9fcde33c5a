"""Dense vs an hf_fastattn method on a real offline model: ``python eval/quickstart.py --method dense --out DIR``.

A thin entry point: the same options and code as ``hf-fastattn quickstart`` (see ``hf_fastattn/evaluation``).
"""

import sys

from hf_fastattn.cli import main

if __name__ == "__main__":
    sys.exit(main(["quickstart", *sys.argv[1:]]))
