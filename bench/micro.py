"""Per-op micro-benchmarks: op × variant × provider × mode × dtype × size -> rows of ``micro.csv``.

Modes: ``forward`` is the op's forward pass as a training step runs it (inputs require grad, so
autograd records what the backward pass needs); ``backward`` is ``torch.autograd.grad`` of a graph
built once beforehand (``retain_graph``); ``full`` is both in one timed call. On a GPU each call is
timed alone (L2 flushed, device idle before it), so a call whose host path (Python, dispatch, launches)
takes longer than its kernels is timed at its host cost: ``host_ms`` (the time to enqueue one call)
says which rows those are (the H200's ``full`` rows of fusedvae at the large size, ~1 ms of host path
against ~0.5 ms of kernels). Gradients go through
``torch.autograd.grad`` (fresh tensors every call, nothing accumulates). Every op is called the way
a VAE calls it: the default ``reduction="batchmean"`` (``"mean"`` for ``gaussian_nll_loss``, as torch).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

import fusedvae as fv

from . import baselines
from .betatc_cases import BETATC_SIZES, betatc_dense, betatc_fused, betatc_inputs
from .bytes import MODES, bytes_min
from .device import environment, threads
from .providers import MICRO_PROVIDERS, backend_label, configure_dynamo, is_compiled, provider_context, uses_baseline
from .timing import clock_name, host_ms, peak_memory_mb, saved_mb, time_interleaved_ms

COLUMNS = (
    "op", "variant", "provider", "backend", "mode", "dtype", "shape", "numel", "bytes_min",
    "time_ms_p50", "time_ms_p20", "time_ms_p80", "clock", "gbps", "roofline_fraction", "peak_mem_mb", "saved_mb",
    "host_ms", "copy_gbps", "threads", "preset", "note", "device", "torch", "triton", "fusedvae", "commit", "timestamp",
)

# Size sweeps: latents (B, D), images (B, C, H, W).
SIZES = {
    "full": {
        "latent": [(256, 32), (1024, 64), (4096, 128), (16384, 256), (65536, 512)],
        "image": [(64, 3, 32, 32), (128, 3, 64, 64), (256, 3, 128, 128), (256, 3, 256, 256)],
    },
    "full-cpu": {  # the reference's int64 Philox takes ~0.14 s per million elements on a CPU core: stop early
        "latent": [(256, 32), (1024, 64), (4096, 128), (8192, 128)],
        "image": [(64, 3, 32, 32), (128, 3, 64, 64), (128, 3, 128, 128)],
    },
    "quick": {"latent": [(256, 32), (4096, 128), (65536, 512)], "image": [(64, 3, 32, 32), (256, 3, 128, 128)]},
    "quick-cpu": {"latent": [(256, 32), (2048, 128)], "image": [(16, 3, 32, 32), (64, 3, 32, 32)]},
    "tiny": {"latent": [(8, 16)], "image": [(2, 3, 8, 8)]},
    # one mid size and one that moves >= 256 MB in bfloat16 forward (rsample_kl 3E, NLL 2E)
    "gpu-run": {"latent": [(4096, 128), (131072, 512)], "image": [(64, 3, 64, 64), (512, 3, 256, 256)]},
    # scripts/gpu_run.sh times them as separate steps, the large size first: at the mid size a GPU call
    # is launch-bound (the H200 timed host overhead there), so it comes last and in float32 only
    "gpu-large": {"latent": [(131072, 512)], "image": [(512, 3, 256, 256)]},
    "gpu-mid": {"latent": [(4096, 128)], "image": [(64, 3, 64, 64)]},
}
_BETATC_TABLE = {"gpu-large": "gpu-run", "gpu-mid": None}  # β-TC has one GPU size: timed with the large ones
for _table, _sizes in SIZES.items():  # β-TC batches (B, D): its own sweep, the dense form is O(B^2 D)
    _betatc = _BETATC_TABLE.get(_table, _table)
    _sizes["betatc"] = BETATC_SIZES[_betatc] if _betatc else []

# With --quick on a CPU, torch.compile (a C++ build per graph, tens of seconds each) runs for these only,
# one variant per op (``--compile some``); the smoke tests' tiny preset compiles one.
COMPILE_SOME = {
    "quick": {("rsample_kl", "standard-prior"), ("kl_normal", "standard-prior"), ("gaussian_nll", "scalar-sigma"),
              ("gaussian_nll_optimal", "global"), ("gaussian_nll_loss", "per-element-var"), ("betatc", "mss")},
    "tiny": {("gaussian_nll", "scalar-sigma")},
}


# ---- the ops as pure functions of tensors (module-level, so each compiles to its own code object) ----

def _rsample_kl(mu, lv):
    return fv.rsample_kl(mu, lv)


def _rsample_kl_prior(mu, lv, pmu, plv):
    return fv.rsample_kl(mu, lv, pmu, plv)


def _kl_normal(mu, lv):
    return (fv.kl_normal(mu, lv),)


def _kl_normal_prior(mu, lv, pmu, plv):
    return (fv.kl_normal(mu, lv, pmu, plv),)


def _gaussian_nll(x, m, s):
    return (fv.gaussian_nll(x, m, s),)


def _gaussian_nll_optimal(x, m):
    return (fv.gaussian_nll_optimal(x, m),)


def _gaussian_nll_optimal_per_sample(x, m):
    return (fv.gaussian_nll_optimal(x, m, per_sample=True),)


def _gaussian_nll_loss(x, m, var):
    return (fv.gaussian_nll_loss(m, x, var, check_var=False),)


@dataclass(frozen=True)
class Variant:
    op: str
    variant: str
    kind: str  # "latent" or "image": which size sweep
    fn: Callable[..., tuple[torch.Tensor, ...]]
    make: Callable[[tuple[int, ...], torch.dtype, torch.device, torch.Generator], list[torch.Tensor]]
    baseline: Callable[..., tuple[torch.Tensor, ...]]  # what users write instead (bench.baselines), same arguments

    def function(self, provider: str) -> Callable[..., tuple[torch.Tensor, ...]]:
        """The code ``provider`` runs: the baseline for ``torch``/``torch+compile``, fusedvae's op otherwise."""
        return self.baseline if uses_baseline(provider) else self.fn


