import json


def test_bench_ray_reports_every_executor(ray_cluster, tmp_path):
    from actors.bench import bench_ray

    out = tmp_path / "ray.json"
    payload = bench_ray(str(out), chains=4, quick=True)
    assert json.loads(out.read_text()) == json.loads(json.dumps(payload))
    executors = [(r["executor"], r["micro_batches"]) for r in payload["rows"]]
    assert executors[0] == ("local", 1) and ("ray_split", 2) in executors and ("ray_colocated", 1) in executors
    assert all(r["chain_steps_per_s"] > 0 for r in payload["rows"])
    assert payload["rows"][0]["actor_busy_fraction"] is None
    assert all(0 <= r["actor_busy_fraction"] <= 1.05 for r in payload["rows"][1:])
    best = max(r["chain_steps_per_s"] for r in payload["rows"][1:])
    assert payload["ray_overhead"] == 1 - best / payload["rows"][0]["chain_steps_per_s"]
    # every executor ran the same chains, so they found the same best held-out loss
    losses = {round(r["best_final_loss"], 6) for r in payload["rows"]}
    assert len(losses) == 1
    assert out.with_suffix(".md").read_text().startswith("| executor |")
