"""Pictures for the tracking UI: a chain's conditional samples against the target."""

from __future__ import annotations

from pathlib import Path

import torch


def samples_vs_target(y: torch.Tensor, target: torch.Tensor, path: Path, title: str) -> Path:
    """Histogram (1-D Y) or scatter of the first two coordinates: y (n, d_y) against target (m, d_y), as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4, 3), dpi=80)
    y, target = y.double().cpu().numpy(), target.double().cpu().numpy()
    if y.shape[1] == 1:
        low, high = min(y.min(), target.min()), max(y.max(), target.max())
        bins = 50 if high > low else 1
        ax.hist(target[:, 0], bins=bins, range=(low, high), density=True, alpha=0.5, label="target G")
        ax.hist(y[:, 0], bins=bins, range=(low, high), density=True, alpha=0.5, label="P(Y | x*)")
        ax.set_xlabel("y")
    else:
        ax.scatter(target[:, 0], target[:, 1], s=3, alpha=0.4, label="target G")
        ax.scatter(y[:, 0], y[:, 1], s=3, alpha=0.4, label="P(Y | x*)")
        ax.set_xlabel("y[0]")
        ax.set_ylabel("y[1]")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
