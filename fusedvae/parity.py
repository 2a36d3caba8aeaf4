"""Kernel parity check for users' CI: every op × dtype × shape against the float64 reference.

    python -m fusedvae.parity [--device cpu|cuda] [--dtypes float32,bfloat16,float16] [--ops OP,...] [--json FILE]

Each case runs an op forward and backward (with a random grad_output) on the Triton backend in the
given dtype, on the reference in the same dtype (eager), and on the reference in float64. The
error of a result is ``max|a - ref64| / max|ref64|`` over each output and gradient; a case passes
when the kernel's error is at most twice the eager reference's plus a dtype-sized floor (the
comparator of :mod:`fusedvae.testing`, the one the test suite uses), and two
kernel runs agree bit for bit. On CPU the kernels run through Triton's interpreter
(``TRITON_INTERPRET=1``, set here before Triton is imported). Exits 1 if any case fails.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
from collections.abc import Callable, Sequence

import torch

from .testing import errors_against_exact

#: Error floor per dtype, relative to the largest reference value: about one unit in the last place.
ERROR_FLOOR = {torch.float32: 5e-7, torch.float16: 1e-3, torch.bfloat16: 8e-3}
#: float32 floor of the sampling ops on CUDA: there the noise takes the GPU's approximations (lg2/sin/cos.approx,
#: fusedvae.kernels.fastmath), |eps - eps_exact| <= 1e-6 (1 + radius) <= 7e-6, so z and dlogvar (sd x eps) may
#: sit a few 1e-6 of max|z| from the reference where the interpreter is within an ulp.
CUDA_NOISE_FLOOR = 8e-6
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclasses.dataclass
class Case:
    """One op on one set of input shapes; ``make`` builds float64 inputs, ``call`` runs the op."""

    op: str
    shape: str
    make: Callable[[torch.Generator], dict[str, torch.Tensor]]
    call: Callable[[dict[str, torch.Tensor], int], tuple[torch.Tensor, ...]]
    differentiable: tuple[str, ...]


@dataclasses.dataclass
class Row:
    op: str
    dtype: str
    shape: str
    err_forward: float
    err_backward: float
    bound_forward: float
    bound_backward: float
    deterministic: bool
    passed: bool


def _randn(generator, *shape, scale=1.0, shift=0.0):
    return torch.randn(shape, generator=generator, dtype=torch.float64) * scale + shift


def _rand(generator, *shape, low=0.0, high=1.0):
    return torch.rand(shape, generator=generator, dtype=torch.float64) * (high - low) + low


def _cases() -> list[Case]:
    import fusedvae as fv

    def noise(seed: int) -> torch.Generator:
        return torch.Generator().manual_seed(seed)

    cases = []
    for shape, n_samples in (((7, 13), None), ((33, 65), 3), ((3, 5, 7), None)):
        def make(g, shape=shape):
            return {"mu": _randn(g, *shape), "logvar": _randn(g, *shape, scale=0.7)}

        cases.append(Case(
            "rsample_kl", f"{shape} K={n_samples}", make,
            lambda t, s, k=n_samples: fv.rsample_kl(t["mu"], t["logvar"], n_samples=k, generator=noise(s)),
            ("mu", "logvar"),
        ))
    def make_prior(g):
        return {"mu": _randn(g, 19, 24), "logvar": _randn(g, 19, 24, scale=0.7),
                "prior_mu": _randn(g, 24), "prior_logvar": _randn(g, 1, 24, scale=0.5)}

    cases.append(Case(
        "rsample_kl", "(19, 24) learned prior", make_prior,
        lambda t, s: fv.rsample_kl(t["mu"], t["logvar"], t["prior_mu"], t["prior_logvar"], generator=noise(s),
                                   reduction="per_sample"),
        ("mu", "logvar", "prior_mu", "prior_logvar"),
    ))
    cases.append(Case(
        "rsample", "(24, 19).T non-contiguous", lambda g: {"mu": _randn(g, 24, 19), "logvar": _randn(g, 24, 19)},
        lambda t, s: (fv.rsample(t["mu"].t(), t["logvar"].t(), n_samples=2, generator=noise(s)),),
        ("mu", "logvar"),
    ))
    for reduction in ("none", "batchmean", "per_dim"):
        cases.append(Case(
            "kl_normal", f"(17, 24) {reduction}", make_prior,
            lambda t, s, r=reduction: (fv.kl_normal(t["mu"][:17, :], t["logvar"][:17, :], t["prior_mu"],
                                                    t["prior_logvar"], reduction=r),),
            ("mu", "logvar", "prior_mu", "prior_logvar"),
        ))
    image = (4, 3, 9, 11)
    for name, sigma_shape in (("scalar", ()), ("per channel", (3, 1, 1)), ("per sample", (4, 1, 1, 1)),
                              ("per element", image)):
        def make_nll(g, sigma_shape=sigma_shape):
            return {"x": _rand(g, *image), "mean": _rand(g, *image), "log_sigma": _randn(g, *sigma_shape, scale=0.5)}

        cases.append(Case(
            "gaussian_nll", f"{image} σ {name}", make_nll,
            lambda t, s: (fv.gaussian_nll(t["x"], t["mean"], t["log_sigma"]),
                          fv.gaussian_nll(t["x"], t["mean"], t["log_sigma"], reduction="none")),
            ("x", "mean", "log_sigma"),
        ))
    for per_sample in (False, True):
        cases.append(Case(
            "gaussian_nll_optimal", f"{image} per_sample={per_sample}",
            lambda g: {"x": _rand(g, *image), "mean": _rand(g, *image)},
            lambda t, s, p=per_sample: (fv.gaussian_nll_optimal(t["x"], t["mean"], per_sample=p),),
            ("x", "mean"),
        ))
    for name, var_shape in (("var full", (6, 37)), ("var (B, 1)", (6, 1))):
        def make_var(g, var_shape=var_shape):
            return {"input": _randn(g, 6, 37), "target": _randn(g, 6, 37), "var": _rand(g, *var_shape, low=0.1, high=2.0)}

        cases.append(Case(
            "gaussian_nll_loss", f"(6, 37) {name}", make_var,
            lambda t, s: (fv.gaussian_nll_loss(t["input"], t["target"], t["var"], full=True),),
            ("input", "target", "var"),
        ))
    return cases


def _run(case: Case, inputs64: dict[str, torch.Tensor], dtype: torch.dtype, device: str, backend: str,
         grad_outputs: list[torch.Tensor] | None, seed: int):
    import fusedvae as fv

    inputs = {k: v.to(device=device, dtype=dtype).requires_grad_(k in case.differentiable) for k, v in inputs64.items()}
    with fv.use_backend(backend):
        outputs = case.call(inputs, seed)
        if grad_outputs is None:
            grad_outputs = [torch.randn(o.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed + i))
                            for i, o in enumerate(outputs)]
        loss = sum((o.double() * g.to(device)).sum() for o, g in zip(outputs, grad_outputs))
        grads = torch.autograd.grad(loss, [inputs[k] for k in case.differentiable])
    return [o.detach() for o in outputs], list(grads), grad_outputs


def _errors(results, eagers, references) -> tuple[float, float]:
    """The worst ``(kernel, eager)`` relative errors over a case's outputs or gradients (:mod:`fusedvae.testing`)."""
    pairs = [errors_against_exact(r, e, ref) for r, e, ref in zip(results, eagers, references) if ref.numel()]
    return max((k for k, _ in pairs), default=0.0), max((e for _, e in pairs), default=0.0)


