"""The `cdm` command line. Bad input: one line naming the field or file, exit status 2."""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.cli import add_bench_parser, run_bench
from cdm_dist.errors import InputError, first_line, input_error_of

UI_BASE = "http://127.0.0.1:5000"  # where `cdm ui` serves with its defaults
EXTRA_SET = "CDM_SET"  # ';'-separated KEY=VALUE applied after a command's own --set (tests shrink campaigns with it)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cdm", description="Conditional distribution matching (MLGD-F) at scale.")
    commands = parser.add_subparsers(dest="command", required=True)

    check = commands.add_parser("check", help="preflight: build the models as the campaign will, take one step")
    check.add_argument("config", help="campaign YAML")
    check.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    check.add_argument("--executor", choices=["local", "ray_colocated", "ray_split"], help="override resources")
    check.add_argument("--address", help="Ray cluster to join (default: RAY_ADDRESS, else a local Ray)")
    check.add_argument("--json", help="write the report here")
    check.add_argument("--plan", action="store_true", help="no weights, no step: per role, each module's "
                       "parameters and weights from its config.json, estimated activations, GPUs that fit")  # fmt: skip

    run = commands.add_parser("run", help="a design campaign: many MLGD-F chains, tracked in MLflow (exit 1 when "
                              "micro-batches kept failing; diverged chains are results)")  # fmt: skip
    run.add_argument("config", nargs="?", help="campaign YAML (see examples/); default: the built-in defaults")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    run.add_argument("--json", help="write the campaign summary and top-k here")
    run.add_argument("--executor", choices=["local", "ray_colocated", "ray_split"], help="override resources")
    run.add_argument("--address", help="Ray cluster to join (default: RAY_ADDRESS, else a local Ray)")
    run.add_argument("--resume", metavar="RUN_ID_OR_DIR", help="finish a campaign whose driver died")
    run.add_argument("--tracking-uri", help="MLflow store to find --resume's run in (default: the config's)")
    run.add_argument("--quiet", action="store_true", help="no progress bar")

    tune = commands.add_parser("tune", help="an Optuna study over campaigns (the config's tune section)")
    tune.add_argument("config", help="campaign YAML with a tune.space section")
    tune.add_argument("--trials", type=int, required=True, help="trials in all (counting earlier ones)")
    tune.add_argument("--parallel", type=int, default=1, help="trials at once")
    tune.add_argument("--storage", help="Optuna storage URL (default: a journal file in the output folder)")
    tune.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    tune.add_argument("--executor", choices=["local", "ray_colocated", "ray_split"])
    tune.add_argument("--address", help="Ray cluster to join")
    tune.add_argument("--json", help="write the study summary here")

    topk = commands.add_parser("topk", help="the best chains by held-out loss across campaigns and trials, each "
                               "chain once, with prior_fit and the problem's metrics")  # fmt: skip
    topk.add_argument("--experiment", help="only this MLflow experiment (default: all)")
    topk.add_argument("-k", type=int, default=10, help="how many chains (default: 10)")
    topk.add_argument("--selected", action="store_true", help="instead, every chain run tagged cdm.selected = true "
                      "(any case) in the MLflow UI; those over their limit are flagged, not left out")  # fmt: skip
    topk.add_argument("--all", dest="every", action="store_true", help="a row per run: otherwise the same chain "
                      "(same problem, method, seed and zeta schedule) in several campaigns or trials is one row, "
                      "naming the other campaigns under 'also'")  # fmt: skip
    topk.add_argument("--keep-over-limit", action="store_true", help="also rank chains whose prior_fit exceeds "
                      "their campaign's selection.prior_fit_limit (x* the prior finds unlikely, as cdm tune's "
                      "tune.prior_fit_limit judges trials); by default they are left out. Either way the 'limit' "
                      "column flags them 'over'")  # fmt: skip
    topk.add_argument("--export", metavar="DIR", help="per chain: x* (.npy), its picture and a YAML that reruns "
                      "exactly that chain (cdm run FILE); a contact sheet of the pictures")  # fmt: skip
    topk.add_argument("--tracking-uri", default=None, help="MLflow store (default: sqlite:///out/mlflow.db)")
    topk.add_argument("--json", help="write the rows here")

    evaluate = commands.add_parser("evaluate", help="a campaign's source and top-k x* on fresh samples: the loss, "
                                   "its improvement over the source, attribute shares")  # fmt: skip
    evaluate.add_argument("campaign", help="the campaign's output folder, or its YAML (then its newest run)")
    evaluate.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                          help="evaluation.*, resources.*, tracking.* or topk")  # fmt: skip
    evaluate.add_argument("--json", help="write the report here too")

    ui = commands.add_parser("ui", help="the MLflow UI on 127.0.0.1 over the run store")
    ui.add_argument("--tracking-uri", default=None, help="MLflow store (default: sqlite:///out/mlflow.db)")
    ui.add_argument("--host", default="127.0.0.1")
    ui.add_argument("--port", type=int, default=5000)
    ui.add_argument("--optuna-storage", help="study journal file or RDB URL for optuna-dashboard "
                    "(default: the newest out/campaigns/study-*/optuna.journal)")  # fmt: skip
    ui.add_argument("--dashboard-port", type=int, default=8080, help="optuna-dashboard port")
    ui.add_argument("--workers", type=_positive_int, help="the MLflow UI's worker processes (default: MLflow's, 4; "
                    "1 starts sooner and serves one user well)")  # fmt: skip

    serve = commands.add_parser("serve", help="team services on 127.0.0.1: an MLflow tracking server on a "
                                "database and optuna-dashboard on the study database")  # fmt: skip
    serve.add_argument("--tracking-db", help="MLflow's database URL (default: $CDM_TRACKING_DB)")
    serve.add_argument("--optuna-storage", help="Optuna's database URL, a second database (default: "
                       "$CDM_OPTUNA_STORAGE); without it, MLflow only")  # fmt: skip
    serve.add_argument("--artifacts", default="out/mlartifacts", help="folder the MLflow server stores and serves "
                       "artifacts from")  # fmt: skip
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 only if you mean it)")
    serve.add_argument("--port", type=int, default=5000, help="MLflow server port")
    serve.add_argument("--dashboard-port", type=int, default=8080, help="optuna-dashboard port")

    train = commands.add_parser("train", help="train a problem's learned prior or fast sampler (accelerate, EMA)")
    train.add_argument("role", choices=["prior", "sampler", "judge", "reader"], help="judge: the digits judge (a "
                       "rotation-robust CNN, cdm_dist/problems/judge.py); reader: the upright-digit classifier that "
                       "labels the digits sampler's training data")  # fmt: skip
    train.add_argument("--problem", required=True, help="a built-in problem (gmm2d, gmm5d, gmm10d, digits, scribbles)")
    train.add_argument("--out", required=True, help="new checkpoint folder (config, safetensors, manifest.json)")
    train.add_argument("--steps", type=int, default=None, help="optimiser steps (default: the problem's)")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], default=None, help="GPU only")
    train.add_argument("--tiny", action="store_true", help="a tiny network, for smoke tests")
    train.add_argument("--cpu", action="store_true", help="train on CPU even when a GPU is present")
    train.add_argument("--kind", choices=["flow", "one_step"], default="flow", help="sampler: a rectified flow, or "
                       "the one-step distillation of a teacher flow")  # fmt: skip
    train.add_argument("--teacher", help="one_step: the flow sampler folder to distil (default: the shipped one)")

    baseline = commands.add_parser("baseline", help="a baseline on an editing campaign's wall clock: sdedit (SDEdit "
                                   "variations of the source, the best by held-out loss)")  # fmt: skip
    baseline.add_argument("method", choices=["sdedit"])
    baseline.add_argument("campaign", help="the finished editing campaign's folder, or its YAML (its newest run)")
    baseline.add_argument("--seconds", type=float, help="time budget (default: the campaign's measured wall clock)")
    baseline.add_argument("--executor", choices=["local", "ray_colocated", "ray_split"], help="override resources")
    baseline.add_argument("--address", help="Ray cluster to join (default: RAY_ADDRESS, else a local Ray)")
    baseline.add_argument("--json", help="write the result here too")
    baseline.add_argument("--quiet", action="store_true", help="no progress")

    add_bench_parser(commands)
    return parser


