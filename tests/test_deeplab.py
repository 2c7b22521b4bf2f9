"""DeepLab v1/v2/v3/v3+: shapes, atrous rates, the ASPP branches, training, and torchvision parity."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torchvision.models.segmentation import deeplabv3_mobilenet_v3_large, deeplabv3_resnet50, deeplabv3_resnet101

import minis.models
from minis.models.deeplab import ASPP, ImagePooling
from minis.nn import PooledBatchNorm2d
from minis.nn.layers import IMAGENET_MEAN, IMAGENET_STD

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py

NAMES = ["deeplabv1", "deeplabv2", "deeplabv3", "deeplabv3plus"]


@pytest.mark.parametrize("name", NAMES)
def test_logits_at_input_resolution_for_any_size(name: str) -> None:
    model = minis.models.build(name, num_classes=5).eval()
    assert model.task == "semantic"
    with torch.no_grad():
        assert model(torch.rand(2, 3, 96, 96)).shape == (2, 5, 96, 96)
        assert model(torch.rand(1, 3, 97, 75)).shape == (1, 5, 97, 75)  # not a multiple of any stride


def learnable_batch(size: int = 64, num_classes: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Random 16x16 blocks, each coloured by its class plus noise; the top rows are ignored (255)."""
    coarse = torch.randint(0, num_classes, (2, size // 16, size // 16))
    targets = coarse.repeat_interleave(16, dim=1).repeat_interleave(16, dim=2)
    palette = torch.rand(num_classes, 3)
    images = (palette[targets].permute(0, 3, 1, 2) + 0.1 * torch.randn(2, 3, size, size)).clamp(0, 1)
    targets[:, :8] = 255
    return images, targets


@pytest.mark.parametrize("name", NAMES)
def test_one_training_step_lowers_the_loss(name: str) -> None:
    torch.manual_seed(0)
    model = minis.models.build(name, num_classes=3).train()
    images, targets = learnable_batch()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4)

    def loss_on_batch() -> torch.Tensor:
        torch.manual_seed(1)  # the same dropout masks before and after the step
        return sum(model(images, targets).values())

    before = loss_on_batch()
    optimizer.zero_grad()
    before.backward()
    optimizer.step()
    with torch.no_grad():
        after = loss_on_batch()
    assert after < 0.95 * before, (before.item(), after.item())


def test_deeplabv1_is_one_large_fov_classifier_at_stride_8() -> None:
    model = minis.models.build("deeplabv1", num_classes=4, head_channels=32)
    fc6, fc7, fc8 = (m for m in model.head.classifier if isinstance(m, torch.nn.Conv2d))
    assert model.backbone.output_stride == 8
    assert (fc6.kernel_size, fc6.dilation, fc6.padding, fc6.out_channels) == ((3, 3), (12, 12), (12, 12), 32)
    assert (fc7.kernel_size, fc8.kernel_size, fc8.out_channels) == ((1, 1), (1, 1), 4)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.head.modules())  # VGG era: no BN


@pytest.mark.parametrize("name", ["deeplabv1", "deeplabv2"])
def test_paper_backbone_is_vgg16_without_its_fully_connected_layers(name: str) -> None:
    model = minis.models.build(name, num_classes=4, backbone="vgg16", head_channels=16).eval()
    assert model.backbone.fc6 is None and model.backbone.output_stride == 8  # the LargeFOV head replaces fc6/fc7
    first_conv = model.head.classifier[0] if name == "deeplabv1" else model.head.branches[0][0]
    assert first_conv.in_channels == 512  # pool5
    with torch.no_grad():
        features = model.backbone(model.normalize(torch.rand(1, 3, 57, 43)))
        assert features["c5"].shape == (1, 512, 8, 6)  # ceil(57 / 8), ceil(43 / 8)
        assert model(torch.rand(1, 3, 57, 43)).shape == (1, 4, 57, 43)


