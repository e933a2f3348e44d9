"""Featurizers: DomainBed's small CNN for 28x28 digits, and any timm or torchvision model.

Pretrained weights come from the timm/torchvision hubs when cached or reachable, or from a
local file (``pretrained=path``). Offline without a cache the build fails at once with a
message saying how to supply weights, instead of retrying for a minute.
"""

from __future__ import annotations

import dataclasses
import math
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from dgkit.errors import ConfigError

if TYPE_CHECKING:
    from dgkit.task import Task

TORCHVISION_PREFIX = "torchvision/"


class MNISTCNN(nn.Module):
    """DomainBed's ``MNIST_CNN``: four 3x3 convolutions with GroupNorm, 128 features
    (``mnist_cnn``); with ``batch_norm``, BatchNorm in GroupNorm's place (``mnist_cnn_bn``,
    for the test-time methods that adapt BatchNorm statistics)."""

    n_outputs = 128

    def __init__(self, in_channels: int, batch_norm: bool = False):
        super().__init__()
        widths = [64, 128, 128, 128]
        layers: list[nn.Module] = []
        prev = in_channels
        for i, width in enumerate(widths):
            layers += [nn.Conv2d(prev, width, 3, stride=2 if i == 1 else 1, padding=1),
                       nn.ReLU(), nn.BatchNorm2d(width) if batch_norm else nn.GroupNorm(8, width)]
            prev = width
        self.body = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x)


class MLP(nn.Module):
    """An MLP featurizer on flattened inputs (for tabular data and quick tests): ``depth - 1``
    Linear+ReLU layers of ``width``. DomainBed's ``MLP`` at the same depth has one more
    Linear layer at the end, without ReLU (it composes linearly with the classifier), so
    the two are not the same network."""

    def __init__(self, n_inputs: int, width: int = 256, depth: int = 3):
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        prev = n_inputs
        for _ in range(depth - 1):
            layers += [nn.Linear(prev, width), nn.ReLU()]
            prev = width
        self.body = nn.Sequential(*layers)
        self.n_outputs = prev

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x)


class Featurizer(nn.Module):
    """A backbone without its classifier, plus DomainBed's options (dropout, frozen BN)."""

    def __init__(self, body: nn.Module, n_outputs: int, dropout: float = 0.0,
                 freeze_bn: bool = False):
        super().__init__()
        self.body = body
        self.n_outputs = n_outputs
        self.dropout = nn.Dropout(dropout)
        self.freeze_bn = freeze_bn
        self.train()

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.body(x))

    def train(self, mode: bool = True) -> Featurizer:
        super().train(mode)
        if self.freeze_bn:  # running statistics stay those of the (pre)trained backbone
            for m in self.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self


def split_stages(featurizer: Featurizer) -> tuple[nn.Module, list[nn.Module], nn.Module]:
    """``(stem, stages, head)`` of a featurizer whose stage outputs are non-negative
    (post-ReLU), for methods that act between stages (ITTA). Supports timm ResNets and
    DomainBed's MNIST CNN."""
    body = featurizer.body
    if isinstance(body, MNISTCNN):
        # conv, ReLU, norm per block: cut after each ReLU so stage outputs are >= 0.
        layers = list(body.body)
        convs = [layers[i:i + 3] for i in range(0, 12, 3)]
        stages = [nn.Sequential(*convs[0][:2])]
        stages += [nn.Sequential(convs[i - 1][2], *convs[i][:2]) for i in range(1, 4)]
        return nn.Identity(), stages, nn.Sequential(convs[3][2], *layers[12:])
    if all(hasattr(body, n) for n in ("conv1", "bn1", "act1", "maxpool", "layer4", "global_pool")):
        stem = nn.Sequential(body.conv1, body.bn1, body.act1, body.maxpool)
        return stem, [body.layer1, body.layer2, body.layer3, body.layer4], body.global_pool
    raise ConfigError("model.backbone", f"{type(body).__name__} has no known stages",
                      "mnist_cnn, mnist_cnn_bn or a timm ResNet (resnet18, resnet50, ...)")


@dataclass(frozen=True)
class Backbone:
    """How to build a featurizer; algorithms call ``build(task)`` once per network."""

    name: str = "auto"
    #: ``None``: the data set's default (ImageNet weights for natural images, as DomainBed
    #: and the papers start; none for the digit data sets)
    pretrained: bool | str | None = None
    dropout: float = 0.0
    freeze_bn: bool = False

    def __post_init__(self) -> None:
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError("model.dropout", f"{self.dropout} is not a probability", "0 <= p < 1")
        if isinstance(self.pretrained, str) and not Path(self.pretrained).is_file():
            raise ConfigError("model.pretrained", f"no weights file at {self.pretrained!r}",
                              "true, false, or the path of a .pth/.safetensors file")

    def resolve(self, task: Task) -> str:
        return task.default_backbone if self.name == "auto" else self.name

    def build(self, task: Task) -> Featurizer:
        name = self.resolve(task)
        if self.pretrained is None:
            pretrained = task.default_pretrained and name not in ("mnist_cnn", "mnist_cnn_bn", "mlp")
            return dataclasses.replace(self, pretrained=pretrained).build(task)
        channels = task.input_shape[0]
        if name in ("mnist_cnn", "mnist_cnn_bn"):
            if self.pretrained:
                raise ConfigError("model.pretrained", f"{name} has no pretrained weights", "false")
            body, n_out = MNISTCNN(channels, batch_norm=name == "mnist_cnn_bn"), MNISTCNN.n_outputs
        elif name == "mlp":
            if self.pretrained:
                raise ConfigError("model.pretrained", "mlp has no pretrained weights", "false")
            body = MLP(math.prod(task.input_shape))
            n_out = body.n_outputs
        elif name.startswith(TORCHVISION_PREFIX):
            body, n_out = _torchvision_body(name[len(TORCHVISION_PREFIX):], task, self.pretrained)
        else:
            size = task.input_shape[-1] if len(task.input_shape) == 3 else None
            body, n_out = _timm_body(name, channels, self.pretrained, size)
        return Featurizer(body, n_out, self.dropout, self.freeze_bn)


