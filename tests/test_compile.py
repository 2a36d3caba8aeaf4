"""``torch.compile(fullgraph=True)`` of a model calling every fused op: one graph, no break, eager's numbers.

On the Triton backend every launcher is a ``torch.library`` custom op (``fusedvae::*``), so Dynamo
sees opaque nodes with fake implementations, on CPU tensors under Triton's interpreter as much as on
a GPU. Each compiled run is compared with the same function run eagerly under the same
``torch.manual_seed``. What is bitwise and what is compared at a tight tolerance (float32: rtol
1e-5, atol 1e-6, a few ulps of a short sum), and why:

- the noise (z of ``rsample`` and ``rsample_kl``): bitwise under every compiler. The (seed, offset)
  pair comes from the same ``torch.randint`` draw on the same generator, and z is a kernel output
  computed from the leaves ``mu`` and ``logvar`` alone;
- ``backend="eager"`` runs the captured graph op by op: the same kernels and ATen ops on the same
  tensors, and the same autograd graph. Everything bitwise;
- ``"aot_eager"``: forward values bitwise (the same ops in the same order). Gradients at the tight
  tolerance: AOTAutograd re-traces the backward and may hand a backward op its grad_output in
  another memory layout than eager autograd does (seen: channels-last where eager has a
  contiguous one). The kernels follow the layout, so a broadcast σ's gradient is summed from
  different per-program partials: the same terms, rounded in another order;
- ``"inductor"`` (CUDA only: on CPU it needs a C++ build, too slow here) fuses the ATen ops around
  the kernels into kernels of its own, which reorders float sums: the tight tolerance for all but
  the noise. Its random-op pass may replace ``torch.randint`` with inductor's own generator unless
  ``fallback_random`` is set, so it is set here: the compiled draw is then eager's.

Everything runs on both backends (``"triton"`` and ``"reference"``).
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():  # before triton is imported (tests/conftest.py does the same)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import fusedvae as fv  # noqa: E402
import fusedvae.kernels  # noqa: E402,F401  registers the fusedvae:: custom ops

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
B, LATENT, C, H, W = 3, 5, 2, 3, 4
FUSED_OPS = ("sample_kl", "gaussian_nll", "sum_squared_error", "gaussian_nll_var")  # fusedvae::{op}_forward / _backward

COMPILERS = ["eager", "aot_eager"] + (["inductor"] if torch.cuda.is_available() else [])


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def vae_loss(mu, logvar, prior_mu, prior_logvar, decoder, log_sigma, x, var):
    """A small VAE step calling every fused op; returns the loss and the tensors worth comparing."""
    z = fv.rsample(mu, logvar)  # (B, L)
    kl = fv.kl_normal(mu, logvar, prior_mu, prior_logvar)  # a learned prior: (L,) mean, (B, 1) log-variance
    zs, kl2 = fv.rsample_kl(mu, logvar, n_samples=2)  # (2, B, L)
    mean = (z @ decoder).reshape(x.shape)
    mean2 = (zs @ decoder).mean(0).reshape(x.shape)
    nll = fv.gaussian_nll(x, mean, log_sigma)  # per-channel σ, (C, 1, 1)
    nll_opt = fv.gaussian_nll_optimal(x, mean2, per_sample=True)
    # check_var=False: torch's negative-variance check reads the tensor on the host (data-dependent).
    nll_var = fv.gaussian_nll_loss(mean, x, var, check_var=False)
    loss = nll + nll_opt + nll_var + kl + kl2
    return loss, (z, zs, kl, kl2, nll, nll_opt, nll_var)


def make_inputs(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0, grad=True):
        t = (torch.randn(shape, generator=gen) * scale).to(DEVICE)
        return t.requires_grad_(grad)

    mu, logvar = randn(B, LATENT), randn(B, LATENT, scale=0.5)
    prior_mu, prior_logvar = randn(LATENT, scale=0.3), randn(B, 1, scale=0.3)
    decoder = randn(LATENT, C * H * W, scale=0.4)
    log_sigma = randn(C, 1, 1, scale=0.2)
    x = randn(B, C, H, W, grad=False)
    var = (torch.rand((C, 1, 1), generator=gen) + 0.5).to(DEVICE).requires_grad_()
    return [mu, logvar, prior_mu, prior_logvar, decoder, log_sigma, x, var]


def run(fn, inputs, seed):
    """``fn`` under ``torch.manual_seed(seed)``: its outputs and the loss's gradient for every leaf."""
    torch.manual_seed(seed)
    loss, parts = fn(*inputs)
    leaves = [t for t in inputs if t.requires_grad]
    grads = torch.autograd.grad(loss * 0.7, leaves)  # a grad_output that is not 1
    return [loss.detach(), *(p.detach() for p in parts)], list(grads)


