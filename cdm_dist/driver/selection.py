"""Selecting candidates x* from the tracking store: the best chains by held-out loss, or those a user tagged
`cdm.selected = true` in the MLflow UI. The same chain found in several campaigns (a rerun, a study's trial of the
config as written) is listed once, with the campaigns it is in; chains whose prior_fit exceeds their campaign's
`selection.prior_fit_limit` are flagged, and left out of a top-k unless asked for. An export holds, per candidate,
x* (.npy), its pictures and a YAML that reruns exactly that chain, plus a contact sheet. Chains come from chain
runs and, for campaigns above tracking.child_runs_max, from the campaign run's chains table (chain_table): a chain
without a run of its own is named CAMPAIGN_RUN_ID#CHAIN and exported from its campaign folder. mlflow is imported
lazily."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import heapq
import itertools
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse
from urllib.request import url2pathname

import yaml

from cdm_dist.chains.config import parse
from cdm_dist.driver.campaign import CampaignConfig, MethodConfig, SourceConfig, campaign_chains, dump_config
from cdm_dist.driver.chain_table import CHAIN_RUNS_TAG, CHAINS_TABLE, METRIC, SUPERSEDED_TAG, read_chain_table
from cdm_dist.driver.preconditions import redacted
from cdm_dist.driver.store import CampaignStore
from cdm_dist.driver.tracking import reader
from cdm_dist.errors import InputError

EVALUATION_COLUMNS = ("eval/mmd", "eval/improvement")  # logged on chain runs by `cdm evaluate`
NOT_PROBLEM_METRICS = ("loss", "final_loss")  # the guidance loss per step and the held-out loss
SELECTED_TAG = "cdm.selected"
SELECTED_VALUES = {"true": True, "false": False}  # a cdm.selected tag's accepted values, in any case
CHAINS = "tags.`cdm.kind` = 'chain'"
CHAINS_OK = f"{CHAINS} and tags.status = 'ok'"
TABLED = f"tags.`cdm.kind` = 'campaign' and tags.`{CHAIN_RUNS_TAG}` = 'top'"  # campaigns with chains only tabled
PAGE = 500  # runs per search request
PROGRESS_BAR_VARIABLE = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"  # mlflow.environment_variables (3.x)
HOW_TO_SELECT = (
    "select chains in the MLflow UI (`cdm ui`): open a chain run (filter tags.`cdm.kind` = 'chain') and add the "
    "tag cdm.selected with the value true"
)


@dataclass(frozen=True)
class Campaign:
    """A campaign's run, as its chains' rows need it."""

    run_id: str
    name: str
    trial: int | None  # the Optuna trial number when the campaign was a study's trial
    prior_fit_limit: float | None  # its selection.prior_fit_limit (None: no limit, or a campaign made before it)
    params: dict[str, str]  # its config, flattened (chain_table.flatten)
    output_dir: str | None
    artifact_uri: str
    start_time: int = 0  # ms


@dataclass
class Candidate:
    run_id: str
    final_loss: float
    chain: int
    campaign: str  # the campaign's run id
    campaign_name: str = ""
    trial: int | None = None  # the Optuna trial number when the campaign was a study's trial
    seed: int = 0
    zeta: str = ""  # the schedule's label (its non-default fields)
    metrics: dict[str, float] = field(default_factory=dict)  # prior_fit and the problem's metrics
    prior_fit_limit: float | None = None  # the campaign's selection.prior_fit_limit
    fingerprint: str = ""  # the same chain (problem, method, seed, zeta schedule, source) has the same one
    start_time: int = 0  # the run's, in ms (ties go to the earliest)
    also: list[Candidate] = field(default_factory=list)  # the same chain's runs in other campaigns
    x_path: str | None = None  # local file once exported
    picture_path: str | None = None  # local file once exported
    config_path: str | None = None  # once exported: the YAML that reruns this chain
    evaluation: dict[str, float] = field(default_factory=dict)  # `cdm evaluate`'s eval/mmd, eval/improvement, if run
    tabled: bool = False  # no run of its own: a row of its campaign run's chains table (run_id CAMPAIGN#CHAIN)

    @property
    def over_limit(self) -> bool:
        """Whether its prior_fit exceeds its campaign's limit (as `cdm tune` judges a trial's median prior_fit)."""
        fit = self.metrics.get("prior_fit", math.nan)
        return self.prior_fit_limit is not None and math.isfinite(fit) and fit > self.prior_fit_limit

    def appearances(self) -> list[Candidate]:
        """This run, then the same chain's runs in other campaigns."""
        return [self, *self.also]


