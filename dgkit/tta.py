"""Test-time methods over any trained model (``--tta ALIAS``, ``--model.tta ALIAS``): the
contract a method implements and what the methods share (normalization layers, batch
statistics, entropy, the features and classifier of a model).

A method never owns the model: the test-time stage (``dgkit.adaptation``) hands it the
trained algorithm, snapshots the trained state before the first batch and restores it
between streams (every domain, or every batch when episodic), calling :meth:`reset` after
each restore so the method's own state (optimizer moments, prototypes) starts over too.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from dgkit.algorithm import Algorithm
from dgkit.distributed import average_gradients, world_size
from dgkit.errors import ConfigError, DGKitError
from dgkit.networks import Featurizer

Source = Callable[[], Iterable[tuple[Tensor, Tensor]]]
NORMS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)


class TestTimeMethod:
    """Base class of test-time methods; a method's ``__init__`` keywords are its
    hyperparameters (``--model.tta.<name>``, tunable with ``--model.tta_grid``)."""

    __test__ = False  # not a pytest test class, despite its name
    #: ``adapt`` takes gradients: evaluation runs outside ``torch.inference_mode``
    needs_grad: bool = False
    #: set by ``adapt`` when the model has collapsed and should go back to the trained
    #: state at once (SAR's model recovery); the stage restores it and clears the flag
    reset_requested: bool = False

    def setup(self, model: Algorithm, source: Source) -> None:
        """Once per evaluation, before the trained state is snapshotted; ``source()``
        iterates ``(x, y)`` batches of the source domains (EATA's Fisher information)."""

    def reset(self, model: Algorithm) -> None:
        """The model is back in its trained state: start the method's own state over."""

    def adapt(self, model: Algorithm, x: Tensor) -> Tensor:
        """Logits for the test batch ``x``; may update ``model`` (restored by the stage)."""
        raise NotImplementedError(f"{type(self).__name__} must implement adapt(model, x)")

    def settings(self) -> dict[str, Any]:
        """The hyperparameters, as results record them."""
        return {k: v for k, v in vars(self).items() if not k.startswith("_")
                and isinstance(v, (int, float, str, bool)) and k != "reset_requested"}


def entropy(logits: Tensor) -> Tensor:
    """Per-sample entropy of the softmax of ``logits``."""
    return -(logits.softmax(1) * logits.log_softmax(1)).sum(1)


def norm_layers(model: nn.Module, exclude: str | None = None) -> list[tuple[str, nn.Module]]:
    """``(name, layer)`` of the normalization layers with affine parameters, skipping those
    whose qualified name contains ``exclude`` (SAR leaves a ResNet's ``layer4`` alone)."""
    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, NORMS) and getattr(m, "weight", None) is not None
            and not (exclude and exclude in name)]


def affine_parameters(model: nn.Module, method: str, exclude: str | None = None) -> list[nn.Parameter]:
    """The scales and shifts of the normalization layers, which TENT, SAR and EATA adapt."""
    params = [p for _, m in norm_layers(model, exclude) for p in (m.weight, m.bias) if p is not None]
    if not params:
        raise ConfigError("model.tta", f"{method} adapts normalization layers, and the model has "
                          "none with affine parameters", "a backbone with BatchNorm or GroupNorm: "
                          "mnist_cnn_bn, mnist_cnn, resnet18, ...")
    return params


def batch_norms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@contextlib.contextmanager
def batch_statistics(model: nn.Module, prior: float = 0.0) -> Iterator[None]:
    """BatchNorm layers normalize with the statistics of the batch they see (TENT's
    configuration: gradients flow through them, the running statistics stay untouched);
    with ``prior`` N > 0, with the mix N/(N+n) source + n/(N+n) batch statistics of
    Schneider et al. (2020) for a batch of n. Everything is as before on exit."""
    layers = batch_norms(model)
    saved = [(m.training, m.track_running_stats, m.running_mean, m.running_var) for m in layers]
    hooks, source = [], []
    try:
        for m in layers:
            if prior > 0 and m.running_mean is not None:
                source.append((m, m.running_mean.clone(), m.running_var.clone()))
                hooks.append(m.register_forward_pre_hook(_mixed_statistics(prior, *source[-1][1:])))
                m.eval()
            else:
                m.train()
                m.track_running_stats, m.running_mean, m.running_var = False, None, None
        yield
    finally:
        for hook in hooks:
            hook.remove()
        for m, (training, track, mean, var) in zip(layers, saved, strict=True):
            m.training, m.track_running_stats, m.running_mean, m.running_var = training, track, mean, var
        for m, mean, var in source:  # the hooks wrote the mixed statistics into the buffers
            m.running_mean.copy_(mean)
            m.running_var.copy_(var)


