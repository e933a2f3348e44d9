"""``dgkit ensemble DIR``: ensembles of a sweep's finished runs, tested on their held-out
domains with the streams and metrics the runs were tested with, written where ``dgkit
report DIR`` puts them into its tables (a row per algorithm and method, "ERM + EoA of 6").

Each ensemble combines the runs of one algorithm that held out the same domain and were
trained on the same data split (``--data.split_seed``; DomainBed's trial), so the
validation data a greedy soup reads is held out of every member. A member is the
checkpoint its run tested (the best on validation, or SWAD's average).

* ``--method eoa``: the ensemble of averages of Arpit et al. -- the mean of the members'
  logits (salesforce/ensemble-of-averages sums them; the prediction is the same). Meant for
  runs trained with ``--model.averaging sma``, but any runs can be ensembled.
* ``--method uniform``: a model soup -- the mean of the members' weights (Wortsman et al.;
  DiWA's uniform selection).
* ``--method greedy``: a greedy soup -- members sorted by their own validation score, each
  kept only if the soup's validation score does not drop (DiWA's restricted selection).

Weight averaging suits runs fine-tuned from one shared start (Ramé et al.): ``dgkit sweep
--init-from INIT_DIR`` starts every run from the run of INIT_DIR that held out the same
domain. A soup's BatchNorm statistics are recomputed on the source training data.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor, nn

from dgkit.algorithm import Algorithm
from dgkit.averaging import norm_layers, recompute_batchnorm
from dgkit.errors import DGKitError
from dgkit.networks import Backbone
from dgkit.noise import quiet_dependencies
from dgkit.task import Task

METHODS = {"eoa": "EoA", "uniform": "uniform soup", "greedy": "greedy soup"}
FOLDER = "ensembles"  # inside the sweep's folder
ENSEMBLE_FILE = "ensemble.json"


@dataclass
class Member:
    """One finished run of a sweep, as an ensemble takes it."""

    folder: Path
    checkpoint: Path
    name: str  # the checkpoint as the sweep's folder names it (ensemble.json's members)
    algorithm: str  # the sweep's alias
    test_domain: str
    split: int  # --data.split_seed
    init_from: str | None

    @property
    def group(self) -> tuple[str, str, int]:
        return self.algorithm, self.test_domain, self.split


def tested_checkpoint(folder: Path) -> Path | None:
    """The checkpoint the run's newest test evaluated (relative paths are the run folder's)."""
    results = sorted(folder.glob("runs/version_*/test_results.json"),
                     key=lambda p: int(p.parent.name.split("_")[1]))
    if not results:
        return None
    path = json.loads(results[-1].read_text()).get("ckpt_path")
    if not path:
        return None
    path = Path(path)
    for candidate in (path, folder / path):
        if candidate.is_file():
            return candidate
    return None


def find_members(directory: Path, algorithms: list[str] | None = None) -> dict[tuple, list[Member]]:
    """The sweep's finished reported runs (no k-fold or leave-one-domain-out helpers) with a
    tested checkpoint, grouped by (algorithm, held-out domain, data split)."""
    from dgkit.report import load_runs

    groups: dict[tuple, list[Member]] = {}
    for record in load_runs(directory):
        if record.variant or (algorithms and record.algorithm not in algorithms):
            continue
        checkpoint = tested_checkpoint(record.folder)
        if checkpoint is None:
            continue  # tested the weights at the end, without a checkpoint: nothing to load
        config = yaml.safe_load((checkpoint.parent.parent / "config.yaml").read_text())
        name = os.path.relpath(checkpoint, directory)
        member = Member(record.folder, checkpoint, name, record.algorithm, record.test_domain,
                        int(config["data"].get("split_seed", 0)), config["model"].get("init_from"))
        groups.setdefault(member.group, []).append(member)
    if not groups:
        which = f" of {', '.join(algorithms)}" if algorithms else ""
        raise DGKitError(f"no finished runs{which} with a tested checkpoint under {directory}")
    return groups


class OutputEnsemble(Algorithm):
    """The members' mean logits (EoA); it only predicts."""

    def __init__(self, task: Task, backbone: Backbone, members: list[Algorithm]):
        super().__init__(task, backbone)
        self.members = nn.ModuleList(members)

    def forward(self, x: Tensor) -> Tensor:
        return torch.stack([member(x) for member in self.members]).mean(0)


