import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import QUIET, inside
from helpers import run_cli as run


def test_help_lists_lightning_and_dgkit_arguments(capsys):
    code, out, _ = run(["fit", "--help"], capsys)
    assert code == 0
    for flag in ("--model.algorithm", "--data.dataset", "--trainer.max_epochs", "--config",
                 "--print_config", "--data.test_domains", "--model.optimizer"):
        assert flag in out


def test_print_config_round_trips_through_config_file(capsys, tmp_path):
    code, printed, _ = run(["fit", "--algo", "erm", "--data", "colored_mnist",
                            "--data.batch_size", "8", "--print_config"], capsys)
    assert code == 0
    assert "dgkit.data.mnist.ColoredMNIST" in printed and "batch_size: 8" in printed
    config = tmp_path / "cfg.yaml"
    config.write_text(printed)
    code, again, _ = run(["fit", "--config", str(config), "--print_config"], capsys)
    assert code == 0 and again == printed


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["fit", "--algo", "ermm"], "unknown algorithm 'ermm'. Did you mean 'erm'?"),
        (["fit", "--data", "rotated_mnis"], "unknown dataset 'rotated_mnis'. Did you mean "
                                            "'rotated_mnist'? Known datasets: camelyon17, colored_mnist, "
                                            "domainnet, fmow, iwildcam, officehome, pacs, rotated_mnist"),
        (["fit", "--model.optimizer.lr", "-0.1"], "model.optimizer: Invalid learning rate: -0.1"),
        (["fit", "--data.test_domains", "[90]"], "data.test_domains: RotatedMNIST has no domain 90"),
        (["test", "--ckpt_path", "missing.ckpt"], "ckpt_path: no checkpoint file at 'missing.ckpt'"),
        (["fit", "--model.dropout", "1.5"], "model.dropout: 1.5 is not a probability"),
        (["fit", "--algo", "sam", "--model.algorithm.rho", "-1"], "model.algorithm.rho: -1.0 is negative"),
        (["fit", "--trainer.max_stepz", "3"], "unrecognized arguments: --trainer.max_stepz 3. Did you "
                                               "mean 'trainer.max_steps'?"),
        (["fit", "--model.metrics", "[accuracy,top5]"], "unknown metric 'top5'"),
    ],
)
def test_bad_input_gets_one_clear_line(capsys, argv, message):
    code, out, err = run(argv, capsys)
    assert code == 2
    assert message in " ".join(err.split())
    assert "Traceback" not in out + err


def test_bad_input_from_the_console_script_has_no_traceback():
    proc = subprocess.run([sys.executable, "-m", "dgkit.cli", "fit", "--algo", "nope"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "unknown algorithm 'nope'" in proc.stderr and "Traceback" not in proc.stderr


def _fit(root: Path) -> dict:
    with inside(root):  # runs/ is relative to the working directory
        code, _, _ = run(["fit", "--algo", "erm", "--data", "rotated_mnist",
                          "--trainer.max_epochs", "5", *QUIET])
    assert code == 0
    (results,) = root.glob("runs/*/test_results.json")
    results = json.loads(results.read_text())
    results["ckpt_path"] = str(root / results["ckpt_path"])
    return results


@pytest.fixture(scope="module")
def erm_runs(tmp_path_factory):
    """The same ERM command twice, in two folders."""
    return [(_fit(root), root) for root in
            (tmp_path_factory.mktemp("a"), tmp_path_factory.mktemp("b"))]


def test_erm_beats_chance_on_the_held_out_domain(erm_runs):
    results, _ = erm_runs[0]
    assert results["dataset"] == "RotatedMNIST" and list(results["domains"]) == ["75"]
    assert results["source_domains"] == ["0", "15", "30", "45", "60"]
    accuracy = results["domains"]["75"]["accuracy"]
    assert accuracy > 0.3, f"ERM reached only {accuracy:.3f} on 75 degrees (chance is 0.10)"


def test_same_command_twice_gives_the_same_metrics(erm_runs):
    (first, root_a), (second, root_b) = erm_runs
    assert first["domains"] == second["domains"]
    csv_a = (next(root_a.glob("runs/*/metrics.csv"))).read_text()
    csv_b = (next(root_b.glob("runs/*/metrics.csv"))).read_text()
    assert csv_a == csv_b  # every logged value, every step


def test_test_validate_predict_from_checkpoint_alone(erm_runs, capsys, monkeypatch, tmp_path):
    results, _ = erm_runs[0]
    ckpt = results["ckpt_path"]
    monkeypatch.chdir(tmp_path)
    code, out, err = run(["test", "--ckpt_path", ckpt, *QUIET], capsys)
    assert code == 0 and "ERM on RotatedMNIST" in out, err[-2000:]
    beside = Path(ckpt).parent.parent  # evaluations write into the run they evaluate
    again = json.loads((beside / f"test-{Path(ckpt).stem}" / "test_results.json").read_text())
    assert again["domains"] == results["domains"]  # model and data rebuilt from the ckpt
    assert run(["validate", "--ckpt_path", ckpt, *QUIET])[0] == 0
    assert run(["predict", "--ckpt_path", ckpt, *QUIET])[0] == 0
    assert not Path("runs").exists()
    predictions = beside / f"predict-{Path(ckpt).stem}" / "predictions.pt"
    batches = torch.load(predictions, weights_only=False)
    assert batches[0]["domain"] == "75" and batches[0]["logits"].shape[1] == 10


def test_checkpoint_keeps_optimizer_state(erm_runs):
    results, _ = erm_runs[0]
    ckpt = torch.load(results["ckpt_path"], weights_only=True)
    (state,) = ckpt["optimizer_states"]
    assert state["state"] and "exp_avg" in next(iter(state["state"].values()))
    assert ckpt["hyper_parameters"]["algorithm"]["class_path"].endswith("ERM")
