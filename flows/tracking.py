"""MLflow side of the pipeline: configuration, runs, metrics, datasets, policy models, lineage.

Every call goes through ``mlflow.MlflowClient`` with an explicit run id: MLflow's fluent "active
run" is thread-local state that does not follow a run into Prefect's worker threads. This module
does not import Prefect.

* Configuration: ``mlflow.yaml`` (see ``load_tracking_config``), overridden by the environment
  variables ``MLFLOW_TRACKING_URI``, ``MLFLOW_EXPERIMENT_NAME`` and ``MAML_REGISTERED_MODEL``.
  ``TrackingConfig.setup()`` makes MLflow quiet, disables pickle deserialization when loading
  models, sets the tracking and registry URIs and creates the experiment. (MLflow 3 reads
  ``MLFLOW_ALLOW_PICKLE_DESERIALIZATION``, default true, in ``pyfunc`` and the pickle-based
  flavors before unpickling; ``setup()`` sets it to ``false`` for the whole process.)
* Policies are logged as MLflow "models from code": the source file ``flows/policy_model.py``, a
  copy of ``maml_core`` and two artifacts, ``params.safetensors`` and ``policy.json``. Nothing is
  pickled, and ``load_policy`` reads the two artifacts directly (never through pyfunc).
* Lineage: model version -> source run (config params, dataset inputs, git commit) -> the parent
  model version it was warm-started from (run tag ``maml.parent_model_version``) -> ...
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import subprocess
import tempfile
import textwrap
import threading
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import torch
import yaml
from mlflow import MlflowClient
from mlflow.entities import (
    DatasetInput,
    InputTag,
    LoggedModelOutput,
    LoggedModelStatus,
    Metric,
    Param,
    RunTag,
)
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.models import Model, ModelSignature
from mlflow.protos.databricks_pb2 import (
    RESOURCE_ALREADY_EXISTS,
    RESOURCE_DOES_NOT_EXIST,
    ErrorCode,
)
from mlflow.types import ColSpec, Schema, TensorSpec
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT, MLFLOW_GIT_COMMIT
from mlflow.utils.validation import (
    MAX_METRICS_PER_BATCH,
    MAX_PARAM_VAL_LENGTH,
    MAX_PARAMS_TAGS_PER_BATCH,
    MAX_TAG_VAL_LENGTH,
)
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator
from safetensors.torch import save as st_save

from flows.policy_model import (
    FORMAT_VERSION,
    MANIFEST_ARTIFACT,
    MANIFEST_FILE,
    PARAMS_ARTIFACT,
    PARAMS_FILE,
    PolicyFileError,
    find_policy_files,
    read_policy_files,
)
from flows.settings import maml_home
from maml_core.allocator import allocator_in_use
from maml_core.faults import fault_point

PROJECT_ROOT = Path(__file__).resolve().parent.parent
CONFIG_FILE = "mlflow.yaml"
POLICY_MODEL_CODE = Path(__file__).resolve().parent / "policy_model.py"
MAML_CORE_DIR = PROJECT_ROOT / "maml_core"
LOGGED_MODEL_NAME = "policy"

# Tags written by this module.
TAG_GIT_COMMIT = "maml.git_commit"
TAG_FLOW_RUN_ID = "prefect.flow_run_id"
TAG_PARENT_VERSION = "maml.parent_model_version"
TAG_RUN_ID = "maml.run_id"
TAG_ITERATION = "maml.iteration"
TAG_POLICY_CLASS = "maml.policy_class"
TAG_TRUNCATED_PARAMS = "maml.truncated_params"
TAG_COMMAND = "maml.command"
# The malloc the process ran on (glibc, or jemalloc with MAML_ALLOCATOR=jemalloc); a resume
# overwrites it with its own.
TAG_ALLOCATOR = "maml.allocator"
# Set on each ``maml train --resume``: <prefix><unix seconds> = the iteration it resumed at, and
# the command line that resumed it (same suffix).
TAG_RESUMED_AT = "maml.resumed_at_"
TAG_RESUME_COMMAND = "maml.resume_command_"
# Why a training stopped before its end (``flows.training.record_stop``); on resume the reason
# moves to ``TAG_STOPPED`` + the resume's unix seconds, so that a finished run carries no stale
# failure, and its history stays readable.
TAG_FAILURE = "maml.failure"
TAG_INTERRUPTED = "maml.interrupted"
TAG_STOPPED = "maml.stopped_"

_LOG = logging.getLogger(__name__)
_RUN_ID = re.compile(r"^[0-9a-f]{32}$")
_TRUNCATED = "...[truncated]"


class TrackingError(ValueError):
    """A tracking configuration or reference (run, model, alias) that cannot be used."""


# ---------------------------------------------------------------------------------- config
class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class AliasesConfig(_Strict):
    champion: str = "champion"
    challenger: str = "challenger"

    @field_validator("champion", "challenger")
    @classmethod
    def _valid_alias(cls, value: str) -> str:
        if not value or value.lower() == "latest" or re.fullmatch(r"[vV]\d+", value):
            raise ValueError(f"{value!r} cannot be a registry alias ('latest' and 'v<number>' "
                             "are reserved by MLflow)")
        return value


class TrackingConfig(_Strict):
    """Validated ``mlflow.yaml``; paths are absolute once loaded by ``load_tracking_config``."""

    tracking_uri: str = Field("sqlite:///.maml/mlflow.db",
                              description="tracking (and model-registry) URI")
    experiment_name: str = Field("maml", min_length=1)
    artifact_location: str = Field(".maml/mlartifacts",
                                   description="artifact root of a newly created experiment")
    registered_model_name: str = Field("maml-policy", min_length=1)
    aliases: AliasesConfig = Field(default_factory=AliasesConfig)

    # (tracking URI, experiment name, experiment id) of the last setup()
    _experiment: tuple[str, str, str] | None = PrivateAttr(None)

    def resolved(self) -> TrackingConfig:
        """A copy with absolute paths (also inside ``sqlite:///``); see ``resolve_path``."""
        return self.model_copy(update={
            "tracking_uri": _resolve_uri(self.tracking_uri),
            "artifact_location": _resolve_location(self.artifact_location),
        })

    def alias(self, role_or_alias: str) -> str:
        """The registry alias of a role (``champion``/``challenger``), else the name itself."""
        if role_or_alias in AliasesConfig.model_fields:
            return getattr(self.aliases, role_or_alias)
        return role_or_alias

    def client(self) -> MlflowClient:
        return MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri)

    @property
    def experiment_id(self) -> str:
        """The experiment's id (``setup()`` runs first if it has not for these settings)."""
        if self._experiment and self._experiment[:2] == (self.tracking_uri,
                                                         self.experiment_name):
            return self._experiment[2]
        return self.setup()

    def setup(self) -> str:
        """Make MLflow quiet and pickle-free, point it at this store, create/get the
        experiment; returns the experiment id. Safe to call more than once."""
        global _ACTIVE
        quiet_mlflow()
        # MLflow 3 setting (default true): when false, loading a model that needs pickle
        # (a cloudpickled PythonModel, sklearn/pytorch/... pickles) raises instead. Our policies
        # are models from code + safetensors and load either way.
        os.environ["MLFLOW_ALLOW_PICKLE_DESERIALIZATION"] = "false"
        resolved = self.resolved()  # e.g. a TrackingConfig() built in code with relative paths
        if resolved.tracking_uri != self.tracking_uri:
            self.tracking_uri = resolved.tracking_uri
        if resolved.artifact_location != self.artifact_location:
            self.artifact_location = resolved.artifact_location
        _ensure_sqlite_dir(self.tracking_uri)
        if not re.match(r"^[a-z][a-z0-9+.-]*://", self.artifact_location):
            Path(self.artifact_location).mkdir(parents=True, exist_ok=True)
        with _LOCK:
            mlflow.set_tracking_uri(self.tracking_uri)
            mlflow.set_registry_uri(self.tracking_uri)
            client = self.client()
            exp = client.get_experiment_by_name(self.experiment_name)
            if exp is None:
                location = self.artifact_location
                if not re.match(r"^[a-z][a-z0-9+.-]*://", location):
                    location = Path(location).resolve().as_uri()
                try:
                    exp_id = client.create_experiment(self.experiment_name,
                                                      artifact_location=location)
                except MlflowException as exc:  # created concurrently
                    if exc.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
                        raise
                    exp_id = client.get_experiment_by_name(self.experiment_name).experiment_id
            elif exp.lifecycle_stage != "active":
                raise TrackingError(f"experiment {self.experiment_name!r} was deleted; restore it "
                                    f"(`mlflow experiments restore --experiment-id "
                                    f"{exp.experiment_id}`) or set MLFLOW_EXPERIMENT_NAME to "
                                    "another name")
            else:
                exp_id = exp.experiment_id
            self._experiment = (self.tracking_uri, self.experiment_name, exp_id)
            _ACTIVE = self
        return exp_id