def _tensor(shape, dtype, device, gen, *, kind="normal", scale=1.0, low=0.0, grad=True):
    # drawn where the generator is: on a GPU the device draws them (a CPU draw of the 256 MB operands
    # and their copy cost ~0.5 s per tensor, ~30 s of a GPU run's float32 pass), on a CPU as before
    if kind == "normal":
        value = torch.randn(shape, generator=gen, dtype=torch.float32, device=gen.device) * scale
    else:
        value = torch.rand(shape, generator=gen, dtype=torch.float32, device=gen.device) * scale + low
    return value.to(device=device, dtype=dtype).requires_grad_(grad)


def _posterior(shape, dtype, device, gen):
    return [_tensor(shape, dtype, device, gen), _tensor(shape, dtype, device, gen, scale=0.5)]


def _with_prior(prior_shape):
    def make(shape, dtype, device, gen):
        p = prior_shape(shape)
        return _posterior(shape, dtype, device, gen) + [
            _tensor(p, dtype, device, gen, scale=0.5), _tensor(p, dtype, device, gen, scale=0.3)]
    return make


def _image_pair(shape, dtype, device, gen):
    return [_tensor(shape, dtype, device, gen, kind="uniform", grad=False),
            _tensor(shape, dtype, device, gen, kind="uniform")]


def _with_log_sigma(sigma_shape):
    def make(shape, dtype, device, gen):
        return _image_pair(shape, dtype, device, gen) + [_tensor(sigma_shape(shape), dtype, device, gen, scale=0.3)]
    return make


def _with_var(shape, dtype, device, gen):
    return _image_pair(shape, dtype, device, gen) + [_tensor(shape, dtype, device, gen, kind="uniform", low=0.1)]


B = baselines
VARIANTS: tuple[Variant, ...] = (
    Variant("rsample_kl", "standard-prior", "latent", _rsample_kl, _posterior, B.rsample_kl),
    Variant("rsample_kl", "learned-prior", "latent", _rsample_kl_prior, _with_prior(lambda s: s), B.rsample_kl_prior),
    Variant("rsample_kl", "learned-prior-per-dim", "latent", _rsample_kl_prior, _with_prior(lambda s: s[1:]),
            B.rsample_kl_prior),
    Variant("kl_normal", "standard-prior", "latent", _kl_normal, _posterior, B.kl_normal),
    Variant("kl_normal", "learned-prior", "latent", _kl_normal_prior, _with_prior(lambda s: s), B.kl_normal_prior),
    Variant("gaussian_nll", "scalar-sigma", "image", _gaussian_nll, _with_log_sigma(lambda s: ()),
            B.gaussian_nll_learned),
    Variant("gaussian_nll", "per-channel-sigma", "image", _gaussian_nll, _with_log_sigma(lambda s: (s[1], 1, 1)),
            B.gaussian_nll_learned),
    Variant("gaussian_nll", "per-sample-sigma", "image", _gaussian_nll,
            _with_log_sigma(lambda s: (s[0],) + (1,) * (len(s) - 1)), B.gaussian_nll_learned),
    Variant("gaussian_nll", "per-element-sigma", "image", _gaussian_nll, _with_log_sigma(lambda s: s),
            B.gaussian_nll_learned),
    Variant("gaussian_nll_optimal", "global", "image", _gaussian_nll_optimal, _image_pair, B.gaussian_nll_optimal),
    Variant("gaussian_nll_optimal", "per-sample", "image", _gaussian_nll_optimal_per_sample, _image_pair,
            B.gaussian_nll_optimal_per_sample),
    Variant("gaussian_nll_loss", "per-element-var", "image", _gaussian_nll_loss, _with_var, B.gaussian_nll_loss_op),
    Variant("betatc", "mss", "betatc", betatc_fused, betatc_inputs, betatc_dense),
)


