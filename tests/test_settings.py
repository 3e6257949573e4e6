"""The quiet defaults: what reaches the user's terminal from Prefect's temporary server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Run in a fresh interpreter: configure the environment as `maml` does, load Prefect as a flow
# does, report this process's logging levels, then start a child with the same environment
# that sets up logging as the temporary server's app factory does and report its levels.
PROBE = """
import json, logging, os, subprocess, sys
from flows.settings import configure_environment
configure_environment(verbose=VERBOSE)
from prefect import flow  # noqa: F401
child = subprocess.run([sys.executable, "-c", "import json, logging; "
                        "from prefect.logging.configuration import setup_logging; setup_logging(); "
                        "print(json.dumps([logging.getLogger().level, "
                        "logging.getLogger('sqlalchemy.pool.impl').isEnabledFor(logging.ERROR)]))"],
                       capture_output=True, text=True, check=True)
print(json.dumps({"root": logging.getLogger().level,
                  "library_warning": logging.getLogger("a.lib").isEnabledFor(logging.WARNING),
                  "child": json.loads(child.stdout.strip().splitlines()[-1]),
                  "child_stderr": child.stderr}))
"""


def probe(tmp_path, verbose=False, **env_extra):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("PREFECT_LOGGING") and k != "MAML_QUIET_SERVER_ROOT"}
    env.update(MAML_HOME=str(tmp_path / "maml"), PYTHONPATH=str(ROOT), **env_extra)
    out = subprocess.run([sys.executable, "-c", PROBE.replace("VERBOSE", str(verbose))],
                         capture_output=True, text=True, env=env, cwd=tmp_path, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_temporary_server_errors_silenced_but_library_warnings_kept(tmp_path):
    got = probe(tmp_path)
    # this process: root at WARNING, so other libraries' warnings still show
    assert got["root"] == 30 and got["library_warning"] is True
    # the server's process: SQLAlchemy's pool errors at shutdown no longer reach the terminal
    assert got["child"] == [50, False]
    assert got["child_stderr"] == ""


def test_verbose_and_a_user_setting_are_left_alone(tmp_path):
    assert probe(tmp_path, verbose=True)["child"] == [30, True]
    assert probe(tmp_path, PREFECT_LOGGING_ROOT_LEVEL="ERROR")["child"] == [40, True]


def test_a_child_maml_tells_our_setting_from_a_users(tmp_path):
    # A `maml` started by another (tests, schedules) inherits our variables: it still keeps its
    # own root logger at WARNING, and with --verbose it gives the server its logs back.
    inherited = {"PREFECT_LOGGING_ROOT_LEVEL": "CRITICAL", "MAML_QUIET_SERVER_ROOT": "1"}
    got = probe(tmp_path, **inherited)
    assert got["root"] == 30 and got["library_warning"] is True and got["child"] == [50, False]
    assert probe(tmp_path, verbose=True, **inherited)["child"] == [30, True]


def test_dask_workers_do_not_inherit_the_servers_level(monkeypatch):
    from flows.scale_out import _local_worker_environment

    monkeypatch.setenv("PREFECT_LOGGING_ROOT_LEVEL", "CRITICAL")
    monkeypatch.setenv("MAML_QUIET_SERVER_ROOT", "1")
    with _local_worker_environment(True, 2):  # where the LocalCluster starts its workers
        assert "PREFECT_LOGGING_ROOT_LEVEL" not in os.environ
        assert "MAML_QUIET_SERVER_ROOT" not in os.environ
    assert os.environ["PREFECT_LOGGING_ROOT_LEVEL"] == "CRITICAL"
    monkeypatch.delenv("MAML_QUIET_SERVER_ROOT")  # a user's own setting reaches the workers
    with _local_worker_environment(True, 2):
        assert os.environ["PREFECT_LOGGING_ROOT_LEVEL"] == "CRITICAL"


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux's /proc")
def test_server_records_never_signal_a_process_they_do_not_name(tmp_path, monkeypatch):
    """Records that cannot be trusted are forgotten and signal nothing: a corrupt one (a pid of
    -1 would signal every process of the user), a half-written one, another boot's, and one
    whose pid and start time match a live process that is not a Prefect server."""
    from flows import settings

    monkeypatch.setenv("PREFECT_HOME", str(tmp_path))
    records = tmp_path / "temporary-servers"
    records.mkdir()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        ended = subprocess.Popen([sys.executable, "-c", "pass"])
        ended.wait()
        boot = settings._boot_id()
        assert boot and settings._start_time(sleeper.pid)

        def record(name: str, **fields) -> None:
            base = {"server": sleeper.pid, "server_started": settings._start_time(sleeper.pid),
                    "parent": ended.pid, "parent_started": "1", "boot": boot}
            (records / f"{name}.json").write_text(json.dumps({**base, **fields}))

        record("1", server=-1, server_started=None)
        record("2", boot="another boot")
        record(str(sleeper.pid))  # orphaned by its record, but not a Prefect server
        (records / "3.json").write_text('{"server": 12')
        assert settings.stop_orphaned_servers() == []
        assert sleeper.poll() is None
        assert list(records.glob("*.json")) == []
    finally:
        sleeper.kill()
        sleeper.wait()
