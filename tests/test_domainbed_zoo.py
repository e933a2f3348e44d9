"""DomainBed's meta-learning, adversarial, context, style, regularization and gradient-matching
algorithms: each one's characteristic computation on a small problem against a hand
computation (step-for-step parity with DomainBed's code is benchmarks/parity_domainbed.py),
and, shared by every DomainBed algorithm, a fit under two DDP processes whose ranks agree
and an exact resume."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import make_task, plain_optimization
from test_domainbed_algorithms import _fit

from dgkit import Backbone, Batch, Optimization
from dgkit.plugins import registry
from dgkit_algorithms.adversarial import CDANN, DANN, URM, Transfer
from dgkit_algorithms.alignment import CausIRL_CORAL, CausIRL_MMD, coral_distance, mmd_distance
from dgkit_algorithms.averaging import ERMPlusPlus
from dgkit_algorithms.context import ARM, MTL
from dgkit_algorithms.contrastive import CAD, CondCAD, SelfReg
from dgkit_algorithms.disentanglement import ADRMX, supcon_lambda
from dgkit_algorithms.gradient_matching import (
    IGA,
    ANDMask,
    Fish,
    Fishr,
    SANDMask,
    per_sample_classifier_gradients,
)
from dgkit_algorithms.invariance import IB_ERM, IB_IRM
from dgkit_algorithms.meta_learning import MLDG, split_meta_train_test
from dgkit_algorithms.regularization import RSC, SD
from dgkit_algorithms.robust import EQRM, RDM, kde_quantile
from dgkit_algorithms.style import SagNet, randomize
from dgkit_algorithms.transfer_risk import TRM, hessian_inverse_product

TASK = make_task(domains=("a", "b", "c"))
IMAGES = make_task(input_shape=(2, 8, 8), domains=("a", "b", "c"))


def _batch(task=TASK, n: int = 8, seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(3 * n, *task.input_shape, generator=g)
    y = torch.randint(0, task.num_classes, (3 * n,), generator=g)
    return Batch(x, y, torch.arange(3).repeat_interleave(n))


def _sgd(algo, lr=0.1):
    return plain_optimization(torch.optim.SGD(algo.parameter_groups(), lr=lr))


def _params(module):
    return [p.detach().clone() for p in module.parameters()]


def _grads(net, x, y):
    return torch.autograd.grad(F.cross_entropy(net(x), y), list(net.parameters()))


def test_mldg_steps_along_meta_train_plus_beta_times_meta_test_gradients():
    torch.manual_seed(0)
    algo, batch = MLDG(TASK, Backbone("mlp"), beta=0.5, n_meta_test=1), _batch()
    net = copy.deepcopy(torch.nn.Sequential(algo.featurizer, algo.classifier))
    torch.manual_seed(3)
    pairs = split_meta_train_test(batch.per_domain(), 1)
    expected = [torch.zeros_like(p) for p in net.parameters()]
    for (xi, yi), (xj, yj) in pairs:  # first order: G_j at the copy moved by one SGD step on i
        g_i = _grads(net, xi, yi)
        moved = copy.deepcopy(net)
        with torch.no_grad():
            for p, g in zip(moved.parameters(), g_i, strict=True):
                p -= 0.1 * g
        g_j = _grads(moved, xj, yj)
        for e, a, b in zip(expected, g_i, g_j, strict=True):
            e += (a + 0.5 * b) / 3
    before = _params(net)
    torch.manual_seed(3)
    algo.training_update(batch, _sgd(algo))
    after = _params(torch.nn.Sequential(algo.featurizer, algo.classifier))
    for b, a, e in zip(before, after, expected, strict=True):
        torch.testing.assert_close(a, b - 0.1 * e)
    assert len(pairs) == 2 and all(j[0] is not None for _, j in pairs)  # 2 meta-train, 1 meta-test


def test_fish_moves_meta_lr_of_the_way_to_a_clone_stepped_on_each_domain_in_turn():
    torch.manual_seed(0)
    algo, batch = Fish(TASK, Backbone("mlp"), meta_lr=0.25), _batch()
    net = copy.deepcopy(algo.network())
    clone = copy.deepcopy(net)
    for x, y in batch.per_domain():
        grads = _grads(clone, x, y)
        with torch.no_grad():
            for p, g in zip(clone.parameters(), grads, strict=True):
                p -= 0.1 * g
    algo.training_update(batch, _sgd(algo))
    now = algo.network().parameters()
    for start, end, p in zip(net.parameters(), clone.parameters(), now, strict=True):
        torch.testing.assert_close(p, start + 0.25 * (end - start))


def test_dann_alternates_players_and_the_generator_follows_the_reversed_domain_gradient():
    torch.manual_seed(0)
    algo, batch = DANN(TASK, Backbone("mlp"), lam=2.0, d_steps_per_g=1, beta1=None), _batch()
    main = torch.optim.SGD(algo.parameter_groups(), lr=0.1)
    disc = torch.optim.SGD(algo.discriminator_parameters(), lr=0.1)
    generator = [*algo.featurizer.parameters(), *algo.classifier.parameters()]
    changed = []
    for step in range(4):
        algo.progress.step = step
        before_g = [p.detach().clone() for p in generator]
        before_d = _params(algo.discriminator)
        if step == 0:  # the generator's turn: CE(y) - lam * CE(domain), through the features
            z = algo.featurizer(batch.x)
            gen = (F.cross_entropy(algo.classifier(z), batch.y)
                   - 2.0 * F.cross_entropy(algo.discriminator(z), batch.domain))
            expected = torch.autograd.grad(gen, generator)
        algo.training_update(batch, Optimization.standalone([main, disc]))
        moved_g = any(not torch.equal(a, b) for a, b in zip(before_g, generator, strict=True))
        moved_d = any(not torch.equal(a, b)
                      for a, b in zip(before_d, algo.discriminator.parameters(), strict=True))
        changed.append((moved_g, moved_d))
        if step == 0:
            for b, p, e in zip(before_g, generator, expected, strict=True):
                torch.testing.assert_close(p.detach(), b - 0.1 * e)
    assert changed == [(True, False), (False, True)] * 2  # DomainBed's count: g, d, g, d


def test_cdann_weighs_every_class_equally_in_the_discriminators_loss():
    torch.manual_seed(0)
    algo = CDANN(TASK, Backbone("mlp"))
    batch = _batch()
    batch.y = torch.tensor([0] * 20 + [1] * 4)  # unbalanced classes
    z = algo.featurizer(batch.x)
    out = algo.discriminator(z + algo.class_embeddings(batch.y))
    per_sample = F.cross_entropy(out, batch.domain, reduction="none")
    expected = (per_sample[:20].mean() + per_sample[20:].mean()) / 10  # each class 1/C of the weight
    torch.testing.assert_close(algo.discriminator_loss(z, batch), expected)


def test_mtl_keeps_a_moving_mean_feature_per_domain_and_feeds_it_to_the_classifier():
    torch.manual_seed(0)
    algo, batch = MTL(TASK, Backbone("mlp"), ema=0.5), _batch()
    algo.training_loss(batch)
    features = algo.featurizer(batch.x[batch.domain == 1]).detach()
    torch.testing.assert_close(algo.embeddings[1], 0.5 * features.mean(0))  # from zeros
    x = batch.x[:8]
    f = algo.featurizer(x)
    expected = algo.classifier(torch.cat([f, f.mean(0, keepdim=True).expand_as(f)], 1))
    torch.testing.assert_close(algo(x), expected)  # test time: the batch's own mean
    noisy = MTL(TASK, Backbone("mlp"), noise_embedding=True)
    noisy.load_state_dict(algo.state_dict())
    assert not torch.allclose(noisy(x), expected)  # DomainBed's .normal_() replaces it


def test_sagnet_randomizes_style_or_content_and_each_player_learns_its_part():
    x = torch.randn(6, 5) * torch.arange(1, 7).view(6, 1) + torch.arange(6).view(6, 1)
    torch.manual_seed(0)
    content = randomize(x, "content")  # every sample keeps its mean and variance
    torch.testing.assert_close(content.mean(1), x.mean(1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(content.var(1), x.var(1), atol=1e-3, rtol=1e-3)
    torch.manual_seed(0)
    style = randomize(x, "style")  # keeps the normalized content
    normalized = (x - x.mean(1, keepdim=True)) / x.std(1, keepdim=True)
    torch.testing.assert_close((style - style.mean(1, keepdim=True)) / style.std(1, keepdim=True), normalized,
                               atol=1e-4, rtol=1e-4)
    torch.manual_seed(0)
    algo, batch = SagNet(TASK, Backbone("mlp")), _batch()
    parts = [algo.featurizer, algo.classifier, algo.style_classifier]
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1) for m in parts]
    before = [_params(m) for m in parts]
    out = algo.training_update(batch, Optimization.standalone(optimizers))
    assert all(any(not torch.equal(a, b) for a, b in zip(old, m.parameters(), strict=True))
               for old, m in zip(before, parts, strict=True))
    assert out["adv_loss"] == pytest.approx(0.1 * np.log(10), rel=0.2)  # near-uniform style guesses


def test_arm_gives_each_domain_its_own_mean_context_and_can_leave_the_context_net_untrained():
    torch.manual_seed(0)
    algo, batch = ARM(IMAGES, Backbone("mlp"), train_context=False), _batch(IMAGES)
    algo.eval()
    with torch.no_grad():
        augmented = algo.contextualize(batch.x, 3)
        context = algo.context_net(batch.x)
    assert augmented.shape[1] == IMAGES.input_shape[0] + 1
    for d in range(3):
        torch.testing.assert_close(augmented[batch.domain == d, -1:], context[batch.domain == d].mean(0)
                                   .expand(8, -1, -1, -1))
    algo.train()
    algo.training_loss(batch).backward()
    assert all(p.grad is None for p in algo.context_net.parameters())  # DomainBed's ARM, reproduced
    trained = ARM(IMAGES, Backbone("mlp"))
    trained.training_loss(batch).backward()
    assert all(p.grad is not None for p in trained.context_net.parameters())


def test_rsc_mutes_the_features_with_the_largest_gradient_for_the_least_affected_samples():
    torch.manual_seed(0)
    algo, batch = RSC(TASK, Backbone("mlp"), f_drop_factor=0.5, b_drop_factor=0.5), _batch()
    features = algo.featurizer(batch.x)
    logits = algo.classifier(features)
    one_hot = F.one_hot(batch.y, 10)
    grads = torch.autograd.grad((logits * one_hot).sum(), features)[0]
    mask_f = (grads < torch.quantile(grads, 0.5, dim=1, keepdim=True)).float()  # top half muted
    muted = algo.classifier(features * mask_f)
    drop = (F.softmax(logits, 1) * one_hot).sum(1) - (F.softmax(muted, 1) * one_hot).sum(1)
    kept_whole = drop < torch.quantile(drop, 0.5)  # the samples whose confidence falls least
    mask = torch.where(kept_whole.view(-1, 1), torch.ones_like(mask_f), mask_f)
    expected = F.cross_entropy(algo.classifier(features * mask), batch.y)
    torch.testing.assert_close(algo.training_loss(batch), expected)
    assert 0.4 < float(mask_f.mean()) < 0.6 and int(kept_whole.sum()) == 12


def test_sd_penalizes_the_mean_squared_logit():
    torch.manual_seed(0)
    algo, batch = SD(TASK, Backbone("mlp"), reg=0.3), _batch()
    logits = algo(batch.x)
    out = algo.training_loss(batch)
    torch.testing.assert_close(out["loss"], F.cross_entropy(logits, batch.y) + 0.3 * logits.pow(2).mean())


def test_and_mask_keeps_only_components_whose_signs_agree_and_sand_mask_softens_it():
    grads = torch.tensor([[1.0, 1.0, -1.0, 0.2], [2.0, -1.0, -3.0, 0.1], [1.5, 1.0, -2.0, 0.3]])
    and_mask = ANDMask(TASK, Backbone("mlp"), tau=1.0).mask(grads)
    assert and_mask.tolist() == [1.0, 0.0, 1.0, 1.0]
    assert ANDMask(TASK, Backbone("mlp"), tau=0.3).mask(grads).tolist() == [1.0, 1.0, 1.0, 1.0]
    soft = SANDMask(TASK, Backbone("mlp"), tau=0.5, k=1.0).mask(grads)
    assert soft[1] == 0 < soft[0] < 1 and soft[3] > soft[0]  # low variance agrees most
    torch.manual_seed(0)
    algo, batch = ANDMask(TASK, Backbone("mlp"), tau=1.0), _batch()
    per_domain = [_grads(algo, x, y) for x, y in batch.per_domain()]
    algo.training_update(batch, _sgd(algo, lr=0.0))
    for i, p in enumerate(algo.parameters()):
        stacked = torch.stack([g[i] for g in per_domain])
        mask = (torch.sign(stacked).mean(0).abs() >= 1.0).float()
        torch.testing.assert_close(p.grad, mask * stacked.mean(0) / (1e-10 + mask.mean()))


def test_iga_penalizes_the_spread_of_the_domains_gradients_around_their_mean():
    torch.manual_seed(0)
    algo, batch = IGA(TASK, Backbone("mlp"), penalty=10.0), _batch()
    per_domain = [_grads(algo, x, y) for x, y in batch.per_domain()]
    mean = [sum(g[i] for g in per_domain) / 3 for i in range(len(per_domain[0]))]
    spread = sum((g[i] - mean[i]).pow(2).sum() for g in per_domain for i in range(len(mean)))
    out = algo.training_loss(batch)
    torch.testing.assert_close(out["penalty"], spread)
    assert out["loss"].requires_grad and algo.differentiates_twice


@pytest.mark.parametrize("cls", [IB_ERM, IB_IRM])
def test_information_bottleneck_switches_on_at_its_annealing_step_and_restarts_the_optimizer(cls):
    torch.manual_seed(0)
    extra = {"irm_anneal_steps": 1, "irm_lambda": 5.0} if cls is IB_IRM else {}
    algo = cls(TASK, Backbone("mlp"), ib_lambda=10.0, ib_anneal_steps=2, **extra)
    optimizer = torch.optim.Adam(algo.parameters(), lr=1e-3)
    counts, weights = [], []
    for step in range(4):
        algo.progress.step, batch = step, _batch(seed=step)
        features = algo.featurizer(batch.x).detach()
        expected = sum(features[batch.domain == d].var(dim=0).mean() for d in range(3)) / 3
        out = algo.training_update(batch, plain_optimization(optimizer))
        torch.testing.assert_close(out["ib_penalty"], expected)
        irm = out.get("irm_penalty", 0.0) * (5.0 if step >= 1 else 1.0)
        weights.append(float((out["loss"] - out["nll"] - irm) / out["ib_penalty"]))
        counts.append(int(optimizer.state[next(algo.parameters())]["step"]))
    assert weights == pytest.approx([0, 0, 10, 10], abs=1e-2)
    assert counts == ([1, 1, 1, 2] if cls is IB_IRM else [1, 2, 1, 2])  # a restart at every switch


@pytest.mark.parametrize("cls", [CausIRL_CORAL, CausIRL_MMD])
def test_causirl_aligns_the_two_sides_of_a_random_cut_in_every_domain(cls):
    torch.manual_seed(0)
    algo, batch = cls(TASK, Backbone("mlp"), gamma=2.0), _batch()
    np.random.seed(5)
    out = algo.training_loss(batch)
    np.random.seed(5)
    features = [algo.featurizer(x) for x, _ in batch.per_domain()]
    cuts = [np.random.randint(0, 8) for _ in features]
    first = torch.cat([f[:c] for f, c in zip(features, cuts, strict=True)])
    second = torch.cat([f[c:] for f, c in zip(features, cuts, strict=True)])
    distance = coral_distance if cls is CausIRL_CORAL else mmd_distance
    torch.testing.assert_close(out["penalty"], distance(first, second).detach())
    torch.testing.assert_close(out["loss"], out["nll"] + 2.0 * distance(first, second))


def test_eqrm_minimizes_a_quantile_of_the_risks_kernel_density_after_burn_in():
    risks = torch.tensor([0.2, 0.5, 0.9, 1.4, 2.0], dtype=torch.float64, requires_grad=True)
    bandwidth = 1.06 * risks.detach().std() * 5 ** -0.2
    for q in (0.25, 0.5, 0.9):
        k = kde_quantile(risks, torch.tensor(q, dtype=torch.float64))
        cdf = torch.distributions.Normal(risks.detach(), bandwidth).cdf(k.detach()).mean()
        assert float(cdf) == pytest.approx(q, abs=1e-6)  # the KDE's CDF at it is q
    high = kde_quantile(risks, torch.tensor(0.99, dtype=torch.float64))
    assert high > risks.max() and kde_quantile(risks, torch.tensor(0.5, dtype=torch.float64)) < risks.mean()
    high.backward()
    assert risks.grad[-1] == risks.grad.max() > 0  # high quantiles lean on the worst domain
    torch.manual_seed(0)
    algo = EQRM(TASK, Backbone("mlp"), quantile=0.9, burnin_steps=1, lr_after_burnin=1e-5)
    optimizer = torch.optim.Adam(algo.parameters(), lr=1e-3)
    losses = []
    for step in range(2):
        algo.progress.step, batch = step, _batch(seed=step)
        with torch.no_grad():
            risks = torch.stack([F.cross_entropy(algo(x), y) for x, y in batch.per_domain()])
        losses.append((float(algo.training_update(batch, plain_optimization(optimizer))), risks))
    assert losses[0][0] == pytest.approx(float(losses[0][1].mean()), rel=1e-5)  # burn-in: ERM
    assert losses[1][0] > float(losses[1][1].max())  # then the 0.9-quantile
    assert optimizer.param_groups[0]["lr"] == 1e-5 and optimizer.state[next(algo.parameters())]["step"] == 1


def test_fishr_per_sample_gradients_equal_autograd_and_the_penalty_matches_variances():
    torch.manual_seed(0)
    z, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    linear = torch.nn.Linear(4, 3)
    closed = per_sample_classifier_gradients(z, linear(z), y)
    for i in range(6):  # each sample's own gradient, by autograd
        own = F.cross_entropy(linear(z[i:i + 1]), y[i:i + 1])
        w, b = torch.autograd.grad(own, [linear.weight, linear.bias])
        torch.testing.assert_close(closed["weight"][i], w.flatten())
        torch.testing.assert_close(closed["bias"][i], b)
    algo, batch = Fishr(TASK, Backbone("mlp"), ema=0.0), _batch()
    features = algo.featurizer(batch.x)
    logits = algo.classifier(features)
    grads = per_sample_classifier_gradients(features, logits, batch.y)
    variances = [torch.cat([grads[k][batch.domain == d].var(0, unbiased=False) for k in ("bias", "weight")])
                 for d in range(3)]
    mean = torch.stack(variances).mean(0)
    expected = sum((v - mean).pow(2).mean() for v in variances) / 3
    torch.testing.assert_close(algo.variance_penalty(features, logits, batch), expected)
    same = Batch(batch.x[:8].repeat(3, 1, 1, 1), batch.y[:8].repeat(3), batch.domain)
    f = algo.featurizer(same.x)
    assert algo.variance_penalty(f, algo.classifier(f), same).item() < 1e-12  # identical domains: no penalty


def test_selfreg_pairs_only_samples_of_the_same_class():
    """With one sample per class the only partner is the sample itself: the logit terms
    vanish and the feature terms compare each feature with its own projection."""
    torch.manual_seed(0)
    algo = SelfReg(TASK, Backbone("mlp"))
    x = torch.rand(10, *TASK.input_shape)
    single = Batch(x, torch.arange(10), torch.zeros(10, dtype=torch.long))
    np.random.seed(0)
    loss = algo.training_loss(single)
    feat = algo.featurizer(x)
    ce = F.cross_entropy(algo.classifier(feat), torch.arange(10))
    torch.testing.assert_close(loss, ce + min(ce.item(), 1.0) * 0.3 * F.mse_loss(feat, algo.cdpl(feat)))


@pytest.mark.parametrize("cls", [CAD, CondCAD])
def test_contrastive_bottleneck_is_higher_when_the_features_reveal_the_domain(cls):
    algo = cls(TASK, Backbone("mlp"), temperature=0.5)
    y = torch.tensor([0, 1, 0, 1, 0, 1, 0, 1])
    domain = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    by_domain = torch.cat([torch.ones(8, 1) * (2 * domain.view(-1, 1) - 1), torch.zeros(8, 1)], 1)
    by_class = torch.cat([torch.zeros(8, 1), torch.ones(8, 1) * (2 * y.view(-1, 1) - 1)], 1)
    assert algo.bottleneck_loss(by_domain, y, domain) > algo.bottleneck_loss(by_class, y, domain)


def test_urm_trains_features_towards_uniform_noise_and_the_discriminator_against_them():
    torch.manual_seed(0)
    algo, batch = URM(TASK, Backbone("mlp"), adv_lambda=0.5), _batch()
    main = torch.optim.SGD(algo.parameter_groups(), lr=0.1)
    disc = torch.optim.SGD(algo.discriminator.parameters(), lr=0.1)
    feats = algo.features(batch.x)
    assert feats.abs().max() <= 1  # tanh: the noise's range [-1, 1)
    expected = F.cross_entropy(algo.classifier(feats), batch.y) + 0.5 * F.binary_cross_entropy_with_logits(
        algo.discriminator(feats).squeeze(1), torch.ones(24))
    d_before = _params(algo.discriminator)
    out = algo.training_update(batch, Optimization.standalone([main, disc]))
    torch.testing.assert_close(out["loss"], expected.detach())
    assert all(not torch.equal(a, b) for a, b in zip(d_before, algo.discriminator.parameters(), strict=True))
    assert algo.representation()[1] is None


def test_transfer_adversary_ascends_the_domain_gap_inside_its_ball():
    torch.manual_seed(0)
    algo, batch = Transfer(TASK, Backbone("mlp"), delta=0.05, d_steps_per_g=3, lr_d=1.0), _batch()
    risks = [F.cross_entropy(algo.adv_classifier(algo.featurizer(x)), y) for x, y in batch.per_domain()]
    torch.testing.assert_close(algo.loss_gap(batch), max(risks) - min(risks))
    optimizers = [torch.optim.SGD(algo.parameter_groups(), lr=0.01), *algo.extra_optimizers(None)]
    algo.training_update(batch, Optimization.standalone(optimizers))
    pairs = zip(algo.adv_classifier.parameters(), algo.classifier.parameters(), strict=True)
    distance = torch.sqrt(sum(torch.norm(a - h) ** 2 for a, h in pairs))
    assert float(distance) == pytest.approx(0.05, rel=1e-4)  # pushed out, projected back onto the ball
    with torch.no_grad():
        gap_adversary = algo.loss_gap(batch)
        algo.adv_classifier.load_state_dict(algo.classifier.state_dict())
        assert gap_adversary > algo.loss_gap(batch)  # the adversary widened the gap


def test_rdm_matches_the_worst_domains_loss_distribution_to_all_after_annealing():
    from dgkit_algorithms.alignment import gaussian_kernel
    from dgkit_algorithms.robust import RDM_GAMMAS

    torch.manual_seed(0)
    algo = RDM(TASK, Backbone("mlp"), lam=2.0, anneal_steps=1, variance_weight=0.5, lr_after_anneal=1e-4)
    optimizer = torch.optim.Adam(algo.parameters(), lr=1e-3)
    batch = _batch()
    with torch.no_grad():
        per_sample = F.cross_entropy(algo(batch.x), batch.y, reduction="none").view(3, 8)  # [domain, sample]
    worst, everyone = per_sample[per_sample.mean(1).argmax()].view(-1, 1), per_sample.view(-1, 1)
    mmd = (gaussian_kernel(worst, worst, RDM_GAMMAS).mean()
           + gaussian_kernel(everyone, everyone, RDM_GAMMAS).mean()
           - 2 * gaussian_kernel(worst, everyone, RDM_GAMMAS).mean())
    out = algo.training_update(batch, plain_optimization(optimizer))  # step 0: ERM
    torch.testing.assert_close(out["matching"], mmd)
    torch.testing.assert_close(out["loss"], out["nll"])
    algo.progress.step = 1
    out = algo.training_update(batch, plain_optimization(optimizer))
    torch.testing.assert_close(out["loss"], out["nll"] + 2.0 * out["matching"] + 0.5 * out["variance"])
    assert optimizer.param_groups[0]["lr"] == 1e-4 and optimizer.state[next(algo.parameters())]["step"] == 1


def test_adrmx_turns_contrastive_loss_and_same_class_remix():
    labels, domains = torch.tensor([0, 0, 1, 1]), torch.tensor([0, 1, 0, 1])
    features = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    dots = F.normalize(features, dim=1) @ F.normalize(features, dim=1).T / 0.07
    expected = 0.0
    for i in range(4):  # one positive per sample, from the other domain: weight 1 - lamda
        pos = next(j for j in range(4) if labels[j] == labels[i] and j != i)
        neg = [j for j in range(4) if labels[j] != labels[i]]
        weights = {j: 0.5 for j in range(4)}  # lamda = 0.5 for in- and out-of-domain alike
        num = weights[pos] * torch.exp(dots[pos, i])
        den = num + sum(weights[j] * torch.exp(dots[j, i]) for j in neg) + 1e-5
        expected = expected - torch.log(num / den + 1e-5)
    torch.testing.assert_close(supcon_lambda(features, labels, domains), expected / 5)
    torch.manual_seed(0)
    algo, batch = ADRMX(TASK, Backbone("mlp"), d_steps_per_g=2), _batch()
    optimizers = [torch.optim.Adam(algo.parameter_groups()), *algo.extra_optimizers(
        lambda groups: torch.optim.Adam(groups))]
    turns = []
    for step in range(3):
        algo.progress.step = step
        before = _params(algo.featurizer)
        out = algo.training_update(batch, Optimization.standalone(optimizers))
        turns.append("nll" in out and not all(torch.equal(a, b) for a, b in
                                              zip(before, algo.featurizer.parameters(), strict=True)))
    assert turns == [False, True, False]  # DomainBed's count from 1: d, g, d (then d, g, ...)
    combined, domain = torch.randn(24, 5), torch.randn(24, 5)
    picked = []

    class Recorder(torch.nn.Module):
        def forward(self, v):
            picked.append(v)
            return torch.zeros(1, 10)

    algo.classifier = Recorder()
    torch.manual_seed(0)
    algo.remix_loss(combined, domain, batch.y)
    # each remix: one sample's invariant part plus another same-class sample's domain part
    pairs = [(a, b) for a in range(24) for b in range(24)
             if any(torch.allclose(combined[a] + domain[b], v[0]) for v in picked)]
    assert len(pairs) == len(picked) > 0 and all(batch.y[a] == batch.y[b] for a, b in pairs)


def test_ermpp_probes_linearly_then_fine_tunes_and_predicts_with_the_moving_average():
    torch.manual_seed(0)
    algo = ERMPlusPlus(TASK, Backbone("mlp"), linear_lr=1e-2, linear_steps=1, sma_start=3)
    main = torch.optim.SGD(algo.parameter_groups(), lr=0.1)
    optimizers = [main, *algo.extra_optimizers(lambda params, lr: torch.optim.SGD(params, lr=lr))]
    weights, moved = [], []
    for step in range(5):
        algo.progress.step = step
        before = _params(algo.featurizer)
        algo.training_update(_batch(seed=step), Optimization.standalone(optimizers))
        now = algo.featurizer.parameters()
        moved.append(any(not torch.equal(a, b) for a, b in zip(before, now, strict=True)))
        weights.append(_params(torch.nn.Sequential(algo.featurizer, algo.classifier)))
        # the average: the weights until step sma_start - 2, then their mean from that step on
        expected = (weights[-1] if step + 1 < 3
                    else [torch.stack(w).mean(0) for w in zip(*weights[1:], strict=True)])
        for a, e in zip(algo.average.parameters(), expected, strict=True):
            torch.testing.assert_close(a, e)
    assert moved == [False, False, True, True, True]  # steps 0-1: the classifier alone
    x = _batch().x
    torch.testing.assert_close(algo(x), algo.average.eval()(x))  # the average predicts


def test_trm_neumann_series_and_transfer_phase():
    torch.manual_seed(0)
    linear, x, y = torch.nn.Linear(4, 3), torch.randn(32, 4), torch.randint(0, 3, (32,))

    def loss_of(w):
        return F.cross_entropy(x @ w.view(3, 4).T + linear.bias, y)

    hessian = torch.autograd.functional.hessian(loss_of, linear.weight.detach().flatten())
    v = torch.randn(12) * 0.1
    expected, term = v.clone(), v.clone()
    for _ in range(10):  # sum_k (I - H)^k v, k = 0..10
        term = term - hessian @ term
        expected = expected + term
    torch.testing.assert_close(hessian_inverse_product(v, linear, x, y), expected, atol=1e-5, rtol=1e-4)
    quirky = hessian_inverse_product(v, linear, x, y, first_term_twice=True)
    # DomainBed's: the first iteration gives 2 (I - H) v instead of v + (I - H) v
    torch.testing.assert_close(quirky, expected - v + (v - hessian @ v), atol=1e-5, rtol=1e-4)
    algo = TRM(TASK, Backbone("mlp"), iters=1, inner_steps=3)
    optimizers = [torch.optim.SGD(algo.parameter_groups(), lr=0.01), *algo.extra_optimizers(None)]
    before = _params(algo.domain_classifiers)
    out = algo.training_update(_batch(), Optimization.standalone(optimizers))  # step 0: ERM
    torch.testing.assert_close(out["loss"], out["nll"])
    assert all(torch.equal(a, b) for a, b in zip(before, algo.domain_classifiers.parameters(), strict=True))
    algo.progress.step = 1
    out = algo.training_update(_batch(seed=1), Optimization.standalone(optimizers))
    assert out["loss"] != out["nll"]
    now = algo.domain_classifiers.parameters()
    assert not any(torch.equal(a, b) for a, b in zip(before, now, strict=True))
    rows = algo.alpha.sum(1)
    assert torch.all(algo.alpha.diagonal() == 0) and torch.all(rows > 1)  # normalised, then raised by exp


# Every DomainBed algorithm in dgkit, with what it needs to act within a few steps.
ZOO = {"irm": {"anneal_steps": 2}, "vrex": {"anneal_steps": 2}, "groupdro": {}, "mixup": {}, "coral": {},
       "mmd": {}, "mldg": {}, "fish": {}, "dann": {}, "cdann": {"grad_penalty": 0.1}, "mtl": {},
       "sagnet": {}, "arm": {}, "rsc": {}, "sd": {}, "andmask": {"tau": 0.6}, "sandmask": {"tau": 0.5},
       "iga": {}, "ib_erm": {"ib_anneal_steps": 2}, "ib_irm": {"irm_anneal_steps": 1, "ib_anneal_steps": 2},
       "causirl_coral": {}, "causirl_mmd": {}, "eqrm": {"burnin_steps": 2}, "fishr": {"anneal_steps": 2},
       "selfreg": {}, "cad": {}, "condcad": {}, "urm": {}, "transfer": {"d_steps_per_g": 2},
       "rdm": {"anneal_steps": 2}, "adrmx": {}, "ermpp": {"linear_steps": 1, "sma_start": 3},
       "trm": {"iters": 2, "inner_steps": 3}}
# Beyond DomainBed's: the sharpness family's two-pass steps, UDIM's double backward, MIRO.
OTHERS = {"sam": {}, "asam": {}, "gsam": {}, "sagm": {}, "udim": {"warmup_steps": 2},
          "miro": {"backbone": "mnist_cnn"}}
SCRIPT = Path(__file__).parent / "scripts" / "ddp_algorithms.py"


def _spec(alias: str, hparams: dict) -> str:
    return alias + (":" + ",".join(f"{k}={v}" for k, v in hparams.items()) if hparams else "")


@pytest.mark.slow
def test_every_algorithm_of_a_training_step_trains_under_two_ddp_processes_whose_ranks_agree(tmp_path):
    specs = ([_spec(a, h) for a, h in ZOO.items()] + [_spec(a, h) for a, h in OTHERS.items()]
             + ["unsynced_algorithm.Unsynced"])
    done = subprocess.run([sys.executable, str(SCRIPT), *specs], cwd=tmp_path, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [line for line in done.stdout.splitlines() if ": step " in line]
    assert [line.split(", test accuracy")[0] for line in lines[:-1]] == [
        f"{alias}: step 4, ranks agree" for alias in [*ZOO, *OTHERS]], done.stdout
    assert all(0 <= float(line.rsplit(" ", 1)[1]) <= 1 for line in lines), lines
    assert lines[-1].startswith("unsynced_algorithm.Unsynced: step 4, ranks differ"), lines[-1]


RESUMED_ELSEWHERE = ("irm", "vrex", "groupdro", "mixup", "coral", "mmd")  # test_domainbed_algorithms.py


@pytest.mark.parametrize("alias", [a for a in ZOO if a not in RESUMED_ELSEWHERE] + ["gsam", "sagm"])
def test_a_resumed_fit_ends_where_the_uninterrupted_one_does(alias, tmp_path):
    cls, hparams = registry("algorithm").get(alias).obj, ZOO.get(alias, {})
    whole = _fit(cls, hparams, 6, tmp_path / "whole")
    resumed = _fit(cls, hparams, 6, tmp_path / "resumed", ckpt_path=tmp_path / "whole" / "step=3.ckpt")
    for key, value in whole.items():
        torch.testing.assert_close(resumed[key], value, rtol=0, atol=0, msg=key)