def _check(args: argparse.Namespace) -> int:
    """`cdm check`: resolve the spec as the campaign's workers will, take one guided step, report per role;
    `--plan`: the campaign's memory plan from its models' config.json files (no weights, no step)."""
    from cdm_dist.driver.campaign import load_config
    from cdm_dist.driver.runner import write_json

    if args.plan:
        from cdm_dist.driver.plan import format_plan, plan_file

        plan = plan_file(args.config, args.overrides, args.executor)
        print(format_plan(plan))
        if args.json:
            write_json(args.json, plan)
        return 0
    from cdm_dist.driver.preflight import check_campaign, format_check

    config = load_config(args.config, args.overrides, args.executor)
    report = check_campaign(config, args.address)
    print(format_check(report))
    if args.json:
        write_json(args.json, report)
    return 0


def _run(args: argparse.Namespace) -> int:
    """`cdm run`: validate everything, then launch (or resume) the campaign and print the top-k."""
    from cdm_dist.driver.campaign import TrackingConfig, check_config, check_resume, load_config
    from cdm_dist.driver.store import CampaignStore

    if args.resume:
        folder = Path(args.resume)
        if not folder.is_dir():
            from cdm_dist.driver.tracking import find_campaign

            uri = args.tracking_uri or TrackingConfig().uri
            if args.config:
                uri = load_config(args.config, args.overrides).tracking.uri
            folder = find_campaign(args.resume, uri)
        store = CampaignStore.open(folder)
        config = load_config(store.config_path, args.overrides, args.executor)
        check_resume(load_config(store.config_path), config)
    else:
        config = load_config(args.config, args.overrides, args.executor)
        store = None
    check_config(config)
    from cdm_dist.driver.launch import make_executor
    from cdm_dist.driver.preflight import describe_reading, probe_step
    from cdm_dist.driver.report import format_topk, loss_meaning, over_limit
    from cdm_dist.driver.runner import run_campaign, write_json

    executor = make_executor(config, args.address)  # workers build their models; bad input stops here
    try:
        probe = probe_step(config, executor)  # one checked guided step on two chains, before anything is written
        if probe["prior_reading"] and not args.quiet:
            print(describe_reading(probe["prior_reading"]), flush=True)
        store = store or CampaignStore.create(config)
        report = run_campaign(config, executor, store, progress=not args.quiet)
    finally:
        executor.close()
    summary = report.to_json()
    print(
        f"campaign {report.campaign_run_id or store.root.name}: {summary['chains_ok']}/{summary['chains_total']} "
        f"chains ok, {summary['chain_steps_per_s']:.1f} chain-steps/s on {report.executor}; folder {store.root}"
    )
    if report.topk:
        print(f"top {len(report.topk)} by {loss_meaning(config.method.loss, config.method.heldout_samples)}")
        print(format_topk(report.topk))
    limit = config.selection.prior_fit_limit
    over = sum(over_limit(row, limit) for row in report.rows if not row.failed)
    if over:
        print(f"left out: {over} chain(s) whose prior_fit exceeds selection.prior_fit_limit {limit:g}")
    if config.tracking.enabled:
        print(_next_steps(config, report, store.root))
    if args.json:
        write_json(args.json, summary)
    if report.failed_batches:  # errors, not diverged chains (those are results): the run failed
        first = (next(iter(report.failed_batches.values())).strip().splitlines() or ["?"])[0]
        print(f"cdm: error: {len(report.failed_batches)} micro-batch(es) failed, e.g.: {first}", file=sys.stderr)
        return 1
    return 0


