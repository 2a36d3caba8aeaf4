"""The streamed aggregate posterior (issue 17): the streaming reference and the Triton kernel against the dense form.

The dense float64 form (:func:`fusedvae.analysis.betatc.log_aggregate_posterior`, which builds the
``(B, B, D)`` tensor) is the yardstick for values and gradients. The kernel runs through Triton's
interpreter on a CPU (``TRITON_INTERPRET=1``, set by conftest.py), compiled on a GPU; batch sizes stay
small and odd, with block sizes that leave a partial last block.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():  # before triton is imported (tests/conftest.py does the same)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import fusedvae as fv  # noqa: E402
from fusedvae import betatc as public  # noqa: E402
from fusedvae.analysis import betatc as ref  # noqa: E402
from fusedvae.analysis.estimators import kl_estimator_a  # noqa: E402
from fusedvae.kernels import betatc as kernel  # noqa: E402

F64 = torch.float64
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
N = 1000  # dataset size


@pytest.fixture(autouse=True)
def _nan_filled_outputs(monkeypatch):
    """Every buffer the kernels write starts as NaN: an element a kernel forgets fails the comparison."""

    def empty(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(kernel, "_empty", empty)


@pytest.fixture
def blocks(monkeypatch):
    """Force the kernels' (BLOCK_I, BLOCK_J); ``None`` keeps the launcher's choice."""

    def use(value):
        monkeypatch.setattr(kernel, "BLOCK_OVERRIDE", value)

    return use


def posterior(gen, batch, dim, dtype=F64):
    """``(z, mu, logvar)``: spread-out posteriors and one sample of each, leaves that require grad."""
    mu = torch.randn(batch, dim, generator=gen, dtype=F64) * 1.5
    logvar = torch.randn(batch, dim, generator=gen, dtype=F64) - 0.5
    z = mu + torch.exp(0.5 * logvar) * torch.randn(batch, dim, generator=gen, dtype=F64)
    return tuple(t.to(DEVICE, dtype).requires_grad_() for t in (z, mu, logvar))


def values_and_grads(fn, inputs, gen):
    """``(joint, marginals, dz, dmu, dlogvar)`` with random incoming gradients (not 1) on both outputs."""
    joint, marginals = fn(*inputs)
    g_joint = torch.randn(joint.shape, generator=gen, dtype=F64).to(DEVICE, joint.dtype)
    g_marg = torch.randn(marginals.shape, generator=gen, dtype=F64).to(DEVICE, marginals.dtype)
    grads = torch.autograd.grad((joint * g_joint).sum() + (marginals * g_marg).sum(), inputs)
    return (joint.detach(), marginals.detach(), *grads)


def dense(sampling):
    return lambda z, mu, lv: ref.log_aggregate_posterior(z.double(), mu.double(), lv.double(), N, sampling=sampling)


def streaming(sampling, block_size):
    return lambda z, mu, lv: ref.streaming_log_aggregate_posterior(
        z, mu, lv, N, sampling=sampling, block_size=block_size
    )


def triton(sampling):
    return lambda z, mu, lv: kernel.log_aggregate_posterior(z, mu, lv, N, sampling)


def assert_close_all(got, want, atol, rtol=0.0):
    names = ("joint", "marginals", "dz", "dmu", "dlogvar")
    for name, a, b in zip(names, got, want):
        torch.testing.assert_close(a.double(), b.double(), atol=atol, rtol=rtol, msg=lambda m, n=name: f"{n}: {m}")


# ---------------------------------------------------------------- float64 parity with the dense form


@pytest.mark.parametrize("sampling", ["mss", "mws"])
@pytest.mark.parametrize("batch, dim, block_size", [(2, 1, 1), (13, 5, 4), (37, 3, 16), (9, 6, 64)])
def test_streaming_reference_matches_dense(gen, sampling, batch, dim, block_size):
    inputs = posterior(gen, batch, dim)
    want = values_and_grads(dense(sampling), inputs, torch.Generator().manual_seed(1))
    got = values_and_grads(streaming(sampling, block_size), inputs, torch.Generator().manual_seed(1))
    assert_close_all(got, want, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("sampling", ["mss", "mws"])
@pytest.mark.parametrize("batch, dim, block", [(2, 1, (2, 2)), (13, 5, (4, 2)), (19, 3, (8, 4)), (11, 7, None)])
def test_kernel_matches_dense_float64(gen, blocks, sampling, batch, dim, block):
    blocks(block)
    inputs = posterior(gen, batch, dim)
    want = values_and_grads(dense(sampling), inputs, torch.Generator().manual_seed(2))
    got = values_and_grads(triton(sampling), inputs, torch.Generator().manual_seed(2))
    assert all(t.dtype == F64 for t in got)
    assert_close_all(got, want, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("sampling", ["mss", "mws"])
def test_kernel_float32_error_is_within_twice_the_eager_float32_error(gen, blocks, sampling):
    blocks((4, 4))
    inputs64 = posterior(gen, 23, 6)
    inputs32 = tuple(t.detach().float().requires_grad_() for t in inputs64)
    exact = values_and_grads(dense(sampling), inputs64, torch.Generator().manual_seed(3))
    eager = values_and_grads(
        lambda z, mu, lv: ref.log_aggregate_posterior(z, mu, lv, N, sampling=sampling),
        inputs32, torch.Generator().manual_seed(3),
    )
    got = values_and_grads(triton(sampling), inputs32, torch.Generator().manual_seed(3))
    assert all(t.dtype == torch.float32 for t in got)
    for name, g, e, x in zip(("joint", "marginals", "dz", "dmu", "dlogvar"), got, eager, exact):
        kernel_err = (g.double() - x).abs().max().item()
        eager_err = (e.double() - x).abs().max().item()
        assert kernel_err <= 2 * eager_err + 1e-5 * x.abs().max().item(), (name, kernel_err, eager_err)


def test_kernel_tiles_independent_of_block_sizes(gen, blocks):
    """Different tilings sum in different orders, but agree to rounding: no element depends on the tiling."""
    inputs = posterior(gen, 17, 4)
    results = []
    for block in [(1, 1), (4, 8), (16, 2)]:
        blocks(block)
        results.append(values_and_grads(triton("mss"), inputs, torch.Generator().manual_seed(4)))
    for other in results[1:]:
        assert_close_all(other, results[0], atol=1e-12, rtol=1e-12)


# ---------------------------------------------------------------- determinism


@pytest.mark.parametrize("impl", ["triton", "streaming"])
def test_two_runs_are_bitwise_equal(gen, blocks, impl):
    blocks((4, 2))
    inputs = tuple(t.detach().float().requires_grad_() for t in posterior(gen, 15, 5))
    fn = triton("mss") if impl == "triton" else streaming("mss", 4)
    first = values_and_grads(fn, inputs, torch.Generator().manual_seed(5))
    second = values_and_grads(fn, inputs, torch.Generator().manual_seed(5))
    for a, b in zip(first, second):
        assert torch.equal(a, b)


# ---------------------------------------------------------------- the public API


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("sampling", ["mss", "mws"])
def test_public_decomposition_matches_the_dense_form(gen, backend, sampling):
    z, mu, logvar = posterior(gen, 21, 4)
    prior_mu = torch.randn(4, generator=gen, dtype=F64).to(DEVICE)
    prior_logvar = torch.randn(1, 4, generator=gen, dtype=F64).to(DEVICE)
    want = ref.betatc_decomposition(z, mu, logvar, N, sampling=sampling, prior_mu=prior_mu, prior_logvar=prior_logvar)
    with fv.use_backend(backend):
        got = fv.betatc_decomposition(z, mu, logvar, N, sampling=sampling, prior_mu=prior_mu, prior_logvar=prior_logvar)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)
    grads_want = torch.autograd.grad(want.mutual_information + 3 * want.total_correlation, (z, mu, logvar))
    grads_got = torch.autograd.grad(got.mutual_information + 3 * got.total_correlation, (z, mu, logvar))
    for a, b in zip(grads_got, grads_want):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_non_contiguous_inputs(gen, backend):
    """A transposed z and column slices of wider tensors (what an encoder's ``chunk(2, dim=1)`` gives)."""
    z, mu, logvar = posterior(gen, 9, 4)
    wide = torch.cat([mu.detach(), logvar.detach()], dim=1)
    mu_view, logvar_view = wide.chunk(2, dim=1)
    z_view = z.detach().t().contiguous().t()
    assert not (mu_view.is_contiguous() or logvar_view.is_contiguous() or z_view.is_contiguous())
    with fv.use_backend(backend):
        got = fv.betatc_decomposition(z_view, mu_view, logvar_view, N)
    want = ref.betatc_decomposition(z.detach(), mu.detach(), logvar.detach(), N)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_betatc_loss_weights_the_three_terms(gen, backend):
    z, mu, logvar = posterior(gen, 12, 3)
    with fv.use_backend(backend):
        terms = fv.betatc_decomposition(z, mu, logvar, N)
        loss = fv.betatc_loss(z, mu, logvar, N, alpha=0.5, beta=6.0, gamma=2.0)
        plain = fv.betatc_loss(z, mu, logvar, N, alpha=1.0, beta=1.0, gamma=1.0)
    torch.testing.assert_close(
        loss, 0.5 * terms.mutual_information + 6.0 * terms.total_correlation + 2.0 * terms.dimensionwise_kl
    )
    # alpha = beta = gamma = 1: exactly estimator A of the KL term, log q(z|x) - log p(z), whatever q(z)'s estimate
    torch.testing.assert_close(plain, kl_estimator_a(z, mu, logvar).sum(-1).mean(), atol=1e-12, rtol=1e-12)
    loss.backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in (z, mu, logvar))


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_one_streamed_log_qz_serves_mutual_information_and_diagnostics(gen, backend):
    """MI and TC come from the very log q(z) that log_aggregate_posterior returns (the diagnostics' input)."""
    z, mu, logvar = posterior(gen, 10, 3)
    with fv.use_backend(backend):
        log_qz = public.log_aggregate_posterior(z, mu, logvar, N)
        terms = fv.betatc_decomposition(z, mu, logvar, N)
    log_qz_given_x = torch.distributions.Normal(mu, torch.exp(0.5 * logvar)).log_prob(z).sum(-1)
    torch.testing.assert_close(terms.mutual_information, (log_qz_given_x - log_qz.joint).mean())
    torch.testing.assert_close(terms.total_correlation, (log_qz.joint - log_qz.marginals.sum(-1)).mean())
    # the joint estimate only needs its own gradient (the marginals' incoming gradient is absent)
    (dz,) = torch.autograd.grad(log_qz.joint.sum(), (z,))
    (dz_dense,) = torch.autograd.grad(ref.log_aggregate_posterior(z, mu, logvar, N).joint.sum(), (z,))
    torch.testing.assert_close(dz, dz_dense, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_half_inputs_compute_in_float32_and_return_their_dtype(gen, backend):
    z, mu, logvar = (t.detach().to(torch.bfloat16) for t in posterior(gen, 9, 3))
    with fv.use_backend(backend):
        terms = fv.betatc_decomposition(z, mu, logvar, N)
    want = ref.betatc_decomposition(z.double(), mu.double(), logvar.double(), N)
    for a, b in zip(terms, want):
        assert a.dtype == torch.bfloat16
        torch.testing.assert_close(a.double(), b, atol=0.05, rtol=0.01)


def test_custom_op_registration(gen):
    z, mu, logvar = posterior(gen, 6, 2)
    torch.library.opcheck(torch.ops.fusedvae.betatc_aggregate_posterior.default, (z, mu, logvar, N, "mss"))


def test_torch_compile_sees_one_opaque_node(gen):
    """fullgraph=True: no graph break, and the streamed estimate is one custom-op call in Dynamo's graph."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    z, mu, logvar = posterior(gen, 7, 3)
    with fv.use_backend("triton"):
        compiled = torch.compile(lambda z, mu, lv: fv.betatc_loss(z, mu, lv, N), backend=backend, fullgraph=True)
        loss = compiled(z, mu, logvar)
    torch._dynamo.reset()
    targets = [node.target for node in graphs[0].graph.nodes if node.op == "call_function"]
    op = torch.ops.fusedvae.betatc_aggregate_posterior
    assert sum(target in (op, op.default) for target in targets) == 1
    mi, tc, dwkl = ref.betatc_decomposition(z, mu, logvar, N)
    torch.testing.assert_close(loss, mi + 6.0 * tc + dwkl, atol=1e-12, rtol=1e-12)


def test_the_benchmark_baseline_computes_the_same_loss(gen):
    """bench.betatc_cases' dense torch form (the authors' code) and the fused op: same value, same gradients."""
    from bench import betatc_cases

    z, mu, logvar = posterior(gen, 11, 4)
    (dense_loss,) = betatc_cases.betatc_dense(z, mu, logvar)
    (fused_loss,) = betatc_cases.betatc_fused(z, mu, logvar)
    torch.testing.assert_close(fused_loss, dense_loss, atol=1e-12, rtol=1e-12)
    for a, b in zip(torch.autograd.grad(fused_loss, (z, mu, logvar)), torch.autograd.grad(dense_loss, (z, mu, logvar))):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)


# ---------------------------------------------------------------- memory


def test_streaming_reference_memory_does_not_grow_with_b_squared():
    """Forward + backward peak: tiles and O(B·D) buffers on the streaming path, ~7 B^2 D floats on the dense one."""
    from bench.timing import peak_memory_mb  # the micro-benchmarks' peak_mem_mb (the profiler's CPU allocations)

    batch, dim = 256, 8
    gen = torch.Generator().manual_seed(0)
    z, mu, logvar = (torch.randn(batch, dim, generator=gen).requires_grad_() for _ in range(3))

    def peak(fn):
        def step():
            joint, marginals = fn(z, mu, logvar, N)
            (joint.sum() + marginals.sum()).backward()

        return peak_memory_mb(step, "cpu")

    b2d_mb = batch * batch * dim * 4 / 2**20  # one float32 B x B x D tensor: 2 MiB
    dense_mb = peak(ref.log_aggregate_posterior)
    streamed_mb = peak(lambda *args: ref.streaming_log_aggregate_posterior(*args, block_size=32))
    assert dense_mb >= b2d_mb  # the measurement sees the dense form's B x B x D temporaries
    assert streamed_mb < b2d_mb / 4, (streamed_mb, dense_mb)


# ---------------------------------------------------------------- bad input


def test_bad_input_is_rejected(gen):
    z, mu, logvar = (t.detach() for t in posterior(gen, 8, 3))
    with pytest.raises(TypeError, match="z"):
        fv.betatc_loss(z.numpy(), mu, logvar, N)
    with pytest.raises(TypeError, match="mu"):
        fv.betatc_decomposition(z, mu.long(), logvar, N)
    with pytest.raises(ValueError, match="logvar"):
        fv.betatc_decomposition(z, mu, logvar[:, :2], N)
    with pytest.raises(ValueError, match="mu"):
        fv.betatc_decomposition(z[0], mu[0], logvar[0], N)
    with pytest.raises(ValueError, match="sampling"):
        fv.betatc_loss(z, mu, logvar, N, sampling="mcmc")
    with pytest.raises(ValueError, match="dataset_size"):
        fv.betatc_loss(z, mu, logvar, 4)
    with pytest.raises(TypeError, match="dataset_size"):
        fv.betatc_loss(z, mu, logvar, 1000.0)
    with pytest.raises(ValueError, match="batch"):
        fv.betatc_loss(z[:1], mu[:1], logvar[:1], N, sampling="mss")
    with pytest.raises(TypeError, match="beta"):
        fv.betatc_loss(z, mu, logvar, N, beta="6")
    with pytest.raises(ValueError, match="prior_mu"):
        fv.betatc_decomposition(z, mu, logvar, N, prior_mu=torch.zeros(5))
    with pytest.raises(ValueError, match="block_size"):
        ref.streaming_log_aggregate_posterior(z, mu, logvar, N, block_size=0)
    # MWS needs only one datapoint
    assert torch.isfinite(fv.betatc_loss(z[:1], mu[:1], logvar[:1], N, sampling="mws"))
