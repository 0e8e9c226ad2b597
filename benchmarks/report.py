"""Writing benchmark results: JSON for machines, a markdown table for people."""

from __future__ import annotations

import json
import math
import platform
from pathlib import Path
from typing import Any

import torch


def environment(device: torch.device) -> dict[str, Any]:
    """Where the numbers were measured."""
    env = {"torch": torch.__version__, "python": platform.python_version(), "threads": torch.get_num_threads()}
    env["device"] = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    return env


def markdown_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """A GitHub markdown table of the given columns."""

    def cell(v: Any) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return "nan" if math.isnan(v) else f"{v:.4g}"
        return str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_report(payload: dict[str, Any], json_path: str | None, markdown: str) -> None:
    """Write JSON (and markdown beside it, same stem) atomically; print the markdown."""
    print(markdown)
    if json_path is None:
        return
    path = Path(json_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1, default=float))
    tmp.replace(path)
    path.with_suffix(".md").write_text(markdown)
