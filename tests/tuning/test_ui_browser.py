"""As a user would, in headless Chromium (Debian's chromium) driven over the DevTools protocol: a tracked campaign,
`cdm ui` and the URLs it prints, the chain table and the gallery they open, three runs tagged, `cdm topk
--selected`. Screenshots are saved under the test's tmp_path (chains.png, gallery.png, selected.png).

Each page is loaded in a fresh browser profile, so MLflow's Assistant panel is open beside it (its UI opens the panel
on a browser's first visit to a local server): the narrowest the runs page gets at a given window size."""

import asyncio
import base64
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from cdm_cli.main import main
from cdm_dist.driver.processes import free_port, stop_process_group
from cdm_dist.driver.runner import run_campaign
from cdm_dist.driver.store import CampaignStore
from cdm_dist.driver.tracking import CANDIDATES_TABLE, client_for
from cdm_dist.driver.worker import LocalExecutor

BROWSER = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
needs_browser = pytest.mark.skipif(BROWSER is None, reason="needs a Chromium binary (apt-get install chromium)")
KEY_COLUMNS = ("metrics.`final_loss`", "metrics.`prior_fit`", "tags.`cdm.seed`", "tags.`status`")

CHAIN_TABLE = """(() => {
  const shown = (el) => {  // its label's start is on screen, not under another element (the Assistant panel)
    if (!el) return false;
    const r = el.getBoundingClientRect();
    const hit = document.elementFromPoint(r.left + Math.min(r.width / 2, 40), r.top + r.height / 2);
    return r.width > 0 && hit !== null && el.contains(hit);
  };
  const rows = [...document.querySelectorAll('.ag-pinned-left-cols-container .ag-row')]
    .sort((a, b) => a.getAttribute('row-index') - b.getAttribute('row-index'));
  const runs = rows.map(r => (r.querySelector('a[href*="/runs/"]') || {href: ''}).href.split('/runs/')[1]);
  const selected = {};
  for (const cell of document.querySelectorAll('.ag-cell[col-id="tags.`cdm.selected`"]')) {
    const row = cell.closest('.ag-row');
    selected[row.getAttribute('row-index')] = cell.textContent.trim();
  }
  const columns = {};
  for (const id of COLUMNS) columns[id] = shown(document.querySelector(`.ag-header-cell[col-id="${id}"]`));
  return {runs, columns, selected};
})()"""

GALLERY = """(() => [...document.querySelectorAll('img.rc-image-img')].map(img => {
  const r = img.getBoundingClientRect();
  const hit = document.elementFromPoint(r.left + r.width / 2, r.top + r.height / 2);
  return {run: new URL(img.src).searchParams.get('run_uuid'), loaded: img.complete && img.naturalWidth > 0,
          shown: r.width > 100 && hit !== null && img.contains(hit)};
}))()"""


async def _page(url, width, height, script, ready, shot):
    """Load url in a fresh headless Chromium of that window size; evaluate script (JavaScript) until ready(value)
    holds (or 120 s pass); screenshot to shot; return the last value."""
    import aiohttp  # Ray's dependency

    port = free_port()
    # Chromium's helpers may still write in the profile as the folder is removed: that cleanup is not under test
    with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as profile:
        command = [BROWSER, "--headless", "--no-sandbox", "--disable-gpu", f"--remote-debugging-port={port}"]
        command += [f"--user-data-dir={profile}", f"--window-size={width},{height}", "about:blank"]
        browser = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        pages = []
        try:
            for _ in range(300):
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=2) as response:
                        pages = [p for p in json.load(response) if p["type"] == "page"]
                    if pages:
                        break
                except OSError:
                    pass
                await asyncio.sleep(0.2)
            assert pages, f"{BROWSER} did not start"
            async with (
                aiohttp.ClientSession() as session,
                session.ws_connect(pages[0]["webSocketDebuggerUrl"], max_msg_size=0) as socket,
            ):
                calls = iter(range(1, 1_000_000))

                async def call(method, **params):
                    number = next(calls)
                    await socket.send_json({"id": number, "method": method, "params": params})
                    async for message in socket:
                        answer = json.loads(message.data)
                        if answer.get("id") == number:
                            assert "error" not in answer, answer
                            return answer["result"]

                async def evaluate():
                    answer = await call("Runtime.evaluate", expression=script, returnByValue=True)
                    return answer["result"].get("value")

                await call("Page.navigate", url=url)
                deadline, value = time.monotonic() + 120, None
                while time.monotonic() < deadline:
                    value = await evaluate()
                    if value is not None and ready(value):
                        await asyncio.sleep(1)  # images and layout settle
                        value = await evaluate()
                        break
                    await asyncio.sleep(1)
                picture = await call("Page.captureScreenshot", format="png")
                shot.write_bytes(base64.b64decode(picture["data"]))
                return value
        finally:
            browser.terminate()
            browser.wait(30)


