"""Sharded evaluation: ``hf-fastattn eval`` over 2 CPU processes writes what one process writes.

niah, ruler and ppl run on a tiny random Llama (``tests/distributed_helpers.py``) with ``dense`` and a BSFA label
that skips tiles (its realised density is summed over the processes), once in this process and once under
``accelerate launch`` with 2 processes, which share each harness's cases out. The merged files must equal the
single-process ones in everything but the timing and memory fields and the environment (date, command line, process
count). Both runs take the PyTorch reference path on one thread each, so their floats are bit-identical.
"""

from __future__ import annotations

import json

import pytest
from distributed_helpers import cpu_processes_only, launch_commands, tiny_llama_folder

from hf_fastattn import cli

METHODS = "dense,bsfa:thresholds=0.5:block_m=32:block_n=32"
# Uneven shares on purpose: 3 needle cases per length, 4 RULER samples, 10 and 7 perplexity windows.
TASK_OPTIONS = {
    "niah": ["--context-lengths", "128,192", "--depths", "0,50,100", "--needles", "1"],
    "ruler": ["--context-lengths", "256", "--tasks", "niah_single_1,niah_multikey_1", "--samples", "2",
              "--max-new-tokens", "8"],
    "ppl": ["--context-lengths", "64,96", "--max-tokens", "640", "--bucket-size", "32"],
}  # fmt: skip
# Fields that legitimately differ between the runs: wall time, throughput, GPU memory, and the environment.
TIMING_FIELDS = {"seconds", "tokens_per_second", "peak_memory_mib", "environment"}

pytestmark = [cpu_processes_only, pytest.mark.usefixtures("real_model_on_cpu")]  # see tests/conftest.py


def without_timing(value):
    if isinstance(value, dict):
        return {key: without_timing(item) for key, item in value.items() if key not in TIMING_FIELDS}
    if isinstance(value, list):
        return [without_timing(item) for item in value]
    return value


def test_sharded_evaluation_equals_one_process(tmp_path):
    model = tiny_llama_folder(tmp_path / "model")
    commands = {
        task: ["eval", task, "--model", str(model), "--methods", METHODS, *options]
        for task, options in TASK_OPTIONS.items()
    }
    for task, argv in commands.items():
        assert cli.main([*argv, "--out", str(tmp_path / "single" / task)]) == 0
    sharded = [[*argv, "--out", str(tmp_path / "sharded" / task)] for task, argv in commands.items()]
    launched = launch_commands(sharded, triton_interpret=False)

    assert launched.stdout.count("results, summary and plots written to") == len(commands)  # the main process only
    for task in commands:
        single_dir, sharded_dir = tmp_path / "single" / task, tmp_path / "sharded" / task
        assert sorted(path.name for path in sharded_dir.iterdir()) == sorted(path.name for path in single_dir.iterdir())
        single, merged = (json.loads((folder / f"{task}.json").read_text()) for folder in (single_dir, sharded_dir))
        assert (single["environment"]["processes"], merged["environment"]["processes"]) == (1, 2)
        assert without_timing(merged) == without_timing(single), task
        assert min(row["density"] for row in merged["rows"] if row["method"] == "bsfa") < 1  # tiles were skipped
        assert "cpu × 2 processes" in (sharded_dir / "summary.md").read_text().splitlines()[0]
