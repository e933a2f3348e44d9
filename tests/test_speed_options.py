"""Speed options of the module: channels-last featurizers train and give the same
predictions; torch.compile is refused, with the reason, where it cannot work."""

import pytest
import torch
from lightning import Trainer, seed_everything

from dgkit.data import DomainDataModule
from dgkit.data.mnist import RotatedMNIST
from dgkit.errors import ConfigError
from dgkit.module import DGModule
from dgkit.networks import Featurizer
from dgkit_algorithms.erm import ERM
from dgkit_algorithms.udim import UDIM


def _model(**options) -> tuple[DGModule, DomainDataModule]:
    seed_everything(0)
    data = DomainDataModule(RotatedMNIST(), batch_size=8)
    return DGModule(algorithm=ERM, task=data.task, backbone="mnist_cnn", **options), data


def test_channels_last_featurizer_trains_and_predicts_as_the_default_layout():
    plain, _ = _model()
    fast, data = _model(channels_last=True)
    conv = next(m for m in fast.algorithm.featurizer.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.rand(4, 1, 28, 28)
    torch.testing.assert_close(fast(x), plain(x), rtol=1e-4, atol=1e-5)  # same weights, same maths
    Trainer(max_steps=2, limit_val_batches=0, logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False).fit(fast, datamodule=data)
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)


def test_compile_is_refused_for_double_backward_algorithms():
    data = DomainDataModule(RotatedMNIST(), batch_size=8)
    with pytest.raises(ConfigError, match=r"model\.compile: UDIM differentiates twice"):
        DGModule(algorithm=UDIM, task=data.task, backbone="mlp", compile=True)
    model = DGModule(algorithm=ERM, task=data.task, backbone="mlp", compile=True)
    featurizer = next(m for m in model.algorithm.modules() if isinstance(m, Featurizer))
    assert featurizer._compiled_call_impl is not None  # compiled lazily, on its first call
