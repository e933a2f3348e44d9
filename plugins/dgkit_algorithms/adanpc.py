"""AdaNPC: a kNN classifier over a memory of source features that absorbs confident test
features as it goes (Zhang et al., ICML 2023), on top of any trained algorithm."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from dgkit import Algorithm, Backbone, Task, register
from dgkit.algorithm import Wrapper
from dgkit.distributed import gather_rows
from dgkit.errors import ConfigError, DGKitError, check, check_choice
from dgkit_algorithms.erm import ERM

Confidence = Literal["vote", "reference"]


@register("adanpc")
class AdaNPC(Wrapper):
    """Train any base algorithm; at test time predict by voting among the ``k`` most
    cosine-similar memory entries, then add the confident test features to the memory.
    Training, stages and heads are the base's (see ``dgkit.algorithm.Wrapper``)."""

    adapts_at_test = True
    test_time_hyperparameters = ("k", "temperature", "beta", "confidence", "memory_cap")

    def __init__(self, task: Task, backbone: Backbone,
                 base: Callable[[Task, Backbone], Algorithm] = ERM, k: int = 100,
                 temperature: float = 0.1, beta: float = 0.1,
                 confidence: Confidence = "vote", memory_cap: int | None = None):
        """
        Args:
            base: the algorithm that trains the featurizer (``--model.algorithm.base sam``).
            k: neighbours that vote.
            temperature: softmax temperature over the neighbours' similarities.
            beta: confidence a test prediction needs to enter the memory (above 1: never,
                pure kNN).
            confidence: ``vote``: the largest vote share (the paper's meaning);
                ``reference``: the reference code's softmax of the vote distribution,
                at most e/(e+C-1), so most beta values admit nothing on many classes.
            memory_cap: keep at most this many test entries (FIFO); ``None``: unbounded,
                as in the reference.
        """
        super().__init__(task, backbone, base)
        check(k >= 1, "model.algorithm.k", f"{k}", ">= 1")
        check(temperature > 0, "model.algorithm.temperature", f"{temperature}", "> 0")
        check_choice(confidence, Confidence, "model.algorithm.confidence")
        check(memory_cap is None or memory_cap >= 0, "model.algorithm.memory_cap",
              f"{memory_cap}", ">= 0 or null")
        try:
            self.base.representation()  # the featurizer the memory embeds with
        except DGKitError:
            raise ConfigError("model.algorithm.base", f"{type(self.base).__name__} has no single "
                              "featurizer to build a memory from",
                              "algorithms with a representation()") from None
        self.k, self.temperature, self.beta = k, temperature, beta
        self.confidence, self.memory_cap = confidence, memory_cap
        self.memory = torch.empty(0)
        self.memory_labels = torch.empty(0, dtype=torch.long)
        self.base_size = 0

    # --- the memory -----------------------------------------------------------------
    def embed(self, x: Tensor) -> Tensor:
        featurizer, _ = self.base.representation()  # D-BAT's: the chosen member's
        return F.normalize(featurizer(x), dim=1)

    def prepare_adaptation(self, source: Callable[[], Iterable[tuple[Tensor, Tensor]]]) -> None:
        feats, labels = [], []
        for x, y in source():
            feats.append(self.embed(x))
            labels.append(y)
        self.memory = torch.cat(feats)
        self.memory_labels = torch.cat(labels).to(self.memory.device)
        self.base_size = len(self.memory)

    def vote(self, q: Tensor) -> Tensor:
        """Vote distribution ``p`` over classes for normalised queries ``q``."""
        sims = q @ self.memory.T
        top, idx = sims.topk(min(self.k, sims.shape[1]), dim=1)
        weights = (top / self.temperature).softmax(dim=1)
        onehot = F.one_hot(self.memory_labels[idx], self.task.num_classes).to(weights.dtype)
        return (weights.unsqueeze(2) * onehot).sum(1)

    def adapt(self, x: Tensor) -> Tensor:
        if self.base_size == 0:
            raise ConfigError("model.algorithm", "AdaNPC's memory is empty: it is built from "
                              "the source domains when evaluation starts", "a DomainDataModule")
        q = self.embed(x)
        p = self.vote(q)
        p_conf = (p + 1e-5).clamp(max=1.0)
        if self.confidence == "reference":
            p_conf = p_conf.softmax(dim=1)
        conf, pred = p_conf.max(dim=1)
        keep = conf >= self.beta
        # Insert after predicting; under DDP every rank adds every rank's confident rows.
        self._insert(gather_rows(q[keep]), gather_rows(pred[keep]))
        return p.clamp_min(1e-8).log()

    def _insert(self, feats: Tensor, labels: Tensor) -> None:
        memory = torch.cat([self.memory, feats])
        memory_labels = torch.cat([self.memory_labels, labels])
        if self.memory_cap is not None and len(memory) - self.base_size > self.memory_cap:
            drop = len(memory) - self.base_size - self.memory_cap  # oldest test entries first
            keep = torch.cat([torch.arange(self.base_size),
                              torch.arange(self.base_size + drop, len(memory))]).to(memory.device)
            memory, memory_labels = memory[keep], memory_labels[keep]
        self.memory, self.memory_labels = memory, memory_labels

    # The memory travels with the state dict: the test-time stage restores it between
    # domains, and a checkpoint taken after adaptation keeps it.
    def get_extra_state(self) -> dict[str, Any]:
        return {"memory": self.memory, "labels": self.memory_labels, "base_size": self.base_size}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.memory = state["memory"].clone()
        self.memory_labels = state["labels"].clone()
        self.base_size = int(state["base_size"])