def _mixed_statistics(prior: float, source_mean: Tensor, source_var: Tensor) -> Callable:
    def hook(module: nn.Module, args: tuple) -> None:
        x = args[0]
        dims = [d for d in range(x.dim()) if d != 1]
        n = x.numel() // x.shape[1]
        w = prior / (prior + len(x))
        with torch.no_grad():
            batch_mean = x.mean(dims)
            batch_var = x.var(dims, unbiased=False) * (n / max(n - 1, 1))
            module.running_mean.copy_(w * source_mean + (1 - w) * batch_mean)
            module.running_var.copy_(w * source_var + (1 - w) * batch_var)
    return hook


def featurizer_and_classifier(model: Algorithm, method: str) -> tuple[Featurizer, nn.Linear]:
    """The model's featurizer and linear task classifier (T3A, SHOT-IM and LAME act on the
    features), or one line saying the model has no such pair."""
    try:
        featurizer, classifier = model.representation()
    except DGKitError:
        classifier = None
    if not isinstance(classifier, nn.Linear):
        raise ConfigError("model.tta", f"{method} needs a model with one featurizer and a linear "
                          f"classifier, which {type(model).__name__} does not have",
                          "tent, bn, sar or eata (they adapt any model's normalization layers)")
    return featurizer, classifier


def predicts_with_its_classifier(model: Algorithm, source: Source, method: str) -> None:
    """Refuse, in one line, a model whose predictions are not its classifier's on its
    features (DRM routes among heads, DivDis chooses one): a method that replaces or adapts
    that pair would no longer be adapting the model that was tested."""
    featurizer, classifier = featurizer_and_classifier(model, method)
    x, _ = next(iter(source()))
    with torch.no_grad():
        same = torch.allclose(model(x), classifier(featurizer(x)), rtol=1e-4, atol=1e-5)
    if not same:
        raise ConfigError("model.tta", f"{method} acts on the features and classifier of the model, "
                          f"and {type(model).__name__} does not predict with that pair alone",
                          "tent, bn, sar or eata (they adapt any model's normalization layers)")


class GradientMethod(TestTimeMethod):
    """A method that updates some parameters of the model on an unsupervised loss of each
    test batch, ``steps`` times, with its own optimizer (SGD with ``momentum``, or Adam with
    ``momentum`` as beta1), reset with the model; under DDP the ranks update as one."""

    needs_grad = True

    def __init__(self, lr: float, steps: int = 1, optimizer: str = "sgd", momentum: float = 0.9):
        if steps < 1:
            raise ConfigError("model.tta.steps", f"{steps}", ">= 1")
        if optimizer not in ("sgd", "adam"):
            raise ConfigError("model.tta.optimizer", f"{optimizer!r}", "sgd, adam")
        self.lr, self.steps, self.optimizer, self.momentum = lr, steps, optimizer, momentum
        self._params: list[nn.Parameter] = []
        self._opt: torch.optim.Optimizer | None = None

    def parameters(self, model: Algorithm) -> list[nn.Parameter]:
        raise NotImplementedError

    def reset(self, model: Algorithm) -> None:
        self._params = self.parameters(model)
        if self.optimizer == "adam":
            self._opt = torch.optim.Adam(self._params, lr=self.lr, betas=(self.momentum, 0.999))
        else:
            self._opt = torch.optim.SGD(self._params, lr=self.lr, momentum=self.momentum)

    def step(self, loss: Tensor | None) -> None:
        """One update of the adapted parameters on ``loss`` (the rest of the model gets no
        gradient); ``None``: no sample of the batch was selected, no update."""
        self._opt.zero_grad(set_to_none=True)
        if loss is not None:
            loss.backward(inputs=self._params)
        self.update(loss is not None)

    def update(self, has_gradient: bool = True) -> None:
        """The optimizer's step on the gradients the parameters hold (under DDP averaged
        over the ranks; a rank without any joins the others' step with zeros)."""
        if not has_gradient and world_size() == 1:
            return
        for p in self._params:  # every rank all-reduces the same buffer
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        average_gradients(self._params)
        self._opt.step()