def assert_same(got, want, exact, what):
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.shape == w.shape and g.dtype == w.dtype, (what, i, g.shape, w.shape)
        assert torch.isfinite(g).all(), (what, i)
        if exact:
            assert torch.equal(g, w), (what, i, (g - w).abs().max().item())
        else:
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6, msg=lambda m: f"{what} {i}: {m}")  # noqa: B023


@pytest.mark.parametrize("compiler", COMPILERS)
@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_fullgraph_compile_matches_eager(backend, compiler):
    inputs = make_inputs()
    with fv.use_backend(backend), torch._inductor.config.patch(fallback_random=True):
        compiled = torch.compile(vae_loss, fullgraph=True, backend=compiler)
        for seed in (11, 12):  # a second seed: the noise key is an input of the graph, not a constant in it
            want_values, want_grads = run(vae_loss, inputs, seed)
            got_values, got_grads = run(compiled, inputs, seed)
            what = f"{backend}/{compiler}, seed {seed}"
            assert_same(got_values[1:3], want_values[1:3], True, f"noise z, zs, {what}")
            assert_same(got_values, want_values, compiler != "inductor", f"values, {what}")
            assert_same(got_grads, want_grads, compiler == "eager", f"gradients, {what}")
        # Without reseeding in between, each call draws fresh noise, the same sequence as eager's.
        sequences = []
        for fn in (compiled, vae_loss):
            torch.manual_seed(13)
            sequences.append([fn(*inputs)[1][0].detach() for _ in range(2)])
        assert not torch.equal(*sequences[0])
        assert_same(sequences[0], sequences[1], True, f"noise sequence, {backend}/{compiler}")


def fused_op_counts(gm, suffix):
    """How often each ``fusedvae::*`` op (or its backward, ``suffix="backward"``) is called in ``gm``."""
    targets = [str(node.target).removesuffix(".default") for node in gm.graph.nodes if node.op == "call_function"]
    return {name: targets.count(f"fusedvae.{name}_{suffix}") for name in FUSED_OPS}


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_one_graph_and_the_fused_ops_are_nodes_in_it(backend):
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    dynamo_graphs, forward_graphs, backward_graphs = [], [], []

    def counting_backend(gm, example_inputs):
        dynamo_graphs.append(gm)
        return gm.forward

    def keep(graphs):
        def compiler(gm, example_inputs):
            graphs.append(gm)
            return make_boxed_func(gm.forward)
        return compiler

    inputs = make_inputs()
    with fv.use_backend(backend):
        compiled = torch.compile(vae_loss, fullgraph=True, backend=counting_backend)
        for seed in (1, 2):
            torch.manual_seed(seed)
            compiled(*inputs)
        assert len(dynamo_graphs) == 1  # one graph, compiled once, reused for the second seed
        if backend == "reference":
            assert fused_op_counts(dynamo_graphs[0], "forward") == dict.fromkeys(FUSED_OPS, 0)
            return
        torch._dynamo.reset()
        aot = aot_autograd(fw_compiler=keep(forward_graphs), bw_compiler=keep(backward_graphs))
        loss, _ = torch.compile(vae_loss, fullgraph=True, backend=aot)(*inputs)
        loss.backward()
    assert len(forward_graphs) == len(backward_graphs) == 1
    counts = [fused_op_counts(g, s) for g, s in ((dynamo_graphs[0], "forward"), (forward_graphs[0], "forward"),
                                                 (backward_graphs[0], "backward"))]
    # rsample, kl_normal, rsample_kl; gaussian_nll; the optimal σ's SSE; gaussian_nll_loss: each one opaque
    # node in the Dynamo graph and in AOTAutograd's forward graph, and its backward op in the backward graph
    want = {"sample_kl": 3, "gaussian_nll": 1, "sum_squared_error": 1, "gaussian_nll_var": 1}
    assert counts == [want, want, want], counts


