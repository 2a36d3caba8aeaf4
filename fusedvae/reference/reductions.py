"""Deprecated: moved to :mod:`fusedvae.reductions` (shared by every backend). Removed in the next release."""

from .._deprecated_alias import alias

alias(__name__, "fusedvae.reductions")
