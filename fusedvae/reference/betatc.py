"""Deprecated: moved to :mod:`fusedvae.analysis.betatc` (a research tool, not the specification). Removed next release."""

from .._deprecated_alias import alias

alias(__name__, "fusedvae.analysis.betatc")
