"""A background writer: stage-store files and MLflow metrics written while training goes on.

File writes (with fsync) and MLflow's SQLite inserts take tens of milliseconds per iteration;
done on one background thread they overlap the next stage's arithmetic instead of adding to it.
The flow drains the writer at the end of every iteration and before every checkpoint, so a
crash loses at most the iteration in progress. A write that failed is raised by ``drain``.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any

_STOP = object()


class BackgroundWriter:
    def __init__(self, name: str = "maml-writer"):
        self._queue: queue.Queue = queue.Queue()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is _STOP:
                    return
                fn, args, kwargs = item
                if self._error is None:
                    fn(*args, **kwargs)
            except BaseException as exc:  # kept and raised by drain()
                self._error = exc
            finally:
                self._queue.task_done()

    def submit(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        if self._error is not None:
            self.drain()
        self._queue.put((fn, args, kwargs))

    def drain(self) -> None:
        """Wait until everything submitted is written; raise the first failure, if any."""
        self._queue.join()
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def close(self) -> None:
        try:
            self.drain()
        finally:
            self._queue.put(_STOP)
            self._thread.join()
