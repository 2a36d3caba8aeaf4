"""The β-TC micro-benchmark case (issue 17) and the memory figures of the streamed aggregate posterior.

The case, in :mod:`bench.micro`'s terms: inputs ``[z, mu, logvar]`` ``(B, D)`` that require grad
(:func:`betatc_inputs`); the fused op :func:`betatc_fused` (``fv.betatc_loss``: the streaming kernel
on CUDA, the streaming reference elsewhere); the ``torch``/``torch+compile`` baseline
:func:`betatc_dense`, the dense form every β-TC-VAE implementation writes (the authors' code here;
disentangling-vae and PyTorch-VAE build the same ``(B, B, D)`` tensor of ``log q(z_id | x_j)``). Sizes are per preset
in :data:`BETATC_SIZES` (the dense form's temporaries are ~7 ``B^2 D`` floats, so CPU presets stop early).

``python -m bench.betatc_cases`` prints the peak memory of forward + backward: the streaming reference
at B = 4096, D = 64, the dense form where it fits (and its extrapolation to B = 4096), and the kernel
under Triton's interpreter at a small B (set ``TRITON_INTERPRET=1`` on a CPU).
"""

from __future__ import annotations

import argparse
import math
import os
import time

import torch

import fusedvae as fv
from fusedvae.analysis.betatc import mss_log_weights

#: N for the importance weights (only enters through constants: any N >= B).
DATASET_SIZE = 60_000
ALPHA, BETA, GAMMA = 1.0, 6.0, 1.0

#: ``(B, D)`` per preset, under the kind name ``"betatc"``.
BETATC_SIZES = {
    "full": [(256, 32), (1024, 64), (4096, 64)],
    "full-cpu": [(256, 32), (1024, 64)],
    "quick": [(1024, 64), (4096, 64)],
    "quick-cpu": [(256, 32), (512, 64)],
    "tiny": [(8, 4)],
    "gpu-run": [(1024, 64)],
}


def betatc_inputs(shape, dtype, device, gen) -> list[torch.Tensor]:
    """``[z, mu, logvar]`` of shape ``(B, D)``, requiring grad: posteriors and one sample of each."""
    mu = torch.randn(shape, generator=gen, dtype=torch.float32)
    logvar = torch.randn(shape, generator=gen, dtype=torch.float32) * 0.5 - 1.0
    z = mu + torch.exp(0.5 * logvar) * torch.randn(shape, generator=gen, dtype=torch.float32)
    return [t.to(device=device, dtype=dtype).requires_grad_() for t in (z, mu, logvar)]


def betatc_fused(z: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> tuple[torch.Tensor]:
    return (fv.betatc_loss(z, mu, logvar, DATASET_SIZE, alpha=ALPHA, beta=BETA, gamma=GAMMA, sampling="mss"),)


def _log_density(sample, mu, logvar):
    """``log N(sample; mu, e^logvar)`` elementwise, as the authors' ``dist.Normal().log_density``."""
    inv_sigma = torch.exp(-0.5 * logvar)
    tmp = (sample - mu) * inv_sigma
    return -0.5 * (tmp * tmp + 2 * (0.5 * logvar) + math.log(2 * math.pi))


def betatc_dense(z: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> tuple[torch.Tensor]:
    """The KL part of the authors' β-TC-VAE ELBO (Chen et al. 2018, ``rtqichen/beta-tcvae``, ``vae_quant.py``), MSS.

    Dense: ``_logqz`` is ``(B, B, D)``. Two published slips are not copied, so the values equal the
    fused op's: the authors' ``log_importance_weight_matrix`` fills the wrong entries (see
    :func:`fusedvae.analysis.betatc.mss_log_weights`; the correct matrix costs the same), and
    disentangling-vae adds the ``(B, B, 1)`` log-weights to every dimension before summing over D, so
    its joint carries them D times.
    """
    batch_size = z.shape[0]
    logqz_condx = _log_density(z, mu, logvar).sum(1)
    logpz = _log_density(z, torch.zeros_like(z), torch.zeros_like(z)).sum(1)
    _logqz = _log_density(z.view(batch_size, 1, -1), mu.view(1, batch_size, -1), logvar.view(1, batch_size, -1))
    logiw_matrix = mss_log_weights(batch_size, DATASET_SIZE, dtype=z.dtype, device=z.device)
    logqz = torch.logsumexp(logiw_matrix + _logqz.sum(2), dim=1, keepdim=False)
    logqz_prodmarginals = torch.logsumexp(logiw_matrix.view(batch_size, batch_size, 1) + _logqz, dim=1).sum(1)
    mi = (logqz_condx - logqz).mean()
    tc = (logqz - logqz_prodmarginals).mean()
    dwkl = (logqz_prodmarginals - logpz).mean()
    return (ALPHA * mi + BETA * tc + GAMMA * dwkl,)


# ---------------------------------------------------------------- memory figures


def forward_backward_peak_mb(fn, batch: int, dim: int, device="cpu") -> tuple[float, float]:
    """``(peak MiB, seconds)`` of one forward + backward of ``fn(z, mu, logvar)``, inputs excluded."""
    from .timing import peak_memory_mb

    z, mu, logvar = betatc_inputs((batch, dim), torch.float32, device, torch.Generator().manual_seed(0))

    def step():
        (loss,) = fn(z, mu, logvar)
        torch.autograd.grad(loss, (z, mu, logvar))

    start = time.perf_counter()
    peak = peak_memory_mb(step, device)
    return peak, time.perf_counter() - start


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--dense-batches", default="256,512,1024", help="B for the dense form (it extrapolates as B^2)")
    parser.add_argument("--no-streaming", action="store_true", help="skip the streaming run (minutes on a CPU)")
    parser.add_argument("--kernel-batch", type=int, default=64, help="B for the kernel under the interpreter (0: skip)")
    args = parser.parse_args(argv)
    dim = args.dim
    b2d_mb = args.batch**2 * dim * 4 / 2**20
    print(f"D = {dim}, float32, forward + backward; one B x B x D float32 tensor at B = {args.batch}: {b2d_mb:.0f} MiB")
    with fv.use_backend("reference"):
        for batch in (int(b) for b in args.dense_batches.split(",") if b):
            peak, secs = forward_backward_peak_mb(betatc_dense, batch, dim)
            ratio = peak / (batch**2 * dim * 4 / 2**20)
            print(f"dense     B = {batch:5d}: peak {peak:9.1f} MiB ({ratio:.2f} B^2 D floats; at B = {args.batch}: "
                  f"{ratio * b2d_mb:.0f} MiB)  [{secs:.1f} s]")
        if not args.no_streaming:
            peak, secs = forward_backward_peak_mb(betatc_fused, args.batch, dim)
            inputs_mb = 3 * args.batch * dim * 4 / 2**20
            print(f"streaming B = {args.batch:5d}: peak {peak:9.1f} MiB (the inputs: {inputs_mb:.1f} MiB)  "
                  f"[{secs:.1f} s]")
    if args.kernel_batch and (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"):
        device = "cuda" if torch.cuda.is_available() else "cpu"
        with fv.use_backend("triton"):
            for batch in (args.kernel_batch, 2 * args.kernel_batch):
                peak, secs = forward_backward_peak_mb(betatc_fused, batch, dim, device)
                print(f"kernel    B = {batch:5d} on {device}: peak {peak:9.3f} MiB  [{secs:.1f} s]")


if __name__ == "__main__":
    main()
