"""The unlabeled stream and the multi-hypothesis algorithms (DivDis, D-BAT): mechanics,
and a head that follows shape rather than colour on a spurious-colour problem."""

import json
import math

import pytest
import torch
from helpers import make_task, train

from dgkit.algorithm import Batch, Progress
from dgkit.cli import main
from dgkit.data import DomainDataModule
from dgkit.data.mnist import ColoredMNIST
from dgkit.errors import DGKitError
from dgkit.networks import Backbone
from dgkit_algorithms import DBAT, ERM, DivDis
from dgkit_algorithms.diversify import pairwise_mutual_information

TASK = make_task((2, 28, 28), 2, unlabeled="source_holdout")


def test_unlabeled_target_stream_has_no_labels_and_never_the_test_images():
    data = DomainDataModule(ColoredMNIST(), batch_size=8, unlabeled="target")
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    assert len(batch["sources"]) == 2 and torch.is_tensor(batch["unlabeled"])
    assert batch["unlabeled"].shape == (16, 2, 28, 28)  # images only, batch of the labelled size
    seeded = data.train_dataloader().dataset.streams[-1]  # the unlabeled pool, last
    (unlabeled,) = seeded.data.data.datasets  # Seeded(ImagesOnly(ConcatDataset([...])))
    test_subset = data.splits[data.test_indices[0]][0]
    assert unlabeled is data.splits[data.test_indices[0]][1]  # the oracle split, not the test one
    assert not set(unlabeled.indices) & set(test_subset.indices)
    assert data.task.transductive and not DomainDataModule(ColoredMNIST()).task.transductive


def test_mutual_information_of_heads():
    identical = torch.eye(2).repeat(50, 1).view(100, 1, 2).expand(100, 2, 2)
    assert pairwise_mutual_information(identical).item() == pytest.approx(math.log(2), abs=1e-4)
    independent = torch.stack([torch.eye(2).repeat(50, 1), torch.eye(2).repeat_interleave(50, 0)], 1)
    assert pairwise_mutual_information(independent).item() == pytest.approx(0.0, abs=1e-4)


def test_divdis_needs_unlabeled_data():
    algo = DivDis(TASK, Backbone())
    with pytest.raises(DGKitError, match=r"--data\.unlabeled"):
        algo.training_loss(Batch(torch.rand(4, 2, 28, 28), torch.zeros(4, dtype=torch.long),
                                 torch.zeros(4, dtype=torch.long)))


def test_target_queries_pick_the_head_that_is_right_where_heads_disagree():
    algo = DivDis(TASK, Backbone(), heads=2, num_queries=4)
    x = torch.rand(8, 2, 28, 28)
    y = torch.tensor([0, 1, 0, 1, 0, 1, 0, 1])
    right = torch.nn.functional.one_hot(y, 2).float() * 10
    wrong = torch.nn.functional.one_hot(1 - y, 2).float() * 10
    algo.head_logits = lambda x: torch.stack([wrong, right], 1)
    choice = algo.choose_head([(x, y)])
    assert choice["selected_head"] == 1 and choice["labels_used"] == 4
    assert int(algo.selected_head) == 1


def test_dbat_trains_its_models_one_after_another():
    algo = DBAT(TASK, Backbone(), models=2)
    batch = Batch(torch.rand(8, 2, 28, 28), torch.arange(8) % 2, torch.zeros(8, dtype=torch.long),
                  unlabeled=torch.rand(8, 2, 28, 28))
    for step, stage in ((0, 0), (3, 0), (4, 1), (7, 1)):
        algo.progress = Progress(step=step, total_steps=8)
        algo.zero_grad(set_to_none=True)
        out = algo.train().training_loss(batch)
        out["loss"].backward()
        assert algo.stage == stage
        trained = [p.grad is not None for p in algo.members[stage].parameters()]
        others = [p.grad is not None for i, m in enumerate(algo.members) if i != stage
                  for p in m.parameters()]
        assert all(trained) and not any(others)  # only the current model learns
        assert ("disagreement" in out) == (stage > 0)
    assert not algo.members[0].training and algo.members[1].training  # earlier model frozen


@pytest.mark.parametrize(("algo", "unlabeled"), [
    ("divdis", ["target"]), ("dbat", ["target"]),
    ("divdis", ["crafted", "--data.unlabeled_shifts", "[blur]"]),
])
def test_through_the_cli_logs_heads_and_marks_transductive(algo, unlabeled, tmp_path):
    main(["fit", "--algo", algo, "--data", "colored_mnist", "--data.unlabeled", *unlabeled,
          "--model.backbone", "mlp", "--trainer.max_steps", "5", "--trainer.enable_progress_bar", "false"])
    (path,) = tmp_path.glob("runs/*/test_results.json")
    results = json.loads(path.read_text())
    assert results["transductive"] is (unlabeled[0] == "target")
    assert {"accuracy", "accuracy_head0", "accuracy_head1"} <= set(results["domains"]["-90%"])
    assert results["head_selection"]["by"] == "target_queries"
    hparams = (next(tmp_path.glob("runs/*/hparams.yaml"))).read_text()
    assert f"unlabeled: {unlabeled[0]}" in hparams


@pytest.fixture(scope="module")
def spurious_colour():
    """Colored MNIST with a fourth domain where colour says nothing about the label:
    trained on +90%/+80%, unlabeled pool 50%, tested on -90%. A shape-based hypothesis is
    independent of the colour-based one exactly on the unlabeled pool."""
    data = DomainDataModule(ColoredMNIST(color_agreement=[0.9, 0.8, 0.5, 0.1]), batch_size=64,
                            unlabeled="domains", unlabeled_domains=["50%"])
    erm = train(ERM, 600, data=data).algorithm
    return data, _head_accuracy(erm, data)[0]


def _head_accuracy(algo, data):
    data.setup("test")
    xs, ys = zip(*data.test_dataloader()[0], strict=True)
    with torch.no_grad():
        heads = algo.eval().head_logits(torch.cat(xs)).argmax(-1)
    return (heads == torch.cat(ys)[:, None]).float().mean(0).tolist()


def _assert_a_shape_head_is_found_and_picked(algo, data, erm_accuracy):
    accuracy = _head_accuracy(algo, data)
    best = max(range(len(accuracy)), key=accuracy.__getitem__)
    assert accuracy[best] > erm_accuracy + 0.2, (accuracy, erm_accuracy)
    oracle = [(x, y) for loader in data.val_dataloader()[data.task.num_domains:] for x, y in loader]
    assert algo.choose_head(oracle)["selected_head"] == best  # 16 queried labels suffice


def test_divdis_learns_a_head_that_ignores_the_colour(spurious_colour):
    data, erm_accuracy = spurious_colour
    assert data.task.source_domains == ("+90%", "+80%") and not data.task.transductive
    _assert_a_shape_head_is_found_and_picked(train(DivDis, 600, data=data).algorithm, data,
                                             erm_accuracy)


def test_dbat_second_model_ignores_the_colour(spurious_colour):
    data, erm_accuracy = spurious_colour
    _assert_a_shape_head_is_found_and_picked(train(DBAT, 1000, data=data).algorithm, data,
                                             erm_accuracy)