def _load(member: Member):
    from dgkit.module import DGModule

    # Without its averaging: the checkpoint's weights are already the average, and an
    # ensemble has no last iterate of its own to test beside it.
    module = DGModule.load_from_checkpoint(member.checkpoint, map_location="cpu", averaging=None)
    module.eval()
    return module


def _data(member: Member):
    from dgkit.data import DomainDataModule

    data = DomainDataModule.load_from_checkpoint(member.checkpoint)
    data.prepare_data()
    data.setup("fit")
    return data


def _trainer(out: Path):
    from lightning import Trainer

    return Trainer(default_root_dir=out, logger=False, enable_checkpointing=False, devices=1,
                   enable_progress_bar=False, enable_model_summary=False)


def _validation_score(module, data, out: Path) -> float:
    trainer = _trainer(out)
    trainer.validate(module, datamodule=data, verbose=False)
    metric = module.task.selection_metric
    if metric not in trainer.callback_metrics:
        raise DGKitError(f"validation logged no {metric}, which a greedy soup selects by")
    return float(trainer.callback_metrics[metric])


def soup(modules: list, data) -> Any:
    """The first module with every parameter replaced by the members' mean, its BatchNorm
    statistics recomputed on the source training data (other buffers stay the first's)."""
    import copy

    first = modules[0]
    out = copy.deepcopy(first)
    named = [dict(m.algorithm.named_parameters()) for m in modules]
    with torch.no_grad():
        for name, p in out.algorithm.named_parameters():
            values = [n.get(name) for n in named]
            if any(v is None or v.shape != p.shape for v in values):
                raise DGKitError(f"the runs' networks differ at {name}: a soup averages the weights "
                                 "of runs of one architecture (the same --model.backbone)")
            p.copy_(torch.stack([v.detach().to(p.dtype) for v in values]).mean(0))
    if norm_layers(out.algorithm):
        torch.manual_seed(0)
        loader = data.source_eval_dataloader(include_holdout=False)
        recompute_batchnorm(out.algorithm, (x for x, *_ in loader))
    out.eval()
    return out


def build(method: str, members: list[Member], out: Path) -> tuple[Any, Any, dict[str, Any]]:
    """The ensemble's module, its data module and what ``ensemble.json`` says about it."""
    from dgkit.module import DGModule

    data = _data(members[0])
    modules = [_load(m) for m in members]
    info: dict[str, Any] = {"method": METHODS[method], "candidates": len(members),
                            "members": [m.name for m in members],
                            "algorithm_class": type(modules[0].algorithm).__name__}
    if method == "eoa":
        adapting = [type(m.algorithm).__name__ for m in modules if m.algorithm.adapts_at_test]
        if adapting:
            raise DGKitError(f"{adapting[0]} adapts at test time, which an output ensemble of its "
                             "runs would not run: use --method uniform or greedy (a soup runs it)")
        first = modules[0]
        algorithms = [m.algorithm for m in modules]
        module = DGModule(algorithm=lambda task, backbone: OutputEnsemble(task, backbone, algorithms),
                          task=first.task, backbone=first.hparams.backbone, metrics=first.hparams.metrics)
        module.eval()
        return module, data, info
    inits = {m.init_from for m in members}
    info["shared_init"] = inits.pop() if len(inits) == 1 else None
    if method == "uniform":
        return soup(modules, data), data, info
    scores = [_validation_score(m, data, out) for m in modules]
    order = sorted(range(len(members)), key=lambda i: -scores[i])
    kept, best = [order[0]], scores[order[0]]
    for i in order[1:]:
        score = _validation_score(soup([modules[j] for j in [*kept, i]], data), data, out)
        if score >= best:
            kept, best = [*kept, i], score
    info.update({"members": [members[i].name for i in kept],
                 "validation": {members[i].name: scores[i] for i in order},
                 "soup_validation": best})
    return soup([modules[i] for i in kept], data), data, info


