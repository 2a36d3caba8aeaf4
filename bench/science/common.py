"""Shared pieces of the science suite: context, data, models, training loop, evaluation, output helpers."""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

import fusedvae as fv

# --------------------------------------------------------------------------------------------------
# Context and results
# --------------------------------------------------------------------------------------------------


@dataclass
class Context:
    """What every study receives: where to write, how big to run, on which device, on which data."""

    out_dir: Path
    quick: bool = False
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    data: str | None = None
    verbose: bool = True
    #: seed indices: run ``s`` trains with each study's base seed + ``SEED_STRIDE * s`` (so run 0 is the old single run)
    seeds: tuple[int, ...] = (0,)
    #: worker processes for the trainings (1: all in this process)
    jobs: int = 1
    _pool: Any = field(default=None, repr=False, compare=False)

    def log(self, message: str) -> None:
        if self.verbose:
            print(f"[science {time.strftime('%H:%M:%S')}] {message}", flush=True)

    def steps(self, full: int, quick: int = 5) -> int:
        """A step count: ``full`` normally, a handful in quick mode."""
        return quick if self.quick else full

    def seed(self, base: int, index: int) -> int:
        """The torch seed of seed index ``index`` for a training whose single-seed run used ``base``."""
        return base + SEED_STRIDE * index

    def map(self, fn: Callable[..., Any], tasks: list[tuple]) -> list[Any]:
        """``[fn(*task) for task in tasks]``, spread over ``jobs`` worker processes when ``jobs > 1``.

        ``fn`` must be a module-level function and every task must seed torch itself (the training
        helpers do), so a result does not depend on which process ran it or what ran there before.
        """
        if self.jobs <= 1 or len(tasks) <= 1:
            return [fn(*task) for task in tasks]
        if self._pool is None:
            import concurrent.futures
            import multiprocessing

            # spawn, not fork: a forked torch can deadlock on locks held by the parent's threads
            self._pool = concurrent.futures.ProcessPoolExecutor(
                self.jobs, mp_context=multiprocessing.get_context("spawn"), initializer=torch.set_num_threads,
                initargs=(1,)
            )
        return [future.result() for future in [self._pool.submit(fn, *task) for task in tasks]]

    def close(self) -> None:
        """Stop the worker processes, if any."""
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None

    def __getstate__(self) -> dict:
        # a worker gets the settings, not the pool
        return {**self.__dict__, "_pool": None}


#: seed index s adds SEED_STRIDE * s to every seed of a study (weights, minibatch order, noise)
SEED_STRIDE = 1000


@dataclass
class StudyResult:
    """One study's outcome, rendered into REPORT.md by :mod:`bench.science.report`."""

    number: int
    slug: str
    title: str
    papers: str
    claim: str
    method: str
    body: list[str]  # markdown blocks: tables and paragraphs
    figures: list[str]  # file names inside out_dir
    csvs: list[str]  # file names inside out_dir
    verdict: str  # one line, for the README
    outcome: str  # "bears out", "partly", "does not bear out"
    seconds: float = 0.0
    claims: list[Claim] = field(default_factory=list)  # each checkable part, per seed


@dataclass
class Claim:
    """One checkable part of a study's claim and whether it held in each seed's run (a monotonicity or an ordering
    claim included: its tally is the fraction of seeds in which the order held)."""

    text: str
    holds: list[bool]

    @property
    def count(self) -> int:
        return sum(bool(h) for h in self.holds)

    def tally(self) -> str:
        return f"{self.count}/{len(self.holds)} seeds"


def outcome_of(claims: list[Claim]) -> str:
    """``"bears out"`` only when every claim holds for every seed; ``"does not bear out"`` when none holds for any
    seed; ``"partly"`` otherwise (the claims' tallies say how far)."""
    if all(claim.count == len(claim.holds) for claim in claims):
        return "bears out"
    if not any(claim.count for claim in claims):
        return "does not bear out"
    return "partly"


def claims_text(claims: list[Claim]) -> str:
    """``"claim a: 3/3 seeds; claim b: 1/3 seeds"``."""
    text = "; ".join(f"{claim.text}: {claim.tally()}" for claim in claims)
    return text[:1].upper() + text[1:]