def _next_steps(config: Any, report: Any, folder: Path) -> str:
    """The end of `cdm run`: the store and folder, the UI link to this campaign's chains, the top-k command."""
    from cdm_dist.driver import preconditions
    from cdm_dist.driver.campaign import TrackingConfig
    from cdm_dist.driver.report import format_next_steps

    tracking = config.tracking
    urls = None
    if report.campaign_run_id is not None and report.experiment_id is not None:
        from cdm_dist.driver.ui_links import chains_view_url, gallery_view_url

        view = (UI_BASE, report.experiment_id, report.campaign_run_id)
        urls = chains_view_url(*view), gallery_view_url(*view)
    store = preconditions.redacted(tracking.uri)
    return format_next_steps(store, tracking.uri == TrackingConfig().uri, tracking.experiment, str(folder), urls)


def _tune(args: argparse.Namespace) -> int:
    """`cdm tune`: run (or finish) a study of `--trials` trials in all."""
    from cdm_dist.driver.campaign import load_config
    from cdm_dist.driver.runner import write_json

    if args.trials < 1 or args.parallel < 1:
        raise InputError(f"--trials and --parallel: must be >= 1, got {args.trials} and {args.parallel}")
    config = load_config(args.config, args.overrides, args.executor)
    from cdm_dist.driver.launch import make_executor
    from cdm_dist.driver.preflight import probe_step
    from tuning.storage import check_storage
    from tuning.study import Tuner, study_config

    config = study_config(config)
    check_storage(args.storage, config.tune)
    executor = make_executor(config, args.address)  # one pool of workers for every trial
    try:
        probe_step(config, executor)  # one checked guided step before the study's storage or any run is made
        result = Tuner(config, args.storage, args.address, executor).run(args.trials, args.parallel)
    finally:
        executor.close()
    summary = result.to_json()
    print(
        f"study {result.study}: {result.complete} complete, {result.pruned} pruned, {result.failed} failed; "
        f"storage {result.storage}"
    )
    if result.best_config is not None:
        value = result.best_value if isinstance(result.best_value, list) else f"{result.best_value:.5g}"
        print(f"  objective: {result.objective}")
        print(f"  best: trial {result.best_trial}, {value}, with {result.best_params}")
        print(f"  run it: cdm run {result.best_config}")
    else:
        print("  no best trial yet (no complete trial within the limits)")
    if result.prior_fit_limit is not None:
        print(f"  {result.infeasible} complete trials broke the prior_fit limit {result.prior_fit_limit:.4g}")
    for point in result.pareto:
        print(f"  pareto: trial {point['number']} (loss, compute) = {point['values']} {point['params']}")
    if args.json:
        write_json(args.json, summary)
    return 0


