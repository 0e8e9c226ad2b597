"""`cdm check --plan`: real-size memory plans from config.json files alone (tests/fixtures/published)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import save_file

from cdm_cli.main import main
from cdm_dist.driver.campaign import load_config
from cdm_dist.driver.plan import Activations, meta, plan_campaign, trace
from cdm_dist.errors import InputError

ROOT = Path(__file__).resolve().parents[3]
PUBLISHED = ROOT / "tests" / "fixtures" / "published"
EXAMPLE = ROOT / "examples" / "scribbles_sdxl.yaml"
PLACEHOLDER = "/path/you/provide/"

# Published parameter counts (tests/fixtures/published/README.md lists them with their sources):
SDXL_UNET = 2_567_463_684  # sd_xl_base_1.0.safetensors' model.diffusion_model.* (1680 tensors), as widely quoted
SDXL_VAE = 83_653_863  # the SDXL (and SD 1.x / 2.x) AutoencoderKL, "VAE (f32) 83,653,863" in component tables
CLIP_L14_VISION = 303_966_208  # OpenAI CLIP ViT-L/14's visual model incl. its 1024 -> 768 projection
# xinsir/controlnet-scribble-sdxl-1.0 ships one fp16 safetensors of 2,502,139,104 bytes = 8 (header length) + a JSON
# header (~100 KB for its ~1,300 tensors) + 2 bytes per parameter: the ControlNet has 1,251,0xx,xxx parameters.
CONTROLNET_FP16_FILE_BYTES = 2_502_139_104


@pytest.fixture
def user_files(tmp_path):
    """The small files a user provides: prompt embeddings (SDXL's shapes), a 1024 x 1024 scribble, the target's and
    the classes' CLIP embeddings."""
    from PIL import Image

    prompt = {
        "encoder_hidden_states": torch.zeros(77, 2048, dtype=torch.float16),
        "text_embeds": torch.zeros(1280, dtype=torch.float16),
        "time_ids": torch.zeros(6, dtype=torch.float16),
    }
    save_file(prompt, str(tmp_path / "prompt.safetensors"))
    save_file({"samples": torch.zeros(16, 768)}, str(tmp_path / "target.safetensors"))
    save_file({"embeddings": torch.zeros(2, 768)}, str(tmp_path / "classes.safetensors"))
    Image.fromarray(np.zeros((1024, 1024, 3), dtype=np.uint8)).save(tmp_path / "scribble.png")
    return tmp_path


def example_config(user_files: Path, **changes) -> Path:
    """examples/scribbles_sdxl.yaml with its placeholders pointed at the published configs and the user's files."""
    data = yaml.safe_load(EXAMPLE.read_text())
    problem = data["problem"]
    problem["prior"]["diffusers"] = str(PUBLISHED / "stable-diffusion-xl-base-1.0")
    problem["prior"]["conditioning"]["file"] = str(user_files / "prompt.safetensors")
    sampler = problem["sampler"]
    sampler["generator"] = str(PUBLISHED / "sdxl-turbo")
    sampler["controlnet"] = str(PUBLISHED / "controlnet-sdxl-1.0")
    sampler["prompt"] = str(user_files / "prompt.safetensors")
    sampler["embed"]["clip"] = str(PUBLISHED / "clip-vit-large-patch14")
    problem["target"]["file"] = str(user_files / "target.safetensors")
    data["chains"]["source"]["file"] = str(user_files / "scribble.png")
    data["evaluation"]["classifier"]["zero_shot"] = str(user_files / "classes.safetensors")
    for dotted, value in changes.items():
        node = data
        *parents, last = dotted.split("__")
        for key in parents:
            node = node[key]
        node[last] = value
    text = yaml.safe_dump(data, sort_keys=False)
    assert PLACEHOLDER not in text, "every placeholder of the example is pointed somewhere"
    path = user_files / "scribbles_sdxl.yaml"
    path.write_text(text)
    return path


def modules(plan: dict) -> dict[tuple[str, str], dict]:
    return {(role["role"], m["module"]): m for role in plan["roles"] for m in role["modules"]}


def test_the_example_says_its_paths_are_placeholders():
    text = EXAMPLE.read_text()
    assert text.startswith("# PLACEHOLDERS:") and PLACEHOLDER in text.splitlines()[0]
    data = yaml.safe_load(text)
    assert data["problem"]["prior"]["diffusers"].startswith(PLACEHOLDER)
    assert data["chains"]["source"] == {"file": f"{PLACEHOLDER}scribble.png", "strength": 0.5}
    assert data["resources"]["placement"] == "split" and data["resources"]["num_gpus"] == 1
    assert data["evaluation"]["classifier"]["classes"] == ["a photo of a man", "a photo of a woman"]


def test_published_configs_give_the_published_parameter_counts(user_files):
    config = load_config(example_config(user_files))
    assert config.chains.source.start_steps(1, config.method.num_steps) == [15]  # the authors' 30 steps from 15
    plan = plan_campaign(config, activations=False)  # meta builds only
    found = modules(plan)
    assert found["prior", "unet"]["params"] == SDXL_UNET
    assert found["sampler", "unet"]["params"] == SDXL_UNET  # SDXL-Turbo's UNet is SDXL's
    for key in (("prior", "vae encoder"), ("sampler", "decoder (prior vae)"), ("sampler", "vae decoder")):
        assert found[key]["params"] == SDXL_VAE
    encoder, decoder = found["prior", "vae encoder"], found["sampler", "vae decoder"]
    assert encoder["part_params"] + decoder["part_params"] == SDXL_VAE
    controlnet = found["sampler", "controlnet"]["params"]
    header = CONTROLNET_FP16_FILE_BYTES - 8 - 2 * controlnet
    assert 0 < header < 200_000, f"{controlnet:,} params leave a {header:,}-byte safetensors header"
    assert found["sampler", "embed (clip)"]["params"] == CLIP_L14_VISION
    # weight memory is params x the configured dtype (bf16 UNets, float32 VAEs as the example sets them)
    assert found["prior", "unet"]["weight_bytes"] == 2 * SDXL_UNET
    assert found["sampler", "vae decoder"]["weight_bytes"] == 4 * SDXL_VAE
    assert plan["event_shape"] == [4, 128, 128]
    assert all(m["activations"] is None for m in found.values())


def test_cdm_check_plan_prints_the_table_and_writes_json(user_files, capsys):
    out = user_files / "plan.json"
    assert main(["check", "--plan", str(example_config(user_files)), "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert text.startswith("memory plan of campaign scribbles-sdxl")
    assert f"{SDXL_UNET:,}" in text and f"{CLIP_L14_VISION:,}" in text
    assert "activations are estimated, not measured" in text
    plan = json.loads(out.read_text())
    found = modules(plan)
    for key, module in found.items():
        assert module["activations"] is not None, key
        assert module["activations"]["peak"] > 0, key
    # the prior: 2 chains x 2 micro-batches in flight keep their UNet graphs; no gradients through the VAE encoder
    assert found["prior", "unet"]["items"] == 4
    assert found["prior", "vae encoder"]["activations"]["grad"] is False
    # the sampler: sample_chunk 2 through the generator, 2 chains x 1 guess through the prior's decoder
    assert found["sampler", "unet"]["items"] == found["sampler", "embed (clip)"]["items"] == 2
    assert found["sampler", "decoder (prior vae)"]["items"] == 2
    prior, sampler = plan["roles"]
    assert prior["total_bytes"] == prior["weight_bytes"] + prior["activation_bytes"]
    assert set(prior["fits"]) == {"16", "24", "40", "48", "80", "141"}
    assert not prior["fits"]["16"] and prior["fits"]["141"]  # 5 GiB of weights + 4 UNet graphs at 1024 px
    assert plan["split"] and plan["both_roles"]["total_bytes"] < prior["total_bytes"] + sampler["total_bytes"]


def test_bad_input_is_one_line_and_exit_2(user_files, tmp_path, capsys):
    clip = tmp_path / "clip-without-config"
    clip.mkdir()  # a folder (the spec checks that), but no config.json
    config = example_config(user_files)
    data = yaml.safe_load(config.read_text())
    data["problem"]["sampler"]["embed"]["clip"] = str(clip)
    config.write_text(yaml.safe_dump(data))
    assert main(["check", "--plan", str(config)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("cdm: error: problem.sampler.embed.clip: ")
    assert "config.json is missing: a CLIP model folder needs it" in err

    (clip / "config.json").write_text("{not json")
    assert main(["check", "--plan", str(config)]) == 2
    assert "is not valid JSON" in capsys.readouterr().err

    assert main(["check", "--plan", str(tmp_path / "missing.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err


def test_problems_built_by_code_are_not_planned(small_campaign):
    with pytest.raises(InputError, match=r"plans diffusers priors built from config\.json"):
        plan_campaign(small_campaign())


def test_attention_is_counted_as_fused_kernels_keep_it():
    """q, k, v, the output and a float32 log-sum-exp per query: never the N x N matrix."""
    q, k, v = (meta(1, 4, 1024, 16, dtype=torch.bfloat16, grad=True) for _ in range(3))
    module = torch.nn.Linear(1, 1)
    acts = trace(module, lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v), checkpointing=False)
    qkv_out = 4 * 1024 * 16 * 2  # bytes of one (1, 4, 1024, 16) bf16 tensor
    assert acts == Activations(kept=4 * qkv_out + 4 * 1024 * 4, block=0, largest=qkv_out)


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's resettable peak RSS")
def test_the_estimate_tracks_a_measured_cpu_peak():
    """The same estimate against a real forward + backward on CPU (peak RSS, every allocation its own mmap): a small
    VAE decoder, with and without diffusers' checkpointing. Without, the estimate is within a few percent; with, it
    errs high (the recomputed block is counted whole)."""
    script = r"""
import gc, json, torch
from diffusers import AutoencoderKL
torch.set_num_threads(2)
def rss(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))
vae = AutoencoderKL(**CONFIG).requires_grad_(False)
peaks = {}
for checkpointing in (False, True):
    if checkpointing:
        vae.enable_gradient_checkpointing()
    with torch.no_grad():
        vae.decode(torch.randn(1, 4, 8, 8))
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = rss("VmRSS")
    out = vae.decode(torch.randn(1, 4, SIZE, SIZE, requires_grad=True)).sample
    out.square().sum().backward()
    del out
    peaks[str(checkpointing)] = rss("VmHWM") - base
print(json.dumps(peaks))
"""
    config = dict(block_out_channels=[32, 64, 64], down_block_types=["DownEncoderBlock2D"] * 3,
                  up_block_types=["UpDecoderBlock2D"] * 3, layers_per_block=2, latent_channels=4)  # fmt: skip
    size = 48
    script = script.replace("CONFIG", repr(config)).replace("SIZE", str(size))
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}  # freed tensors leave the RSS at once
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    measured = json.loads(done.stdout.strip().splitlines()[-1])

    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL

    with init_empty_weights(include_buffers=True):
        vae = AutoencoderKL(**config)
    vae.requires_grad_(False)
    for checkpointing, (low, high) in ((False, (0.9, 1.15)), (True, (1.0, 1.45))):
        estimate = trace(vae, lambda: vae.decode(meta(1, 4, size, size, grad=True)).sample, checkpointing).peak
        ratio = estimate / measured[str(checkpointing)]
        assert low <= ratio <= high, f"checkpointing {checkpointing}: estimate / measured = {ratio:.2f}"
