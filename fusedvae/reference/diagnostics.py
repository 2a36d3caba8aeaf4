"""Deprecated alias of :mod:`fusedvae.analysis.diagnostics` (moved out of the specification); removed next release."""

from .._deprecated_alias import alias

alias(__name__, "fusedvae.analysis.diagnostics")