_ACTIVE: TrackingConfig | None = None
_LOCK = threading.RLock()
# The command line that is running (``maml train ...``), tagged on every run it starts.
_COMMAND: str | None = None


@contextlib.contextmanager
def recording_command(command: str | None):
    """While inside, every run that ``start_run`` creates gets the tag ``maml.command`` =
    ``command`` (the CLI wraps each subcommand in this)."""
    global _COMMAND
    previous, _COMMAND = _COMMAND, command
    try:
        yield
    finally:
        _COMMAND = previous


def current_command() -> str | None:
    """The command line given to ``recording_command`` (None outside of one)."""
    return _COMMAND


def resolve_path(path: str | Path) -> Path:
    """An absolute path: relative paths are taken from the current directory, like the rest of
    the pipeline's local state, except that a leading ``.maml/`` means the local-state folder
    (``flows.settings.maml_home()``: ``./.maml``, or ``$MAML_HOME`` when set)."""
    path = Path(path).expanduser()
    if path.is_absolute():
        return path
    if path.parts and path.parts[0] == ".maml":
        return maml_home().joinpath(*path.parts[1:])
    return path.resolve()


def _resolve_uri(uri: str) -> str:
    if uri.startswith("sqlite:///"):
        path = uri[len("sqlite:///"):]
        if path and path != ":memory:" and not path.startswith("/"):
            return "sqlite:///" + str(resolve_path(path))
        return uri
    if "://" in uri or re.match(r"^[a-z][a-z0-9+.-]*:", uri):
        return uri
    return str(resolve_path(uri))  # a plain path: MLflow's file store


def _resolve_location(location: str) -> str:
    if re.match(r"^[a-z][a-z0-9+.-]*://", location):
        return location
    return str(resolve_path(location))


def _ensure_sqlite_dir(uri: str) -> None:
    if uri.startswith("sqlite:///"):
        path = uri[len("sqlite:///"):]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)


