"""The run configuration: the library's ``MAMLConfig`` plus the pipeline's own section."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from maml_core.config import MAMLConfig, _Strict, build_config, load_config

STAGES = ("sample_tasks", "collect_rollouts", "adapt", "meta_update", "evaluate", "checkpoint")


class StageTimeouts(_Strict):
    sample_tasks: float = Field(60, gt=0)
    collect_rollouts: float = Field(1800, gt=0)
    adapt: float = Field(600, gt=0)
    meta_update: float = Field(1800, gt=0)
    evaluate: float = Field(3600, gt=0)
    checkpoint: float = Field(300, gt=0)


class PipelineConfig(_Strict):
    retries: int = Field(2, ge=0, description="retries of a failed stage")
    retry_delay_seconds: float = Field(1.0, ge=0, description="first backoff delay")
    retry_jitter_factor: float = Field(0.5, ge=0)
    timeouts: StageTimeouts = Field(default_factory=StageTimeouts)
    keep_last: int = Field(3, ge=1, description="stage-store iterations kept (plus checkpoints)")
    store_sync: Literal["checkpoint", "write"] = Field(
        "checkpoint", description="when stage outputs are fsynced: in one batch before each "
        "checkpoint, or as each is written (a killed process loses neither; see flows/store.py)")
    task_runner: Literal["local", "dask"] = "local"
    dask_address: str | None = Field(None, description="scheduler of an existing Dask cluster")
    dask_workers: int = Field(2, ge=1, description="workers of the default LocalCluster")
    dask_shards: int | None = Field(None, ge=1, description="task shards per rollout collection "
                                    "(default: one per Dask worker thread)")
    dask_torch_threads: int | None = Field(
        None, ge=1, description="torch threads of a Dask worker; default: the flow process's, "
        "which keeps results bit-identical to the local runner")
    dask_task_runs: bool = Field(False, description="run each shard as a Prefect task run on "
                                 "its worker (workers must reach the Prefect API)")
    register_model: bool = True
    mlflow_outage_seconds: float = Field(
        600, ge=0, description="how long an unreachable MLflow server is waited for (metrics "
        "buffered, calls retried) before the run stops with an error; 0: fail at once")


class RetrainConfig(_Strict):
    margin: float = Field(0.0, ge=0, description="challenger must beat champion by this much")
    steps: int = Field(1, ge=0, description="adaptation steps whose return decides")


class RunConfig(MAMLConfig):
    pipeline: PipelineConfig = Field(default_factory=PipelineConfig)
    retrain: RetrainConfig = Field(default_factory=RetrainConfig)


def load_run_config(path: str | Path | None = None, overrides: list[str] | None = None,
                    data: dict | None = None) -> RunConfig:
    """Validated run config from a YAML file (or a dict), with ``key=value`` overrides."""
    if data is None:
        return load_config(path, overrides, RunConfig)
    return build_config(data, overrides, RunConfig)
