"""SIGKILL of ``maml train`` at seeded fault points, then ``maml train --resume``.

Every case kills a training subprocess at one named point (``MAML_KILL_AT``, see
``maml_core.faults``): at the start or end of a stage, in the middle of a checkpoint write or of
a stage-store write, before or after an MLflow metric batch, while pruning the store. Then the
run is resumed in this process and must finish with exactly the parameters of an uninterrupted
run of the same seed; no checkpoint or store file may be corrupt, neither right after the kill
nor after the resume; and the MLflow metric history must have every step once.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import select
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
CONFIG = str(ROOT / "configs" / "navigation2d.yaml")
ITERATIONS = 5
CHECKPOINTS = (2, 4, 5)  # checkpoint_every=2, and the last iteration
EVALUATIONS = (2, 4, 5)  # evaluation.every=2, and the last iteration
OVERRIDES = [f"iterations={ITERATIONS}", "checkpoint_every=2", "meta_batch_size=4",
             "episodes_per_task=4", "evaluation.every=2", "evaluation.steps=1",
             "evaluation.episodes_per_task=2", "pipeline.keep_last=2",
             "pipeline.retry_delay_seconds=0", "pipeline.register_model=false"]
ITERATION_KEYS = ("post_return", "pre_return", "meta_loss", "seconds_iteration")
EVAL_KEYS = ("eval_return_step_0", "eval_return_step_1")
SUBPROCESS_TIMEOUT = 180


def _candidates() -> dict[str, list[str]]:
    """Every kill point that the config above reaches (each at least once), by kind."""
    out: dict[str, list[str]] = {}

    def add(kind: str, *points: str) -> None:
        out.setdefault(kind, []).extend(points)

    for it in range(ITERATIONS):
        for stage in ("sample_tasks", "adapt", "meta_update"):
            add(stage, f"stage:{stage}:{it}:start", f"stage:{stage}:{it}:end")
        for nth in (1, 2):  # pre- and post-adaptation rollouts
            add("collect_rollouts", f"stage:collect_rollouts:{it}:start@{nth}",
                f"stage:collect_rollouts:{it}:end@{nth}")
        add("iteration-end", f"iteration:{it}:end")
    for it in EVALUATIONS:
        add("evaluate", f"stage:evaluate:{it}:start", f"stage:evaluate:{it}:end")
        add("evaluation-write", f"atomic-write:iter-{it:06d}.parquet:half-written",
            f"atomic-write:iter-{it:06d}.parquet:before-rename")
    for it in CHECKPOINTS:
        add("checkpoint", f"stage:checkpoint:{it}:start", f"stage:checkpoint:{it}:end")
        for suffix in ("safetensors", "json"):
            for where in ("half-written", "before-rename"):
                add("checkpoint-write", f"atomic-write:iter-{it:06d}.{suffix}:{where}")
    for nth in range(1, ITERATIONS + 1):  # the n-th write of a stage output: iteration n-1
        add("store-write", f"atomic-write:tasks.parquet:half-written@{nth}")
        for name in ("theta", "pre", "adapted", "post", "meta_update"):
            for suffix in ("safetensors", "json"):
                for where in ("half-written", "before-rename"):
                    add("store-write", f"atomic-write:{name}.{suffix}:{where}@{nth}")
    # One metric batch per checkpoint at least (more when a 5 s flush falls in between).
    for nth in range(1, len(CHECKPOINTS) + 1):
        add("mlflow", f"mlflow:log-batch:before@{nth}", f"mlflow:log-batch:after@{nth}")
    add("prune", *(f"store:prune:{it}" for it in range(ITERATIONS - 2)))  # keep_last=2
    return out


def _choose(seed: int = 20240611, extra: int = 3) -> list[str]:
    """``ALWAYS``, one seeded draw of every kind, and ``extra`` seeded draws of any kind."""
    rng = random.Random(seed)
    chosen = list(ALWAYS)
    for kind in sorted(CANDIDATES):
        chosen.append(rng.choice(sorted(set(CANDIDATES[kind]) - set(chosen))))
    rest = sorted({p for points in CANDIDATES.values() for p in points} - set(chosen))
    return chosen + rng.sample(rest, extra)


# Always covered: in the middle of a checkpoint write, of an MLflow batch, a kill before the
# first checkpoint (the run resumes from iteration 0), kills in the middle of a prune (the
# last one after the final checkpoint: the resumed run has no iteration left to run).
ALWAYS = ["atomic-write:iter-000002.safetensors:half-written",
          "atomic-write:iter-000002.json:before-rename",
          "atomic-write:iter-000004.json:half-written",
          "mlflow:log-batch:before@2", "mlflow:log-batch:after@1",
          "stage:meta_update:1:end", "store:prune:1", "store:prune:2"]
CANDIDATES = _candidates()
POINTS = _choose()


# --------------------------------------------------------------------------- helpers

def _load_params(run_id: str) -> tuple[dict, dict]:
    from flows.training import store_root
    from maml_core.checkpoint import load_checkpoint

    manifest, params, optim = load_checkpoint(store_root() / run_id / "checkpoints")
    assert manifest["iteration"] == ITERATIONS
    return params, optim


def _assert_store_intact(run_dir: Path, complete: bool) -> None:
    """Every complete checkpoint and every recorded stage output loads with its checksum;
    ``complete``: also every checkpoint is there and no temporary file is left."""
    import pandas as pd

    from flows.store import StageStore
    from maml_core.checkpoint import list_checkpoints, load_checkpoint

    store = StageStore(run_dir.parent, run_dir.name)
    found = list_checkpoints(store.checkpoint_dir)
    for it, manifest_path in found:
        manifest, _, _ = load_checkpoint(manifest_path)  # SHA-256 verified
        assert manifest["iteration"] == it
    for it in store.iterations():
        directory = store.iteration_dir(it)
        for record in directory.glob("*.json"):
            store.load_tensors(it, record.stem)  # SHA-256 verified
        if store.has_table(it, "tasks"):
            store.load_table(it, "tasks")
    for table in store.evaluation_dir.glob("*.parquet"):
        pd.read_parquet(table)
    store.load_config()
    if complete:
        assert [it for it, _ in found] == list(CHECKPOINTS)
        assert store.iterations() == list(range(ITERATIONS - 2, ITERATIONS))  # keep_last=2
        leftovers = [p for p in run_dir.rglob("*") if p.name.endswith((".tmp", ".pruned"))]
        assert not leftovers, leftovers


def _assert_mlflow_run(run_id: str, reference_id: str, run_dir: Path) -> None:
    """Metric history: every step once, the reference's values; every checkpoint logged whole."""
    from mlflow import MlflowClient

    client = MlflowClient()
    assert client.get_run(run_id).info.status == "FINISHED"
    logged = {Path(f.path).name: f.file_size for f in client.list_artifacts(run_id,
                                                                          "checkpoints")}
    local = {p.name: p.stat().st_size for p in (run_dir / "checkpoints").glob("iter-*")}
    assert logged == local
    for key in ITERATION_KEYS:
        steps = sorted(m.step for m in client.get_metric_history(run_id, key))
        assert steps == list(range(ITERATIONS)), (key, steps)
    for key in EVAL_KEYS:
        steps = sorted(m.step for m in client.get_metric_history(run_id, key))
        assert steps == list(EVALUATIONS), (key, steps)
    for key in ("post_return", "pre_return", "meta_loss", *EVAL_KEYS):
        got = {m.step: m.value for m in client.get_metric_history(run_id, key)}
        want = {m.step: m.value for m in client.get_metric_history(reference_id, key)}
        assert got == want, key


