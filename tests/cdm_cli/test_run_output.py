"""The end of `cdm run` says what to do next: the top-k with x*'s values and what the loss means, the store and the
folder, the UI link to this campaign's chains, and the top-k command."""

import base64
import json
import re
import urllib.parse
import zlib

import numpy as np

from cdm_cli.main import main


def test_the_end_of_a_run_shows_x_star_and_where_to_look_next(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    config = {
        "name": "next", "problem": {"name": "gmm2d"},
        "method": {"num_steps": 8, "n_c": 8, "target_batch": 8, "n_guess": 1},
        "chains": {"count": 3}, "resources": {"executor": "local", "micro_batch": 3},
        "tracking": {"uri": uri, "experiment": "next-steps", "artifact_location": str(tmp_path / "artifacts")},
        "output": str(tmp_path / "out"), "topk": 3,
    }  # fmt: skip
    path = tmp_path / "config.yaml"
    path.write_text(json.dumps(config))
    assert main(["run", str(path), "--quiet", "--json", str(tmp_path / "run.json")]) == 0
    out = capsys.readouterr().out
    summary = json.loads((tmp_path / "run.json").read_text())

    assert "final_loss: the mmd loss between 32 fresh samples of f(x*, η)" in out  # heldout: 4 n_c
    assert "an unbiased estimate of MMD², so values just below 0 mean a match" in out
    for row in summary["topk"]:  # x*'s printed values are the saved x*
        saved = np.load(row["x_path"]).reshape(-1).tolist()
        assert row["x"] == saved
        assert f"[{', '.join(f'{v:.4g}' for v in saved)}]" in out

    assert f"store    {uri} (experiment next-steps); folder {summary['output_dir']}" in out
    assert f"cdm topk --experiment next-steps --tracking-uri {uri}" in out
    chains_url = re.search(r"^ +chains +(http\S+)", out, re.M).group(1)
    gallery_url = re.search(r"^ +gallery +(http\S+)", out, re.M).group(1)
    from mlflow.tracking import MlflowClient

    from cdm_dist.driver.ui_links import SHARED_VIEW_TAG

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("next-steps")
    for url, order in ((chains_url, "true"), (gallery_url, "false")):
        route, query = urllib.parse.urlparse(url).fragment.split("?")
        assert route == f"/experiments/{experiment.experiment_id}/runs"
        key = urllib.parse.parse_qs(query)["viewStateShareKey"][0]  # a view state cdm wrote on the experiment
        packed = experiment.tags[SHARED_VIEW_TAG + key].removeprefix("deflate;")
        state = json.loads(zlib.decompress(base64.b64decode(packed)))
        assert summary["campaign_run_id"] in state["searchFilter"] and str(state["orderByAsc"]).lower() == order
        runs = client.search_runs([experiment.experiment_id], state["searchFilter"])  # a valid MLflow search
        assert sorted(r.info.run_id for r in runs) == sorted(r["run_id"] for r in summary["topk"])  # the 3 chains
