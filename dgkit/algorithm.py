"""The contract every dgkit algorithm implements.

An algorithm is an ``nn.Module`` holding its networks and its research logic only. The
``DGModule`` (a LightningModule) owns the loop, devices, precision, optimizers,
schedulers, logging and checkpoints. Two ways to train:

* automatic optimization (the default): implement ``training_loss(batch)`` and return a
  loss (or a dict with a ``"loss"`` key plus extra values to log);
* manual optimization (``manual_optimization = True``): implement
  ``training_update(batch, opt)`` and drive the passes with the ``Optimization`` handle:
  ``opt.backward(loss)``, ``opt.step()``, ``opt.zero_grad()``, ``opt.no_sync()``.
  Never call Lightning or ``optimizer.step()`` directly.

``forward(x)`` returns logits and is what validation, test and predict use.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import Tensor, nn

from dgkit.distributed import average_gradients
from dgkit.errors import DGKitError
from dgkit.networks import Backbone, Featurizer
from dgkit.task import Task

if TYPE_CHECKING:
    from torch.optim import Optimizer

StepOutput = Tensor | dict[str, Tensor]


@dataclass
class Batch:
    """One training step: one minibatch per source domain, concatenated.

    ``domain[i]`` indexes ``Task.source_domains``. ``per_domain()`` gives the
    DomainBed-style list of ``(x, y)`` minibatches back.
    """

    x: Tensor
    y: Tensor
    domain: Tensor
    #: unlabeled images of this step (``--data.unlabeled``), or None
    unlabeled: Tensor | None = None

    def per_domain(self) -> list[tuple[Tensor, Tensor]]:
        out = []
        for d in torch.unique(self.domain, sorted=True).tolist():
            mask = self.domain == d
            out.append((self.x[mask], self.y[mask]))
        return out

    def __len__(self) -> int:
        return len(self.y)


@dataclass
class Progress:
    """Where training stands; the module updates it before every training step.

    ``total_steps`` is Lightning's estimate of the optimizer steps of the whole fit
    (``max_steps``, or epochs x batches); ``None`` outside a fit.
    """

    step: int = 0
    epoch: int = 0
    total_steps: int | None = None


class Optimization:
    """What a manual-optimization algorithm may do to its optimizers.

    The module creates it; methods route through Lightning so precision, DDP gradient
    sync and gradient clipping stay correct.
    """

    def __init__(self, optimizers: list[Optimizer], backward: Callable[..., None],
                 step: Callable[[Optimizer], None], no_sync: Callable[[], contextlib.AbstractContextManager]):
        self.optimizers = optimizers
        self._backward, self._step, self._no_sync = backward, step, no_sync

    @property
    def optimizer(self) -> Optimizer:
        """The main optimizer (the one built from ``--model.optimizer``)."""
        return self.optimizers[0]

    def backward(self, loss: Tensor, **kwargs) -> None:
        """``loss.backward`` through Lightning (precision, DDP); ``inputs=[...]`` restricts
        which tensors receive gradients."""
        self._backward(loss, **kwargs)

    def step(self, optimizer: Optimizer | None = None) -> None:
        """Clip (if configured) and step ``optimizer`` (default: the main one)."""
        self._step(optimizer or self.optimizer)

    def zero_grad(self, optimizer: Optimizer | None = None) -> None:
        (optimizer or self.optimizer).zero_grad(set_to_none=True)

    def no_sync(self) -> contextlib.AbstractContextManager:
        """Context in which backward passes do not all-reduce gradients under DDP."""
        return self._no_sync()

    def average_gradients(self, params: Iterable[Tensor]) -> None:
        """Average these parameters' gradients across DDP ranks (nothing on one device):
        for updates whose backward passes ran under :meth:`no_sync`, e.g. several
        backward passes over different parameters in one step."""
        average_gradients(params)


class Algorithm(nn.Module):
    """Base class of every algorithm; subclasses' ``__init__`` signatures are their CLI.

    The first two parameters, ``task`` and ``backbone``, are supplied by the module; every
    further keyword is a hyperparameter, exposed as ``--model.algorithm.<name>``.
    """

    manual_optimization: ClassVar[bool] = False
    #: ``adapt`` differs from ``forward``: evaluation runs the test-time stage.
    adapts_at_test: ClassVar[bool] = False
    #: ``adapt`` takes gradients, so evaluation must run outside ``torch.inference_mode``.
    needs_grad_at_test: ClassVar[bool] = False
    #: some parameters take no part in some steps' backward (one model trained at a time,
    #: a network updated by its own pass): under DDP the module turns on
    #: ``find_unused_parameters`` so gradients still all-reduce.
    unused_parameters: ClassVar[bool] = False
    #: backpropagates through a gradient of the featurizer (double backward), which
    #: ``torch.compile`` cannot: ``--model.compile`` is refused.
    differentiates_twice: ClassVar[bool] = False
    #: hypotheses the algorithm keeps; above 1, ``head_logits`` gives each one's logits and
    #: the module logs per-head metrics.
    num_heads: int = 1

    def __init__(self, task: Task, backbone: Backbone):
        super().__init__()
        self.task = task
        self.backbone = backbone
        self.progress = Progress()

    # --- training -------------------------------------------------------------------
    def training_loss(self, batch: Batch) -> StepOutput:
        raise NotImplementedError(f"{type(self).__name__} must implement training_loss(batch)")

    def training_update(self, batch: Batch, opt: Optimization) -> StepOutput:
        raise NotImplementedError(
            f"{type(self).__name__} sets manual_optimization = True and must implement "
            "training_update(batch, opt)"
        )

    def parameter_groups(self) -> Iterable[nn.Parameter] | list[dict]:
        """What the main optimizer optimizes (all trainable parameters by default)."""
        return [p for p in self.parameters() if p.requires_grad]

    def extra_optimizers(self, make: Callable[..., Optimizer]) -> list[Optimizer]:
        """Further optimizers (manual optimization only). ``make(params, lr_scale=1.0,
        **overrides)`` builds one of the configured class with ``lr_scale`` times its lr."""
        return []

    # --- inference ------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        raise NotImplementedError(f"{type(self).__name__} must implement forward(x) -> logits")

    def head_logits(self, x: Tensor) -> Tensor:
        """``[B, num_heads, C]`` logits of every hypothesis."""
        return self(x).unsqueeze(1)

    # --- test-time stage (see dgkit/adaptation.py) ----------------------------------
    def prepare_adaptation(self, source: Callable[[], Iterable[tuple[Tensor, Tensor]]]) -> None:
        """Called once before an evaluation with adaptation, before the trained state is
        snapshotted. ``source()`` iterates ``(x, y)`` batches of the source domains in
        evaluation mode (AdaNPC builds its memory from them)."""

    def adapt(self, x: Tensor) -> Tensor:
        """Logits for ``x`` at test time; may update the algorithm's adaptive state.

        The module restores the trained state before every evaluated domain (and before
        every batch in episodic mode), so state carries over only within one stream.
        """
        return self(x)

    # --- multi-stage training (Bonsai's rounds) -----------------------------------------
    def stage_name(self) -> str | None:
        """The stage the current step (``self.progress``) belongs to, or None for one-stage
        algorithms. Derive it from the step count so a resumed run finds its stage; the
        module checkpoints the end of every stage as ``stage-<name>.ckpt``."""
        return None

    def end_stage(self, name: str) -> None:
        """Called once when stage ``name`` is over: before the next stage's first step,
        and at the end of the fit for the last one (e.g. restore the stage's selected
        snapshot, freeze it)."""

    def on_validation_metrics(self, metrics: Mapping[str, float]) -> None:
        """The ``val/*`` results of each validation during fit (already reduced across
        ranks), e.g. to keep the best snapshot of the current stage."""

    # --- a representation other algorithms start from (``--model.init_from``) ---------
    def representation(self) -> tuple[Featurizer, nn.Module | None]:
        """The featurizer, and the task classifier if there is one, that another algorithm
        may start from (default: ``self.featurizer`` and a ``num_classes``-way
        ``self.classifier``)."""
        featurizer = getattr(self, "featurizer", None)
        if not isinstance(featurizer, Featurizer):
            raise DGKitError(f"{type(self).__name__} has no single featurizer to export; it "
                             "must override representation()")
        classifier = getattr(self, "classifier", None)
        if isinstance(classifier, nn.Linear) and classifier.out_features == self.task.num_classes:
            return featurizer, classifier
        return featurizer, None

    def classifiers(self) -> dict[str, nn.Module]:
        """The task classifiers an imported classifier initializes, by name (default:
        ``self.classifier`` when it outputs ``num_classes`` logits)."""
        classifier = getattr(self, "classifier", None)
        if isinstance(classifier, nn.Linear) and classifier.out_features == self.task.num_classes:
            return {"classifier": classifier}
        return {}

    # --- helpers shared by most algorithms ------------------------------------------
    def build_featurizer(self) -> nn.Module:
        """The configured backbone for this task's input (``.n_outputs`` features)."""
        return self.backbone.build(self.task)

    def build_classifier(self, in_features: int) -> nn.Module:
        return nn.Linear(in_features, self.task.num_classes)

    def named_trainable(self) -> Iterator[tuple[str, nn.Parameter]]:
        return ((n, p) for n, p in self.named_parameters() if p.requires_grad)
