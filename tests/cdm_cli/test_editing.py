"""The editing workload end to end on tiny models: cdm check (per module), cdm run from a source, cdm evaluate."""

import json
from pathlib import Path

import pytest
import yaml

from cdm_cli.main import main

EXAMPLE = Path(__file__).parents[2] / "examples" / "editing_tiny.yaml"


@pytest.fixture(scope="module")
def tiny_editing(tmp_path_factory):
    from cdm_dist.models.tiny_editing import save_tiny_editing

    root = tmp_path_factory.mktemp("tiny_editing")
    save_tiny_editing(root, target_size=40)
    return root


@pytest.fixture
def editing_config(tiny_editing, tmp_path):
    """examples/editing_tiny.yaml pointed at the fixture's models, at test size."""
    text = EXAMPLE.read_text().replace("out/tiny_editing", str(tiny_editing))
    config = yaml.safe_load(text)
    config["method"] |= {"num_steps": 6, "n_c": 4, "target_batch": 16}
    config["chains"] |= {"count": 2}
    config["problem"]["sampler"]["sample_chunk"] = 2
    config["resources"] |= {"micro_batch": 2, "checkpoint_every": 3}
    config["evaluation"] |= {"samples": 40, "chunk": 20}
    config["tracking"] = {"uri": f"sqlite:///{tmp_path}/mlflow.db", "artifact_location": str(tmp_path / "art"),
                          "experiment": "editing"}  # fmt: skip
    config["output"] = str(tmp_path / "campaigns")
    path = tmp_path / "editing.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_cdm_check_reports_every_module_of_the_generator(editing_config, tiny_editing, tmp_path):
    from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel
    from transformers import CLIPVisionModelWithProjection

    assert main(["check", str(editing_config), "--json", str(tmp_path / "check.json")]) == 0
    rows = {(r["role"], r["module"]): r for r in json.loads((tmp_path / "check.json").read_text())["modules"]}
    loaded = {  # the same modules loaded another way: their parameter counts
        ("sampler", "inner.unet"): UNet2DConditionModel.from_pretrained(tiny_editing / "generator" / "unet"),
        ("sampler", "inner.controlnet"): ControlNetModel.from_pretrained(tiny_editing / "generator" / "controlnet"),
        ("sampler", "inner.vae"): AutoencoderKL.from_pretrained(tiny_editing / "generator" / "vae"),
        ("sampler", "inner.embed.model"): CLIPVisionModelWithProjection.from_pretrained(tiny_editing / "clip"),
        ("sampler", "decoder.vae"): AutoencoderKL.from_pretrained(tiny_editing / "prior" / "vae"),
        ("prior", "model"): UNet2DConditionModel.from_pretrained(tiny_editing / "prior" / "unet"),
    }
    assert set(rows) == set(loaded)
    for key, module in loaded.items():
        assert rows[key]["parameters"] == sum(p.numel() for p in module.parameters()), key
        assert rows[key]["calls"] >= 1 and rows[key]["forward_seconds"] > 0, key
    # 2 generator steps per chunk of 2 samples: 2 chains x 4 samples / 2 = 4 chunks, each run forward and recomputed
    assert rows[("sampler", "inner.unet")]["calls"] == 2 * 4 * 2


def test_an_editing_campaign_runs_from_the_source_and_is_evaluated(editing_config, capsys):
    assert main(["run", str(editing_config), "--quiet", "--json", str(editing_config.with_suffix(".json"))]) == 0
    summary = json.loads(editing_config.with_suffix(".json").read_text())
    assert summary["chains_ok"] == 2
    best = summary["topk"][0]["metrics"]
    assert best["source_loss"] > 0 and best["improvement"] == pytest.approx(
        (best["source_loss"] - summary["topk"][0]["final_loss"]) / best["source_loss"]
    )
    capsys.readouterr()
    assert main(["evaluate", str(editing_config)]) == 0  # the YAML: its newest run
    out = capsys.readouterr().out
    assert "source" in out and "rows % [95% CI]" in out and "columns % [95% CI]" in out
    report = json.loads((Path(summary["output_dir"]) / "evaluation.json").read_text())
    assert report["source"]["shares"] and len(report["rows"]) == 2
    from PIL import Image

    # evaluation.png: a row per design (source + 2 chains), x (a latent here: a blank square) and 8 generated
    # images, each 16 px shown at 32, 2 px between rows
    with Image.open(Path(summary["output_dir"]) / "evaluation.png") as sheet:
        assert sheet.size == (32 + 4 + 8 * 32, 3 * (32 + 2))