def _format_validation_error(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "<root>"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            known = ", ".join(TrackingConfig.model_fields)
            msg = f"unknown key (known keys: {known}; aliases: champion, challenger)"
        lines.append(f"{key}: {msg}")
    return f"invalid tracking configuration {source}: " + "; ".join(lines)


def default_config_path() -> Path | None:
    """``./mlflow.yaml`` if present, else the project's ``mlflow.yaml``, else None."""
    for candidate in (Path.cwd() / CONFIG_FILE, PROJECT_ROOT / CONFIG_FILE):
        if candidate.is_file():
            return candidate
    return None


def load_tracking_config(path: str | Path | None = None) -> TrackingConfig:
    """Read and validate ``mlflow.yaml`` (default: ``default_config_path()``; built-in
    defaults if there is none), apply the environment overrides ``MLFLOW_TRACKING_URI``,
    ``MLFLOW_EXPERIMENT_NAME`` and ``MAML_REGISTERED_MODEL``, and make relative paths absolute
    (``resolve_path``). Unknown keys and bad values raise ``TrackingError`` naming the key."""
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise TrackingError(f"tracking config {str(path)!r} does not exist")
    else:
        path = default_config_path()
    data: Any = {}
    if path is not None:
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise TrackingError(f"tracking config {str(path)!r} is not valid YAML: {exc}"
                                ) from None
        if not isinstance(data, dict):
            raise TrackingError(f"tracking config {str(path)!r} must hold a mapping of keys "
                                "to values")
    source = repr(str(path)) if path is not None else "(defaults)"
    try:
        cfg = TrackingConfig.model_validate(data)
    except ValidationError as err:
        raise TrackingError(_format_validation_error(err, source)) from None
    env = {"tracking_uri": os.environ.get("MLFLOW_TRACKING_URI"),
           "experiment_name": os.environ.get("MLFLOW_EXPERIMENT_NAME"),
           "registered_model_name": os.environ.get("MAML_REGISTERED_MODEL")}
    env = {k: v for k, v in env.items() if v}
    if env:
        try:
            cfg = TrackingConfig.model_validate({**cfg.model_dump(), **env})
        except ValidationError as err:
            raise TrackingError(_format_validation_error(err, "(environment)")) from None
    return cfg.resolved()


def quiet_mlflow() -> None:
    """Hide MLflow/alembic INFO chatter and git-missing warnings nobody can act on."""
    os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    for name in ("mlflow", "alembic", "alembic.runtime.migration"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # SQLAlchemy deprecations raised inside MLflow's own store code
    warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"mlflow\.")


def active_config() -> TrackingConfig:
    """The configuration of the last ``setup()``; loads and sets up ``mlflow.yaml`` if none."""
    with _LOCK:
        if _ACTIVE is None:
            load_tracking_config().setup()
        return _ACTIVE  # type: ignore[return-value]


def _client() -> MlflowClient:
    return active_config().client()


def _is_not_found(exc: MlflowException) -> bool:
    return exc.error_code == ErrorCode.Name(RESOURCE_DOES_NOT_EXIST)


# ---------------------------------------------------------------------------------- runs
def git_commit(cwd: str | Path | None = None) -> str | None:
    """``git rev-parse HEAD`` of the project, or None (no git, not a repository)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd or PROJECT_ROOT,
                             capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    commit = out.stdout.strip()
    return commit if out.returncode == 0 and re.fullmatch(r"[0-9a-f]{7,64}", commit) else None


def _tag_value(value: Any) -> str:
    text = str(value)
    if len(text) > MAX_TAG_VAL_LENGTH:
        text = text[:MAX_TAG_VAL_LENGTH - len(_TRUNCATED)] + _TRUNCATED
    return text


def _set_tags(client: MlflowClient, run_id: str, tags: Mapping[str, Any]) -> None:
    items = [RunTag(k, _tag_value(v)) for k, v in tags.items() if v is not None]
    for i in range(0, len(items), MAX_PARAMS_TAGS_PER_BATCH):
        client.log_batch(run_id, tags=items[i:i + MAX_PARAMS_TAGS_PER_BATCH])


def start_run(cfg: TrackingConfig | None = None, run_name: str | None = None,
              tags: Mapping[str, Any] | None = None, *, flow_run_id: str | None = None,
              parent_model_version: Any = None, resume_run_id: str | None = None) -> str:
    """Create a run in ``cfg``'s experiment (or reopen ``resume_run_id``); returns its id.

    Tags: git commit (``mlflow.source.git.commit`` and ``maml.git_commit``) when known,
    ``maml.command`` (a new run, inside ``recording_command``), ``prefect.flow_run_id`` if
    given, ``maml.parent_model_version`` (see ``parent_model_uri``) when warm-started, plus
    ``tags``."""
    cfg = cfg or active_config()
    experiment_id = cfg.experiment_id
    client = cfg.client()
    all_tags: dict[str, Any] = {}
    commit = git_commit()
    if commit:
        all_tags[MLFLOW_GIT_COMMIT] = commit
        all_tags[TAG_GIT_COMMIT] = commit
    if flow_run_id:
        all_tags[TAG_FLOW_RUN_ID] = str(flow_run_id)
    if parent_model_version is not None:
        all_tags[TAG_PARENT_VERSION] = parent_model_uri(parent_model_version,
                                                        cfg.registered_model_name)
    if _COMMAND and not resume_run_id:
        all_tags[TAG_COMMAND] = _COMMAND
    all_tags[TAG_ALLOCATOR] = allocator_in_use()
    all_tags.update(tags or {})
    if resume_run_id:
        run = get_run(resume_run_id)
        client.update_run(resume_run_id, status="RUNNING")
        _set_tags(client, run.info.run_id, all_tags)
        return run.info.run_id
    run = client.create_run(experiment_id, run_name=run_name,
                            tags={k: _tag_value(v) for k, v in all_tags.items() if v is not None})
    return run.info.run_id


def is_run_id(text: str) -> bool:
    """Whether ``text`` looks like an MLflow run id (32 hex digits)."""
    return bool(_RUN_ID.fullmatch(text))


def end_run(run_id: str, status: str = "FINISHED") -> None:
    """Mark a run FINISHED / FAILED / KILLED."""
    _client().set_terminated(run_id, status=status)


def get_run(run_id: str):
    """The run, or ``TrackingError`` if it does not exist."""
    try:
        return _client().get_run(run_id)
    except MlflowException as exc:
        if _is_not_found(exc):
            raise TrackingError(f"MLflow run {run_id!r} does not exist in "
                                f"{active_config().tracking_uri}") from None
        raise


def search_runs(filter_string: str = "", order_by: list[str] | None = None) -> list:
    """All runs of the configured experiment that match ``filter_string`` (MLflow's search
    syntax, e.g. ``"tags.`maml.kind` = 'baseline'"``), newest first unless ``order_by``."""
    cfg = active_config()
    client = cfg.client()
    runs, token = [], None
    while True:
        page = client.search_runs([cfg.experiment_id], filter_string=filter_string,
                                  order_by=order_by or ["attributes.start_time DESC"],
                                  max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def require_run(run_id: str, reopen: bool = True) -> str:
    """``run_id`` if the run exists (``TrackingError`` otherwise); with ``reopen``, a run that
    ended (e.g. FAILED) is marked RUNNING again, for resuming it."""
    run = get_run(run_id)
    if reopen and run.info.status != "RUNNING":
        _client().update_run(run_id, status="RUNNING")
    return run.info.run_id


def set_tags(run_id: str, tags: Mapping[str, Any]) -> None:
    """Set run tags (values stringified, ``None`` skipped)."""
    _set_tags(_client(), run_id, tags)


def flatten_config(config: Any, prefix: str = "") -> dict[str, str]:
    """Nested config (dict or pydantic model) -> ``{"inner.step_size": "0.1", ...}``; lists
    and empty mappings become JSON, ``None`` becomes ``"null"``."""
    if isinstance(config, BaseModel):
        config = config.model_dump(mode="json")
    out: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, BaseModel):
            value = value.model_dump(mode="json")
        if isinstance(value, Mapping) and value:
            out.update(flatten_config(value, name + "."))
        elif isinstance(value, str):
            out[name] = value
        else:
            try:
                out[name] = json.dumps(value, sort_keys=True, default=str)
            except (TypeError, ValueError):
                out[name] = str(value)
    return out


def log_params(run_id: str, config: Any) -> dict[str, str]:
    """Log the full resolved config as dotted params (values over MLflow's 6000-character limit
    are truncated and listed in the run tag ``maml.truncated_params``). Idempotent: keys
    already logged with the same value are skipped; a different value raises
    ``TrackingError`` (MLflow params are immutable). Returns the params logged now."""
    client = _client()
    flat = flatten_config(config)
    truncated = []
    for k, v in flat.items():
        if len(v) > MAX_PARAM_VAL_LENGTH:
            flat[k] = v[:MAX_PARAM_VAL_LENGTH - len(_TRUNCATED)] + _TRUNCATED
            truncated.append(k)
    existing = get_run(run_id).data.params
    clashes = {k: (existing[k], v) for k, v in flat.items() if k in existing and existing[k] != v}
    if clashes:
        detail = "; ".join(f"{k}: logged {a!r}, now {b!r}" for k, (a, b) in sorted(clashes.items()))
        raise TrackingError(f"run {run_id} already has other values for these params (a "
                            f"resumed run must use the same config): {detail}")
    new = {k: v for k, v in flat.items() if k not in existing}
    items = [Param(k, v) for k, v in new.items()]
    for i in range(0, len(items), MAX_PARAMS_TAGS_PER_BATCH):
        client.log_batch(run_id, params=items[i:i + MAX_PARAMS_TAGS_PER_BATCH])
    if truncated:
        _set_tags(client, run_id, {TAG_TRUNCATED_PARAMS: ",".join(sorted(truncated))})
    return new


# (tracking URI, run id, metric key) -> steps recorded; filled from the store on first use, so
# a resumed process starts from what the store holds. One writer process per run is assumed.
_STEPS: dict[tuple[str, str, str], set[int]] = {}
_METRICS_LOCK = threading.Lock()


def logged_steps(run_id: str, key: str) -> set[int]:
    """The steps at which metric ``key`` is already recorded in the run (read from the store)."""
    cfg = active_config()
    steps = {m.step for m in cfg.client().get_metric_history(run_id, key)}
    with _METRICS_LOCK:
        _STEPS[(cfg.tracking_uri, run_id, key)] = set(steps)
    return steps


def _as_float(key: str, value: Any) -> float:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().item()
    try:
        return float(value)
    except (TypeError, ValueError):
        raise TrackingError(f"metric {key!r}: {value!r} is not a number") from None


def log_metrics(run_id: str, metrics: Mapping[str, Any], step: int, *,
                skip_logged: bool = True, timestamp_ms: int | None = None) -> dict[str, float]:
    """Log ``metrics`` at ``step`` in one ``log_batch`` (see ``log_metric_steps``). Returns
    what was logged."""
    return log_metric_steps(run_id, {int(step): metrics}, skip_logged=skip_logged,
                            timestamp_ms=timestamp_ms).get(int(step), {})


def log_metric_steps(run_id: str, by_step: Mapping[int, Mapping[str, Any]], *,
                     skip_logged: bool = True, timestamp_ms: int | None = None
                     ) -> dict[int, dict[str, float]]:
    """Log the metrics of several steps in as few ``log_batch`` calls as MLflow allows. With
    ``skip_logged`` (default), keys already recorded at a step are skipped, so a resumed run
    that replays a step records each (key, step) exactly once; the recorded steps are read from
    the store once per (run, key) and then tracked in memory. ``None`` values are dropped.
    Returns what was logged, by step."""
    cfg = active_config()
    client = cfg.client()
    ts = int(time.time() * 1000) if timestamp_ms is None else int(timestamp_ms)
    logged: dict[int, dict[str, float]] = {}
    with _METRICS_LOCK:  # check-and-log is atomic within the process
        for step, metrics in by_step.items():
            values = {k: _as_float(k, v) for k, v in metrics.items() if v is not None}
            if skip_logged:
                for key in values:
                    if (cfg.tracking_uri, run_id, key) not in _STEPS:
                        _STEPS[(cfg.tracking_uri, run_id, key)] = {
                            m.step for m in client.get_metric_history(run_id, key)}
                values = {k: v for k, v in values.items()
                          if int(step) not in _STEPS[(cfg.tracking_uri, run_id, k)]}
            if values:
                logged[int(step)] = values
        items = [Metric(k, v, ts, step) for step, values in logged.items()
                 for k, v in values.items()]
        try:
            fault_point("mlflow:log-batch:before")
            for i in range(0, len(items), MAX_METRICS_PER_BATCH):
                client.log_batch(run_id, metrics=items[i:i + MAX_METRICS_PER_BATCH])
            fault_point("mlflow:log-batch:after")
        except BaseException:
            for values in logged.values():  # unknown what was written: re-read next time
                for key in values:
                    _STEPS.pop((cfg.tracking_uri, run_id, key), None)
            raise
        for step, values in logged.items():
            for key in values:
                if (cfg.tracking_uri, run_id, key) in _STEPS:
                    _STEPS[(cfg.tracking_uri, run_id, key)].add(step)
    return logged


def eval_metrics(summary: pd.DataFrame) -> dict[str, float]:
    """``eval_return_step_K`` (RL) or ``eval_mse_step_K`` (supervised) for each row of an
    evaluation summary (``maml_core.trainer.summary_table``)."""
    value = "mean_return" if "mean_return" in summary else "mean_mse"
    name = "eval_return" if value == "mean_return" else "eval_mse"
    return {f"{name}_step_{int(r.step)}": float(getattr(r, value))
            for r in summary.itertuples()}


def record_resume(run_id: str, iteration: int) -> None:
    """Tag run ``run_id`` as resumed at ``iteration`` (``TAG_RESUMED_AT``, ``TAG_RESUME_COMMAND``)
    and move a failure or interruption tag left by the stop to ``TAG_STOPPED``, same suffix."""
    now = int(time.time())
    client = _client()
    tags = client.get_run(run_id).data.tags
    stops = {k: tags[k] for k in (TAG_FAILURE, TAG_INTERRUPTED) if k in tags}
    new = {f"{TAG_RESUMED_AT}{now}": str(iteration), f"{TAG_RESUME_COMMAND}{now}":
           current_command()}
    if stops:
        new[f"{TAG_STOPPED}{now}"] = "; ".join(stops.values())
    _set_tags(client, run_id, new)
    try:  # only tidying: a server that refuses it does not stop the resume
        for key in stops:
            client.delete_tag(run_id, key)
    except Exception as exc:
        _LOG.warning("could not remove the tag(s) %s of run %s: %s", ", ".join(stops), run_id,
                     " ".join(str(exc).split()))


def resumes(tags: Mapping[str, str]) -> list[tuple[int, int, str | None]]:
    """The resumes recorded in a run's tags, oldest first: (unix seconds, iteration resumed
    at, the command line that resumed it or None)."""
    out = []
    for key, value in tags.items():
        suffix = key[len(TAG_RESUMED_AT):]
        if key.startswith(TAG_RESUMED_AT) and suffix.isdigit() and value.isdigit():
            out.append((int(suffix), int(value), tags.get(TAG_RESUME_COMMAND + suffix)))
    return sorted(out)


def metric_timestamps(run_id: str, key: str) -> list[int]:
    """When each value of metric ``key`` was recorded (ms since the epoch), sorted."""
    return sorted(m.timestamp for m in _client().get_metric_history(run_id, key))


def metric_history(run_id: str, keys: list[str] | tuple[str, ...]) -> pd.DataFrame:
    """Wide table of the metrics' histories: column ``iteration`` (the step) and one column per
    key that was logged (empty DataFrame if none was)."""
    client = _client()
    return wide_history({key: [(m.step, m.value, m.timestamp)
                               for m in client.get_metric_history(run_id, key)]
                         for key in keys})


def wide_history(histories: Mapping[str, list[tuple[int, float, int]]]) -> pd.DataFrame:
    """``metric_history``'s table from ``(step, value, timestamp)`` records per key: the last
    write wins where a step was recorded twice (a retried or resumed iteration)."""
    series = {}
    for key, records in histories.items():
        latest: dict[int, tuple[int, float]] = {}
        for step, value, timestamp in records:
            if step not in latest or timestamp >= latest[step][0]:
                latest[step] = (timestamp, value)
        if latest:
            series[key] = pd.Series({s: v for s, (_, v) in latest.items()}, dtype=float)
    if not series:
        return pd.DataFrame()
    table = pd.DataFrame(series).sort_index()
    table.index.name = "iteration"
    return table.reset_index()


def log_dataset(run_id: str, df: pd.DataFrame, name: str,
                source_path: str | Path | None = None, context: str = "training",
                tags: Mapping[str, str] | None = None, *,
                source: str | Path | None = None) -> str:
    """Record ``df`` (e.g. a task table) as a dataset input of the run (name, digest, schema,
    source, context); returns the digest. ``source_path`` (alias ``source``): an existing file
    (stored as its absolute path), a URI, or a description such as ``"seeded draw"`` (stored as
    a "code" source)."""
    from mlflow.data.code_dataset_source import CodeDatasetSource

    origin = source_path if source_path is not None else source
    if origin is None:
        resolved: Any = CodeDatasetSource(tags={"maml.source": "generated"})
    elif re.match(r"^[a-z][a-z0-9+.-]*://", str(origin)):
        resolved = str(origin)
    elif Path(origin).is_file():
        resolved = str(Path(origin).resolve())
    else:
        resolved = CodeDatasetSource(tags={"maml.source": str(origin)})
    with warnings.catch_warnings():
        # "integer columns cannot represent missing values" hints from schema inference
        warnings.simplefilter("ignore")
        dataset = mlflow.data.from_pandas(df, source=resolved, name=name)
        entity = dataset._to_mlflow_entity()
    input_tags = [InputTag(key=str(k), value=str(v)) for k, v in (tags or {}).items()]
    if context:
        input_tags.append(InputTag(key=MLFLOW_DATASET_CONTEXT, value=context))
    _client().log_inputs(run_id, datasets=[DatasetInput(dataset=entity, tags=input_tags)])
    return entity.digest


def log_artifact(run_id: str, local_path: str | Path, artifact_path: str | None = None) -> None:
    """Upload a file (or a directory's contents) under ``artifact_path`` of the run."""
    local_path = Path(local_path)
    if not local_path.exists():
        raise TrackingError(f"artifact {str(local_path)!r} does not exist")
    if local_path.is_dir():
        _client().log_artifacts(run_id, str(local_path), artifact_path)
    else:
        _client().log_artifact(run_id, str(local_path), artifact_path)


def _log_file(run_id: str, artifact_file: str, write) -> str:
    artifact_file = artifact_file.strip("/")
    directory, _, filename = artifact_file.rpartition("/")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / filename
        write(path)
        _client().log_artifact(run_id, str(path), directory or None)
    return artifact_file


def log_text(run_id: str, text: str, artifact_file: str) -> str:
    """Log ``text`` as the artifact file ``artifact_file``; returns its path."""
    return _log_file(run_id, artifact_file, lambda p: p.write_text(text))


def log_dict(run_id: str, data: Mapping[str, Any], artifact_file: str) -> str:
    """Log a mapping as ``.json`` or ``.yaml``/``.yml`` (by suffix); returns its path."""
    if Path(artifact_file).suffix in (".yaml", ".yml"):
        text = yaml.safe_dump(json.loads(json.dumps(dict(data), default=str)), sort_keys=False)
    else:
        text = json.dumps(data, indent=1, sort_keys=True, default=str)
    return log_text(run_id, text, artifact_file)


def log_config_artifact(run_id: str, config: Any, artifact_file: str = "config.yaml") -> str:
    """The full resolved config as an artifact (lossless, usable as ``--config``)."""
    return log_dict(run_id, _config_dict(config), artifact_file)


def log_checkpoint(run_id: str, manifest_path: str | Path,
                   artifact_path: str = "checkpoints") -> None:
    """Log a checkpoint (its ``.json`` manifest and ``.safetensors`` tensors)."""
    manifest_path = Path(manifest_path)
    if manifest_path.suffix == ".safetensors":
        manifest_path = manifest_path.with_suffix(".json")
    for path in (manifest_path.with_suffix(".safetensors"), manifest_path):
        log_artifact(run_id, path, artifact_path)


def log_table(run_id: str, df: pd.DataFrame, artifact_file: str) -> str:
    """Log a DataFrame as ``.parquet`` or ``.csv`` (by suffix); returns the artifact path."""
    suffix = Path(artifact_file).suffix
    if suffix in (".parquet", ".pq"):
        return _log_file(run_id, artifact_file, lambda p: df.to_parquet(p, index=False))
    if suffix == ".csv":
        return _log_file(run_id, artifact_file, lambda p: df.to_csv(p, index=False))
    raise TrackingError(f"table artifact {artifact_file!r}: use a .parquet or .csv name")


def log_figure(run_id: str, figure, artifact_file: str, dpi: int = 120) -> str:
    """Save a matplotlib figure as PNG, log it and close it; returns the artifact path."""
    import matplotlib.pyplot as plt

    if Path(artifact_file).suffix != ".png":
        artifact_file += ".png"
    try:
        return _log_file(run_id, artifact_file,
                         lambda p: figure.savefig(p, format="png", dpi=dpi,
                                                  bbox_inches="tight"))
    finally:
        plt.close(figure)


def log_evaluation(run_id: str, curve: pd.DataFrame, summary: pd.DataFrame,
                   adaptation_figure) -> None:
    """An evaluation's artifacts: ``evaluation/per_task.csv`` (task, step, value),
    ``evaluation/summary.csv`` (mean and 95% CI per step) and the figure as
    ``plots/adaptation_curve.png``."""
    log_table(run_id, curve, "evaluation/per_task.csv")
    log_table(run_id, summary, "evaluation/summary.csv")
    log_figure(run_id, adaptation_figure, "plots/adaptation_curve.png")


def _read_artifact(run_id: str, artifact_file: str, read):
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = Path(_client().download_artifacts(run_id, artifact_file, tmp))
        except (MlflowException, OSError) as exc:
            raise TrackingError(f"run {run_id} has no artifact {artifact_file!r} "
                                f"({' '.join(str(exc).split())[:200]})") from None
        return read(path)


def table_reader(artifact_file: str):
    """The reader of a table artifact by its suffix: ``.csv`` or ``.parquet``."""
    suffix = Path(artifact_file).suffix
    if suffix not in (".csv", ".parquet", ".pq"):
        raise TrackingError(f"table artifact {artifact_file!r}: use a .parquet or .csv name")
    return pd.read_csv if suffix == ".csv" else pd.read_parquet


def read_table(run_id: str, artifact_file: str) -> pd.DataFrame:
    """A ``.csv`` or ``.parquet`` table artifact of a run (``TrackingError`` if missing)."""
    return _read_artifact(run_id, artifact_file, table_reader(artifact_file))


def read_text(run_id: str, artifact_file: str) -> str:
    """A text artifact of a run, e.g. its ``config.yaml`` (``TrackingError`` if missing)."""
    return _read_artifact(run_id, artifact_file, lambda p: p.read_text(encoding="utf-8"))


def dataset_digest(df: pd.DataFrame) -> str:
    """The digest MLflow records for ``df`` as a dataset input (``log_dataset``)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return mlflow.data.from_pandas(df).digest


def logged_datasets(run) -> list[dict[str, Any]]:
    """The run's dataset inputs: name, digest, source type, source, context and tags."""
    return [_dataset_dict(d) for d in (run.inputs.dataset_inputs if run.inputs else [])]


# ---------------------------------------------------------------------------------- models
def _version_uri(mv: ModelVersion) -> str:
    return f"models:/{mv.name}/{mv.version}"


def _model_id_of(mv: ModelVersion) -> str | None:
    """The logged model behind a version (the SQL registry keeps it only in ``source``)."""
    if getattr(mv, "model_id", None):
        return mv.model_id
    m = re.fullmatch(r"models:/(m-[0-9a-f]+)/?", mv.source or "")
    return m.group(1) if m else None


def get_alias_version(name: str | None, alias: str) -> ModelVersion | None:
    """The version ``alias`` points to, or None (no such alias or registered model)."""
    cfg = active_config()
    name = name or cfg.registered_model_name
    client = cfg.client()
    try:
        registered = client.get_registered_model(name)
    except MlflowException as exc:
        if _is_not_found(exc):
            return None
        raise
    version = (registered.aliases or {}).get(cfg.alias(alias))
    return None if version is None else client.get_model_version(name, str(version))


def set_alias(name: str | None, alias: str, version: int | str) -> ModelVersion:
    """Point ``alias`` (or a role: champion/challenger) at ``version``; returns that version."""
    cfg = active_config()
    name = name or cfg.registered_model_name
    mv = resolve_model_version(f"models:/{name}/{version}")
    cfg.client().set_registered_model_alias(name, cfg.alias(alias), str(mv.version))
    return mv


def resolve_model_version(model_ref: Any, registered_model_name: str | None = None
                          ) -> ModelVersion:
    """A registered model version from ``models:/name@alias``, ``models:/name/version``,
    ``alias:<alias or role>``, ``name@alias``, ``name/version`` or a version number (of
    ``registered_model_name``, default: the configured name). ``TrackingError`` if missing."""
    if isinstance(model_ref, ModelVersion):
        return model_ref
    cfg = active_config()
    default_name = registered_model_name or cfg.registered_model_name
    ref = str(model_ref).strip()
    body = ref[len("models:/"):] if ref.startswith("models:/") else ref
    name, alias, version = default_name, None, None
    if ref.startswith("alias:"):
        alias = ref[len("alias:"):]
    elif re.fullmatch(r"v?\d+", body):
        version = body.lstrip("v")
    elif "@" in body:
        name, alias = body.rsplit("@", 1)
    elif "/" in body and re.fullmatch(r"\d+", body.rsplit("/", 1)[1]):
        name, version = body.rsplit("/", 1)
    else:
        raise TrackingError(f"{ref!r} is not a model reference; use models:/NAME@ALIAS, "
                            "models:/NAME/VERSION, alias:champion, a version number, a run id "
                            "or a model directory")
    if alias is not None:
        mv = get_alias_version(name, alias)
        if mv is None:
            raise TrackingError(f"model reference {ref!r}: registered model {name!r} has no "
                                f"alias {cfg.alias(alias)!r} in {cfg.tracking_uri}")
        return mv
    try:
        return cfg.client().get_model_version(name, str(version))
    except MlflowException as exc:
        if _is_not_found(exc):
            raise TrackingError(f"model reference {ref!r}: registered model {name!r} has no "
                                f"version {version} in {cfg.tracking_uri}") from None
        raise


def _pip_requirements() -> list[str]:
    import safetensors

    def pin(name: str, version: str) -> str:
        return f"{name}=={version.split('+')[0]}"

    return [pin("mlflow", mlflow.__version__), pin("torch", torch.__version__),
            pin("numpy", np.__version__), pin("pandas", pd.__version__),
            pin("safetensors", safetensors.__version__)]


def _config_dict(config: Any) -> dict:
    if config is None:
        return {}
    if isinstance(config, BaseModel):
        return config.model_dump(mode="json")
    return json.loads(json.dumps(dict(config), default=str))


def _ensure_registered_model(client: MlflowClient, name: str) -> None:
    try:
        client.get_registered_model(name)
    except MlflowException as exc:
        if not _is_not_found(exc):
            raise
        try:
            client.create_registered_model(name)
        except MlflowException as exc2:
            if exc2.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
                raise


def log_policy_model(run_id: str, learner: Any = None, registered_model_name: str | None = None,
                     *, policy: Any = None, params: Mapping[str, torch.Tensor] | None = None,
                     config: Any = None, iteration: int | None = None) -> ModelVersion:
    """Log the policy as a models-from-code pyfunc model of run ``run_id`` and register it.

    Give a ``MetaLearner`` (its policy, meta-parameters, config and iteration are used) or
    ``policy``, ``params`` and ``config``. The model version gets the tags ``maml.run_id``,
    ``maml.iteration`` and, if warm-started (the run's tag ``maml.parent_model_version``, set
    by ``start_run``), ``maml.parent_model_version``."""
    if learner is not None:
        policy = learner.policy if policy is None else policy
        params = learner.meta_params if params is None else params
        config = learner.config if config is None else config
        iteration = learner.iteration if iteration is None else iteration
    if policy is None or params is None:
        raise TypeError("log_policy_model needs a learner or both policy= and params=")
    cfg = active_config()
    client = cfg.client()
    name = registered_model_name or cfg.registered_model_name
    run = get_run(run_id)
    tensors = {k: v.detach().cpu().contiguous() for k, v in params.items()}
    missing = [k for k, _ in policy.named_parameters() if k not in tensors]
    if missing:
        raise TrackingError(f"params lack the policy parameters {missing}")
    arch = policy.architecture()
    first = tensors[next(k for k, _ in policy.named_parameters())]
    data = st_save(tensors)
    parent = run.data.tags.get(TAG_PARENT_VERSION)
    # a registry reference is normalized (a bare version number, an alias); a logged model or
    # directory was resolved by start_run, and the directory may be gone since: kept as recorded
    parent_uri = parent if parent and _model_ref_kind(parent) != "version" else \
        parent_model_uri(parent, name) if parent else None
    manifest = {"format_version": FORMAT_VERSION, "architecture": arch,
                "dtype": str(first.dtype).removeprefix("torch."),
                "discrete": bool(getattr(policy, "discrete", False)),
                "param_names": sorted(tensors), "sha256": hashlib.sha256(data).hexdigest(),
                "iteration": iteration, "run_id": run_id, "parent_model_version": parent_uri,
                "config": _config_dict(config)}
    out_spec = TensorSpec(np.dtype(np.int64), (-1,)) if manifest["discrete"] else \
        TensorSpec(np.dtype(first.numpy().dtype), (-1, int(arch["output_dim"])))
    # Unnamed double columns, one per observation dimension: pyfunc accepts float32/float64
    # arrays, lists and DataFrames (a float64 TensorSpec would reject float32 arrays).
    signature = ModelSignature(inputs=Schema([ColSpec("double")] * int(arch["input_dim"])),
                               outputs=Schema([out_spec]))
    logged = client.create_logged_model(
        experiment_id=run.info.experiment_id, name=LOGGED_MODEL_NAME, source_run_id=run_id,
        tags={k: str(v) for k, v in ((TAG_ITERATION, iteration),
                                     (TAG_POLICY_CLASS, arch["class"])) if v is not None},
        model_type="maml-policy")
    try:
        with tempfile.TemporaryDirectory() as tmp:
            src = Path(tmp) / "src"
            src.mkdir()
            (src / PARAMS_FILE).write_bytes(data)
            (src / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1, sort_keys=True))
            mlflow_model = Model(artifact_path=logged.artifact_location, run_id=run_id,
                                 model_uuid=logged.model_id, model_id=logged.model_id)
            model_dir = Path(tmp) / "model"
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                mlflow.pyfunc.save_model(
                    path=str(model_dir), python_model=str(POLICY_MODEL_CODE),
                    artifacts={PARAMS_ARTIFACT: str(src / PARAMS_FILE),
                               MANIFEST_ARTIFACT: str(src / MANIFEST_FILE)},
                    code_paths=[str(MAML_CORE_DIR)], mlflow_model=mlflow_model,
                    signature=signature, pip_requirements=_pip_requirements(),
                    metadata={"maml_policy_format": FORMAT_VERSION})
            for cache in model_dir.rglob("__pycache__"):
                for f in cache.iterdir():
                    f.unlink()
                cache.rmdir()
            client.log_model_artifacts(logged.model_id, str(model_dir))
        client.log_outputs(run_id, [LoggedModelOutput(logged.model_id, step=int(iteration or 0))])
        client.finalize_logged_model(logged.model_id, LoggedModelStatus.READY)
    except BaseException:
        try:
            client.finalize_logged_model(logged.model_id, LoggedModelStatus.FAILED)
        except Exception:  # keep the original error
            _LOG.debug("could not mark logged model %s FAILED", logged.model_id)
        raise
    _ensure_registered_model(client, name)
    version_tags = {TAG_RUN_ID: run_id, TAG_POLICY_CLASS: arch["class"]}
    if iteration is not None:
        version_tags[TAG_ITERATION] = str(iteration)
    if parent_uri:
        version_tags[TAG_PARENT_VERSION] = parent_uri
    commit = run.data.tags.get(MLFLOW_GIT_COMMIT)
    if commit:
        version_tags[TAG_GIT_COMMIT] = commit
    return client.create_model_version(name, source=f"models:/{logged.model_id}", run_id=run_id,
                                       tags=version_tags, model_id=logged.model_id)


