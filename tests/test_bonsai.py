"""Bonsai (Rich Feature Construction): rounds, synthesis, per-round selection, stage
checkpoints, kill-and-resume, and starting any algorithm from its representation."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import make_task

from dgkit.algorithm import Batch, Progress
from dgkit.cli import main
from dgkit.errors import ConfigError
from dgkit.module import DGModule
from dgkit.networks import Backbone, Featurizer
from dgkit.plugins import registry
from dgkit.representation import load_representation
from dgkit_algorithms import Bonsai

TASK = make_task((2, 28, 28), 2)
HERE = Path(__file__).parent


def _batch(n: int = 64) -> Batch:
    g = torch.Generator().manual_seed(0)
    return Batch(torch.rand(n, 2, 28, 28, generator=g), torch.randint(0, 2, (n,), generator=g),
                 torch.zeros(n, dtype=torch.long))


def _at(algo: Bonsai, step: int, total: int = 30) -> Bonsai:
    algo.progress = Progress(step=step, total_steps=total)
    algo.zero_grad(set_to_none=True)
    return algo.train()


def test_later_rounds_minimize_the_worst_group_of_earlier_mistakes():
    algo, batch = Bonsai(TASK, Backbone(), rounds=3), _batch()
    algo.progress.total_steps = 40  # four stages of 10 steps
    assert [algo.stage_name() for algo.progress.step in (0, 9, 10, 19, 20, 30, 39)] == [
        "discovery-0", "discovery-0", "discovery-1", "discovery-1", "discovery-2", "synthesis",
        "synthesis"]
    out = _at(algo, 15, total=40).training_loss(batch)
    with torch.no_grad():
        right = algo.discovered[0](batch.x).argmax(1) == batch.y
        per_sample = F.cross_entropy(algo.discovered[1](batch.x), batch.y, reduction="none")
    worst = max(per_sample[right].mean(), per_sample[~right].mean())
    assert out["loss"].item() == pytest.approx(worst.item(), rel=1e-5)
    out["loss"].backward()
    grads = [[p.grad is not None for p in net.parameters()] for net in algo.discovered]
    assert not any(grads[0]) and all(grads[1]) and not any(grads[2])  # only the current round
    assert not algo.discovered[0].training  # finished rounds are fixed functions


def test_synthesis_distils_every_round_and_exports_the_averaged_head():
    torch.manual_seed(0)  # the networks' draws too: the check needs rounds that disagree somewhere
    algo, batch = Bonsai(TASK, Backbone(), rounds=2), _batch()
    for net in algo.discovered:  # rounds that disagree on some samples, as trained ones do
        torch.nn.init.normal_(net[1].weight, std=5.0)
    out = _at(algo, 25).training_loss(batch)
    out["loss"].backward()
    assert all(p.grad is not None for p in algo.featurizer.parameters())
    assert all(p.grad is None for net in algo.discovered for p in net.parameters())
    with torch.no_grad():
        targets = torch.stack([net(batch.x).argmax(1) for net in algo.discovered], 1)
        z = algo.featurizer(batch.x)
        logits = algo.task_heads(z).view(len(z), 2, 2)
        assert torch.allclose(algo(batch.x), logits.mean(1), atol=1e-6)
    correct = targets == batch.y[:, None]
    agree = correct.all(1) | (~correct).all(1)
    assert 0 < agree.sum() < len(agree)
    ce = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view(-1, 2).mean(1)
    balanced = 0.5 * ce[agree].mean() + 0.5 * ce[~agree].mean()  # both halves weigh the same
    assert out["loss"].item() == pytest.approx(balanced.item(), rel=1e-5)
    state = algo.state_dict()  # the exported classifier is the mean of the task heads
    assert torch.allclose(state["classifier.weight"], algo.task_heads.weight.view(2, 2, -1).mean(0))


def test_each_round_keeps_its_best_validation_weights():
    algo = Bonsai(TASK, Backbone(), rounds=2)
    _at(algo, 3)
    algo.on_validation_metrics({"val/accuracy_head0": 0.8})
    best = {k: v.clone() for k, v in algo.discovered[0].state_dict().items()}
    with torch.no_grad():
        for p in algo.discovered[0].parameters():
            p.add_(1.0)  # training went on and got worse
    algo.on_validation_metrics({"val/accuracy_head0": 0.7})
    algo.end_stage("discovery-0")
    assert all(torch.equal(v, best[k]) for k, v in algo.discovered[0].state_dict().items())
    assert algo.snapshot_score.item() == float("-inf")  # the next round selects afresh


def _fit_bonsai(*extra: str) -> list[str]:
    return ["fit", "--algo", "bonsai", "--data", "colored_mnist", "--model.backbone", "mlp",
            "--model.algorithm.stage_steps", "[10, 10, 10]", "--trainer.max_steps", "30",
            "--data.batch_size", "32", "--trainer.enable_progress_bar", "false",
            "--trainer.val_check_interval", "4", "--checkpoint.every_n_train_steps", "4", *extra]


def test_cli_keeps_every_round_and_erm_starts_from_the_synthesis(tmp_path, caplog):
    main(_fit_bonsai())
    run = next(tmp_path.glob("runs/version_0"))
    results = json.loads((run / "test_results.json").read_text())
    assert [s["stage"] for s in results["stages"]] == ["discovery-0", "discovery-1", "synthesis"]
    assert [s["step"] for s in results["stages"]] == [10, 20, 30]
    for stage in results["stages"]:
        assert Path(stage["checkpoint"]).is_file()
    assert {"accuracy_head0", "accuracy_head1", "accuracy_head2"} <= set(results["domains"]["-90%"])

    synthesis = results["stages"][-1]["checkpoint"]
    main(["fit", "--algo", "erm", "--data", "colored_mnist", "--model.backbone", "mlp",
          "--model.init_from", synthesis, "--model.freeze_featurizer", "true",
          "--trainer.max_steps", "5", "--trainer.enable_progress_bar", "false"])
    erm = json.loads((tmp_path / "runs/version_1/test_results.json").read_text())
    assert erm["init_from"]["featurizer_from"] == "algorithm.featurizer"
    assert erm["init_from"]["featurizer_into"] == ["featurizer"]
    assert erm["init_from"]["classifier_into"] == ["classifier"] and erm["init_from"]["frozen"]
    assert ("loaded into featurizer; classifier (algorithm.classifier) into classifier; "
            "featurizer frozen") in caplog.text
    exported = torch.load(synthesis, weights_only=True)["state_dict"]
    trained = torch.load(tmp_path / "runs/version_1/checkpoints/last.ckpt", weights_only=True)["state_dict"]
    feature_keys = [k for k in trained if k.startswith("algorithm.featurizer.")]
    assert feature_keys and all(torch.equal(trained[k], exported[k]) for k in feature_keys)


def test_a_run_killed_in_a_discovery_round_resumes_in_that_round(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "dgkit.cli", *_fit_bonsai()]
    killed = subprocess.run([*command, "--trainer.callbacks+=helpers.KillAtStep",
                             "--trainer.callbacks.step", "14"], env=env, capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    checkpoints = tmp_path / "runs/version_0/checkpoints"
    last = torch.load(checkpoints / "last.ckpt", weights_only=True)
    assert last["global_step"] == 12 and last["dgkit_stages"]["current"] == "discovery-1"
    assert not (tmp_path / "runs/version_0/test_results.json").exists()

    resumed = subprocess.run([*command, "--ckpt_path", str(checkpoints / "last.ckpt")], env=env,
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    results = json.loads((tmp_path / "runs/version_1/test_results.json").read_text())
    assert [(s["stage"], s["step"]) for s in results["stages"]] == [
        ("discovery-0", 10), ("discovery-1", 20), ("synthesis", 30)]
    # Round 0 was not trained again: its network is the one kept when it finished.
    round0 = torch.load(checkpoints / "stage-discovery-0.ckpt", weights_only=True)["state_dict"]
    final = torch.load(results["stages"][-1]["checkpoint"], weights_only=True)["state_dict"]
    keys = [k for k in round0 if k.startswith("algorithm.discovered.0.")]
    assert keys and all(torch.equal(round0[k], final[k]) for k in keys)


@pytest.fixture(scope="module")
def bonsai_checkpoint(tmp_path_factory) -> Path:
    model = DGModule(algorithm=Bonsai, task=TASK, backbone="mnist_cnn")
    path = tmp_path_factory.mktemp("bonsai") / "bonsai.ckpt"
    checkpoint = {"state_dict": model.state_dict()}
    model.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, path)
    return path


@pytest.mark.parametrize("alias", [e.alias for e in registry("algorithm")])
def test_every_algorithm_starts_from_a_bonsai_representation(alias, bonsai_checkpoint):
    task = dataclasses.replace(TASK, unlabeled="source_holdout")  # DivDis, D-BAT need them
    algorithm = registry("algorithm").get(alias).obj(task, Backbone("mnist_cnn"))
    if alias == "arm":  # its featurizer reads the image plus a context channel: another input
        with pytest.raises(ConfigError, match=r"model\.init_from.*does not fit"):
            load_representation(algorithm, bonsai_checkpoint, freeze=True)
        return
    report = load_representation(algorithm, bonsai_checkpoint, freeze=True)
    exported = torch.load(bonsai_checkpoint, weights_only=True)["state_dict"]
    featurizers = [m for m in algorithm.modules() if isinstance(m, Featurizer)]
    assert featurizers and len(report["featurizer_into"]) == len(featurizers)
    for featurizer in featurizers:
        for name, value in featurizer.state_dict().items():
            assert torch.equal(value, exported[f"algorithm.featurizer.{name}"])
        assert not any(p.requires_grad for p in featurizer.parameters())
    for name in report["classifier_into"]:
        head = algorithm.get_submodule(name)
        assert torch.equal(head.weight, exported["algorithm.classifier.weight"])


def test_init_from_a_different_backbone_names_the_mismatch(bonsai_checkpoint, tmp_path):
    with pytest.raises(ConfigError, match=r"model\.init_from.*does not fit.*--model\.backbone"):
        load_representation(registry("algorithm").get("erm").obj(TASK, Backbone("mlp")),
                            bonsai_checkpoint)
    with pytest.raises(ConfigError, match="no checkpoint at"):
        load_representation(registry("algorithm").get("erm").obj(TASK, Backbone("mlp")),
                            tmp_path / "missing.ckpt")
