"""DomainBed's algorithms (IRM, V-REx, GroupDRO, Mixup, CORAL, MMD): each one's
characteristic computation against a hand computation, its paper's direction on a small
problem, and an exact resume. Their step-for-step parity with DomainBed's own code is
``benchmarks/parity_domainbed.py`` (DomainBed is not a dependency)."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import make_task, plain_optimization, train
from lightning import Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint

from dgkit import Backbone, Batch
from dgkit.data import DomainDataModule
from dgkit.data.mnist import RotatedMNIST
from dgkit.module import DGModule
from dgkit_algorithms import ERM
from dgkit_algorithms.alignment import CORAL, MMD, coral_distance, mmd_distance
from dgkit_algorithms.invariance import IRM, VREx, irm_penalty
from dgkit_algorithms.mixing import Mixup
from dgkit_algorithms.robust import GroupDRO

TASK = make_task(domains=("a", "b", "c"))


def _batch(n: int = 8, seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(3 * n, *TASK.input_shape, generator=g)
    y = torch.randint(0, TASK.num_classes, (3 * n,), generator=g)
    return Batch(x, y, torch.arange(3).repeat_interleave(n))


def test_irm_penalty_is_the_product_of_the_two_halves_scale_gradients():
    logits, y = torch.randn(10, 4), torch.randint(0, 4, (10,))

    def scale_gradient(lg, yy):  # d/ds CE(s * logits) at s = 1, in closed form
        return ((lg.softmax(1) - F.one_hot(yy, 4)) * lg).sum(1).mean()

    expected = scale_gradient(logits[::2], y[::2]) * scale_gradient(logits[1::2], y[1::2])
    torch.testing.assert_close(irm_penalty(logits, y), expected)


@pytest.mark.parametrize("cls", [IRM, VREx])
def test_penalty_weight_jumps_and_the_optimizer_restarts_at_the_annealing_step(cls):
    torch.manual_seed(0)
    algo = cls(TASK, Backbone("mlp"), lam=50.0, anneal_steps=2)
    optimizer = torch.optim.Adam(algo.parameters(), lr=1e-3)
    counts, weights = [], []
    for step in range(4):
        algo.progress.step = step
        out = algo.training_update(_batch(seed=step), plain_optimization(optimizer))
        weights.append(float((out["loss"] - out["nll"]) / out["penalty"]))
        counts.append(int(optimizer.state[next(algo.parameters())]["step"]))
    assert weights == pytest.approx([1, 1, 50, 50], rel=1e-2)  # (loss - nll) / penalty, rounded
    assert counts == [1, 2, 1, 2]  # Adam starts afresh where the weight jumps, as DomainBed


def test_vrex_penalty_is_the_variance_of_the_domain_risks():
    torch.manual_seed(0)
    algo, batch = VREx(TASK, Backbone("mlp")), _batch()
    risk, penalty = algo.penalty(batch)
    logits = algo(batch.x)
    risks = torch.stack([F.cross_entropy(logits[batch.domain == d], batch.y[batch.domain == d])
                         for d in range(3)])
    torch.testing.assert_close(risk, risks.mean())
    torch.testing.assert_close(penalty, risks.var(unbiased=False))


def test_groupdro_weights_follow_the_domains_losses():
    torch.manual_seed(0)
    algo, batch = GroupDRO(TASK, Backbone("mlp"), eta=0.5), _batch()
    with torch.no_grad():
        losses = torch.stack([F.cross_entropy(algo(x), y) for x, y in batch.per_domain()])
    out = algo.training_loss(batch)
    expected = torch.exp(0.5 * losses) / torch.exp(0.5 * losses).sum()
    torch.testing.assert_close(algo.q, expected)
    assert int(algo.q.argmax()) == int(losses.argmax())  # the worst domain weighs most
    torch.testing.assert_close(out["loss"], losses @ expected)


def test_coral_and_mmd_distances_against_hand_computations():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(20, 5, generator=g), torch.randn(30, 5, generator=g) * 2 + 1
    cov_diff = (torch.cov(x.T) - torch.cov(y.T)).pow(2).mean()
    torch.testing.assert_close(coral_distance(x, y), (x.mean(0) - y.mean(0)).pow(2).mean() + cov_diff)

    def kernel(a, b):
        d = torch.cdist(a, b).pow(2)
        return sum(torch.exp(-gamma * d) for gamma in (0.001, 0.01, 0.1, 1, 10, 100, 1000))

    expected = kernel(x, x).mean() + kernel(y, y).mean() - 2 * kernel(x, y).mean()
    torch.testing.assert_close(mmd_distance(x, y), expected, atol=1e-4, rtol=1e-4)
    assert coral_distance(x, x) == 0 and mmd_distance(x, x).abs() < 1e-4 < mmd_distance(x, y)


def test_mixup_mixes_pairs_of_domains_with_a_beta_weight():
    torch.manual_seed(0)
    algo, batch = Mixup(TASK, Backbone("mlp"), alpha=0.4), _batch()
    torch.manual_seed(7)
    np.random.seed(7)
    loss = algo.training_loss(batch)
    torch.manual_seed(7)
    np.random.seed(7)
    domains = batch.per_domain()
    perm = torch.randperm(3).tolist()
    expected = 0
    for i in range(3):
        (xi, yi), (xj, yj) = domains[perm[i]], domains[perm[(i + 1) % 3]]
        lam = np.random.beta(0.4, 0.4)
        logits = algo(lam * xi + (1 - lam) * xj)
        expected += lam * F.cross_entropy(logits, yi) + (1 - lam) * F.cross_entropy(logits, yj)
    torch.testing.assert_close(loss, expected / 3)


@pytest.mark.parametrize("cls", [CORAL, MMD])
def test_alignment_brings_the_domains_features_closer_than_erm(cls):
    """The paper's direction: at the same budget, the source domains' features are closer
    (by the algorithm's own distance) after training with the penalty than after ERM."""
    data = DomainDataModule(RotatedMNIST(), batch_size=32)
    aligned = train(cls, 150, data=data, gamma=10.0).algorithm.eval()
    erm = train(ERM, 150, data=data).algorithm.eval()
    data.setup("fit")
    domains = [source_batch_of(data, i) for i in data.source_indices]

    def mean_distance(algo):
        with torch.no_grad():
            features = [algo.featurizer(x) for x in domains]
            return float(torch.stack([aligned.distance(features[i], features[j])
                                      for i in range(5) for j in range(i + 1, 5)]).mean())

    assert mean_distance(aligned) < 0.5 * mean_distance(erm), (mean_distance(aligned), mean_distance(erm))


def source_batch_of(data: DomainDataModule, index: int, n: int = 128) -> torch.Tensor:
    subset = data.splits[index][0]
    return torch.stack([subset[j][0] for j in range(n)])


def _fit(alias_cls, hparams: dict, steps: int, folder, ckpt_path=None, backbone: str = "mlp") -> dict:
    seed_everything(0)
    data = DomainDataModule(RotatedMNIST(), batch_size=8)
    model = DGModule(algorithm=functools.partial(alias_cls, **hparams), task=data.task, backbone=backbone,
                     dropout=0.3)
    saver = ModelCheckpoint(dirpath=folder, every_n_train_steps=3, save_top_k=-1, filename="{step}")
    trainer = Trainer(max_steps=steps, limit_val_batches=0, logger=False, callbacks=[saver],
                      enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    # our own file, with a functools.partial in its hyperparameters: not loadable weights-only
    trainer.fit(model, datamodule=data, ckpt_path=ckpt_path, weights_only=False)
    return {k: v.clone() for k, v in model.algorithm.state_dict().items()}


@pytest.mark.parametrize(("cls", "hparams"), [(IRM, {"anneal_steps": 3}), (VREx, {"anneal_steps": 3}),
                                              (GroupDRO, {"eta": 0.1}), (Mixup, {}), (CORAL, {}), (MMD, {})],
                         ids=["irm", "vrex", "groupdro", "mixup", "coral", "mmd"])
def test_a_resumed_fit_ends_where_the_uninterrupted_one_does(cls, hparams, tmp_path):
    whole = _fit(cls, hparams, 6, tmp_path / "whole")
    resumed = _fit(cls, hparams, 6, tmp_path / "resumed", ckpt_path=tmp_path / "whole" / "step=3.ckpt")
    for key, value in whole.items():
        torch.testing.assert_close(resumed[key], value, rtol=0, atol=0, msg=key)
