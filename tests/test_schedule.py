"""`maml schedule` against a real `prefect server start` on 127.0.0.1."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parent.parent
CONFIG = str(ROOT / "configs" / "navigation2d.yaml")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(predicate, timeout: float, what: str, procs=()):
    deadline = time.time() + timeout
    while time.time() < deadline:
        for p in procs:
            if p.poll() is not None:
                raise AssertionError(f"{p.args[:4]} exited with {p.returncode} while waiting "
                                     f"for {what}")
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def _api(method: str, url: str, **kwargs) -> httpx.Response:
    """A request to the Prefect API, retried for up to a minute while the server answers that it
    is busy (503 when its SQLite database stays locked, e.g. while the scheduler inserts the new
    deployment's runs; 502, 429), as Prefect's own client retries them; other errors raise."""
    deadline = time.time() + 60
    while True:
        r = httpx.request(method, url, timeout=30, **kwargs)
        if r.status_code not in (429, 502, 503) or time.time() > deadline:
            r.raise_for_status()
            return r
        time.sleep(1)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


@pytest.fixture
def prefect_server(tmp_path):
    port = _free_port()
    env = dict(os.environ, PREFECT_HOME=str(tmp_path / "server-home"),
               PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_UI_ENABLED="false")
    env.pop("PREFECT_API_URL", None)
    proc = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host",
                             "127.0.0.1", "--port", str(port)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    api = f"http://127.0.0.1:{port}/api"

    def healthy():
        try:
            return httpx.get(f"{api}/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        _wait(healthy, 120, "the Prefect server", [proc])
        yield api
    finally:
        _stop(proc)


def test_schedule_creates_cron_deployment_whose_run_completes(prefect_server, tmp_path):
    api = prefect_server
    env = dict(os.environ, PREFECT_API_URL=api, MAML_HOME=str(tmp_path / "maml"),
               MAML_NO_PROGRESS="1", PREFECT_HOME=str(tmp_path / "client-home"))
    env.pop("MLFLOW_TRACKING_URI", None)
    cmd = [sys.executable, "-m", "flows.cli", "schedule", CONFIG, "--cron", "0 3 * * *",
           "--name", "nightly-test"]
    for o in ("iterations=1", "meta_batch_size=4", "episodes_per_task=4", "evaluation.every=0",
              "evaluation.episodes_per_task=4", "retrain.steps=1"):
        cmd += ["--set", o]
    served = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        def deployment():
            r = _api("POST", f"{api}/deployments/filter",
                     json={"deployments": {"name": {"any_": ["nightly-test"]}}})
            return r.json()[0] if r.json() else None

        dep = _wait(deployment, 120, "the deployment", [served])
        crons = [s["schedule"].get("cron") for s in dep["schedules"]]
        assert crons == ["0 3 * * *"]
        r = _api("POST", f"{api}/deployments/{dep['id']}/create_flow_run", json={})
        run_id = r.json()["id"]

        def finished():
            state = _api("GET", f"{api}/flow_runs/{run_id}").json()["state"]
            return state if state["type"] in ("COMPLETED", "FAILED", "CRASHED") else None

        state = _wait(finished, 300, "the triggered flow run", [served])
        if state["type"] != "COMPLETED":
            query = {"logs": {"flow_run_id": {"any_": [run_id]}}}
            logs = _api("POST", f"{api}/logs/filter", json=query).json()
            text = "\n".join(x["message"] for x in logs)[-3000:]
            raise AssertionError(f"{state['message']}\n{text}")
    finally:
        _stop(served)
