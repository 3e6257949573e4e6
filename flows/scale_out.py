"""Rollout collection on a Dask cluster (``pipeline.task_runner: dask``).

The collect_rollouts stage (still one Prefect task, with its retries and timeout) splits the
task table into contiguous shards and sends each shard -- its rows of the task table and the
policy parameters (the shared theta, or the shard's slice of the per-task adapted parameters)
as numpy arrays -- to a Dask worker, which collects it and computes its advantages; the
episodes come back as numpy arrays and are joined in task order with ``Episodes.concat_tasks``.
A worker builds one ``MetaLearner`` per run config (``config.model_dump(mode="json")``) and
keeps it, and so its MuJoCo environments, between calls. The cluster is prefect-dask's
``DaskTaskRunner``: a ``LocalCluster`` of ``pipeline.dask_workers`` processes (one thread
each, bound to 127.0.0.1), or the scheduler at ``pipeline.dask_address``.

Shards run as plain Dask tasks by default. With ``pipeline.dask_task_runs: true`` each shard is
a Prefect task run (``collect_shard``) of the flow, submitted through prefect-dask's client, so
it shows in the Prefect UI; that costs 0.1-0.3 s per shard on this project's 2-core machine
(the worker rebuilds Prefect's settings and an API client and makes three API calls per run),
against about 0.03 s for a whole plain collection round trip, and the workers must reach the
Prefect API (see :func:`worker_api_url`).

Same seed, same numbers as the local runner, bit for bit. Every random draw is per task
(``maml_core.rollouts``) and the advantages are per task (``maml_core.advantages``), but that
is not enough in floating point: a matrix product over a 9-row batch does not round like rows
0..8 of the same product over a 15-row batch (MKL picks other kernels for other shapes and
thread counts), and MuJoCo turns a one-ulp difference in an action into another trajectory
within a few steps. So a worker evaluates the policy and the advantages on the *full* batch
shape -- its shard's rows in their places, zeros elsewhere (:func:`collect_shard_padded`) --
with the flow process's number of torch threads: every kernel sees the shapes and thread count
that the local runner's kernels see (the policy's forward pass during a MuJoCo rollout runs on
one thread on both sides, ``TaskVectorEnv.policy_threads``). Only the environments are
sharded, which is where MuJoCo families spend their time; the policy's forward pass is
repeated on every worker (cheap next to MuJoCo, not next to navigation2d's tensor
environment). ``pipeline.dask_torch_threads``
trades that guarantee for fewer threads per worker.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import ipaddress
import json
import logging
import os
import threading
import time
import uuid
from collections import OrderedDict
from contextlib import contextmanager, nullcontext
from dataclasses import fields, replace
from typing import Any
from urllib.parse import urlparse

import numpy as np
import pandas as pd
import torch

from flows.config import RunConfig, load_run_config
from flows.settings import drop_server_only_variables
from maml_core.adaptation import split_meta_params
from maml_core.advantages import process_episodes
from maml_core.config import ConfigError
from maml_core.episodes import Episodes
from maml_core.policies import Params
from maml_core.rollouts import collect_episodes
from maml_core.seeding import task_seeds
from maml_core.tasks.base import TASK_ID
from maml_core.trainer import MetaLearner


def shard_bounds(num_tasks: int, num_shards: int) -> list[tuple[int, int]]:
    """Contiguous [start, end) row ranges of ``num_shards`` near-equal shards (none empty)."""
    n = int(num_tasks)
    k = max(1, min(int(num_shards), n))
    return [(i * n // k, (i + 1) * n // k) for i in range(k)]


def _pad(x: torch.Tensor, start: int, total: int, dim: int = 0) -> torch.Tensor:
    """``x`` placed at ``start`` along ``dim`` of a zero tensor ``total`` long there."""
    shape = list(x.shape)
    shape[dim] = total
    out = torch.zeros(shape, dtype=x.dtype, device=x.device)
    out.narrow(dim, start, x.shape[dim]).copy_(x)
    return out


class _PaddedPolicy:
    """A policy that evaluates a shard's tasks inside the full batch shape.

    ``collect_episodes`` calls ``distribution`` on the shard's observations (and per-task
    parameters) and then ``sample_with``; this wrapper places them at rows
    ``start..start+n`` of a zero-padded batch of ``total`` tasks laid out as
    ``collect_episodes`` lays out the full batch, calls the real policy on that, and hands back
    the shard's rows.
    """

    def __init__(self, policy, start: int, num_tasks: int, total: int, episodes: int):
        self.policy, self.start, self.n, self.total, self.e = (policy, start, num_tasks, total,
                                                               episodes)
        self.discrete = policy.discrete
        self._full_dist: tuple[torch.Tensor, ...] | None = None
        self._padded_params: tuple[Params, Params] | None = None

    def __getattr__(self, name: str):  # anything else: the real policy's
        return getattr(self.policy, name)

    def noise(self, shape, generator):
        return self.policy.noise(shape, generator)

    def _full_params(self, params: Params) -> Params:
        if self._padded_params is None or self._padded_params[0] is not params:
            self._padded_params = (params, {k: _pad(v, self.start, self.total)
                                            for k, v in params.items()})
        return self._padded_params[1]

    def distribution(self, params: Params, obs: torch.Tensor):
        n, e, total = self.n, self.e, self.total
        rows = slice(self.start, self.start + n)
        if params["layers.0.weight"].dim() == 3:  # per-task parameters; obs [n, e, obs_dim]
            full = self.policy.distribution(self._full_params(params),
                                            _pad(obs, self.start, total))
            self._full_dist = full
            return tuple(d[rows] for d in full)
        # shared parameters; obs [n * e, obs_dim], dist viewed [tasks, episodes, ...] after
        full_obs = _pad(obs.view(n, e, -1), self.start, total).reshape(total * e, -1)
        full = tuple(d.view(total, e, *d.shape[1:])
                     for d in self.policy.distribution(params, full_obs))
        self._full_dist = full
        return tuple(d[rows].reshape(n * e, *d.shape[2:]) for d in full)

    def sample_with(self, dist, noise: torch.Tensor) -> torch.Tensor:
        if self._full_dist is None:
            raise RuntimeError("_PaddedPolicy.sample_with before distribution")
        action = self.policy.sample_with(self._full_dist, _pad(noise, self.start, self.total))
        return action[self.start:self.start + self.n]


def _process_padded(episodes: Episodes, start: int, total: int, gamma: float, lam: float,
                    normalize: bool) -> Episodes:
    """Advantages of a shard computed inside the full batch shape (zeros, masked, elsewhere)."""
    padded = Episodes(**{f.name: _pad(getattr(episodes, f.name), start, total, dim=1)
                         for f in fields(Episodes) if getattr(episodes, f.name) is not None})
    padded = process_episodes(padded, gamma, lam, normalize)
    return replace(episodes, advantages=padded.advantages.narrow(1, start, episodes.num_tasks)
                   .contiguous())


def collect_shard_padded(learner: MetaLearner, params: Params, tasks: pd.DataFrame, start: int,
                         total: int, iteration: int, phase: str) -> Episodes:
    """``learner.collect`` for rows ``start..start+len(tasks)`` of a ``total``-task batch.

    ``params`` are shared, or per task for this shard's tasks only. The result equals the
    shard's slice of ``learner.collect(all_params, all_tasks, iteration, phase)`` exactly when
    torch runs with the same number of threads (see the module docstring).
    """
    cfg = learner.config
    e = learner.episodes_for(phase)
    env = learner.pool.get(tasks, e, learner.horizon)
    seeds = task_seeds(cfg.seed, iteration, phase, tasks[TASK_ID])
    theta, _ = split_meta_params(params)
    policy = _PaddedPolicy(learner.policy, start, len(tasks), total, e)
    episodes = collect_episodes(env, policy, theta, seeds, learner.horizon,
                                context=f"iteration {iteration}, phase {phase!r}")
    return _process_padded(episodes, start, total, cfg.gamma, cfg.gae_lambda,
                           cfg.normalize_advantages)


# --------------------------------------------------------------------------- worker side

_LEARNERS: OrderedDict[str, tuple[MetaLearner, threading.Lock]] = OrderedDict()
_LEARNERS_LOCK = threading.Lock()
_KEEP_LEARNERS = 2


def worker_learner(config: dict, family_module: str | None = None
                   ) -> tuple[MetaLearner, threading.Lock]:
    """This process's learner for ``config`` (built once, then reused), and its lock."""
    key = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()
    with _LEARNERS_LOCK:
        if key in _LEARNERS:
            _LEARNERS.move_to_end(key)
            return _LEARNERS[key]
        importlib.import_module("maml_core.tasks")  # registers the built-in families
        if family_module and family_module != "__main__":
            try:
                importlib.import_module(family_module)  # a family registered outside
            except ImportError as exc:
                raise ConfigError(
                    f"task family {config.get('task', {}).get('family')!r} is defined in "
                    f"module {family_module!r}, which the Dask worker cannot import ({exc}); "
                    "install it where the workers run") from exc
        entry = (MetaLearner(load_run_config(data=config)), threading.Lock())
        _LEARNERS[key] = entry
        while len(_LEARNERS) > _KEEP_LEARNERS:
            _, (old, _) = _LEARNERS.popitem(last=False)
            old.close()
        return entry


