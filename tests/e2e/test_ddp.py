"""Several processes through the command: ``--trainer.devices 2 --trainer.strategy ddp``
on the CPU (gloo), every built-in algorithm, the evaluation commands, and two node
processes rendezvousing over 127.0.0.1 as Lightning does on a cluster."""

from __future__ import annotations

import shutil
import socket
from pathlib import Path

import pytest

from e2e.command import QUIET, dgkit, environment, results, start

DDP = ["--trainer.accelerator=cpu", "--trainer.strategy=ddp"]
# Ten steps with one validation (the last step): the model tested is the one at step 10.
EQUAL = ["fit", "--trainer.max_steps=10", "--model.backbone=mlp", "--data.shuffle=false",
         "--model.optimizer=SGD", "--model.optimizer.lr=0.1", *QUIET]


def _table_once(result) -> None:
    assert result.code == 0, result.text[-3000:]
    assert result.out.count("held-out domains:") == 1, result.out  # the table, once
    assert result.err.count("results written to") == 1
    for noise in ("sync_dist", "Traceback", "weights_only"):
        assert noise not in result.text, noise


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> Path:
    """The run folder of one process on 16 images per domain."""
    folder = tmp_path_factory.mktemp("one")
    _table_once(dgkit(*EQUAL, "--data.batch_size=16", cwd=folder))
    return folder / "runs" / "version_0"


def test_two_devices_equal_one_device_on_the_same_global_batch(tmp_path, one_process):
    two = dgkit(*EQUAL, *DDP, "--trainer.devices=2", "--data.batch_size=8", cwd=tmp_path)
    _table_once(two)
    a, b = results(one_process), results(tmp_path / "runs" / "version_0")
    # The test split is padded to an even count across the two ranks (one sample at most).
    assert abs(a["domains"]["75"]["accuracy"] - b["domains"]["75"]["accuracy"]) < 0.005, (a, b)


# What some algorithms need to train at all in a few steps.
NEEDS = {"divdis": ["--data.unlabeled=source_holdout"], "dbat": ["--data.unlabeled=source_holdout"],
         "bonsai": ["--model.algorithm.rounds=1", "--model.algorithm.stage_steps=[2,2]"],
         "itta": ["--model.backbone=mnist_cnn"], "adanpc": ["--model.algorithm.k=10"]}
# Through the command: the algorithms whose runs differ in what the command does (stages and
# their files, test-time stages, head selection, unlabeled data, a wrapped base). The others,
# whose difference is the training step, share one process pair in
# tests/test_domainbed_zoo.py, which also checks that the ranks end with the same parameters.
ALGORITHMS = ["erm", "itta", "adanpc", "drm", "divdis", "dbat", "bonsai"]


@pytest.mark.slow
@pytest.mark.parametrize("alias", ALGORITHMS)
def test_every_algorithm_fits_and_tests_on_two_processes(alias, tmp_path):
    result = dgkit("fit", "--algo", alias, *DDP, "--trainer.devices=2", "--trainer.max_steps=4",
                   "--model.backbone=mlp", "--data.batch_size=8", "--data.eval_batch_size=64",
                   "--trainer.limit_val_batches=2", "--trainer.limit_test_batches=2",
                   *NEEDS.get(alias, []), *QUIET, cwd=tmp_path)
    _table_once(result)
    assert (tmp_path / "runs" / "version_0" / "test_results.json").is_file()
    if alias == "dbat":  # each member is a stage, kept beside the run's checkpoints
        kept = sorted(p.name for p in (tmp_path / "runs/version_0/checkpoints").glob("stage-*.ckpt"))
        assert kept == ["stage-member-0.ckpt", "stage-member-1.ckpt"], kept


