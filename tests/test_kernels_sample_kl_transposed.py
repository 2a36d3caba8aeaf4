"""The memory-order kernels of sampling + KL for batched-transpose layouts (channels-last, H/W swapped).

:mod:`fusedvae.kernels.sample_kl_transposed` tiles ``mu``'s memory order where it transposes the logical order.
Checked here (Triton's interpreter without a GPU): values and gradients against the float64 reference; z bit for
bit the contiguous path's (the noise is keyed by the logical index); outputs with the row-view path's shapes,
dtypes and strides; two runs bitwise equal; the path really taken, and the layouts it declines still right; the
FAST path's logic through :mod:`fusedvae.kernels.fastmath`'s emulation.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():  # before triton is imported (tests/conftest.py does the same)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import test_kernels_sample_kl as row_view_tests  # noqa: E402
from test_kernels_sample_kl import compare_to_reference, randn  # noqa: E402

import fusedvae as fv  # noqa: E402
from fusedvae.kernels import fastmath  # noqa: E402
from fusedvae.kernels import sample_kl as ksample_kl  # noqa: E402
from fusedvae.kernels import sample_kl_transposed as ktr  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
F32, BF16 = torch.float32, torch.bfloat16
REDUCTIONS = ("none", "sum", "per_sample", "per_dim")


@pytest.fixture(autouse=True)
def _nan_filled_outputs(nan_filled_outputs, monkeypatch):
    """Every output, gradient and partial-sum buffer starts as NaN; default tilings."""
    monkeypatch.setattr(ksample_kl, "TILING_OVERRIDE", None)
    monkeypatch.setattr(ktr, "TILING_OVERRIDE", None)


class _NoLaunch:
    def __getitem__(self, grid):
        raise AssertionError("the row-view kernel launched where the memory-order path should run")


@pytest.fixture
def transposed_only(monkeypatch):
    """The row-view kernels raise if launched: the memory-order path must take the call.

    The random grad_outputs of :func:`compare_to_reference` take their output's layout, as autograd's do when z
    feeds a channels-last network (a contiguous dz is declined: :func:`test_declined_layouts_still_match_the_reference`).
    """
    monkeypatch.setattr(ksample_kl, "_sample_kl_forward_kernel", _NoLaunch())
    monkeypatch.setattr(ksample_kl, "_sample_kl_backward_kernel", _NoLaunch())
    make = row_view_tests.make_grad_outputs

    def in_output_layout(gen, n):
        return [lambda out, g=g: torch.empty_strided(out.shape, out.stride(), dtype=torch.float64,
                                                     device=out.device).copy_(g(out)) for g in make(gen, n)]

    monkeypatch.setattr(row_view_tests, "make_grad_outputs", in_output_layout)


def in_layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """``t``'s values in ``layout``: ``channels_last`` (N, C, H, W) strides (HWC, 1, WC, C), ``permuted`` H/W swapped."""
    if layout == "channels_last":
        out = t.contiguous(memory_format=torch.channels_last)
    else:
        out = t.transpose(2, 3).contiguous().transpose(2, 3)
    assert not out.is_contiguous() and ktr.batched_transpose(tuple(out.shape), out.stride()) is not None
    return out


# ---------------------------------------------------------------------------------------------
# The layout decision
# ---------------------------------------------------------------------------------------------


def test_batched_transpose_layouts():
    L = ktr.Layout
    cl = torch.empty(2, 16, 8, 8).contiguous(memory_format=torch.channels_last)
    assert ktr.batched_transpose(tuple(cl.shape), cl.stride()) == L(2, 1, 64, 16, True)
    perm = torch.empty(2, 3, 5, 7).transpose(2, 3).contiguous().transpose(2, 3)
    assert ktr.batched_transpose(tuple(perm.shape), perm.stride()) == L(2, 3, 7, 5, True)
    cl3d = torch.empty(2, 4, 3, 5, 6).contiguous(memory_format=torch.channels_last_3d)
    assert ktr.batched_transpose(tuple(cl3d.shape), cl3d.stride()) == L(2, 1, 90, 4, True)
    one = torch.empty(1, 4, 3, 5).contiguous(memory_format=torch.channels_last)
    assert ktr.batched_transpose(tuple(one.shape), one.stride()) == L(1, 1, 15, 4, True)
    t2 = torch.empty(9, 6).t()  # (6, 9), dim 0 innermost: rows are not the outer factor
    assert ktr.batched_transpose(tuple(t2.shape), t2.stride()) == L(1, 1, 9, 6, False)
    for shape, strides in [((2, 3, 4, 5), (60, 20, 5, 1)),  # contiguous
                           ((2, 3, 4, 5), (60, 1, 3, 12)),  # another order
                           ((2, 3, 4, 5), (120, 1, 6, 3)),  # a slice: not dense
                           ((2, 3, 4, 5), (1, 2, 6, 24)),  # dim 0 innermost in a 4-D tensor
                           ((0, 3, 4, 5), (60, 1, 15, 3))]:  # empty
        assert ktr.batched_transpose(shape, strides) is None, (shape, strides)


