"""The MAML policy as an MLflow "model from code" (no pickle anywhere).

MLflow logs this *source file* with the model (``mlflow.pyfunc.save_model(python_model=<this
path>, artifacts=...)``) instead of cloudpickling a ``PythonModel`` object. A logged policy is
therefore this file, a copy of ``maml_core`` (``code/``), and two artifacts:

* ``params.safetensors`` -- the meta-parameters (policy weights, plus ``step_size.*`` for
  Meta-SGD), and
* ``policy.json`` -- format version, policy architecture, resolved config, iteration and the
  SHA-256 of the tensor file (verified on load).

``mlflow.pyfunc.load_model(uri).predict(observations)`` returns the deterministic action: the mean
for Gaussian policies, the argmax for categorical ones (the output for supervised regressors).
The helpers below are shared with ``flows.tracking.load_policy``, which reads the two artifacts
directly without going through pyfunc at all.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import torch
from safetensors.torch import load as st_load

from maml_core.policies import MLP, CategoricalMLPPolicy, GaussianMLPPolicy

FORMAT_VERSION = 1
PARAMS_FILE = "params.safetensors"
MANIFEST_FILE = "policy.json"
# Keys of the ``artifacts`` dict given to MLflow (names inside ``context.artifacts``).
PARAMS_ARTIFACT = "params"
MANIFEST_ARTIFACT = "policy"


class PolicyFileError(ValueError):
    """Policy artifacts that are missing, corrupt or describe an unknown architecture."""


def policy_from_architecture(arch: dict[str, Any]) -> MLP:
    """Build an (uninitialized) policy from ``policy.architecture()`` output."""
    cls = arch.get("class")
    try:
        hidden, act = arch["hidden_sizes"], arch["activation"]
        if cls == "GaussianMLPPolicy":
            return GaussianMLPPolicy(arch["input_dim"], arch["output_dim"], hidden, act,
                                     float(arch.get("init_log_std", 0.0)),
                                     arch.get("min_log_std"))
        if cls == "CategoricalMLPPolicy":
            return CategoricalMLPPolicy(arch["input_dim"], arch["output_dim"], hidden, act)
        if cls == "MLP":
            return MLP(arch["input_dim"], arch["output_dim"], hidden, act)
    except KeyError as exc:
        raise PolicyFileError(f"policy architecture {arch} lacks the key {exc}") from None
    raise PolicyFileError(f"unknown policy class {cls!r} in architecture {arch}; known: "
                          "GaussianMLPPolicy, CategoricalMLPPolicy, MLP")


def find_policy_files(directory: str | Path) -> tuple[Path, Path]:
    """``(params.safetensors, policy.json)`` inside a model directory (or its ``artifacts/``)."""
    directory = Path(directory)
    for base in (directory, directory / "artifacts"):
        params, manifest = base / PARAMS_FILE, base / MANIFEST_FILE
        if params.is_file() and manifest.is_file():
            return params, manifest
    raise PolicyFileError(f"{str(directory)!r} holds no {PARAMS_FILE} + {MANIFEST_FILE} (is it "
                          "a policy logged by flows.tracking.log_policy_model?)")


def read_policy_files(params_path: str | Path, manifest_path: str | Path
                      ) -> tuple[MLP, dict[str, torch.Tensor], dict[str, Any]]:
    """Read the two artifacts: ``(policy with weights loaded, all tensors, manifest)``."""
    try:
        manifest = json.loads(Path(manifest_path).read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PolicyFileError(f"{str(manifest_path)!r} is not a readable JSON file ({exc})"
                              ) from None
    if not isinstance(manifest, dict) or manifest.get("format_version") != FORMAT_VERSION:
        raise PolicyFileError(f"{str(manifest_path)!r} is not a policy manifest of format "
                              f"{FORMAT_VERSION}")
    data = Path(params_path).read_bytes()
    if manifest.get("sha256") and hashlib.sha256(data).hexdigest() != manifest["sha256"]:
        raise PolicyFileError(f"{str(params_path)!r} is corrupt: its SHA-256 does not match "
                              f"the one recorded in {MANIFEST_FILE}")
    try:
        tensors = st_load(data)
    except Exception as exc:  # safetensors raises its own error types
        raise PolicyFileError(f"{str(params_path)!r} is not a valid safetensors file ({exc})"
                              ) from None
    policy = policy_from_architecture(manifest["architecture"])
    dtype = getattr(torch, manifest.get("dtype", "float32"))
    policy.to(dtype=dtype)
    names = [k for k, _ in policy.named_parameters()]
    missing = [k for k in names if k not in tensors]
    if missing:
        raise PolicyFileError(f"{str(params_path)!r} lacks the parameters {missing} of "
                              f"{manifest['architecture']['class']}")
    with torch.no_grad():
        for k, p in policy.named_parameters():
            if tuple(tensors[k].shape) != tuple(p.shape):
                raise PolicyFileError(f"{str(params_path)!r}: parameter {k!r} has shape "
                                      f"{tuple(tensors[k].shape)}, the architecture expects "
                                      f"{tuple(p.shape)}")
            p.copy_(tensors[k])
    policy.eval()
    return policy, tensors, manifest


def deterministic_action(policy: MLP, observations: Any) -> np.ndarray:
    """The deterministic action for a batch (or one) observation(s), as a numpy array."""
    if isinstance(observations, pd.DataFrame):
        observations = observations.to_numpy()
    obs = np.asarray(observations)
    if obs.dtype == object:
        obs = np.stack([np.asarray(o) for o in obs])
    param = next(policy.parameters())
    x = torch.as_tensor(obs.astype(np.float64), dtype=param.dtype)
    single = x.dim() == 1
    if single:
        x = x.unsqueeze(0)
    if x.shape[-1] != policy.input_dim:
        raise ValueError(f"observations have {x.shape[-1]} features; the policy expects "
                         f"{policy.input_dim}")
    with torch.no_grad():
        out = policy.net(dict(policy.named_parameters()), x)
        if getattr(policy, "discrete", False):
            out = out.argmax(-1)
    result = out.cpu().numpy()
    return result[0] if single else result


class PolicyModel(mlflow.pyfunc.PythonModel):
    """pyfunc wrapper: loads ``params.safetensors`` + ``policy.json`` in ``load_context``."""

    def load_context(self, context):
        self.policy, _, self.manifest = read_policy_files(
            context.artifacts[PARAMS_ARTIFACT], context.artifacts[MANIFEST_ARTIFACT])

    def predict(self, context, model_input: np.ndarray, params=None):
        """Deterministic actions for ``model_input``: a DataFrame or array of observations
        (rows; one column/feature per observation dimension)."""
        return deterministic_action(self.policy, model_input)


mlflow.models.set_model(PolicyModel())
