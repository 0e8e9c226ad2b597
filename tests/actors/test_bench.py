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


def test_bench_faults_loses_and_changes_no_chain(tmp_path):
    from actors.faults import bench_faults

    payload = bench_faults(str(tmp_path / "faults.json"), repeats=1, kills=1, quick=True)
    (row,) = payload["rows"]
    totals = payload["totals"]
    assert row["driver_killed"] and row["resume_returncode"] == 0
    assert totals["chains_completed"] == totals["chains_identical"] == totals["mlflow_runs_complete"] == 8
    assert row["extra_chain_steps"] == row["chain_steps_run"] - totals["unfaulted_chain_steps"] >= 0
    assert (tmp_path / "faults.md").is_file()
