import pytest
import torch
from helpers import plain_optimization, source_batch, train
from torch import nn

from dgkit.algorithm import Batch
from dgkit.data import DomainDataModule
from dgkit.data.mnist import RotatedMNIST
from dgkit.errors import ConfigError
from dgkit.networks import Backbone
from dgkit.sharpness import bn_stats_frozen, perturbed, sam_perturbation, worst_case_sharpness
from dgkit.task import Task
from dgkit_algorithms import ERM, SAM


def test_perturbation_is_rho_along_the_gradient():
    w = nn.Parameter(torch.tensor([3.0, -4.0]))
    w.grad = torch.tensor([3.0, 4.0])
    ((p, e),) = sam_perturbation([("weight", w)], rho=0.5)
    assert p is w
    torch.testing.assert_close(e, torch.tensor([0.3, 0.4]))


def test_asam_scales_weights_but_not_biases():
    w, b = nn.Parameter(torch.tensor([2.0])), nn.Parameter(torch.tensor([2.0]))
    w.grad, b.grad = torch.tensor([1.0]), torch.tensor([1.0])
    (_, ew), (_, eb) = sam_perturbation([("layer.weight", w), ("layer.bias", b)], rho=1.0,
                                        adaptive=True, eta=0.0)
    # T_w = |w| = 2 for the weight, 1 for the bias: e = T^2 g / ||T g|| = (4, 1) / sqrt(5)
    torch.testing.assert_close(torch.cat([ew, eb]), torch.tensor([4.0, 1.0]) / 5 ** 0.5)


def test_perturbed_restores_the_exact_weights():
    w = nn.Parameter(torch.randn(5))
    before = w.detach().clone()
    with perturbed([(w, torch.full((5,), 0.1))]):
        assert not torch.equal(w, before)
    assert torch.equal(w, before)


def test_sam_with_rho_zero_takes_the_base_optimizers_steps():
    erm = train(ERM, 6)
    sam = train(SAM, 6, rho=0.0)
    for (name, a), (_, b) in zip(erm.algorithm.named_parameters(), sam.algorithm.named_parameters(),
                                 strict=True):
        torch.testing.assert_close(a, b, msg=name)


def test_second_pass_leaves_batchnorm_statistics_to_the_first():
    bn = nn.BatchNorm1d(4)
    bn.train()
    bn(torch.randn(8, 4))
    mean, tracked = bn.running_mean.clone(), bn.num_batches_tracked.clone()
    with bn_stats_frozen(bn):
        out = bn(torch.randn(8, 4) * 5 + 3)
    assert torch.equal(bn.running_mean, mean) and torch.equal(bn.num_batches_tracked, tracked)
    assert bn.momentum == 0.1 and abs(out.mean().item()) < 1e-5  # still batch-normalised


def test_one_sam_step_updates_batchnorm_like_one_erm_step():
    task = Task((3, 32, 32), 5, ("a", "b"))
    torch.manual_seed(0)
    sam = SAM(task, Backbone("resnet18"), rho=0.5)
    erm = ERM(task, Backbone("resnet18"))
    erm.load_state_dict(sam.state_dict())
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 5, (8,))
    handle = plain_optimization(torch.optim.SGD(sam.parameters(), lr=0.0))
    sam.train().training_update(Batch(x, y, torch.zeros(8, dtype=torch.long)), handle)
    erm.train()(x)
    for (name, a), (_, b) in zip(sam.named_buffers(), erm.named_buffers(), strict=True):
        torch.testing.assert_close(a, b, msg=name)  # running stats and num_batches_tracked


def test_sam_reaches_a_flatter_minimum_than_erm():
    """Same seed, data, optimizer and number of steps. Flatness is measured as Foret et
    al.'s rho-sharpness, L(w + rho g/||g||) - L(w) at rho = 0.05 on a fixed batch of
    source training data (dgkit.sharpness.worst_case_sharpness)."""
    data = DomainDataModule(RotatedMNIST(), batch_size=16)
    x, y = source_batch(data)
    erm = train(ERM, 150, data=data).algorithm
    sam = train(SAM, 150, data=data, rho=0.05).algorithm
    with torch.no_grad():
        erm_loss = nn.functional.cross_entropy(erm.eval()(x), y).item()
        sam_loss = nn.functional.cross_entropy(sam.eval()(x), y).item()
    erm_sharp = worst_case_sharpness(erm, x, y, 0.05)
    sam_sharp = worst_case_sharpness(sam, x, y, 0.05)
    assert sam_loss < 1.2 * erm_loss  # as well fitted, so flatness is not bought by underfitting
    assert sam_sharp < 0.75 * erm_sharp, (sam_sharp, erm_sharp)


