"""What a task family is: a distribution over tasks plus a batched environment for them.

A *task family* (``TaskFamily``) samples tasks as a pandas table with one row per task (a
``task_id`` column plus the task's parameters) and builds a ``TaskVectorEnv`` that steps
``num_tasks x episodes_per_task`` sub-environments at once, each set to its own task.

The vector environment follows gymnasium's ``VectorEnv`` API (``reset``/``step``/``num_envs``/
``single_observation_space``...) but exchanges torch tensors on the configured device, flat over
``task x episode`` (index ``task * episodes_per_task + episode``). Auto-reset is disabled: a
sub-environment that terminates stays terminated, pays zero reward and repeats its last
observation until the next ``reset``; rollouts turn that into masks.

To add a family of your own, subclass ``TaskFamily`` (and ``TaskVectorEnv`` or use
``GymTaskVectorEnv`` around any per-task gymnasium env) and call ``register_task_family`` -- no
library file needs editing. See ``README.md`` ("Adding a task family").
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, ClassVar

import gymnasium
import numpy as np
import pandas as pd
import torch
from gymnasium.vector import AutoresetMode

TASK_ID = "task_id"


class TaskVectorEnv(gymnasium.vector.VectorEnv):
    """Batched environment over tasks x episodes exchanging torch tensors."""

    metadata: ClassVar[dict[str, Any]] = {"autoreset_mode": AutoresetMode.DISABLED}

    def __init__(self, tasks: pd.DataFrame, episodes_per_task: int, horizon: int,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        if episodes_per_task < 1:
            raise ValueError(f"episodes_per_task must be >= 1, got {episodes_per_task}")
        if horizon < 1:
            raise ValueError(f"horizon must be >= 1, got {horizon}")
        self.episodes_per_task = int(episodes_per_task)
        self.horizon = int(horizon)
        self.device = torch.device(device)
        self.dtype = dtype
        self.tasks = tasks.reset_index(drop=True)
        self.num_tasks = len(self.tasks)
        self.num_envs = self.num_tasks * self.episodes_per_task
        self.set_tasks(self.tasks)

    def set_tasks(self, tasks: pd.DataFrame) -> None:
        """Point the sub-environments at new tasks (same number of tasks)."""
        if len(tasks) != self.num_tasks:
            raise ValueError(
                f"set_tasks got {len(tasks)} tasks but this environment holds {self.num_tasks}; "
                "build a new environment for a different number of tasks")
        self.tasks = tasks.reset_index(drop=True)
        self._apply_tasks(self.tasks)

    def task_column(self, name: str) -> torch.Tensor:
        """A task parameter repeated for every episode: shape [num_envs]."""
        col = torch.tensor(self.tasks[name].to_numpy(dtype=np.float64, copy=True),
                           dtype=self.dtype, device=self.device)
        return col.repeat_interleave(self.episodes_per_task)

    def policy_threads(self) -> int | None:
        """How many torch threads the policy should use while this env is being stepped (None:
        leave torch's setting alone). ``GymTaskVectorEnv`` (MuJoCo) returns 1: it steps on
        threads of its own, and torch's idle OpenMP threads, which spin for a while after each
        forward pass, would take the cores those threads need."""
        return None

    @abstractmethod
    def _apply_tasks(self, tasks: pd.DataFrame) -> None: ...

    @abstractmethod
    def reset(self, *, seed: int | Sequence[int] | None = None,
              options: dict[str, Any] | None = None) -> tuple[torch.Tensor, dict[str, Any]]: ...

    @abstractmethod
    def step(self, actions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                   torch.Tensor, dict[str, Any]]: ...

    def env_seeds(self, seed: int | Sequence[int] | None) -> list[int | None]:
        """Expand ``seed`` (one int, one per task, or one per sub-env) to one per sub-env."""
        if seed is None:
            return [None] * self.num_envs
        if isinstance(seed, int | np.integer):
            return [int(seed) + i for i in range(self.num_envs)]
        seed = [int(s) for s in seed]
        if len(seed) == self.num_tasks:
            return [s + e for s in seed for e in range(self.episodes_per_task)]
        if len(seed) == self.num_envs:
            return seed
        raise ValueError(f"reset(seed=...) takes one seed, one per task ({self.num_tasks}) or one "
                         f"per sub-environment ({self.num_envs}); got {len(seed)}")


class TaskFamily(ABC):
    """A distribution over tasks and the environment that runs them.

    Class attributes a family sets: ``name`` (registry key), ``kind`` (``"rl"`` or
    ``"supervised"``), ``default_horizon``, ``task_params`` (the table's parameter columns) and,
    for RL, ``observation_dim`` and ``action_dim`` (``discrete`` families set ``num_actions``).
    """

    name: ClassVar[str]
    gym_id: ClassVar[str | None] = None  # gymnasium id stem; derived from ``name`` if unset
    kind: ClassVar[str] = "rl"
    discrete: ClassVar[bool] = False
    default_horizon: ClassVar[int] = 100
    task_params: ClassVar[tuple[str, ...]] = ()
    # Raised when the environment's dynamics or reward change, so that a checkpoint made
    # before does not resume on a different problem (``MetaLearner.restore`` refuses it).
    env_version: ClassVar[int] = 1
    observation_dim: int
    action_dim: int = 0
    num_actions: int = 0

    def dynamics(self) -> dict[str, Any]:
        """The options that change the environment's dynamics or reward (not the task
        distribution): a checkpoint resumes only where they are the same (``restore``)."""
        return {}

    def __init__(self, **kwargs: Any):
        if kwargs:
            raise ValueError(f"task family {self.name!r} takes no options; got {sorted(kwargs)}")

    @abstractmethod
    def sample_tasks(self, n: int, rng: np.random.Generator) -> pd.DataFrame:
        """``n`` tasks drawn from the family, as a table: ``task_id`` plus ``task_params``."""

    def task_coordinate(self, tasks: pd.DataFrame) -> tuple[str, np.ndarray] | None:
        """One number per task to lay per-task results out along (the report's per-task plot),
        with its name: the parameter of a one-parameter family; None where there is no such
        number (a family with several parameters overrides this if one summarizes them)."""
        if len(self.task_params) != 1:
            return None
        name = self.task_params[0]
        return name, tasks[name].to_numpy(dtype=np.float64)

    def check_environment(self) -> None:
        """Raise ``ValueError`` naming the problem if the process environment (variables,
        libraries) cannot run this family; called when a config is validated."""
        return None  # nothing to check by default

    def make_env(self, tasks: pd.DataFrame, episodes_per_task: int, horizon: int | None = None,
                 device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32) -> TaskVectorEnv:
        raise NotImplementedError(f"task family {self.name!r} has no environment (supervised)")

    def validate_tasks(self, tasks: pd.DataFrame) -> pd.DataFrame:
        """Check a task table (e.g. one read from a file) and return it with a clean index."""
        if not isinstance(tasks, pd.DataFrame):
            raise TypeError(f"tasks must be a pandas DataFrame, got {type(tasks).__name__}")
        if len(tasks) == 0:
            raise ValueError(f"the task table for {self.name!r} is empty")
        missing = [c for c in (TASK_ID, *self.task_params) if c not in tasks.columns]
        if missing:
            raise ValueError(f"the task table for {self.name!r} lacks column(s) {missing}; "
                             f"expected {[TASK_ID, *self.task_params]}")
        if tasks[TASK_ID].duplicated().any():
            raise ValueError(f"the task table for {self.name!r} has duplicate task_id values")
        values = tasks[list(self.task_params)].to_numpy(dtype=np.float64)
        if not np.isfinite(values).all():
            raise ValueError(f"the task table for {self.name!r} has NaN or infinite parameters")
        return tasks.reset_index(drop=True)

    def _table(self, n: int, columns: dict[str, np.ndarray]) -> pd.DataFrame:
        if n < 1:
            raise ValueError(f"number of tasks must be >= 1, got {n}")
        return pd.DataFrame({TASK_ID: np.arange(n, dtype=np.int64), **columns})


_REGISTRY: dict[str, type[TaskFamily]] = {}


def register_task_family(cls: type[TaskFamily], *, overwrite: bool = False) -> type[TaskFamily]:
    """Register a family under ``cls.name`` (usable as a decorator).

    RL families are also registered with gymnasium as ``maml/<GymId>-v0`` so that
    ``gymnasium.make_vec("maml/...", num_envs=..., tasks=...)`` builds their vector env.
    """
    name = getattr(cls, "name", None)
    if not name or not isinstance(name, str):
        raise ValueError(f"{cls.__name__} needs a class attribute `name` (a non-empty string)")
    if name in _REGISTRY and _REGISTRY[name] is not cls and not overwrite:
        raise ValueError(f"a task family named {name!r} is already registered "
                         f"({_REGISTRY[name].__qualname__}); pass overwrite=True to replace it")
    _REGISTRY[name] = cls
    if cls.kind == "rl":
        env_id = f"maml/{cls.gym_id or _gym_name(name)}-v0"
        if env_id not in gymnasium.registry or overwrite:
            gymnasium.register(id=env_id, vector_entry_point=_vector_entry(cls))
    return cls


def _gym_name(name: str) -> str:
    return "".join(part.capitalize() for part in name.replace("_", "-").split("-"))


def _vector_entry(cls: type[TaskFamily]):
    def make(num_envs: int = 1, tasks: pd.DataFrame | None = None, horizon: int | None = None,
             seed: int = 0, **family_kwargs: Any) -> TaskVectorEnv:
        family = cls(**family_kwargs)
        if tasks is None:
            tasks = family.sample_tasks(num_envs, np.random.default_rng(seed))
            return family.make_env(tasks, 1, horizon)
        if num_envs % len(tasks):
            raise ValueError(f"num_envs={num_envs} is not a multiple of {len(tasks)} tasks")
        return family.make_env(tasks, num_envs // len(tasks), horizon)
    return make


def get_task_family(name: str, **kwargs: Any) -> TaskFamily:
    """An instance of the registered family ``name`` with its options."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown task family {name!r}; known: {sorted(_REGISTRY)} "
                         "(register your own with maml_core.tasks.register_task_family)")
    return _REGISTRY[name](**kwargs)


def task_family_names() -> list[str]:
    return sorted(_REGISTRY)
