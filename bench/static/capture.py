"""Compile the kernels a CUDA launch would build, on a machine without a GPU.

The launchers are run for real (their stride logic, tiling and allocation), on CPU tensors made to
look like CUDA tensors, and every Triton JIT launch is intercepted: instead of launching, the JIT's
own binder specializes the arguments and compiles for a stub CUDA target. Nothing here names a
kernel, so a kernel a launcher starts using tomorrow is compiled too.

How a CUDA launch is imitated, and why it builds the same kernel:

- ``device``: the launchers choose their tiling by ``tensor.device.type == "cuda"`` and size their
  grids with ``torch.cuda.get_device_properties(i).multi_processor_count``. Tensors are a plain
  Python subclass whose ``device`` says ``cuda:0``; a ``TorchFunctionMode`` turns every
  ``device="cuda"`` a launcher passes to a factory (``torch.empty``...) into the CPU and wraps every
  result in that subclass; the device-property query answers the SM count of the target GPU.
- custom ops: a ``TorchFunctionMode`` is switched off while it handles a call, so the launchers
  behind a ``torch.library`` custom op would run without it; the mode therefore dispatches
  non-aten ops itself, with the mode pushed again (``_dispatch_call_boxed`` skips the torch-function
  layer that would otherwise call the mode for the same op forever).
- alignment and ``== 1``: the binder sees the real arguments. Integers (sizes, strides) are those
  of the CUDA launch. Pointers: torch's CPU allocator aligns every storage to 64 bytes and CUDA's
  caching allocator to 512, so ``data_ptr() % 16`` depends only on the storage offset, exactly as on
  the GPU; :func:`_check_alignment` asserts that premise for every tensor argument.
- target: a stub driver answers ``GPUTarget("cuda", arch, 32)``; ``JITFunction.run`` is called
  with ``warmup=True`` (specialize and compile, never launch). ``num_warps`` and every other option
  come from the launch itself.
"""

from __future__ import annotations

import contextlib
import os
import time
import types
from dataclasses import dataclass, field

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    raise RuntimeError("bench.static needs Triton's compiler: run it with TRITON_INTERPRET=0 (python -m bench static "
                       "does; tests run it in a subprocess)")

import torch
from torch.overrides import TorchFunctionMode
from triton.backends.compiler import GPUTarget
from triton.runtime.driver import driver
from triton.runtime.jit import JITFunction

#: Streaming multiprocessors of the GPU each architecture stands for (the launchers size grids by it).
SM_COUNT = {80: 108, 86: 84, 89: 128, 90: 132, 100: 148}

_CUDA = torch.device("cuda", 0)
_CPU = torch.device("cpu")


class CudaLooking(torch.Tensor):
    """A CPU tensor that reports ``cuda:0`` as its device (its data are never computed on)."""

    @property
    def device(self):
        return _CUDA

    @property
    def is_cuda(self):
        return True


def _to_cpu(value):
    if isinstance(value, torch.device) and value.type == "cuda":
        return _CPU
    if isinstance(value, str) and value.startswith("cuda"):
        return _CPU
    if isinstance(value, (list, tuple)) and not isinstance(value, torch.Size):
        return type(value)(_to_cpu(v) for v in value)
    return value


def _looking(value):
    if type(value) is torch.Tensor:
        return value.as_subclass(CudaLooking)
    if isinstance(value, (list, tuple)) and not isinstance(value, torch.Size):
        return type(value)(_looking(v) for v in value)
    return value


class _LooksCuda(TorchFunctionMode):
    def __torch_function__(self, func, types_, args=(), kwargs=None):
        args = _to_cpu(tuple(args))
        kwargs = {k: _to_cpu(v) for k, v in (kwargs or {}).items()}
        if isinstance(func, torch._ops.OpOverloadPacket):
            func = func.default
        if isinstance(func, torch._ops.OpOverload) and func.namespace not in ("aten", "prim", "prims"):
            with self:  # a custom op: its Python launcher must run under this mode too
                return _looking(torch._C._dispatch_call_boxed(func._handle, *args, **kwargs))
        return _looking(func(*args, **kwargs))


