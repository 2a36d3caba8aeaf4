"""The Philox noise on every path that draws it: its statistics, and the paths' agreement.

Paths: the reference (:func:`fusedvae.reference.philox_normal`), and the kernels' two ways to draw
the same numbers (Triton's interpreter without a GPU): whole Philox blocks (one call per four
normals: rows whose length and offset are multiples of 4) and one block per element (any other
tiling). Every statistic is checked on each; thresholds are about 5 standard errors, and the
inputs are fixed, so a pass is reproducible.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

if not torch.cuda.is_available():  # before triton is imported (tests/conftest.py does the same)
    os.environ.setdefault("TRITON_INTERPRET", "1")

from noise_checks import assert_standard_normal  # noqa: E402

import fusedvae as fv  # noqa: E402
from fusedvae import reference  # noqa: E402
from fusedvae.kernels import sample_kl as ksample_kl  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
F64 = torch.float64
N_SAMPLES = 4
#: On a GPU the float32 noise takes the hardware approximations (fusedvae.kernels.fastmath): |d eps| <= 1e-6 (1 +
#: radius) <= 7e-6, so z = mu + sd eps is compared with that much more absolute slack per unit of sd.
FAST_EPS_ABS = 7e-6 if DEVICE == "cuda" else 0.0


def _kernel_noise(cols: int, rows: int = 64):
    """eps = z of mu = 0, lv = 0 on the Triton backend: (N_SAMPLES, rows, cols), float64 on the CPU."""
    zeros = torch.zeros(rows, cols, device=DEVICE)
    with fv.use_backend("triton"):
        eps = fv.rsample(zeros, zeros, n_samples=N_SAMPLES, generator=torch.Generator(device=DEVICE).manual_seed(1))
    return eps.double().cpu()


PATHS = {
    # name: draws (N_SAMPLES, rows, cols) eps. Any other tiling draws the same bits as one of these
    # (test_the_two_kernel_paths_draw_the_same_bits).
    "reference": lambda mp: reference.philox_normal(123456789, 2**40 + 4, N_SAMPLES * 64 * 256, dtype=F64)
    .reshape(N_SAMPLES, 64, 256),
    "kernel whole blocks": lambda mp: _kernel_noise(256),
    "kernel per element (row of 255)": lambda mp: _kernel_noise(255),
}


def test_whole_blocks_is_the_path_taken():
    """The launcher's choice: rows and offsets that are multiples of 4 and 4-wide tiles draw whole blocks."""
    view = ksample_kl._common.row_plan(torch.zeros(64, 256), [])[1]
    tiling = ksample_kl._common.row_tiling(view.rows, view.cols, torch.device("cpu"))
    assert ksample_kl._whole_blocks(view, tiling, aligned=True)
    assert not ksample_kl._whole_blocks(view, tiling, aligned=False)
    odd = ksample_kl._common.row_plan(torch.zeros(64, 255), [])[1]
    assert not ksample_kl._whole_blocks(odd, ksample_kl._common.row_tiling(odd.rows, odd.cols, torch.device("cpu")),
                                        True)
    assert fv.seeding.draw_seed_offset(torch.Generator().manual_seed(5))[1] % 4 == 0
    assert all(int(fv.seeding.draw_key("cpu", torch.Generator().manual_seed(s))[1]) % 4 == 0 for s in range(20))


@pytest.mark.parametrize("path", list(PATHS))
def test_noise_statistics_on_every_path(path, monkeypatch):
    """Moments, a Kolmogorov-Smirnov test, tails to 3 sigma, independence across samples and neighbours."""
    eps = PATHS[path](monkeypatch)
    x = eps.flatten()
    n = x.numel()
    assert_standard_normal(x)  # moments, Kolmogorov-Smirnov, tails to 3 sigma, neighbours 1..8 apart
    # independence across samples
    per_sample = eps.reshape(N_SAMPLES, -1)
    m = per_sample.shape[1]
    corr = torch.corrcoef(per_sample)
    assert corr[~torch.eye(N_SAMPLES, dtype=torch.bool)].abs().max().item() < 5 / m**0.5
    for lag in range(1, 9):
        # the two halves of a Box-Muller pair are uncorrelated, but so must be their squares
        r2 = torch.corrcoef(torch.stack([x[:-lag] ** 2, x[lag:] ** 2]))[0, 1].item()
        assert abs(r2) < 5 / n**0.5, (lag, r2)


