"""What ``dgkit fit`` does after training and ``dgkit test``/``predict`` after evaluating:
test the selected checkpoint, print the results table and write the results files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning import LightningDataModule, Trainer
from rich.console import Console

from dgkit.module import DGModule
from dgkit.results import ResultsContributor, collect_results, print_results, write_results


def test_after_fit(trainer: Trainer, model: DGModule, datamodule: LightningDataModule, seed: Any) -> None:
    """Test the checkpoint chosen on validation (the weights at the end without one)."""
    if trainer.interrupted or trainer.fast_dev_run:
        return
    if any(getattr(c, "requeued", False) for c in trainer.callbacks):
        return  # stopped for a Slurm requeue: the requeued job finishes and tests
    best = trainer.checkpoint_callback
    own = [c.test_checkpoint for c in trainer.callbacks if getattr(c, "test_checkpoint", None)]
    if own:  # a component that ends with its own model (SWAD's average) tests it
        trainer.test(model, datamodule=datamodule, ckpt_path=own[0], verbose=False)
        report(trainer, model, ckpt_path=own[0], seed=seed, selection="the averaged model")
        return
    ckpt = "best" if best is not None and best.best_model_path else None
    trainer.test(model, datamodule=datamodule, ckpt_path=ckpt, verbose=False)
    extra = {"selection": f"best {best.monitor} ({best.mode})"} if best is not None and best.monitor else {}
    report(trainer, model, ckpt_path=best.best_model_path if ckpt else None, seed=seed, **extra)


def report(trainer: Trainer, model: DGModule, ckpt_path: str | None, seed: Any, **extra: Any) -> None:
    """Print the test results once and write ``test_results.json`` into the run folder,
    with what every component decided (stages, head and test-time choices, init_from)."""
    log_dir = trainer.log_dir  # a collective under DDP: every rank asks
    if not trainer.is_global_zero:
        return
    for callback in trainer.callbacks:
        if isinstance(callback, ResultsContributor):
            extra.update(callback.results_entries())
    scenario = getattr(trainer.datamodule, "test_scenario", None)
    if scenario is not None:
        extra["test_stream"] = scenario()
    results = collect_results(trainer.callback_metrics, model.task,
                              algorithm=type(model.algorithm).__name__, ckpt_path=ckpt_path, seed=seed,
                              transductive=model.task.transductive, **extra)
    print_results(results)
    if log_dir:
        path = write_results(results, Path(log_dir))
        Console(stderr=True).print(f"results written to {path}")


def save_predictions(trainer: Trainer) -> None:
    """``dgkit predict``: every batch's logits, predictions and domain, in the run folder."""
    predictions = trainer.predict_loop.predictions
    log_dir = trainer.log_dir  # a collective under DDP: every rank asks
    if not trainer.is_global_zero or not predictions or not log_dir:
        return
    path = Path(log_dir) / "predictions.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(predictions, path)
    Console(stderr=True).print(f"predictions written to {path}")
