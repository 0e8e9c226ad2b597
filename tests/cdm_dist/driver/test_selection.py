"""`cdm topk` on a store of small campaigns: the same chain listed once, campaign and trial columns, prior_fit and
the problem's metrics, the campaign's prior_fit limit, case-insensitive selection tags, quiet exports whose YAML
reruns the chain, and bad input that writes nothing. Expectations are read from MLflow and the campaign folders."""

import json
import statistics
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from cdm_cli.main import main
from cdm_dist.driver.campaign import load_config
from cdm_dist.driver.runner import run_campaign
from cdm_dist.driver.store import CampaignStore
from cdm_dist.driver.tracking import client_for
from cdm_dist.driver.worker import LocalExecutor

SMALL = {
    "name": "sel",
    "method.num_steps": 12,
    "method.n_c": 16,
    "method.target_batch": 16,
    "method.n_guess": 2,
    "method.eta": 0.5,
    "method.guidance_start": 0.25,
    "method.refine_steps": 2,
    "chains.count": 4,
    "chains.zeta": "[{kind: linear, scale: 3.0, final: 0.1}, {kind: rt, normalize: true}]",
    "resources.executor": "local",
    "resources.micro_batch": 2,
    "resources.checkpoint_every": 4,
}  # as tests/conftest.py's small_campaign, with tracking on (a module's store, shared by its tests)


class Store:
    """Five campaigns in one MLflow store: A; a study whose trial 0 is A's config as written; C with base_seed 2
    (chains 0 and 1 are A's chains 2 and 3); E with method.eta 0.7 (other chains, same seeds); D, A again with
    selection.prior_fit_limit at the median of A's prior_fit (half its chains over it)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.uri = f"sqlite:///{root}/mlflow.db"
        self.client = None
        self.limit = None

    def config(self, **overrides):
        items = SMALL | {
            "tracking.uri": self.uri,
            "tracking.artifact_location": str(self.root / "artifacts"),
            "output": str(self.root / "campaigns"),
        }
        items |= {k.replace("__", "."): v for k, v in overrides.items()}
        return load_config(None, [f"{k}={v}" for k, v in items.items()])

    def run(self, config):
        return run_campaign(config, LocalExecutor(config), CampaignStore.create(config), progress=False)

    def chains(self):
        """Every chain run with status ok."""
        client = self.client or client_for(self.uri)
        experiments = [e.experiment_id for e in client.search_experiments()]
        return client.search_runs(experiments, "tags.`cdm.kind` = 'chain' and tags.status = 'ok'", max_results=1000)

    def campaign(self, run):
        return self.client.get_run(run.data.tags["cdm.campaign"])

    def x(self, run):
        """The chain's x* as the campaign folder holds it."""
        folder = self.campaign(run).data.tags["cdm.output_dir"]
        return np.load(f"{folder}/chains/chain{int(run.data.tags['cdm.chain']):05d}.npy")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    from tuning.study import Tuner

    made = Store(tmp_path_factory.mktemp("selection"))
    made.run(made.config())
    made.client = client_for(made.uri)
    space = "{chains.zeta.0.kind: {type: categorical, choices: [linear, cosine]}}"
    Tuner(made.config(tune__space=space, tune__prior_fit_limit="off", tune__study_name="s")).run(trials=1)
    made.run(made.config(name="selc", chains__base_seed=2))
    made.run(made.config(name="sele", method__eta=0.7))
    first = [r for r in made.chains() if made.campaign(r).data.tags.get("mlflow.runName", "").startswith("sel-")]
    made.limit = statistics.median(r.data.metrics["prior_fit"] for r in first)
    made.run(made.config(name="seld", selection__prior_fit_limit=made.limit))
    return made


def _topk(store, tmp_path, *flags):
    out = tmp_path / f"topk{len(list(tmp_path.iterdir()))}.json"
    assert main(["topk", "--tracking-uri", store.uri, "--json", str(out), *flags]) == 0
    return json.loads(out.read_text())["rows"]


def _over(store, run):
    """Whether the run's campaign set a limit its prior_fit exceeds (from the campaign's name and the metric)."""
    return store.campaign(run).info.run_name.startswith("seld-") and run.data.metrics["prior_fit"] > store.limit