def mean_sd(values, fmt: str = "{:.3g}") -> str:
    """``"mean ± sd"`` over seeds (sample standard deviation); the bare value for one seed."""
    array = np.asarray(list(values), dtype=float)
    if array.size <= 1 or bool(np.all(array == array[0])):  # one seed, or a setting (no spread to show)
        return fmt.format(float(array.mean())) if array.size else "–"
    return f"{fmt.format(float(array.mean()))} ± {fmt.format(float(array.std(ddof=1)))}"


def seed_table(
    frame: pd.DataFrame, keys: list[str], formats: dict[str, str] | None = None, default: str = "{:.3g}",
    columns: list[str] | None = None,
) -> pd.DataFrame:
    """One row per group of ``keys`` (in first-seen order), each other numeric column as ``"mean ± sd"`` over the
    seeds (strings, for :func:`markdown_table`); the per-seed values stay in the CSVs."""
    formats = formats or {}
    columns = columns or [c for c in frame.columns if c not in keys and c != "seed"
                          and pd.api.types.is_numeric_dtype(frame[c])]
    rows = []
    for group, sub in frame.groupby(keys, sort=False):
        group = group if isinstance(group, tuple) else (group,)
        row = {key: (f"{value:g}" if isinstance(value, float) else value) for key, value in zip(keys, group)}
        for column in columns:
            row[column] = mean_sd(sub[column], formats.get(column, default))
        rows.append(row)
    return pd.DataFrame(rows)


def write_csv(ctx: Context, name: str, rows: list[dict] | pd.DataFrame) -> str:
    frame = rows if isinstance(rows, pd.DataFrame) else pd.DataFrame(rows)
    path = ctx.out_dir / name
    frame.to_csv(path, index=False, float_format="%.6g")
    return name


