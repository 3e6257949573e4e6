"""Faults at run time, made real: an environment that raises or returns NaN, a NaN
meta-gradient, an MLflow server that goes away in the middle of a run, a full or unwritable
stage store.

The environment faults come from a task family defined here whose environment breaks when it
is reset with the seeds of a chosen (iteration, phase) -- seeds derive from (run seed,
iteration, phase, task id), so a fault hits exactly that collection, and its retries.
"""

from __future__ import annotations

import os
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from gymnasium import spaces

from maml_core.rollouts import RolloutError, collect_episodes
from maml_core.seeding import derive_seed
from maml_core.tasks import TaskFamily, TaskVectorEnv, register_task_family

ROOT = Path(__file__).resolve().parent.parent
CONFIG = str(ROOT / "configs" / "navigation2d.yaml")
SEED = 3
META_BATCH = 4


# --------------------------------------------------------------------------- a faulty family
# Armed faults: {"kind": "raise" | "nan" | "huge", "seeds": reset seeds that trigger it,
# "left": collections still to break, "fired": collections broken so far}.
FAULTS: list[dict] = []
SLOW = {"step_seconds": 0.0}  # a slower environment, for tests that act in mid-run


def arm(kind: str, iterations, phase: str, times: int = 1) -> dict:
    """Break the collection of ``phase`` at each of ``iterations`` (``times`` collections in
    all, retries included)."""
    seeds = {derive_seed(derive_seed(SEED, it, phase, t), "reset")
             for it in iterations for t in range(META_BATCH)}
    fault = {"kind": kind, "seeds": seeds, "left": times, "fired": 0}
    FAULTS.append(fault)
    return fault


@pytest.fixture(autouse=True)
def _disarm():
    FAULTS.clear()
    yield
    FAULTS.clear()


class FaultyLineEnv(TaskVectorEnv):
    """A point on a line moving towards a goal, which breaks on demand (see ``arm``):
    ``raise`` -- step 5 raises; ``nan`` -- from step 5 the observations of task 1 are NaN;
    ``huge`` -- every reward is 1e38 (finite, but returns overflow to inf in float32)."""

    def __init__(self, tasks, episodes_per_task, horizon, device="cpu", dtype=torch.float32):
        super().__init__(tasks, episodes_per_task, horizon, device, dtype)
        self.single_observation_space = spaces.Box(-np.inf, np.inf, (1,), np.float32)
        self.single_action_space = spaces.Box(-0.2, 0.2, (1,), np.float32)
        self.observation_space = spaces.Box(-np.inf, np.inf, (self.num_envs, 1), np.float32)
        self.action_space = spaces.Box(-0.2, 0.2, (self.num_envs, 1), np.float32)
        self.position = torch.zeros(self.num_envs, 1, dtype=dtype)
        self.fault, self.t = None, 0

    def _apply_tasks(self, tasks: pd.DataFrame) -> None:
        self.goal = self.task_column("goal")

    def reset(self, *, seed=None, options=None):
        self.position = torch.zeros_like(self.position)
        self.fault, self.t = None, 0
        for fault in FAULTS:
            if fault["left"] > 0 and set(seed or ()) & fault["seeds"]:  # one seed a task
                fault["left"] -= 1
                fault["fired"] += 1
                self.fault = fault["kind"]
                break
        return self.position.clone(), {}

    def step(self, actions):
        self.t += 1
        if SLOW["step_seconds"]:
            time.sleep(SLOW["step_seconds"])
        if self.fault == "raise" and self.t == 5:
            raise RuntimeError("simulated simulator crash")
        if self.fault == "interrupt" and self.t == 5:
            raise KeyboardInterrupt  # as Ctrl-C would, in the middle of a collection
        actions = torch.as_tensor(actions, dtype=self.dtype).reshape(self.num_envs, 1)
        self.position = self.position + actions.clamp(-0.2, 0.2)
        reward = -(self.position[:, 0] - self.goal).abs()
        obs = self.position.clone()
        if self.fault == "nan" and self.t >= 5:
            e = self.episodes_per_task
            obs[e:2 * e] = float("nan")  # task 1
        if self.fault == "huge":
            reward = torch.full_like(reward, 1e38)
        done = torch.zeros(self.num_envs, dtype=torch.bool)
        return obs, reward, done, done.clone(), {}