def _download(uri: str, dst: str) -> Path:
    cfg = active_config()
    try:
        return Path(mlflow.artifacts.download_artifacts(
            artifact_uri=uri, dst_path=dst, tracking_uri=cfg.tracking_uri,
            registry_uri=cfg.tracking_uri))
    except MlflowException as exc:
        raise TrackingError(f"could not download {uri}: {exc.message}") from None


def _download_logged_model(model_id: str, dst: str) -> Path:
    """The pyfunc ``artifacts/`` folder of a logged model (``models:/<id>/<path>`` is parsed
    as a registered-model URI, so go through the model's artifact location)."""
    try:
        location = active_config().client().get_logged_model(model_id).artifact_location
    except MlflowException as exc:
        if _is_not_found(exc):
            raise TrackingError(f"logged model {model_id!r} does not exist") from None
        raise
    return _download(f"{location.rstrip('/')}/artifacts", dst)


def download_run_model(run_id: str, dst: str) -> Path:
    """The ``artifacts/`` folder of the run's last logged model, downloaded under ``dst``."""
    return _download_logged_model(_run_model_id(run_id), dst)


def _run_model_id(run_id: str) -> str:
    run = get_run(run_id)
    outputs = list(run.outputs.model_outputs) if run.outputs else []
    if not outputs:
        raise TrackingError(f"run {run_id} logged no model")
    return max(outputs, key=lambda o: o.step).model_id


