"""TRPO updates that find no acceptable step are rejected and leave theta untouched."""

from __future__ import annotations

import pytest
import torch

from maml_core.config import build_config
from maml_core.trainer import MetaLearner, TrainingError

torch.set_num_threads(1)


def _learner(**meta) -> MetaLearner:
    return MetaLearner(build_config({
        "meta_batch_size": 3, "episodes_per_task": 4, "task": {"horizon": 20},
        "policy": {"hidden_sizes": [8]},
        "meta_optimizer": {"name": "trpo", "max_rejected_updates": 2, **meta}}))


def _batch(learner: MetaLearner, it: int):
    tasks = learner.sample_tasks(it)
    pre = learner.collect(learner.meta_params, tasks, it, "pre")
    post = learner.collect(learner.adapt(pre), tasks, it, "post")
    return pre, post


def test_no_improving_step_is_rejected_and_theta_kept():
    learner = _learner()
    pre, post = _batch(learner, 0)
    post.advantages = torch.zeros_like(post.advantages)  # no step can lower the surrogate
    before = learner.detached_params()
    before = {k: v.clone() for k, v in before.items()}
    stats = learner.meta_update(pre, post)
    assert stats["rejected"] == 1.0
    for k, v in learner.detached_params().items():
        assert torch.equal(v, before[k]), k


def test_line_search_that_never_satisfies_the_kl_bound_is_rejected():
    # One trial only, with a step sized for a KL of 1e-30: it changes nothing measurable, so
    # the surrogate cannot improve, the line search gives up and theta is restored.
    learner = _learner(line_search_steps=1)
    pre, post = _batch(learner, 0)
    learner.optimizer.config = learner.optimizer.config.model_copy(update={"max_kl": 1e-30})
    before = {k: v.clone() for k, v in learner.detached_params().items()}
    stats = learner.meta_update(pre, post)
    assert stats["rejected"] == 1.0 and stats["line_search_steps"] == 1.0
    for k, v in learner.detached_params().items():
        assert torch.equal(v, before[k]), k
    pre, post = _batch(learner, 1)
    with pytest.raises(TrainingError, match="rejected"):
        learner.meta_update(pre, post)  # the second rejection in a row stops training
