"""The noise key is a device tensor a CUDA graph can replay (issue 13, "Seeds that CUDA graphs can replay").

A key read into Python ints is baked into a captured graph, which then replays the same noise every
step. On a CPU these tests check the key path (a tensor on the op's device, never read on the host, the
same under torch.compile, reused by the backward); the CUDA-only test replays a captured graph.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import fusedvae as fv  # noqa: E402
from fusedvae import reference  # noqa: E402
from fusedvae.kernels import sample_kl as ksample_kl  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
#: On a GPU the float32 noise takes the hardware approximations (fusedvae.kernels.fastmath): |d eps| <= 7e-6.
NOISE_ATOL = 1e-5 if DEVICE == "cuda" else 1e-6


def _leaves(seed: int, shape=(6, 12)):
    gen = torch.Generator().manual_seed(seed)
    mu = torch.randn(shape, generator=gen).to(DEVICE).requires_grad_()
    lv = (0.5 * torch.randn(shape, generator=gen)).to(DEVICE).requires_grad_()
    return mu, lv


@pytest.fixture
def keys_seen(monkeypatch):
    """The key every forward and backward launch of the fused op receives, in call order."""
    seen = {"forward": [], "backward": []}
    forward, backward = ksample_kl.sample_kl_forward, ksample_kl.sample_kl_backward

    def spy_forward(*args, **kwargs):
        seen["forward"].append(kwargs["key"])
        return forward(*args, **kwargs)

    def spy_backward(*args, **kwargs):
        seen["backward"].append(kwargs["key"])
        return backward(*args, **kwargs)

    monkeypatch.setattr(ksample_kl, "sample_kl_forward", spy_forward)
    monkeypatch.setattr(ksample_kl, "sample_kl_backward", spy_backward)
    return seen


def test_the_key_is_an_int64_tensor_on_the_ops_device(keys_seen):
    mu, lv = _leaves(0)
    with fv.use_backend("triton"):
        fv.rsample_kl(mu, lv, n_samples=2)
        fv.rsample(mu, lv, generator=torch.Generator(DEVICE).manual_seed(3))
    assert len(keys_seen["forward"]) == 2
    for key in keys_seen["forward"]:
        assert isinstance(key, torch.Tensor) and key.dtype == torch.int64 and key.shape == (2,)
        assert key.device == mu.device
        seed, offset = key.tolist()
        assert 0 <= seed < 2**62 and 0 <= offset < 2**62 and offset % 4 == 0


def test_the_triton_path_never_reads_a_tensor_on_the_host(monkeypatch):
    mu, lv = _leaves(1)
    grad_z = torch.randn(3, *mu.shape, device=DEVICE)

    def no_host_read(self, *args, **kwargs):
        raise AssertionError("a tensor was read on the host (a host synchronisation, a key baked into a graph)")

    with fv.use_backend("triton"):
        fv.rsample_kl(mu, lv, n_samples=3)  # compile the kernels before the patch
        for name in ("tolist", "item", "__int__", "__index__", "__bool__", "__float__"):
            monkeypatch.setattr(torch.Tensor, name, no_host_read)
        z, kl = fv.rsample_kl(mu, lv, n_samples=3)
        z1 = fv.rsample(mu, lv, generator=torch.Generator(DEVICE).manual_seed(5))
        grads = torch.autograd.grad((z * grad_z).sum() + kl + z1.sum(), (mu, lv))
        monkeypatch.undo()
    assert all(bool(torch.isfinite(g).all()) for g in grads)


def test_the_reference_reads_the_same_key_and_the_backward_reuses_the_forwards(keys_seen):
    mu, lv = _leaves(2)
    grad_z = torch.randn(2, *mu.shape, device=DEVICE)
    with fv.use_backend("triton"):
        torch.manual_seed(11)
        z, kl = fv.rsample_kl(mu, lv, n_samples=2, reduction="sum")
        torch.randint(0, 10, (4,), device=DEVICE)  # moves the generator on: a key drawn again would differ
        fv.rsample(mu, lv)
        grads = torch.autograd.grad((z * grad_z).sum() + kl, (mu, lv))
    key = keys_seen["forward"][0]
    assert len(keys_seen["backward"]) == 1 and keys_seen["backward"][0] is key
    assert not torch.equal(keys_seen["forward"][1], key)
    z_ref, kl_ref = reference.rsample_kl(mu, lv, None, None, n_samples=2, key=key, sample=True, kl=True,
                                         reduction="sum")
    want = torch.autograd.grad((z_ref * grad_z).sum() + kl_ref, (mu, lv))
    torch.testing.assert_close(z, z_ref, rtol=1e-5, atol=NOISE_ATOL)
    for got, expected in zip(grads, want):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=NOISE_ATOL)


def test_explicit_ints_and_the_key_tensor_give_the_same_noise():
    mu, lv = _leaves(3)
    key = fv.seeding.key_from_ints(1234, 4 * 1001, DEVICE)
    kw = dict(n_samples=2, sample=True, kl=False, reduction="none")
    by_key, _ = ksample_kl.rsample_kl(mu, lv, None, None, key=key, **kw)
    by_ints, _ = ksample_kl.rsample_kl(mu, lv, None, None, seed=1234, offset=4 * 1001, **kw)
    by_ref, _ = reference.rsample_kl(mu, lv, None, None, seed=1234, offset=4 * 1001, **kw)
    assert torch.equal(by_key, by_ints)
    torch.testing.assert_close(by_key, by_ref, rtol=1e-5, atol=NOISE_ATOL)


def test_bad_keys_are_named():
    mu, lv = _leaves(4)
    kw = dict(n_samples=1, sample=True, kl=False, reduction="none")
    with pytest.raises(TypeError, match="key"):
        ksample_kl.rsample_kl(mu, lv, None, None, key=(1, 2), **kw)
    with pytest.raises(ValueError, match="key"):
        ksample_kl.rsample_kl(mu, lv, None, None, key=torch.zeros(2, device=DEVICE), **kw)  # float
    with pytest.raises(ValueError, match="key"):
        reference.rsample_kl(mu, lv, None, None, key=torch.zeros(3, dtype=torch.int64, device=DEVICE), **kw)
    with pytest.raises(ValueError, match="key"):
        ksample_kl.rsample_kl(mu, lv, None, None, **kw)  # neither a key nor seed and offset


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_manual_seed_and_generator_reproduce_the_noise(backend):
    mu, lv = _leaves(5)
    with fv.use_backend(backend):
        torch.manual_seed(21)
        first, second = fv.rsample(mu, lv), fv.rsample(mu, lv)
        torch.manual_seed(21)
        again = fv.rsample(mu, lv)
        by_gen = [fv.rsample(mu, lv, generator=torch.Generator(DEVICE).manual_seed(8)) for _ in range(2)]
        other = fv.rsample(mu, lv, generator=torch.Generator(DEVICE).manual_seed(9))
    assert torch.equal(first, again) and not torch.equal(first, second)
    assert torch.equal(by_gen[0], by_gen[1]) and not torch.equal(by_gen[0], other)


def test_compiled_and_eager_draw_the_same_z_and_gradients():
    mu, lv = _leaves(6)
    grad_z = torch.randn(2, *mu.shape, device=DEVICE)

    def step(mu, lv):  # the key path of fv.rsample_kl's triton backend, without the backend dispatch
        key = fv.seeding.draw_key(mu.device)
        return ksample_kl.rsample_kl(mu, lv, None, None, n_samples=2, key=key, sample=True, kl=True, reduction="sum")

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    results = []
    with fv.use_backend("triton"):
        for fn in (step, compiled, compiled):
            torch.manual_seed(31)
            z, kl = fn(mu, lv)
            results.append((z.detach(), *torch.autograd.grad((z * grad_z).sum() + kl, (mu, lv))))
        torch.manual_seed(32)
        other = compiled(mu, lv)[0]
    for got in results[1:]:
        assert torch.equal(got[0], results[0][0])
        for a, b in zip(got[1:], results[0][1:]):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert not torch.equal(other, results[0][0])  # the compiled graph draws its key, it does not hold one


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_two_replays_of_a_captured_step_draw_new_noise_with_correct_gradients():
    mu, lv = _leaves(7, (256, 64))
    w = torch.randn(mu.shape, device=DEVICE)

    def step():
        z, kl = fv.rsample_kl(mu, lv)
        return (z,) + torch.autograd.grad((z * w).sum() + kl, (mu, lv))

    with fv.use_backend("triton"):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up off the capture stream, as torch.cuda.graph asks
            for _ in range(2):
                step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static = step()
        runs = []
        for _ in range(2):
            graph.replay()
            torch.cuda.synchronize()
            runs.append([t.detach().clone() for t in static])
    assert not torch.equal(runs[0][0], runs[1][0])
    rows = mu.shape[0]
    m, v = mu.detach().double(), lv.detach().double()
    for z, grad_mu, grad_lv in runs:
        eps = (z.double() - m) * torch.exp(-v / 2)
        assert abs(float(eps.mean())) < 0.05 and abs(float(eps.std()) - 1) < 0.05  # fresh N(0, 1) noise
        torch.testing.assert_close(grad_mu.double(), w.double() + m / rows, rtol=1e-5, atol=1e-5)
        want_lv = w.double() * (z.double() - m) / 2 + (torch.exp(v) - 1) / (2 * rows)
        torch.testing.assert_close(grad_lv.double(), want_lv, rtol=1e-4, atol=1e-4)