def page(url, width, height, script, ready, shot):
    return asyncio.run(_page(url, width, height, script, ready, shot))


@pytest.fixture
def cdm_ui(tmp_path):
    """Start `cdm ui` over a store; returns (port, what it printed) once the UI answers. Stopped at teardown."""
    started = []

    def start(uri):
        port = free_port()
        log = tmp_path / f"cdm_ui_{port}.txt"
        with log.open("w") as out:
            command = [sys.executable, "-m", "cdm_cli.main", "ui", "--tracking-uri", uri, "--port", str(port),
                       "--workers", "1"]  # fmt: skip
            process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        started.append(process)
        for _ in range(240):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                return port, log.read_text()
            except OSError:
                assert process.poll() is None, log.read_text()
                time.sleep(0.5)
        pytest.fail(f"cdm ui did not answer on port {port}: {log.read_text()}")

    yield start
    for process in started:
        stop_process_group(process)


@needs_browser
def test_picking_candidates_in_the_mlflow_ui_round_trip(small_campaign, tmp_path, cdm_ui):
    """The URLs `cdm ui` prints for the newest campaign:
    - the chain table lists its chains by final_loss, with final_loss, prior_fit, seed and status in view at 1400 px;
    - the gallery shows the top 5 pictures (here f(x*) samples against the target) in view, best first;
    then three runs are tagged cdm.selected=true through MlflowClient on the UI's own server (the REST call the UI's
    tag editor makes: POST runs/set-tag), the table shows them, and `cdm topk --selected` returns exactly those."""
    config = small_campaign(tracking__enabled=True, tracking__experiment="ui-test", chains__count=8)
    report = run_campaign(config, LocalExecutor(config), CampaignStore.create(config), progress=False)
    by_loss = [r.run_id for r in sorted(report.rows, key=lambda r: r.final_loss)]
    assert not any(r.failed for r in report.rows)

    client = client_for(config.tracking.uri)  # the campaign run's candidates table: every chain, by final_loss
    path = client.download_artifacts(report.campaign_run_id, CANDIDATES_TABLE, str(tmp_path))
    table = json.loads(Path(path).read_text(encoding="utf-8"))
    assert table["columns"][:4] == ["rank", "chain", "run_id", "final_loss"]
    assert {"prior_fit", "seed", "zeta", "status"} <= set(table["columns"])
    assert [row[2] for row in table["data"]] == by_loss

    port, printed = cdm_ui(config.tracking.uri)
    chains_url = re.search(r"chains, by final_loss: (\S+)", printed).group(1)
    gallery_url = re.search(r"gallery \(top 10\): +(\S+)", printed).group(1)
    assert report.campaign_run_id in printed and "cdm.selected=true" in printed and "cdm topk --selected" in printed

    script = CHAIN_TABLE.replace("COLUMNS", json.dumps(KEY_COLUMNS))
    seen = page(chains_url, 1400, 1000, script, lambda v: len(v["runs"]) == 8, tmp_path / "chains.png")
    assert seen["runs"] == by_loss  # every chain, lowest final_loss first
    assert seen["columns"] == dict.fromkeys(KEY_COLUMNS, True)  # in view without scrolling or choosing columns

    seen = page(gallery_url, 1920, 1200, GALLERY, lambda v: sum(i["loaded"] for i in v) >= 5, tmp_path / "gallery.png")
    assert [i["run"] for i in seen[:5]] == by_loss[:5]  # the top 5, best first
    assert all(i["loaded"] and i["shown"] for i in seen[:5])

    chosen = [by_loss[0], by_loss[2], by_loss[5]]
    ui_server = client_for(f"http://127.0.0.1:{port}")
    for run_id in chosen:
        ui_server.set_tag(run_id, "cdm.selected", "true")
    script = CHAIN_TABLE.replace("COLUMNS", json.dumps(["tags.`cdm.selected`"]))
    seen = page(chains_url, 1400, 1000, script, lambda v: len(v["selected"]) == 8, tmp_path / "selected.png")
    assert [seen["runs"][int(row)] for row, value in seen["selected"].items() if value == "true"] == chosen

    out = tmp_path / "topk.json"
    argv = ["topk", "--selected", "--tracking-uri", config.tracking.uri, "--json", str(out)]
    assert main([*argv, "--export", str(tmp_path / "export")]) == 0
    assert sorted(row["run_id"] for row in json.loads(out.read_text())["rows"]) == sorted(chosen)
    for name in ("chains.png", "gallery.png", "selected.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cdm_ui_without_a_campaign_is_one_line_and_writes_nothing(tmp_path, capsys):
    missing = tmp_path / "none" / "mlflow.db"
    assert main(["ui", "--tracking-uri", f"sqlite:///{missing}"]) == 2
    assert not missing.parent.exists()
    empty = tmp_path / "empty.db"
    client_for(f"sqlite:///{empty}").create_experiment("nothing-yet")
    before = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    assert main(["ui", "--tracking-uri", f"sqlite:///{empty}"]) == 2
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()} == before
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2 and "no campaign in" in lines[1] and "cdm run" in lines[1]


