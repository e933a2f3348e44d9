"""Manual optimization under DDP: 2 CPU processes (gloo) against 1 process on the same global batch."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).with_name("ddp_train.py")


def _run(tmp_path: Path, name: str, devices: int, batch_size: int, algo: str = "sam",
         hparams: str = "{}", *extra: str) -> list[dict] | None:
    out = tmp_path / name
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--algo", algo, "--devices", str(devices),
         "--batch-size", str(batch_size), "--hparams", hparams, "--out", str(out), *extra],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    if "," in algo:
        return None
    return [torch.load(f"{out}.rank{r}", weights_only=True) for r in range(devices)]


def _max_diff(a: dict, b: dict) -> float:
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """One process, 2 x 8 samples per domain per step: the global batch of two devices."""
    (state,) = _run(tmp_path_factory.mktemp("single"), "single", devices=1, batch_size=16)
    return state


def test_synced_sam_on_two_devices_equals_one_device_on_the_global_batch(single, tmp_path):
    ranks = _run(tmp_path, "synced", devices=2, batch_size=8,
                 hparams="{'sync_perturbation': True}")
    assert _max_diff(ranks[0], ranks[1]) == 0.0
    assert _max_diff(ranks[0], single) < 1e-5


def test_local_perturbation_differs_but_final_gradients_are_synced(single, tmp_path):
    ranks = _run(tmp_path, "local", devices=2, batch_size=8)
    assert _max_diff(ranks[0], ranks[1]) == 0.0  # the SAM gradient was all-reduced once
    assert _max_diff(ranks[0], single) > 1e-4  # each device perturbed with its own gradient


def test_erm_on_two_devices_equals_one_device_on_the_global_batch(tmp_path):
    (single,) = _run(tmp_path, "erm1", devices=1, batch_size=16, algo="erm")
    ranks = _run(tmp_path, "erm2", devices=2, batch_size=8, algo="erm")
    assert _max_diff(ranks[0], single) < 1e-5


def test_udim_merged_gradient_is_synced_once(tmp_path):
    ranks = _run(tmp_path, "udim", devices=2, batch_size=8, algo="udim",
                 hparams="{'warmup_steps': 1}")
    assert _max_diff(ranks[0], ranks[1]) == 0.0


def test_adanpc_memory_is_gathered_so_two_devices_test_like_one(tmp_path):
    """Each device predicts its half of every test batch, then all confident rows enter
    every device's memory: the same stream as one device with the whole batch."""
    hparams = "{'k': 10, 'beta': 0.5}"
    _run(tmp_path, "one", 1, 16, "adanpc", hparams, "--test", "--eval-batch-size", "64")
    _run(tmp_path, "two", 2, 8, "adanpc", hparams, "--test", "--eval-batch-size", "32")
    one = torch.load(tmp_path / "one.test", weights_only=True)
    two = torch.load(tmp_path / "two.test", weights_only=True)
    assert abs(one["test/accuracy"] - two["test/accuracy"]) < 1e-3, (one, two)  # < 1 sample
    assert abs(one["test_unadapted/accuracy"] - two["test_unadapted/accuracy"]) < 0.005


OTHERS = ["asam", "itta", "divdis", "dbat", "drm", "bonsai"]


def test_every_other_algorithm_trains_and_tests_under_ddp_with_ranks_in_sync(tmp_path):
    """Two CPU processes, one fit and test per algorithm: gradients (and ITTA's test-time
    updates) are averaged across ranks, so both ranks end with the same parameters. D-BAT
    and Bonsai train one network at a time: DDP looks for the idle parameters."""
    _run(tmp_path, "all", 2, 8, ",".join(OTHERS), "{}", "--test", "--limit-test-batches", "2")
    for alias in OTHERS:
        rank0, rank1 = (torch.load(tmp_path / f"all.{alias}.rank{r}", weights_only=True) for r in (0, 1))
        assert all(torch.equal(rank0[k], rank1[k]) for k in rank0), alias
        assert (tmp_path / f"all.{alias}.test").exists(), alias