def _topk(args: argparse.Namespace) -> int:
    """`cdm topk`: a table of the best chains, each once; --export writes x*, pictures, rerun YAMLs, a contact
    sheet."""
    from cdm_dist.driver import preconditions
    from cdm_dist.driver.campaign import TrackingConfig
    from cdm_dist.driver.runner import write_json
    from cdm_dist.driver.selection import export, format_candidates, rows_json, select

    if args.k < 1:
        raise InputError(f"-k: must be >= 1, got {args.k}")
    uri = args.tracking_uri or TrackingConfig().uri
    preconditions.tracking_store(uri, "--tracking-uri", must_exist=True)
    selection = select(uri, args.experiment, args.k, args.selected, args.every, args.keep_over_limit)
    candidates = selection.candidates
    if args.export:
        print(f"contact sheet: {export(candidates, uri, args.export)}")
    print(format_candidates(candidates))
    if selection.left_out:
        print(f"left out: {selection.left_out} chain run(s) ranked among these whose prior_fit exceeds their "
              "campaign's selection.prior_fit_limit (--keep-over-limit lists them)")  # fmt: skip
    if args.json:
        write_json(args.json, rows_json(candidates))
    return 0


def campaign_folder(text: str) -> Path:
    """A campaign folder, or a campaign YAML: then the newest folder its runs made (output/<name>-<time>-<hex>)."""
    path = Path(text)
    if path.is_dir():
        return path
    if path.is_file() and path.suffix in (".yaml", ".yml"):
        from cdm_dist.driver.campaign import load_config

        config = load_config(path)
        stamp = re.compile(re.escape(config.name) + r"-\d{8}-\d{6}-[0-9a-f]{4}")
        runs = sorted(p for p in Path(config.output).glob(f"{config.name}-*") if stamp.fullmatch(p.name))
        if not runs:
            raise InputError(f"{path}: no run of campaign {config.name!r} in {config.output} yet (cdm run {path})")
        return runs[-1]  # the names sort by their time stamp
    raise InputError(f"{text}: not a campaign folder or campaign YAML")