# ---------------------------------------------------------------------------------------------
# Values and gradients against the float64 reference
# ---------------------------------------------------------------------------------------------

# (id, layout, shape, prior full-size?, dtype, kwargs, tiling override (BLOCK_P, BLOCK_Q, row_steps) or None)
CASES = [
    ("cl-none-f32", "channels_last", (3, 8, 4, 6), False, F32, dict(reduction="none"), None),
    ("cl-sum-prior-bf16", "channels_last", (3, 8, 4, 6), True, BF16, dict(reduction="sum"), None),
    ("cl-per_sample-K3-tiled", "channels_last", (3, 8, 4, 6), False, F32,
     dict(reduction="per_sample", n_samples=3), (8, 4, 2)),
    ("cl-per_dim-prior-K3-bf16-tiled", "channels_last", (3, 8, 4, 6), True, BF16,
     dict(reduction="per_dim", n_samples=3), (4, 4, 1)),
    ("cl-P%4-batchmean-prior", "channels_last", (2, 5, 3, 3), True, F32, dict(reduction="batchmean"), None),
    ("cl-P%4-none-K3-tiled-bf16", "channels_last", (2, 5, 3, 3), False, BF16,
     dict(reduction="none", n_samples=3), (4, 4, 1)),
    ("perm-P%4-none-prior", "permuted", (2, 3, 5, 6), True, F32, dict(reduction="none"), None),
    ("perm-P%4-per_sample-bf16", "permuted", (2, 3, 5, 6), False, BF16, dict(reduction="per_sample"), None),
    ("perm-per_dim-tiled", "permuted", (2, 3, 6, 8), False, F32, dict(reduction="per_dim"), (4, 8, 2)),
    ("perm-sum-prior-K3-tiled", "permuted", (2, 3, 6, 8), True, F32, dict(reduction="sum", n_samples=3), (4, 2, 1)),
    ("perm-none-prior-K3-bf16-tiled", "permuted", (2, 3, 6, 8), True, BF16,
     dict(reduction="none", n_samples=3), (8, 4, 2)),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_values_and_grads_match_the_float64_reference(gen, monkeypatch, transposed_only, case):
    _, layout, shape, prior, dtype, kwargs, override = case
    monkeypatch.setattr(ktr, "TILING_OVERRIDE", override)
    mu, lv = in_layout(randn(gen, shape), layout), in_layout(randn(gen, shape, scale=1.5), layout)
    priors = [in_layout(randn(gen, shape, scale=0.7), layout) for _ in range(2)] if prior else [None, None]
    compare_to_reference(gen, "rsample_kl", [mu, lv, *priors], (dtype,) * 4, kwargs)


def test_rsample_and_kl_normal_alone(gen, transposed_only):
    mu = in_layout(randn(gen, (2, 4, 3, 4)), "channels_last")
    lv = in_layout(randn(gen, (2, 4, 3, 4)), "channels_last")
    compare_to_reference(gen, "rsample", [mu, lv, None, None], (BF16,) * 4, dict())
    compare_to_reference(gen, "kl_normal", [mu, lv, None, None], (F32,) * 4, dict(reduction="per_dim"))


# ---------------------------------------------------------------------------------------------
# The row-view path's outputs, bit for bit where elementwise
# ---------------------------------------------------------------------------------------------


def _run(mu, lv, pmu, plv, reduction, n_samples, offset, gz_seed=3):
    """z, the KL and the four gradients through :func:`ksample_kl.rsample_kl` (the custom op)."""
    leaves = [t.detach().requires_grad_() for t in (mu, lv, pmu, plv)]
    z, kl = ksample_kl.rsample_kl(*leaves, n_samples=n_samples, seed=1234567, offset=offset, sample=True, kl=True,
                                  reduction=reduction)
    g = torch.Generator().manual_seed(gz_seed)
    gz = torch.randn(z.shape, generator=g).to(z.dtype).to(DEVICE)
    gz = torch.empty_strided(z.shape, z.stride(), dtype=z.dtype, device=DEVICE).copy_(gz)  # autograd's layout
    gk = torch.randn(kl.shape, generator=g).to(kl.dtype).to(DEVICE)
    gk = torch.empty_strided(kl.shape, kl.stride(), dtype=kl.dtype, device=DEVICE).copy_(gk)
    return [z, kl, *torch.autograd.grad([z, kl], leaves, [gz, gk])]


@pytest.mark.parametrize("layout, shape, offset, tiling", [
    ("channels_last", (3, 8, 4, 6), 8, (4, 8, 1)),  # whole Philox blocks, BLOCK_P < BLOCK_Q: drawn [BLOCK_P / 4, Q]
    ("channels_last", (3, 8, 4, 6), 8, (8, 4, 2)),  # whole blocks drawn along the runs, transposed
    ("permuted", (2, 3, 5, 6), 8, (4, 4, 1)),  # P = 6: per-element noise; Q = 5: masked
    ("channels_last", (2, 8, 4, 4), 2**33 + 6, (4, 4, 1)),  # an unaligned key: per-element noise
])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_same_outputs_as_the_row_view_path(gen, monkeypatch, layout, shape, offset, tiling, reduction):
    """z, an elementwise KL and every gradient bit for bit, reductions to rounding; same shapes, dtypes, strides.

    bfloat16 posterior, float32 priors (mixed dtypes); two samples, many programs.
    """
    mu, lv, pmu, plv = (in_layout(randn(gen, shape), layout) for _ in range(4))
    mu, lv, pmu, plv = mu.to(BF16), lv.to(BF16), pmu.float(), plv.float()
    monkeypatch.setattr(ktr, "TILING_OVERRIDE", tiling)
    forward = ktr.forward
    calls = _record(monkeypatch)
    new = _run(mu, lv, pmu, plv, reduction, 2, offset)
    assert calls["forward"] and calls["backward"]
    assert all(c is not None for c in calls["forward"] + calls["backward"])  # the memory-order path ran
    monkeypatch.setattr(ktr, "forward", lambda *a, **k: None)
    monkeypatch.setattr(ktr, "backward", lambda *a, **k: None)
    old = _run(mu, lv, pmu, plv, reduction, 2, offset)
    assert new[0].stride() == (mu.numel(), *mu.stride())
    for name, a, b in zip(("z", "kl", "dmu", "dlogvar", "dprior_mu", "dprior_logvar"), new, old):
        assert a.shape == b.shape and a.dtype == b.dtype and a.stride() == b.stride(), name
        if name == "kl" and reduction != "none":
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
        else:
            assert torch.equal(a, b), name
    # and z equals the contiguous tensor's z: the noise is keyed by the logical index alone
    monkeypatch.setattr(ktr, "forward", forward)
    z_contiguous = _run(mu.contiguous(), lv.contiguous(), pmu.contiguous(), plv.contiguous(), reduction, 2, offset)[0]
    assert torch.equal(new[0], z_contiguous)


def test_summed_elementwise_kl_reads_one_gradient_value(gen, monkeypatch):
    """``kl.sum()`` of an elementwise KL hands back an expanded scalar (strides 0): read once, not declined."""
    monkeypatch.setattr(ktr, "TILING_OVERRIDE", (4, 4, 1))
    leaves = [in_layout(randn(gen, (2, 4, 3, 4)), "channels_last").float() for _ in range(2)]
    gz = in_layout(randn(gen, (2, 4, 3, 4)), "channels_last").float()

    def grads():
        mu, lv = (t.detach().requires_grad_() for t in leaves)
        z, kl = ksample_kl.rsample_kl(mu, lv, None, None, n_samples=1, seed=3, offset=4, sample=True, kl=True,
                                      reduction="none")
        # squeeze, as fv.rsample_kl: a view, so z's gradient keeps gz's layout (z[0]'s would be a contiguous copy)
        return torch.autograd.grad((z.squeeze(0) * gz).sum() + 0.75 * kl.sum(), [mu, lv])

    calls = _record(monkeypatch)
    new = grads()
    assert calls["backward"] and all(c is not None for c in calls["backward"])
    monkeypatch.setattr(ktr, "forward", lambda *a, **k: None)
    monkeypatch.setattr(ktr, "backward", lambda *a, **k: None)
    for a, b in zip(new, grads()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_two_runs_bitwise_equal(gen, monkeypatch, transposed_only, reduction):
    monkeypatch.setattr(ktr, "TILING_OVERRIDE", (4, 2, 2))  # 36 programs, partial sums across them
    leaves = [in_layout(randn(gen, (3, 4, 6, 4)), "permuted").float() for _ in range(4)]
    first, second = _run(*leaves, reduction, 1, 16), _run(*leaves, reduction, 1, 16)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------
# What the path declines still runs, and right
# ---------------------------------------------------------------------------------------------


def _declined_cases(gen):
    shape = (2, 4, 3, 4)
    cl = [in_layout(randn(gen, shape), "channels_last") for _ in range(2)]
    per_channel = randn(gen, (4, 1, 1))
    two_d = [randn(gen, (8, 6)).t() for _ in range(2)]  # (6, 8) with dim 0 innermost
    odd_p = [in_layout(randn(gen, (2, 4, 3, 3)), "channels_last") for _ in range(2)]  # rows of 36
    return [
        ("broadcast prior", [*cl, per_channel, per_channel], dict(reduction="sum"), None),
        ("mixed layouts", [cl[0], cl[1].contiguous(), None, None], dict(reduction="none"), None),
        ("many samples, few programs", [*cl, None, None], dict(reduction="per_dim", n_samples=3), None),
        ("2-D transpose per_sample", [*two_d, None, None], dict(reduction="per_sample"), None),
        ("2-D transpose sum (taken)", [*two_d, None, None], dict(reduction="sum"), True),
        ("P = 9: the row view draws whole blocks", [*odd_p, None, None], dict(reduction="none"), None),
    ]


def _record(monkeypatch) -> dict[str, list]:
    """What :func:`ktr.forward` / :func:`ktr.backward` return from now on (None: declined), call by call."""
    calls = {"forward": [], "backward": []}
    for name, seen in calls.items():
        original = getattr(ktr, name)
        monkeypatch.setattr(ktr, name, lambda *a, f=original, seen=seen, **k: seen.append(f(*a, **k)) or seen[-1])
    return calls


def test_declined_layouts_still_match_the_reference(gen, monkeypatch):
    """Declined calls run the row-view kernels, with the reference's values; a contiguous dz declines the backward."""
    for name, inputs, kwargs, taken in _declined_cases(gen):
        calls = _record(monkeypatch)
        compare_to_reference(gen, "rsample_kl", inputs, (F32,) * 4, kwargs)  # contiguous grad_outputs
        assert calls["forward"] and calls["backward"], name
        assert all((c is not None) == bool(taken) for c in calls["forward"]), name
        assert all(c is None for c in calls["backward"]), name


def test_too_many_row_chunks_for_the_grid_are_declined(gen, monkeypatch):
    """Row chunks ride the grid's second axis (CUDA: at most 65535): more are left to the row-view kernels."""
    monkeypatch.setattr(ktr, "TILING_OVERRIDE", (4, 4, 1))  # one row a chunk: 3 chunks
    monkeypatch.setattr(ktr, "MAX_GRID_Y", 2)
    calls = _record(monkeypatch)
    mu, lv = (in_layout(randn(gen, (3, 4, 2, 4)), "channels_last") for _ in range(2))
    compare_to_reference(gen, "rsample_kl", [mu, lv, None, None], (F32,) * 4, dict(reduction="per_sample"))
    assert calls["forward"] == [None]


# ---------------------------------------------------------------------------------------------
# The FAST path's logic, emulated under the interpreter
# ---------------------------------------------------------------------------------------------


@pytest.mark.skipif(not fastmath.EMULATED, reason="the FAST path is emulated under TRITON_INTERPRET=1")
@pytest.mark.parametrize("dtype", [F32, BF16])
def test_fast_path_emulated_matches_the_row_view_fast_path(gen, monkeypatch, dtype):
    """FAST on for CPU tensors: z and every gradient bit for bit the row-view FAST path's (its bf16 eight-normals
    layout included), the KL to rounding; and the noise within the FAST bound of the exact noise."""
    monkeypatch.setattr(fastmath, "is_fast", lambda t: True)
    monkeypatch.setattr(ktr, "TILING_OVERRIDE", (8, 4, 1))
    leaves = [in_layout(randn(gen, (2, 8, 4, 4), scale=s), "channels_last").to(dtype) for s in (1.0, 1.5, 0.7, 0.7)]
    new = _run(*leaves, "sum", 2, 8)
    old = _run(*(t.contiguous() for t in leaves), "sum", 2, 8)
    assert torch.equal(new[0], old[0])  # values; the layouts differ (mu's each)
    torch.testing.assert_close(new[1], old[1], rtol=1e-6, atol=1e-6)
    for a, b in zip(new[2:], old[2:]):
        assert torch.equal(a, b)
    zeros = in_layout(torch.zeros(2, 8, 4, 4, device=DEVICE), "channels_last")
    with fv.use_backend("triton"):
        eps = fv.rsample(zeros, zeros, n_samples=1, generator=torch.Generator(device=DEVICE).manual_seed(5))
    monkeypatch.setattr(fastmath, "is_fast", lambda t: False)
    with fv.use_backend("triton"):
        exact = fv.rsample(zeros, zeros, n_samples=1, generator=torch.Generator(device=DEVICE).manual_seed(5))
    error = (eps.double() - exact.double()).abs().max().item()
    assert 0.0 < error <= 1e-6 * (1.0 + 5.77), error  # |d eps| <= 1e-6 (1 + radius), radius <= 5.77
