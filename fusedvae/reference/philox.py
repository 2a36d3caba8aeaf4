"""Philox4x32-10 noise, the readable specification the kernels regenerate bit for bit.

The noise of logical element ``j`` (``offset`` plus the element's row-major index, samples one
after another) is normal number ``j mod 4`` of Philox block ``j div 4``. A block is one
Philox4x32-10 call: counter ``c = j div 4`` as the 32-bit words ``(c lo, c hi, 0, 0)``, key
``(seed lo, seed hi)``; its four output words ``r0..r3`` make two Box-Muller pairs, both halves of
each used (as cuRAND's ``curand_normal4`` and PyTorch's generators do)::

    u1 = ((r0 >> 8) + 1) / 2^24     in (0, 1], so log(u1) is finite;    u2 = (r1 >> 8) / 2^24 in [0, 1)
    normals 0, 1 = sqrt(-2 log u1) * (cos(2 pi u2), sin(2 pi u2))
    normals 2, 3 = the same of (r2, r3)

So one call serves four elements: a kernel whose tile covers whole blocks draws each block once;
any tiling still regenerates any element's noise from its logical index alone. All integer
arithmetic is exact in int64 (no product exceeds 2^63), so the words match the kernels' uint32
arithmetic exactly; only the float log, sqrt, cos and sin may differ by rounding: a few ulps in the
interpreter, and on a GPU, where float32 kernels take the hardware approximations
(:mod:`fusedvae.kernels.fastmath`), at most ``1e-6 (1 + sqrt(-2 log u1))`` absolute.
"""

from __future__ import annotations

import math

import torch

MASK32 = 0xFFFFFFFF
PHILOX_M0 = 0xD2511F53
PHILOX_M1 = 0xCD9E8D57
PHILOX_W0 = 0x9E3779B9
PHILOX_W1 = 0xBB67AE85
PHILOX_ROUNDS = 10
# On a CPU, noise is made this many elements at a time: the ~150 int64 temporaries of the ten rounds
# then stay in cache: 1.7-2.3x faster at a million elements (1 or 2 threads) than one pass over all.
CPU_CHUNK = 1 << 16


def _mulhilo32(multiplier: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32-bit words of ``multiplier * x`` for 32-bit ``x`` held in int64, without overflow."""
    low_half = multiplier * (x & 0xFFFF)  # < 2^48
    high_half = multiplier * (x >> 16)  # < 2^48
    low_sum = low_half + ((high_half & 0xFFFF) << 16)  # < 2^49
    lo = low_sum & MASK32
    hi = ((high_half >> 16) + (low_sum >> 32)) & MASK32
    return hi, lo


def philox4x32(
    counter: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], key: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Philox4x32-10 (Salmon et al. 2011) on int64 tensors holding uint32 words."""
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for round_index in range(PHILOX_ROUNDS):
        if round_index:
            k0 = (k0 + PHILOX_W0) & MASK32
            k1 = (k1 + PHILOX_W1) & MASK32
        hi0, lo0 = _mulhilo32(PHILOX_M0, c0)
        hi1, lo1 = _mulhilo32(PHILOX_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


def philox_normal(
    seed: int, offset: int, numel: int, *, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """``numel`` standard normals for logical indices ``offset .. offset + numel - 1`` under ``seed``.

    Args:
        seed: key, 0 <= seed < 2^64.
        offset: the logical index of the first normal (index ``j`` is lane ``j % 4`` of block ``j // 4``).
        numel: how many normals.
        dtype: float32 or float64; the Box-Muller transform runs in this dtype.

    Returns:
        A 1-D tensor of ``numel`` normals.

    Example::

        >>> eps = philox_normal(seed=1234, offset=0, numel=5)
        >>> eps.shape
        torch.Size([5])
        >>> bool(eps[1] == philox_normal(seed=1234, offset=1, numel=1)[0])
        True
    """
    if torch.device(device).type == "cpu" and numel > CPU_CHUNK:
        out = torch.empty(numel, dtype=dtype)
        for start in range(0, numel, CPU_CHUNK):
            stop = min(start + CPU_CHUNK, numel)
            out[start:stop] = _box_muller_of_philox(seed, offset + start, stop - start, dtype, device)
        return out
    return _box_muller_of_philox(seed, offset, numel, dtype, device)


def _box_muller_of_philox(seed: int, offset: int, numel: int, dtype: torch.dtype, device) -> torch.Tensor:
    if numel == 0:
        return torch.empty(0, dtype=dtype, device=device)
    first, last = offset >> 2, (offset + numel - 1) >> 2
    block = torch.arange(last - first + 1, dtype=torch.int64, device=device) + first
    counter = (block & MASK32, (block >> 32) & MASK32, torch.zeros_like(block), torch.zeros_like(block))
    r0, r1, r2, r3 = philox4x32(counter, (seed & MASK32, (seed >> 32) & MASK32))
    normals = torch.stack([*_box_muller_pair(r0, r1, dtype), *_box_muller_pair(r2, r3, dtype)], dim=-1)
    start = offset & 3
    flat = normals.reshape(-1)
    return flat if start == 0 and flat.numel() == numel else flat[start : start + numel].clone()  # a fresh tensor


def _box_muller_pair(ra: torch.Tensor, rb: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    radius = torch.sqrt(-2.0 * torch.log(((ra >> 8) + 1).to(dtype) * 2.0**-24))
    angle = (2.0 * math.pi) * ((rb >> 8).to(dtype) * 2.0**-24)
    return radius * torch.cos(angle), radius * torch.sin(angle)
