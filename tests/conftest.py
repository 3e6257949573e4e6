"""Shared fixtures. Add new fixtures below; keep imports of heavy packages inside fixtures."""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest

# All local state of the tests (Prefect home, MLflow store, stage store) in one temporary
# folder, set before Prefect or MLflow is imported.
_HOME = tempfile.mkdtemp(prefix="maml-tests-")
os.environ["MAML_HOME"] = _HOME
os.environ["MAML_NO_PROGRESS"] = "1"
from flows.settings import configure_environment  # noqa: E402

configure_environment()

_MLFLOW_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MLFLOW_EXPERIMENT_NAME",
               "MAML_REGISTERED_MODEL", "MLFLOW_ALLOW_PICKLE_DESERIALIZATION",
               "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")


@pytest.fixture(scope="session")
def mlflow_store(tmp_path_factory):
    """One temporary MLflow SQLite store for the whole session (creating one takes seconds).

    Yields a set-up ``flows.tracking.TrackingConfig``; tests should use their own experiment
    (``cfg.model_copy(update={"experiment_name": ...}).setup()``), run and model names.
    The environment and MLflow's global URIs are restored afterwards."""
    import mlflow

    from flows import tracking

    saved = {k: os.environ.get(k) for k in _MLFLOW_ENV}
    root = tmp_path_factory.mktemp("mlflow")
    cfg = tracking.TrackingConfig(tracking_uri=f"sqlite:///{root / 'mlflow.db'}",
                                  artifact_location=str(root / "mlartifacts"),
                                  experiment_name="session")
    cfg.setup()
    yield cfg
    mlflow.set_tracking_uri(None)
    mlflow.set_registry_uri(None)
    tracking._ACTIVE = None
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session")
def prefect_harness():
    """One temporary Prefect server for the whole session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def pipeline(prefect_harness, mlflow_store):
    """Prefect and MLflow ready for flows; yields the tracking config."""
    yield mlflow_store


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(_HOME, ignore_errors=True)
