"""As a user would: a tracked campaign, `cdm ui`, the runs page opened in headless Chromium (Debian's chromium),
the campaign's chains listed sorted by final_loss, a screenshot saved."""

import re
import shutil
import subprocess
import sys
import urllib.parse
import urllib.request

import pytest

from cdm_dist.driver.runner import run_campaign
from cdm_dist.driver.store import CampaignStore
from cdm_dist.driver.tracking import client_for
from cdm_dist.driver.worker import LocalExecutor

BROWSER = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
pytestmark = pytest.mark.skipif(BROWSER is None, reason="needs a Chromium binary (apt-get install chromium)")


def _browser(url, *args):
    command = [BROWSER, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=30000"]
    command += ["--window-size=2400,1000", *args, url]
    return subprocess.run(command, capture_output=True, text=True, timeout=180)


def test_the_mlflow_ui_lists_the_chains_by_final_loss(small_campaign, tmp_path, http_service):
    config = small_campaign(tracking__enabled=True, tracking__experiment="ui-test")
    report = run_campaign(config, LocalExecutor(config), CampaignStore.create(config), progress=False)
    experiment = client_for(config.tracking.uri).get_experiment_by_name("ui-test").experiment_id

    command = [sys.executable, "-m", "cdm_cli.main", "ui", "--tracking-uri", config.tracking.uri, "--port", "{port}"]
    port = http_service(command)
    query = urllib.parse.urlencode(
        {"searchFilter": "tags.`cdm.kind` = 'chain'", "orderByKey": "metrics.`final_loss`", "orderByAsc": "true"},
        quote_via=urllib.parse.quote,
    )
    url = f"http://127.0.0.1:{port}/#/experiments/{experiment}/runs?{query}"
    dom = _browser(url, "--dump-dom").stdout
    shot = tmp_path / "mlflow_ui.png"
    _browser(url, f"--screenshot={shot}")
    listed = list(dict.fromkeys(re.findall(r"chain-\d{5}", dom)))
    by_loss = [f"chain-{r.chain:05d}" for r in sorted(report.rows, key=lambda r: r.final_loss)]
    assert listed == by_loss  # every chain, in order of held-out loss
    assert "final_loss" in dom
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000
