"""Pictures for the tracking UI, as PNG bytes (made where the data live, written by the driver): a chain's
conditional samples against the target, and x* itself when it is an image."""

from __future__ import annotations

import io

import torch


def samples_vs_target_png(y: torch.Tensor, target: torch.Tensor, title: str) -> bytes:
    """Histogram (1-D Y) or scatter of the first two coordinates: y (n, d_y) against target (m, d_y)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4, 3), dpi=80)
    y, target = y.double().cpu().numpy(), target.double().cpu().numpy()
    if y.shape[1] == 1:
        low, high = min(y.min(), target.min()), max(y.max(), target.max())
        bins = 50 if high > low else 1
        # stepfilled: one polygon per histogram, drawn as the bars would look, not a patch per bin (faster)
        shared = {"bins": bins, "range": (low, high), "density": True, "alpha": 0.5, "histtype": "stepfilled"}
        ax.hist(target[:, 0], label="target G", **shared)
        ax.hist(y[:, 0], label="P(Y | x*)", **shared)
        ax.set_xlabel("y")
    else:
        ax.scatter(target[:, 0], target[:, 1], s=3, alpha=0.4, label="target G")
        ax.scatter(y[:, 0], y[:, 1], s=3, alpha=0.4, label="P(Y | x*)")
        ax.set_xlabel("y[0]")
        ax.set_ylabel("y[1]")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


def image_png(image: torch.Tensor, scale: int = 1) -> bytes:
    """An image (C, H, W) with C = 1 or 3 and values in [-1, 1] (diffusers' convention) as PNG, each pixel repeated
    `scale` times (so 16x16 digits stay visible)."""
    from PIL import Image

    pixels = ((image.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # (C, H, W)
    if scale > 1:
        pixels = pixels.repeat_interleave(scale, 1).repeat_interleave(scale, 2)
    array = pixels[0].numpy() if pixels.shape[0] == 1 else pixels.permute(1, 2, 0).numpy()
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _fit(image: torch.Tensor, height: int) -> torch.Tensor:
    """An image (C, H, W) as 3 channels, resized (nearest) to `height` rows."""
    image = image.detach().float().cpu().clamp(-1, 1)
    image = image.expand(3, -1, -1) if image.shape[0] == 1 else image[:3]
    return torch.nn.functional.interpolate(image[None], size=(height, height * image.shape[2] // image.shape[1]),
                                           mode="nearest")[0]  # fmt: skip


def designs_sheet(rows: list[tuple[torch.Tensor | None, torch.Tensor]], scale: int = 2) -> torch.Tensor:
    """One row per design: its x (C, H, W) when it is an image (else a blank), a gap, then its generated images
    (n, C', H', W'), all at the generated images' height x scale; (3, rows H, W) in [-1, 1]."""
    height = rows[0][1].shape[-2] * scale
    gap = torch.ones(3, height, max(2, height // 8))
    lines = []
    for x, images in rows:
        first = (
            _fit(x, height)
            if x is not None and x.dim() == 3 and x.shape[0] in (1, 3)
            else torch.ones(3, height, height)
        )
        lines.append(torch.cat([first, gap, *[_fit(image, height) for image in images]], dim=2))
    width = max(line.shape[2] for line in lines)
    padded = [torch.nn.functional.pad(line, (0, width - line.shape[2]), value=1.0) for line in lines]
    return torch.cat([torch.cat([line, torch.ones(3, 2, width)], dim=1) for line in padded], dim=1)
