"""What every kernel file needs: modes, the strided view of the operands, the grid, float32 math, buffers.

Nothing here knows an op. The kernel files (one per fused op) import it as ``from . import _common``
and call ``_common.empty`` through the module, so tests can replace that one allocation hook.

Output layout policy (every kernel file follows it): an output with the shape of the op's lead
operand (``mu``, ``x``, ``input``: elementwise results, full-size gradients, each sample of ``z``)
takes that operand's memory layout when it is dense (non-overlapping without gaps: contiguous,
channels_last, a transpose), as torch's elementwise ops do, and is contiguous otherwise; partial-sum
buffers, reductions and gradients of broadcast operands are contiguous. :func:`output_strides` is the
policy; launchers and fake implementations both call it, so their strides agree.

The strided view: every operand is read through its own strides over the kernel's shape, never
copied; dims that are contiguous for every operand at once are merged first (:func:`merge_dims`) so a
kernel handles at most three; only a layout that still needs more falls back to contiguous copies.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from . import fastmath

# What a kernel does with a per-element quantity (a loss term, a gradient): nothing, store it
# elementwise, or accumulate per-program partial sums over everything / over rows / over columns.
# The same objects serve launchers (plain comparisons) and kernels (compile-time constants).
OFF = tl.constexpr(0)
ELEMENTWISE = tl.constexpr(1)
SUM = tl.constexpr(2)
PER_DIM = tl.constexpr(3)
PER_SAMPLE = tl.constexpr(4)
#: The sampling + KL ops' ``reduction`` argument as a mode.
REDUCTION_MODE = {"none": ELEMENTWISE, "sum": SUM, "per_dim": PER_DIM, "per_sample": PER_SAMPLE}
#: A sampling backward spreads samples across programs (when the posterior alone leaves the device idle) from this
#: many on: the chunks' sums are added by torch, so dlogvar then matches the one-program loop to rounding, not bit
#: for bit; below it the loop is short anyway.
SPREAD_MIN_SAMPLES = 8

#: Index math switches to 64 bits when an offset a program forms may reach this.
INT32_LIMIT = 2**31 - 1
#: Merged dims a kernel handles per kind (columns; kept / reduced).
SLOTS = 3

_TL_DTYPE = {torch.float32: tl.float32, torch.float64: tl.float64}


def coarse_exp(*dtypes: torch.dtype) -> bool:
    """The kernels' ``COARSE`` constexpr (:func:`exp_accurate`): every dtype the launch writes is 16-bit."""
    return all(d.itemsize == 2 for d in dtypes)


def tl_dtype(dtype: torch.dtype):
    """The Triton compute dtype for a torch compute dtype (float32 or float64)."""
    return _TL_DTYPE[dtype]


# --------------------------------------------------------------------------------------------- #
# Buffers and the grid                                                                          #
# --------------------------------------------------------------------------------------------- #


def empty(shape, dtype: torch.dtype, device: torch.device, strides=None) -> torch.Tensor:
    """Every buffer a kernel writes (outputs, gradients, partial sums); tests fill it with NaN to catch gaps."""
    if strides is None:
        return torch.empty(tuple(shape), dtype=dtype, device=device)
    return torch.empty_strided(tuple(shape), tuple(strides), dtype=dtype, device=device)


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


#: Programs per SM a launch aims for: enough resident warps to hide memory latency on every SM.
PROGRAMS_PER_SM = 16
#: Programs the interpreter aims for: it runs them one after another and pays per program, not per element.
INTERPRETER_PROGRAMS = 4


# Host time: every launcher call runs the plan functions below (shapes, strides, tilings: pure functions of the
# operands' metadata). Each is memoised on a hashable key of everything it reads, in bounded LRU caches, so a
# training loop's repeated calls skip the Python (~0.1 ms a call). ``triton.cdiv`` / ``next_power_of_2`` are
# constexpr functions whose host calls unwrap every argument: plain integer versions here.
_PLAN_CACHE_SIZE = 1024


def _cdiv(x: int, y: int) -> int:
    return (x + y - 1) // y


def _next_power_of_2(n: int) -> int:
    return 1 << (n - 1).bit_length() if n > 0 else 0  # triton.next_power_of_2's value, 0 for 0


def _meta(t: torch.Tensor) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """What a plan reads of a tensor: its shape and strides (never its data, its address or its dtype)."""
    return tuple(t.shape), t.stride()


def _hashable(key) -> bool:
    """False for a key holding symbolic sizes (fake tensors under dynamic shapes): those plans are not cached."""
    try:
        hash(key)
    except TypeError:
        return False
    return True


class _NotExpandable(Exception):
    """A shape that does not broadcast: the uncached path lets torch's ``expand`` raise its own error."""


def _expand_strides(shape: tuple[int, ...], strides: tuple[int, ...], target: tuple[int, ...]) -> tuple[int, ...]:
    """``torch.Tensor.expand(target).stride()`` of a tensor of ``shape`` and ``strides``, without a view."""
    lead = len(target) - len(shape)
    if lead < 0:
        raise _NotExpandable
    out = [0] * lead
    for size, stride, want in zip(shape, strides, target[lead:]):
        if size == want:
            out.append(stride)
        elif size == 1:
            out.append(0)
        else:
            raise _NotExpandable
    return tuple(out)


def target_programs(device: torch.device) -> int:
    """How many programs fill ``device``: ``PROGRAMS_PER_SM`` per SM on a GPU, a few in the interpreter."""
    if device.type != "cuda":
        return INTERPRETER_PROGRAMS
    return PROGRAMS_PER_SM * _sm_count(device.index if device.index is not None else torch.cuda.current_device())


# --------------------------------------------------------------------------------------------- #
# Strides: the output policy, merging, the row x column view                                   #
# --------------------------------------------------------------------------------------------- #


def contiguous_strides(shape) -> tuple[int, ...]:
    strides, step = [], 1
    for size in reversed(tuple(shape)):
        strides.append(step)
        step *= max(size, 1)
    return tuple(reversed(strides))


