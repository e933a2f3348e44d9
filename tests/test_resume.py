"""Killed runs resume to the same result: a SIGKILL mid-epoch, then the same command again;
Slurm's requeue signal (simulated: SLURM_* variables, SIGUSR1, a recording `scontrol`)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from dgkit.checkpoint_io import AtomicCheckpointIO

# Dropout and crafted-shift training draw random numbers every step; 12 batches an epoch.
FIT = ["-m", "dgkit.cli", "fit", "--data", "rotated_mnist", "--model.backbone", "mlp",
       "--model.dropout", "0.3", "--data.batch_size", "64", "--data.crafted_training", "[arithmetic]",
       "--trainer.max_steps", "30", "--trainer.check_val_every_n_epoch", "null",
       "--trainer.val_check_interval", "10", "--last_checkpoint.every_n_steps", "5",
       "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
SLURM = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "dgkit", "SLURM_NTASKS": "1",
         "SLURM_NTASKS_PER_NODE": "1", "SLURM_NNODES": "1", "SLURM_PROCID": "0",
         "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_NODELIST": "localhost"}


def _start(folder: Path, env: dict | None = None) -> subprocess.Popen:
    folder.mkdir(exist_ok=True)
    return subprocess.Popen([sys.executable, *FIT], cwd=folder, env={**os.environ, **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen) -> str:
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    return err


def _wait_for_checkpoint(folder: Path, step: int, proc: subprocess.Popen) -> int:
    path = folder / "runs/version_0/checkpoints/last.ckpt"
    while proc.poll() is None:
        if path.exists():  # written atomically: never half a file
            reached = torch.load(path, weights_only=True)["global_step"]
            if reached >= step:
                return reached
        time.sleep(0.1)
    raise AssertionError(f"the run ended before step {step}: {proc.stderr.read()[-2000:]}")


def _outcome(folder: Path) -> tuple[dict, pd.DataFrame]:
    results = json.loads((folder / "runs/version_0/test_results.json").read_text())
    metrics = pd.read_csv(folder / "runs/version_0/metrics.csv").groupby("step").first()
    return results["domains"], metrics


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    folder = tmp_path_factory.mktemp("uninterrupted")
    _finish(_start(folder))
    return _outcome(folder)


def test_a_run_killed_mid_epoch_resumes_to_the_same_metrics(uninterrupted, tmp_path):
    proc = _start(tmp_path)
    _wait_for_checkpoint(tmp_path, 15, proc)  # step 15 is in the second epoch
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "runs/version_0/test_results.json").exists()
    # What a kill during a checkpoint write leaves beside last.ckpt (dgkit.atomic's temp file).
    partial = tmp_path / "runs/version_0/checkpoints/.last.ckpt.k1ll3d.tmp"
    partial.write_bytes(b"PK\x03\x04 half a checkpoint")
    err = _finish(_start(tmp_path))  # the same command again
    assert "resuming the unfinished run runs/version_0" in " ".join(err.split())
    assert not partial.exists() and "removed 1 partial checkpoint file(s)" in err
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["version_0"]
    domains, metrics = _outcome(tmp_path)
    assert domains == uninterrupted[0]
    pd.testing.assert_frame_equal(metrics, uninterrupted[1])  # rows before the kill kept too


def test_slurm_requeue_signal_checkpoints_requeues_and_the_requeued_job_resumes(
        uninterrupted, tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"  # records what it was asked, as a cluster's would act on it
    scontrol.write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path / 'scontrol.log'}\n")
    scontrol.chmod(0o755)
    env = {**SLURM, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    run = tmp_path / "run"
    proc = _start(run, env)
    _wait_for_checkpoint(run, 5, proc)
    proc.send_signal(signal.SIGUSR1)
    err = _finish(proc)  # stops by itself, cleanly
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "4242"]
    assert "job 4242 requeued" in " ".join(err.split())
    step = torch.load(run / "runs/version_0/checkpoints/last.ckpt", weights_only=True)["global_step"]
    assert 5 <= step < 30
    assert not (run / "runs/version_0/test_results.json").exists()

    _finish(_start(run, env))  # the requeued job: the same command
    domains, metrics = _outcome(run)
    assert domains == uninterrupted[0]
    pd.testing.assert_frame_equal(metrics, uninterrupted[1])


def test_checkpoints_are_replaced_atomically(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"step": 1}, path)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt  # killed while writing
    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"step": 2}, path)
    assert torch.load(path, weights_only=True) == {"step": 1}  # the old file, whole
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no partial file left


def test_an_unfinished_run_is_resumed_only_when_no_live_process_holds_it(tmp_path):
    import socket

    import yaml

    from dgkit.resume import find_unfinished

    config = {"trainer": {"max_steps": 30, "logger": [{"class_path": "CSVLogger",
                                                       "init_args": {"save_dir": "runs", "version": 3}}]},
              "ckpt_path": None}
    run = tmp_path / "version_3"
    (run / "checkpoints").mkdir(parents=True)
    torch.save({"global_step": 5}, run / "checkpoints" / "last.ckpt")
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    again = {**config, "trainer": {**config["trainer"], "logger": [
        {"class_path": "CSVLogger", "init_args": {"save_dir": "runs", "version": None}}]}}
    assert find_unfinished(tmp_path, again) == (3, run / "checkpoints" / "last.ckpt")
    assert find_unfinished(tmp_path, {**again, "trainer": {"max_steps": 31}}) is None  # another config
    (run / ".running").write_text(f"{socket.gethostname()} {os.getpid()}")  # this test is alive
    assert find_unfinished(tmp_path, again) is None
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    (run / ".running").write_text(f"{socket.gethostname()} {dead}")  # killed: the lock is stale
    assert find_unfinished(tmp_path, again) == (3, run / "checkpoints" / "last.ckpt")
    (run / ".running").write_text(f"another-host {os.getpid()}")  # requeued elsewhere: stale
    assert find_unfinished(tmp_path, again) == (3, run / "checkpoints" / "last.ckpt")


@pytest.mark.parametrize(("minutes", "periodic"), [(1e-9, True), (10.0, False)])
def test_the_resume_checkpoint_interval_follows_from_the_time_of_the_first_steps(
        minutes, periodic, tmp_path, monkeypatch):
    from lightning import Trainer

    from dgkit.checkpointing import TIMED_STEPS, ResumeCheckpoint
    from dgkit.data import DomainDataModule
    from dgkit.data.mnist import RotatedMNIST
    from dgkit.module import DGModule
    from dgkit_algorithms import ERM

    saved: list[int] = []
    monkeypatch.setattr(ResumeCheckpoint, "save", lambda self, trainer: saved.append(trainer.global_step))
    callback = ResumeCheckpoint(every_n_minutes=minutes)
    data = DomainDataModule(RotatedMNIST(), batch_size=4)
    trainer = Trainer(max_steps=40, limit_val_batches=0, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, callbacks=[callback],
                      default_root_dir=tmp_path)
    trainer.fit(DGModule(algorithm=ERM, task=data.task, backbone="mlp"), datamodule=data)
    if periodic:  # a step takes far longer than 1e-9 minutes: a write every step once timed
        assert callback._interval == 1
        assert saved == [*range(TIMED_STEPS[1], 41), 40]  # ... and the final one
    else:  # ten minutes are thousands of these steps: only the final write
        assert callback._interval > 40 and saved == [40]
