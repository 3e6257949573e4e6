"""A run's record, read from the MLflow store or from an export of it (``maml export``).

An MLflow store lives on the machine that made it (``.maml/``, git-ignored): once that machine or
checkout is gone, so are the runs behind a committed report. ``maml export RUN_ID`` writes what
the report reads of a run into a folder of plain files that can be committed beside the report,
and ``maml report --run FOLDER`` reads it back, so the report can be remade from any checkout:

    <out>/<run id>/
        run.yaml             name, status, start and end, tags, params, latest metrics, datasets
        metrics.csv          every value of every metric: key, step, value, timestamp (ms)
        artifacts/           config.yaml and evaluation/ (summary.csv, per_task.csv, ...)
        model/               the run's last logged policy (params.safetensors, policy.json)
                             or, where it logged none, its last checkpoint (iter-N.json,
                             iter-N.safetensors): ``maml evaluate <out>/<run id>`` loads it

Nothing is pickled: YAML (read with ``yaml.safe_load``), CSV and safetensors. A report's code
sees both kinds through one interface: ``StoreRecord`` (an MLflow run) and ``ExportedRecord``.
``held_out_task_table`` rebuilds, from either kind, the held-out tasks a run was evaluated on
(the report's per-task plot, ``bench/adapted_speed.py``, and the task file an export copies).
"""

from __future__ import annotations

import datetime
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from flows import tracking
from flows.config import load_run_config
from flows.errors import UsageError, one_line
from flows.policy_model import PolicyFileError, find_policy_files
from maml_core.checkpoint import latest_checkpoint
from maml_core.config import ConfigError
from maml_core.tasksets import TaskSetError, held_out_tasks

FORMAT = 1
RUN_FILE = "run.yaml"
METRICS_FILE = "metrics.csv"
ARTIFACTS_DIR = "artifacts"
MODEL_DIR = "model"
EXPORTED_ARTIFACTS = ("config.yaml", "evaluation")  # what a report reads of a run
TASKS_DIR = "tasks"  # under artifacts/: a copy of the held-out task file, if the run named one
METRIC_COLUMNS = ["key", "step", "value", "timestamp"]
DATA = Path(__file__).resolve().parent.parent / "data"  # where a moved task file is looked for

# Metrics must read back exactly as written: pandas 3 parses floats exactly by default (and
# deprecates asking for it), pandas 2 only with float_precision="round_trip".
_EXACT_FLOATS = ({} if int(pd.__version__.split(".")[0]) >= 3
                 else {"float_precision": "round_trip"})


@dataclass(frozen=True)
class RunInfo:
    """The part of MLflow's ``RunInfo`` a report reads."""

    run_id: str
    run_name: str | None
    status: str
    start_time: int | None  # ms since the epoch
    end_time: int | None


@dataclass(frozen=True)
class RunData:
    """The part of MLflow's ``RunData`` a report reads."""

    tags: dict[str, str] = field(default_factory=dict)
    params: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)


class RunRecord:
    """A run as a report reads it: ``info``, ``data`` and these five readers."""

    info: Any
    data: Any
    where: str  # for messages: where the record lives

    def table(self, artifact_file: str) -> pd.DataFrame:
        raise NotImplementedError

    def text(self, artifact_file: str) -> str:
        raise NotImplementedError

    def history(self, keys: list[str] | tuple[str, ...]) -> pd.DataFrame:
        """``tracking.metric_history``'s wide table."""
        raise NotImplementedError

    def timestamps(self, key: str) -> list[int]:
        """When each value of metric ``key`` was recorded (ms since the epoch), sorted."""
        raise NotImplementedError

    def datasets(self) -> list[dict[str, Any]]:
        """``tracking.logged_datasets``'s list."""
        raise NotImplementedError

    def task_file(self) -> Path | None:
        """A copy of the held-out task file kept with the record (exports only)."""
        return None