def select_variants(spec: str | None) -> list[Variant]:
    """``spec``: comma-separated ``op`` or ``op:variant`` names; ``None`` or ``all`` for every variant."""
    if not spec or spec == "all":
        return list(VARIANTS)
    chosen = []
    for item in spec.split(","):
        op, _, variant = item.strip().partition(":")
        matches = [v for v in VARIANTS if v.op == op and (not variant or v.variant == variant)]
        if not matches:
            known = ", ".join(sorted({f"{v.op}:{v.variant}" for v in VARIANTS}))
            raise SystemExit(f"--ops: no variant matches {item!r}; known: {known}")
        chosen.extend(m for m in matches if m not in chosen)
    return chosen


def _as_tuple(outputs) -> tuple[torch.Tensor, ...]:
    return tuple(outputs) if isinstance(outputs, (tuple, list)) else (outputs,)


def _grad_outputs(outputs: Sequence[torch.Tensor], gen: torch.Generator) -> list[torch.Tensor]:
    """A grad for every output: ones for a scalar loss, random (never all ones) for a tensor such as z."""
    grads = []
    for out in outputs:
        if out.dim() == 0:
            grads.append(torch.ones_like(out))
        else:
            grads.append(torch.randn(out.shape, generator=gen, dtype=torch.float32, device=gen.device)
                         .to(out.device, out.dtype))
    return grads


def mode_functions(call: Callable[[], tuple[torch.Tensor, ...]], grad_inputs: list[torch.Tensor],
                   gen: torch.Generator) -> tuple[dict[str, Callable[[], object]], list[torch.Tensor]]:
    """The three timed callables for a case, and one forward's outputs (for the byte count)."""
    outputs = _as_tuple(call())
    grad_outs = _grad_outputs(outputs, gen)

    def forward():
        return call()

    def backward():
        return torch.autograd.grad(outputs, grad_inputs, grad_outs, retain_graph=True)

    def full():
        return torch.autograd.grad(_as_tuple(call()), grad_inputs, grad_outs)

    return {"forward": forward, "backward": backward, "full": full}, list(outputs)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def plan_sizes(preset: str, device: torch.device, table: str | None = None) -> dict[str, list[tuple[int, ...]]]:
    """The size sweep of ``preset`` on ``device``, or the named ``table`` of :data:`SIZES` when given (``--sizes``)."""
    if table is not None:
        if table not in SIZES:
            raise ValueError(f"--sizes must be one of {tuple(SIZES)}, got {table!r}")
        return SIZES[table]
    if preset == "tiny":
        return SIZES["tiny"]
    if device.type == "cpu":
        return SIZES["quick-cpu" if preset == "quick" else "full-cpu"]
    return SIZES[preset]


