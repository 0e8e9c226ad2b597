import json


def test_bench_ray_reports_every_executor_and_transport(ray_cluster, tmp_path):
    from benchmarks.executors import COLUMNS, bench_ray

    out = tmp_path / "ray.json"
    payload = bench_ray(str(out), chains=4, quick=True, problems=("gmm5d",))  # --quick: 1 and 2 chunks in flight
    assert json.loads(out.read_text()) == json.loads(json.dumps(payload))
    rows = payload["rows"]
    assert all(set(COLUMNS) <= set(r) for r in rows)
    for problem in ("gmm5d",):
        mine = [r for r in rows if r["problem"] == problem]
        kinds = [(r["executor"], r["transport"], r["micro_batches"]) for r in mine]
        assert kinds[0] == ("local", None, 1) and ("ray_colocated", "tasks", 1) in kinds
        assert {(t, m) for e, t, m in kinds if e == "ray_split"} == {(t, m) for t in ("tasks", "compiled")
                                                                      for m in (1, 2)}  # fmt: skip
        assert all(r["chain_steps_per_s"] > 0 for r in mine) and mine[0]["busy_prior"] is None
        for r in mine[1:]:
            assert 0 <= r["busy_prior"] <= 1.05 and 0 <= r["busy_sampler"] <= 1.05 and r["overhead_us_per_stage"] > 0
        for r in (r for r in mine if r["executor"] == "ray_split"):
            assert r["driver_bytes_between_checkpoints"] == 0 and r["driver_bytes_per_step"] > 0
        # every executor ran the same chains, so they found the same best held-out loss
        assert len({round(r["best_final_loss"], 5) for r in mine}) == 1
        best = max(r["chain_steps_per_s"] for r in mine[1:])
        assert payload["ray_overhead_by_problem"][problem] == 1 - best / mine[0]["chain_steps_per_s"]
    assert out.with_suffix(".md").read_text().startswith("| problem | executor | transport |")


def test_bench_faults_loses_and_changes_no_chain(ray_cluster, tmp_path):
    from benchmarks.faults import bench_faults

    address = ray_cluster.get_runtime_context().gcs_address  # each `cdm run` joins the session's Ray
    payload = bench_faults(str(tmp_path / "faults.json"), repeats=1, kills=1, quick=True, address=address)
    (row,) = payload["rows"]
    totals = payload["totals"]
    assert row["driver_killed"] and row["resume_returncode"] == 0
    assert totals["chains_completed"] == totals["chains_identical"] == totals["mlflow_runs_complete"] == 8
    assert row["extra_chain_steps"] == row["chain_steps_run"] - totals["unfaulted_chain_steps"] >= 0
    assert (tmp_path / "faults.md").is_file()
