"""Errors that mean bad input: the CLI prints them in one line and exits with code 2."""

from __future__ import annotations

import re

from maml_core.checkpoint import CheckpointError
from maml_core.config import ConfigError
from maml_core.tasksets import TaskSetError

RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,127}")  # a stage-store folder name


class UsageError(ValueError):
    """A command line that cannot work as given."""


def one_line(exc: BaseException) -> str:
    """The error's message on one line (library messages, e.g. YAML's, can span several)."""
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def _user_errors() -> tuple[type[BaseException], ...]:
    from flows.store import StoreError
    from flows.tracking import TrackingError

    return (ConfigError, CheckpointError, TaskSetError, UsageError, TrackingError, StoreError)


USER_ERRORS = _user_errors()