class StoreRecord(RunRecord):
    """A run of the configured MLflow store."""

    def __init__(self, run):
        self.run = run
        self.info, self.data = run.info, run.data
        self.where = "the MLflow store"

    def table(self, artifact_file: str) -> pd.DataFrame:
        return tracking.read_table(self.info.run_id, artifact_file)

    def text(self, artifact_file: str) -> str:
        return tracking.read_text(self.info.run_id, artifact_file)

    def history(self, keys: list[str] | tuple[str, ...]) -> pd.DataFrame:
        return tracking.metric_history(self.info.run_id, keys)

    def timestamps(self, key: str) -> list[int]:
        return tracking.metric_timestamps(self.info.run_id, key)

    def datasets(self) -> list[dict[str, Any]]:
        return tracking.logged_datasets(self.run)


class ExportedRecord(RunRecord):
    """A run exported by ``export_run``: a folder holding ``run.yaml``."""

    def __init__(self, folder: str | Path):
        self.folder = _shown(Path(folder))
        self.where = f"the export {str(self.folder)!r}"
        path = self.folder / RUN_FILE
        try:
            meta = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
            raise UsageError(f"{str(path)!r} cannot be read as an exported run "
                             f"({one_line(exc)}); export the run again with "
                             "`maml export RUN_ID`") from None
        if not isinstance(meta, dict) or not isinstance(meta.get("format"), int):
            raise UsageError(f"{str(path)!r} is not an exported run (no format number); "
                             "export the run again with `maml export RUN_ID`")
        if meta["format"] > FORMAT:
            raise UsageError(f"{str(path)!r} was written in export format {meta['format']} by "
                             f"a newer version of this project, which reads format {FORMAT} "
                             "only; update this checkout")
        info = meta.get("info") or {}
        self.info = RunInfo(**{k: info.get(k) for k in RunInfo.__dataclass_fields__})
        if not tracking.is_run_id(str(self.info.run_id)):
            raise UsageError(f"{str(path)!r} names no run id (info.run_id): it was edited or "
                             "cut short; export the run again with `maml export RUN_ID`")
        self.data = RunData(**{k: {str(a): b for a, b in (meta.get(k) or {}).items()}
                               for k in ("tags", "params", "metrics")})
        self.meta = meta
        self._metrics: pd.DataFrame | None = None

    def _artifact(self, artifact_file: str) -> Path:
        path = self.folder / ARTIFACTS_DIR / artifact_file
        if not path.is_file():
            raise tracking.TrackingError(
                f"run {self.info.run_id} ({self.where}) has no artifact {artifact_file!r}: it "
                "had none when it was exported; once the run has it (e.g. after `maml train "
                f"--resume {self.info.run_id}`), export it again")
        return path

    def table(self, artifact_file: str) -> pd.DataFrame:
        read = tracking.table_reader(artifact_file)
        return read(self._artifact(artifact_file))

    def task_file(self) -> Path | None:
        """The copy of the held-out task file the run was evaluated on, if it named one."""
        found = sorted((self.folder / ARTIFACTS_DIR / TASKS_DIR).glob("*"))
        return found[0] if found else None

    def text(self, artifact_file: str) -> str:
        return self._artifact(artifact_file).read_text(encoding="utf-8")

    def metrics(self) -> pd.DataFrame:
        """``metrics.csv``: every recorded value (empty if the run recorded none)."""
        if self._metrics is None:
            path = self.folder / METRICS_FILE
            self._metrics = (pd.read_csv(path, dtype={"key": str}, **_EXACT_FLOATS)
                             if path.is_file()
                             else pd.DataFrame(columns=METRIC_COLUMNS))
        return self._metrics

    def history(self, keys: list[str] | tuple[str, ...]) -> pd.DataFrame:
        m = self.metrics()
        return tracking.wide_history({
            key: list(zip(rows["step"].astype(int), rows["value"].astype(float),
                          rows["timestamp"].astype(int), strict=True))
            for key, rows in ((k, m[m["key"] == k]) for k in keys)})

    def timestamps(self, key: str) -> list[int]:
        m = self.metrics()
        return sorted(int(t) for t in m.loc[m["key"] == key, "timestamp"])

    def datasets(self) -> list[dict[str, Any]]:
        return list(self.meta.get("datasets") or [])


def is_export(ref: str | Path) -> bool:
    return (Path(ref) / RUN_FILE).is_file()


