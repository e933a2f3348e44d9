"""The papers' claims on the embedded data, over seeds, through ``dgkit sweep``: one table.

    python benchmarks/claims.py --dir sweeps/claims [--quick] [--claims NAME ...]

Each claim names what its paper says, the setting it is checked in here, a baseline and the
method (mean ± standard error over seeds), their difference (paired by seed) and a verdict
at the seeds' noise: ``holds`` (the difference has the claimed sign and exceeds its standard
error; for "not worse" claims: it is not below minus its standard error), ``within noise``
or ``contradicted``. Runs already in ``--dir`` are reused, so a stopped run resumes.

Budget (full): 3 seeds, 300 steps of 64 images per source domain, validation every 60 steps,
dgkit's `mlp` featurizer (ITTA, which reads a backbone's stages: the MNIST CNN at 16 images
per domain), Rotated MNIST with 75 degrees held out, or trained on 30 degrees alone and
tested on the other five (single-source), or trained on 0-30 and tested on 45-75 (AdaNPC's
drift); Colored MNIST with -90% held out (Bonsai; DivDis and D-BAT with a 50% domain as their
unlabeled pool); Styled MNIST with the noisy digits held out (crafted-shift validation, three
learning rates). The claims but ITTA's take about 3.5 hours on 2 CPU cores, most of it UDIM's
second-order steps (the zoo's five, CORAL, Mixup, GroupDRO, IRM and V-REx: about 5 minutes);
ITTA's three claims at 16 images per domain took 68 minutes. ``--quick``: 2 seeds, 12
steps, 2 validation and test batches, a smoke run of the whole pipeline whose figures mean
nothing.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from averaging_evidence import source_batch

QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
SINGLE_SOURCE = "0,15,45,60,75"  # held out: every rotation but 30


@dataclass(frozen=True)
class Budget:
    seeds: tuple[int, ...]
    steps: int
    val_every: int
    limits: tuple[str, ...] = ()

    def fit_args(self, backbone: str = "mlp", data: str = "rotated_mnist") -> list[str]:
        return ["--data", data, "--model.backbone", backbone, "--data.batch_size", "64",
                "--trainer.max_steps", str(self.steps), "--trainer.max_epochs", "-1",
                "--trainer.val_check_interval", str(self.val_every),
                "--trainer.check_val_every_n_epoch", "null", *self.limits, *QUIET]


FULL = Budget((0, 1, 2), 300, 60)
QUICK = Budget((0, 1), 12, 6, ("--trainer.limit_val_batches", "2", "--trainer.limit_test_batches", "2"))


@dataclass(frozen=True)
class Sweep:
    """One ``dgkit sweep`` (its folder under the claims' directory) and its runs' options."""

    name: str
    algos: tuple[str, ...]
    test_domain: str
    backbone: str = "mlp"
    options: tuple[str, ...] = ()
    data: str = "rotated_mnist"
    grid: tuple[str, ...] = ()  # ``dgkit sweep --grid`` (several runs per seed)

    def run(self, root: Path, budget: Budget) -> Path:
        folder = root / self.name
        folder.mkdir(parents=True, exist_ok=True)
        argv = ["dgkit", "sweep", "--dir", str(folder), "--algos", *self.algos,
                f"--test-domains={self.test_domain}", "--seeds", *map(str, budget.seeds),
                *(["--grid", *self.grid] if self.grid else []), "--",
                *budget.fit_args(self.backbone, self.data), *self.options]
        with (folder / "sweep.log").open("a") as log:  # the runs' own lines, for a failure
            subprocess.run(argv, check=True, stdout=log, stderr=log)
        return folder


def tested(folder: Path, algo: str, test_domain: str, seed: int) -> tuple[Path, dict]:
    """A sweep run's folder and its test_results.json."""
    (run,) = (folder / algo / test_domain).glob(f"*/seed{seed}")
    return run, json.loads((run / "runs" / "version_0" / "test_results.json").read_text())


def accuracy(results: dict, key: str = "accuracy") -> float:
    return 100 * results["average"][key]


@dataclass(frozen=True)
class Claim:
    name: str
    paper: str
    setting: str
    baseline: str
    method: str
    sweeps: tuple[Sweep, ...]
    #: per seed: (baseline value, method value), from the sweeps' folders
    measure: Callable[[dict[str, Path], int, Budget], tuple[float, float]]
    kind: str = "higher"  # "higher", "not worse" or "lower" (for the method)
    unit: str = "%"
    notes: tuple[str, ...] = field(default=())


def _pair(sweep: str, baseline: str, method: str, test_domain: str = "75") -> Callable:
    def measure(folders: dict[str, Path], seed: int, budget: Budget) -> tuple[float, float]:
        return (accuracy(tested(folders[sweep], baseline, test_domain, seed)[1]),
                accuracy(tested(folders[sweep], method, test_domain, seed)[1]))
    return measure


def _across(baseline: tuple[str, str], method: tuple[str, str], test_domain: str) -> Callable:
    """Test accuracy of ``(sweep, algorithm)`` pairs from two sweeps (different options)."""
    def measure(folders: dict[str, Path], seed: int, budget: Budget) -> tuple[float, float]:
        return tuple(accuracy(tested(folders[sweep], algo, test_domain, seed)[1])
                     for sweep, algo in (baseline, method))
    return measure


def _worst_source(sweep: str, baseline: str, method: str) -> Callable:
    """The lowest source-domain validation accuracy at the runs' last validation."""
    def worst(algo: str, seed: int, folders: dict[str, Path]) -> float:
        run, results = tested(folders[sweep], algo, "75", seed)
        with (run / "runs" / "version_0" / "metrics.csv").open() as file:
            last = [r for r in csv.DictReader(file) if r.get("val/accuracy")][-1]
        return 100 * min(float(last[f"val/accuracy/{d}"]) for d in results["source_domains"])

    def measure(folders: dict[str, Path], seed: int, budget: Budget) -> tuple[float, float]:
        return worst(baseline, seed, folders), worst(method, seed, folders)
    return measure


def _sharpness(folders: dict[str, Path], seed: int, budget: Budget) -> tuple[float, float]:
    from dgkit.module import DGModule
    from dgkit.sharpness import worst_case_sharpness

    out = []
    for algo in ("erm", "sam"):
        run, results = tested(folders["multi"], algo, "75", seed)
        checkpoint = (run / results["ckpt_path"]).resolve()  # the test runs in the run folder
        module = DGModule.load_from_checkpoint(checkpoint, map_location="cpu", averaging=None)
        x, y = source_batch(checkpoint)
        out.append(worst_case_sharpness(module.algorithm, x, y, rho=0.05))
    return out[0], out[1]


def _itta_like(sweep: str, test_domain: str = "75") -> Callable:
    """The same run's test accuracy without and with its algorithm's test-time stage."""
    def measure(folders: dict[str, Path], seed: int, budget: Budget) -> tuple[float, float]:
        results = tested(folders[sweep], sweep, test_domain, seed)[1]
        return accuracy(results, "accuracy (no adaptation)"), accuracy(results)
    return measure


def _itta_rescaled(folders: dict[str, Path], seed: int, budget: Budget) -> tuple[float, float]:
    run, results = tested(folders["itta"], "itta", "75", seed)
    checkpoint = (run / results["ckpt_path"]).resolve()  # the test runs in the run folder
    rescaled = run / "runs" / "version_0" / f"test-{checkpoint.stem}" / "test_results.json"
    if not rescaled.exists():
        subprocess.run(["dgkit", "test", "--ckpt_path", str(checkpoint), "--algo", "itta",
                        "--model.algorithm.test_loss_scale", "0.1", *budget.limits, *QUIET],
                       cwd=run, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    results = json.loads(rescaled.read_text())
    return accuracy(results, "accuracy (no adaptation)"), accuracy(results)


def _drm(folders: dict[str, Path], seed: int, budget: Budget) -> tuple[float, float]:
    results = tested(folders["drm"], "drm", "75", seed)[1]["domains"]["75"]
    heads = [v for k, v in results.items() if k.startswith("accuracy_head")]
    return 100 * max(heads), 100 * results["accuracy"]


def _swad(folders: dict[str, Path], seed: int, budget: Budget) -> tuple[float, float]:
    results = tested(folders["swad"], "erm", "75", seed)[1]
    return accuracy(results, "accuracy (last iterate)"), accuracy(results)


def _t3a(folders: dict[str, Path], seed: int, budget: Budget) -> tuple[float, float]:
    run, results = tested(folders["multi"], "erm", "75", seed)
    checkpoint = (run / results["ckpt_path"]).resolve()  # the test runs in the run folder
    adapted = run / "runs" / "version_0" / f"test-{checkpoint.stem}-t3a" / "test_results.json"
    if not adapted.exists():
        subprocess.run(["dgkit", "test", "--ckpt_path", str(checkpoint), "--tta", "t3a", *QUIET],
                       cwd=run, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return accuracy(results), accuracy(json.loads(adapted.read_text()))


def _bonsai_init(folders: dict[str, Path], seed: int, budget: Budget) -> tuple[float, float]:
    """ERM from scratch (the sweep's run) against ERM initialized from the same seed's Bonsai
    checkpoint (``--model.init_from``), trained for the same steps."""
    scratch = accuracy(tested(folders["bonsai"], "erm", "-90%", seed)[1])
    run, results = tested(folders["bonsai"], "bonsai", "-90%", seed)
    folder = run / "erm-init"
    found = list(folder.glob("runs/version_*/test_results.json"))
    if not found:
        folder.mkdir(exist_ok=True)
        subprocess.run(["dgkit", "fit", "--algo", "erm", *budget.fit_args("mlp", "colored_mnist"),
                        "--data.test_domains", "[-90%]", "--seed_everything", str(seed),
                        "--model.init_from", str(run / results["ckpt_path"]),
                        "--trainer.default_root_dir", "runs"],
                       cwd=folder, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        found = list(folder.glob("runs/version_*/test_results.json"))
    return scratch, accuracy(json.loads(found[0].read_text()))


def _crafted(folders: dict[str, Path], seed: int, budget: Budget) -> tuple[float, float]:
    """Held-out accuracy of the candidate (every validation of every learning rate's run
    of the seed) that training-domain validation selects, and of the one crafted-shift
    validation selects."""
    from dgkit.report import HELD_OUT, SCORES, load_runs

    rows = [row for r in load_runs(folders["crafted"]) if r.seed == seed and not r.variant
            for row in r.rows]
    picked = []
    for score in (SCORES["training-domain validation"], SCORES["crafted-shift validation"]):
        picked.append(100 * max((row for row in rows if score in row), key=lambda row: row[score])[HELD_OUT])
    return picked[0], picked[1]


#: crafted-shift validation's categories (Efthymiadis et al.), as benchmarks/selection_correlation.py
CATEGORIES = "[arithmetic, blur, color, contrast, convolutional, edges, geometric, weather]"
#: DomainBed's Colored MNIST with a fourth domain whose colour says nothing (50%), the
#: unlabeled pool DivDis and D-BAT diversify on; trained on +90% and +80%, tested on -90%
DIVERSIFY = ("--data.dataset.color_agreement", "[0.9, 0.8, 0.5, 0.1]", "--data.unlabeled", "domains",
             "--data.unlabeled_domains", "[50%]")
MULTI = Sweep("multi", ("erm", "sam"), "75")
#: ITTA's second-order steps take about 10 s at 64 images per domain on 2 CPU cores (3 hours
#: for the three seeds): its runs (and ERM's beside them) take a quarter of the batch, and track
#: the held-out accuracy at each validation so that they also serve configs/embedded/
#: (benchmarks/embedded_configs.py)
#: DomainBed's algorithms at their DomainBed defaults, multi-source
ZOO = Sweep("zoo", ("erm", "coral", "mixup", "groupdro"), "75")
#: IRM and V-REx switch their penalty on at step 500 by default, past this budget's end: at
#: 100 here, so that 200 of the 300 steps train with the full penalty (the optimizer restarts
#: there, as in DomainBed)
ANNEAL = ("--model.algorithm.anneal_steps", "100")
COLORED = Sweep("colored", ("erm",), "-90%", data="colored_mnist")
ITTA_SWEEP = Sweep("itta", ("erm", "itta"), "75", "mnist_cnn",
                   options=("--data.batch_size", "16", "--data.track_test", "true"))
CLAIMS = [
    Claim("sam_flatter", "SAM converges to flatter minima than ERM (Foret et al., ICLR 2021)",
          "rho-sharpness (loss rise at SAM's worst point, rho 0.05) on 1,024 source images, "
          "tested checkpoint", "ERM", "SAM", (MULTI,), _sharpness, kind="lower", unit=""),
    Claim("sam_not_worse", "SAM generalizes at least as well as ERM out of domain (Foret et al.)",
          "multi-source, 75 held out", "ERM", "SAM", (MULTI,), _pair("multi", "erm", "sam"),
          kind="not worse"),
    Claim("sam_single_source", "SAM is not worse than ERM in single-source DG (Shin et al., ICLR 2024)",
          "trained on 30, tested on the other five", "ERM", "SAM",
          (Sweep("single", ("erm", "sam", "udim"), SINGLE_SOURCE),),
          _pair("single", "erm", "sam", SINGLE_SOURCE), kind="not worse"),
    Claim("udim_single_source", "UDIM > SAM in single-source DG (Shin et al., ICLR 2024)",
          "trained on 30, tested on the other five", "SAM", "UDIM",
          (Sweep("single", ("erm", "sam", "udim"), SINGLE_SOURCE),),
          _pair("single", "sam", "udim", SINGLE_SOURCE)),
    Claim("itta_test_time", "ITTA's test-time updates raise accuracy (Chen et al., CVPR 2023)",
          "multi-source, 75 held out, MNIST CNN, 16 images per domain a step; the same runs with and "
          "without adaptation", "no adaptation", "ITTA",
          (ITTA_SWEEP,), _itta_like("itta")),
    Claim("itta_test_time_scaled", "ITTA's test-time updates raise accuracy, with the test loss "
          "scaled as the reference does on DomainNet (0.1)",
          "as itta_test_time; the same checkpoints tested with `--model.algorithm.test_loss_scale 0.1`",
          "no adaptation", "ITTA", (ITTA_SWEEP,), _itta_rescaled),
    Claim("itta_vs_erm", "ITTA generalizes better than ERM (Chen et al., CVPR 2023)",
          "as itta_test_time; ERM with the same network, batch and steps", "ERM", "ITTA",
          (ITTA_SWEEP,), _pair("itta", "erm", "itta")),
    Claim("drm_routing", "DRM's routed prediction is at least as good as its best head (Zhang et al.)",
          "multi-source, 75 held out; best head chosen on the test domain (an oracle)",
          "best head", "routed", (Sweep("drm", ("drm",), "75"),), _drm, kind="not worse"),
    Claim("swad_vs_last", "SWAD's average generalizes better than the last iterate (Cha et al., 2021)",
          "multi-source, 75 held out; the same runs' average and last iterate", "last iterate",
          "SWAD", (Sweep("swad", ("erm",), "75", options=("--model.averaging", "swad")),), _swad),
    Claim("t3a_gain", "T3A raises a trained model's accuracy at test time (Iwasawa & Matsuo, 2021)",
          "ERM checkpoints of the multi-source runs, `dgkit test --tta t3a`", "ERM", "ERM + T3A",
          (MULTI,), _t3a),
    Claim("adanpc_drift", "AdaNPC's memory, absorbing the test stream, raises accuracy on unseen "
          "domains over its base model (Zhang et al., ICML 2023)",
          "trained on 0, 15, 30; tested on 45, 60, 75 (one stream per domain, the memory growing "
          "along it); the same runs with and without the test-time stage", "no adaptation",
          "AdaNPC", (Sweep("adanpc", ("adanpc",), "45,60,75"),), _itta_like("adanpc", "45,60,75")),
    Claim("diversify_shape", "DivDis finds a head that does not use the shortcut (Lee et al., ICLR 2023)",
          "Colored MNIST +90%/+80%, 50% unlabeled, -90% held out; the head its selection picks",
          "ERM", "DivDis", (Sweep("diversify", ("erm", "divdis", "dbat"), "-90%", options=DIVERSIFY,
                                  data="colored_mnist"),), _pair("diversify", "erm", "divdis", "-90%")),
    Claim("dbat_shape", "D-BAT finds a head that does not use the shortcut (Pagliardini et al., "
          "ICLR 2023)", "as diversify_shape", "ERM", "D-BAT",
          (Sweep("diversify", ("erm", "divdis", "dbat"), "-90%", options=DIVERSIFY, data="colored_mnist"),),
          _pair("diversify", "erm", "dbat", "-90%")),
    Claim("crafted_selection", "Crafted-shift validation selects models that generalize better than "
          "training-domain validation (Efthymiadis et al., 2024)",
          "Styled MNIST (clean, blur, low contrast, inverted; noise held out), ERM at lr 1e-4, 1e-3, "
          "1e-2; every validation of the three runs a candidate", "training-domain validation",
          "crafted-shift validation",
          (Sweep("crafted", ("erm",), "noise", data="styled_mnist",
                 grid=("model.optimizer.init_args.lr=1e-4,1e-3,1e-2",),
                 options=("--data.crafted_validation", CATEGORIES, "--data.track_test", "true")),),
          _crafted),  # not the inverted digits: every candidate is near 0% there
    Claim("bonsai_init", "ERM from a Bonsai (RFC) representation beats ERM from scratch out of "
          "domain (Zhang et al., ICML 2022)", "Colored MNIST, -90% held out; Bonsai's stages split "
          "the steps evenly, then ERM for the same steps from its checkpoint", "ERM (random init)",
          "ERM (Bonsai init)", (Sweep("bonsai", ("erm", "bonsai"), "-90%", data="colored_mnist"),),
          _bonsai_init),
    Claim("coral_not_worse", "CORAL generalizes at least as well as ERM (Sun & Saenko, 2016; "
          "DomainBed's best on average, Gulrajani & Lopez-Paz, ICLR 2021)", "multi-source, 75 held out",
          "ERM", "CORAL", (ZOO,), _pair("zoo", "erm", "coral"), kind="not worse"),
    Claim("mixup_gain", "Inter-domain Mixup generalizes better than ERM (Yan et al., 2020)",
          "multi-source, 75 held out", "ERM", "Mixup", (ZOO,), _pair("zoo", "erm", "mixup")),
    Claim("groupdro_worst_domain", "GroupDRO raises the worst group's accuracy (Sagawa et al., ICLR "
          "2020)", "multi-source, 75 held out; the lowest source-domain validation accuracy at the "
          "last validation", "ERM", "GroupDRO", (ZOO,), _worst_source("zoo", "erm", "groupdro")),
    Claim("irm_colored", "IRM beats ERM on Colored MNIST's reversed domain (Arjovsky et al., 2019)",
          "Colored MNIST, -90% held out; IRM's penalty (lambda 100) from step 100", "ERM", "IRM",
          (COLORED, Sweep("irm", ("irm",), "-90%", data="colored_mnist", options=ANNEAL)),
          _across(("colored", "erm"), ("irm", "irm"), "-90%")),
    Claim("vrex_colored", "V-REx beats ERM on Colored MNIST's reversed domain (Krueger et al., ICML "
          "2021)", "Colored MNIST, -90% held out; V-REx's penalty (lambda 10) from step 100", "ERM",
          "V-REx", (COLORED, Sweep("vrex", ("vrex",), "-90%", data="colored_mnist", options=ANNEAL)),
          _across(("colored", "erm"), ("vrex", "vrex"), "-90%")),
]


def verdict(kind: str, d: float, se: float) -> str:
    if kind == "lower":
        d = -d
    if kind == "not worse":
        return "holds" if d >= -se else "contradicted"
    if abs(d) <= se or math.isnan(se):
        return "within noise"
    return "holds" if d > 0 else "contradicted"


def mean_se(values: list[float]) -> tuple[float, float]:
    se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else float("nan")
    return statistics.mean(values), se


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", required=True, type=Path)
    parser.add_argument("--quick", action="store_true", help="2 seeds, 12 steps: a smoke run")
    parser.add_argument("--claims", nargs="+", choices=[c.name for c in CLAIMS])
    args = parser.parse_args()
    budget = QUICK if args.quick else FULL
    claims = [c for c in CLAIMS if not args.claims or c.name in args.claims]
    torch.set_grad_enabled(True)

    print(f"Embedded Rotated and Colored MNIST; seeds {' '.join(map(str, budget.seeds))}, "
          f"{budget.steps} steps, validation every {budget.val_every}; mean ± standard error over "
          "seeds, accuracy in %")
    print("| claim | paper | setting | baseline | method | method - baseline | verdict |\n"
          "|---|---|---|---|---|---|---|")
    folders: dict[str, Path] = {}
    for claim in claims:
        for sweep in claim.sweeps:
            if sweep.name not in folders:
                folders[sweep.name] = sweep.run(args.dir, budget)
        pairs = [claim.measure(folders, s, budget) for s in budget.seeds]
        (b, bse), (m, mse) = mean_se([p[0] for p in pairs]), mean_se([p[1] for p in pairs])
        d, dse = mean_se([p[1] - p[0] for p in pairs])
        digits = 2 if claim.unit == "%" else 4
        print(f"| {claim.name} | {claim.paper} | {claim.setting} | {claim.baseline} {b:.{digits}f} ± "
              f"{bse:.{digits}f} | {claim.method} {m:.{digits}f} ± {mse:.{digits}f} | {d:+.{digits}f} ± "
              f"{dse:.{digits}f} | {verdict(claim.kind, d, dse)} |", flush=True)


if __name__ == "__main__":
    main()
