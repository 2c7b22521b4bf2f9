"""ResNet backbones: torchvision's weights load unchanged and give torchvision's features."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.ops import FrozenBatchNorm2d as TorchvisionFrozenBN

from minis.nn.backbones import FrozenBatchNorm2d, ResNet, resnet

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
