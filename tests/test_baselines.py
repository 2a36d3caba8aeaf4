"""The ``torch`` provider's code (``bench.baselines``) computes what fusedvae computes: values and gradients
agree wherever no noise is involved, the models' two loss paths agree, and fusedvae saves no more for backward."""

from __future__ import annotations

import math

import pytest
import torch

import fusedvae as fv
from bench import baselines
from bench.micro import VARIANTS, mode_functions
from bench.models import model_specs, use_baselines
from bench.timing import saved_mb

F64 = torch.float64


def _leaves(*tensors):
    return [t.detach().clone().requires_grad_(True) for t in tensors]


def _value_and_grads(fn, tensors, gen_seed=11):
    leaves = _leaves(*tensors)
    out = fn(*leaves)
    grad = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(gen_seed)) + 1.5
    out.backward(grad)
    return out.detach(), [t.grad for t in leaves]


def _assert_agree(fused, baseline, tensors, **tolerance):
    got, got_grads = _value_and_grads(fused, tensors)
    want, want_grads = _value_and_grads(baseline, tensors)
    torch.testing.assert_close(got, want, **tolerance)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b, **tolerance)


def test_textbook_kl_is_fusedvae_kl(gen):
    mu, lv = torch.randn(32, 8, generator=gen, dtype=F64), torch.randn(32, 8, generator=gen, dtype=F64)
    _assert_agree(lambda m, v: fv.kl_normal(m, v, reduction="per_sample"), baselines.kl_standard_normal, [mu, lv])


def test_learned_prior_kl_forms_are_fusedvae_kl(gen):
    mu, lv = torch.randn(16, 5, generator=gen, dtype=F64), torch.randn(16, 5, generator=gen, dtype=F64)
    pmu, plv = torch.randn(5, generator=gen, dtype=F64), torch.randn(16, 5, generator=gen, dtype=F64)
    _assert_agree(lambda *t: fv.kl_normal(*t, reduction="none"), baselines.kl_learned_prior, [mu, lv, pmu, plv])
    # VDVAE's, in log sigma: KL(q || p) with logvar = 2 log sigma
    _assert_agree(lambda m, pm, ls, pls: fv.kl_normal(m, 2 * ls, pm, 2 * pls, reduction="none"),
                  baselines.gaussian_analytical_kl, [mu, pmu, lv / 2, plv / 2])


@pytest.mark.parametrize("sigma", [(), (3, 1, 1), (4, 1, 1, 1), (4, 3, 6, 6)])
def test_sigma_vae_nll_is_fusedvae_nll(gen, sigma):
    x, mean = torch.rand(4, 3, 6, 6, generator=gen, dtype=F64), torch.rand(4, 3, 6, 6, generator=gen, dtype=F64)
    log_sigma = torch.randn(sigma, generator=gen, dtype=F64) * 0.5
    _assert_agree(lambda x, m, s: fv.gaussian_nll(x, m, s, reduction="none"),
                  lambda x, m, s: baselines.gaussian_nll(m, s, x).expand(x.shape), [x, mean, log_sigma])


@pytest.mark.parametrize("per_sample", [False, True])
def test_sigma_vae_optimal_sigma_is_fusedvae_optimal(gen, per_sample):
    x, mean = torch.rand(4, 3, 6, 6, generator=gen, dtype=F64), torch.rand(4, 3, 6, 6, generator=gen, dtype=F64)
    baseline = baselines.gaussian_nll_optimal_per_sample if per_sample else baselines.gaussian_nll_optimal
    _assert_agree(lambda x, m: fv.gaussian_nll_optimal(x, m, per_sample=per_sample),
                  lambda x, m: baseline(x, m)[0], [x, mean])


@pytest.mark.parametrize("variant", [v for v in VARIANTS if v.op != "rsample_kl"], ids=lambda v: f"{v.op}:{v.variant}")
def test_every_micro_variant_agrees(gen, variant):
    """What the suite times under ``torch`` and under ``fusedvae``: the same numbers (float64 inputs)."""
    shape = (6, 5) if variant.kind in ("latent", "betatc") else (3, 3, 4, 4)
    tensors = variant.make(shape, F64, torch.device("cpu"), gen)
    _assert_agree(lambda *t: variant.fn(*t)[0], lambda *t: variant.baseline(*t)[0], tensors)


@pytest.mark.parametrize("variant", [v for v in VARIANTS if v.op == "rsample_kl"], ids=lambda v: v.variant)
def test_rsample_kl_variants_draw_the_same_noise_on_a_cpu(gen, variant):
    """On a CPU fusedvae's default backend draws torch.randn, as randn_like does: same z, same KL, same gradients."""
    tensors = variant.make((12, 7), torch.float32, torch.device("cpu"), gen)
    outputs = []
    for fn in (variant.fn, variant.baseline):
        leaves = _leaves(*tensors)
        torch.manual_seed(4)
        z, kl = fn(*leaves)
        (z * torch.linspace(-1, 1, z.numel()).reshape(z.shape)).sum().add(kl).backward()
        outputs.append([z.detach(), kl.detach()] + [t.grad for t in leaves])
    for a, b in zip(*outputs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: f"{v.op}:{v.variant}")
def test_fusedvae_saves_no_more_for_backward_than_torch(gen, variant):
    shape = (256, 32) if variant.kind in ("latent", "betatc") else (8, 3, 16, 16)
    tensors = variant.make(shape, torch.float32, torch.device("cpu"), gen)
    saved = {}
    for name, fn in (("fusedvae", variant.fn), ("torch", variant.baseline)):
        functions, _ = mode_functions(lambda fn=fn: fn(*tensors), [t for t in tensors if t.requires_grad], gen)
        saved[name] = saved_mb(functions["forward"])
    assert 0 < saved["fusedvae"] <= saved["torch"], saved


def test_saved_mb_counts_each_storage_once():
    x = torch.ones(1024, 256, requires_grad=True)  # 1 MiB
    assert saved_mb(lambda: (x.exp() * x).sum()) == pytest.approx(2.0)  # exp's result and x, x saved twice
    assert saved_mb(lambda: (x * 2).sum()) == 0.0
    assert math.isnan(saved_mb(lambda: 1 / 0))


@pytest.mark.parametrize("spec", model_specs("tiny", "cpu"), ids=lambda s: s.name)
def test_model_loss_paths_agree(spec):
    """Each training model's public-codebase loss and its fusedvae loss: same value and gradients, same seed."""
    x = torch.rand(spec.batch, spec.channels, spec.size, spec.size, generator=torch.Generator().manual_seed(2))
    results = []
    for provider, baseline in (("torch", True), ("fusedvae", False)):
        torch.manual_seed(0)
        model = use_baselines(spec.build(), baseline)
        context = spec.context(provider) if spec.context else fv.use_backend("auto")
        with context:
            torch.manual_seed(1)
            loss = model(x)
            loss.backward()
        results.append((loss.detach(), [p.grad for p in model.parameters()]))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-4)
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)
