"""What a run writes and where, what it prints, and what it keeps quiet about."""

from __future__ import annotations

import csv
import os
import stat
from pathlib import Path

from e2e.command import QUIET, dgkit, results

SHORT = ["--trainer.max_steps=25", "--model.backbone=mlp"]  # 20 steps an epoch: ends mid-epoch
NOISE = ("weights_only", "💡", "litlogger", "LeafSpec", "sync_dist", "`srun` command", "Traceback")


def test_a_default_run_writes_its_folder_validates_its_last_step_and_prints_no_noise(tmp_path):
    result = dgkit("fit", *SHORT, cwd=tmp_path)
    assert result.code == 0, result.text[-3000:]
    run = tmp_path / "runs" / "version_0"
    names = {p.relative_to(run).as_posix() for p in run.rglob("*") if p.is_file()}
    assert {"config.yaml", "metrics.csv", "hparams.yaml", "test_results.json",
            "checkpoints/last.ckpt"} <= names
    assert not (run / ".running").exists()  # the lock goes with the process
    # One table, once; the checkpoint it tested, by the path a user can open.
    assert result.out.count("test domain") == 1 and "│ 75 " in result.out
    best = [n for n in names if n.startswith("checkpoints/best-")]
    assert len(best) == 1 and f"checkpoint: runs/version_0/{best[0]}" in result.out
    for noise in NOISE:
        assert noise not in result.text, noise
    # Validated at the epoch end (step 20) and at the last step (25), so the tested
    # checkpoint is chosen among both.
    with open(run / "metrics.csv", newline="") as fh:
        validated = sorted({int(r["step"]) for r in csv.DictReader(fh) if r.get("val/accuracy")})
    assert validated == [19, 24], validated
    # Every file of the run with the mode the umask gives (no 0600 from temporary files).
    modes = {stat.S_IMODE((run / n).stat().st_mode) for n in names}
    umask = os.umask(0)
    os.umask(umask)
    assert modes == {0o666 & ~umask}, {n: oct(stat.S_IMODE((run / n).stat().st_mode)) for n in names}


def test_default_root_dir_moves_the_whole_run_and_evaluations_write_beside_it(tmp_path):
    result = dgkit("fit", *SHORT, *QUIET, "--trainer.default_root_dir", "elsewhere", cwd=tmp_path)
    assert result.code == 0, result.text[-3000:]
    run = tmp_path / "elsewhere" / "version_0"
    assert not (tmp_path / "runs").exists() and (run / "test_results.json").is_file()
    assert (run / "tensorboard").is_dir() and list((run / "checkpoints").glob("best-*.ckpt"))
    assert "checkpoint: elsewhere/version_0/checkpoints/best-" in result.out
    assert "results written to elsewhere/version_0/test_results.json" in result.err
    # Evaluating a checkpoint of the run writes into that run, not into a new one.
    ckpt = next((run / "checkpoints").glob("best-*.ckpt"))
    tested = dgkit("test", "--ckpt_path", str(ckpt), *QUIET, cwd=tmp_path)
    assert tested.code == 0, tested.text[-3000:]
    beside = run / f"test-{ckpt.stem}"
    assert results(beside)["domains"]["75"]["accuracy"] == results(run)["domains"]["75"]["accuracy"]
    assert sorted(p.name for p in (tmp_path / "elsewhere").iterdir()) == ["version_0"]
    predicted = dgkit("predict", "--ckpt_path", str(ckpt), *QUIET, cwd=tmp_path)
    assert predicted.code == 0 and (run / f"predict-{ckpt.stem}" / "predictions.pt").is_file()


def test_help_for_an_algorithm_lists_its_options_with_their_docs(tmp_path):
    result = dgkit("fit", "--algo", "sam", "--help", cwd=tmp_path)
    assert result.code == 0
    assert "Options of sam:" in result.out and "--model.algorithm.rho (default: 0.05)" in result.out
    assert "radius of the neighbourhood" in result.out


def test_the_same_command_twice_gives_the_same_metrics(tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    for folder in (first, second):
        folder.mkdir()
        assert dgkit("fit", *SHORT, *QUIET, cwd=folder).code == 0
    a, b = (results(f / "runs" / "version_0") for f in (first, second))
    assert a["domains"] == b["domains"]
    assert Path(first / "runs/version_0/metrics.csv").read_text() == \
        Path(second / "runs/version_0/metrics.csv").read_text()


def test_the_divergence_check_can_be_turned_off(tmp_path):
    result = dgkit("fit", "--model.optimizer.lr", "1e6", "--divergence.factor", "0", *SHORT, *QUIET,
                   cwd=tmp_path)
    assert result.code == 0 and "diverged" not in result.text, result.text[-3000:]


def test_sweep_over_every_domain(tmp_path):
    result = dgkit("sweep", "--dir", "s", "--algos", "erm", "--test-domains", "all", "--slurm", cwd=tmp_path)
    assert result.code == 0, result.text[-3000:]
    assert "6 runs; submit with: sbatch" in result.out  # Rotated MNIST's six domains
