"""What one Prefect task run costs when the task does tensor work, as in a pipeline stage.

    python bench/prefect_task_cost.py [--runs 30] [--repeats 7]

The same piece of torch work (small matrix products like a rollout step, then large ones like
a meta-update) runs ``--runs`` times as a plain call and ``--runs`` times as a Prefect task
(arguments quoted, no cache, no persisted result), alternating, ``--repeats`` times; the
per-run cost is the difference of the medians. It is measured twice: with Prefect's temporary
local server as Prefect starts it, and after ``flows.settings.deprioritize_local_server`` (all
its threads niced and SCHED_IDLE), which the training flow does. The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    os.environ.setdefault("MAML_HOME", tempfile.mkdtemp(prefix="maml-bench-"))
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from flows.settings import configure_environment, deprioritize_local_server

    configure_environment()
    import torch
    from prefect import flow, task
    from prefect.cache_policies import NO_CACHE
    from prefect.utilities.annotations import quote

    gen = torch.Generator().manual_seed(0)
    small = torch.randn(400, 64, generator=gen)
    large = torch.randn(40000, 64, generator=gen)
    weight = torch.randn(64, 64, generator=gen, requires_grad=True)

    def work() -> None:
        for _ in range(30):
            out = torch.tanh(small @ weight)
        out.sum().backward()
        for _ in range(3):
            torch.tanh(large @ weight).sum().backward()

    @task(cache_policy=NO_CACHE, persist_result=False)
    def stage(_: int) -> None:
        work()

    def measure() -> tuple[float, float]:
        plain, as_task = [], []
        for _ in range(args.repeats):
            start = time.perf_counter()
            for _ in range(args.runs):
                work()
            plain.append((time.perf_counter() - start) / args.runs)
            start = time.perf_counter()
            for i in range(args.runs):
                stage(quote(i))
            as_task.append((time.perf_counter() - start) / args.runs)
        return statistics.median(plain), statistics.median(as_task)

    @flow(persist_result=False)
    def bench() -> dict:
        for i in range(10):  # warm-up
            work()
            stage(quote(i))
        out = {}
        for label in ("server_as_started", "server_deprioritized"):
            if label == "server_deprioritized":
                out["deprioritized_pids"] = deprioritize_local_server()
            plain, as_task = measure()
            out[label] = {"plain_ms": plain * 1e3, "task_ms": as_task * 1e3,
                          "cost_per_task_run_ms": (as_task - plain) * 1e3}
            print(f"{label:22s}: work {plain * 1e3:7.2f} ms, as a task {as_task * 1e3:7.2f} ms, "
                  f"cost per task run {(as_task - plain) * 1e3:6.2f} ms")
        return out

    result = bench()
    result.update(runs=args.runs, repeats=args.repeats, torch_threads=torch.get_num_threads())
    print(json.dumps(result))


if __name__ == "__main__":
    main()