def exports_only(refs: list[str] | None) -> bool:
    """Whether ``refs`` are all export folders (then the MLflow store is not read)."""
    return bool(refs) and all(is_export(ref) for ref in refs)


def _shown(path: Path) -> Path:
    """``path`` relative to the working directory where it lies below it (what a committed
    report should name), else as given."""
    try:
        return path.resolve().relative_to(Path.cwd().resolve()) if path.is_absolute() else path
    except ValueError:
        return path


def check_ref(ref: str, flag: str = "--run") -> None:
    """``UsageError`` unless ``ref`` is an MLflow run id or an export folder."""
    if not (tracking.is_run_id(str(ref)) or is_export(ref)):
        raise UsageError(f"{flag} {str(ref)!r} is neither an MLflow run id (32 hex digits, as "
                         "`maml train` and `maml baseline` print) nor a folder written by "
                         f"`maml export` (one holding {RUN_FILE})")


def open_record(ref: Any) -> RunRecord:
    """A record from a run id, an export folder, an MLflow ``Run`` or a record."""
    if isinstance(ref, RunRecord):
        return ref
    if not isinstance(ref, str | Path):
        return StoreRecord(ref)  # an mlflow.entities.Run
    check_ref(str(ref))
    if is_export(ref):
        return ExportedRecord(ref)
    return StoreRecord(tracking.get_run(str(ref)))


# ----------------------------------------------------------------------- held-out tasks
def held_out_task_table(run) -> tuple[pd.DataFrame | None, Any]:
    """The held-out tasks the ``run`` (an MLflow run or a ``RunRecord``) was evaluated on,
    rebuilt from its ``config.yaml`` (its ``task.test_tasks`` file, or the seeded draw) and
    accepted only if the table has the digest of an evaluation dataset the run logged:
    ``(tasks, family)``, or ``(None, why)``. A task file that is missing or changed at the
    recorded path (e.g. one recorded in another checkout) is also looked for in an export's
    copy and in this repository's ``data/``."""
    tasks, family_or_why, _ = held_out_task_source(run)
    return tasks, family_or_why


def held_out_task_source(run) -> tuple[pd.DataFrame | None, Any, Path | None]:
    """``held_out_task_table`` and the task file it read (None for a seeded draw)."""
    run = open_record(run)
    logged = [d for d in run.datasets() if d["context"] == "evaluation"]
    if not logged:
        return None, "it logged no held-out task set", None
    digests = {d["digest"] for d in logged}
    try:
        data = yaml.safe_load(run.text("config.yaml"))
        data = {**data, "device": "cpu"}  # rebuilding tasks needs no accelerator
        config = load_run_config(data=data)
        family = config.family()
    except (tracking.TrackingError, ConfigError, yaml.YAMLError, TypeError,
            ValueError) as exc:
        return None, f"its config.yaml could not be read or validated ({exc})", None
    paths = [config.task.test_tasks]
    if config.task.test_tasks:
        copy = run.task_file()
        paths = [*([str(copy)] if copy else []), config.task.test_tasks,
                 str(DATA / Path(config.task.test_tasks).name)]
    for path in dict.fromkeys(paths):
        task = config.task.model_copy(update={"test_tasks": path})
        try:
            tasks = held_out_tasks(config.model_copy(update={"task": task}), family)
        except (TaskSetError, ValueError, TypeError):
            continue
        if tracking.dataset_digest(tasks) in digests:
            return tasks, family, Path(path) if path else None
    return None, (f"no task table with the digest it logged ({', '.join(sorted(digests))}, "
                  f"from {logged[-1]['source']}) is found here"), None


# ------------------------------------------------------------------------------- export
def _copy_artifacts(run_id: str, dest: Path) -> list[str]:
    """Download the report's artifacts of the run into ``dest``; the ones it had."""
    client = tracking.active_config().client()
    present = {a.path for a in client.list_artifacts(run_id)}
    copied = []
    for name in EXPORTED_ARTIFACTS:
        if name in present:
            client.download_artifacts(run_id, name, str(dest))
            copied.append(name)
    return copied


