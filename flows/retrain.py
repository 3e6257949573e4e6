"""The ``retrain`` flow: the scheduled job that trains a challenger and promotes it if better.

Warm start from the registered ``champion`` (from scratch when there is none), train, evaluate
challenger and champion on the same frozen task set with the same seeds, and move the
``champion`` alias only if the challenger's mean return after ``retrain.steps`` adaptation
steps beats the champion's by more than ``retrain.margin``. The decision, both scores and the
reason go to MLflow (tags, metrics and ``decision.json`` on the retrain run) and to a Prefect
markdown artifact.
"""

from __future__ import annotations

import json

from prefect import flow, runtime
from prefect.artifacts import create_markdown_artifact

from flows import tracking
from flows.config import load_run_config
from flows.evaluation import evaluate_model
from flows.training import meta_train


def decide(challenger: float, champion: float | None, margin: float, higher_is_better: bool
           ) -> tuple[bool, str]:
    if champion is None:
        return True, "no champion yet: the first trained model becomes champion"
    gain = (challenger - champion) if higher_is_better else (champion - challenger)
    if gain > margin:
        return True, f"challenger beats champion by {gain:.4g} (> margin {margin:g})"
    return False, f"challenger does not beat champion by more than {margin:g} (gain {gain:.4g})"


@flow(name="retrain", persist_result=False)
def retrain(config_path: str | None = None, overrides: list[str] | None = None,
            config_data: dict | None = None, progress: bool | None = None) -> dict:
    config = load_run_config(config_path, overrides, data=config_data)
    tcfg = tracking.load_tracking_config()
    tcfg.setup()
    name, aliases = tcfg.registered_model_name, tcfg.aliases
    champion = tracking.get_alias_version(name, aliases.champion)
    champion_ref = f"models:/{name}/{champion.version}" if champion else None
    trained = meta_train.fn(config_path=None, overrides=None,
                            config_data=config.model_dump(mode="json"),
                            init_model=champion_ref, run_name="retrain-challenger",
                            progress=progress)
    challenger_ref = f"models:/{name}/{trained['model_version']}"
    tracking.set_alias(name, aliases.challenger, trained["model_version"])
    steps = config.retrain.steps
    tasks = config.task.test_tasks
    ev = config.evaluation
    kwargs = {"tasks_path": tasks, "steps": steps, "seed": ev.seed, "log": False}
    challenger_eval = evaluate_model.fn(challenger_ref, **kwargs)
    score_key = "mean_return" if "mean_return" in challenger_eval["summary"][0] else "mean_mse"
    challenger_score = challenger_eval["summary"][steps][score_key]
    champion_score = None
    if champion_ref:
        champion_score = evaluate_model.fn(champion_ref, **kwargs)["summary"][steps][score_key]
    promote, reason = decide(challenger_score, champion_score, config.retrain.margin,
                             higher_is_better=score_key == "mean_return")
    if promote:
        tracking.set_alias(name, aliases.champion, trained["model_version"])
    decision = {"promoted": promote, "reason": reason, "metric": f"{score_key}_step_{steps}",
                "challenger_version": trained["model_version"],
                "challenger_score": challenger_score,
                "champion_version": champion.version if champion else None,
                "champion_score": champion_score, "margin": config.retrain.margin,
                "training_run_id": trained["run_id"]}
    run_id = tracking.start_run(tcfg, "retrain-decision",
                                {"maml.kind": "retrain-decision",
                                 "maml.promoted": str(promote),
                                 "prefect.flow_run_id": str(runtime.flow_run.id or ""),
                                 "mlflow.parentRunId": trained["run_id"]})
    tracking.log_metrics(run_id, {k: v for k, v in (("challenger_score", challenger_score),
                                                     ("champion_score", champion_score))
                                  if v is not None}, 0)
    tracking.log_text(run_id, json.dumps(decision, indent=1), "decision.json")
    tracking.set_tags(trained["run_id"], {"maml.retrain_decision": reason,
                                          "maml.promoted": str(promote)})
    tracking.end_run(run_id)
    create_markdown_artifact(
        key="retrain-decision",
        markdown=_decision_markdown(decision),
        description="challenger vs champion")
    decision["decision_run_id"] = run_id
    return decision


def _decision_markdown(d: dict) -> str:
    champion = ("none" if d["champion_version"] is None
                else f"version {d['champion_version']}: {d['champion_score']:.4g}")
    return (f"# Retrain decision: {'promoted' if d['promoted'] else 'kept champion'}\n\n"
            f"| model | {d['metric']} |\n|---|---|\n"
            f"| challenger (version {d['challenger_version']}) | {d['challenger_score']:.4g} |\n"
            f"| champion | {champion} |\n\n{d['reason']}\n")
