"""`cdm bench scribbles` end to end at a tiny size: models trained by `cdm train` for a few steps, a campaign on Ray
with split placement, the time-matched SDEdit search, `cdm evaluate`, the poster's table and the pictures."""

import json

import pytest
from safetensors.torch import load_file

from benchmarks.scribbles import bench_scribbles


@pytest.fixture(scope="module")
def tiny_scribbles(tiny_checkpoints):
    return tiny_checkpoints("scribbles")


def test_cdm_train_writes_the_generator_the_embedding_and_class_embeddings(tiny_scribbles):
    sampler = tiny_scribbles / "sampler"
    manifest = json.loads((sampler / "manifest.json").read_text())
    assert manifest["problem"] == "scribbles" and manifest["generator_settings"]["steps"] == 4
    weights = "diffusion_pytorch_model.safetensors"
    for name in (f"unet/{weights}", f"controlnet/{weights}", "embed/model.safetensors", "classes_colour.safetensors",
                 "classes_background.safetensors"):  # fmt: skip
        assert name in manifest["weights_sha256"], name
    assert set(manifest["quality"]) >= {"red_share_mae", "dark_share_mae", "colour_zero_shot_accuracy"}
    assert load_file(str(sampler / "classes_colour.safetensors"))["embeddings"].shape == (2, 16)


def test_the_bench_runs_the_papers_protocol_through_the_product(tiny_scribbles, ray_cluster, tmp_path):
    out = tmp_path / "bench" / "scribbles.json"
    # (a 4-step generator draws no red, so the targets that stratify its outputs by colour cannot be built)
    root = tmp_path / "runs"  # the campaigns, the MLflow store and the SDEdit rounds
    payload = bench_scribbles(str(out), ("colour_interpolation",), quick=True, checkpoints=str(tiny_scribbles),
                              keep=str(root))  # fmt: skip
    row = payload["rows"][0]
    assert row["target"] == "colour_interpolation" and row["chains"] == 4 and row["chains_failed"] == 0
    assert row["attribute"] == "red" and row["wanted_share"] is None
    # the improvement is the evaluation's: over the source's MMD on the same fresh samples
    assert row["mlgd_f_improvement"] == pytest.approx((row["source_mmd"] - row["mlgd_f_mmd"]) / row["source_mmd"])
    assert row["sdedit_variations"] >= 1 and row["mlgd_f_share_low"] <= row["mlgd_f_share"] <= row["mlgd_f_share_high"]
    assert json.loads(out.read_text())["rows"][0]["target"] == "colour_interpolation"
    markdown = out.with_suffix(".md").read_text()
    assert "| colour_interpolation |" in markdown and "(+22.1%)" in markdown  # the poster's figure beside ours
    assert (out.parent / "scribbles_colour_interpolation.png").is_file()  # the designs and their generated images
    (found,) = (root / "campaigns").glob("*/evaluation.json")
    evaluation = json.loads(found.read_text())
    assert [r["design"] for r in evaluation["baselines"]] and evaluation["source"]["design"] == "source"
