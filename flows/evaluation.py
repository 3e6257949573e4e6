"""The ``evaluate`` flow: the adaptation curve of any model on any task set."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from prefect import flow, runtime

from flows import plots, tracking
from flows.config import load_run_config
from flows.errors import UsageError
from flows.policy_model import PolicyFileError, find_policy_files
from flows.runrecord import MODEL_DIR, ExportedRecord, is_export
from flows.settings import deprioritize_local_server
from maml_core.checkpoint import CheckpointError, load_checkpoint
from maml_core.config import ConfigError, parse_overrides
from maml_core.tasksets import load_task_set
from maml_core.trainer import MetaLearner, summary_table

_FILE_SUFFIXES = (".json", ".safetensors", ".pkl", ".pickle", ".pt", ".pth", ".ckpt")
_STRUCTURE = ("class", "input_dim", "output_dim", "hidden_sizes", "activation")


# What an evaluation may change in a model's recorded config (``maml evaluate --set``): what the
# adaptation and its measurement read. ``policy.*`` is the network the model's parameters fill;
# the other keys configure a training, which an evaluation does not run.
EVALUATION_KEYS = ("task.*", "inner.step_size", "evaluation.*", "episodes_per_task", "gamma",
                   "gae_lambda", "normalize_advantages", "k_shot", "device", "dtype")


def check_evaluation_overrides(overrides: list[str] | None) -> list[tuple[str, object]]:
    """The ``key=value`` overrides of an evaluation, parsed; ``UsageError`` for a key that an
    evaluation cannot change (before anything is loaded)."""
    try:
        parsed = parse_overrides(overrides)
    except ConfigError as exc:
        raise UsageError(f"--set: {exc}") from None
    for key, _ in parsed:
        if any(key == k or (k.endswith("*") and key.startswith(k[:-1]))
               for k in EVALUATION_KEYS):
            continue
        why = ("the policy's network is the model's" if key.split(".")[0] == "policy"
               else "it configures training, which an evaluation does not run")
        raise UsageError(f"--set {key}: an evaluation cannot change it ({why}); it can change "
                         f"{', '.join(EVALUATION_KEYS)}")
    return parsed


def _learner_for(config: object, source: str, architecture: object = None,
                 overrides: list[str] | None = None) -> tuple[MetaLearner, dict]:
    """A learner built from a model's or checkpoint's recorded config (checked first), with
    an evaluation's ``overrides`` applied (``check_evaluation_overrides``), and what the
    overrides changed (``recorded_family``: the model's family, where they change it)."""
    changed: dict = {}
    if not isinstance(config, dict):
        raise CheckpointError(f"{source} records no config (a mapping of keys to values)")
    try:
        run_config = load_run_config(data=config)
    except ConfigError as exc:
        raise CheckpointError(f"{source} records an unusable config: {exc}") from None
    parsed = dict(parse_overrides(overrides))  # checked by load_model before any loading
    if parsed:
        effective = list(overrides)
        if ("task.family" in parsed and parsed["task.family"] != run_config.task.family
                and "task.test_tasks" not in parsed):
            # The recorded held-out set is the other family's: tasks must be given.
            effective.append("task.test_tasks=null")
            changed["recorded_family"] = run_config.task.family
        try:
            run_config = load_run_config(data=config, overrides=effective)
        except ConfigError as exc:
            hint = ("; the recorded task.options are the other family's: replace them whole, "
                    "e.g. --set 'task.options={}'" if "task.family" in parsed else "")
            raise UsageError(f"--set: {exc}{hint}") from None
        if run_config.inner.learn_step_size and "inner.step_size" in parsed:
            raise UsageError(f"--set inner.step_size: {source} learned its own step sizes "
                             "(Meta-SGD, inner.learn_step_size), which take the place of "
                             "inner.step_size; evaluate it without that override")
    learner = MetaLearner(run_config)
    if isinstance(architecture, dict):
        built = learner.policy.architecture()
        wrong = {k: architecture[k] for k in _STRUCTURE
                 if k in architecture and architecture[k] != built.get(k)}
        if wrong:
            learner.close()
            expected = {k: built.get(k) for k in wrong}
            if parsed:
                raise UsageError(f"--set {' '.join(overrides)}: {source}'s policy ({wrong}) "
                                 f"does not fit the task it gives ({expected}); override "
                                 "only to a task with the same observation and action sizes")
            raise CheckpointError(f"{source} was saved for another policy architecture "
                                  f"({wrong}) than its config builds ({expected})")
    return learner, changed


def _holds_policy(path: Path) -> bool:
    try:
        find_policy_files(path)
    except PolicyFileError:
        return False
    return path.is_dir()


def load_model(model_ref: str, overrides: list[str] | None = None) -> tuple[MetaLearner, dict]:
    """A learner holding the parameters of ``model_ref``: a registry reference
    (``models:/name@alias``, ``models:/name/3``, ``champion``...), a checkpoint file or
    directory (``iter-000050.json`` / a run's ``checkpoints/``), or a policy folder (an
    exported run's ``model/``, or the exported run's folder itself). ``overrides``
    (``key=value``, ``EVALUATION_KEYS`` only) change the recorded config it is evaluated with:
    e.g. ``inner.step_size=0.2``, or ``task.family=ant-vel`` for an ant-dir model."""
    path = Path(model_ref)
    export = ExportedRecord(path) if is_export(path) else None
    if export is not None:
        path = path / MODEL_DIR
        model_ref = str(path)
        if not path.is_dir():
            raise UsageError(f"the exported run {str(export.folder)!r} has no {MODEL_DIR}/: the "
                             "run had logged neither a policy nor a checkpoint when it was "
                             "exported; export it again once it has, or evaluate another run")
    check_evaluation_overrides(overrides)
    learner, info = _load_learner(model_ref, path, export, overrides)
    if export is not None:
        info.setdefault("run_id", export.info.run_id)
    return learner, info


def _with_task_copy(config: object, export: ExportedRecord | None) -> object:
    """An exported run's config names its task file by a path of the machine that made it;
    where that path holds no file here, the export's copy of the file stands in."""
    task = config.get("task") if isinstance(config, dict) else None
    copy = export.task_file() if export is not None else None
    if (not isinstance(task, dict) or not task.get("test_tasks") or copy is None
            or Path(task["test_tasks"]).is_file()):
        return config
    return {**config, "task": {**task, "test_tasks": str(copy)}}


def _load_learner(model_ref: str, path: Path, export: ExportedRecord | None,
                  overrides: list[str] | None) -> tuple[MetaLearner, dict]:
    if not path.exists() and (path.is_absolute() or path.suffix.lower() in _FILE_SUFFIXES):
        raise CheckpointError(f"checkpoint {model_ref!r} does not exist; give a checkpoint's "
                              "iter-NNNNNN.json or its folder, or a model reference like "
                              "models:/NAME@ALIAS")
    if path.exists() and not _holds_policy(path):
        source = f"checkpoint {model_ref!r}"
        manifest, params, _ = load_checkpoint(path)
        learner, changed = _learner_for(_with_task_copy(manifest.get("config"), export),
                                        source, manifest.get("architecture"), overrides)
        try:
            learner.load_params(params, source)
        except BaseException:
            learner.close()
            raise
        return learner, {"source": str(path), "iteration": manifest["iteration"], **changed}
    _, params, config, info = tracking.load_policy(model_ref)
    source = f"model {model_ref!r}"
    learner, changed = _learner_for(_with_task_copy(config, export), source,
                                    info.get("architecture"), overrides)
    try:
        learner.load_model_params(params, source)
    except BaseException:
        learner.close()
        raise
    return learner, {**info, **changed}


def evaluation_tasks(learner: MetaLearner, info: dict, tasks_path: str | None = None
                     ) -> pd.DataFrame:
    """The task set an evaluation adapts on: the file at ``tasks_path``, else the model's
    held-out set; ``UsageError`` where ``--set task.family`` left the model with none
    (``info``: ``load_model``'s)."""
    if tasks_path:
        return load_task_set(tasks_path, learner.family)
    task = learner.config.task
    if info.get("recorded_family"):  # set only where the family changed and no tasks were named
        suggestion = Path("data") / f"{task.family}_test_tasks.csv"
        example = f" (e.g. {suggestion})" if suggestion.is_file() else ""
        raise UsageError(f"--set task.family={task.family}: the model's held-out tasks are "
                         f"another family's; give {task.family}'s with --tasks FILE{example} "
                         "or --set task.test_tasks=FILE")
    return learner.held_out_tasks()


def check_evaluation_inputs(model_ref: str, tasks_path: str | None = None, steps: int = 3,
                            seed: int | None = None, episodes_per_task: int | None = None,
                            overrides: list[str] | None = None) -> None:
    """Fail fast, before a flow or an MLflow run starts, on what ``evaluate_model`` would
    reject: bad numbers, bad overrides, a model that does not load or fit, a task set that
    does not fit."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise UsageError(f"--steps must be an integer >= 0 (adaptation steps), got {steps!r}")
    if episodes_per_task is not None and (isinstance(episodes_per_task, bool)
                                          or not isinstance(episodes_per_task, int)
                                          or episodes_per_task < 1):
        raise UsageError(f"--episodes must be an integer >= 1, got {episodes_per_task!r}")
    learner, info = load_model(model_ref, overrides)
    try:
        evaluation_tasks(learner, info, tasks_path)
    finally:
        learner.close()


def compare_with_paper(summary: pd.DataFrame, family: str) -> pd.DataFrame:
    """Our mean return per step beside the paper's MAML row (where the paper covers it)."""
    paper = plots.paper_rows(family)
    paper = paper[paper["method"] == "maml"][["gradient_steps", "mean_return", "ci95"]]
    paper = paper.rename(columns={"gradient_steps": "step", "mean_return": "paper_mean_return",
                                  "ci95": "paper_ci95"})
    if "mean_return" not in summary:
        return summary
    return summary.merge(paper, on="step", how="left")


@flow(name="evaluate", persist_result=False)
def evaluate_model(model_ref: str, tasks_path: str | None = None, steps: int = 3,
                   seed: int | None = None, episodes_per_task: int | None = None,
                   log: bool = True, overrides: list[str] | None = None) -> dict:
    """Evaluate ``model_ref`` on the task set at ``tasks_path`` (default: the config's
    held-out set) after 0..``steps`` adaptation steps; logs an MLflow run. ``overrides``
    (``key=value``) change the model's recorded config for this evaluation
    (``EVALUATION_KEYS``), e.g. its inner step size or its task family."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise UsageError(f"steps must be an integer >= 0 (adaptation steps), got {steps!r}")
    deprioritize_local_server()
    learner, info = load_model(model_ref, overrides)
    try:
        return _evaluate(learner, info, model_ref, tasks_path, steps, seed, episodes_per_task,
                         log, overrides or [])
    finally:
        learner.close()


def _evaluate(learner: MetaLearner, info: dict, model_ref: str, tasks_path: str | None,
              steps: int, seed: int | None, episodes_per_task: int | None, log: bool,
              overrides: list[str]) -> dict:
    family = learner.config.task.family
    tasks = evaluation_tasks(learner, info, tasks_path)
    curve = learner.evaluate(tasks, steps, seed=seed, episodes_per_task=episodes_per_task)
    summary = compare_with_paper(summary_table(curve), family)
    result = {"model": model_ref, "summary": summary.to_dict(orient="records"),
              "curve": curve, "run_id": None, "overrides": overrides}
    if not log:
        return result
    tcfg = tracking.load_tracking_config()
    tcfg.setup()
    tags = {"maml.kind": "evaluation", "maml.evaluated_model": model_ref,
            "prefect.flow_run_id": str(runtime.flow_run.id or "")}
    if info.get("run_id"):
        tags["mlflow.parentRunId"] = info["run_id"]
    run_id = tracking.start_run(tcfg, f"evaluate-{family}", tags)
    # The protocol as it was applied (defaults resolved), not only as it was asked for.
    params = {"model": model_ref, "tasks": tasks_path or "held-out",
              **learner.evaluation_protocol(steps, seed, episodes_per_task)}
    if overrides:
        params["overrides"] = " ".join(overrides)
    tracking.log_params(run_id, params)
    tracking.log_dataset(run_id, tasks, name=Path(tasks_path).stem if tasks_path
                         else f"{family}-held-out",
                         source=tasks_path or "seeded draw", context="evaluation")
    value = "mean_return" if "mean_return" in summary else "mean_mse"
    for row in summary.itertuples():
        tracking.log_metrics(run_id, {f"eval_{value}": float(getattr(row, value))},
                             int(row.step))
    title = f"{model_ref} on {tasks_path or 'held-out'}"
    if overrides:
        title += f" ({' '.join(overrides)})"
    tracking.log_evaluation(run_id, curve, summary,
                            plots.adaptation_curve(summary, family, title))
    tracking.end_run(run_id)
    result["run_id"] = run_id
    return result