def test_deeplabv2_sums_the_logits_of_its_four_branches() -> None:
    torch.manual_seed(0)
    model = minis.models.build("deeplabv2", num_classes=4, head_channels=16).eval()
    assert model.backbone.output_stride == 8
    assert [branch[0].dilation for branch in model.head.branches] == [(6, 6), (12, 12), (18, 18), (24, 24)]
    with torch.no_grad():
        features = model.backbone(model.normalize(torch.rand(2, 3, 200, 184)))  # c5 25x23: every rate matters
        per_branch = [branch(features["c5"]) for branch in model.head.branches]
        summed = model.head(features)
    assert summed.shape == (2, 4, 25, 23)
    torch.testing.assert_close(summed, sum(per_branch))
    for a, b in zip(per_branch, per_branch[1:]):  # four different views, not one repeated
        assert not torch.allclose(a, b)


@pytest.mark.parametrize("name", ["deeplabv3", "deeplabv3plus"])
def test_aspp_rates_follow_the_output_stride(name: str) -> None:
    def rates(model) -> list[tuple[int, int]]:
        return [branch[0].dilation for branch in model.head.aspp.branches[1:-1]]

    model16 = minis.models.build(name, num_classes=3)
    model8 = minis.models.build(name, num_classes=3, output_stride=8)
    custom = minis.models.build(name, num_classes=3, output_stride=8, rates=(2, 3))
    assert model16.backbone.output_stride == 16 and model8.backbone.output_stride == 8
    assert rates(model16) == [(6, 6), (12, 12), (18, 18)]
    assert rates(model8) == [(12, 12), (24, 24), (36, 36)]  # twice the resolution, twice the rate
    assert rates(custom) == [(2, 2), (3, 3)] and len(custom.head.aspp.branches) == 4  # 1x1 + 2 + pooling