def _bitwise_equal(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) or (x.isnan().any() and torch.equal(x.isnan(), y.isnan())) for x, y in zip(a, b))


def run_parity(device: str, dtypes: Sequence[torch.dtype], ops: Sequence[str] | None = None) -> list[Row]:
    """Run every case (or those of ``ops``) for each dtype on ``device``; returns one :class:`Row` per case."""
    rows = []
    for index, case in enumerate(_cases()):
        if ops and case.op not in ops:
            continue
        inputs64 = case.make(torch.Generator().manual_seed(1000 + index))
        seed = 7 + index
        ref_out, ref_grads, grad_outputs = _run(case, inputs64, torch.float64, device, "reference", None, seed)
        for dtype in dtypes:
            eager_out, eager_grads, _ = _run(case, inputs64, dtype, device, "reference", grad_outputs, seed)
            out, grads, _ = _run(case, inputs64, dtype, device, "triton", grad_outputs, seed)
            out2, grads2, _ = _run(case, inputs64, dtype, device, "triton", grad_outputs, seed)
            floor = ERROR_FLOOR[dtype]
            if device.startswith("cuda") and dtype == torch.float32 and case.op in ("rsample_kl", "rsample"):
                floor = max(floor, CUDA_NOISE_FLOOR)
            err_forward, eager_forward = _errors(out, eager_out, ref_out)
            err_backward, eager_backward = _errors(grads, eager_grads, ref_grads)
            row = Row(
                op=case.op, dtype=str(dtype).removeprefix("torch."), shape=case.shape,
                err_forward=err_forward, err_backward=err_backward,
                bound_forward=2 * eager_forward + floor, bound_backward=2 * eager_backward + floor,
                deterministic=_bitwise_equal(out + grads, out2 + grads2), passed=False,
            )
            row.passed = (row.err_forward <= row.bound_forward and row.err_backward <= row.bound_backward
                          and row.deterministic)
            rows.append(row)
            print_row(row)
    return rows


