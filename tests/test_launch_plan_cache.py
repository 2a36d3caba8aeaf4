"""The launchers' memoised plans (fusedvae.kernels._common) equal the plans built from the tensors themselves.

The references below are the plan functions as they were before memoisation: they read the operands through
meta tensors and ``expand``. The cached plans must agree with them for every layout, be keyed on everything
they read (shape, strides, the device's program target), and stay bounded.
"""

from __future__ import annotations

import importlib
import math

import pytest
import torch
import triton

_common = importlib.import_module("fusedvae.kernels._common")


# --------------------------------------------------------------------------------------------- #
# References: the uncached plans, from the tensors                                              #
# --------------------------------------------------------------------------------------------- #


def _dense_strides_ref(t):
    step = 1
    for size, stride in sorted(((s, st) for s, st in zip(t.shape, t.stride()) if s != 1), key=lambda p: p[1]):
        if stride != step:
            return None
        step *= size
    return tuple(t.stride())


def _output_strides_ref(lead, shape):
    dense = _dense_strides_ref(lead) if tuple(lead.shape) == tuple(shape) else None
    return dense or _common.contiguous_strides(shape)


def _row_plan_ref(lead, operands):
    shape2 = lead.shape if lead.dim() else torch.Size([1])
    out = torch.empty_strided(shape2, _output_strides_ref(lead, shape2), device="meta")
    expanded = [None if t is None else t.expand(shape2) for t in operands]
    view, passed = _common.strided_view(shape2, [*expanded, out])
    return shape2, view, passed[:-1], tuple(passed[-1].stride()) if lead.dim() else ()


