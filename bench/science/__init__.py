"""The science suite: reproduce the VAE papers' results with fusedvae's ops inside real training loops.

``run_science(out_dir)`` runs six studies and writes, into ``out_dir``, one CSV (or more) per study,
PNG figures and ``REPORT.md``. On a CPU the whole suite takes a few minutes; ``quick=True`` runs
each study's code path for a handful of steps on tiny data, in seconds (for CI: it proves the code
runs, its numbers mean nothing).

1. linear VAE = pPCA (Lucas et al. 2019)           4. posterior collapse against σ² (Lucas et al. 2019)
2. σ_x and β (Rybkin et al. 2021; β-VAE)           5. ELBO decomposition: β-VAE vs β-TC-VAE (Chen et al. 2018)
3. BN-VAE's γ (Zhu et al. 2020)                     6. estimators A and B, IWAE bounds (Kingma & Welling; Burda et al.)
"""

from __future__ import annotations

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

    Returns:
        The studies' results (also rendered into ``REPORT.md``). A study that raises is reported as
        failed in ``REPORT.md`` and the exception re-raised after the others have run.
    """
    import importlib

    from .report import write_report

    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ctx = Context(out_dir=out_dir, quick=quick, device=torch.device(device), data=data, verbose=verbose)
    chosen = STUDIES if studies is None else tuple(studies)
    unknown = [s for s in chosen if s not in STUDIES]
    if unknown:
        raise ValueError(f"unknown studies {unknown}; choose from {STUDIES}")
    results: list[StudyResult] = []
    failures: dict[str, str] = {}
    first_error: BaseException | None = None
    start = time.perf_counter()
    # Small models run fastest on one thread on a CPU; the GPU path is unaffected.
    with torch_threads(1 if ctx.device.type == "cpu" else torch.get_num_threads()):
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
    write_report(ctx, results, time.perf_counter() - start, failures)
    if first_error is not None:
        raise first_error
    return results