@dataclass
class Selection:
    candidates: list[Candidate]
    left_out: int = 0  # chain runs ranked among them but over their campaign's prior_fit limit


# -- finding --------------------------------------------------------------------------------------------------


def select(
    uri: str,
    experiment: str | None,
    k: int,
    selected: bool = False,
    every: bool = False,
    keep_over_limit: bool = False,
) -> Selection:
    """The k chains with the lowest final_loss (status ok) across campaigns and trials, each chain once (every: each
    run) and none over its campaign's prior_fit limit (unless keep_over_limit); or every chain tagged
    cdm.selected = true (flagged, never left out: the user chose them)."""
    client = reader(uri)
    experiments = experiment_ids(client, uri, experiment)
    campaigns = Campaigns(client)
    if selected:
        found = [c for c in map(campaigns.candidate, selected_runs(client, experiments)) if c is not None]
        if not found:
            where = f"in experiment {experiment!r}" if experiment else f"in {redacted(uri)}"
            raise InputError(f"--selected: no chain run {where} is tagged cdm.selected = true; {HOW_TO_SELECT}")
        return Selection(grouped(found, every))
    return ranked(client, experiments, k, every, keep_over_limit, campaigns)


def experiment_ids(client: Any, uri: str, experiment: str | None) -> list[str]:
    """The named experiment's id, or every experiment's."""
    if not experiment:
        return [e.experiment_id for e in client.search_experiments()]
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise InputError(f"--experiment: no experiment {experiment!r} in {redacted(uri)}")
    return [found.experiment_id]


def pages(client: Any, experiments: list[str], query: str, order_by: list[str] | None = None) -> Iterator[Any]:
    """The runs matching query, page by page."""
    token = None
    while True:
        page = client.search_runs(experiments, query, order_by=order_by, max_results=PAGE, page_token=token)
        yield from page
        token = page.token
        if not token:
            return


def ranked(
    client: Any, experiments: list[str], k: int, every: bool, keep_over_limit: bool, campaigns: Campaigns
) -> Selection:
    """The k best chains by final_loss: chain runs and chains tables' rows read in order until k distinct chains
    (every: runs) are found; each chain's runs and rows in other campaigns are then looked up by seed."""
    chosen: dict[str, Candidate] = {}
    left_out = 0
    tables = ChainTables(client, experiments, campaigns)
    found = map(campaigns.candidate, pages(client, experiments, CHAINS_OK, ["metrics.final_loss ASC"]))
    runs = (c for c in found if c is not None)
    for cand in heapq.merge(runs, tables.ranked(), key=lambda c: c.final_loss):
        if cand.over_limit and not keep_over_limit:
            left_out += 1
            continue
        key = cand.run_id if every else cand.fingerprint
        if key in chosen:
            chosen[key].also.append(cand)
        elif len(chosen) < k:
            chosen[key] = cand
        else:
            break
    if not every:
        for seed in sorted({c.seed for c in chosen.values()}):
            query = f"{CHAINS_OK} and params.seed = '{seed}'"
            runs = (campaigns.candidate(run) for run in pages(client, experiments, query))
            for cand in itertools.chain(runs, tables.with_seed(seed)):
                if cand is not None and cand.fingerprint in chosen and (keep_over_limit or not cand.over_limit):
                    chosen[cand.fingerprint].also.append(cand)
    return Selection(grouped([c for group in chosen.values() for c in group.appearances()], every), left_out)