class FaultyLine(TaskFamily):
    name = "test-faulty-line"
    gym_id = "TestFaultyLine"
    default_horizon = 20
    task_params = ("goal",)
    observation_dim = 1
    action_dim = 1

    def sample_tasks(self, n, rng):
        return self._table(n, {"goal": rng.choice([-1.0, 1.0], size=n)
                               * rng.uniform(0.5, 1.0, size=n)})

    def make_env(self, tasks, episodes_per_task, horizon=None, device="cpu",
                 dtype=torch.float32):
        return FaultyLineEnv(self.validate_tasks(tasks), episodes_per_task,
                             horizon or self.default_horizon, device, dtype)


register_task_family(FaultyLine)


def faulty_config(iterations: int, **pipeline) -> dict:
    return {"seed": SEED, "iterations": iterations, "meta_batch_size": META_BATCH,
            "episodes_per_task": 4, "checkpoint_every": 2,
            "task": {"family": "test-faulty-line"}, "policy": {"hidden_sizes": [16]},
            "inner": {"step_size": 0.1}, "meta_optimizer": {"name": "trpo", "max_kl": 0.02},
            "evaluation": {"every": 0, "num_tasks": 4, "steps": 1, "episodes_per_task": 2},
            "pipeline": {"retries": 2, "retry_delay_seconds": 0, "register_model": False,
                         "keep_last": 10, **pipeline}}


def _run_dirs() -> set[str]:
    from flows.training import store_root

    root = store_root()
    return {p.name for p in root.iterdir()} if root.is_dir() else set()


def _params(path) -> dict[str, torch.Tensor]:
    from maml_core.checkpoint import load_checkpoint

    return load_checkpoint(path)[1]


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _history(run_id: str, key: str) -> dict[int, float]:
    from mlflow import MlflowClient

    hist = MlflowClient().get_metric_history(run_id, key)
    steps = [m.step for m in hist]
    assert len(steps) == len(set(steps)), (key, sorted(steps))  # each step recorded once
    return {m.step: m.value for m in hist}


def _no_partial_files(run_dir: Path) -> None:
    """No temporaries, and every tensor file has its record (and vice versa) and checksum."""
    from maml_core.checkpoint import sha256

    assert not [p for p in run_dir.rglob("*") if p.name.endswith(".tmp")]
    for tensors in run_dir.rglob("*.safetensors"):
        record = tensors.with_suffix(".json")
        assert record.is_file(), f"{tensors} has no record"
        import json

        assert json.loads(record.read_text())["sha256"] == sha256(tensors.read_bytes())
    for record in (run_dir / "iterations").rglob("*.json"):
        assert record.with_suffix(".safetensors").is_file(), f"{record} has no tensors"


@pytest.fixture(scope="module")
def reference(pipeline):
    """The faulty family's run without any fault (4 iterations)."""
    from flows.training import meta_train

    result = meta_train(config_data=faulty_config(4), run_name="faults-reference")
    return result


# --------------------------------------------------------------------------- 1. environment
def test_rollout_error_names_tasks_step_and_context():
    from maml_core.policies import build_policy
    from maml_core.seeding import generator

    family = FaultyLine()
    tasks = family.sample_tasks(3, np.random.default_rng(0))
    tasks["task_id"] = [7, 8, 9]
    env = family.make_env(tasks, 2)
    policy = build_policy(family, [8], "tanh", 0.0, generator(0))
    params = policy.params()
    seeds = [11, 12, 13]
    reset_seeds = [derive_seed(s, "reset") for s in seeds]
    FAULTS.append({"kind": "raise", "seeds": set(reset_seeds), "left": 1, "fired": 0})
    with pytest.raises(RolloutError, match=r"at iteration 4, phase 'pre': the environment "
                       r"raised RuntimeError in step: simulated simulator crash") as info:
        collect_episodes(env, policy, params, seeds, context="iteration 4, phase 'pre'")
    assert isinstance(info.value.__cause__, RuntimeError)
    assert info.value.step == 4 and info.value.task_ids == (7, 8, 9)
    FAULTS[:] = [{"kind": "nan", "seeds": set(reset_seeds), "left": 1, "fired": 0}]
    with pytest.raises(RolloutError, match=r"non-finite \(NaN/Inf\) observations.*task id\(s\) "
                       r"\[8\] at step 5") as info:
        collect_episodes(env, policy, params, seeds, context="iteration 4, phase 'pre'")
    assert info.value.task_ids == (8,)
    import pickle

    again = pickle.loads(pickle.dumps(info.value))  # a Dask worker sends it back
    assert str(again) == str(info.value) and again.task_ids == (8,)
    collect_episodes(env, policy, params, seeds)  # the fault is spent: a clean collection