def _to_torch(arrays: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    # Arrays that arrive over Dask may be read-only views of the message: copy.
    return {k: torch.from_numpy(np.array(v, copy=True)) for k, v in arrays.items()}


def run_collect_shard(config: dict, family_module: str | None, torch_threads: int,
                      params: dict[str, np.ndarray], tasks: pd.DataFrame, start: int,
                      total: int, iteration: int, phase: str) -> dict[str, Any]:
    """One shard, on a worker: its episodes with advantages, as numpy arrays."""
    started = time.perf_counter()
    if torch.get_num_threads() != torch_threads:
        torch.set_num_threads(torch_threads)
    learner, lock = worker_learner(config, family_module)
    with lock:  # shards that run at once in one worker process share its env pool
        episodes = collect_shard_padded(learner, _to_torch(params), tasks, start, total,
                                        iteration, phase)
    arrays = {k: v.cpu().numpy() for k, v in episodes.to_tensors().items()}
    return {"episodes": arrays, "seconds": time.perf_counter() - started, "pid": os.getpid()}


@functools.cache
def shard_task():
    """``run_collect_shard`` as a Prefect task (``pipeline.dask_task_runs``)."""
    from prefect import task
    from prefect.cache_policies import NO_CACHE

    return task(name="collect_shard", cache_policy=NO_CACHE, persist_result=False,
                log_prints=False)(run_collect_shard)


# --------------------------------------------------------------------------- flow side

def _is_loopback(host: str | None) -> bool:
    if not host or host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def worker_api_url(dask_address: str | None) -> str:
    """The Prefect API that shard task runs report to: ``PREFECT_API_URL`` if set, else the
    temporary local server that Prefect runs for this process (started if need be).

    Prefect hands this process's settings to a Dask worker with each task run; without an API
    URL in them a worker would start a temporary server of its own. A scheduler on another
    machine cannot reach a server on 127.0.0.1: that is a ``ConfigError``.
    """
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        from prefect.server.api.server import SubprocessASGIServer

        server = SubprocessASGIServer()  # the instance Prefect's client uses; no-op if running
        server.start()
        url = server.api_url
    host = None
    if dask_address:
        host = urlparse(dask_address if "://" in dask_address
                        else f"tcp://{dask_address}").hostname
    if not _is_loopback(host) and _is_loopback(urlparse(url).hostname):
        raise ConfigError(
            f"pipeline.dask_address {dask_address!r} is a Dask scheduler on another machine, "
            f"but the Prefect API is {url}, which its workers cannot reach: set "
            "PREFECT_API_URL to a Prefect server they can reach, or pipeline.dask_task_runs "
            "to false")
    return url


@contextmanager
def _local_worker_environment(quiet: bool, workers: int):
    """Environment of LocalCluster workers, without changing this process's for good.

    Dask's nannies put ``distributed.nanny.pre-spawn-environ`` into the *parent's* environment
    before they spawn a worker. Its ``MALLOC_TRIM_THRESHOLD_`` is left out (it would switch off
    ``maml_core.allocator``'s malloc settings in the workers, and here); OpenMP threads sleep
    instead of spinning while a worker steps MuJoCo (``OMP_WAIT_POLICY=PASSIVE``: two workers
    with two spinning torch threads each made collection 10x slower on 2 cores); each worker
    steps MuJoCo on its share of this machine's CPUs (``MAML_ENV_THREADS``) rather than on all
    of them; Dask's own logs stay at WARNING unless Prefect logs at INFO or below.
    """
    import dask

    from maml_core.tasks.mujoco import default_step_threads

    env = "distributed.nanny.pre-spawn-environ."
    updates: dict[str, Any] = {env + "MALLOC_TRIM_THRESHOLD_": None,
                               env + "OMP_WAIT_POLICY": "PASSIVE",
                               env + "MAML_ENV_THREADS": str(max(1, default_step_threads()
                                                                  // max(1, workers)))}
    if quiet:
        updates[env + "DASK_LOGGING__DISTRIBUTED"] = "warning"
    saved = dict(os.environ)
    try:
        drop_server_only_variables()  # workers keep their root logger at WARNING
        with dask.config.set(updates):
            yield
    finally:
        for key in set(os.environ) - set(saved):
            del os.environ[key]
        os.environ.update(saved)


class DaskCollector:
    """Sharded ``collect`` on a Dask cluster: a LocalCluster, or the one at ``dask_address``.

    It has ``MetaLearner.collect``'s signature, so the collect_rollouts stage calls either.
    """

    def __init__(self, config: RunConfig, learner: MetaLearner):
        from prefect_dask import DaskTaskRunner

        p = config.pipeline
        self.learner = learner
        self.payload = config.model_dump(mode="json")
        self.family_module = type(learner.family).__module__
        self.policy_keys = [k for k, _ in learner.policy.named_parameters()]
        self.shards = p.dask_shards
        self.torch_threads = p.dask_torch_threads or torch.get_num_threads()
        self.task_runs = p.dask_task_runs
        self.api_url = worker_api_url(p.dask_address) if self.task_runs else None
        self.last: dict[str, Any] = {}
        quiet = os.environ.get("PREFECT_LOGGING_LEVEL", "WARNING").upper() not in ("DEBUG",
                                                                                   "INFO")
        if quiet:
            logging.getLogger("distributed").setLevel(logging.WARNING)
        if p.dask_address:
            runner = DaskTaskRunner(address=p.dask_address)
        else:  # worker processes on this machine; scheduler and workers bound to 127.0.0.1
            runner = DaskTaskRunner(cluster_kwargs={
                "n_workers": p.dask_workers, "threads_per_worker": 1, "processes": True,
                "host": "127.0.0.1", "dashboard_address": "127.0.0.1:0",
                "silence_logs": logging.WARNING if quiet else False})
        self.runner = runner.__enter__()
        try:
            with _local_worker_environment(quiet, p.dask_workers):
                self.client = runner.client  # starts the LocalCluster, or connects
            self.client.wait_for_workers(1, timeout=120)
        except (OSError, TimeoutError) as exc:
            self.close()
            if not p.dask_address:
                raise
            raise ConfigError(f"cannot use the Dask cluster at pipeline.dask_address "
                              f"{p.dask_address!r}: {exc}") from exc
        except BaseException:
            self.close()
            raise

    def workers(self) -> dict[str, int]:
        """Worker address -> threads, as the scheduler knows them now."""
        return dict(sorted(self.client.nthreads().items()))

    def collect(self, params: Params, tasks: pd.DataFrame, iteration: int,
                stage: str) -> Episodes:
        workers = self.workers()
        if not workers:
            raise RuntimeError("the Dask cluster has no workers")
        total = len(tasks)
        bounds = shard_bounds(total, self.shards or sum(workers.values()))
        batched = params["layers.0.weight"].dim() == 3
        arrays = {k: params[k].detach().cpu().contiguous().numpy() for k in self.policy_keys}
        addresses = list(workers)
        base = {"config": self.payload, "family_module": self.family_module,
                "torch_threads": self.torch_threads, "total": total,
                "iteration": int(iteration), "phase": stage}
        started = time.perf_counter()
        futures, handles = [], []
        try:
            with self._task_run_context():
                for i, (a, b) in enumerate(bounds):
                    kwargs = {**base, "start": a, "tasks": tasks.iloc[a:b],
                              "params": ({k: v[a:b] for k, v in arrays.items()} if batched
                                         else arrays)}
                    placement = {"key": f"collect_shard-{stage}-{iteration}-{i}-"
                                        f"{uuid.uuid4().hex[:12]}",
                                 "workers": [addresses[i % len(addresses)]],
                                 "allow_other_workers": True}
                    if self.task_runs:
                        from prefect_dask.task_runners import PrefectDaskFuture

                        fut = self.client.submit(shard_task(), parameters=kwargs,
                                                 return_type="state", wait_for=None,
                                                 dependencies=None, **placement)
                        handles.append(PrefectDaskFuture(wrapped_future=fut,
                                                         task_run_id=fut.task_run_id))
                    else:
                        fut = self.client.submit(run_collect_shard, pure=False, **placement,
                                                 **kwargs)
                        handles.append(fut)
                    futures.append(fut)
            results = [h.result() for h in handles]
        except BaseException:
            self.client.cancel(futures)
            raise
        parts = [Episodes.from_tensors(_to_torch(r["episodes"])).to(self.learner.device)
                 for r in results]
        self.last = {"shards": len(bounds), "seconds": time.perf_counter() - started,
                     "worker_seconds": [r["seconds"] for r in results],
                     "worker_pids": [r["pid"] for r in results]}
        return Episodes.concat_tasks(parts)

    @contextmanager
    def _task_run_context(self):
        """For shard task runs: the API URL in the settings that travel to the workers, and
        the stage's task run as their parent without its arguments (the in-process pipeline
        context, which must not be serialized)."""
        if not self.task_runs:
            yield
            return
        from prefect.context import TaskRunContext
        from prefect.settings import PREFECT_API_URL, temporary_settings

        parent = TaskRunContext.get()
        token = (TaskRunContext.__var__.set(parent.model_copy(update={"parameters": {}}))
                 if parent is not None else None)
        try:
            with temporary_settings(updates={PREFECT_API_URL: self.api_url}) \
                    if self.api_url else nullcontext():
                yield
        finally:
            if token is not None:
                TaskRunContext.__var__.reset(token)

    def close(self) -> None:
        runner, self.runner = getattr(self, "runner", None), None
        if runner is not None:
            runner.__exit__(None, None, None)


def open_collector(config: RunConfig, learner: MetaLearner) -> DaskCollector | None:
    """A ``DaskCollector`` when ``pipeline.task_runner`` is ``dask`` (RL families), else None."""
    if config.pipeline.task_runner != "dask" or not learner.rl:
        return None
    return DaskCollector(config, learner)
