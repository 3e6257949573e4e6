"""Local state and quiet defaults, applied before Prefect or MLflow are imported.

All local state -- MLflow database and artifacts, Prefect home, stage store -- lives in one
git-ignored folder, ``.maml/`` under the working directory (``MAML_HOME`` overrides it).
Variables the user already set are left alone.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import time
import warnings
from pathlib import Path


def maml_home() -> Path:
    return Path(os.environ.get("MAML_HOME", ".maml")).resolve()


def configure_environment(verbose: bool = False) -> Path:
    """Point Prefect at the local state folder and silence what a user cannot act on."""
    home = maml_home()
    home.mkdir(parents=True, exist_ok=True)
    level = "INFO" if verbose else "WARNING"
    defaults = {
        "PREFECT_HOME": str(home / "prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1",
        "PREFECT_LOGGING_LEVEL": level,
        # The temporary server logs cancelled background work when the process exits.
        "PREFECT_SERVER_LOGGING_LEVEL": "INFO" if verbose else "CRITICAL",
        "PREFECT_LOGGING_TO_API_ENABLED": "false" if not verbose else "true",
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "60",
        "GIT_PYTHON_REFRESH": "quiet",
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
        "TQDM_DISABLE": os.environ.get("TQDM_DISABLE", "0"),
    }
    for key, value in defaults.items():
        os.environ.setdefault(key, value)
    stop_orphaned_servers()
    if verbose:
        drop_server_only_variables()  # a parent's quieting, undone
    else:
        quiet_temporary_server()
        for name in ("mlflow", "alembic", "prefect", "httpx", "urllib3"):
            logging.getLogger(name).setLevel(logging.WARNING)
        warnings.filterwarnings("ignore", category=FutureWarning, module="mlflow")
        warnings.filterwarnings("ignore", category=UserWarning, module="mlflow")
        warnings.filterwarnings("ignore", category=DeprecationWarning)
    return home


SERVER_ROOT_LEVEL = "PREFECT_LOGGING_ROOT_LEVEL"
# Set beside SERVER_ROOT_LEVEL when we set it, so that a child process (a `maml` started by
# the tests or a schedule) tells our value from a user's and restores its own root logger.
_SERVER_ROOT_LEVEL_OURS = "MAML_QUIET_SERVER_ROOT"


def quiet_temporary_server() -> None:
    """Keep the temporary Prefect server's shutdown out of the user's terminal.

    When the process exits, Prefect stops its temporary server, cancelling the server's
    background services; now and then SQLAlchemy reports the cancelled database rollback as an
    ERROR with a traceback, through the server process's root logger, after the run has
    finished and been recorded. The server inherits this process's environment, so the root
    level is raised there through Prefect's logging variable. Prefect configures logging when
    ``prefect.main`` is first imported, which is done here (about a second), and this
    process's root logger is then put back to WARNING so that other libraries' warnings still
    reach the user. A level the user set is left alone.
    """
    if SERVER_ROOT_LEVEL in os.environ and os.environ.get(_SERVER_ROOT_LEVEL_OURS) != "1":
        return
    os.environ[SERVER_ROOT_LEVEL] = "CRITICAL"
    os.environ[_SERVER_ROOT_LEVEL_OURS] = "1"
    try:
        import prefect.main  # noqa: F401  (configures logging from the variables above)
    except Exception:  # e.g. a bad PREFECT_* setting: reported where Prefect is used
        drop_server_only_variables()
        return
    logging.getLogger().setLevel(logging.WARNING)


def drop_server_only_variables() -> None:
    """Remove from this process's environment the variables we set for the temporary server
    alone (a user's own are kept): before starting other workers (Dask's), or under
    ``--verbose``."""
    if os.environ.get(_SERVER_ROOT_LEVEL_OURS) == "1":
        del os.environ[SERVER_ROOT_LEVEL], os.environ[_SERVER_ROOT_LEVEL_OURS]


def deprioritize_local_server(niceness: int = 15) -> list[int]:
    """Run Prefect's temporary local server at low CPU priority (Linux).

    With no ``PREFECT_API_URL``, Prefect serves its API from a child process of this one; on a
    small machine that process competes with training for the cores and makes every stage
    slower. At a low priority it records task runs in the gaps instead. Returns the process
    ids it reniced (none when a real server is configured or nothing is found).
    """
    if os.environ.get("PREFECT_API_URL") or not Path("/proc").is_dir():
        return []
    me = str(os.getpid())
    changed = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            ppid = stat.rsplit(")", 1)[1].split()[1]
            if ppid != me:
                continue
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            if "prefect.server" in cmdline or "uvicorn" in cmdline:
                _deprioritize_threads(entry, niceness)
                changed.append(int(entry.name))
        except (OSError, IndexError, ValueError):
            continue
    record_local_servers(changed)
    return changed


# A SIGKILL (the kernel's out-of-memory killer, ``kill -9``) gives Python no chance to stop the
# temporary server, which then runs on without its parent, holding memory and a port. Each
# server found above is recorded with its parent; the next command in the same Prefect home
# stops those whose parent is gone (``stop_orphaned_servers``, from ``configure_environment``).
# A process is named by its id and its start time, so a reused id is never taken for it.
_SERVER_RECORDS = "temporary-servers"


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (``/proc/PID/stat`` field 22), or
    None when no such process runs."""
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _records_dir() -> Path | None:
    home = os.environ.get("PREFECT_HOME")
    return Path(home).expanduser() / _SERVER_RECORDS if home else None


