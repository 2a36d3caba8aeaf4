"""Training data for the benchmark loops: synthetic images (default), scikit-learn's digits, or your files.

``--data`` takes:

- ``synthetic`` (default): procedural images made here from a seed, no download. Each is a smooth
  colour gradient with a few soft Gaussian blobs and a soft-edged rectangle, plus a little noise:
  structured enough for a VAE to learn, at any size and channel count.
- ``digits``: the 1797 8x8 handwritten digits bundled with scikit-learn (real data, no download),
  resized to what the model needs.
- a path: an MNIST-format IDX file (``train-images-idx3-ubyte``, optionally ``.gz``), a folder
  holding one, or a folder of images (``.png``, ``.jpg``, ``.jpeg``, ``.bmp``, ``.gif``, ``.webp``;
  searched recursively, read with Pillow).

Whatever the source, :func:`load_dataset` returns float32 ``(N, C, H, W)`` in ``[0, 1]`` at the
model's size (bilinear, antialiased) and channel count (grey repeated to RGB, RGB averaged to grey).
"""

from __future__ import annotations

import gzip
import math
import struct
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def synthetic_images(n: int, channels: int, size: int, *, seed: int = 0) -> torch.Tensor:
    """``n`` procedural images ``(n, channels, size, size)`` in ``[0, 1]``, the same for the same seed."""
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.rand(shape, generator=gen)  # noqa: E731
    axis = torch.linspace(0.0, 1.0, size)
    yy, xx = torch.meshgrid(axis, axis, indexing="ij")  # (S, S)
    # background: a colour gradient in a random direction
    angle = rand(n) * 2 * math.pi
    ramp = (xx * torch.cos(angle)[:, None, None] + yy * torch.sin(angle)[:, None, None])[:, None]  # (n, 1, S, S)
    low, high = rand(n, channels, 1, 1) * 0.5, rand(n, channels, 1, 1) * 0.5 + 0.25
    images = low + (high - low) * (ramp - ramp.amin((2, 3), keepdim=True)) / (
        ramp.amax((2, 3), keepdim=True) - ramp.amin((2, 3), keepdim=True) + 1e-6)
    # soft blobs
    for _ in range(4):
        cy, cx = rand(n, 1, 1, 1), rand(n, 1, 1, 1)
        width = 0.05 + 0.15 * rand(n, 1, 1, 1)
        colour = rand(n, channels, 1, 1) * 2 - 1
        blob = torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * width**2))
        images = images + 0.6 * colour * blob
    # a soft-edged rectangle
    y0, x0 = rand(n, 1, 1, 1) * 0.6, rand(n, 1, 1, 1) * 0.6
    y1, x1 = y0 + 0.15 + 0.25 * rand(n, 1, 1, 1), x0 + 0.15 + 0.25 * rand(n, 1, 1, 1)
    edge = 40.0
    rect = (torch.sigmoid(edge * (yy - y0)) * torch.sigmoid(edge * (y1 - yy))
            * torch.sigmoid(edge * (xx - x0)) * torch.sigmoid(edge * (x1 - xx)))
    images = images * (1 - rect) + rand(n, channels, 1, 1) * rect
    images = images + 0.02 * torch.randn(images.shape, generator=gen)
    return images.clamp_(0.0, 1.0).contiguous()


def digits_images() -> torch.Tensor:
    """scikit-learn's bundled handwritten digits: ``(1797, 1, 8, 8)`` in ``[0, 1]``."""
    from sklearn.datasets import load_digits

    return torch.tensor(load_digits().images, dtype=torch.float32)[:, None] / 16.0


def _open(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def _find_idx(path: Path) -> Path:
    if path.is_file():
        return path
    candidates = sorted(p for p in path.rglob("*") if p.is_file() and "idx3" in p.name)
    preferred = [p for p in candidates if p.name.startswith("train")]
    if not (preferred or candidates):
        raise FileNotFoundError(f"no IDX image file (name containing 'idx3') under {path}")
    return (preferred or candidates)[0]


def load_idx(path: str | Path) -> torch.Tensor:
    """An IDX file (MNIST's format, ``.gz`` or not; or a folder holding ``train-images-idx3-ubyte``) as a tensor.

    Returns the stored array as is: MNIST images come back ``(N, 28, 28)`` uint8.
    """
    path = _find_idx(Path(path))
    with _open(path) as handle:
        header = handle.read(4)
        if len(header) != 4 or header[0] != 0 or header[1] != 0 or header[2] not in _IDX_DTYPES:
            raise ValueError(f"{path} is not an IDX file (bad magic number {header.hex()})")
        ndim = header[3]
        shape = struct.unpack(f">{ndim}I", handle.read(4 * ndim))
        array = np.frombuffer(handle.read(), dtype=_IDX_DTYPES[header[2]])
    if array.size != math.prod(shape):
        raise ValueError(f"{path}: header says {shape} ({math.prod(shape)} values), file holds {array.size}")
    return torch.from_numpy(array.reshape(shape).astype(array.dtype.newbyteorder("="), copy=True))


def load_image_folder(path: str | Path, size: int, *, limit: int | None = None) -> torch.Tensor:
    """Every image under ``path`` (sorted, recursive), RGB, resized to ``size`` x ``size``: ``(N, 3, size, size)``."""
    from PIL import Image

    files = sorted(p for p in Path(path).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)[:limit]
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {path}")
    images = []
    for file in files:
        with Image.open(file) as image:
            image = image.convert("RGB").resize((size, size), Image.BILINEAR)
            images.append(torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()))
    return torch.stack(images).permute(0, 3, 1, 2).float() / 255.0


def _is_idx(path: Path) -> bool:
    if path.is_file():
        return path.suffix.lower() not in IMAGE_SUFFIXES
    return any("idx3" in p.name for p in path.rglob("*") if p.is_file())


def _fit(images: torch.Tensor, channels: int, size: int) -> torch.Tensor:
    """``(N, C', H', W')`` in [0, 1] -> ``(N, channels, size, size)``."""
    if images.shape[1] != channels:
        images = images.mean(1, keepdim=True)
        images = images.expand(-1, channels, -1, -1)
    if images.shape[-2:] != (size, size):
        antialias = images.shape[-1] > size
        images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=antialias)
    return images.clamp(0.0, 1.0).contiguous()


def describe(spec: str) -> str:
    """A short name of the data source for the CSV's ``data`` column."""
    return spec if spec in ("synthetic", "digits") else Path(spec).name


def load_dataset(spec: str, *, n: int, channels: int, size: int, seed: int = 0) -> torch.Tensor:
    """Up to ``n`` images from ``spec`` (see the module docstring), float32 ``(N, channels, size, size)`` in [0, 1]."""
    if spec == "synthetic":
        return synthetic_images(n, channels, size, seed=seed)
    if spec == "digits":
        images = digits_images()
    else:
        path = Path(spec)
        if not path.exists():
            raise SystemExit(f"--data {spec}: no such file or folder (or use 'synthetic' or 'digits')")
        if _is_idx(path):
            raw = load_idx(path)
            if raw.dim() == 2:  # (N, D) flattened square images
                side = int(round(math.sqrt(raw.shape[1])))
                raw = raw.reshape(-1, side, side)
            images = raw.float()[:, None] if raw.dim() == 3 else raw.float()
            images = images / 255.0 if raw.dtype == torch.uint8 else images
        else:
            images = load_image_folder(path, size, limit=n)
    order = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(seed))[:n]
    return _fit(images[order], channels, size)