@pytest.mark.parametrize("method", [["sma", "--model.averaging.start=3"], ["swad"]], ids=["sma", "swad"])
def test_averaging_on_two_processes_ends_as_on_one(method, tmp_path):
    """Every rank holds the same average: the two-process run averages the same steps (SWAD:
    the same valley, from validation losses reduced across ranks) as one process does."""
    args = [*EQUAL, "--trainer.max_steps=16", "--trainer.val_check_interval=2", "--model.averaging", *method]
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    one = dgkit(*args, "--data.batch_size=16", cwd=tmp_path / "one")
    _table_once(one)
    two = dgkit(*args, *DDP, "--trainer.devices=2", "--data.batch_size=8", cwd=tmp_path / "two")
    _table_once(two)
    a, b = results(tmp_path / "one" / "runs" / "version_0"), results(tmp_path / "two" / "runs" / "version_0")
    assert a["averaging"] == b["averaging"], (a["averaging"], b["averaging"])
    for metric in ("accuracy", "accuracy (last iterate)"):
        assert abs(a["domains"]["75"][metric] - b["domains"]["75"][metric]) < 0.005, (metric, a, b)


def test_a_fit_whose_ranks_trained_different_models_says_so(tmp_path):
    """An algorithm that sets gradients by hand and never averages them: the run finishes,
    and the command names the problem and the fix."""
    scripts = Path(__file__).parents[1] / "scripts"
    result = dgkit("fit", "--model.algorithm=unsynced_algorithm.Unsynced", *DDP, "--trainer.devices=2",
                   "--trainer.max_steps=4", "--model.backbone=mlp", "--data.batch_size=8",
                   "--trainer.limit_val_batches=2", "--trainer.limit_test_batches=2", *QUIET,
                   cwd=tmp_path, env=environment(PYTHONPATH=str(scripts)))
    assert result.code == 0, result.text[-3000:]
    assert result.err.count("the parameters differ across the 2 DDP ranks after training") == 1, result.err
    assert "Unsynced's update is not synchronized" in result.err
    assert "opt.average_gradients(params)" in result.err


def test_evaluation_commands_under_two_processes_write_beside_the_run(tmp_path, one_process):
    run = tmp_path / "runs" / "version_0"
    shutil.copytree(one_process, run)
    ckpt = next((run / "checkpoints").glob("best-*.ckpt"))
    tested = dgkit("test", "--ckpt_path", str(ckpt), *DDP, "--trainer.devices=2", *QUIET, cwd=tmp_path)
    _table_once(tested)
    assert abs(results(run / f"test-{ckpt.stem}")["domains"]["75"]["accuracy"]
               - results(run)["domains"]["75"]["accuracy"]) < 0.005
    for command in ("validate", "predict"):
        other = dgkit(command, "--ckpt_path", str(ckpt), *DDP, "--trainer.devices=2", *QUIET, cwd=tmp_path)
        assert other.code == 0 and "Traceback" not in other.text, other.text[-3000:]
    assert (run / f"predict-{ckpt.stem}" / "predictions.pt").is_file()
    assert sorted(p.name for p in run.parent.iterdir()) == ["version_0"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_node_processes_train_like_two_devices_on_one_node(tmp_path):
    (tmp_path / "single").mkdir()
    (tmp_path / "nodes").mkdir()
    single = dgkit(*EQUAL, *DDP, "--trainer.devices=2", "--data.batch_size=8", cwd=tmp_path / "single")
    _table_once(single)
    port = str(_free_port())
    nodes = [start(*EQUAL, *DDP, "--trainer.devices=1", "--trainer.num_nodes=2", "--data.batch_size=8",
                   cwd=tmp_path / "nodes",
                   env=environment(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, NODE_RANK=str(rank)))
             for rank in (0, 1)]
    outputs = [node.communicate(timeout=600) for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], [err[-2000:] for _, err in outputs]
    assert outputs[0][0].count("held-out domains:") == 1 and "held-out domains:" not in outputs[1][0]
    a = results(tmp_path / "single" / "runs" / "version_0")
    b = results(tmp_path / "nodes" / "runs" / "version_0")
    assert a["domains"] == b["domains"]
