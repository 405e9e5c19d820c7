"""Takes the screenshots of docs/mlflow_ui.md ("Compare ablations in the MLflow UI"): the MLflow UI,
in a real (headless) Chromium, on the runs of a study (the demo's by default).

    make demo                                    # the runs: experiment 'demo', study 'demo'
    sudo apt-get install -y chromium             # Debian's Chromium
    .venv/bin/python scripts/mlflow_screenshot.py [--uri sqlite:///mlruns/mlflow.db]

It starts `mlflow ui` on 127.0.0.1 (a free port) over the store, starts Chromium headless
with a new empty profile, does what docs/mlflow_ui.md ("What to click") tells a reader to do (filter the study,
close the assistant panel, expand the parent run, chart view, chart search; open the parent
run, its artifacts' delta figure) and writes docs/figures/mlflow_ablation_charts.png,
mlflow_study_run.png and mlflow_study_deltas.png.
Chromium is driven over the DevTools protocol with websocket-client (installed with Jupyter).
"""
from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

import websocket

REPO = Path(__file__).resolve().parents[1]
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
# The chart search of the first screenshot: each metric and its delta to the baseline.
CHARTS = "^(delta/)?(image_auroc|pixel_auroc|aupro)$"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def mlflow_ui(uri: str, timeout_s: float = 300.0):
    """Yields the base URL of `mlflow ui` over store `uri`, on loopback; stops it afterwards."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", "127.0.0.1",
                             "--port", str(port), "--workers", "1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + timeout_s
        while not _answers(f"{base}/health"):
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"mlflow ui over {uri} did not start (exit status {proc.poll()})")
            time.sleep(1)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=3) as answer:
            return answer.status == 200
    except OSError:
        return False


def api(base: str, endpoint: str, body: dict | None = None, **query) -> dict:
    """Returns the JSON answer of the MLflow REST API (POST with `body`, else GET with `query`)."""
    url = f"{base}/api/2.0/mlflow/{endpoint}"
    request = (urllib.request.Request(f"{url}?{urllib.parse.urlencode(query)}") if body is None else
               urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"}))
    with urllib.request.urlopen(request, timeout=60) as answer:
        return json.loads(answer.read())


class Chromium:
    """A headless Chromium with a fresh profile, one page, driven over the DevTools protocol."""

    def __init__(self, binary: str, width: int, height: int):
        self.profile = tempfile.mkdtemp(prefix="chromium-profile-")
        self.proc = subprocess.Popen([binary, *CHROMIUM_FLAGS, f"--user-data-dir={self.profile}",
                                      "--remote-debugging-port=0", f"--window-size={width},{height}", "about:blank"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        port_file = Path(self.profile) / "DevToolsActivePort"  # Chromium writes its port there
        self._until(lambda: port_file.is_file() and port_file.read_text().strip(), 60, "Chromium did not start")
        port = port_file.read_text().split()[0]

        def page():
            targets = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=5).read())
            return next((t for t in targets if t["type"] == "page"), None)

        target = self._until(page, 30, "Chromium opened no page")
        self.ws = websocket.create_connection(target["webSocketDebuggerUrl"], suppress_origin=True, timeout=120)
        self.calls = 0
        self.call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False)

    @staticmethod
    def _until(check, timeout_s: float, message: str):
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            with contextlib.suppress(OSError, ValueError):
                found = check()
                if found:
                    return found
            time.sleep(0.2)
        raise TimeoutError(message)

    def call(self, method: str, **params) -> dict:
        self.calls += 1
        self.ws.send(json.dumps({"id": self.calls, "method": method, "params": params}))
        while True:  # events arrive in between; the answer carries our id
            message = json.loads(self.ws.recv())
            if message.get("id") == self.calls:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})

    def js(self, expression: str):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails'].get('exception', {}).get('description')}")
        return result["result"].get("value")

    def open(self, url: str, text: str, timeout_s: float = 120) -> None:
        """Navigates to `url` and waits until the page shows `text`."""
        self.call("Page.navigate", url=url)
        self.wait_for_text(text, timeout_s)

    def wait_for_text(self, text: str, timeout_s: float = 60) -> None:
        check = f"!!document.body && document.body.innerText.includes({json.dumps(text)})"
        self._until(lambda: self.js(check), timeout_s, f"the page never showed {text!r}")
        time.sleep(1.0)  # charts and tables finish drawing

    def click(self, selector: str, required: bool = True) -> bool:
        """Clicks the centre of the first element matching `selector` with real mouse events."""
        point = self.js(f"""(() => {{ const e = document.querySelector({json.dumps(selector)});
            if (!e) return null; e.scrollIntoView({{block: 'center'}}); const r = e.getBoundingClientRect();
            return [r.x + r.width / 2, r.y + r.height / 2]; }})()""")
        if point is None:
            if required:
                raise LookupError(f"nothing on the page matches {selector}")
            return False
        for kind in ("mouseMoved", "mousePressed", "mouseReleased"):
            self.call("Input.dispatchMouseEvent", type=kind, x=point[0], y=point[1], button="left", clickCount=1)
        time.sleep(0.5)
        return True

    def type(self, selector: str, text: str) -> None:
        self.click(selector)
        self.call("Input.insertText", text=text)
        time.sleep(2.0)

    def screenshot(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"]))
        print(f"wrote {path}")

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.ws.close()
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        shutil.rmtree(self.profile, ignore_errors=True)


def take(base: str, experiment: str, study: str, out: Path, binary: str, width: int, height: int) -> None:
    exp = api(base, "experiments/get-by-name", experiment_name=experiment)["experiment"]["experiment_id"]
    parents = api(base, "runs/search", {"experiment_ids": [exp], "max_results": 1,
                                        "filter": f"tags.recontrast_role = 'study' and tags.study = '{study}'",
                                        "order_by": ["attributes.start_time DESC"]}).get("runs", [])
    if not parents:
        raise SystemExit(f"no parent run of study '{study}' in experiment '{experiment}': run `make demo` first")
    parent = parents[0]["info"]
    close_assistant = '[data-component-id="mlflow.assistant.chat_panel.close"]'
    browser = Chromium(binary, width, height)
    try:
        # 1. Training runs, filtered to the study, chart view; the parent expanded; the charts searched.
        query = urllib.parse.urlencode({"searchFilter": f"tags.study = '{study}'", "compareRunsMode": "CHART",
                                        "workflowType": "machine_learning"}, quote_via=urllib.parse.quote)
        browser.open(f"{base}/#/experiments/{exp}/runs?{query}", parent["run_name"])
        browser.click(close_assistant, required=False)
        browser.click('[data-component-id$="runnamecellrenderer.tsx_46"]')  # the parent row's expand button
        browser.wait_for_text("full-")
        browser.type('input[placeholder="Search metric charts"]', CHARTS)
        browser.screenshot(out / "mlflow_ablation_charts.png")

        # 2. The parent run: its study metrics (searched for the deltas), child runs, tags, shared params.
        browser.open(f"{base}/#/experiments/{exp}/runs/{parent['run_id']}?workflowType=machine_learning",
                     "Child runs")
        browser.click(close_assistant, required=False)
        browser.type('input[placeholder="Search metrics"]', "_delta")
        browser.screenshot(out / "mlflow_study_run.png")

        # 3. The parent's artifacts: the delta figure the batch logged (tests/test_mlflow_ui.py opens it the same way).
        browser.open(f"{base}/#/experiments/{exp}/runs/{parent['run_id']}/artifacts?workflowType=machine_learning",
                     "deltas.png")
        browser.click(close_assistant, required=False)
        browser.js("[...document.querySelectorAll('*')].filter(e => e.textContent.trim() === 'deltas.png').pop().click()")
        time.sleep(3.0)  # the image loads and draws
        browser.screenshot(out / "mlflow_study_deltas.png")
    finally:
        browser.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--uri", default=os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{REPO / 'mlruns' / 'mlflow.db'}",
                        help="the MLflow store (default: $MLFLOW_TRACKING_URI, else the project's mlruns/mlflow.db)")
    parser.add_argument("--experiment", default="demo")
    parser.add_argument("--study", default="demo")
    parser.add_argument("--out", default=str(REPO / "docs" / "figures"))
    parser.add_argument("--chromium", default=shutil.which("chromium") or "chromium")
    parser.add_argument("--size", default="1600x1200", help="window size, WIDTHxHEIGHT")
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.split("x"))
    with mlflow_ui(args.uri) as base:
        take(base, args.experiment, args.study, Path(args.out), args.chromium, width, height)


if __name__ == "__main__":
    main()