def grouped(found: list[Candidate], every: bool) -> list[Candidate]:
    """One row per chain (every: per run), best final_loss first; a chain's row is its run with the lowest loss
    (then the earliest), the others (each run once) under `also`."""
    unique = {c.run_id: c for c in found}
    groups: dict[str, list[Candidate]] = {}
    for cand in sorted(unique.values(), key=lambda c: (c.final_loss, c.start_time, c.run_id)):
        cand.also = []
        groups.setdefault(cand.run_id if every else cand.fingerprint, []).append(cand)
    rows = [first for first, *_ in groups.values()]
    for first, *others in groups.values():
        first.also = others
    return rows


def selected_runs(client: Any, experiments: list[str]) -> list[Any]:
    """The chain runs (status ok) tagged cdm.selected = true in any case; any other value than true or false on a
    chain run is an error naming the run."""
    runs = []
    for run in pages(client, experiments, f"{CHAINS} and tags.`{SELECTED_TAG}` LIKE '%'"):
        value = run.data.tags[SELECTED_TAG]
        choice = SELECTED_VALUES.get(value.strip().lower())
        if choice is None:
            raise InputError(
                f"{SELECTED_TAG}: run {run.info.run_id} ({run.info.run_name}) has {value!r}; accepted values: "
                f"{' or '.join(SELECTED_VALUES)} (in any case)"
            )
        if choice and run.data.tags.get("status") == "ok":
            runs.append(run)
    return runs


class Campaigns:
    """The campaign runs of the chains met so far (each read once), and the chain runs' candidates."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self._runs: dict[str, Campaign] = {}

    def get(self, run_id: str) -> Campaign:
        if run_id not in self._runs:
            run = self.client.get_run(run_id)
            trial = run.data.tags.get("cdm.trial")
            self._runs[run_id] = Campaign(
                run_id,
                run.info.run_name or run_id,
                int(trial) if trial is not None else None,
                _value(run.data.params.get("selection.prior_fit_limit")),
                dict(run.data.params),
                run.data.tags.get("cdm.output_dir"),
                run.info.artifact_uri,
                run.info.start_time or 0,
            )
        return self._runs[run_id]

    def candidate(self, run: Any) -> Candidate | None:
        """A chain run's row; None without a finite final_loss."""
        metrics, tags = run.data.metrics, run.data.tags
        if not math.isfinite(metrics.get("final_loss", math.inf)):
            return None
        campaign = self.get(tags["cdm.campaign"])
        chain = int(tags["cdm.chain"])
        problem = {k: v for k, v in metrics.items() if k not in NOT_PROBLEM_METRICS and not k.startswith("eval/")}
        return Candidate(
            run.info.run_id,
            metrics["final_loss"],
            chain,
            campaign.run_id,
            campaign_name=campaign.name,
            trial=campaign.trial,
            seed=int(run.data.params.get("seed", tags.get("cdm.seed", -1))),
            zeta=tags.get("cdm.zeta", ""),
            metrics=dict(sorted(problem.items(), key=lambda item: (item[0] != "prior_fit", item[0]))),
            prior_fit_limit=campaign.prior_fit_limit,
            fingerprint=fingerprint(run.data.params, chain, campaign),
            start_time=run.info.start_time or 0,
            evaluation={k: metrics[k] for k in EVALUATION_COLUMNS if k in metrics},
        )


