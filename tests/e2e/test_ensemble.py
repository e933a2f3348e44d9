"""``dgkit ensemble``: EoA and model soups of a sweep's runs through the command, the rows
``dgkit report`` adds for them, and ``dgkit sweep --init-from`` (DiWA's shared start)."""

from __future__ import annotations

import csv
import json

import pytest

from e2e.command import QUIET, dgkit

RUNS = ["--", "--data", "rotated_mnist", "--model.backbone", "mlp", "--data.batch_size", "16",
        "--trainer.max_steps", "30", "--trainer.val_check_interval", "10",
        "--trainer.check_val_every_n_epoch", "null", "--data.track_test", "true", *QUIET]
SMA = ["--model.averaging", "sma", "--model.averaging.start", "10"]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """ERM and SAM, each trained with SMA from three seeds, held out on domain 0."""
    root = tmp_path_factory.mktemp("ensemble")
    result = dgkit("sweep", "--dir", "sweep", "--algos", "erm", "sam", "--test-domains", "0",
                   "--seeds", "0", "1", "2", *RUNS, *SMA, cwd=root)
    assert result.code == 0, result.text[-3000:]
    return root


def _ensemble(root, method):
    folder = root / "sweep" / "ensembles" / method
    found = {}
    for algorithm in ("erm", "sam"):
        run = folder / algorithm / "0" / "split0"
        found[algorithm] = (json.loads((run / "ensemble.json").read_text()),
                            json.loads((run / "test_results.json").read_text()))
    return found


@pytest.mark.parametrize("method,label", [("eoa", "EoA"), ("uniform", "uniform soup"),
                                          ("greedy", "greedy soup")])
def test_ensembles_of_a_sweeps_runs_are_tested_and_written(sweep, method, label):
    result = dgkit("ensemble", "sweep", "--method", method, cwd=sweep)
    assert result.code == 0, result.text[-3000:]
    assert f"{label} of 3 erm run(s) held out on 0, split 0:" in result.out
    assert f"{label} of 3 sam run(s) held out on 0, split 0:" in result.out
    assert "GPU available" not in result.text and "Traceback" not in result.text
    assert "removed from hparams" not in result.text
    for algorithm, (info, results) in _ensemble(sweep, method).items():
        assert info["method"] == label and info["candidates"] == 3
        assert results["algorithm"] == {"erm": "ERM", "sam": "SAM"}[algorithm]
        assert 0.0 < results["domains"]["0"]["accuracy"] <= 1.0
        # Members are the checkpoints the runs tested: their SMA averages.
        for member in info["members"]:
            assert member.startswith(f"{algorithm}/0/default/seed") and member.endswith(".ckpt")
        if method == "greedy":
            assert 1 <= info["size"] <= 3
            assert info["soup_validation"] >= max(info["validation"].values())
        else:
            assert info["size"] == 3


def test_report_puts_the_ensembles_beside_the_algorithms(sweep):
    for method in ("eoa", "uniform"):
        if not (sweep / "sweep" / "ensembles" / method).is_dir():
            assert dgkit("ensemble", "sweep", "--method", method, cwd=sweep).code == 0
    result = dgkit("report", "sweep", cwd=sweep)
    assert result.code == 0, result.text[-3000:]
    assert "| ERM + EoA of 3 | " in result.out and "| SAM + uniform soup of 3 | " in result.out
    with open(sweep / "sweep" / "results.csv") as fh:
        rows = [r for r in csv.DictReader(fh) if r["selection"] == "training-domain validation"]
    eoa = _ensemble(sweep, "eoa")["sam"][1]["domains"]["0"]["accuracy"]
    row = next(r for r in rows if r["algorithm"] == "sam + EoA of 3" and r["domain"] == "0")
    assert float(row["mean"]) == pytest.approx(eoa) and row["n"] == "1"
    # Ensembles are read only into the table whose selection picked their members.
    with open(sweep / "sweep" / "results.csv") as fh:
        oracle = [r for r in csv.DictReader(fh) if r["selection"] == "test-domain oracle"]
    assert not [r for r in oracle if "+" in r["algorithm"]]


def test_runs_start_from_one_shared_checkpoint_and_their_soup_says_so(sweep):
    init = dgkit("sweep", "--dir", "init", "--algos", "erm", "--test-domains", "0", *RUNS, cwd=sweep)
    assert init.code == 0, init.text[-3000:]
    init_run = sweep / "init" / "erm" / "0" / "default" / "seed0"
    start = next(init_run.glob("runs/version_0/checkpoints/best-*.ckpt"))
    result = dgkit("sweep", "--dir", "diwa", "--algos", "erm", "--test-domains", "0", "--seeds", "0", "1",
                   "--init-from", "init", *RUNS, cwd=sweep)
    assert result.code == 0, result.text[-3000:]
    for seed in (0, 1):
        run = sweep / "diwa" / "erm" / "0" / "default" / f"seed{seed}"
        argv = json.loads((run / "run.json").read_text())["argv"]
        assert argv[argv.index("--model.init_from") + 1] == str(start.resolve())
        tested = json.loads((run / "runs" / "version_0" / "test_results.json").read_text())
        assert tested["init_from"]["checkpoint"] == str(start.resolve())
    soup = dgkit("ensemble", "diwa", "--method", "uniform", cwd=sweep)
    assert soup.code == 0, soup.text[-3000:]
    written = sweep / "diwa" / "ensembles" / "uniform" / "erm" / "0" / "split0" / "ensemble.json"
    info = json.loads(written.read_text())
    assert info["shared_init"] == str(start.resolve()) and info["size"] == 2


def test_a_start_that_is_not_one_run_per_domain_is_refused(sweep):
    result = dgkit("sweep", "--dir", "other", "--algos", "erm", "--test-domains", "0",
                   "--init-from", "sweep", *RUNS, cwd=sweep)
    assert result.code == 2
    assert "several finished runs held out 0 (split 0)" in result.error_line()
    assert not (sweep / "other" / "erm").exists()


def test_ensemble_refuses_what_it_cannot_ensemble(tmp_path):
    missing = dgkit("ensemble", "nowhere", cwd=tmp_path)
    assert missing.code == 2
    assert "no sweep folder at 'nowhere'" in missing.error_line()
    ran = dgkit("sweep", "--dir", "npc", "--algos", "adanpc", "--test-domains", "0",
                *RUNS, "--trainer.max_steps", "10", cwd=tmp_path)
    assert ran.code == 0, ran.text[-3000:]
    refused = dgkit("ensemble", "npc", cwd=tmp_path)
    assert refused.code == 2
    assert "AdaNPC adapts at test time" in refused.error_line()
    assert "use --method uniform or greedy" in refused.error_line()
