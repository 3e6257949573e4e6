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
from flows.errors import UsageError, one_line
from flows.policy_model import PolicyFileError, find_policy_files

FORMAT = 1
RUN_FILE = "run.yaml"
METRICS_FILE = "metrics.csv"
ARTIFACTS_DIR = "artifacts"
MODEL_DIR = "model"
EXPORTED_ARTIFACTS = ("config.yaml", "evaluation")  # what a report reads of a run
METRIC_COLUMNS = ["key", "step", "value", "timestamp"]


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
        self.folder = Path(folder)
        self.where = f"the export {str(self.folder)!r}"
        path = self.folder / RUN_FILE
        try:
            meta = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
            raise UsageError(f"{str(path)!r} cannot be read as an exported run "
                             f"({one_line(exc)}); export the run again with "
                             "`maml export RUN_ID`") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise UsageError(f"{str(path)!r} is not an exported run of format {FORMAT}; "
                             "export the run again with `maml export RUN_ID`")
        info = meta.get("info") or {}
        self.info = RunInfo(**{k: info.get(k) for k in RunInfo.__dataclass_fields__})
        if not tracking.is_run_id(str(self.info.run_id)):
            raise UsageError(f"{str(path)!r} names no run id (info.run_id)")
        self.data = RunData(**{k: {str(a): b for a, b in (meta.get(k) or {}).items()}
                               for k in ("tags", "params", "metrics")})
        self.meta = meta
        self._metrics: pd.DataFrame | None = None

    def _artifact(self, artifact_file: str) -> Path:
        path = self.folder / ARTIFACTS_DIR / artifact_file
        if not path.is_file():
            raise tracking.TrackingError(f"run {self.info.run_id} ({self.where}) has no "
                                         f"artifact {artifact_file!r}")
        return path

    def table(self, artifact_file: str) -> pd.DataFrame:
        suffix = Path(artifact_file).suffix
        if suffix not in (".csv", ".parquet", ".pq"):
            raise tracking.TrackingError(f"table artifact {artifact_file!r}: use a .parquet or "
                                         ".csv name")
        path = self._artifact(artifact_file)
        return pd.read_csv(path) if suffix == ".csv" else pd.read_parquet(path)

    def text(self, artifact_file: str) -> str:
        return self._artifact(artifact_file).read_text(encoding="utf-8")

    def metrics(self) -> pd.DataFrame:
        """``metrics.csv``: every recorded value (empty if the run recorded none)."""
        if self._metrics is None:
            path = self.folder / METRICS_FILE
            self._metrics = (pd.read_csv(path, dtype={"key": str}) if path.is_file()
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


def open_record(ref: Any) -> RunRecord:
    """A record from a run id, an export folder, an MLflow ``Run`` or a record."""
    if isinstance(ref, RunRecord):
        return ref
    if not isinstance(ref, str | Path):
        return StoreRecord(ref)  # an mlflow.entities.Run
    if is_export(ref):
        return ExportedRecord(ref)
    if tracking.is_run_id(str(ref)):
        return StoreRecord(tracking.get_run(str(ref)))
    raise UsageError(f"{str(ref)!r} is neither an MLflow run id (32 hex digits, as `maml train` "
                     f"and `maml baseline` print) nor a folder holding an exported run's "
                     f"{RUN_FILE} (`maml export RUN_ID`)")


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


def _copy_model(run, dest: Path) -> str | None:
    """Into ``dest``: the run's last logged policy (``params.safetensors``, ``policy.json``)
    or, where it logged none (``pipeline.register_model: false``), its last checkpoint.
    Returns which ("policy", "checkpoint") or None."""
    run_id = run.info.run_id
    with tempfile.TemporaryDirectory() as tmp:
        if run.outputs and run.outputs.model_outputs:
            try:
                files = list(find_policy_files(tracking.download_run_model(run_id, tmp)))
            except PolicyFileError:
                files = []  # a model of another kind: not ours to read back
            kind = "policy"
        else:
            client = tracking.active_config().client()
            manifests = sorted(a.path for a in client.list_artifacts(run_id, "checkpoints")
                               if a.path.endswith(".json"))
            latest = manifests[-1:]
            latest += [m.removesuffix(".json") + ".safetensors" for m in latest]
            files = [Path(client.download_artifacts(run_id, name, tmp)) for name in latest]
            kind = "checkpoint"
        if not files:
            return None
        dest.mkdir(parents=True)
        for path in files:
            shutil.copy2(path, dest / path.name)
    return kind


def export_run(run_id: str, out: str | Path = "docs/results/runs") -> Path:
    """Write ``out/<run_id>/`` (see the module's docstring) and return it. The folder is
    written beside its place and moved there when complete, so a failure leaves an earlier
    export of the run as it was."""
    run = tracking.get_run(run_id)
    client = tracking.active_config().client()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    dest = out / run.info.run_id
    work = Path(tempfile.mkdtemp(prefix=f".{run.info.run_id}-", dir=out))
    try:
        rows = [(key, m.step, m.value, m.timestamp) for key in sorted(run.data.metrics)
                for m in client.get_metric_history(run.info.run_id, key)]
        pd.DataFrame(rows, columns=METRIC_COLUMNS).sort_values(
            METRIC_COLUMNS, kind="stable").to_csv(work / METRICS_FILE, index=False)
        (work / ARTIFACTS_DIR).mkdir()
        artifacts = _copy_artifacts(run.info.run_id, work / ARTIFACTS_DIR)
        model = _copy_model(run, work / MODEL_DIR)
        cfg = tracking.active_config()
        meta = {
            "format": FORMAT,
            "exported": {"at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                         "from": cfg.tracking_uri, "experiment": cfg.experiment_name,
                         "artifacts": artifacts, "model": model},
            "info": {k: getattr(run.info, k) for k in RunInfo.__dataclass_fields__},
            "tags": dict(sorted(run.data.tags.items())),
            "params": dict(sorted(run.data.params.items())),
            "metrics": dict(sorted(run.data.metrics.items())),
            "datasets": tracking.logged_datasets(run),
        }
        (work / RUN_FILE).write_text(yaml.safe_dump(meta, sort_keys=False, allow_unicode=True),
                                     encoding="utf-8")
        os.chmod(work, 0o755)  # mkdtemp's 0700 would follow the folder into the repository
        if dest.exists():
            old = dest.with_name(f".{dest.name}-old")
            shutil.rmtree(old, ignore_errors=True)
            dest.rename(old)
            work.rename(dest)
            shutil.rmtree(old)
        else:
            work.rename(dest)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return dest
