import pytest
import torch

from dgkit.errors import ConfigError
from dgkit.networks import MNISTCNN, Backbone
from dgkit.task import Task

DIGITS = Task(input_shape=(1, 28, 28), num_classes=10, source_domains=("a", "b"),
              default_backbone="mnist_cnn")
IMAGES = Task(input_shape=(3, 32, 32), num_classes=5, source_domains=("a",))


def test_auto_backbone_follows_the_data_set():
    net = Backbone().build(DIGITS)
    assert isinstance(net.body, MNISTCNN) and net.n_outputs == 128
    assert net(torch.zeros(4, 1, 28, 28)).shape == (4, 128)


@pytest.mark.parametrize("name", ["resnet18", "torchvision/resnet18"])
def test_timm_and_torchvision_backbones(name):
    net = Backbone(name).build(IMAGES)
    assert net(torch.zeros(2, 3, 32, 32)).shape == (2, net.n_outputs) and net.n_outputs == 512


@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "convnext_atto", "efficientnet_b0"])
def test_any_timm_family_at_the_data_size(name):
    net = Backbone(name).build(IMAGES)
    assert net(torch.zeros(2, 3, 32, 32)).shape == (2, net.n_outputs)


def test_timm_adapts_input_channels():
    assert Backbone("resnet18").build(DIGITS)(torch.zeros(2, 1, 28, 28)).shape == (2, 512)


def test_frozen_batchnorm_keeps_running_statistics():
    net = Backbone("resnet18", freeze_bn=True).build(IMAGES).train()
    bn = next(m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d))
    before = bn.running_mean.clone()
    net(torch.randn(4, 3, 32, 32) + 3)
    assert not bn.training and torch.equal(bn.running_mean, before)


def test_pretrained_weights_from_a_local_file(tmp_path):
    import timm

    source = timm.create_model("resnet18", num_classes=0)
    path = tmp_path / "resnet18.pth"
    torch.save(source.state_dict(), path)
    net = Backbone("resnet18", pretrained=str(path)).build(IMAGES)
    torch.testing.assert_close(net.body.conv1.weight, source.conv1.weight)


def test_offline_without_cached_weights_fails_fast_with_advice(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    # HF_HUB_OFFLINE short-cuts the reachability probe, so this raises before timm retries.
    with pytest.raises(ConfigError, match=r"not cached and the hub is unreachable.*--model.pretrained"):
        Backbone("resnet18", pretrained=True).build(IMAGES)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": "resnet_does_not_exist"}, "model.backbone: 'resnet_does_not_exist' is neither"),
        ({"name": "mnist_cnn", "pretrained": True}, "mnist_cnn has no pretrained weights"),
        ({"pretrained": "no/such/file.pth"}, "no weights file at"),
        ({"dropout": -0.5}, "model.dropout"),
    ],
)
def test_bad_backbone_settings(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        Backbone(**kwargs).build(DIGITS)