def markdown_table(frame: pd.DataFrame, floatfmt: dict[str, str] | None = None, default: str = "{:.4g}") -> str:
    """A GitHub-markdown table, each float column formatted by ``floatfmt[col]`` (a format string)."""
    floatfmt = floatfmt or {}
    header = "| " + " | ".join(str(c) for c in frame.columns) + " |"
    rule = "|" + "|".join("---" for _ in frame.columns) + "|"
    lines = [header, rule]
    for values in zip(*(frame[c].tolist() for c in frame.columns)):
        cells = []
        for col, value in zip(frame.columns, values):
            if isinstance(value, float):
                cells.append("nan" if math.isnan(value) else floatfmt.get(col, default).format(value))
            else:
                cells.append(str(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Run with ``count`` intra-op threads (small models are fastest on one), restoring the old number."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)


# --------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------


@dataclass
class Dataset:
    """Images ``(N, C, H, W)`` in [0, 1] with a fixed train/test split; ``flat`` views them as ``(N, D)``."""

    name: str
    train: torch.Tensor
    test: torch.Tensor
    levels: int  # grey levels of the source data (dequantised by uniform noise), 0 when continuous

    @property
    def image_shape(self) -> tuple[int, ...]:
        return tuple(self.train.shape[1:])

    @property
    def dim(self) -> int:
        return int(np.prod(self.image_shape))

    def flat(self, split: str = "train") -> torch.Tensor:
        data = self.train if split == "train" else self.test
        return data.reshape(data.shape[0], -1)


def _dequantise(values: np.ndarray, levels: int, rng: np.random.Generator) -> np.ndarray:
    """Integer grey levels 0..levels-1 to (v + u) / levels in (0, 1): a continuous density has a finite NLL."""
    return (values + rng.random(values.shape)) / levels


def load_digits_images(seed: int = 0, *, quick: bool = False, scale: float = 1.0) -> Dataset:
    """scikit-learn's 1797 handwritten digits (8x8, grey levels 0..16), dequantised, 80/20 split.

    ``scale`` multiplies the [0, 1] values (``17`` gives the dataset's own grey-level units).
    """
    from sklearn.datasets import load_digits

    raw = load_digits().data.astype(np.float64)  # (1797, 64), integers 0..16
    rng = np.random.default_rng(seed)
    order = rng.permutation(raw.shape[0])
    if quick:
        order = order[:120]
    values = _dequantise(raw[order], 17, rng) * scale
    images = torch.tensor(values, dtype=torch.float32).reshape(-1, 1, 8, 8)
    n_train = int(round(0.8 * images.shape[0]))
    return Dataset("sklearn digits 8x8 (dequantised)", images[:n_train], images[n_train:], 17)


#: ``data`` values that mean "the bundled digits" (the bench CLI's ``synthetic`` default included: the
#: science studies that need synthetic data draw their own from known generative models).
DEFAULT_DATA = (None, "", "digits", "synthetic")


def load_image_data(ctx: Context, seed: int = 0, *, max_train: int = 6000, max_test: int = 1500) -> Dataset:
    """The study data: the bundled digits, or ``ctx.data`` (an MNIST IDX file or folder, or a folder of images).

    IDX files are read by the bench suite's loader (:func:`bench.data.load_idx`, the one the training
    loops use); integer grey levels are dequantised so that a Gaussian density has a finite NLL.
    Image folders go through :func:`bench.data.load_dataset` at 28x28 grey. At most ``max_train +
    max_test`` images are used (a CPU budget).
    """
    if ctx.data in DEFAULT_DATA:
        return load_digits_images(seed, quick=ctx.quick)
    from bench import data as bench_data

    path = Path(ctx.data)
    if not path.exists():
        raise FileNotFoundError(f"--data {ctx.data}: no such file or folder")
    limit = 120 if ctx.quick else max_train + max_test
    if bench_data._is_idx(path):
        raw = bench_data.load_idx(path)
        if raw.dim() == 2:  # (N, D) flattened square images
            side = int(round(math.sqrt(raw.shape[1])))
            raw = raw.reshape(-1, side, side)
        if raw.dim() == 3:
            raw = raw[:, None]
        rng = np.random.default_rng(seed)
        order = rng.permutation(raw.shape[0])[:limit]
        array = raw.numpy()[order].astype(np.float64)
        if raw.dtype == torch.uint8:
            array, levels = _dequantise(array, 256, rng), 256
        else:
            levels = 0
        images = torch.tensor(array, dtype=torch.float32)
    else:
        images = bench_data.load_dataset(str(path), n=limit, channels=1, size=28, seed=seed)
        levels = 0
    n_train = int(round(0.8 * images.shape[0]))
    return Dataset(f"{path.name} ({images.shape[0]} images, {'dequantised' if levels else 'as is'})",
                   images[:n_train], images[n_train:], levels)


def synthetic_factors(
    n: int, *, n_factors: int = 4, dim: int = 32, noise: float = 0.05, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Data from a known generative model with independent factors: ``x = f(c) + noise``.

    ``c ~ N(0, I_k)``; ``f`` a fixed random two-layer tanh network into ``dim`` dimensions, scaled to
    unit variance per output. Returns ``(x, c)`` in float32.
    """
    gen = torch.Generator().manual_seed(seed)
    factors = torch.randn(n, n_factors, generator=gen)
    w1 = torch.randn(n_factors, 64, generator=gen) / math.sqrt(n_factors)
    b1 = 0.3 * torch.randn(64, generator=gen)
    w2 = torch.randn(64, dim, generator=gen) / math.sqrt(64)
    clean = torch.tanh(factors @ w1 + b1) @ w2
    clean = (clean - clean.mean(0)) / clean.std(0)
    x = clean + noise * torch.randn(n, dim, generator=gen)
    return x.float(), factors.float()


class Batches:
    """Random minibatches from a tensor, from their own generator (the model's noise stays on torch's default)."""

    def __init__(self, data: torch.Tensor, batch_size: int, seed: int = 0) -> None:
        self.data = data
        self.batch_size = min(batch_size, data.shape[0])
        self.gen = torch.Generator().manual_seed(seed)
        self._order = torch.empty(0, dtype=torch.long)
        self._pos = 0

    def next(self) -> torch.Tensor:
        if self.batch_size >= self.data.shape[0]:
            return self.data
        if self._pos + self.batch_size > self._order.numel():
            self._order = torch.randperm(self.data.shape[0], generator=self.gen)
            self._pos = 0
        index = self._order[self._pos : self._pos + self.batch_size].to(self.data.device)
        self._pos += self.batch_size
        return self.data.index_select(0, index)


# --------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------


class MLPVAE(nn.Module):
    """Encoder ``x -> (mu, logvar)`` and decoder ``z -> mean`` for flat data ``(B, D)``."""

    def __init__(
        self, dim: int, latent: int, hidden: int = 128, *, bn_gamma: float | None = None, bn_eps: float = 1e-5
    ) -> None:
        super().__init__()
        self.latent = latent
        self.encoder = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU())
        self.to_mu = nn.Linear(hidden, latent)
        self.to_logvar = nn.Linear(hidden, latent)
        self.decoder = nn.Sequential(
            nn.Linear(latent, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, dim)
        )
        self.bn = fv.nn.BatchNormMean(latent, bn_gamma, eps=bn_eps) if bn_gamma else None

    def pre_bn_mean(self, x: torch.Tensor) -> torch.Tensor:
        """The posterior mean before BN-VAE's batch normalisation."""
        return self.to_mu(self.encoder(x.reshape(x.shape[0], -1)))

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.encoder(x.reshape(x.shape[0], -1))
        mu = self.to_mu(h)
        if self.bn is not None:
            mu = self.bn(mu)
        return mu, self.to_logvar(h)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z)


class ConvVAE(nn.Module):
    """A small convolutional VAE for ``(B, C, H, W)`` images (two stride-2 convolutions each way)."""

    def __init__(self, image_shape: tuple[int, int, int], latent: int, width: int = 32) -> None:
        super().__init__()
        channels, height, width_px = image_shape
        self.image_shape = image_shape
        self.latent = latent
        self.conv1 = nn.Conv2d(channels, width, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1)
        with torch.no_grad():
            probe = torch.zeros(1, *image_shape)
            self._size1 = tuple(self.conv1(probe).shape[-2:])
            self._feature = tuple(self.conv2(self.conv1(probe)).shape[1:])
        flat = int(np.prod(self._feature))
        self.to_stats = nn.Linear(flat, 2 * latent)
        self.from_z = nn.Sequential(nn.Linear(latent, flat), nn.ReLU())
        self.deconv2 = nn.ConvTranspose2d(2 * width, width, 3, stride=2, padding=1)
        self.deconv1 = nn.ConvTranspose2d(width, channels, 3, stride=2, padding=1)
        self._height, self._width = height, width_px

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        mu, logvar = self.to_stats(h.flatten(1)).chunk(2, dim=1)
        return mu, logvar

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        lead = z.shape[:-1]
        h = self.from_z(z.reshape(-1, z.shape[-1])).reshape(-1, *self._feature)
        h = torch.relu(self.deconv2(h, output_size=self._size1))
        mean = self.deconv1(h, output_size=(self._height, self._width))
        return mean.reshape(*lead, *self.image_shape)


# --------------------------------------------------------------------------------------------------
# Training and evaluation
# --------------------------------------------------------------------------------------------------


#: Learning-rate multiplier for a learned decoder log σ (see :func:`train_loop`).
SIGMA_LR_FACTOR = 10.0


def cosine_lr(optimizer: torch.optim.Optimizer, steps: int, floor: float = 0.02) -> torch.optim.lr_scheduler.LambdaLR:
    """Cosine decay from the optimizer's lr to ``floor`` times it over ``steps``."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(step, steps) / max(steps, 1)))
    )


def train_loop(
    loss_fn: Callable[[torch.Tensor, int], torch.Tensor],
    params: list[torch.nn.Parameter],
    batches: Batches,
    steps: int,
    *,
    lr: float = 2e-3,
    cosine: bool = True,
    callback: Callable[[int], None] | None = None,
    every: int = 0,
    sigma_params: list[torch.nn.Parameter] | None = None,
    sigma_lr_factor: float = SIGMA_LR_FACTOR,
) -> None:
    """Adam on ``loss_fn(batch, step)`` for ``steps`` steps; ``callback(step)`` every ``every`` steps.

    ``sigma_params`` (a learned decoder log σ) get ``sigma_lr_factor`` times the learning rate: Adam moves
    a parameter by about lr per step, so at lr 2e-3 a log σ would need ~1000 steps just to travel from
    0 to its optimum near -2, and while σ lags above its optimum the KL is over-weighted (study 4's
    subject); the faster rate lets σ track its optimum.
    """
    groups = [{"params": [p for p in params if not any(p is q for q in (sigma_params or []))]}]
    if sigma_params:
        groups.append({"params": list(sigma_params), "lr": lr * sigma_lr_factor})
    optimizer = torch.optim.Adam(groups, lr=lr, foreach=True)
    scheduler = cosine_lr(optimizer, steps) if cosine else None
    for step in range(steps):
        loss = loss_fn(batches.next(), step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        if callback is not None and every and ((step + 1) % every == 0 or step + 1 == steps):
            callback(step + 1)


@torch.no_grad()
def posterior(model: nn.Module, x: torch.Tensor, batch: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior means and log-variances over a whole data set, in eval mode."""
    was_training = model.training
    model.eval()
    mus, logvars = [], []
    for start in range(0, x.shape[0], batch):
        mu, logvar = model.encode(x[start : start + batch])
        mus.append(mu)
        logvars.append(logvar)
    model.train(was_training)
    return torch.cat(mus), torch.cat(logvars)


@torch.no_grad()
def per_sample_kl(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """``(N, q)`` KL of each datapoint's posterior to N(0, I), per latent dimension (fusedvae's exact KL)."""
    return fv.kl_normal(mu, logvar, reduction="none")


@torch.no_grad()
def evaluate_gaussian_vae(
    model: nn.Module,
    x: torch.Tensor,
    log_sigma: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | torch.Tensor | float,
    *,
    n_samples: int = 10,
) -> dict[str, float]:
    """Test-set negative ELBO (β = 1) per datapoint and per dimension, its NLL and KL, and the MSE.

    ``log_sigma`` is the decoder's log σ_x: a float or tensor, or a function ``(x, mean) -> log σ``
    (the σ-VAE's optimal σ, computed on the evaluation data).
    """
    was_training = model.training
    model.eval()
    mu, logvar = model.encode(x)
    kl = float(fv.kl_normal(mu, logvar))
    nll_total, sse_total = 0.0, 0.0
    for _ in range(n_samples):
        z = fv.rsample(mu, logvar)
        mean = model.decode(z)
        s = log_sigma(x, mean) if callable(log_sigma) else log_sigma
        nll_total += float(fv.gaussian_nll(x, mean, s))
        sse_total += float((x - mean).square().sum())
    model.train(was_training)
    dim = x[0].numel()
    nll = nll_total / n_samples
    return {
        "nll": nll,
        "kl": kl,
        "neg_elbo": nll + kl,
        "neg_elbo_per_dim": (nll + kl) / dim,
        "mse": sse_total / n_samples / x.numel(),
    }


def log_sigma_per_sample(x: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """The σ-VAE's optimal log σ per sample, shaped to broadcast against ``x``."""
    s = fv.optimal_log_sigma(x, mean, per_sample=True)
    return s.reshape(-1, *([1] * (x.dim() - 1)))


def log_sigma_global(x: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    return fv.optimal_log_sigma(x, mean)


def env_summary(device: torch.device) -> str:
    import platform

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({cpu}, {os.cpu_count()} cores)"
    backend = fv.backend_for(torch.zeros(1, device=device))
    return f"{where}; torch {torch.__version__}; fusedvae {fv.__version__}; backend {backend}"


def train_mlp_vae(
    x: torch.Tensor,
    latent: int,
    steps: int,
    *,
    log_sigma: float = 0.0,
    learn_sigma: bool = False,
    bn_gamma: float | None = None,
    bn_eps: float = 1e-5,
    beta: float = 1.0,
    seed: int = 0,
    lr: float = 2e-3,
    batch_size: int = 128,
    hidden: int = 128,
) -> tuple[MLPVAE, fv.nn.GaussianLikelihood]:
    """An MLP VAE on flat data trained with ``fv.vae_loss`` and a fixed or learned shared σ_x."""
    torch.manual_seed(seed)
    model = MLPVAE(x.shape[1], latent, hidden, bn_gamma=bn_gamma, bn_eps=bn_eps).to(x.device)
    likelihood = fv.nn.GaussianLikelihood((), init_log_sigma=log_sigma, learnable=learn_sigma).to(x.device)

    def loss(batch: torch.Tensor, _step: int) -> torch.Tensor:
        mu, logvar = model.encode(batch)
        return fv.vae_loss(batch, model.decode, mu, logvar, log_sigma=likelihood.log_sigma, beta=beta).loss

    train_loop(loss, [*model.parameters(), *likelihood.parameters()], Batches(x, batch_size, seed=seed + 1), steps, lr=lr,
               sigma_params=list(likelihood.parameters()))
    return model, likelihood
