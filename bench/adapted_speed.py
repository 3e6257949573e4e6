"""How fast a run's half-cheetah or ant runs on each held-out task, before and after adaptation.

For a half-cheetah or ant run (``halfcheetah-vel``, ``halfcheetah-dir``, ``ant-vel``,
``ant-dir``) this adapts the run's last logged policy with the run's own evaluation protocol
(its held-out tasks, seeds, step sizes and episodes) and prints, per task, the robot's mean
forward velocity after 0..K steps next to the task's target. Its returns match the run's
``evaluation/per_task.csv`` up to the rounding of a different thread count, which the simulated
dynamics amplify over 200 steps (e.g. -90.8 against -91.1 after one step). It tells whether a
return falls short because the adapted robot runs too slowly, too fast, or the wrong way.

The velocity is the torso's x velocity (``qvel[0]``: index 8 of v5's half-cheetah observation,
13 of the ant's) averaged over the states the policy acted in, the first (at rest) included; an
ant episode that ends early (the ant fell) counts its states until then. A cheetah run made with
the option ``com_velocity`` is paid for its centre of mass's velocity, and the ant is paid for
its torso's displacement over each step; either can differ from this mean of instantaneous
velocities by about 0.1 m/s over an episode.

    .venv/bin/python bench/adapted_speed.py RUN_ID|EXPORT_FOLDER [--steps K]
        [--set KEY=VALUE ...] [--tasks FILE]

``--set`` changes the protocol as ``maml evaluate --set`` does (e.g. ``inner.step_size=0.3``:
does a longer step move the speed toward the target?; ``task.family=ant-vel`` with ``--tasks
data/ant-vel_test_tasks.csv``: what an ant-dir model's steps do on ant-vel's reward).

Last line of stdout: JSON with the per-task table and, per step, the mean |velocity - target|
and the fastest mean velocity over tasks.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from flows import tracking
from flows.errors import USER_ERRORS
from flows.evaluation import evaluation_tasks, load_model
from flows.runrecord import held_out_task_table, is_export, open_record
from maml_core.tasks.base import TASK_ID

# Where qvel[0], the torso's x velocity, sits in each family's observation: v5's observations
# start with qpos without the x (half-cheetah: 8 values) or x and y (ant: 13), then qvel.
FORWARD_VELOCITY = {"halfcheetah-vel": 8, "halfcheetah-dir": 8, "ant-vel": 13, "ant-dir": 13}


def speeds(run_ref: str, steps: int | None = None, overrides: list[str] | None = None,
           tasks_path: str | None = None) -> tuple[str, pd.DataFrame]:
    """The task coordinate's name and, per held-out task and adaptation step, its value, the
    mean forward velocity and the return (the run's evaluation protocol, changed by
    ``overrides`` as ``maml evaluate --set`` changes it; on the tasks at ``tasks_path`` if
    given). ``run_ref``: an MLflow run id or a folder written by ``maml export``."""
    try:
        record = open_record(run_ref)
        learner, info = load_model(run_ref, overrides)
    except USER_ERRORS as exc:
        raise SystemExit(f"run {run_ref}: {exc}") from None
    family = learner.config.task.family
    if family not in FORWARD_VELOCITY:
        learner.close()
        raise SystemExit(f"run {run_ref} is a {family} run; this script measures the "
                         f"half-cheetah and the ant ({', '.join(FORWARD_VELOCITY)})")
    index = FORWARD_VELOCITY[family]
    if overrides or tasks_path:
        try:
            tasks, family_or_why = evaluation_tasks(learner, info, tasks_path), learner.family
        except USER_ERRORS as exc:
            learner.close()
            raise SystemExit(f"run {run_ref}: {exc}") from None
    else:
        tasks, family_or_why = held_out_task_table(record)
    if tasks is None:
        learner.close()
        raise SystemExit(f"run {run_ref}: its held-out tasks cannot be rebuilt: "
                         f"{family_or_why}")
    coordinate, values = family_or_why.task_coordinate(tasks)
    velocity: dict[int, np.ndarray] = {}

    def measure(step: int, episodes) -> None:
        v = episodes.observations[..., index] * episodes.masks
        per_episode = v.sum(0) / episodes.masks.sum(0).clamp(min=1.0)  # [tasks, episodes]
        velocity[step] = per_episode.mean(-1).cpu().numpy()
        print(f"step {step}: measured", file=sys.stderr, flush=True)

    try:
        curve = learner.evaluate(tasks, steps, on_episodes=measure)
    finally:
        learner.close()
    order = {int(t): i for i, t in enumerate(tasks[TASK_ID])}
    curve[coordinate] = [values[order[int(t)]] for t in curve[TASK_ID]]
    curve["velocity_reached"] = [velocity[int(s)][order[int(t)]]
                                 for s, t in zip(curve["step"], curve[TASK_ID], strict=True)]
    return coordinate, curve


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_id", help="an MLflow run of `maml train` (it logs the policy), "
                        "or its folder written by `maml export`")
    parser.add_argument("--steps", type=int, default=None,
                        help="adaptation steps (default: the run's evaluation.steps)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="change the evaluation protocol, as `maml "
                        "evaluate --set` does (e.g. inner.step_size=0.3)")
    parser.add_argument("--tasks", default=None, help="task set (CSV/parquet) instead of the "
                        "run's held-out tasks")
    args = parser.parse_args(argv)
    if not is_export(args.run_id):
        tracking.load_tracking_config().setup()
    coordinate, curve = speeds(args.run_id, args.steps, args.overrides or None, args.tasks)
    table = curve.pivot_table(index=[TASK_ID, coordinate], columns="step",
                              values="velocity_reached").sort_index(level=1)
    table.columns = [f"v after {s}" for s in table.columns]
    print(table.round(2).to_string())
    by_step = {}
    for step, rows in curve.groupby("step"):
        by_step[int(step)] = {
            "fastest_velocity": round(float(rows["velocity_reached"].max()), 3),
            "mean_return": round(float(rows["return"].mean()), 2)}
        if coordinate == "velocity":
            by_step[int(step)]["mean_abs_velocity_error"] = round(float(
                (rows["velocity_reached"] - rows[coordinate]).abs().mean()), 3)
            # does the robot's speed follow the target at all (1: in step with it)?
            by_step[int(step)]["velocity_target_correlation"] = round(float(
                np.corrcoef(rows["velocity_reached"], rows[coordinate])[0, 1]), 3)
    for step, figures in by_step.items():
        print(f"after {step} step(s): " + ", ".join(f"{k} {v}" for k, v in figures.items()))
    print(json.dumps({"run_id": args.run_id, "overrides": args.overrides,
                      "coordinate": coordinate, "by_step": by_step,
                      "per_task": curve.round(4).to_dict(orient="records")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
