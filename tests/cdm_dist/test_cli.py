import json
import subprocess
import sys

import pytest

from cdm_dist.cli import main


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
        "success_rate",
    }
    for row in payload["rows"]:
        assert keys <= set(row)
        assert row["dim"] == 2 and row["chains"] == 2
    assert (tmp_path / "bench.md").read_text().startswith("| method |")
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
    done = subprocess.run([sys.executable, "-m", "cdm_dist.cli", "bench", "nope"], capture_output=True, text=True)
    assert done.returncode == 2
