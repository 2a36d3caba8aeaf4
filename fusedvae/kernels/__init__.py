"""Triton kernels behind the public API: one file per fused op, each with its launchers and custom ops.

Implements the backend interface documented in :mod:`fusedvae.reference`. Runs compiled on CUDA
tensors, and on CPU tensors through Triton's interpreter (``TRITON_INTERPRET=1``).
"""

from .gaussian_nll import gaussian_nll, gaussian_nll_var, sum_squared_error
from .sample_kl import rsample_kl

__all__ = ["gaussian_nll", "gaussian_nll_var", "rsample_kl", "sum_squared_error"]
