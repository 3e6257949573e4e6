"""Determinism and checkpoints: same seed, same bits; save/restore/resume equals an
uninterrupted run; corrupt, foreign and pickle checkpoints are refused."""

from __future__ import annotations

import json
import pickle

import pytest
import torch

from maml_core.checkpoint import CheckpointError, load_checkpoint
from maml_core.config import build_config
from maml_core.trainer import MetaLearner

torch.set_num_threads(1)

N, K = 4, 2  # train to N, checkpoint at K


def _config(family="navigation2d", optimizer="trpo", hidden=(16,), **extra):
    data = {"seed": 7, "meta_batch_size": 4, "episodes_per_task": 4,
            "task": {"family": family}, "policy": {"hidden_sizes": list(hidden)},
            "meta_optimizer": {"name": optimizer, "lr": 0.01}, **extra}
    if family == "navigation2d":
        data["task"]["horizon"] = 20
    return build_config(data)


def _params(learner):
    return {k: v.detach().clone() for k, v in learner.meta_params.items()}


def _assert_identical(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


CASES = [("navigation2d", "trpo", {}), ("navigation2d", "adam", {}),
         ("navigation2d", "adam", {"inner": {"learn_step_size": True}}),
         ("navigation2d", "trpo", {"inner": {"learn_step_size": True, "step_size_per": "layer",
                                             "step_size_lr": 0.01}}),
         ("sinusoid", "adam", {})]


@pytest.mark.parametrize("family,optimizer,extra", CASES)
def test_same_seed_same_bits_and_resume_equals_uninterrupted(tmp_path, family, optimizer,
                                                             extra):
    cfg = _config(family, optimizer, **extra)
    first = MetaLearner(cfg)
    first.train(N)
    second = MetaLearner(cfg)
    second.train(N)
    _assert_identical(_params(first), _params(second))
    initial = _params(MetaLearner(cfg))
    assert any(not torch.equal(initial[k], v) for k, v in _params(first).items())

    interrupted = MetaLearner(cfg)
    interrupted.train(K)
    path = interrupted.save(tmp_path / "ckpt")
    assert path.name == f"iter-{K:06d}.json"
    interrupted.train(N)  # saving does not disturb the run
    _assert_identical(_params(interrupted), _params(first))

    resumed = MetaLearner(cfg)
    manifest = resumed.restore(tmp_path / "ckpt")  # the directory: its latest checkpoint
    assert resumed.iteration == K and manifest["iteration"] == K
    resumed.train(N)
    assert resumed.iteration == N
    _assert_identical(_params(resumed), _params(first))

    if optimizer == "adam":  # the Adam moments matter: parameters alone do not resume exactly
        _, params, optim = load_checkpoint(path)
        assert optim  # the moments and step counts were saved
        only_params = MetaLearner(cfg)
        only_params.load_params(params, "test")
        only_params.iteration = K
        only_params.train(N)
        assert any(not torch.equal(v, _params(first)[k])
                   for k, v in _params(only_params).items())
    for lrn in (first, second, interrupted, resumed):
        lrn.close()


@pytest.fixture
def saved(tmp_path):
    learner = MetaLearner(_config(optimizer="adam"))
    learner.train(1)
    return learner.save(tmp_path / "ckpt"), _params(learner)


def test_checkpoint_round_trip(saved):
    path, params = saved
    manifest, loaded, _ = load_checkpoint(path)
    _assert_identical(loaded, params)
    assert manifest["iteration"] == 1 and manifest["config"]["seed"] == 7


@pytest.mark.parametrize("where", [0.5, 0.99, 20])
def test_corrupted_tensor_file_is_refused(saved, where):
    path, _ = saved
    tensors = path.with_suffix(".safetensors")
    data = bytearray(tensors.read_bytes())
    i = int(len(data) * where) if where < 1 else where  # data area, end, header
    data[i] ^= 0x01
    tensors.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="corrupt"):
        MetaLearner(_config(optimizer="adam")).restore(path)


def test_truncated_manifest_and_missing_checkpoint_are_refused(saved, tmp_path):
    path, _ = saved
    manifest = json.loads(path.read_text())
    for key in ("tensors", "sha256", "iteration"):
        broken = tmp_path / f"no-{key}.json"
        broken.write_text(json.dumps({k: v for k, v in manifest.items() if k != key}))
        with pytest.raises(CheckpointError, match=f"lacks valid.*{key}"):
            load_checkpoint(broken)
    path.write_text(path.read_text()[:40])
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nothing-here.json")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        load_checkpoint(tmp_path / "empty")
    # A tensor file without its manifest (an interrupted save) is not a checkpoint.
    (tmp_path / "empty" / "iter-000003.safetensors").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        load_checkpoint(tmp_path / "empty")


