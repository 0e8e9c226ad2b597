"""`cdm bench NAME`: the benchmarks' command-line flags, their checks, and which benchmark each name runs."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from cdm_dist.errors import InputError


def int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def device_argument(text: str) -> str:
    import torch

    if text.startswith("cuda") and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"device {text!r}: CUDA is not available on this machine")
    if not (text == "cpu" or text.startswith("cuda")):
        raise argparse.ArgumentTypeError(f"device {text!r}: expected 'cpu' or 'cuda[:N]'")
    return text


def add_bench_parser(commands: Any) -> None:
    """The `bench` command and one sub-command per benchmark, on the `cdm` parser's sub-commands."""
    bench = commands.add_parser("bench", help="run a benchmark (writes JSON + markdown)")
    benches = bench.add_subparsers(dest="bench", required=True)
    gmm = benches.add_parser("gmm", help="MLGD-F, MLGD, best-of-N, D-Flow on the 2D/5D/10D Gaussian mixtures")
    _bench_arguments(gmm, chains=25)
    gmm.add_argument("--dims", type=int_list, default=(2, 5, 10))
    gmm.add_argument("--methods", default="mlgd_f,mlgd,best_of_n,dflow")
    gmm.add_argument("--models", choices=["exact", "learned"], default="exact", help="closed-form or trained models")
    gmm.add_argument("--checkpoints", help="folder with gmm2d/ gmm5d/ gmm10d/ (default: the shipped checkpoints)")
    gmm.add_argument("--dtype", choices=["float64", "float32"], default="float64", help="the chains' precision")
    gmm.add_argument("--full-chain-steps", type=int, default=None, help="steps of MLGD's inner chain (default 100)")
    gmm.add_argument("--sampler-kinds", default="flow", help="learned fast samplers, comma-separated: flow (8 Euler "
                     "steps) and one_step (its distillation; MLGD-F rows only)")  # fmt: skip

    digits = benches.add_parser("digits", help="MLGD-F on rotated digits: top-5 x* per target on the circle")
    _bench_arguments(digits, chains=16)
    digits.add_argument("--targets", default="uniform,bimodal,unimodal")
    digits.add_argument("--checkpoints", help="folder with prior/ and sampler/ (default: the shipped digits models)")
    digits.add_argument("--protocol", choices=["default", "paper", "study"], default="default", help="paper: the "
                        "MLGD-F code's MNIST protocol (15 seeds, its steps per target, guidance off t < 250 on the "
                        "uniform target, sliced W1, a 6-step sampler); study: it with issue 25's study's changes "
                        "(identity gradient; uniform: guidance to t = 100, zeta 0.2, stochastic clean-up)")  # fmt: skip
    digits.set_defaults(chains=None)  # 16, or the paper protocol's 15 seeds

    scribbles = benches.add_parser("scribbles", help="the paper's Exp. 2 at small scale: a scribble edited towards 4 "
                                   "attribute mixes, MLGD-F vs a time-matched SDEdit search")  # fmt: skip
    scribbles.add_argument("--json", help="output JSON path (a .md table and the pictures are written beside it)")
    scribbles.add_argument("--quick", action="store_true", help="tiny settings, for smoke tests")
    scribbles.add_argument("--targets", default="balanced,skewed,colour_interpolation,background_interpolation")
    scribbles.add_argument("--chains", type=int, default=None, help="chains per target (default: the example's 16)")
    scribbles.add_argument("--checkpoints", help="folder with prior/ and sampler/ (default: the shipped models)")

    models = benches.add_parser("models", help="adapter overhead, split actors' memory, decoder checkpointing")
    models.add_argument("--json", help="output JSON path (a .md table is written beside it)")
    models.add_argument("--quick", action="store_true", help="tiny settings, for smoke tests")
    models.add_argument("--device", type=device_argument, default="cpu")

    faults = benches.add_parser("faults", help="actor kills and a driver kill + resume vs the unfaulted campaign")
    faults.add_argument("--json", help="output JSON path (a .md table is written beside it)")
    faults.add_argument("--repeats", type=int, default=5)
    faults.add_argument("--kills", type=int, default=3, help="actor kills per leg (before and after the resume)")
    faults.add_argument("--quick", action="store_true", help="tiny settings, for smoke tests")
    faults.add_argument("--tune", action="store_true", help="instead: a cdm tune study SIGKILLed at random "
                        "moments, restarted --kills-tune times, then checked (N trials, no chain twice)")  # fmt: skip
    faults.add_argument("--kills-tune", type=int, default=20, help="with --tune: kills (each then a restart)")
    faults.add_argument("--tune-trials", type=int, default=8, help="with --tune: the study's trials")

    engine = benches.add_parser("engine", help="the chain loop's chains/s over a grid, batched and one at a time, "
                                "with a per-step profile")  # fmt: skip
    engine.add_argument("--json", help="output JSON path (a .md table is written beside it)")
    engine.add_argument("--problems", default="gmm2d,gmm10d", help="comma-separated learned mixtures")
    engine.add_argument("--n-c", type=int_list, default=(8, 32, 64), help="conditional samples per guess")
    engine.add_argument("--guesses", type=int_list, default=(1, 3), help="loss-guided-diffusion guesses")
    engine.add_argument("--batches", type=int_list, default=(1, 8, 32, 128), help="chains per batch")
    engine.add_argument("--repeats", type=int, default=3)
    engine.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    engine.add_argument("--grad", choices=["identity", "full"], default="identity", help="dL/dx_t through Tweedie "
                        "(full) or not (identity, the mixture benchmarks' setting)")  # fmt: skip
    engine.add_argument("--quick", action="store_true", help="tiny settings, for smoke tests")
    engine.add_argument("--setting", choices=["default", "authors"], default="default", help="the target and loss: "
                        "this project's defaults (1000 target samples, a batch of 250 per chain each step, median "
                        "heuristic), or the authors' mixture runner's (250 fixed samples, bandwidth fixed from them, "
                        "5 kernels, V-statistic)")  # fmt: skip

    precision = benches.add_parser("precision", help="the same MLGD-F chains in float32 and float64 on the learned "
                                   "mixtures, compared chain by chain")  # fmt: skip
    precision.add_argument("--json", help="output JSON path (a .md table is written beside it)")
    precision.add_argument("--chains", type=int, default=64)
    precision.add_argument("--n-c", type=int, default=64, help="conditional samples per guess")
    precision.add_argument("--quick", action="store_true", help="tiny settings, for smoke tests")

    batching = benches.add_parser("batching", help="the same MLGD-F chains batched vs one at a time")
    _bench_arguments(batching, chains=256)

    ray_bench = benches.add_parser("ray", help="in-process vs Ray colocated vs split (tasks, compiled) on 3 problems")
    _bench_arguments(ray_bench, chains=32)
    ray_bench.add_argument("--problems", default="gmm5d,digits,latent,balanced", help="comma-separated: gmm5d, "
                           "digits, latent, balanced")  # fmt: skip

    editing = benches.add_parser("editing", help="editing campaigns on the 5D mixture vs a time-matched SDEdit search")
    _bench_arguments(editing, chains=16)
    editing.add_argument("--strengths", default="0.3,0.5,0.8", help="comma-separated, each in (0, 1]")
    editing.add_argument("--sources", type=int, default=3, help="sources (unguided prior samples) per strength")

    tune_bench = benches.add_parser("tune", help="tuned vs default configuration on the 5D mixture and digits")
    tune_bench.add_argument("--problems", default="gmm5d,digits", help="comma-separated: gmm5d, digits")
    tune_bench.add_argument("--json", help="output JSON path (a .md table is written beside it)")
    tune_bench.add_argument("--trials", type=int, default=20)
    tune_bench.add_argument("--parallel", type=int, default=2)
    tune_bench.add_argument("--processes", type=int_list, default=(1, 2, 4), help="cdm tune processes sharing one "
                            "PostgreSQL study, per row (needs initdb; empty: none)")  # fmt: skip
    tune_bench.add_argument("--quick", action="store_true", help="tiny settings, for smoke tests")


