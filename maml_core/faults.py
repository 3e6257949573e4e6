"""Named fault points, for tests that kill or break a run at a precise place.

``MAML_KILL_AT="<point>[@n]"`` sends SIGKILL to this process the n-th time (default: first)
``fault_point("<point>")`` is reached; several points may be given, comma-separated. Points
are plain strings such as ``atomic-write:iter-000004.json:before-rename``,
``stage:meta_update:3:end`` or ``mlflow:log-batch:before``. Unset, a fault point costs one
dictionary lookup. This is how the fault-injection tests reproduce crashes in the middle of a
checkpoint write or of MLflow logging; nothing else uses it. ``MAML_KILL_SIGNAL`` (e.g. ``TERM``,
``INT``) sends that signal instead of SIGKILL: a scheduler's stop, or a Ctrl-C, at a known place.
"""

from __future__ import annotations

import os
import signal

_counts: dict[str, int] = {}


def _targets() -> dict[str, int]:
    spec = os.environ.get("MAML_KILL_AT", "")
    out = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        point, _, nth = item.rpartition("@") if "@" in item else (item, "", "1")
        out[point] = int(nth) if nth.isdigit() else 1
    return out


def fault_point(name: str) -> None:
    """Die here (SIGKILL, no clean-up; or the signal ``MAML_KILL_SIGNAL`` names) if
    ``MAML_KILL_AT`` names this point."""
    if "MAML_KILL_AT" not in os.environ:
        return
    targets = _targets()
    if name in targets:
        _counts[name] = _counts.get(name, 0) + 1
        if _counts[name] == targets[name]:
            os.kill(os.getpid(), _signal())


def _signal() -> signal.Signals:
    name = os.environ.get("MAML_KILL_SIGNAL", "KILL").strip().upper().removeprefix("SIG")
    try:
        return signal.Signals[f"SIG{name}"]
    except KeyError:
        raise ValueError(f"MAML_KILL_SIGNAL={os.environ['MAML_KILL_SIGNAL']!r} is not a signal "
                         "name; use e.g. KILL, TERM or INT") from None
