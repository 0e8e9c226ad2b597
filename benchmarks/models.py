"""`cdm bench models`: what the bring-your-own-models machinery costs, measured on the tiny latent models
(cdm_dist.models.tiny): the diffusers adapter's overhead over calling the UNet directly, the memory of split
placement's prior and sampler actors, and a guided step with and without activation checkpointing in the decoder."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.report import environment, markdown_table, write_report

SIZES = {  # name -> latent size, UNet channels, VAE channels (images are 3 x (2 latent)²)
    "tiny": (8, (16, 32), (8, 16)),
    "small": (32, (32, 64), (32, 64)),
}


def _pipeline(root: Path, size: str) -> Path:
    from cdm_dist.models.tiny import save_tiny_latent_pipeline

    latent, unet, vae = SIZES[size]
    folder = root / size
    if not folder.is_dir():
        save_tiny_latent_pipeline(folder, latent_size=latent, unet_channels=unet, vae_channels=vae)
    return folder


def latent_problem(folder: Path, size: str, checkpointing: bool = True, dtype: str = "float32") -> dict[str, Any]:
    """The latent parts spec over a pipeline folder: the image sampler and a Gaussian target."""
    return {
        "prior": {
            "diffusers": str(folder),
            "subfolder": "unet",
            "vae_subfolder": "vae",
            "dtype": dtype,
            "decoder_checkpointing": checkpointing,
            "conditioning": {"file": str(folder / "conditioning.safetensors")},
        },
        "sampler": {
            "factory": "cdm_dist.models.tiny:ImageFeatureSampler",
            "args": {"image_size": 2 * SIZES[size][0]},
        },
        "target": {"factory": "cdm_dist.models.tiny:gaussian_target"},
    }


def _median_seconds(fn: Any, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        tic = time.perf_counter()
        fn()
        times.append(time.perf_counter() - tic)
    return statistics.median(times)


@torch.no_grad()
def adapter_overhead(root: Path, size: str, batch: int, repeats: int) -> dict[str, Any]:
    """ε̂ through DiffusersPrior vs the UNet called directly on the same inputs (median of interleaved rounds)."""
    from safetensors.torch import load_file

    from cdm_dist.models.adapters import load_diffusers_prior
    from cdm_dist.models.spec import DiffusersPriorSpec

    folder = _pipeline(root, size)
    spec = DiffusersPriorSpec.model_validate(latent_problem(folder, size)["prior"] | {"vae_subfolder": None})
    prior = load_diffusers_prior(spec, "cpu", "prior")
    unet = prior.model
    x = torch.randn(batch, *prior.event_shape)
    states = load_file(str(folder / "conditioning.safetensors"))["encoder_hidden_states"][None].expand(batch, -1, -1)

    def direct() -> torch.Tensor:
        return unet(x, 500, encoder_hidden_states=states).sample

    def adapter() -> torch.Tensor:
        return prior.predict_noise(x, 500)

    for _ in range(3):  # warm-up
        direct(), adapter()
    rounds = [(_median_seconds(direct, repeats), _median_seconds(adapter, repeats)) for _ in range(5)]
    direct_s = statistics.median(r[0] for r in rounds)
    adapter_s = statistics.median(r[1] for r in rounds)
    return {
        "models": size,
        "batch": batch,
        "unet_parameters": sum(p.numel() for p in unet.parameters()),
        "direct_ms": 1000 * direct_s,
        "adapter_ms": 1000 * adapter_s,
        "overhead": adapter_s / direct_s - 1,
    }


def split_memory(root: Path, size: str) -> list[dict[str, Any]]:
    """Each split actor's parameters (by part), resident size and peak after building its role."""
    from actors.coordinator import RayExecutor
    from cdm_dist.driver.campaign import load_config

    problem = json.dumps(latent_problem(_pipeline(root, size), size))
    config = load_config(None, [f"problem={problem}", "resources.placement=split", "resources.num_cpus=0.5",
                                "tracking.enabled=false", f"output={root / 'out'}"])  # fmt: skip
    executor = RayExecutor(config)
    try:
        infos = executor.infos()
    finally:
        executor.close()
    rows = []
    for info in infos:
        held = {name: part["parameters"] for name, part in info["parts"].items()}
        rows.append(
            {
                "models": size,
                "role": info["role"],
                "parts": ", ".join(f"{k} {v:,}" for k, v in held.items()),
                "parameter_mb": 4 * sum(held.values()) / 2**20,
                "rss_mb": info["rss_mb"],
                "peak_memory_mb": info["peak_memory_mb"],
            }
        )
    return rows