def _dense_strides(shape: tuple[int, ...], strides: tuple[int, ...]) -> tuple[int, ...] | None:
    step = 1
    for size, stride in sorted(((s, st) for s, st in zip(shape, strides) if s != 1), key=lambda p: p[1]):
        if stride != step:
            return None
        step *= size
    return tuple(strides)


def dense_strides(t: torch.Tensor) -> tuple[int, ...] | None:
    """``t``'s strides when it is non-overlapping and dense (any dim order), else None."""
    return _dense_strides(tuple(t.shape), t.stride())


def _output_strides(lead_shape: tuple[int, ...], lead_strides: tuple[int, ...], shape: tuple[int, ...]):
    dense = _dense_strides(lead_shape, lead_strides) if lead_shape == shape else None
    return dense or contiguous_strides(shape)


def output_strides(lead: torch.Tensor, shape) -> tuple[int, ...]:
    """The layout policy: the strides of an output of ``shape`` produced from the lead operand ``lead``."""
    return _output_strides(tuple(lead.shape), lead.stride(), tuple(shape))


def _policy_strides(shape: tuple[int, ...], lead_shape: tuple[int, ...], lead_strides: tuple[int, ...]):
    numel = math.prod(lead_shape)
    if shape == lead_shape and numel:
        return _output_strides(lead_shape, lead_strides, shape)
    if shape[1:] == lead_shape and numel:
        return (numel, *_output_strides(lead_shape, lead_strides, lead_shape))
    return contiguous_strides(shape)


_policy_strides_cached = functools.lru_cache(maxsize=_PLAN_CACHE_SIZE)(_policy_strides)


def policy_strides(shape, lead: torch.Tensor) -> tuple[int, ...]:
    """:func:`output_strides` for any op output: ``lead``'s shape, or samples of it stacked in front (``z``)."""
    key = (tuple(shape), tuple(lead.shape), lead.stride())
    return (_policy_strides_cached if _hashable(key) else _policy_strides)(*key)


def in_policy_layout(t: torch.Tensor, lead: torch.Tensor) -> torch.Tensor:
    """``t`` itself, or a copy in the policy's layout (a kernel on the contiguous fallback wrote it contiguous)."""
    strides = policy_strides(t.shape, lead)
    if t.stride() == strides:
        return t
    return torch.empty_strided(t.shape, strides, dtype=t.dtype, device=t.device).copy_(t)


def merge_dims(dims: list[tuple[int, tuple[int, ...]]]) -> list[tuple[int, tuple[int, ...]]]:
    """Merge neighbouring ``(size, strides per operand)`` dims, outermost first, where every operand allows it.

    Dims of size 1 are dropped; two neighbours merge when, in every operand, the outer stride is the
    inner stride times the inner size (the row-major order of the merged index is kept).
    Example: sizes (4, 5) with strides (5, 1) merge to (20,) with stride 1.
    """
    merged: list[tuple[int, tuple[int, ...]]] = []
    for size, strides in dims:
        if size == 1:
            continue
        if merged and all(outer == inner * size for outer, inner in zip(merged[-1][1], strides)):
            merged[-1] = (merged[-1][0] * size, tuple(strides))
        else:
            merged.append((size, tuple(strides)))
    return merged


class StridedView(NamedTuple):
    """A shape as rows (dim 0) by columns (the other dims merged to three), and each operand's strides over it.

    ``dims`` are the three merged column sizes ``(D1, D2, D3)`` (padded with 1 in front) and
    ``strides[i]`` operand ``i``'s ``(row, D1, D2, D3)`` strides (zeros for an absent operand).
    """

    rows: int
    cols: int
    dims: tuple[int, int, int]
    inner_rank: int
    strides: tuple[tuple[int, int, int, int], ...]


def _row_view(shape, operands) -> StridedView | None:
    return _row_view_strides(tuple(shape), [None if t is None else tuple(t.stride()) for t in operands])


def _row_view_strides(shape: tuple[int, ...], operands: list[tuple[int, ...] | None]) -> StridedView | None:
    present = [s for s in operands if s is not None]
    columns = merge_dims([(shape[j], tuple(s[j] for s in present)) for j in range(1, len(shape))])
    if len(columns) > SLOTS:
        return None
    columns = [(1, (0,) * len(present))] * (SLOTS - len(columns)) + columns
    inner_rank = max(1, sum(1 for size, _ in columns if size != 1))
    row_strides = [s[0] if shape[0] != 1 else 0 for s in present]
    per_operand = iter(zip(row_strides, *(strides for _, strides in columns)))
    strides = tuple(next(per_operand) if s is not None else (0, 0, 0, 0) for s in operands)
    dims = tuple(size for size, _ in columns)
    return StridedView(shape[0], dims[0] * dims[1] * dims[2], dims, inner_rank, strides)


def strided_view(shape: torch.Size, operands: list[torch.Tensor | None]):
    """The row x column view of ``operands`` (each expanded to ``shape``, or None) and the operands to pass.

    The operands come back unchanged, or as contiguous copies in the rare layout whose column dims
    do not merge to three.
    """
    view = _row_view(shape, operands)
    if view is None:
        operands = [None if t is None else t.contiguous() for t in operands]
        view = _row_view(shape, operands)
    return view, operands


#: Most row steps a program walks: enough to amortise its setup, few enough to keep programs many.
_MAX_ROW_STEPS = 32


class RowTiling(NamedTuple):
    """A grid over the row view: tiles of BLOCK_B x BLOCK_N, ``row_steps`` tiles down per program."""

    block_b: int
    block_n: int
    row_steps: int
    n_col_blocks: int
    n_row_chunks: int
    num_warps: int


def row_tiling(rows: int, cols: int, device: torch.device, override: tuple[int, int, int] | None = None) -> RowTiling:
    """Tiles and row steps that fill ``device`` (``override``: a test's ``(BLOCK_B, BLOCK_N, row_steps)``)."""
    if override is not None:
        return _row_tiling(rows, cols, False, 0, tuple(override))
    return _row_tiling(rows, cols, device.type == "cuda", target_programs(device), None)


