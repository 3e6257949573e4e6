"""Frozen task sets: task tables stored as CSV or parquet (never pickle)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from maml_core.checkpoint import atomic_write_bytes


class TaskSetError(ValueError):
    """A task-set file that is missing, unreadable or does not fit the family."""


def load_task_set(path: str | Path, family) -> pd.DataFrame:
    path = Path(path)
    if not path.is_file():
        raise TaskSetError(f"task set {str(path)!r} does not exist")
    try:
        if path.suffix == ".csv":
            tasks = pd.read_csv(path)
        elif path.suffix in (".parquet", ".pq"):
            tasks = pd.read_parquet(path)
        else:
            raise TaskSetError(f"task set {str(path)!r}: use a .csv or .parquet file")
    except TaskSetError:
        raise
    except Exception as exc:
        raise TaskSetError(f"task set {str(path)!r} could not be read: {exc}") from None
    try:
        return family.validate_tasks(tasks)
    except (ValueError, TypeError) as exc:
        raise TaskSetError(f"task set {str(path)!r}: {exc}") from None


def save_task_set(tasks: pd.DataFrame, path: str | Path) -> Path:
    path = Path(path)
    if path.suffix == ".csv":
        data = tasks.to_csv(index=False).encode()
    else:
        data = tasks.to_parquet(index=False)
    atomic_write_bytes(path, data)
    return path