def _model_ref_kind(ref: str) -> str:
    """How a model reference string is read: ``"version"`` (the registry: ``models:/NAME/VERSION``,
    ``models:/NAME@ALIAS``, ``alias:...``, a version number, ``NAME/VERSION``, ``NAME@ALIAS``),
    ``"run"`` (a run id or ``runs:/RUN_ID``: the run's last logged model), ``"logged"``
    (``models:/<logged model id>``), ``"path"`` (a local model directory: one that exists, or
    any absolute path) or ``"unknown"`` (another URI scheme)."""
    local = None if re.match(r"^[a-z]+:", ref) else Path(ref).expanduser()
    logged = re.fullmatch(r"models:/m-[0-9a-f]{32}/?", ref)  # a registered name may start m-
    registry = ref.startswith("alias:") or re.fullmatch(r"v?\d+", ref) or (
        ref.startswith("models:/") and not logged)
    name_ref = local is not None and not local.exists() and not local.is_absolute() \
        and not _RUN_ID.fullmatch(ref)  # NAME/VERSION, NAME@ALIAS
    if registry or name_ref:
        return "version"
    if _RUN_ID.fullmatch(ref) or ref.startswith("runs:/"):
        return "run"
    if logged:
        return "logged"
    return "path" if local is not None else "unknown"


