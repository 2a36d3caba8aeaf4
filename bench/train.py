"""Training loops: real VAEs trained for a fixed number of steps per provider -> rows of ``train.csv``.

Every provider starts from the same seed (same initial weights, same batches, same noise seeds)
and differs only in the loss path: ``torch`` and ``torch+compile`` run the loss code of the model's
public codebase (:mod:`bench.baselines`), ``fusedvae`` and ``fusedvae+compile`` fusedvae's ops on the
default backend (Triton on a GPU, :mod:`fusedvae.native` on a CPU), ``reference`` (only when asked
for) fusedvae's reference. In the compiled providers the step's
forward pass and loss go through ``torch.compile`` (AOTAutograd compiles the backward with it);
the optimizer step (Adam) is the same eager call for every provider.

A step is ``zero_grad; loss = model(x); loss.backward(); opt.step()`` timed wall-clock with the
device synchronised before and after (on a CPU with one torch thread, the process's CPU time:
:func:`bench.timing.cpu_clock`); the batch is indexed from device memory before the clock
starts. The providers' steps are interleaved (step k of each provider in turn, on the same batch),
so drifting machine conditions hit all of them alike. Step time is the median over the steps after
warm-up (the first warm-up step includes compilation and is reported apart as ``first_step_ms``).
``peak_mem_mb``: on a GPU the allocator's peak during a step above what was allocated before it,
the largest over the timed steps; on a CPU the same from the profiler's allocation records of one
extra, untimed step. ``saved_mb``: what autograd keeps for backward during one more forward pass
(:func:`bench.timing.saved_mb`; the network's activations, equal for every provider, plus the loss path's).

Under ``torchrun --nproc-per-node N`` the model is wrapped in DistributedDataParallel (nccl on
GPUs, gloo on CPU): every rank takes its own slice of each global batch of ``N * batch`` images,
gradients are averaged, and rank 0 writes the rows (``samples_per_s`` counts all ranks).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from .data import describe, load_dataset
from .device import distributed_env, environment, synchronize, threads
from .models import ModelSpec, use_baselines
from .providers import TRAIN_PROVIDERS, backend_label, configure_dynamo, is_compiled, provider_context, uses_baseline
from .timing import clock_name, cpu_clock, peak_memory_mb, saved_mb

COLUMNS = (
    "model", "variant", "provider", "backend", "dtype", "batch", "world_size", "steps", "warmup_steps",
    "step_ms_p50", "step_ms_p20", "step_ms_p80", "clock", "first_step_ms", "samples_per_s", "peak_mem_mb", "saved_mb",
    "final_loss",
    "data", "params", "threads", "preset", "note", "device", "torch", "triton", "fusedvae", "commit", "timestamp",
)

# (warm-up steps, timed steps, images in the dataset)
SCHEDULE = {
    ("full", "cuda"): (10, 100, 4096),
    ("full", "cpu"): (3, 30, 1024),
    ("quick", "cuda"): (5, 30, 1024),
    ("quick", "cpu"): (3, 15, 256),
    ("tiny", "cuda"): (2, 2, 16),
    ("tiny", "cpu"): (2, 2, 16),
}
# ``--compile some`` (the default of --quick on a CPU, where torch.compile builds C++: from 20 s for the
# MLP to minutes for the hierarchical VAE) compiles these models only.
COMPILE_SOME = {"mlp"}


def _autocast(device: torch.device, dtype: torch.dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def _batches(n: int, batch: int, world: int, rank: int, count: int, seed: int):
    """``count`` index tensors: each a rank's slice of a global batch of ``world * batch`` from a seeded shuffle."""
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=gen)
    global_batch = batch * world
    position = 0
    for _ in range(count):
        if position + global_batch > n:
            order, position = torch.randperm(n, generator=gen), 0
        chosen = order[position:position + global_batch]
        position += global_batch
        yield chosen[rank * batch:(rank + 1) * batch] if chosen.numel() == global_batch else chosen[rank::world]


