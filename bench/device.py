"""Where the suite runs: the device, its name and slug (the results folder), versions, commit, copy bandwidth.

Every CSV row ends with :func:`environment` so a results file read on its own says what produced it.
Functions take a device as ``"cpu"``/``"cuda"`` or a :class:`torch.device`.
"""

from __future__ import annotations

import datetime
import functools
import os
import platform
import re
import subprocess
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent


def _device(device: str | torch.device) -> torch.device:
    return device if isinstance(device, torch.device) else torch.device(device)


def resolve_device(name: str) -> torch.device:
    """``"auto"`` is CUDA when torch sees a GPU, else CPU; ``"cuda"`` without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda, but torch sees no CUDA device")
    if name not in ("cpu", "cuda"):
        raise SystemExit(f"--device must be auto, cpu or cuda, got {name!r}")
    return torch.device(name)


@functools.lru_cache(maxsize=None)
def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux), e.g. ``AMD EPYC 7B13``."""
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    if platform.system() == "Darwin":
        try:
            brand = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True,
                                   timeout=5).stdout.strip()
            if brand:
                return brand
        except (OSError, subprocess.SubprocessError):
            pass
    return platform.processor() or platform.machine() or "unknown"


def device_name(device: str | torch.device) -> str:
    """``NVIDIA H100 80GB HBM3`` on a GPU, ``cpu AMD EPYC`` on a CPU."""
    device = _device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu {cpu_model()}"


def slugify(text: str) -> str:
    """``Intel(R) Xeon(R) Gold 6248`` -> ``intel-xeon-gold-6248``."""
    text = re.sub(r"\((r|tm|c)\)", "", text.lower())
    return re.sub(r"[^a-z0-9]+", "-", text).strip("-")


def device_slug(device: str | torch.device) -> str:
    """The results folder name: ``nvidia-h100-80gb-hbm3`` on a GPU, ``cpu-amd-epyc`` on a CPU."""
    device = _device(device)
    if device.type == "cuda":
        return slugify(torch.cuda.get_device_name(device))
    model = re.sub(r"\b(cpu|processor)\b", " ", cpu_model(), flags=re.IGNORECASE)
    return ("cpu-" + (slugify(model) or "unknown"))[:60].rstrip("-")


def default_out_dir(device: str | torch.device) -> Path:
    """``results/<device-slug>``, relative to the working directory."""
    return Path("results") / device_slug(device)


@functools.lru_cache(maxsize=None)
def git_commit() -> str:
    """The checkout's short commit, ``+dirty`` when tracked files outside ``results/`` have uncommitted changes
    (a rerun that rewrites committed results measures the same code)."""
    try:
        head = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "--short=12", "HEAD"],
                              capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return "unknown"
        status = subprocess.run(["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--untracked-files=no",
                                 "--", ".", ":(exclude)results"],
                                capture_output=True, text=True, timeout=10)
        return head.stdout.strip() + ("+dirty" if status.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def triton_version() -> str:
    try:
        import triton

        return triton.__version__
    except Exception:  # noqa: BLE001 - absent, or unusable on this platform
        return "none"


def environment(device: str | torch.device) -> dict[str, str]:
    """The columns every result row ends with: device, versions, commit, timestamp (UTC, ISO 8601)."""
    import fusedvae

    return {
        "device": device_name(device),
        "torch": torch.__version__,
        "triton": triton_version(),
        "fusedvae": fusedvae.__version__,
        "commit": git_commit(),
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def threads(device: str | torch.device) -> int | str:
    """CPU threads torch computes with (on CUDA empty: they do not set the speed)."""
    return torch.get_num_threads() if _device(device).type == "cpu" else ""


def synchronize(device: str | torch.device) -> None:
    if _device(device).type == "cuda":
        torch.cuda.synchronize()


def distributed_env() -> tuple[int, int, int]:
    """``(rank, local_rank, world_size)`` from torchrun's environment, ``(0, 0, 1)`` without it."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def copy_bandwidth_gbps(device: str | torch.device, nbytes: int | None = None, *, min_run_time: float = 0.3) -> float:
    """Measured device copy bandwidth, bytes read + written per second, in GB/s (1e9): the roofline.

    A large device-to-device ``copy_`` (1 GiB on a GPU, far above its L2; 64 MiB on a CPU), timed the
    way the ops are (:func:`bench.timing.time_ms`), counting ``2 * nbytes`` moved per copy.
    """
    from .timing import time_ms

    device = _device(device)
    if nbytes is None:
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info()
            nbytes = min(1 << 30, free // 8)
        else:
            nbytes = 1 << 26
    source = torch.empty(nbytes // 4, dtype=torch.float32, device=device).normal_()
    target = torch.empty_like(source)
    median, _, _ = time_ms(lambda: target.copy_(source), device, min_run_time=min_run_time)  # noqa: F821 (ruff: the del below)
    moved = 2 * source.numel() * source.element_size()
    del source, target
    return moved / (median * 1e-3) / 1e9
