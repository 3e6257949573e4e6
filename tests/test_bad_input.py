"""Bad input is answered before any work starts: one line on stderr, exit code 2.

Each row of the table below gives ``maml`` a command line with one thing wrong -- a config key,
value or type, a task family, a task-set file, a checkpoint, a stage-store file, a model
reference, a cron expression, a run id -- and checks that ``flows.cli.main`` returns 2, that
stderr is exactly one line ``maml <command>: error: ...`` naming what is wrong, and that no
MLflow run and no stage-store run folder was created. Pickle files (given as a checkpoint,
placed in the stage store, given as a config) are refused without being executed: their
``__reduce__`` would create a marker file, which must not appear.
"""

from __future__ import annotations

import builtins
import json
import pickle
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NAV = str(ROOT / "configs" / "navigation2d.yaml")
SINUSOID = str(ROOT / "configs" / "sinusoid.yaml")
TINY = ["iterations=1", "meta_batch_size=2", "episodes_per_task=2", "task.horizon=10",
        "policy.hidden_sizes=[8, 8]", "evaluation.every=0", "evaluation.steps=0",
        "evaluation.episodes_per_task=1", "checkpoint_every=1", "pipeline.register_model=false",
        "pipeline.retry_delay_seconds=0"]
GOOD_CSV = "task_id,goal_x,goal_y\n0,0.1,0.2\n1,-0.3,0.4\n"