def test_reference_tails_to_5_sigma():
    """2^21 reference normals beyond 4 sigma, and the exact count of 24-bit u1 whose radius passes 5 sigma."""
    x = reference.philox_normal(99, 2**33, 2**21, dtype=F64)
    p = math.erfc(4 / 2**0.5)
    count = (x.abs() > 4).sum().item()
    assert abs(count - x.numel() * p) < 5 * (x.numel() * p) ** 0.5, (count, x.numel() * p)
    # radius = sqrt(-2 log u1), u1 = k / 2^24: P(radius > t) = P(u1 < exp(-t^2 / 2)), to one value of k in 2^24
    k = torch.arange(1, 2**24 + 1, dtype=F64)
    radius = torch.sqrt(-2.0 * torch.log(k * 2.0**-24))
    for t in (4.0, 5.0, 5.5):
        assert abs((radius > t).sum().item() - 2**24 * math.exp(-t * t / 2)) <= 1.0
    assert 5.7 < radius.max().item() < 5.8  # the largest |normal| a 24-bit u1 can give


@pytest.mark.parametrize("cols", [12, 20])
def test_the_two_kernel_paths_draw_the_same_bits(gen, monkeypatch, cols):
    """Whole blocks (4-wide tiles) and one block per element (2-wide tiles): bitwise the same z and gradients."""
    mu = torch.randn(5, cols, generator=gen).to(DEVICE).requires_grad_()
    lv = torch.randn(5, cols, generator=gen).to(DEVICE).requires_grad_()
    gz = torch.randn(3, 5, cols, generator=gen).to(DEVICE)
    kw = dict(n_samples=3, seed=2**61 + 12345, offset=2**33 - 8, sample=True, kl=False, reduction="sum")
    results = []
    for tiling in ((4, 8, 1), (2, 2, 3)):
        monkeypatch.setattr(ksample_kl, "TILING_OVERRIDE", tiling)
        z, _ = ksample_kl.rsample_kl(mu, lv, None, None, **kw)
        results.append([z, *torch.autograd.grad(z, [mu, lv], gz)])
    for a, b in zip(*results):
        assert torch.equal(a, b)
    want = reference.rsample(mu.detach().double(), lv.detach().double(), n_samples=3, seed=kw["seed"],
                             offset=kw["offset"])
    atol = 1e-5 + FAST_EPS_ABS * torch.exp(0.5 * lv.detach()).max().item()
    torch.testing.assert_close(results[0][0].double(), want, rtol=1e-5, atol=atol)


class _GridSpy:
    """Stands for a JIT kernel: records each launch's grid, then launches the kernel."""

    def __init__(self, kernel):
        self.kernel, self.grids = kernel, []

    def __getitem__(self, grid):
        self.grids.append(grid)
        return self.kernel[grid]


