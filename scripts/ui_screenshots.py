"""Screenshots of the MLflow UI on a main job's store, for docs/img (a real server, a real browser).

    python scripts/ui_screenshots.py --store $ISC_HOME/mlflow.db --out docs/img --overwrite

Needs Chromium (Debian: ``apt-get install chromium``) and Playwright's Python package
(``pip install playwright``; no browser download: it drives /usr/bin/chromium). Neither is a project
dependency: only whoever refreshes the documentation's pictures needs them.

Writes ``ui_runs_table.png`` (the experiment's runs, nested steps expanded: Dataset and Models columns)
and ``ui_compare_tune_trials.png`` (the compare view of the tuning trials: parameters against val µAP).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

PNG_NAMES = ("ui_runs_table.png", "ui_compare_tune_trials.png")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def _wait(url: str, seconds: float = 90) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            time.sleep(0.5)
    raise SystemExit(f"mlflow server did not answer at {url} within {seconds:.0f} s")


def _runs(base: str, experiment_id: str, filter_string: str) -> list[dict]:
    body = json.dumps({"experiment_ids": [experiment_id], "filter": filter_string, "max_results": 200}).encode()
    req = urllib.request.Request(f"{base}/api/2.0/mlflow/runs/search", data=body,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read()).get("runs", [])


def shoot(store: Path, out: Path, experiment: str) -> list[Path]:
    from playwright.sync_api import sync_playwright

    out.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{store.resolve()}",
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    written = []
    try:
        _wait(f"{base}/health")
        exp = _get(f"{base}/api/2.0/mlflow/experiments/get-by-name?experiment_name={experiment}")["experiment"]
        exp_id = exp["experiment_id"]
        trials = _runs(base, exp_id, "tags.`isc.step` = 'tune_trial'")
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=os.environ.get("CHROMIUM", "/usr/bin/chromium"),
                                         args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1900, "height": 1150})
            page.goto(f"{base}/#/experiments/{exp_id}/runs")
            page.wait_for_selector("text=Run Name", timeout=60_000)
            _close_assistant(page)
            _expand_nested_runs(page)
            page.wait_for_timeout(2000)
            written.append(out / PNG_NAMES[0])
            page.screenshot(path=str(written[-1]))
            if trials:
                ids = json.dumps([r["info"]["run_id"] for r in trials])
                page.goto(f"{base}/#/compare-runs?runs={ids}&experiments={json.dumps([exp_id])}")
                page.wait_for_timeout(8000)
                _close_assistant(page)
                _choose_axes(page, ["lr", "memory_size", "neg_margin", "pos_margin"], ["val_average_precision"])
                written.append(out / PNG_NAMES[1])
                page.screenshot(path=str(written[-1]), full_page=True)
            browser.close()
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
    return written


def _expand_nested_runs(page, rounds: int = 3) -> None:
    """Click each parent run's expander once (the main run, then the study run inside it)."""
    clicked: set[str] = set()
    for _ in range(rounds):
        buttons = page.locator("button[data-component-id*='runnamecellrenderer']")
        fresh = False
        for i in range(buttons.count()):
            row = buttons.nth(i).evaluate("b => b.closest('[role=row]')?.getAttribute('row-id') || ''")
            if row and row not in clicked:
                clicked.add(row)
                buttons.nth(i).click(timeout=5000)
                page.wait_for_timeout(1500)
                fresh = True
        if not fresh:
            return


def _choose_axes(page, params: list[str], metrics: list[str]) -> None:
    """The parallel-coordinates plot's axes: the searched values against val µAP (MLflow picks the first
    few parameters alphabetically otherwise)."""
    try:
        page.get_by_role("button", name="Clear All").click(timeout=5000)
        boxes = page.locator(".du-bois-light-select-selector, .ant-select-selector")
        for box, names in ((boxes.nth(0), params), (boxes.nth(1), metrics)):
            for name in names:
                box.click(timeout=5000)
                page.keyboard.type(name)
                page.wait_for_timeout(500)
                page.keyboard.press("Enter")
                page.keyboard.press("Escape")
        page.wait_for_timeout(3000)
    except Exception as exc:  # noqa: BLE001 -- a UI change: keep MLflow's default axes
        print(f"could not choose the plot's axes ({exc}); MLflow's defaults kept", file=sys.stderr)


def _close_assistant(page) -> None:
    """MLflow 3.17 opens an 'Assistant' side panel; close it so the runs get the width."""
    close = page.locator("button[aria-label='Close']")
    if close.count():
        try:
            close.first.click(timeout=2000)
        except Exception:  # noqa: BLE001
            pass


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--store", type=Path, required=True, help="the main job's mlflow.db")
    p.add_argument("--out", type=Path, default=Path("docs/img"))
    p.add_argument("--experiment", default="isc")
    p.add_argument("--overwrite", action="store_true", help="replace PNGs already in --out")
    args = p.parse_args()
    if not args.store.is_file():
        raise SystemExit(f"--store: {args.store}: no such file")
    existing = [args.out / n for n in PNG_NAMES if (args.out / n).exists()]
    if existing and not args.overwrite:
        raise SystemExit(f"--out: {', '.join(map(str, existing))} exist; pass --overwrite to replace them")
    for path in shoot(args.store, args.out, args.experiment):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
