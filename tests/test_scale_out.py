"""``pipeline.task_runner: dask``: sharded rollout collection equals the local runner's, bit
for bit, on a 2-worker LocalCluster (processes, one thread each)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("prefect_dask")
pytest.importorskip("distributed")

ROOT = Path(__file__).resolve().parent.parent
CONFIG = str(ROOT / "configs" / "navigation2d.yaml")
SMALL = ["meta_batch_size=4", "episodes_per_task=5", "evaluation.every=2",
         "evaluation.steps=1", "evaluation.episodes_per_task=5", "checkpoint_every=2",
         "pipeline.retry_delay_seconds=0"]
FAMILIES = {
    # 5 tasks x 3 episodes in 3 shards of 1, 2 and 2 tasks: row counts (3, 6, 6 vs 15) for which
    # an unpadded matrix product does not round like the full batch's.
    # Its inner step adapts on 4 episodes per task, the meta-loss's post-update phase has 3.
    "navigation2d": ["task.family=navigation2d", "meta_batch_size=5", "episodes_per_task=3",
                     "inner.episodes_per_task=4", "task.horizon=30", "pipeline.dask_shards=3"],
    "halfcheetah-vel": ["task.family=halfcheetah-vel", "meta_batch_size=4",
                        "episodes_per_task=2", "task.horizon=20"],
}


def assert_same_episodes(a, b) -> None:
    ta, tb = a.to_tensors(), b.to_tensors()
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k


@pytest.fixture(scope="module")
def cluster():
    from distributed import LocalCluster

    from flows.scale_out import _local_worker_environment

    # leaves this process's environment as it was
    with _local_worker_environment(quiet=True, workers=2):
        cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                               host="127.0.0.1", dashboard_address="127.0.0.1:0")
    with cluster:
        yield cluster


def test_shard_bounds_cover_the_tasks_in_order():
    from flows.scale_out import shard_bounds

    assert shard_bounds(5, 2) == [(0, 2), (2, 5)]
    assert shard_bounds(2, 4) == [(0, 1), (1, 2)]
    for n, k in ((20, 3), (7, 7), (1, 2)):
        bounds = shard_bounds(n, k)
        assert bounds[0][0] == 0 and bounds[-1][1] == n
        assert all(a < b == c for (a, b), (c, _) in zip(bounds, [*bounds[1:], (n, n)]))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_sharded_collection_on_dask_equals_local(cluster, family):
    from flows.config import load_run_config
    from flows.scale_out import DaskCollector
    from maml_core.trainer import MetaLearner

    config = load_run_config(data={}, overrides=[
        *FAMILIES[family], "pipeline.task_runner=dask",
        f"pipeline.dask_address={cluster.scheduler_address}"])
    learner = MetaLearner(config)
    collector = DaskCollector(config, learner)
    try:
        tasks = learner.sample_tasks(3)
        theta = learner.detached_params()
        pre = learner.collect(theta, tasks, 3, "pre")
        sharded_pre = collector.collect(theta, tasks, 3, "pre")
        assert collector.last["shards"] == (config.pipeline.dask_shards or 2)
        assert len(set(collector.last["worker_pids"])) == 2  # both workers did a shard
        assert_same_episodes(sharded_pre, pre)
        assert pre.episodes_per_task == (config.inner.episodes_per_task
                                         or config.episodes_per_task)
        adapted = learner.adapt(pre)  # one parameter set per task
        post = learner.collect(adapted, tasks, 3, "post")
        assert_same_episodes(collector.collect(adapted, tasks, 3, "post"), post)
        assert post.episodes_per_task == config.episodes_per_task
    finally:
        collector.close()
        learner.close()


def test_remote_scheduler_needs_a_reachable_prefect_api(pipeline):
    from flows.scale_out import worker_api_url
    from maml_core.config import ConfigError

    assert worker_api_url("tcp://127.0.0.1:8786").startswith("http://127.0.0.1")
    with pytest.raises(ConfigError, match="PREFECT_API_URL"):
        worker_api_url("tcp://10.1.2.3:8786")


def test_meta_train_on_dask_equals_local_runner(pipeline):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from flows.training import meta_train, store_root
    from maml_core.checkpoint import load_checkpoint

    def final(result):
        return load_checkpoint(store_root() / result["run_id"] / "checkpoints")[1]

    overrides = ["iterations=2", *SMALL]
    local = meta_train(config_path=CONFIG, overrides=overrides)
    # The default LocalCluster (pipeline.dask_workers=2), each shard a Prefect task run.
    dask = meta_train(config_path=CONFIG, overrides=[
        *overrides, "pipeline.task_runner=dask", "pipeline.dask_task_runs=true"])
    a, b = final(local), final(dask)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert dask["summary"] == local["summary"]

    from mlflow import MlflowClient

    flow_run_id = MlflowClient().get_run(dask["run_id"]).data.tags["prefect.flow_run_id"]
    # Task runs on Dask workers reach the server as events, written a moment after the flow
    # returns (later still on a busy machine): wait for them, up to 30 s.
    deadline = time.monotonic() + 30
    while True:
        with get_client(sync_client=True) as client:
            runs = client.read_task_runs(flow_run_filter=FlowRunFilter(
                id=FlowRunFilterId(any_=[flow_run_id])))
        shard_runs = [r for r in runs if r.name.startswith("collect_shard")]
        done = [r for r in shard_runs if r.state is not None and r.state.is_completed()]
        if len(done) >= 2 * 2 * 2 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert len(shard_runs) == 2 * 2 * 2  # iterations x (pre, post) x shards
    assert all(r.state.is_completed() for r in shard_runs)
