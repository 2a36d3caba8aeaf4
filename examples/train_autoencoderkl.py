"""Train a small diffusers AutoencoderKL on synthetic images: diffusers' posterior against fusedvae's.

The model is built from a config (no download) and trained on the benchmark suite's synthetic
images (``bench.data.synthetic_images``) with latent diffusion's autoencoder loss, Gaussian part:
``sum(rec / exp(logvar) + logvar) / B + kl_weight * KL`` with ``rec`` the squared error and
``logvar`` one learned scalar, in the optimizer. Two runs from the same weights
on the same batches:

- eager:   the unmodified AutoencoderKL and the loss written as latent diffusion writes it;
- patched: the same AutoencoderKL inside ``fusedvae.compat.diffusers.patch()`` (its posterior
  samples and KL on fusedvae's ops) and the NLL as ``2 * fv.gaussian_nll(x, x_rec, logvar / 2,
  full=False)``, which is the same function exactly.

    python examples/train_autoencoderkl.py                  # 200 steps: about a minute on 2 idle CPU cores
    python examples/train_autoencoderkl.py --steps 500 --batch-size 32 --device cuda

On a CPU both runs use fusedvae's PyTorch reference (the kernels need CUDA, or Triton's slow
interpreter), so the timing comparison means something only on a GPU.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

# The training step and the synthetic images come from the benchmark suite, which lives in the
# repository (it is not installed with fusedvae): run this from a checkout.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import autoencoderkl as akl  # noqa: E402
from bench.data import synthetic_images  # noqa: E402
from fusedvae.compat.diffusers import patch  # noqa: E402


def run(step: akl.AutoencoderKLTrainStep, data: torch.Tensor, batches: list[torch.Tensor], device: torch.device,
        log_every: int, name: str) -> tuple[list[float], akl.StepLosses]:
    times, losses = [], None
    torch.manual_seed(1)  # the posterior noise (diffusers' randn or fusedvae's Philox key)
    for i, index in enumerate(batches):
        x = data[index].to(device, non_blocking=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        losses = step(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        if i % log_every == 0 or i == len(batches) - 1:
            print(f"  {name:8s} step {i:4d}  loss {losses.loss.item():10.2f}  nll {losses.nll.item():10.2f}  "
                  f"kl {losses.kl.item():8.2f}  logvar {losses.logvar.item():7.3f}  {1e3 * times[-1]:7.1f} ms")
    return times, losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=None, help="default: 500 on CUDA, 200 on CPU")
    parser.add_argument("--batch-size", type=int, default=None, help="default: 32 on CUDA, 8 on CPU")
    parser.add_argument("--kl-weight", type=float, default=1e-4)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-every", type=int, default=25)
    args = parser.parse_args()
    device = torch.device(args.device)
    on_cuda = device.type == "cuda"
    args.steps = args.steps or (500 if on_cuda else 200)
    args.batch_size = args.batch_size or (32 if on_cuda else 8)

    data_generator = torch.Generator().manual_seed(args.seed)
    size = akl.TINY_CONFIG["sample_size"]
    data = synthetic_images(1024, 3, size, seed=args.seed) * 2 - 1  # diffusers' images are in [-1, 1]
    batches = [torch.randint(0, len(data), (args.batch_size,), generator=data_generator) for _ in range(args.steps)]
    torch.manual_seed(args.seed)
    model = akl.tiny_autoencoderkl().to(device)
    print(f"AutoencoderKL {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters, "
          f"images {tuple(data.shape[1:])}, batch {args.batch_size}, {args.steps} steps on {device}")
    eager, fused = akl.AutoencoderKLTrainStep.pair(model, kl_weight=args.kl_weight, lr=args.lr)

    # The two NLLs are one function: check on a batch before training.
    x = data[:args.batch_size].to(device)
    rec = x + 0.1 * torch.randn_like(x)
    logvar = torch.tensor(-1.3, device=device)
    a, b = akl.ldm_nll_eager(x, rec, logvar), akl.ldm_nll_fused(x, rec, logvar)
    print(f"NLL eager {a.item():.6f} fused {b.item():.6f} (relative difference {abs(a - b).item() / abs(a).item():.1e})")

    print("eager (diffusers' DiagonalGaussianDistribution, torch loss):")
    eager_times, eager_last = run(eager, data, batches, device, args.log_every, "eager")
    print("patched (fusedvae.compat.diffusers.patch(), fused loss):")
    with patch():
        fused_times, fused_last = run(fused, data, batches, device, args.log_every, "patched")

    warm = max(1, min(10, args.steps // 5))  # skip warm-up steps in the timing
    print("summary (median step time after warm-up; final losses):")
    for name, times, last in (("eager", eager_times, eager_last), ("patched", fused_times, fused_last)):
        timed = times[warm:] or times
        print(f"  {name:8s} {1e3 * statistics.median(timed):7.1f} ms/step   loss {last.loss.item():10.2f}  "
              f"nll {last.nll.item():10.2f}  kl {last.kl.item():8.2f}  logvar {last.logvar.item():7.3f}")


if __name__ == "__main__":
    main()
