"""Train the prior on historical launches and write the target outcomes:

    python -m own_models.train [--out models] [--steps 3000]

- models/prior/: the PointDenoiser (config.json + safetensors) and its DDPMScheduler (v-prediction), in diffusers'
  layout, so a campaign loads it with prior: {diffusers: models/prior, model_class: own_models.prior:PointDenoiser};
- models/target.npy: 1000 outcomes (range, height) of the launch we want to match: 34°, 12.8 m/s.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from diffusers import DDPMScheduler
from tqdm import tqdm

from own_models.prior import PointDenoiser
from own_models.simulator import ANGLE_CENTER, ANGLE_SCALE, SPEED_CENTER, SPEED_SCALE, ProjectileSampler, to_design

TARGET_LAUNCH = (34.0, 12.8)  # degrees, m/s: the hidden x* whose outcomes are the target


def historical_launches(n: int, gen: torch.Generator) -> torch.Tensor:
    """Designs in standard units: angles near 32° or 58° (two crews), speeds around 12 m/s."""
    crew = torch.randint(2, (n,), generator=gen)
    angle = torch.where(crew == 0, 32.0, 58.0) + 4.0 * torch.randn(n, generator=gen)
    speed = SPEED_CENTER + 1.2 * torch.randn(n, generator=gen)
    return torch.stack([(angle - ANGLE_CENTER) / ANGLE_SCALE, (speed - SPEED_CENTER) / SPEED_SCALE], dim=1)


def train(out: Path, steps: int = 3000, seed: int = 0) -> None:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", prediction_type="v_prediction",
                              clip_sample=False)  # fmt: skip
    alphas = scheduler.alphas_cumprod
    model = PointDenoiser()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    lr = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    for _ in tqdm(range(steps), desc="train prior", mininterval=1.0):
        x0 = historical_launches(512, gen)
        t = torch.randint(1000, (512,), generator=gen)
        eps = torch.randn(x0.shape, generator=gen)
        a, s = alphas[t].sqrt()[:, None], (1 - alphas[t]).sqrt()[:, None]
        loss = (model(a * x0 + s * eps, t) - (a * eps - s * x0)).square().mean()  # v-prediction
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        lr.step()
    model.save_pretrained(out / "prior")
    scheduler.save_pretrained(out / "prior")
    x_star = to_design(*TARGET_LAUNCH)[None].repeat(1000, 1)
    eta = torch.randn(1000, 1, 2, generator=gen)
    np.save(out / "target.npy", ProjectileSampler().sample(x_star, eta)[:, 0].numpy())
    print(f"prior: {out / 'prior'} (final loss {loss.item():.4f}); target: {out / 'target.npy'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="models", type=Path)
    parser.add_argument("--steps", default=3000, type=int)
    parser.add_argument("--seed", default=0, type=int)
    args = parser.parse_args()
    train(args.out, args.steps, args.seed)


if __name__ == "__main__":
    main()
