"""The plain-PyTorch reference: the readable specification of every op, float64-capable.

The backend interface (what :mod:`fusedvae.kernels` implements too):

- ``rsample_kl(mu, logvar, prior_mu, prior_logvar, *, n_samples, seed, offset, sample, kl, reduction)``
- ``gaussian_nll(x, mean, log_sigma, *, full, reduction)``
- ``sum_squared_error(x, mean, *, per_sample)``
- ``gaussian_nll_var(input, target, var, *, full, eps, reduction)``

Backend reductions are ``"none"``, ``"sum"``, ``"per_sample"`` and (KL) ``"per_dim"``; the public
ops in :mod:`fusedvae.functional` derive ``"mean"`` and ``"batchmean"`` from ``"sum"``.

Beyond the three ops: :mod:`.diagnostics` (active units, collapsed dimensions, BN-VAE's
aggregate-posterior bound), :mod:`.estimators` (SGVB estimators A and B, the IWAE bound),
:mod:`.linear` (closed-form pPCA, the linear VAE's analytic ELBO) and :mod:`.betatc` (the β-TC
decomposition of the KL term).
"""

from . import betatc, diagnostics, estimators, linear
from .gaussian_nll import HALF_LOG_2PI, gaussian_nll, gaussian_nll_var, sum_squared_error
from .kl import exp_minus_one_minus_x, kl_normal_elementwise
from .philox import philox4x32, philox_normal
from .sampling import rsample, rsample_kl

__all__ = [
    "HALF_LOG_2PI",
    "betatc",
    "diagnostics",
    "estimators",
    "linear",
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
