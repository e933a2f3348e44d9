"""MIRO: its regularizer against a hand computation, the frozen oracle, the encoders' learning
rate, the paper's direction (features kept near the oracle's), and an exact resume."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from helpers import make_task, train
from test_domainbed_algorithms import _fit

from dgkit import Backbone, Batch
from dgkit_algorithms.mutual_information import MIRO

TASK = make_task(input_shape=(2, 28, 28), domains=("a", "b"), backbone="mnist_cnn")


def test_the_regularizer_is_the_gaussian_bound_on_every_stage_against_the_frozen_oracle():
    torch.manual_seed(0)
    algo = MIRO(TASK, Backbone("mnist_cnn"), ld=0.5)
    x = torch.rand(6, 2, 28, 28)
    batch = Batch(x, torch.randint(0, 10, (6,)), torch.tensor([0, 0, 0, 1, 1, 1]))
    with torch.no_grad():
        for p in algo.featurizer.parameters():
            p.add_(0.01 * torch.randn_like(p))  # moved away from the oracle
        algo.var_encoders[1].b.fill_(0.3)
    out = algo.training_loss(batch)
    h_f, h_o, reg = x, x, 0.0
    for i, (stage, oracle_stage) in enumerate(zip(algo._parts[1], algo._oracle_parts[1], strict=True)):
        h_f, h_o = stage(h_f), oracle_stage(h_o)
        var = F.softplus(algo.var_encoders[i].b) + 1e-5
        reg = reg + ((h_f - h_o).pow(2) / var + var.log()).mean() / 2
    torch.testing.assert_close(out["reg_loss"], reg.detach())
    torch.testing.assert_close(out["loss"], out["nll"] + 0.5 * reg.detach())
    assert len(algo.var_encoders) == 4  # the MNIST CNN's stem is not a layer: its four stages
    fresh = MIRO(TASK, Backbone("mnist_cnn")).var_encoders[0]()
    torch.testing.assert_close(fresh, torch.full_like(fresh, 0.1))  # MIRO's initial variance


def test_the_oracle_stays_frozen_and_the_encoders_learn_ten_times_faster():
    model = train(MIRO, 3, backbone="mnist_cnn", lr=1e-3)
    algo = model.algorithm
    assert not any(p.requires_grad for p in algo.oracle.parameters()) and not algo.oracle.training
    main = model.trainer.optimizers[0]
    assert [g["lr"] for g in main.param_groups] == [1e-3, 1e-2]
    initial = train(MIRO, 0, backbone="mnist_cnn").algorithm  # the same seed, before any step
    for a, b in zip(algo.oracle.parameters(), initial.featurizer.parameters(), strict=True):
        torch.testing.assert_close(a, b)


def test_miro_keeps_the_intermediate_features_closer_to_the_oracle():
    x = torch.rand(64, 1, 28, 28, generator=torch.Generator().manual_seed(1))  # Rotated MNIST

    def drift(ld: float) -> float:
        algo = train(MIRO, 30, backbone="mnist_cnn", batch_size=4, ld=ld).algorithm.eval()
        with torch.no_grad():
            _, taps = algo.intermediate(algo._parts, x)
            _, oracle = algo.intermediate(algo._oracle_parts, x)
        return sum(float((t - o).pow(2).mean()) for t, o in zip(taps, oracle, strict=True))

    assert drift(10.0) < 0.5 * drift(0.0)


def test_a_resumed_fit_ends_where_the_uninterrupted_one_does(tmp_path):
    whole = _fit(MIRO, {}, 6, tmp_path / "whole", backbone="mnist_cnn")
    resumed = _fit(MIRO, {}, 6, tmp_path / "resumed", ckpt_path=tmp_path / "whole" / "step=3.ckpt",
                   backbone="mnist_cnn")
    for key, value in whole.items():
        torch.testing.assert_close(resumed[key], value, rtol=0, atol=0, msg=key)
