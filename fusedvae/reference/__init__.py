"""The plain-PyTorch reference: the readable specification of every op, float64-capable.

The backend interface (what :mod:`fusedvae.kernels` implements too):

- ``rsample_kl(mu, logvar, prior_mu, prior_logvar, *, n_samples, seed, offset, sample, kl, reduction)``
- ``gaussian_nll(x, mean, log_sigma, *, full, reduction)``
- ``sum_squared_error(x, mean, *, per_sample)``
- ``gaussian_nll_var(input, target, var, *, full, eps, reduction)``

Backend reductions are ``"none"``, ``"sum"``, ``"per_sample"`` and (KL) ``"per_dim"``; the public
ops in :mod:`fusedvae.functional` derive ``"mean"`` and ``"batchmean"`` from ``"sum"``.

The reference holds the specification only. The research tools built on it (diagnostics,
estimators, linear models, the β-TC decomposition) live in :mod:`fusedvae.analysis`, the reductions in
:mod:`fusedvae.reductions`; their old paths (``fusedvae.reference.diagnostics`` ...) still import for
one release, with a ``DeprecationWarning``.
"""

import importlib

from .gaussian_nll import HALF_LOG_2PI, gaussian_nll, gaussian_nll_var, sum_squared_error
from .kl import exp_minus_one_minus_x, kl_normal_elementwise
from .philox import philox4x32, philox_normal
from .sampling import rsample, rsample_kl

__all__ = [
    "HALF_LOG_2PI",
    "exp_minus_one_minus_x",
    "gaussian_nll",
    "gaussian_nll_var",
    "kl_normal_elementwise",
    "philox4x32",
    "philox_normal",
    "rsample",
    "rsample_kl",
    "sum_squared_error",
]

_MOVED = ("betatc", "diagnostics", "estimators", "linear", "reductions")


def __getattr__(name: str):
    # ``fusedvae.reference.diagnostics`` as an attribute: import the deprecated alias (which warns) on first use.
    if name in _MOVED:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
