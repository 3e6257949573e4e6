"""flows.tracking: config, params/metrics, datasets, pickle-free policy models, aliases, lineage."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from flows import tracking
from flows.policy_model import deterministic_action
from maml_core.config import build_config
from maml_core.trainer import MetaLearner

# pytest resets warning filters per test; setup() hides this one outside of tests.
pytestmark = pytest.mark.filterwarnings(r"ignore::DeprecationWarning:mlflow\.")

FAKE_COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def exp(mlflow_store, request, monkeypatch):
    """This test's own experiment in the session store; git lookups are faked."""
    monkeypatch.setattr(tracking, "git_commit", lambda cwd=None: FAKE_COMMIT)
    cfg = mlflow_store.model_copy(update={"experiment_name": f"test-{request.node.name}"})
    cfg.setup()
    return cfg


@pytest.fixture
def learner():
    config = build_config({"task": {"family": "navigation2d"},
                           "policy": {"hidden_sizes": [16, 16]}, "seed": 3})
    lrn = MetaLearner(config)
    yield lrn
    lrn.close()


# ---------------------------------------------------------------------------------- config
def _clear_env(monkeypatch):
    for key in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MAML_REGISTERED_MODEL",
                "MAML_HOME"):
        monkeypatch.delenv(key, raising=False)


def test_config_defaults_resolve_under_local_state(tmp_path, monkeypatch):
    _clear_env(monkeypatch)
    monkeypatch.chdir(tmp_path)
    cfg = tracking.load_tracking_config(Path(__file__).parent.parent / "mlflow.yaml")
    assert cfg.tracking_uri == f"sqlite:///{tmp_path.resolve() / '.maml' / 'mlflow.db'}"
    assert cfg.artifact_location == str(tmp_path.resolve() / ".maml" / "mlartifacts")
    assert (cfg.experiment_name, cfg.registered_model_name) == ("maml", "maml-policy")
    assert (cfg.aliases.champion, cfg.aliases.challenger) == ("champion", "challenger")
    monkeypatch.setenv("MAML_HOME", str(tmp_path / "state"))
    cfg = tracking.load_tracking_config(Path(__file__).parent.parent / "mlflow.yaml")
    assert cfg.tracking_uri == f"sqlite:///{tmp_path / 'state' / 'mlflow.db'}"


def test_config_env_overrides(tmp_path, monkeypatch):
    _clear_env(monkeypatch)
    path = tmp_path / "mlflow.yaml"
    path.write_text("experiment_name: from-file\nregistered_model_name: file-model\n")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////tmp/elsewhere.db")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "from-env")
    monkeypatch.setenv("MAML_REGISTERED_MODEL", "env-model")
    cfg = tracking.load_tracking_config(path)
    assert cfg.tracking_uri == "sqlite:////tmp/elsewhere.db"
    assert cfg.experiment_name == "from-env"
    assert cfg.registered_model_name == "env-model"


@pytest.mark.parametrize("text, key", [("tracking_url: sqlite:///x.db\n", "tracking_url"),
                                       ("aliases:\n  champ: best\n", "aliases.champ")])
def test_config_unknown_key_is_named(tmp_path, monkeypatch, text, key):
    _clear_env(monkeypatch)
    path = tmp_path / "mlflow.yaml"
    path.write_text(text)
    with pytest.raises(tracking.TrackingError, match=rf"{key}: unknown key"):
        tracking.load_tracking_config(path)


def test_config_rejects_reserved_alias_and_missing_file(tmp_path, monkeypatch):
    _clear_env(monkeypatch)
    path = tmp_path / "mlflow.yaml"
    path.write_text("aliases:\n  champion: latest\n")
    with pytest.raises(tracking.TrackingError, match=r"aliases\.champion"):
        tracking.load_tracking_config(path)
    with pytest.raises(tracking.TrackingError, match="does not exist"):
        tracking.load_tracking_config(tmp_path / "missing.yaml")


def test_setup_disables_pickle_and_sets_uris(exp):
    import os

    assert os.environ["MLFLOW_ALLOW_PICKLE_DESERIALIZATION"] == "false"
    assert mlflow.get_tracking_uri() == exp.tracking_uri
    assert mlflow.get_registry_uri() == exp.tracking_uri
    experiment = exp.client().get_experiment(exp.experiment_id)
    assert experiment.name == exp.experiment_name
    assert experiment.artifact_location == Path(exp.artifact_location).as_uri()
    assert exp.setup() == exp.experiment_id  # idempotent


