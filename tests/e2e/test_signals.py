"""SIGTERM and SIGINT: a checkpoint at the next batch boundary, exit 143 / 130, one line
saying that the same command resumes, and the resumed run ends as an uninterrupted one."""

from __future__ import annotations

import signal
import time

import pytest

from e2e.command import QUIET, dgkit, interrupt, results, start, wait_for

ARGS = ["fit", "--trainer.max_steps=60", "--model.backbone=mlp", "--model.dropout=0.2",
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
    wait_for(lambda: (run / ".running").exists(), what="training to start")
    time.sleep(4)  # some steps in, not at a checkpoint boundary
    returncode, _, err = interrupt(proc, signum)
    assert returncode == code, err[-3000:]
    name = signal.Signals(signum).name
    line = next(line for line in err.splitlines() if line.startswith(f"dgkit: {name} received"))
    assert "run the same command again to resume" in line and "last.ckpt" in line
    assert (run / "checkpoints" / "last.ckpt").is_file() and not (run / "test_results.json").exists()
    assert "Traceback" not in err
    resumed = dgkit(*ARGS, cwd=tmp_path)
    assert resumed.code == 0, resumed.text[-3000:]
    assert "resuming the unfinished run" in resumed.err
    assert results(run)["domains"] == uninterrupted["domains"]
