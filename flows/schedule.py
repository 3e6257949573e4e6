"""``maml schedule``: serve the retrain flow on a cron schedule from a running Prefect server."""

from __future__ import annotations

from pathlib import Path

from flows.config import load_run_config
from flows.errors import UsageError
from maml_core.tasksets import load_task_set

HOW_TO_START = ("start one with `prefect server start` (it listens on 127.0.0.1:4200), then "
                "`export PREFECT_API_URL=http://127.0.0.1:4200/api` here")


def check_cron(cron: str) -> str:
    from prefect.client.schemas.schedules import CronSchedule

    try:
        CronSchedule(cron=cron)
    except Exception:
        raise UsageError(f"cron expression {cron!r} does not parse; use five fields like "
                         "\"0 3 * * *\" (03:00 every day)") from None
    return cron


def check_server() -> str:
    import httpx
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        raise UsageError(f"schedules need a running Prefect server and PREFECT_API_URL is not "
                         f"set; {HOW_TO_START}")
    try:
        httpx.get(url.rstrip("/") + "/health", timeout=5).raise_for_status()
    except Exception as exc:
        raise UsageError(f"no Prefect server answers at {url} ({type(exc).__name__}); "
                         f"{HOW_TO_START}") from None
    return url


def serve_retrain(config: str, cron: str, name: str, overrides: list[str] | None) -> int:
    check_cron(cron)
    if not Path(config).is_file():
        raise UsageError(f"config file {config!r} does not exist")
    run_config = load_run_config(config, overrides)  # fail now, not at 3 a.m.
    if run_config.task.test_tasks:
        load_task_set(run_config.task.test_tasks, run_config.family())
    url = check_server()
    from flows.retrain import retrain

    print(f"Serving deployment 'retrain/{name}' on {url} with schedule {cron!r}; "
          "Ctrl-C stops serving.")
    retrain.serve(name=name, cron=cron,
                  parameters={"config_path": str(Path(config).resolve()),
                              "overrides": overrides or None},
                  print_starting_message=False)
    return 0