# ---------------------------------------------------------------------------------- runs
def test_start_run_tags(exp):
    run_id = tracking.start_run(exp, "tagged", {"maml.kind": "test"}, flow_run_id="flow-123")
    run = exp.client().get_run(run_id)
    assert run.info.run_name == "tagged"
    assert run.info.experiment_id == exp.experiment_id
    tags = run.data.tags
    assert tags["mlflow.source.git.commit"] == FAKE_COMMIT == tags["maml.git_commit"]
    assert tags["prefect.flow_run_id"] == "flow-123"
    assert tags["maml.kind"] == "test"
    tracking.end_run(run_id)
    assert exp.client().get_run(run_id).info.status == "FINISHED"
    assert tracking.require_run(run_id) == run_id
    assert exp.client().get_run(run_id).info.status == "RUNNING"
    with pytest.raises(tracking.TrackingError, match="does not exist"):
        tracking.require_run("0" * 32)


def test_params_flattened_truncated_and_idempotent(exp, learner):
    run_id = tracking.start_run(exp, "params")
    config = {**learner.config.model_dump(mode="json"), "notes": "x" * 7000}
    logged = tracking.log_params(run_id, config)
    params = exp.client().get_run(run_id).data.params
    assert params == logged
    assert params["inner.step_size"] == "0.1"
    assert params["task.family"] == "navigation2d"
    assert params["policy.hidden_sizes"] == "[16, 16]"
    assert params["evaluation.episodes_per_task"] == "null"
    assert len(params["notes"]) == 6000 and params["notes"].endswith("[truncated]")
    assert exp.client().get_run(run_id).data.tags["maml.truncated_params"] == "notes"
    assert tracking.log_params(run_id, config) == {}  # a resumed run logs nothing new
    config["inner"]["step_size"] = 0.5
    with pytest.raises(tracking.TrackingError, match=r"inner.step_size: logged '0.1', now '0.5'"):
        tracking.log_params(run_id, config)


def test_metrics_logged_once_across_resume(exp):
    run_id = tracking.start_run(exp, "metrics")
    for step in range(3):
        tracking.log_metrics(run_id, {"post_return": -10.0 + step, "kl": 0.01}, step)
    assert tracking.logged_steps(run_id, "post_return") == {0, 1, 2}
    assert tracking.log_metrics(run_id, {"post_return": 0.0}, 2) == {}  # same process
    tracking._STEPS.clear()  # a resumed run in a new process knows only what the store holds
    # It replays steps 1-2 (same values) and continues to 4.
    for step in range(1, 5):
        logged = tracking.log_metrics(run_id, {"post_return": -10.0 + step,
                                               "kl": torch.tensor(0.01), "none": None}, step)
        assert set(logged) == ({"post_return", "kl"} if step > 2 else set())
    history = exp.client().get_metric_history(run_id, "post_return")
    assert sorted(m.step for m in history) == [0, 1, 2, 3, 4]  # each step exactly once
    assert {m.step: m.value for m in history} == {s: -10.0 + s for s in range(5)}
    assert tracking.logged_steps(run_id, "kl") == set(range(5))
    assert tracking.logged_steps(run_id, "never") == set()
    table = tracking.metric_history(run_id, ["post_return", "kl", "never"])
    assert list(table.columns) == ["iteration", "post_return", "kl"]
    assert table["iteration"].tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(tracking.TrackingError, match="'bad'"):
        tracking.log_metrics(run_id, {"bad": "text"}, 5)


def test_dataset_inputs(exp, learner, tmp_path):
    run_id = tracking.start_run(exp, "datasets")
    tasks = learner.held_out_tasks()
    csv = tmp_path / "tasks.csv"
    tasks.to_csv(csv, index=False)
    digest = tracking.log_dataset(run_id, tasks, "nav-test", csv, context="evaluation")
    tracking.log_dataset(run_id, learner.sample_tasks(0), name="nav-train",
                         source="seeded draw", context="training")
    inputs = exp.client().get_run(run_id).inputs.dataset_inputs
    by_name = {d.dataset.name: d for d in inputs}
    assert set(by_name) == {"nav-test", "nav-train"}
    test_input = by_name["nav-test"]
    assert test_input.dataset.digest == digest
    assert json.loads(test_input.dataset.source)["uri"] == str(csv.resolve())
    assert {t.key: t.value for t in test_input.tags}["mlflow.data.context"] == "evaluation"
    assert by_name["nav-train"].dataset.source_type == "code"


