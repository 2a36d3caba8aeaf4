"""Deprecated alias of :mod:`fusedvae.analysis.estimators` (moved out of the specification); removed next release."""

from .._deprecated_alias import alias

alias(__name__, "fusedvae.analysis.estimators")