def record_local_servers(pids: list[int]) -> None:
    """Note each temporary server with this process as its parent (best effort)."""
    folder = _records_dir()
    me = os.getpid()
    mine = _start_time(me)
    if folder is None or mine is None:
        return
    for pid in pids:
        started = _start_time(pid)
        if started is None:
            continue
        try:
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{pid}.json").write_text(json.dumps(
                {"server": pid, "server_started": started, "parent": me,
                 "parent_started": mine}))
        except OSError:
            return


def stop_orphaned_servers(grace: float = 5.0) -> list[int]:
    """Stop the recorded temporary servers whose parent process is gone (SIGTERM, then SIGKILL
    after ``grace`` seconds), and forget records of servers that have ended. Returns the ids
    of the servers it stopped."""
    folder = _records_dir()
    if folder is None or not folder.is_dir():
        return []
    stopped = []
    for path in sorted(folder.glob("*.json")):
        try:
            record = json.loads(path.read_text())
            server, parent = int(record["server"]), int(record["parent"])
            server_started, parent_started = record["server_started"], record["parent_started"]
        except (OSError, ValueError, KeyError, TypeError):
            path.unlink(missing_ok=True)  # unreadable: nothing can be matched against it
            continue
        if _start_time(server) == server_started and not _zombie(server):
            if _start_time(parent) == parent_started:
                continue  # its command still runs
            if _terminate(server, server_started, grace):
                stopped.append(server)
        path.unlink(missing_ok=True)
    return stopped


def _terminate(pid: int, started: str, grace: float) -> bool:
    try:
        os.kill(pid, signal.SIGTERM)
    except OSError:
        return False
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if _start_time(pid) != started or _zombie(pid):
            return True
        time.sleep(0.05)
    with contextlib.suppress(OSError):
        os.kill(pid, signal.SIGKILL)
    return True


def _zombie(pid: int) -> bool:
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return False


def _deprioritize_threads(proc: Path, niceness: int) -> None:
    """Lower every thread of a process: on Linux a nice value belongs to one thread, so
    renicing the process id alone leaves the server's worker threads at full priority. Where
    allowed, the threads also go to SCHED_IDLE: they then run only on a core that training
    leaves idle (the event-recording cost per task run dropped from about 27 ms to about
    2 ms in a stage of tensor work on 2 cores)."""
    for task_dir in (proc / "task").iterdir():
        tid = int(task_dir.name)
        try:
            os.setpriority(os.PRIO_PROCESS, tid,
                           max(niceness, os.getpriority(os.PRIO_PROCESS, tid)))
            if hasattr(os, "SCHED_IDLE"):
                os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))
        except OSError:  # the thread ended, or the policy is not allowed here
            continue
