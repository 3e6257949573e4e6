"""``maml stage NAME``: run one stage alone on an iteration kept in the stage store.

Inputs are read from the store, the stage runs as its Prefect task, and its outputs are written
back. Because stages are deterministic, the new outputs must equal the stored ones; the report
says whether they do (by SHA-256 of the tensor files, or equality of the tables), and the check
is recorded as a tag on the run.
"""

from __future__ import annotations

import pandas as pd

from flows import tracking
from flows.config import load_run_config
from flows.errors import UsageError
from flows.stages import PipelineContext, configured
from flows.store import StageStore, StoreError
from flows.training import store_root
from maml_core.trainer import MetaLearner


def _theta_at(store: StageStore, iteration: int):
    """Meta-parameters and optimizer state at the start of ``iteration``."""
    if store.has(iteration, "theta"):
        return store.load_tensors(iteration, "theta")
    if iteration > 0 and store.has(iteration - 1, "meta_update"):
        return store.load_tensors(iteration - 1, "meta_update")
    raise StoreError(f"the parameters at iteration {iteration} of run {store.run_id} are not "
                     f"in the stage store (kept iterations: {store.iterations()})")


def _digest(store: StageStore, iteration: int, name: str) -> str | None:
    if not store.has(iteration, name):
        return None
    return store.read_json(store.iteration_dir(iteration) / f"{name}.json")["sha256"]


def rerun_stage(name: str, run_id: str, iteration: int, phase: str = "pre") -> dict:
    store = StageStore(store_root(), run_id)
    if not (store.run_dir / "config.json").is_file():
        raise UsageError(f"run {run_id!r} is not in the stage store {str(store.root)!r}")
    config = load_run_config(data=store.load_config())
    learner = MetaLearner(config)
    if not learner.rl and name != "evaluate":
        raise UsageError(f"stage {name} applies to RL families; {config.task.family} is "
                         "supervised")
    ctx = PipelineContext(learner, store, config)
    stages = configured(config)
    identical: bool | None = None
    output = ""
    if name == "sample_tasks":
        before = store.load_table(iteration, "tasks") if store.has_table(iteration, "tasks") \
            else None
        after = stages["sample_tasks"](ctx, iteration)
        identical = None if before is None else bool(before.equals(after))
        output = str(store.iteration_dir(iteration) / "tasks.parquet")
    elif name in ("collect_rollouts", "adapt", "meta_update"):
        out_name = {"collect_rollouts": phase, "adapt": "adapted",
                    "meta_update": "meta_update"}[name]
        before = _digest(store, iteration, out_name)
        theta, record = _theta_at(store, iteration)
        if name == "collect_rollouts":
            tasks = store.load_table(iteration, "tasks")
            if phase == "pre":
                params = theta
            else:
                params, _ = store.load_tensors(iteration, "adapted")
            stages["collect_rollouts"](ctx, iteration, phase, params, tasks)
        elif name == "adapt":
            stages["adapt"](ctx, iteration, theta, store.load_episodes(iteration, "pre"))
        else:
            stages["meta_update"](ctx, iteration, theta, record,
                                  store.load_episodes(iteration, "pre"),
                                  store.load_episodes(iteration, "post"))
        after = _digest(store, iteration, out_name)
        identical = None if before is None else before == after
        output = str(store.iteration_dir(iteration) / f"{out_name}.safetensors")
    elif name == "evaluate":
        theta, record = _theta_at(store, iteration)
        learner.load_params({k: v for k, v in theta.items() if not k.startswith("optim/")},
                            "stored meta-parameters")
        path = store.evaluation_dir / f"iter-{iteration:06d}.parquet"
        before = pd.read_parquet(path) if path.is_file() else None
        after = stages["evaluate"](ctx, iteration, learner.held_out_tasks())
        identical = None if before is None else bool(before.equals(after))
        output = str(path)
    elif name == "checkpoint":
        theta, record = _theta_at(store, iteration)
        from flows.stages import load_learner_state

        load_learner_state(learner, theta, record)
        learner.iteration = iteration
        output = str(stages["checkpoint"](ctx, iteration))
    learner.close()
    verdict = {None: "no stored output to compare", True: "identical", False: "differs"}
    try:
        tracking.load_tracking_config().setup()
        tracking.set_tags(run_id, {f"maml.stage_rerun.{name}.{iteration}":
                                   verdict[identical]})
    except tracking.TrackingError:
        pass  # the run may live in another tracking store; the report below still says it
    return {"stage": name, "run": run_id, "iteration": iteration, "phase": phase,
            "output": output, "identical_to_stored": identical,
            "seconds": dict(ctx.timings)}