def test_artifacts(exp, tmp_path):
    from matplotlib.figure import Figure

    from maml_core.checkpoint import save_checkpoint

    run_id = tracking.start_run(exp, "artifacts")
    df = pd.DataFrame({"step": [0, 1], "mean_return": [-5.0, -3.0]})
    tracking.log_table(run_id, df, "evaluation/summary.parquet")
    tracking.log_table(run_id, df, "evaluation/summary.csv")
    fig = Figure()
    fig.add_subplot().plot([0, 1], [1, 0])
    tracking.log_figure(run_id, fig, "plots/curve.png")
    tracking.log_text(run_id, "hello", "notes/hello.txt")
    tracking.log_config_artifact(run_id, {"inner": {"step_size": 0.1}})
    ckpt = save_checkpoint(tmp_path / "ckpt", 5, {"w": torch.zeros(2)}, {}, {}, {}, {})
    tracking.log_checkpoint(run_id, ckpt)
    client = exp.client()
    names = {a.path for d in ("evaluation", "plots", "notes", "checkpoints")
             for a in client.list_artifacts(run_id, d)}
    assert names == {"evaluation/summary.parquet", "evaluation/summary.csv", "plots/curve.png",
                     "notes/hello.txt", "checkpoints/iter-000005.json",
                     "checkpoints/iter-000005.safetensors"}
    local = Path(client.download_artifacts(run_id, "evaluation/summary.parquet", str(tmp_path)))
    pd.testing.assert_frame_equal(pd.read_parquet(local), df)
    config = Path(client.download_artifacts(run_id, "config.yaml", str(tmp_path)))
    assert yaml.safe_load(config.read_text()) == {"inner": {"step_size": 0.1}}
    with pytest.raises(tracking.TrackingError, match=r"parquet or \.csv"):
        tracking.log_table(run_id, df, "x.pkl")


# ---------------------------------------------------------------------------------- models
def test_model_logged_registered_aliased_and_reloaded(exp, learner, tmp_path):
    name = "tracking-test-policy"
    run_id = tracking.start_run(exp, "model")
    learner.iteration = 7
    mv = tracking.log_policy_model(run_id, learner, name)
    assert mv.name == name and mv.run_id == run_id
    assert mv.tags["maml.run_id"] == run_id
    assert mv.tags["maml.iteration"] == "7"
    assert "maml.parent_model_version" not in mv.tags
    assert tracking.get_alias_version(name, "champion") is None
    tracking.set_alias(name, "champion", mv.version)
    assert tracking.get_alias_version(name, "champion").version == mv.version
    assert tracking.get_alias_version(name, "no-such-alias") is None
    assert tracking.get_alias_version("no-such-model", "champion") is None

    obs = np.random.default_rng(0).normal(size=(32, 2)).astype(np.float32)
    expected = learner.policy(torch.as_tensor(obs)).detach().numpy()
    exp.model_copy(update={"registered_model_name": name}).setup()  # for "alias:champion"
    for ref in (f"models:/{name}@champion", "alias:champion", f"models:/{name}/{mv.version}",
                int(mv.version), run_id):
        policy, params, config, info = tracking.load_policy(ref)
        assert type(policy).__name__ == "GaussianMLPPolicy"
        assert set(params) == set(learner.meta_params)
        for k, v in learner.meta_params.items():
            assert torch.equal(params[k], v.detach()), k
        np.testing.assert_array_equal(deterministic_action(policy, obs), expected)
        assert config == learner.config.model_dump(mode="json")
        assert info["iteration"] == 7 and info["run_id"] == run_id
    assert info["model_id"].startswith("m-")

    # pyfunc: the models-from-code wrapper gives the same actions, for arrays and DataFrames.
    model = mlflow.pyfunc.load_model(f"models:/{name}@champion")
    np.testing.assert_array_equal(model.predict(obs), expected)
    np.testing.assert_array_equal(model.predict(pd.DataFrame(obs.astype(np.float64))),
                                  expected)


