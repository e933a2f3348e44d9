"""Step-for-step parity of dgkit's GSAM and SAGM with their official optimizers.

Both sides start from the same weights (dgkit's MNIST CNN and linear classifier, copied),
take the same minibatches of the embedded Rotated MNIST (5 domains x 16 images, fp32, CPU)
with Adam lr 1e-3 as the base optimizer and a constant rho, and after every update the
largest absolute parameter difference is printed.

    python benchmarks/parity_sharpness.py --gsam /tmp/GSAM --sagm /tmp/SAGM [--steps 5]

Neither is a dependency: give checkouts of juntang-zhuang/GSAM and Wang-pengfei/SAGM.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from parity_domainbed import OPTIMIZERS, TARGET, minibatches

from dgkit import Backbone, Batch, Optimization
from dgkit.plugins import registry


def official(name: str, root: Path):
    sys.path.insert(0, str(root))
    try:
        if name == "gsam":
            from gsam import GSAM as Optimizer
            from gsam import LinearScheduler
        else:
            from domainbed.sagm import SAGM as Optimizer
            from domainbed.sagm import LinearScheduler
    finally:
        sys.path.remove(str(root))
    return Optimizer, LinearScheduler


def exact_restore(optimizer) -> None:
    """The official ``unperturb`` subtracts ``e`` again (``w + e - e``, off by rounding);
    with ``--exact-restore`` it copies the saved weights back, as dgkit's ``perturbed`` does."""
    perturb = optimizer.perturb_weights

    def perturb_weights(rho=0.0):
        optimizer.saved = [(p, p.detach().clone()) for g in optimizer.param_groups for p in g["params"]]
        perturb(rho=rho)

    def unperturb():
        with torch.no_grad():
            for p, w in optimizer.saved:
                p.copy_(w)

    optimizer.perturb_weights, optimizer.unperturb = perturb_weights, unperturb


def run(name: str, root: Path, batches, task, rho: float, alpha: float, optimizer_name: str,
        exact: bool) -> list[float]:
    Optimizer, LinearScheduler = official(name, root)
    torch.manual_seed(0)
    mine = registry("algorithm").get(name).obj(task, Backbone("mnist_cnn"), rho=rho, alpha=alpha)
    network = copy.deepcopy(torch.nn.Sequential(mine.featurizer, mine.classifier))
    base = OPTIMIZERS[optimizer_name](network.parameters())
    keyword = {"gsam_alpha": alpha} if name == "gsam" else {"alpha": alpha}
    theirs = Optimizer(network.parameters(), base, network, rho_scheduler=LinearScheduler(
        T_max=1000, max_value=rho, min_value=rho), adaptive=False, **keyword)
    if exact:
        exact_restore(theirs)
    optimizer = OPTIMIZERS[optimizer_name](mine.parameter_groups())
    differences = []
    for domains in batches:
        x, y = torch.cat([a for a, _ in domains]), torch.cat([b for _, b in domains])
        theirs.set_closure(F.cross_entropy, x, y)
        theirs.step()
        theirs.update_rho_t()
        batch = Batch(x, y, torch.cat([torch.full((len(b),), d) for d, (_, b) in enumerate(domains)]))
        mine.train()
        mine.training_update(batch, Optimization.standalone([optimizer]))
        differences.append(max((a - b).abs().max().item() for a, b in
                               zip(torch.nn.Sequential(mine.featurizer, mine.classifier).parameters(),
                                   network.parameters(), strict=True)))
    return differences


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gsam", type=Path, help="a checkout of juntang-zhuang/GSAM")
    parser.add_argument("--sagm", type=Path, help="a checkout of Wang-pengfei/SAGM")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rho", type=float, default=0.05)
    parser.add_argument("--alpha", type=float, default=0.1, help="large enough to matter in 5 steps")
    parser.add_argument("--optimizer", choices=list(OPTIMIZERS), default="adam")
    parser.add_argument("--exact-restore", action="store_true", help=exact_restore.__doc__.splitlines()[0])
    args = parser.parse_args()
    torch.use_deterministic_algorithms(True)
    batches, task = minibatches(args.steps, 16)
    print(f"| algorithm | largest parameter difference after steps 1-{args.steps} ({args.optimizer}) "
          f"| at {TARGET:g} |")
    print("|---|---|---|")
    for name, root in (("gsam", args.gsam), ("sagm", args.sagm)):
        if root is not None:
            differences = run(name, root, batches, task, args.rho, args.alpha, args.optimizer,
                              args.exact_restore)
            verdict = "yes" if max(differences) <= TARGET else "NO"
            print(f"| {name.upper()} | {' '.join(f'{d:.1e}' for d in differences)} | {verdict} |", flush=True)


if __name__ == "__main__":
    main()
