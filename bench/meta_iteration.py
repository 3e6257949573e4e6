"""Benchmark one MAML meta-iteration, split by phase, plus rollout throughput and peak memory.

    python bench/meta_iteration.py --family navigation2d --optimizer trpo

Runs ``MetaLearner.step`` (sample tasks, collect pre-adaptation episodes, adapt, collect
post-adaptation episodes, meta-update) a few times to warm up, then ``--iterations`` times
measured, and reports medians. Rollout throughput is timed on its own: ``collect_episodes`` for
the whole batch of tasks with the meta-parameters, without advantages or adaptation.
Progress goes to stderr; the last line of stdout is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from maml_core.adaptation import split_meta_params
from maml_core.allocator import tune_allocator
from maml_core.config import build_config
from maml_core.rollouts import collect_episodes
from maml_core.seeding import task_seeds
from maml_core.tasks.base import TASK_ID
from maml_core.trainer import MetaLearner

PHASES = ("seconds_sampling", "seconds_adaptation", "seconds_meta_update", "seconds_iteration")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def bench_config(args) -> dict:
    meta = {"name": args.optimizer}
    if args.optimizer == "trpo":
        meta.update(cg_iters=10, line_search_steps=15, hvp_subsample=args.hvp_subsample)
    return {
        "seed": args.seed,
        "device": "cpu",
        "dtype": "float32",
        "iterations": args.warmup + args.iterations,
        "meta_batch_size": args.tasks,
        "episodes_per_task": args.episodes,
        "task": {"family": args.family, "horizon": args.horizon},
        "policy": {"hidden_sizes": [64, 64], "activation": "tanh"},
        "inner": {"step_size": 0.1, "num_steps": 1},
        "meta_optimizer": meta,
    }


def peak_rss_mb() -> float:
    # ru_maxrss is in kilobytes on Linux (bytes on macOS).
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024.0 * 1024.0) if sys.platform == "darwin" else rss / 1024.0


def time_rollouts(learner: MetaLearner, runs: int) -> tuple[float, int]:
    """Median env steps/s of ``collect_episodes`` alone (all tasks x episodes x horizon)."""
    tasks = learner.sample_tasks(10_000)
    env = learner.pool.get(tasks, learner.config.episodes_per_task, learner.horizon)
    theta, _ = split_meta_params({k: v.detach() for k, v in learner.meta_params.items()})
    rates, steps = [], 0
    for r in range(runs + 1):  # the first run is a warm-up
        seeds = task_seeds(learner.config.seed, 10_000 + r, "bench", tasks[TASK_ID])
        t0 = time.perf_counter()
        episodes = collect_episodes(env, learner.policy, theta, seeds, learner.horizon)
        dt = time.perf_counter() - t0
        # Every sub-environment is stepped ``horizon`` times, finished or not.
        steps = int(episodes.masks.numel())
        if r > 0:
            rates.append(steps / dt)
    return statistics.median(rates), steps


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--family", default="navigation2d")
    p.add_argument("--optimizer", default="trpo", choices=["adam", "sgd", "trpo", "promp"])
    p.add_argument("--iterations", type=int, default=10, help="measured meta-iterations")
    p.add_argument("--warmup", type=int, default=2, help="meta-iterations before measuring")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads (default: torch's default)")
    p.add_argument("--hvp-subsample", type=float, default=1.0,
                   help="TRPO: fraction of tasks in the Hessian-vector products (1.0 = exact; "
                        "any other value is reported separately and is not the default)")
    p.add_argument("--rollout-runs", type=int, default=7, help="timed collect_episodes runs")
    p.add_argument("--tasks", type=int, default=20)
    p.add_argument("--episodes", type=int, default=20)
    p.add_argument("--horizon", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.hvp_subsample != 1.0 and args.optimizer != "trpo":
        p.error("--hvp-subsample only applies to --optimizer trpo")

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    data = bench_config(args)
    config = build_config(data)
    log(f"[bench] {args.family} / {args.optimizer}: {args.tasks} tasks x {args.episodes} "
        f"episodes x {args.horizon} steps, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads")
    learner = MetaLearner(config)
    records = []
    try:
        total = args.warmup + args.iterations
        for i in range(total):
            stats = learner.step().stats
            tag = "warm-up" if i < args.warmup else "measure"
            log(f"[bench] {tag} {i + 1}/{total}: {stats['seconds_iteration']:.3f} s "
                f"(sampling {stats['seconds_sampling']:.3f}, adaptation "
                f"{stats['seconds_adaptation']:.3f}, meta-update "
                f"{stats['seconds_meta_update']:.3f}) post_return {stats['post_return']:.2f}")
            if i >= args.warmup:
                records.append(stats)
        log(f"[bench] timing collect_episodes alone ({args.rollout_runs} runs)")
        steps_per_s, steps = time_rollouts(learner, args.rollout_runs)
    finally:
        learner.close()

    medians = {k: statistics.median(r[k] for r in records) for k in PHASES}
    result = {
        "family": args.family,
        "optimizer": args.optimizer,
        "hvp_subsample": args.hvp_subsample,
        "exact_hvp": args.optimizer != "trpo" or args.hvp_subsample == 1.0,
        "seconds_per_iteration": medians["seconds_iteration"],
        "seconds_sampling": medians["seconds_sampling"],
        "seconds_adaptation": medians["seconds_adaptation"],
        "seconds_meta_update": medians["seconds_meta_update"],
        "seconds_per_iteration_min": min(r["seconds_iteration"] for r in records),
        "seconds_per_iteration_max": max(r["seconds_iteration"] for r in records),
        "env_steps_per_second": steps_per_s,
        "rollout_env_steps": steps,
        "peak_rss_mb": peak_rss_mb(),
        "iterations_measured": len(records),
        "warmup_iterations": args.warmup,
        "final_post_return": records[-1]["post_return"],
        "threads": torch.get_num_threads(),
        "malloc_tuning": tune_allocator(),  # applied by the first rollout (allocator.py)
        "torch": torch.__version__,
        "python": platform.python_version(),
        "config": data,
    }
    label = args.optimizer + ("" if result["exact_hvp"] else
                              f" (subsampled HVP {args.hvp_subsample:g}, not exact)")
    print(f"{args.family} / {label}: median over {len(records)} meta-iterations")
    print(f"  seconds per meta-iteration   {result['seconds_per_iteration']:.3f} "
          f"(min {result['seconds_per_iteration_min']:.3f}, "
          f"max {result['seconds_per_iteration_max']:.3f})")
    print(f"    sampling (all phases)      {result['seconds_sampling']:.3f}")
    print(f"    adaptation                 {result['seconds_adaptation']:.3f}")
    print(f"    meta-gradient / optimizer  {result['seconds_meta_update']:.3f}")
    print(f"  rollout env steps/s          {result['env_steps_per_second']:,.0f}")
    print(f"  peak RSS                     {result['peak_rss_mb']:.0f} MB")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
