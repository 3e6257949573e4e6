"""MuJoCo locomotion task families (Finn et al. 2017, section 5.3) on gymnasium's v5 models.

Four families, each a small subclass of a gymnasium v5 env whose reward depends on the task:

* ``halfcheetah-vel``: run at a target velocity ``velocity`` ~ U[0, 2].
  reward = -|v - velocity| - 0.05 |a|^2
* ``halfcheetah-dir``: run forward or backward, ``direction`` in {-1, +1} with equal odds.
  reward = direction * v - 0.05 |a|^2
* ``ant-vel`` (``velocity`` ~ U[0, 3]) and ``ant-dir`` (``direction`` in {-1, +1}), with the
  reward of the paper's rllab code:
  forward - 0.5e-2 |a|^2 - 0.5e-3 sum(clip(cfrc_ext, -1, 1)^2) + 0.05, where forward is
  1 - |v - velocity| or direction * v. The 1 in ant-vel's forward term is the paper code's
  (its comment: "make it happy, not suicidal"): without it every step costs more than the
  survive bonus pays, and the ant learns to end its episodes by falling. The 0.05 survive
  bonus is paid on every step (as in rllab, including the step on which the ant falls); the
  episode terminates when the torso height leaves [0.2, 1.0] or the state is not finite
  (v5's ``healthy_z_range``).
* The half-cheetah steps v5's 0.05 s per action by default (``frame_skip`` 5). The paper's
  rllab cheetah model has a 0.01 s timestep and no frame skip, so 0.01 s per action: a
  200-step episode there is 2 s of running, here 10 s. The family option ``frame_skip: 1``
  gives the paper's step (the paper-protocol configs use it); the default keeps v5's, on which
  our ``-fast`` configs were trained.
* The ant steps 0.02 s of simulated time per action (``frame_skip`` 2 of v5's 0.01 s
  timestep), the step of the paper's rllab ant model (timestep 0.02, one substep), not v5's
  default 0.05 s: at 0.05 s a random policy makes the ant hop above the 1.0 height limit
  after about 50 actions, at 0.02 s it stays up about 2.5 times as long.

``v`` is the torso's x velocity measured by its position change over the step (v5's
``info["x_velocity"]``), not MuJoCo's ``qvel``; ``a`` is the action actually applied, i.e.
clipped to the action space by ``GymTaskVectorEnv`` before stepping. The paper's rllab reward
read the velocity of the cheetah's centre of mass instead (``get_body_comvel("torso")``: the
linear momentum of the torso's subtree over its mass, after the step); the half-cheetah option
``com_velocity: true`` pays that. The torso rocks about the centre of mass as the legs swing,
so for halfcheetah-vel's -|v - target| the two measures give returns tens apart on the same
trajectory (20 to 100 over a 200-step episode at the paper's step, depending on the gait);
for halfcheetah-dir's linear reward only the torso's net shift against the centre of mass
counts (up to about 0.2 m in a 2 s episode, about 20 of return).

Observations are v5's defaults without the x/y position (HalfCheetah: 17 dims). The paper's
cheetah also observed its centre of mass (rllab's ``get_body_com("torso")``: x, y, z of the
torso's subtree, so the x position it has run); the half-cheetah option ``torso_com: true``
appends it (20 dims). For the ant,
the 78 external contact forces (``cfrc_ext``) are left out of the observation by default
(27 dims instead of 105): they are mostly zeros with occasional spikes, and a smaller input
keeps the policy small. (rllab's ant did observe them, clipped.) Pass
``include_contact_forces=True`` to the ant families for v5's full 105-dim observation. The
contact forces are always in the reward.

Differences from the paper's rllab environments, read from rllab's model files:

* The half-cheetah's model is v5's, element for element (bodies, joints, stiffness, damping,
  gears, contact parameters, the 0.01 s timestep); only the simulator differs (MuJoCo 1.31
  then, a current MuJoCo now, whose contact solver has changed since).
* rllab started each episode from the model's pose plus 0.01 N(0, 1) on the positions and
  0.1 N(0, 1) on the velocities; v5 adds U(-0.1, 0.1) to the positions (a spread 5.8 times
  wider: up to 5.7 degrees on each joint and on the torso's pitch) and the same velocity
  noise. The half-cheetah option ``reset_noise: rllab`` starts as rllab did.
* rllab's ant steps 0.02 s with RK4 in one substep (here two of v5's 0.01 s), drives its
  motors with torques in [-150, 150] (rllab's action normalization scaled [-1, 1] to that and
  paid the control cost on the normalized action, as v5's gear 150 on [-1, 1] does), makes its
  contacts softer (``solimp .8 .8 .01`` on every geom, where v5 keeps MuJoCo's default
  ``.9 .95 .001``), and starts with the torso at 0.55 (its ``init_qpos``; v5's file carries
  the same numbers, but v5 starts from the body's 0.75). It also observed its position,
  orientation matrix and centre of mass, here left out. The ant option ``rllab_model: true``
  takes rllab's physics and start (``AntTaskEnv``); ``com_velocity: true`` its reward's
  velocity.
* The velocity in the reward is the torso's rather than the centre of mass's, unless
  ``com_velocity`` (both robots).

``GymTaskVectorEnv`` is generic: it batches any per-task gymnasium env that has a
``set_task(task)`` method (or a custom ``apply_task`` callback) behind the ``TaskVectorEnv`` API.
"""

from __future__ import annotations

import os
import statistics
import threading
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from functools import partial
from typing import Any, ClassVar, Literal

import gymnasium
import mujoco
import numpy as np
import pandas as pd
import torch
from gymnasium import spaces, utils
from gymnasium.envs.mujoco.ant_v5 import AntEnv
from gymnasium.envs.mujoco.half_cheetah_v5 import HalfCheetahEnv
from gymnasium.vector.utils import batch_space

from maml_core.tasks.base import TaskFamily, TaskVectorEnv, register_task_family

