"""Links into the MLflow UI that open a campaign the way a user picks candidates: its chain runs sorted by
final_loss with the columns one selects on in view, and a gallery of the chains' candidate pictures side by side.

What MLflow's runs page (3.x) takes from where, read from its JS bundle and checked in Chromium
(tests/tuning/test_ui_browser.py):
- the URL carries the search only (`searchFilter`, `orderByKey`, `orderByAsc`, ...); columns and charts live in the
  browser's local storage, which a link cannot set;
- a *shared view state* carries both: an experiment tag `mlflow.sharedViewState.<key>` whose JSON value holds the
  search facets and the UI state (`selectedColumns`, `columnOrder`, `compareRunCharts`, `compareRunSections`,
  `runsHiddenMode`, ...), opened by `#/experiments/<id>/runs?viewStateShareKey=<key>` (what the UI's Share button
  makes). A URL that also holds a search parameter ignores the shared state, so the links hold the key only;
- `compareRunsMode=CHART` in the URL opens the same view on its charts: there, an image-grid chart of the image key
  CANDIDATE_KEY shows each visible run's picture, and the first ten runs in the table's order are the visible ones.

cdm writes two such tags per campaign (`save_views`: the chain table and the gallery; when the campaign starts, when
it ends, and from `cdm ui`); their values are compressed as the UI's own are, and they are not the saved-view
envelope, so they do not fill the UI's list of saved views (at most 40 there).
"""

from __future__ import annotations

import base64
import json
import math
import zlib
from collections.abc import Sequence
from typing import Any
from urllib.parse import quote

SHARED_VIEW_TAG = "mlflow.sharedViewState."  # MLflow's experiment-tag prefix of a shared view state
CANDIDATE_KEY = "candidate"  # the image key of each chain's candidate picture (MlflowClient.log_image)
GALLERY = 10  # pictures in the gallery: MLflow's image grid shows at most 10 runs
CANDIDATE_STEP = 0  # its step: MLflow's image grid shows exactly one step, and the charts it makes itself show 0
COLUMNS = (  # the chain table's columns, in this order after the run name and its creation time
    "metrics.`final_loss`",
    "metrics.`prior_fit`",
    "metrics.`improvement`",  # editing campaigns only
    "tags.`cdm.seed`",
    "tags.`status`",
    "tags.`cdm.selected`",  # shown once a run has it
    "tags.`cdm.zeta`",  # last: the longest
)

RUN_NAME, CREATED = "attributes.`Run Name`", "runDateAndNestInfo"  # ag-grid column ids (pinned left)
WIDTHS = {RUN_NAME: 140, CREATED: 135, "metrics.`final_loss`": 100, "metrics.`prior_fit`": 90, "tags.`cdm.seed`": 80,
          "tags.`status`": 80, "tags.`cdm.selected`": 110, "tags.`cdm.zeta`": 200}  # fmt: skip


def view_key(campaign_run_id: str, view: str = "chains") -> str:
    """A shared view state's key ('chains' or 'gallery'; a valid experiment-tag key: letters, digits, '-')."""
    return f"cdm-{view}-{campaign_run_id}"


def chains_state(campaign_run_id: str) -> dict[str, Any]:
    """The chain table: the campaign's chain runs (tag cdm.campaign), lowest final_loss first, COLUMNS in view,
    narrow enough for final_loss, prior_fit, seed and status at 1400 px beside MLflow's Assistant panel (which
    its UI opens once, on a browser's first visit to a local server). Its charts are the gallery's."""
    return _state(_campaign(campaign_run_id), ascending=True)


def gallery_state(campaign_run_id: str, losses: Sequence[float] = ()) -> dict[str, Any]:
    """The gallery: the top 10 chains' candidate pictures side by side, best first. MLflow's image grid shows the
    first 10 runs of the table in reverse order, so once the losses are known (losses: the campaign's final_loss
    values) the view keeps the 10 best (final_loss <= the 10th lowest) sorted highest first: the grid then starts
    at the best. Without losses (a campaign still running): the 10 best so far, lowest first (the grid ends at
    the best)."""
    finite = sorted(v for v in losses if math.isfinite(v))
    if not finite:
        return _state(_campaign(campaign_run_id), ascending=True, run_list=False)
    cutoff = finite[min(GALLERY, len(finite)) - 1]
    search = f"{_campaign(campaign_run_id)} and metrics.`final_loss` <= {cutoff!r}"
    return _state(search, ascending=False, run_list=False)


def _campaign(campaign_run_id: str) -> str:
    return f"tags.`cdm.campaign` = '{campaign_run_id}'"


