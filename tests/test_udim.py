import copy
import functools
import json
import statistics

import pytest
import torch
from helpers import make_task, plain_optimization, source_batch, train
from lightning import Callback, Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.func import grad, vmap

from dgkit.algorithm import Batch
from dgkit.cli import main
from dgkit.data import DomainDataModule
from dgkit.data.mnist import RotatedMNIST
from dgkit.module import DGModule
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
    sam.load_state_dict(udim.state_dict(), strict=False)  # UDIM also keeps its phase
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
        probe.load_state_dict(model.state_dict(), strict=False)  # a SAM model has no UDIM phase
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


class SwitchUDIM(UDIM):
    """UDIM that keeps, at its first UDIM step, the weights and optimizer state it starts from."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.start: dict | None = None

    def training_update(self, batch, opt):
        if not self.in_warmup and self.start is None:
            self.start = {"weights": {k: v.clone() for k, v in self._tensors().items()},
                          "optimizer": copy.deepcopy(opt.optimizer.state_dict())}
        return super().training_update(batch, opt)


class AtValidation(Callback):
    """The selection score, the weights and the optimizer state at every fit validation."""

    def __init__(self):
        self.seen: list[dict] = []

    def on_validation_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self.seen.append({"score": float(trainer.callback_metrics["val/accuracy"]),
                              "step": trainer.global_step,
                              "weights": {k: v.clone() for k, v in pl_module.algorithm._tensors().items()},
                              "optimizer": copy.deepcopy(trainer.optimizers[0].state_dict())})


def _fit_udim(steps: int, folder=None, ckpt_path=None, callbacks=(), backbone: str = "mlp",
              cls=UDIM, lr: float = 3e-3, val_every: int = 2, **hparams) -> DGModule:
    seed_everything(0)
    data = DomainDataModule(RotatedMNIST(), batch_size=8)
    model = DGModule(algorithm=functools.partial(cls, **hparams), task=data.task, backbone=backbone,
                     optimizer=functools.partial(torch.optim.Adam, lr=lr))
    savers = [ModelCheckpoint(dirpath=folder, every_n_train_steps=3, save_top_k=-1, filename="{step}")
              ] if folder else []
    trainer = Trainer(max_steps=steps, val_check_interval=val_every, check_val_every_n_epoch=None,
                      limit_val_batches=3, logger=False, enable_checkpointing=bool(folder),
                      callbacks=[*savers, *callbacks], enable_progress_bar=False,
                      enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=folder)
    trainer.fit(model, datamodule=data, ckpt_path=ckpt_path, weights_only=False)
    return model


def test_udim_steps_start_from_the_warm_ups_best_validation_weights_and_optimizer_state():
    seen = AtValidation()
    run = {"cls": SwitchUDIM, "warmup_steps": 4, "lr": 0.1, "val_every": 1}  # accuracy falls after step 1
    model = _fit_udim(6, callbacks=[seen], **run)
    warmup = [v for v in seen.seen if v["step"] <= 4]
    assert [v["step"] for v in warmup] == [1, 2, 3, 4]
    best = max(warmup, key=lambda v: v["score"])  # the first of equal scores, as the reload keeps it
    assert best["step"] < 4, [v["score"] for v in warmup]  # else reloading would change nothing
    start = model.algorithm.start
    for key, value in best["weights"].items():
        torch.testing.assert_close(start["weights"][key], value, rtol=0, atol=0, msg=key)
    assert start["optimizer"]["state"][0]["step"] == best["step"]
    for i, state in best["optimizer"]["state"].items():
        torch.testing.assert_close(start["optimizer"]["state"][i]["exp_avg"], state["exp_avg"],
                                   rtol=0, atol=0)
    assert model.algorithm._best is None  # dropped once used: checkpoints of the UDIM phase stay small

    plain = _fit_udim(6, reload_warmup_best=False, **run).algorithm
    last = warmup[-1]["weights"]
    assert all(torch.equal(plain.start["weights"][k], v) for k, v in last.items())
    assert plain.stage_name() is None


def test_a_udim_fit_killed_in_its_warm_up_resumes_with_the_warm_ups_best(tmp_path):
    # step=3.ckpt holds the best of the validation after step 2; the reload at step 4 needs it.
    whole = _fit_udim(6, tmp_path / "whole", warmup_steps=4).algorithm
    saved = torch.load(tmp_path / "whole" / "step=3.ckpt", weights_only=False)["state_dict"]
    assert saved["algorithm._extra_state"]["warmup_best"]["step"] == 2
    resumed = _fit_udim(6, tmp_path / "resumed", ckpt_path=tmp_path / "whole" / "step=3.ckpt",
                        warmup_steps=4).algorithm
    for key, value in whole.state_dict().items():
        if torch.is_tensor(value):
            torch.testing.assert_close(resumed.state_dict()[key], value, rtol=0, atol=0, msg=key)


def _norm_layers(model):
    return [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]


def test_after_the_warm_up_batchnorm_uses_the_batchs_statistics_in_training_and_evaluation():
    model = _fit_udim(4, cls=SwitchUDIM, backbone="mnist_cnn_bn", warmup_steps=2).algorithm
    running = {k: v for k, v in model.start["weights"].items() if "running_" in k}
    after = model._tensors()
    assert all(torch.equal(after[k], v) for k, v in running.items())  # UDIM steps leave them
    x = torch.rand(16, 1, 28, 28)
    model.eval()
    assert all(m.training for m in _norm_layers(model))
    with torch.no_grad():
        alone, in_batch = model(x[:2]), model(x)[:2]
    assert not torch.allclose(alone, in_batch, atol=1e-4)  # transductive, as the reference

    fresh = UDIM(model.task, model.backbone)  # a checkpoint of the UDIM phase evaluates the same way
    fresh.load_state_dict(model.state_dict())
    fresh.eval()
    assert bool(fresh.batch_stats_phase) and all(m.training for m in _norm_layers(fresh))

    kept = _fit_udim(4, backbone="mnist_cnn_bn", warmup_steps=2, bn_mode="running").algorithm
    kept.eval()
    assert not any(m.training for m in _norm_layers(kept))
