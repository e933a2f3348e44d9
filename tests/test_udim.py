import json
import statistics

import pytest
import torch
from helpers import make_task, plain_optimization, source_batch, train
from torch.func import grad, vmap

from dgkit.algorithm import Batch
from dgkit.cli import main
from dgkit.data import DomainDataModule
from dgkit.data.mnist import RotatedMNIST
from dgkit.networks import Backbone
from dgkit_algorithms import SAM, UDIM
from dgkit_algorithms.udim import fishr_inconsistency, per_sample_classifier_grads

TASK = make_task()


def _batch(n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return Batch(torch.rand(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g),
                 torch.arange(n) % 2)


def test_closed_form_per_sample_grads_match_autograd():
    head = torch.nn.Linear(6, 4)
    z, y = torch.randn(5, 6), torch.tensor([0, 3, 1, 1, 2])

    def loss(w, b, zi, yi):
        return torch.nn.functional.cross_entropy((zi @ w.T + b)[None], yi[None])

    gw, gb = vmap(grad(loss, argnums=(0, 1)), in_dims=(None, None, 0, 0))(head.weight, head.bias, z, y)
    cw, cb = per_sample_classifier_grads(z, head(z), y)
    torch.testing.assert_close(cw, gw)
    torch.testing.assert_close(cb, gb)


def test_penalty_vanishes_when_inputs_are_not_perturbed():
    gw, gb = torch.randn(8, 3, 5), torch.randn(8, 3)
    twice_w, twice_b = torch.cat([gw, gw]), torch.cat([gb, gb])
    norm_only = gw.pow(2).flatten(1).sum(1).mean() / 15 + gb.pow(2).sum(1).mean() / 3
    torch.testing.assert_close(fishr_inconsistency(twice_w, twice_b, 8), norm_only)


@pytest.mark.parametrize("mode", ["batch", "sample"])
def test_input_perturbation_has_the_set_radius(mode):
    udim = UDIM(TASK, Backbone(), rho_x=2.0, perturb_norm=mode)
    b = _batch()
    x_tilde, _, _ = udim.perturb_inputs(b.x, b.y)
    shift = x_tilde - b.x
    if mode == "batch":  # unit norm across the batch at every pixel, times rho_x
        norms = shift.norm(dim=0)
    else:
        norms = shift.flatten(1).norm(dim=1)
    assert norms.max() <= 2.0 + 1e-4 and (norms > 2.0 - 1e-4).float().mean() > 0.9


def test_input_perturbation_ascends_the_sharpness_aware_loss():
    udim = UDIM(TASK, Backbone(), rho_x=0.5, perturb_norm="sample")
    b = _batch()
    params = [p for p in udim.parameters()]

    def objective(x):
        loss = torch.nn.functional.cross_entropy(udim(x), b.y)
        grads = torch.autograd.grad(loss, params)
        return (loss + udim.rho_s * torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads]))).item()

    x_tilde, _, _ = udim.perturb_inputs(b.x, b.y)
    assert objective(x_tilde) > objective(b.x)


def test_without_inconsistency_a_udim_step_is_a_sam_step():
    torch.manual_seed(0)
    udim = UDIM(TASK, Backbone(), lam=0.0, warmup_steps=0)
    sam = SAM(TASK, Backbone())
    sam.load_state_dict(udim.state_dict())
    b = _batch()
    for algo in (udim, sam):
        algo.training_update(b, plain_optimization(torch.optim.SGD(algo.parameters(), lr=0.5)))
    for (name, u), (_, s) in zip(udim.named_parameters(), sam.named_parameters(), strict=True):
        torch.testing.assert_close(u, s, atol=1e-6, rtol=0, msg=name)


class RecordingUDIM(UDIM):
    """UDIM that keeps what each of its steps reported."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.records: list[dict] = []

    def training_update(self, batch, opt):
        out = super().training_update(batch, opt)
        self.records.append({k: float(v) for k, v in out.items()})
        return out


def test_warm_up_is_sam_then_udim_steps():
    records = train(RecordingUDIM, 5, warmup_steps=3).algorithm.records
    assert [r["warmup"] for r in records] == [1, 1, 1, 0, 0]
    assert "inconsistency" in records[-1]


def test_inconsistency_decreases_and_ends_far_below_sams():
    data = DomainDataModule(RotatedMNIST(), batch_size=16)
    udim = train(RecordingUDIM, 200, data=data, warmup_fraction=0.0).algorithm
    sam = train(SAM, 200, data=data).algorithm
    values = [r["inconsistency"] for r in udim.records]
    quarter = len(values) // 4
    assert statistics.mean(values[-quarter:]) < 0.9 * statistics.mean(values[:quarter])

    # The same measurement (UDIM's own perturbation and penalty) on a fixed source batch:
    x, y = source_batch(data, 32)
    domain = torch.arange(5).repeat_interleave(32)
    probe = UDIM(udim.task, udim.backbone)

    def inconsistency(model):
        probe.load_state_dict(model.state_dict())
        x_tilde, _, _ = probe.eval().perturb_inputs(x, y)
        with torch.no_grad():
            return probe.inconsistency(x, x_tilde, y, domain).item()

    assert inconsistency(udim) < 0.1 * inconsistency(sam)


@pytest.mark.parametrize("data", ["colored_mnist", "rotated_mnist"])
def test_udim_runs_end_to_end_through_the_cli(data, tmp_path):
    main(["fit", "--algo", "udim", "--data", data, "--trainer.max_steps", "6",
          "--model.algorithm.warmup_steps", "2", "--trainer.limit_val_batches", "2",
          "--trainer.enable_progress_bar", "false"])
    (results,) = tmp_path.glob("runs/*/test_results.json")
    results = json.loads(results.read_text())
    assert results["algorithm"] == "UDIM" and 0.0 <= results["average"]["accuracy"] <= 1.0


def test_udim_trains_under_bf16_autocast():
    model = train(UDIM, 3, precision="bf16-mixed", warmup_steps=1)
    assert all(torch.isfinite(p).all() for p in model.parameters())
