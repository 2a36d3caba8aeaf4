"""The eager route (a plain autograd.Function) against the custom ops, bit for bit.

In eager mode the backend entry points skip ``torch.library``'s dispatch and run an autograd.Function
built from the custom ops' own implementations (:func:`fusedvae.kernels._custom_op.call`); the
custom ops stay for torch.compile. Each check runs one backend call both ways, the public entry
(eager route) and ``torch.ops.fusedvae.<name>_forward`` directly, and compares the outputs (values,
dtype, strides) and the gradients of every input under the same random grad_output with
``torch.equal``. Under a tracer (fake tensors here) the entry must take the op's fake implementation.
"""

from __future__ import annotations

import importlib
import os

import pytest
import torch

if not torch.cuda.is_available():  # before triton is imported (tests/conftest.py does the same)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import fusedvae as fv  # noqa: E402

ksample_kl = importlib.import_module("fusedvae.kernels.sample_kl")
kgnll = importlib.import_module("fusedvae.kernels.gaussian_nll")
kvar = importlib.import_module("fusedvae.kernels.gaussian_nll_var")
ksse = importlib.import_module("fusedvae.kernels.sum_squared_error")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ops = torch.ops.fusedvae


def _leaf(gen, shape, dtype=torch.float32, channels_last=False, scale=1.0):
    t = (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype)
    if channels_last:
        t = t.contiguous(memory_format=torch.channels_last)
    return t.to(DEVICE).requires_grad_()


def _grads(outputs, inputs, gen):
    outputs = [o for o in outputs if o is not None and o.requires_grad]
    gouts = [torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.dtype).to(DEVICE) for o in outputs]
    return torch.autograd.grad(outputs, [t for t in inputs if t is not None and t.requires_grad], gouts,
                               allow_unused=True)


def _assert_same(eager, direct, inputs, grad_seed):
    assert len(eager) == len(direct)
    for a, b in zip(eager, direct):
        if a is None:
            continue
        assert a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride()
        assert torch.equal(a, b)
    ga = _grads(eager, inputs, torch.Generator().manual_seed(grad_seed))
    gb = _grads(direct, inputs, torch.Generator().manual_seed(grad_seed))
    assert len(ga) > 0 and len(ga) == len(gb)
    for a, b in zip(ga, gb):
        assert (a is None) == (b is None)
        if a is not None:
            assert a.stride() == b.stride() and torch.equal(a, b)


def _assert_eager_node(out, name):
    # the entry point really took the eager route (not the op's GeneratedBackwardFor_... node)
    assert type(out.grad_fn).__name__ == f"Eager_{name}Backward"


SAMPLE_KL_CASES = {
    # name: (shape, prior ("none" | "full" | "broadcast"), channels_last, n_samples, sample, kl, reduction)
    "standard_sum": ((4, 6), "none", False, 1, True, True, "sum"),
    "iwae_none": ((4, 6), "none", False, 3, True, True, "none"),
    "learned_prior_per_sample": ((5, 7), "full", False, 2, True, True, "per_sample"),
    "broadcast_prior_per_dim": ((5, 7), "broadcast", False, 1, True, True, "per_dim"),
    "channels_last_none": ((2, 3, 4, 5), "full", True, 2, True, True, "none"),
    "channels_last_sum": ((2, 3, 4, 5), "none", True, 1, True, True, "sum"),
    "sample_only": ((4, 6), "none", False, 3, True, False, "none"),
    "kl_only": ((4, 6), "full", False, 1, False, True, "per_sample"),
}


@pytest.mark.parametrize("case", list(SAMPLE_KL_CASES))
@pytest.mark.parametrize("key_kind", ["tensor", "unaligned_ints"])
def test_sample_kl_eager_equals_the_custom_op(case, key_kind):
    shape, prior, cl, n_samples, sample, kl, reduction = SAMPLE_KL_CASES[case]
    gen = torch.Generator().manual_seed(sum(map(ord, case)))
    mu, lv = _leaf(gen, shape, channels_last=cl), _leaf(gen, shape, channels_last=cl, scale=0.5)
    pmu = plv = None
    if prior == "full":
        pmu, plv = _leaf(gen, shape, channels_last=cl), _leaf(gen, shape, channels_last=cl, scale=0.5)
    elif prior == "broadcast":
        pmu, plv = _leaf(gen, shape[1:]), _leaf(gen, (1, shape[1]), torch.float64)
    if key_kind == "tensor":
        kw, key, aligned = {"key": fv.seeding.key_from_ints(17, 40, DEVICE)}, None, True
        key = kw["key"]
    else:
        kw, key, aligned = {"seed": 17, "offset": 41}, fv.seeding.key_from_ints(17, 41, DEVICE), False
    eager = ksample_kl.rsample_kl(mu, lv, pmu, plv, n_samples=n_samples, sample=sample, kl=kl, reduction=reduction,
                                  **kw)
    _assert_eager_node(next(o for o in eager if o is not None), "sample_kl_forward")
    direct = ops.sample_kl_forward(mu, lv, pmu if kl else None, plv if kl else None, n_samples, key, aligned,
                                   sample, kl, reduction)
    direct = (direct[0] if sample else None, direct[1] if kl else None)
    _assert_same(eager, direct, (mu, lv, pmu, plv), 3)


