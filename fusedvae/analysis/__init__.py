"""Research tools built on the reference: diagnostics, estimators, linear models, the β-TC decomposition.

- :mod:`.diagnostics`: active units, collapsed dimensions, BN-VAE's aggregate-posterior KL bound;
- :mod:`.estimators`: SGVB estimators A and B of the KL term, the IWAE bound;
- :mod:`.linear`: closed-form probabilistic PCA and the linear VAE's analytic ELBO;
- :mod:`.betatc`: the β-TC decomposition of the KL term, dense and streaming (O(B·D) memory).

They run in plain PyTorch (float64-capable) and are not part of the backend interface.

Example::

    >>> from fusedvae.analysis import diagnostics
    >>> from fusedvae.analysis.betatc import betatc_decomposition
"""

from . import betatc, diagnostics, estimators, linear

__all__ = ["betatc", "diagnostics", "estimators", "linear"]
