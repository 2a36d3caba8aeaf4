"""A VAE written the torch.distributions way, trained twice: once as written, once with one import changed.

The model code below never names a loss function: it builds distributions, draws ``rsample()``
and calls ``kl_divergence`` and ``log_prob``, as much VAE code does. It receives the
distributions module as ``D``:

    import torch.distributions as D          # as written
    import fusedvae.distributions as D       # the one change: fusedvae's noise, exact KL, fused NLL

``fusedvae.distributions.Normal`` is a subclass of torch's ``Normal``, and every other name
(``D.Independent`` here) is torch's own, so the same code runs on both. Both runs start from the
same weights and see the same batches. On the Triton kernels (CUDA) and the reference backend
fusedvae draws its own Philox noise, so the two runs' losses agree closely but not bit for bit; on
a CPU the default backend draws torch's ``randn`` from the same seed, so they can agree exactly.

    python examples/train_distributions_vae.py                 # 300 steps each, a few seconds on a CPU
    python examples/train_distributions_vae.py --steps 2000 --device cuda
"""

from __future__ import annotations

import argparse
import statistics
import time
from types import ModuleType

import torch
import torch.distributions as torch_distributions
from torch import nn

import fusedvae.distributions as fusedvae_distributions


class VAE(nn.Module):
    """An MLP VAE with a diagonal Gaussian posterior, a standard normal prior and a learned σ_x per feature."""

    def __init__(self, data_dim: int = 32, latent_dim: int = 8, hidden: int = 64) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(data_dim, hidden), nn.SiLU(), nn.Linear(hidden, 2 * latent_dim))
        self.decoder = nn.Sequential(nn.Linear(latent_dim, hidden), nn.SiLU(), nn.Linear(hidden, data_dim))
        self.log_sigma = nn.Parameter(torch.zeros(data_dim))

    def loss(self, D: ModuleType, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The negative ELBO per datapoint, written against the distributions module ``D``."""
        loc, log_scale = self.encoder(x).chunk(2, dim=-1)
        q = D.Independent(D.Normal(loc, log_scale.exp()), 1)        # q(z | x), one event per row
        prior = D.Independent(D.Normal(torch.zeros_like(loc), torch.ones_like(loc)), 1)
        z = q.rsample()
        kl = D.kl_divergence(q, prior)                             # (B,)
        likelihood = D.Independent(D.Normal(self.decoder(z), self.log_sigma.exp()), 1)
        reconstruction = likelihood.log_prob(x)                    # (B,)
        return (kl - reconstruction).mean(), -reconstruction.mean(), kl.mean()


def synthetic_data(n: int, data_dim: int, seed: int) -> torch.Tensor:
    """Points near a curved 4-D manifold in ``data_dim`` dimensions: something a VAE can learn."""
    g = torch.Generator().manual_seed(seed)
    latent = torch.randn(n, 4, generator=g)
    mixing = torch.randn(4, data_dim, generator=g)
    return torch.tanh(latent @ mixing) + 0.05 * torch.randn(n, data_dim, generator=g)


def train(name: str, D: ModuleType, args: argparse.Namespace, data: torch.Tensor,
          batches: list[torch.Tensor], device: torch.device) -> list[float]:
    torch.manual_seed(args.seed)  # the same initial weights for both runs
    model = VAE(data.shape[1], args.latent_dim).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    losses, times = [], []
    print(f"{name}:")
    for step, index in enumerate(batches):
        x = data[index].to(device)
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss, nll, kl = model.loss(D, x)
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        losses.append(loss.item())
        if step % args.log_every == 0 or step == len(batches) - 1:
            print(f"  step {step:5d}  loss {loss.item():9.3f}  nll {nll.item():9.3f}  kl {kl.item():7.3f}  "
                  f"{1e3 * times[-1]:6.2f} ms")
    print(f"  median {1e3 * statistics.median(times):.2f} ms/step")
    return losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--latent-dim", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-every", type=int, default=50)
    args = parser.parse_args()
    device = torch.device(args.device)

    data = synthetic_data(4096, 32, seed=args.seed)
    g = torch.Generator().manual_seed(args.seed + 1)
    batches = [torch.randint(0, len(data), (args.batch_size,), generator=g) for _ in range(args.steps)]
    results = {}
    for name, D in (("torch.distributions", torch_distributions), ("fusedvae.distributions", fusedvae_distributions)):
        results[name] = train(name, D, args, data, batches, device)
    tail = max(1, min(10, args.steps // 3))
    print(f"summary (first step's loss; mean of the last {tail} steps' losses):")
    for name, losses in results.items():
        print(f"final {name} {statistics.fmean(losses[-tail:]):.4f} {losses[0]:.4f}")


if __name__ == "__main__":
    main()
