"""Meta-learning across the source domains: MLDG (Li et al., AAAI 2018), first-order, as
DomainBed implements it."""

from __future__ import annotations

import copy
from itertools import cycle

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dgkit import Backbone, Batch, Optimization, Task, check, register
from dgkit.search_space import Hyperparameter, hp
from dgkit_algorithms.erm import ERM


def split_meta_train_test(domains: list[tuple[Tensor, Tensor]], n_meta_test: int
                          ) -> list[tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]]:
    """A random permutation of the domains: the last ``n_meta_test`` are meta-test, each
    meta-train domain is paired with one of them in turn (trimmed to the shorter)."""
    perm = torch.randperm(len(domains)).tolist()
    pairs = []
    for i, j in zip(perm[:len(domains) - n_meta_test], cycle(perm[-n_meta_test:])):
        (xi, yi), (xj, yj) = domains[i], domains[j]
        n = min(len(xi), len(xj))
        pairs.append(((xi[:n], yi[:n]), (xj[:n], yj[:n])))
    return pairs


@register("mldg")
class MLDG(ERM):
    """Meta-Learning Domain Generalization (Algorithm 1, first-order): for every
    meta-train/meta-test pair, a copy takes one step on meta-train domain ``i``; the network
    steps along ``G_i + beta * G_j``, with ``G_j`` the copy's gradient on meta-test domain
    ``j`` (no second derivatives, as DomainBed)."""

    manual_optimization = True

    @classmethod
    def search_space(cls, dataset: str) -> list[Hyperparameter]:
        from dgkit.plugins import registry

        known = dataset in registry("dataset")
        domains = getattr(registry("dataset").get(dataset).obj, "domains", ()) if known else ()
        most = max(1, len(domains) - 2) if domains else 2  # one domain held out, one left to meta-train
        return [hp("beta", 1.0, lambda r: 10 ** r.uniform(-1, 1), "mldg_beta"),
                # DomainBed's {1, 2}, capped below the source domains (2 of 2 would leave no
                # meta-train domain, and DomainBed's MLDG would then never update)
                hp("n_meta_test", min(2, most), lambda r: min(int(r.choice([1, 2])), most))]

    def __init__(self, task: Task, backbone: Backbone, beta: float = 1.0, n_meta_test: int | None = None):
        """
        Args:
            beta: weight of the meta-test loss (``mldg_beta``).
            n_meta_test: source domains held out as meta-test in each step (``n_meta_test``;
                None: DomainBed's 2, or 1 when there are only two source domains).
        """
        super().__init__(task, backbone)
        if n_meta_test is None:
            n_meta_test = min(2, max(1, task.num_domains - 1))
        check(1 <= n_meta_test < max(task.num_domains, 2), "model.algorithm.n_meta_test", f"{n_meta_test}",
              f"at least 1 and fewer than the {task.num_domains} source domains")
        self.beta, self.n_meta_test = beta, n_meta_test

    def training_update(self, batch: Batch, opt: Optimization) -> Tensor:
        domains = batch.per_domain()
        network = nn.Sequential(self.featurizer, self.classifier)
        params = list(network.parameters())
        opt.zero_grad()
        grads = [torch.zeros_like(p) for p in params]
        objective = 0.0
        for (xi, yi), (xj, yj) in split_meta_train_test(domains, self.n_meta_test):
            inner = copy.deepcopy(network)
            inner_opt = opt.make(inner.parameters())  # a fresh optimizer, as DomainBed's
            inner_obj = F.cross_entropy(inner(xi), yi)
            inner_opt.zero_grad()
            inner_obj.backward()
            inner_opt.step()
            for g, p in zip(grads, inner.parameters(), strict=True):
                if p.grad is not None:
                    g.add_(p.grad / len(domains))
            loss_j = F.cross_entropy(inner(xj), yj)
            grads_j = torch.autograd.grad(loss_j, list(inner.parameters()), allow_unused=True)
            for g, g_j in zip(grads, grads_j, strict=True):
                if g_j is not None:
                    g.add_(self.beta * g_j / len(domains))
            objective += inner_obj.item() + self.beta * loss_j.item()
        for p, g in zip(params, grads, strict=True):
            p.grad = g
        opt.average_gradients(params)  # set by hand: DDP's all-reduce never saw them
        opt.step()
        return torch.tensor(objective / len(domains))