def impulse_support(conv: torch.nn.Conv2d, size: int = 21) -> set[tuple[int, int]]:
    """Positions where a bias-free convolution responds to one lit pixel in the middle."""
    impulse = torch.zeros(1, conv.in_channels, size, size)
    impulse[..., size // 2, size // 2] = 1.0
    with torch.no_grad():
        response = conv(impulse).abs().sum(dim=(0, 1))
    return {(int(y), int(x)) for y, x in response.nonzero()}


@pytest.mark.parametrize("separable", [False, True])
def test_aspp_3x3_branches_are_dilated(separable: bool) -> None:
    torch.manual_seed(0)
    aspp = ASPP(in_channels=6, rates=(2, 3, 5), out_channels=8, separable=separable)
    for rate, branch in zip((2, 3, 5), aspp.branches[1:-1]):
        conv = branch[0]
        assert conv.kernel_size == (3, 3) and conv.dilation == (rate, rate) and conv.padding == (rate, rate)
        assert conv.groups == (6 if separable else 1)
        # a 3x3 filter with holes: the impulse reaches exactly the 9 taps `rate` pixels apart
        expected = {(10 + rate * dy, 10 + rate * dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)}
        assert impulse_support(conv) == expected
    assert aspp.eval()(torch.rand(2, 6, 13, 11)).shape == (2, 8, 13, 11)


@pytest.mark.parametrize("output_stride,default,multi_grid", [(16, [1, 2, 2], [2, 4, 8]), (8, [2, 4, 4], [4, 8, 16])])
def test_multi_grid_rates_in_the_last_stage(output_stride: int, default: list[int], multi_grid: list[int]) -> None:
    """The paper's multi-grid (1, 2, 4): rates 2, 4, 8 at output stride 16; torchvision's without it."""
    torch.manual_seed(0)
    plain = minis.models.build("deeplabv3", 3, backbone="resnet50", output_stride=output_stride)
    torch.manual_seed(0)
    grid = minis.models.build("deeplabv3", 3, backbone="resnet50", output_stride=output_stride, multi_grid=(1, 2, 4))
    assert [block.conv2.dilation[0] for block in plain.backbone.layer4] == default
    assert [block.conv2.dilation[0] for block in grid.backbone.layer4] == multi_grid
    # the rates are really used: each block's 3x3 convolution computes an explicitly dilated one
    for block, rate in zip(grid.backbone.layer4, multi_grid):
        x = torch.randn(1, block.conv2.in_channels, 19, 19)
        with torch.no_grad():
            reference = F.conv2d(x, block.conv2.weight, stride=block.conv2.stride, padding=rate, dilation=rate)
            torch.testing.assert_close(block.conv2(x), reference)
    grid.load_state_dict(plain.state_dict())  # only rates change: the same weights fit
    with torch.no_grad():
        images = torch.rand(1, 3, 65, 70)
        out_plain, out_grid = plain.eval()(images), grid.eval()(images)
    assert out_grid.shape == (1, 3, 65, 70) and not torch.allclose(out_plain, out_grid)


def test_multi_grid_on_the_small_backbone_and_bad_lengths() -> None:
    model = minis.models.build("deeplabv3", 3, multi_grid=(1, 2))  # two basic blocks: both 3x3 convs per block
    assert [(b.conv1.dilation[0], b.conv2.dilation[0]) for b in model.backbone.layer4] == [(2, 2), (4, 4)]
    assert model.build_args["multi_grid"] == (1, 2)
    with torch.no_grad():
        assert model.eval()(torch.rand(1, 3, 50, 61)).shape == (1, 3, 50, 61)
    with pytest.raises(ValueError, match="one unit rate per block.*2 for this backbone"):
        minis.models.build("deeplabv3", 3, multi_grid=(1, 2, 4))
    with pytest.raises(ValueError, match="needs a ResNet"):
        minis.models.build("deeplabv3", 3, backbone="vgg16", multi_grid=(1, 2, 4))


def test_image_pooling_is_one_vector_of_global_context_broadcast_everywhere() -> None:
    torch.manual_seed(0)
    pooling = ImagePooling(6, 4)
    pooling.bn.running_mean.uniform_(-0.2, 0.2)
    pooling.eval()
    x = torch.randn(2, 6, 9, 7)
    with torch.no_grad():
        out = pooling(x)
        expected = pooling.relu(pooling.bn(pooling.conv(x.mean(dim=(2, 3), keepdim=True))))
        shuffled = pooling(x.flatten(2)[..., torch.randperm(63)].view(2, 6, 9, 7))
    assert out.shape == (2, 4, 9, 7)
    torch.testing.assert_close(out, expected.expand_as(out))  # constant over space
    torch.testing.assert_close(shuffled, out)  # where things are does not matter, only what


def test_pooled_batch_norm_trains_with_a_single_image() -> None:
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        torch.nn.BatchNorm2d(3).train()(torch.randn(1, 3, 1, 1))  # why PooledBatchNorm2d exists
    norm = PooledBatchNorm2d(3).train()
    norm.running_mean.fill_(0.5)
    norm.running_var.fill_(4.0)
    x = torch.randn(1, 3, 1, 1)
    torch.testing.assert_close(norm(x), (x - 0.5) / (4.0 + norm.eps) ** 0.5)  # running statistics
    assert torch.equal(norm.running_mean, torch.full((3,), 0.5))  # and left unchanged
    batch = torch.randn(4, 3, 1, 1)
    torch.testing.assert_close(norm(batch), torch.nn.functional.batch_norm(batch, None, None, training=True))
    model = minis.models.build("deeplabv3", num_classes=3).train()
    losses = model(torch.rand(1, 3, 48, 48), torch.randint(0, 3, (1, 48, 48)))
    assert torch.isfinite(losses["loss_ce"])


def test_separable_convolutions_cut_the_parameters() -> None:
    def count(model) -> int:
        return sum(p.numel() for p in model.head.parameters())

    plain = minis.models.build("deeplabv3plus", num_classes=5)
    separable = minis.models.build("deeplabv3plus", num_classes=5, separable=True)
    assert count(separable) < 0.5 * count(plain)
    depthwise = [m for m in separable.head.modules() if isinstance(m, torch.nn.Conv2d) and m.groups > 1]
    assert len(depthwise) == 5  # three in ASPP, two in the decoder
    assert all(m.groups == m.in_channels == m.out_channels for m in depthwise)


def test_deeplabv3plus_decodes_at_stride_4_with_48_low_level_channels() -> None:
    model = minis.models.build("deeplabv3plus", num_classes=3).eval()
    with torch.no_grad():
        features = model.backbone(model.normalize(torch.rand(1, 3, 97, 75)))
        assert model.head.reduce[0].out_channels == 48
        assert model.head(features).shape[-2:] == features["c2"].shape[-2:] == (25, 19)
    # narrower heads keep the paper's 48:256 ratio of low-level to encoder channels, unless told otherwise
    assert minis.models.build("deeplabv3plus", num_classes=3, head_channels=64).head.reduce[0].out_channels == 12
    explicit = minis.models.build("deeplabv3plus", num_classes=3, head_channels=64, low_level_channels=48)
    assert explicit.head.reduce[0].out_channels == 48


@pytest.mark.parametrize("name,weight", [("deeplabv3", 0.5), ("deeplabv3plus", 0.4)])
def test_auxiliary_loss_only_in_training(name: str, weight: float) -> None:
    torch.manual_seed(0)
    images, targets = torch.rand(2, 3, 48, 48), torch.randint(0, 3, (2, 48, 48))
    with_aux = minis.models.build(name, num_classes=3, aux=True)
    for module in with_aux.modules():  # no dropout, so that the loss can be recomputed below
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    losses = with_aux.train()(images, targets)
    assert set(losses) == {"loss_ce", "loss_aux"}
    with torch.no_grad():  # the auxiliary loss is the aux head's cross-entropy times the weight
        features = with_aux.backbone(with_aux.normalize(images))
        aux_logits = torch.nn.functional.interpolate(with_aux.aux_head(features["c4"]), size=(48, 48),
                                                     mode="bilinear", align_corners=False)
    expected = weight * torch.nn.functional.cross_entropy(aux_logits, targets)
    assert torch.allclose(losses["loss_aux"], expected, rtol=1e-4)
    assert with_aux.eval()(images, targets).shape == (2, 3, 48, 48)  # eval: logits, aux head unused
    assert set(minis.models.build(name, num_classes=3).train()(images, targets)) == {"loss_ce"}


# --------------------------------------------------------------------------- torchvision parity


def randomise_batch_norm(model: torch.nn.Module, seed: int) -> None:
    """Non-trivial statistics, so that a mix-up of buffers cannot go unnoticed."""
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            n = module.num_features
            module.running_mean.copy_(torch.randn(n, generator=generator) * 0.1)
            module.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
            module.weight.data.copy_(torch.rand(n, generator=generator) + 0.5)
            module.bias.data.copy_(torch.randn(n, generator=generator) * 0.1)


@pytest.mark.parametrize("builder,aux,num_classes", [
    (deeplabv3_resnet50, True, 4), (deeplabv3_resnet50, False, 21),
    (deeplabv3_resnet101, True, 7), (deeplabv3_resnet101, False, 2),
])
def test_same_outputs_as_torchvision(builder, aux: bool, num_classes: int) -> None:
    torch.manual_seed(num_classes)
    reference = builder(weights=None, weights_backbone=None, num_classes=num_classes, aux_loss=aux)
    randomise_batch_norm(reference, seed=num_classes)
    ours = minis.models.from_torchvision(reference.train())
    assert ours.training  # the port keeps the mode it was given
    assert ours.build_args["rates"] == (12, 24, 36) and ours.build_args["output_stride"] == 8
    assert (ours.aux_head is not None) == aux
    reference.eval()
    ours.eval()
    images = torch.rand(1, 3, 65, 81)
    with torch.no_grad():
        expected = reference(torchvision.transforms.functional.normalize(images, IMAGENET_MEAN, IMAGENET_STD))
        logits = ours(images)
    assert logits.shape == expected["out"].shape == (1, num_classes, 65, 81)
    assert (logits - expected["out"]).abs().max() <= 1e-4
    if aux:  # the auxiliary head's weights came along too
        with torch.no_grad():
            features = ours.backbone(ours.normalize(images))
            aux_logits = torch.nn.functional.interpolate(ours.aux_head(features["c4"]), size=(65, 81),
                                                         mode="bilinear", align_corners=False)
        assert (aux_logits - expected["aux"]).abs().max() <= 1e-4


def test_port_refuses_mobilenet_deeplab() -> None:
    reference = deeplabv3_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=3)
    with pytest.raises(TypeError, match="ResNet-50/101 only"):
        minis.models.from_torchvision(reference)
