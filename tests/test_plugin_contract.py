"""The Algorithm contract, exercised by a plugin that pip installs like any outside package."""

import functools
import os
import subprocess
import sys

import torch
from lightning import Trainer, seed_everything

from dgkit.cli import main
from dgkit.data import DomainDataModule
from dgkit.data.mnist import RotatedMNIST
from dgkit.module import DGModule


def test_dgkit_list_shows_the_installed_plugin_and_the_broken_one(installed_plugins):
    proc = subprocess.run([sys.executable, "-c", "from dgkit.cli import main; main(['list'])"],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "COLUMNS": "200"})
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    row = next(line for line in lines if " manual_erm " in line)
    assert "dgkit_example.ManualERM" in row and "dgkit-example-plugin" in row
    assert any(" erm " in line and " dgkit " in line for line in lines)
    assert "plugin 'broken' (dgkit-broken-plugin) failed to load" in " ".join(proc.stdout.split())


def _train(factory, steps: int = 4) -> DGModule:
    seed_everything(0)
    data = DomainDataModule(RotatedMNIST(), batch_size=16)
    model = DGModule(algorithm=factory, task=data.task)
    trainer = Trainer(max_steps=steps, limit_val_batches=0, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False)
    trainer.fit(model, datamodule=data)
    return model


def test_manual_and_automatic_optimization_take_identical_steps(installed_plugins):
    from dgkit_example import ManualERM, SmoothERM

    auto = _train(functools.partial(SmoothERM, smoothing=0.2))
    manual = _train(functools.partial(ManualERM, smoothing=0.2))
    assert not auto.algorithm.manual_optimization and manual.algorithm.manual_optimization
    for (name, a), (_, m) in zip(auto.algorithm.named_parameters(),
                                 manual.algorithm.named_parameters(), strict=True):
        torch.testing.assert_close(a, m, msg=f"{name} differs between the two paths")
    fresh = DGModule(algorithm=functools.partial(SmoothERM, smoothing=0.2),
                     task=auto.task)
    assert any(not torch.equal(a, f) for a, f in zip(auto.parameters(), fresh.parameters(), strict=True))


def test_plugin_algorithm_runs_through_the_cli_with_its_hyperparameters(installed_plugins,
                                                                         tmp_path):
    main(["fit", "--algo", "manual_erm", "--model.algorithm.smoothing", "0.3",
          "--trainer.max_steps", "3", "--trainer.limit_val_batches", "2",
          "--trainer.log_every_n_steps", "1",
          "--trainer.enable_progress_bar", "false"])
    (ckpt,) = tmp_path.glob("runs/version_0/checkpoints/last.ckpt")
    saved = torch.load(ckpt, weights_only=True)
    assert saved["hyper_parameters"]["algorithm"] == {
        "class_path": "dgkit_example.ManualERM", "init_args": {"smoothing": 0.3}}
    (state,) = saved["optimizer_states"]  # manual optimization still checkpoints its optimizer
    assert state["state"]
    metrics = (tmp_path / "runs/version_0/metrics.csv").read_text()
    assert "train/domains_seen" in metrics  # extra values an algorithm returns are logged
