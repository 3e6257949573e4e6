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
from maml_core.checkpoint import CheckpointError, load_checkpoint
from maml_core.config import ConfigError
from maml_core.tasksets import load_task_set
from maml_core.trainer import MetaLearner, summary_table

_FILE_SUFFIXES = (".json", ".safetensors", ".pkl", ".pickle", ".pt", ".pth", ".ckpt")
_STRUCTURE = ("class", "input_dim", "output_dim", "hidden_sizes", "activation")


def _learner_for(config: object, source: str, architecture: object = None) -> MetaLearner:
    """A learner built from a model's or checkpoint's recorded config (checked first)."""
    if not isinstance(config, dict):
        raise CheckpointError(f"{source} records no config (a mapping of keys to values)")
    try:
        learner = MetaLearner(load_run_config(data=config))
    except ConfigError as exc:
        raise CheckpointError(f"{source} records an unusable config: {exc}") from None
    if isinstance(architecture, dict):
        built = learner.policy.architecture()
        wrong = {k: architecture[k] for k in _STRUCTURE
                 if k in architecture and architecture[k] != built.get(k)}
        if wrong:
            learner.close()
            expected = {k: built.get(k) for k in wrong}
            raise CheckpointError(f"{source} was saved for another policy architecture "
                                  f"({wrong}) than its config builds ({expected})")
    return learner


def _holds_policy(path: Path) -> bool:
    try:
        find_policy_files(path)
    except PolicyFileError:
        return False
    return path.is_dir()


def load_model(model_ref: str) -> tuple[MetaLearner, dict]:
    """A learner holding the parameters of ``model_ref``: a registry reference
    (``models:/name@alias``, ``models:/name/3``, ``champion``...), a checkpoint file or
    directory (``iter-000050.json`` / a run's ``checkpoints/``), or a policy folder (an
    exported run's ``model/``, or the exported run's folder itself)."""
    path = Path(model_ref)
    export = ExportedRecord(path) if is_export(path) else None
    if export is not None:
        path = path / MODEL_DIR
        model_ref = str(path)
        if not path.is_dir():
            raise UsageError(f"the exported run {str(export.folder)!r} has no {MODEL_DIR}/: the "
                             "run had logged neither a policy nor a checkpoint when it was "
                             "exported; export it again once it has, or evaluate another run")
    learner, info = _load_learner(model_ref, path, export)
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


def _load_learner(model_ref: str, path: Path, export: ExportedRecord | None
                  ) -> tuple[MetaLearner, dict]:
    if not path.exists() and (path.is_absolute() or path.suffix.lower() in _FILE_SUFFIXES):
        raise CheckpointError(f"checkpoint {model_ref!r} does not exist; give a checkpoint's "
                              "iter-NNNNNN.json or its folder, or a model reference like "
                              "models:/NAME@ALIAS")
    if path.exists() and not _holds_policy(path):
        source = f"checkpoint {model_ref!r}"
        manifest, params, _ = load_checkpoint(path)
        learner = _learner_for(_with_task_copy(manifest.get("config"), export), source,
                               manifest.get("architecture"))
        try:
            learner.load_params(params, source)
        except BaseException:
            learner.close()
            raise
        return learner, {"source": str(path), "iteration": manifest["iteration"]}
    _, params, config, info = tracking.load_policy(model_ref)
    source = f"model {model_ref!r}"
    learner = _learner_for(_with_task_copy(config, export), source, info.get("architecture"))
    try:
        learner.load_model_params(params, source)
    except BaseException:
        learner.close()
        raise
    return learner, info


def check_evaluation_inputs(model_ref: str, tasks_path: str | None = None, steps: int = 3,
                            seed: int | None = None, episodes_per_task: int | None = None
                            ) -> None:
    """Fail fast, before a flow or an MLflow run starts, on what ``evaluate_model`` would
    reject: bad numbers, a model that does not load or fit, a task set that does not fit."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise UsageError(f"--steps must be an integer >= 0 (adaptation steps), got {steps!r}")
    if episodes_per_task is not None and (isinstance(episodes_per_task, bool)
                                          or not isinstance(episodes_per_task, int)
                                          or episodes_per_task < 1):
        raise UsageError(f"--episodes must be an integer >= 1, got {episodes_per_task!r}")
    learner, _ = load_model(model_ref)
    try:
        if tasks_path:
            load_task_set(tasks_path, learner.family)
        else:
            learner.held_out_tasks()
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
                   log: bool = True) -> dict:
    """Evaluate ``model_ref`` on the task set at ``tasks_path`` (default: the config's
    held-out set) after 0..``steps`` adaptation steps; logs an MLflow run."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise UsageError(f"steps must be an integer >= 0 (adaptation steps), got {steps!r}")
    learner, info = load_model(model_ref)
    tasks = (load_task_set(tasks_path, learner.family) if tasks_path
             else learner.held_out_tasks())
    curve = learner.evaluate(tasks, steps, seed=seed, episodes_per_task=episodes_per_task)
    summary = compare_with_paper(summary_table(curve), learner.config.task.family)
    result = {"model": model_ref, "summary": summary.to_dict(orient="records"),
              "curve": curve, "run_id": None}
    if log:
        tcfg = tracking.load_tracking_config()
        tcfg.setup()
        tags = {"maml.kind": "evaluation", "maml.evaluated_model": model_ref,
                "prefect.flow_run_id": str(runtime.flow_run.id or "")}
        if info.get("run_id"):
            tags["mlflow.parentRunId"] = info["run_id"]
        run_id = tracking.start_run(tcfg, f"evaluate-{learner.config.task.family}", tags)
        tracking.log_params(run_id, {"model": model_ref, "tasks": tasks_path or "held-out",
                                     "steps": steps, "seed": seed})
        tracking.log_dataset(run_id, tasks, name=Path(tasks_path).stem if tasks_path
                             else f"{learner.config.task.family}-held-out",
                             source=tasks_path or "seeded draw", context="evaluation")
        value = "mean_return" if "mean_return" in summary else "mean_mse"
        for row in summary.itertuples():
            tracking.log_metrics(run_id, {f"eval_{value}": float(getattr(row, value))},
                                 int(row.step))
        tracking.log_evaluation(run_id, curve, summary, plots.adaptation_curve(
            summary, learner.config.task.family, f"{model_ref} on {tasks_path or 'held-out'}"))
        tracking.end_run(run_id)
        result["run_id"] = run_id
    learner.close()
    return result