@functools.lru_cache(maxsize=_PLAN_CACHE_SIZE)
def _row_tiling(rows: int, cols: int, cuda: bool, programs: int, override: tuple[int, int, int] | None) -> RowTiling:
    if override is not None:
        block_b, block_n, row_steps = override
    else:
        # The interpreter pays per program and per op, not per element: bigger tiles there.
        tile = 1024 if cuda else 4096
        block_n = min(_next_power_of_2(cols), tile)
        block_b = min(max(1, tile // block_n), _next_power_of_2(rows))
        row_blocks = _cdiv(rows, block_b)
        blocks = row_blocks * _cdiv(cols, block_n)
        row_steps = max(1, min(row_blocks, _MAX_ROW_STEPS, blocks // programs))
    n_row_chunks = _cdiv(_cdiv(rows, block_b), row_steps)
    return RowTiling(block_b, block_n, row_steps, _cdiv(cols, block_n), n_row_chunks,
                     8 if block_b * block_n >= 4096 else 4)


@functools.lru_cache(maxsize=_PLAN_CACHE_SIZE)
def row_view_needs_int64(view: StridedView, tiling: RowTiling, n_samples: int = 1, sample_stride: int = 0) -> bool:
    """Whether any offset a program over ``view`` forms (masked lanes, every sample's too) may reach 2^31."""
    rows = tiling.n_row_chunks * tiling.row_steps * tiling.block_b
    cols = tiling.n_col_blocks * tiling.block_n
    reach = n_samples * max(rows, 1) * max(cols, 1) + n_samples * abs(sample_stride)
    for s0, s1, s2, s3 in view.strides:
        reach = max(reach, rows * abs(s0) + view.dims[0] * abs(s1) + view.dims[1] * abs(s2) + cols * abs(s3)
                    + n_samples * (view.rows * view.cols + abs(sample_stride)))
    return reach >= INT32_LIMIT


def row_plan(lead: torch.Tensor, operands: list[torch.Tensor | None]):
    """``(shape2, view, operands, out_strides)``: the row view over ``lead``'s shape (0-d seen as ``(1,)``).

    The outputs' layout (:func:`output_strides`) takes part in the merge as one more operand, so
    ``view.strides[-1]`` are the outputs' strides over the view; ``out_strides`` are the same over
    ``lead.shape`` (contiguous in the fallback, which :func:`in_policy_layout` then copies from).
    ``operands`` come back as given (the very objects: a launcher may test ``is``), or as contiguous copies of
    their broadcasts in the fallback. Memoised on shapes and strides (:func:`_row_plan_meta`).

    Example: ``row_plan(mu, [mu, logvar, None])`` for a (B, D) ``mu`` gives ``shape2 == (B, D)``, one merged
    column dim of D and ``view.strides[-1] == (D, 0, 0, 1)`` for a contiguous ``mu``.
    """
    shape2 = lead.shape if lead.dim() else torch.Size([1])
    key = (tuple(lead.shape), lead.stride(), tuple(None if t is None else _meta(t) for t in operands))
    if _hashable(key):
        try:
            plan = _row_plan_meta(*key)
        except _NotExpandable:
            plan = None
        if plan is not None:
            # The operands as given: the kernel reads them through view.strides (an expand would only cost host time).
            view, out_strides = plan
            return shape2, view, list(operands), out_strides
    # Symbolic sizes, a shape that does not broadcast (expand raises), or the contiguous fallback: the tensors' way.
    out = torch.empty_strided(shape2, output_strides(lead, shape2), device="meta")
    expanded = [None if t is None else t.expand(shape2) for t in operands]
    view, passed = strided_view(shape2, [*expanded, out])
    return shape2, view, passed[:-1], tuple(passed[-1].stride()) if lead.dim() else ()


@functools.lru_cache(maxsize=_PLAN_CACHE_SIZE)
def _row_plan_meta(lead_shape, lead_strides, operands) -> tuple[StridedView, tuple[int, ...]] | None:
    """:func:`row_plan`'s ``(view, out_strides)`` from shapes and strides alone; None for the contiguous fallback."""
    shape2 = lead_shape if lead_shape else (1,)
    out = _output_strides(lead_shape, lead_strides, shape2)
    expanded = [None if m is None else _expand_strides(*m, shape2) for m in operands]
    view = _row_view_strides(shape2, [*expanded, out])
    if view is None:
        return None
    return view, out if lead_shape else ()


@triton.jit
def column_offsets(cols, dims, strides, INNER_RANK: tl.constexpr):
    """Offsets of columns ``cols`` (row-major over ``dims`` = (D1, D2, D3)) for ``strides`` = (row, s1, s2, s3)."""
    if INNER_RANK == 1:
        off = cols * strides[3]
    elif INNER_RANK == 2:
        off = (cols // dims[2]) * strides[2] + (cols % dims[2]) * strides[3]
    else:
        outer = cols // dims[2]
        off = (outer // dims[1]) * strides[1] + (outer % dims[1]) * strides[2] + (cols % dims[2]) * strides[3]
    return off


# --------------------------------------------------------------------------------------------- #
# The kept x reduced view: an op whose small operand broadcasts, its gradient reduced           #
# --------------------------------------------------------------------------------------------- #
# The small operand ("s": log σ, a variance) is expanded to the full shape (stride 0 where it
# broadcasts). Every dim is *kept* (s varies along it) or *reduced* (it does not); each kind is merged
# to at most three dims. A program owns a block of the innermost kept dim (plus one index of each
# outer kept dim) and loops over a chunk of the reduced positions in 2-D tiles BLOCK_K x BLOCK_R, so
# s is loaded once per kept index, index division happens per program and per iteration (never per
# element), and s's gradient is a per-program sum over the tile's reduced axis written to an
# (n_rchunks, K) partial buffer. For "per_sample", dim 0 is pinned as the outermost kept dim, so a
# program never straddles two samples.

#: Elements per 2-D tile (BLOCK_K x BLOCK_R) of a kept x reduced kernel.
BROADCAST_TILE = 1024


class BroadcastLayout(NamedTuple):
    ksize: tuple[int, int, int]  # kept sizes, outer to inner, padded with 1 in front
    rsize: tuple[int, int, int]  # reduced sizes, likewise
    kstride: dict[str, tuple[int, int, int]]
    rstride: dict[str, tuple[int, int, int]]


def _broadcast_layout(
    shape: tuple[int, ...], strides: dict[str, tuple[int, ...]], key: str | None, pin_batch: bool
) -> BroadcastLayout | None:
    """Kept dims: where ``strides[key]`` is non-zero (plus dim 0 when ``pin_batch``). None if a kind needs > 3 dims."""
    names = list(strides)
    dims = [(size, tuple(strides[n][d] for n in names)) for d, size in enumerate(shape)]
    pinned = dims[:1] if pin_batch and shape and shape[0] != 1 else []
    rest = dims[len(pinned):]
    key_index = names.index(key) if key is not None else None
    kept = pinned + merge_dims([d for d in rest if key_index is not None and d[1][key_index] != 0])
    reduced = merge_dims([d for d in rest if key_index is None or d[1][key_index] == 0])
    slots = SLOTS
    if len(kept) > slots or len(reduced) > slots:
        return None
    pad = (1, (0,) * len(names))
    # A pinned sample index is the outermost slot, so a program never straddles two samples.
    kept = pinned + [pad] * (slots - len(kept)) + kept[len(pinned):]
    reduced = [pad] * (slots - len(reduced)) + reduced
    return BroadcastLayout(
        tuple(size for size, _ in kept),
        tuple(size for size, _ in reduced),
        {n: tuple(st[i] for _, st in kept) for i, n in enumerate(names)},
        {n: tuple(st[i] for _, st in reduced) for i, n in enumerate(names)},
    )


def _has_internal_broadcast(t: torch.Tensor) -> bool:
    return any(stride == 0 and size > 1 for size, stride in zip(t.shape, t.stride()))


class BroadcastGrid(NamedTuple):
    block_k: int
    block_r: int
    n_kblk: int
    n_rblk: int
    n_rchunks: int
    chunk_iters: int
    programs: int
    int64: bool


def broadcast_grid(layout: BroadcastLayout, device: torch.device, *, lead: str, per_k_partials: bool) -> BroadcastGrid:
    """The tiles, chunks and program count over ``layout`` that fill ``device``; ``lead`` names the tile's guide."""
    key = (layout.ksize, layout.rsize, tuple(layout.kstride.items()), tuple(layout.rstride.items()),
           target_programs(device), lead, per_k_partials)
    return (_broadcast_grid_cached if _hashable(key) else _broadcast_grid)(*key)


def _broadcast_grid(ksize, rsize, kstride, rstride, target: int, lead: str, per_k_partials: bool) -> BroadcastGrid:
    layout = BroadcastLayout(ksize, rsize, dict(kstride), dict(rstride))
    (k0, k1, k2), (r0, r1, r2) = layout.ksize, layout.rsize
    # The tile's long side follows the operand's most contiguous inner dimension.
    ks, rs = layout.kstride[lead][2], layout.rstride[lead][2]
    kept_first = r2 == 1 or (k2 > 1 and ks != 0 and (rs == 0 or ks < rs))
    if kept_first:
        block_k = min(_next_power_of_2(k2), BROADCAST_TILE)
        block_r = min(_next_power_of_2(r2), max(BROADCAST_TILE // block_k, 1))
    else:
        block_r = min(_next_power_of_2(r2), BROADCAST_TILE)
        block_k = min(_next_power_of_2(k2), max(BROADCAST_TILE // block_r, 1))
    n_kblk = _cdiv(k2, block_k)
    n_kprog = k0 * k1 * n_kblk
    n_rblk = r0 * r1 * _cdiv(r2, block_r)
    n_rchunks = 1 if n_kprog >= target else min(n_rblk, _cdiv(target, n_kprog))
    if per_k_partials and k0 * k1 * k2 > 1:
        n_rchunks = min(n_rchunks, max(1, n_rblk // 4))  # partial buffer (n_rchunks, K) stays <= N / 4
    chunk_iters = _cdiv(n_rblk, n_rchunks)
    n_rchunks = _cdiv(n_rblk, chunk_iters)
    programs = n_kprog * n_rchunks
    # 64-bit index math when any offset a program can form (masked lanes included) may pass 2^31.
    reach = max(
        sum((size + pad) * abs(stride) for size, pad, stride in zip(layout.ksize + layout.rsize,
                                                                   (1, 1, block_k, 1, 1, block_r),
                                                                   layout.kstride[n] + layout.rstride[n]))
        for n in layout.kstride
    )
    reach = max(reach, (n_rchunks + 1) * k0 * k1 * (k2 + block_k), programs * (chunk_iters + 1) * block_r)
    return BroadcastGrid(block_k, block_r, n_kblk, n_rblk, n_rchunks, chunk_iters, programs, reach >= INT32_LIMIT)


_broadcast_grid_cached = functools.lru_cache(maxsize=_PLAN_CACHE_SIZE)(_broadcast_grid)


def layout_strides(layout: BroadcastLayout, name: str | None) -> tuple[int, ...]:
    """An operand's ``(k0, k1, k2, r0, r1, r2)`` strides as the kernels take them; zeros for an absent one."""
    if name is None:
        return (0,) * (2 * SLOTS)
    return layout.kstride[name] + layout.rstride[name]


class BroadcastPlan(NamedTuple):
    layout: BroadcastLayout
    full: dict[str, torch.Tensor]  # operands as the kernel reads them (a contiguous copy in the fallback)
    small: torch.Tensor | None  # the small operand as the kernel reads it
    out_strides: tuple[int, ...] | None
    small_materialised: bool


def _expanded_strides(t: torch.Tensor, shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(t.expand(shape).stride())


def broadcast_plan(
    shape: tuple[int, ...],
    full: dict[str, torch.Tensor],
    small: torch.Tensor | None,
    *,
    out_like: torch.Tensor | None,
    want_out: bool,
    pin_batch: bool,
) -> BroadcastPlan:
    """Describe the iteration; fall back to contiguous copies, then to a materialised small operand.

    The fallbacks only trigger when a kind still needs more than three dimensions after merging:
    strides that merge nothing (rare), or a rank >= 7 tensor whose σ alternates broadcast and
    non-broadcast dimensions four times (then σ is expanded to the full shape, the one case where
    the broadcast is materialised).
    """
    if small is not None and _has_internal_broadcast(small):
        small = small.contiguous()  # one value shared by several σ entries: give each entry its own gradient
    key = (tuple(shape), tuple((n, _meta(t)) for n, t in full.items()), None if small is None else _meta(small),
           _meta(out_like) if want_out else None, pin_batch)
    if _hashable(key):
        try:
            cached = _broadcast_plan_meta(*key)
        except _NotExpandable:
            cached = None
        if cached is not None:
            layout, out_strides = cached
            return BroadcastPlan(layout, full, small, out_strides, False)
    # Symbolic sizes, a shape that does not broadcast, or a fallback: the tensors' way.
    out_strides = None
    if want_out:
        out_strides = output_strides(out_like, shape)
    materialised = False
    for attempt in range(3):
        strides = {n: _expanded_strides(t, shape) for n, t in full.items()}
        if small is not None:
            strides["s"] = _expanded_strides(small, shape)
        if out_strides is not None:
            strides["o"] = out_strides
        layout = _broadcast_layout(shape, strides, "s" if small is not None else None, pin_batch)
        if layout is not None:
            return BroadcastPlan(layout, full, small, out_strides, materialised)
        if attempt == 0:
            full = {n: t.contiguous() for n, t in full.items()}
            out_strides = contiguous_strides(shape) if out_strides is not None else None
        else:
            small = small.expand(shape).contiguous()
            materialised = True
    raise AssertionError("unreachable: a materialised σ merges into at most two kept dimensions")


@functools.lru_cache(maxsize=_PLAN_CACHE_SIZE)
def _broadcast_plan_meta(shape, full, small, out_like, pin_batch) -> tuple[BroadcastLayout, tuple | None] | None:
    """:func:`broadcast_plan`'s first attempt from shapes and strides alone: ``(layout, out_strides)``, or None
    where it falls back. The layout is shared by every call with this key: callers must not mutate it."""
    out_strides = None if out_like is None else _output_strides(*out_like, shape)
    strides = {n: _expand_strides(*m, shape) for n, m in full}
    if small is not None:
        strides["s"] = _expand_strides(*small, shape)
    if out_strides is not None:
        strides["o"] = out_strides
    layout = _broadcast_layout(shape, strides, "s" if small is not None else None, pin_batch)
    return None if layout is None else (layout, out_strides)


# --------------------------------------------------------------------------------------------- #
# Index helpers: a program's kept coordinates, an iteration's reduced coordinates, an offset    #
# --------------------------------------------------------------------------------------------- #


@triton.jit
def kept_coords(K1, n_kblk, n_rchunks, INT64: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    if INT64:
        pid = pid.to(tl.int64)
    pid_r = pid % n_rchunks
    pid_k = pid // n_rchunks
    kout = pid_k // n_kblk
    k2 = (pid_k % n_kblk) * BLOCK_K + tl.arange(0, BLOCK_K)
    return pid, pid_r, kout // K1, kout % K1, k2


@triton.jit
def reduced_coords(rb, R1, R2, BLOCK_R: tl.constexpr):
    n_rblk2 = (R2 + BLOCK_R - 1) // BLOCK_R
    rout = rb // n_rblk2
    r2 = (rb % n_rblk2) * BLOCK_R + tl.arange(0, BLOCK_R)
    return rout // R1, rout % R1, r2


@triton.jit
def kept_offset(k0, k1, k2, st):
    """Offset of kept coordinates for an operand's strides ``st = (k0, k1, k2, r0, r1, r2)``."""
    return k0 * st[0] + k1 * st[1] + k2 * st[2]


@triton.jit
def reduced_offset(r0, r1, r2, st):
    return r0 * st[3] + r1 * st[4] + r2 * st[5]


# --------------------------------------------------------------------------------------------- #
# The modes over the row view: store elementwise, or per-program partial sums finished by torch #
# --------------------------------------------------------------------------------------------- #
# A program owns a block of columns and a chunk of rows. SUM partials are one value per program,
# (n_row_chunks, n_col_blocks); PER_DIM one per column and row chunk, (n_row_chunks, cols);
# PER_SAMPLE one per row and column block, (n_col_blocks, rows). A fixed-order torch sum finishes
# them: deterministic, no float atomics.


@triton.jit
def to_element(x, ptr):
    """``x`` in ``ptr``'s element type, a float64 ``x`` through float32 when that type is 16-bit.

    Triton's interpreter converts float64 to bfloat16 wrongly (zeros and NaN: the CPU tests of a bfloat16 ``mu``
    with float64 priors got NaN gradients); through float32 every backend rounds it right, the double rounding
    at most one 16-bit ulp from the direct one, on exact ties only.
    """
    if x.dtype == tl.float64 and ptr.dtype.element_ty.primitive_bitwidth == 16:
        x = x.to(tl.float32)
    return x.to(ptr.dtype.element_ty)


@triton.jit
def _scaled(x, SCALE: tl.constexpr):
    if SCALE != 1.0:
        x = x * SCALE
    return x


@triton.jit
def emit_step(value, acc, ptr, out_off, mask, rows, row_mask, pid_n, B, MODE: tl.constexpr,
              SCALE: tl.constexpr = 1.0, ZERO_MASKED: tl.constexpr = False):
    """Per row step: store ``SCALE value`` elementwise, store its row sums, or add its column sums to ``acc``.

    Sums are scaled once per row (``PER_SAMPLE``) or in :func:`emit_finish` (``acc``), not per element: a power
    of two, so the bits are those of scaling each element. ``ZERO_MASKED``: the caller's ``value`` is 0 wherever
    ``mask`` is off (its loads' ``other=0`` give 0), so no select.
    """
    if MODE == ELEMENTWISE:
        tl.store(ptr + out_off, to_element(_scaled(value, SCALE), ptr), mask=mask)
    elif MODE != OFF:
        if not ZERO_MASKED:
            value = tl.where(mask, value, 0.0)
        if MODE == PER_SAMPLE:
            tl.store(ptr + pid_n * B + rows, _scaled(tl.sum(value, axis=1), SCALE), mask=row_mask)
        else:
            acc += tl.sum(value, axis=0)
    return acc


@triton.jit
def emit_finish(acc, ptr, cols, col_mask, pid_n, pid_b, N, n_col_blocks, MODE: tl.constexpr,
                SCALE: tl.constexpr = 1.0):
    """After the row loop: the program's per-column (``PER_DIM``) or total (``SUM``) partial sum, times ``SCALE``."""
    if MODE == PER_DIM:
        tl.store(ptr + pid_b * N + cols, _scaled(acc, SCALE), mask=col_mask)
    elif MODE == SUM:
        tl.store(ptr + pid_b * n_col_blocks + pid_n, _scaled(tl.sum(acc, axis=0), SCALE))


def partial_shape(mode, view: StridedView, tiling: RowTiling) -> tuple[int, int]:
    """The partial-sum buffer of ``mode`` (``SUM``, ``PER_DIM`` or ``PER_SAMPLE``) for a grid over ``view``."""
    if mode == SUM:
        return (tiling.n_row_chunks, tiling.n_col_blocks)
    if mode == PER_DIM:
        return (tiling.n_row_chunks, view.cols)
    return (tiling.n_col_blocks, view.rows)


def finish_partials(buffer: torch.Tensor, mode, shape) -> torch.Tensor:
    """The fixed-order sum of a partial buffer, reshaped to ``shape`` (``()``, ``shape[1:]`` or ``(B,)``)."""
    return (buffer.sum() if mode == SUM else buffer.sum(dim=0)).reshape(shape)


def grad_mode(operand: torch.Tensor, shape2: torch.Size):
    """How a kernel hands back the gradient of ``operand`` broadcast to ``shape2``; None: a full-size buffer.

    ``ELEMENTWISE`` for a full-size operand; ``SUM`` for one value; ``PER_DIM`` for an operand that
    varies along the columns only, ``PER_SAMPLE`` along the rows only; None for any other broadcast
    (the kernel then writes a full-size gradient that torch sums to the operand's shape).
    """
    key = (tuple(operand.shape), operand.stride(), tuple(shape2))
    if _hashable(key):
        try:
            return _grad_mode(*key)
        except _NotExpandable:
            operand.expand(shape2)  # torch's own error
            raise
    rows, numel = shape2[0], math.prod(shape2)
    if operand.numel() == numel:
        return ELEMENTWISE
    if operand.numel() == 1:
        return SUM
    strides = operand.expand(shape2).stride()
    if (strides[0] == 0 or rows == 1) and operand.numel() == numel // rows:
        return PER_DIM
    if all(s == 0 or n == 1 for s, n in zip(strides[1:], shape2[1:])) and operand.numel() == rows:
        return PER_SAMPLE
    return None


@functools.lru_cache(maxsize=_PLAN_CACHE_SIZE)
def _grad_mode(shape: tuple[int, ...], strides: tuple[int, ...], shape2: tuple[int, ...]):
    rows, numel, size = shape2[0], math.prod(shape2), math.prod(shape)
    if size == numel:
        return ELEMENTWISE
    if size == 1:
        return SUM
    expanded = _expand_strides(shape, strides, shape2)
    if (expanded[0] == 0 or rows == 1) and size == numel // rows:
        return PER_DIM
    if all(s == 0 or n == 1 for s, n in zip(expanded[1:], shape2[1:])) and size == rows:
        return PER_SAMPLE
    return None


# --------------------------------------------------------------------------------------------- #
# float32 math without libdevice                                                                #
# --------------------------------------------------------------------------------------------- #
# exp and log in float32 are computed here (Cody-Waite range reduction and short polynomials: <= 1
# ulp, measured) rather than with tl.exp / tl.log: on NVIDIA GPUs Triton lowers float32 tl.exp to
# ex2.approx of x * log2(e), whose rounded product costs ~|x| x 6e-8 relative (3e-6 at |x| = 50),
# and these run identically in the interpreter (which has no libdevice), so CPU tests check the
# GPU's arithmetic. float64 keeps tl.exp / tl.log.


@triton.jit
def upcast(x, F64: tl.constexpr):
    if F64:
        y = x.to(tl.float64)
    else:
        y = x.to(tl.float32)
    return y


@triton.jit
def exp_f32(x):
    # exp(x) = 2^n exp(f), n = round(x / ln 2), f = x - n ln 2 (two-constant Cody-Waite: n * LN2_HI is
    # exact), |f| <= ln(2)/2, exp(f) = 1 + (f + f^2 q(f)), q the degree-5 rest of the Taylor series
    # (truncation 5e-9 relative).
    # 2^n is built from its bits in two halves so that every factor is a normal float. NaN stays NaN.
    x = tl.where(x > 128.0, 128.0, x)
    x = tl.where(x < -128.0, -128.0, x)
    n = tl.floor(x * 1.4426950408889634 + 0.5)
    f = x - n * 0.693145751953125
    f = f - n * 1.4286068203094173e-06
    q = f * 1.984126984126984e-04 + 1.388888888888889e-03
    q = q * f + 8.333333333333333e-03
    q = q * f + 4.1666666666666664e-02
    q = q * f + 0.16666666666666666
    q = q * f + 0.5
    p = 1.0 + (f + (f * f) * q)  # the correction rounds inside the final add: ~0.6 ulp in all
    ni = n.to(tl.int32)
    n1 = ni >> 1
    n2 = ni - n1
    scale1 = ((n1 + 127) << 23).to(tl.float32, bitcast=True)
    scale2 = ((n2 + 127) << 23).to(tl.float32, bitcast=True)
    return p * scale1 * scale2


_INF = tl.constexpr(float("inf"))
_NAN_BITS = tl.constexpr(0x7FC00000)  # a NaN global would never compare equal to itself: Triton's cache check fails


@triton.jit
def log_positive_f32(v, e_shift=0):
    """``log(v * 2^-e_shift)`` for positive, normal, finite float32 ``v``, <= 1 ulp: no special cases, no libdevice.

    ``v = 2^e (1 + f)``, ``1 + f`` in [sqrt(1/2), sqrt(2)), ``f`` exact. As in fdlibm: ``log(1 + f) = f - (h -
    s (h + R))``, ``h = f^2/2``, ``s = f/(2 + f)``, ``R = s^2 (2/3 + 2/5 s^2 + 2/7 s^4 + 2/9 s^6)``
    (truncation 1e-9 relative); the exact ``f`` carries the result, the rounded terms are corrections
    (so ``s`` may use the approximate division: it costs < 0.01 ulp of the result).
    """
    bits = v.to(tl.int32, bitcast=True)
    e = ((bits >> 23) & 0xFF) - 127 - e_shift
    m = ((bits & 0x007FFFFF) | 0x3F800000).to(tl.float32, bitcast=True)
    big = m > 1.4142135623730951
    m = tl.where(big, m * 0.5, m)
    e = tl.where(big, e + 1, e)
    f = m - 1.0
    s = f / (2.0 + f)
    z = s * s
    R = z * 0.2222222222222222 + 0.2857142857142857
    R = R * z + 0.4
    R = R * z + 0.6666666666666666
    R = R * z
    h = 0.5 * f * f
    ef = e.to(tl.float32)
    return ef * 0.693145751953125 - ((h - (s * (h + R) + ef * 1.4286068203094173e-06)) - f)


@triton.jit
def log_f32(v):
    """``log(v)`` for every float32 ``v``, <= 1 ulp: subnormals are scaled by 2^23 first; 0 gives -inf, +inf
    gives +inf, a negative or NaN ``v`` NaN (the special cases cost a few selects, not libdevice's log too)."""
    subnormal = v < 1.1754943508222875e-38
    result = log_positive_f32(tl.where(subnormal, v * 8388608.0, v), tl.where(subnormal, 23, 0))
    result = tl.where(v == _INF, _INF, result)
    nan = tl.full(v.shape, _NAN_BITS, tl.int32).to(tl.float32, bitcast=True)
    return tl.where(v > 0.0, result, tl.where(v == 0.0, -_INF, nan))


@triton.jit
def exp(x, F64: tl.constexpr):
    if F64:
        y = tl.exp(x)
    else:
        y = exp_f32(x)
    return y


@triton.jit
def exp_accurate(x, F64: tl.constexpr, FAST: tl.constexpr, SCALE: tl.constexpr = 1.0, COARSE: tl.constexpr = False):
    """``exp(SCALE x)`` within a few ulps for every ``x``, never Triton's float32 ``tl.exp`` (``ex2.approx(x
    log2 e)`` on a GPU: relative error ~|x| x 6e-8). float64: ``tl.exp``; ``FAST`` (a GPU,
    :func:`.fastmath.is_fast`): :func:`.fastmath.exp_accurate_f32` (~3 ulp, 7 instructions, ``SCALE`` a power
    of two folded into its constants); otherwise :func:`exp_f32` (<= 1 ulp, runs in the interpreter).

    ``COARSE`` (the launcher's promise that everything the kernel writes is 16-bit, :func:`coarse_exp`): on the
    ``FAST`` path :func:`.fastmath.exp_coarse_f32` (2 instructions, ``|SCALE x| 7.5e-8`` relative: far below a 16-bit
    ulp); the interpreter keeps :func:`exp_f32`."""
    if F64:
        y = tl.exp(x * SCALE)
    elif FAST and COARSE:
        y = fastmath.exp_coarse_f32(x, SCALE)
    elif FAST:
        y = fastmath.exp_accurate_f32(x, SCALE)
    else:
        y = exp_f32(x * SCALE)
    return y


@triton.jit
def log(x, F64: tl.constexpr):
    if F64:
        y = tl.log(x)
    else:
        y = log_f32(x)
    return y


@triton.jit
def div(x, y, F64: tl.constexpr):
    """IEEE-rounded division (float32 ``x / y`` may lower to an approximate reciprocal on a GPU)."""
    if F64:
        z = x / y
    else:
        z = tl.math.div_rn(x, y)
    return z


#: Below this |d| a Taylor series gives e^d - 1 - d (as fusedvae.reference.kl); above it e^d - 1 cancels by <= ~5x.
SERIES_CUTOFF = tl.constexpr(0.5)


@triton.jit
def exp_minus_one_minus_x(d, F64: tl.constexpr, FAST: tl.constexpr, COARSE: tl.constexpr = False):
    """``(g, em1)`` with ``g = e^d - 1 - d`` and ``em1 = e^d - 1``, accurate for every ``d`` (no libdevice ``expm1``).

    :func:`exp_minus_one_minus_x_given` with ``e^d`` from :func:`exp_accurate` (``FAST``: the GPU's; ``COARSE``: its
    16-bit-result form, whose error only enters for ``|d| >= 0.5``, where ``g >= 0.1``).
    """
    return exp_minus_one_minus_x_given(d, exp_accurate(d, F64, FAST, 1.0, COARSE), F64, COARSE)


@triton.jit
def kl_twice(diff, d, plv, sd, F64: tl.constexpr, FAST: tl.constexpr, COARSE: tl.constexpr):
    """Twice the KL, ``g(d) + (mu - mu_p)^2 e^{-lv_p}`` with ``g(d) = e^d - 1 - d`` exact near ``d = 0``.

    Arguments as :func:`kl_gradient_terms`. A masked lane whose loads gave 0 gives 0 (``g(0) = 0``).
    """
    maha = diff * diff
    if plv is not None:
        maha = maha * exp_accurate(-plv, F64, FAST, 1.0, COARSE)
        g, _ = exp_minus_one_minus_x(d, F64, FAST, COARSE)
    else:
        if sd is not None:
            half = sd
        else:
            half = exp_accurate(d, F64, FAST, 0.5, COARSE)
        g, _ = exp_minus_one_minus_x_given(d, half * half, F64, COARSE)
    return g + maha


@triton.jit
def kl_gradient_terms(diff, d, plv, sd, F64: tl.constexpr, FAST: tl.constexpr, COARSE: tl.constexpr):
    """``(weighted, em1)``: the KL's ``dKL/dmu = weighted = (mu - mu_p) e^{-lv_p}`` and ``dKL/dlv = em1 / 2``.

    ``diff = mu - mu_p``, ``d = lv - lv_p``; ``plv`` the prior's log-variance or None (a standard one:
    ``weighted = diff``); ``sd = e^{d/2}`` where the caller has it (the noise path's standard deviation, no prior
    log-variance) or None. ``em1 = e^d - 1`` by :func:`exp_minus_one_minus_x`, exact near ``d = 0``.
    """
    if plv is not None:
        weighted = diff * exp_accurate(-plv, F64, FAST, 1.0, COARSE)
        _, em1 = exp_minus_one_minus_x(d, F64, FAST, COARSE)
    else:
        weighted = diff
        if sd is not None:
            half = sd
        else:
            half = exp_accurate(d, F64, FAST, 0.5, COARSE)
        _, em1 = exp_minus_one_minus_x_given(d, half * half, F64, COARSE)
    return weighted, em1


@triton.jit
def exp_minus_one_minus_x_given(d, exp_d, F64: tl.constexpr, COARSE: tl.constexpr = False):
    """:func:`exp_minus_one_minus_x` from ``exp_d``, ``e^d`` to a few ulps (used for ``|d| >= 0.5`` only).

    A kernel that has ``e^(d/2)`` already (a standard deviation) passes its square: one multiply for an exp.

    For ``|d| < 0.5`` Horner's rule on the Taylor series ``d^2 (1/2! + d/3! + ...)`` and ``em1 = d + g``;
    elsewhere ``e^d - 1`` cancels by at most ~5x, a few ulps. float64 (``F64``) sums to ``d^17/17!``
    (truncation < 1e-20 relative: exact to a few ulps); float32 takes a degree-5 near-minimax fit of
    ``g / d^2`` (2.7e-8 relative, ~1.5 ulp with float32 Horner): eleven multiply-adds fewer.
    ``e^d`` is never float32 ``tl.exp``, whose error grows with ``|d|`` on a GPU (5e-6 relative at ``d = 80``: the
    KL's finite-to-80 contract broke on an H200). ``COARSE`` (16-bit results, :func:`exp_accurate`): a degree-4 fit
    (8.6e-7 relative in float32), still inside the float32 contract's 1e-5, one multiply-add fewer.
    """
    small = tl.abs(d) < SERIES_CUTOFF
    if F64:
        ds = tl.where(small, d, 0.0)
        series = ds * 2.8114572543455206e-15 + 4.779477332387385e-14  # 1/17!, 1/16!
        series = series * ds + 7.647163731819816e-13  # 1/15!
        series = series * ds + 1.1470745597729725e-11  # 1/14!
        series = series * ds + 1.6059043836821613e-10  # 1/13!
        series = series * ds + 2.08767569878681e-09  # 1/12!
        series = series * ds + 2.505210838544172e-08  # 1/11!
        series = series * ds + 2.755731922398589e-07  # 1/10!
        series = series * ds + 2.7557319223985893e-06  # 1/9!
        series = series * ds + 2.48015873015873e-05  # 1/8!
        series = series * ds + 0.0001984126984126984  # 1/7!
        series = series * ds + 0.001388888888888889  # 1/6!
        series = series * ds + 0.008333333333333333  # 1/5!
        series = series * ds + 0.041666666666666664  # 1/4!
        series = series * ds + 0.16666666666666666  # 1/3!
        series = series * ds + 0.5  # 1/2!
    elif COARSE:
        # (e^d - 1 - d) / d^2 on |d| <= 1/2, degree-4 near-minimax (iteratively reweighted least squares on
        # Chebyshev nodes): 7.7e-7 relative, 8.6e-7 evaluated in float32
        ds = d
        series = ds * 0.0013914644394795361 + 0.008395411008913833
        series = series * ds + 0.041667477071490856
        series = series * ds + 0.16666280115440932
        series = series * ds + 0.49999995973026323
    else:
        # (e^d - 1 - d) / d^2 on |d| <= 1/2 by its degree-5 near-minimax polynomial (relative error 2.7e-8; 9e-8
        # evaluated in float32), two multiply-adds fewer than Taylor to 1/9!. d itself, not a masked copy: for
        # |d| >= 1/2 the value is discarded (finite up to |d| ~ 1e5, inf or NaN beyond, never selected).
        ds = d
        series = ds * 0.0001986876953731527 + 0.0013978273079237897
        series = series * ds + 0.008333468048801375
        series = series * ds + 0.04166591069045447
        series = series * ds + 0.16666665437070433
        series = series * ds + 0.5000000050734512
    series = series * ds * ds
    em1_big = exp_d - 1.0
    g = tl.where(small, series, em1_big - d)
    em1 = tl.where(small, ds + series, em1_big)
    return g, em1
