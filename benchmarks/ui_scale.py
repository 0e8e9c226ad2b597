"""Issue 23, "Design campaigns at scale": is MLflow's UI responsive over a campaign of 10^5 chains kept in
chains.parquet (child runs for the top-k only), compared with one child run per chain?

Two steps:
- `python -m benchmarks.ui_scale --make-store DIR --chains N [--child-runs-max M]`: a tracked campaign of N chains of
  gmm2d at 2 steps (local executor, no pictures) into DIR (mlflow.db, artifacts, campaigns).
- `python -m benchmarks.ui_scale --replicate SOURCE DEST TIMES`: a synthetic store, SOURCE's child runs copied up to
  TIMES times their number (10^5 child runs from a 2,000-chain store in about 30 s).
- `python -m benchmarks.ui_scale --store NAME=DIR ... --json OUT.json`: for each store, a copy of its mlflow.db
  (the UI writes view tags; the store itself is left as it is) served by `cdm ui` on 127.0.0.1, then, each in a fresh
  headless Chromium profile (the DevTools protocol, as tests/tuning/test_ui_browser.py), the time from navigation
  until the page shows what a user opens it for:
  - runs: the experiment's runs page, until the campaign run's row is in the table;
  - chains: the chain table `cdm ui` prints (the campaign's chain runs by final_loss), until its first rows show;
  - artifacts: the campaign run's artifacts page, until chains.parquet is listed.
  Each page is loaded --repeats times, stores interleaved (the machine's load falls on all alike); the JSON holds
  every time and the server's part (the runs/search and artifacts/list requests, from the browser's resource
  timing), the .md the medians. `--note TEXT --json OUT.json` alone adds a line to a written report.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import re
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

RUNS = """(() => {
  const rows = [...document.querySelectorAll('.ag-pinned-left-cols-container .ag-row')];
  const runs = rows.map(r => (r.querySelector('a[href*="/runs/"]') || {href: ''}).href.split('/runs/')[1] || '');
  const matching = (document.body.innerText.match(/(\\d[\\d,]*\\+?) matching runs?/) || [])[1] || null;
  const api = performance.getEntriesByType('resource').filter(e => /runs\\/search|artifacts\\/list/.test(e.name))
    .reduce((total, e) => total + e.duration, 0);
  return {rows: rows.length, runs: runs.map(r => r.split(/[/?#]/)[0]), matching, api_ms: Math.round(api)};
})()"""
ARTIFACTS = """(() => {
  const api = performance.getEntriesByType('resource').filter(e => /runs\\/search|artifacts\\/list/.test(e.name))
    .reduce((total, e) => total + e.duration, 0);
  return {names: [...document.querySelectorAll('[data-testid="artifact-tree-node"]')].map(el => el.textContent.trim()),
          api_ms: Math.round(api)};
})()"""


def make_store(root: Path, chains: int, child_runs_max: int) -> dict:
    from cdm_dist.driver.campaign import load_config
    from cdm_dist.driver.runner import run_campaign
    from cdm_dist.driver.store import CampaignStore
    from cdm_dist.driver.worker import LocalExecutor

    root.mkdir(parents=True, exist_ok=True)
    items = {"name": f"ui{chains}", "problem.name": "gmm2d", "method.num_steps": 2, "method.n_c": 16,
             "method.target_batch": 16, "method.n_guess": 2, "chains.count": chains,
             "chains.zeta": "[{kind: linear, scale: 3.0, final: 0.1}, {kind: rt, normalize: true}]",
             "resources.executor": "local", "resources.micro_batch": 500, "resources.checkpoint_every": 2,
             "pictures": "false", "topk": 10, "tracking.enabled": "true", "tracking.child_runs_max": child_runs_max,
             "tracking.uri": f"sqlite:///{root}/mlflow.db", "tracking.artifact_location": str(root / "artifacts"),
             "tracking.experiment": f"ui{chains}", "output": str(root / "campaigns")}  # fmt: skip
    config = load_config(None, [f"{k}={v}" for k, v in items.items()])
    start = time.perf_counter()
    report = run_campaign(config, LocalExecutor(config), CampaignStore.create(config), progress=False)
    return {"chains": chains, "child_runs_max": child_runs_max, "campaign_run_id": report.campaign_run_id,
            "seconds": round(time.perf_counter() - start, 1)}  # fmt: skip


def replicate(source: Path, dest: Path, times: int) -> dict:
    """A synthetic store of many child runs without their compute: source's mlflow.db with each child run copied
    times - 1 more times under new run ids (x and the copy number for the id's first 4 digits; the number at the
    name's end), rows as MLflow wrote them (runs, tags, params, metrics, latest_metrics), the artifacts those of
    the original."""
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy2(source / "mlflow.db", dest / "mlflow.db")
    new_id = "printf('x%03d', n.i) || substr(x.run_uuid, 5)"  # no original id starts with x
    children = "x.run_uuid in (select run_uuid from tags where key = 'mlflow.parentRunId')"
    copies = f"with recursive n(i) as (select 1 union all select i + 1 from n where i < {times - 1}) "
    start = time.perf_counter()
    with sqlite3.connect(dest / "mlflow.db") as con:
        columns = {t: [r[1] for r in con.execute(f"pragma table_info({t})")] for t in
                   ("runs", "tags", "params", "metrics", "latest_metrics")}  # fmt: skip
        for table, names in columns.items():
            values = [new_id if c == "run_uuid" else "x.name || '-' || n.i" if c == "name" and table == "runs"
                      else f"x.{c}" for c in names]  # fmt: skip
            con.execute(f"insert into {table} ({', '.join(names)}) {copies}"
                        f"select {', '.join(values)} from {table} x, n where {children}")  # fmt: skip
    return store_facts(dest / "mlflow.db") | {"seconds": round(time.perf_counter() - start, 1)}


def store_facts(db: Path) -> dict:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as con:
        runs = con.execute("select count(*) from runs").fetchone()[0]
        children = con.execute("select count(*) from tags where key='mlflow.parentRunId'").fetchone()[0]
    return {"runs": runs, "child_runs": children, "db_bytes": db.stat().st_size}


def timed_page(browser: str, url: str, script: str, ready: dict, timeout: float = 180.0) -> dict:
    """Navigate a fresh headless Chromium to url; poll script every 50 ms until each of ready's conditions (name:
    function of the script's value) holds: the seconds from Page.navigate to each (None if not within timeout)
    and the last value."""
    import asyncio

    import aiohttp

    from cdm_dist.driver.processes import free_port

    async def run():
        port = free_port()
        with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as profile:  # Chromium may still write
            command = [browser, "--headless", "--no-sandbox", "--disable-gpu", f"--remote-debugging-port={port}"]
            command += [f"--user-data-dir={profile}", "--window-size=1400,1000", "about:blank"]
            process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                pages = []
                for _ in range(600):
                    try:
                        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=2) as response:
                            pages = [p for p in json.load(response) if p["type"] == "page"]
                        if pages:
                            break
                    except OSError:
                        pass
                    await asyncio.sleep(0.2)
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
                                return answer.get("result", {})

                    start = time.perf_counter()
                    await call("Page.navigate", url=url)
                    value, seconds = None, dict.fromkeys(ready)
                    while time.perf_counter() - start < timeout and None in seconds.values():
                        answer = await call("Runtime.evaluate", expression=script, returnByValue=True)
                        value = answer.get("result", {}).get("value")
                        for name, holds in ready.items():
                            if seconds[name] is None and value is not None and holds(value):
                                seconds[name] = round(time.perf_counter() - start, 3)
                        await asyncio.sleep(0.05)
                    return {"seconds": seconds, "value": value}
            finally:
                process.terminate()
                process.wait(30)

    return asyncio.run(run())


def serve(name: str, store: Path, work: Path, stack: contextlib.ExitStack) -> dict:
    """`cdm ui` over a copy of store's mlflow.db (it writes the view tags: into the copy); its pages and facts."""
    from cdm_dist.driver.processes import free_port, stop_process_group

    db = work / name / "mlflow.db"
    db.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(store / "mlflow.db", db)
    port = free_port()
    log = work / name / "cdm_ui.txt"
    with log.open("w") as out:
        command = [sys.executable, "-m", "cdm_cli.main", "ui", "--tracking-uri", f"sqlite:///{db}", "--port", str(port)]
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    stack.callback(stop_process_group, process)
    for _ in range(1200):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            break
        except OSError:
            if process.poll() is not None:
                raise SystemExit(f"cdm ui failed: {log.read_text()}") from None
            time.sleep(0.5)
    printed = log.read_text()
    run_id = re.search(r"\(run ([0-9a-f]{32})\)", printed).group(1)
    chains_url = re.search(r"chains, by final_loss: (\S+)", printed).group(1)
    experiment = re.search(r"#/experiments/(\d+)/", chains_url).group(1)
    base = f"http://127.0.0.1:{port}/#/experiments/{experiment}"
    pages = {  # page: (url, script, {figure: condition})
        "runs": (f"{base}/runs", RUNS, {"runs_first_rows": lambda v: v["rows"] > 0,
                                        "runs_campaign_row": lambda v: run_id in v["runs"]}),
        "chains": (chains_url, RUNS, {"chain_table_rows": lambda v: v["rows"] >= 10}),
        "artifacts": (f"{base}/runs/{run_id}/artifacts", ARTIFACTS,
                      {"artifacts_chains_parquet": lambda v: "chains.parquet" in v["names"]}),
    }  # fmt: skip
    return {"pages": pages, "facts": store_facts(db) | {"campaign_run_id": run_id}}


def measure(stores: dict, browser: str, repeats: int, timeout: float, work: Path) -> dict:
    """Each page of each store, repeats times, interleaved (page by page, store by store) so that the machine's
    load falls on all stores alike."""
    results = {}
    with contextlib.ExitStack() as stack:
        served = {name: serve(name, store, work, stack) for name, store in stores.items()}
        for name, s in served.items():
            results[name] = s["facts"] | {"seconds": {}, "api_ms": {}, "last_seen": {}}
        for _ in range(repeats):
            for page in ("runs", "chains", "artifacts"):
                for name, s in served.items():
                    url, script, ready = s["pages"][page]
                    shown = timed_page(browser, url, script, ready, timeout)
                    for figure, seconds in shown["seconds"].items():
                        results[name]["seconds"].setdefault(figure, []).append(seconds)
                    value = shown["value"] or {}
                    results[name]["api_ms"].setdefault(page, []).append(value.get("api_ms"))
                    kept = {k: v for k, v in value.items() if k in ("rows", "names", "matching")}
                    results[name]["last_seen"][page] = kept
                    print(f"{name} {page}: {shown['seconds']} api {value.get('api_ms')} ms {kept}", flush=True)
    for result in results.values():
        result["median"] = {f: _median(t) for f, t in result["seconds"].items()}
        result["median_api_ms"] = {p: _median(t) for p, t in result["api_ms"].items()}
    return results


def _median(values):
    done = [v for v in values if v is not None]
    return round(statistics.median(done), 3) if done and len(done) == len(values) else None


FIGURES = ("runs_first_rows", "runs_campaign_row", "chain_table_rows", "artifacts_chains_parquet")


def add_notes(json_path: Path, notes: list[str]) -> None:
    """Add notes to a written result (its .md written again)."""
    result = json.loads(json_path.read_text())
    result["notes"] = result.get("notes", []) + notes
    json_path.write_text(json.dumps(result, indent=1) + "\n")
    json_path.with_suffix(".md").write_text(markdown(result))


def markdown(result: dict) -> str:
    stores = result["stores"]
    lines = ["# MLflow UI over large campaigns (issue 23)", "",
             f"`{result['command']}` ({result['when']}; {result['machine']}).", "",
             "Seconds from navigation until the page shows it, each load in a fresh headless Chromium profile "
             f"(median of {result['repeats']}; None: not within {result['timeout']} s): the experiment's runs page "
             "until its first rows, and until the campaign run's row; the chain table `cdm ui` prints until 10 "
             "rows; the campaign run's artifacts page until chains.parquet is listed.", "",
             "| store | chains | runs in store | " + " | ".join(FIGURES) + " |",
             "|---" * (3 + len(FIGURES)) + "|"]  # fmt: skip
    for name, s in stores.items():
        cells = [name, s.get("chains", ""), s["runs"], *(s["median"].get(f) for f in FIGURES)]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    lines += [
        "",
        "The server's part (ms, median; the runs/search or artifacts/list requests the page made, as the "
        "browser's resource timing saw them):",
        "",
        "| store | runs | chains | artifacts |",
        "|---|---|---|---|",
    ]
    for name, s in stores.items():
        m = s["median_api_ms"]
        lines.append(f"| {name} | {m.get('runs')} | {m.get('chains')} | {m.get('artifacts')} |")
    for name, ratios in result.get("ratios", {}).items():
        lines += ["", f"{name} / {next(iter(stores))}: " + ", ".join(f"{k} {v}" for k, v in ratios.items())]
    lines += ["", *(f"- {note}" for note in result.get("notes", []))] if result.get("notes") else []
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ui_scale", description=__doc__.splitlines()[0])
    parser.add_argument("--make-store", type=Path, help="make a store in this folder (then exit)")
    parser.add_argument("--chains", type=int, default=2000)
    parser.add_argument("--replicate", nargs=3, metavar=("SOURCE", "DEST", "TIMES"), help="make a synthetic store")
    parser.add_argument("--child-runs-max", type=int, default=100000)
    parser.add_argument("--store", action="append", default=[], help="NAME=DIR[:CHAINS] of a store to measure")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--note", action="append", default=[], help="a line for the report (repeatable)")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds a page may take")
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/ui_scale.json"))
    args = parser.parse_args(argv)
    if args.make_store:
        print(json.dumps(make_store(args.make_store.resolve(), args.chains, args.child_runs_max)), flush=True)
        return 0
    if args.note and not args.store:
        add_notes(args.json, args.note)
        return 0
    if args.replicate:
        source, dest, times = args.replicate
        print(json.dumps(replicate(Path(source), Path(dest), int(times))), flush=True)
        return 0
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        raise SystemExit("needs a Chromium binary (apt-get install chromium)")
    stores, chains = {}, {}
    for spec in args.store:
        name, _, where = spec.partition("=")
        where, _, count = where.partition(":")
        stores[name], chains[name] = Path(where), int(count) if count else None
    with tempfile.TemporaryDirectory() as work:
        stores = {n: {"chains": chains[n]} | r for n, r in measure(stores, browser, args.repeats, args.timeout,
                                                                   Path(work)).items()}  # fmt: skip
    result = {"command": "python -m benchmarks.ui_scale " + " ".join(argv if argv is not None else sys.argv[1:]),
              "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "machine": f"{platform.machine()}, busy shared machine", "repeats": args.repeats, "timeout": args.timeout,
              "stores": stores}  # fmt: skip
    result["notes"] = args.note
    first, *others = stores  # each other store against the first (the chains.parquet one)
    result["ratios"] = {
        name: {f: round(b / a, 1) if (a := stores[first]["median"].get(f)) and (b := stores[name]["median"].get(f))
               else None for f in FIGURES}
        for name in others
    }  # fmt: skip
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1) + "\n")
    args.json.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
