"""Test-time methods over any trained model, through the command: ``dgkit test --ckpt_path
CKPT --tta METHOD`` on checkpoints of ERM, SAM, a zoo algorithm and an averaged model,
``dgkit fit --model.tta``, their settings and selection, the refusals, and two processes."""

from __future__ import annotations

from pathlib import Path

import pytest

from e2e.command import QUIET, dgkit, results

METHODS = ["bn", "tent", "t3a", "shot_im", "sar", "eata", "lame"]
FIT = ["fit", "--data=rotated_mnist", "--data.test_domains=[75]", "--model.backbone=mnist_cnn_bn",
       "--trainer.max_steps=20", "--data.batch_size=16", "--data.eval_batch_size=128", *QUIET]
RUNS = {"erm": ["--algo=erm"], "sam": ["--algo=sam"], "coral": ["--algo=coral"],
        "sma": ["--algo=erm", "--model.averaging=sma", "--model.averaging.start=10"]}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """The tested checkpoint of a short run of each, in its own run folder."""
    out = {}
    for name, options in RUNS.items():
        folder = tmp_path_factory.mktemp(name)
        fitted = dgkit(*FIT, *options, cwd=folder)
        assert fitted.code == 0, fitted.text[-3000:]
        out[name] = folder / results(folder / "runs" / "version_0")["ckpt_path"]
    return out


def _tested(result, ckpt: Path, method: str) -> dict:
    assert result.code == 0, result.text[-3000:]
    assert f"test-time method: {method} (" in result.out
    run = ckpt.parent.parent / f"test-{ckpt.stem}-{method}"
    tested = results(run)
    assert tested["test_time"]["method"] == method
    scores = tested["domains"]["75"]
    assert {"accuracy", "accuracy (no adaptation)"} <= set(scores), scores
    return tested


@pytest.mark.parametrize("method", METHODS)
def test_every_method_tests_an_erm_checkpoint_beside_the_unadapted_model(checkpoints, method, tmp_path):
    ckpt = checkpoints["erm"]
    tested = _tested(dgkit("test", "--ckpt_path", str(ckpt), "--tta", method, *QUIET, cwd=tmp_path),
                     ckpt, method)
    plain = results(ckpt.parent.parent)["domains"]["75"]["accuracy"]
    assert tested["domains"]["75"]["accuracy (no adaptation)"] == pytest.approx(plain, abs=1e-6)


@pytest.mark.parametrize(("run", "method"), [("sam", "tent"), ("coral", "t3a"), ("sma", "eata")])
def test_methods_test_sam_a_zoo_algorithm_and_an_averaged_model(checkpoints, run, method, tmp_path):
    ckpt = checkpoints[run]
    _tested(dgkit("test", "--ckpt_path", str(ckpt), "--tta", method, *QUIET, cwd=tmp_path), ckpt, method)


def test_a_method_s_settings_and_its_selection_on_source_validation(checkpoints, tmp_path):
    ckpt = checkpoints["erm"]
    result = dgkit("test", "--ckpt_path", str(ckpt), "--tta", "tent", "--model.tta.lr", "0.01",
                   "--model.tta_grid", "{steps: [1, 2]}", "--model.adaptation", "batch", *QUIET, cwd=tmp_path)
    tested = _tested(result, ckpt, "tent")
    assert tested["test_time"]["settings"]["lr"] == 0.01
    assert tested["test_time"]["reset"] == "batch"
    assert "; episodic: reset every batch" in result.out
    selection = tested["test_time_selection"]
    assert selection["chosen"]["steps"] in (1, 2) and len(selection["validation_accuracy"]) == 2


def test_fit_with_a_method_tests_the_adapted_and_the_unadapted_model(tmp_path):
    result = dgkit(*FIT, "--tta", "t3a", cwd=tmp_path)
    assert result.code == 0, result.text[-3000:]
    assert "accuracy (no adaptation)" in result.out and "test-time method: t3a" in result.out
    assert results(tmp_path / "runs" / "version_0")["test_time"]["method"] == "t3a"


def test_an_unknown_method_is_one_line_naming_the_known_ones(checkpoints, tmp_path):
    result = dgkit("test", "--ckpt_path", str(checkpoints["erm"]), "--tta", "tnet", *QUIET, cwd=tmp_path)
    assert result.code == 2
    line = result.error_line()
    assert "tnet" in line and "tent" in line