def _bench_arguments(parser: argparse.ArgumentParser, chains: int) -> None:
    """The flags every benchmark takes."""
    parser.add_argument("--json", help="output JSON path (a .md table is written beside it)")
    parser.add_argument("--chains", type=int, default=chains)
    parser.add_argument("--quick", action="store_true", help="tiny settings, for smoke tests")
    parser.add_argument("--device", type=device_argument, default="cpu")
    parser.add_argument("--n-c", type=int, default=None, help="conditional samples per guess (default 250)")


def check_bench_arguments(args: argparse.Namespace) -> None:
    from cdm_dist.driver.methods import METHODS

    if args.bench == "models":
        return
    if args.bench == "precision" and args.chains < 2:
        raise InputError(f"--chains: must be >= 2 (paired differences), got {args.chains}")
    if args.bench == "engine":
        known = ["gmm10d", "gmm2d", "gmm5d"]
        unknown = sorted(set(args.problems.split(",")) - set(known))
        if unknown:
            raise InputError(f"--problems: unknown {unknown}; expected some of {known}")
        for flag, values, least in (("--n-c", args.n_c, 2), ("--guesses", args.guesses, 1),
                                    ("--batches", args.batches, 1), ("--repeats", (args.repeats,), 1)):  # fmt: skip
            if min(values) < least:
                raise InputError(f"{flag}: each must be >= {least}, got {list(values)}")
        return
    if args.bench == "ray":
        known = ["balanced", "digits", "gmm5d", "latent"]
        unknown = sorted(set(args.problems.split(",")) - set(known))
        if unknown:
            raise InputError(f"--problems: unknown {unknown}; expected some of {known}")
    if args.bench == "faults":
        if args.repeats < 1 or args.kills < 0:
            raise InputError(f"--repeats and --kills: must be >= 1 and >= 0, got {args.repeats} and {args.kills}")
        if args.kills_tune < 1 or args.tune_trials < 1:
            raise InputError(f"--kills-tune and --tune-trials: must be >= 1, got {args.kills_tune} and "
                             f"{args.tune_trials}")  # fmt: skip
        return
    if args.bench == "tune":
        if args.trials < 1 or args.parallel < 1:
            raise InputError(f"--trials and --parallel: must be >= 1, got {args.trials} and {args.parallel}")
        from benchmarks.tune import STUDIES

        unknown = sorted(set(args.problems.split(",")) - set(STUDIES))
        if unknown:
            raise InputError(f"--problems: unknown {unknown}; expected some of {sorted(STUDIES)}")
        return
    if args.bench == "scribbles":
        from cdm_dist.problems.scribbles import TARGETS as SCRIBBLE_TARGETS

        unknown = sorted(set(args.targets.split(",")) - set(SCRIBBLE_TARGETS))
        if unknown:
            raise InputError(f"--targets: unknown {unknown}; expected some of {list(SCRIBBLE_TARGETS)}")
        if args.chains is not None and args.chains < 1:
            raise InputError(f"--chains: must be >= 1; got {args.chains}")
        if args.checkpoints is not None and not (Path(args.checkpoints) / "sampler").is_dir():
            raise InputError(f"--checkpoints: {args.checkpoints} has no sampler/ folder")
        return
    if args.chains is not None and args.chains < 1:  # None: the bench's own default (digits: 16, or 15 seeds)
        raise InputError(f"--chains: must be >= 1, got {args.chains}")
    if args.bench == "editing":
        try:
            args.strengths = tuple(float(v) for v in args.strengths.split(","))
        except ValueError:
            raise InputError(f"--strengths: expected comma-separated numbers, got {args.strengths!r}") from None
        if not all(0 < v <= 1 for v in args.strengths):
            raise InputError(f"--strengths: each must be in (0, 1], got {list(args.strengths)}")
        if args.sources < 1:
            raise InputError(f"--sources: must be >= 1, got {args.sources}")
    from cdm_dist.chains.config import MLGDConfig

    loss = MLGDConfig().loss  # the benches' loss
    if args.n_c is not None and args.n_c < loss.min_samples:
        raise InputError(f"--n-c: must be >= {loss.min_samples} (the {loss.name} loss), got {args.n_c}")
    if args.bench == "gmm":
        if args.full_chain_steps is not None and args.full_chain_steps < 1:
            raise InputError(f"--full-chain-steps: must be >= 1, got {args.full_chain_steps}")
        unknown = [m for m in args.methods.split(",") if m not in METHODS]
        if unknown:
            raise InputError(f"--methods: unknown {unknown}; expected some of {list(METHODS)}")
        bad = [d for d in args.dims if d not in (2, 5, 10)]
        if bad:
            raise InputError(f"--dims: unknown {bad}; expected some of [2, 5, 10]")
        kinds = args.sampler_kinds.split(",")
        if set(kinds) - {"flow", "one_step"} or len(set(kinds)) != len(kinds):
            raise InputError(f"--sampler-kinds: {kinds}; expected distinct kinds from ['flow', 'one_step']")
        if kinds != ["flow"] and args.models != "learned":
            raise InputError("--sampler-kinds: only with --models learned (exact models have one exact sampler)")
    if args.bench == "digits":
        from cdm_dist.problems.digits import TARGETS

        unknown = [t for t in args.targets.split(",") if t not in TARGETS]
        if unknown:
            raise InputError(f"--targets: unknown {unknown}; expected some of {list(TARGETS)}")


