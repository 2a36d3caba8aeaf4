"""Draw the (seed, offset) pair that keys an op's Philox noise from a torch generator.

Drawing from torch's generator is what makes ``torch.manual_seed`` (or ``generator=``) control the
noise. With no generator the draw comes from torch's default CPU generator, which
``torch.manual_seed`` seeds too, so CUDA tensors pay no host synchronisation for it; a CUDA
``generator=`` is drawn on its device, which synchronises once.
"""

from __future__ import annotations

import torch

_SEED_BOUND = 2**62  # seed + offset + any logical index stays below 2^63


def draw_seed_offset(generator: torch.Generator | None = None) -> tuple[int, int]:
    """Two independent integers in ``[0, 2^62)`` from ``generator`` (torch's default: None), the offset a multiple of 4.

    Example::

        >>> seed, offset = draw_seed_offset(torch.Generator().manual_seed(0))
        >>> offset % 4
        0

    A multiple-of-4 offset starts a Philox block (four normals, :mod:`fusedvae.reference.philox`), so a
    kernel whose rows are multiples of 4 long draws each block once rather than once per element.
    """
    device = generator.device if generator is not None else "cpu"
    draws = torch.randint(0, _SEED_BOUND, (2,), generator=generator, device=device)
    draws[1] -= draws[1] % 4
    seed, offset = draws.tolist()
    return seed, offset