class Runner:
    """One provider's copy of a training benchmark: its model, optimizer, compiled step and RNG state."""

    def __init__(self, spec: ModelSpec, provider: str, *, device: torch.device, dtype: torch.dtype, seed: int,
                 lr: float) -> None:
        _, _, world = distributed_env()
        self.spec, self.provider, self.device = spec, provider, device
        torch.manual_seed(seed)  # the same initial weights for every provider
        self.module = use_baselines(spec.build().to(device), uses_baseline(provider))
        self.n_params = sum(p.numel() for p in self.module.parameters())
        model = self.module
        if world > 1:
            from torch.nn.parallel import DistributedDataParallel

            model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        self.optimizer = torch.optim.Adam(model.parameters(), lr=lr)

        def loss_of(x: torch.Tensor) -> torch.Tensor:
            with _autocast(device, dtype):
                return model(x)

        self.loss_of = torch.compile(loss_of) if is_compiled(provider) else loss_of
        # The noise's (seed, offset) pairs come from torch's CPU generator: each provider keeps its own
        # state of it, so every provider draws the same sequence even though their steps interleave.
        self.rng_state = torch.manual_seed(seed).get_state()
        self.times: list[float] = []
        self.last_loss: torch.Tensor | None = None
        self.peak_mb = self.saved_mb = math.nan
        self.error = ""

    @contextlib.contextmanager
    def active(self):
        model_context = self.spec.context(self.provider) if self.spec.context else contextlib.nullcontext()
        with provider_context(self.provider), model_context:
            torch.set_rng_state(self.rng_state)
            try:
                yield
            finally:
                self.rng_state = torch.get_rng_state()

    def step(self, x: torch.Tensor) -> torch.Tensor:
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss_of(x)
        loss.backward()
        self.optimizer.step()
        return loss.detach()

    def timed_step(self, x: torch.Tensor, *, measure_memory: bool = False) -> None:
        """One step, timed; with ``measure_memory`` (GPU) the allocator's peak during it above what was
        allocated just before (weights, Adam's state, the data, other providers' models) updates ``peak_mb``."""
        with self.active():
            if measure_memory:
                self.optimizer.zero_grad(set_to_none=True)  # last step's grads are not part of the baseline
                synchronize(self.device)
                torch.cuda.reset_peak_memory_stats()
                before = torch.cuda.memory_allocated()
            clock = time.perf_counter if self.device.type == "cuda" else cpu_clock()
            synchronize(self.device)
            start = clock()
            self.last_loss = self.step(x)
            synchronize(self.device)
            self.times.append(clock() - start)
            if measure_memory:
                peak = (torch.cuda.max_memory_allocated() - before) / 2**20
                self.peak_mb = peak if math.isnan(self.peak_mb) else max(self.peak_mb, peak)

    def result(self, spec: ModelSpec, warmup: int) -> dict:
        _, _, world = distributed_env()
        timed = np.asarray(self.times[warmup:] or [math.nan]) * 1e3
        p50, p20, p80 = (float(np.quantile(timed, q)) for q in (0.5, 0.2, 0.8))
        loss = self.last_loss
        if loss is not None and world > 1:
            dist.all_reduce(loss)
            loss = loss / world
        if spec.unfused_backend and uses_baseline(self.provider):
            backend = spec.unfused_backend
        else:
            with provider_context(self.provider):
                backend = backend_label(self.provider, next(self.module.parameters()))
        return {
            "backend": backend, "step_ms_p50": p50, "step_ms_p20": p20, "step_ms_p80": p80,
            "first_step_ms": self.times[0] * 1e3 if self.times else math.nan,
            "samples_per_s": spec.batch * world / (p50 * 1e-3) if p50 > 0 else math.nan, "peak_mem_mb": self.peak_mb,
            "saved_mb": self.saved_mb,
            "final_loss": float(loss) if loss is not None else math.nan, "params": self.n_params,
        }


