"""`cdm bench models --quick`: its report's shape, and what the split actors hold."""

import json

from benchmarks.models import bench_models


def test_bench_models_reports_overhead_memory_and_checkpointing(ray_cluster, tmp_path):
    payload = bench_models(str(tmp_path / "models.json"), quick=True)
    assert json.loads((tmp_path / "models.json").read_text())["quick"] is True
    assert (tmp_path / "models.md").read_text().count("\n|---|") == 3  # three tables
    assert [(r["models"], r["batch"]) for r in payload["adapter_overhead"]] == [("tiny", 1), ("tiny", 8)]
    assert all(r["direct_ms"] > 0 and r["adapter_ms"] > 0 for r in payload["adapter_overhead"])
    prior, sampler = payload["split_memory"]
    assert (prior["role"], sampler["role"]) == ("prior", "sampler")
    assert prior["parts"] == "prior 200,644"  # the UNet only: no VAE, no sampler
    assert sampler["parts"] == "sampler 826, decoder 43,711"  # the image sampler and the VAE: no UNet
    steps = payload["decoder_checkpointing"]
    assert [r["decoder_checkpointing"] for r in steps] == [False, True]
    assert all(r["matching_grad_s"] > 0 and r["peak_memory_mb"] > 0 for r in steps)
