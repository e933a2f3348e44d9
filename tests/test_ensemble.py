"""``dgkit ensemble`` checked against ensembles computed here from the members' checkpoints:
EoA is the members' mean logits, a uniform soup the model of their mean weights, a greedy
soup keeps a member only when the soup's validation score does not drop."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import inside

from dgkit.cli import main
from dgkit.ensemble import find_members, soup
from dgkit.module import DGModule

SWEEP = ["sweep", "--dir", "s", "--algos", "erm", "--test-domains", "0", "--seeds", "0", "1", "2",
         "--", "--data", "rotated_mnist", "--model.backbone", "mlp", "--data.batch_size", "16",
         "--trainer.max_steps", "20", "--trainer.val_check_interval", "10",
         "--trainer.check_val_every_n_epoch", "null", "--trainer.enable_progress_bar", "false",
         "--trainer.enable_model_summary", "false"]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    with inside(tmp_path_factory.mktemp("ensemble")) as folder:
        main(SWEEP)
        for method in ("eoa", "uniform", "greedy"):
            main(["ensemble", "s", "--method", method])
    return folder / "s"


def _written(sweep, method):
    folder = sweep / "ensembles" / method / "erm" / "0" / "split0"
    return (json.loads((folder / "ensemble.json").read_text()),
            json.loads((folder / "test_results.json").read_text())["domains"]["0"]["accuracy"])


def _members(sweep):
    (members,) = find_members(sweep).values()
    return members


def _test_batches(member):
    from dgkit.data import DomainDataModule

    data = DomainDataModule.load_from_checkpoint(member.checkpoint)
    data.prepare_data()
    data.setup("test")
    loaders = data.test_dataloader()
    return data, list(loaders[0] if isinstance(loaders, list) else loaders)


def _accuracy(logits_of, batches) -> float:
    with torch.no_grad():
        right = sum((logits_of(x).argmax(1) == y).sum().item() for x, y, *_ in batches)
    return right / sum(len(y) for _, y, *_ in batches)


def _networks(members):
    return [DGModule.load_from_checkpoint(m.checkpoint, map_location="cpu").algorithm.eval()
            for m in members]


def test_eoa_is_the_mean_of_the_members_logits(sweep):
    members = _members(sweep)
    _, batches = _test_batches(members[0])
    networks = _networks(members)
    expected = _accuracy(lambda x: torch.stack([n(x) for n in networks]).mean(0), batches)
    info, accuracy = _written(sweep, "eoa")
    assert info["size"] == 3 and len(info["members"]) == 3
    assert accuracy == pytest.approx(expected, abs=1e-6)
    # An ensemble of different members is not any single member (they disagree somewhere).
    singles = [_accuracy(n, batches) for n in networks]
    assert len(set(singles)) > 1


def test_a_uniform_soup_is_the_model_of_the_mean_weights(sweep):
    members = _members(sweep)
    _, batches = _test_batches(members[0])
    networks = _networks(members)
    mean = {name: torch.stack([dict(n.named_parameters())[name].detach() for n in networks]).mean(0)
            for name, _ in networks[0].named_parameters()}
    averaged = networks[0]
    with torch.no_grad():
        for name, p in averaged.named_parameters():
            p.copy_(mean[name])
    info, accuracy = _written(sweep, "uniform")
    assert info["size"] == 3 and info["shared_init"] is None
    assert accuracy == pytest.approx(_accuracy(averaged, batches), abs=1e-6)


def test_a_greedy_soup_adds_members_in_order_of_their_validation_while_it_does_not_drop(sweep):
    info, accuracy = _written(sweep, "greedy")
    scores = list(info["validation"].values())
    assert scores == sorted(scores, reverse=True)  # tried best first
    assert info["members"][0] == next(iter(info["validation"]))  # the best member always kept
    assert info["soup_validation"] >= scores[0]
    members = {m.name: m for m in _members(sweep)}
    if info["size"] == 1:  # the best member alone: its own test accuracy
        (only,) = info["members"]
        _, batches = _test_batches(members[only])
        assert accuracy == pytest.approx(_accuracy(_networks([members[only]])[0], batches), abs=1e-6)


def test_a_soup_of_one_model_twice_is_that_model(sweep):
    member = _members(sweep)[0]
    data, _ = _test_batches(member)
    data.setup("fit")
    module = DGModule.load_from_checkpoint(member.checkpoint, map_location="cpu")
    twice = soup([module, module], data)
    for (name, p), q in zip(module.algorithm.named_parameters(), twice.algorithm.parameters(), strict=True):
        assert torch.equal(p, q), name
