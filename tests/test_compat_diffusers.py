"""fusedvae.compat.diffusers against diffusers' own DiagonalGaussianDistribution, on a real AutoencoderKL."""

from __future__ import annotations

import subprocess
import sys
import types

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from diffusers.models.autoencoders import autoencoder_kl as diffusers_akl  # noqa: E402
from diffusers.models.autoencoders import vae as diffusers_vae  # noqa: E402

import fusedvae as fv  # noqa: E402
from bench import autoencoderkl as akl  # noqa: E402
from fusedvae.compat import diffusers as fvd  # noqa: E402

Original = diffusers_vae.DiagonalGaussianDistribution
Fused = fvd.DiagonalGaussianDistribution


def _seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _params(shape, seed, *, logvar_scale=1.0, requires_grad=False, dtype=torch.float32):
    """Random ``(B, 2C, ...)`` parameters: mean ~ N(0, 1), logvar ~ logvar_scale * N(0, 1)."""
    g = _seeded(seed)
    mean = torch.randn(shape, generator=g)
    logvar = logvar_scale * torch.randn(shape, generator=g)
    return torch.cat([mean, logvar], dim=1).to(dtype).requires_grad_(requires_grad)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    vae = akl.tiny_autoencoderkl(
        block_out_channels=(32,), down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
        sample_size=16,
    )
    return vae.eval()


def _images(seed: int, batch: int = 3, size: int = 16) -> torch.Tensor:
    return torch.rand(batch, 3, size, size, generator=_seeded(seed)) * 2 - 1


def _encoder_grads(model) -> dict[str, torch.Tensor]:
    return {
        name: p.grad.clone() for name, p in model.named_parameters()
        if p.grad is not None and (name.startswith("encoder.") or name.startswith("quant_conv."))
    }


def _assert_grads_close(got: dict, expected: dict) -> None:
    """Per tensor, to float32 accuracy relative to the gradient's overall scale.

    (Some entries are ~0 by symmetry: a conv bias followed by GroupNorm gets only rounding noise.)
    """
    assert got.keys() == expected.keys() and len(got) > 10
    scale = max(g.abs().max().item() for g in expected.values())
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-5 * scale,
                                   msg=lambda m: f"{name}: {m}")  # noqa: B023
    flat = lambda grads: torch.cat([g.flatten() for g in grads.values()])  # noqa: E731
    assert (flat(got) - flat(expected)).norm() <= 1e-5 * flat(expected).norm()


# ---------------------------------------------------------------------------------------------- imports, patch


def test_importing_fusedvae_does_not_import_diffusers():
    code = "import sys, fusedvae, fusedvae.compat; assert 'diffusers' not in sys.modules, 'diffusers imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_class_is_both_a_fusedvae_and_a_diffusers_distribution():
    assert issubclass(Fused, fv.nn.DiagonalGaussian) and issubclass(Fused, Original)
    assert Original is not Fused and fvd.OriginalDiagonalGaussianDistribution is Original


def test_patch_swaps_the_class_for_an_unmodified_autoencoderkl_and_restores_it(model):
    x = _images(1)
    assert type(model.encode(x).latent_dist) is Original and not fvd.is_patched()
    with fvd.patch() as handle:
        assert handle.active and fvd.is_patched()
        assert diffusers_vae.DiagonalGaussianDistribution is Fused
        assert diffusers_akl.DiagonalGaussianDistribution is Fused
        assert type(model.encode(x).latent_dist) is Fused
        assert model(x, sample_posterior=True).sample.shape == x.shape
    assert not handle.active and not fvd.is_patched()
    assert diffusers_vae.DiagonalGaussianDistribution is Original
    assert diffusers_akl.DiagonalGaussianDistribution is Original
    assert type(model.encode(x).latent_dist) is Original


def test_patch_restores_on_exception():
    with pytest.raises(KeyError, match="inside"):
        with fvd.patch():
            assert diffusers_akl.DiagonalGaussianDistribution is Fused
            raise KeyError("inside")
    assert diffusers_akl.DiagonalGaussianDistribution is Original and not fvd.is_patched()


def test_patch_as_a_plain_call_nests_and_undo_is_idempotent():
    outer = fvd.patch()
    assert fvd.is_patched()
    with fvd.patch():
        assert fvd.is_patched()
    assert fvd.is_patched(), "an inner patch's exit must not undo the outer one"
    outer.undo()
    outer.undo()
    assert not fvd.is_patched() and diffusers_vae.DiagonalGaussianDistribution is Original