def cuda_like(t: torch.Tensor) -> CudaLooking:
    """``t`` (a CPU tensor, same storage and autograd history) seen as a CUDA tensor."""
    return t.as_subclass(CudaLooking)


class _StubDriver:
    """Answers what the JIT asks the active driver before compiling; never launches anything."""

    def __init__(self, arch: int) -> None:
        self.arch = arch
        self.target = GPUTarget("cuda", arch, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return self.arch  # also the key of the JIT's per-device caches: one per architecture

    def get_current_stream(self, device=None):
        return 0

    def is_active(self):
        return True

    def get_active_torch_device(self):
        return _CUDA

    def get_device_interface(self):
        return torch.cuda


@dataclass
class Launch:
    """One intercepted launch: which kernel, its specialization key, grid, and (when compiled) the kernel."""

    kernel: str  # module:qualname of the JIT function
    key: str  # specialization + options: equal keys are the same compiled kernel
    programs: int
    num_warps: int
    tag: str = ""
    compiled: object = field(default=None, repr=False)
    seconds: float = 0.0  # compiling it (0 when Triton's cache had it)


def _check_alignment(args) -> None:
    for arg in args:
        if isinstance(arg, torch.Tensor) and arg.untyped_storage().data_ptr() % 64:
            raise AssertionError("a CPU storage not 64-byte aligned: its 16-byte alignment would differ from CUDA's")


def _programs(grid, bound_args) -> int:
    if callable(grid):
        grid = grid(bound_args)
    total = 1
    for g in grid:
        total *= int(g)
    return total


class Recorder:
    """Collects the launches made inside :func:`intercept`; ``tag`` labels the ones made next."""

    def __init__(self) -> None:
        self.launches: list[Launch] = []
        self.tag = ""


@contextlib.contextmanager
def intercept(arch: int, *, compile: bool):
    """Within: tensors from :func:`cuda_like` look like CUDA tensors and every Triton launch is recorded.

    ``compile=False`` only specializes (fast: the binder, no compiler); ``compile=True`` also builds
    the kernel for ``sm_<arch>`` (``Launch.compiled`` holds Triton's ``CompiledKernel``). Yields a
    :class:`Recorder`. Example::

        with intercept(90, compile=True) as rec:
            mu = cuda_like(torch.empty(64, 512, requires_grad=True))
            ...  # call a backend entry point
        print(rec.launches[0].compiled.asm["ptx"][:80])
    """
    recorder = Recorder()
    original_run = JITFunction.run
    saved = {name: getattr(torch.cuda, name) for name in ("get_device_properties", "current_device", "device_count")}
    sms = SM_COUNT.get(arch, SM_COUNT[90])

    def run(self, *args, grid, warmup, **kwargs):
        _check_alignment(args)
        device = driver.active.get_current_device()
        binder = self.device_caches[device][4]
        bound_args, specialization, options = binder(*args, **kwargs)
        key = f"{self.module}:{self.fn.__qualname__}|{specialization!r}|{sorted(kwargs.items())!r}"
        started = time.perf_counter()
        kernel = original_run(self, *args, grid=grid, warmup=True, **kwargs) if compile else None
        if kernel is not None and hasattr(kernel, "result"):
            kernel = kernel.result()
        recorder.launches.append(Launch(f"{self.module}:{self.fn.__qualname__}", key, _programs(grid, bound_args),
                                        int(kwargs.get("num_warps", 4)), recorder.tag, kernel,
                                        time.perf_counter() - started))
        return kernel

    props = types.SimpleNamespace(multi_processor_count=sms, name=f"stub sm_{arch}", major=arch // 10,
                                  minor=arch % 10, total_memory=80 << 30)
    saved_driver = getattr(driver, "_active", None)
    driver.set_active(_StubDriver(arch))
    JITFunction.run = run
    torch.cuda.get_device_properties = lambda device=None: props
    torch.cuda.current_device = lambda: 0
    torch.cuda.device_count = lambda: 1
    try:
        with _LooksCuda():
            yield recorder
    finally:
        JITFunction.run = original_run
        for name, value in saved.items():
            setattr(torch.cuda, name, value)
        driver._active = saved_driver