def test_identical_chains_are_listed_once_with_the_campaigns_they_are_in(store, tmp_path):
    runs = store.chains()
    by_x = defaultdict(set)  # the same x* (bit for bit) is the same chain
    for run in runs:
        by_x[store.x(run).tobytes()].add(run.info.run_id)
    assert max(len(g) for g in by_x.values()) >= 3  # A, the study's trial 0 and D share chains

    rows = _topk(store, tmp_path, "-k", "100", "--keep-over-limit")
    groups = [frozenset([r["run_id"]] + [a["run_id"] for a in r["also"]]) for r in rows]
    assert len(groups) == len(by_x) and set(groups) == {frozenset(g) for g in by_x.values()}
    loss = {r.info.run_id: r.data.metrics["final_loss"] for r in runs}
    assert [r["final_loss"] for r in rows] == sorted(min(loss[a["run_id"]] for a in [r, *r["also"]]) for r in rows)
    for row in rows:  # each appearance names its campaign
        for where in [row, *row["also"]]:
            assert where["campaign"] == store.client.get_run(where["campaign_run_id"]).info.run_name

    every = _topk(store, tmp_path, "-k", "100", "--keep-over-limit", "--all")
    assert sorted(r["run_id"] for r in every) == sorted(loss) and all(r["also"] == [] for r in every)
    top3 = _topk(store, tmp_path, "-k", "3", "--keep-over-limit")
    assert [r["run_id"] for r in top3] == [r["run_id"] for r in rows[:3]]
    assert [len(r["also"]) for r in top3] == [len(r["also"]) for r in rows[:3]]  # found though ranked past k


def test_rows_name_campaign_trial_prior_fit_and_the_problems_metrics(store, tmp_path, capsys):
    rows = {r["run_id"]: r for r in _topk(store, tmp_path, "-k", "100", "--keep-over-limit", "--all")}
    table = capsys.readouterr().out
    trials = set()
    for run in store.chains():
        row, campaign = rows[run.info.run_id], store.campaign(run)
        assert (row["campaign"], row["campaign_run_id"]) == (campaign.info.run_name, campaign.info.run_id)
        trial = campaign.data.tags.get("cdm.trial")
        assert row["trial"] == (None if trial is None else int(trial))
        trials.add(row["trial"])
        metrics = {k: v for k, v in run.data.metrics.items() if k not in ("loss", "final_loss")}
        assert "prior_fit" in metrics and len(metrics) > 1  # the gmm problem's metrics too
        assert {k: row[k] for k in metrics} == metrics
        assert (row["chain"], row["seed"]) == (int(run.data.tags["cdm.chain"]), int(run.data.params["seed"]))
    assert trials == {None, 0}
    header = table.splitlines()[0].split()
    assert {"campaign", "trial", "prior_fit", *metrics} <= set(header)
    assert header.index("prior_fit") == 2  # beside final_loss


def test_chains_over_their_campaigns_prior_fit_limit_are_flagged_and_left_out_unless_kept(store, tmp_path, capsys):
    (d,) = store.client.search_runs(
        [e.experiment_id for e in store.client.search_experiments()], "tags.`mlflow.runName` LIKE 'seld-%'"
    )
    assert float(d.data.params["selection.prior_fit_limit"]) == store.limit  # the campaign run records it
    runs = store.chains()
    over = {r.info.run_id for r in runs if _over(store, r)}
    assert len(over) == 2

    kept = _topk(store, tmp_path, "-k", "100", "--all", "--keep-over-limit")
    assert {r["run_id"] for r in kept if r["over_limit"]} == over
    assert "over" in capsys.readouterr().out
    hidden = _topk(store, tmp_path, "-k", "100", "--all")
    assert {r["run_id"] for r in hidden} == {r.info.run_id for r in runs} - over
    assert "left out: 2 chain run(s)" in capsys.readouterr().out
    once = _topk(store, tmp_path, "-k", "100")  # the same chains stay, through the campaigns without a limit
    listed = {a["run_id"] for r in once for a in [r, *r["also"]]}
    assert listed == {r.info.run_id for r in runs} - over


def test_selection_tags_in_any_case_and_an_export_that_reruns_each_chain(store, tmp_path, capfd):
    runs = {(store.campaign(r).info.run_name.split("-")[0], int(r.data.tags["cdm.chain"])): r for r in store.chains()}
    tags = {("selc", 1): "True", ("sele", 2): "TRUE", ("sel", 0): "true", ("sel", 3): "FALSE"}
    try:
        for key, value in tags.items():
            store.client.set_tag(runs[key].info.run_id, "cdm.selected", value)
        capfd.readouterr()
        rows = _topk(store, tmp_path, "--selected", "--export", str(tmp_path / "x"))
        assert "Downloading" not in capfd.readouterr().err  # no MLflow progress bars
    finally:
        for key in tags:
            store.client.delete_tag(runs[key].info.run_id, "cdm.selected")
    chosen = {runs[k].info.run_id: runs[k] for k, v in tags.items() if v.lower() == "true"}
    assert {r["run_id"] for r in rows} == set(chosen)
    for row in rows:
        original = store.x(chosen[row["run_id"]])
        np.testing.assert_array_equal(np.load(row["x_path"]), original)
        assert Path(row["picture_path"]).stat().st_size > 0
        config = load_config(row["config_path"], ["tracking.enabled=false", f"output={tmp_path / 'rerun'}"])
        assert config.chains.count == 1 and config.chains.base_seed == row["seed"]
        rerun = CampaignStore.create(config)
        run_campaign(config, LocalExecutor(config), rerun, progress=False)
        np.testing.assert_allclose(np.load(rerun.chain_x_path(0)), original, rtol=1e-12, atol=1e-12)
    assert (tmp_path / "x" / "contact_sheet.png").stat().st_size > 0


