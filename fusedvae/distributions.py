"""``torch.distributions`` on fusedvae's ops: change one import, keep the code.

Much VAE code never names a loss function: it builds ``torch.distributions.Normal(mu, std)``, calls
``rsample()`` and ``kl_divergence(q, p)``. The classes here are subclasses of torch's, so that code
(``isinstance`` checks included) keeps working::

    import fusedvae.distributions as D          # was: import torch.distributions as D

    q = D.Normal(mu, logvar=logvar)              # or D.Normal(mu, std), as torch
    z = q.rsample()                              # fusedvae's noise, regenerated in backward on the kernels
    kl = D.kl_divergence(q, D.Normal(0.0, 1.0))  # fusedvae's exact KL (registered: torch's function finds it too)

What differs from torch's ``Normal``:

- ``rsample``/``sample`` draw fusedvae's Philox noise (:func:`fusedvae.rsample`): the same
  distribution, another stream; ``torch.manual_seed`` (or ``generator=``) makes it reproducible.
  On the Triton kernels the noise is never stored: the backward pass regenerates it.
- ``kl_divergence`` with a fusedvae ``Normal`` on either side (the other a fusedvae or a torch
  ``Normal``) runs :func:`fusedvae.kl_normal`, exact near a collapsed dimension where torch's
  float32 formula ``0.5 (r + t - 1 - log r)`` loses up to all of the value. Built from ``logvar``,
  the log-variance is used as given (no ``exp``/``log`` round trip).
- ``log_prob`` runs :func:`fusedvae.gaussian_nll`; ``entropy`` and ``variance`` use the log-variance.

Everything else (shapes, broadcasting, ``expand``, ``cdf``, ``icdf``, validation) is torch's.
"""

from __future__ import annotations

import math

import torch
from torch.distributions import Distribution, register_kl
from torch.distributions import Independent as _TorchIndependent
from torch.distributions import Normal as _TorchNormal
from torch.distributions.utils import _sum_rightmost, broadcast_all

from . import functional as fvf
from . import validation as check

__all__ = ["DiagonalNormal", "Normal", "kl_divergence"]

_HALF_LOG_2PI_E = 0.5 * math.log(2.0 * math.pi * math.e)


def _broadcast_shape(name: str, shape: torch.Size, other_name: str, other: torch.Size) -> torch.Size:
    """Their broadcast, else a ShapeError: a ValueError, and the RuntimeError torch's arithmetic raises."""
    out = check.broadcast_shape(shape, other)
    if out is None:
        raise check.ShapeError(f"{name} {tuple(shape)} does not broadcast with {other_name} {tuple(other)}")
    return out


