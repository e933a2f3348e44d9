"""Step-for-step parity of dgkit's DomainBed algorithms with DomainBed's own code.

Each algorithm is built in both libraries with the same initial weights (dgkit's copied
into DomainBed's MNIST CNN and classifier), both take the same minibatches of the embedded
Rotated MNIST (5 source domains x 16 images, fp32, CPU), with Adam lr 1e-3 and the same
hyperparameters, and after every update the largest absolute difference between the two
parameter sets is printed. Random draws (Mixup's pairing and mixing weights) are seeded
identically on both sides before every step. The annealing algorithms (IRM, V-REx) switch
their penalty weight, and reset Adam, at step 2 here, so the switch is inside the window.

    python benchmarks/parity_domainbed.py --domainbed /tmp/DomainBed [--steps 5]

DomainBed is not a dependency: give the path of a checkout of facebookresearch/DomainBed.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
from pathlib import Path
from unittest import mock

import numpy as np
import torch
from torch import nn

from dgkit import Backbone, Batch, Optimization
from dgkit.data import DomainDataModule
from dgkit.data.mnist import RotatedMNIST
from dgkit.plugins import registry

TARGET = 1e-5
OPTIMIZERS = {  # lr 1e-3, no weight decay, on both sides
    "adam": lambda params: torch.optim.Adam(params, lr=1e-3, weight_decay=0.0),
    "sgd": lambda params: torch.optim.SGD(params, lr=1e-3),
}
# DomainBed name -> (dgkit alias, DomainBed hparams, dgkit hyperparameters)
ALGORITHMS = {
    "ERM": ("erm", {}, {}),
    "IRM": ("irm", {"irm_lambda": 100.0, "irm_penalty_anneal_iters": 2}, {"lam": 100.0, "anneal_steps": 2}),
    "VREx": ("vrex", {"vrex_lambda": 10.0, "vrex_penalty_anneal_iters": 2}, {"lam": 10.0, "anneal_steps": 2}),
    "GroupDRO": ("groupdro", {"groupdro_eta": 0.01}, {"eta": 0.01}),
    "Mixup": ("mixup", {"mixup_alpha": 0.2}, {"alpha": 0.2}),
    "CORAL": ("coral", {"mmd_gamma": 1.0}, {"gamma": 1.0}),
    "MMD": ("mmd", {"mmd_gamma": 1.0}, {"gamma": 1.0}),
    "MLDG": ("mldg", {"mldg_beta": 1.0, "n_meta_test": 2}, {"beta": 1.0, "n_meta_test": 2}),
    "Fish": ("fish", {"meta_lr": 0.5}, {"meta_lr": 0.5}),
    "DANN": ("dann", {"lambda": 1.0, "d_steps_per_g_step": 1, "grad_penalty": 0.0, "beta1": 0.5,
                      "lr_d": 1e-3, "lr_g": 1e-3, "weight_decay_d": 0.0, "weight_decay_g": 0.0},
             {"lam": 1.0, "d_steps_per_g": 1, "beta1": 0.5}),
    "CDANN": ("cdann", {"lambda": 1.0, "d_steps_per_g_step": 1, "grad_penalty": 0.1, "beta1": 0.5,
                        "lr_d": 1e-3, "lr_g": 1e-3, "weight_decay_d": 0.0, "weight_decay_g": 0.0},
              {"lam": 1.0, "d_steps_per_g": 1, "grad_penalty": 0.1, "beta1": 0.5}),
    "MTL": ("mtl", {"mtl_ema": 0.99}, {"ema": 0.99, "noise_embedding": True}),
    "SagNet": ("sagnet", {"sag_w_adv": 0.1}, {"w_adv": 0.1}),
    "ARM": ("arm", {}, {"train_context": False}),
    "RSC": ("rsc", {"rsc_f_drop_factor": 1 / 3, "rsc_b_drop_factor": 1 / 3},
            {"f_drop_factor": 1 / 3, "b_drop_factor": 1 / 3}),
    "SD": ("sd", {"sd_reg": 0.1}, {"reg": 0.1}),
    "ANDMask": ("andmask", {"tau": 0.6}, {"tau": 0.6}),
    "SANDMask": ("sandmask", {"tau": 0.5, "k": 10.0}, {"tau": 0.5, "k": 10.0}),
    "IGA": ("iga", {"penalty": 1000.0}, {"penalty": 1000.0}),
    "IB_ERM": ("ib_erm", {"ib_lambda": 100.0, "ib_penalty_anneal_iters": 2},
               {"ib_lambda": 100.0, "ib_anneal_steps": 2}),
    "IB_IRM": ("ib_irm", {"irm_lambda": 100.0, "irm_penalty_anneal_iters": 1, "ib_lambda": 100.0,
                          "ib_penalty_anneal_iters": 3},
               {"irm_lambda": 100.0, "irm_anneal_steps": 1, "ib_lambda": 100.0, "ib_anneal_steps": 3}),
    "CausIRL_CORAL": ("causirl_coral", {"mmd_gamma": 1.0}, {"gamma": 1.0}),
    "CausIRL_MMD": ("causirl_mmd", {"mmd_gamma": 1.0}, {"gamma": 1.0}),
    "EQRM": ("eqrm", {"eqrm_quantile": 0.75, "eqrm_burnin_iters": 2, "eqrm_lr": 1e-4},
             {"quantile": 0.75, "burnin_steps": 2, "lr_after_burnin": 1e-4}),
    "Fishr": ("fishr", {"lambda": 1000.0, "penalty_anneal_iters": 2, "ema": 0.95},
              {"lam": 1000.0, "anneal_steps": 2, "ema": 0.95}),
    "SelfReg": ("selfreg", {}, {"train_projection": False}),
    "URM": ("urm", {"urm_adv_lambda": 0.1, "urm_discriminator_lr": 1e-3, "urm_discriminator_hidden_layers": 1,
                    "urm_generator_output": "tanh", "urm_discriminator_label_smoothing": 0},
            {"adv_lambda": 0.1, "discriminator_lr": 1e-3, "hidden_layers": 1, "generator_output": "tanh"}),
    "Transfer": ("transfer", {"t_lambda": 1.0, "delta": 1e-4, "d_steps_per_g": 3, "lr_d": 1e-1, "gda": False},
                 {"t_lambda": 1.0, "delta": 1e-4, "d_steps_per_g": 3, "lr_d": 1e-1}),
    "RDM": ("rdm", {"rdm_lambda": 5.0, "rdm_penalty_anneal_iters": 2, "variance_weight": 0.004,
                    "rdm_lr": 1e-4},
            {"lam": 5.0, "anneal_steps": 2, "variance_weight": 0.004, "lr_after_anneal": 1e-4}),
    "ADRMX": ("adrmx", {}, {"remix_within_class": False}),
    "ERMPlusPlus": ("ermpp", {"linear_lr": 1e-3, "linear_steps": 1},
                    {"linear_lr": 1e-3, "linear_steps": 1, "sma_start": 3}),
    "TRM": ("trm", {"cos_lambda": 1e-2, "iters": 2, "groupdro_eta": 1e-2},
            {"cos_lambda": 1e-2, "iters": 2, "groupdro_eta": 1e-2, "domainbed_quirks": True}),
    "CAD": ("cad", {"lmbda": 0.1, "temperature": 0.1, "is_normalized": False, "is_project": False,
                    "is_flipped": True}, {"lmbda": 0.1, "temperature": 0.1}),
    "CondCAD": ("condcad", {"lmbda": 0.1, "temperature": 0.1, "is_normalized": False, "is_project": False,
                            "is_flipped": True}, {"lmbda": 0.1, "temperature": 0.1}),
}
# The networks compared: all of dgkit's algorithm but Fish's scratch clone (DomainBed
# rebuilds it every step instead) and TRM's per-domain classifiers (not among DomainBed's
# modules; they start alike, see same_domain_classifiers, and act through the featurizer).
COMPARED = {"Fish": lambda algo: nn.Sequential(algo.featurizer, algo.classifier),
            "TRM": lambda algo: nn.Sequential(algo.featurizer, algo.classifier)}


def import_domainbed(root: Path):
    sys.path.insert(0, str(root))
    try:
        from domainbed import algorithms, hparams_registry
    finally:
        sys.path.remove(str(root))
    return algorithms, hparams_registry


KINDS = (nn.Conv2d, nn.GroupNorm, nn.BatchNorm2d, nn.BatchNorm1d, nn.Linear, nn.Embedding)


def layers(network: nn.Module, kinds: tuple[type, ...] = KINDS) -> list[nn.Module]:
    """The layers of each kind, each kind in order: the same layout in both MNIST CNNs,
    whose modules are registered in different orders."""
    return [m for kind in kinds for m in network.modules() if type(m) is kind]


def minibatches(steps: int, batch_size: int) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    torch.manual_seed(0)
    data = DomainDataModule(RotatedMNIST(), batch_size=batch_size)
    data.setup("fit")
    loaders = [torch.utils.data.DataLoader(data.splits[i][0], batch_size=batch_size, shuffle=True)
               for i in data.source_indices]
    iterators = [iter(loader) for loader in loaders]
    return [[next(it) for it in iterators] for _ in range(steps)], data.task


def backpack_without_inputs(reference, mine) -> None:
    """DomainBed's Fishr asks BackPACK for per-sample gradients with ``backward(inputs=
    [classifier parameters])``; with torch 2 the module hooks BackPACK relies on then never
    fire (no ``grad_batch``), so the same backward runs without ``inputs=`` (the extra
    gradients are cleared by the optimizer's zero_grad before the real backward)."""
    from collections import OrderedDict

    from backpack import backpack
    from backpack.extensions import BatchGrad

    def get_grads(logits, y):
        reference.optimizer.zero_grad()
        loss = reference.bce_extended(logits, y).sum()
        with backpack(BatchGrad()):
            loss.backward(retain_graph=True, create_graph=True)
        return OrderedDict((name, w.grad_batch.clone().view(w.grad_batch.size(0), -1))
                           for name, w in reference.classifier.named_parameters())

    reference._get_grads = get_grads


def cuda_as_cpu(reference, mine) -> None:
    """DomainBed's RDM puts a buffer on the GPU with ``.cuda()``; on a CPU-only machine that
    call becomes the identity for its update."""
    update = reference.update

    def on_cpu(*args, **kwargs):
        with mock.patch.object(torch.Tensor, "cuda", lambda t, *a, **k: t):
            return update(*args, **kwargs)

    reference.update = on_cpu


def early_average(reference, mine) -> None:
    """DomainBed's ERM++ starts its moving average at iteration 600, a constant; here at 3,
    inside the window (dgkit's ``sma_start 3``)."""
    reference.sma_start_iter = 3


def same_domain_classifiers(reference, mine) -> None:
    """DomainBed's TRM keeps its per-domain classifiers in a plain list (so they are not
    among its modules, and one more than the domains); they start from dgkit's weights."""
    with torch.no_grad():
        for ours, theirs in zip(mine.domain_classifiers, reference.clist, strict=False):
            theirs.load_state_dict(ours.state_dict())


PATCHES = {"Fishr": backpack_without_inputs, "RDM": cuda_as_cpu, "ERMPlusPlus": early_average,
           "TRM": same_domain_classifiers}
BUILT_ON_GPU = {"TRM"}  # .cuda() in the constructor: made the identity to build on a CPU


def max_difference(a: list[nn.Module], b: list[nn.Module]) -> float:
    return max((pa - pb).abs().max().item() for ma, mb in zip(a, b, strict=True)
               for pa, pb in zip(ma.parameters(), mb.parameters(), strict=True))


def run(name: str, algorithms, hparams_registry, batches, task, optimizer_name: str = "adam") -> list[float]:
    alias, theirs, ours = ALGORITHMS[name]
    torch.manual_seed(0)
    mine = registry("algorithm").get(alias).obj(task, Backbone("mnist_cnn"), **ours)
    hparams = hparams_registry.default_hparams(name, "RotatedMNIST")
    hparams.update({"lr": 1e-3, "weight_decay": 0.0, "nonlinear_classifier": False,
                    "batch_size": len(batches[0][0][1]), **theirs})
    on_cpu = (mock.patch.object(torch.Tensor, "cuda", lambda t, *a, **k: t) if name in BUILT_ON_GPU
              else contextlib.nullcontext())
    on_cpu_modules = (mock.patch.object(nn.Module, "cuda", lambda m, *a, **k: m) if name in BUILT_ON_GPU
                      else contextlib.nullcontext())
    with contextlib.redirect_stdout(io.StringIO()), on_cpu, on_cpu_modules:  # URM prints on stdout
        reference = algorithms.get_algorithm_class(name)(task.input_shape, task.num_classes,
                                                          task.num_domains, hparams)
    PATCHES.get(name, lambda reference, mine: None)(reference, mine)
    compared = COMPARED.get(name, lambda algo: algo)(mine)
    # kinds only DomainBed builds are unused there (DANN's class embeddings)
    kinds = tuple(k for k in KINDS if layers(compared, (k,)))
    our_layers, their_layers = layers(compared, kinds), layers(reference, kinds)
    with torch.no_grad():
        for ours_m, theirs_m in zip(our_layers, their_layers, strict=True):
            for p, q in zip(ours_m.parameters(), theirs_m.parameters(), strict=True):
                q.copy_(p)
    optimizer = OPTIMIZERS[optimizer_name](mine.parameter_groups())
    if optimizer_name != "adam":  # DomainBed's algorithms build Adam themselves
        for attribute, value in list(vars(reference).items()):
            if isinstance(value, torch.optim.Optimizer):
                params = [p for group in value.param_groups for p in group["params"]]
                setattr(reference, attribute, OPTIMIZERS[optimizer_name](params))
    extras = mine.extra_optimizers(Optimization.standalone([optimizer]).make)
    differences = []
    for step, domains in enumerate(batches):
        torch.manual_seed(1000 + step)
        np.random.seed(1000 + step)
        reference.update([(x.clone(), y.clone()) for x, y in domains])
        torch.manual_seed(1000 + step)
        np.random.seed(1000 + step)
        batch = Batch(torch.cat([x for x, _ in domains]), torch.cat([y for _, y in domains]),
                      torch.cat([torch.full((len(y),), d) for d, (_, y) in enumerate(domains)]))
        mine.progress.step = step
        mine.train()
        if mine.manual_optimization:
            mine.training_update(batch, Optimization.standalone([optimizer, *extras]))
        else:
            out = mine.training_loss(batch)
            loss = out["loss"] if isinstance(out, dict) else out
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        differences.append(max_difference(our_layers, their_layers))
    return differences


DRAW_SEEDS = [(0, 0), (1, 0), (2, 0), (5, 1), (19, 2)]  # (hparams_seed, trial_seed); 0: the defaults


def compare_draws(hparams_registry, names: list[str]) -> list[str]:
    """One line per data set: how many of dgkit's defaults and draws equal DomainBed's for
    the same seeds, for every algorithm in ``names``, and which differ."""
    from dgkit.search_space import DOMAINBED_NAMES, seed_hash, space

    lines = []
    for dataset in ("rotated_mnist", "officehome", "domainnet"):
        equal, differ = 0, []
        for name in names:
            alias = ALGORITHMS[name][0]
            hyperparameters = space(alias, registry("algorithm").get(alias).obj, dataset)
            for h_seed, t_seed in DRAW_SEEDS:
                random_seed = None if h_seed == 0 else seed_hash(h_seed, t_seed)
                theirs = (hparams_registry.default_hparams(name, DOMAINBED_NAMES[dataset])
                          if random_seed is None
                          else hparams_registry.random_hparams(name, DOMAINBED_NAMES[dataset], random_seed))
                for h in hyperparameters:
                    value = theirs[h.domainbed_name]
                    value = value.item() if isinstance(value, np.generic) else value
                    if h.from_domainbed is not None and random_seed is not None:
                        value = h.from_domainbed(value)
                    mine = h.value(random_seed)
                    if mine == value and isinstance(mine, bool) == isinstance(value, bool):
                        equal += 1
                    else:
                        differ.append(f"{name}.{h.domainbed_name}@{h_seed},{t_seed}")
        lines.append(f"search-space draws on {DOMAINBED_NAMES[dataset]} ({len(names)} algorithms, "
                     f"hparams/trial seeds {DRAW_SEEDS}): {equal} equal DomainBed's, {len(differ)} differ"
                     + (f": {' '.join(differ)}" if differ else ""))
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--domainbed", required=True, type=Path, help="a DomainBed checkout")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--algorithms", nargs="*", default=list(ALGORITHMS))
    parser.add_argument("--optimizer", choices=list(OPTIMIZERS), default="adam",
                        help="sgd shows the gradients' own agreement: Adam's first steps turn "
                        "rounding-level differences in near-zero gradients into lr-sized ones")
    args = parser.parse_args()
    torch.use_deterministic_algorithms(True)
    algorithms, hparams_registry = import_domainbed(args.domainbed)
    batches, task = minibatches(args.steps, args.batch_size)
    print(f"| algorithm | largest parameter difference after steps 1-{args.steps} ({args.optimizer}) "
          f"| at {TARGET:g} |")
    print("|---|---|---|")
    for name in args.algorithms:
        differences = run(name, algorithms, hparams_registry, batches, task, args.optimizer)
        verdict = "yes" if max(differences) <= TARGET else "NO"
        print(f"| {name} | {' '.join(f'{d:.1e}' for d in differences)} | {verdict} |", flush=True)
    print()
    for line in compare_draws(hparams_registry, args.algorithms):
        print(line)


if __name__ == "__main__":
    main()
