"""dgkit's default progress bar reads the logged metrics (a host-device sync each on an
accelerator) at most every ``metrics_interval`` seconds in training batches, and fresh at the
epoch's end, so the values it ends on are the run's."""

import pytest
from lightning import Trainer, seed_everything
from lightning.pytorch.callbacks import RichProgressBar

from dgkit.data import DomainDataModule
from dgkit.data.mnist import RotatedMNIST
from dgkit.module import DGModule
from dgkit.progress import ThrottledProgressBar
from dgkit_algorithms.erm import ERM


def _reads(monkeypatch, interval: float) -> tuple[int, ThrottledProgressBar, Trainer]:
    reads = []
    read = RichProgressBar.get_metrics

    def counted(self, trainer, pl_module):
        reads.append(trainer.global_step)
        return read(self, trainer, pl_module)

    monkeypatch.setattr(RichProgressBar, "get_metrics", counted)
    seed_everything(0)
    data = DomainDataModule(RotatedMNIST(), batch_size=8)
    bar = ThrottledProgressBar(metrics_interval=interval)
    trainer = Trainer(max_steps=30, limit_val_batches=0, logger=False, enable_checkpointing=False,
                      enable_model_summary=False, callbacks=[bar])
    trainer.fit(DGModule(algorithm=ERM, task=data.task, backbone="mlp"), datamodule=data)
    return len(reads), bar, trainer


@pytest.mark.parametrize("interval", [0.0, 3600.0])
def test_metrics_are_read_at_the_interval_and_fresh_at_the_end(monkeypatch, interval):
    reads, bar, trainer = _reads(monkeypatch, interval)
    if interval:
        assert reads <= 3, reads  # the first batch, the epoch's end (and the train end)
    else:
        assert reads >= 30, reads  # every batch, as Lightning's own bar
    shown = bar.get_metrics(trainer, trainer.lightning_module)  # what the bar ended on
    assert shown["train/loss"] == trainer.lightning_module.last_loss[0]  # the last step's loss
    assert trainer.lightning_module.last_loss[1] == 29


def test_the_training_loss_is_logged_on_the_steps_the_logger_writes(tmp_path):
    """The module calls ``self.log`` only on the batches whose step metrics a logger writes;
    the logger's file holds the same steps and values as when it logged every batch."""
    from lightning.pytorch.loggers import CSVLogger

    seed_everything(0)
    data = DomainDataModule(RotatedMNIST(), batch_size=8)
    model = DGModule(algorithm=ERM, task=data.task, backbone="mlp")
    logged = []
    log = model.log

    def counted(name, *args, **kwargs):
        if name == "train/loss":
            logged.append(model.trainer.global_step)
        return log(name, *args, **kwargs)

    model.log = counted
    trainer = Trainer(max_steps=25, log_every_n_steps=5, limit_val_batches=0, enable_checkpointing=False,
                      enable_model_summary=False, enable_progress_bar=False,
                      logger=CSVLogger(tmp_path, name="", version=""))
    trainer.fit(model, datamodule=data)
    assert logged == [4, 9, 14, 19, 24]  # the optimizer steps done before each logged batch
    rows = (tmp_path / "metrics.csv").read_text().splitlines()
    steps = [int(r.split(",")[1]) for r in rows[1:] if r.split(",")[2]]
    assert steps == [4, 9, 14, 19, 24]