class ChainTables:
    """The chains tables of the campaigns whose chains do not all have runs (CHAIN_RUNS_TAG 'top', not superseded):
    their chains without a run of their own, as candidates (each table read once)."""

    def __init__(self, client: Any, experiments: list[str], campaigns: Campaigns) -> None:
        self.tables: list[tuple[Campaign, dict[str, list[Any]], list[int]]] = []  # campaign, columns, ok rows sorted
        self._by_seed: list[dict[int, list[int]]] | None = None  # per table: seed -> its ok rows
        for run in pages(client, experiments, TABLED):
            if run.data.tags.get(SUPERSEDED_TAG) == "true":
                continue
            campaign = campaigns.get(run.info.run_id)
            columns = _table_columns(client, campaign)
            if columns is None:  # a campaign that has not finished (the table is written at its end)
                continue
            losses, owners = columns["final_loss"], columns["run_id"]
            ok = [i for i, status in enumerate(columns["status"]) if status == "ok" and owners[i] is None]
            ok = [i for i in ok if losses[i] is not None and math.isfinite(losses[i])]
            self.tables.append((campaign, columns, sorted(ok, key=losses.__getitem__)))

    def ranked(self) -> Iterator[Candidate]:
        """Every tabled chain, lowest final_loss first."""
        streams = [map(functools.partial(table_candidate, c, columns), rows) for c, columns, rows in self.tables]
        return heapq.merge(*streams, key=lambda cand: cand.final_loss)

    def with_seed(self, seed: int) -> Iterator[Candidate]:
        """The tabled chains of this seed."""
        if self._by_seed is None:  # one pass over each table, at the first look-up
            self._by_seed = [_rows_by_seed(columns["seed"], rows) for _, columns, rows in self.tables]
        for (campaign, columns, _), by_seed in zip(self.tables, self._by_seed, strict=True):
            yield from (table_candidate(campaign, columns, i) for i in by_seed.get(seed, ()))


def _rows_by_seed(seeds: list[int], rows: list[int]) -> dict[int, list[int]]:
    grouped: dict[int, list[int]] = {}
    for i in rows:
        grouped.setdefault(seeds[i], []).append(i)
    return grouped


def _table_columns(client: Any, campaign: Campaign) -> dict[str, list[Any]] | None:
    """A campaign run's chains table as columns; None when it has none (yet)."""
    local = local_folder(campaign.artifact_uri)
    if local is not None and not (local / CHAINS_TABLE).is_file():
        return None
    with tempfile.TemporaryDirectory() as tmp:
        target = Path(tmp) / CHAINS_TABLE
        try:
            fetch(client, campaign.run_id, campaign.artifact_uri, CHAINS_TABLE, target)
        except Exception:  # not there on the server
            return None
        try:
            return read_chain_table(target)
        except Exception as exc:
            raise InputError(f"campaign {campaign.name}: its {CHAINS_TABLE} cannot be read ({exc})") from None


def table_candidate(campaign: Campaign, columns: dict[str, list[Any]], row: int) -> Candidate:
    """A chains table's row as a candidate: what its chain run would hold (the chain's params are its seed, its
    zeta.* params and the campaign's method.* params)."""
    chain, seed = columns["chain"][row], columns["seed"][row]
    params = {"seed": str(seed)} | json.loads(columns["zeta_params"][row])
    params |= {k: v for k, v in campaign.params.items() if k.startswith("method.")}
    metrics = {name.removeprefix(METRIC): values[row] for name, values in columns.items() if name.startswith(METRIC)}
    problem = {k: v for k, v in metrics.items() if v is not None}
    return Candidate(
        f"{campaign.run_id}#{chain}",
        columns["final_loss"][row],
        chain,
        campaign.run_id,
        campaign_name=campaign.name,
        trial=campaign.trial,
        seed=seed,
        zeta=columns["zeta"][row],
        metrics=dict(sorted(problem.items(), key=lambda item: (item[0] != "prior_fit", item[0]))),
        prior_fit_limit=campaign.prior_fit_limit,
        fingerprint=fingerprint(params, chain, campaign),
        start_time=campaign.start_time,
        tabled=True,
    )


