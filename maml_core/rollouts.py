"""Rollout collection for a batch of tasks, with one parameter set or one per task.

Randomness is drawn per task from that task's seed (policy noise and environment resets), so
the random draws of a task do not depend on which other tasks are in the batch. Bit-for-bit
equality of a shard with the full batch also needs the policy evaluated on the same batch
shape: BLAS may round a product over 9 rows differently from the same rows inside 15, and
MuJoCo amplifies a last-bit difference in an action. ``flows.scale_out`` therefore runs the
policy on the full batch shape and shards only the environments.

An environment that raises, or returns NaN/Inf observations or rewards, makes the collection
fail with a ``RolloutError`` that names the tasks, the time step and the caller's context
(iteration and phase); the environment's own exception is kept as ``__cause__``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pandas as pd
import torch
from torch import Tensor

from maml_core.allocator import tune_allocator
from maml_core.episodes import Episodes
from maml_core.policies import Params
from maml_core.seeding import derive_seed, generator
from maml_core.tasks.base import TASK_ID, TaskFamily, TaskVectorEnv


class RolloutError(RuntimeError):
    """Rollout collection failed: the environment raised or returned non-finite values."""

    def __init__(self, message: str, task_ids: tuple[int, ...] = (), step: int | None = None,
                 context: str = ""):
        super().__init__(message)
        self.task_ids, self.step, self.context = tuple(task_ids), step, context

    def __reduce__(self):  # picklable with its fields (a Dask worker sends it back)
        return (type(self), (str(self), self.task_ids, self.step, self.context))


def _task_ids(env: TaskVectorEnv, index) -> list[int]:
    ids = env.tasks[TASK_ID].to_numpy() if TASK_ID in env.tasks else range(env.num_tasks)
    return [int(ids[int(i)]) for i in index]


def _rollout_error(env: TaskVectorEnv, context: str, what: str, task_index=None,
                   step: int | None = None) -> RolloutError:
    tasks = _task_ids(env, range(env.num_tasks) if task_index is None else task_index)
    where = f" at {context}" if context else ""
    at_step = f" at step {step}" if step is not None else ""
    shown = tasks if len(tasks) <= 10 else [*tasks[:10], "..."]
    return RolloutError(f"rollout collection failed{where}: {what} (environment "
                        f"{type(env).__name__}, task id(s) {shown}{at_step})",
                        tasks, step, context)


def _check_finite(env: TaskVectorEnv, obs: Tensor, rewards: Tensor | None,
                  context: str) -> None:
    """Raise ``RolloutError`` if ``obs`` [T, N, E, ...] or ``rewards`` [T', N, E] hold NaN/Inf."""
    bad_obs = ~torch.isfinite(obs).flatten(3).all(-1)
    bad_rew = (~torch.isfinite(rewards) if rewards is not None
               else bad_obs.new_zeros((0, *bad_obs.shape[1:])))
    if not (bool(bad_obs.any()) or bool(bad_rew.any())):
        return
    steps = max(len(bad_obs), len(bad_rew))
    pad = [torch.cat([b, b.new_zeros((steps - len(b), *b.shape[1:]))]) for b in (bad_obs, bad_rew)]
    bad = pad[0] | pad[1]
    step = int(bad.flatten(1).any(1).nonzero()[0, 0])
    tasks = bad[step].any(-1).nonzero().flatten().tolist()
    kinds = [name for name, b in zip(("observations", "rewards"), pad) if bool(b[step].any())]
    raise _rollout_error(env, context, f"the environment returned non-finite (NaN/Inf) "
                         f"{' and '.join(kinds)}", tasks, step)


class EnvPool:
    """Keeps batched environments alive between calls (building MuJoCo models is slow)."""

    def __init__(self, family: TaskFamily, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32):
        self.family, self.device, self.dtype = family, device, dtype
        self._envs: dict[tuple[int, int, int], TaskVectorEnv] = {}

    def get(self, tasks: pd.DataFrame, episodes_per_task: int, horizon: int) -> TaskVectorEnv:
        key = (len(tasks), int(episodes_per_task), int(horizon))
        env = self._envs.get(key)
        if env is None:
            env = self.family.make_env(tasks, episodes_per_task, horizon, self.device,
                                       self.dtype)
            self._envs[key] = env
        else:
            env.set_tasks(self.family.validate_tasks(tasks))
        return env

    def close(self) -> None:
        for env in self._envs.values():
            env.close()
        self._envs.clear()


@contextmanager
def torch_threads(count: int | None) -> Iterator[None]:
    """Run the block with ``torch.set_num_threads(count)`` (None: unchanged), then restore."""
    previous = torch.get_num_threads()
    if count is None or count == previous:
        yield
        return
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def collect_episodes(env: TaskVectorEnv, policy, params: Params, seeds: list[int],
                     horizon: int | None = None, *, context: str = "") -> Episodes:
    """Run ``policy`` with ``params`` (shared, or batched with one set per task) in ``env``.

    ``seeds`` holds one seed per task; each task's action noise and reset seeds derive from it.
    Returns episodes of shape [T, N, E, ...]. An exception of the environment, or a NaN/Inf
    observation or reward, raises ``RolloutError`` naming the tasks, the step and ``context``
    (e.g. ``"iteration 3, phase 'post'"``).
    """
    tune_allocator()
    n, e = env.num_tasks, env.episodes_per_task
    if len(seeds) != n:
        raise ValueError(f"collect_episodes needs one seed per task ({n}), got {len(seeds)}")
    horizon = int(horizon or env.horizon)
    device = env.device
    params = {k: v.detach().to(device) for k, v in params.items()}
    batched = params["layers.0.weight"].dim() == 3
    if batched and params["layers.0.weight"].shape[0] != n:
        raise ValueError(f"got parameters for {params['layers.0.weight'].shape[0]} tasks "
                         f"but the environment holds {n} tasks")
    # Per-task noise for every step, drawn up front: [T, N, E, ...].
    noise = torch.stack([policy.noise((horizon, e), generator(derive_seed(s, "actions")))
                         for s in seeds], dim=1).to(device=device)
    if not policy.discrete:
        noise = noise.to(env.dtype)
    try:
        obs, _ = env.reset(seed=[derive_seed(s, "reset") for s in seeds])
    except Exception as exc:
        raise _rollout_error(env, context, f"the environment raised {type(exc).__name__} in "
                             f"reset: {exc}") from exc
    obs_buf, act_buf, rew_buf, mask_buf = [], [], [], []
    alive = torch.ones(n * e, dtype=env.dtype, device=device)
    with torch.no_grad(), torch_threads(env.policy_threads()):
        for t in range(horizon):
            o = obs.view(n, e, -1)
            dist = policy.distribution(params, o if batched else o.reshape(n * e, -1))
            if not batched:
                dist = tuple(d.view(n, e, *d.shape[1:]) for d in dist)
            action = policy.sample_with(dist, noise[t])
            flat_action = action.reshape(n * e, *action.shape[2:])
            try:
                next_obs, reward, terminated, truncated, _ = env.step(flat_action)
            except Exception as exc:
                # NaN inputs make some environments raise: report the NaN, not its symptom.
                _check_finite(env, torch.stack([*obs_buf, o]),
                              torch.stack(rew_buf) if rew_buf else None, context)
                raise _rollout_error(env, context, f"the environment raised "
                                     f"{type(exc).__name__} in step: {exc}", step=t) from exc
            obs_buf.append(o)
            act_buf.append(action)
            rew_buf.append(reward.view(n, e) * alive.view(n, e))
            mask_buf.append(alive.view(n, e).clone())
            alive = alive * (~(terminated | truncated)).to(env.dtype)
            obs = next_obs
    observations, rewards = torch.stack(obs_buf), torch.stack(rew_buf)
    _check_finite(env, observations, rewards, context)  # one check (and sync) per collection
    return Episodes(observations=observations, actions=torch.stack(act_buf), rewards=rewards,
                    masks=torch.stack(mask_buf))