@pytest.mark.parametrize("offset", [2**33 + 8, 2**33 + 7])
@pytest.mark.parametrize("prior", [False, True])
def test_many_samples_of_a_small_posterior_spread_across_programs(gen, monkeypatch, offset, prior):
    """A posterior too small to fill the device: samples spread across programs, forward (the same bits as the
    loop) and backward (per-chunk sums added by torch: the loop's gradients to rounding)."""
    mu = torch.randn(3, 4, generator=gen).to(DEVICE).requires_grad_()
    lv = torch.randn(3, 4, generator=gen).to(DEVICE).requires_grad_()
    plv = torch.randn(4, generator=gen).to(DEVICE).requires_grad_() if prior else None
    gz, gk = torch.randn(64, 3, 4, generator=gen).to(DEVICE), torch.randn(3, generator=gen).to(DEVICE)
    kw = dict(n_samples=64, seed=77, offset=offset, sample=True, kl=True, reduction="per_sample")
    leaves = [mu, lv] + ([plv] if prior else [])
    launches = []
    real = ksample_kl._samples_as_rows
    monkeypatch.setattr(ksample_kl, "_samples_as_rows", lambda *a: launches.append(a) or real(*a))
    backward = _GridSpy(ksample_kl._sample_kl_backward_kernel)
    monkeypatch.setattr(ksample_kl, "_sample_kl_backward_kernel", backward)
    spread = ksample_kl.rsample_kl(mu, lv, None, plv, **kw)
    spread_grads = torch.autograd.grad(spread, leaves, [gz, gk])
    assert len(launches) == 1
    assert backward.grids[0][1] > 1 and len(backward.grids) == 2  # samples in chunks; the KL's part apart
    monkeypatch.setattr(ksample_kl._common, "target_programs", lambda device: 1)  # the posterior "fills" it
    looped = ksample_kl.rsample_kl(mu, lv, None, plv, **kw)
    looped_grads = torch.autograd.grad(looped, leaves, [gz, gk])
    assert len(launches) == 1
    assert len(backward.grids) == 3 and backward.grids[2][1] == 1
    for a, b in zip(spread, looped):
        assert torch.equal(a, b)
    # 64 float32 terms summed in another order: ~64 ulps of the sum of |terms|, not an ulp of the result
    # (with the GPU's FAST noise one element of 0.36 differed by 1.7e-6 under the emulation)
    for a, b in zip(spread_grads, looped_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    want = reference.rsample(mu.detach().double(), lv.detach().double(), n_samples=64, seed=77, offset=offset)
    atol = 1e-5 + FAST_EPS_ABS * torch.exp(0.5 * lv.detach()).max().item()
    torch.testing.assert_close(spread[0].double(), want, rtol=1e-5, atol=atol)
    up = [t.detach().double().requires_grad_() for t in leaves]
    z_ref, kl_ref = reference.rsample_kl(up[0], up[1], None, up[2] if prior else None, **kw)
    want_grads = torch.autograd.grad((z_ref, kl_ref), up, [gz.double(), gk.double()])
    # dlogvar sums 0.5 sd dz eps over 64 samples: the FAST bound on eps times sum |dz|
    grad_atol = 8e-5 + 0.5 * FAST_EPS_ABS * (torch.exp(0.5 * lv.detach()) * gz.abs().sum(0)).max().item()
    for got, expected in zip(spread_grads, want_grads):
        torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=grad_atol)


# The FAST path (fusedvae.kernels.fastmath) is inline PTX: the interpreter cannot run it, so its code is checked
# by compiling for sm_90 in a subprocess (Triton's real compiler, bench.static's stub driver), its numbers on a GPU.
_COMPILE_BOTH_PATHS = r"""
import json, sys, torch
from bench.static.capture import cuda_like, intercept
from fusedvae.kernels import fastmath, sample_kl

def ptx(fast):
    fastmath_is_fast, sample_kl.fastmath.is_fast = sample_kl.fastmath.is_fast, lambda t: fast
    try:
        with intercept(90, compile=True) as rec:
            mu, lv, pmu, plv = (cuda_like(torch.zeros(64, 256, requires_grad=True)) for _ in range(4))
            key = cuda_like(torch.tensor([5, 8]))
            z, kl = sample_kl.rsample_kl(mu, lv, pmu, plv, n_samples=1, key=key, sample=True, kl=True,
                                         reduction="sum")
            torch.autograd.graph._engine_run_backward((z, kl), (torch.ones_like(z), torch.ones_like(kl)), False,
                                                      False, (mu, lv, pmu, plv), True, False)
    finally:
        sample_kl.fastmath.is_fast = fastmath_is_fast
    return {l.kernel.split(":")[-1]: l.compiled.asm["ptx"] for l in rec.launches}

json.dump({"fast": ptx(True), "exact": ptx(False)}, sys.stdout)
"""


def test_fast_path_compiles_to_the_hardware_approximations():
    """sm_90 PTX: FAST kernels use lg2/sqrt/sin/cos/ex2.approx and PTX mul.hi; the exact path none, and no ex2."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1"}
    proc = subprocess.run([sys.executable, "-c", _COMPILE_BOTH_PATHS], cwd=root, env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ptx = json.loads(proc.stdout)
    kernels = {"_sample_kl_forward_kernel", "_sample_kl_backward_kernel"}
    assert set(ptx["fast"]) == set(ptx["exact"]) == kernels
    for name in kernels:
        fast, exact = ptx["fast"][name], ptx["exact"][name]
        for op in ("lg2.approx.ftz.f32", "sin.approx.ftz.f32", "cos.approx.ftz.f32", "sqrt.approx.ftz.f32",
                   "ex2.approx.ftz.f32", "mul.hi.u32"):
            assert op in fast, (name, op)
        # the exact path: no approximation of log, sin, cos; and no ex2.approx at all, so no float32 tl.exp
        # (ex2.approx(x log2 e), relative error |x| x 6e-8: what broke the KL's finite-to-80 contract on a GPU)
        for op in ("lg2.approx", "sin.approx", "cos.approx", "ex2.approx"):
            assert op not in exact, (name, op)