def test_patch_restores_modules_diffusers_imported_while_patched():
    # a diffusers module imported under the patch binds the class from vae, i.e. fusedvae's
    name = "diffusers._fusedvae_test_late_module"
    try:
        with fvd.patch():
            late = types.ModuleType(name)
            late.DiagonalGaussianDistribution = diffusers_vae.DiagonalGaussianDistribution
            sys.modules[name] = late
            assert late.DiagonalGaussianDistribution is Fused
        assert late.DiagonalGaussianDistribution is Original
    finally:
        sys.modules.pop(name, None)


# ---------------------------------------------------------------------------------------------- values and gradients


@pytest.mark.parametrize("quantity", ["kl", "kl_other", "nll", "nll_dims", "mode"])
@pytest.mark.usefixtures("backend")
def test_patched_autoencoderkl_matches_original_values_and_encoder_gradients(model, quantity):
    x, x_other = _images(2, batch=2, size=8), _images(3, batch=2, size=8)
    g = _seeded(4)
    eps = None
    results = {}
    for cls in (Original, Fused):
        model.zero_grad(set_to_none=True)
        with fvd.patch() if cls is Fused else _nullcontext():
            posterior = model.encode(x).latent_dist
            other = model.encode(x_other).latent_dist if quantity == "kl_other" else None
        assert type(posterior) is cls
        if eps is None:
            eps = torch.randn(posterior.mean.shape, generator=g)
        if quantity == "kl":
            value = posterior.kl()
        elif quantity == "kl_other":
            value = posterior.kl(other)
        elif quantity == "mode":
            value = posterior.mode()
        else:  # a sample that depends on the encoder through mean and std
            sample = posterior.mean + posterior.std * eps
            value = posterior.nll(sample) if quantity == "nll" else posterior.nll(sample, dims=[2, 3])
        weights = torch.rand(value.shape, generator=_seeded(5)) + 0.5  # grad_output that is not 1
        (value * weights).sum().backward()
        results[cls] = value.detach(), _encoder_grads(model)
    (v_orig, g_orig), (v_fused, g_fused) = results[Original], results[Fused]
    assert v_fused.shape == v_orig.shape and v_fused.dtype == v_orig.dtype
    torch.testing.assert_close(v_fused, v_orig, rtol=1e-5, atol=1e-5 * v_orig.abs().max().item())
    _assert_grads_close(g_fused, g_orig)


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.mark.usefixtures("backend")
def test_attributes_and_methods_match_original_on_random_parameters():
    params = _params((2, 4, 5, 7), seed=6, logvar_scale=12.0)  # some logvars outside [-30, 20]
    params[:, 4:, 0, 0] = torch.tensor([-45.0, 33.0])[:, None]
    ours, theirs = Fused(params), Original(params)
    assert ours.parameters is params and ours.deterministic is False
    for name in ("mean", "logvar", "std", "var"):
        torch.testing.assert_close(getattr(ours, name), getattr(theirs, name), rtol=1e-6, atol=0, msg=name)
    assert ours.logvar.min() >= -30 and ours.logvar.max() <= 20
    sample = theirs.sample(generator=_seeded(7))
    torch.testing.assert_close(ours.kl(), theirs.kl(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(ours.nll(sample), theirs.nll(sample), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(ours.nll(sample, dims=[1, 3]), theirs.nll(sample, dims=[1, 3]), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(ours.nll(sample, dims=(-3, -2, -1)), theirs.nll(sample, dims=(-3, -2, -1)),
                               rtol=1e-5, atol=1e-4)
    assert ours.mode() is ours.mean


def test_std_and_var_are_not_stored():
    q = Fused(_params((2, 4, 3, 3), seed=8))
    assert "std" not in vars(q) and "var" not in vars(q)
    q.logvar = torch.zeros_like(q.logvar)  # read when asked, so they follow logvar
    assert torch.equal(q.std, torch.ones_like(q.mean))


@pytest.mark.usefixtures("backend")
def test_kl_against_another_fusedvae_or_diffusers_posterior_and_its_gradients():
    p_params = _params((3, 4, 4, 4), seed=9, requires_grad=True)
    o_params = _params((3, 4, 4, 4), seed=10, requires_grad=True)
    grads = {}
    for name, (P, Q) in {"orig": (Original, Original), "fused": (Fused, Fused), "mixed": (Fused, Original)}.items():
        kl = P(p_params).kl(Q(o_params))
        weights = torch.rand(kl.shape, generator=_seeded(11)) + 0.5
        grads[name] = (kl.detach(), *torch.autograd.grad((kl * weights).sum(), (p_params, o_params)))
    for name in ("fused", "mixed"):
        for got, expected in zip(grads[name], grads["orig"]):
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.usefixtures("backend")
def test_kl_is_accurate_near_collapse_where_diffusers_is_not():
    # a posterior a hair away from the prior: KL = 0.5 (mu^2 + g(lv)), g(d) = exp(d) - 1 - d ~ d^2 / 2
    g = _seeded(12)
    mean = 1e-4 * torch.randn(2, 4, 6, 6, generator=g, dtype=torch.float64)
    logvar = 1e-4 * torch.randn(2, 4, 6, 6, generator=g, dtype=torch.float64)
    exact = 0.5 * (mean**2 + torch.expm1(logvar) - logvar).sum(dim=[1, 2, 3])
    params = torch.cat([mean, logvar], dim=1).float()
    ours = Fused(params).kl().double()
    theirs = Original(params).kl().double()
    rel = lambda v: ((v - exact).abs() / exact).max().item()  # noqa: E731
    assert rel(ours) < 1e-4
    assert rel(theirs) > 100 * rel(ours)


@pytest.mark.usefixtures("backend")
def test_non_4d_latents_keep_diffusers_reduction_dims():
    params = _params((2, 4, 3, 5, 6), seed=13)  # a video latent (B, C, T, H, W): diffusers sums dims 1-3
    ours, theirs = Fused(params), Original(params)
    sample = theirs.sample()
    assert ours.kl().shape == theirs.kl().shape == (2, 6)
    torch.testing.assert_close(ours.kl(), theirs.kl(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(ours.nll(sample), theirs.nll(sample), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(ours.nll(sample, dims=[1, 2, 3, 4]), theirs.nll(sample, dims=[1, 2, 3, 4]),
                               rtol=1e-5, atol=1e-4)


def _diffusers_formula_kl(params: torch.Tensor) -> torch.Tensor:
    """diffusers' own elementwise KL to N(0, I) (its clamp included), not yet summed."""
    q = Original(params)
    return 0.5 * (torch.pow(q.mean, 2) + q.var - 1.0 - q.logvar)


@pytest.mark.usefixtures("backend")
def test_per_sample_sums_video_latents_over_every_non_batch_dim():
    params = _params((2, 4, 3, 5, 6), seed=40, requires_grad=True)  # (B, 2C, T, H, W)
    q = Fused(params, per_sample=True)
    assert q.per_sample and not Fused(params).per_sample
    kl, want = q.kl(), _diffusers_formula_kl(params).sum(dim=[1, 2, 3, 4])
    assert kl.shape == (2,)
    torch.testing.assert_close(kl, want, rtol=1e-5, atol=1e-4)
    weights = torch.rand(2, generator=_seeded(41)) + 0.5
    (got,) = torch.autograd.grad((kl * weights).sum(), params)
    (expected,) = torch.autograd.grad((want * weights).sum(), params)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    sample = Original(params).sample(generator=_seeded(42))
    full = Original(params).nll(sample, dims=[1, 2, 3, 4])
    torch.testing.assert_close(q.nll(sample), full, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(q.nll(sample, dims=[1, 2, 3]), Original(params).nll(sample), rtol=1e-5, atol=1e-4)
    other = Fused(_params((2, 4, 3, 5, 6), seed=43), per_sample=True)
    torch.testing.assert_close(q.kl(other), Original(params).kl(Original(other.parameters)).sum(-1),
                               rtol=1e-5, atol=1e-4)
    # 4-D latents: diffusers' values either way
    image = _params((2, 4, 5, 6), seed=44)
    torch.testing.assert_close(Fused(image, per_sample=True).kl(), Original(image).kl(), rtol=1e-5, atol=1e-4)
    assert torch.equal(Fused(image, per_sample=True).kl(), Fused(image).kl())


def test_patch_per_sample_sets_the_default_and_restores_it():
    params = _params((2, 4, 3, 5, 6), seed=45)
    with pytest.raises(TypeError, match="per_sample"):
        fvd.patch(per_sample="yes")
    assert not fvd.is_patched()
    with fvd.patch(per_sample=True) as handle:
        assert handle.per_sample and Fused(params).per_sample
        assert not Fused(params, per_sample=False).per_sample  # an explicit argument wins
        with fvd.patch():
            assert not Fused(params).per_sample
        assert Fused(params).per_sample
    assert not Fused(params).per_sample


@pytest.fixture(scope="module")
def video_model():
    """A tiny diffusers video autoencoder (Wan's causal 3-D VAE) from a config: latents (B, C, T, H, W)."""
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    return AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 1], num_res_blocks=1, attn_scales=[],
                            temperal_downsample=[False]).eval()


@pytest.mark.usefixtures("backend")
def test_video_autoencoder_per_sample_kl_and_encoder_gradients(video_model):
    video = torch.rand(2, 3, 5, 8, 8, generator=_seeded(46)) * 2 - 1
    results = {}
    for name in ("original", "default", "per_sample"):
        video_model.zero_grad(set_to_none=True)
        context = _nullcontext() if name == "original" else fvd.patch(per_sample=name == "per_sample")
        with context:
            posterior = video_model.encode(video).latent_dist
        assert type(posterior) is (Original if name == "original" else Fused)
        assert posterior.mean.dim() == 5
        kl = posterior.kl() if name != "original" else _diffusers_formula_kl(posterior.parameters).sum(dim=[1, 2, 3, 4])
        if name == "default":  # diffusers' dims [1, 2, 3]: one value per (sample, width column)
            assert kl.shape == Original(posterior.parameters).kl().shape == (2, posterior.mean.shape[-1])
            torch.testing.assert_close(kl, Original(posterior.parameters).kl(), rtol=1e-5, atol=1e-4)
            continue
        assert kl.shape == (2,)
        (kl * torch.tensor([0.7, 1.3])).sum().backward()
        results[name] = kl.detach(), {n: p.grad.clone() for n, p in video_model.named_parameters()
                                      if p.grad is not None and n.startswith(("encoder.", "quant_conv."))}
    (v_orig, g_orig), (v_ours, g_ours) = results["original"], results["per_sample"]
    torch.testing.assert_close(v_ours, v_orig, rtol=1e-5, atol=1e-4)
    _assert_grads_close(g_ours, g_orig)


@pytest.mark.usefixtures("backend")
def test_half_precision_parameters():
    params = _params((2, 4, 4, 4), seed=14, dtype=torch.float16)
    ours, theirs = Fused(params), Original(params.float())
    assert ours.sample().dtype == torch.float16 and ours.kl().dtype == torch.float16
    torch.testing.assert_close(ours.kl().float(), theirs.kl(), rtol=2e-3, atol=1e-2)


# ---------------------------------------------------------------------------------------------- sampling


@pytest.mark.usefixtures("backend")
def test_sample_has_standard_normal_noise():
    params = _params((4, 4, 32, 32), seed=15, logvar_scale=2.0)
    q = Fused(params)
    eps = ((q.sample(generator=_seeded(16)) - q.mean) / q.std).flatten()
    n = eps.numel()
    assert abs(eps.mean().item()) < 5 / n**0.5
    assert abs(eps.std().item() - 1) < 5 / (2 * n) ** 0.5
    assert abs((eps**3).mean().item()) < 5 * (15 / n) ** 0.5  # no skew
    assert torch.isfinite(eps).all()


@pytest.mark.usefixtures("backend")
def test_sample_of_patched_autoencoderkl_has_the_posterior_statistics(model):
    with fvd.patch():
        posterior = model.encode(_images(17, batch=8)).latent_dist
        torch.manual_seed(18)
        z = posterior.sample()
    eps = ((z - posterior.mean) / posterior.std).flatten().detach()
    n = eps.numel()
    assert abs(eps.mean().item()) < 5 / n**0.5 and abs(eps.std().item() - 1) < 5 / (2 * n) ** 0.5


@pytest.mark.usefixtures("backend")
def test_sample_gradient_identities():
    params = _params((3, 4, 5, 5), seed=19, logvar_scale=3.0, requires_grad=True)
    with torch.no_grad():
        params[0, 4, 0, 0] = 25.0  # clamped: no gradient to it
        params[1, 5, 1, 1] = -40.0
    q = Fused(params)
    z = q.sample()
    weights = torch.rand(z.shape, generator=_seeded(20)) + 0.5
    (grad,) = torch.autograd.grad((z * weights).sum(), params)
    grad_mean, grad_logvar = grad.chunk(2, dim=1)
    torch.testing.assert_close(grad_mean, weights)  # dz/dmean = 1
    expected = weights * (z - q.mean).detach() / 2  # dz/dlogvar = std * eps / 2
    expected[0, 0, 0, 0] = expected[1, 1, 1, 1] = 0.0
    torch.testing.assert_close(grad_logvar, expected, rtol=1e-5, atol=1e-6)
    assert z[0, 0, 0, 0] != q.mean[0, 0, 0, 0] and torch.isfinite(z).all()


@pytest.mark.usefixtures("backend")
def test_sample_is_reproducible_from_a_seed_or_a_generator():
    q = Fused(_params((2, 4, 6, 6), seed=21))
    torch.manual_seed(22)
    a = q.sample()
    torch.manual_seed(22)
    assert torch.equal(q.sample(), a)
    assert not torch.equal(q.sample(), a)
    b = q.sample(generator=_seeded(23))
    assert torch.equal(q.sample(_seeded(23)), b)  # diffusers' pipelines pass it positionally
    assert torch.equal(q.sample(generator=[_seeded(23)]), b)  # a list of one is one generator


@pytest.mark.usefixtures("backend")
def test_sample_with_one_generator_per_batch_element():
    params = _params((3, 4, 6, 6), seed=24)
    q = Fused(params)
    z = q.sample(generator=[_seeded(s) for s in (1, 2, 3)])
    for i, s in enumerate((1, 2, 3)):
        alone = Fused(params[i : i + 1]).sample(generator=_seeded(s))
        assert torch.equal(z[i : i + 1], alone)
    with pytest.raises(ValueError, match="generator"):
        q.sample(generator=[_seeded(1), _seeded(2)])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.usefixtures("backend")
def test_cpu_generator_for_cuda_latents():
    q = Fused(_params((2, 4, 6, 6), seed=25).cuda())
    a = q.sample(generator=_seeded(26))
    assert a.device.type == "cuda" and torch.equal(q.sample(generator=_seeded(26)), a)


def test_deterministic_matches_diffusers():
    params = _params((2, 4, 3, 3), seed=27, requires_grad=True)
    ours, theirs = Fused(params, deterministic=True), Original(params, deterministic=True)
    assert ours.deterministic is True
    for name in ("std", "var"):
        assert torch.equal(getattr(ours, name), torch.zeros_like(ours.mean))
    z = ours.sample(generator=_seeded(28))
    assert torch.equal(z, theirs.sample()) and torch.equal(z, ours.mean) and z is not ours.mean
    (grad,) = torch.autograd.grad(z.sum(), params)
    assert torch.equal(grad, torch.cat([torch.ones_like(ours.mean), torch.zeros_like(ours.mean)], dim=1))
    for value, expected in ((ours.kl(), theirs.kl()), (ours.nll(z), theirs.nll(z))):
        assert value.shape == expected.shape == (1,) and torch.equal(value, expected)
        assert value.device == params.device
    assert ours.mode() is ours.mean


# ---------------------------------------------------------------------------------------------- the training step


@pytest.mark.usefixtures("backend")
def test_ldm_nll_fused_equals_the_latent_diffusion_formula_with_gradients():
    g = _seeded(29)
    x = torch.rand(3, 3, 8, 8, generator=g)
    reconstruction = (x + 0.2 * torch.randn(x.shape, generator=g)).requires_grad_()
    logvar = torch.tensor(-0.7, requires_grad=True)
    results = []
    for fn in (akl.ldm_nll_eager, akl.ldm_nll_fused):
        value = fn(x, reconstruction, logvar)
        results.append((value.detach(), *torch.autograd.grad(value * 1.7, (reconstruction, logvar))))
    for got, expected in zip(results[1], results[0]):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.usefixtures("backend")
def test_train_step_eager_and_patched(model):
    eager, fused = akl.AutoencoderKLTrainStep.pair(model, kl_weight=1e-3)
    assert any(p is fused.logvar for group in fused.optimizer.param_groups for p in group["params"])
    x = _images(30, batch=2)
    with pytest.raises(RuntimeError, match="patch"):
        fused(x)
    before = fused.logvar.item()
    with fvd.patch():
        out = fused(x)
    assert fused.logvar.item() != before, "logvar must be trained"
    ref = eager(x)
    for got in out:
        assert torch.isfinite(got).all()
    assert out.logvar.item() == ref.logvar.item() == before


def test_docstring_examples():
    import doctest

    result = doctest.testmod(fvd, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0
    assert not fvd.is_patched()


def test_the_example_trains_both_runs(tmp_path):
    """examples/train_autoencoderkl.py runs end to end (a few steps) and reports both runs."""
    from pathlib import Path

    example = Path(__file__).resolve().parent.parent / "examples" / "train_autoencoderkl.py"
    done = subprocess.run([sys.executable, str(example), "--steps", "3", "--batch-size", "2", "--device", "cpu",
                           "--log-every", "1"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    summary = done.stdout.split("summary")[-1]
    for run in ("eager", "patched"):
        line = next(line for line in summary.splitlines() if line.strip().startswith(run))
        assert "ms/step" in line and "nan" not in line.lower(), line