def _run_id_of(ref: str) -> str:
    """The run id of a ``"run"`` reference (``RUN_ID`` or ``runs:/RUN_ID[/...]``)."""
    return ref[len("runs:/"):].strip("/").split("/")[0] if ref.startswith("runs:/") else ref


def parent_model_uri(model_ref: Any, registered_model_name: str | None = None) -> str:
    """How lineage names the model a run was warm-started from: ``models:/NAME/VERSION`` for a
    registered version (an alias resolved to the version it points to now),
    ``models:/<logged model id>`` for a run's or a logged model, and the absolute path of a
    model directory (e.g. an exported run's ``model/``)."""
    if isinstance(model_ref, ModelVersion):
        return _version_uri(model_ref)
    ref = str(model_ref).strip()
    kind = _model_ref_kind(ref)
    if kind == "run":
        return f"models:/{_run_model_id(_run_id_of(ref))}"
    if kind == "logged":
        return ref
    if kind == "path":
        local = Path(ref).expanduser().resolve()
        if not local.is_dir():
            raise TrackingError(f"model directory {ref!r} does not exist (or is not a "
                                "directory)")
        return str(local)
    return _version_uri(resolve_model_version(ref, registered_model_name))


def load_policy(model_ref: Any) -> tuple[torch.nn.Module, dict[str, torch.Tensor], dict, dict]:
    """``(policy, params, config, info)`` from a model reference (see
    ``resolve_model_version``), a run id (its last logged policy), ``runs:/RUN_ID``,
    ``models:/<logged model id>`` or a local model directory. Reads ``params.safetensors`` and
    ``policy.json`` directly: nothing is unpickled and no model code is executed. ``params``
    holds all meta-parameters (``step_size.*`` too, for Meta-SGD)."""
    info: dict[str, Any] = {"ref": str(model_ref)}
    ref = str(model_ref).strip()
    kind = "version" if isinstance(model_ref, ModelVersion) else _model_ref_kind(ref)
    local = Path(ref).expanduser()
    with tempfile.TemporaryDirectory() as tmp:
        if kind == "version":
            mv = resolve_model_version(model_ref)
            info.update(name=mv.name, version=int(mv.version), run_id=mv.run_id,
                        model_id=_model_id_of(mv),
                        aliases=list(mv.aliases or []), uri=_version_uri(mv))
            directory = _download(f"{_version_uri(mv)}/artifacts", tmp)
        elif kind == "run":
            run_id = _run_id_of(ref)
            model_id = _run_model_id(run_id)
            info.update(run_id=run_id, model_id=model_id, uri=f"models:/{model_id}")
            directory = _download_logged_model(model_id, tmp)
        elif kind == "logged":
            model_id = ref[len("models:/"):].strip("/")
            info.update(model_id=model_id, uri=ref)
            directory = _download_logged_model(model_id, tmp)
        elif kind == "path" and local.is_dir():
            info.update(uri=str(local.resolve()))
            directory = local
        else:
            raise TrackingError(f"{ref!r} is not a model reference, run id or model directory")
        try:
            policy, params, manifest = read_policy_files(*find_policy_files(directory))
        except PolicyFileError as exc:
            raise TrackingError(f"model {ref!r}: {exc}") from None
    config = manifest.get("config", {})
    info.update(iteration=manifest.get("iteration"), architecture=manifest["architecture"],
                sha256=manifest.get("sha256"), dtype=manifest.get("dtype"),
                parent_model_version=manifest.get("parent_model_version"))
    info.setdefault("run_id", manifest.get("run_id"))
    return policy, params, config, info