def test_checkpoint_of_another_architecture_is_refused(saved):
    path, _ = saved
    other = MetaLearner(_config(optimizer="adam", hidden=(8,)))
    with pytest.raises(CheckpointError, match=r"saved for policy .*16.* but the config builds"):
        other.restore(path)
    _, params, _ = load_checkpoint(path)
    with pytest.raises(CheckpointError, match=r"layers\.0\.weight.*another architecture"):
        other.load_params(params, "test")
    meta_sgd = MetaLearner(_config(optimizer="adam", inner={"learn_step_size": True}))
    with pytest.raises(CheckpointError, match=r"missing \['step_size\."):
        meta_sgd.restore(path)


def test_checkpoint_of_another_environment_version_is_refused(saved, tmp_path):
    """A checkpoint records its family's ``env_version``; one made before versions existed
    counts as version 1. Resuming on a changed environment (the ant families are version 2)
    is refused, the same version resumes."""
    path, _ = saved
    manifest = json.loads(path.read_text())
    assert manifest["env_version"] == 1  # navigation2d
    del manifest["env_version"]  # as written before versions were recorded
    path.write_text(json.dumps(manifest))
    MetaLearner(_config(optimizer="adam")).restore(path)

    config = build_config({"seed": 7, "task": {"family": "ant-dir"},
                           "policy": {"hidden_sizes": [4]}, "meta_optimizer": {"name": "adam"}})
    ant = MetaLearner(config)
    ant_path = ant.save(tmp_path / "ant")
    assert json.loads(ant_path.read_text())["env_version"] == 2
    MetaLearner(config).restore(ant_path)
    old = json.loads(ant_path.read_text())
    del old["env_version"]
    ant_path.write_text(json.dumps(old))
    with pytest.raises(CheckpointError, match=r"version 1 of the 'ant-dir' environment, this "
                       r"code runs version 2 .* start a new run"):
        MetaLearner(config).restore(ant_path)
    ant.close()


def test_checkpoint_trained_with_other_dynamics_options_is_refused(tmp_path):
    """The half-cheetah's frame_skip changes its physics: a checkpoint made at v5's 0.05 s per
    action (the default, also when its config named no option) does not resume at 0.01 s, nor
    with rllab's start; an ant's does not resume on rllab's ant model."""
    def config(family="halfcheetah-dir", **options):
        return build_config({"seed": 7, "task": {"family": family, "options": options},
                             "policy": {"hidden_sizes": [4]},
                             "meta_optimizer": {"name": "adam"}})

    made = MetaLearner(config())
    path = made.save(tmp_path / "cheetah")
    made.close()
    MetaLearner(config(frame_skip=5)).restore(path)  # the default, named: the same physics
    with pytest.raises(CheckpointError, match=r"dynamics \{'frame_skip': 5, 'torso_com': False, "
                       r"'com_velocity': False, 'reset_noise': 'v5'\}, the config asks for "
                       r"\{'frame_skip': 1, 'torso_com': False, 'com_velocity': False, "
                       r"'reset_noise': 'v5'\}"):
        MetaLearner(config(frame_skip=1)).restore(path)
    with pytest.raises(CheckpointError, match=r"'reset_noise': 'rllab'\}"):
        MetaLearner(config(reset_noise="rllab")).restore(path)
    made = MetaLearner(config(family="ant-dir"))
    path = made.save(tmp_path / "ant")
    made.close()
    with pytest.raises(CheckpointError, match=r"dynamics \{'rllab_model': False, 'com_velocity': "
                       r"False\}, the config asks for \{'rllab_model': True, 'com_velocity': "
                       r"False\}"):
        MetaLearner(config(family="ant-dir", rllab_model=True)).restore(path)


class _Payload:
    """Unpickling this creates ``marker``: proof that the pickle was executed."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_is_refused_without_being_executed(saved, tmp_path):
    path, _ = saved
    # Control: this payload really does create its marker when unpickled.
    control = tmp_path / "control-marker"
    pickle.loads(pickle.dumps(_Payload(control))).close()
    assert control.exists()

    marker = tmp_path / "marker"
    payload = pickle.dumps(_Payload(marker))
    learner = MetaLearner(_config(optimizer="adam"))
    for name in ("evil.pkl", "evil.pt", "evil.json", "evil.safetensors"):
        evil = tmp_path / name
        evil.write_bytes(payload)
        with pytest.raises(CheckpointError):
            learner.restore(evil)
        with pytest.raises(CheckpointError):
            load_checkpoint(evil)
    # A pickle in place of the tensor file, with a manifest whose checksum matches it.
    import hashlib

    tensors = path.with_suffix(".safetensors")
    tensors.write_bytes(payload)
    manifest = json.loads(path.read_text())
    manifest["sha256"] = hashlib.sha256(payload).hexdigest()
    path.write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="not a valid safetensors file"):
        learner.restore(path)
    assert not marker.exists()