def run_bench(args: argparse.Namespace) -> int:
    """Check the flags, then run the benchmark `args.bench` names (it writes JSON + markdown)."""
    check_bench_arguments(args)
    if args.bench == "gmm":
        from benchmarks.gmm import bench_gmm

        bench_gmm(
            args.json,
            args.dims,
            tuple(args.methods.split(",")),
            args.chains,
            args.quick,
            args.device,
            n_c=args.n_c,
            models=args.models,
            checkpoints=args.checkpoints,
            full_chain_steps=args.full_chain_steps,
            sampler_kinds=tuple(args.sampler_kinds.split(",")),
            dtype=args.dtype,
        )
    elif args.bench == "digits":
        from benchmarks.digits import bench_digits

        targets = tuple(args.targets.split(","))
        bench_digits(args.json, targets, args.chains, args.quick, args.device, args.n_c, args.checkpoints,
                     args.protocol)  # fmt: skip
    elif args.bench == "scribbles":
        from benchmarks.scribbles import bench_scribbles

        bench_scribbles(args.json, tuple(args.targets.split(",")), args.quick, args.chains, args.checkpoints)
    elif args.bench == "editing":
        from benchmarks.editing import bench_editing

        bench_editing(args.json, args.chains, args.quick, args.strengths, args.sources)
    elif args.bench == "tune":
        from benchmarks.tune import bench_tune

        bench_tune(args.json, args.trials, args.parallel, args.quick, tuple(args.problems.split(",")),
                   args.processes)  # fmt: skip
    elif args.bench == "faults" and args.tune:
        from benchmarks.faults_tune import bench_faults_tune

        bench_faults_tune(args.json, args.kills_tune, args.tune_trials, args.quick)
    elif args.bench == "faults":
        from benchmarks.faults import bench_faults

        bench_faults(args.json, args.repeats, args.kills, args.quick)
    elif args.bench == "models":
        from benchmarks.models import bench_models

        bench_models(args.json, args.quick, args.device)
    elif args.bench == "precision":
        from benchmarks.precision import bench_precision

        bench_precision(args.json, chains=args.chains, n_c=args.n_c, quick=args.quick)
    elif args.bench == "engine":
        from benchmarks.engine import bench_engine

        bench_engine(args.json, tuple(args.problems.split(",")), args.n_c, args.guesses, args.batches, args.repeats,
                     args.dtype, args.grad, args.quick, args.setting)  # fmt: skip
    elif args.bench == "ray":
        from benchmarks.executors import bench_ray

        bench_ray(args.json, args.chains, args.quick, args.n_c, tuple(args.problems.split(",")))
    else:
        from benchmarks.batching import bench_batching

        bench_batching(args.json, args.chains, args.quick, args.device, args.n_c)
    return 0