def _state(search: str, ascending: bool, run_list: bool = True) -> dict[str, Any]:
    """A shared view state: search facets and UI state (MLflow's names and values); run_list False hides the run
    list beside the charts (the gallery: more pictures on a row, each titled with its run's name)."""

    def chart(uuid: str, kind: str, section: str, **fields: Any) -> dict[str, Any]:
        card = {"uuid": uuid, "type": kind, "runsCountToCompare": GALLERY, "metricSectionId": section}
        return card | {"deleted": False, "isGenerated": False} | fields

    def section(uuid: str, name: str, **fields: Any) -> dict[str, Any]:
        return {"uuid": uuid, "name": name, "display": True, "isReordered": True} | fields

    return {
        "searchFilter": search,
        "orderByKey": "metrics.`final_loss`",
        "orderByAsc": ascending,
        "startTime": "ALL",
        "lifecycleFilter": "Active",
        "modelVersionFilter": "All Runs",
        "datasetsFilter": [],
        "selectedColumns": list(COLUMNS),
        "columnOrder": [RUN_NAME, CREATED, *COLUMNS],
        "columnWidths": {column: WIDTHS.get(column, 100) for column in (RUN_NAME, CREATED, *COLUMNS)},
        "runsHiddenMode": "FIRST_10_RUNS",  # the charts show the table's first ten runs
        "compareRunSections": [  # the gallery alone on its row, tall enough for two rows of pictures
            section("cdm-gallery", "Candidates", columns=1, cardHeight=640),
            section("cdm-losses", "Losses", columns=3),
        ],
        "compareRunCharts": [
            chart(
                "cdm-candidates",
                "IMAGE",
                "cdm-gallery",
                imageKeys=[CANDIDATE_KEY],
                step=CANDIDATE_STEP,
                showRunParams=False,
            ),
            chart("cdm-final-loss", "BAR", "cdm-losses", metricKey="final_loss", displayName="final_loss"),
            chart("cdm-prior-fit", "BAR", "cdm-losses", metricKey="prior_fit", displayName="prior_fit"),
            chart("cdm-loss", "LINE", "cdm-losses", metricKey="loss", displayName="loss by step"),
        ],
        "hideEmptyCharts": True,
        "viewMaximized": False,
        "runListHidden": not run_list,
    }


def save_views(client: Any, experiment_id: str, campaign_run_id: str, losses: Sequence[float] = ()) -> None:
    """Write the campaign's two shared view states on its experiment (chains_view_url's, gallery_view_url's);
    written again with the losses when the campaign ends (the gallery's order needs them)."""
    for view, state in (("chains", chains_state(campaign_run_id)), ("gallery", gallery_state(campaign_run_id, losses))):
        client.set_experiment_tag(experiment_id, SHARED_VIEW_TAG + view_key(campaign_run_id, view), packed(state))


def packed(state: dict[str, Any]) -> str:
    """A view state as the UI's Share button writes it: 'deflate;' + base64 of the zlib-compressed JSON (about 900
    bytes, against 1,900 as plain JSON: every page of the experiment loads all its tags)."""
    text = json.dumps(state, separators=(",", ":")).encode()
    return f"deflate;{base64.b64encode(zlib.compress(text, 9)).decode()}"


def chains_view_url(base: str, experiment_id: str, campaign_run_id: str) -> str:
    """The MLflow UI's runs table of this campaign's chain runs, sorted by final_loss ascending, with final_loss,
    prior_fit, seed, status, cdm.selected and zeta in view. Opens the shared view save_views writes (the tracker
    writes it when the campaign starts). base: the UI's address, e.g. http://127.0.0.1:5000."""
    return _url(base, experiment_id, view_key(campaign_run_id, "chains"))


def gallery_view_url(base: str, experiment_id: str, campaign_run_id: str) -> str:
    """The campaign's charts: the top 10 chains' candidate pictures side by side, best first (x* for image
    problems, f(x*) samples against the target for vector problems), then final_loss, prior_fit and loss curves."""
    return f"{_url(base, experiment_id, view_key(campaign_run_id, 'gallery'))}&compareRunsMode=CHART"


def _url(base: str, experiment_id: str, key: str) -> str:
    experiment = quote(str(experiment_id), safe="")
    return f"{base.rstrip('/')}/#/experiments/{experiment}/runs?viewStateShareKey={quote(key, safe='')}"


def newest_campaign(client: Any) -> Any | None:
    """The store's newest campaign run (tag cdm.kind = campaign) in any experiment, or None."""
    experiments = [e.experiment_id for e in client.search_experiments()]
    if not experiments:
        return None
    query, newest = "tags.`cdm.kind` = 'campaign'", ["attributes.start_time DESC"]
    runs = client.search_runs(experiments, query, order_by=newest, max_results=1)
    return runs[0] if runs else None


def refresh_views(client: Any, campaign: Any) -> None:
    """Write (again) a campaign run's views, its gallery from its best chains in the store: for a campaign made
    before cdm wrote views, or one still running (`cdm ui`)."""
    experiment_id, run_id = campaign.info.experiment_id, campaign.info.run_id
    best = client.search_runs(
        [experiment_id], f"{_campaign(run_id)} and tags.status = 'ok'", order_by=["metrics.final_loss ASC"],
        max_results=GALLERY,
    )  # fmt: skip
    finished = campaign.info.status != "RUNNING"
    save_views(
        client, experiment_id, run_id, [r.data.metrics.get("final_loss", math.inf) for r in best] if finished else ()
    )