def print_row(row: Row) -> None:
    print(f"{row.op:<22} {row.dtype:<9} {row.shape:<30} {row.err_forward:9.2e} {row.err_backward:9.2e} "
          f"{row.bound_forward:9.2e} {row.bound_backward:9.2e} {'yes' if row.deterministic else 'NO':>6} "
          f"{'pass' if row.passed else 'FAIL':>5}", flush=True)


def environment(device: str) -> dict[str, str]:
    """Versions and device the check ran on."""
    import triton

    import fusedvae

    name = torch.cuda.get_device_name() if device == "cuda" else (platform.processor() or platform.machine())
    return {
        "fusedvae": fusedvae.__version__, "torch": torch.__version__, "triton": triton.__version__,
        "python": platform.python_version(), "device": device, "device_name": name,
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0"),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fusedvae.parity", description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtypes", default="float32,bfloat16,float16", help="comma-separated, of " + ",".join(DTYPES))
    parser.add_argument("--ops", default="", help="comma-separated op names to check (default: all)")
    parser.add_argument("--json", metavar="FILE", help="also write the environment and every row as JSON")
    args = parser.parse_args(argv)
    try:
        dtypes = [DTYPES[name.strip()] for name in args.dtypes.split(",") if name.strip()]
    except KeyError as error:
        parser.error(f"unknown dtype {error.args[0]!r}; choose from {', '.join(DTYPES)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch sees no CUDA device")
    if args.device == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"  # read when the kernels are first imported
    env = environment(args.device)
    print(" ".join(f"{k}={v}" for k, v in env.items()))
    print(f"{'op':<22} {'dtype':<9} {'shape':<30} {'err fwd':>9} {'err bwd':>9} {'bound fwd':>9} {'bound bwd':>9} "
          f"{'determ':>6} {'':>5}")
    ops = [op.strip() for op in args.ops.split(",") if op.strip()]
    rows = run_parity(args.device, dtypes, ops)
    failed = [row for row in rows if not row.passed]
    print(f"{len(rows) - len(failed)} passed, {len(failed)} failed")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"environment": env, "rows": [dataclasses.asdict(r) for r in rows]}, handle, indent=1)
    return 1 if failed or not rows else 0


if __name__ == "__main__":
    sys.exit(main())
