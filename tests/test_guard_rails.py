"""Runs that go wrong say what went wrong, where, and what to do: a non-finite loss, running
out of memory, a plugin raising in its own code, a config file with an unknown key, a
checkpoint of another algorithm."""

import functools

import pytest
import torch
from helpers import inside, run_cli
from lightning import Callback, Trainer, seed_everything

from dgkit.cli import main
from dgkit.data import DomainDataModule
from dgkit.data.mnist import RotatedMNIST
from dgkit.divergence import DivergenceCheck
from dgkit.errors import ConfigError
from dgkit.module import DGModule
from dgkit_algorithms.erm import ERM
from dgkit_algorithms.sam import SAM

QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]
SHORT = ["--model.backbone", "mlp", "--data.batch_size", "8", "--trainer.max_steps", "3",
         "--trainer.limit_val_batches", "1", *QUIET]


def _run(argv, capsys) -> tuple[int, str]:
    code, _, err = run_cli(argv, capsys)
    return code, " ".join(err.split())


def test_non_finite_loss_names_the_step_and_the_algorithm(capsys):
    code, err = _run(["fit", "--algo", "erm", *SHORT, "--model.optimizer", "SGD",
                      "--model.optimizer.lr", "1e30"], capsys)
    assert code == 2
    assert "ERM produced a non-finite loss" in err and "at step" in err
    assert "Lower the learning rate" in err and "Traceback" not in err


def test_out_of_memory_names_the_batch_size_and_the_fix(capsys, monkeypatch):
    def exhausted(self, batch):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
    monkeypatch.setattr(ERM, "training_loss", exhausted)
    code, err = _run(["fit", "--algo", "erm", *SHORT], capsys)
    assert code == 2
    assert ("out of memory on cpu with --data.batch_size 8 (8 per domain x 5 domain(s) = 40 images "
            "per step per device)") in err
    assert "Lower --data.batch_size" in err and "bf16-mixed" in err and "Traceback" not in err


def test_a_plugin_raising_in_its_own_code_is_named(installed_plugins, capsys):
    code, err = _run(["fit", "--algo", "smooth_erm", "--model.algorithm.smoothing", "1.5", *SHORT], capsys)
    assert code == 1
    assert "plugin 'example' (dgkit-example-plugin) raised ValueError in SmoothERM.__init__" in err
    assert "smoothing must be in [0, 1), got 1.5" in err and "Traceback" not in err


def test_config_file_with_an_unknown_key_names_it_and_the_closest(capsys, tmp_path):
    config = tmp_path / "cfg.yaml"
    config.write_text("trainer:\n  max_step: 5\n")
    code, err = _run(["fit", "--config", str(config)], capsys)
    assert code == 2
    assert "does not accept option 'trainer.max_step'. Did you mean 'trainer.max_steps'?" in err
    assert "usage:" not in err and "Traceback" not in err


@pytest.fixture(scope="module")
def erm_checkpoint(tmp_path_factory):
    with inside(tmp_path_factory.mktemp("erm")) as folder:
        main(["fit", "--algo", "erm", *SHORT])
    return folder / "runs/version_0/checkpoints/last.ckpt"


@pytest.mark.parametrize("command", ["test", "fit"])
def test_checkpoint_of_another_algorithm_is_refused(command, erm_checkpoint, capsys):
    code, err = _run([command, "--algo", "sam", "--ckpt_path", str(erm_checkpoint), *SHORT], capsys)
    assert code == 2
    assert f"ckpt_path: {erm_checkpoint} was written by erm, but --algo asks for sam" in err
    assert "--model.init_from" in err and "Traceback" not in err


def test_checkpoint_of_another_algorithm_is_refused_through_the_trainer_too(erm_checkpoint):
    from lightning import Trainer

    data = DomainDataModule(RotatedMNIST(), batch_size=8)
    model = DGModule(algorithm=SAM, task=data.task, backbone="mlp")
    trainer = Trainer(max_steps=4, logger=False, enable_progress_bar=False, limit_val_batches=0)
    with pytest.raises(ConfigError, match="was written by erm, but this run builds sam"):
        trainer.fit(model, datamodule=data, ckpt_path=erm_checkpoint)


class LossRatio(Callback):
    """The largest training loss over the first one, as DivergenceCheck measures it."""

    def __init__(self):
        self.start, self.worst = None, 0.0

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        loss = pl_module.last_loss[0]
        if self.start is None:
            self.start = max(abs(loss), 1.0)
        self.worst = max(self.worst, loss / self.start)


# The algorithms' defaults on Rotated MNIST (DivDis and D-BAT with unlabeled data, ITTA on
# its CNN, Bonsai over all its stages in the budget).
NORMAL = {"erm": {}, "sam": {}, "asam": {}, "udim": {"warmup_steps": 10}, "itta": {},
          "adanpc": {}, "drm": {}, "divdis": {}, "dbat": {}, "bonsai": {"stage_steps": [14, 13, 13]},
          "irm": {"anneal_steps": 20}, "vrex": {"anneal_steps": 20}, "groupdro": {}, "mixup": {},
          "coral": {}, "mmd": {}, "mldg": {}, "fish": {}, "dann": {}, "cdann": {}, "mtl": {}, "sagnet": {},
          "arm": {}, "rsc": {}, "sd": {}, "andmask": {}, "sandmask": {}, "iga": {},
          "ib_erm": {"ib_anneal_steps": 20}, "ib_irm": {"irm_anneal_steps": 20, "ib_anneal_steps": 20},
          "causirl_coral": {}, "causirl_mmd": {}, "eqrm": {"burnin_steps": 20}, "fishr": {"anneal_steps": 20},
          "selfreg": {}, "cad": {}, "condcad": {}, "urm": {}, "transfer": {}, "gsam": {}, "sagm": {},
          "miro": {}, "rdm": {"anneal_steps": 20}, "adrmx": {},
          "ermpp": {"linear_steps": 10, "sma_start": 20}, "trm": {"iters": 20}}


@pytest.mark.parametrize("alias", NORMAL)
def test_the_divergence_check_stays_quiet_on_every_algorithms_normal_run(alias):
    """Default lr (Adam 1e-3), 40 steps, the check on as the CLI sets it: it never fires,
    and no loss comes within a tenth of its limit."""
    from dgkit.plugins import registry

    seed_everything(0)
    data = DomainDataModule(RotatedMNIST(), batch_size=16,
                            unlabeled="source_holdout" if alias in ("divdis", "dbat") else "none")
    model = DGModule(algorithm=functools.partial(registry("algorithm").get(alias).obj, **NORMAL[alias]),
                     task=data.task, backbone="mnist_cnn" if alias in ("itta", "miro") else "mlp")
    ratio, check = LossRatio(), DivergenceCheck()
    steps = 12 if alias in ("itta", "miro") else 40  # ITTA's step is eight ERM steps; both a CNN
    trainer = Trainer(max_steps=steps, limit_val_batches=0, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, callbacks=[ratio, check])
    trainer.fit(model, datamodule=data)
    assert trainer.global_step == steps
    assert ratio.worst < check.factor / 10, ratio.worst