def test_model_has_no_pickle_and_planted_pickle_is_never_executed(exp, learner, tmp_path):
    run_id = tracking.start_run(exp, "no-pickle")
    mv = tracking.log_policy_model(run_id, learner, "no-pickle-policy")
    model_dir = Path(mlflow.artifacts.download_artifacts(
        f"models:/{mv.name}/{mv.version}", dst_path=str(tmp_path / "download")))
    files = [p.relative_to(model_dir).as_posix() for p in model_dir.rglob("*") if p.is_file()]
    assert not [f for f in files if f.endswith((".pkl", ".pickle", ".cloudpickle", ".pt"))]
    assert {"MLmodel", "policy_model.py", "artifacts/params.safetensors",
            "artifacts/policy.json", "code/maml_core/policies.py"} <= set(files)
    pyfunc_conf = yaml.safe_load((model_dir / "MLmodel").read_text())["flavors"]["python_function"]
    assert pyfunc_conf["model_code_path"].endswith("policy_model.py")
    assert "python_model" not in pyfunc_conf  # the cloudpickle entry of classic PythonModels

    # Plant a pickle that would create a file when unpickled: loading must never execute it.
    sentinel = tmp_path / "pwned"

    class Boom:
        def __reduce__(self):
            return (Path.touch, (sentinel,))

    planted = tmp_path / "planted"
    shutil.copytree(model_dir, planted)
    for target in ("python_model.pkl", "artifacts/params.pkl"):
        (planted / target).write_bytes(pickle.dumps(Boom()))
    policy, _, _, _ = tracking.load_policy(planted)
    mlflow.pyfunc.load_model(str(planted)).predict(np.zeros((1, 2)))
    assert not sentinel.exists()
    assert policy.input_dim == 2


def test_pickled_pyfunc_models_are_refused(exp, tmp_path):
    class Pickled(mlflow.pyfunc.PythonModel):
        def predict(self, context, model_input: np.ndarray, params=None):
            return model_input

    mlflow.pyfunc.save_model(str(tmp_path / "pickled"), python_model=Pickled(),
                             pip_requirements=["mlflow"])
    assert (tmp_path / "pickled" / "python_model.pkl").is_file()
    with pytest.raises(mlflow.exceptions.MlflowException, match="pickle is disallowed"):
        mlflow.pyfunc.load_model(str(tmp_path / "pickled"))


def test_missing_model_references(exp, learner):
    with pytest.raises(tracking.TrackingError, match="has no version 99"):
        tracking.load_policy("models:/tracking-test-policy/99")
    with pytest.raises(tracking.TrackingError, match="has no alias 'champion'"):
        tracking.load_policy("models:/never-registered@champion")
    with pytest.raises(tracking.TrackingError, match="not a model reference"):
        tracking.resolve_model_version("models:/just-a-name")
    with pytest.raises(tracking.TrackingError, match="does not exist"):
        tracking.load_policy("f" * 32)
    run_id = tracking.start_run(exp, "no-model")
    with pytest.raises(tracking.TrackingError, match="logged no model"):
        tracking.load_policy(run_id)


