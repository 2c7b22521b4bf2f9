"""ResNet backbones: torchvision's weights load unchanged and give torchvision's features."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.ops import FrozenBatchNorm2d as TorchvisionFrozenBN

from minis.nn.backbones import VGG16, FrozenBatchNorm2d, ResNet, convert_torchvision_vgg16, fc_to_conv, resnet, vgg16

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py

# torchvision expresses the output stride as which of layer2/3/4 trade their stride for dilation
TORCHVISION_DILATION = {32: [False, False, False], 16: [False, False, True], 8: [False, True, True]}


def randomise_batch_norm(model: torch.nn.Module, seed: int) -> None:
    """Non-trivial statistics, so that a mix-up of buffers cannot go unnoticed."""
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, (torch.nn.BatchNorm2d, FrozenBatchNorm2d)):
            n = module.running_mean.numel()
            module.running_mean.copy_(torch.randn(n, generator=generator) * 0.1)
            module.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
            module.weight.data.copy_(torch.rand(n, generator=generator) + 0.5)
            module.bias.data.copy_(torch.randn(n, generator=generator) * 0.1)


@pytest.mark.parametrize("depth,output_stride", [(18, 32), (50, 32), (50, 16), (50, 8)])
def test_same_weights_same_features_as_torchvision(depth: int, output_stride: int) -> None:
    torch.manual_seed(depth + output_stride)
    reference = torchvision.models.get_model(
        f"resnet{depth}", weights=None, replace_stride_with_dilation=TORCHVISION_DILATION[output_stride]
    )
    randomise_batch_norm(reference, seed=depth)
    reference.eval()
    ours = ResNet(depth, output_stride).eval()
    missing, unexpected = ours.load_state_dict(reference.state_dict(), strict=False)
    assert not missing and set(unexpected) == {"fc.weight", "fc.bias"}

    layers = {"layer1": "c2", "layer2": "c3", "layer3": "c4", "layer4": "c5"}
    images = torch.randn(2, 3, 96, 80)
    with torch.no_grad():
        expected = IntermediateLayerGetter(reference, layers)(images)
        features = ours(images)
    strides = {"c2": 4, "c3": 8, "c4": min(16, output_stride), "c5": output_stride}
    for name, stride in strides.items():
        assert features[name].shape[-2:] == (-(-96 // stride), -(-80 // stride)), name
        assert features[name].shape[1] == ours.channels[name]
        torch.testing.assert_close(features[name], expected[name], rtol=1e-4, atol=1e-4)


def test_resnet18_also_dilates() -> None:
    """torchvision's BasicBlock refuses dilation; ours allows a small backbone at stride 8."""
    features = ResNet(18, output_stride=8).eval()(torch.randn(1, 3, 64, 64))
    assert features["c5"].shape == (1, 512, 8, 8)


def test_frozen_batch_norm_matches_torchvision_and_loads_batch_norm_weights() -> None:
    batch_norm = torch.nn.BatchNorm2d(8)
    randomise_batch_norm(batch_norm, seed=0)
    ours, theirs = FrozenBatchNorm2d(8), TorchvisionFrozenBN(8)
    ours.load_state_dict(batch_norm.state_dict())  # num_batches_tracked is dropped quietly
    theirs.load_state_dict({k: v for k, v in batch_norm.state_dict().items() if k != "num_batches_tracked"})
    x = torch.randn(2, 8, 5, 5)
    torch.testing.assert_close(ours(x), theirs(x))
    torch.testing.assert_close(ours(x), batch_norm.eval()(x))
    frozen = ResNet(18, frozen_bn=True)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in frozen.modules())
    assert all(p.requires_grad for p in frozen.parameters())  # only the norm layers are frozen