# ---------------------------------------------------------------------------------- lineage
def _dataset_dict(dataset_input) -> dict[str, Any]:
    ds = dataset_input.dataset
    try:
        source: Any = json.loads(ds.source)
    except (TypeError, ValueError):
        source = ds.source
    if isinstance(source, dict):
        source = (source.get("uri") or source.get("path")
                  or (source.get("tags") or {}).get("maml.source") or source)
    tags = {t.key: t.value for t in dataset_input.tags or []}
    return {"name": ds.name, "digest": ds.digest, "source_type": ds.source_type,
            "source": source, "context": tags.pop(MLFLOW_DATASET_CONTEXT, None), "tags": tags}


def lineage(model_ref: Any, max_depth: int = 100) -> list[dict[str, Any]]:
    """The chain model version -> source run (params, datasets, git commit, Prefect flow run)
    -> parent model version -> ... back to the first training (newest first)."""
    cfg = active_config()
    client = cfg.client()
    chain: list[dict[str, Any]] = []
    seen: set[str] = set()
    mv: ModelVersion | None = resolve_model_version(model_ref)
    while mv is not None and len(chain) < max_depth:
        uri = _version_uri(mv)
        if uri in seen:
            raise TrackingError(f"lineage of {model_ref!r} loops back to {uri}")
        seen.add(uri)
        entry: dict[str, Any] = {
            "model": uri, "name": mv.name, "version": int(mv.version),
            "aliases": sorted(mv.aliases or []), "created_ms": mv.creation_timestamp,
            "model_id": _model_id_of(mv), "run_id": mv.run_id,
            "iteration": (mv.tags or {}).get(TAG_ITERATION), "run_name": None,
            "run_status": None, "experiment_id": None, "git_commit": None,
            "flow_run_id": None, "params": {}, "datasets": [], "parent": None}
        run = None
        if mv.run_id:
            try:
                run = client.get_run(mv.run_id)
            except MlflowException as exc:
                if not _is_not_found(exc):
                    raise
                entry["run_missing"] = True
        if run is not None:
            tags = run.data.tags
            entry.update(run_name=run.info.run_name, run_status=run.info.status,
                         experiment_id=run.info.experiment_id,
                         git_commit=tags.get(MLFLOW_GIT_COMMIT) or tags.get(TAG_GIT_COMMIT),
                         flow_run_id=tags.get(TAG_FLOW_RUN_ID), params=dict(run.data.params),
                         datasets=logged_datasets(run))
        parent = (mv.tags or {}).get(TAG_PARENT_VERSION) or \
            (run.data.tags.get(TAG_PARENT_VERSION) if run is not None else None)
        chain.append(entry)
        mv = None
        if parent and _model_ref_kind(parent) != "version":
            # warm-started from a logged model or a model directory: outside the registry
            entry["parent"] = parent
            chain.append({"model": parent, "external": True})
        elif parent:
            try:
                mv = resolve_model_version(parent, entry["name"])
                entry["parent"] = _version_uri(mv)
            except TrackingError:
                entry["parent"] = parent
                chain.append({"model": parent, "missing": True})
    return chain


