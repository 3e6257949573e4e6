"""Configuration: the shipped configs load, bad ones are rejected with a message naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from maml_core.config import ConfigError, build_config, load_config, read_yaml

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_configs_load(path):
    # Loading builds the task family with the config's options, so an option a family does not
    # accept fails here, not an hour into a run.
    cfg = load_config(path)
    assert path.stem == cfg.task.family or path.stem.startswith(cfg.task.family + "-")
    assert cfg.family().name == cfg.task.family


def test_values_and_overrides():
    cfg = load_config(CONFIGS / "navigation2d.yaml",
                      ["inner.step_size=0.05", "policy.hidden_sizes=[8, 8]",
                       "meta_optimizer.name=adam", "task.options.goal_tolerance=0.02",
                       "inner.first_order=true"])
    assert cfg.inner.step_size == 0.05 and cfg.policy.hidden_sizes == [8, 8]
    assert cfg.meta_optimizer.name == "adam" and cfg.inner.first_order is True
    assert cfg.family().goal_tolerance == 0.02
    assert cfg.meta_batch_size == 20 and cfg.inner.num_steps == 1  # from the file
    base = read_yaml(CONFIGS / "navigation2d.yaml")
    build_config(base, ["seed=3"])
    assert base["seed"] == 0  # the input mapping is not modified


BAD = [
    ({"iteratons": 10}, [], r"iteratons: unknown key"),
    ({"inner": {"stepsize": 0.1}}, [], r"inner\.stepsize: unknown key"),
    ({"evaluation": {"num_task": 3}}, [], r"evaluation\.num_task: unknown key"),
    ({}, ["inner.step_size=-0.1"], r"inner\.step_size: .*greater than 0"),
    ({"inner": {"step_size": 0}}, [], r"inner\.step_size: .*greater than 0"),
    ({"task": {"family": "navigation3d"}}, [], r"task\.family: .*unknown task family "
                                                r"'navigation3d'"),
    ({"iterations": "many"}, [], r"iterations: .*valid integer"),
    ({"policy": {"hidden_sizes": 64}}, [], r"policy\.hidden_sizes: .*valid list"),
    ({"policy": {"activation": "sigmoid"}}, [], r"policy\.activation"),
    ({"meta_optimizer": {"name": "rmsprop"}}, [], r"meta_optimizer\.name"),
    ({"gamma": 1.5}, [], r"gamma: .*less than or equal to 1"),
    ({"task": {"family": "sinusoid"}}, [], r"meta_optimizer\.name: trpo needs a policy"),
    ({"task": {"family": "sinusoid"}, "meta_optimizer": {"name": "adam"}},
     ["task.options.amp_low=5", "task.options.amp_high=1"], r"task\.options: .*amp_low"),
    ({"task": {"family": "navigation2d", "options": {"low": 1.0, "high": 0.0}}}, [],
     r"task\.options: navigation2d needs low < high"),
    ({}, ["task.options.max_action=-0.1"], r"task\.options: .*max_action > 0"),
    ({"task": {"family": "sinusoid"}, "meta_optimizer": {"name": "adam"}},
     ["inner.num_steps=2", "inner.fresh_episodes=true"],
     r"inner\.fresh_episodes: supervised families adapt on their support set"),
    ({"task": {"family": "sinusoid"}, "meta_optimizer": {"name": "adam"}},
     ["inner.episodes_per_task=20"],
     r"inner\.episodes_per_task: supervised families .*k_shot sets its size"),
    ({}, ["inner.episodes_per_task=0"], r"inner\.episodes_per_task: .*greater than or equal"),
    ({}, ["evaluation.later_step_scale=0"], r"evaluation\.later_step_scale: .*greater than 0"),
    ({}, ["inner.fresh_episodes=true", "inner.every_step_objective=true"],
     r"inner\.every_step_objective .*inner\.num_steps > 1"),
    ({}, ["inner.num_steps=2", "inner.every_step_objective=true"],
     r"inner\.every_step_objective .*set inner\.fresh_episodes: true and inner\.num_steps > 1"),
    ({}, ["inner.step_size_lr=0.001"],
     r"inner\.step_size_lr .*set inner\.learn_step_size: true and meta_optimizer\.name: trpo"),
    ({"meta_optimizer": {"name": "adam"}},
     ["inner.learn_step_size=true", "inner.step_size_lr=0.001"],
     r"inner\.step_size_lr updates learned step sizes apart from TRPO"),
    ({}, ["inner.learn_step_size=true", "inner.step_size_lr=0"],
     r"inner\.step_size_lr: .*greater than 0"),
    ({}, ["inner.learn_step_size=true", "inner.step_size_min=0"],
     r"inner\.step_size_min floors .*set inner\.step_size_lr with it"),
    ({}, ["inner.learn_step_size=true", "inner.step_size_lr=0.001", "inner.step_size_min=5"],
     r"inner\.step_size_min \(5\.0\) is above inner\.step_size"),
    ({}, ["inner.step_size_per=layer"],
     r"inner\.step_size_per shapes learned step sizes: set inner\.learn_step_size: true"),
    ({}, ["inner.learn_step_size=true", "inner.step_size_per=neuron"],
     r"inner\.step_size_per: .*'weight' or 'layer'"),
    ({"task": {"family": "halfcheetah-dir"}}, ["task.options.frame_skip=0"],
     r"task\.options: frame_skip must be an integer >= 1"),
    ({"task": {"family": "halfcheetah-vel"}}, ["task.options.torso_com=yes please"],
     r"task\.options: torso_com must be True or False"),
    ({"task": {"family": "halfcheetah-vel"}}, ["task.options.reset_noise=mujoco"],
     r"task\.options: reset_noise must be one of \('v5', 'rllab'\)"),
    ({"task": {"family": "ant-dir"}}, ["task.options.rllab_model=rllab"],
     r"task\.options: rllab_model must be True or False"),
    ({"task": {"family": "ant-vel"}}, ["task.options.com_velocity=1"],
     r"task\.options: com_velocity must be True or False"),
]


@pytest.mark.parametrize("data,overrides,message", BAD)
def test_bad_configurations_name_the_key(data, overrides, message):
    with pytest.raises(ConfigError, match=message):
        build_config(data, overrides)


def test_unknown_family_option_is_a_config_error():
    with pytest.raises(ConfigError, match=r"task\.options.*bogus"):
        build_config({"task": {"family": "navigation2d", "options": {"bogus": 1}}})


@pytest.mark.parametrize("override,message", [
    ("inner.step_size", r"override 'inner\.step_size' must look like key=value"),
    ("inner.step_size=[0.1", r"override 'inner\.step_size=\[0\.1': value is not valid YAML"),
    ("seed.deeper=1", r"override seed\.deeper: 'seed' is not a section"),
])
def test_bad_override_syntax(override, message):
    with pytest.raises(ConfigError, match=message):
        build_config({"seed": 0}, [override])


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(path)
    path.write_text("seed: [1\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)
    path.write_text("seed: 1\ninner:\n  num_step: 2\n")
    with pytest.raises(ConfigError, match=r"inner\.num_step: unknown key"):
        load_config(path)
    # YAML is read safely: a Python object tag is refused, not constructed.
    path.write_text("seed: !!python/object/apply:os.getcwd []\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)