# ---------------------------------------------------------------------------------- lineage
def test_lineage_follows_warm_start_chain(exp, learner, tmp_path):
    name = "lineage-policy"
    tasks = learner.held_out_tasks()
    csv = tmp_path / "held_out.csv"
    tasks.to_csv(csv, index=False)

    first = tracking.start_run(exp, "first", flow_run_id="flow-1")
    tracking.log_params(run_id=first, config=learner.config)
    tracking.log_dataset(first, tasks, "nav-held-out", csv, context="evaluation")
    v1 = tracking.log_policy_model(first, learner, name)

    _, params, config, _ = tracking.load_policy(f"models:/{name}/{v1.version}")
    config["inner"]["step_size"] = 0.05
    second = tracking.start_run(exp, "second", flow_run_id="flow-2",
                                parent_model_version=f"models:/{name}/{v1.version}")
    assert (exp.client().get_run(second).data.tags["maml.parent_model_version"]
            == f"models:/{name}/{v1.version}")
    tracking.log_params(second, config)
    tracking.log_dataset(second, tasks, "nav-held-out", csv, context="evaluation")
    v2 = tracking.log_policy_model(second, policy=learner.policy, params=params, config=config,
                                   registered_model_name=name, iteration=3)
    assert v2.tags["maml.parent_model_version"] == f"models:/{name}/{v1.version}"

    chain = tracking.lineage(f"models:/{name}/{v2.version}")
    assert [e["model"] for e in chain] == [f"models:/{name}/{v2.version}",
                                           f"models:/{name}/{v1.version}"]
    assert [e["run_id"] for e in chain] == [second, first]
    assert [e["flow_run_id"] for e in chain] == ["flow-2", "flow-1"]
    assert [e["parent"] for e in chain] == [f"models:/{name}/{v1.version}", None]
    assert all(e["git_commit"] == FAKE_COMMIT for e in chain)
    assert chain[0]["params"]["inner.step_size"] == "0.05"
    assert chain[1]["params"]["inner.step_size"] == "0.1"
    for e in chain:
        (ds,) = e["datasets"]
        assert (ds["name"], ds["context"], ds["source"]) == ("nav-held-out", "evaluation",
                                                             str(csv.resolve()))

    text = tracking.format_lineage(chain)
    assert text.index(f"models:/{name}/{v2.version}") < text.index(f"models:/{name}/{v1.version}")
    assert f"warm-started from models:/{name}/{v1.version}" in text
    assert "inner.step_size: 0.1 -> 0.05" in text
    assert "first training" in text
    assert FAKE_COMMIT in text


def test_lineage_accepts_plain_version_parent_tag(exp, learner):
    """The flow may tag the run with just the parent's version number."""
    name = "lineage-plain"
    v1 = tracking.log_policy_model(tracking.start_run(exp, "a"), learner, name)
    child = tracking.start_run(exp, "b")
    tracking.set_tags(child, {"maml.parent_model_version": str(v1.version)})
    v2 = tracking.log_policy_model(child, learner, name)
    chain = tracking.lineage(f"{name}/{v2.version}")
    assert [e["version"] for e in chain] == [int(v2.version), int(v1.version)]
    assert chain[0]["parent"] == f"models:/{name}/{v1.version}"
    assert v2.tags["maml.parent_model_version"] == f"models:/{name}/{v1.version}"


def test_warm_start_from_run_or_model_directory_is_traced(exp, learner, tmp_path):
    """``--init-model`` also takes a run id or a model directory (an exported run's
    ``model/``): the child's lineage names that logged model or directory, where the chain
    leaves the registry, instead of failing to resolve it as a registered version."""
    name = "lineage-external"
    source = tracking.start_run(exp, "source")
    tracking.log_policy_model(source, learner, name)
    model_dir = tracking.download_run_model(source, str(tmp_path))

    for ref, expected in [(source, None), (str(model_dir), str(model_dir.resolve()))]:
        child = tracking.start_run(exp, "child", parent_model_version=ref)
        v = tracking.log_policy_model(child, learner, name)
        parent = exp.client().get_run(child).data.tags["maml.parent_model_version"]
        if expected is None:  # a run id: its last logged model, models:/<logged model id>
            assert parent.startswith("models:/m-")
            assert parent == tracking.load_policy(source)[3]["uri"]
        else:
            assert parent == expected
        assert v.tags["maml.parent_model_version"] == parent
        chain = tracking.lineage(f"models:/{name}/{v.version}")
        assert chain[0]["parent"] == parent
        assert chain[1] == {"model": parent, "external": True}
        text = tracking.format_lineage(chain)
        assert f"warm-started from {parent}" in text
        assert "not a registered version" in text and "no longer in the registry" not in text
        assert "changed" not in text  # no params to compare against outside the registry
    # the directory may be moved or deleted while the child trains: it still registers
    child = tracking.start_run(exp, "child", parent_model_version=str(model_dir))
    moved = model_dir.rename(tmp_path / "moved")
    v = tracking.log_policy_model(child, learner, name)
    assert v.tags["maml.parent_model_version"] == str(model_dir.resolve())
    moved.rename(model_dir)
    runs = len(exp.client().search_runs([exp.experiment_id]))
    with pytest.raises(tracking.TrackingError, match=r"model directory .* does not exist"):
        tracking.start_run(exp, "child", parent_model_version=str(tmp_path / "gone"))
    assert len(exp.client().search_runs([exp.experiment_id])) == runs  # no run left behind