Objective = Literal["velocity", "direction"]
_OBJECTIVES: tuple[str, ...] = ("velocity", "direction")
ResetNoise = Literal["v5", "rllab"]
_RESET_NOISES: tuple[str, ...] = ("v5", "rllab")


# --------------------------------------------------------------------------------------------
# Generic batched env over per-task gymnasium envs
# --------------------------------------------------------------------------------------------

# One thread against several, timed on steps of at least _TRIAL_MIN_ENVS sub-envs taken by
# turns: _TRIAL_PAIRS pairs of neighbouring steps after a first pair that starts the threads.
_TRIAL_PAIRS, _TRIAL_MIN_ENVS = 16, 32
_POOLS: dict[int, ThreadPoolExecutor] = {}
_POOLS_LOCK = threading.Lock()


def _step_pool(threads: int) -> ThreadPoolExecutor:
    """One process-wide pool per size, shared by every env (an env pool can be rebuilt often)."""
    with _POOLS_LOCK:
        if threads not in _POOLS:
            _POOLS[threads] = ThreadPoolExecutor(threads, thread_name_prefix="maml-env")
        return _POOLS[threads]


def _forget_pools_after_fork() -> None:
    """A forked child has none of the parent's pool threads: let it start its own (and take
    fresh locks, which a parent's thread may have held at the fork)."""
    global _POOLS_LOCK, _MODELS_LOCK
    _POOLS.clear()
    _POOLS_LOCK = threading.Lock()
    _MODELS_LOCK = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pools_after_fork)


def faster_threads(one: list[float], many: list[float], threads: int) -> int:
    """``threads`` if steps on them took less time than on one thread over the median pair of
    neighbouring steps (``one[i]`` then ``many[i]``; the first pair, which starts the threads,
    not counted), else 1."""
    ratio = statistics.median(m / o for o, m in zip(one[1:], many[1:], strict=True))
    return threads if ratio < 1.0 else 1


def default_step_threads() -> int:
    """The CPUs this process may run on (``MAML_ENV_THREADS`` overrides)."""
    value = os.environ.get("MAML_ENV_THREADS")
    if value:
        if not value.isdigit() or int(value) < 1:
            raise ValueError(f"MAML_ENV_THREADS must be a positive integer (the threads that "
                             f"step MuJoCo envs), got {value!r}; unset it to use every CPU")
        return int(value)
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (
        os.cpu_count() or 1)


def _set_task_method(env: gymnasium.Env, task: Mapping[str, Any]) -> None:
    target = env.unwrapped
    set_task = getattr(target, "set_task", None)
    if set_task is None:
        raise TypeError(f"{type(target).__name__} has no set_task(task) method; give it one or "
                        "pass apply_task=... to GymTaskVectorEnv")
    set_task(task)


