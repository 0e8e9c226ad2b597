import json
import subprocess
import sys

import pytest

from cdm_cli.main import main


def test_bench_gmm_quick_writes_the_documented_schema(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "gmm", "--quick", "--chains", "2", "--dims", "2", "--json", str(out)]) == 0
    payload = json.loads(out.read_text())
    assert {r["method"] for r in payload["rows"]} == {"mlgd_f", "mlgd", "best_of_n", "dflow"}
    keys = {
        "method",
        "dim",
        "chains",
        "seconds_per_chain",
        "peak_memory_mb",
        "l2_gmm_mean",
        "l2_gmm_median",
        "x_err_median",
        "x_err_max",
        "success_rate",
    }
    for row in payload["rows"]:
        assert keys <= set(row)
        assert row["dim"] == 2 and row["chains"] == 2
    assert (tmp_path / "bench.md").read_text().startswith("| models | method |")
    assert {r["models"] for r in payload["rows"]} == {"exact"}
    assert (tmp_path / "gmm2d_params.json").is_file()


def test_bench_batching_quick_schema(tmp_path):
    out = tmp_path / "batching.json"
    assert main(["bench", "batching", "--quick", "--chains", "3", "--json", str(out)]) == 0
    payload = json.loads(out.read_text())
    assert payload["chains"] == 3
    assert payload["ratio"] > 0 and payload["batched_chains_per_s"] > 0
    assert payload["max_abs_x_difference"] < 1e-9  # batched and one-at-a-time chains agree


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["bench", "gmm", "--methods", "mlgd_f,magic"], "--methods: unknown ['magic']"),
        (["bench", "gmm", "--dims", "3"], "--dims: unknown [3]"),
        (["bench", "batching", "--chains", "0"], "--chains: must be >= 1"),
    ],
)
def test_bad_input_exits_2_with_one_clear_line(args, message, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_console_script_usage_error_exits_2():
    done = subprocess.run([sys.executable, "-m", "cdm_cli.main", "bench", "nope"], capture_output=True, text=True)
    assert done.returncode == 2


# -- cdm run ------------------------------------------------------------------------------------------------


def _cdm(*args, cwd):
    import subprocess
    import sys

    return subprocess.run(
        [sys.executable, "-m", "cdm_cli.main", *args], capture_output=True, text=True, cwd=cwd, timeout=300
    )


def test_run_rejects_bad_input_with_status_2_and_starts_nothing(tmp_path):
    from cdm_cli.main import main

    bad = tmp_path / "bad.yaml"
    bad.write_text(f"output: {tmp_path / 'out'}\nmethod:\n  n_c: -3\n")
    assert main(["run", str(bad)]) == 2
    assert main(["run", str(tmp_path / "missing.yaml")]) == 2
    assert main(["run", str(bad), "--set", "method.n_c=8", "--set", "chains.count=x"]) == 2
    assert main(["run", "--resume", str(tmp_path)]) == 2  # not a campaign folder
    assert not (tmp_path / "out").exists()


def test_run_error_messages_name_the_field(tmp_path, capsys):
    from cdm_cli.main import main

    bad = tmp_path / "bad.yaml"
    bad.write_text("method:\n  n_c: -3\n")
    main(["run", str(bad)])
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"cdm: error: {bad}: method.n_c: Input should be greater than or equal to 1"]


