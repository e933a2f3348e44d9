"""A wrapper (AdaNPC) carries every protocol of its base: progress, stages, heads and their
selection, manual optimization; and its base's setting errors name the real option path."""

from __future__ import annotations

import functools

import pytest
import torch
from helpers import train

from dgkit.data import DomainDataModule
from dgkit.data.mnist import RotatedMNIST
from dgkit.errors import ConfigError
from dgkit.networks import Backbone
from dgkit_algorithms import DBAT, SAM, UDIM, AdaNPC, Bonsai


def test_adanpc_on_udim_leaves_the_warm_up():
    model = train(AdaNPC, 4, base=functools.partial(UDIM, warmup_steps=2))
    base = model.algorithm.base
    assert base.progress is model.algorithm.progress
    assert base.progress.step == 3 and not base.in_warmup  # the base's schedule saw the run's steps


def test_adanpc_on_dbat_trains_every_member():
    data = DomainDataModule(RotatedMNIST(), batch_size=8, unlabeled="source_holdout")
    torch.manual_seed(0)  # as train() seeds: the same initial members
    before = [m.state_dict() for m in DBAT(data.task, Backbone("mlp")).members]
    model = train(AdaNPC, 6, data=data, base=DBAT)
    after = [m.state_dict() for m in model.algorithm.base.members]
    for i, (old, new) in enumerate(zip(before, after, strict=True)):
        assert any(not torch.equal(old[k], new[k].cpu()) for k in old), f"member {i} never trained"
    assert model.algorithm.num_heads == 2 and model.metrics.tracks_heads


def test_adanpc_on_bonsai_runs_every_stage():
    model = train(AdaNPC, 9, base=functools.partial(Bonsai, stage_steps=[3, 3, 3]))
    stages = next(c for c in model.components if type(c).__name__ == "Stages")
    assert [s["stage"] for s in stages.finished] == ["discovery-0", "discovery-1", "synthesis"]
    assert [s["step"] for s in stages.finished] == [3, 6, 9]


def test_adanpc_on_a_manual_optimization_base_is_manual():
    data = DomainDataModule(RotatedMNIST(), batch_size=8)
    algo = AdaNPC(data.task, Backbone("mlp"), base=SAM)
    assert algo.manual_optimization and not algo.base.adapts_at_test and algo.adapts_at_test


def test_a_base_setting_error_names_the_option_under_base():
    data = DomainDataModule(RotatedMNIST(), batch_size=8)
    with pytest.raises(ConfigError, match=r"^model\.algorithm\.base\.rho: -1 is negative"):
        AdaNPC(data.task, Backbone("mlp"), base=functools.partial(SAM, rho=-1))
    with pytest.raises(ConfigError, match=r"^model\.algorithm\.base\.base\.rho: "):
        AdaNPC(data.task, Backbone("mlp"),
               base=functools.partial(AdaNPC, base=functools.partial(SAM, rho=-1)))
