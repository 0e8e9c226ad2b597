"""Every `cdm` command in the README runs as written on the stated 2-core machine: each is run here, in a folder
that holds the repository's examples/, at a tiny size set only through CDM_SET (the test's overrides, applied after
the command's own). Commands that cannot run here say why in SKIPPED, and a README command that is in neither list
fails the test."""

import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TINY = "chains.count=2;method.num_steps=6;method.n_c=8;method.target_batch=8;resources.replicas=1;" + (
    "resources.num_cpus=0.5;chains.zeta=[{kind: linear, scale: 1.0, final: 0.1}]"
)
RUN = [  # in order: later ones read what earlier ones wrote (the store, a study)
    "cdm run examples/quick.yaml --json out/quick.json",
    "cdm run examples/quick.yaml",
    "cdm run examples/quick.yaml --executor ray_split --set resources.replicas=1",
    "cdm run examples/quick.yaml --executor local --set chains.count=64 --set method.n_c=128",
    "cdm run examples/gmm2d_learned.yaml",
    "cdm run examples/digits.yaml",
    "cdm tune examples/tune_gmm5d.yaml --trials 20 --parallel 2 --json out/tune.json",
    "cdm topk -k 10 --export out/selected --json out/topk.json",
    "cdm topk --selected --export out/selected",  # after the test tags a chain run, as a user does in the UI
]
SKIPPED = {
    "cdm run examples/gmm5d_split_gpus.yaml --address HEAD:6379": "needs a cluster (HEAD is a placeholder)",
    "cdm run --resume CAMPAIGN_RUN_ID": "a placeholder; resume is tested in tests/cdm_dist/driver/test_crashes.py",
    "cdm tune examples/tune_gmm5d.yaml --trials 20 --storage postgresql://user:pw@db/optuna": "needs a PostgreSQL "
    "server (tests/tuning/test_study.py runs studies on a throwaway one)",
    "cdm tune examples/tune_digits.yaml --trials 20 --parallel 2": "the same command as tune_gmm5d on another problem; "
    "the digits problem runs above",
    "cdm ui": "a server; tests/tuning/test_ui_browser.py opens it in a browser",
    "cdm ui --optuna-storage out/campaigns/study-tune-gmm5d/optuna.journal": "a server (as above)",
    "cdm check examples/editing_tiny.yaml": "tests/cdm_cli/test_editing.py runs the editing example's commands",
    "cdm run examples/editing_tiny.yaml": "as above",
    "cdm baseline sdedit examples/editing_tiny.yaml": "as above",
    "cdm evaluate examples/editing_tiny.yaml": "as above",
    "cdm run examples/scribbles.yaml": "tests/benchmarks/test_scribbles.py runs this example's run, SDEdit search and "
    "evaluation on Ray at a tiny size (the shipped models' run as written: `cdm bench scribbles`)",
    "cdm baseline sdedit examples/scribbles.yaml": "as above",
    "cdm evaluate examples/scribbles.yaml": "as above",
}
BENCH = "minutes to half an hour as written; each bench's --quick form runs in tests/benchmarks"


def readme_commands() -> list[str]:
    """The `cdm ...` lines of the README's bash blocks (comments and leading installs cut)."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S):
        for line in block.splitlines():
            line = line.split("  #")[0].split(" # ")[0].strip()
            line = line.split("&& ")[-1] if "&& cdm " in line else line
            if line.startswith("cdm "):
                commands.append(" ".join(line.split()))
    return commands


def test_every_readme_command_is_run_or_says_why_not():
    unhandled = [c for c in readme_commands() if c not in RUN and c not in SKIPPED and not c.startswith("cdm bench")]
    assert unhandled == [], f"README commands this test neither runs nor skips: {unhandled}"
    assert [c for c in RUN if c not in readme_commands()] == []  # the list follows the README


def test_the_readmes_commands_run_as_written(ray_cluster, tmp_path, monkeypatch, capsys):
    """In this process, on the session's 2-CPU Ray (as a fresh `cdm` would start one), so imports are paid once."""
    from mlflow.tracking import MlflowClient

    from cdm_cli.main import main

    (tmp_path / "examples").symlink_to(ROOT / "examples")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CDM_SET", TINY)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    for command in RUN:
        if "--selected" in command:  # what a user does in the UI first
            client = MlflowClient(f"sqlite:///{tmp_path}/out/mlflow.db")
            experiments = [e.experiment_id for e in client.search_experiments()]
            ok_chains = "tags.`cdm.kind` = 'chain' and tags.status = 'ok'"
            (chain,) = client.search_runs(experiments, ok_chains, max_results=1)
            client.set_tag(chain.info.run_id, "cdm.selected", "true")
        status = main(shlex.split(command)[1:])
        assert status == 0, f"{command}\n{capsys.readouterr().err[-3000:]}"
    assert (tmp_path / "out" / "quick.json").is_file() and (tmp_path / "out" / "tune.json").is_file()
    assert any((tmp_path / "out" / "selected").iterdir())


@pytest.mark.parametrize("command", [c for c in readme_commands() if c.startswith("cdm bench")])
def test_bench_commands_parse(command):
    from cdm_cli.main import build_parser

    args = build_parser().parse_args(shlex.split(command)[1:])
    assert args.command == "bench", BENCH
