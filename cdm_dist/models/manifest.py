"""A checkpoint folder's manifest.json (how it was made, and the sha256 of its weights, checked on every load)."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from cdm_dist.errors import InputError
from cdm_dist.models.spec import read_json


def library_versions() -> dict[str, str]:
    """The versions of the libraries a checkpoint was trained with, for its manifest."""
    import accelerate
    import diffusers
    import torch

    return {"torch": torch.__version__, "diffusers": diffusers.__version__, "accelerate": accelerate.__version__}


def sha256(path: Path) -> str:
    """Hex sha256 of a file."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_manifest(folder: str | Path) -> dict[str, Any]:
    """The manifest.json of a checkpoint folder, with a clear error when the folder is not a checkpoint."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise InputError(f"{folder}: not a checkpoint folder (no config.json)")
    return read_json(folder / "manifest.json", "not one of the project's checkpoints (no manifest.json)")


def verify_manifest(folder: Path, weights: Path, field: str) -> None:
    """Where a manifest.json records the weights' sha256 (the project's own checkpoints), the file must match."""
    manifest = folder / "manifest.json"
    if not manifest.is_file():
        return
    try:
        expected = read_json(manifest, "no manifest").get("weights_sha256")
    except InputError as exc:
        raise InputError(f"{field}: {exc}") from None
    if expected is None:
        return
    if sha256(weights) != expected:
        raise InputError(f"{field}: {weights} does not match the sha256 in {manifest} (corrupted or replaced)")
