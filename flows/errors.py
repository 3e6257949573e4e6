"""Errors that mean bad input: the CLI prints them in one line and exits with code 2."""

from __future__ import annotations

from maml_core.checkpoint import CheckpointError
from maml_core.config import ConfigError
from maml_core.tasksets import TaskSetError


class UsageError(ValueError):
    """A command line that cannot work as given."""


def _user_errors() -> tuple[type[BaseException], ...]:
    from flows.store import StoreError
    from flows.tracking import TrackingError

    return (ConfigError, CheckpointError, TaskSetError, UsageError, TrackingError, StoreError)


USER_ERRORS = _user_errors()
