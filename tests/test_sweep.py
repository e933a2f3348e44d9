"""A small sweep on Rotated MNIST (2 algorithms x 2 held-out domains x 2 seeds) and the
tables `dgkit report` builds from it, checked against the runs' own records."""

import json
import math
import statistics

import pandas as pd
import pytest
from helpers import inside

from dgkit.cli import main
from dgkit.data import DomainDataModule
from dgkit.data.mnist import RotatedMNIST
from dgkit.errors import ConfigError

SWEEP = ["sweep", "--dir", "sweep", "--algos", "erm", "sam", "--test-domains", "0", "75",
         "--seeds", "0", "1", "--", "--data", "rotated_mnist", "--model.backbone", "mlp",
         "--data.batch_size", "8", "--trainer.max_steps", "6", "--trainer.val_check_interval", "2",
         "--data.crafted_validation", "[contrast, geometric]", "--data.track_test", "true",
         "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    with inside(tmp_path_factory.mktemp("sweep")) as folder:
        main(SWEEP)
        main(["report", "sweep"])
    return folder / "sweep"


def _selected(run_folder, score):
    metrics = pd.read_csv(next(run_folder.glob("runs/version_*/metrics.csv")))
    rows = metrics.groupby("step").first().dropna(subset=[score, "heldout/accuracy"])
    return rows.loc[rows[score].idxmax(), "heldout/accuracy"]  # first best, as the report does


def test_every_combination_ran_in_its_own_folder(sweep):
    runs = sorted(sweep.rglob("run.json"))
    assert len(runs) == 8
    folders = {json.loads(r.read_text())["algorithm"] + "/" + json.loads(r.read_text())["test_domain"]
               for r in runs}
    assert folders == {"erm/0", "erm/75", "sam/0", "sam/75"}
    for run in runs:
        results = json.loads(next(run.parent.glob("runs/version_*/test_results.json")).read_text())
        assert results["algorithm"] in ("ERM", "SAM")


def test_report_tables_match_the_runs_records(sweep):
    table = pd.read_csv(sweep / "results.csv")
    for method, score in (("training-domain validation", "val/accuracy"),
                          ("crafted-shift validation", "crafted/accuracy"),
                          ("test-domain oracle", "oracle/accuracy")):
        for algorithm in ("erm", "sam"):
            for domain in ("0", "75"):
                values = [_selected(sweep / algorithm / domain / "default" / f"seed{s}", score)
                          for s in (0, 1)]
                row = table[(table.selection == method) & (table.algorithm == algorithm)
                            & (table.domain.astype(str) == domain)].iloc[0]
                assert row["mean"] == pytest.approx(statistics.fmean(values))
                assert row["se"] == pytest.approx(statistics.stdev(values) / math.sqrt(2))
                assert row["n"] == 2
            averages = [statistics.fmean(_selected(sweep / algorithm / d / "default" / f"seed{s}", score)
                                         for d in ("0", "75")) for s in (0, 1)]
            avg = table[(table.selection == method) & (table.algorithm == algorithm)
                        & (table.domain.astype(str) == "Avg")].iloc[0]
            assert avg["mean"] == pytest.approx(statistics.fmean(averages))
    markdown = (sweep / "results.md").read_text()
    assert "### crafted-shift validation" in markdown and "| Algorithm | 0 | 75 | Avg |" in markdown
    assert r"\pm" in (sweep / "results.tex").read_text()
    assert (sweep / "validation_vs_test.png").stat().st_size > 0
    assert (sweep / "learning_curves.png").stat().st_size > 0


def test_rerunning_skips_finished_runs_and_slurm_writes_an_array(sweep, capsys, monkeypatch):
    monkeypatch.chdir(sweep.parent)
    main(SWEEP)
    assert capsys.readouterr().err.count(": skipped") == 8
    main([*SWEEP[:12], "--slurm", "--sbatch=--gres=gpu:1", *SWEEP[12:]])
    script = (sweep / "sweep.sbatch").read_text()
    assert "#SBATCH --array=0-7" in script and "#SBATCH --gres=gpu:1" in script
    assert "--requeue" in script and "srun dgkit sweep" in script and "--index $SLURM_ARRAY_TASK_ID" in script


def test_a_fold_seen_in_training_never_validates():
    with pytest.raises(ConfigError, match="share a fold with the training shifts"):
        DomainDataModule(RotatedMNIST(), crafted_training=["blur"], crafted_validation=["contrast"])
    data = DomainDataModule(RotatedMNIST(), crafted_training=["A"], crafted_validation=["B"], batch_size=8)
    assert data.task.stages["crafted"] == ("convolutional", "edges", "geometric", "segmentation", "weather")
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    assert batch[0][0].shape == (8, 1, 28, 28)


KFOLD = ["sweep", "--dir", "kfold", "--algos", "erm", "--test-domains", "0", "--kfold",
         "--lodo", "15", "30", "--grid", "model.optimizer.init_args.lr=1e-3,1e-1", "--",
         "--data", "rotated_mnist", "--model.backbone", "mlp", "--data.batch_size", "8",
         "--data.eval_batch_size", "32", "--trainer.limit_val_batches", "1",
         "--trainer.max_steps", "6", "--trainer.val_check_interval", "3",
         "--data.track_test", "true", "--trainer.enable_progress_bar", "false",
         "--trainer.enable_model_summary", "false"]


def _final(folder, prefix):
    metrics = pd.read_csv(next(folder.glob("runs/version_*/metrics.csv")))
    last = metrics.groupby("step").first().dropna(subset=["heldout/accuracy"]).iloc[-1]
    return {k: v for k, v in last.items() if k.startswith(prefix)}


def test_kfold_and_leave_one_domain_out_runs_and_their_selection(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    main(KFOLD)
    root = tmp_path / "kfold" / "erm" / "0"
    for lr in ("1e-3", "1e-1"):
        seed = root / f"lr={lr}" / "seed0"
        assert sorted(p.name for p in seed.iterdir()) == [
            "fold-A", "fold-B", "fold-all", "lodo-15", "lodo-30"]
        a, b = (json.loads((seed / f / "run.json").read_text())["argv"] for f in ("fold-A", "fold-B"))
        assert a[a.index("--data.crafted_training") + 1] == "[A]"
        assert b[b.index("--data.crafted_validation") + 1] == "[A]"
        lodo = json.loads((seed / "lodo-15" / "run.json").read_text())["argv"]
        assert lodo[lodo.index("--data.test_domains") + 1] == "[0, 15]"
        assert lodo[lodo.index("--data.crafted_training") + 1] == "[all]"  # trained like fold-all
    main(["report", "kfold"])
    table = pd.read_csv(tmp_path / "kfold" / "results.csv").set_index(["selection", "domain"])

    cv = {}  # the crafted-shift k-fold score per setting, read off the fold runs' records
    for lr in ("1e-3", "1e-1"):
        seed = root / f"lr={lr}" / "seed0"
        scores = [*_final(seed / "fold-A", "crafted/accuracy/").values(),
                  *_final(seed / "fold-B", "crafted/accuracy/").values()]
        assert len(scores) == 10  # fold A's run validates on B's five categories, and back
        cv[lr] = (statistics.fmean(scores), _final(seed / "fold-all", "heldout/accuracy")["heldout/accuracy"])
    best = max(cv.values(), key=lambda v: v[0])
    assert table.loc[("crafted-shift k-fold", "0"), "mean"] == pytest.approx(best[1])

    lodo = {}  # leave-one-domain-out: mean accuracy on the extra held-out domain, per step
    for lr in ("1e-3", "1e-1"):
        seed = root / f"lr={lr}" / "seed0"
        steps = {}
        for d in ("15", "30"):
            m = pd.read_csv(next((seed / f"lodo-{d}").glob("runs/*/metrics.csv")))
            steps[d] = m.groupby("step").first()[f"heldout/accuracy/{d}"].dropna()
        main_run = pd.read_csv(next((seed / "fold-all").glob("runs/*/metrics.csv")))
        held = main_run.groupby("step").first()["heldout/accuracy"].dropna()
        for step, value in held.items():
            lodo[(lr, step)] = ((steps["15"][step] + steps["30"][step]) / 2, value)
    best = max(lodo.values(), key=lambda v: v[0])
    assert table.loc[("leave-one-domain-out", "0"), "mean"] == pytest.approx(best[1])


def test_random_search_draws_domainbeds_settings_per_trial_and_the_report_averages_trials(tmp_path):
    """DomainBed's protocol: setting 0 is the defaults, setting h of trial t draws each value
    from ``RandomState(seed_hash(seed_hash(h, t), domainbed_name))``; every trial has its
    own holdout split."""
    import numpy as np
    import yaml

    from dgkit.search_space import seed_hash

    argv = ["sweep", "--dir", "s", "--algos", "irm", "--test-domains", "75", "--random", "2", "--trials", "2",
            "--", "--data", "rotated_mnist", "--model.backbone", "mlp", "--trainer.max_steps", "2",
            "--data.track_test", "true", "--trainer.enable_progress_bar", "false",
            "--trainer.enable_model_summary", "false"]
    with inside(tmp_path):
        main(argv)
        main(["report", "s"])
    runs = {p.parent.relative_to(tmp_path / "s").as_posix(): json.loads(p.read_text())
            for p in (tmp_path / "s").rglob("run.json")}
    assert sorted(runs) == [f"irm/75/hp{h}/trial{t}" for h in (0, 1) for t in (0, 1)]
    assert runs["irm/75/hp0/trial1"]["hparams"] == {
        "model.optimizer.lr": "0.001", "model.optimizer.weight_decay": "0.0", "data.batch_size": "64",
        "model.algorithm.lam": "100.0", "model.algorithm.anneal_steps": "500"}
    for trial in (0, 1):
        seed = seed_hash(1, trial)

        def draw(name, seed=seed):
            return np.random.RandomState(seed_hash(seed, name))

        drawn = runs[f"irm/75/hp1/trial{trial}"]["hparams"]
        assert float(drawn["model.algorithm.lam"]) == 10 ** draw("irm_lambda").uniform(-1, 5)
        anneal = int(10 ** draw("irm_penalty_anneal_iters").uniform(0, 4))
        assert int(drawn["model.algorithm.anneal_steps"]) == anneal
        assert float(drawn["model.optimizer.lr"]) == 10 ** draw("lr").uniform(-4.5, -2.5)
        assert int(drawn["data.batch_size"]) == int(2 ** draw("batch_size").uniform(3, 9))
        run = tmp_path / f"s/irm/75/hp1/trial{trial}"
        config = yaml.safe_load(next(run.glob("runs/version_0/config.yaml")).read_text())
        assert config["model"]["algorithm"]["init_args"]["lam"] == float(drawn["model.algorithm.lam"])
        assert config["data"]["split_seed"] == trial
    assert {r["seed"] for r in runs.values()} == {0, 1} and len({r["run_seed"] for r in runs.values()}) == 4
    assert "| IRM |" in (tmp_path / "s" / "results.md").read_text()


def test_trials_belong_to_the_random_search(tmp_path, capsys):
    with inside(tmp_path):
        with pytest.raises(SystemExit) as exc:
            main(["sweep", "--dir", "s", "--algos", "erm", "--test-domains", "75", "--grid",
                  "model.optimizer.lr=1e-3,1e-4", "--random", "1", "--trials", "2"])
    assert exc.value.code == 2
    assert "--trials K goes with --random N and no --grid" in capsys.readouterr().err
