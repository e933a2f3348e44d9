"""The averaging methods' arithmetic: SMA as salesforce/ensemble-of-averages keeps it, EMA with
its warm-up, SWAD's loss valley as khanrc/swad walks it (benchmarks/parity_swad.py compares
with khanrc/swad's own code), and the BatchNorm statistics of an average."""

from __future__ import annotations

import functools
from types import SimpleNamespace

import pytest
import torch
from lightning import Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from dgkit.averaging import EMA, SMA, recompute_batchnorm
from dgkit.data import DomainDataModule
from dgkit.data.mnist import RotatedMNIST
from dgkit.module import DGModule
from dgkit.plugins import registry
from dgkit.swad import LossValley


def _walk(model: nn.Module, steps: int, seed: int = 0):
    """Moves the weights at random, yielding a copy after each move."""
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=gen))
        yield {k: v.detach().clone() for k, v in model.named_parameters()}


def _run(method, model: nn.Module, steps: int) -> list[dict[str, torch.Tensor]]:
    method.setup(None, SimpleNamespace(algorithm=model), "fit")
    seen = []
    for step, weights in enumerate(_walk(model, steps)):
        method.update(model, step)
        seen.append(weights)
    return seen


def test_sma_is_ensemble_of_averages_moving_average():
    model = nn.Linear(3, 2)
    sma = SMA(start=4)
    seen = _run(sma, model, 10)
    # EoA: before sma_start_iter the average copies the weights; from it on, count += 1 and
    # avg = (avg * count + w) / (count + 1): the weights of step 3 are the first member.
    expected = torch.stack([w["weight"] for w in seen[3:]]).mean(0)
    torch.testing.assert_close(sma.average.module.weight, expected)
    assert sma.describe() == "SMA of 6 steps from step 4"


def test_ema_follows_its_decay_with_the_warm_up_ramp():
    model = nn.Linear(3, 2)
    ema = EMA(decay=0.9)
    seen = _run(ema, model, 30)
    average = seen[0]["weight"].clone()
    for n, w in enumerate(seen[1:], start=1):
        d = min(0.9, (1 + n) / (10 + n))
        average = d * average + (1 - d) * w["weight"]
    torch.testing.assert_close(ema.average.module.weight, average)


def test_ema_without_the_ramp_keeps_its_decay_from_the_first_update():
    model = nn.Linear(3, 2)
    ema = EMA(decay=0.9, warmup=False)
    seen = _run(ema, model, 30)
    average = seen[0]["weight"].clone()
    for w in seen[1:]:
        average = 0.9 * average + 0.1 * w["weight"]
    torch.testing.assert_close(ema.average.module.weight, average)


def test_batchnorm_statistics_are_those_of_the_data_and_draw_no_random_numbers():
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Dropout(0.5), nn.Linear(4, 2))
    x = torch.randn(64, 4) * 3 + 1
    state = torch.get_rng_state()
    assert recompute_batchnorm(model, [x]) == 64
    assert torch.equal(torch.get_rng_state(), state)
    hidden = model[0](x).detach()
    torch.testing.assert_close(model[1].running_mean, hidden.mean(0))
    torch.testing.assert_close(model[1].running_var, hidden.var(0, unbiased=True))
    assert model[1].momentum == 0.1 and model.training


def _segment(i: int, loss: float) -> dict:
    return {"params": {"w": torch.tensor(float(i))}, "loss": loss, "start": 10 * i, "end": 10 * i + 9}


def test_the_loss_valley_opens_at_its_minimum_and_dies_when_the_loss_rises():
    valley = LossValley(n_converge=3, n_tolerance=6, tolerance_ratio=0.3)
    losses = [3.0, 2.0, 1.0, 1.1, 1.2, 1.05, 1.1] + [5.0] * 7
    for i, loss in enumerate(losses):
        valley.push(_segment(i, loss))
        if valley.dead:
            break
    # Converged when segments 2-4 had their lowest loss first (threshold 1.1 * 1.3); segment
    # 3 joins then, the rest as the tolerance window passes them, until its lowest loss is 5.
    assert valley.converge_step == 29 and abs(valley.threshold - 1.43) < 1e-9
    assert valley.dead and i == 12
    params, described = valley.result()
    assert described == "steps 30-69 (N=6)"
    torch.testing.assert_close(params["w"], torch.tensor((3 + 2 + 3 + 4 + 5 + 6) / 6))


def test_a_valley_still_open_at_the_end_takes_the_segments_under_its_threshold():
    valley = LossValley(n_converge=3, n_tolerance=6, tolerance_ratio=0.3)
    for i, loss in enumerate([3.0, 2.0, 1.0, 1.1, 1.2, 1.05, 1.1, 1.2]):
        valley.push(_segment(i, loss))
    assert not valley.dead
    params, described = valley.result()
    # Pushed so far: 3, then 2 (at segment 7); at the end 3 to 7 (their window stays under 1.43).
    assert described == "steps 30-79 (N=7)"  # the range starts at the first joined
    torch.testing.assert_close(params["w"], torch.tensor((3 + 2 + 3 + 4 + 5 + 6 + 7) / 7))


def test_before_the_valley_opens_the_last_segment_stands_in():
    valley = LossValley(n_converge=3, n_tolerance=6, tolerance_ratio=0.3)
    for i, loss in enumerate([3.0, 2.0, 1.0]):
        valley.push(_segment(i, loss))
    params, described = valley.result()
    assert described.startswith("not converged") and float(params["w"]) == 2.0


SETTINGS = {  # alias: (its hyperparameters, the data module's, the backbone)
    "irm": ({"anneal_steps": 2}, {}, "mlp"), "vrex": ({"anneal_steps": 2}, {}, "mlp"),
    "dbat": ({}, {"unlabeled": "target"}, "mlp"), "divdis": ({}, {"unlabeled": "target"}, "mlp"),
    "itta": ({}, {}, "mnist_cnn"), "miro": ({}, {}, "mnist_cnn"),  # they read the backbone's stages
}


@pytest.mark.parametrize("alias", sorted(e.alias for e in registry("algorithm")))
def test_every_algorithm_validates_checkpoints_and_tests_its_average(alias, tmp_path):
    hparams, data_settings, backbone = SETTINGS.get(alias, ({}, {}, "mlp"))
    seed_everything(0)
    data = DomainDataModule(RotatedMNIST(), batch_size=8, **data_settings)
    algorithm = functools.partial(registry("algorithm").get(alias).obj, **hparams)
    model = DGModule(algorithm=algorithm, task=data.task, backbone=backbone,
                     averaging=functools.partial(SMA, start=1))
    saver = ModelCheckpoint(dirpath=tmp_path, monitor=data.task.selection_metric, mode="max")
    trainer = Trainer(max_steps=4, val_check_interval=2, limit_val_batches=1, limit_test_batches=1,
                      logger=False, callbacks=[saver], enable_progress_bar=False,
                      enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(model, datamodule=data)
    trainer.test(model, datamodule=data, ckpt_path="best", weights_only=False, verbose=False)
    assert {"test/accuracy", "test_last/accuracy"} <= set(trainer.callback_metrics)
    # The kept checkpoint's weights are the average (of steps 0-1 or 0-3), the trained ones beside.
    saved = torch.load(saver.best_model_path, weights_only=False)
    average = saved["dgkit_averaging"]["average"]
    assert int(average["n_averaged"]) in (2, 4)
    for name, _ in model.algorithm.named_parameters():
        assert torch.equal(saved["state_dict"]["algorithm." + name], average["module." + name]), name
    assert saved["current_model_state"].keys() == saved["state_dict"].keys()