def test_transient_env_faults_are_retried_and_change_nothing(reference):
    from flows.training import meta_train, store_root

    crash = arm("raise", [1], "pre")
    nan = arm("nan", [2], "post")
    result = meta_train(config_data=faulty_config(4), run_name="faults-transient")
    assert crash["fired"] == 1 and nan["fired"] == 1
    assert result["iterations"] == 4
    _assert_same(_params(store_root() / result["run_id"] / "checkpoints"),
                 _params(store_root() / reference["run_id"] / "checkpoints"))


def test_permanent_env_fault_fails_clearly_and_resumes(reference):
    from mlflow import MlflowClient

    from flows.training import meta_train, store_root
    from maml_core.checkpoint import latest_checkpoint, load_checkpoint

    nan = arm("nan", [3], "post", times=100)
    before = _run_dirs()
    with pytest.raises(RolloutError, match=r"iteration 3, phase 'post': the environment "
                       r"returned non-finite \(NaN/Inf\) observations .*task id\(s\) \[1\]"):
        meta_train(config_data=faulty_config(4), run_name="faults-permanent")
    assert nan["fired"] == 3  # the first try and pipeline.retries=2 retries
    (run_id,) = _run_dirs() - before
    run_dir = store_root() / run_id
    manifest, _, _ = load_checkpoint(run_dir / "checkpoints")
    assert manifest["iteration"] == 2  # the last checkpoint is intact
    assert latest_checkpoint(run_dir / "checkpoints").name == "iter-000002.json"
    _no_partial_files(run_dir)
    run = MlflowClient().get_run(run_id)
    assert run.info.status == "FAILED"
    assert "iteration 3, phase 'post'" in run.data.tags["maml.failure"]

    FAULTS.clear()  # the environment is fixed: resume
    resumed = meta_train(resume=run_id)
    assert resumed["iterations"] == 4
    _assert_same(_params(run_dir / "checkpoints"),
                 _params(store_root() / reference["run_id"] / "checkpoints"))
    assert MlflowClient().get_run(run_id).info.status == "FINISHED"
    _assert_stop_moved(run_id, "maml.failure",
                       "RolloutError: rollout collection failed at iteration 3, phase 'post'")
    for key in ("pre_return", "post_return", "meta_loss"):
        assert sorted(_history(run_id, key)) == [0, 1, 2, 3], key


def _assert_stop_moved(run_id: str, tag: str, text: str) -> None:
    """After the resume, the stop's tag is gone from the finished run and kept, under the
    resume's time, as ``maml.stopped_<unix seconds>``."""
    from mlflow import MlflowClient

    tags = MlflowClient().get_run(run_id).data.tags
    assert tag not in tags
    (resumed,) = [k for k in tags if k.startswith("maml.resumed_at_")]
    stopped = {k: v for k, v in tags.items() if k.startswith("maml.stopped_")}
    assert list(stopped) == ["maml.stopped_" + resumed.rpartition("_")[2]]
    assert next(iter(stopped.values())).startswith(text)


def test_interrupted_run_is_marked_killed_and_resumes(reference):
    """Ctrl-C in the middle of an iteration: the run is KILLED in MLflow (not left RUNNING),
    tagged with where it stopped; the iterations finished before it keep their metrics, and
    the resumed run equals the uninterrupted one."""
    from mlflow import MlflowClient

    from flows.training import meta_train, store_root

    arm("interrupt", [3], "pre")
    before = _run_dirs()
    with pytest.raises(KeyboardInterrupt) as info:
        meta_train(config_data=faulty_config(4), run_name="faults-interrupted")
    (run_id,) = _run_dirs() - before
    assert info.value.maml_run_id == run_id  # what `maml train` names in its resume hint
    run = MlflowClient().get_run(run_id)
    assert run.info.status == "KILLED"
    assert run.data.tags["maml.interrupted"] == (
        f"interrupted after 3 meta-iterations; resume with `maml train --resume {run_id}`")
    assert sorted(_history(run_id, "pre_return")) == [0, 1, 2]
    _no_partial_files(store_root() / run_id)

    resumed = meta_train(resume=run_id)
    assert resumed["iterations"] == 4
    _assert_same(_params(store_root() / run_id / "checkpoints"),
                 _params(store_root() / reference["run_id"] / "checkpoints"))
    assert MlflowClient().get_run(run_id).info.status == "FINISHED"
    _assert_stop_moved(run_id, "maml.interrupted", "interrupted after 3 meta-iterations")
    for key in ("pre_return", "post_return", "meta_loss"):
        assert sorted(_history(run_id, key)) == [0, 1, 2, 3], key