@pytest.fixture(scope="module")
def reference(pipeline):
    """The uninterrupted run (in this process)."""
    from flows.training import meta_train

    return meta_train(config_path=CONFIG, overrides=OVERRIDES, run_name="uninterrupted-kill")


@pytest.fixture(scope="module")
def subprocess_env(pipeline):
    """Environment of the training subprocesses: this session's MLflow store and Prefect
    server (so that no subprocess starts a temporary Prefect server of its own)."""
    from prefect.settings import PREFECT_API_URL

    from flows import tracking

    env = dict(os.environ, MLFLOW_TRACKING_URI=tracking.active_config().tracking_uri,
               PYTHONUNBUFFERED="1")
    env.pop("MAML_KILL_AT", None)
    env.pop("MAML_KILL_SIGNAL", None)
    api_url = PREFECT_API_URL.value()
    if api_url:
        env["PREFECT_API_URL"] = api_url
    else:
        env.pop("PREFECT_API_URL", None)
    return env


class ForkServer:
    """``tests/_forkserver.py``: a process that has imported the pipeline once and forks one
    ``maml`` child per request (seconds of imports saved per kill)."""

    def __init__(self, env: dict):
        self.env = env
        self._start()

    def _start(self) -> None:
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "_forkserver.py")],
                                     env=self.env, cwd=ROOT, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, bufsize=0)
        self._pending = b""

    def _answer(self, timeout: float) -> dict | None:
        deadline = time.monotonic() + timeout
        while b"\n" not in self._pending:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.proc.stdout], [], [], left)[0]:
                return None
            chunk = os.read(self.proc.stdout.fileno(), 4096)
            if not chunk:
                raise RuntimeError(f"the fork server exited ({self.proc.wait()})")
            self._pending += chunk
        line, _, self._pending = self._pending.partition(b"\n")
        return json.loads(line)

    def run(self, argv: list[str], env: dict, stderr: Path, timeout: float) -> int:
        """Run ``maml argv`` in a forked child; its exit code (negative: a signal)."""
        request = {"argv": argv, "env": env, "stderr": str(stderr)}
        self.proc.stdin.write((json.dumps(request) + "\n").encode())
        started = self._answer(60)
        if started is None:  # a server out of step would answer the next test wrongly
            self.close()
            self._start()
            raise AssertionError("the fork server did not fork within 60 s; restarted it")
        answer = self._answer(timeout)
        # Whatever the child started in its session (e.g. a temporary Prefect server when
        # PREFECT_API_URL is unset) goes with it; a hung child goes first.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(started["pid"], signal.SIGKILL)
        if answer is None:
            answer = self._answer(60)
        if answer is None:
            self.close()
            self._start()
            raise AssertionError(f"the child {started['pid']} outlived SIGKILL by 60 s; "
                                 "restarted the fork server")
        return answer["code"]

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.proc.stdin.close()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def forkserver(subprocess_env):
    server = ForkServer(subprocess_env)
    yield server
    server.close()