def fingerprint(params: dict[str, str], chain: int, campaign: Campaign) -> str:
    """What makes a chain: the problem (the campaign run's problem.* params), the method, seed and zeta schedule (the
    chain run's method.*, seed and zeta.* params; method.eval_samples as the number of held-out samples it means)
    and, for an editing chain, its source and start step. The start step is not recorded: it is computed from the
    campaign run's chains.source.* params, as the campaign did."""
    chain_params = {k: v for k, v in params.items() if k == "seed" or k.startswith(("method.", "zeta."))}
    if "method.n_c" in params:  # eval_samples None is 4 n_c, the number `cdm tune` writes into its trials' configs
        held_out = _value(params.get("method.eval_samples")), int(params["method.n_c"])
        method = MethodConfig.model_construct(eval_samples=held_out[0], n_c=held_out[1])
        chain_params["method.eval_samples"] = str(method.heldout_samples)
    pieces = {
        "problem": {k: v for k, v in campaign.params.items() if k.startswith("problem.")},
        "chain": chain_params,
        "source": _source_start(campaign.params, chain, params.get("method.num_steps")),
    }
    return hashlib.sha256(json.dumps(pieces, sort_keys=True).encode()).hexdigest()[:16]


def _source_start(params: dict[str, str], chain: int, num_steps: str | None) -> list[Any] | None:
    """An editing chain's [source file, start step] from its campaign's chains.source.* params; None from noise."""
    file = _value(params.get("chains.source.file"))
    if file is None or num_steps is None:
        return None
    source = SourceConfig.model_construct(
        file=file, **{k: _value(params.get(f"chains.source.{k}")) for k in ("start_step", "strength", "strengths")}
    )
    return [file, source.start_steps(chain + 1, int(num_steps))[chain]]


def _value(text: str | None) -> Any:
    """A param as MLflow holds it (str of the value) back as a value; 'None' and missing are None."""
    return None if text is None or text == "None" else yaml.safe_load(text)


# -- exporting ------------------------------------------------------------------------------------------------


def export(candidates: list[Candidate], uri: str, folder: str | Path) -> Path:
    """Per candidate, into folder: x* (.npy), its pictures and a YAML that reruns exactly that chain (`cdm run
    FILE`); a contact sheet of the pictures beside them. Every YAML is made before anything is written; artifacts
    are copied from a local artifact folder, or downloaded without MLflow's progress bars."""
    client = reader(uri)
    campaigns = Campaigns(client)
    configs = [rerun_config(campaign_config(client, campaigns.get(c.campaign)), c) for c in candidates]
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    pictures = []
    for rank, (cand, config) in enumerate(zip(candidates, configs, strict=True), start=1):
        prefix = f"{rank:03d}_{cand.run_id[:8]}_"
        for name, copy in chain_files(client, campaigns.get(cand.campaign), cand):
            target = folder / f"{prefix}{name}"
            copy(target)
            if target.suffix == ".npy":
                cand.x_path = str(target)
            else:
                cand.picture_path = cand.picture_path or str(target)
                pictures.append((cand, target))
        path = folder / f"{prefix}chain{cand.chain:05d}.yaml"
        path.write_text(config, encoding="utf-8")
        cand.config_path = str(path)
    sheet = folder / "contact_sheet.png"
    _contact_sheet(pictures, sheet)
    return sheet


def chain_files(client: Any, campaign: Campaign, cand: Candidate) -> list[tuple[str, Any]]:
    """The candidate's x* and pictures as (file name, copy to a path): its run's artifacts, or, for a tabled chain,
    the files in its campaign folder."""
    if cand.tabled:
        folder = Path(campaign.output_dir or "")
        files = CampaignStore(folder).chain_files(cand.chain)
        if not campaign.output_dir or not files[0].is_file():
            raise InputError(
                f"--export: chain {cand.chain} of campaign {campaign.name} has no run of its own, and its campaign "
                f"folder {folder} does not hold its files here"
            )
        return [(path.name, functools.partial(shutil.copyfile, path)) for path in files]
    artifact_uri = client.get_run(cand.run_id).info.artifact_uri
    files = []
    for artifact in client.list_artifacts(cand.run_id):
        if not artifact.is_dir and Path(artifact.path).suffix in (".npy", ".png"):
            copy = functools.partial(fetch, client, cand.run_id, artifact_uri, artifact.path)
            files.append((Path(artifact.path).name, copy))
    return files


