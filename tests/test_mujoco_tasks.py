"""MuJoCo locomotion families: rewards recomputed by hand, task plumbing, freezing, registry."""

from __future__ import annotations

import gymnasium
import mujoco
import numpy as np
import pandas as pd
import pytest
import torch

from maml_core.tasks import get_task_family
from maml_core.tasks.mujoco import AntTaskEnv, GymTaskVectorEnv, HalfCheetahTaskEnv

FAMILIES = ["halfcheetah-vel", "halfcheetah-dir", "ant-vel", "ant-dir"]


def _make(name: str, params: list[float], episodes: int = 1, **kwargs):
    family = get_task_family(name)
    column = family.task_params[0]
    tasks = pd.DataFrame({"task_id": np.arange(len(params)), column: params})
    return family, family.make_env(tasks, episodes, **kwargs)


def _torso_x(env) -> float:
    inner = env.unwrapped
    if isinstance(inner, AntTaskEnv):
        return float(inner.data.body(1).xpos[0])
    return float(inner.data.qpos[0])


def _expected_reward(name: str, target: float, v: float, applied: np.ndarray,
                     inner) -> float:
    forward = -abs(v - target) if name.endswith("-vel") else target * v
    if name.startswith("halfcheetah"):
        return forward - 0.05 * float(np.sum(applied**2))
    if name == "ant-vel":
        forward += 1.0  # the paper code's "make it happy, not suicidal"
    ctrl = 0.5 * 1e-2 * float(np.sum(applied**2))
    contact = 0.5 * 1e-3 * float(np.sum(np.clip(inner.data.cfrc_ext, -1.0, 1.0) ** 2))
    return forward - ctrl - contact + 0.05