# --------------------------------------------------------------------------- 2. meta-gradient
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # plots of inf
def test_nan_meta_gradient_update_is_rejected_and_recorded(pipeline):
    from mlflow import MlflowClient

    from flows.store import StageStore
    from flows.training import meta_train, store_root

    huge = arm("huge", [1], "post")  # returns overflow -> NaN advantages -> NaN gradient
    result = meta_train(config_data=faulty_config(3), run_name="faults-nan-gradient")
    assert huge["fired"] == 1
    run_id = result["run_id"]
    store = StageStore(store_root(), run_id)

    def params(it, name):
        tensors, _ = store.load_tensors(it, name)
        return {k: v for k, v in tensors.items() if not k.startswith("optim/")}

    with pytest.raises(AssertionError):  # iteration 0's update was accepted...
        _assert_same(params(0, "theta"), params(1, "theta"))
    _assert_same(params(1, "theta"), params(1, "meta_update"))  # ...iteration 1's was not
    _assert_same(params(1, "theta"), params(2, "theta"))
    assert _history(run_id, "rejected") == {0: 0.0, 1: 1.0, 2: 0.0}
    assert _history(run_id, "rejected_in_a_row") == {0: 0.0, 1: 1.0, 2: 0.0}
    assert np.isnan(_history(run_id, "grad_norm")[1])
    assert MlflowClient().get_run(run_id).info.status == "FINISHED"


def test_repeated_rejections_stop_the_run_without_retries(pipeline, monkeypatch):
    from mlflow import MlflowClient

    from flows.store import StageStore
    from flows.training import meta_train, store_root
    from maml_core.trainer import MetaLearner, TrainingError

    calls = []
    real = MetaLearner.meta_update

    def counted(self, pre, post, later=()):
        calls.append(self.iteration)
        return real(self, pre, post, later)

    monkeypatch.setattr(MetaLearner, "meta_update", counted)
    arm("huge", [0, 1, 2, 3], "post", times=100)
    config = faulty_config(4)
    config["meta_optimizer"]["max_rejected_updates"] = 2
    before = _run_dirs()
    with pytest.raises(TrainingError, match=r"2 meta-updates in a row were rejected "
                       r"\(non-finite meta-gradient or no acceptable TRPO step\) at iteration 1"):
        meta_train(config_data=config, run_name="faults-rejections")
    assert calls == [0, 1]  # TrainingError is not retried (pipeline.retries=2)
    (run_id,) = _run_dirs() - before
    store = StageStore(store_root(), run_id)
    _assert_same(store.load_tensors(0, "theta")[0], store.load_tensors(1, "theta")[0])
    run = MlflowClient().get_run(run_id)
    assert run.info.status == "FAILED"
    assert run.data.tags["maml.failure"].startswith("TrainingError: 2 meta-updates")
    assert _history(run_id, "rejected") == {0: 1.0}


# --------------------------------------------------------------------------- 3. MLflow outage
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """A real ``mlflow server`` on 127.0.0.1 that a test can stop and start again (same port,
    same database)."""

    def __init__(self, root: Path):
        self.root, self.port, self.proc = root, _free_port(), None
        self.uri = f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 90) -> None:
        if self.proc is not None and self.proc.poll() is None:
            return  # already running
        cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port",
               str(self.port), "--workers", "1",
               "--backend-store-uri", f"sqlite:///{self.root / 'm.db'}",
               "--default-artifact-root", str(self.root / "art")]
        with open(self.root / "server.log", "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=log, start_new_session=True,
                                         cwd=self.root)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                log = (self.root / "server.log").read_text()[-2000:]
                raise RuntimeError(f"mlflow server exited: {log}")
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.25)
        raise RuntimeError("mlflow server did not start")

    def stop(self, kill: bool = False) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGKILL if kill else signal.SIGTERM)
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(15)
        self.proc = None


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server"))
    server.start()
    yield server
    server.stop(kill=True)


