"""Draw the Philox key ``(seed, offset)`` of an op's noise, as a device tensor, from a torch generator.

Drawing from torch's generator is what makes ``torch.manual_seed`` (or ``generator=``) control the
noise. The key is a ``(2,)`` int64 tensor on the op's device, drawn with ``torch.randint``: on CUDA
that op is graph-safe (torch registers the generator's offset bump with a capturing CUDA graph), so a
replayed graph (``torch.cuda.graph``, ``torch.compile(mode="reduce-overhead")``) draws a new key, and
new noise, on every replay; and nothing ever waits for the host. A key read into Python ints would be
baked into the graph: the same noise every step.

With no ``generator=`` the key comes from the default generator of the op's device: the CPU default
generator for CPU tensors, torch's CUDA default generator for CUDA tensors (``torch.manual_seed``
seeds both). A CUDA ``generator=`` draws on its device. A CPU ``generator=`` with CUDA tensors draws
on the CPU and copies the 16 bytes over (without waiting, but not capturable in a CUDA graph).
"""

from __future__ import annotations

import torch

_SEED_BOUND = 2**62  # seed + offset + any logical index stays below 2^63


def draw_key(device: torch.device | str, generator: torch.Generator | None = None) -> torch.Tensor:
    """A ``(2,)`` int64 tensor ``[seed, offset]`` on ``device``: two integers in ``[0, 2^62)``, offset a multiple of 4.

    Example::

        >>> key = draw_key("cpu", torch.Generator().manual_seed(0))
        >>> key.shape, key.dtype, int(key[1]) % 4
        (torch.Size([2]), torch.int64, 0)

    A multiple-of-4 offset starts a Philox block (four normals, :mod:`fusedvae.reference.philox`), so a
    kernel whose rows are multiples of 4 long draws each block once rather than once per element. The
    rounding is done on the device: no host synchronisation.
    """
    device = torch.device(device)
    draw_on = device if generator is None else generator.device
    key = torch.randint(0, _SEED_BOUND, (2,), generator=generator, device=draw_on)
    key[1:].bitwise_and_(~3)  # offset - offset % 4 in one launch: each eager op costs a launch on every call
    return key.to(device, non_blocking=True)


def key_from_ints(seed: int, offset: int, device: torch.device | str) -> torch.Tensor:
    """The key tensor of an explicit ``(seed, offset)`` (tests, benchmarks); a host-to-device copy, not graph-safe.

    Example::

        >>> key_from_ints(1, 8, "cpu").tolist()
        [1, 8]
    """
    for name, value in (("seed", seed), ("offset", offset)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
        if not 0 <= value < 2**63:
            raise ValueError(f"{name} must be in [0, 2^63), got {value}")
    return torch.tensor([seed, offset], dtype=torch.int64, device=device)


def check_key(key: object, device: torch.device) -> torch.Tensor:
    """``key`` if it is a ``(2,)`` int64 tensor on ``device``; a TypeError/ValueError naming ``key`` otherwise."""
    if not isinstance(key, torch.Tensor):
        raise TypeError(f"key must be a torch.Tensor, got {type(key).__name__}")
    if key.dtype != torch.int64 or key.shape != (2,):
        raise ValueError(f"key must be a (2,) int64 tensor [seed, offset], got {tuple(key.shape)} {key.dtype}")
    if key.device != device:
        raise ValueError(f"key is on {key.device} but the tensors are on {device}")
    return key


def draw_seed_offset(generator: torch.Generator | None = None) -> tuple[int, int]:
    """The key of :func:`draw_key` on the generator's device, as Python ints (synchronises; not for graphs).

    Example::

        >>> seed, offset = draw_seed_offset(torch.Generator().manual_seed(0))
        >>> offset % 4
        0
    """
    device = generator.device if generator is not None else "cpu"
    seed, offset = draw_key(device, generator).tolist()
    return seed, offset
