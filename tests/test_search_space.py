"""Every algorithm's search space: its defaults are the signature's, and its draws build."""

from __future__ import annotations

import inspect

import pytest
from helpers import make_task

from dgkit import Backbone
from dgkit.plugins import registry
from dgkit.search_space import cli_value, seed_hash, setting, space

ALGORITHMS = sorted(entry.alias for entry in registry("algorithm")
                    if hasattr(entry.obj, "search_space") and entry.obj.search_space("rotated_mnist"))


def test_the_domainbed_algorithms_all_declare_a_search_space():
    assert {"irm", "vrex", "groupdro", "mixup", "mldg", "coral", "mmd", "dann", "cdann", "mtl", "sagnet",
            "rsc", "sd", "andmask", "sandmask", "iga", "fishr", "ib_erm", "ib_irm", "cad", "condcad",
            "transfer", "causirl_coral", "causirl_mmd", "eqrm", "urm", "fish"} <= set(ALGORITHMS)


@pytest.mark.parametrize("alias", ALGORITHMS)
def test_defaults_are_the_signatures_and_every_draw_builds(alias):
    cls = registry("algorithm").get(alias).obj
    parameters = inspect.signature(cls.__init__).parameters
    task = make_task(domains=("a", "b", "c"))
    for h in space(alias, cls, "rotated_mnist"):  # DomainBed's defaults on small images are the signature's
        if h.key.startswith("model.algorithm."):
            default = parameters[h.key.removeprefix("model.algorithm.")].default
            assert default is None or default == h.default, (h.key, default, h.default)
    for dataset in ("rotated_mnist", "officehome"):
        for seed in (None, seed_hash(1, 0), seed_hash(2, 1), seed_hash(7, 2)):
            values = setting(alias, cls, dataset, seed)
            own = {k.removeprefix("model.algorithm."): v for k, v in values.items()
                   if k.startswith("model.algorithm.")}
            cls(task, Backbone("mlp"), **own)  # every draw is a valid setting
            assert all(isinstance(cli_value(v), str) for v in values.values())
