"""Rollout collection with the local runner and with Dask workers on this machine.

    python bench/scale_out.py [--family halfcheetah-vel] [--tasks 20] [--episodes 4]
                              [--horizon 200] [--workers 2] [--runs 5]

Times the collect_rollouts stage's work -- episodes of the meta-parameters on a batch of tasks,
advantages included -- done by ``MetaLearner.collect`` in this process (the local runner) and by
``flows.scale_out.DaskCollector`` on a LocalCluster of ``--workers`` worker processes (one
shard of tasks per worker, each a Prefect task run; parameters out and episodes back over
Dask). Each side runs once to warm up (worker imports, MuJoCo models), then ``--runs`` times;
the figures are medians. Every Dask result is compared with the local one (``identical``).
One-time work -- Prefect's temporary server, the cluster's start -- is reported, not timed in.
Progress goes to stderr; the last line of stdout is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--family", default="halfcheetah-vel")
    p.add_argument("--tasks", type=int, default=20)
    p.add_argument("--episodes", type=int, default=4)
    p.add_argument("--horizon", type=int, default=200)
    p.add_argument("--workers", type=int, default=2, help="LocalCluster worker processes")
    p.add_argument("--shards", type=int, default=None, help="default: one per worker")
    p.add_argument("--runs", type=int, default=5, help="timed runs per runner")
    p.add_argument("--worker-threads", type=int, default=None,
                   help="pipeline.dask_torch_threads (default: this process's torch "
                        "threads, which keeps results identical to the local runner)")
    p.add_argument("--task-runs", action="store_true",
                   help="pipeline.dask_task_runs: each shard a Prefect task run")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    os.environ.setdefault("MAML_HOME", tempfile.mkdtemp(prefix="maml-bench-"))
    from flows.settings import configure_environment

    configure_environment()
    import torch

    from flows.config import load_run_config
    from flows.scale_out import DaskCollector, worker_api_url
    from maml_core.trainer import MetaLearner

    data = {"seed": args.seed, "meta_batch_size": args.tasks, "episodes_per_task": args.episodes,
            "task": {"family": args.family, "horizon": args.horizon},
            "policy": {"hidden_sizes": [64, 64], "activation": "tanh"},
            "pipeline": {"task_runner": "dask", "dask_workers": args.workers,
                         "dask_shards": args.shards, "dask_torch_threads": args.worker_threads,
                         "dask_task_runs": args.task_runs}}
    config = load_run_config(data=data)
    learner = MetaLearner(config)
    theta = learner.detached_params()
    log(f"[bench] {args.family}: {args.tasks} tasks x {args.episodes} episodes x "
        f"{args.horizon} steps; local: {torch.get_num_threads()} torch threads; dask: "
        f"{args.workers} workers")

    def timed(collect, run: int):
        tasks = learner.sample_tasks(run)
        t = time.perf_counter()
        episodes = collect(theta, tasks, run, "bench")
        return time.perf_counter() - t, episodes

    local_seconds, local_episodes = [], {}
    for r in range(args.runs + 1):
        dt, ep = timed(learner.collect, r)
        local_episodes[r] = ep
        log(f"[bench] local {'warm-up' if r == 0 else f'run {r}'}: {dt:.3f} s, "
            f"{ep.masks.numel() / dt:,.0f} env steps/s")
        if r:
            local_seconds.append(dt)
    steps = int(local_episodes[0].masks.numel())  # every sub-environment steps `horizon` times

    t = time.perf_counter()
    if args.task_runs:
        worker_api_url(None)  # Prefect's temporary server (a flow run has it already)
    server_seconds = time.perf_counter() - t
    t = time.perf_counter()
    collector = DaskCollector(config, learner)
    cluster_seconds = time.perf_counter() - t
    dask_seconds, worker_seconds, identical = [], [], True
    try:
        for r in range(args.runs + 1):
            dt, ep = timed(collector.collect, r)
            same = all(torch.equal(a, b) for a, b in zip(ep.to_tensors().values(),
                                                         local_episodes[r].to_tensors().values()))
            identical &= same
            log(f"[bench] dask {'warm-up' if r == 0 else f'run {r}'}: {dt:.3f} s, "
                f"{steps / dt:,.0f} env steps/s (shards {collector.last['shards']}, worker "
                f"seconds {[round(s, 3) for s in collector.last['worker_seconds']]}), "
                f"identical to local: {same}")
            if r:
                dask_seconds.append(dt)
                worker_seconds.append(max(collector.last["worker_seconds"]))
        shards = collector.last["shards"]
        threads = collector.torch_threads
    finally:
        collector.close()
        learner.close()

    local = statistics.median(local_seconds)
    dask = statistics.median(dask_seconds)
    result = {
        "family": args.family, "tasks": args.tasks, "episodes_per_task": args.episodes,
        "horizon": args.horizon, "env_steps_per_collection": steps,
        "local_env_steps_per_second": steps / local,
        "dask_env_steps_per_second": steps / dask,
        "speedup": local / dask,
        "local_seconds": local, "dask_seconds": dask,
        "dask_slowest_shard_seconds": statistics.median(worker_seconds),
        "dask_overhead_seconds": dask - statistics.median(worker_seconds),
        "identical_to_local": identical,
        "dask_workers": args.workers, "shards": shards, "worker_torch_threads": threads,
        "prefect_task_run_per_shard": args.task_runs,
        "local_torch_threads": torch.get_num_threads(), "runs": args.runs,
        "prefect_server_start_seconds": server_seconds,
        "cluster_start_seconds": cluster_seconds, "cpu_count": os.cpu_count(),
        "torch": torch.__version__, "python": platform.python_version(),
    }
    print(f"{args.family}: {args.tasks} tasks x {args.episodes} episodes x {args.horizon} "
          f"steps = {steps:,} env steps per collection, median of {args.runs} runs")
    print(f"  local runner               {result['local_env_steps_per_second']:>10,.0f} env "
          f"steps/s  ({local:.3f} s)")
    print(f"  dask, {args.workers} workers            {result['dask_env_steps_per_second']:>10,.0f}"
          f" env steps/s  ({dask:.3f} s; slowest shard {result['dask_slowest_shard_seconds']:.3f}"
          f" s)  x{result['speedup']:.2f}")
    print(f"  identical to local         {identical}")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