def _evaluate(args: argparse.Namespace) -> int:
    """`cdm evaluate`: the source's and top-k x*'s loss, improvement and attribute shares on fresh samples."""
    from cdm_dist.driver.evaluation import evaluate_campaign, format_evaluation
    from cdm_dist.driver.runner import write_json

    report = evaluate_campaign(campaign_folder(args.campaign), args.overrides)
    print(format_evaluation(report))
    if args.json:
        write_json(args.json, report)
    return 0


def _baseline(args: argparse.Namespace) -> int:
    """`cdm baseline sdedit CAMPAIGN`: the time-matched SDEdit search, printed beside the campaign's best."""
    from cdm_dist.driver.runner import write_json
    from cdm_dist.driver.sdedit import format_sdedit, sdedit_search

    folder = campaign_folder(args.campaign)
    result = sdedit_search(folder, args.seconds, args.executor, args.address, progress=not args.quiet)
    print(format_sdedit(result))
    print(f"written: {folder / 'sdedit.json'}")
    if args.json:
        write_json(args.json, result)
    return 0


def _ui(args: argparse.Namespace) -> int:
    """`cdm ui`: the MLflow UI (and optuna-dashboard over a study storage, when installed) on 127.0.0.1.

    Each server runs in its own process group, stopped as a whole when `cdm ui` ends (Ctrl-C or SIGTERM), so no
    server outlives it."""
    from cdm_dist.driver import preconditions
    from cdm_dist.driver.campaign import TrackingConfig
    from cdm_dist.driver.selection import reader
    from cdm_dist.driver.tracking import resolve_uri
    from cdm_dist.driver.ui_links import chains_view_url, gallery_view_url, newest_campaign, refresh_views

    given = args.tracking_uri or TrackingConfig().uri
    preconditions.tracking_store(given, "--tracking-uri", must_exist=True)  # a missing store is not made
    uri = resolve_uri(given)
    client = reader(uri)
    campaign = newest_campaign(client)
    if campaign is None:
        raise InputError(f"--tracking-uri: no campaign in {preconditions.redacted(uri)} yet (cdm run CONFIG makes one)")
    command = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri]
    command += ["--host", args.host, "--port", str(args.port)]
    if args.workers is not None:
        command += ["--workers", str(args.workers)]
    commands = {f"MLflow UI on http://{args.host}:{args.port} over {preconditions.redacted(uri)}": command}
    dashboard = _optuna_dashboard_command(args)
    if dashboard is not None:
        storage, command = dashboard
        where = f"http://{args.host}:{args.dashboard_port} over {preconditions.redacted(storage)}"
        commands[f"optuna-dashboard on {where}"] = command
    ports = {args.port: "--port"} | ({args.dashboard_port: "--dashboard-port"} if dashboard else {})
    _ports_free(ports, args.host)
    refresh_views(client, campaign)  # views of a campaign older than them, or still running
    base, experiment, run_id = f"http://{args.host}:{args.port}", campaign.info.experiment_id, campaign.info.run_id
    store = "" if args.tracking_uri is None else f" --tracking-uri {preconditions.redacted(given)}"
    print(f"newest campaign: {campaign.info.run_name} (run {run_id})")
    print(f"  its chains, by final_loss: {chains_view_url(base, experiment, run_id)}")
    print(f"  its gallery (top 10):      {gallery_view_url(base, experiment, run_id)}")
    print(f"  to select: tag chain runs cdm.selected=true in the UI, then: cdm topk --selected --export DIR{store}")
    return _run_servers(commands, ports, args.host)


