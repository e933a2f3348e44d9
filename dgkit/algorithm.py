"""The contract every dgkit algorithm implements.

An algorithm is an ``nn.Module`` holding its networks and its research logic. The
``DGModule`` (a LightningModule) owns the loop, devices, precision, optimizers,
schedulers, logging and checkpoints.

The core, which every algorithm has: ``__init__(task, backbone, **hyperparameters)``
builds the networks; ``forward(x)`` returns logits (what validation, test and predict
use); and one way to train:

* automatic optimization (the default): implement ``training_loss(batch)`` and return a
  loss (or a dict with a ``"loss"`` key plus extra values to log);
* manual optimization (``manual_optimization = True``): implement
  ``training_update(batch, opt)`` and drive the passes with the ``Optimization`` handle:
  ``opt.backward(loss)``, ``opt.step()``, ``opt.zero_grad()``, ``opt.no_sync()``.
  Never call Lightning or ``optimizer.step()`` directly.

Opt-in protocols, each a group of methods with defaults that do nothing:

* optimizers: ``parameter_groups``, ``extra_optimizers`` (manual optimization);
* stages: ``stage_name``, ``end_stage``, ``on_validation_metrics`` (several networks
  trained one after another; under DDP the module lets parameters sit out steps);
* representation: ``representation``, ``classifiers`` (``--model.init_from``);
* test time: ``adapts_at_test``, ``needs_grad_at_test``, ``prepare_adaptation``, ``adapt``;
* heads: ``num_heads``, ``head_logits``, ``selection_stream``, ``choose_head``.

:class:`Wrapper` forwards all of them to a base algorithm (AdaNPC on any base).
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from dgkit.distributed import average_gradients, world_size
from dgkit.errors import ConfigError, DGKitError
from dgkit.networks import Backbone, Featurizer
from dgkit.task import Task

if TYPE_CHECKING:
    from torch.optim import Optimizer

    from dgkit.search_space import Hyperparameter

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
    #: the number of samples of each domain index when the samples lie in runs of one
    #: domain in index order (the per-domain minibatches concatenated), or None
    domain_sizes: tuple[int, ...] | None = None

    def domain_masks(self) -> dict[int, Tensor]:
        """``{domain index: boolean mask of its samples}``, for the domains in the batch, in order."""
        if self.domain_sizes is not None:  # known on the host: no device sync
            return {d: self.domain == d for d, n in enumerate(self.domain_sizes) if n}
        return {d: self.domain == d for d in torch.unique(self.domain, sorted=True).tolist()}

    def per_domain(self) -> list[tuple[Tensor, Tensor]]:
        """The DomainBed-style ``[(x, y), ...]`` minibatches, one per domain in the batch."""
        if self.domain_sizes is not None:  # slices of the runs: no mask indexing, no sync
            ends = itertools.accumulate(self.domain_sizes)
            return [(self.x[e - n:e], self.y[e - n:e])
                    for n, e in zip(self.domain_sizes, ends, strict=True) if n]
        return [(self.x[mask], self.y[mask]) for mask in self.domain_masks().values()]

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

    The module creates one for every training step; methods route through Lightning so
    precision, DDP gradient sync and gradient clipping stay correct.
    """

    def __init__(self, optimizers: list[Optimizer], backward: Callable[..., None],
                 step: Callable[[Optimizer, bool], bool],
                 no_sync: Callable[[], contextlib.AbstractContextManager],
                 make: Callable[..., Optimizer] | None = None):
        self.optimizers = optimizers
        self._backward, self._step, self._no_sync, self._make = backward, step, no_sync, make
        self._unsynced = 0  # depth of no_sync() blocks the algorithm opened
        self._stepped = False

    @classmethod
    def standalone(cls, optimizers: list[Optimizer]) -> Optimization:
        """A handle on plain optimizers, without Lightning (one process, no precision
        plugin, no clipping): to drive ``training_update`` from a script or a test."""
        main = optimizers[0]

        def step(optimizer: Optimizer, count: bool) -> bool:
            optimizer.step()
            return count

        def make(params, lr_scale: float = 1.0, **overrides) -> Optimizer:
            settings = {**main.defaults, "lr": main.defaults["lr"] * lr_scale, **overrides}
            return type(main)(params, **settings)

        return cls(list(optimizers), lambda loss, **kw: loss.backward(**kw), step,
                   contextlib.nullcontext, make)

    @property
    def optimizer(self) -> Optimizer:
        """The main optimizer (the one built from ``--model.optimizer``)."""
        return self.optimizers[0]

    def backward(self, loss: Tensor, inputs: Iterable[Tensor] | None = None, **kwargs) -> None:
        """``loss.backward`` through Lightning (precision, DDP); ``inputs=[...]`` restricts
        which tensors receive gradients. Under DDP, a restricted backward outside
        :meth:`no_sync` averages those gradients across ranks itself (DDP's own all-reduce
        expects every parameter), so several backward passes over different parameters in
        one step each end synced."""
        if inputs is None:
            self._backward(loss, **kwargs)
            return
        inputs = list(inputs)
        if self._unsynced or world_size() == 1:
            self._backward(loss, inputs=inputs, **kwargs)
            return
        with self._no_sync():
            self._backward(loss, inputs=inputs, **kwargs)
        average_gradients(inputs)

    def step(self, optimizer: Optimizer | None = None) -> None:
        """Clip (if configured) and step ``optimizer`` (default: the main one). The first
        step of a training step, whichever of the configured optimizers takes it, is the one
        Lightning counts:
        ``global_step`` (and ``max_steps``) count batches, also for algorithms whose batch
        steps only another optimizer (DANN's discriminator turns, Fish's inner loop)."""
        if self._step(optimizer or self.optimizer, not self._stepped):
            self._stepped = True

    def make(self, params: Iterable[Tensor] | list[dict], lr_scale: float = 1.0, **overrides) -> Optimizer:
        """A fresh optimizer of the configured class and settings (``lr_scale`` times its
        lr), e.g. for an inner loop on a copy of the network (MLDG)."""
        if self._make is None:
            raise DGKitError("this Optimization was built without an optimizer factory")
        return self._make(params, lr_scale, **overrides)

    def zero_grad(self, optimizer: Optimizer | None = None) -> None:
        (optimizer or self.optimizer).zero_grad(set_to_none=True)

    def reset_state(self, optimizer: Optimizer | None = None, lr: float | None = None) -> None:
        """Forget the optimizer's state (Adam's moments and step count), as a new optimizer
        with the same settings would start (DomainBed's IRM and V-REx do it where their
        penalty weight jumps), with learning rate ``lr`` if given (EQRM's after burn-in).
        The state and the rate are part of the checkpoint, so resuming keeps them."""
        opt = optimizer or self.optimizer
        opt = getattr(opt, "optimizer", opt)  # Lightning's wrapper, or the optimizer
        opt.state.clear()
        if lr is not None:
            for group in opt.param_groups:
                group["lr"] = lr

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Context in which backward passes do not all-reduce gradients under DDP."""
        self._unsynced += 1
        try:
            with self._no_sync():
                yield
        finally:
            self._unsynced -= 1

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

    manual_optimization: bool = False
    #: ``adapt`` differs from ``forward``: evaluation runs the test-time stage.
    adapts_at_test: bool = False
    #: ``adapt`` takes gradients, so evaluation must run outside ``torch.inference_mode``.
    needs_grad_at_test: bool = False
    #: hyperparameters that act only at test time: ``dgkit test/validate/predict --ckpt_path
    #: ... --model.algorithm.<name> V`` evaluates the checkpoint with V instead of the value
    #: it was trained with (every other hyperparameter is the checkpoint's own).
    test_time_hyperparameters: tuple[str, ...] = ()
    #: backpropagates through a gradient of the featurizer (double backward), which
    #: ``torch.compile`` cannot and fp16 makes unstable: both are refused.
    differentiates_twice: bool = False
    #: hypotheses the algorithm keeps; above 1, ``head_logits`` gives each one's logits and
    #: the module logs per-head metrics.
    num_heads: int = 1

    def __init__(self, task: Task, backbone: Backbone):
        super().__init__()
        self.task = task
        self.backbone = backbone
        self.progress = Progress()

    @classmethod
    def search_space(cls, dataset: str) -> list[Hyperparameter]:
        """The distributions ``dgkit sweep --random`` draws this algorithm's own
        hyperparameters from, on data set ``dataset`` (an alias); see
        :mod:`dgkit.search_space`. The shared ones (lr, batch size, ...) are added there."""
        return []

    # --- training -------------------------------------------------------------------
    def training_loss(self, batch: Batch) -> StepOutput:
        raise NotImplementedError(f"{type(self).__name__} must implement training_loss(batch)")

    def training_update(self, batch: Batch, opt: Optimization) -> StepOutput:
        raise NotImplementedError(
            f"{type(self).__name__} sets manual_optimization = True and must implement "
            "training_update(batch, opt)"
        )

    def parameter_groups(self) -> Iterable[nn.Parameter] | list[dict]:
        """What the main optimizer optimizes (all trainable parameters by default); in a
        group dict, ``lr_scale`` multiplies the configured lr (MIRO's encoders: 10x)."""
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

    def selection_stream(self) -> str | None:
        """The labelled validation stage (``val``, ``oracle``) whose batches
        :meth:`choose_head` takes before testing; None: no head to choose."""
        return None

    def choose_head(self, batches: list[tuple[Tensor, Tensor]]) -> dict:
        """Pick the head ``forward`` predicts with from labelled ``(x, y)`` batches; return
        what the results should say about the choice."""
        raise NotImplementedError(f"{type(self).__name__} names a selection_stream() and must "
                                  "implement choose_head(batches)")

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

    # --- multi-stage training (Bonsai's rounds, D-BAT's members) ------------------------
    def stage_name(self) -> str | None:
        """The stage the current step (``self.progress``) belongs to, or None for one-stage
        algorithms. Derive it from the step count so a resumed run finds its stage; the
        end of every stage is checkpointed as ``stage-<name>.ckpt``. A staged algorithm
        trains part of its parameters at a time, so DDP runs with
        ``find_unused_parameters``."""
        return None

    @property
    def trains_in_stages(self) -> bool:
        return self.stage_name() is not None

    def end_stage(self, name: str) -> str | None:
        """Called once when stage ``name`` is over: before the next stage's first step,
        and at the end of the fit for the last one (e.g. restore the stage's selected
        snapshot, freeze it). May return a line for the log."""

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


class Wrapper(Algorithm):
    """An algorithm around a ``base`` one (``--model.algorithm.base ALIAS``): everything
    the subclass does not override -- training, optimizers, progress, stages, heads and
    their selection, the representation -- is the base's, so any base keeps working
    inside it. Errors in the base's settings name them under ``model.algorithm.base``."""

    def __init__(self, task: Task, backbone: Backbone, base: Callable[[Task, Backbone], Algorithm]):
        super().__init__(task, backbone)
        try:
            self.base = base(task, backbone)
        except ConfigError as exc:
            raise exc.under("model.algorithm", "model.algorithm.base") from None
        self.base.progress = self.progress  # one clock: the base's schedule follows the run
        self.manual_optimization = self.base.manual_optimization
        self.differentiates_twice = self.base.differentiates_twice
        self.num_heads = self.base.num_heads
        if type(self).adapt is Wrapper.adapt:  # the base's own test-time stage, if any
            self.adapts_at_test = self.base.adapts_at_test
            self.needs_grad_at_test = self.base.needs_grad_at_test

    def forward(self, x: Tensor) -> Tensor:
        return self.base(x)

    def training_loss(self, batch: Batch) -> StepOutput:
        return self.base.training_loss(batch)

    def training_update(self, batch: Batch, opt: Optimization) -> StepOutput:
        return self.base.training_update(batch, opt)

    def parameter_groups(self) -> Iterable[nn.Parameter] | list[dict]:
        return self.base.parameter_groups()

    def extra_optimizers(self, make: Callable[..., Optimizer]) -> list[Optimizer]:
        return self.base.extra_optimizers(make)

    def stage_name(self) -> str | None:
        return self.base.stage_name()

    def end_stage(self, name: str) -> str | None:
        return self.base.end_stage(name)

    def on_validation_metrics(self, metrics: Mapping[str, float]) -> None:
        self.base.on_validation_metrics(metrics)

    def head_logits(self, x: Tensor) -> Tensor:
        return self.base.head_logits(x)

    def selection_stream(self) -> str | None:
        return self.base.selection_stream()

    def choose_head(self, batches: list[tuple[Tensor, Tensor]]) -> dict:
        return self.base.choose_head(batches)

    def representation(self) -> tuple[Featurizer, nn.Module | None]:
        return self.base.representation()

    def classifiers(self) -> dict[str, nn.Module]:
        return {f"base.{name}": m for name, m in self.base.classifiers().items()}

    def prepare_adaptation(self, source: Callable[[], Iterable[tuple[Tensor, Tensor]]]) -> None:
        self.base.prepare_adaptation(source)

    def adapt(self, x: Tensor) -> Tensor:
        return self.base.adapt(x)
