"""The fewest bytes each op must move: every input read once, every output written once.

With ``E`` elements in the big tensors, ``S`` in log σ (or the prior), and ``b`` bytes per element:

| op | forward | backward | full |
| --- | --- | --- | --- |
| rsample_kl (read mu, lv; write z) | 3E | read mu, lv, dz; write dmu, dlv: 5E | 8E |
| kl_normal (read mu, lv) | 2E | read mu, lv; write dmu, dlv: 4E | 6E |
| gaussian_nll (read x, m, σ) | 2E + S | read x, m, σ; write dm, dσ: 3E + 2S | 5E + 3S |
| gaussian_nll_optimal (read x, m) | 2E | read x, m; write dm: 3E | 5E |
| gaussian_nll_loss (read input, target, var) | 3E | read all three; write dinput, dvar: 5E | 8E |

A learned prior adds its ``S`` elements read forward and read + written (2 grads) backward. Scalar
outputs and the grad of a scalar loss are negligible and not counted.
"""

from __future__ import annotations

_ELEMENTS = {
    # op: (forward, backward) in units of (E, S)
    "rsample_kl": ((3, 2), (5, 6)),
    "kl_normal": ((2, 2), (4, 6)),
    "gaussian_nll": ((2, 1), (3, 2)),
    "gaussian_nll_optimal": ((2, 0), (3, 0)),
    "gaussian_nll_loss": ((3, 0), (5, 0)),
}


def bytes_min(op: str, mode: str, numel: int, small_numel: int, element_size: int) -> int:
    """Fewest bytes ``op`` moves in ``mode`` (``forward``, ``backward``, ``full``) for ``numel`` big elements.

    ``small_numel`` is the size of log σ or of the learned prior (0 when there is none).
    """
    (fe, fs), (be, bs) = _ELEMENTS[op]
    forward, backward = fe * numel + fs * small_numel, be * numel + bs * small_numel
    elements = {"forward": forward, "backward": backward, "full": forward + backward}[mode]
    return elements * element_size