def guided_step(folder: str, size: str, checkpointing: bool, chains: int, device: str) -> dict[str, Any]:
    """One guided step of `chains` chains (in this process): seconds of the matching gradient (decoder + sampler,
    forward and backward) and the peak memory of the whole step."""
    import resource

    from cdm_dist.driver.campaign import load_config
    from cdm_dist.driver.execution import Checkpoint
    from cdm_dist.driver.preflight import probe_batch
    from cdm_dist.driver.worker import ChainWorker, torch_sync

    problem = json.dumps(latent_problem(Path(folder), size, checkpointing))
    config = load_config(None, [f"problem={problem}", f"chains.count={chains}", "method.n_guess=1",
                                "method.grad=identity", "method.dtype=float32", "tracking.enabled=false"])  # fmt: skip
    worker = ChainWorker(config, "both", device)
    batch, step = probe_batch(config, chains)
    x = torch.randn(chains, 4, SIZES[size][0], SIZES[size][0], dtype=torch.float32)
    checkpoint = Checkpoint(step, x, torch.zeros(chains, dtype=torch.bool))
    seconds = []
    for _ in range(3):
        denoised = worker.probe_denoise(batch, checkpoint)
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        torch_sync(torch.device(device))
        tic = time.perf_counter()
        grad = worker.probe_matching_grad(batch, denoised["request"])
        seconds.append(time.perf_counter() - tic)
        worker.probe_advance(batch, torch.tensor(grad["loss"]), grad["grad_x0"])
    if device.startswith("cuda"):
        peak, method = torch.cuda.max_memory_allocated() / 2**20, "cuda_max_memory_allocated"
    else:
        peak, method = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "cpu_process_max_rss"
    return {"matching_grad_s": min(seconds), "peak_memory_mb": peak, "memory": method}


def checkpointing(root: Path, size: str, chains: int, device: str) -> list[dict[str, Any]]:
    """The guided step with and without decoder checkpointing, each in a fresh process (a clean peak)."""
    folder = _pipeline(root, size)
    rows = []
    for flag in (False, True):
        code = (
            "import json; from benchmarks.models import guided_step; "
            f"print('RESULT', json.dumps(guided_step({str(folder)!r}, {size!r}, {flag}, {chains}, {device!r})))"
        )
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=1800)
        result = json.loads(out.stdout.split("RESULT", 1)[1])
        rows.append({"models": size, "chains": chains, "decoder_checkpointing": flag, **result})
    return rows


STEP_COLUMNS = ["models", "chains", "decoder_checkpointing", "matching_grad_s", "peak_memory_mb", "memory"]


def bench_models(json_path: str | None, quick: bool = False, device: str = "cpu") -> dict[str, Any]:
    """All three measurements; JSON + markdown."""
    sizes = ["tiny"] if quick else ["tiny", "small"]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        overhead = [adapter_overhead(root, s, b, 5 if quick else 30) for s in sizes for b in (1, 8)]
        import ray

        from actors.coordinator import connect

        started = not ray.is_initialized()
        connect(None, num_cpus=2)
        memory = [row for s in sizes for row in split_memory(root, s)]
        if started:
            ray.shutdown()
        chains = 2 if quick else 16
        steps = [row for s in sizes for row in checkpointing(root, s, chains, device)]
    payload = {
        "adapter_overhead": overhead,
        "split_memory": memory,
        "decoder_checkpointing": steps,
        "sizes": {k: {"latent": v[0], "unet_channels": v[1], "vae_channels": v[2]} for k, v in SIZES.items()},
        "environment": environment(torch.device(device)),
        "quick": quick,
    }
    markdown = (
        "### diffusers adapter vs the UNet called directly (ε̂, same inputs)\n\n"
        + markdown_table(overhead, ["models", "batch", "unet_parameters", "direct_ms", "adapter_ms", "overhead"])
        + "\n### split placement: what each actor holds\n\n"
        + markdown_table(memory, ["models", "role", "parts", "parameter_mb", "rss_mb", "peak_memory_mb"])
        + "\n### one guided step with and without decoder checkpointing\n\n"
        + markdown_table(steps, STEP_COLUMNS)
    )
    write_report(payload, json_path, markdown)
    return payload