def _train_until_killed(point: str, server: ForkServer) -> Path:
    """Run ``maml train`` with ``MAML_KILL_AT=point``; return the run folder it left."""
    from flows.training import store_root

    root = store_root()
    root.mkdir(parents=True, exist_ok=True)
    before = {p.name for p in root.iterdir()}
    argv = ["train", CONFIG]
    for o in OVERRIDES:
        argv += ["--set", o]
    with tempfile.TemporaryDirectory() as tmp:
        err = Path(tmp) / "stderr"
        code = server.run(argv, {"MAML_KILL_AT": point}, err, SUBPROCESS_TIMEOUT)
        stderr = err.read_text(errors="replace")[-3000:] if err.exists() else ""
    assert code == -signal.SIGKILL, (
        f"{point}: expected death by SIGKILL, got exit code {code} (a point that is never "
        f"reached must leave the list)\n{stderr}")
    new = [p for p in root.iterdir() if p.name not in before]
    assert len(new) == 1, new
    return new[0]


# --------------------------------------------------------------------------- the test

def test_points_are_spread_across_stages():
    assert len(POINTS) >= 20 and len(set(POINTS)) == len(POINTS)
    for kind, points in CANDIDATES.items():
        assert set(points) & set(POINTS), kind


@pytest.mark.parametrize("point", POINTS)
def test_resume_after_sigkill(point, reference, forkserver):
    from flows.cli import main

    started = time.perf_counter()
    run_dir = _train_until_killed(point, forkserver)
    run_id = run_dir.name
    _assert_store_intact(run_dir, complete=False)

    killed = time.perf_counter()
    assert main(["--verbose", "train", "--resume", run_id]) == 0
    resumed = time.perf_counter()

    params, optim = _load_params(run_id)
    ref_params, ref_optim = _load_params(reference["run_id"])
    assert params.keys() == ref_params.keys()
    for k in params:
        assert torch.equal(params[k], ref_params[k]), k
    assert optim.keys() == ref_optim.keys()
    for k in optim:
        assert torch.equal(optim[k], ref_optim[k]), k
    _assert_store_intact(run_dir, complete=True)
    _assert_mlflow_run(run_id, reference["run_id"], run_dir)
    print(f"{point}: killed after {killed - started:.1f} s, resumed in {resumed - killed:.1f} "
          f"s, checked in {time.perf_counter() - resumed:.1f} s")


@pytest.mark.parametrize("sig, code, word", [("TERM", 143, "terminated"),
                                              ("INT", 130, "interrupted")])