class _Payload:
    """Unpickling this creates ``marker`` (open(marker, "w")): proof that a pickle ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return builtins.open, (self.marker, "w")


def pickle_bytes(marker: Path, protocol: int = pickle.HIGHEST_PROTOCOL) -> bytes:
    return pickle.dumps(_Payload(marker), protocol=protocol)


@pytest.fixture(scope="module")
def stored_run(pipeline, tmp_path_factory):
    """A tiny finished training run: its id, stage-store folder and checkpoint folder."""
    from flows.training import meta_train

    result = meta_train(config_path=NAV, overrides=TINY, run_name="bad-input-fixture")
    store = Path(result["store"])
    assert (store / "iterations" / "000000" / "pre.safetensors").is_file()
    # The payload really runs when unpickled, so a missing marker below means "refused".
    probe = tmp_path_factory.mktemp("probe") / "ran"
    pickle.loads(pickle_bytes(probe))  # our own payload
    assert probe.exists()
    return {"run_id": result["run_id"], "store": store, "checkpoints": store / "checkpoints"}


@dataclass
class Env:
    tmp: Path
    run: dict
    marker: Path
    cleanup: list[Path] = field(default_factory=list)

    def file(self, name: str, content: str | bytes) -> str:
        path = self.tmp / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
        return str(path)

    def pickle(self, name: str, protocol: int = pickle.HIGHEST_PROTOCOL) -> str:
        return self.file(name, pickle_bytes(self.marker, protocol))

    @property
    def ckpt(self) -> str:
        return str(self.run["checkpoints"])

    def ckpt_copy(self, edit=None) -> str:
        """A copy of the run's last checkpoint in tmp; ``edit(manifest, tensors)`` may change
        the manifest and the tensors (re-saved with a matching checksum)."""
        from maml_core.checkpoint import latest_checkpoint, load_tensors, save_tensors

        src = latest_checkpoint(self.run["checkpoints"])
        dst = self.tmp / "ckpt"
        dst.mkdir()
        manifest = json.loads(src.read_text())
        shutil.copy(src.with_suffix(".safetensors"), dst / manifest["tensors"])
        if edit is not None:
            tensors = load_tensors(dst / manifest["tensors"])
            edit(manifest, tensors)
            manifest["sha256"] = save_tensors(dst / manifest["tensors"], tensors)
        (dst / src.name).write_text(json.dumps(manifest))
        return str(dst / src.name)

    def ckpt_dir_with(self, damage) -> str:
        """The folder of a checkpoint copy whose tensor file ``damage(path)`` changed."""
        manifest = Path(self.ckpt_copy())
        damage(manifest.with_suffix(".safetensors"))
        return str(manifest.parent)

    def run_copy(self, edit) -> str:
        """A copy of the stored run under a new id, changed by ``edit(run_dir)`` (removed
        after the test)."""
        from flows.training import store_root

        run_id = f"copy-{uuid.uuid4().hex}"
        dst = store_root() / run_id
        shutil.copytree(self.run["store"], dst)
        self.cleanup.append(dst)
        edit(dst)
        return run_id

    def run_copy_checkpoints(self, edit) -> str:
        from flows.training import store_root

        return str(store_root() / self.run_copy(edit) / "checkpoints")


def _shrink_first_layer(manifest, tensors):
    for key in sorted(tensors):
        if key.startswith("param/") and tensors[key].ndim == 2:
            tensors[key] = tensors[key][:4].clone()  # [8, in] -> [4, in]
            return


def _claims_64(manifest, tensors):
    manifest["config"]["policy"]["hidden_sizes"] = [64, 64]
    manifest["architecture"]["hidden_sizes"] = [64, 64]  # tensors stay [8, 8]


def _meta_sgd(manifest, tensors):
    manifest["config"]["inner"]["learn_step_size"] = True


def _architecture_32(manifest, tensors):
    manifest["architecture"]["hidden_sizes"] = [32, 32]  # config and tensors say [8, 8]


def _corrupt(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def _pickle_over(env: Env, rel: str, fix_checksum: bool = False):
    def edit(run_dir: Path) -> None:
        path = run_dir / rel
        data = pickle_bytes(env.marker)
        path.write_bytes(data)
        if fix_checksum:  # the record's SHA-256 matches the pickle: still never unpickled
            from maml_core.checkpoint import sha256

            record = path.with_suffix(".json")
            rec = json.loads(record.read_text())
            rec["sha256"] = sha256(data)
            record.write_text(json.dumps(rec))
    return edit


def _parquet(env: Env, name: str, table) -> str:
    path = env.tmp / name
    table.to_parquet(path, index=False)
    return str(path)


def train(*sets: str, config: str = NAV) -> list[str]:
    out = ["train", config]
    for s in sets:
        out += ["--set", s]
    return out


def evaluate(env: Env, tasks: str, *extra: str) -> list[str]:
    return ["evaluate", env.ckpt, "--tasks", tasks, *extra]


# (id, argv builder, substring the one-line error must contain)
CASES = [
    # ---------------------------------------------------------------- config keys and values
    ("unknown-top-level-key", lambda e: train("iteratons=5"), "iteratons: unknown key"),
    ("unknown-nested-key", lambda e: train("inner.stepsize=0.1"), "inner.stepsize: unknown key"),
    ("unknown-deep-key", lambda e: train("pipeline.timeouts.adaptt=5"),
     "pipeline.timeouts.adaptt: unknown key"),
    ("string-for-int", lambda e: train("iterations=ten"), "iterations: Input should be a valid "
     "integer"),
    ("list-for-float", lambda e: train("inner.step_size=[1, 2]"), "inner.step_size"),
    ("section-is-scalar", lambda e: train("inner=3"), "inner"),
    ("iterations-zero", lambda e: train("iterations=0"), "iterations: Input should be greater "
     "than or equal to 1 (got 0)"),
    ("step-size-negative", lambda e: train("inner.step_size=-1"), "inner.step_size: Input "
     "should be greater than 0"),
    ("gamma-above-one", lambda e: train("gamma=1.5"), "gamma: Input should be less than or "
     "equal to 1"),
    ("gamma-nan", lambda e: train("gamma=.nan"), "gamma: Input should be a finite number"),
    ("meta-batch-zero", lambda e: train("meta_batch_size=0"), "meta_batch_size"),
    ("optimizer-lbfgs", lambda e: train("meta_optimizer.name=lbfgs"), "meta_optimizer.name"),
    ("device-tpu", lambda e: train("device=tpu"), "device: Input should be 'cpu' or 'cuda'"),
    ("activation-gelu", lambda e: train("policy.activation=gelu"), "policy.activation"),
    ("hidden-sizes-empty", lambda e: train("policy.hidden_sizes=[]"), "policy.hidden_sizes"),
    ("hidden-sizes-negative", lambda e: train("policy.hidden_sizes=[64, -1]"),
     "policy.hidden_sizes"),
    ("unknown-family", lambda e: train("task.family=navigation3d"),
     "unknown task family 'navigation3d'"),
    ("family-low-above-high", lambda e: train("task.options.low=1", "task.options.high=0"),
     "task.options: navigation2d needs low < high"),
    ("family-bogus-option", lambda e: train("task.options.bogus=1"), "'bogus'"),
    ("trpo-on-sinusoid", lambda e: train("meta_optimizer.name=trpo", config=SINUSOID),
     "trpo needs a policy"),
    ("set-without-equals", lambda e: train("iterations"), "override 'iterations' must look "
     "like key=value"),
    ("set-bad-yaml", lambda e: train("policy.hidden_sizes=[64, 64"), "value is not valid YAML"),
    ("set-empty-key", lambda e: train("=5"), "is not a dotted key"),
    ("set-into-scalar", lambda e: train("seed.x=1"), "'seed' is not a section"),
    ("config-missing", lambda e: ["train", str(e.tmp / "nope.yaml")], "nope.yaml"),
    ("config-not-yaml", lambda e: ["train", e.file("bad.yaml", "seed: [1,\nx: }\n")],
     "is not valid YAML"),
    ("config-not-mapping", lambda e: ["train", e.file("list.yaml", "- 1\n- 2\n")],
     "must hold a mapping"),
    ("config-is-pickle", lambda e: ["train", e.pickle("config.yaml")], "not a text (YAML)"),
    ("test-tasks-missing", lambda e: train("task.test_tasks=data/nowhere.csv"),
     "task.test_tasks: 'data/nowhere.csv'"),
    ("test-tasks-malformed", lambda e: train(
        "task.test_tasks=" + e.file("held.csv", "task_id,goal_x\n0,0.1\n")),
     "lacks column(s) ['goal_y']"),
    ("retrain-bad-value", lambda e: ["retrain", NAV, "--set", "retrain.margin=-1"],
     "retrain.margin"),
    ("retrain-config-missing", lambda e: ["retrain", str(e.tmp / "gone.yaml")], "gone.yaml"),
    # ---------------------------------------------------------------- task-set files
    ("tasks-missing-file", lambda e: evaluate(e, str(e.tmp / "none.csv")), "does not exist"),
    ("tasks-empty-csv", lambda e: evaluate(e, e.file("empty.csv", "")), "empty.csv' is empty"),
    ("tasks-header-only", lambda e: evaluate(e, e.file("head.csv", "task_id,goal_x,goal_y\n")),
     "is empty"),
    ("tasks-missing-column", lambda e: evaluate(e, e.file("col.csv", "task_id,goal_x\n0,1\n")),
     "lacks column(s) ['goal_y']"),
    ("tasks-duplicate-id", lambda e: evaluate(e, e.file(
        "dup.csv", "task_id,goal_x,goal_y\n0,0.1,0.1\n0,0.2,0.2\n")), "duplicate task_id"),
    ("tasks-nan", lambda e: evaluate(e, e.file(
        "nan.csv", "task_id,goal_x,goal_y\n0,0.1,\n1,0.2,0.2\n")), "NaN or infinite"),
    ("tasks-inf", lambda e: evaluate(e, e.file(
        "inf.csv", "task_id,goal_x,goal_y\n0,inf,0.1\n")), "NaN or infinite"),
    ("tasks-non-numeric", lambda e: evaluate(e, e.file(
        "text.csv", "task_id,goal_x,goal_y\n0,0.1,north\n")), "column 'goal_y' must hold "
     "numbers, found 'north'"),
    ("tasks-fractional-id", lambda e: evaluate(e, e.file(
        "frac.csv", "task_id,goal_x,goal_y\n0.5,0.1,0.1\n")), "column 'task_id' must hold "
     "integers, found 0.5 in row 1"),
    ("tasks-txt", lambda e: evaluate(e, e.file("tasks.txt", GOOD_CSV)), "use a .csv or "
     ".parquet file"),
    ("tasks-pickle", lambda e: evaluate(e, e.pickle("tasks.pkl")), "use a .csv or .parquet"),
    ("tasks-corrupt-parquet", lambda e: evaluate(e, e.file("bad.parquet", b"PAR1garbage")),
     "could not be read as parquet"),
    ("tasks-pickle-as-parquet", lambda e: evaluate(e, e.pickle("p.parquet")),
     "could not be read as parquet"),
    ("tasks-parquet-string-param", lambda e: evaluate(e, _parquet(e, "s.parquet", __import__(
        "pandas").DataFrame({"task_id": [0], "goal_x": ["x"], "goal_y": [0.1]}))),
     "column 'goal_x' must hold numbers"),
    # ---------------------------------------------------------------- evaluate arguments
    ("evaluate-negative-steps", lambda e: ["evaluate", e.ckpt, "--steps", "-1"], "--steps"),
    ("evaluate-zero-episodes", lambda e: ["evaluate", e.ckpt, "--episodes", "0"],
     "--episodes"),
    ("evaluate-steps-not-int", lambda e: ["evaluate", e.ckpt, "--steps", "two"],
     "argument --steps: invalid int value: 'two'"),
    # ---------------------------------------------------------------- evaluate --set
    ("evaluate-set-policy", lambda e: ["evaluate", e.ckpt, "--set", "policy.hidden_sizes=[4]"],
     "--set policy.hidden_sizes: an evaluation cannot change it (the policy's network is the "
     "model's)"),
    ("evaluate-set-training-key", lambda e: ["evaluate", e.ckpt, "--set", "meta_batch_size=3"],
     "--set meta_batch_size: an evaluation cannot change it (it configures training"),
    ("evaluate-set-not-key-value", lambda e: ["evaluate", e.ckpt, "--set", "inner.step_size"],
     "must look like key=value"),
    ("evaluate-set-negative-step", lambda e: ["evaluate", e.ckpt, "--set",
                                              "inner.step_size=-1"],
     "inner.step_size: Input should be greater than 0"),
    ("evaluate-set-unknown-family", lambda e: ["evaluate", e.ckpt, "--set", "task.family=nope"],
     "unknown task family 'nope'"),
    ("evaluate-set-family-other-sizes", lambda e: ["evaluate", e.ckpt, "--set",
                                                   "task.family=halfcheetah-vel"],
     "does not fit the task it gives"),
    ("evaluate-set-family-without-tasks", lambda e: [
        "evaluate", str(ROOT / "docs/results/runs/1a8c0542f68f4449b130e8bc119f86d1"), "--set",
        "task.family=ant-vel"], "the model's held-out tasks are another family's; give "
     "ant-vel's with --tasks FILE"),
    ("evaluate-set-family-options", lambda e: [
        "evaluate", str(ROOT / "docs/results/runs/1a8c0542f68f4449b130e8bc119f86d1"), "--set",
        "task.family=navigation2d"], "replace them whole"),
    ("evaluate-set-step-meta-sgd", lambda e: [
        "evaluate", e.ckpt_copy(_meta_sgd), "--set", "inner.step_size=0.2"],
     "learned its own step sizes (Meta-SGD"),
    # ---------------------------------------------------------------- checkpoints
    ("ckpt-wrong-shapes", lambda e: ["evaluate", e.ckpt_copy(_shrink_first_layer)],
     "has shape (4,"),
    ("ckpt-config-says-64", lambda e: ["evaluate", e.ckpt_copy(_claims_64)],
     "the policy expects (64,"),
    ("ckpt-other-architecture", lambda e: ["evaluate", e.ckpt_copy(_architecture_32)],
     "another policy architecture"),
    ("ckpt-no-config", lambda e: ["evaluate", e.ckpt_copy(
        lambda m, t: m.pop("config"))], "records no config"),
    ("ckpt-bad-config", lambda e: ["evaluate", e.ckpt_copy(
        lambda m, t: m["config"].update(gamma=7))], "records an unusable config"),
    ("ckpt-checksum-mismatch", lambda e: ["evaluate", e.ckpt_dir_with(_corrupt)],
     "SHA-256 does not match"),
    ("ckpt-tensors-path-escapes", lambda e: ["evaluate", e.ckpt_copy(
        lambda m, t: m.update(tensors="../x.safetensors"))], "'tensors' must name"),
    ("ckpt-pickle-pkl", lambda e: ["evaluate", e.pickle("model.pkl")], "pickle"),
    ("ckpt-pickle-json", lambda e: ["evaluate", e.pickle("iter-000001.json", protocol=0)],
     "is not valid JSON"),
    ("ckpt-pickle-binary-json", lambda e: ["evaluate", e.pickle("iter-000002.json")],
     "looks like a pickle file"),
    ("ckpt-pickle-as-tensors", lambda e: ["evaluate", e.ckpt_dir_with(
        lambda p: p.write_bytes(pickle_bytes(e.marker)))], "SHA-256 does not match"),
    # ---------------------------------------------------------------- the stage store
    ("store-pickle-stage-output", lambda e: ["stage", "adapt", "--run", e.run_copy(
        _pickle_over(e, "iterations/000000/pre.safetensors")), "--iteration", "0"],
     "SHA-256 does not match"),
    ("store-pickle-checksum-fixed", lambda e: ["stage", "adapt", "--run", e.run_copy(
        _pickle_over(e, "iterations/000000/pre.safetensors", fix_checksum=True)),
        "--iteration", "0"], "is not a valid safetensors file"),
    ("store-pickle-tasks-table", lambda e: ["stage", "collect_rollouts", "--run", e.run_copy(
        _pickle_over(e, "iterations/000000/tasks.parquet")), "--iteration", "0"],
     "tasks.parquet' in the stage store is not a readable parquet"),
    ("store-pickle-config", lambda e: ["stage", "adapt", "--run", e.run_copy(
        _pickle_over(e, "config.json")), "--iteration", "0"],
     "config.json' in the stage store is not valid JSON"),
    ("store-pickle-checkpoint", lambda e: ["evaluate", e.run_copy_checkpoints(
        _pickle_over(e, "checkpoints/iter-000001.safetensors"))], "SHA-256 does not match"),
    ("store-pickle-checkpoint-fixed", lambda e: ["evaluate", e.run_copy_checkpoints(
        _pickle_over(e, "checkpoints/iter-000001.safetensors", fix_checksum=True))],
     "is not a valid safetensors file"),
    ("stage-unknown-run", lambda e: ["stage", "adapt", "--run", "no-such-run",
                                     "--iteration", "0"], "'no-such-run' is not in the stage"),
    ("stage-run-path", lambda e: ["stage", "adapt", "--run", "../etc", "--iteration", "0"],
     "is not a run id"),
    ("stage-iteration-not-stored", lambda e: ["stage", "adapt", "--run", e.run["run_id"],
                                              "--iteration", "999"],
     "parameters at iteration 999"),
    ("stage-iteration-negative", lambda e: ["stage", "adapt", "--run", e.run["run_id"],
                                            "--iteration", "-1"], "--iteration must be"),
    ("stage-iteration-not-int", lambda e: ["stage", "adapt", "--run", e.run["run_id"],
                                           "--iteration", "x"], "invalid int value: 'x'"),
    ("stage-unknown-name", lambda e: ["stage", "train_all", "--run", e.run["run_id"],
                                      "--iteration", "0"], "invalid choice: 'train_all'"),
    # ---------------------------------------------------------------- models and runs
    ("model-alias-missing", lambda e: ["evaluate", "models:/maml-policy@nope"],
     "has no alias 'nope'"),
    ("model-version-missing", lambda e: ["evaluate", "models:/maml-policy/999"],
     "has no version 999"),
    ("model-ref-garbage", lambda e: ["evaluate", "models:/what/is/this"],
     "is not a model reference"),
    ("model-missing-file", lambda e: ["evaluate", str(e.tmp / "gone.json")],
     "gone.json' does not exist"),
    ("model-unknown-run-id", lambda e: ["evaluate", "ab" * 16], f"MLflow run {'ab' * 16!r} "
     "does not exist"),
    ("init-model-alias-missing", lambda e: [
        *train("iterations=1"), "--init-model", "models:/maml-policy@nope"], "has no alias 'nope'"),
    ("resume-unknown-run", lambda e: ["train", "--resume", "no-such-run"],
     "cannot resume run 'no-such-run'"),
    ("resume-pickle-config", lambda e: ["train", "--resume", e.run_copy(
        _pickle_over(e, "config.json"))], "config.json' in the stage store is not valid JSON"),
    ("resume-pickle-checkpoint", lambda e: ["train", "--resume", e.run_copy(
        _pickle_over(e, "checkpoints/iter-000001.safetensors"))], "SHA-256 does not match"),
    ("resume-path-as-run", lambda e: ["train", "--resume", "../../x"], "is not a run id"),
    ("train-nothing", lambda e: ["train"], "give a config file"),
    # ---------------------------------------------------------------- schedules
    ("cron-words", lambda e: ["schedule", NAV, "--cron", "every day"],
     "cron expression 'every day' does not parse"),
    ("cron-minute-61", lambda e: ["schedule", NAV, "--cron", "61 * * * *"],
     "cron expression '61 * * * *' does not parse"),
    ("schedule-bad-config", lambda e: ["schedule", NAV, "--cron", "0 3 * * *", "--set",
                                       "iterations=-3"], "iterations"),
    ("schedule-missing-config", lambda e: ["schedule", str(e.tmp / "x.yaml"), "--cron",
                                           "0 3 * * *"], "x.yaml"),
]


def _mlflow_run_count() -> int:
    from mlflow.entities import ViewType

    from flows import tracking

    cfg = tracking.load_tracking_config()
    cfg.setup()
    client = cfg.client()
    ids = [x.experiment_id for x in client.search_experiments(view_type=ViewType.ALL)]
    return len(client.search_runs(ids, run_view_type=ViewType.ALL, max_results=50000))


def _store_runs() -> set[str]:
    from flows.training import store_root

    root = store_root()
    return {p.name for p in root.iterdir()} if root.is_dir() else set()


@pytest.mark.parametrize("case_id,build,expected", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_before_work(case_id, build, expected, stored_run,
                                                  tmp_path, capfd):
    from flows.cli import main

    env = Env(tmp=tmp_path, run=stored_run, marker=tmp_path / "PICKLE-RAN")
    try:
        argv = build(env)
        runs, folders = _mlflow_run_count(), _store_runs()
        capfd.readouterr()

        code = main(argv)

        _, err = capfd.readouterr()
        lines = err.splitlines()
        assert code == 2, (code, err)
        assert len(lines) == 1, err
        assert lines[0].startswith(f"maml {argv[0]}: error: "), err
        assert expected in lines[0], err
        assert _mlflow_run_count() == runs, "an MLflow run was created"
        assert _store_runs() == folders, "a stage-store run folder was created"
        assert not env.marker.exists(), "a pickle was executed"
    finally:
        for path in env.cleanup:
            shutil.rmtree(path, ignore_errors=True)


def test_the_table_is_large_enough():
    assert len(CASES) >= 30
    assert len({c[0] for c in CASES}) == len(CASES)