RUNS_PAGE = """(() => {
  const rows = [...document.querySelectorAll('.ag-pinned-left-cols-container .ag-row')];
  const runs = rows.map(r => (r.querySelector('a[href*="/runs/"]') || {href: ''}).href.split('/runs/')[1] || '');
  const matching = (document.body.innerText.match(/(\\d[\\d,]*\\+?) matching runs?/) || [])[1] || null;
  return {runs: runs.map(r => r.split(/[/?#]/)[0]), matching};
})()"""
ARTIFACT_TREE = """[...document.querySelectorAll('[data-testid="artifact-tree-node"]')]
  .map(el => el.textContent.trim())"""


@needs_browser
def test_a_campaign_above_child_runs_max_shows_its_top_k_runs_and_chains_parquet(small_campaign, tmp_path, cdm_ui):
    """Issue 23, campaigns at scale, as the UI shows them (benchmarks/ui_scale.py times it): 60 chains with
    tracking.child_runs_max=10, so one campaign run and child runs for the top-k only. The experiment's runs page
    counts exactly those runs and lists the campaign run; the chain table `cdm ui` prints lists exactly the child
    runs, by final_loss; the campaign run's artifacts page lists chains.parquet, which holds all 60 chains."""
    from cdm_dist.driver.chain_table import CHAINS_TABLE, read_chain_table

    config = small_campaign(tracking__enabled=True, tracking__experiment="ui-scale", chains__count=60,
                            tracking__child_runs_max=10, method__num_steps=4, resources__micro_batch=20,
                            pictures=False, topk=3)  # fmt: skip
    report = run_campaign(config, LocalExecutor(config), CampaignStore.create(config), progress=False)
    client = client_for(config.tracking.uri)
    experiment = client.get_experiment_by_name("ui-scale").experiment_id
    children = client.search_runs([experiment], f"tags.mlflow.parentRunId = '{report.campaign_run_id}'")
    by_loss = [r.info.run_id for r in sorted(children, key=lambda r: r.data.metrics["final_loss"])]
    assert 3 <= len(by_loss) <= 6  # the top-k (report.topk and the k best by final_loss), not a run per chain
    assert len(client.search_runs([experiment])) == 1 + len(by_loss)
    table = read_chain_table(client.download_artifacts(report.campaign_run_id, CHAINS_TABLE, str(tmp_path)))
    assert sorted(table["chain"]) == list(range(60))
    assert sorted(r for r in table["run_id"] if r) == sorted(by_loss)

    port, printed = cdm_ui(config.tracking.uri)
    base = f"http://127.0.0.1:{port}/#/experiments/{experiment}"
    seen = page(f"{base}/runs", 1400, 1000, RUNS_PAGE, lambda v: v["matching"] and v["runs"], tmp_path / "runs.png")
    assert seen["matching"] == str(1 + len(by_loss))  # "N matching runs": the campaign run and its top-k
    assert report.campaign_run_id in seen["runs"] and set(seen["runs"]) <= {report.campaign_run_id, *by_loss}

    chains_url = re.search(r"chains, by final_loss: (\S+)", printed).group(1)
    ready = lambda v: len(v["runs"]) >= len(by_loss)  # noqa: E731
    seen = page(chains_url, 1400, 1000, RUNS_PAGE, ready, tmp_path / "top.png")
    assert seen["runs"] == by_loss and seen["matching"] == str(len(by_loss))

    url = f"{base}/runs/{report.campaign_run_id}/artifacts"
    seen = page(url, 1400, 1000, ARTIFACT_TREE, lambda v: CHAINS_TABLE in v, tmp_path / "artifacts.png")
    assert CHAINS_TABLE in seen
