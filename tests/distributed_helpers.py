"""Helpers of the multi-process tests: a tiny model folder, and ``accelerate launch`` of 2 CPU processes.

The processes are launched with the shipped DDP config (``recipes/accelerate/2gpu.yaml``): on a machine without CUDA
its launcher (torchrun) starts them, and hf_fastattn's processes meet over gloo. Each gets one thread (CI has 2 cores),
and a free port, since pytest-xdist may run other tests at the same time.

Run as a script, this module runs several ``hf-fastattn`` commands in one process, one after the other (one launch,
one start-up, for several evaluations): ``python tests/distributed_helpers.py '[["eval", "niah", ...], ...]'``.
"""

from __future__ import annotations

import copy
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

from hf_fastattn.assets.cache import AssetUnavailable
from hf_fastattn.assets.models import _smollm2_folder

REPO = Path(__file__).resolve().parents[1]
DDP_CONFIG = REPO / "recipes" / "accelerate" / "2gpu.yaml"
# With CUDA the launcher would start GPU processes instead (and need 2 GPUs): the README has those commands.
cpu_processes_only = pytest.mark.skipif(torch.cuda.is_available(), reason="launches CPU processes (a CUDA host: GPUs)")


def tiny_llama_folder(directory: Path) -> Path:
    """A random 2-layer Llama (head dim 64) with SmolLM2's tokenizer, saved where ``--model`` can load it.

    Skips the test if the SmolLM2 asset is not installed.
    """
    try:
        tokenizer = AutoTokenizer.from_pretrained(_smollm2_folder())
    except AssetUnavailable as error:
        pytest.skip(f"asset not installed: {error}")
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=1024, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(copy.deepcopy(config)).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def launch_two_processes(program: list[str], *, triton_interpret: bool) -> subprocess.CompletedProcess:
    """``accelerate launch`` of ``program`` (a script and its arguments, or ``-m module ...``) on 2 CPU processes."""
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(DDP_CONFIG),
        "--main_process_port", str(_free_port()), *program,
    ]  # fmt: skip
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "1" if triton_interpret else "0"}
    result = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout[-4000:]}\n{result.stderr[-8000:]}"
    return result


def launch_commands(commands: list[list[str]], *, triton_interpret: bool) -> subprocess.CompletedProcess:
    """Several ``hf-fastattn`` commands (argument lists) one after the other, in one launch of 2 processes."""
    return launch_two_processes([__file__, json.dumps(commands)], triton_interpret=triton_interpret)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


if __name__ == "__main__":
    from hf_fastattn import cli

    for argv in json.loads(sys.argv[1]):
        if cli.main(argv) != 0:
            sys.exit(f"hf-fastattn {' '.join(argv)} failed")
