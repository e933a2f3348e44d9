"""A real Slurm cluster (``.ci/slurm-up`` starts a single-node one): the sbatch template
run with srun and two DDP tasks, requeued by its pre-emption signal and resumed to the
uninterrupted run's result; and the job array of ``dgkit sweep --slurm``.

Where no cluster answers, the tests skip, except under CI (``CI=true``), which must run them.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from e2e.command import DGKIT, environment, results, steps_logged, wait_for

ROOT = Path(__file__).resolve().parents[2]
TEMPLATE = ROOT / "configs" / "slurm" / "single_node.sbatch"
pytestmark = [pytest.mark.slurm, pytest.mark.slow]


def _cluster_up() -> bool:
    if shutil.which("sbatch") is None or shutil.which("sinfo") is None:
        return False
    try:
        state = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return state.returncode == 0 and bool(re.search(r"idle|mixed|allocated", state.stdout))


@pytest.fixture(scope="module", autouse=True)
def cluster():
    if not _cluster_up():
        if os.environ.get("CI") == "true":
            pytest.fail("no Slurm cluster answers; CI starts one with .ci/slurm-up")
        pytest.skip("no Slurm cluster here (.ci/slurm-up starts a single-node one, as root)")


def _env() -> dict[str, str]:
    env = environment()
    env["PATH"] = f"{Path(DGKIT).parent}{os.pathsep}{env['PATH']}"  # srun runs this dgkit
    return env


def sbatch(*args: str, cwd: Path) -> str:
    out = subprocess.run(["sbatch", "--parsable", *args], cwd=cwd, capture_output=True, text=True,
                         env=_env(), timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().split(";")[0]


def _show(job: str) -> str:
    return subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True, timeout=30).stdout


def job_state(job: str) -> str:
    match = re.search(r"JobState=(\w+)", _show(job))
    return match.group(1) if match else "GONE"


def wait_job(job: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = job_state(job)
        if state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
            return state
        time.sleep(2)
    raise AssertionError(f"job {job} still {job_state(job)} after {timeout} s")


# Two tasks on the node (one DDP rank each, started by srun), one CPU each, no GPU.
CPU_JOB = ["--ntasks-per-node=2", "--cpus-per-task=1", "--gres=none", "--time=00:20:00"]
FIT = ["--trainer.accelerator", "cpu", "--trainer.max_steps", "400", "--model.backbone", "mlp",
       "--model.dropout", "0.2", "--last_checkpoint.every_n_steps", "1000",
       "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


def test_a_signalled_job_requeues_and_resumes_to_the_uninterrupted_result(tmp_path):
    signalled, whole = tmp_path / "signalled", tmp_path / "whole"
    signalled.mkdir()
    whole.mkdir()
    job = sbatch(*CPU_JOB, str(TEMPLATE), *FIT, cwd=signalled)
    run = signalled / "runs" / "version_0"
    # metrics.csv is written at each validation: signal the job some epochs in.
    wait_for(lambda: steps_logged(run) >= 30, timeout=300, what="the job to pass step 30")
    # What Slurm does before the time limit (--signal=SIGUSR1@90), sent now.
    subprocess.run(["scancel", "--signal=USR1", job], check=True, timeout=30)
    # The uninterrupted twin, queued behind it.
    twin = sbatch(*CPU_JOB, str(TEMPLATE), *FIT, cwd=whole)
    # dgkit requeued the job itself; Slurm holds a requeued job about two minutes (its begin
    # time), which the test need not wait for.
    wait_for(lambda: "Restarts=1" in _show(job) and "JobState=PENDING" in _show(job), timeout=300,
             what="the job to be requeued")
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], check=True, timeout=30)
    assert wait_job(twin, 900) == "COMPLETED", (whole / f"slurm-dgkit-{twin}.out").read_text()[-3000:]
    state = wait_job(job, 900)
    log = (signalled / f"slurm-dgkit-{job}.out").read_text()
    assert state == "COMPLETED", log[-3000:]
    assert "requeued, it resumes from there" in log and "resuming the unfinished run" in log
    assert results(run)["domains"] == results(whole / "runs" / "version_0")["domains"]
    assert sorted(p.name for p in (signalled / "runs").iterdir()) == ["version_0"]


def test_the_sweep_job_array_finishes_every_run(tmp_path):
    sweep = tmp_path / "sweep"
    made = subprocess.run(
        [DGKIT, "sweep", "--dir", str(sweep), "--algos", "erm", "sam", "--test-domains", "0", "75",
         "--slurm", "--sbatch=--cpus-per-task=1", "--sbatch=--ntasks=1", "--sbatch=--time=00:20:00",
         "--", "--trainer.max_steps", "5", "--model.backbone", "mlp", "--data.track_test", "true",
         "--trainer.enable_progress_bar", "false"],
        cwd=tmp_path, capture_output=True, text=True, env=_env(), timeout=120)
    assert made.returncode == 0, made.stderr
    assert "4 runs; submit with: sbatch" in made.stdout
    array = sbatch(str(sweep / "sweep.sbatch"), cwd=tmp_path)
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        queued = subprocess.run(["squeue", "-h", "-j", array], capture_output=True, text=True).stdout
        if not queued.strip():
            break
        time.sleep(3)
    finished = sorted(p.parents[2].relative_to(sweep).as_posix()
                      for p in sweep.rglob("runs/version_*/test_results.json"))
    assert len(finished) == 4, (finished, [p.read_text()[-1500:] for p in sweep.glob("slurm-*.out")])
    report = subprocess.run([DGKIT, "report", str(sweep)], cwd=tmp_path, capture_output=True, text=True,
                            env=_env(), timeout=300)
    assert report.returncode == 0, report.stderr
    assert "| ERM |" in report.stdout and "| SAM |" in report.stdout