class GymTaskVectorEnv(TaskVectorEnv):
    """Batches one gymnasium env per sub-environment (``num_tasks x episodes_per_task``).

    ``env_fn()`` builds one single env (built once per sub-environment, then reused:
    ``set_tasks`` only re-points them, so an env pool can serve many iterations).
    ``apply_task(env, task)`` sets ``env`` to ``task`` (a dict of one task-table row); the default
    calls ``env.unwrapped.set_task(task)``.

    The inner envs should not truncate on their own (no ``TimeLimit``): the caller runs exactly
    ``horizon`` steps. Auto-reset is disabled: a sub-env that terminated (or truncated) is not
    stepped again, pays reward 0 and repeats its last observation until the next ``reset``.
    Actions are clipped to the action-space bounds before stepping.

    ``threads`` (default: the CPUs available, ``default_step_threads``) is the most threads
    that step the sub-envs. MuJoCo releases the GIL inside ``mj_step``, but the Python around
    it holds it, so more threads pay only where the physics dominates: the first steps of an
    env time one thread against ``threads`` by turns (17 pairs of neighbouring steps of at
    least 32 sub-envs, the first pair not counted), and the one faster on the median pair
    steps from then on (``step_threads``). Neighbouring steps share the machine's load of the
    moment, so their ratio is steadier than either time. Each sub-env is stepped by exactly one
    thread and writes only its own rows, so the results are identical whatever the choice.
    ``step`` returns (or raises the first sub-env's error) only once every thread is done. The
    policy that drives it runs on one torch thread (``policy_threads``).

    A per-task env class with a static ``step_batch(envs, indices, actions, obs, reward,
    terminated)`` (``HalfCheetahTaskEnv``, ``AntTaskEnv``) is stepped through it, a chunk of
    sub-envs per call, instead of its ``step``; it must give ``step``'s numbers (it never
    truncates).
    """

    def __init__(self, tasks: pd.DataFrame, episodes_per_task: int, horizon: int,
                 env_fn: Callable[[], gymnasium.Env],
                 apply_task: Callable[[gymnasium.Env, Mapping[str, Any]], None] | None = None,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 threads: int | None = None):
        threads = default_step_threads() if threads is None else int(threads)
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        self.threads = threads
        # One thread or ``threads``, timed on the first steps (class docstring).
        self.step_threads: int | None = 1 if threads == 1 else None
        self._timings: dict[int, list[float]] = {1: [], threads: []}
        self._pending: float | None = None  # a timed one-thread step awaiting its neighbour
        self._env_fn = env_fn
        self._apply_task = apply_task or _set_task_method
        self.envs: list[gymnasium.Env] = []
        super().__init__(tasks, episodes_per_task, horizon, device, dtype)  # builds self.envs

        first = self.envs[0]
        if not isinstance(first.action_space, spaces.Box) or len(first.action_space.shape) != 1:
            raise TypeError(f"GymTaskVectorEnv needs a 1-D Box action space, got "
                            f"{first.action_space}")
        if (not isinstance(first.observation_space, spaces.Box)
                or len(first.observation_space.shape) != 1):
            raise TypeError(f"GymTaskVectorEnv needs a 1-D Box observation space, got "
                            f"{first.observation_space}")
        np_dtype = torch.empty(0, dtype=dtype).numpy().dtype
        obs_space, act_space = first.observation_space, first.action_space
        self.obs_dim = int(obs_space.shape[0])
        self.act_dim = int(act_space.shape[0])
        self._act_low = np.asarray(act_space.low, dtype=np.float64)
        self._act_high = np.asarray(act_space.high, dtype=np.float64)
        self.single_observation_space = spaces.Box(
            obs_space.low.astype(np_dtype), obs_space.high.astype(np_dtype), (self.obs_dim,),
            np_dtype)
        self.single_action_space = spaces.Box(
            act_space.low.astype(np_dtype), act_space.high.astype(np_dtype), (self.act_dim,),
            np_dtype)
        self.observation_space = batch_space(self.single_observation_space, self.num_envs)
        self.action_space = batch_space(self.single_action_space, self.num_envs)

        # Envs may step as a batch, without gymnasium's per-step bookkeeping:
        # ``step_batch(envs, indices, actions, obs, reward, terminated)`` (the MuJoCo task envs).
        self._step_batch = getattr(type(first), "step_batch", None)
        self._obs = np.zeros((self.num_envs, self.obs_dim), dtype=np.float64)
        self._terminated = np.zeros(self.num_envs, dtype=bool)
        self._truncated = np.zeros(self.num_envs, dtype=bool)
        self._needs_reset = True

    def policy_threads(self) -> int | None:
        # Always one, whatever ``threads`` is, so that the policy's numbers do not depend on
        # how the env is stepped (nor on the CPUs of a Dask worker: flows.scale_out).
        return 1

    def _apply_tasks(self, tasks: pd.DataFrame) -> None:
        while len(self.envs) < self.num_envs:  # first call only: build the (slow) models
            self.envs.append(self._env_fn())
        rows = tasks.to_dict("records")
        for i, env in enumerate(self.envs):
            self._apply_task(env, rows[i // self.episodes_per_task])
        self._needs_reset = True

    def reset(self, *, seed: int | Sequence[int] | None = None,
              options: dict[str, Any] | None = None) -> tuple[torch.Tensor, dict[str, Any]]:
        seeds = self.env_seeds(seed)
        for i, env in enumerate(self.envs):
            obs, _ = env.reset(seed=seeds[i], options=options)
            self._obs[i] = obs
        self._terminated[:] = False
        self._truncated[:] = False
        self._needs_reset = False
        self._pending = None  # a pair of the thread trial never spans a reset
        return self._to_torch(self._obs), {}

    def step(self, actions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                   torch.Tensor, dict[str, Any]]:
        if self._needs_reset:
            raise RuntimeError("call reset() before step() (and again after set_tasks())")
        actions = torch.as_tensor(actions)
        if tuple(actions.shape) != (self.num_envs, self.act_dim):
            raise ValueError(f"actions must have shape ({self.num_envs}, {self.act_dim}) "
                             f"[num_envs, action_dim], got {tuple(actions.shape)}")
        acts = actions.detach().to("cpu", torch.float64).numpy()
        if not np.isfinite(acts).all():
            raise ValueError("actions contain NaN or infinite values; check the policy's output")
        acts = np.clip(acts, self._act_low, self._act_high)

        reward = np.zeros(self.num_envs, dtype=np.float64)
        active = np.flatnonzero(~(self._terminated | self._truncated))

        def step_some(indices: np.ndarray) -> None:
            if self._step_batch is not None:
                self._step_batch(self.envs, indices, acts, self._obs, reward, self._terminated)
                return
            for i in indices:
                obs, r, term, trunc, _ = self.envs[i].step(acts[i])
                self._obs[i] = obs
                reward[i] = r
                self._terminated[i] = bool(term)
                self._truncated[i] = bool(trunc) and not term

        threads = self._threads_for_step()
        start = time.perf_counter()
        chunks = min(threads, len(active) // 16)  # small batches: not worth a hand-off
        if chunks > 1:
            pool = _step_pool(self.threads)
            futures = [pool.submit(step_some, part) for part in np.array_split(active, chunks)]
            try:
                wait(futures)
            finally:  # even if the wait was interrupted (a stage timeout), no thread may still
                wait(futures)  # be stepping these envs when step() returns or raises
            for future in futures:
                future.result()  # the first failure, if any
        else:
            step_some(active)
        if self.step_threads is None:
            self._time_trial_step(threads, time.perf_counter() - start, len(active))
        return (self._to_torch(self._obs), self._to_torch(reward),
                torch.from_numpy(self._terminated.copy()).to(self.device),
                torch.from_numpy(self._truncated.copy()).to(self.device), {})

    def _threads_for_step(self) -> int:
        """The threads for this step: ``step_threads`` once chosen; until then one thread, and
        ``threads`` on the step after a timed one-thread step (each sub-env is stepped by one
        thread whatever the choice, so it changes no number, only the time)."""
        if self.step_threads is not None:
            return self.step_threads
        return 1 if self._pending is None else self.threads

    def _time_trial_step(self, threads: int, seconds: float, active: int) -> None:
        """Record a step of the thread trial: a pair is a timed one-thread step and the step
        right after it on ``threads``; a step of fewer than ``_TRIAL_MIN_ENVS`` sub-envs is not
        timed and breaks the pair it falls in."""
        per_env = seconds / active if active >= _TRIAL_MIN_ENVS else None
        if threads == 1:
            self._pending = per_env
            return
        if self._pending is not None and per_env is not None:
            self._timings[1].append(self._pending)
            self._timings[threads].append(per_env)
        self._pending = None
        if len(self._timings[threads]) > _TRIAL_PAIRS:
            self.step_threads = faster_threads(self._timings[1], self._timings[threads],
                                               threads)

    def _to_torch(self, array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(array.copy()).to(device=self.device, dtype=self.dtype)

    def close_extras(self, **kwargs: Any) -> None:
        for env in self.envs:
            env.close()


# --------------------------------------------------------------------------------------------
# Per-task MuJoCo envs
# --------------------------------------------------------------------------------------------

# Compiled models shared by the task envs of one process (``_SharedModel``).
_MODELS: dict[tuple[type, str, int, int, str], mujoco.MjModel] = {}
_MODELS_LOCK = threading.Lock()


class _SharedModel:
    """One compiled ``MjModel`` per env class, model file and variant (``model_variant``, what
    ``_compile`` changes in the file), shared by every env of the process; each env has its own
    ``MjData``.

    ``mj_step`` only reads the model (MuJoCo's threading rule: one ``mjModel``, one ``mjData``
    per thread), and nothing here writes to it after compiling, so sharing changes no number
    (``tests/test_mujoco_tasks.py`` checks against gymnasium's envs, each with its own model).
    Measured on halfcheetah-dir's pool of 20 tasks x 20 episodes after 200 steps: 411 MB
    with a model per sub-env, 181 MB shared, and built in 0.5 s instead of 1.5 s. An env that
    must change its model has to copy it first (``copy.copy(model)``) and set ``self.model``;
    gymnasium's interactive viewer, whose transparency key edits ``geom_rgba``, changes how
    every env of the process is drawn (the drawing only).
    """

    fullpath: str
    width: int
    height: int
    # What the env changes in its model file when it compiles it (``_compile``), as a key.
    model_variant: str = ""

    def _initialize_simulation(self) -> tuple[mujoco.MjModel, mujoco.MjData]:
        key = (type(self), os.path.realpath(self.fullpath), self.width, self.height,
               self.model_variant)
        with _MODELS_LOCK:
            model = _MODELS.get(key)
            if model is None:
                model, data = self._compile()
                _MODELS[key] = model
                return model, data
        return model, mujoco.MjData(model)

    def _compile(self) -> tuple[mujoco.MjModel, mujoco.MjData]:
        """Compile the model file as gymnasium does; a variant overrides this."""
        return super()._initialize_simulation()  # type: ignore[misc]


def check_flags(**options: Any) -> None:
    """Refuse an on/off option that is not a bool, naming it."""
    for option, value in options.items():
        if not isinstance(value, bool | np.bool_):
            raise ValueError(f"{option} must be True or False, got {value!r}")


def check_reset_noise(reset_noise: Any) -> None:
    if reset_noise not in _RESET_NOISES:
        raise ValueError(f"reset_noise must be one of {_RESET_NOISES} (v5's start or the "
                         f"paper's rllab start), got {reset_noise!r}")


def refuse_v5_noise(option: str, kwargs: Mapping[str, Any]) -> None:
    """rllab's start has its own noise: refuse v5's ``reset_noise_scale`` beside ``option``."""
    if "reset_noise_scale" in kwargs:
        raise ValueError(f"{option} sets its own start noise; drop reset_noise_scale (v5's "
                         f"start only)")


class _RllabMeasures:
    """What the paper's rllab robots did that v5's do otherwise: its start (``rllab_start``)
    and the centre-of-mass velocity of the torso's subtree (the whole robot) that its reward
    read (``paid_velocity``, with the env's ``_com_velocity``)."""

    model: mujoco.MjModel
    data: mujoco.MjData
    init_qpos: np.ndarray
    init_qvel: np.ndarray
    np_random: np.random.Generator
    _torso_id: int
    _com_velocity: bool = False

    def rllab_start(self) -> np.ndarray:
        """rllab's start: positions + 0.01 N(0, 1), velocities + 0.1 N(0, 1), from the env's
        seeded generator, positions first (v5: + U(-0.1, 0.1) and + 0.1 N(0, 1))."""
        qpos = self.init_qpos + 0.01 * self.np_random.standard_normal(self.model.nq)
        qvel = self.init_qvel + 0.1 * self.np_random.standard_normal(self.model.nv)
        self.set_state(qpos, qvel)  # type: ignore[attr-defined]
        return self._get_obs()  # type: ignore[attr-defined]

    def paid_velocity(self, x_velocity: float) -> float:
        """The velocity the reward pays for: the torso's ``x_velocity`` or, with
        ``com_velocity``, the centre of mass's."""
        return self.centre_of_mass_velocity() if self._com_velocity else x_velocity

    @staticmethod
    def paid_velocities(envs: Sequence[_RllabMeasures], x_velocity: np.ndarray) -> np.ndarray:
        """``paid_velocity`` for a batch of envs of one family (one set of options) whose data
        hold the states their steps ended in (``x_velocity``: the torsos')."""
        if not envs or not envs[0]._com_velocity:
            return x_velocity
        return np.array([env.centre_of_mass_velocity() for env in envs])

    def _recompute_positions(self) -> None:
        """mj_step computes positions before it integrates; recompute them (and the centres of
        mass) for the state the step ended in, as rllab's model.forward() after stepping did."""
        mujoco.mj_kinematics(self.model, self.data)
        mujoco.mj_comPos(self.model, self.data)

    def centre_of_mass_velocity(self) -> float:
        """rllab's ``get_body_comvel("torso")[0]``: the x velocity of the centre of mass of the
        torso's subtree (the whole robot), for the state the step ended in."""
        self._recompute_positions()
        mujoco.mj_comVel(self.model, self.data)
        mujoco.mj_subtreeVel(self.model, self.data)
        return float(self.data.subtree_linvel[self._torso_id][0])


class _TaskReward:
    """Task state and the task-dependent forward reward shared by the MuJoCo task envs."""

    objective: Objective
    target: float
    velocity_offset: float = 0.0  # added to the velocity objective's -|v - target|

    def _init_task(self, objective: str) -> None:
        if objective not in _OBJECTIVES:
            raise ValueError(f"objective must be one of {_OBJECTIVES}, got {objective!r}")
        self.objective = objective  # type: ignore[assignment]
        self.target = 0.0 if objective == "velocity" else 1.0

    def set_task(self, task: Mapping[str, Any]) -> None:
        """Set the target from a task row (needs the ``velocity`` or ``direction`` key)."""
        if self.objective not in task:
            raise ValueError(f"task {dict(task)} lacks {self.objective!r}")
        self.target = float(task[self.objective])

    def forward_reward(self, x_velocity: float) -> float:
        if self.objective == "velocity":
            return self.velocity_offset - abs(float(x_velocity) - self.target)
        return self.target * float(x_velocity)

    @staticmethod
    def forward_rewards(envs: Sequence[_TaskReward], x_velocity: np.ndarray) -> np.ndarray:
        """``forward_reward`` of each env for its velocity, as one array operation (envs of
        one family: one objective)."""
        target = np.array([env.target for env in envs])
        if envs and envs[0].objective == "velocity":
            offset = np.array([env.velocity_offset for env in envs])
            return offset - np.abs(x_velocity - target)
        return target * x_velocity


class HalfCheetahTaskEnv(_TaskReward, _RllabMeasures, _SharedModel, HalfCheetahEnv):
    """HalfCheetah-v5 with reward ``forward_reward(v) - ctrl_cost_weight * |a|^2``; ``v`` is the
    torso's x velocity, or with ``com_velocity`` the centre of mass's (``info["x_velocity"]``
    stays the torso's). ``reset_noise="rllab"``: rllab's start (``rllab_start``)."""

    def __init__(self, objective: Objective = "velocity", ctrl_cost_weight: float = 0.05,
                 torso_com: bool = False, com_velocity: bool = False,
                 reset_noise: ResetNoise = "v5", **kwargs: Any):
        self._init_task(objective)
        self._torso_com = bool(torso_com)
        self._com_velocity = bool(com_velocity)
        check_reset_noise(reset_noise)
        if reset_noise == "rllab":
            refuse_v5_noise("reset_noise='rllab'", kwargs)
        self._reset_noise = reset_noise
        HalfCheetahEnv.__init__(self, ctrl_cost_weight=ctrl_cost_weight, **kwargs)
        utils.EzPickle.__init__(self, objective, ctrl_cost_weight, torso_com, com_velocity,
                                reset_noise, **kwargs)
        self._torso_id = mujoco.mj_name2id(self.model, mujoco.mjtObj.mjOBJ_BODY, "torso")
        if self._torso_com:
            size = self.observation_space.shape[0] + 3
            self.observation_space = spaces.Box(-np.inf, np.inf, (size,), np.float64)

    def reset_model(self) -> np.ndarray:
        return self.rllab_start() if self._reset_noise == "rllab" else super().reset_model()

    def _get_obs(self) -> np.ndarray:
        observation = super()._get_obs()
        if not self._torso_com:
            return observation
        # rllab's get_body_com("torso"): the centre of mass of the torso's subtree (the whole
        # cheetah), x included, for the state the step ended in.
        self._recompute_positions()
        return np.concatenate((observation, self.data.subtree_com[self._torso_id]))

    @staticmethod
    def step_batch(envs: Sequence[HalfCheetahTaskEnv], indices: np.ndarray,
                   actions: np.ndarray, obs: np.ndarray, reward: np.ndarray,
                   terminated: np.ndarray) -> None:
        """``envs[i].step(actions[i])`` for each ``i`` in ``indices``, its observation, reward
        and termination written to row ``i`` of ``obs``, ``reward`` and ``terminated``.

        The same numbers as ``step``, bit for bit (``tests/test_mujoco_tasks.py``), at a
        fraction of its cost: ``step`` spends most of its time, at the paper's 0.01 s step, in
        gymnasium's bookkeeping (shape checks, info dicts, ``mj_rnePostConstraint``, whose
        contact forces the cheetah neither observes nor pays for), not in ``mj_step``; here the
        loop does only the physics and the copies, and the rewards are computed for the whole
        batch at once. The cheetah never terminates.
        """
        batch = [envs[i] for i in indices]
        x_before, x_after = np.empty(len(batch)), np.empty(len(batch))
        for k, (i, env) in enumerate(zip(indices, batch, strict=True)):
            data = env.data
            qpos, qvel = data.qpos, data.qvel
            x_before[k] = qpos[0]
            data.ctrl[:] = actions[i]
            mujoco.mj_step(env.model, data, nstep=env.frame_skip)
            x_after[k] = qpos[0]
            row, positions = obs[i], len(qpos) - 1
            row[:positions] = qpos[1:]
            row[positions:positions + len(qvel)] = qvel
            if env._torso_com:
                env._recompute_positions()
                row[positions + len(qvel):] = data.subtree_com[env._torso_id]
        velocity = HalfCheetahTaskEnv.paid_velocities(  # each env's data: its step's end state
            batch, (x_after - x_before) / np.array([env.dt for env in batch]))
        weight = np.array([env._ctrl_cost_weight for env in batch])
        reward[indices] = (HalfCheetahTaskEnv.forward_rewards(batch, velocity)
                           - weight * np.sum(np.square(actions[indices]), axis=1))
        terminated[indices] = False

    def _get_rew(self, x_velocity: float, action: np.ndarray) -> tuple[float, dict[str, float]]:
        forward = self.forward_reward(self.paid_velocity(x_velocity))
        ctrl_cost = float(self.control_cost(action))
        return forward - ctrl_cost, {"reward_forward": forward, "reward_ctrl": -ctrl_cost}

    def _compile(self) -> tuple[mujoco.MjModel, mujoco.MjData]:
        # gymnasium's half_cheetah.xml uses ``settotalmass``, which MuJoCo >= 3.3 reports as
        # deprecated on every model build (dozens of lines per env pool). Silence exactly that
        # message while compiling; any other warning is passed on as a Python warning.
        previous = mujoco.get_mju_user_warning()

        def on_warning(message: str) -> None:
            if "settotalmass" not in message:
                warnings.warn(f"MuJoCo: {message}", RuntimeWarning, stacklevel=2)

        mujoco.set_mju_user_warning(on_warning)
        try:
            return super()._compile()
        finally:
            mujoco.set_mju_user_warning(previous)


# Substeps of v5's 0.01 s timestep per action: 0.02 s, the step of the paper's rllab ant.
ANT_FRAME_SKIP = 2
# The paper's rllab ant model (``AntTaskEnv``'s ``rllab_model``): one 0.02 s RK4 step, softer
# contacts (its solimp .8 .8 .01; midpoint and power at MuJoCo's defaults).
RLLAB_ANT_TIMESTEP = 0.02
RLLAB_ANT_SOLIMP = [0.8, 0.8, 0.01, 0.5, 2.0]
# HalfCheetah: v5's 5 substeps (0.05 s) by default; the paper's rllab cheetah took one (0.01 s).
HALF_CHEETAH_FRAME_SKIP = 5


class AntTaskEnv(_TaskReward, _RllabMeasures, _SharedModel, AntEnv):
    """Ant-v5 with the rllab MAML reward ``forward - ctrl - contact + survive_reward`` (forward:
    ``velocity_offset - |v - target|`` or ``direction * v``) and rllab's 0.02 s per action.

    ``rllab_model``: the paper's rllab ant as its model file and reset made it, on v5's bodies:
    one RK4 step of 0.02 s per action (v5's file: RK4 at 0.01 s, here taken twice), softer contacts
    (``solimp .8 .8 .01`` on every geom, MuJoCo 1.31's three numbers with today's defaults for
    the other two; v5 keeps MuJoCo's ``.9 .95 .001``), a start from the file's ``init_qpos``
    (torso at 0.55, each ankle bent 1 rad, inside its joint range; v5 starts from the bodies'
    0.75 with straight ankles, outside it) plus 0.01 N(0, 1) on the positions and 0.1 N(0, 1)
    on the velocities (v5: U(-0.1, 0.1) and 0.1 N(0, 1)). ``com_velocity``: ``v`` is the
    velocity of the ant's centre of mass, as rllab's reward read it, not the torso's
    (``info["x_velocity"]`` stays the torso's)."""

    def __init__(self, objective: Objective = "velocity", ctrl_cost_weight: float = 0.5e-2,
                 contact_cost_weight: float = 0.5e-3, survive_reward: float = 0.05,
                 include_cfrc_ext_in_observation: bool = False, velocity_offset: float = 1.0,
                 frame_skip: int | None = None, rllab_model: bool = False,
                 com_velocity: bool = False, **kwargs: Any):
        self._init_task(objective)
        self._survive_reward = float(survive_reward)
        self.velocity_offset = float(velocity_offset)
        self._rllab_model = bool(rllab_model)
        self._com_velocity = bool(com_velocity)
        if self._rllab_model:
            if frame_skip not in (None, 1):
                raise ValueError(f"rllab_model steps its model's own 0.02 s per action "
                                 f"(frame_skip 1); got frame_skip={frame_skip!r}")
            refuse_v5_noise("rllab_model", kwargs)
            frame_skip = 1
        kwargs["frame_skip"] = ANT_FRAME_SKIP if frame_skip is None else int(frame_skip)
        kwargs.setdefault("healthy_z_range", (0.2, 1.0))
        kwargs.setdefault("contact_force_range", (-1.0, 1.0))
        AntEnv.__init__(self, ctrl_cost_weight=ctrl_cost_weight,
                        contact_cost_weight=contact_cost_weight, healthy_reward=survive_reward,
                        include_cfrc_ext_in_observation=include_cfrc_ext_in_observation,
                        **kwargs)
        utils.EzPickle.__init__(self, objective, ctrl_cost_weight, contact_cost_weight,
                                survive_reward, include_cfrc_ext_in_observation,
                                velocity_offset, rllab_model=rllab_model,
                                com_velocity=com_velocity, **kwargs)
        self._main_body_id = self._torso_id = self.data.body(self._main_body).id
        if self._rllab_model:
            self.init_qpos = self.model.numeric("init_qpos").data.copy()

    @property
    def model_variant(self) -> str:  # type: ignore[override]
        return "rllab" if self._rllab_model else ""

    def _compile(self) -> tuple[mujoco.MjModel, mujoco.MjData]:
        if not self._rllab_model:
            return super()._compile()
        spec = mujoco.MjSpec.from_file(self.fullpath)  # v5's file: RK4 already, at 0.01 s
        spec.option.timestep = RLLAB_ANT_TIMESTEP
        for geom in spec.geoms:
            geom.solimp = RLLAB_ANT_SOLIMP
        model = spec.compile()
        model.vis.global_.offwidth = max(model.vis.global_.offwidth, self.width)
        model.vis.global_.offheight = max(model.vis.global_.offheight, self.height)
        return model, mujoco.MjData(model)

    def reset_model(self) -> np.ndarray:
        return self.rllab_start() if self._rllab_model else super().reset_model()

    @staticmethod
    def step_batch(envs: Sequence[AntTaskEnv], indices: np.ndarray, actions: np.ndarray,
                   obs: np.ndarray, reward: np.ndarray, terminated: np.ndarray) -> None:
        """``envs[i].step(actions[i])`` for each ``i`` in ``indices``, written to row ``i`` of
        ``obs``, ``reward`` and ``terminated``: ``step``'s numbers, bit for bit, without
        gymnasium's per-step bookkeeping, the costs computed for the whole batch at once (see
        ``HalfCheetahTaskEnv.step_batch``)."""
        if len(indices) == 0:
            return
        batch = [envs[i] for i in indices]
        first = batch[0]
        x_before, x_after = np.empty(len(batch)), np.empty(len(batch))
        healthy = np.empty(len(batch), dtype=bool)
        forces = np.empty((len(batch), *first.data.cfrc_ext.shape))
        for k, (i, env) in enumerate(zip(indices, batch, strict=True)):
            data = env.data
            # v5's torso position is that of the last substep's kinematics (before it integrates)
            x_before[k] = data.xpos[env._main_body_id, 0]
            data.ctrl[:] = actions[i]
            mujoco.mj_step(env.model, data, nstep=env.frame_skip)
            mujoco.mj_rnePostConstraint(env.model, data)  # the contact forces the reward pays
            x_after[k] = data.xpos[env._main_body_id, 0]
            qpos, qvel = data.qpos, data.qvel
            row, positions = obs[i], len(qpos) - 2
            row[:positions] = qpos[2:]
            row[positions:positions + len(qvel)] = qvel
            forces[k] = data.cfrc_ext
            low, high = env._healthy_z_range
            healthy[k] = (np.isfinite(qpos).all() and np.isfinite(qvel).all()
                          and low <= qpos[2] <= high)
        low, high = first._contact_force_range
        clipped = np.clip(forces, low, high)
        if first._include_cfrc_ext_in_observation:
            obs[indices, first.observation_space.shape[0] - clipped[0, 1:].size:] = \
                clipped[:, 1:].reshape(len(batch), -1)
        dt = np.array([env.dt for env in batch])
        velocity = AntTaskEnv.paid_velocities(batch, (x_after - x_before) / dt)
        forward = AntTaskEnv.forward_rewards(batch, velocity)
        ctrl_weight = np.array([env._ctrl_cost_weight for env in batch])
        contact_weight = np.array([env._contact_cost_weight for env in batch])
        survive = np.array([env._survive_reward for env in batch])
        reward[indices] = (forward - ctrl_weight * np.sum(np.square(actions[indices]), axis=1)
                           - contact_weight * np.sum(np.square(clipped), axis=(1, 2)) + survive)
        terminate = np.array([env._terminate_when_unhealthy for env in batch], dtype=bool)
        terminated[indices] = ~healthy & terminate

    def _get_rew(self, x_velocity: float, action: np.ndarray) -> tuple[float, dict[str, float]]:
        forward = self.forward_reward(self.paid_velocity(x_velocity))
        ctrl_cost = float(self.control_cost(action))
        contact_cost = float(self.contact_cost)
        reward = forward - ctrl_cost - contact_cost + self._survive_reward
        return reward, {"reward_forward": forward, "reward_ctrl": -ctrl_cost,
                        "reward_contact": -contact_cost, "reward_survive": self._survive_reward}


# --------------------------------------------------------------------------------------------
# Families
# --------------------------------------------------------------------------------------------

class _MujocoTaskFamily(TaskFamily):
    default_horizon = 200
    objective: ClassVar[Objective]

    def check_environment(self) -> None:
        default_step_threads()

    def _env_fn(self) -> Callable[[], gymnasium.Env]:
        raise NotImplementedError

    def make_env(self, tasks: pd.DataFrame, episodes_per_task: int, horizon: int | None = None,
                 device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32) -> GymTaskVectorEnv:
        return GymTaskVectorEnv(self.validate_tasks(tasks), episodes_per_task,
                                horizon or self.default_horizon, self._env_fn(),
                                device=device, dtype=dtype)


class _VelocityFamily(_MujocoTaskFamily):
    objective = "velocity"
    task_params = ("velocity",)
    default_low: ClassVar[float] = 0.0
    default_high: ClassVar[float]

    def _init_range(self, low: float | None, high: float | None) -> None:
        low = self.default_low if low is None else float(low)
        high = self.default_high if high is None else float(high)
        if not (np.isfinite(low) and np.isfinite(high) and low < high):
            raise ValueError(f"{self.name} needs finite low < high for the target velocity, "
                             f"got low={low}, high={high}")
        self.low, self.high = low, high

    def sample_tasks(self, n: int, rng: np.random.Generator) -> pd.DataFrame:
        if n < 1:
            raise ValueError(f"number of tasks must be >= 1, got {n}")
        return self._table(n, {"velocity": rng.uniform(self.low, self.high, size=n)})


class _DirectionFamily(_MujocoTaskFamily):
    """Direction +1 or -1 with equal odds. Option ``balanced``: every sampled set of tasks (a
    meta-batch, the validation tasks) holds as many of each direction as it can (an odd count:
    one more of a direction drawn at random), in random order, instead of independent draws,
    whose mix varies (a meta-batch of 20 is 14 to 6 or more one way about one time in nine).
    Either way each direction has the same odds; ``balanced`` takes the mix's variance out of
    the meta-gradient."""

    objective = "direction"
    task_params = ("direction",)
    balanced = False

    def _init_directions(self, balanced: bool) -> None:
        check_flags(balanced=balanced)
        self.balanced = bool(balanced)

    def sample_tasks(self, n: int, rng: np.random.Generator) -> pd.DataFrame:
        if n < 1:
            raise ValueError(f"number of tasks must be >= 1, got {n}")
        sides = np.array([-1.0, 1.0])
        if not self.balanced:
            return self._table(n, {"direction": rng.choice(sides, size=n)})
        direction = np.repeat(sides, n // 2)
        if n % 2:
            direction = np.append(direction, rng.choice(sides))
        return self._table(n, {"direction": rng.permutation(direction)})

    def validate_tasks(self, tasks: pd.DataFrame) -> pd.DataFrame:
        tasks = super().validate_tasks(tasks)
        direction = tasks["direction"].to_numpy(dtype=np.float64)
        bad = direction[np.abs(direction) != 1.0]
        if bad.size:
            raise ValueError(f"the task table for {self.name!r} has direction values "
                             f"{sorted(set(bad.tolist()))[:5]}; direction must be +1 or -1")
        return tasks


class _HalfCheetahMixin:
    observation_dim = 17
    action_dim = 6
    objective: ClassVar[Objective]

    def _init_cheetah(self, frame_skip: int, torso_com: bool, com_velocity: bool,
                      reset_noise: str) -> None:
        if isinstance(frame_skip, bool) or not isinstance(frame_skip, int | np.integer) \
                or frame_skip < 1:
            raise ValueError(f"frame_skip must be an integer >= 1 (substeps of 0.01 s per "
                             f"action), got {frame_skip!r}")
        check_flags(torso_com=torso_com, com_velocity=com_velocity)
        check_reset_noise(reset_noise)
        self.reset_noise = str(reset_noise)
        self.frame_skip = int(frame_skip)
        self.torso_com = bool(torso_com)
        self.com_velocity = bool(com_velocity)
        self.observation_dim = _HalfCheetahMixin.observation_dim + 3 * self.torso_com

    def _env_fn(self) -> Callable[[], gymnasium.Env]:
        return partial(HalfCheetahTaskEnv, self.objective, frame_skip=self.frame_skip,
                       torso_com=self.torso_com, com_velocity=self.com_velocity,
                       reset_noise=self.reset_noise)

    def dynamics(self) -> dict[str, Any]:
        return {"frame_skip": self.frame_skip, "torso_com": self.torso_com,
                "com_velocity": self.com_velocity, "reset_noise": self.reset_noise}


class _AntMixin:
    observation_dim = 27
    action_dim = 8
    env_version = 2  # 2: rllab's 0.02 s step and ant-vel's +1 (1: v5's 0.05 s, no +1)
    objective: ClassVar[Objective]

    def _init_ant(self, include_contact_forces: bool, rllab_model: bool,
                  com_velocity: bool) -> None:
        check_flags(include_contact_forces=include_contact_forces, rllab_model=rllab_model,
                    com_velocity=com_velocity)
        self.include_contact_forces = bool(include_contact_forces)
        self.rllab_model = bool(rllab_model)
        self.com_velocity = bool(com_velocity)
        self.observation_dim = 27 + 78 * self.include_contact_forces

    def _env_fn(self) -> Callable[[], gymnasium.Env]:
        return partial(AntTaskEnv, self.objective,
                       include_cfrc_ext_in_observation=self.include_contact_forces,
                       rllab_model=self.rllab_model, com_velocity=self.com_velocity)

    def dynamics(self) -> dict[str, Any]:
        return {"rllab_model": self.rllab_model, "com_velocity": self.com_velocity}


@register_task_family
class HalfCheetahVel(_HalfCheetahMixin, _VelocityFamily):
    """HalfCheetah running at a target velocity; options ``low``/``high`` (default 0, 2),
    ``frame_skip`` (default 5: v5's 0.05 s per action; 1: the paper's 0.01 s), ``torso_com``
    (default False; True appends the cheetah's centre of mass, as the paper's observation did),
    ``com_velocity`` (default False: the torso's velocity; True: the centre of mass's, as
    the paper's reward measured it) and ``reset_noise`` (default "v5"; "rllab": the paper's
    smaller start noise on the positions, ``HalfCheetahTaskEnv.reset_model``)."""

    name = "halfcheetah-vel"
    gym_id = "HalfCheetahVel"
    default_high = 2.0

    def __init__(self, low: float | None = None, high: float | None = None,
                 frame_skip: int = HALF_CHEETAH_FRAME_SKIP, torso_com: bool = False,
                 com_velocity: bool = False, reset_noise: str = "v5"):
        self._init_range(low, high)
        self._init_cheetah(frame_skip, torso_com, com_velocity, reset_noise)


@register_task_family
class HalfCheetahDir(_HalfCheetahMixin, _DirectionFamily):
    """HalfCheetah running forward (+1) or backward (-1); options ``frame_skip`` (default 5:
    v5's 0.05 s per action; 1: the paper's 0.01 s), ``torso_com``, ``com_velocity`` and
    ``reset_noise`` (as for halfcheetah-vel), ``balanced`` (``_DirectionFamily``)."""

    name = "halfcheetah-dir"
    gym_id = "HalfCheetahDir"

    def __init__(self, frame_skip: int = HALF_CHEETAH_FRAME_SKIP, torso_com: bool = False,
                 com_velocity: bool = False, balanced: bool = False, reset_noise: str = "v5"):
        self._init_cheetah(frame_skip, torso_com, com_velocity, reset_noise)
        self._init_directions(balanced)


@register_task_family
class AntVel(_AntMixin, _VelocityFamily):
    """Ant running at a target velocity; options ``low``/``high`` (default 0, 3),
    ``include_contact_forces`` (default False: 27-dim observation; True: 105), ``rllab_model``
    (default False: v5's model and start; True: the paper's rllab physics and start,
    ``AntTaskEnv``) and ``com_velocity`` (default False: the torso's velocity; True: the centre
    of mass's, as the paper's reward read it)."""

    name = "ant-vel"
    gym_id = "AntVel"
    default_high = 3.0

    def __init__(self, low: float | None = None, high: float | None = None,
                 include_contact_forces: bool = False, rllab_model: bool = False,
                 com_velocity: bool = False):
        self._init_range(low, high)
        self._init_ant(include_contact_forces, rllab_model, com_velocity)


@register_task_family
class AntDir(_AntMixin, _DirectionFamily):
    """Ant running forward (+1) or backward (-1); options ``include_contact_forces``,
    ``rllab_model`` and ``com_velocity`` (as for ant-vel), ``balanced`` (``_DirectionFamily``)."""

    name = "ant-dir"
    gym_id = "AntDir"

    def __init__(self, include_contact_forces: bool = False, balanced: bool = False,
                 rllab_model: bool = False, com_velocity: bool = False):
        self._init_ant(include_contact_forces, rllab_model, com_velocity)
        self._init_directions(balanced)
