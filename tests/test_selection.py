"""Model selection on validation tasks (``evaluation.validation_tasks``): the score, the
choice, the selected model's checkpoint, registration and held-out evaluation, and resume."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
CONFIG = str(ROOT / "configs" / "navigation2d.yaml")
# Adam with a step this large makes navigation2d's policy worse again after a few
# meta-iterations (validation scores about -49, -38, -81, -57 at iterations 2, 4, 6, 8 on
# the machines this was written on), so the best validated model is not the last one.
DEGRADING = ["meta_batch_size=4", "episodes_per_task=5", "evaluation.every=2",
             "evaluation.steps=1", "evaluation.episodes_per_task=5",
             "evaluation.validation_tasks=4", "checkpoint_every=100",
             "meta_optimizer.name=adam", "meta_optimizer.lr=0.1",
             "pipeline.retry_delay_seconds=0"]


def test_selection_score_by_hand():
    from maml_core.evaluation import selection_score

    curve = pd.DataFrame({"task_id": [0, 1] * 3, "step": [0, 0, 1, 1, 2, 2],
                          "return": [-9.0, -7.0, -4.0, -2.0, -1.0, 0.0]})
    assert selection_score(curve, 1) == pytest.approx(-3.0)
    assert selection_score(curve, 2) == pytest.approx((-3.0 - 0.5) / 2)
    mse = curve.rename(columns={"return": "mse"}).assign(mse=lambda d: -d["mse"])
    assert selection_score(mse, 2) == pytest.approx((-3.0 - 0.5) / 2)
    with pytest.raises(ValueError, match=r"scores 1\.\.3"):
        selection_score(curve, 3)
    with pytest.raises(ValueError, match="at least one adaptation step"):
        selection_score(curve, 0)


def test_selection_record_survives_a_resume_and_prefers_the_earliest_tie(tmp_path):
    from flows.store import StageStore
    from flows.training import ModelSelection

    store = StageStore(tmp_path, "run")
    store.run_dir.mkdir(parents=True)
    sel = ModelSelection(store, {"select_steps": 2})
    assert sel.best() is None
    for it, score in ((10, -5.0), (20, -3.0), (30, -3.0), (40, -1.0)):
        sel.add(it, score)
    assert sel.best() == 40
    # resumed from the checkpoint at 30: the score at 40 is validated again later
    again = ModelSelection.load(store, {"select_steps": 2}, up_to=30)
    assert again.scores == {10: -5.0, 20: -3.0, 30: -3.0}
    assert again.best() == 20
    assert again.table()["selected"].tolist() == [False, True, False]
    # a diverged score (NaN, infinite) never wins; with no finite one, nothing is selected
    again.add(40, float("nan"))
    again.add(50, float("inf"))
    assert again.best() == 20
    assert ModelSelection(store, {"select_steps": 2}, {5: float("nan")}).best() is None


def test_resume_refuses_other_later_step_sizes_even_against_an_older_record(tmp_path):
    """A record that predates ``evaluation.later_step_scale`` was scored with the paper's
    alpha / 2, so only a resume at 0.5 may go on adding scores to it."""
    from flows.store import StageStore
    from flows.training import ModelSelection
    from maml_core.config import ConfigError, build_config

    store = StageStore(tmp_path, "run")
    store.run_dir.mkdir(parents=True)
    old = {"validation_tasks": 4, "select_steps": 2, "seed": 1234, "episodes_per_task": None}
    ModelSelection(store, old).add(10, -5.0)

    def config(scale):
        return build_config({"evaluation": {"validation_tasks": 4, "select_steps": 2,
                                            "later_step_scale": scale}})

    ModelSelection.check_resume(store, config(0.5))
    with pytest.raises(ConfigError, match=r"evaluation\.later_step_scale: 0\.5 -> 1\.0"):
        ModelSelection.check_resume(store, config(1.0))
    # a record that keeps the setting is held to its own value
    ModelSelection(store, ModelSelection.settings_of(config(1.0))).add(10, -5.0)
    ModelSelection.check_resume(store, config(1.0))
    with pytest.raises(ConfigError, match=r"later_step_scale: 1\.0 -> 0\.5"):
        ModelSelection.check_resume(store, config(0.5))


def test_config_refuses_selection_without_evaluations():
    from maml_core.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"evaluation\.every > 0"):
        load_config(CONFIG, ["evaluation.every=0", "evaluation.validation_tasks=5"])


@pytest.fixture(scope="module")
def selected_run(pipeline):
    from flows.training import meta_train

    return meta_train(config_path=CONFIG, overrides=["iterations=8", *DEGRADING],
                      run_name="selection")


def test_selection_registers_and_evaluates_the_best_validated_model(selected_run):
    from mlflow import MlflowClient

    from flows import tracking
    from flows.config import load_run_config
    from maml_core.checkpoint import list_checkpoints, load_checkpoint
    from maml_core.evaluation import selection_score
    from maml_core.trainer import MetaLearner

    run_id = selected_run["run_id"]
    client = MlflowClient()
    scores = {m.step: m.value for m in client.get_metric_history(run_id, "val_score")}
    assert sorted(scores) == [2, 4, 6, 8]
    best = max(sorted(scores), key=scores.get)
    assert selected_run["selected_iteration"] == best
    assert best != 8, f"the degrading config's best model should not be the last: {scores}"
    run = client.get_run(run_id)
    assert run.data.tags["maml.selected_iteration"] == str(best)

    # every validated model was checkpointed (checkpoint_every is 100)
    store = Path(selected_run["store"])
    assert [it for it, _ in list_checkpoints(store / "checkpoints")] == [2, 4, 6, 8]

    # the score is the mean return after one step on the validation tasks, recomputed here
    # from the checkpoint with the validation set and seed
    _, params, _ = load_checkpoint(store / "checkpoints" / f"iter-{best:06d}.json")
    learner = MetaLearner(load_run_config(CONFIG, ["iterations=8", *DEGRADING]))
    learner.load_params(params, "selected checkpoint")
    curve = learner.evaluate(learner.validation_tasks(), 1, seed=learner.validation_seed)
    assert selection_score(curve, 1) == pytest.approx(scores[best], rel=1e-6)
    learner.close()

    # the registered model is the selected one and says so
    name, version = selected_run["registered_model"], selected_run["model_version"]
    _, model_params, _, info = tracking.load_policy(f"models:/{name}/{version}")
    assert info["iteration"] == best
    for k in params:
        assert torch.equal(model_params[k], params[k]), k

    # its held-out evaluation equals the one made at that iteration during training
    summary = pd.DataFrame(selected_run["summary"])
    for row in summary.itertuples():
        logged = {m.step: m.value for m in
                  client.get_metric_history(run_id, f"eval_return_step_{int(row.step)}")}
        assert row.mean_return == pytest.approx(logged[best], rel=1e-6)
        assert row.mean_return != pytest.approx(logged[8], rel=1e-6)
    table = tracking.read_table(run_id, "evaluation/validation.csv")
    assert table["iteration"].tolist() == [2, 4, 6, 8]
    assert table.loc[table["selected"], "iteration"].tolist() == [best]


def test_resumed_run_selects_as_the_uninterrupted_one(selected_run):
    from flows import tracking
    from flows.training import meta_train
    from maml_core.config import ConfigError

    first = meta_train(config_path=CONFIG, overrides=["iterations=4", *DEGRADING],
                       run_name="selection-part")
    # a resume that would score the later models on another validation set is refused
    with pytest.raises(ConfigError, match=r"evaluation\.validation_tasks: 4 -> 3"):
        meta_train(resume=first["run_id"], overrides=["iterations=8",
                                                      "evaluation.validation_tasks=3"])
    resumed = meta_train(resume=first["run_id"], overrides=["iterations=8"])
    assert resumed["selected_iteration"] == selected_run["selected_iteration"]
    _, a, _, _ = tracking.load_policy(f"models:/{resumed['registered_model']}/"
                                      f"{resumed['model_version']}")
    _, b, _, _ = tracking.load_policy(f"models:/{selected_run['registered_model']}/"
                                      f"{selected_run['model_version']}")
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_learning_curve_shows_validation_scores_and_the_selected_model():
    from flows import plots

    history = pd.DataFrame({"iteration": [1, 2, 3, 4],
                            "pre_return": [-40.0, -39.0, -38.0, -37.0],
                            "post_return": [-20.0, -15.0, -12.0, -13.0],
                            "val_score": [float("nan"), -14.0, float("nan"), -16.0]})
    fig = plots.learning_curve(history, "t", selected=2)
    ax = fig.axes[0]
    lines = {line.get_label(): line for line in ax.get_lines()}
    points = lines["validation score"]
    assert list(points.get_xdata()) == [2, 4] and list(points.get_ydata()) == [-14.0, -16.0]
    assert list(lines["selected model (iteration 2)"].get_xdata()) == [2, 2]
    # without selection, neither appears
    plain = plots.learning_curve(history.drop(columns="val_score"), "t").axes[0]
    assert {line.get_label() for line in plain.get_lines()} == {"before adaptation",
                                                                 "after adaptation"}
    # held-out evaluations after one step as points, the paper's one-step return as a line
    evaluations = pd.DataFrame({"iteration": [2, 4], "step_0": [-39.0, -37.0],
                                "step_1": [-16.0, -11.0]})
    shown = plots.learning_curve(history, "t", evaluations=evaluations, paper=-11.68).axes[0]
    lines = {line.get_label(): line for line in shown.get_lines()}
    held_out = lines["held-out, after 1 step"]
    assert list(held_out.get_xdata()) == [2, 4] and list(held_out.get_ydata()) == [-16.0, -11.0]
    assert list(lines["paper, after 1 step"].get_ydata()) == [-11.68, -11.68]
    # not on an MSE curve
    mse = history.rename(columns={"pre_return": "pre_mse", "post_return": "post_mse"})
    mse_ax = plots.learning_curve(mse, "t", evaluations=evaluations, paper=1.0).axes[0]
    assert {line.get_label() for line in mse_ax.get_lines()} == {"before adaptation",
                                                                  "after adaptation"}


def test_validation_leaves_training_as_it_is(selected_run):
    """The same config without model selection reaches the same last iterate."""
    from flows.training import meta_train
    from maml_core.checkpoint import load_checkpoint

    plain = meta_train(config_path=CONFIG, run_name="no-selection",
                       overrides=["iterations=8", *DEGRADING,
                                  "evaluation.validation_tasks=0"])
    assert plain["selected_iteration"] is None
    _, with_validation, _ = load_checkpoint(Path(selected_run["store"]) / "checkpoints"
                                            / "iter-000008.json")
    _, without, _ = load_checkpoint(Path(plain["store"]) / "checkpoints")
    assert with_validation.keys() == without.keys()
    for k in without:
        assert torch.equal(with_validation[k], without[k]), k
