"""Links into the MLflow UI that open the view a user needs (a first version; the gallery view comes with it)."""

from __future__ import annotations

import urllib.parse


def chains_view_url(base: str, experiment_id: str, campaign_run_id: str) -> str:
    """The MLflow runs page showing one campaign's chain runs, sorted by final_loss (lowest first)."""
    query = urllib.parse.urlencode(
        {
            "searchFilter": f"tags.`cdm.kind` = 'chain' and tags.`mlflow.parentRunId` = '{campaign_run_id}'",
            "orderByKey": "metrics.`final_loss`",
            "orderByAsc": "true",
        },
        quote_via=urllib.parse.quote,
    )
    return f"{base}/#/experiments/{experiment_id}/runs?{query}"