def test_signal_is_recorded_and_leaves_nothing_running(sig, code, word, reference,
                                                       subprocess_env, tmp_path):
    """SIGTERM (``kill``, a scheduler's stop) or SIGINT (Ctrl-C) at the end of iteration 1 of
    ``maml train``, run as a command in a session of its own that starts its own temporary
    Prefect server (no ``PREFECT_API_URL``), as on a fresh machine: the command prints the
    resume command with the run id and exits 128 + the signal; the run is KILLED with where it
    stopped; nothing the process started (the Prefect server above all) is left running; the
    resume equals the uninterrupted run."""
    from mlflow import MlflowClient

    from flows.cli import main

    env = dict(subprocess_env, MAML_KILL_AT="iteration:1:end", MAML_KILL_SIGNAL=sig)
    env.pop("PREFECT_API_URL", None)
    argv = [sys.executable, "-m", "flows.cli", "train", CONFIG]
    for o in OVERRIDES:
        argv += ["--set", o]
    err = tmp_path / "stderr"
    with err.open("wb") as out:
        # (SIGINT back to its default: a job started in the background inherits it ignored)
        proc = subprocess.Popen(argv, env=env, cwd=ROOT, stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=out, start_new_session=True,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        returned = proc.wait(SUBPROCESS_TIMEOUT)
        left = True
        try:
            os.killpg(proc.pid, 0)  # anything still in the command's process group?
        except ProcessLookupError:
            left = False
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    stderr = err.read_text(errors="replace")
    assert returned == code, stderr[-3000:]
    found = re.search(rf"maml train: {word}; resume with `maml train --resume "
                      r"([0-9a-f]{32})`", stderr)
    assert found, stderr[-3000:]
    assert not left, "a process of the terminated command outlived it"
    run_id = found.group(1)
    run = MlflowClient().get_run(run_id)
    assert run.info.status == "KILLED"
    assert run.data.tags["maml.interrupted"] == (
        f"interrupted after 2 meta-iterations; resume with `maml train --resume {run_id}`")

    assert main(["--verbose", "train", "--resume", run_id]) == 0
    params, optim = _load_params(run_id)
    ref_params, ref_optim = _load_params(reference["run_id"])
    for mine, ref in ((params, ref_params), (optim, ref_optim)):
        assert mine.keys() == ref.keys()
        for k in mine:
            assert torch.equal(mine[k], ref[k]), k
    assert MlflowClient().get_run(run_id).info.status == "FINISHED"


def test_a_killed_commands_temporary_server_is_stopped_by_the_next_command(subprocess_env,
                                                                         tmp_path):
    """SIGKILL (no clean-up at all, as from the out-of-memory killer) of ``maml train`` that
    started its own temporary Prefect server: the server outlives the command, as nothing can
    stop it then; the record the command left names it, and the next command's start
    (``configure_environment``) stops it and forgets the record. A recorded server whose
    parent still runs is left alone."""
    from flows.settings import (
        _running,
        configure_environment,
        record_local_servers,
        stop_orphaned_servers,
    )

    records = Path(os.environ["PREFECT_HOME"]) / "temporary-servers"
    env = dict(subprocess_env, MAML_KILL_AT="iteration:1:end", MAML_KILL_SIGNAL="KILL")
    env.pop("PREFECT_API_URL", None)
    argv = [sys.executable, "-m", "flows.cli", "train", CONFIG]
    for o in OVERRIDES:
        argv += ["--set", o]
    err = tmp_path / "stderr"
    with err.open("wb") as out:  # (a pipe would stay open in the orphaned server)
        proc = subprocess.Popen(argv, env=env, cwd=ROOT, stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=out, start_new_session=True)
    try:
        returned = proc.wait(SUBPROCESS_TIMEOUT)
        assert returned == -signal.SIGKILL, err.read_text(errors="replace")[-3000:]
        written = [p for p in records.glob("*.json")
                   if json.loads(p.read_text())["parent"] == proc.pid]
        assert len(written) == 1, written
        record = json.loads(written[0].read_text())
        server = record["server"]
        cmdline = Path(f"/proc/{server}/cmdline").read_bytes().replace(b"\0", b" ")
        assert b"prefect.server.api.server:create_app" in cmdline  # orphaned, still serving
        assert os.getpgid(server) == proc.pid

        # A server whose parent runs: this process as the parent of a sleeping child.
        alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        try:
            record_local_servers([alive.pid])
            configure_environment()  # what every `maml` command does first
            assert alive.poll() is None
            assert (records / f"{alive.pid}.json").exists()
        finally:
            alive.kill()
            alive.wait()
        assert not written[0].exists()
        assert not _running(server, record["server_started"])  # gone, or a zombie
        assert stop_orphaned_servers() == []  # the ended child's record goes too
        assert not (records / f"{alive.pid}.json").exists()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
