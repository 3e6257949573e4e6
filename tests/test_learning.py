"""Learning: short meta-training runs improve post-adaptation performance on held-out tasks."""

from __future__ import annotations

from pathlib import Path

import torch

from maml_core import baselines
from maml_core.config import build_config, read_yaml
from maml_core.trainer import MetaLearner

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parent.parent


def _step_means(curve, value):
    return curve.groupby("step")[value].mean()


def test_navigation_meta_training_improves_post_adaptation_return():
    # ~10 s: 12 TRPO iterations of 20 tasks x 10 episodes, 32-32 policy.
    cfg = build_config({"seed": 0, "meta_batch_size": 20, "episodes_per_task": 10,
                        "task": {"family": "navigation2d", "horizon": 100},
                        "policy": {"hidden_sizes": [32, 32]}, "inner": {"step_size": 0.1},
                        "meta_optimizer": {"name": "trpo", "max_kl": 0.01},
                        "evaluation": {"num_tasks": 20, "seed": 7}})
    learner = MetaLearner(cfg)
    tasks = learner.held_out_tasks()
    assert len(tasks) == 20
    before = _step_means(learner.evaluate(tasks, steps=1), "return")
    results = learner.train(12)
    assert [r.iteration for r in results] == list(range(12))
    assert all(r.stats["rejected"] == 0 for r in results[-3:])
    after = _step_means(learner.evaluate(tasks, steps=1), "return")
    # Typically about -61 -> -23 after one adaptation step.
    assert after[1] >= before[1] + 15, (before.tolist(), after.tolist())
    # The meta-learned initialization adapts: one gradient step helps on held-out tasks.
    assert after[1] >= after[0] + 5, after.tolist()
    learner.close()


def test_sinusoid_maml_beats_pretrained_after_one_step():
    # ~8 s: the paper's sinusoid config, 1000 meta-iterations instead of 5000.
    data = read_yaml(ROOT / "configs" / "sinusoid.yaml")
    cfg = build_config(data, ["iterations=1000",
                              f"task.test_tasks={ROOT / 'data' / 'sinusoid_test_tasks.csv'}"])
    learner = MetaLearner(cfg)
    tasks = learner.held_out_tasks()
    assert len(tasks) >= 100
    learner.train()
    pretrained = baselines.pretrained_params(MetaLearner(cfg), iterations=1000)
    maml = _step_means(learner.evaluate(tasks, steps=1), "mse")
    joint = _step_means(learner.evaluate(tasks, steps=1, meta_params=pretrained), "mse")
    # Typically about 0.85 (MAML) against 2.3 (pretrained) after one step.
    assert maml[1] < 0.7 * joint[1], (maml.tolist(), joint.tolist())
    assert maml[1] < 0.5 * maml[0], maml.tolist()


def test_evaluation_shows_each_steps_episodes_to_a_callback():
    """``on_episodes`` sees the episodes behind each step of the adaptation curve (their
    returns are that step's), and watching changes nothing."""
    import numpy as np
    import pandas as pd

    cfg = build_config({"seed": 0, "episodes_per_task": 4,
                        "task": {"family": "navigation2d", "horizon": 20},
                        "policy": {"hidden_sizes": [16, 16]},
                        "evaluation": {"num_tasks": 5, "seed": 3}})
    learner = MetaLearner(cfg)
    tasks = learner.held_out_tasks()
    seen = {}
    curve = learner.evaluate(tasks, steps=2, on_episodes=lambda s, e: seen.setdefault(s, e))
    assert sorted(seen) == [0, 1, 2]
    for step, episodes in seen.items():
        assert episodes.num_tasks == 5 and episodes.episodes_per_task == 4
        np.testing.assert_allclose(curve.loc[curve["step"] == step, "return"].to_numpy(),
                                   episodes.task_returns().numpy())
    assert len({float(e.task_returns().sum()) for e in seen.values()}) == 3
    pd.testing.assert_frame_equal(curve, learner.evaluate(tasks, steps=2))
    learner.close()


def test_evaluation_scales_the_steps_after_the_first_as_configured():
    """``evaluation.later_step_scale``: steps 0 and 1 do not depend on it; the policy of step 2
    is phi_1 - scale * alpha * g(step 1's episodes; phi_1), checked by hand: the evaluation's
    action noise is seeded per task and step, so the noise that step 2's actions imply under
    that policy is the same at every scale (and is not under the other scale's policy)."""
    from maml_core.adaptation import adapt, policy_gradient_loss

    def evaluate(scale):
        cfg = build_config({"seed": 0, "episodes_per_task": 4,
                            "task": {"family": "navigation2d", "horizon": 20},
                            "policy": {"hidden_sizes": [16, 16]},
                            "inner": {"step_size": 0.3},
                            "evaluation": {"num_tasks": 5, "seed": 3,
                                           "later_step_scale": scale}})
        learner = MetaLearner(cfg)
        seen = {}
        curve = learner.evaluate(learner.held_out_tasks(), steps=2,
                                 on_episodes=lambda s, e: seen.setdefault(s, e))
        theta = learner.detached_params()
        learner.close()
        return curve, seen, theta, learner.policy

    def phi_2(seen, theta, policy, scale):
        phi_1, _ = adapt(theta, policy_gradient_loss(policy, seen[0]), 0.3, num_tasks=5)
        phi_2, _ = adapt(phi_1, policy_gradient_loss(policy, seen[1]), 0.3 * scale)
        return phi_2

    def implied_noise(policy, phi, episodes):
        mean, log_std = policy.distribution(phi, episodes.task_major("observations"))
        taken = episodes.task_major("masks").unsqueeze(-1)
        return (episodes.task_major("actions") - mean) * torch.exp(-log_std) * taken

    half, seen_half, theta, policy = evaluate(0.5)
    full, seen_full, theta_full, _ = evaluate(1.0)
    for k in theta:
        assert torch.equal(theta[k], theta_full[k]), k
    assert half[half["step"] < 2].equals(full[full["step"] < 2])
    assert not half[half["step"] == 2]["return"].equals(full[full["step"] == 2]["return"])
    noise_half = implied_noise(policy, phi_2(seen_half, theta, policy, 0.5), seen_half[2])
    noise_full = implied_noise(policy, phi_2(seen_full, theta, policy, 1.0), seen_full[2])
    torch.testing.assert_close(noise_half, noise_full, rtol=1e-4, atol=1e-4)
    wrong = implied_noise(policy, phi_2(seen_full, theta, policy, 0.5), seen_full[2])
    assert (wrong - noise_full).abs().max() > 1e-2
