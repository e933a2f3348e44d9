"""Every shipped config parses against the current CLI (unknown keys or bad values fail)."""

from pathlib import Path

import pytest
import yaml

from dgkit.cli import main
from dgkit.plugins import registry

CONFIGS = sorted((Path(__file__).parents[1] / "configs").rglob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[f"{p.parent.name}/{p.stem}" for p in CONFIGS])
def test_config_parses_and_round_trips(path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(path), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    written = yaml.safe_load(path.read_text())
    assert printed["model"]["algorithm"]["class_path"] == written["model"]["algorithm"]["class_path"]
    assert printed["data"]["dataset"]["class_path"] == written["data"]["dataset"]["class_path"]
    lr = printed["model"]["optimizer"]["init_args"]["lr"]
    assert isinstance(lr, float) and lr == written["model"]["optimizer"]["init_args"]["lr"]


def test_officehome_configs_cover_the_algorithms():
    names = {p.stem for p in CONFIGS if p.parent.name == "officehome"}
    assert {"erm", "sam", "udim", "drm", "itta", "adanpc", "bonsai"} <= names


SBATCH = sorted((Path(__file__).parents[1] / "configs" / "slurm").glob("*.sbatch"))


@pytest.mark.parametrize("path", SBATCH, ids=[p.stem for p in SBATCH])
def test_slurm_templates_requeue_and_their_command_parses(path, capsys, monkeypatch):
    import os
    import shlex

    script = path.read_text()
    assert "#SBATCH --signal=SIGUSR1@" in script and "#SBATCH --requeue" in script
    nodes = int(script.split("#SBATCH --nodes=")[1].split()[0])
    env = {"SLURM_NTASKS_PER_NODE": "4", "SLURM_NNODES": str(nodes), "SLURM_CPUS_PER_TASK": "8"}
    command = script.split("\nsrun ", 1)[1].replace("\\\n", " ").split("\n")[0]
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    words = shlex.split(os.path.expandvars(command.replace("$((SLURM_CPUS_PER_TASK - 1))", "7")))
    assert words[:2] == ["dgkit", "fit"] and words[-1] == "$@"
    with pytest.raises(SystemExit) as exit_info:
        main([*words[1:-1], "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["trainer"]["num_nodes"] == nodes and printed["trainer"]["strategy"] == "ddp"


def test_embedded_configs_cover_every_algorithm_on_both_embedded_data_sets():
    rotated = {p.stem for p in CONFIGS if p.parent.name == "rotated_mnist"}
    colored = {p.stem for p in CONFIGS if p.parent.name == "colored_mnist"}
    built_in = {entry.alias for entry in registry("algorithm") if entry.distribution == "dgkit"}
    assert rotated == colored == built_in
    for path in [p for p in CONFIGS if p.parent.parent.name == "embedded"]:
        text = path.read_text()  # the header records the search it came from and its figures
        assert "# The search: " in text and "held-out" in text
