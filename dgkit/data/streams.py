"""How the test streams are cut and ordered, the scenario axes of TTAB (Zhao et al., ICML
2023): one stream per held-out domain or one mixing them, and a label-shifted order in
which the class proportions drift along the stream (a Dirichlet partition over time, as
TTAB and NOTE draw it). Test-time methods that adapt online see the difference; a model
without one gives the same accuracy whatever the order."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.data import ConcatDataset, Dataset, Subset, TensorDataset


def labels_of(dataset: Dataset) -> Tensor:
    """The labels of a stream without decoding its images where the data set holds them
    (tensors, file lists, subsets and concatenations of those); else read sample by sample."""
    if isinstance(dataset, Subset):
        return labels_of(dataset.dataset)[torch.as_tensor(dataset.indices, dtype=torch.long)]
    if isinstance(dataset, ConcatDataset):
        return torch.cat([labels_of(d) for d in dataset.datasets])
    if isinstance(dataset, TensorDataset):
        return dataset.tensors[1].long()
    samples = getattr(dataset, "samples", None)
    if isinstance(samples, list) and samples and isinstance(samples[0], tuple):
        return torch.tensor([label for _, label in samples], dtype=torch.long)
    return torch.tensor([int(dataset[i][1]) for i in range(len(dataset))], dtype=torch.long)


def mixed(streams: list[Dataset], seed: int) -> Dataset:
    """One stream of every sample of ``streams`` in a seeded random order."""
    data = ConcatDataset(streams)
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))
    return Subset(data, order.tolist())


def label_shifted(stream: Dataset, alpha: float, slots: int, seed: int) -> Dataset:
    """``stream`` reordered so that its class proportions drift: every class's samples are
    spread over ``slots`` consecutive parts of the stream with proportions drawn from
    Dirichlet(``alpha``) (small: each class in few parts, so test batches hold few classes;
    large: close to a shuffled stream). Every sample appears once."""
    labels = labels_of(stream)
    g = torch.Generator().manual_seed(seed)
    dirichlet = torch.distributions.Dirichlet(torch.full((slots,), float(alpha)))
    parts: list[list[Tensor]] = [[] for _ in range(slots)]
    for c in torch.unique(labels).tolist():
        members = (labels == c).nonzero().squeeze(1)
        members = members[torch.randperm(len(members), generator=g)]
        with torch.random.fork_rng(devices=[]):  # the draw from this seed, not the global stream
            torch.manual_seed(int(torch.randint(2**31, (1,), generator=g)))
            shares = dirichlet.sample()
        cuts = (shares.cumsum(0) * len(members)).round().long().tolist()
        start = 0
        for slot, end in enumerate(cuts):
            parts[slot].append(members[start:end])
            start = end
    order = []
    for part in parts:  # within a part, the classes interleave
        part = torch.cat(part) if part else torch.empty(0, dtype=torch.long)
        order.append(part[torch.randperm(len(part), generator=g)])
    return Subset(stream, torch.cat(order).tolist())