def _timm_body(name: str, in_chans: int, pretrained: bool | str,
               img_size: int | None = None) -> tuple[nn.Module, int]:
    import timm

    if not timm.is_model(name):
        close = timm.list_models(f"*{name}*")[:8]
        raise ConfigError("model.backbone", f"{name!r} is neither mnist_cnn(_bn), mlp, a timm model nor "
                          f"{TORCHVISION_PREFIX}<name>",
                          ", ".join(["mnist_cnn", "mnist_cnn_bn", "mlp", *close]))
    kwargs: dict = {"num_classes": 0, "in_chans": in_chans}
    if isinstance(pretrained, str):
        kwargs.update(pretrained=True, pretrained_cfg_overlay={"file": pretrained})
    elif pretrained:
        _require_timm_weights(name)
        kwargs.update(pretrained=True)
    try:  # transformers size their position embeddings for the data's images (ViT, Swin, ...)
        model = timm.create_model(name, img_size=img_size, **kwargs) if img_size else None
    except TypeError:  # convolutional networks take any size and no img_size argument
        model = None
    if model is None:
        model = timm.create_model(name, **kwargs)
    return model, model.num_features


def _require_timm_weights(name: str) -> None:
    """Fail fast when weights are neither cached nor downloadable."""
    import timm
    from huggingface_hub import try_to_load_from_cache

    cfg = timm.models.get_pretrained_cfg(name)
    hub_id = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    if hub_id:
        repo = hub_id.split("@")[0]
        for filename in ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin"):
            if isinstance(try_to_load_from_cache(repo, filename), str):
                return
    url = getattr(cfg, "url", None) if cfg is not None else None
    if url and (Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)).is_file():
        return
    if not _reachable("huggingface.co"):
        raise ConfigError(
            "model.pretrained",
            f"pretrained weights for {name!r} are not cached and the hub is unreachable (image data "
            "sets start from ImageNet weights, as the papers do)",
            "the path of a local weights file: --model.pretrained path/to/weights.pth; or "
            "--model.pretrained false to train from random weights",
        )


def _torchvision_body(name: str, task: Task, pretrained: bool | str) -> tuple[nn.Module, int]:
    import torchvision

    if name not in torchvision.models.list_models():
        raise ConfigError("model.backbone", f"{name!r} is not a torchvision model",
                          ", ".join(torchvision.models.list_models()[:20]) + ", ...")
    weights = None
    if pretrained is True:
        weights = torchvision.models.get_model_weights(name).DEFAULT
        cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url)
        if not cached.is_file() and not _reachable("download.pytorch.org"):
            raise ConfigError("model.pretrained", f"torchvision weights for {name!r} are not "
                              f"cached at {cached} and the download host is unreachable",
                              "false, or the path of a local weights file")
    model = torchvision.models.get_model(name, weights=weights)
    if isinstance(pretrained, str):
        state = torch.load(pretrained, map_location="cpu", weights_only=True)
        model.load_state_dict(state.get("state_dict", state) if isinstance(state, dict) else state)
    for head in ("fc", "classifier", "heads", "head"):
        if hasattr(model, head):
            setattr(model, head, nn.Identity())
            break
    if task.input_shape[0] != 3:
        raise ConfigError("model.backbone", f"torchvision models expect 3 input channels, "
                          f"the data have {task.input_shape[0]}", "a timm model (adapts in_chans)")
    model.eval()
    with torch.no_grad():
        n_out = model(torch.zeros(1, *task.input_shape)).flatten(1).shape[1]
    return model, n_out


def _reachable(host: str, timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        return False
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def speed_up(model: nn.Module, channels_last: bool = False, compile: bool = False) -> None:
    """Every featurizer in ``model`` in the channels-last memory layout (its inputs turned so
    on the way in) and/or compiled with ``torch.compile``."""
    for featurizer in [m for m in model.modules() if isinstance(m, Featurizer)]:
        if channels_last:
            featurizer.to(memory_format=torch.channels_last)
            featurizer.register_forward_pre_hook(_to_channels_last)
        if compile:
            featurizer.compile()


def _to_channels_last(module: nn.Module, args: tuple) -> tuple:
    x, *rest = args
    return (x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x, *rest)
