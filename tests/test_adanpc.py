import copy

import pytest
import torch
from helpers import make_task, train

from dgkit.adaptation import TestTimeStage
from dgkit.data import DomainDataModule
from dgkit.data.mnist import RotatedMNIST
from dgkit.errors import ConfigError
from dgkit.networks import Backbone
from dgkit_algorithms import SAM, AdaNPC

TASK = make_task()


@pytest.fixture(scope="module")
def trained_once():
    """ERM features trained on 0-30 degrees; 45, 60 and 75 are held out."""
    data = DomainDataModule(RotatedMNIST(), test_domains=["45", "60", "75"], batch_size=16,
                            eval_batch_size=32)
    return data, train(AdaNPC, 150, data=data, backbone="mnist_cnn", k=10).algorithm


@pytest.fixture
def trained(trained_once):
    """A copy of the trained model of its own for each test (they change beta and the
    memory), with its test-time stage open."""
    data, algo = trained_once
    algo = copy.deepcopy(algo).eval()
    stage = TestTimeStage(algo)
    stage.begin(lambda: data.source_eval_dataloader(include_holdout=True))
    yield data, algo, stage
    stage.end()


def _stream_accuracy(stage, loaders, beta):
    stage.algorithm.beta = beta
    accuracies = []
    for loader in loaders:
        correct = total = 0
        for x, y in loader:
            correct += (stage.predict(("drift", beta), x).argmax(1) == y).sum().item()
            total += len(y)
        accuracies.append(correct / total)
    return accuracies


def test_memory_absorbing_a_drifting_stream_beats_the_same_model_without_it(trained):
    """Digits turning from 45 to 60 to 75 degrees in one stream: with adaptation the kNN
    memory takes in confident test features; without it (beta > 1) it keeps only source
    features. The gain grows as the stream drifts away from the source."""
    data, algo, stage = trained
    loaders = data.test_dataloader()
    adapted = _stream_accuracy(stage, loaders, beta=0.5)
    absorbed = len(algo.memory) - algo.base_size
    frozen = _stream_accuracy(stage, loaders, beta=1.1)
    assert len(algo.memory) == algo.base_size  # nothing entered without adaptation
    gains = [a - f for a, f in zip(adapted, frozen, strict=True)]
    assert absorbed > 1000
    assert gains[-1] > 0.03 and gains[-1] > gains[0], (adapted, frozen)


def test_prediction_is_made_before_the_batch_enters_memory(trained):
    data, algo, stage = trained
    x, _ = next(iter(data.test_dataloader()[2]))
    algo.beta = 0.0
    first = stage.predict(("a",), x)
    algo.beta = 1.1
    again = stage.predict(("b",), x)  # a new stream: the memory was restored in between
    torch.testing.assert_close(first, again)


def test_domains_never_see_each_others_adaptation(trained):
    data, algo, stage = trained
    algo.beta = 0.0
    loaders = data.test_dataloader()
    x75, _ = next(iter(loaders[2]))
    alone = stage.predict(("75",), x75)
    for x, _ in loaders[0]:
        stage.predict(("45",), x)
    after_other = stage.predict(("75 again",), x75)
    torch.testing.assert_close(alone, after_other)
    stage.end()
    assert len(algo.memory) == algo.base_size  # trained state back after the evaluation


def test_one_nearest_neighbour_and_reference_confidence():
    algo = AdaNPC(TASK, Backbone(), k=1, temperature=1e-3, confidence="reference", beta=0.2)
    algo.memory = torch.nn.functional.normalize(torch.eye(3, 8), dim=1)
    algo.memory_labels = torch.tensor([2, 0, 1])
    algo.base_size = 3
    q = torch.nn.functional.normalize(torch.tensor([[0.1, 1.0] + [0.0] * 6]), dim=1)
    assert algo.vote(q).argmax(1).item() == 0  # the label of its single nearest entry
    # Reference confidence is a softmax of the votes: at most e/(e+C-1) = 0.31 for 10 classes.
    algo.embed = lambda x: x
    algo.adapt(q)
    assert len(algo.memory) == 4
    algo.beta = 0.35
    algo.adapt(q)
    assert len(algo.memory) == 4


def test_memory_cap_keeps_the_newest_test_entries():
    algo = AdaNPC(TASK, Backbone(), k=1, beta=0.0, memory_cap=2)
    algo.memory, algo.memory_labels, algo.base_size = torch.eye(2, 4), torch.tensor([0, 1]), 2
    algo.embed = lambda x: torch.nn.functional.normalize(x, dim=1)
    for i in range(3):
        algo.adapt(torch.eye(4)[2 + i % 2].unsqueeze(0) + i)
    assert len(algo.memory) == 4 and torch.equal(algo.memory[:2], torch.eye(2, 4))


def test_adanpc_composes_with_any_base_algorithm():
    algo = AdaNPC(TASK, Backbone(), base=SAM)
    assert isinstance(algo.base, SAM) and algo.manual_optimization
    with pytest.raises(ConfigError, match=r"model\.algorithm\.k"):
        AdaNPC(TASK, Backbone(), k=0)


def test_cli_adanpc_on_sam_with_test_time_selection(tmp_path):
    import json

    from dgkit.cli import main

    main(["fit", "--algo", "adanpc", "--model.algorithm.base", "sam", "--model.backbone", "mlp",
          "--model.tta_grid", "{k: [1, 10], beta: [0.5, 1.1]}", "--trainer.max_steps", "20",
          "--trainer.enable_progress_bar", "false"])
    (path,) = tmp_path.glob("runs/*/test_results.json")
    results = json.loads(path.read_text())
    assert set(results["domains"]["75"]) == {"accuracy", "accuracy (no adaptation)"}
    selection = results["test_time_selection"]
    assert len(selection["validation_accuracy"]) == 4
    best = max(selection["validation_accuracy"], key=lambda r: r["accuracy"])
    assert selection["chosen"] == best["config"]  # chosen on source validation accuracy
