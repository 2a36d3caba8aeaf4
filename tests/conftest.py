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


@pytest.fixture
def nan_filled_outputs(monkeypatch):
    """Every output, gradient and partial-sum buffer the kernels allocate (``_common.empty``) starts as NaN."""
    from fusedvae.kernels import _common  # after TRITON_INTERPRET is set above

    def empty(shape, dtype, device, strides=None):
        strides = _common.contiguous_strides(shape) if strides is None else strides
        return torch.empty_strided(tuple(shape), tuple(strides), dtype=dtype, device=device).fill_(float("nan"))

    monkeypatch.setattr(_common, "empty", empty)
