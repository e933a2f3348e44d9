"""DomainBed's hyperparameter search (Gulrajani and Lopez-Paz, ICLR 2021, Appendix D): each
algorithm declares its distributions beside its signature (``Algorithm.search_space``), the
shared ones (learning rate, batch size, weight decay, dropout) are here, and every draw is
seeded as DomainBed's ``hparams_registry`` seeds it, from the setting's random seed and the
hyperparameter's DomainBed name, so the same seeds give DomainBed's values.

``dgkit sweep --random N --trials K`` runs the protocol: setting 0 is the defaults, setting
``h > 0`` of trial ``t`` draws with the seed ``seed_hash(h, t)``, as DomainBed's
``train.py`` does.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

#: DomainBed's SMALL_IMAGES, by dgkit's aliases
SMALL_IMAGES = ("rotated_mnist", "colored_mnist")
#: dgkit's data set aliases -> DomainBed's data set names
DOMAINBED_NAMES = {"rotated_mnist": "RotatedMNIST", "colored_mnist": "ColoredMNIST",
                   "officehome": "OfficeHome", "pacs": "PACS", "vlcs": "VLCS",
                   "terraincognita": "TerraIncognita", "domainnet": "DomainNet"}


def seed_hash(*args: Any) -> int:
    """DomainBed's ``misc.seed_hash``: an integer seed from any arguments."""
    return int(hashlib.md5(str(args).encode("utf-8")).hexdigest(), 16) % (2 ** 31)


@dataclass(frozen=True)
class Hyperparameter:
    """One searched setting: the ``dgkit fit`` key it sets, its default, and its random draw
    from a ``numpy.random.RandomState`` seeded by DomainBed's name for it."""

    key: str
    default: Any
    draw: Callable[[np.random.RandomState], Any]
    #: DomainBed's name (it seeds the draw); by default the key's last part
    name: str = ""
    #: what a DomainBed value becomes here (EQRM's float burn-in -> whole steps)
    from_domainbed: Callable[[Any], Any] | None = None

    @property
    def domainbed_name(self) -> str:
        return self.name or self.key.rsplit(".", 1)[-1]

    def value(self, random_seed: int | None) -> Any:
        """The default (``random_seed`` None) or the draw for that seed, as a Python value."""
        if random_seed is None:
            return self.default
        drawn = self.draw(np.random.RandomState(seed_hash(random_seed, self.domainbed_name)))
        return drawn.item() if isinstance(drawn, np.generic) else drawn


def log_uniform(low: float, high: float) -> Callable[[np.random.RandomState], float]:
    """DomainBed's ``10 ** r.uniform(low, high)``."""
    return lambda r: 10 ** r.uniform(low, high)


def hp(argument: str, default: Any, draw: Callable[[np.random.RandomState], Any], name: str = "",
       from_domainbed: Callable[[Any], Any] | None = None) -> Hyperparameter:
    """An algorithm's own hyperparameter, ``--model.algorithm.<argument>``."""
    return Hyperparameter(f"model.algorithm.{argument}", default, draw, name, from_domainbed)


def shared(alias: str, dataset: str) -> list[Hyperparameter]:
    """The hyperparameters every DomainBed algorithm searches, for this data set."""
    small = dataset in SMALL_IMAGES
    out = []
    if not small:  # DomainBed's resnet_dropout acts only on its ResNet featurizer
        out.append(Hyperparameter("model.dropout", 0.0, lambda r: r.choice([0.0, 0.1, 0.5]),
                                  "resnet_dropout"))
    if small:
        out.append(Hyperparameter("model.optimizer.lr", 1e-3, lambda r: 10 ** r.uniform(-4.5, -2.5), "lr"))
        out.append(Hyperparameter("model.optimizer.weight_decay", 0.0, lambda r: 0.0, "weight_decay"))
        out.append(Hyperparameter("data.batch_size", 64, lambda r: int(2 ** r.uniform(3, 9)), "batch_size"))
        return out
    out.append(Hyperparameter("model.optimizer.lr", 5e-5, lambda r: 10 ** r.uniform(-5, -3.5), "lr"))
    out.append(Hyperparameter("model.optimizer.weight_decay", 0.0, lambda r: 10 ** r.uniform(-6, -2),
                              "weight_decay"))
    if alias == "arm":
        out.append(Hyperparameter("data.batch_size", 8, lambda r: 8, "batch_size"))
    elif dataset == "domainnet":
        out.append(Hyperparameter("data.batch_size", 32, lambda r: int(2 ** r.uniform(3, 5)), "batch_size"))
    else:
        out.append(Hyperparameter("data.batch_size", 32, lambda r: int(2 ** r.uniform(3, 5.5)), "batch_size"))
    return out


def space(alias: str, algorithm: type, dataset: str) -> list[Hyperparameter]:
    """The shared hyperparameters, then the algorithm's own; an algorithm's entry replaces a
    shared one with the same key (DANN's generator lr replaces the lr)."""
    own = list(algorithm.search_space(dataset)) if hasattr(algorithm, "search_space") else []
    keys = {h.key for h in own}
    return [h for h in shared(alias, dataset) if h.key not in keys] + own


def setting(alias: str, algorithm: type, dataset: str, random_seed: int | None) -> dict[str, Any]:
    """``key -> value`` of one setting: the defaults, or the draws for ``random_seed``."""
    return {h.key: h.value(random_seed) for h in space(alias, algorithm, dataset)}


def cli_value(value: Any) -> str:
    """A value as ``dgkit fit`` reads it back exactly (floats by ``repr``)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    return str(value)
