"""Step-for-step parity of dgkit's MIRO with kakaobrain/miro.

MIRO's featurizer is a ResNet-50 at 224x224 (its code asserts that input); the only one it
builds without downloading weights is a randomly initialised ResNet-50, so both sides start
from the same random weights (dgkit's timm ResNet-50 copied into MIRO's torchvision one:
the layouts share parameter names), BatchNorm frozen on both (MIRO's URResNet always
freezes it; dgkit's ``--model.freeze_bn true``), and take the same minibatches of random
images (2 domains x 2 images, fp32, CPU), Adam lr 1e-3, ``ld 0.1``, ``lr_mult 10``. After
every update the largest absolute difference of the featurizer's and classifier's
parameters, and of the variance encoders', is printed.

    python benchmarks/parity_miro.py --miro /tmp/miro [--steps 3]

MIRO is not a dependency: give a checkout of kakaobrain/miro. Its backbone module imports
OpenAI's ``clip`` package at the top, which the ResNet-50 path never uses; the script puts
an empty module under that name when it is not installed.
"""

from __future__ import annotations

import argparse
import sys
import types
from pathlib import Path

import torch

from dgkit import Backbone, Batch
from dgkit.task import Task

TARGET = 1e-5


class Hparams(dict):
    """MIRO reads its hyperparameters both as items and as attributes."""

    __getattr__ = dict.__getitem__


def import_miro(root: Path):
    sys.modules.setdefault("clip", types.ModuleType("clip"))
    sys.path.insert(0, str(root))
    try:
        from domainbed.algorithms.miro import MIRO
    finally:
        sys.path.remove(str(root))
    return MIRO


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--miro", required=True, type=Path, help="a checkout of kakaobrain/miro")
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    torch.use_deterministic_algorithms(True)
    Reference = import_miro(args.miro)
    from dgkit.plugins import registry

    task = Task((3, 224, 224), 7, ("a", "b"), default_backbone="resnet50")
    torch.manual_seed(0)
    mine = registry("algorithm").get("miro").obj(task, Backbone("resnet50", pretrained=False, freeze_bn=True),
                                                 ld=0.1, lr_mult=10.0)
    hparams = Hparams(model="resnet50", pretrained=False, feat_layers="stem_block", ld=0.1, lr_mult=10.0,
                      optimizer="adam", lr=1e-3, weight_decay=0.0, resnet_dropout=0.0)
    theirs = Reference(task.input_shape, task.num_classes, task.num_domains, hparams)
    with torch.no_grad():  # the same starting weights, the oracle included
        body = mine.featurizer.body.state_dict()
        for network in (theirs.featurizer.network, theirs.pre_featurizer.network):
            missing = network.load_state_dict({k: v for k, v in body.items() if not k.startswith("fc.")},
                                              strict=False)
            assert set(missing.missing_keys) <= {"fc.weight", "fc.bias"} and not missing.unexpected_keys
        theirs.classifier.load_state_dict(mine.classifier.state_dict())
        for ours, reference in zip(mine.var_encoders, theirs.var_encoders, strict=True):
            reference.b.copy_(ours.b)
    optimizer = torch.optim.Adam(
        [{**g, "lr": 1e-3 * g.get("lr_scale", 1.0)} for g in mine.parameter_groups()], lr=1e-3)
    g = torch.Generator().manual_seed(1)
    print(f"| step | networks | variance encoders | at {TARGET:g} |\n|---|---|---|---|")
    for step in range(args.steps):
        x = [torch.rand(2, *task.input_shape, generator=g) for _ in range(2)]
        y = [torch.randint(0, task.num_classes, (2,), generator=g) for _ in range(2)]
        theirs.train()
        theirs.update(x, y)
        mine.train()
        out = mine.training_loss(Batch(torch.cat(x), torch.cat(y), torch.tensor([0, 0, 1, 1])))
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
        networks = max((a - b).abs().max().item() for a, b in zip(
            [*mine.featurizer.body.parameters(), *mine.classifier.parameters()],
            [p for n, p in theirs.featurizer.network.named_parameters() if not n.startswith("fc.")]
            + list(theirs.classifier.parameters()), strict=True))
        encoders = max((a.b - b.b).abs().max().item() for a, b in zip(mine.var_encoders, theirs.var_encoders,
                                                                       strict=True))
        verdict = "yes" if max(networks, encoders) <= TARGET else "NO"
        print(f"| {step + 1} | {networks:.1e} | {encoders:.1e} | {verdict} |", flush=True)


if __name__ == "__main__":
    main()
