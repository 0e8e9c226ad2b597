"""The `projectile` problem name this package registers with cdm-dist (pyproject.toml, entry-point group
`cdm_dist.problems`): a recipe that returns the problem's parts, so each of cdm-dist's workers builds only its own."""

from __future__ import annotations

from pathlib import Path


def projectile(models: str = "models", gust: float = 0.05) -> dict:
    """Parts: the trained prior in `models`/prior, the simulator, and `models`/target.npy."""
    folder = Path(models).resolve()
    return {
        "prior": {"diffusers": str(folder / "prior"), "model_class": "own_models.prior:PointDenoiser"},
        "sampler": {"factory": "own_models.simulator:make_sampler", "args": {"gust": gust}},
        "target": {"file": str(folder / "target.npy")},
    }
