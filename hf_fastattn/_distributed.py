"""Scaling out with ``accelerate``: the process state, and evaluation cases sharded over the processes.

Under ``accelerate launch`` (or ``torchrun``) every process runs the same program. :func:`process_state` is accelerate's
``PartialState`` for the device the work runs on. :func:`run_sharded` runs one process's share of an evaluation's cases
(``PartialState.split_between_processes``), gathers every result (``accelerate.utils.gather_object``) and returns them
in the cases' order, so every process ends with the results one process alone computes. Run without a launcher, there
is one process and nothing is split or gathered.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

import torch
from accelerate import PartialState
from accelerate.utils import gather_object
from torch import nn
from tqdm.auto import tqdm

from .patch import layer_states

Case = TypeVar("Case")
Result = TypeVar("Result")


def process_state(device: str | torch.device) -> PartialState:
    """accelerate's state of this process, for work on ``device``.

    Create it before the model is placed: under a launcher it makes each process's own GPU the current CUDA device. On
    a CPU the processes meet over gloo (``PartialState(cpu=True)``; without it a CPU-only launch is not distributed).
    """
    return PartialState(cpu=torch.device(device).type == "cpu")


def run_sharded(
    cases: Sequence[Case],
    run_case: Callable[[Case], Result],
    model: nn.Module,
    *,
    describe: Callable[[Case], str],
    progress: bool = True,
) -> list[Result]:
    """``[run_case(case) for case in cases]``, each process running its contiguous share; every process gets all.

    The results equal one process's only if each case is independent of the others: its randomness drawn from the case
    itself, its inputs never batched with another case's. ``model``'s realised attention counters
    (``LayerState.counters``, which only ever add up) are summed over the processes as well, so that
    ``attention_summary`` reports the whole run. ``describe(case)`` labels the progress bar, shown by the main process.
    """
    state = process_state(next(model.parameters()).device)
    counters_before = [dict(layer.counters) for layer in layer_states(model)]
    results = []
    with state.split_between_processes(list(enumerate(cases))) as share:
        bar = tqdm(share, disable=not (progress and state.is_main_process))
        for index, case in bar:
            bar.set_description(describe(case))
            results.append((index, run_case(case)))
    if state.num_processes == 1:
        return [result for _, result in results]
    every_process = gather_object([(results, _counter_increments(model, counters_before))])
    _add_counter_increments(model, counters_before, [increments for _, increments in every_process])
    indexed_results = (pair for process_results, _ in every_process for pair in process_results)
    return [result for _, result in sorted(indexed_results, key=lambda pair: pair[0])]


def _counter_increments(model: nn.Module, counters_before: list[dict]) -> list[dict]:
    """What each layer's counters added since ``counters_before``, on the CPU so that they can travel to any process."""
    return [
        {name: _on_cpu(value) - _on_cpu(before.get(name, 0)) for name, value in layer.counters.items()}
        for layer, before in zip(layer_states(model), counters_before)
    ]


def _add_counter_increments(model: nn.Module, counters_before: list[dict], increments: list[list[dict]]) -> None:
    """Each layer's counters become ``counters_before`` plus every process's increments."""
    device = next(model.parameters()).device
    for layer, before, layer_increments in zip(layer_states(model), counters_before, zip(*increments)):
        counters = dict(before)
        for process_increments in layer_increments:
            for name, value in process_increments.items():
                value = value.to(device) if isinstance(value, torch.Tensor) else value
                counters[name] = counters[name] + value if name in counters else value
        layer.counters = counters


def _on_cpu(value: torch.Tensor | int) -> torch.Tensor | int:
    return value.cpu() if isinstance(value, torch.Tensor) else value