NLL_CASES = {
    # name: (shape, log_sigma shape (None: per element), channels_last, full, reduction)
    "scalar_sigma_sum": ((3, 2, 4, 5), (), False, False, "sum"),
    "channel_sigma_none": ((3, 2, 4, 5), (1, 2, 1, 1), False, True, "none"),
    "elementwise_sigma_per_sample": ((3, 2, 4, 5), None, False, False, "per_sample"),
    "channels_last_none": ((3, 2, 4, 5), None, True, True, "none"),
    "channels_last_scalar_sum": ((3, 2, 4, 5), (1,), True, False, "sum"),
}


@pytest.mark.parametrize("case", list(NLL_CASES))
def test_gaussian_nll_eager_equals_the_custom_op(case):
    shape, s_shape, cl, full, reduction = NLL_CASES[case]
    gen = torch.Generator().manual_seed(sum(map(ord, case)))
    x, mean = _leaf(gen, shape, channels_last=cl), _leaf(gen, shape, channels_last=cl)
    ls = _leaf(gen, shape if s_shape is None else s_shape, channels_last=cl and s_shape is None, scale=0.3)
    eager = kgnll.gaussian_nll(x, mean, ls, full=full, reduction=reduction)
    _assert_eager_node(eager, "gaussian_nll_forward")
    direct = ops.gaussian_nll_forward(x, mean, ls, full, reduction)
    _assert_same((eager,), (direct,), (x, mean, ls), 5)


VAR_CASES = {
    # name: (input shape, target shape, var shape, channels_last, full, eps, reduction)
    "scalar_var_sum": ((4, 6), (4, 6), (1,), False, False, 1e-6, "sum"),
    "row_var_none": ((4, 6), (4, 6), (4, 1), False, True, 1e-6, "none"),
    "broadcast_target_per_sample": ((4, 6), (6,), (4, 6), False, False, 0.5, "per_sample"),
    "channels_last_none": ((2, 3, 4, 5), (2, 3, 4, 5), (2, 3, 4, 5), True, True, 1e-6, "none"),
}


@pytest.mark.parametrize("case", list(VAR_CASES))
def test_gaussian_nll_var_eager_equals_the_custom_op(case):
    i_shape, t_shape, v_shape, cl, full, eps, reduction = VAR_CASES[case]
    gen = torch.Generator().manual_seed(sum(map(ord, case)))
    inp, tgt = _leaf(gen, i_shape, channels_last=cl), _leaf(gen, t_shape, channels_last=cl and len(t_shape) == 4)
    var = _leaf(gen, v_shape, channels_last=cl and len(v_shape) == 4).detach().abs().add_(0.1).requires_grad_()
    eager = kvar.gaussian_nll_var(inp, tgt, var, full=full, eps=eps, reduction=reduction)
    _assert_eager_node(eager, "gaussian_nll_var_forward")
    direct = ops.gaussian_nll_var_forward(inp, tgt, var, full, eps, reduction)
    _assert_same((eager,), (direct,), (inp, tgt, var), 7)


@pytest.mark.parametrize("per_sample", [False, True])
@pytest.mark.parametrize("cl", [False, True])
def test_sum_squared_error_eager_equals_the_custom_op(per_sample, cl):
    gen = torch.Generator().manual_seed(11 + per_sample + 2 * cl)
    x, mean = _leaf(gen, (3, 2, 4, 5), channels_last=cl), _leaf(gen, (3, 2, 4, 5), channels_last=cl)
    eager = ksse.sum_squared_error(x, mean, per_sample=per_sample)
    _assert_eager_node(eager, "sum_squared_error_forward")
    direct = ops.sum_squared_error_forward(x, mean, per_sample)
    _assert_same((eager,), (direct,), (x, mean), 9)


def test_eager_route_saves_the_inputs_and_the_key_only():
    gen = torch.Generator().manual_seed(0)
    mu, lv = _leaf(gen, (4, 6)), _leaf(gen, (4, 6))
    key = fv.seeding.key_from_ints(11, 12, DEVICE)
    z, _ = ksample_kl.rsample_kl(mu, lv, None, None, n_samples=3, key=key, sample=True, kl=True, reduction="sum")
    saved = [t for t in z.grad_fn.saved_tensors if t is not None]
    assert [s.data_ptr() for s in saved] == [mu.data_ptr(), lv.data_ptr(), key.data_ptr()]


def test_fake_tensors_take_the_custom_op(monkeypatch):
    from torch._subclasses.fake_tensor import FakeTensorMode

    def no_launch(*args, **kwargs):
        raise AssertionError("a launcher ran on fake tensors")

    monkeypatch.setattr(ksample_kl, "sample_kl_forward", no_launch)
    monkeypatch.setattr(kgnll, "_forward", no_launch)
    with FakeTensorMode():
        mu = torch.empty(4, 6, device=DEVICE, requires_grad=True)
        key = torch.zeros(2, dtype=torch.int64, device=DEVICE)
        z, kl = ksample_kl.rsample_kl(mu, mu, None, None, n_samples=2, key=key, sample=True, kl=True,
                                      reduction="per_sample")
        nll = kgnll.gaussian_nll(mu, mu, mu, full=False, reduction="none")
    assert z.shape == (2, 4, 6) and kl.shape == (4,) and nll.shape == (4, 6)
    assert "GeneratedBackwardFor_fusedvae_sample_kl_forward" in type(z.grad_fn).__name__
