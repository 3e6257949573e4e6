"""MuJoCo rollout collection: the batched step against gymnasium's per-env ``step``.

    python bench/env_step.py                       # halfcheetah-vel, both step lengths
    python bench/env_step.py --family halfcheetah-dir --tasks 20 --episodes 20
    python bench/env_step.py --family ant-vel --tasks 20 --episodes 20

For each cheetah step length (the paper's 0.01 s with its 20-dim observation, and v5's
0.05 s), or the ant's 0.02 s, it times ``collect_episodes`` with one random 100-100 ReLU
policy on two vector envs over the same tasks and seeds:

* ``batched``: the env as the pipeline builds it (``family.make_env``): the sub-envs stepped
  as a batch (``HalfCheetahTaskEnv.step_batch``, ``AntTaskEnv.step_batch``), on one thread
  or several, whichever its first steps timed faster;
* ``gymnasium``: the same env class with the batch step switched off, so each sub-env goes
  through gymnasium's ``step``, on every thread (the code before the batch step).

Both collect the same episodes, bit for bit (checked on every run). Figures are medians of
``--runs`` timed collections after one warm-up collection each; the last line of stdout is
JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from functools import partial

import numpy as np
import torch

from maml_core.policies import build_policy
from maml_core.rollouts import collect_episodes
from maml_core.tasks import get_task_family
from maml_core.tasks.mujoco import GymTaskVectorEnv


def without_batch_step(env_class: type) -> type:
    """``env_class`` without its batch step: the vector env calls gymnasium's ``step``."""
    return type(f"{env_class.__name__}GymnasiumStep", (env_class,), {"step_batch": None})


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def time_collection(env, policy, params, seeds, runs: int) -> tuple[list[float], object]:
    episodes = collect_episodes(env, policy, params, seeds)  # warm-up (and thread choice)
    seconds = []
    for _ in range(runs):
        start = time.perf_counter()
        episodes = collect_episodes(env, policy, params, seeds)
        seconds.append(time.perf_counter() - start)
    return seconds, episodes


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--family", default="halfcheetah-vel",
                   choices=["halfcheetah-vel", "halfcheetah-dir", "ant-vel", "ant-dir"])
    p.add_argument("--tasks", type=int, default=40)
    p.add_argument("--episodes", type=int, default=10)
    p.add_argument("--horizon", type=int, default=200)
    p.add_argument("--runs", type=int, default=5, help="timed collections per env")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    if args.family.startswith("ant"):
        settings = {"rllab step (0.02 s)": {}}
    else:
        settings = {"paper (0.01 s, 20-dim obs)": {"frame_skip": 1, "torso_com": True},
                    "v5 (0.05 s, 17-dim obs)": {"frame_skip": 5}}
    steps = args.tasks * args.episodes * args.horizon
    results = {}
    for label, options in settings.items():
        family = get_task_family(args.family, **options)
        tasks = family.sample_tasks(args.tasks, np.random.default_rng(args.seed))
        policy = build_policy(family, (100, 100), "relu", 0.0,
                              torch.Generator().manual_seed(args.seed))
        params = {k: v.detach() for k, v in policy.named_parameters()}
        seeds = [args.seed * 1000 + i for i in range(args.tasks)]
        batched = family.make_env(tasks, args.episodes, args.horizon)
        fn = family._env_fn()
        gymnasium = GymTaskVectorEnv(tasks, args.episodes, args.horizon,
                                     partial(without_batch_step(fn.func), *fn.args,
                                             **fn.keywords))
        gymnasium.step_threads = gymnasium.threads  # every thread, as before the timing
        log(f"[bench] {args.family} {label}: {args.tasks} tasks x {args.episodes} episodes x "
            f"{args.horizon} steps = {steps:,} env steps per collection")
        times, episodes = {}, {}
        for name, env in (("gymnasium", gymnasium), ("batched", batched)):
            times[name], episodes[name] = time_collection(env, policy, params, seeds, args.runs)
            log(f"[bench]   {name}: median {statistics.median(times[name]):.2f} s")
        identical = all(torch.equal(getattr(episodes["batched"], f),
                                    getattr(episodes["gymnasium"], f))
                        for f in ("observations", "actions", "rewards", "masks"))
        if not identical:
            raise SystemExit(f"{label}: the batched step collected different episodes")
        med = {k: statistics.median(v) for k, v in times.items()}
        results[label] = {
            **options,
            "seconds_gymnasium": med["gymnasium"],
            "seconds_batched": med["batched"],
            "us_per_env_step_gymnasium": med["gymnasium"] / steps * 1e6,
            "us_per_env_step_batched": med["batched"] / steps * 1e6,
            "speedup": med["gymnasium"] / med["batched"],
            "threads_gymnasium": gymnasium.step_threads,
            "threads_batched": batched.step_threads,
            "identical_episodes": identical,
            "seconds_all_gymnasium": times["gymnasium"],
            "seconds_all_batched": times["batched"],
        }
        batched.close()
        gymnasium.close()

    print(f"{args.family}: collect_episodes, {args.tasks} tasks x {args.episodes} episodes x "
          f"{args.horizon} steps, median of {args.runs}")
    print(f"{'step':<28} {'gymnasium s':>12} {'batched s':>10} {'speedup':>8} "
          f"{'us/step':>14} {'threads':>8}")
    for label, r in results.items():
        print(f"{label:<28} {r['seconds_gymnasium']:>12.2f} {r['seconds_batched']:>10.2f} "
              f"{r['speedup']:>7.2f}x {r['us_per_env_step_gymnasium']:>6.1f} -> "
              f"{r['us_per_env_step_batched']:<5.1f} {r['threads_gymnasium']:>3} -> "
              f"{r['threads_batched']}")
    print(json.dumps({"family": args.family, "tasks": args.tasks, "episodes": args.episodes,
                      "horizon": args.horizon, "runs": args.runs, "results": results,
                      "torch": torch.__version__}))


if __name__ == "__main__":
    main()