@pytest.fixture
def use_server(pipeline, mlflow_server, monkeypatch):
    """Point this process's tracking at the server; fail fast on a refused connection (no
    MLflow-internal retries), so that the pipeline's own retries are what is tested."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "outage")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    yield mlflow_server
    pipeline.setup()  # the session's store again (global tracking URI, tracking._ACTIVE)


def test_mlflow_outage_mid_run_loses_no_metric(use_server, monkeypatch):
    """The MLflow server goes down just after the first checkpoint and comes back three
    iterations later: training goes on meanwhile, the failed writes are retried, and every
    metric step ends up in MLflow once. The outage is staged from inside the training loop (at
    its per-iteration hook), so that it falls between the two checkpoints however fast or slow
    the machine is."""
    from mlflow import MlflowClient

    from flows import training
    from flows.training import meta_train, store_root
    from flows.writer import BackgroundWriter

    writers: list[BackgroundWriter] = []

    class Recorded(BackgroundWriter):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            writers.append(self)

    class EveryIteration(training.MetricBuffer):  # a write to MLflow in every iteration
        def __init__(self, run_id, writer):
            super().__init__(run_id, writer, every_seconds=0.0)

    monkeypatch.setattr(training, "BackgroundWriter", Recorded)
    monkeypatch.setattr(training, "MetricBuffer", EveryIteration)

    server = use_server
    iterations = 40
    overrides = [f"iterations={iterations}", "meta_batch_size=4", "episodes_per_task=5",
                 "evaluation.every=20", "evaluation.steps=1", "evaluation.episodes_per_task=5",
                 "checkpoint_every=20", "pipeline.register_model=false",
                 "pipeline.retry_delay_seconds=0", "pipeline.mlflow_outage_seconds=120"]
    before = _run_dirs()
    outage: dict = {"done_while_down": []}

    def stage_outage(name: str) -> None:
        """At the end of iteration 19 (just after the checkpoint at 20, whose metrics are in
        MLflow) stop the server; at the end of iteration 22 wait until a write has failed and
        been retried, then start it again."""
        if not name.startswith("iteration:"):
            return
        it = int(name.split(":")[1])
        if it == 19:
            (run_id,) = _run_dirs() - before
            outage["run_id"] = run_id
            assert (store_root() / run_id / "checkpoints" / "iter-000020.json").is_file()
            assert MlflowClient(server.uri).get_metric_history(run_id, "pre_return")
            server.stop()
        elif 20 <= it <= 22:
            assert server.proc is None  # still down: training got here without MLflow
            outage["done_while_down"].append(it)
            if it == 22:
                (mlflow_writer,) = [w for w in writers if w.name == "maml-mlflow"]
                deadline = time.time() + 60
                while mlflow_writer.retries < 1 and time.time() < deadline:
                    time.sleep(0.05)
                outage["retries_while_down"] = mlflow_writer.retries
                server.start()

    monkeypatch.setattr(training, "fault_point", stage_outage)
    try:
        result = meta_train(config_path=CONFIG, overrides=overrides, run_name="outage")
    finally:
        server.start()  # whatever happened, the module's server runs again
    run_id = outage["run_id"]
    assert result["run_id"] == run_id and result["iterations"] == iterations
    # three iterations ran to the end (their stage outputs stored) while MLflow was down
    assert outage["done_while_down"] == [20, 21, 22]
    assert outage["retries_while_down"] >= 1  # MLflow calls failed and were retried

    client = MlflowClient(server.uri)
    for key in ("pre_return", "post_return", "meta_loss", "rejected", "seconds_iteration"):
        steps = [m.step for m in client.get_metric_history(run_id, key)]
        assert sorted(steps) == list(range(iterations)), (key, sorted(steps))
    for key in ("eval_return_step_0", "eval_return_step_1"):
        steps = [m.step for m in client.get_metric_history(run_id, key)]
        assert sorted(steps) == [20, 40], (key, sorted(steps))
    artifacts = {f.path for f in client.list_artifacts(run_id, "checkpoints")}
    assert {"checkpoints/iter-000020.json", "checkpoints/iter-000040.json"} <= artifacts
    assert client.get_run(run_id).info.status == "FINISHED"


def test_outage_longer_than_allowed_stops_the_run_and_it_resumes(use_server, reference,
                                                                  monkeypatch):
    """``pipeline.mlflow_outage_seconds=2`` and a server that dies (SIGKILL) after the first
    checkpoint: the run stops at the next checkpoint with a clear error; once the server is
    back, the resumed run equals the uninterrupted one and records every metric step once."""
    from mlflow import MlflowClient

    from flows.training import meta_train, store_root
    from flows.writer import ServiceUnavailableError

    server = use_server
    monkeypatch.setitem(SLOW, "step_seconds", 0.01)  # about 0.5 s an iteration
    before = _run_dirs()
    killed: dict = {}

    def kill_mlflow():
        deadline = time.time() + 120
        while time.time() < deadline:
            new = _run_dirs() - before
            if new and (store_root() / next(iter(new)) / "checkpoints" /
                        "iter-000002.json").is_file():
                server.stop(kill=True)
                killed["at"] = _latest_iteration(store_root() / next(iter(new)))
                return
            time.sleep(0.02)

    controller = threading.Thread(target=kill_mlflow, daemon=True)
    controller.start()
    try:
        with pytest.raises(ServiceUnavailableError, match=r"the MLflow tracking server "
                           rf"\({server.uri}\) has been unreachable for \d+ s, longer than "
                           r"the 2 s allowed \(pipeline.mlflow_outage_seconds\).*"
                           r"`maml train --resume \w+`"):
            meta_train(config_data=faulty_config(4, mlflow_outage_seconds=2),
                       run_name="outage-too-long")
    finally:
        controller.join(120)
        server.start()
    assert killed["at"] < 3, killed  # killed before the last iteration
    (run_id,) = _run_dirs() - before
    resumed = meta_train(resume=run_id)
    assert resumed["iterations"] == 4
    _assert_same(_params(store_root() / run_id / "checkpoints"),
                 _params(store_root() / reference["run_id"] / "checkpoints"))
    client = MlflowClient(server.uri)
    for key in ("pre_return", "post_return", "meta_loss", "rejected"):
        steps = [m.step for m in client.get_metric_history(run_id, key)]
        assert sorted(steps) == [0, 1, 2, 3], (key, sorted(steps))
    assert client.get_run(run_id).info.status == "FINISHED"


def test_interrupt_while_mlflow_hangs_stops_promptly_and_resumes(use_server, reference,
                                                                 monkeypatch):
    """Ctrl-C while the MLflow server hangs (stopped by SIGSTOP: it takes connections and never
    answers), with 300 s allowed for an outage: training does not wait out the allowance for
    its last metrics or for marking the run (``INTERRUPT_GRACE_SECONDS`` for each); the
    interrupt names the run. The server is then restarted (what it had queued is lost) and the
    resume ends where an uninterrupted run does, with every metric step recorded once."""
    from mlflow import MlflowClient

    from flows import training
    from flows.training import INTERRUPT_GRACE_SECONDS, meta_train, store_root

    server = use_server

    def stage(name: str) -> None:  # the server hangs after the checkpoint at 2; Ctrl-C in 3
        if name == "iteration:1:end":
            os.killpg(server.proc.pid, signal.SIGSTOP)
        elif name == "iteration:2:end":
            raise KeyboardInterrupt

    monkeypatch.setattr(training, "fault_point", stage)
    before = _run_dirs()
    started = time.monotonic()
    try:
        with pytest.raises(KeyboardInterrupt) as info:
            meta_train(config_data=faulty_config(4, mlflow_outage_seconds=300),
                       run_name="interrupted-in-outage")
        took = time.monotonic() - started
    finally:
        monkeypatch.setattr(training, "fault_point", lambda name: None)
        server.stop(kill=True)  # (SIGKILL ends a stopped process too)
        server.start()
    (run_id,) = _run_dirs() - before
    assert info.value.maml_run_id == run_id
    # 2 x 10 s of grace and 3 iterations of this toy task, far from the 300 s allowed
    assert took < 6 * INTERRUPT_GRACE_SECONDS, took
    client = MlflowClient(server.uri)
    assert client.get_run(run_id).info.status == "RUNNING"  # it could not be marked KILLED

    resumed = meta_train(resume=run_id)
    assert resumed["iterations"] == 4
    _assert_same(_params(store_root() / run_id / "checkpoints"),
                 _params(store_root() / reference["run_id"] / "checkpoints"))
    for key in ("pre_return", "post_return", "meta_loss", "rejected"):
        steps = [m.step for m in client.get_metric_history(run_id, key)]
        assert sorted(steps) == [0, 1, 2, 3], (key, sorted(steps))
    assert client.get_run(run_id).info.status == "FINISHED"


def _latest_iteration(run_dir: Path) -> int:
    base = run_dir / "iterations"
    done = [int(p.name) for p in base.iterdir() if p.name.isdigit()
            and (p / "meta_update.json").is_file()] if base.is_dir() else []
    return max(done, default=-1)


def test_outage_longer_than_allowed_stops_with_a_clear_error():
    from flows.writer import BackgroundWriter, ServiceUnavailableError, is_transient

    attempts = []

    def refused():
        attempts.append(time.monotonic())
        raise ConnectionRefusedError(111, "Connection refused")

    writer = BackgroundWriter("test", retry_seconds=1.0, service="the MLflow tracking server "
                              "(http://127.0.0.1:1)", hint="resume later", first_delay=0.1)
    writer.submit(refused)
    with pytest.raises(ServiceUnavailableError, match=r"the MLflow tracking server "
                       r"\(http://127.0.0.1:1\) has been unreachable for 1 s.*resume later"):
        writer.drain()
    assert 3 <= len(attempts) and attempts[-1] - attempts[0] < 3

    flaky = iter([ConnectionRefusedError(111, "refused"), None])

    def once():
        exc = next(flaky)
        if exc:
            raise exc

    writer.submit(once)
    writer.drain()  # retried once, then fine
    writer.submit(lambda: (_ for _ in ()).throw(ValueError("bad metric")))
    with pytest.raises(ValueError):  # not transient: not retried
        writer.close()
    from mlflow.exceptions import MlflowException

    assert is_transient(MlflowException("API request to http://127.0.0.1:1/api/2.0/mlflow/"
                                        "runs/log-batch failed with exception "
                                        "HTTPConnectionPool(...): Max retries exceeded"))
    assert not is_transient(MlflowException("Invalid value for metric 'x'",
                                            error_code="INVALID_PARAMETER_VALUE"))


# --------------------------------------------------------------------------- 4. store
def test_unwritable_home_or_store_is_refused_before_work(pipeline, tmp_path, monkeypatch,
                                                         capsys):
    from flows.cli import main

    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("MAML_HOME", str(blocker / "home"))
    assert main(["train", CONFIG]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "MAML_HOME" in err and "Not a directory" in err, err

    home = tmp_path / "home"
    home.mkdir()
    (home / "store").write_text("a file where the stage store should be")
    monkeypatch.setenv("MAML_HOME", str(home))
    assert main(["train", CONFIG]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert f"the stage store {str(home / 'store')!r} cannot be written" in err, err
    assert "set MAML_HOME to a writable folder" in err


def _limit_file_size(limit: int):
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes fail with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
    return apply


def test_full_store_fails_clearly_without_partial_files(pipeline, mlflow_server, tmp_path):
    """``maml train`` in a process that cannot write files over 200 kB (RLIMIT_FSIZE, as on a
    full disk): the first episodes file (about 430 kB) fails. MLflow (the server) and Prefect
    (the session's server) run in other processes, so only the stage store is limited."""
    from prefect.settings import PREFECT_API_URL

    env = dict(os.environ, MAML_HOME=str(tmp_path / "home"), MLFLOW_TRACKING_URI=mlflow_server.uri,
               MLFLOW_EXPERIMENT_NAME="full-store", PYTHONUNBUFFERED="1", MAML_NO_PROGRESS="1")
    env.pop("MAML_KILL_AT", None)
    env.pop("MAML_INJECT_FAULT", None)
    if PREFECT_API_URL.value():
        env["PREFECT_API_URL"] = PREFECT_API_URL.value()
    args = [sys.executable, "-m", "flows.cli", "train", CONFIG, "--set", "iterations=2",
            "--set", "evaluation.every=0", "--set", "pipeline.register_model=false"]
    proc = subprocess.run(args, env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=240, preexec_fn=_limit_file_size(200_000))
    last = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else ""
    assert proc.returncode == 2, proc.stderr[-3000:]
    store = tmp_path / "home" / "store"
    (run_dir,) = [p for p in store.iterdir() if p.is_dir()]
    assert last.startswith(f"maml train: error: the stage store {str(run_dir)!r} cannot be "
                           "written (File too large writing "), last
    assert last.endswith("free space or set MAML_HOME to a writable folder, then resume the "
                         "run"), last
    assert (run_dir / "config.json").is_file()
    _no_partial_files(run_dir)
    assert not (run_dir / "iterations" / "000000" / "pre.safetensors").exists()
