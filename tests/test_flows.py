"""The Prefect pipeline end to end: MLflow lineage, stages alone, retries, resume, retrain."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
CONFIG = str(ROOT / "configs" / "navigation2d.yaml")
SMALL = ["meta_batch_size=4", "episodes_per_task=5", "evaluation.every=2",
         "evaluation.steps=1", "evaluation.episodes_per_task=5", "checkpoint_every=2",
         "pipeline.retry_delay_seconds=0"]


def small(iterations: int, *extra: str) -> list[str]:
    return [f"iterations={iterations}", *SMALL, *extra]


def final_params(run_id: str) -> dict[str, torch.Tensor]:
    from flows.training import store_root
    from maml_core.checkpoint import load_checkpoint

    _, params, _ = load_checkpoint(store_root() / run_id / "checkpoints")
    return params


def assert_same_params(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def trained(pipeline):
    from flows.training import meta_train

    return meta_train(config_path=CONFIG, overrides=small(3))


def test_train_records_lineage_and_model(trained, pipeline):
    from mlflow import MlflowClient

    from flows import tracking
    from flows.config import load_run_config
    from maml_core import allocator
    from maml_core.allocator import MIB
    from maml_core.trainer import MetaLearner

    client = MlflowClient()
    run = client.get_run(trained["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["inner.step_size"] == "0.1"
    assert run.data.params["meta_batch_size"] == "4"
    assert run.data.tags["maml.task_family"] == "navigation2d"
    assert run.data.tags.get("prefect.flow_run_id")
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "post_return")]
    assert sorted(steps) == [0, 1, 2]
    assert {"eval_return_step_0", "eval_return_step_1", "kl", "grad_norm",
            "seconds_meta_update", "memory_released_mb", "memory_trimmed"} <= set(run.data.metrics)
    # The process's memory after each meta-update: this process's size at that moment.
    resident = [m.value for m in client.get_metric_history(run.info.run_id,
                                                           "memory_resident_mb")]
    if allocator.resident_bytes() is not None:
        assert len(resident) == 3 and all(50 < mb < allocator.resident_bytes() / MIB * 1.5
                                          for mb in resident)
    # The peak of each meta-iteration, and of each held-out evaluation, at its step.
    history = client.get_metric_history(run.info.run_id, "memory_peak_mb")
    if allocator.reset_peak_resident():
        peaks = {m.step: m.value for m in history}
        assert sorted(peaks) == [0, 1, 2]
        assert all(peaks[m.step] > m.value - 4  # (MB; the kernel's counters lag a little)
                   for m in client.get_metric_history(run.info.run_id, "memory_resident_mb"))
        evaluated = client.get_metric_history(run.info.run_id, "memory_peak_evaluate_mb")
        assert sorted(m.step for m in evaluated) == [2, 3]
        whole = client.get_metric_history(run.info.run_id, "memory_peak_process_mb")
        assert [m.step for m in whole] == [3]
        assert whole[0].value > max([*peaks.values(), *(m.value for m in evaluated)]) - 4
    # An evaluation's seconds at the step of its figures (every 2 iterations and at the end).
    evaluated = client.get_metric_history(run.info.run_id, "seconds_evaluate")
    assert sorted(m.step for m in evaluated) == [2, 3] and all(m.value > 0 for m in evaluated)
    datasets = run.inputs.dataset_inputs
    assert any(d.dataset.name == "navigation2d-held-out" for d in datasets)

    def files(path=None):
        out = []
        for f in client.list_artifacts(run.info.run_id, path):
            out.extend(files(f.path) if f.is_dir else [f.path])
        return out

    artifacts = set(files())
    for expected in ("checkpoints/iter-000002.json", "checkpoints/iter-000003.safetensors",
                     "evaluation/summary.csv", "evaluation/per_task.csv",
                     "plots/learning_curve.png", "plots/adaptation_curve.png",
                     "plots/navigation_trajectories.png", "plots/resources.png"):
        assert expected in artifacts, expected

    # The registered model reloads by alias and acts like the in-memory policy.
    name = trained["registered_model"]
    tracking.set_alias(name, "champion", trained["model_version"])
    policy, params, config, info = tracking.load_policy(f"models:/{name}@champion")
    assert info["run_id"] == trained["run_id"]
    learner = MetaLearner(load_run_config(data=config))
    learner.restore(Path(trained["store"]) / "checkpoints")
    obs = torch.randn(32, 2, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = learner.policy.net(learner.detached_params(), obs)
        assert torch.equal(policy.net(params, obs), expected)
    import mlflow.pyfunc

    model = mlflow.pyfunc.load_model(f"models:/{name}@champion")
    assert torch.allclose(torch.as_tensor(model.predict(obs.numpy())), expected)


@pytest.mark.parametrize("stage,extra", [
    ("sample_tasks", []), ("collect_rollouts", ["--phase", "pre"]), ("adapt", []),
    ("collect_rollouts", ["--phase", "post"]), ("meta_update", []), ("evaluate", []),
])
def test_stage_alone_reproduces_flow_outputs(trained, stage, extra, capsys):
    from flows.cli import main

    code = main(["stage", stage, "--run", trained["run_id"], "--iteration", "2", *extra])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["identical_to_stored"] is True, report
    assert Path(report["output"]).is_file()


FRESH = ("inner.num_steps=3", "inner.fresh_episodes=true", "inner.step_size=0.3")


@pytest.fixture(scope="module")
def trained_fresh(pipeline):
    """A run whose three inner steps each sample fresh episodes (phases pre, pre1, pre2)."""
    from flows.training import meta_train

    return meta_train(config_path=CONFIG, overrides=small(2, *FRESH))


def test_fresh_episode_inner_steps_run_in_the_flow_as_in_the_core_loop(trained_fresh):
    from flows.config import load_run_config
    from flows.store import StageStore
    from flows.training import store_root
    from maml_core.trainer import MetaLearner

    store = StageStore(store_root(), trained_fresh["run_id"])
    for name in ("pre", "adapted", "pre1", "adapted1", "pre2", "adapted2", "post"):
        assert store.has(1, name), name
    learner = MetaLearner(load_run_config(CONFIG, small(2, *FRESH)))
    results = learner.train()
    assert_same_params(final_params(trained_fresh["run_id"]), learner.detached_params())
    # Every phase's env steps are counted: four episode sets per iteration.
    from mlflow import MlflowClient

    steps = MlflowClient().get_metric_history(trained_fresh["run_id"], "env_steps")
    assert [m.value for m in sorted(steps, key=lambda m: m.step)] == \
        [r.stats["env_steps"] for r in results]
    post = store.load_episodes(1, "post")
    assert results[-1].stats["env_steps"] > 3 * post.num_steps
    learner.close()


@pytest.mark.parametrize("stage,phase", [("collect_rollouts", "pre1"), ("adapt", "pre1"),
                                         ("collect_rollouts", "pre2"), ("adapt", "pre2"),
                                         ("collect_rollouts", "post"), ("meta_update", "pre")])
def test_fresh_episode_stages_alone_reproduce_flow_outputs(trained_fresh, stage, phase,
                                                           capsys):
    from flows.cli import main

    code = main(["stage", stage, "--run", trained_fresh["run_id"], "--iteration", "1",
                 "--phase", phase])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["identical_to_stored"] is True, report


def test_stage_phase_must_be_one_of_the_run(trained, capsys):
    from flows.cli import main

    code = main(["stage", "collect_rollouts", "--run", trained["run_id"], "--iteration", "2",
                 "--phase", "pre1"])
    assert code != 0
    err = capsys.readouterr().err
    assert "'pre1' is not a phase of stage collect_rollouts" in err and "pre, post" in err
    code = main(["stage", "evaluate", "--run", trained["run_id"], "--iteration", "2",
                 "--phase", "post"])
    assert code != 0 and "stage evaluate has no phases" in capsys.readouterr().err


def test_retried_stage_gives_the_same_result(trained, monkeypatch):
    from flows import stages
    from flows.training import meta_train

    faults = "collect_rollouts@1,meta_update@2,adapt@0"
    monkeypatch.setenv("MAML_INJECT_FAULT", faults)
    stages._fired.clear()
    result = meta_train(config_path=CONFIG, overrides=small(3, "pipeline.retries=2"))
    assert stages._fired == set(faults.split(","))  # each fault really happened once
    assert_same_params(final_params(result["run_id"]), final_params(trained["run_id"]))


def test_faults_that_cannot_heal_are_not_retried(pipeline, monkeypatch):
    from flows import stages

    seen = []
    real = stages.run_meta_update

    def counted(*args, **kwargs):
        seen.append(1)
        return real(*args, **kwargs)

    class Heal(Exception):
        pass

    from maml_core.trainer import TrainingError

    state_ok = type("S", (), {"result": lambda self, raise_on_failure: Heal()})()
    state_bad = type("S", (), {"result": lambda self, raise_on_failure: TrainingError("x")})()
    assert stages.retry_condition(None, None, state_ok) is True
    assert stages.retry_condition(None, None, state_bad) is False


def _new_run_dirs(before: set[str]) -> list[Path]:
    from flows.training import store_root

    root = store_root()
    return [p for p in root.iterdir() if p.name not in before] if root.is_dir() else []


def test_resume_after_sigkill_matches_uninterrupted_run(pipeline):
    from mlflow import MlflowClient

    from flows import tracking
    from flows.training import meta_train, store_root

    overrides = small(6)
    reference = meta_train(config_path=CONFIG, overrides=overrides, run_name="uninterrupted")
    root = store_root()
    before = {p.name for p in root.iterdir()}
    env = dict(os.environ, MLFLOW_TRACKING_URI=tracking.active_config().tracking_uri,
               PYTHONUNBUFFERED="1")
    env.pop("PREFECT_API_URL", None)
    args = [sys.executable, "-m", "flows.cli", "train", CONFIG]
    for o in overrides:
        args += ["--set", o]
    proc = subprocess.Popen(args, env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    run_dir = None
    deadline = time.time() + 240
    try:
        while time.time() < deadline and proc.poll() is None:
            dirs = _new_run_dirs(before)
            if dirs:
                run_dir = dirs[0]
                # after iteration 3 (past the checkpoint at 2, before the one at 4)
                if (run_dir / "iterations" / "000003" / "meta_update.json").is_file():
                    break
            time.sleep(0.05)
        assert proc.poll() is None, "training ended before it could be killed"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert run_dir is not None
    run_id = run_dir.name
    resumed = meta_train(resume=run_id)
    assert resumed["iterations"] == 6
    assert_same_params(final_params(run_id), final_params(reference["run_id"]))
    client = MlflowClient()
    for key in ("post_return", "pre_return", "meta_loss", "seconds_iteration"):
        steps = [m.step for m in client.get_metric_history(run_id, key)]
        assert sorted(steps) == list(range(6)), (key, sorted(steps))
    for key in ("eval_return_step_0", "eval_return_step_1"):
        steps = [m.step for m in client.get_metric_history(run_id, key)]
        assert sorted(steps) == [2, 4, 6], (key, sorted(steps))
    ref_hist = {m.step: m.value for m in client.get_metric_history(reference["run_id"],
                                                                   "post_return")}
    res_hist = {m.step: m.value for m in client.get_metric_history(run_id, "post_return")}
    assert ref_hist == res_hist


def test_retrain_promotes_only_a_better_challenger(pipeline):
    from mlflow import MlflowClient

    from flows import tracking
    from flows.retrain import retrain
    from flows.training import meta_train

    tcfg = tracking.load_tracking_config()
    name = tcfg.registered_model_name
    base = ["meta_batch_size=10", "episodes_per_task=10", "evaluation.every=0",
            "evaluation.episodes_per_task=10", "checkpoint_every=100", "retrain.steps=1"]
    weak = meta_train(config_path=CONFIG, overrides=["iterations=1", *base])
    tracking.set_alias(name, "champion", weak["model_version"])

    better = retrain(config_path=CONFIG, overrides=["iterations=10", *base])
    assert better["promoted"] is True, better
    assert better["challenger_score"] > better["champion_score"]
    assert str(tracking.get_alias_version(name, "champion").version) == \
        str(better["challenger_version"])

    worse = retrain(config_path=CONFIG, overrides=[
        "iterations=3", "meta_optimizer.name=sgd", "meta_optimizer.lr=3",
        "meta_optimizer.max_grad_norm=1", *base])
    assert worse["promoted"] is False, worse
    assert str(tracking.get_alias_version(name, "champion").version) == \
        str(better["challenger_version"])
    assert str(tracking.get_alias_version(name, "challenger").version) == \
        str(worse["challenger_version"])

    client = MlflowClient()
    for decision in (better, worse):
        run = client.get_run(decision["decision_run_id"])
        assert run.data.tags["maml.promoted"] == str(decision["promoted"])
        text = client.download_artifacts(run.info.run_id, "decision.json")
        assert json.loads(Path(text).read_text())["reason"] == decision["reason"]
    lineage = tracking.lineage(f"models:/{name}/{better['challenger_version']}")
    assert len(lineage) >= 2  # challenger -> its parent (the weak champion)


def test_cli_rejects_bad_input_before_work(pipeline, capsys, tmp_path):
    from flows.cli import main

    bad = tmp_path / "bad.yaml"
    bad.write_text("task:\n  family: navigation2d\n  horizn: 100\n")
    assert main(["train", str(bad)]) == 2
    assert "task.horizn" in capsys.readouterr().err
    assert main(["train", "--resume", "no-such-run"]) == 2
    assert main(["schedule", CONFIG, "--cron", "every day"]) == 2
    assert "cron" in capsys.readouterr().err
    assert main(["evaluate", "models:/maml-policy@no-such-alias"]) == 2


def test_progress_bar_shows_returns_speed_and_memory():
    from flows.training import _postfix

    stats = {"pre_return": -40.0, "post_return": -12.345, "seconds_iteration": 11.956,
             "memory_resident_mb": 2252.8, "kl": 0.01}
    assert _postfix(stats) == {"pre": "-40.00", "post": "-12.35", "s/it": "11.96",
                               "mem": "2.20G"}
    del stats["memory_resident_mb"]  # a supervised iteration has no meta-update release
    assert "mem" not in _postfix(stats)


def test_look_next_names_the_lineage_only_of_a_registered_model():
    from flows.cli import look_next

    registered = look_next({"registered_model": "maml-policy", "model_version": "7"})
    assert registered.endswith("; `maml lineage models:/maml-policy/7`")
    unregistered = look_next({"registered_model": "maml-policy", "model_version": None})
    assert "lineage" not in unregistered and "None" not in unregistered
    assert unregistered.startswith("Look next: `maml ui`")
