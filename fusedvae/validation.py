"""Argument checks shared by every public op: each error names the argument, its shape or dtype."""

from __future__ import annotations

import torch


class ShapeError(ValueError, RuntimeError):
    """Shapes that do not broadcast: a ``ValueError`` naming the argument, and the ``RuntimeError`` torch raises.

    torch reports the same mistake from inside its arithmetic as a ``RuntimeError``; code written
    for torch (``except RuntimeError``) catches this too.
    """


class DeviceError(ValueError, RuntimeError):
    """Tensors on different devices: a ``ValueError`` naming them, and the ``RuntimeError`` torch raises."""


class DtypeError(TypeError, NotImplementedError):
    """A tensor whose dtype an op cannot take: a ``TypeError``, and what torch raises for it.

    torch raises ``RuntimeError`` for an integer variance in ``gaussian_nll_loss`` and
    ``NotImplementedError`` (a ``RuntimeError``) for a complex one; this is an instance of both.
    """


class ReductionTypeError(ValueError, TypeError):
    """A ``reduction`` that is not a str: fusedvae's ``ValueError`` for a bad reduction, and torch's ``TypeError``."""


class NotATensorError(TypeError, AttributeError):
    """A tensor argument that is not a tensor: a ``TypeError``, and the ``AttributeError`` torch raises for it.

    (``torch.nn.functional.gaussian_nll_loss`` reads ``input.size()`` and so raises ``AttributeError``
    for a list ``input``.)
    """


#: Reductions every op accepts; ``batchmean`` (sum / size of dim 0) is the per-datapoint ELBO term.
REDUCTIONS = ("none", "sum", "mean", "batchmean", "per_sample")
#: The KL also reports per-latent-dimension sums over the batch.
KL_REDUCTIONS = REDUCTIONS + ("per_dim",)


def check_tensor(name: str, value: object, *, torch_classes: bool = False) -> torch.Tensor:
    """``value`` must be a floating-point tensor, else a ``TypeError``.

    ``torch_classes=True`` (for drop-ins of torch functions) raises :class:`NotATensorError` and
    :class:`DtypeError`, TypeErrors that are also what torch raises; not the default, since an
    ``AttributeError`` or ``NotImplementedError`` means something else to ``hasattr`` and fallbacks.
    """
    if not isinstance(value, torch.Tensor):
        error = NotATensorError if torch_classes else TypeError
        raise error(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if not value.dtype.is_floating_point:
        error = DtypeError if torch_classes else TypeError
        raise error(f"{name} must be a floating-point tensor, got dtype {value.dtype}")
    return value


def check_same_device(named: dict[str, torch.Tensor | None]) -> None:
    """All tensors given must live on one device."""
    present = {name: t for name, t in named.items() if t is not None}
    devices = {t.device for t in present.values()}
    if len(devices) > 1:
        listing = ", ".join(f"{name} on {t.device}" for name, t in present.items())
        raise DeviceError(f"tensors must be on one device, got {listing}")


def check_same_shape(name: str, value: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if value.shape != ref.shape:
        raise ValueError(
            f"{name} must have the shape of {ref_name}, {tuple(ref.shape)}, got {tuple(value.shape)}"
        )


def broadcast_shape(*shapes: torch.Size) -> torch.Size | None:
    """The broadcast of ``shapes``, or ``None`` where they do not broadcast.

    Plain Python: ``torch.broadcast_shapes`` runs ``torch._refs`` code that, once any
    ``autograd.Function`` has been applied, costs ~1 ms a call on a CPU (measured, torch 2.13).
    """
    ndim = max([len(shape) for shape in shapes] + [0])  # a list: Dynamo cannot trace max() of a generator
    out = [1] * ndim
    for shape in shapes:
        for index, size in enumerate(shape, ndim - len(shape)):
            if size != 1:
                if out[index] != 1 and out[index] != size:
                    return None
                out[index] = size
    return torch.Size(out)


def check_broadcasts_to(name: str, value: torch.Tensor, target_name: str, target: torch.Tensor) -> None:
    """``value`` must broadcast to ``target``'s shape without growing it."""
    shape, target_shape = value.shape, target.shape
    # the common cases without the loop below: the same shape, a scalar, the trailing dims (a per-dim prior)
    if shape == target_shape or not shape or target_shape[len(target_shape) - len(shape):] == shape:
        return
    if broadcast_shape(shape, target_shape) != target_shape:
        raise ValueError(
            f"{name} of shape {tuple(value.shape)} does not broadcast to {target_name}'s shape "
            f"{tuple(target.shape)}"
        )


def check_reduction(reduction: object, allowed: tuple[str, ...] = REDUCTIONS) -> str:
    if not isinstance(reduction, str) or reduction not in allowed:
        raise ValueError(f"reduction must be one of {allowed}, got {reduction!r}")
    return reduction


def check_batched(name: str, value: torch.Tensor, reduction: str) -> None:
    """Reductions that keep or divide by dim 0 need a dim 0."""
    if reduction in ("batchmean", "per_sample", "per_dim") and value.dim() == 0:
        raise ValueError(f"reduction {reduction!r} needs a batch dimension, but {name} is 0-dimensional")


def check_n_samples(n_samples: object) -> int:
    """``None`` means one sample without a leading sample dimension; returns the count."""
    if n_samples is None:
        return 1
    if isinstance(n_samples, bool) or not isinstance(n_samples, int):
        raise TypeError(f"n_samples must be an int or None, got {type(n_samples).__name__}")
    if n_samples < 1:
        raise ValueError(f"n_samples must be >= 1, got {n_samples}")
    return n_samples


def check_free_bits(free_bits: object, reduction: str) -> float:
    if isinstance(free_bits, bool) or not isinstance(free_bits, (int, float)):
        raise TypeError(f"free_bits must be a float, got {type(free_bits).__name__}")
    free_bits = float(free_bits)
    if not free_bits >= 0.0:
        raise ValueError(f"free_bits must be >= 0, got {free_bits}")
    if free_bits > 0.0 and reduction != "batchmean":
        raise ValueError(f"free_bits > 0 needs reduction='batchmean', got reduction={reduction!r}")
    return free_bits


def check_generator(generator: object, device: torch.device) -> None:
    if generator is None:
        return
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    # The generator only supplies the (seed, offset) pair, so a CPU generator serves tensors on any
    # device (and costs no synchronisation); a CUDA generator must be on the tensors' device type.
    if generator.device.type not in ("cpu", device.type):
        raise ValueError(f"generator is on {generator.device} but the tensors are on {device}")
