"""The training step users get: the per-domain minibatches as one ``Batch``, and ERM's
update as DomainBed's (one Adam step on the cross-entropy of the concatenated minibatches)."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from helpers import train
from lightning import Callback

from dgkit.algorithm import Batch
from dgkit.module import as_batch
from dgkit_algorithms import ERM


def _step(sizes: tuple[int, ...], seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, 3, generator=g), torch.randint(0, 5, (n,), generator=g)) for n in sizes]


def test_a_steps_minibatches_split_back_into_their_domains_as_masks_would_split_them():
    batch = as_batch(_step((4, 0, 3)))
    assert batch.domain_sizes == (4, 0, 3)
    assert batch.domain.tolist() == [0] * 4 + [2] * 3
    by_masks = Batch(batch.x, batch.y, batch.domain)  # sizes unknown: torch.unique and masks
    assert batch.domain_masks().keys() == by_masks.domain_masks().keys() == {0, 2}
    for a, b in zip(batch.domain_masks().values(), by_masks.domain_masks().values(), strict=True):
        assert torch.equal(a, b)
    for (x1, y1), (x2, y2) in zip(batch.per_domain(), by_masks.per_domain(), strict=True):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert as_batch(_step((4, 0, 3), seed=1)).domain is batch.domain  # built once per sizes


class Shadow(Callback):
    """A copy of the network trained beside the module by a plain PyTorch loop on the very
    batches the module trains on; records the largest parameter difference after each step."""

    def __init__(self):
        self.differences: list[float] = []

    def on_train_start(self, trainer, pl_module):
        algo = pl_module.algorithm
        self.net = torch.nn.Sequential(copy.deepcopy(algo.featurizer), copy.deepcopy(algo.classifier))
        self.optimizer = torch.optim.Adam(self.net.parameters(), lr=1e-3)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        x, y = torch.cat([d[0] for d in batch]), torch.cat([d[1] for d in batch])
        self.optimizer.zero_grad()
        F.cross_entropy(self.net(x), y).backward()
        self.optimizer.step()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        algo = pl_module.algorithm
        ours = [*algo.featurizer.parameters(), *algo.classifier.parameters()]
        self.differences.append(max(float((p - q).abs().max())
                                    for p, q in zip(ours, self.net.parameters(), strict=True)))


def test_erm_takes_the_plain_adam_step_on_the_concatenated_minibatches():
    shadow = Shadow()
    train(ERM, 12, batch_size=8, callbacks=[shadow])
    assert len(shadow.differences) == 12
    assert max(shadow.differences) == 0.0  # bit for bit: nothing else touches the weights