def test_negative_rho_is_rejected():
    with pytest.raises(ConfigError, match=r"model\.algorithm\.rho"):
        SAM(Task((1, 28, 28), 10, ("a",), default_backbone="mlp"), Backbone(), rho=-1.0)


def test_sam_trains_under_bf16_autocast():
    model = train(SAM, 3, precision="bf16-mixed")
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_schedulers_step_the_base_optimizer_under_manual_optimization():
    model = train(SAM, 4, lr=0.1, scheduler=(torch.optim.lr_scheduler.StepLR, {"step_size": 1, "gamma": 0.5}))
    (optimizer,) = model.trainer.optimizers
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**4)


def _grads_at(algo, batch, shift=None):
    params = [p for _, p in algo.named_trainable()]
    with torch.no_grad():
        if shift is not None:
            for p, e in zip(params, shift, strict=True):
                p += e
    grads = torch.autograd.grad(nn.functional.cross_entropy(algo(batch.x), batch.y), params)
    with torch.no_grad():
        if shift is not None:
            for p, e in zip(params, shift, strict=True):
                p -= e
    return params, grads


def _small_batch():
    g = torch.Generator().manual_seed(0)
    return Batch(torch.rand(12, 1, 28, 28, generator=g), torch.randint(0, 10, (12,), generator=g),
                 torch.arange(2).repeat_interleave(6))


def test_gsam_descends_sams_gradient_minus_alpha_times_the_plain_gradients_orthogonal_part():
    from dgkit_algorithms.sam import GSAM

    torch.manual_seed(0)
    task = Task((1, 28, 28), 10, ("a", "b"))
    algo, batch = GSAM(task, Backbone("mlp"), rho=0.05, alpha=0.3), _small_batch()
    params, g = _grads_at(algo, batch)
    norm = torch.sqrt(sum(t.pow(2).sum() for t in g))
    _, g_p = _grads_at(algo, batch, [0.05 * t / norm for t in g])
    flat_g, flat_p = torch.cat([t.flatten() for t in g]), torch.cat([t.flatten() for t in g_p])
    vertical = flat_g - (flat_g @ flat_p) / (flat_p @ flat_p) * flat_p  # g minus its projection on g_p
    assert abs(float(vertical @ flat_p)) < 1e-6 * float(flat_p @ flat_p)
    expected = flat_p - 0.3 * vertical
    before = [p.detach().clone() for p in params]
    algo.training_update(batch, plain_optimization(torch.optim.SGD(algo.parameter_groups(), lr=1.0)))
    step = torch.cat([(b - p.detach()).flatten() for b, p in zip(before, params, strict=True)])
    torch.testing.assert_close(step, expected, atol=1e-5, rtol=1e-4)


def test_sagm_descends_the_mean_of_the_plain_and_the_matched_perturbed_gradient():
    from dgkit_algorithms.sam import SAGM

    torch.manual_seed(0)
    task = Task((1, 28, 28), 10, ("a", "b"))
    algo, batch = SAGM(task, Backbone("mlp"), rho=0.05, alpha=0.2), _small_batch()
    params, g = _grads_at(algo, batch)
    norm = torch.sqrt(sum(t.pow(2).sum() for t in g))
    _, g_p = _grads_at(algo, batch, [t * (0.05 / norm - 0.2) for t in g])  # w + rho g/||g|| - alpha g
    before = [p.detach().clone() for p in params]
    algo.training_update(batch, plain_optimization(torch.optim.SGD(algo.parameter_groups(), lr=1.0)))
    for b, p, a, c in zip(before, params, g, g_p, strict=True):
        torch.testing.assert_close(b - p.detach(), (a + c) / 2, atol=1e-5, rtol=1e-4)