def test_inductor_compiles_the_reference_noise_as_one_opaque_op():
    """The reference backend under inductor (on a CPU too): the Philox noise is ``fusedvae::reference_philox_normal``.

    Left to lower ``philox_normal``'s ten rounds of int64 arithmetic itself, inductor does not
    finish (over 15 minutes on a 256 x 32 input); as one opaque op it compiles in seconds, and the
    sample matches eager's to a few ulps (the noise itself is eager's: the same op on the same key).
    """

    def sample_and_nll(mu, logvar, decoder, x):
        z, kl = fv.rsample_kl(mu, logvar)
        return fv.gaussian_nll(x, (z @ decoder).reshape(x.shape), 0.0) + kl, z

    mu, logvar, _, _, decoder, _, x, _ = make_inputs()
    seen = []

    def capture(gm, example_inputs):
        seen.append(gm)
        from torch._inductor.compile_fx import compile_fx

        return compile_fx(gm, example_inputs)

    with fv.use_backend("reference"), torch._inductor.config.patch(fallback_random=True):
        compiled = torch.compile(sample_and_nll, fullgraph=True, backend=capture)
        for seed in (3, 4):
            torch.manual_seed(seed)
            want_loss, want_z = sample_and_nll(mu, logvar, decoder, x)
            torch.manual_seed(seed)
            got_loss, got_z = compiled(mu, logvar, decoder, x)
            # z = mu + exp(lv / 2) * eps is inductor's own kernel here (vectorised exp): a few ulps off eager
            torch.testing.assert_close(got_z, want_z, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(got_loss, want_loss, rtol=1e-5, atol=1e-6)
    targets = [str(node.target) for node in seen[0].graph.nodes if node.op == "call_function"]
    assert targets.count("fusedvae.reference_philox_normal.default") == 1, targets


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_dynamo_explain_reports_no_graph_break(backend):
    # Without fullgraph=True, Dynamo captures the .tolist() of the noise key only when
    # capture_scalar_outputs is on (fullgraph=True turns it on by itself); otherwise it would break
    # there, on either backend.
    inputs = make_inputs()
    with fv.use_backend(backend), torch._dynamo.config.patch(capture_scalar_outputs=True):
        explanation = torch._dynamo.explain(vae_loss)(*inputs)
    assert explanation.graph_count == 1, explanation
    assert explanation.graph_break_count == 0, explanation.break_reasons


def _opcheck_cases():
    """Calls of every fusedvae:: op whose outputs have the awkward layouts: strided inputs, broadcasts, empties."""
    gen = torch.Generator().manual_seed(7)

    def randn(*shape):
        return torch.randn(shape, generator=gen).to(DEVICE)

    def channels_last(b, c, h, w):  # dense but not contiguous: "none" outputs and gradients follow it
        return randn(b, h, w, c).permute(0, 3, 1, 2)

    def key(seed, offset):  # the (2,) int64 noise key [seed, offset] on the ops' device
        return torch.tensor([seed, offset], dtype=torch.int64, device=DEVICE)

    ops = torch.ops.fusedvae
    mu, lv, mu_t = randn(4, 6), randn(4, 6), randn(6, 4).t()
    mu3, lv3 = randn(2, 3, 4), randn(2, 3, 4)
    x, m, ls = channels_last(3, 2, 4, 5), channels_last(3, 2, 4, 5), randn(2, 1, 1)
    var = randn(2, 1, 1).abs() + 0.5
    return [
        (ops.sample_kl_forward, (mu, lv, randn(6), randn(4, 1), 2, key(123, 456), True, True, True, "per_dim")),
        (ops.sample_kl_forward, (mu_t, lv, None, None, 1, key(5, 6), False, False, True, "none")),
        (ops.sample_kl_forward, (mu, lv, None, None, 3, key(5, 6), False, True, False, "none")),
        (ops.sample_kl_backward, (randn(2, 4, 6), randn(4), mu_t, lv, randn(6), randn(4, 1), 2, key(1, 2), False,
                                  "per_sample", True, True, True, True)),
        (ops.sample_kl_backward, (None, randn(), mu3, lv3, randn(3, 1), None, 1, key(1, 2), False, "sum",
                                  True, False, True, False)),  # a (3, 1) prior over (2, 3, 4): summed by torch
        (ops.gaussian_nll_forward, (x, m, ls, True, "none")),
        (ops.gaussian_nll_forward, (x, m, ls, False, "per_sample")),
        (ops.gaussian_nll_backward, (randn(3, 2, 4, 5), x, m, ls, "none", True, True, True)),
        (ops.gaussian_nll_backward, (randn(0), randn(0, 3), randn(0, 3), randn(3), "per_sample", True, True, True)),
        (ops.sum_squared_error_forward, (x, m, True)),
        (ops.sum_squared_error_backward, (randn(), x, m, False, False, True)),
        (ops.gaussian_nll_var_forward, (m, x, var, True, 1e-6, "none")),
        (ops.gaussian_nll_var_backward, (randn(), m, randn(2, 4, 5), var, 1e-6, "sum", True, True, True)),
        (ops.reference_philox_normal, (torch.tensor([2**61 + 5, 2**32 - 3]), 7, torch.float32, torch.device("cpu"))),
        (ops.reference_philox_normal, (torch.tensor([0, 0]), 0, torch.float64, torch.device("cpu"))),
    ]


def test_fake_implementations_match_the_kernels():
    """Every op's fake gives the real output's shape, dtype and strides (inductor asserts them), and its schema holds."""
    for op, args in _opcheck_cases():
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))