def evaluate(method: str, members: list[Member], out: Path, seed: int = 0) -> dict:
    """Build and test one ensemble; writes ``ensemble.json`` and ``test_results.json`` in ``out``."""
    from lightning import seed_everything

    from dgkit.results import collect_results, print_results, write_results

    out.mkdir(parents=True, exist_ok=True)
    seed_everything(seed, verbose=False)
    module, data, info = build(method, members, out)
    trainer = _trainer(out)
    trainer.test(module, datamodule=data, verbose=False)
    info.update({"algorithm": members[0].algorithm, "test_domain": members[0].test_domain,
                 "split": members[0].split, "size": len(info["members"])})
    results = collect_results(trainer.callback_metrics, module.task, algorithm=info.pop("algorithm_class"),
                              ckpt_path=None, seed=seed, transductive=module.task.transductive,
                              ensemble=info)
    print_results(results)
    write_results(results, out)
    (out / ENSEMBLE_FILE).write_text(json.dumps(info, indent=2))
    return results


def folder_of(directory: Path, method: str, group: tuple[str, str, int]) -> Path:
    algorithm, domain, split = group
    return directory / FOLDER / method / algorithm / domain / f"split{split}"


def load_ensembles(directory: Path) -> list[dict]:
    """Every ensemble written under ``directory``: its ``ensemble.json`` with the results."""
    out = []
    for path in sorted((directory / FOLDER).glob(f"*/*/*/*/{ENSEMBLE_FILE}")):
        results_file = path.parent / "test_results.json"
        if results_file.is_file():
            out.append({**json.loads(path.read_text()), "results": json.loads(results_file.read_text())})
    return out


def ensemble_rows(directory: Path, metric: str = "accuracy") -> dict[str, dict[str, tuple]]:
    """``"alias + METHOD of N" -> {domain|"Avg": (mean, se, n)}`` over data splits, as
    ``dgkit report`` lays out a table row (the average over domains per split first)."""
    from dgkit.report import mean_se

    by_row: dict[str, dict[tuple[str, int], float]] = {}
    sizes: dict[str, set[int]] = {}
    for e in load_ensembles(directory):
        value = e["results"]["domains"].get(e["test_domain"], {}).get(metric)
        if value is None:
            continue
        key = (e["algorithm"], e["method"])
        by_row.setdefault(key, {})[(e["test_domain"], e["split"])] = value
        sizes.setdefault(key, set()).add(e["candidates"])
    rows = {}
    for key, values in by_row.items():
        n = sorted(sizes[key])
        label = f"{key[0]} + {key[1]} of {n[0]}" + (f"-{n[-1]}" if len(n) > 1 else "")
        domains = sorted({d for d, _ in values}, key=lambda d: (len(d), d))
        row = {d: (*mean_se([v for (dd, _), v in values.items() if dd == d]),
                   sum(dd == d for dd, _ in values)) for d in domains}
        splits = sorted({s for _, s in values})
        averages = [statistics.fmean(values[(d, s)] for d in domains) for s in splits
                    if all((d, s) in values for d in domains)]
        if averages:
            row["Avg"] = (*mean_se(averages), len(averages))
        rows[label] = row
    return rows


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="dgkit ensemble", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dir", help="a sweep folder (dgkit sweep --dir)")
    parser.add_argument("--method", choices=list(METHODS), default="eoa")
    parser.add_argument("--algos", nargs="+", help="the algorithms to ensemble (default: every one)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    quiet_dependencies()
    # An output ensemble's members cannot go into its hparams, and nothing saves them.
    warnings.filterwarnings("ignore", message="Attribute 'algorithm' removed from hparams")
    # Each evaluation builds a trainer, whose accelerator lines would repeat for every one.
    logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)
    directory = Path(args.dir)
    if not directory.is_dir():
        raise DGKitError(f"no sweep folder at {str(directory)!r}; give the --dir of a `dgkit sweep`")
    for group, members in sorted(find_members(directory, args.algos).items()):
        out = folder_of(directory, args.method, group)
        print(f"{METHODS[args.method]} of {len(members)} {group[0]} run(s) held out on {group[1]}, "
              f"split {group[2]}:")
        evaluate(args.method, members, out, args.seed)
    print(f"written under {directory / FOLDER / args.method}; `dgkit report {directory}` puts them "
          "into its tables")
