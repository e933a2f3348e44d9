"""The training loss reaches the host one step late where reading it would make the host wait
(CUDA), and the checks that read it (non-finite loss, divergence) then stop the run at the
same step, with the same message, as when it is read at once. On the CPU the lagged path is
forced (``HostScalar(lagged=True)``); the pinned copy itself runs only on CUDA."""

import pytest
import torch
from lightning import Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint

from dgkit.data import DomainDataModule
from dgkit.data.mnist import RotatedMNIST
from dgkit.divergence import DivergenceCheck
from dgkit.errors import DGKitError
from dgkit.host_scalar import HostScalar
from dgkit.module import DGModule
from dgkit_algorithms.erm import ERM


def test_unlagged_readings_come_back_at_once():
    scalar = HostScalar(lagged=False)
    assert scalar.push(torch.tensor(1.5), 3) == (1.5, 3)
    assert scalar.flush() is None


def test_lagged_readings_come_back_at_the_next_push_or_flush():
    scalar = HostScalar(lagged=True)
    value = torch.tensor(2.0)
    assert scalar.push(value, 0) is None
    value += 1  # the reading is a copy, not a view of the step's tensor
    assert scalar.push(torch.tensor(5.0), 1) == (2.0, 0)
    assert scalar.flush() == (5.0, 1)
    assert scalar.flush() is None


def test_by_default_only_cuda_tensors_are_lagged():
    assert HostScalar().push(torch.tensor(0.25), 7) == (0.25, 7)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the pinned copy needs CUDA")
def test_a_cuda_reading_arrives_through_pinned_memory():
    scalar = HostScalar()
    assert scalar.push(torch.tensor(3.0, device="cuda"), 0) is None
    assert scalar.push(torch.tensor(4.0, device="cuda"), 1) == (3.0, 0)
    assert scalar.flush() == (4.0, 1)


def _fit(lagged: bool, loss_at, max_steps: int, callbacks=()) -> str:
    """The error a short ERM run stops with, its loss at step ``s`` replaced by ``loss_at(s, loss)``."""

    class Scripted(ERM):
        calls = 0  # one call a step (automatic optimization): the step's number

        def training_loss(self, batch):
            loss = loss_at(self.calls, super().training_loss(batch))
            self.calls += 1
            return loss

    seed_everything(0)
    data = DomainDataModule(RotatedMNIST(), batch_size=8)
    model = DGModule(algorithm=Scripted, task=data.task, backbone="mlp")
    model._host_loss = HostScalar(lagged=lagged)
    checkpoints = any(isinstance(c, ModelCheckpoint) for c in callbacks)
    trainer = Trainer(max_steps=max_steps, limit_val_batches=0, logger=False,
                      enable_checkpointing=checkpoints, enable_progress_bar=False,
                      enable_model_summary=False, callbacks=list(callbacks))
    with pytest.raises(DGKitError) as error:
        trainer.fit(model, datamodule=data)
    return str(error.value)


@pytest.mark.parametrize("at", [2, 4])  # 4: the last step, found when training ends
def test_a_lagged_non_finite_loss_stops_the_run_at_the_same_step(at):
    def loss_at(step, loss):
        return loss * float("nan") if step == at else loss

    at_once, lagged = _fit(False, loss_at, at + 1), _fit(True, loss_at, at + 1)
    assert f"non-finite loss (nan) at step {at}." in at_once
    assert lagged == at_once


def test_a_lagged_divergence_is_reported_at_the_same_step():
    def loss_at(step, loss):
        return loss * 1e6 if step >= 5 else loss

    at_once = _fit(False, loss_at, 40, [DivergenceCheck(factor=100, patience=3)])
    lagged = _fit(True, loss_at, 40, [DivergenceCheck(factor=100, patience=3)])
    assert "training diverged" in at_once and "for 3 steps" in at_once and "at step 7," in at_once
    assert lagged == at_once


def test_no_checkpoint_holds_the_weights_a_lagged_non_finite_loss_produced(tmp_path):
    def loss_at(step, loss):
        return loss * float("nan") if step == 2 else loss

    every_step = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=1, save_top_k=-1)
    error = _fit(True, loss_at, 6, [every_step])
    assert "non-finite loss (nan) at step 2." in error
    # Step 2's update is in the weights after it: the checkpoint of step 3 would hold them.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch=0-step=1.ckpt", "epoch=0-step=2.ckpt"]