class Normal(_TorchNormal):
    """torch's ``Normal(loc, scale)`` sampled and scored by fusedvae; also built from a log-variance.

    Args:
        loc: mean, a float or a float tensor (float32, bfloat16, float16, float64).
        scale: standard deviation, broadcastable with ``loc``; give it or ``logvar``, not both.
        validate_args: as torch.
        logvar: log-variance ``log scale^2``, broadcastable with ``loc``: what a VAE encoder outputs.
            Kept as given for the KL, ``rsample`` and ``entropy``; ``scale`` is ``exp(logvar / 2)``.

    Shapes: ``batch_shape`` is the broadcast shape of ``loc`` and ``scale``/``logvar``;
    ``event_shape`` is ``()``; ``rsample(sample_shape)`` has shape ``sample_shape + batch_shape``.

    Example::

        >>> import torch, fusedvae.distributions as D
        >>> mu, logvar = torch.zeros(4, 8, requires_grad=True), torch.zeros(4, 8, requires_grad=True)
        >>> q = D.Normal(mu, logvar=logvar)
        >>> isinstance(q, torch.distributions.Normal), q.rsample((3,)).shape
        (True, torch.Size([3, 4, 8]))
        >>> D.kl_divergence(q, torch.distributions.Normal(0.0, 1.0)).shape
        torch.Size([4, 8])
    """

    def __init__(
        self,
        loc: torch.Tensor | float,
        scale: torch.Tensor | float | None = None,
        validate_args: bool | None = None,
        *,
        logvar: torch.Tensor | float | None = None,
    ) -> None:
        if (scale is None) == (logvar is None):
            raise TypeError("Normal needs exactly one of scale and logvar, got "
                            + ("both" if scale is not None else "neither"))
        if logvar is None:
            super().__init__(loc, scale, validate_args=validate_args)
            self._logvar = None
            return
        loc, logvar = broadcast_all(loc, logvar)
        super().__init__(loc, torch.exp(0.5 * logvar), validate_args=validate_args)
        self._logvar = logvar

    @property
    def logvar(self) -> torch.Tensor:
        """``log scale^2``: as given, or ``2 log scale`` when built from ``scale``."""
        return 2.0 * torch.log(self.scale) if self._logvar is None else self._logvar

    @property
    def variance(self) -> torch.Tensor:
        return self.scale.pow(2) if self._logvar is None else torch.exp(self._logvar)

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(Normal, _instance)
        super().expand(batch_shape, _instance=new)
        new._logvar = None if self._logvar is None else self._logvar.expand(torch.Size(batch_shape))
        return new

    def rsample(self, sample_shape=torch.Size(), *, generator: torch.Generator | None = None) -> torch.Tensor:
        """A reparameterized sample of shape ``sample_shape + batch_shape``, differentiable in loc and scale/logvar.

        ``loc + scale * eps`` with ``eps`` from fusedvae's Philox stream (see :func:`fusedvae.rsample`);
        ``generator`` (an extension of torch's signature) keys it instead of torch's default generator.
        """
        sample_shape = torch.Size(sample_shape)
        shape = self._extended_shape(sample_shape)
        count = math.prod(sample_shape)
        if count == 0 or self.loc.numel() == 0:  # nothing to draw; keep the graph to loc for shape-generic code
            return self.loc.expand(shape).clone()
        n_samples = None if len(sample_shape) == 0 else count
        z = fvf.rsample(self.loc, self.logvar, n_samples=n_samples, generator=generator)
        return z.reshape(shape)

    def sample(self, sample_shape=torch.Size(), *, generator: torch.Generator | None = None) -> torch.Tensor:
        """As :meth:`rsample`, without gradient."""
        with torch.no_grad():
            return self.rsample(sample_shape, generator=generator)

    def log_prob(self, value: torch.Tensor | float) -> torch.Tensor:
        """``log N(value; loc, scale^2)`` elementwise, ``value`` broadcast with ``batch_shape`` (as torch)."""
        if self._validate_args:
            self._validate_sample(value)
        if not isinstance(value, torch.Tensor) or not value.dtype.is_floating_point:
            value = torch.as_tensor(value, dtype=self.loc.dtype, device=self.loc.device)
        log_scale = 0.5 * self._logvar if self._logvar is not None else torch.log(self.scale)
        shape = _broadcast_shape("value", value.shape, "batch_shape", self.loc.shape)
        return -fvf.gaussian_nll(value.expand(shape), self.loc.expand(shape), log_scale, reduction="none", full=True)

    def entropy(self) -> torch.Tensor:
        return _HALF_LOG_2PI_E + 0.5 * self.logvar