def _copy_task_file(run, dest: Path) -> str | None:
    """Copy the held-out task file the run was evaluated on (the one with the digest it
    logged) into ``dest``: the run's config names it by a path of the machine that made it."""
    _, _, path = held_out_task_source(StoreRecord(run))
    if path is None:
        return None  # a seeded draw, rebuilt from the config anywhere; or not rebuildable
    dest.mkdir(parents=True)
    shutil.copy2(path, dest / path.name)
    return path.name


def _copy_model(run, dest: Path) -> str | None:
    """Into ``dest``: the run's last logged policy (``params.safetensors``, ``policy.json``)
    or, where it logged none of ours (``pipeline.register_model: false``), its last
    checkpoint. Returns which ("policy", "checkpoint") or None."""
    run_id = run.info.run_id
    client = tracking.active_config().client()
    with tempfile.TemporaryDirectory() as tmp:
        files, kind = [], None
        if run.outputs and run.outputs.model_outputs:
            try:
                files = list(find_policy_files(tracking.download_run_model(run_id, tmp)))
                kind = "policy"
            except (PolicyFileError, tracking.TrackingError):
                files = []  # not a policy of ours, or not downloadable: try the checkpoints
        if not files and "checkpoints" in {a.path for a in client.list_artifacts(run_id)}:
            latest = latest_checkpoint(client.download_artifacts(run_id, "checkpoints", tmp))
            if latest is not None:
                files, kind = [latest, latest.with_suffix(".safetensors")], "checkpoint"
        if not files:
            return None
        dest.mkdir(parents=True)
        for path in files:
            shutil.copy2(path, dest / path.name)
    return kind


def export_run(run_id: str, out: str | Path = "docs/results/runs") -> Path:
    """Write ``out/<run_id>/`` (see the module's docstring) and return it. The folder is
    written beside its place and swapped in when complete, so a failure leaves an earlier
    export of the run as it was."""
    run = tracking.get_run(run_id)
    client = tracking.active_config().client()
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{run.info.run_id}-", dir=out))
    except OSError as exc:
        raise UsageError(f"--out {str(out)!r} cannot be written ({exc.strerror or exc}); give "
                         "a writable folder") from None
    dest = out / run.info.run_id
    try:
        rows = [(key, m.step, m.value, m.timestamp) for key in sorted(run.data.metrics)
                for m in client.get_metric_history(run.info.run_id, key)]
        pd.DataFrame(rows, columns=METRIC_COLUMNS).sort_values(
            ["key", "step", "timestamp"], kind="stable").to_csv(work / METRICS_FILE,
                                                                index=False)
        (work / ARTIFACTS_DIR).mkdir()
        artifacts = _copy_artifacts(run.info.run_id, work / ARTIFACTS_DIR)
        tasks = (_copy_task_file(run, work / ARTIFACTS_DIR / TASKS_DIR)
                 if "config.yaml" in artifacts else None)
        model = _copy_model(run, work / MODEL_DIR)
        cfg = tracking.active_config()
        meta = {
            "format": FORMAT,
            "exported": {"at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                         "from": cfg.tracking_uri, "experiment": cfg.experiment_name,
                         "artifacts": artifacts, "task_file": tasks, "model": model},
            "info": {k: getattr(run.info, k) for k in RunInfo.__dataclass_fields__},
            "tags": dict(sorted(run.data.tags.items())),
            "params": dict(sorted(run.data.params.items())),
            "metrics": dict(sorted(run.data.metrics.items())),
            "datasets": tracking.logged_datasets(run),
        }
        (work / RUN_FILE).write_text(yaml.safe_dump(meta, sort_keys=False, allow_unicode=True),
                                     encoding="utf-8")
        os.chmod(work, 0o755)  # mkdtemp's 0700 would follow the folder into the repository
        _swap_in(work, dest)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return dest


def _swap_in(work: Path, dest: Path) -> None:
    """Move the complete folder ``work`` to ``dest``, replacing an earlier one only once the
    new one is in place (it is put back if the move fails)."""
    if not dest.exists():
        work.rename(dest)
        return
    old = dest.with_name(f".{dest.name}-old")
    shutil.rmtree(old, ignore_errors=True)
    dest.rename(old)
    try:
        work.rename(dest)
    except BaseException:
        old.rename(dest)
        raise
    shutil.rmtree(old, ignore_errors=True)