def rerun_config(config: CampaignConfig, cand: Candidate) -> str:
    """The campaign's config narrowed to the candidate's chain, as YAML. Chain k of a campaign has seed base_seed + k
    and schedule k modulo the list (campaign_chains), and its noise depends on its seed only: so chains.count 1,
    base_seed its seed and zeta [its schedule] is exactly that chain; an editing source keeps its file with the
    chain's start step (start_step: strengths cycle over the chain index too)."""
    chains = campaign_chains(config)
    if not 0 <= cand.chain < len(chains) or chains.seeds[cand.chain] != cand.seed:
        raise InputError(f"--export: run {cand.run_id}: chain {cand.chain} (seed {cand.seed}) is not in its config")
    source = config.chains.source
    narrowed = config.chains.model_copy(
        update={
            "count": 1,
            "base_seed": cand.seed,
            "zeta": [chains.zetas[cand.chain]],
            "zeta_grid": None,
            "source": None
            if source is None
            else SourceConfig(file=source.file, start_step=chains.start_steps[cand.chain]),
        }
    )
    single = config.model_copy(update={"name": f"{config.name}-chain{cand.chain:05d}", "chains": narrowed})
    text = dump_config(single)
    parse(CampaignConfig, yaml.safe_load(text), f"--export: run {cand.run_id}'s config")  # what `cdm run` will read
    where = f"{cand.campaign_name}{_trial(cand, ', trial ')}"
    return f"# chain {cand.chain} (seed {cand.seed}) of campaign {where}, run {cand.run_id}: cdm run THIS_FILE\n{text}"


def campaign_config(client: Any, campaign: Campaign) -> CampaignConfig:
    """The config a campaign ran: its folder's config.yaml, else the copy logged on its run."""
    local = Path(campaign.output_dir) / "config.yaml" if campaign.output_dir else None
    if local is not None and local.is_file():
        text = local.read_text(encoding="utf-8")
    else:
        with tempfile.TemporaryDirectory() as tmp:
            target = Path(tmp) / "config.yaml"
            try:
                fetch(client, campaign.run_id, campaign.artifact_uri, "config.yaml", target)
            except Exception:
                raise InputError(f"--export: campaign {campaign.name} has no config.yaml (folder or run)") from None
            text = target.read_text(encoding="utf-8")
    return parse(CampaignConfig, yaml.safe_load(text), f"--export: campaign {campaign.name}'s config.yaml")


def fetch(client: Any, run_id: str, artifact_uri: str, path: str, target: Path) -> None:
    """One artifact file to target: copied where the run's artifacts are a local folder, else downloaded with
    MLflow's progress bars off."""
    local = local_folder(artifact_uri)
    if local is not None and (local / path).is_file():
        shutil.copyfile(local / path, target)
        return
    with tempfile.TemporaryDirectory() as tmp, quiet_downloads():
        shutil.move(client.download_artifacts(run_id, path, tmp), target)


def local_folder(artifact_uri: str) -> Path | None:
    """The folder of a file:// (or plain path) artifact location; None for a server's or a bucket's."""
    parsed = urlparse(artifact_uri)
    if parsed.scheme == "file":
        return Path(url2pathname(parsed.path))
    return Path(artifact_uri) if parsed.scheme == "" else None


@contextlib.contextmanager
def quiet_downloads() -> Iterator[None]:
    """MLflow's artifact progress bars off while inside."""
    before = os.environ.get(PROGRESS_BAR_VARIABLE)
    os.environ[PROGRESS_BAR_VARIABLE] = "false"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(PROGRESS_BAR_VARIABLE, None)
        else:
            os.environ[PROGRESS_BAR_VARIABLE] = before


