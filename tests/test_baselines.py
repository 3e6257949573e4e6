"""The paper's baselines made with our code: the oracle against a hand computation, the
pretrained policy learning, the random init, the ``baseline`` flow's MLflow run, bad input."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest
import torch

from maml_core import baselines
from maml_core.config import build_config
from maml_core.trainer import MetaLearner

ROOT = Path(__file__).resolve().parent.parent
NAV = str(ROOT / "configs" / "navigation2d.yaml")
SINUSOID = str(ROOT / "configs" / "sinusoid.yaml")
TINY = ["iterations=2", "meta_batch_size=4", "episodes_per_task=4", "evaluation.every=0",
        "evaluation.steps=2", "evaluation.episodes_per_task=4", "task.test_tasks=null",
        "evaluation.num_tasks=6", "pipeline.register_model=false",
        "policy.hidden_sizes=[16, 16]", "checkpoint_every=2", "pipeline.retry_delay_seconds=0"]


def nav_learner(**sections) -> MetaLearner:
    data = {"seed": 0, "meta_batch_size": 10, "episodes_per_task": 10,
            "task": {"family": "navigation2d", "horizon": 100},
            "policy": {"hidden_sizes": [32, 32]},
            "evaluation": {"num_tasks": 10, "episodes_per_task": 10, "steps": 2}}
    for key, value in sections.items():
        data[key] = {**data.get(key, {}), **value}
    return MetaLearner(build_config(data))


# ------------------------------------------------------------------------------- maml_core
@pytest.mark.parametrize("options", [{}, {"terminate_at_goal": False},
                                     {"normalized_actions": True}])
def test_oracle_return_equals_hand_computation(options):
    import inspect

    from maml_core.tasks.navigation import Navigation2D

    if not set(options) <= set(inspect.signature(Navigation2D).parameters):
        pytest.skip(f"navigation2d has no option {sorted(options)}")
    learner = nav_learner(task={"horizon": 10, "options": options},
                          evaluation={"episodes_per_task": 3, "steps": 2})
    tasks = pd.DataFrame({"task_id": [7, 8], "goal_x": [0.25, -0.3], "goal_y": [0.0, 0.15]})
    # Goal (0.25, 0): steps of 0.1, 0.1, then 0.05 -> positions 0.1, 0.2, 0.25; the reward
    # after each move is -distance: -0.15, -0.05, -0 (then at the goal: 0 or the episode ends).
    first = -(0.15 + 0.05)
    # Goal (-0.3, 0.15): clip(goal - position) per coordinate: (-0.1, 0.1) -> (-0.1, 0.1),
    # distance sqrt(0.2^2 + 0.05^2); then (-0.1, 0.05) -> (-0.2, 0.15), distance 0.1; then
    # (-0.1, 0) -> the goal.
    second = -(math.sqrt(0.2**2 + 0.05**2) + 0.1)
    curve = baselines.oracle_curve(learner, tasks)
    assert list(curve.columns) == ["task_id", "step", "return"]
    assert sorted(curve["step"].unique()) == [0, 1, 2]
    for step in (0, 1, 2):  # the oracle does not adapt: the same value at every step
        rows = curve[curve["step"] == step].set_index("task_id")["return"]
        assert rows[7] == pytest.approx(first, abs=1e-5)
        assert rows[8] == pytest.approx(second, abs=1e-5)
    learner.close()


def test_oracle_is_for_navigation_only():
    learner = MetaLearner(build_config({"task": {"family": "sinusoid"},
                                        "meta_optimizer": {"name": "adam"}}))
    with pytest.raises(ValueError, match=r"oracle .*navigation2d.*'sinusoid'"):
        baselines.oracle_curve(learner, learner.sample_tasks(0, 3))


def test_pretrained_improves_over_its_starting_point():
    torch.set_num_threads(1)
    learner = nav_learner()
    tasks = learner.held_out_tasks()
    seen: list[dict] = []
    params = baselines.pretrained_params(learner, 10, callback=lambda it, s: seen.append(s))
    assert len(seen) == 10 and all(s["env_steps"] > 0 for s in seen)
    start = learner.evaluate(tasks, steps=0)["return"].mean()
    after = learner.evaluate(tasks, steps=0, meta_params=params)["return"].mean()
    # Typically about -67 -> -44: one policy for all goals learns to stay near the middle.
    assert after >= start + 10, (start, after)
    assert seen[-1]["pretrain_return"] > seen[0]["pretrain_return"]
    learner.close()


def test_random_init_differs_from_the_meta_learners():
    learner = nav_learner()
    fresh = baselines.random_params(learner, seed=0)
    init = learner.detached_params()
    assert fresh.keys() == init.keys()
    assert all(fresh[k].shape == init[k].shape for k in init)
    assert not torch.equal(fresh["layers.0.weight"], init["layers.0.weight"])
    again = baselines.random_params(learner, seed=0)
    assert all(torch.equal(fresh[k], again[k]) for k in fresh)  # seeded
    learner.close()


# ------------------------------------------------------------------------------- the flow
def _artifacts(client, run_id: str, path: str | None = None) -> set[str]:
    out: set[str] = set()
    for f in client.list_artifacts(run_id, path):
        out |= _artifacts(client, run_id, f.path) if f.is_dir else {f.path}
    return out


def test_baseline_flow_records_an_mlflow_run(pipeline):
    from mlflow import MlflowClient

    from flows import tracking
    from flows.baselines import baseline

    result = baseline(config_path=NAV, method="pretrained", overrides=TINY,
                      pretrain_iterations=3)
    client = MlflowClient()
    run = client.get_run(result["run_id"])
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "baseline-pretrained-navigation2d"
    tags = run.data.tags
    assert tags["maml.kind"] == "baseline"
    assert tags["maml.method"] == "pretrained"
    assert tags["maml.task_family"] == "navigation2d"
    assert tags.get("prefect.flow_run_id")
    params = run.data.params
    assert params["baseline.method"] == "pretrained"
    assert params["baseline.pretrain_iterations"] == "3"
    assert params["meta_batch_size"] == "4" and params["inner.step_size"] == "0.1"
    metrics = run.data.metrics
    for k in range(3):
        assert f"eval_return_step_{k}" in metrics
    assert metrics["train_seconds"] > 0
    assert metrics["env_steps"] == result["env_steps"] > 0
    history = client.get_metric_history(run.info.run_id, "pretrain_return")
    assert sorted(m.step for m in history) == [0, 1, 2]
    assert any(d.dataset.name == "navigation2d-held-out" for d in run.inputs.dataset_inputs)
    assert {"evaluation/per_task.csv", "evaluation/summary.csv",
            "plots/adaptation_curve.png", "config.yaml"} <= _artifacts(client, run.info.run_id)
    summary = tracking.read_table(run.info.run_id, "evaluation/summary.csv")
    assert list(summary.columns) == ["step", "mean_return", "ci95", "n_tasks"]
    expected = pd.DataFrame(result["summary"])
    pd.testing.assert_frame_equal(summary, expected, check_dtype=False)
    assert summary["n_tasks"].tolist() == [6, 6, 6]
    per_task = tracking.read_table(run.info.run_id, "evaluation/per_task.csv")
    assert len(per_task) == 6 * 3
    for k in range(3):
        assert metrics[f"eval_return_step_{k}"] == pytest.approx(summary["mean_return"][k])


# ------------------------------------------------------------------------------- bad input
def _run_count() -> int:
    from flows import tracking

    tracking.load_tracking_config().setup()
    return len(tracking.search_runs())


@pytest.mark.parametrize("argv,expected", [
    (["baseline", NAV, "--method", "best"], "invalid choice: 'best'"),
    (["baseline", SINUSOID, "--method", "oracle"], "--method oracle needs a task family"),
    (["baseline", NAV, "--method", "random", "--pretrain-iterations", "5"],
     "--pretrain-iterations applies to --method pretrained only"),
    (["baseline", NAV, "--method", "pretrained", "--pretrain-iterations", "0"],
     "--pretrain-iterations must be an integer >= 1"),
    (["baseline", "no/such.yaml", "--method", "random"], "config file 'no/such.yaml' does not"),
    (["baseline", NAV, "--method", "random", "--set", "evaluation.stepz=2"],
     "evaluation.stepz: unknown key"),
])
def test_bad_baseline_input_is_one_line_before_any_run(pipeline, capsys, argv, expected):
    from flows.cli import main

    before = _run_count()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("maml"), err
    assert expected in err, err
    assert _run_count() == before


def test_flow_refuses_an_unknown_method(pipeline):
    from flows.baselines import check_baseline_inputs
    from flows.errors import UsageError

    with pytest.raises(UsageError, match="unknown baseline method 'best'; choose one of "
                       "random, pretrained, oracle"):
        check_baseline_inputs(NAV, "best")