def test_pretrained_offline_gives_a_clear_error(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # empty cache: the weights must be downloaded
    monkeypatch.setattr("torch.hub.urlopen", _no_network, raising=False)
    with pytest.raises(RuntimeError, match="could not download the ImageNet weights of ResNet-18"):
        resnet(18, pretrained=True)


def _no_network(*args, **kwargs):
    import urllib.error

    raise urllib.error.URLError("no network in this test")


def test_bad_arguments_are_named() -> None:
    with pytest.raises(ValueError, match="output_stride must be one of"):
        ResNet(50, output_stride=4)
    with pytest.raises(ValueError, match="depth must be one of"):
        ResNet(42)


# --- VGG-16 --------------------------------------------------------------------------------------
# A VGG-16 with its fc layers holds ~138 M parameters (~0.5 GB): the tests share two instances.
VGG_POOLS = {9: "c2", 16: "c3", 23: "c4", 30: "pool5"}  # index in torchvision's ``features``


@pytest.fixture(scope="module")
def torchvision_vgg() -> torch.nn.Module:
    torch.manual_seed(16)
    model = torchvision.models.vgg16(weights=None).eval()
    with torch.no_grad():  # torchvision starts the biases at zero; random ones catch a mix-up
        for module in model.modules():
            if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
                module.bias.normal_(0, 0.05)
    return model


@pytest.fixture(scope="module")
def our_vgg(torchvision_vgg) -> VGG16:
    model = VGG16().eval()
    model.load_state_dict(convert_torchvision_vgg16(torchvision_vgg.state_dict()), strict=True)
    return model


def torchvision_vgg_pools(model: torch.nn.Module, images: torch.Tensor) -> dict[str, torch.Tensor]:
    outputs, x = {}, images
    for index, layer in enumerate(model.features):
        x = layer(x)
        if index in VGG_POOLS:
            outputs[VGG_POOLS[index]] = x
    return outputs


def test_vgg_features_equal_torchvision(torchvision_vgg, our_vgg) -> None:
    images = torch.randn(2, 3, 64, 96)
    without_fc = VGG16(fc_layers=False).eval()
    without_fc.load_state_dict(convert_torchvision_vgg16(torchvision_vgg.state_dict(), fc_layers=False), strict=True)
    with torch.no_grad():
        expected = torchvision_vgg_pools(torchvision_vgg, images)
        features = our_vgg(images)
        pool5 = without_fc(images)["c5"]
    for name, stride in {"c2": 4, "c3": 8, "c4": 16}.items():
        assert features[name].shape == (2, our_vgg.channels[name], 64 // stride, 96 // stride)
        torch.testing.assert_close(features[name], expected[name], rtol=1e-4, atol=1e-4)
    assert without_fc.channels["c5"] == 512
    torch.testing.assert_close(pool5, expected["pool5"], rtol=1e-4, atol=1e-4)
    assert features["c5"].shape == (2, 4096, 2, 3)  # fc7, one position per pool5 position


def test_vgg_fully_connected_layers_are_convolutions(torchvision_vgg, our_vgg) -> None:
    """On a 224x224 image pool5 is 7x7: fc6 as a 7x7 convolution sits exactly on it at the centre."""
    images = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        pool5 = torchvision_vgg.features(images)  # [1, 512, 7, 7]
        fc7 = torchvision_vgg.classifier[:5](torch.flatten(torchvision_vgg.avgpool(pool5), 1))  # [1, 4096]
        ours = our_vgg(images)["c5"]
    assert ours.shape == (1, 4096, 7, 7)
    torch.testing.assert_close(ours[:, :, 3, 3], fc7, rtol=1e-4, atol=1e-4)

    # fc_to_conv on its own: the same numbers as the linear layer where the kernel fits, and on
    # a larger map the classifier's answer for every 7x7 window.
    fc6 = torchvision_vgg.classifier[0]
    conv6 = fc_to_conv(fc6, in_channels=512, kernel_size=7)
    larger = torch.randn(1, 512, 9, 8)
    with torch.no_grad():
        torch.testing.assert_close(conv6(pool5)[:, :, 0, 0], fc6(pool5.flatten(1)), rtol=1e-4, atol=1e-4)
        slid = conv6(larger)  # [1, 4096, 3, 2]
        window = larger[:, :, 2:9, 1:8]
        torch.testing.assert_close(slid[:, :, 2, 1], fc6(window.flatten(1)), rtol=1e-4, atol=1e-4)
    assert slid.shape == (1, 4096, 3, 2)
    with pytest.raises(ValueError, match="does not take a 512x3x3 map"):
        fc_to_conv(fc6, in_channels=512, kernel_size=3)


def test_vgg_output_stride_by_dilation(torchvision_vgg) -> None:
    """DeepLab v1's VGG: the same weights (they load strictly) give maps at stride 8 or 16."""
    dilated = VGG16(output_stride=8).eval()
    dilated.load_state_dict(convert_torchvision_vgg16(torchvision_vgg.state_dict()), strict=True)
    assert dilated.fc6.dilation == (4, 4) and dilated.features[24].dilation == (2, 2)
    with torch.no_grad():
        features = dilated(torch.randn(1, 3, 32, 40))
    strides = {"c2": 4, "c3": 8, "c4": 8, "c5": 8}
    assert {name: tuple(f.shape[-2:]) for name, f in features.items()} == {
        name: (32 // s, 40 // s) for name, s in strides.items()}
    del dilated
    features = VGG16(output_stride=16, fc_layers=False).eval()(torch.randn(1, 3, 65, 97))
    # pools round up, as the ResNets' strided convolutions do: ceil(65 / 16) = 5, ceil(97 / 16) = 7
    assert {name: tuple(f.shape[-2:]) for name, f in features.items()} == {
        "c2": (17, 25), "c3": (9, 13), "c4": (5, 7), "c5": (5, 7)}
    with pytest.raises(ValueError, match="output_stride must be one of"):
        VGG16(output_stride=4)


def test_vgg_pretrained_offline_gives_a_clear_error(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr("torch.hub.urlopen", _no_network, raising=False)
    with pytest.raises(RuntimeError, match="could not download the ImageNet weights of VGG-16"):
        vgg16(pretrained=True, fc_layers=False)