def format_lineage(chain: list[dict[str, Any]]) -> str:
    """Readable text of ``lineage(...)`` (newest first), for ``maml lineage MODEL``."""
    if not chain:
        return "(no lineage)"
    lines: list[str] = []
    for i, e in enumerate(chain):
        if e.get("missing"):
            lines.append(f"{e['model']}  (no longer in the registry)")
            continue
        if e.get("external"):
            lines.append(f"{e['model']}  (not a registered version: a logged model or a model "
                         "directory)")
            continue
        head = e["model"]
        if e.get("aliases"):
            head += f"  [{', '.join('@' + a for a in e['aliases'])}]"
        if e.get("iteration") not in (None, "None"):
            head += f"  iteration {e['iteration']}"
        lines.append(head)
        if e.get("run_missing"):
            lines.append(f"  run       {e['run_id']} (deleted)")
        elif e.get("run_id"):
            lines.append(f"  run       {e['run_id']}  {e.get('run_name') or ''}  "
                         f"{e.get('run_status') or ''}  experiment {e.get('experiment_id')}"
                         .rstrip())
        lines.append(f"  code      git {e.get('git_commit') or 'unknown'}")
        if e.get("flow_run_id"):
            lines.append(f"  prefect   flow run {e['flow_run_id']}")
        for d in e.get("datasets", []):
            lines.append(f"  dataset   {d.get('context') or 'input'}: {d['name']} "
                         f"(digest {d['digest']}, {d['source_type']}: {d['source']})")
        params = e.get("params") or {}
        parent_entry = chain[i + 1] if i + 1 < len(chain) else None
        if params:
            text = ", ".join(f"{k}={v}" for k, v in sorted(params.items()))
            wrapped = textwrap.wrap(text, width=86, break_long_words=False,
                                    break_on_hyphens=False)
            lines.append(f"  config    {wrapped[0]}")
            lines.extend(f"            {w}" for w in wrapped[1:])
        if parent_entry and not parent_entry.get("missing") \
                and not parent_entry.get("external") and params:
            old = parent_entry.get("params") or {}
            changed = [f"{k}: {old.get(k, '<unset>')} -> {params.get(k, '<unset>')}"
                       for k in sorted(set(old) | set(params)) if old.get(k) != params.get(k)]
            if changed:
                lines.append(f"  changed   {'; '.join(changed)}")
        if e.get("parent"):
            lines.append(f"  warm-started from {e['parent']}")
        else:
            lines.append("  (first training: not warm-started)")
    return "\n".join(lines)
