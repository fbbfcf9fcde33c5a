"""Shared test setup.

Without a CUDA device the Triton kernels run in Triton's CPU interpreter, which must be switched on before anything
imports triton: that is why this module sets ``TRITON_INTERPRET`` first, importing nothing but ``os`` and ``torch``.
"""

import os

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
from hypothesis import settings

# "ci": the CPU interpreter, a few hundred examples per property; "gpu": many more on real hardware.
# HYPOTHESIS_PROFILE overrides the choice (e.g. HYPOTHESIS_PROFILE=ci on a GPU box for a quick run).
settings.register_profile("ci", max_examples=200, deadline=None, derandomize=False, print_blob=True)
settings.register_profile("gpu", max_examples=1000, deadline=None, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "gpu" if HAS_CUDA else "ci"))


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` need a CUDA device: skip them (rather than fail) where there is none."""
    if HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def real_model_on_cpu(monkeypatch):
    """End-to-end runs of real models: the PyTorch reference path, and one intra-op thread.

    Interpreting the Triton kernels through SmolLM2's 30 layers would take minutes per forward (the kernels are tested
    against the reference elsewhere). pytest-xdist runs a worker per core, so more threads per worker oversubscribe the
    cores, and CPU generation (thousands of tiny ops) then stalls at every parallel region: 8x slower measured on 2
    busy cores.
    """
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
