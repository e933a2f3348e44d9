"""SIGTERM and SIGINT: a checkpoint at the next batch boundary, exit 143 / 130, one line
saying that the same command resumes, and the resumed run ends as an uninterrupted one."""

from __future__ import annotations

import signal

import pytest

from e2e.command import QUIET, dgkit, interrupt, results, start, steps_logged, wait_for

ARGS = ["fit", "--trainer.max_steps=400", "--model.backbone=mlp", "--model.dropout=0.2",
        "--last_checkpoint.every_n_steps=1000", *QUIET]  # no periodic checkpoint: only the signal's


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("whole")
    result = dgkit(*ARGS, cwd=folder)
    assert result.code == 0, result.text[-3000:]
    return results(folder / "runs" / "version_0")


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_checkpoints_stops_non_zero_and_the_same_command_resumes(signum, code, tmp_path,
                                                                         uninterrupted):
    proc = start(*ARGS, cwd=tmp_path)
    run = tmp_path / "runs" / "version_0"
    # metrics.csv is written at each validation (every 20 steps): signal after the second.
    wait_for(lambda: steps_logged(run) >= 30, what="training to pass step 30")
    returncode, _, err = interrupt(proc, signum)
    assert returncode == code, err[-3000:]
    name = signal.Signals(signum).name
    line = next(line for line in err.splitlines() if line.startswith(f"dgkit: {name} received"))
    assert "run the same command again to resume" in line and "last.ckpt" in line
    assert (run / "checkpoints" / "last.ckpt").is_file() and not (run / "test_results.json").exists()
    assert "Traceback" not in err
    stopped_at = int(line.split("stopped at step ")[1].split()[0])
    assert 30 <= stopped_at < 400
    resumed = dgkit(*ARGS, cwd=tmp_path)
    assert resumed.code == 0, resumed.text[-3000:]
    assert "resuming the unfinished run" in resumed.err
    assert results(run)["domains"] == uninterrupted["domains"]


def test_sigterm_after_training_exits_143_and_the_same_command_finishes(tmp_path, uninterrupted):
    """Outside training (here: while testing) there is nothing new to checkpoint; the
    run stays unfinished and the same command tests it."""
    args = [a for a in ARGS if not a.startswith("--trainer.max_steps")] + ["--trainer.max_steps=20"]
    # One image per test batch through the CNN: testing takes a while; signal it there.
    slow_test = [*args, "--data.eval_batch_size=1", "--model.backbone=mnist_cnn"]
    proc = start(*slow_test, cwd=tmp_path)
    run = tmp_path / "runs" / "version_0"
    wait_for(lambda: (run / "checkpoints" / "last.ckpt").exists() and not (run / ".running").exists(),
             what="training to end")
    returncode, _, err = interrupt(proc, signal.SIGTERM)
    assert returncode == 143, err[-3000:]
    assert "dgkit: error: SIGTERM received outside training" in err and "Traceback" not in err
    again = dgkit(*slow_test, cwd=tmp_path)
    assert again.code == 0 and (run / "test_results.json").is_file(), again.text[-3000:]