def _measure(variant: Variant, fns: dict[str, Callable], shape, dtype, device, *, modes, copy_gbps: float,
             min_run_time: float, seed: int, preset: str, rep_ms: int = 100, warmup_ms: int = 25) -> list[dict]:
    """Rows for one (variant, size, dtype): every provider in ``fns`` × every mode, providers timed interleaved.

    Each provider gets its own inputs from the same seed (equal values), drawn on the GPU when
    ``device`` is one (β-TC's inputs, small, always on the CPU). A provider that fails gets rows with a
    ``note`` and no times.
    """
    gen_device = device if device.type == "cuda" and variant.kind != "betatc" else torch.device("cpu")
    bases, cases = {}, {}
    for provider, fn in fns.items():
        gen = torch.Generator(device=gen_device).manual_seed(seed)
        bases[provider] = {
            "op": variant.op, "variant": variant.variant, "provider": provider, "dtype": _dtype_name(dtype),
            "shape": "x".join(map(str, shape)), "numel": math.prod(shape), "copy_gbps": copy_gbps,
            "threads": threads(device), "preset": preset, "note": "", "clock": clock_name(device),
        }
        try:
            with provider_context(provider):
                tensors = variant.make(shape, dtype, device, gen)
                grad_inputs = [t for t in tensors if t.requires_grad]
                bases[provider]["backend"] = backend_label(provider, tensors[0])
                torch.manual_seed(seed)
                functions, outputs = mode_functions(lambda fn=fn, tensors=tensors: fn(*tensors), grad_inputs, gen)
                functions["full"]()  # compiles the forward and backward graphs (compile provider), warms up
            cases[provider] = (tensors, grad_inputs, functions, outputs)
        except Exception as exc:  # noqa: BLE001 - one failing case must not lose the run
            bases[provider]["note"] = _note(exc)
    rows = {provider: [] for provider in fns}
    for mode in modes:
        timings: dict[str, tuple[float, float, float]] = {}
        if cases:
            try:
                timings = time_interleaved_ms({p: c[2][mode] for p, c in cases.items()}, device,
                                              context=provider_context, min_run_time=min_run_time, rep_ms=rep_ms,
                                              warmup_ms=warmup_ms)
            except Exception as exc:  # noqa: BLE001
                for provider in cases:
                    bases[provider] = dict(bases[provider], note=_note(exc))
        for provider in fns:
            row = dict(bases[provider], mode=mode)
            if provider in timings and not row["note"]:
                tensors, grad_inputs, functions, outputs = cases[provider]
                p50, p20, p80 = timings[provider]
                moved = bytes_min(mode, tensors, outputs, grad_inputs)
                gbps = moved / (p50 * 1e-3) / 1e9
                with provider_context(provider):
                    peak = peak_memory_mb(functions[mode], device)
                    saved = saved_mb(functions["forward"])  # what the forward keeps for backward, in every mode's row
                    host = host_ms(functions[mode], device)  # >= time_ms_p50: the row timed the host path
                row.update(bytes_min=moved, time_ms_p50=p50, time_ms_p20=p20, time_ms_p80=p80, gbps=gbps,
                           roofline_fraction=gbps / copy_gbps if copy_gbps else math.nan, peak_mem_mb=peak,
                           saved_mb=saved, host_ms=host)
            rows[provider].append(row)
    return [row for provider in fns for row in rows[provider]]


def _note(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".splitlines()[0][:200]


def run_micro(
    device: torch.device,
    dtypes: Sequence[torch.dtype],
    *,
    preset: str = "full",
    copy_gbps: float,
    variants: Sequence[Variant] | None = None,
    providers: Sequence[str] = MICRO_PROVIDERS,
    modes: Sequence[str] = MODES,
    compile_scope: str = "all",
    min_run_time: float = 0.2,
    seed: int = 0,
    sizes: str | None = None,
    rep_ms: int = 100,
    warmup_ms: int = 25,
    on_row: Callable[[dict], None] = lambda row: None,
    progress: Callable[..., object] | None = None,
) -> list[dict]:
    """Time every case; each row goes to ``on_row`` as soon as it is measured, and all are returned.

    ``compile_scope``: ``all`` compiles every variant, ``some`` only :data:`COMPILE_SOME` (of the
    preset), ``none`` skips the ``compile`` provider. ``sizes`` names a table of :data:`SIZES` that
    replaces the preset's sweep. ``rep_ms``, ``warmup_ms``: ``do_bench``'s budgets per timing on a GPU.
    """
    configure_dynamo(retain_graph=True)
    variants = list(variants or VARIANTS)
    sizes = plan_sizes(preset, device, sizes)
    env = environment(device)

    def compiled_here(variant: Variant) -> bool:
        some = COMPILE_SOME.get(preset, COMPILE_SOME["quick"])
        return compile_scope == "all" or (compile_scope == "some" and (variant.op, variant.variant) in some)

    groups = []
    for dtype in dtypes:
        for variant in variants:
            chosen = [p for p in providers if not is_compiled(p) or compiled_here(variant)]
            if chosen:
                groups.append((dtype, variant, chosen))
    total = sum(len(sizes[v.kind]) * len(chosen) * len(modes) for _, v, chosen in groups)
    bar = progress(total=total, desc="micro", unit="case") if progress else None
    rows: list[dict] = []

    for dtype, variant, chosen in groups:
        # compiled once per (variant, dtype), dynamic shapes, reused across the size sweep
        functions_of = {p: (torch.compile(variant.function(p), dynamic=True) if is_compiled(p) else variant.function(p))
                        for p in chosen}
        if any(is_compiled(p) for p in chosen):
            torch._dynamo.reset()
        for shape in sizes[variant.kind]:
            if bar is not None:
                bar.set_postfix_str(f"{variant.op}:{variant.variant} {_dtype_name(dtype)} {'x'.join(map(str, shape))}",
                                    refresh=True)
            for row in _measure(variant, functions_of, shape, dtype, device, modes=modes, copy_gbps=copy_gbps,
                                min_run_time=min_run_time, seed=seed, preset=preset, rep_ms=rep_ms,
                                warmup_ms=warmup_ms):
                row.update(env)
                row = {column: row.get(column, math.nan) for column in COLUMNS}
                rows.append(row)
                on_row(row)
                if bar is not None:
                    bar.update(1)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    if bar is not None:
        bar.close()
    return rows