def train_interleaved(
    spec: ModelSpec, providers: Sequence[str], images: torch.Tensor, *, device: torch.device, dtype: torch.dtype,
    warmup: int, steps: int, seed: int = 0, lr: float = 1e-3, dump_params: Path | None = None,
    on_step: Callable[[], None] = lambda: None,
) -> dict[str, dict]:
    """Train ``spec`` under every provider, their steps interleaved: step k of each provider in turn.

    Interleaving puts every provider under the same machine conditions (a shared CPU's load, GPU clocks
    and temperature drift alike), where running providers one after the other would bias the later
    ones. Every provider sees the same batches, initial weights and noise draws. Returns each
    provider's measured fields (or ``note``).
    """
    rank, _, world = distributed_env()
    runners: list[Runner] = []
    results: dict[str, dict] = {}
    torch._dynamo.reset()
    for provider in providers:
        try:
            runners.append(Runner(spec, provider, device=device, dtype=dtype, seed=seed, lr=lr))
        except Exception as exc:  # noqa: BLE001
            if world > 1:
                raise
            results[provider] = {"note": _note(exc)}
    batches = _batches(images.shape[0], spec.batch, world, rank, warmup + steps + 1, seed + 1)
    for index in range(warmup + steps):
        x = images[next(batches).to(images.device)]
        for runner in runners:
            if runner.error:
                continue
            try:
                runner.timed_step(x, measure_memory=device.type == "cuda" and index >= warmup)
            except Exception as exc:  # noqa: BLE001 - one provider failing must not lose the others
                if world > 1:
                    raise
                runner.error = _note(exc)
        on_step()
    x = images[next(batches).to(images.device)]
    for runner in runners:
        if not runner.error:
            with runner.active():
                if device.type == "cpu":  # one more step each, untimed, profiled for its allocations
                    runner.peak_mb = peak_memory_mb(lambda: runner.step(x), device)  # noqa: B023 (called at once)
                # one forward, what it keeps for backward; the lambda is called at once
                runner.saved_mb = saved_mb(lambda: runner.loss_of(x))  # noqa: B023
        results[runner.provider] = {"note": runner.error} if runner.error else runner.result(spec, warmup)
        if dump_params is not None and not runner.error:
            dump_params.mkdir(parents=True, exist_ok=True)
            state = {name: value.detach().cpu().clone() for name, value in runner.module.state_dict().items()}
            torch.save(state, dump_params / f"{spec.model}_{spec.variant}_{runner.provider}_{dtype_name(dtype)}_rank{rank}.pt")
    return results


def _note(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".splitlines()[0][:200]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def run_train(
    device: torch.device,
    dtypes: Sequence[torch.dtype],
    specs: Sequence[ModelSpec],
    *,
    preset: str = "full",
    providers: Sequence[str] = TRAIN_PROVIDERS,
    data: str = "synthetic",
    steps: int | None = None,
    warmup: int | None = None,
    compile_scope: str = "all",
    seed: int = 0,
    lr: float = 1e-3,
    dump_params: Path | None = None,
    on_row: Callable[[dict], None] = lambda row: None,
    progress: Callable[..., object] | None = None,
) -> list[dict]:
    """Train every (dtype, model, provider); rank 0 passes each row to ``on_row`` and returns them all.

    ``compile_scope``: ``all``; ``some`` compiles only :data:`COMPILE_SOME`; ``none`` skips the
    compiled providers. Warm-up needs two steps or more for the compiled providers: the first compiles,
    the second recompiles once with the noise seed as a dynamic integer.
    """
    configure_dynamo()
    rank, _, world = distributed_env()
    default_warmup, default_steps, n_images = SCHEDULE[(preset, device.type)]
    warmup = default_warmup if warmup is None else warmup
    steps = default_steps if steps is None else steps
    env = environment(device)
    groups = []
    for dtype in dtypes:
        for spec in specs:
            chosen = [p for p in providers if not is_compiled(p) or compile_scope == "all"
                      or (compile_scope == "some" and spec.model in COMPILE_SOME)]
            if chosen:
                groups.append((dtype, spec, chosen))
    total = sum(warmup + steps for _ in groups)
    bar = progress(total=total, desc="train", unit="step") if progress and rank == 0 else None
    datasets: dict[tuple[int, int], torch.Tensor] = {}
    rows = []
    for dtype, spec, chosen in groups:
        if bar is not None:
            bar.set_postfix_str(f"{spec.name} {dtype_name(dtype)}: {', '.join(chosen)}", refresh=True)
        key = (spec.channels, spec.size)
        if key not in datasets:
            n = max(n_images, 2 * spec.batch * world)
            datasets[key] = load_dataset(data, n=n, channels=spec.channels, size=spec.size, seed=seed).to(device)
        results = train_interleaved(spec, chosen, datasets[key], device=device, dtype=dtype, warmup=warmup,
                                    steps=steps, seed=seed, lr=lr, dump_params=dump_params,
                                    on_step=(lambda: bar.update(1)) if bar is not None else (lambda: None))
        for provider in chosen:
            row = {"model": spec.model, "variant": spec.variant, "provider": provider, "dtype": dtype_name(dtype),
                   "batch": spec.batch, "world_size": world, "steps": steps, "warmup_steps": warmup,
                   "data": describe(data), "threads": threads(device), "preset": preset, "note": "",
                   "clock": "wall" if device.type == "cuda" else clock_name(device)}
            row.update(results.get(provider, {"note": "not run"}))
            row.update(env)
            row = {column: row.get(column, math.nan) for column in COLUMNS}
            if rank == 0:
                rows.append(row)
                on_row(row)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if bar is not None:
        bar.close()
    return rows