def _contact_sheet(pictures: list[tuple[Candidate, Path]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.image as mpimg
    import matplotlib.pyplot as plt

    n = max(len(pictures), 1)
    cols = min(n, 4)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (cand, picture) in zip(axes.flat, pictures, strict=False):
        ax.imshow(mpimg.imread(picture))
        ax.set_title(f"{cand.run_id[:8]}  loss {cand.final_loss:.4g}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


# -- showing --------------------------------------------------------------------------------------------------


def rows_json(candidates: list[Candidate]) -> dict[str, Any]:
    """`cdm topk --json`: one row per candidate, with the campaigns (and trials) the same chain is also in."""
    return {"rows": [_row(c) | {"also": [_where(a) for a in c.also]} for c in candidates]}


def _row(cand: Candidate) -> dict[str, Any]:
    return (
        {"run_id": cand.run_id, "final_loss": cand.final_loss}
        | cand.metrics
        | cand.evaluation
        | {"over_limit": cand.over_limit, "prior_fit_limit": cand.prior_fit_limit, "chain": cand.chain}
        | {"seed": cand.seed, "zeta": cand.zeta, "fingerprint": cand.fingerprint}
        | _where(cand)
        | {"x_path": cand.x_path, "picture_path": cand.picture_path, "config_path": cand.config_path}
    )


def _where(cand: Candidate) -> dict[str, Any]:
    """Where a run is: its campaign (name and run id), the trial it was, the run."""
    where = {"campaign": cand.campaign_name, "campaign_run_id": cand.campaign}
    return where | {"trial": cand.trial, "run_id": cand.run_id}


def format_candidates(candidates: list[Candidate]) -> str:
    """The `cdm topk` table: final_loss, prior_fit and the problem's metrics, `cdm evaluate`'s figures where a chain
    has them; `limit` (over: prior_fit beyond the campaign's selection.prior_fit_limit) where a campaign has one;
    the campaign, trial and the other campaigns the same chain is in; x* once exported."""
    metrics = list(dict.fromkeys(k for c in candidates for k in c.metrics))
    metrics.sort(key=lambda k: (k != "prior_fit", k))
    evaluated = [k for k in EVALUATION_COLUMNS if any(k in c.evaluation for c in candidates)]
    limited = any(a.prior_fit_limit is not None for c in candidates for a in c.appearances())
    also = any(c.also for c in candidates)
    exported = any(c.x_path for c in candidates)
    header = ["rank", "final_loss", *metrics, *evaluated, *(["limit"] if limited else []), "chain", "seed", "zeta"]
    header += ["campaign", "trial", *(["also"] if also else []), "run_id", *(["x"] if exported else [])]
    lines = [header]
    for rank, cand in enumerate(candidates, start=1):
        line = [str(rank), f"{cand.final_loss:.6g}", *(_figure(k, cand.metrics.get(k)) for k in metrics)]
        line += [_figure(k, cand.evaluation.get(k)) for k in evaluated]
        line += [_limit(cand)] if limited else []
        line += [str(cand.chain), str(cand.seed), cand.zeta or "-", cand.campaign_name, _trial(cand)]
        line += [", ".join(f"{a.campaign_name}{_trial(a, ' trial ')}" for a in cand.also) or "-"] if also else []
        line += [cand.run_id, *([str(cand.x_path or "-")] if exported else [])]
        lines.append(line)
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in lines)


def _limit(cand: Candidate) -> str:
    if cand.prior_fit_limit is None:
        return "-"
    return f"over {cand.prior_fit_limit:.4g}" if cand.over_limit else f"ok {cand.prior_fit_limit:.4g}"


def _trial(cand: Candidate, prefix: str = "") -> str:
    return "" if cand.trial is None else f"{prefix}{cand.trial}"


def _figure(key: str, value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value * 100:+.1f}%" if key.endswith("improvement") else f"{value:.5g}"
