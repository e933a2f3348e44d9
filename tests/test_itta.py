import json

import torch
from helpers import make_task, plain_optimization, train

from dgkit.adaptation import TestTimeStage
from dgkit.algorithm import Batch
from dgkit.cli import main
from dgkit.data import DomainDataModule
from dgkit.data.mnist import RotatedMNIST
from dgkit.networks import Backbone
from dgkit_algorithms.itta import ITTA

TASK = make_task(backbone="mnist_cnn")


def _fresh(seed=0):
    torch.manual_seed(seed)
    return ITTA(TASK, Backbone()).eval()


def _images(n, seed=1):
    return torch.rand(n, 1, 28, 28, generator=torch.Generator().manual_seed(seed))


def _trained_state(algo):
    return {n: p.detach().clone() for n, p in algo.named_parameters() if not n.startswith("adaptive")}


def test_adaptive_parameters_start_as_the_identity():
    algo, x = _fresh(), _images(4)
    z, _ = algo.two_stream(x, adapted=True, augment=False)
    torch.testing.assert_close(algo.classifier(z), algo(x))


def test_only_the_adaptive_parameters_move_at_test_time():
    algo, x = _fresh(), _images(8)
    before, adaptive = _trained_state(algo), [p.detach().clone() for p in algo.adaptive.parameters()]
    with torch.enable_grad():
        algo.adapt(x)
    for name, value in _trained_state(algo).items():
        assert torch.equal(value, before[name]), name
    assert any(not torch.equal(a, b) for a, b in zip(adaptive, algo.adaptive.parameters(), strict=True))


def test_batch_of_one_makes_the_test_step_nearly_a_no_op():
    """MixStyle mixes a sample with a permutation of its batch: with one sample there is
    nothing to mix, so the consistency gradient (and the reference's step) vanishes."""
    def movement(n):
        algo = _fresh()
        start = [p.detach().clone() for p in algo.adaptive.parameters()]
        with torch.enable_grad():
            algo.adapt(_images(n))
        return max((p - s).abs().max().item() for p, s in zip(algo.adaptive.parameters(), start, strict=True))

    assert movement(1) < 0.01 * movement(8)


def test_each_domain_starts_from_the_trained_state():
    algo = _fresh()
    stage = TestTimeStage(algo)
    stage.begin(lambda: [])
    a, b = _images(8, seed=2), _images(8, seed=3)
    torch.manual_seed(5)
    first = stage.predict(("B",), b)
    for _ in range(3):
        stage.predict(("A",), a)
    torch.manual_seed(5)
    after_a = stage.predict(("B again",), b)
    torch.testing.assert_close(first, after_a)  # A's adaptation (and Adam state) did not leak
    stage.end()
    fresh = _fresh()
    for (name, p), q in zip(algo.named_parameters(), fresh.parameters(), strict=True):
        assert torch.equal(p, q), name


def test_training_step_updates_each_part_with_its_own_optimizer():
    algo = _fresh().train()
    main = torch.optim.Adam(algo.parameter_groups(), lr=1e-3)
    w_opt = torch.optim.Adam(algo.consistency.parameters(), lr=1e-4)
    handle = plain_optimization(main)
    handle.optimizers.append(w_opt)
    adaptive = [p.detach().clone() for p in algo.adaptive.parameters()]
    consistency = [p.detach().clone() for p in algo.consistency.parameters()]
    feats = [p.detach().clone() for p in algo.featurizer.parameters()]
    out = algo.training_update(Batch(_images(16), torch.arange(16) % 10, torch.zeros(16, dtype=torch.long)),
                               handle)
    assert all(torch.isfinite(v) for v in out.values())
    assert any(not torch.equal(a, b) for a, b in zip(feats, algo.featurizer.parameters(), strict=True))
    assert any(not torch.equal(a, b) for a, b in zip(consistency, algo.consistency.parameters(), strict=True))
    assert all(torch.equal(a, b) for a, b in zip(adaptive, algo.adaptive.parameters(), strict=True))


def test_lightning_test_adapts_with_gradients_and_restores_the_weights():
    data = DomainDataModule(RotatedMNIST(), test_domains=["60", "75"], batch_size=8,
                            eval_batch_size=64)
    model = train(ITTA, 2, data=data, backbone="mnist_cnn")
    trained = {n: p.detach().clone() for n, p in model.algorithm.named_parameters()}
    results = {k: v for per_loader in model.trainer.test(model, datamodule=data, verbose=False)
               for k, v in per_loader.items()}
    assert {"test/accuracy/60", "test/accuracy/75", "test_unadapted/accuracy/75"} <= set(results)
    for name, p in model.algorithm.named_parameters():
        assert torch.equal(p, trained[name]), name


def test_itta_runs_through_the_cli(tmp_path):
    main(["fit", "--algo", "itta", "--trainer.max_steps", "2", "--trainer.limit_val_batches", "1",
          "--trainer.limit_test_batches", "2", "--data.batch_size", "8",
          "--trainer.enable_progress_bar", "false"])
    (path,) = tmp_path.glob("runs/*/test_results.json")
    assert "accuracy (no adaptation)" in json.loads(path.read_text())["domains"]["75"]


def test_a_checkpoint_s_test_optimizer_takes_this_run_s_test_lr():
    """The saved moments come back, but the lr is the one this ITTA was built with (a
    test-time hyperparameter ``dgkit test`` may change), not the one saved beside them."""
    trained, x = _fresh(), _images(8)
    with torch.enable_grad():
        trained.adapt(x)
    state = trained.state_dict()
    torch.manual_seed(0)
    again = ITTA(TASK, Backbone(), test_lr=0.5)
    again.load_state_dict(state)
    assert again._test_optimizer.param_groups[0]["lr"] == 0.5
    assert again._test_optimizer.state_dict()["state"]  # the moments came with it
