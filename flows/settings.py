"""Local state and quiet defaults, applied before Prefect or MLflow are imported.

All local state -- MLflow database and artifacts, Prefect home, stage store -- lives in one
git-ignored folder, ``.maml/`` under the working directory (``MAML_HOME`` overrides it).
Variables the user already set are left alone.
"""

from __future__ import annotations

import logging
import os
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
    return changed


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