class DiagonalNormal(_TorchIndependent):
    """A Gaussian with diagonal covariance over the last ``event_dims`` dims: ``Independent(Normal(...), event_dims)``.

    A subclass of ``torch.distributions.Independent`` whose ``base_dist`` is a fusedvae
    :class:`Normal`: ``log_prob`` and ``entropy`` sum over the event dims, ``rsample`` is the base's,
    and ``kl_divergence`` against another ``DiagonalNormal`` (or any ``Independent`` of a fusedvae or
    torch ``Normal``, through torch's own rule) sums fusedvae's exact elementwise KL.

    Args:
        loc, scale, validate_args, logvar: as :class:`Normal`.
        event_dims: how many rightmost dims form one event (torch's ``reinterpreted_batch_ndims``).

    Example::

        >>> import torch, fusedvae.distributions as D
        >>> q = D.DiagonalNormal(torch.zeros(4, 8), logvar=torch.zeros(4, 8))
        >>> q.batch_shape, q.event_shape, q.log_prob(q.rsample()).shape
        (torch.Size([4]), torch.Size([8]), torch.Size([4]))
        >>> D.kl_divergence(q, D.DiagonalNormal(torch.zeros(8), torch.ones(8))).shape
        torch.Size([4])
    """

    def __init__(
        self,
        loc: torch.Tensor | float,
        scale: torch.Tensor | float | None = None,
        validate_args: bool | None = None,
        *,
        logvar: torch.Tensor | float | None = None,
        event_dims: int = 1,
    ) -> None:
        base = Normal(loc, scale, validate_args=validate_args, logvar=logvar)
        valid = isinstance(event_dims, int) and not isinstance(event_dims, bool)
        if not valid or not 0 <= event_dims <= len(base.batch_shape):
            raise ValueError(f"event_dims must be an int in [0, {len(base.batch_shape)}] (the dims of loc), "
                             f"got {event_dims!r}")
        super().__init__(base, event_dims, validate_args=validate_args)

    @property
    def loc(self) -> torch.Tensor:
        return self.base_dist.loc

    @property
    def scale(self) -> torch.Tensor:
        return self.base_dist.scale

    @property
    def logvar(self) -> torch.Tensor:
        return self.base_dist.logvar

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(DiagonalNormal, _instance)
        return super().expand(batch_shape, _instance=new)

    def rsample(self, sample_shape=torch.Size(), *, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.base_dist.rsample(sample_shape, generator=generator)

    def sample(self, sample_shape=torch.Size(), *, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.base_dist.sample(sample_shape, generator=generator)


# ----------------------------------------------------------------------------------------------
# kl_divergence: registered for every pair with a fusedvae distribution on at least one side.


def _logvar(d: _TorchNormal) -> torch.Tensor:
    return d.logvar if isinstance(d, Normal) else 2.0 * torch.log(d.scale)


def _kl_normal(p: _TorchNormal, q: _TorchNormal) -> torch.Tensor:
    """Elementwise ``KL(p || q)``, shape ``broadcast(p.batch_shape, q.batch_shape)``, by :func:`fusedvae.kl_normal`."""
    shape = _broadcast_shape("p.batch_shape", p.batch_shape, "q.batch_shape", q.batch_shape)
    # kl_normal's prior broadcasts to the posterior, never the other way: widen the posterior (a view).
    mu, logvar = p.loc.expand(shape), _logvar(p).expand(shape)
    return fvf.kl_normal(mu, logvar, q.loc, _logvar(q), reduction="none")


register_kl(Normal, Normal)(_kl_normal)
register_kl(Normal, _TorchNormal)(_kl_normal)
register_kl(_TorchNormal, Normal)(_kl_normal)


@register_kl(DiagonalNormal, DiagonalNormal)
def _kl_diagonal_normal(p: DiagonalNormal, q: DiagonalNormal) -> torch.Tensor:
    if p.reinterpreted_batch_ndims != q.reinterpreted_batch_ndims:
        raise NotImplementedError(  # torch's Independent rule raises the same for this case
            f"KL between DiagonalNormals of event_dims {p.reinterpreted_batch_ndims} and "
            f"{q.reinterpreted_batch_ndims} is not defined")
    return _sum_rightmost(_kl_normal(p.base_dist, q.base_dist), p.reinterpreted_batch_ndims)


def _direct_rule(p: Distribution, q: Distribution):
    """The KL rule for a pair with a fusedvae side, found by exact type (no lookup table); None for other pairs."""
    normals = (Normal, _TorchNormal)
    if type(p) in normals and type(q) in normals and Normal in (type(p), type(q)):
        return _kl_normal
    independents = (DiagonalNormal, _TorchIndependent)
    if type(p) in independents and type(q) in independents:
        if p.reinterpreted_batch_ndims == q.reinterpreted_batch_ndims:
            inner = _direct_rule(p.base_dist, q.base_dist)
            if inner is not None:
                return lambda p, q: _sum_rightmost(inner(p.base_dist, q.base_dist), p.reinterpreted_batch_ndims)
    return None


def kl_divergence(p: Distribution, q: Distribution) -> torch.Tensor:
    """``torch.distributions.kl_divergence``, traceable by ``torch.compile(fullgraph=True)`` for fusedvae's pairs.

    The same result as torch's function (which finds the rules registered above) for every pair.
    For a fusedvae ``Normal`` or ``DiagonalNormal`` against a fusedvae or torch ``Normal`` (or an
    ``Independent`` of them) it calls the rule directly: torch's rule lookup calls ``min`` on a
    generator, which Dynamo cannot trace (torch 2.13), so under ``fullgraph=True`` even torch's own
    ``Normal`` pairs fail there. Other pairs go to torch's function.

    Example::

        >>> import torch, fusedvae.distributions as D
        >>> q, p = D.Normal(torch.zeros(3), logvar=torch.zeros(3)), torch.distributions.Normal(1.0, 1.0)
        >>> D.kl_divergence(q, p)
        tensor([0.5000, 0.5000, 0.5000])
    """
    rule = _direct_rule(p, q)
    return torch.distributions.kl_divergence(p, q) if rule is None else rule(p, q)


def __getattr__(name: str) -> object:
    """Every other name is torch's (``D.Independent``, ``D.Bernoulli``, ``D.constraints``...), so one import changes."""
    try:
        return getattr(torch.distributions, name)
    except AttributeError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
