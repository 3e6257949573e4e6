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
from flows.errors import RUN_ID, UsageError
from flows.stages import PipelineContext, adapted_name, configured
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


def _guarded(store: StageStore, what: str, load):
    """``load()``, with a stored file that cannot be read turned into a ``StoreError`` that
    names it (stage outputs are safetensors/parquet/JSON; nothing else is ever parsed)."""
    from flows.errors import USER_ERRORS

    try:
        return load()
    except USER_ERRORS:
        raise
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise StoreError(f"the stored {what} of run {store.run_id} in {str(store.run_dir)!r} "
                         f"cannot be read ({type(exc).__name__}: {exc}); re-run the "
                         "iteration in a new training run") from None


def _phases(learner: MetaLearner) -> list[str]:
    """The run's collect phases in order: ``pre``, the fresh-episode ones, ``post``."""
    return ["pre", *learner.later_phases, "post"]


def _output_name(name: str, phase: str, phases: list[str]) -> str:
    """What stage ``name`` writes for ``phase``: its episodes (collect_rollouts), the
    parameters of the inner step on that phase's episodes (adapt), or the new theta."""
    if name == "collect_rollouts":
        return phase
    if name == "adapt":
        return adapted_name(phases.index(phase))
    return "meta_update"


def _inputs(store: StageStore, name: str, iteration: int, phase: str,
            phases: list[str]) -> dict:
    """Every stored input of stage ``name`` at ``iteration``, read before the stage runs."""
    it = iteration
    out: dict = {}
    step = phases.index(phase)  # inner steps taken before this phase's episodes
    if name == "sample_tasks":
        if store.has_table(it, "tasks"):
            out["before"] = _guarded(store, f"tasks of iteration {it}",
                                     lambda: store.load_table(it, "tasks"))
        return out
    if name in ("collect_rollouts", "adapt", "meta_update"):
        out_name = _output_name(name, phase, phases)
        out["before"] = _guarded(store, f"{out_name} record of iteration {it}",
                                 lambda: _digest(store, it, out_name))
    out["theta"], out["record"] = _guarded(store, f"parameters at iteration {it}",
                                           lambda: _theta_at(store, it))
    if name == "collect_rollouts":
        out["tasks"] = _guarded(store, f"tasks of iteration {it}",
                                lambda: store.load_table(it, "tasks"))
        if step > 0:
            out["params"], _ = _guarded(store, f"adapted parameters of iteration {it}",
                                        lambda: store.load_tensors(it, adapted_name(step - 1)))
        else:
            out["params"] = out["theta"]
    elif name == "adapt":
        out["episodes"] = _guarded(store, f"{phase} episodes of iteration {it}",
                                   lambda: store.load_episodes(it, phase))
        out["phi"] = None if step == 0 else _guarded(
            store, f"adapted parameters of iteration {it}",
            lambda: store.load_tensors(it, adapted_name(step - 1))[0])
    elif name == "meta_update":
        out["episodes"] = [_guarded(store, f"{ph} episodes of iteration {it}",
                                    lambda ph=ph: store.load_episodes(it, ph))
                           for ph in phases]
    elif name == "evaluate":
        path = store.evaluation_dir / f"iter-{it:06d}.parquet"
        out["before"] = _guarded(store, f"evaluation of iteration {it}",
                                 lambda: pd.read_parquet(path)) if path.is_file() else None
    return out


def rerun_stage(name: str, run_id: str, iteration: int, phase: str = "pre") -> dict:
    if isinstance(iteration, bool) or not isinstance(iteration, int) or iteration < 0:
        raise UsageError(f"--iteration must be an integer >= 0, got {iteration!r}")
    if not isinstance(run_id, str) or not RUN_ID.fullmatch(run_id):
        raise UsageError(f"--run {run_id!r} is not a run id (letters, digits, '-' and '_'; "
                         "the MLflow run id that `maml train` printed)")
    store = StageStore(store_root(), run_id)
    if not (store.run_dir / "config.json").is_file():
        raise UsageError(f"run {run_id!r} is not in the stage store {str(store.root)!r}")
    data = _guarded(store, "config", store.load_config)
    config = load_run_config(data=data)
    learner = MetaLearner(config)
    try:
        if not learner.rl and name != "evaluate":
            raise UsageError(f"stage {name} applies to RL families; {config.task.family} is "
                             "supervised")
        phases = _phases(learner)
        allowed = {"collect_rollouts": phases, "adapt": phases[:-1]}.get(name, ["pre"])
        if phase not in allowed:
            raise UsageError(
                f"--phase {phase!r} is not a phase of stage {name} in run {run_id} (its "
                f"phases: {', '.join(allowed)})" if name in ("collect_rollouts", "adapt") else
                f"stage {name} has no phases; leave out --phase {phase}")
        inputs = _inputs(store, name, iteration, phase, phases)
    except BaseException:
        learner.close()
        raise
    ctx = PipelineContext(learner, store, config)
    stages = configured(config)
    identical: bool | None = None
    output = ""
    if name == "sample_tasks":
        before = inputs.get("before")
        after = stages["sample_tasks"](ctx, iteration)
        identical = None if before is None else bool(before.equals(after))
        output = str(store.iteration_dir(iteration) / "tasks.parquet")
    elif name in ("collect_rollouts", "adapt", "meta_update"):
        out_name = _output_name(name, phase, phases)
        before = inputs["before"]
        theta, record = inputs["theta"], inputs["record"]
        if name == "collect_rollouts":
            stages["collect_rollouts"](ctx, iteration, phase, inputs["params"], inputs["tasks"])
        elif name == "adapt":
            stages["adapt"](ctx, iteration, theta, inputs["episodes"], phases.index(phase),
                            inputs["phi"])
        else:
            pre, *later, post = inputs["episodes"]
            stages["meta_update"](ctx, iteration, theta, record, pre, post, tuple(later))
        after = _digest(store, iteration, out_name)
        identical = None if before is None else before == after
        output = str(store.iteration_dir(iteration) / f"{out_name}.safetensors")
    elif name == "evaluate":
        theta = inputs["theta"]
        learner.load_params({k: v for k, v in theta.items() if not k.startswith("optim/")},
                            "stored meta-parameters")
        path = store.evaluation_dir / f"iter-{iteration:06d}.parquet"
        before = inputs["before"]
        after = stages["evaluate"](ctx, iteration, learner.held_out_tasks())
        identical = None if before is None else bool(before.equals(after))
        output = str(path)
    elif name == "checkpoint":
        theta, record = inputs["theta"], inputs["record"]
        from flows.stages import load_learner_state

        load_learner_state(learner, theta, record)
        learner.iteration = iteration
        output = str(stages["checkpoint"](ctx, iteration))
    learner.close()
    verdict = {None: "no stored output to compare", True: "identical", False: "differs"}
    try:
        tracking.load_tracking_config().setup()
        key = f"{name}.{phase}" if name in ("collect_rollouts", "adapt") else name
        tracking.set_tags(run_id, {f"maml.stage_rerun.{key}.{iteration}":
                                   verdict[identical]})
    except tracking.TrackingError:
        pass  # the run may live in another tracking store; the report below still says it
    return {"stage": name, "run": run_id, "iteration": iteration, "phase": phase,
            "output": output, "identical_to_stored": identical,
            "seconds": dict(ctx.timings)}
