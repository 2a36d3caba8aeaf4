"""Shared pytest setup: without a GPU, Triton kernels run on CPU tensors through Triton's interpreter.

``TRITON_INTERPRET`` is read when a kernel is decorated, so it is set here, before any test module
imports :mod:`fusedvae.kernels` (and triton with it). An explicit ``TRITON_INTERPRET`` in the
environment wins.
"""

from __future__ import annotations

import os
import zlib

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def gen(request) -> torch.Generator:
    """A CPU generator seeded from the test's id: fresh inputs per test, reproducible runs."""
    return torch.Generator().manual_seed(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture(params=["reference", "triton"])
def backend(request):
    """Run the test on fusedvae's PyTorch reference and on its Triton kernels (interpreted without a GPU)."""
    import fusedvae as fv  # after TRITON_INTERPRET is set above
    from fusedvae import backend as fv_backend

    if request.param == "triton":
        if not fv_backend.triton_available():
            pytest.skip("triton is not installed")
        if not torch.cuda.is_available() and not fv_backend.triton_interpreter_enabled():
            pytest.skip("no GPU and TRITON_INTERPRET is not set")
    with fv.use_backend(request.param):
        yield request.param