def _row_tiling_ref(rows, cols, device, override=None):
    if override is not None:
        block_b, block_n, row_steps = override
    else:
        tile = 1024 if device.type == "cuda" else 4096
        block_n = min(triton.next_power_of_2(cols), tile)
        block_b = min(max(1, tile // block_n), triton.next_power_of_2(rows))
        row_blocks = triton.cdiv(rows, block_b)
        blocks = row_blocks * triton.cdiv(cols, block_n)
        row_steps = max(1, min(row_blocks, 32, blocks // _common.target_programs(device)))
    n_row_chunks = triton.cdiv(triton.cdiv(rows, block_b), row_steps)
    return _common.RowTiling(block_b, block_n, row_steps, triton.cdiv(cols, block_n), n_row_chunks,
                             8 if block_b * block_n >= 4096 else 4)


def _broadcast_plan_ref(shape, full, small, *, out_like, want_out, pin_batch):
    if small is not None and any(st == 0 and n > 1 for n, st in zip(small.shape, small.stride())):
        small = small.contiguous()
    out_strides = _output_strides_ref(out_like, shape) if want_out else None
    materialised = False
    for attempt in range(3):
        strides = {n: tuple(t.expand(shape).stride()) for n, t in full.items()}
        if small is not None:
            strides["s"] = tuple(small.expand(shape).stride())
        if out_strides is not None:
            strides["o"] = out_strides
        layout = _common._broadcast_layout(shape, strides, "s" if small is not None else None, pin_batch)
        if layout is not None:
            return _common.BroadcastPlan(layout, full, small, out_strides, materialised)
        if attempt == 0:
            full = {n: t.contiguous() for n, t in full.items()}
            out_strides = _common.contiguous_strides(shape) if out_strides is not None else None
        else:
            small = small.expand(shape).contiguous()
            materialised = True
    raise AssertionError


def _grad_mode_ref(operand, shape2):
    rows, numel = shape2[0], math.prod(shape2)
    if operand.numel() == numel:
        return _common.ELEMENTWISE
    if operand.numel() == 1:
        return _common.SUM
    strides = operand.expand(shape2).stride()
    if (strides[0] == 0 or rows == 1) and operand.numel() == numel // rows:
        return _common.PER_DIM
    if all(s == 0 or n == 1 for s, n in zip(strides[1:], shape2[1:])) and operand.numel() == rows:
        return _common.PER_SAMPLE
    return None


# --------------------------------------------------------------------------------------------- #
# Layouts                                                                                       #
# --------------------------------------------------------------------------------------------- #


def _weird_unit_strides():
    # size-1 dims with strides that are not the contiguous ones: is_contiguous() is still true
    return torch.empty_strided((4, 1, 5), (5, 999, 1))


def _leads():
    """(name, lead tensor): contiguous, channels-last, transposed, expanded, empty, odd, 0-d, non-mergeable."""
    base5 = torch.randn(3, 4, 5, 6, 7)
    return {
        "contiguous": torch.randn(4, 6, 5),
        "channels_last": torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last),
        "transposed": torch.randn(6, 5).t(),
        "expanded": torch.randn(1, 5).expand(4, 5),
        "empty": torch.randn(0, 5),
        "odd": torch.randn(7, 13),
        "zero_dim": torch.tensor(1.5),
        "unit_dims": _weird_unit_strides(),
        "sliced": torch.randn(8, 10)[::2, 1:8],
        "no_merge": base5.permute(0, 2, 4, 1, 3)[:, ::2, :, ::2, :],  # the contiguous fallback
        "one_row": torch.randn(1, 9),
    }


def _operand_sets(lead):
    """Operand lists over ``lead``'s shape: full-size, broadcast priors (columns, rows, one value), absent ones."""
    shape = tuple(lead.shape)
    full = torch.randn(shape) if shape else torch.randn(())
    sets = [[lead, full], [lead, full, None, None]]
    if len(shape) >= 2:
        sets.append([lead, full, torch.randn(shape[1:]), torch.randn(shape[0], *([1] * (len(shape) - 1)))])
        sets.append([lead, lead, torch.randn(1), torch.randn(()).expand(shape)])
        sets.append([lead, torch.randn(shape[-1], *shape[:-1]).movedim(0, -1)])  # another dense layout
    return sets


# --------------------------------------------------------------------------------------------- #
# Tests                                                                                         #
# --------------------------------------------------------------------------------------------- #


@pytest.mark.parametrize("name", list(_leads()))
def test_row_plan_equals_uncached(name):
    lead = _leads()[name]
    for operands in _operand_sets(lead):
        for _ in range(2):  # the second call is a cache hit
            shape2, view, passed, out_strides = _common.row_plan(lead, operands)
            ref_shape2, ref_view, ref_passed, ref_out = _row_plan_ref(lead, operands)
            assert tuple(shape2) == tuple(ref_shape2)
            assert view == ref_view
            assert out_strides == ref_out
            assert len(passed) == len(ref_passed)
            for p, r in zip(passed, ref_passed):
                assert (p is None) == (r is None)
                if p is not None and lead.numel():  # the kernel reads the same memory (through view.strides)
                    same = p.data_ptr() == r.data_ptr() and p.dtype == r.dtype
                    assert same or (p.stride() == r.stride() and torch.equal(p, r))  # the fallback's copies


def test_row_plan_fallback_still_copies():
    lead = _leads()["no_merge"]
    _, view, passed, out_strides = _common.row_plan(lead, [lead])
    assert passed[0].is_contiguous() and passed[0].data_ptr() != lead.data_ptr()
    assert out_strides == _common.contiguous_strides(lead.shape)
    assert view.strides[0][1:] == view.strides[-1][1:]


def test_row_plan_same_shape_other_strides_other_plan():
    a = torch.randn(4, 6, 5)
    b = torch.randn(5, 6, 4).permute(2, 1, 0)  # same shape, other strides
    plan_a, plan_b = _common.row_plan(a, [a]), _common.row_plan(b, [b])
    assert plan_a[1] != plan_b[1] and plan_a[3] != plan_b[3]
    assert plan_b[1] == _row_plan_ref(b, [b])[1]
    # The plan reads no dtype (strides count elements): another dtype of the same layout gets the same view.
    c = a.to(torch.float64)
    assert _common.row_plan(c, [c])[1] == plan_a[1]


def test_row_plan_not_broadcastable_raises_torch_error():
    lead = torch.randn(4, 5)
    with pytest.raises(RuntimeError):
        _common.row_plan(lead, [lead, torch.randn(3)])


@pytest.mark.parametrize("rows,cols", [(1, 1), (7, 13), (64, 256), (4096, 128), (3, 100000), (100000, 3)])
def test_row_tiling_equals_uncached(rows, cols):
    for override in (None, (2, 8, 3), (1, 16, 1)):
        assert _common.row_tiling(rows, cols, torch.device("cpu"), override) == _row_tiling_ref(
            rows, cols, torch.device("cpu"), override)


def test_row_tiling_keyed_on_device(monkeypatch):
    # Two GPUs with different SM counts, without a GPU: the device's program target is part of the key.
    monkeypatch.setattr(_common, "_sm_count", lambda index: 132 if index == 0 else 2)
    big, small, cpu = torch.device("cuda", 0), torch.device("cuda", 1), torch.device("cpu")
    tilings = {d: _common.row_tiling(4096, 4096, d) for d in (big, small, cpu)}
    for device, tiling in tilings.items():
        assert tiling == _row_tiling_ref(4096, 4096, device)
    assert len(set(tilings.values())) == 3


def test_next_power_of_2_and_cdiv_match_triton():
    for n in range(0, 5000):
        assert _common._next_power_of_2(n) == triton.next_power_of_2(n)
        for d in (1, 3, 4, 1024):
            assert _common._cdiv(n, d) == triton.cdiv(n, d)


def test_expand_strides_matches_torch():
    cases = [((5,), (1,), (4, 5)), ((4, 1), (1, 1), (4, 5)), ((1, 5), (77, 1), (1, 5)), ((), (), (3, 2)),
             ((4, 1, 5), (5, 999, 1), (4, 1, 5)), ((4, 1, 5), (5, 999, 1), (2, 4, 3, 5)), ((0, 5), (5, 1), (0, 5))]
    for shape, strides, target in cases:
        t = torch.empty_strided(shape, strides, device="meta")
        assert _common._expand_strides(shape, strides, target) == tuple(t.expand(target).stride())
    with pytest.raises(_common._NotExpandable):
        _common._expand_strides((3,), (1,), (4, 5))


def _broadcast_cases():
    x = torch.randn(2, 3, 4, 5)
    cl = x.to(memory_format=torch.channels_last)
    t = torch.randn(5, 6).t()
    no_merge = torch.randn(3, 4, 5, 6, 7).permute(0, 2, 4, 1, 3)[:, ::2, :, ::2, :]
    return [
        ((2, 3, 4, 5), {"a": x, "b": x.clone()}, torch.randn(1)),
        ((2, 3, 4, 5), {"a": cl, "b": x}, torch.randn(3, 1, 1)),
        ((2, 3, 4, 5), {"a": x, "b": x}, torch.randn(2, 1, 1, 5)),
        ((2, 3, 4, 5), {"a": x, "b": x}, torch.randn(1).expand(4, 5)),  # internal broadcast: copied
        ((2, 3, 4, 5), {"a": x, "b": x}, None),
        ((6, 5), {"a": t, "b": t}, torch.randn(6, 1)),
        ((7, 13), {"a": torch.randn(7, 13), "b": torch.randn(13)}, torch.randn(13)),
        ((2, 3, 4, 5, 6, 7, 8), {"a": torch.randn(2, 3, 4, 5, 6, 7, 8), "b": torch.randn(2, 3, 4, 5, 6, 7, 8)},
         torch.randn(2, 1, 4, 1, 6, 1, 8)),  # kept / reduced alternate four times: materialised σ
        (tuple(no_merge.shape), {"a": no_merge, "b": no_merge}, torch.randn(1)),  # the contiguous fallback
    ]


@pytest.mark.parametrize("case", range(9))
def test_broadcast_plan_and_grid_equal_uncached(case):
    shape, full, small = _broadcast_cases()[case]
    for want_out in (False, True):
        for pin_batch in (False, True):
            kwargs = dict(out_like=full["a"], want_out=want_out, pin_batch=pin_batch)
            for _ in range(2):
                plan = _common.broadcast_plan(shape, dict(full), small, **kwargs)
                ref = _broadcast_plan_ref(shape, dict(full), small, **kwargs)
                assert plan.layout == ref.layout
                assert plan.out_strides == ref.out_strides and plan.small_materialised == ref.small_materialised
                assert plan.full.keys() == ref.full.keys()
                for n in ref.full:
                    assert plan.full[n].data_ptr() == ref.full[n].data_ptr() or torch.equal(plan.full[n], ref.full[n])
                    assert plan.full[n].stride() == ref.full[n].stride()
                if ref.small is None:
                    assert plan.small is None
                else:
                    assert plan.small.stride() == ref.small.stride() and torch.equal(plan.small, ref.small)
                for lead in ("a", "b"):
                    for per_k in (False, True):
                        grid = _common.broadcast_grid(plan.layout, torch.device("cpu"), lead=lead,
                                                      per_k_partials=per_k)
                        assert grid == _common._broadcast_grid(*_grid_key(ref.layout), _common.INTERPRETER_PROGRAMS,
                                                               lead, per_k)


def _grid_key(layout):
    return layout.ksize, layout.rsize, tuple(layout.kstride.items()), tuple(layout.rstride.items())


def test_broadcast_plan_other_strides_other_layout():
    x = torch.randn(2, 3, 4, 5)
    cl = x.to(memory_format=torch.channels_last)
    s = torch.randn(3, 1, 1)
    a = _common.broadcast_plan((2, 3, 4, 5), {"a": x, "b": x}, s, out_like=x, want_out=True, pin_batch=False)
    b = _common.broadcast_plan((2, 3, 4, 5), {"a": cl, "b": cl}, s, out_like=cl, want_out=True, pin_batch=False)
    assert a.layout != b.layout and a.out_strides != b.out_strides


@pytest.mark.parametrize("shape2", [(4, 5), (1, 5), (4, 1), (3, 4, 5)])
def test_grad_mode_equals_uncached(shape2):
    operands = [torch.randn(shape2), torch.randn(1), torch.randn(shape2[1:]), torch.randn(shape2[0], *[1] * (
        len(shape2) - 1)), torch.randn(shape2[-1]), torch.randn(()), torch.randn(shape2[-1]).expand(shape2)]
    for operand in operands:
        assert _common.grad_mode(operand, torch.Size(shape2)) == _grad_mode_ref(operand, torch.Size(shape2))


def test_policy_strides_equal_uncached():
    for lead in _leads().values():
        for shape in (tuple(lead.shape), (3, *lead.shape), (2, 2)):
            if lead.numel() and tuple(shape) == tuple(lead.shape):
                want = _output_strides_ref(lead, shape)
            elif lead.numel() and tuple(shape[1:]) == tuple(lead.shape):
                want = (lead.numel(), *_output_strides_ref(lead, lead.shape))
            else:
                want = _common.contiguous_strides(shape)
            assert _common.policy_strides(shape, lead) == want


def test_caches_stay_bounded():
    limit = _common._PLAN_CACHE_SIZE
    for n in range(1, limit + 60):
        lead = torch.empty(n, 3)
        _common.row_plan(lead, [lead])
        _common.row_tiling(n, 3, torch.device("cpu"))
    for cache in (_common._row_plan_meta, _common._row_tiling, _common.row_view_needs_int64,
                  _common._broadcast_plan_meta, _common._broadcast_grid_cached, _common._grad_mode,
                  _common._policy_strides_cached):
        assert cache.cache_info().maxsize == limit
        assert cache.cache_info().currsize <= limit
    assert _common._row_plan_meta.cache_info().currsize == limit


def test_channels_last_grad_z_with_samples_matches_reference():
    """The backward launcher copies ``grad_z`` only when its plan fell back (``row_plan`` hands back the operands
    given): a channels-last ``grad_z`` of several samples once got copied to contiguous and read through its
    channels-last strides (dmu off by ~0.8)."""
    import fusedvae as fv
    from fusedvae import backend as fv_backend

    if not torch.cuda.is_available() and not fv_backend.triton_interpreter_enabled():
        pytest.skip("no GPU and TRITON_INTERPRET is not set")
    gen = torch.Generator().manual_seed(3)
    mu = torch.randn(2, 4, 3, 5, generator=gen).to(memory_format=torch.channels_last).requires_grad_(True)
    lv = (0.3 * torch.randn(2, 4, 3, 5, generator=gen)).to(memory_format=torch.channels_last).requires_grad_(True)
    grads = {}
    for name in ("triton", "reference"):
        with fv.use_backend(name):
            z, _ = fv.rsample_kl(mu, lv, n_samples=2, generator=torch.Generator().manual_seed(1))
            grad_z = torch.empty_like(z).copy_(torch.arange(z.numel(), dtype=z.dtype).reshape(z.shape) / 100)
            assert grad_z.stride() == z.stride() and not grad_z.is_contiguous()
            grads[name] = torch.autograd.grad((z,), (mu, lv), (grad_z,))
    for got, want in zip(grads["triton"], grads["reference"]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
