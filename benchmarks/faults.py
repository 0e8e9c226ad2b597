"""`cdm bench faults`: a campaign on split Ray actors whose actors are killed at random moments and whose driver is
SIGKILLed and resumed, repeated; against the same campaign unfaulted.

Each repeat runs `cdm run` in a child process with a chaos thread that kills random actors (ray.kill, Ray restarts
them), kills that driver at a random moment, then runs `cdm run --resume` (with its own actor kills) to the end.
Reported per repeat: chains completed, chains identical to the unfaulted run, complete MLflow runs (one finished
child run per chain with its final_loss and no repeated history point), and the chain-steps the faults cost.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.report import markdown_table, write_report

CHAOS = """
import json, os, random, sys, threading, time
import ray
import actors.coordinator as coordinator
import cdm_dist.driver.runner as runner
from cdm_cli.main import main

seed, kills, log = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]

def note(**event):
    with open(log, "a") as handle:
        handle.write(json.dumps(event) + "\\n")

execute = coordinator.RayExecutor.execute

working = threading.Event()  # set at the first chunk: kills land during the work, not during start-up

def chaotic(self, jobs, sink):
    rng = random.Random(seed)
    def chaos():
        working.wait()
        for _ in range(kills):
            time.sleep(rng.uniform(0.2, 1.5))
            replica = rng.choice(self.replicas)
            actor = rng.choice(replica.actors)
            ray.kill(actor, no_restart=False)
            note(kill=1)
    threading.Thread(target=chaos, daemon=True).start()
    return execute(self, jobs, sink)

coordinator.RayExecutor.execute = chaotic
on_chunk = runner.CampaignDriver.on_chunk

def counted(self, batch, chunk):
    note(steps=len(batch.chains) * chunk.losses.shape[1])  # counted once computed, before the driver keeps the
    on_chunk(self, batch, chunk)  # chunk: a kill between the two re-runs it on resume, counted twice, never zero times
    working.set()

runner.CampaignDriver.on_chunk = counted
sys.exit(main(sys.argv[4:]))
"""


def _settings(quick: bool) -> list[str]:
    chains, steps = (8, 12) if quick else (16, 30)
    return [
        "name=faults", f"chains.count={chains}", f"method.num_steps={steps}", "method.n_c=32", "method.target_batch=32",
        "method.n_guess=2", "resources.placement=split", "resources.in_flight=2", "resources.micro_batch=4",
        "resources.checkpoint_every=4", "resources.max_restarts=20", "resources.max_retries=1",
        "resources.num_cpus=0.5",
    ]  # fmt: skip


def _leg(
    root: Path, args: list[str], seed: int, kills: int, log: Path, kill_at_steps: int | None, address: str | None
) -> dict[str, Any]:
    """One `cdm run` in a child process (its own session) with `kills` actor kills; SIGKILLed once the chain-steps
    in its log reach kill_at_steps. It starts a local Ray, or joins the one at `address` (RAY_ADDRESS)."""
    command = [sys.executable, "-c", CHAOS, str(seed), str(kills), str(log), *args]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | ({"RAY_ADDRESS": address} if address else {})
    tic = time.perf_counter()
    process = subprocess.Popen(command, cwd=root, start_new_session=True, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True, env=env)  # fmt: skip
    killed = False
    while kill_at_steps is not None and process.poll() is None:
        if _events(log)[1] >= kill_at_steps:
            process.send_signal(signal.SIGKILL)  # the driver alone, as a crash would
            killed = True
            break
        time.sleep(0.02)
    _, err = process.communicate()
    if killed:
        time.sleep(1.0)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)  # Ray's agents outlive a killed driver: clear them
    return {"killed": killed, "seconds": time.perf_counter() - tic, "returncode": process.returncode, "stderr": err}


def _events(log: Path) -> tuple[int, int]:
    """(actor kills, chain-steps) a leg's chaos thread and driver wrote down."""
    kills = steps = 0
    if log.is_file():
        for line in log.read_text().splitlines():
            event = json.loads(line)
            kills += event.get("kill", 0)
            steps += event.get("steps", 0)
    return kills, steps


def _mlflow_complete(uri: str, experiment: str, chains: int) -> int:
    """Chains with exactly one finished child run, a single final_loss and no repeated loss step."""
    from cdm_dist.driver.tracking import client_for

    client = client_for(uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return 0
    runs = client.search_runs([found.experiment_id], "tags.`cdm.kind` = 'chain'", max_results=10_000)
    per_chain: dict[int, list[Any]] = {}
    for run in runs:
        per_chain.setdefault(int(run.data.tags["cdm.chain"]), []).append(run)
    complete = 0
    for chain in range(chains):
        (run,) = per_chain.get(chain, [None]) if len(per_chain.get(chain, [])) <= 1 else (None,)
        if run is None or run.info.status != "FINISHED":
            continue
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "loss")]
        finals = client.get_metric_history(run.info.run_id, "final_loss")
        complete += len(finals) == 1 and len(steps) == len(set(steps))
    return complete


