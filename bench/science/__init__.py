"""The science suite: reproduce the VAE papers' results with fusedvae's ops inside real training loops.

``run_science(out_dir)`` runs six studies and writes, into ``out_dir``, one CSV (or more) per study,
PNG figures and ``REPORT.md``. Every training runs once per seed (3 by default): the CSVs hold each
seed's values, the report their mean ± standard deviation, and a verdict says "bears out" only when
its claims hold for every seed. ``quick=True`` runs each study's code path for a handful of steps on
tiny data, in seconds (for CI: it proves the code runs, its numbers mean nothing).

1. linear VAE = pPCA (Lucas et al. 2019)           4. posterior collapse against σ² (Lucas et al. 2019)
2. σ_x and β (Rybkin et al. 2021; β-VAE)           5. ELBO decomposition: β-VAE vs β-TC-VAE (Chen et al. 2018)
3. BN-VAE's γ (Zhu et al. 2020)                     6. estimators A and B, IWAE bounds (Kingma & Welling; Burda et al.)
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import time
import traceback

import torch

from .common import Context, StudyResult, torch_threads

STUDIES = ("linear_ppca", "sigma_beta", "bn_vae", "collapse", "decomposition", "estimators")

__all__ = ["STUDIES", "run_science"]


def run_science(
    out_dir: pathlib.Path,
    *,
    quick: bool = False,
    data: str | None = None,
    device: str = "cpu",
    studies: tuple[str, ...] | None = None,
    verbose: bool = True,
    seeds: int | None = None,
    jobs: int | None = None,
) -> list[StudyResult]:
    """Run the studies and write their CSVs, figures and ``REPORT.md`` into ``out_dir`` (created if needed).

    Args:
        out_dir: the folder the results go into (the committed ones live in ``results/science``).
        quick: a handful of steps on tiny data per study: the code path only.
        data: an MNIST-format IDX file to use instead of scikit-learn's digits for the image studies
            (loaded by the bench suite's loader); ``None`` for the digits.
        device: ``"cpu"`` or ``"cuda"`` (fusedvae then runs its Triton kernels).
        studies: a subset of :data:`STUDIES` (default all).
        verbose: print progress.
        seeds: how many seeds each training runs with (default 3, 1 with ``quick``).
        jobs: worker processes that share the trainings (default: one per CPU core, at most 4, on a CPU full
            run; 1 with ``quick`` or on a GPU). Each task seeds itself, so the numbers do not depend on it.

    Returns:
        The studies' results (also rendered into ``REPORT.md``). A study that raises is reported as
        failed in ``REPORT.md`` and the exception re-raised after the others have run.
    """
    import importlib

    from .report import write_report

    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    seeds = (1 if quick else 3) if seeds is None else int(seeds)
    if seeds < 1:
        raise ValueError(f"seeds must be at least 1, got {seeds}")
    if jobs is None:
        jobs = 1 if quick or torch.device(device).type != "cpu" else min(os.cpu_count() or 1, 4)
    if jobs < 1:
        raise ValueError(f"jobs must be at least 1, got {jobs}")
    ctx = Context(out_dir=out_dir, quick=quick, device=torch.device(device), data=data, verbose=verbose,
                  seeds=tuple(range(seeds)), jobs=jobs if torch.device(device).type == "cpu" else 1)
    chosen = STUDIES if studies is None else tuple(studies)
    unknown = [s for s in chosen if s not in STUDIES]
    if unknown:
        raise ValueError(f"unknown studies {unknown}; choose from {STUDIES}")
    results: list[StudyResult] = []
    failures: dict[str, str] = {}
    first_error: BaseException | None = None
    start, cpu_start = time.perf_counter(), _cpu_seconds()
    load_before = os.getloadavg()
    # Small models run fastest on one thread on a CPU; the GPU path is unaffected.
    with torch_threads(1 if ctx.device.type == "cpu" else torch.get_num_threads()), contextlib.closing(ctx):
        for name in chosen:
            module = importlib.import_module(f"{__name__}.{name}")
            ctx.log(f"study {name}: start")
            try:
                result = module.run(ctx)
            except Exception as error:  # report it, run the rest, re-raise at the end
                traceback.print_exc()
                failures[name] = f"{type(error).__name__}: {error}"
                first_error = first_error or error
                continue
            ctx.log(f"study {name}: {result.outcome} ({result.seconds:.0f} s)")
            results.append(result)
    # after the workers have exited: their CPU time is counted once they are reaped
    write_report(ctx, results, time.perf_counter() - start, failures, load=(load_before, os.getloadavg()),
                 cpu_seconds=_cpu_seconds() - cpu_start)
    if first_error is not None:
        raise first_error
    return results


def _cpu_seconds() -> float:
    """CPU time (user + system) of this process and of its finished worker processes."""
    import resource

    return sum(resource.getrusage(who).ru_utime + resource.getrusage(who).ru_stime
               for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