def test_bn_adaptation_of_a_model_without_batchnorm_is_one_line_with_the_fix(tmp_path):
    fitted = dgkit("fit", "--model.backbone=mlp", "--trainer.max_steps=2", "--data.test_domains=[75]",
                   *QUIET, cwd=tmp_path)
    assert fitted.code == 0, fitted.text[-3000:]
    ckpt = tmp_path / results(tmp_path / "runs" / "version_0")["ckpt_path"]
    result = dgkit("test", "--ckpt_path", str(ckpt), "--tta", "bn", *QUIET, cwd=tmp_path)
    assert result.code == 2
    assert "mnist_cnn_bn" in result.error_line()


@pytest.mark.slow
def test_tent_on_two_processes(checkpoints, tmp_path):
    ckpt = checkpoints["erm"]
    result = dgkit("test", "--ckpt_path", str(ckpt), "--tta", "tent", "--trainer.accelerator=cpu",
                   "--trainer.strategy=ddp", "--trainer.devices=2", *QUIET, cwd=tmp_path)
    tested = _tested(result, ckpt, "tent")
    assert result.err.count("results written to") == 1
    plain = results(ckpt.parent.parent)["domains"]["75"]["accuracy"]
    # The test split is padded to an even count across the two ranks (one sample at most).
    assert tested["domains"]["75"]["accuracy (no adaptation)"] == pytest.approx(plain, abs=0.005)


def test_a_label_shifted_scenario_is_stated_and_kept_apart_from_the_plain_test(checkpoints, tmp_path):
    ckpt = checkpoints["erm"]
    result = dgkit("test", "--ckpt_path", str(ckpt), "--tta", "lame", "--data.label_shift", "0.1",
                   "--data.eval_batch_size", "64", *QUIET, cwd=tmp_path)
    assert result.code == 0, result.text[-3000:]
    assert "test stream: one stream per domain, label-shifted (Dirichlet 0.1), batches of 64" in result.out
    tested = results(ckpt.parent.parent / f"test-{ckpt.stem}-lame-shift0.1")
    assert tested["test_stream"] == {"streams": "domains", "label_shift": 0.1, "batch_size": 64}
    assert tested["test_time"]["method"] == "lame"
    bad = dgkit("test", "--ckpt_path", str(ckpt), "--data.label_shift", "0", *QUIET, cwd=tmp_path)
    assert bad.code == 2 and "data.label_shift" in bad.error_line()


def test_an_algorithms_test_time_hyperparameters_evaluate_its_checkpoint(tmp_path):
    """``dgkit test --model.algorithm.<test-time name>`` evaluates the checkpoint with the
    value asked for (DRM's beta below 1 turns its heads' online retraining on); a training
    hyperparameter that differs from the checkpoint's is one line, not silently dropped."""
    fitted = dgkit("fit", "--algo=drm", "--data=rotated_mnist", "--data.test_domains=[75]",
                   "--model.backbone=mlp", "--trainer.max_steps=10", *QUIET, cwd=tmp_path)
    assert fitted.code == 0, fitted.text[-3000:]
    run = tmp_path / "runs" / "version_0"
    assert "accuracy (no adaptation)" not in results(run)["domains"]["75"]  # beta 1.1: selection only
    ckpt = tmp_path / results(run)["ckpt_path"]
    tested = dgkit("test", "--ckpt_path", str(ckpt), "--algo=drm", "--model.algorithm.beta=0.5",
                   "--model.algorithm.test_lr", "0.01", *QUIET, cwd=tmp_path)
    assert tested.code == 0, tested.text[-3000:]
    beside = run / f"test-{ckpt.stem}"
    scores = results(beside)["domains"]["75"]
    assert scores["accuracy (no adaptation)"] == pytest.approx(results(run)["domains"]["75"]["accuracy"])
    assert "beta: 0.5" in (beside / "config.yaml").read_text()
    assert "test_lr: 0.01" in (beside / "config.yaml").read_text()
    refused = dgkit("test", "--ckpt_path", str(ckpt), "--algo=drm", "--model.algorithm.bank_rows=8",
                    *QUIET, cwd=tmp_path)
    assert refused.code == 2
    line = refused.error_line()
    assert "model.algorithm.bank_rows:" in line and "was trained with bank_rows 1600" in line
    assert "test_lr" in line  # the ones that may change
