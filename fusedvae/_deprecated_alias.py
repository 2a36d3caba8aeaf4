"""Old import paths kept for one release after a module moved (``reference/`` holds the specification only)."""

from __future__ import annotations

import importlib
import sys
import warnings


def alias(old_name: str, new_name: str) -> None:
    """Make the module ``old_name`` the module ``new_name`` itself, warning once with a ``DeprecationWarning``.

    Replacing the entry in ``sys.modules`` (rather than copying names) keeps one module object, so a
    monkeypatch or an ``isinstance`` check through the old path sees the same objects as the new one.

    Example (the body of ``fusedvae/reference/diagnostics.py``)::

        from .._deprecated_alias import alias
        alias(__name__, "fusedvae.analysis.diagnostics")
    """
    warnings.warn(
        f"{old_name} moved to {new_name}; the old path is removed in the next release", DeprecationWarning, stacklevel=2
    )
    sys.modules[old_name] = importlib.import_module(new_name)