def _serve(args: argparse.Namespace) -> int:
    """`cdm serve`: an MLflow tracking server on a database (artifacts served from a local folder) and, over the
    Optuna database, optuna-dashboard; on 127.0.0.1 unless --host says otherwise. Stopped together (Ctrl-C)."""
    import os

    from cdm_dist.driver import preconditions

    tracking = args.tracking_db or os.environ.get("CDM_TRACKING_DB")
    storage = args.optuna_storage or os.environ.get("CDM_OPTUNA_STORAGE")
    if not tracking:
        raise InputError(
            "--tracking-db: required (or set CDM_TRACKING_DB), e.g. postgresql+psycopg2://user@host/mlflow"
        )
    if storage and storage.rstrip("/") == tracking.rstrip("/"):
        raise InputError("--optuna-storage: must be another database than --tracking-db (MLflow and Optuna each "
                         "keep their own alembic_version table)")  # fmt: skip
    for flag, url in (("--tracking-db", tracking), ("--optuna-storage", storage)):
        if url:
            _database_answers(flag, url)
    artifacts = Path(args.artifacts).resolve()
    preconditions.writable_folder(str(artifacts), "--artifacts")
    ports = {args.port: "--port"} | ({args.dashboard_port: "--dashboard-port"} if storage else {})
    _ports_free(ports, args.host)
    executable = _optuna_dashboard_executable()
    if storage and executable is None:
        raise InputError("--optuna-storage: optuna-dashboard is not installed (pip install 'cdm-dist[dashboard]')")
    if storage:  # optuna-dashboard expects Optuna's tables: a new database gets them here, once nothing can refuse
        import optuna

        try:
            optuna.storages.RDBStorage(storage, engine_kwargs={"connect_args": preconditions.connect_args(storage)})
        except Exception as exc:
            reason = preconditions.masked(first_line(exc), storage)
            raise InputError(f"--optuna-storage: cannot open {preconditions.redacted(storage)} ({reason})") from None
    backend = preconditions.with_connect_timeout(tracking)
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend, "--serve-artifacts",
               "--artifacts-destination", str(artifacts), "--host", args.host, "--port", str(args.port),
               "--workers", "2"]  # fmt: skip
    where = f"http://{args.host}:{args.port} over {preconditions.redacted(tracking)}"
    commands = {f"MLflow tracking server on {where}": command}
    if storage:
        line = f"optuna-dashboard on http://{args.host}:{args.dashboard_port} over {preconditions.redacted(storage)}"
        dashboard = preconditions.with_connect_timeout(storage)
        commands[line] = [executable, dashboard, "--host", args.host, "--port", str(args.dashboard_port), "--quiet"]
    return _run_servers(commands, ports, args.host)


def _database_answers(flag: str, url: str) -> None:
    """Connect once: an unreachable or misspelled database is one line before anything starts."""
    from cdm_dist.driver import preconditions

    try:
        preconditions.database_tables(url)
    except Exception as exc:
        raise InputError(f"{flag}: cannot connect to {preconditions.redacted(url)} ({first_line(exc)})") from None


def _run_servers(commands: dict[str, list[str]], ports: dict[int, str], host: str) -> int:
    """Start each server in its own process group once every port is free; wait on the first; stop them all (and
    only them) when it ends, on Ctrl-C or on SIGTERM."""
    import signal
    import subprocess
    import time

    from cdm_dist.driver.processes import stop_process_group

    _ports_free(ports, host)
    servers = {}
    for line, command in commands.items():
        print(line, flush=True)
        servers[line.split(" on ")[0]] = subprocess.Popen(command, start_new_session=True)

    def stop(*_: object) -> None:
        raise KeyboardInterrupt

    # Ctrl-C too: a process started in the background by a shell inherits SIGINT ignored, and Python then installs
    # no KeyboardInterrupt for it, so without this handler the servers would outlive a Ctrl-C sent to it.
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    try:
        while True:  # until one server ends (then the others are stopped too) or we are told to stop
            for name, server in servers.items():
                if server.poll() is not None:
                    print(f"cdm: {name} exited with status {server.returncode}; stopping the others", file=sys.stderr)
                    return 1 if server.returncode else 0
            time.sleep(0.5)
    except KeyboardInterrupt:
        return 0
    finally:
        for server in servers.values():
            stop_process_group(server)


def _ports_free(ports: dict[int, str], host: str) -> None:
    """Every port can be bound on host (one line naming the flag of the first that cannot)."""
    import socket

    for port, flag in ports.items():
        with socket.socket() as probe:
            try:
                probe.bind((host, port))
            except OSError as exc:
                raise InputError(f"{flag}: {host}:{port} is not free ({exc.strerror})") from None


