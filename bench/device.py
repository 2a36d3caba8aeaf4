"""Where a benchmark runs: the device, its slug for the results folder, versions, and copy bandwidth."""

from __future__ import annotations

import datetime
import platform
import re
import subprocess

import torch


def resolve_device(name: str) -> str:
    """``"auto"`` is CUDA when torch sees a GPU, else CPU."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda, but torch sees no CUDA device")
    return name


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_slug(device: str) -> str:
    """A folder name for the device: ``nvidia-h100-80gb-hbm3``, ``cpu-intel-xeon-...``."""
    name = device_name(device).lower()
    slug = re.sub(r"[^a-z0-9]+", "-", name).strip("-")
    return slug if device == "cuda" else f"cpu-{slug}"[:60].rstrip("-")


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def environment(device: str) -> dict[str, str]:
    """The columns every result row carries: device, versions, commit, timestamp."""
    import fusedvae

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    return {
        "device": device_name(device),
        "torch": torch.__version__,
        "triton": triton_version,
        "fusedvae": fusedvae.__version__,
        "commit": git_commit(),
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def copy_bandwidth_gbps(device: str, numel: int | None = None) -> float:
    """Measured copy bandwidth, bytes read + written per second (GB/s): the roofline the ops are held to."""
    from .timing import time_ms

    numel = numel or (1 << 28 if device == "cuda" else 1 << 24)
    source = torch.empty(numel, dtype=torch.float32, device=device).normal_()
    target = torch.empty_like(source)
    median, _, _ = time_ms(lambda: target.copy_(source), device)
    return 2 * source.numel() * source.element_size() / (median * 1e-3) / 1e9