def bench_faults(
    json_path: str | None, repeats: int = 5, kills: int = 3, quick: bool = False, address: str | None = None
) -> dict[str, Any]:
    """Every repeat against the unfaulted campaign; JSON + markdown. Each `cdm run` starts its own local Ray, or
    joins the cluster at `address` (the tests' session Ray: a killed driver's actors die with its job)."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        base = _settings(quick)

        def args(name: str) -> list[str]:
            sets = [*base, f"output={root / name}", f"tracking.uri=sqlite:///{root / name}.db",
                    f"tracking.artifact_location={root / name}-art", f"tracking.experiment={name}"]  # fmt: skip
            return ["run", "--quiet", "--json", str(root / f"{name}.json"), *[a for s in sets for a in ("--set", s)]]

        reference = _leg(root, args("reference"), 0, 0, root / "reference.log", None, address)
        if reference["returncode"] != 0:
            raise RuntimeError(f"the unfaulted campaign failed: {reference['stderr'][-2000:]}")
        clean_steps = _events(root / "reference.log")[1]
        summary = json.loads((root / "reference.json").read_text())
        want, chains = chains_of(Path(summary["output_dir"])), summary["chains_total"]
        for repeat in range(repeats):
            rng = random.Random(repeat)
            name = f"faulted{repeat}"
            kill_at = int(rng.uniform(0.2, 0.8) * clean_steps)
            first = _leg(root, args(name), repeat, kills, root / f"{name}.log", kill_at, address)
            first_steps = _events(root / f"{name}.log")[1]
            (folder,) = (root / name).iterdir()
            second = _leg(root, ["run", "--resume", str(folder), "--quiet", "--json", str(root / f"{name}.json")],
                          1000 + repeat, kills, root / f"{name}.log", None, address)  # fmt: skip
            actor_kills, steps = _events(root / f"{name}.log")
            got = json.loads((root / f"{name}.json").read_text()) if second["returncode"] == 0 else None
            rows.append(
                _row(repeat, got, want, chains, first, second, actor_kills, steps, clean_steps, root, name, first_steps)
            )
    totals = {
        "repeats": repeats,
        "chains": chains * repeats,
        "chains_completed": sum(r["chains_completed"] for r in rows),
        "chains_identical": sum(r["chains_identical"] for r in rows),
        "mlflow_runs_complete": sum(r["mlflow_runs_complete"] for r in rows),
        "actor_kills": sum(r["actor_kills"] for r in rows),
        "driver_kills": sum(r["driver_killed"] for r in rows),
        "extra_chain_steps": sum(r["extra_chain_steps"] for r in rows),
        "unfaulted_chain_steps": clean_steps * repeats,
    }
    payload = {"rows": rows, "totals": totals, "settings": _settings(quick), "quick": quick}
    columns = ["repeat", "actor_kills", "driver_killed", "driver_killed_at_steps", "chains_completed",
               "chains_identical", "mlflow_runs_complete", "chain_steps_run", "extra_chain_steps"]  # fmt: skip
    markdown = markdown_table(rows, columns) + "\n" + markdown_table([totals], list(totals))
    write_report(payload, json_path, markdown)
    return payload


def chains_of(folder: Path) -> dict[int, tuple[np.ndarray, float, bool]]:
    """Every chain of a finished campaign folder: x*, held-out loss and failed, from its result files."""
    import torch
    import yaml

    size = yaml.safe_load((folder / "config.yaml").read_text())["resources"]["micro_batch"]
    chains = {}
    for path in sorted((folder / "results").glob("mb*.pt")):
        payload = torch.load(path, weights_only=True)
        first = int(path.stem.removeprefix("mb")) * size
        for row in range(len(payload["x"])):
            chains[first + row] = (
                payload["x"][row].numpy(),
                float(payload["final_loss"][row]),
                bool(payload["failed"][row]),
            )
    return chains


def _row(
    repeat: int,
    got: dict[str, Any] | None,
    want: dict[int, tuple[np.ndarray, float, bool]],
    chains: int,
    first: dict[str, Any],
    second: dict[str, Any],
    actor_kills: int,
    steps: int,
    clean_steps: int,
    root: Path,
    name: str,
    first_steps: int,
) -> dict[str, Any]:
    faulted = chains_of(Path(got["output_dir"])) if got else {}
    identical = sum(
        1
        for chain, (x, loss, failed) in faulted.items()
        if chain in want and np.array_equal(x, want[chain][0]) and loss == want[chain][1] and failed == want[chain][2]
    )
    return {
        "repeat": repeat,
        "actor_kills": actor_kills,
        "driver_killed": first["killed"],
        "driver_killed_after_s": round(first["seconds"], 2),
        "driver_killed_at_steps": first_steps,
        "chains_completed": sum(1 for _, _, failed in faulted.values() if not failed),
        "chains_identical": identical,
        "mlflow_runs_complete": _mlflow_complete(f"sqlite:///{root / name}.db", name, chains),
        "chain_steps_run": steps,
        "extra_chain_steps": steps - clean_steps,
        "resume_returncode": second["returncode"],
    }