def test_an_export_downloaded_from_the_store_prints_no_progress_bars(store, tmp_path, capfd, monkeypatch):
    from cdm_dist.driver import selection

    monkeypatch.setattr(selection, "local_folder", lambda uri: None)  # as for a server's artifacts
    capfd.readouterr()
    rows = _topk(store, tmp_path, "-k", "2", "--export", str(tmp_path / "x"))
    err = capfd.readouterr().err
    assert "Downloading" not in err and "%|" not in err
    for row in rows:
        np.testing.assert_array_equal(np.load(row["x_path"]), store.x(store.client.get_run(row["run_id"])))
        assert Path(row["config_path"]).is_file()


def _one_line(capsys, *argv):
    assert main(list(argv)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    return err


def test_an_unknown_selection_tag_value_is_one_line_naming_the_run(store, tmp_path, capsys):
    run = store.chains()[0]
    store.client.set_tag(run.info.run_id, "cdm.selected", "yes")
    try:
        args = ["--json", str(tmp_path / "t.json"), "--export", str(tmp_path / "x")]
        line = _one_line(capsys, "topk", "--tracking-uri", store.uri, "--selected", *args)
    finally:
        store.client.delete_tag(run.info.run_id, "cdm.selected")
    assert run.info.run_id in line and "'yes'" in line and "true or false" in line
    assert list(tmp_path.iterdir()) == []


def test_selected_with_nothing_selected_says_how_to_select(store, tmp_path, capsys):
    args = ["--json", str(tmp_path / "t.json"), "--export", str(tmp_path / "x")]
    line = _one_line(capsys, "topk", "--tracking-uri", store.uri, "--selected", *args)
    assert "cdm.selected" in line and "MLflow UI" in line and "true" in line
    assert list(tmp_path.iterdir()) == []


def _files(*folders):
    return {(str(p), p.stat().st_size, p.stat().st_mtime_ns) for f in folders for p in Path(f).rglob("*")}


def test_an_unknown_experiment_is_one_line_and_writes_nothing(store, tmp_path, capsys, monkeypatch):
    from cdm_dist.driver import tracking

    Path(f"{store.uri.removeprefix('sqlite:///')}.lock").unlink(missing_ok=True)  # as in a store copied here
    monkeypatch.setattr(tracking, "_READY", set())  # as in a new process: no store opened yet
    monkeypatch.chdir(tmp_path)
    before = _files(store.root, tmp_path)
    args = ["--json", str(tmp_path / "t.json"), "--export", str(tmp_path / "x")]
    line = _one_line(capsys, "topk", "--tracking-uri", store.uri, "--experiment", "nope", *args)
    assert "--experiment" in line and "'nope'" in line
    assert _files(store.root, tmp_path) == before


def test_editing_chains_are_the_same_chain_only_at_the_same_start_and_their_yaml_reruns_them(small_campaign, tmp_path):
    """Strengths cycle over the chain index, so the same seed starts at another step in another campaign."""
    np.save(tmp_path / "source.npy", np.array([0.8]))
    source = {"file": str(tmp_path / "source.npy")}  # strengths per campaign
    fixed = {"tracking__enabled": True, "resources__executor": "local", "chains__zeta": "[{kind: linear}]"}
    made = Store(tmp_path)
    made.client = client_for(made.uri)
    for name, seed, count, strengths in (("s", 0, 4, [0.5, 0.75]), ("t", 1, 2, [0.75, 0.5]), ("u", 0, 1, [0.75])):
        chains = {"base_seed": seed, "count": count, "source": {**source, "strengths": strengths}}
        chains = {f"chains__{k}": v for k, v in chains.items()}
        made.run(small_campaign(name=name, **fixed, **chains))
    runs = made.chains()
    by_x = defaultdict(set)
    for run in runs:
        by_x[made.x(run).tobytes()].add(run.info.run_id)
    assert len(runs) == 7 and len(by_x) == 5  # t's chains are s's chains 1 and 2; u's seed 0 starts elsewhere

    rows = _topk(made, tmp_path, "-k", "10", "--export", str(tmp_path / "x"))
    groups = [frozenset([r["run_id"]] + [a["run_id"] for a in r["also"]]) for r in rows]
    assert len(groups) == len(by_x) and set(groups) == {frozenset(g) for g in by_x.values()}
    for row in rows:
        run = made.client.get_run(row["run_id"])
        config = load_config(row["config_path"], ["tracking.enabled=false", f"output={tmp_path / 'rerun'}"])
        written = load_config(Path(made.campaign(run).data.tags["cdm.output_dir"]) / "config.yaml").chains.source
        strength = written.strengths[row["chain"] % len(written.strengths)]
        assert config.chains.source.start_step == 12 - int(12 * strength)
        rerun = CampaignStore.create(config)
        run_campaign(config, LocalExecutor(config), rerun, progress=False)
        np.testing.assert_allclose(np.load(rerun.chain_x_path(0)), made.x(run), rtol=1e-12, atol=1e-12)
