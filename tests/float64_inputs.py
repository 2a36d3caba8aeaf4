"""Seeded float64 inputs and the exact-comparison helpers the reference and API tests share.

Pair with the ``gen`` fixture of ``conftest.py`` (a generator seeded from the test's id: fresh
inputs per test, reproducible runs).
"""

from __future__ import annotations

import math

import torch

F64 = torch.float64
HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


def randn(gen, *shape, dtype=F64, scale=1.0, shift=0.0, requires_grad=False):
    t = torch.randn(shape, generator=gen, dtype=dtype) * scale + shift
    return t.requires_grad_(requires_grad)


def grads(output, inputs, grad_output=None):
    """Gradients of ``output`` for those ``inputs`` that require grad (``None`` entries skipped)."""
    inputs = [t for t in inputs if t is not None and t.requires_grad]
    return torch.autograd.grad(output, inputs, grad_output, retain_graph=True)


def assert_close(actual, expected, rtol=1e-10, atol=1e-12):
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)