@pytest.mark.parametrize("name", FAMILIES)
def test_rewards_match_formulas(name):
    params = [0.7, 2.5] if name.endswith("-vel") else [1.0, -1.0]
    family, env = _make(name, params, episodes=2, dtype=torch.float64)
    assert env.horizon == 200
    obs, _ = env.reset(seed=3)
    assert obs.shape == (4, family.observation_dim)
    assert env.single_action_space.shape == (family.action_dim,)
    assert env.action_space.shape == (4, family.action_dim)
    rng = np.random.default_rng(0)
    saw_contact = False
    for _ in range(15):
        # Out-of-bounds actions: what is applied (and charged) is the clipped action.
        actions = rng.uniform(-1.6, 1.6, size=(4, family.action_dim))
        before = [_torso_x(e) for e in env.envs]
        obs, reward, terminated, truncated, _ = env.step(torch.from_numpy(actions))
        assert not truncated.any()
        for i, inner_env in enumerate(env.envs):
            inner = inner_env.unwrapped
            applied = np.clip(actions[i], -1.0, 1.0)
            np.testing.assert_allclose(inner.data.ctrl, applied)
            v = (_torso_x(inner_env) - before[i]) / inner.dt
            target = params[i // 2]
            expected = _expected_reward(name, target, v, applied, inner)
            assert reward[i].item() == pytest.approx(expected, rel=1e-9, abs=1e-9)
            saw_contact |= bool(np.any(inner.data.cfrc_ext != 0))
        if terminated.any():
            break
    if name.startswith("ant"):
        assert saw_contact  # the contact term was really exercised


@pytest.mark.parametrize("name", FAMILIES)
def test_sampling_ranges_and_determinism(name):
    family = get_task_family(name)
    tasks = family.sample_tasks(2000, np.random.default_rng(5))
    assert list(tasks.columns) == ["task_id", *family.task_params]
    assert tasks["task_id"].tolist() == list(range(2000))
    values = tasks[family.task_params[0]].to_numpy()
    assert values.dtype == np.float64
    if name.endswith("-dir"):
        assert set(values.tolist()) == {-1.0, 1.0}
        assert abs(np.mean(values == 1.0) - 0.5) < 0.05
    else:
        high = 2.0 if name.startswith("halfcheetah") else 3.0
        assert values.min() >= 0.0 and values.max() <= high
        assert values.min() < 0.05 * high and values.max() > 0.95 * high
    again = family.sample_tasks(2000, np.random.default_rng(5))
    pd.testing.assert_frame_equal(tasks, again)
    other = family.sample_tasks(2000, np.random.default_rng(6))
    assert not tasks.equals(other)


def test_velocity_range_options():
    family = get_task_family("ant-vel", low=1.0, high=1.5)
    values = family.sample_tasks(500, np.random.default_rng(0))["velocity"]
    assert values.between(1.0, 1.5).all()
    with pytest.raises(ValueError, match="low < high"):
        get_task_family("halfcheetah-vel", low=2.0, high=1.0)
    with pytest.raises(TypeError, match="'low'"):  # halfcheetah-dir: no velocity range
        get_task_family("halfcheetah-dir", low=0.0)
    with pytest.raises(TypeError):
        get_task_family("halfcheetah-vel", speed=1.0)


def test_each_sub_env_has_its_own_task():
    _, env = _make("halfcheetah-vel", [0.0, 2.0], dtype=torch.float64)
    obs, _ = env.reset(seed=[11, 11])  # one seed per task: both sub-envs start identically
    torch.testing.assert_close(obs[0], obs[1], rtol=0, atol=0)
    before = _torso_x(env.envs[0])
    obs, reward, *_ = env.step(torch.full((2, 6), 0.3, dtype=torch.float64))
    torch.testing.assert_close(obs[0], obs[1], rtol=0, atol=0)  # same physics ...
    v = (_torso_x(env.envs[0]) - before) / env.envs[0].unwrapped.dt
    ctrl = 0.05 * 6 * 0.3**2
    assert reward[0].item() == pytest.approx(-abs(v - 0.0) - ctrl)  # ... different tasks
    assert reward[1].item() == pytest.approx(-abs(v - 2.0) - ctrl)
    assert reward[0] != reward[1]


def test_sub_envs_share_one_compiled_model_and_step_as_with_their_own():
    """Every sub-env of every pool shares one ``MjModel`` per model, each with its own
    ``MjData``; stepped with different actions, each follows, bit for bit, gymnasium's
    HalfCheetah-v5 with a model compiled for itself."""
    from gymnasium.envs.mujoco.half_cheetah_v5 import HalfCheetahEnv

    family = get_task_family("halfcheetah-dir")
    tasks = family.sample_tasks(2, np.random.default_rng(0))
    env = family.make_env(tasks, 3, 30, dtype=torch.float64)
    other = family.make_env(tasks, 1, 30)
    inner = [e.unwrapped for e in env.envs + other.envs]
    assert len({id(e.model) for e in inner}) == 1
    assert len({id(e.data) for e in inner}) == len(inner)
    ant = get_task_family("ant-vel").make_env(tasks.rename(columns={"direction": "velocity"})
                                              .assign(velocity=1.0), 2, 10)
    assert ant.envs[0].unwrapped.model is ant.envs[1].unwrapped.model
    assert ant.envs[0].unwrapped.model is not inner[0].model

    previous = mujoco.get_mju_user_warning()  # v5's file: a deprecation line per compile
    mujoco.set_mju_user_warning(lambda message: None)
    try:
        own = [HalfCheetahEnv() for _ in range(env.num_envs)]
    finally:
        mujoco.set_mju_user_warning(previous)
    assert all(o.model is not inner[0].model for o in own)
    seeds = list(range(env.num_envs))
    obs, _ = env.reset(seed=seeds)
    expected = np.stack([o.reset(seed=s)[0] for o, s in zip(own, seeds, strict=True)])
    assert np.array_equal(obs.numpy(), expected)
    rng = np.random.default_rng(2)
    for _ in range(30):
        actions = rng.uniform(-1.0, 1.0, size=(env.num_envs, 6))
        obs, *_ = env.step(torch.from_numpy(actions))
        expected = np.stack([o.step(a)[0] for o, a in zip(own, actions, strict=True)])
        assert np.array_equal(obs.numpy(), expected)
    assert not np.array_equal(expected[0], expected[1])  # the sub-envs did move apart


def test_set_tasks_repoints_without_rebuilding():
    family, env = _make("ant-vel", [0.5, 1.0], episodes=2)
    envs = list(env.envs)
    models = [e.unwrapped.model for e in env.envs]
    new = family.sample_tasks(2, np.random.default_rng(9))
    env.set_tasks(new)
    assert all(a is b for a, b in zip(env.envs, envs, strict=True))
    assert all(e.unwrapped.model is m for e, m in zip(env.envs, models, strict=True))
    targets = [e.unwrapped.target for e in env.envs]
    assert targets == np.repeat(new["velocity"].to_numpy(), 2).tolist()
    torch.testing.assert_close(env.task_column("velocity"),
                               torch.tensor(targets, dtype=torch.float32))
    with pytest.raises(RuntimeError, match="reset"):
        env.step(torch.zeros(4, 8))
    env.reset(seed=0)
    env.step(torch.zeros(4, 8))
    with pytest.raises(ValueError, match="3 tasks"):
        env.set_tasks(family.sample_tasks(3, np.random.default_rng(0)))


def test_terminated_sub_env_freezes():
    _, env = _make("ant-dir", [1.0, -1.0])
    env.reset(seed=0)
    inner = env.envs[0].unwrapped
    qpos, qvel = inner.data.qpos.copy(), inner.data.qvel.copy()
    qpos[2] = 2.0  # torso far above healthy_z_range (0.2, 1.0)
    inner.set_state(qpos, qvel)
    actions = torch.zeros(2, 8)
    obs, reward, terminated, truncated, _ = env.step(actions)
    assert terminated.tolist() == [True, False]
    assert not truncated.any()
    assert reward[0] != 0  # the terminating step itself is paid
    time0, time1 = inner.data.time, env.envs[1].unwrapped.data.time
    for _ in range(3):
        obs2, reward2, terminated2, _, _ = env.step(torch.ones(2, 8))
        assert terminated2.tolist() == [True, False]
        assert reward2[0].item() == 0.0 and reward2[1].item() != 0.0
        torch.testing.assert_close(obs2[0], obs[0])
    assert inner.data.time == time0  # not stepped again
    assert env.envs[1].unwrapped.data.time > time1
    _, _ = env.reset(seed=0)
    _, _, terminated3, _, _ = env.step(actions)
    assert not terminated3.any()


def test_same_seeds_same_trajectories_across_instances():
    family = get_task_family("halfcheetah-dir")
    tasks = family.sample_tasks(3, np.random.default_rng(1))
    a = family.make_env(tasks, 2, horizon=20)
    b = family.make_env(tasks, 2, horizon=20)
    assert a.horizon == 20
    oa, _ = a.reset(seed=42)
    ob, _ = b.reset(seed=42)
    torch.testing.assert_close(oa, ob, rtol=0, atol=0)
    assert not torch.equal(oa[0], oa[1])  # different sub-envs get different seeds
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        act = torch.rand(6, 6, generator=gen) * 2 - 1
        ra, rb = a.step(act), b.step(act)
        for xa, xb in zip(ra[:4], rb[:4], strict=True):
            torch.testing.assert_close(xa, xb, rtol=0, atol=0)
    assert ra[0].dtype == torch.float32 and ra[1].dtype == torch.float32
    assert ra[2].dtype == torch.bool and ra[3].dtype == torch.bool


@pytest.mark.parametrize("name", ["halfcheetah-vel", "ant-dir"])
def test_threaded_stepping_equals_one_thread(name):
    """Sub-envs stepped on two threads (the default on a 2-core machine) give the same
    observations, rewards and terminations, bit for bit, as one thread."""
    family = get_task_family(name)
    tasks = family.sample_tasks(2, np.random.default_rng(3))
    results = {}
    for threads in (1, 2):
        env = GymTaskVectorEnv(tasks, 20, 40, family._env_fn(), threads=threads)
        assert env.threads == threads
        assert len({id(e.unwrapped.model) for e in env.envs}) == 1  # one model, many threads
        out = [env.reset(seed=7)[0]]
        gen = torch.Generator().manual_seed(0)
        for _ in range(40):
            act = torch.randn(env.num_envs, env.act_dim, generator=gen) * 2
            out.extend(env.step(act)[:3])
        results[threads] = out
    for a, b in zip(results[1], results[2], strict=True):
        assert torch.equal(a, b)
    if name == "ant-dir":  # the frozen-after-termination path is exercised too
        assert results[1][-1].any()


@pytest.mark.parametrize("name,options", [
    ("halfcheetah-vel", {"frame_skip": 1, "torso_com": True}),
    ("halfcheetah-vel", {"com_velocity": True, "reset_noise": "rllab"}),
    ("halfcheetah-dir", {"frame_skip": 1, "torso_com": True, "com_velocity": True}),
    ("halfcheetah-dir", {}),
    ("ant-vel", {}),
    ("ant-dir", {"include_contact_forces": True}),
    ("ant-vel", {"rllab_model": True, "com_velocity": True}),
    ("ant-dir", {"com_velocity": True}),
])
def test_batch_step_equals_gymnasium_step(name, options):
    """The vector env steps the MuJoCo task envs as a batch (``step_batch``); its observations,
    rewards and terminations equal, bit for bit, those of gymnasium's ``step`` on twin envs fed
    the same clipped actions, over 60 steps (contacts, the solver's warm start, falls) on two
    threads."""
    family = get_task_family(name, **options)
    tasks = family.sample_tasks(3, np.random.default_rng(5))
    env = family.make_env(tasks, 12, 60, dtype=torch.float64)
    assert env._step_batch is not None
    twins = [family._env_fn()() for _ in range(env.num_envs)]
    seeds = list(range(100, 100 + env.num_envs))
    column = family.task_params[0]
    for twin, value in zip(twins, np.repeat(tasks[column].to_numpy(), 12), strict=True):
        twin.set_task({column: value})
    obs, _ = env.reset(seed=seeds)
    expected = np.stack([twin.reset(seed=seed)[0] for twin, seed in zip(twins, seeds,
                                                                           strict=True)])
    assert np.array_equal(obs.numpy(), expected)
    rng = np.random.default_rng(1)
    done = np.zeros(env.num_envs, dtype=bool)
    for _ in range(60):
        actions = rng.normal(0.0, 1.0, size=(env.num_envs, family.action_dim))
        obs, reward, terminated, truncated, _ = env.step(torch.from_numpy(actions))
        for i in np.flatnonzero(~done):  # an ended episode is frozen: its twin stops too
            twin_obs, twin_reward, twin_terminated, *_ = twins[i].step(np.clip(actions[i],
                                                                               -1.0, 1.0))
            assert np.array_equal(obs[i].numpy(), twin_obs)
            assert reward[i].item() == twin_reward
            assert terminated[i].item() == twin_terminated
        assert (reward[torch.from_numpy(done)] == 0).all() and not truncated.any()
        done |= terminated.numpy()
    if name.startswith("ant"):
        assert done.any()  # the terminating path is exercised too
    else:
        assert not done.any()
    assert env.step_threads in (1, env.threads)  # the faster of the two, timed on the way


def test_threaded_rollouts_equal_and_restore_torch_threads():
    """``collect_episodes`` runs the policy on one torch thread while a MuJoCo env steps
    (``policy_threads``), gives the same episodes with one and two env threads, and restores
    torch's thread count afterwards."""
    from maml_core.policies import GaussianMLPPolicy
    from maml_core.rollouts import collect_episodes

    family = get_task_family("halfcheetah-dir")
    tasks = family.sample_tasks(2, np.random.default_rng(0))
    policy = GaussianMLPPolicy(17, 6, (32, 32))
    params = {k: v.detach() for k, v in policy.named_parameters()}
    seen: list[int] = []
    forward = policy.distribution

    def recording(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return forward(*args, **kwargs)

    policy.distribution = recording
    before = torch.get_num_threads()
    torch.set_num_threads(2)  # other test modules set 1 at import
    try:
        episodes = {}
        for threads in (1, 2):
            env = GymTaskVectorEnv(tasks, 20, 15, family._env_fn(), threads=threads)
            assert env.policy_threads() == 1
            seen.clear()
            episodes[threads] = collect_episodes(env, policy, params, [11, 12])
            assert seen == [1] * 15
            assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    for field in ("observations", "actions", "rewards", "masks"):
        assert torch.equal(getattr(episodes[1], field), getattr(episodes[2], field)), field


def test_thread_choice_times_neighbouring_pairs_after_a_warm_up_pair(monkeypatch):
    """One thread against all: steps by turns, 16 counted pairs after a first one, and the
    side faster on the median pair's ratio; a tie keeps one thread. A pair is two neighbouring
    steps: a step of too few sub-envs, or a reset, breaks the pair it falls in."""
    from maml_core.tasks import mujoco

    faster_threads = mujoco.faster_threads
    # Ratios 0.5, 0.75, 1.2, 1.2 (median 0.975): two threads; counting the first pair (which
    # starts the threads: ratio 10) would make it one.
    assert faster_threads([1.0, 2.0, 2.0, 5.0, 5.0], [10.0, 1.0, 1.5, 6.0, 6.0], 2) == 2
    # The load rises threefold during the trial and two threads are 1.25x slower on every pair.
    assert faster_threads([1.0, 1.0, 2.0, 3.0], [0.1, 1.25, 2.5, 3.75], 4) == 1
    assert faster_threads([1.0, 2.0, 3.0], [1.0, 2.0, 3.0], 2) == 1  # a tie: one thread

    calls, used = [], []

    def recording(one, many, threads):
        calls.append((list(one), list(many), threads))
        return faster_threads(one, many, threads)

    monkeypatch.setattr(mujoco, "faster_threads", recording)
    family = get_task_family("halfcheetah-vel")
    env = GymTaskVectorEnv(family.sample_tasks(4, np.random.default_rng(0)), 8, 50,
                           family._env_fn(), threads=2)  # 32 sub-envs: every step is timed
    choose = env._threads_for_step
    env._threads_for_step = lambda: used.append(choose()) or used[-1]
    env.reset(seed=0)
    zeros = torch.zeros(env.num_envs, 6)
    env.step(zeros)  # a one-thread step, then a reset: no pair
    env.reset(seed=0)
    env._terminated[:4] = True  # 28 active sub-envs: not timed, and no pair on either side
    env.step(zeros)
    env._terminated[:4] = False
    while env.step_threads is None:
        env.step(zeros)
    assert used == [1, 1] + [1, 2] * (mujoco._TRIAL_PAIRS + 1)
    assert len(calls) == 1
    one, many, threads = calls[0]
    assert threads == 2 and len(one) == len(many) == mujoco._TRIAL_PAIRS + 1
    assert env.step_threads == faster_threads(one, many, 2)


def test_threaded_step_error_waits_for_every_thread():
    """A sub-env that raises on one thread: ``step`` re-raises it only after the other thread
    has finished its sub-envs, so nothing steps the envs after ``step`` returns."""
    import time

    class OneByOne(HalfCheetahTaskEnv):  # stepped one env at a time, through ``step``
        step_batch = None

    family = get_task_family("halfcheetah-vel")
    tasks = family.sample_tasks(2, np.random.default_rng(0))
    env = GymTaskVectorEnv(tasks, 20, 10, lambda: OneByOne("velocity"), threads=2)
    env.step_threads = 2  # skip the timing of one thread against two
    env.reset(seed=0)
    finished = []
    first, last = env.envs[0], env.envs[-1]
    slow_step = last.step

    def broken(action):
        raise RuntimeError("sub-env 0 broke")

    def slow(action):
        time.sleep(0.3)
        out = slow_step(action)
        finished.append(True)
        return out

    first.step, last.step = broken, slow
    with pytest.raises(RuntimeError, match="sub-env 0 broke"):
        env.step(torch.zeros(env.num_envs, 6))
    assert finished == [True]  # the other thread was done before the error came out
    del first.step, last.step
    env.reset(seed=0)
    assert env.step(torch.zeros(env.num_envs, 6))[1].shape == (env.num_envs,)


def test_bad_env_threads_setting_is_a_config_error(monkeypatch):
    """MAML_ENV_THREADS is checked when a MuJoCo config is validated, before any work."""
    from maml_core.config import build_config

    data = {"task": {"family": "halfcheetah-vel"}}
    monkeypatch.setenv("MAML_ENV_THREADS", "two")
    with pytest.raises(Exception, match=r"MAML_ENV_THREADS must be a positive integer .*"
                                        r"got 'two'; unset it to use every CPU"):
        build_config(data)
    monkeypatch.setenv("MAML_ENV_THREADS", "3")
    build_config(data)  # a valid setting passes
    family = get_task_family("halfcheetah-vel")
    env = family.make_env(family.sample_tasks(1, np.random.default_rng(0)), 1, 5)
    assert env.threads == 3


def test_inner_envs_have_no_time_limit():
    _, env = _make("halfcheetah-vel", [1.0])
    assert type(env.envs[0]) is HalfCheetahTaskEnv


def test_ant_observation_option():
    family = get_task_family("ant-dir", include_contact_forces=True)
    assert family.observation_dim == 105
    env = family.make_env(family.sample_tasks(1, np.random.default_rng(0)), 1)
    obs, _ = env.reset(seed=0)
    assert obs.shape == (1, 105)
    assert get_task_family("ant-dir").observation_dim == 27
    with pytest.raises(ValueError, match="include_contact_forces"):
        get_task_family("ant-vel", include_contact_forces="yes")


def test_make_vec_registry_entry():
    env = gymnasium.make_vec("maml/HalfCheetahVel-v0", num_envs=4)
    assert isinstance(env, GymTaskVectorEnv) and env.num_envs == 4 and env.num_tasks == 4
    obs, _ = env.reset(seed=0)
    assert obs.shape == (4, 17)
    env.step(torch.zeros(4, 6))
    env.close()
    tasks = get_task_family("ant-dir").sample_tasks(2, np.random.default_rng(0))
    env = gymnasium.make_vec("maml/AntDir-v0", num_envs=4, tasks=tasks, horizon=10)
    assert env.num_tasks == 2 and env.episodes_per_task == 2 and env.horizon == 10


def test_task_tables_from_files(tmp_path):
    path = tmp_path / "tasks.csv"
    pd.DataFrame({"task_id": [3, 7], "direction": [1, -1]}).to_csv(path, index=False)
    family = get_task_family("halfcheetah-dir")
    env = family.make_env(pd.read_csv(path), 1)
    assert [e.unwrapped.target for e in env.envs] == [1.0, -1.0]
    assert all(isinstance(e.unwrapped.target, float) for e in env.envs)


def test_bad_inputs():
    family, env = _make("halfcheetah-vel", [1.0, 2.0])
    env.reset(seed=0)
    with pytest.raises(ValueError, match=r"shape \(2, 6\)"):
        env.step(torch.zeros(2, 5))
    with pytest.raises(ValueError, match=r"shape \(2, 6\)"):
        env.step(torch.zeros(6))
    with pytest.raises(ValueError, match="NaN"):
        env.step(torch.full((2, 6), float("nan")))
    with pytest.raises(ValueError, match="velocity"):
        family.make_env(pd.DataFrame({"task_id": [0], "speed": [1.0]}), 1)
    with pytest.raises(ValueError, match="direction must be"):
        get_task_family("ant-dir").validate_tasks(
            pd.DataFrame({"task_id": [0, 1], "direction": [1.0, 0.5]}))
    with pytest.raises(ValueError, match="episodes_per_task"):
        family.make_env(family.sample_tasks(1, np.random.default_rng(0)), 0)


def test_ant_steps_like_the_papers_ant_and_a_random_ant_stays_up():
    """0.02 s per action (rllab's ant), not v5's 0.05 s: with v5's step a random policy makes
    the ant hop over the 1.0 height limit early (43 actions on average for these seeds); here
    it stays up longer (123)."""
    family, env = _make("ant-dir", [1.0] * 8)
    assert all(e.unwrapped.dt == pytest.approx(0.02) for e in env.envs)
    env.reset(seed=0)
    rng = np.random.default_rng(0)
    alive = np.ones(8, dtype=bool)
    lengths = np.zeros(8)
    for _ in range(200):
        _, _, terminated, _, _ = env.step(torch.from_numpy(
            rng.normal(size=(8, family.action_dim))).float())
        lengths += alive
        alive &= ~terminated.numpy()
    assert lengths.mean() > 90, lengths


@pytest.mark.parametrize("name", ["halfcheetah-vel", "halfcheetah-dir"])
def test_half_cheetah_takes_the_papers_step_as_an_option(name):
    """Default v5's 0.05 s per action; ``frame_skip: 1`` gives the rllab cheetah's 0.01 s, and
    the same constant action then moves the cheetah through a fifth of the simulated time."""
    column = get_task_family(name).task_params[0]
    tasks = pd.DataFrame({"task_id": [0], column: [1.0]})
    moved = {}
    for skip in (5, 1):
        family = get_task_family(name, frame_skip=skip)
        env = family.make_env(tasks, 1, dtype=torch.float64)
        assert env.envs[0].unwrapped.dt == pytest.approx(0.01 * skip)
        env.reset(seed=0)
        assert env.envs[0].unwrapped.data.time == 0.0
        for _ in range(10):
            env.step(torch.full((1, 6), 0.5, dtype=torch.float64))
        moved[skip] = env.envs[0].unwrapped.data.time
        env.close()
    assert moved[5] == pytest.approx(0.5) and moved[1] == pytest.approx(0.1)
    with pytest.raises(ValueError, match="frame_skip must be an integer >= 1"):
        get_task_family(name, frame_skip=0)


@pytest.mark.parametrize("name", ["halfcheetah-vel", "halfcheetah-dir"])
def test_half_cheetah_observes_its_centre_of_mass_as_an_option(name):
    """``torso_com: true`` appends the paper's rllab ``get_body_com("torso")``: the centre of
    mass of the torso's subtree (the whole cheetah) in the state each step ended in, recomputed
    here from the bodies' masses and positions; the first 17 entries stay v5's observation."""
    import mujoco

    column = get_task_family(name).task_params[0]
    tasks = pd.DataFrame({"task_id": [0], column: [1.0]})
    plain, with_com = (get_task_family(name, frame_skip=1, torso_com=flag)
                       for flag in (False, True))
    assert (plain.observation_dim, with_com.observation_dim) == (17, 20)
    assert with_com.dynamics() == {"frame_skip": 1, "torso_com": True, "com_velocity": False,
                                   "reset_noise": "v5"}
    envs = [family.make_env(tasks, 1, dtype=torch.float64) for family in (plain, with_com)]
    assert envs[1].single_observation_space.shape == (20,)
    observations = [env.reset(seed=3)[0] for env in envs]
    cheetah = envs[1].envs[0].unwrapped
    for _ in range(30):
        fresh = mujoco.MjData(cheetah.model)  # positions of the current state, from scratch
        fresh.qpos[:] = cheetah.data.qpos
        mujoco.mj_kinematics(cheetah.model, fresh)
        mass = cheetah.model.body_mass[1:]
        com = (mass[:, None] * fresh.xipos[1:]).sum(axis=0) / mass.sum()
        torch.testing.assert_close(observations[1][0, -3:], torch.as_tensor(com))
        torch.testing.assert_close(observations[1][:, :17], observations[0])
        action = torch.full((1, 6), 0.7, dtype=torch.float64)
        observations = [env.step(action)[0] for env in envs]
    assert observations[1][0, -3] > 0.05  # the x of the centre of mass grows as it runs
    for env in envs:
        env.close()
    with pytest.raises(ValueError, match="torso_com must be True or False"):
        get_task_family(name, torso_com="yes")


def _centre_of_mass_x_velocity(robot) -> float:
    """The robot's linear momentum over its mass, body by body (each body's velocity at its
    own centre of mass), from a fresh ``MjData`` in the robot's current state."""
    fresh = mujoco.MjData(robot.model)
    fresh.qpos[:], fresh.qvel[:] = robot.data.qpos, robot.data.qvel
    mujoco.mj_forward(robot.model, fresh)
    momentum, velocity = np.zeros(3), np.zeros(6)
    for body in range(1, robot.model.nbody):
        mujoco.mj_objectVelocity(robot.model, fresh, mujoco.mjtObj.mjOBJ_BODY, body, velocity, 0)
        momentum += robot.model.body_mass[body] * velocity[3:]
    return momentum[0] / robot.model.body_mass[1:].sum()


@pytest.mark.parametrize("name", ["halfcheetah-vel", "halfcheetah-dir"])
def test_half_cheetah_rewards_its_centre_of_mass_velocity_as_an_option(name):
    """``com_velocity: true`` pays for the velocity the paper's rllab reward read
    (``get_body_comvel("torso")``): the cheetah's linear momentum over its mass, in the state
    the step ended in. Recomputed here body by body from a fresh ``MjData``, as rllab did."""

    column = get_task_family(name).task_params[0]
    target = 1.0 if name.endswith("vel") else -1.0
    tasks = pd.DataFrame({"task_id": [0], column: [target]})
    plain, by_com = (get_task_family(name, frame_skip=1, com_velocity=flag)
                     for flag in (False, True))
    assert by_com.dynamics() == {"frame_skip": 1, "torso_com": False, "com_velocity": True,
                                 "reset_noise": "v5"}
    assert by_com.observation_dim == 17
    envs = [family.make_env(tasks, 1, dtype=torch.float64) for family in (plain, by_com)]
    for env in envs:
        env.reset(seed=5)
    cheetah = envs[1].envs[0].unwrapped
    gaps = []
    for t in range(40):
        action = torch.full((1, 6), 0.9 if t % 10 < 5 else -0.9, dtype=torch.float64)
        (_, reward_torso, *_), (_, reward_com, *_) = (env.step(action) for env in envs)
        v = _centre_of_mass_x_velocity(cheetah)
        forward = -abs(v - target) if name.endswith("vel") else target * v
        expected = forward - 0.05 * float((action ** 2).sum())
        assert float(reward_com[0]) == pytest.approx(expected, abs=1e-9)
        gaps.append(abs(float(reward_com[0] - reward_torso[0])))
    assert max(gaps) > 0.05  # the torso's velocity is another measure: the option matters
    for env in envs:
        env.close()
    with pytest.raises(ValueError, match="com_velocity must be True or False"):
        get_task_family(name, com_velocity=1)


@pytest.mark.parametrize("name", ["halfcheetah-vel", "halfcheetah-dir"])
def test_half_cheetah_starts_as_rllab_did_as_an_option(name):
    """``reset_noise: rllab`` starts each episode at the model's pose plus 0.01 N(0, 1) on the
    positions and 0.1 N(0, 1) on the velocities, drawn (positions first) from the generator
    that ``reset(seed=...)`` seeds, as recomputed here; the default keeps v5's start, whose
    position noise is U(-0.1, 0.1). Seeded resets repeat, and the option reaches the env
    through the family, its observation and its dynamics."""
    from gymnasium.utils import seeding

    column = get_task_family(name).task_params[0]
    tasks = pd.DataFrame({"task_id": [0, 1], column: [1.0, 1.0]})
    rllab, v5 = (get_task_family(name, frame_skip=1, torso_com=True, reset_noise=noise)
                 for noise in ("rllab", "v5"))
    assert rllab.dynamics()["reset_noise"] == "rllab"
    assert v5.dynamics()["reset_noise"] == "v5"
    seeds = [11, 12]
    starts = {}
    for family in (rllab, v5):
        env = family.make_env(tasks, 1, dtype=torch.float64)
        obs, _ = env.reset(seed=seeds)
        again, _ = env.reset(seed=seeds)
        assert torch.equal(obs, again)
        cheetah = env.envs[1].unwrapped
        starts[family.reset_noise] = (obs, cheetah.data.qpos.copy(), cheetah.data.qvel.copy(),
                                      cheetah.init_qpos.copy(), cheetah.init_qvel.copy())
        env.close()
    obs, qpos, qvel, init_qpos, init_qvel = starts["rllab"]
    rng, _ = seeding.np_random(seeds[1])
    expected_qpos = init_qpos + 0.01 * rng.standard_normal(len(init_qpos))
    expected_qvel = init_qvel + 0.1 * rng.standard_normal(len(init_qvel))
    np.testing.assert_array_equal(qpos, expected_qpos)
    np.testing.assert_array_equal(qvel, expected_qvel)
    np.testing.assert_array_equal(obs[1, :8].numpy(), expected_qpos[1:])  # x is not observed
    assert obs.shape == (2, 20)
    _, qpos_v5, qvel_v5, *_ = starts["v5"]
    rng, _ = seeding.np_random(seeds[1])
    np.testing.assert_array_equal(qpos_v5, init_qpos + rng.uniform(-0.1, 0.1, len(init_qpos)))
    np.testing.assert_array_equal(qvel_v5, init_qvel + 0.1 * rng.standard_normal(len(qvel_v5)))
    with pytest.raises(ValueError, match=r"reset_noise must be one of \('v5', 'rllab'\)"):
        get_task_family(name, reset_noise="gaussian")
    with pytest.raises(ValueError, match="reset_noise must be one of"):
        HalfCheetahTaskEnv(reset_noise="none")
    with pytest.raises(ValueError, match="drop reset_noise_scale"):
        HalfCheetahTaskEnv(reset_noise="rllab", reset_noise_scale=0.1)


def test_ant_takes_the_papers_rllab_model_as_an_option():
    """``rllab_model: true`` compiles v5's ant as rllab's file had it -- one RK4 step of 0.02 s
    per action and ``solimp .8 .8 .01`` on every geom, the floor's too -- beside v5's own
    model in the same process, and starts from the file's ``init_qpos`` (ankles bent inside
    their joint ranges, torso at 0.55) plus 0.01 N(0, 1) and 0.1 N(0, 1) from the seeded
    generator, where v5 starts from straight ankles outside those ranges."""
    from gymnasium.utils import seeding

    tasks = pd.DataFrame({"task_id": [0], "direction": [1.0]})
    rllab, v5 = (get_task_family("ant-dir", rllab_model=flag) for flag in (True, False))
    assert rllab.dynamics() == {"rllab_model": True, "com_velocity": False}
    assert v5.dynamics() == {"rllab_model": False, "com_velocity": False}
    envs = [family.make_env(tasks, 2, 50, dtype=torch.float64) for family in (rllab, v5)]
    (ant, twin), (plain, _) = ([e.unwrapped for e in env.envs] for env in envs)
    assert ant.model is twin.model and ant.model is not plain.model
    assert (ant.model.opt.timestep, ant.frame_skip, ant.dt) == (0.02, 1, pytest.approx(0.02))
    assert (plain.model.opt.timestep, plain.frame_skip) == (0.01, 2)
    assert ant.model.opt.integrator == plain.model.opt.integrator == mujoco.mjtIntegrator.mjINT_RK4
    assert ant.model.ngeom == plain.model.ngeom == 14
    np.testing.assert_array_equal(ant.model.geom_solimp,
                                  np.tile([0.8, 0.8, 0.01, 0.5, 2.0], (14, 1)))
    np.testing.assert_array_equal(plain.model.geom_solimp,
                                  np.tile([0.9, 0.95, 0.001, 0.5, 2.0], (14, 1)))
    for name in ("body_mass", "jnt_range", "actuator_gear", "geom_friction", "geom_size"):
        np.testing.assert_array_equal(getattr(ant.model, name), getattr(plain.model, name))

    seeds = [4, 5]
    obs, _ = envs[0].reset(seed=seeds)
    rng, _ = seeding.np_random(seeds[1])
    start = np.array([0, 0, 0.55, 1, 0, 0, 0, 0, 1, 0, -1, 0, -1, 0, 1], dtype=float)
    expected_qpos = start + 0.01 * rng.standard_normal(15)
    expected_qvel = 0.1 * rng.standard_normal(14)
    np.testing.assert_array_equal(twin.data.qpos, expected_qpos)
    np.testing.assert_array_equal(twin.data.qvel, expected_qvel)
    np.testing.assert_array_equal(obs[1].numpy(), np.concatenate((expected_qpos[2:],
                                                                  expected_qvel)))
    ankles = [ant.model.joint(f"ankle_{k}").id for k in range(1, 5)]
    angle = ant.init_qpos[ant.model.jnt_qposadr[ankles]]
    low, high = ant.model.jnt_range[ankles].T  # radians once compiled
    assert ((low < angle) & (angle < high)).all()
    assert not ((low < 0) & (0 < high)).any()  # v5's straight ankles start outside the range
    np.testing.assert_array_equal(plain.init_qpos[7:], 0.0)
    for env in envs:
        env.close()
    with pytest.raises(ValueError, match="rllab_model must be True or False"):
        get_task_family("ant-vel", rllab_model="yes")
    with pytest.raises(ValueError, match=r"own 0\.02 s per action \(frame_skip 1\); got "
                                         r"frame_skip=2"):
        AntTaskEnv(rllab_model=True, frame_skip=2)
    with pytest.raises(ValueError, match="drop reset_noise_scale"):
        AntTaskEnv(rllab_model=True, reset_noise_scale=0.1)


@pytest.mark.parametrize("options", [{}, {"rllab_model": True}])
def test_ant_rewards_its_centre_of_mass_velocity_as_an_option(options):
    """``com_velocity: true`` pays the ant for the x velocity of its centre of mass (rllab's
    ``get_body_comvel("torso")``), recomputed here body by body from a fresh ``MjData``, with
    the rest of the reward by hand (control, clipped contact forces, survive bonus); the
    option changes the reward only: the states stay those of the torso-paid twin."""
    tasks = pd.DataFrame({"task_id": [0], "direction": [-1.0]})
    plain, by_com = (get_task_family("ant-dir", com_velocity=flag, **options)
                     for flag in (False, True))
    envs = [family.make_env(tasks, 1, dtype=torch.float64) for family in (plain, by_com)]
    for env in envs:
        env.reset(seed=9)
    ant = envs[1].envs[0].unwrapped
    rng = np.random.default_rng(4)
    gaps = []
    for _ in range(40):
        action = torch.from_numpy(rng.uniform(-1.0, 1.0, size=(1, 8)))
        (obs_plain, reward_torso, *_), (obs, reward, *_) = (env.step(action) for env in envs)
        assert torch.equal(obs, obs_plain)
        v = _centre_of_mass_x_velocity(ant)
        contact = np.square(np.clip(ant.data.cfrc_ext, -1.0, 1.0)).sum()
        expected = -v - 0.5e-2 * float((action ** 2).sum()) - 0.5e-3 * contact + 0.05
        assert float(reward[0]) == pytest.approx(expected, abs=1e-9)
        gaps.append(abs(float(reward[0] - reward_torso[0])))
    assert max(gaps) > 0.05  # the torso's velocity is another measure: the option matters
    for env in envs:
        env.close()
    with pytest.raises(ValueError, match="com_velocity must be True or False"):
        get_task_family("ant-dir", com_velocity=0)


@pytest.mark.parametrize("name", ["halfcheetah-dir", "ant-dir"])
def test_balanced_direction_sampling(name):
    """``balanced``: each sampled set holds each direction equally (odd counts: one more of a
    random one), shuffled and reproducible; without it, independent draws as before."""
    balanced = get_task_family(name, balanced=True)
    for n in (1, 2, 7, 20, 40):
        for seed in range(5):
            directions = balanced.sample_tasks(n, np.random.default_rng(seed))["direction"]
            forward = int((directions == 1.0).sum())
            assert abs(forward - (n - forward)) == n % 2
            assert set(directions) <= {-1.0, 1.0}
    twenty = [balanced.sample_tasks(20, np.random.default_rng(s))["direction"].tolist()
              for s in range(3)]
    assert twenty[0] == balanced.sample_tasks(20, np.random.default_rng(0))["direction"].tolist()
    assert len({tuple(t) for t in twenty}) == 3 and sorted(twenty[0]) != twenty[0]
    plain = get_task_family(name).sample_tasks(20, np.random.default_rng(3))["direction"]
    assert plain.tolist() == np.random.default_rng(3).choice([-1.0, 1.0], size=20).tolist()
    with pytest.raises(ValueError, match="balanced must be True or False"):
        get_task_family(name, balanced="yes")
