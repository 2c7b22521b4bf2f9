"""FCN-32s/16s/8s: shapes, the zero-initialised and aligned skips, training, and the torchvision port."""

from __future__ import annotations

import math

import pytest
import torch
import torchvision
from torch import nn

import minis.models
from minis.models.fcn import FCN
from minis.nn import FCNHead, build_backbone
from minis.nn.layers import IMAGENET_MEAN, IMAGENET_STD

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py

NAMES = ("fcn32s", "fcn16s", "fcn8s")


@pytest.mark.parametrize("name", NAMES)
def test_logits_at_input_resolution_for_any_size(name: str) -> None:
    model = minis.models.build(name, num_classes=5).eval()
    assert model.task == "semantic" and model.build_args == {"name": name, "num_classes": 5}
    with torch.no_grad():
        assert model(torch.rand(2, 3, 96, 96)).shape == (2, 5, 96, 96)
        assert model(torch.rand(1, 3, 97, 75)).shape == (1, 5, 97, 75)  # odd: upsampled maps are cropped
        assert model(torch.rand(1, 3, 33, 17)).shape == (1, 5, 33, 17)


def test_fcn32s_at_finer_output_strides() -> None:
    for output_stride in (16, 8):
        model = minis.models.build("fcn32s", num_classes=3, output_stride=output_stride).eval()
        with torch.no_grad():
            assert model.backbone(torch.rand(1, 3, 64, 64))["c5"].shape[-1] == 64 // output_stride
            assert model(torch.rand(1, 3, 61, 70)).shape == (1, 3, 61, 70)


class RampBackbone(nn.Module):
    """A stand-in backbone: ``c5`` holds the image coordinates (row, column) of each pixel's centre,
    ``c4`` and ``c3`` are loud noise. Pixel ``j`` of a stride-``s`` map is centred at
    ``(j + 0.5) * s - 0.5`` (the convention of bilinear resizing with ``align_corners=False``)."""

    output_stride = 32

    def __init__(self, channels: dict[str, int]) -> None:
        super().__init__()
        self.channels = channels

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        batch, _, height, width = images.shape
        features = {name: 10 * torch.randn(batch, self.channels[name], math.ceil(height / s), math.ceil(width / s))
                    for name, s in (("c3", 8), ("c4", 16))}
        rows = (torch.arange(math.ceil(height / 32)) + 0.5) * 32 - 0.5
        cols = (torch.arange(math.ceil(width / 32)) + 0.5) * 32 - 0.5
        grid = torch.stack(torch.meshgrid(rows, cols, indexing="ij"))  # [2, h, w]
        features["c5"] = grid.expand(batch, -1, -1, -1)
        return features


@pytest.mark.parametrize("name,size", [("fcn32s", (256, 224)), ("fcn16s", (256, 224)), ("fcn8s", (256, 224)),
                                       ("fcn16s", (208, 176)), ("fcn8s", (208, 176))])
def test_skips_start_at_zero_and_are_aligned(name: str, size: tuple[int, int]) -> None:
    """With scores that are a linear ramp, every bilinear step reproduces the ramp exactly, so
    away from the borders FCN-16s and FCN-8s at initialisation give FCN-32s's output - the
    image coordinates themselves - however loud ``c4``/``c3`` are (their score layers start at zero).
    A crop at the wrong offset would shift the ramp by 16 or 8 pixels. 208x176 has odd
    stride-16 maps (13x11, upsampled from 7x6 to 14x12 and cropped)."""
    torch.manual_seed(0)
    model = minis.models.build(name, num_classes=2).eval()
    assert all((layer.weight == 0).all() and (layer.bias == 0).all() for layer in model.skip_classifiers.values())
    model.backbone = RampBackbone(model.backbone.channels)
    model.classifier = nn.Identity()  # the scores are the ramp itself
    with torch.no_grad():
        logits = model(torch.rand(1, 3, *size))
    rows, cols = torch.meshgrid(torch.arange(size[0]), torch.arange(size[1]), indexing="ij")
    expected = torch.stack([rows, cols]).float()[None]
    margin = 48  # border effects: zero padding of the transposed convolutions, edge clamping of the resize
    inner = (..., slice(margin, -margin), slice(margin, -margin))
    torch.testing.assert_close(logits[inner], expected[inner], rtol=0, atol=1e-3)


def test_fcn8s_starts_from_fcn32s_weights() -> None:
    """The paper's staged training: FCN-32s's weights load into FCN-8s; only the skips are new, and
    the network starts with (nearly) FCN-32s's predictions - not exactly, because two bilinear 2x
    steps and one 8x resize smooth a little more than one 32x resize."""
    torch.manual_seed(0)
    fcn32s = minis.models.build("fcn32s", num_classes=4).eval()
    fcn8s = minis.models.build("fcn8s", num_classes=4).eval()
    missing, unexpected = fcn8s.load_state_dict(fcn32s.state_dict(), strict=False)
    assert not unexpected
    assert set(missing) == {"skip_classifiers.c4.weight", "skip_classifiers.c4.bias", "skip_classifiers.c3.weight",
                            "skip_classifiers.c3.bias", "upsamplers.c4.weight", "upsamplers.c3.weight"}
    images = torch.rand(2, 3, 128, 160)
    with torch.no_grad():
        before, after = fcn32s(images), fcn8s(images)
    inner = (..., slice(32, -32), slice(32, -32))
    assert (after[inner] - before[inner]).abs().mean() < 0.05 * before.std()
    assert (after.argmax(1) == before.argmax(1)).float().mean() > 0.95


