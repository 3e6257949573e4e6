"""``maml evaluate --set``: a model evaluated under a changed protocol.

An override changes the model's recorded config for the evaluation only: a longer inner step
changes what one step does and nothing before it; a related task family (an ant-dir model on
ant-vel's tasks) is paid by that family's reward. Bad overrides are refused in
``test_bad_input.py``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parent.parent
NAV = str(ROOT / "configs" / "navigation2d.yaml")
TINY = ["iterations=2", "meta_batch_size=4", "episodes_per_task=4", "task.horizon=20",
        "policy.hidden_sizes=[16, 16]", "evaluation.every=0", "evaluation.steps=1",
        "evaluation.num_tasks=6", "checkpoint_every=1", "pipeline.register_model=false",
        "pipeline.retry_delay_seconds=0"]
# An ant-dir model of ours, exported with the repository (rllab ant, 1270 meta-iterations).
ANT_DIR_EXPORT = ROOT / "docs" / "results" / "runs" / "1a8c0542f68f4449b130e8bc119f86d1"


@pytest.fixture(scope="module")
def nav_checkpoints(pipeline):
    from flows.training import meta_train

    result = meta_train(config_path=NAV, overrides=TINY, run_name="evaluate-overrides")
    return str(Path(result["store"]) / "checkpoints")


def _returns(result) -> pd.DataFrame:
    return result["curve"].pivot(index="task_id", columns="step", values="return")


def test_a_longer_inner_step_changes_the_adapted_return_only(nav_checkpoints):
    from mlflow import MlflowClient

    from flows.evaluation import evaluate_model, load_model

    plain = evaluate_model(nav_checkpoints, steps=1, log=False)
    longer = evaluate_model(nav_checkpoints, steps=1, overrides=["inner.step_size=0.5"])

    before, after = _returns(plain), _returns(longer)
    # Step 0 samples with the same seeds and the same parameters: identical, task by task.
    np.testing.assert_array_equal(before[0].to_numpy(), after[0].to_numpy())
    # The adapted policy moved five times as far: other returns after the step.
    assert not np.allclose(before[1].to_numpy(), after[1].to_numpy())
    # ... exactly those of a learner whose config had that step.
    learner, _ = load_model(nav_checkpoints)
    try:
        learner.config.inner.step_size = 0.5
        by_hand = learner.evaluate(learner.held_out_tasks(), 1)
    finally:
        learner.close()
    np.testing.assert_allclose(after[1].to_numpy(),
                               by_hand.pivot(index="task_id", columns="step",
                                             values="return")[1].to_numpy(), rtol=0, atol=1e-6)
    run = MlflowClient().get_run(longer["run_id"])
    assert run.data.params["overrides"] == "inner.step_size=0.5"
    # The protocol it applied is recorded with its defaults resolved, not only what was asked.
    expected = {"steps": "1", "seed": str(learner.config.evaluation.seed), "step_size": "0.5",
                "episodes_per_task": "4", "later_step_scale": "0.5"}
    assert {k: run.data.params[k] for k in expected} == expected
    assert run.data.tags["maml.evaluated_model"] == nav_checkpoints


def test_an_ant_dir_model_adapts_on_ant_vel_tasks_paid_by_the_velocity_reward(tmp_path):
    from flows.evaluation import evaluate_model

    horizon = 10
    overrides = ["task.family=ant-vel", f"task.horizon={horizon}"]
    results = {}
    for target in (0.0, 3.0):
        tasks = tmp_path / f"v{target}.csv"
        tasks.write_text(f"task_id,velocity\n0,{target}\n")
        results[target] = evaluate_model(str(ANT_DIR_EXPORT), str(tasks), steps=1, seed=5,
                                          episodes_per_task=2, log=False, overrides=overrides)
    summary = pd.DataFrame(results[3.0]["summary"]).set_index("step")
    assert summary.loc[1, "paper_mean_return"] == pytest.approx(96.74)  # ant-vel's paper row
    # Same task id and seed: the same trajectories before adaptation, paid 1 - |v - v*| each
    # step. |v - 3| - |v - 0| = 3 - 2 max(v, 0) for v <= 3: the return for target 0 exceeds
    # that for target 3 by 3 per step, less twice the forward speed; the ant-dir model stands
    # (it walks only after its step), so nearly 3 per step.
    gap = (_returns(results[0.0])[0] - _returns(results[3.0])[0]).iloc[0]
    assert 0.7 * 3 * horizon < gap <= 3 * horizon + 1e-4
