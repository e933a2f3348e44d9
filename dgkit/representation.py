"""Starting one algorithm from another's representation (``--model.init_from CKPT``).

A checkpoint names, under ``dgkit_representation``, which of its weights are the
exporting algorithm's featurizer and classifier (``Algorithm.representation()``; Bonsai
exports its synthesis network and the mean of its task heads). Loading copies that
featurizer into *every* featurizer of the new algorithm (all of D-BAT's members, DRM's
shared one) and the classifier into its ``classifiers()``, and can freeze the
featurizers -- the "(cf)" setting of Zhang et al., where only the heads train.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from dgkit.algorithm import Algorithm
from dgkit.checkpoint_io import read_checkpoint
from dgkit.errors import ConfigError, DGKitError
from dgkit.networks import Featurizer
from dgkit.results import ResultsContributor

CHECKPOINT_KEY = "dgkit_representation"
DEFAULT_PREFIXES = {"featurizer": "algorithm.featurizer", "classifier": "algorithm.classifier"}


def representation_prefixes(algorithm: Algorithm, owner: str = "algorithm") -> dict[str, str] | None:
    """State-dict prefixes of ``algorithm``'s exported networks, or None if it has none."""
    try:
        featurizer, classifier = algorithm.representation()
    except DGKitError:  # an algorithm without a single featurizer simply exports nothing
        return None
    names = {id(m): name for name, m in algorithm.named_modules()}
    prefixes = {"featurizer": f"{owner}.{names[id(featurizer)]}"}
    if classifier is not None and id(classifier) in names:
        prefixes["classifier"] = f"{owner}.{names[id(classifier)]}"
    return prefixes


def _sub_state(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) + 1:]: v for k, v in state.items() if k.startswith(prefix + ".")}


def load_representation(algorithm: Algorithm, path: str | Path, freeze: bool = False) -> dict:
    """Initialize ``algorithm`` from the representation in checkpoint ``path``; returns
    what was loaded where (for the log and the results)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError("model.init_from", f"no checkpoint at {str(path)!r}",
                          "a .ckpt written by `dgkit fit` (e.g. a Bonsai run's best or last)")
    try:
        checkpoint = read_checkpoint(path)  # never unpickles code, whoever wrote the file
    except DGKitError as exc:
        raise ConfigError("model.init_from", str(exc), "a .ckpt written by `dgkit fit`") from None
    state = checkpoint["state_dict"]
    prefixes = checkpoint.get(CHECKPOINT_KEY) or DEFAULT_PREFIXES
    featurizer_state = _sub_state(state, prefixes["featurizer"])
    if not featurizer_state:
        raise ConfigError("model.init_from", f"{path} holds no featurizer under "
                          f"{prefixes['featurizer']!r}", "a checkpoint of an algorithm with a featurizer")
    report: dict = {"checkpoint": str(path), "featurizer_from": prefixes["featurizer"],
                    "featurizer_into": [], "classifier_into": [], "frozen": freeze}
    for name, module in algorithm.named_modules():
        if isinstance(module, Featurizer):
            _load(module, featurizer_state, "featurizer", path)
            report["featurizer_into"].append(name)
            if freeze:
                module.requires_grad_(False)
                module.freeze_bn = True  # frozen means frozen: BatchNorm statistics too
    if not report["featurizer_into"]:
        raise ConfigError("model.init_from", f"{type(algorithm).__name__} has no featurizer "
                          "to initialize", "an algorithm built with build_featurizer()")
    classifier_state = _sub_state(state, prefixes["classifier"]) if "classifier" in prefixes else {}
    if classifier_state:
        report["classifier_from"] = prefixes["classifier"]
        for name, module in algorithm.classifiers().items():
            _load(module, classifier_state, "classifier", path)
            report["classifier_into"].append(name)
    return report


def _load(module: nn.Module, state: dict[str, torch.Tensor], what: str, path: Path) -> None:
    try:
        module.load_state_dict(state)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[1:2] or [str(exc)]
        raise ConfigError("model.init_from", f"the {what} in {path} does not fit this model "
                          f"({first[0].strip()})", "the same --model.backbone and data set as the "
                          "run that wrote it") from None


class InitFrom(Callback, ResultsContributor):
    """``--model.init_from CKPT``: loads the representation when ``fit`` sets up, before a
    resumed checkpoint is restored (so resuming keeps the resumed weights); evaluating
    uses the checkpoint being evaluated."""

    def __init__(self, checkpoint: str, freeze: bool = False):
        self.checkpoint, self.freeze = checkpoint, freeze
        self.report: dict[str, Any] | None = None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit" or self.report is not None:
            return
        r = self.report = load_representation(pl_module.algorithm, self.checkpoint, self.freeze)
        rank_zero_info(
            f"init_from {r['checkpoint']}: featurizer ({r['featurizer_from']}) loaded into "
            f"{', '.join(r['featurizer_into'])}"
            + (f"; classifier ({r['classifier_from']}) into {', '.join(r['classifier_into'])}"
               if r["classifier_into"] else "; no classifier loaded")
            + ("; featurizer frozen" if r["frozen"] else ""))

    def results_entries(self) -> dict[str, Any]:
        return {"init_from": self.report} if self.report else {}