def _optuna_dashboard_executable() -> str | None:
    """optuna-dashboard on PATH or beside this Python (a venv not on PATH), else None."""
    import shutil

    executable = shutil.which("optuna-dashboard") or str(Path(sys.executable).parent / "optuna-dashboard")
    return executable if Path(executable).is_file() else None


def _optuna_dashboard_command(args: argparse.Namespace) -> tuple[str, list[str]] | None:
    """The study storage and the optuna-dashboard command over it (`--optuna-storage`, else the newest study
    journal), or None with a note."""
    from cdm_dist.driver import preconditions

    storage = args.optuna_storage
    if storage is None:
        journals = sorted(Path("out/campaigns").glob("study-*/optuna.journal"), key=lambda p: p.stat().st_mtime)
        if not journals:
            return None
        storage = str(journals[-1])
    elif "://" not in storage and not Path(storage).is_file():
        raise InputError(f"--optuna-storage: {preconditions.redacted(storage)} is not a file or a storage URL")
    executable = _optuna_dashboard_executable()
    if executable is None:
        print("optuna-dashboard is not installed (pip install 'cdm-dist[dashboard]'); MLflow UI only", flush=True)
        return None
    return storage, [executable, storage, "--host", args.host, "--port", str(args.dashboard_port), "--quiet"]


def _train(args: argparse.Namespace, argv: Sequence[str] | None) -> int:
    """`cdm train`: one model, saved with its manifest (which records this exact command)."""
    import shlex
    from dataclasses import replace

    from cdm_dist.problems.training import train, training_data

    settings = None
    training_data(args.problem)  # an unknown problem fails before anything is built
    command = shlex.join(["cdm", *(sys.argv[1:] if argv is None else argv)])
    if args.role in ("judge", "reader"):
        from cdm_dist.problems.judge import train_judge

        manifest = train_judge(args.problem, args.out, args.steps, args.seed, command, role=args.role)
        print(f"{args.role} for {args.problem}: final training loss {manifest['final_training_loss']:.5f}; {args.out}")
        print(json.dumps(manifest["quality"], indent=1))
        return 0
    if args.mixed_precision:
        from cdm_dist.problems.training import settings_for

        settings = replace(settings_for(args.problem, args.role, args.kind), mixed_precision=args.mixed_precision)
    manifest = train(args.role, args.problem, args.out, args.steps, args.seed, settings, args.tiny, args.cpu, command,
                     kind=args.kind, teacher=args.teacher)  # fmt: skip
    print(f"{args.role} for {args.problem}: final training loss {manifest['final_training_loss']:.5f}; {args.out}")
    print(json.dumps(manifest["quality"], indent=1))
    return 0


def _check_paths(args: argparse.Namespace) -> None:
    """Every output path a command writes can be written, before the command starts anything."""
    from cdm_dist.driver import preconditions

    if getattr(args, "json", None):
        preconditions.writable_file(args.json, "--json")
    if getattr(args, "export", None):
        preconditions.writable_folder(args.export, "--export")
    if args.command == "train":
        preconditions.writable_folder(args.out, "--out")


def main(argv: Sequence[str] | None = None) -> int:
    """Run one `cdm` command; its exit status (2 for bad input, one line on stderr)."""
    args = build_parser().parse_args(argv)
    if hasattr(args, "overrides"):  # e.g. the test that runs the README's commands as written, at a tiny size
        args.overrides += [item for item in os.environ.get(EXTRA_SET, "").split(";") if item.strip()]
    try:
        _check_paths(args)
        if args.command == "train":
            return _train(args, argv)
        return COMMANDS[args.command](args)
    except Exception as exc:
        cause = input_error_of(exc)  # bad input, also when a Ray worker met it
        if cause is None:
            raise
        print(f"cdm: error: {cause}", file=sys.stderr)
        return 2


COMMANDS = {
    "check": _check,
    "run": _run,
    "tune": _tune,
    "topk": _topk,
    "evaluate": _evaluate,
    "baseline": _baseline,
    "ui": _ui,
    "serve": _serve,
    "bench": run_bench,
}


if __name__ == "__main__":
    sys.exit(main())
