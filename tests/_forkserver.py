"""A `maml` command line that has already imported the pipeline, for tests that start many
short `maml` processes: each one is forked from here instead of paying the seconds that
importing torch, Prefect and MLflow take.

Run as ``python tests/_forkserver.py`` with the environment the children should have. It reads
one JSON request per line on stdin, ``{"argv": [...], "env": {...}, "stderr": path}``; for each
it forks a child in a session of its own (so that its process group can be killed) that runs
``flows.cli.main(argv)`` with ``env`` added to its environment and its stderr in ``path``, and
answers two lines on stdout: ``{"pid": N}`` at once and ``{"code": C}`` when the child ends
(``C`` negative for a signal, as ``subprocess`` reports it). Nothing runs in this process but
imports, so it holds no connection or thread pool that a child could inherit half-used.
"""

from __future__ import annotations

import json
import os
import sys
import traceback

from flows.settings import configure_environment

configure_environment()

import flows.cli  # noqa: E402  (the imports a `maml train` makes, done once)
import flows.training  # noqa: E402


def _child(request: dict) -> int:
    os.setsid()
    os.environ.update(request["env"])
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(null, 1)
    os.dup2(os.open(request["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), 2)
    try:
        return flows.cli.main(request["argv"])
    except BaseException:  # the child's stderr is all the test sees of it
        traceback.print_exc()
        return 1


def serve() -> None:
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                code = _child(request)
            finally:
                sys.stderr.flush()
                os._exit(code if isinstance(code, int) else 1)
        print(json.dumps({"pid": pid}), flush=True)
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"code": os.waitstatus_to_exitcode(status)}), flush=True)


if __name__ == "__main__":
    serve()
