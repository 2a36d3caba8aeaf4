"""Triton kernels behind the public API: one file per fused op, each with its launchers and custom ops.

Implements the backend interface documented in :mod:`fusedvae.reference`. Runs compiled on CUDA
tensors, and on CPU tensors through Triton's interpreter (``TRITON_INTERPRET=1``). What the kernel
files share (modes, strided views, the grid, float32 math, the allocation hook) is in :mod:`._common`.
"""

from .gaussian_nll import gaussian_nll
from .gaussian_nll_var import gaussian_nll_var
from .sample_kl import rsample_kl
from .sum_squared_error import sum_squared_error

__all__ = ["gaussian_nll", "gaussian_nll_var", "rsample_kl", "sum_squared_error"]
