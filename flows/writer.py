"""A background writer: stage-store files and MLflow metrics written while training goes on.

File writes (with fsync) and MLflow's SQLite inserts take tens of milliseconds per iteration;
done on one background thread they overlap the next stage's arithmetic instead of adding to it.
The flow drains the writer at the end of every iteration and before every checkpoint, so a
crash loses at most the iteration in progress. A write that failed is raised by ``drain``.

A writer made with ``retry_seconds > 0`` (the flow's MLflow writer) rides out an outage of the
service it writes to: a call that fails with a *transient* error (``is_transient``: connection
refused or reset, timeout, HTTP 429/5xx, SQLite "database is locked") is retried with
exponential backoff (0.5 s doubling to 5 s) until it succeeds or ``retry_seconds`` have passed
since its first failure; then ``ServiceUnavailableError`` is kept and raised by ``drain``.
Later calls wait in the queue behind the one being retried, in order. Other errors are not
retried. Calls given to such a writer must be safe to repeat (``tracking.log_metric_steps``
re-reads what the store holds after a failure, so each metric step is recorded once).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

_STOP = object()
_LOG = logging.getLogger(__name__)

# Substrings of error messages that mean "the service could not be reached right now".
_TRANSIENT_TEXT = ("connection refused", "connection reset", "connection aborted",
                   "max retries exceeded", "failed to establish a new connection",
                   "remote end closed connection", "timed out", "timeout exception",
                   "temporarily unavailable", "database is locked", "bad gateway",
                   "service unavailable", "gateway timeout", "too many requests",
                   "failed with error code 5", "failed with error code 429")


class ServiceUnavailableError(RuntimeError):
    """A service (MLflow) stayed unreachable longer than the writer's retry budget."""


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` (or an exception it was raised from) means the service was unreachable
    or overloaded, as opposed to a request it rejected."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, (ConnectionError, TimeoutError)):
            return True
        name = type(exc).__name__
        if name in ("ConnectionError", "ConnectTimeout", "ReadTimeout", "Timeout",
                    "NewConnectionError", "MaxRetryError", "ProtocolError",
                    "RemoteDisconnected"):
            return True
        code = getattr(exc, "error_code", None)
        if code in ("TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED"):
            return True
        text = str(exc).lower()
        if any(t in text for t in _TRANSIENT_TEXT):
            return True
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return False


class BackgroundWriter:
    def __init__(self, name: str = "maml-writer", *, retry_seconds: float = 0.0,
                 service: str = "the service", hint: str = "",
                 transient: Callable[[BaseException], bool] = is_transient,
                 first_delay: float = 0.5, max_delay: float = 5.0):
        """``retry_seconds`` > 0: retry transient failures for up to that long (see the module
        docstring); ``service`` and ``hint`` go into the error raised when it is exceeded."""
        self.name = name
        self.retry_seconds = float(retry_seconds)
        self.service, self.hint, self.transient = service, hint, transient
        self.first_delay, self.max_delay = first_delay, max_delay
        self.retries = 0  # transient failures retried so far (for tests and logs)
        self._queue: queue.Queue = queue.Queue()
        self._error: BaseException | None = None
        self._abandon = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is _STOP:
                    return
                fn, args, kwargs = item
                if self._error is None and not self._abandon.is_set():
                    self._call(fn, args, kwargs)
            except BaseException as exc:  # kept and raised by drain()
                self._error = exc
            finally:
                self._queue.task_done()

    def _call(self, fn: Callable[..., Any], args: tuple, kwargs: dict) -> None:
        if self.retry_seconds <= 0:
            fn(*args, **kwargs)
            return
        first_failure = None
        delay = self.first_delay
        while True:
            try:
                fn(*args, **kwargs)
            except Exception as exc:
                if not self.transient(exc) or self._abandon.is_set():
                    raise
                now = time.monotonic()
                if first_failure is None:
                    first_failure = now
                    _LOG.warning("%s is unreachable (%s); buffering and retrying for up to "
                                 "%g s", self.service, _one_line(exc), self.retry_seconds)
                waited = now - first_failure
                if waited >= self.retry_seconds:
                    raise ServiceUnavailableError(
                        f"{self.service} has been unreachable for {waited:.0f} s, longer "
                        f"than the {self.retry_seconds:g} s allowed "
                        f"(pipeline.mlflow_outage_seconds): {_one_line(exc)}"
                        + (f"; {self.hint}" if self.hint else "")) from exc
                self.retries += 1
                self._abandon.wait(min(delay, self.retry_seconds - waited))
                delay = min(delay * 2, self.max_delay)
            else:
                if first_failure is not None:
                    _LOG.warning("%s is reachable again after %.0f s; buffered writes sent",
                                 self.service, time.monotonic() - first_failure)
                return

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

    def close(self, abandon: bool = False, grace: float | None = None) -> None:
        """Drain and stop the thread; with ``abandon``, drop what is still queued and stop
        retrying (errors of the dropped calls are not raised).

        With ``grace`` (seconds), for a process on its way out (Ctrl-C, SIGTERM): wait that long
        at most for what is queued, and no longer than that for a call blocked in the service;
        what is left then is dropped and the thread (a daemon) left behind. A second interrupt
        during the wait only ends the wait (another exception ends it too, and is raised after
        the thread is told to stop). Errors are logged, not raised, with ``grace``."""
        if grace is not None:
            written = False
            try:
                written = self._wait_idle(grace)
            except KeyboardInterrupt:
                pass
            finally:
                if not written:
                    self._abandon.set()
                self._queue.put(_STOP)
            if written:
                self._thread.join()
            if self._error is not None:
                _LOG.warning("a write to %s failed: %s", self.service, _one_line(self._error))
            return
        if abandon:
            self._abandon.set()
            self._queue.join()
            self._error = None
        try:
            self.drain()
        finally:
            self._queue.put(_STOP)
            self._thread.join()

    def _wait_idle(self, timeout: float) -> bool:
        """Wait up to ``timeout`` s until every submitted call has returned; whether they did."""
        deadline = time.monotonic() + timeout
        with self._queue.all_tasks_done:
            while self._queue.unfinished_tasks:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._queue.all_tasks_done.wait(left)
        return True


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    if len(text) > 300:
        text = text[:300] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
