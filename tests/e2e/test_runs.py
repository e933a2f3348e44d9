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


def test_domainbeds_random_search_through_the_command(tmp_path):
    """``--random 2 --trials 2``: the defaults and one draw per trial, DomainBed's values for
    DomainBed's seeds, each in its folder, and the report over the trials."""
    import json

    from dgkit.plugins import registry
    from dgkit.search_space import cli_value, seed_hash, setting

    result = dgkit("sweep", "--dir", "s", "--algos", "irm", "--test-domains", "75", "--random", "2",
                   "--trials", "2", "--", "--model.backbone=mlp", "--trainer.max_steps=2",
                   "--data.track_test=true", *QUIET, cwd=tmp_path)
    assert result.code == 0, result.text[-3000:]
    folders = [f"irm/75/hp{h}/trial{t}" for h in (0, 1) for t in (0, 1)]
    assert [line.split(": ")[0].split("] ")[1] for line in result.err.splitlines()
            if line.startswith("[")] == folders
    irm = registry("algorithm").get("irm").obj
    for h, t in ((0, 0), (1, 0), (1, 1)):
        run = json.loads((tmp_path / "s" / f"irm/75/hp{h}/trial{t}" / "run.json").read_text())
        drawn = setting("irm", irm, "rotated_mnist", None if h == 0 else seed_hash(h, t))
        assert run["hparams"] == {k: cli_value(v) for k, v in drawn.items()}
    report = dgkit("report", "s", cwd=tmp_path)
    assert report.code == 0 and "| IRM |" in report.out, report.text[-3000:]


def test_mldg_trains_on_two_source_domains_by_default(tmp_path):
    """Colored MNIST leaves two source domains: MLDG meta-tests on one of them."""
    result = dgkit("fit", "--algo", "mldg", "--data", "colored_mnist", *SHORT, *QUIET, cwd=tmp_path)
    assert result.code == 0, result.text[-3000:]
    config = (tmp_path / "runs" / "version_0" / "config.yaml").read_text()
    assert "n_meta_test: null" in config and result.out.count("held-out domains:") == 1


def test_max_steps_decides_unless_the_epochs_are_asked_for_too(tmp_path):
    # 512 images per domain and step: two steps an epoch, so the default 15 epochs are 30 steps.
    fast = ["fit", "--model.backbone=mlp", "--data.batch_size=512", *QUIET]
    steps = dgkit(*fast, "--trainer.max_steps=40", cwd=tmp_path)
    assert steps.code == 0, steps.text[-3000:]
    assert "`Trainer.fit` stopped: `max_steps=40` reached." in steps.text
    both = dgkit(*fast, "--trainer.max_steps=40", "--trainer.max_epochs=1", "--resume=false", cwd=tmp_path)
    assert both.code == 0, both.text[-3000:]
    assert "`Trainer.fit` stopped: `max_epochs=1` reached." in both.text


def test_divdis_trains_on_a_target_pool_smaller_than_its_default_batch(tmp_path):
    """The held-out domain's validation part (167 digits of 75 degrees) is smaller than the
    default unlabeled batch (5 domains x 64): the batch is the whole pool, and the run trains
    its steps instead of ending every epoch at step 0."""
    result = dgkit("fit", "--algo", "divdis", "--data", "rotated_mnist", "--data.unlabeled", "target",
                   "--trainer.max_steps=20", "--model.backbone=mlp", *QUIET, cwd=tmp_path)
    assert result.code == 0, result.text[-3000:]
    assert "`Trainer.fit` stopped: `max_steps=20` reached." in result.text, result.text[-3000:]
    with open(tmp_path / "runs" / "version_0" / "metrics.csv", newline="") as fh:
        losses = [r["train/loss"] for r in csv.DictReader(fh) if r.get("train/loss")]
    assert len(losses) == 2  # logged every 10 steps


def test_a_shipped_embedded_config_runs_as_its_header_says(tmp_path):
    config = Path(__file__).parents[2] / "configs" / "embedded" / "colored_mnist" / "coral.yaml"
    assert "dgkit fit --config configs/embedded/colored_mnist/coral.yaml" in config.read_text()
    result = dgkit("fit", "--config", str(config), "--trainer.max_steps=3", *QUIET, cwd=tmp_path)
    assert result.code == 0, result.text[-3000:]
    assert "│ -90% " in result.out  # the data set's default held-out domain
    tested = results(tmp_path / "runs" / "version_0")
    assert "-90%" in tested["domains"], tested


def test_styled_mnist_trains_and_holds_out_the_inverted_digits(tmp_path):
    result = dgkit("fit", "--data", "styled_mnist", "--trainer.max_steps=3", *QUIET, cwd=tmp_path)
    assert result.code == 0, result.text[-3000:]
    assert "trained on clean, blur, low_contrast, noise;" in result.out and "│ inverted " in result.out
    tested = results(tmp_path / "runs" / "version_0")
    assert "inverted" in tested["domains"], tested
