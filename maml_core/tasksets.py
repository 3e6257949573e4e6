"""Frozen task sets: task tables stored as CSV or parquet (never pickle)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from maml_core.checkpoint import atomic_write_bytes
from maml_core.seeding import derive_seed
from maml_core.tasks.base import TASK_ID


class TaskSetError(ValueError):
    """A task-set file that is missing, unreadable or does not fit the family."""


def _is_integer(value) -> bool:
    if isinstance(value, bool | np.bool_):
        return False
    if isinstance(value, int | np.integer):
        return True
    if isinstance(value, float | np.floating):
        return bool(np.isfinite(value)) and float(value).is_integer()
    return False


def _first_bad(column: pd.Series, ok) -> str:
    row = int(np.flatnonzero(~np.asarray(ok, dtype=bool))[0])
    value = column.iloc[row]
    value = value.item() if isinstance(value, np.generic) else value
    return f"{value!r} in row {row + 1}"


def check_columns(tasks: pd.DataFrame, family) -> None:
    """``task_id`` holds integers and every parameter column numbers (messages name the column
    and the first bad value); the family's own checks follow in ``validate_tasks``."""
    if not tasks.columns.is_unique:
        dup = sorted({str(c) for c in tasks.columns[tasks.columns.duplicated()]})
        raise ValueError(f"duplicate column name(s) {dup}")
    if TASK_ID in tasks.columns:
        ids = tasks[TASK_ID]
        ok = [_is_integer(v) for v in ids.tolist()]
        if not all(ok):
            raise ValueError(f"column {TASK_ID!r} must hold integers, found {_first_bad(ids, ok)}")
    for name in getattr(family, "task_params", ()):
        if name not in tasks.columns:
            continue  # validate_tasks names the missing columns
        col = tasks[name]
        if pd.api.types.is_complex_dtype(col.dtype):
            raise ValueError(f"column {name!r} must hold real numbers, found {col.dtype}")
        if pd.api.types.is_bool_dtype(col.dtype) or pd.api.types.is_numeric_dtype(col.dtype):
            continue
        numeric = pd.to_numeric(col, errors="coerce")
        ok = numeric.notna() | col.isna()
        if not ok.all():
            raise ValueError(f"column {name!r} must hold numbers, found {_first_bad(col, ok)}")


def load_task_set(path: str | Path, family) -> pd.DataFrame:
    """A task table from a ``.csv`` or ``.parquet`` file, checked against ``family``:
    ``TaskSetError`` (naming the file and what is wrong) for anything else."""
    path = Path(path)
    if not path.is_file():
        raise TaskSetError(f"task set {str(path)!r} does not exist")
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".parquet", ".pq"):
        raise TaskSetError(f"task set {str(path)!r}: use a .csv or .parquet file (pickle and "
                           "other formats are never read)")
    try:
        if suffix == ".csv":
            tasks = pd.read_csv(path)
        else:
            tasks = pd.read_parquet(path)
    except pd.errors.EmptyDataError:
        raise TaskSetError(f"task set {str(path)!r} is empty; it needs a header row "
                           f"({', '.join([TASK_ID, *getattr(family, 'task_params', ())])}) "
                           "and one row per task") from None
    except Exception as exc:
        raise TaskSetError(f"task set {str(path)!r} could not be read as "
                           f"{'CSV' if suffix == '.csv' else 'parquet'}: "
                           f"{' '.join(str(exc).split())}") from None
    try:
        check_columns(tasks, family)
        return family.validate_tasks(tasks)
    except (ValueError, TypeError, OverflowError) as exc:
        raise TaskSetError(f"task set {str(path)!r}: {exc}") from None


def held_out_tasks(config, family=None) -> pd.DataFrame:
    """A config's evaluation task set: the file ``task.test_tasks`` if it names one, else the
    seeded draw of ``evaluation.num_tasks`` tasks (the same for every model of that config)."""
    family = family if family is not None else config.family()
    if config.task.test_tasks:
        return load_task_set(config.task.test_tasks, family)
    ev = config.evaluation
    return family.sample_tasks(ev.num_tasks, np.random.default_rng(
        derive_seed(ev.seed, "held_out_tasks")))


def validation_tasks(config, family=None) -> pd.DataFrame | None:
    """A config's validation task set for model selection (``evaluation.validation_tasks``
    tasks, a seeded draw apart from the held-out one), or None when selection is off."""
    ev = config.evaluation
    if not ev.validation_tasks:
        return None
    family = family if family is not None else config.family()
    return family.sample_tasks(ev.validation_tasks, np.random.default_rng(
        derive_seed(ev.seed, "validation_tasks")))


def save_task_set(tasks: pd.DataFrame, path: str | Path) -> Path:
    path = Path(path)
    if path.suffix == ".csv":
        data = tasks.to_csv(index=False).encode()
    else:
        data = tasks.to_parquet(index=False)
    atomic_write_bytes(path, data)
    return path
