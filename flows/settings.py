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
    with contextlib.suppress(Exception):  # best effort: never stops the command
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
    slower. At a low priority it records task runs in the gaps instead. Each server found is
    also recorded with this process as its parent (``record_local_servers``), so that the next
    command can stop it if this one is killed outright. Returns the process ids it reniced
    (none when a real server is configured or nothing is found).
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


def _stat(pid: int) -> list[bytes] | None:
    """The fields of ``/proc/PID/stat`` after the command name (state first), or None when no
    such process runs. Read as bytes: the name, cut to 15 bytes, need not be valid UTF-8."""
    try:
        return (Path("/proc") / str(pid) / "stat").read_bytes().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (``/proc/PID/stat`` field 22), or
    None when no such process runs."""
    fields = _stat(pid)
    return fields[19].decode() if fields is not None and len(fields) > 19 else None


def _running(pid: int, started: str) -> bool:
    """Whether the process of that id and start time still runs (a zombie does not)."""
    fields = _stat(pid)
    return (fields is not None and len(fields) > 19 and fields[0] != b"Z"
            and fields[19].decode() == started)


def _boot_id() -> str | None:
    """This boot's id: start times count from boot, so a record of another boot matches
    nothing."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def _is_prefect_server(pid: int) -> bool:
    try:
        cmdline = (Path("/proc") / str(pid) / "cmdline").read_bytes()
    except OSError:
        return False
    return b"prefect.server" in cmdline or b"uvicorn" in cmdline


def _records_dir() -> Path | None:
    home = os.environ.get("PREFECT_HOME")
    return Path(home).expanduser() / _SERVER_RECORDS if home else None


def record_local_servers(pids: list[int]) -> None:
    """Note each temporary server with this process as its parent (best effort)."""
    folder = _records_dir()
    me = os.getpid()
    mine = _start_time(me)
    boot = _boot_id()
    if folder is None or mine is None or boot is None:
        return
    for pid in pids:
        started = _start_time(pid)
        if started is None:
            continue
        path = folder / f"{pid}.json"
        partial = path.with_name(f".{pid}.{me}.tmp")  # not *.json: never read half-written
        try:
            folder.mkdir(parents=True, exist_ok=True)
            partial.write_text(json.dumps({"server": pid, "server_started": started,
                                           "parent": me, "parent_started": mine,
                                           "boot": boot}))
            os.replace(partial, path)
        except OSError:
            with contextlib.suppress(OSError):
                partial.unlink(missing_ok=True)
            return


def stop_orphaned_servers(grace: float = 5.0) -> list[int]:
    """Stop the recorded temporary servers whose parent process is gone (SIGTERM, then SIGKILL
    after ``grace`` seconds), and forget the records of servers that have ended. Returns the
    ids of the servers it stopped. Best effort: a record it cannot read, or a folder it cannot
    write, never stops the command that calls it."""
    folder = _records_dir()
    boot = _boot_id()
    stopped: list[int] = []
    try:
        paths = sorted(folder.glob("*.json")) if folder is not None and folder.is_dir() else []
    except OSError:
        return stopped
    for path in paths:
        try:
            server = _stop_if_orphaned(path, boot, grace)
        except (OSError, ValueError):
            continue
        if server is not None:
            stopped.append(server)
    return stopped


def _stop_if_orphaned(path: Path, boot: str | None, grace: float) -> int | None:
    """One record: its server's id if the server was orphaned and has been stopped; the
    record is forgotten unless its command still runs."""
    try:
        record = json.loads(path.read_text())
        server, parent = int(record["server"]), int(record["parent"])
        server_started, parent_started = record["server_started"], record["parent_started"]
        valid = (server > 1 and parent > 1 and record["boot"] == boot
                 and all(isinstance(v, str) and v.isdigit()
                         for v in (server_started, parent_started)))
    except (ValueError, KeyError, TypeError):
        valid = False  # unreadable, or another boot's: nothing can be matched against it
    if not valid:
        path.unlink(missing_ok=True)
        return None
    stopped = None
    if _running(server, server_started):
        if _running(parent, parent_started):
            return None  # its command still runs
        if _is_prefect_server(server) and _terminate(server, server_started, grace):
            stopped = server
    path.unlink(missing_ok=True)
    return stopped


def _terminate(pid: int, started: str, grace: float) -> bool:
    """SIGTERM, and SIGKILL if the process still runs after ``grace`` seconds; True once it
    has ended (or is a zombie awaiting its new parent)."""
    def wait(seconds: float) -> bool:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if not _running(pid, started):
                return True
            time.sleep(0.05)
        return not _running(pid, started)

    try:
        os.kill(pid, signal.SIGTERM)
    except OSError:
        return False
    if wait(grace):
        return True
    with contextlib.suppress(OSError):
        os.kill(pid, signal.SIGKILL)
    return wait(2.0)


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
