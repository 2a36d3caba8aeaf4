"""Sampling + KL over layouts whose memory order transposes the logical order (channels-last, H/W swapped).

Stub: the launchers of :mod:`.sample_kl` ask :func:`forward` / :func:`backward` first; ``None`` means "not
this layout", and the row-view kernels of :mod:`.sample_kl` run.
"""

from __future__ import annotations


def forward(mu, logvar, prior_mu, prior_logvar, *, n_samples, key, aligned, sample, kl, reduction):
    """``(z, kl)`` as :func:`.sample_kl.sample_kl_forward`, or None when the layout is not one this path tiles."""
    return None


def backward(grad_z, grad_kl, mu, logvar, prior_mu, prior_logvar, *, n_samples, key, aligned, reduction, needs):
    """The four gradients as :func:`.sample_kl.sample_kl_backward`, or None when the layout is not one this path tiles."""
    return None