@pytest.mark.parametrize("name,aux", [("fcn32s", False), ("fcn16s", False), ("fcn8s", True)])
def test_one_training_step_lowers_the_loss(name: str, aux: bool) -> None:
    torch.manual_seed(0)
    model = minis.models.build(name, num_classes=3, aux=aux).train()
    images, targets = random_blocks_batch()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def total_loss() -> tuple[torch.Tensor, set[str]]:
        torch.manual_seed(1)  # the same dropout mask before and after the step
        losses = model(images, targets)
        return sum(losses.values()), set(losses)

    loss, names = total_loss()
    assert names == ({"loss_ce", "loss_aux"} if aux else {"loss_ce"})
    optimizer.zero_grad()
    loss.backward()
    for layer in model.skip_classifiers.values():  # zero weights still get gradients
        assert layer.weight.grad.abs().sum() > 0
    optimizer.step()
    with torch.no_grad():
        assert total_loss()[0] < 0.97 * loss


def random_blocks_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Random 16x16 blocks of three classes, each drawn in its class's colour plus noise.

    Per-pixel random labels would be unlearnable at stride 32 (the loss already sits at log 3);
    blocks give one step something to learn. The top rows are ignored (label 255).
    """
    coarse = torch.randint(0, 3, (2, 6, 6))
    targets = coarse.repeat_interleave(16, dim=1).repeat_interleave(16, dim=2)  # [2, 96, 96]
    palette = torch.tensor([[0.1, 0.1, 0.1], [0.9, 0.2, 0.2], [0.2, 0.2, 0.9]])
    images = (palette[targets].permute(0, 3, 1, 2) + 0.1 * torch.randn(2, 3, 96, 96)).clamp(0, 1)
    targets[:, :10] = 255
    return images, targets


def test_vgg16_fcn8s_maps_images_to_logits() -> None:
    """The paper's network (~134 M parameters with fc6/fc7): fc7 scored by a zero-initialised 1x1 conv."""
    model = minis.models.build("fcn8s", num_classes=4, backbone="vgg16").eval()
    assert isinstance(model.classifier, nn.Conv2d) and model.classifier.in_channels == 4096
    assert (model.classifier.weight == 0).all()
    assert model.skip_classifiers["c4"].in_channels == 512 and model.skip_classifiers["c3"].in_channels == 256
    with torch.no_grad():
        assert model(torch.rand(1, 3, 64, 64)).shape == (1, 4, 64, 64)
        assert model(torch.rand(1, 3, 71, 50)).shape == (1, 4, 71, 50)


def test_bad_options_are_refused() -> None:
    with pytest.raises(ValueError, match="skips need a backbone at output stride 32"):
        minis.models.build("fcn8s", num_classes=3, output_stride=8)
    with pytest.raises(ValueError, match="skips need a backbone at output stride 32"):
        minis.models.build("fcn16s", num_classes=3, output_stride=16)
    backbone = build_backbone("small")
    with pytest.raises(ValueError, match="from coarse to fine"):
        FCN(backbone, FCNHead(backbone.channels["c5"], 3), 3, skips=("c3",))


# --------------------------------------------------------------------------- torchvision port


def randomise_batch_norm(model: nn.Module, seed: int) -> None:
    """Non-trivial statistics and affine parameters, so that a mix-up of buffers shows. Scales
    stay below 1: above, ResNet-101's 33 residual blocks blow the logits up to ~1e6, where float32
    cannot resolve a 1e-4 tolerance."""
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            n = module.num_features
            module.running_mean.copy_(torch.randn(n, generator=generator) * 0.1)
            module.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
            module.weight.data.copy_(torch.rand(n, generator=generator) * 0.5 + 0.5)
            module.bias.data.copy_(torch.randn(n, generator=generator) * 0.1)


@pytest.mark.parametrize("depth,aux,num_classes", [(50, True, 3), (50, False, 21), (101, True, 3), (101, False, 3)])
def test_port_gives_torchvision_outputs(depth: int, aux: bool, num_classes: int) -> None:
    torch.manual_seed(depth)
    builder = getattr(torchvision.models.segmentation, f"fcn_resnet{depth}")
    reference = builder(weights=None, weights_backbone=None, num_classes=num_classes, aux_loss=aux)
    randomise_batch_norm(reference, seed=depth)
    model = minis.models.from_torchvision(reference.train())
    assert model.training  # the mode is carried over
    assert model.build_args == {"name": "fcn32s", "num_classes": num_classes, "backbone": f"resnet{depth}",
                                "output_stride": 8, "aux": aux}
    reference.eval()
    model.eval()
    images = torch.rand(1, 3, 65, 81)
    normalised = (images - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = reference(normalised)
        logits = model(images)
    assert logits.shape == (1, num_classes, 65, 81)
    torch.testing.assert_close(logits, expected["out"], rtol=0, atol=1e-4)
    assert (model.aux_classifier is not None) == aux == ("aux" in expected)
    if aux:  # the auxiliary head is used in training only; check its weights through its own output
        with torch.no_grad():
            c4 = model.backbone(model.normalize(images))["c4"]
            aux_logits = torch.nn.functional.interpolate(model.aux_classifier(c4), size=(65, 81), mode="bilinear")
        torch.testing.assert_close(aux_logits, expected["aux"], rtol=0, atol=1e-4)