def test_resume_after_the_driver_was_killed(tmp_path):
    """SIGKILL `cdm run` after its first checkpoint; `cdm run --resume RUN_ID` finishes from the checkpoints."""
    import json
    import signal
    import subprocess
    import sys
    import time

    import torch

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    args = [
        "run",
        *("--executor", "local", "--quiet"),
        *("--set", "method.num_steps=20", "--set", "method.n_c=32", "--set", "method.target_batch=32"),
        *("--set", "chains.count=12", "--set", "resources.micro_batch=2", "--set", f"tracking.uri={uri}"),
        *("--set", f"output={tmp_path / 'campaigns'}", "--set", f"tracking.artifact_location={tmp_path / 'art'}"),
    ]
    driver = subprocess.Popen([sys.executable, "-m", "cdm_cli.main", *args], cwd=tmp_path)
    deadline = time.time() + 240
    while (
        not list(tmp_path.glob("campaigns/*/results/mb00000.pt")) and time.time() < deadline and driver.poll() is None
    ):
        time.sleep(0.05)
    assert driver.poll() is None, "the campaign ended before it could be killed"
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    (folder,) = tmp_path.glob("campaigns/*")
    finished = {p.name: p.stat().st_mtime_ns for p in (folder / "results").glob("*.pt")}
    remaining = 0  # chain-steps the resumed driver must run: none for finished micro-batches
    for index in range(6):
        if f"mb{index:05d}.pt" not in finished:
            checkpoint = folder / "checkpoints" / f"mb{index:05d}.pt"
            step = torch.load(checkpoint, weights_only=True)["step"].item() if checkpoint.is_file() else 0
            remaining += 2 * (20 - step)
    assert len(finished) < 6
    run_id = json.loads((folder / "tracking.json").read_text())["parent_run_id"]

    out = _cdm("run", "--resume", run_id, "--tracking-uri", uri, "--quiet", "--json", "r.json", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    summary = json.loads((tmp_path / "r.json").read_text())
    assert summary["campaign_run_id"] == run_id and summary["chains_total"] == 12 and summary["chains_ok"] == 12
    assert summary["chain_steps"] == remaining  # from the checkpoints, finished micro-batches untouched
    for name, stamp in finished.items():
        assert (folder / "results" / name).stat().st_mtime_ns == stamp
    assert len(summary["topk"]) == 5


def test_bench_digits_quick_writes_the_documented_schema(tmp_path, tiny_checkpoints, monkeypatch):
    import numpy as np

    import benchmarks.digits as bench

    scores = bench.heldout_prior_fit  # the tiny prior's held-out scores, scaled so that its chains fall within
    monkeypatch.setattr(bench, "heldout_prior_fit", lambda problem, seed: 10 * scores(problem, seed))
    out = tmp_path / "digits.json"
    folder = str(tiny_checkpoints("digits"))
    argv = ["bench", "digits", "--quick", "--chains", "5", "--targets", "bimodal", "--checkpoints", folder]
    assert main([*argv, "--json", str(out)]) == 0
    (row,) = json.loads(out.read_text())["rows"]
    assert row["target"] == "bimodal" and row["chains"] == 5
    assert {"top5_loss_mean", "seconds_per_chain", "grid_png", "circle_png", "x_npy"} <= set(row)
    kept = 5 - row["chains_over_limit"]  # the top 5 leave out x* over the prior_fit limit
    assert kept > 0 and np.load(row["x_npy"]).shape == (kept, 16, 16)
    assert (tmp_path / "digits_bimodal_top5.png").is_file() and (tmp_path / "digits_bimodal_circle.png").is_file()
    assert len(row["top5_spread"]) == kept and all(0 <= r <= 1 for r in row["top5_spread"])
    assert row["top5_zeros"] == row["top5_judged_digits"].count(0) and len(row["top5_zeta"]) == kept
    assert row["top5_nearest_zeros"] == row["top5_nearest_digits"].count(0)


def test_circular_spread_is_one_for_a_point_and_zero_for_an_even_circle():
    import math

    import torch

    from benchmarks.digits import circular_spread

    even = torch.arange(12, dtype=torch.float64) * 2 * math.pi / 12
    half = torch.cat([torch.zeros(6), torch.full((6,), math.pi)]).double()  # two opposite angles: no direction
    point = torch.full((12,), 0.7, dtype=torch.float64)
    y = torch.stack([torch.stack([a.cos(), a.sin()], -1) for a in (even, half, point)])  # (3, 12, 2)
    assert circular_spread(y).tolist() == pytest.approx([0.0, 0.0, 1.0], abs=1e-6)
    ragged = torch.tensor([0.0, math.pi / 2], dtype=torch.float64)  # |(1 + i) / 2| by hand
    assert float(circular_spread(torch.stack([ragged.cos(), ragged.sin()], -1))) == pytest.approx(2**0.5 / 2)


def test_bench_digits_rejects_an_unknown_target(capsys):
    assert main(["bench", "digits", "--targets", "uniform,square"]) == 2
    assert "--targets: unknown ['square']" in capsys.readouterr().err


def test_resume_refuses_overrides_that_change_the_chains_and_takes_the_others(tmp_path, capsys):
    from cdm_cli.main import main

    args = ["--set", "method.num_steps=4", "--set", "chains.count=4", "--set", "resources.micro_batch=2",
            "--set", "tracking.enabled=false", "--set", f"output={tmp_path / 'out'}"]  # fmt: skip
    assert main(["run", "--executor", "local", "--quiet", *args]) == 0
    (folder,) = (tmp_path / "out").iterdir()
    capsys.readouterr()
    for change, field in [
        ("chains.count=8", "chains.count"),
        ("resources.micro_batch=4", "resources.micro_batch"),
        ("method.n_c=64", "method.n_c"),
        ("chains.zeta=[{scale: 2.0}]", "chains.zeta.0"),
    ]:
        assert main(["run", "--resume", str(folder), "--set", change]) == 2
        (line,) = capsys.readouterr().err.strip().splitlines()
        assert line.startswith(f"cdm: error: --set {field}") and "--resume cannot change the campaign's chains" in line
    ok = ["--set", "resources.threads=2", "--set", "tracking.log_every=2", "--set", "topk=2", "--executor", "local"]
    assert main(["run", "--resume", str(folder), "--quiet", *ok]) == 0


def test_a_source_of_the_wrong_shape_stops_the_run_before_it_starts(tmp_path, capsys):
    import numpy as np

    from cdm_cli.main import main

    np.save(tmp_path / "source.npy", np.zeros(3))
    out = tmp_path / "out"
    args = ["run", "--executor", "local", "--set", f"output={out}", "--set", f"tracking.uri=sqlite:///{out}/m.db"]
    assert main([*args, "--set", f"chains.source={{file: {tmp_path / 'source.npy'}, strength: 0.5}}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    file = tmp_path / "source.npy"
    assert err == [f"cdm: error: chains.source.file: {file} has shape [3]; the prior's x has shape [1]"]
    assert not out.exists()


def test_a_campaign_whose_micro_batches_fail_exits_1_and_its_run_is_failed(tmp_path, capsys, monkeypatch):
    """Errors (a micro-batch that kept failing) are not diverged chains: the run fails, in the shell and in MLflow."""
    import mlflow

    import cdm_dist.driver.launch as launch
    from cdm_cli.main import main
    from cdm_dist.driver.worker import LocalExecutor

    class FailingFirstBatch(LocalExecutor):
        def execute(self, jobs, sink):
            sink.on_failed(jobs[0].batch, "RuntimeError: boom\nand a traceback", self.event_shape)
            super().execute(jobs[1:], sink)

    monkeypatch.setattr(launch, "make_executor", lambda config, address=None: FailingFirstBatch(config))
    out, uri = tmp_path / "out", f"sqlite:///{tmp_path}/m.db"
    settings = [f"output={out}", f"tracking.uri={uri}", f"tracking.artifact_location={tmp_path / 'art'}",
                "method.num_steps=4", "method.n_c=8", "method.target_batch=8", "chains.count=4",
                "resources.micro_batch=2", "pictures=false"]  # fmt: skip
    code = main(["run", "--executor", "local", "--quiet", "--json", str(tmp_path / "r.json"),
                 *(a for s in settings for a in ("--set", s))])  # fmt: skip
    assert code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "cdm: error: 1 micro-batch(es) failed, e.g.: RuntimeError: boom"
    summary = json.loads((tmp_path / "r.json").read_text())
    assert summary["failed_micro_batches"] == {"0": "RuntimeError: boom\nand a traceback"}
    assert summary["chains_ok"] == 2  # the other micro-batch's chains are results
    run = mlflow.MlflowClient(uri).get_run(summary["campaign_run_id"])
    assert run.info.status == "FAILED" and run.data.tags["cdm.failed_micro_batches"] == "0"
