"""U-Net: any input size, the parameter count by hand, the concatenated skips, training."""

from __future__ import annotations

import pytest
import torch

import minis.models
from minis.models.unet import pad_to_multiple

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def test_default_maps_images_to_logits_at_input_resolution() -> None:
    model = minis.models.build("unet", num_classes=4).eval()
    assert model.task == "semantic"
    with torch.no_grad():
        assert model(torch.rand(2, 3, 96, 96)).shape == (2, 4, 96, 96)
        assert model(torch.rand(1, 3, 97, 75)).shape == (1, 4, 97, 75)  # padded to 112x80, cropped back
        assert model(torch.rand(1, 3, 7, 5)).shape == (1, 4, 7, 5)  # smaller than the padding


@pytest.mark.parametrize("depth,width,bilinear", [(2, 8, False), (3, 16, True), (5, 8, False)])
def test_depths_and_widths(depth: int, width: int, bilinear: bool) -> None:
    model = minis.models.build("unet", num_classes=3, depth=depth, width=width, bilinear=bilinear).eval()
    assert len(model.encoder) == depth + 1 and len(model.decoder) == depth
    assert model.encoder[depth][0][0].out_channels == width * 2**depth  # channels double per level
    with torch.no_grad():
        for size in ((96, 96), (65, 43)):
            assert model(torch.rand(1, 3, *size)).shape == (1, 3, *size)


def unet_parameters(depth: int, width: int, num_classes: int) -> int:
    """U-Net's parameter count by hand: 3x3 convolutions without bias (batch norm follows, with
    a scale and a shift per channel), 2x2 transposed convolutions and a 1x1 classifier with bias."""
    c = [width * 2**level for level in range(depth + 1)]

    def double_conv(cin: int, cout: int) -> int:
        return 9 * cin * cout + 2 * cout + 9 * cout * cout + 2 * cout

    encoder = double_conv(3, c[0]) + sum(double_conv(c[level - 1], c[level]) for level in range(1, depth + 1))
    up = sum(4 * c[level + 1] * c[level] + c[level] for level in range(depth))
    decoder = sum(double_conv(2 * c[level], c[level]) for level in range(depth))  # concatenated input
    return encoder + up + decoder + c[0] * num_classes + num_classes


def test_parameter_count_by_hand_and_growth_with_width() -> None:
    counts = {}
    for width in (16, 32):
        model = minis.models.build("unet", num_classes=5, width=width)
        counts[width] = sum(p.numel() for p in model.parameters())
        assert counts[width] == unet_parameters(4, width, 5)
    # almost every weight joins two layers whose widths both double: about 4x the parameters
    assert 3.9 < counts[32] / counts[16] < 4.0
    assert unet_parameters(4, 64, 2) == pytest.approx(31.0e6, rel=0.01)  # the paper's size, ~31 M


def test_decoder_concatenates_the_encoder_map() -> None:
    torch.manual_seed(0)
    model = minis.models.build("unet", num_classes=3, depth=3, width=8).eval()
    seen = {}
    model.encoder[1].register_forward_hook(lambda module, inputs, output: seen.update(encoder=output))
    model.up[1].register_forward_hook(lambda module, inputs, output: seen.update(up=output))
    model.decoder[1].register_forward_hook(lambda module, inputs, output: seen.update(decoder_input=inputs[0]))
    with torch.no_grad():
        model(torch.rand(1, 3, 64, 48))
    assert model.decoder[1][0][0].in_channels == 2 * 16  # the encoder's 16 + the upsampled 16
    assert seen["decoder_input"].shape == (1, 32, 32, 24)
    torch.testing.assert_close(seen["decoder_input"][:, :16], seen["encoder"])
    torch.testing.assert_close(seen["decoder_input"][:, 16:], seen["up"])


def test_padding_mirrors_the_image() -> None:
    images = torch.arange(20 * 18, dtype=torch.float32).view(1, 1, 20, 18)
    padded = pad_to_multiple(images, 16)
    assert padded.shape == (1, 1, 32, 32)
    torch.testing.assert_close(padded[..., :20, :18], images)
    torch.testing.assert_close(padded[..., 20, :18], images[..., 18, :])  # mirrored about the last row
    torch.testing.assert_close(padded[..., :20, 18], images[..., :, 16])
    assert pad_to_multiple(images[..., :16, :16], 16).shape == (1, 1, 16, 16)
    tiny = pad_to_multiple(images[..., :5, :7], 16)  # too small to mirror: the edge is repeated
    torch.testing.assert_close(tiny[..., 15, :7], images[..., 4, :7])


def test_one_training_step_lowers_the_loss() -> None:
    torch.manual_seed(0)
    model = minis.models.build("unet", num_classes=3).train()
    coarse = torch.randint(0, 3, (2, 6, 6))  # random 16x16 blocks in their class's colour
    targets = coarse.repeat_interleave(16, dim=1).repeat_interleave(16, dim=2)
    palette = torch.tensor([[0.1, 0.1, 0.1], [0.9, 0.2, 0.2], [0.2, 0.2, 0.9]])
    images = (palette[targets].permute(0, 3, 1, 2) + 0.1 * torch.randn(2, 3, 96, 96)).clamp(0, 1)
    targets[:, :10] = 255
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = model(images, targets)
    assert set(losses) == {"loss_ce"}
    optimizer.zero_grad()
    losses["loss_ce"].backward()
    optimizer.step()
    with torch.no_grad():
        assert model(images, targets)["loss_ce"] < 0.97 * losses["loss_ce"]


def test_deep_supervision_classifies_the_bottom_of_the_u() -> None:
    torch.manual_seed(0)
    images, targets = torch.rand(2, 3, 40, 56), torch.randint(0, 3, (2, 40, 56))
    model = minis.models.build("unet", num_classes=3, depth=3, width=4, aux_weight=0.4).train()
    bottom = {}
    model.encoder[3].register_forward_hook(lambda module, inputs, output: bottom.setdefault("map", output))
    losses = model(images, targets)
    assert set(losses) == {"loss_ce", "loss_aux"}
    assert bottom["map"].shape == (2, 32, 5, 7)  # 40x56 is already a multiple of 8: no padding
    with torch.no_grad():
        aux_logits = torch.nn.functional.interpolate(model.aux_classifier(bottom["map"]), size=(40, 56),
                                                     mode="bilinear", align_corners=False)
    expected = 0.4 * torch.nn.functional.cross_entropy(aux_logits, targets)
    assert torch.allclose(losses["loss_aux"], expected, rtol=1e-4)
    assert model.eval()(images).shape == (2, 3, 40, 56)
    assert minis.models.build("unet", num_classes=3).aux_classifier is None  # off by default, as in the paper


def test_bad_depth_is_refused() -> None:
    with pytest.raises(ValueError, match="at least one downsampling"):
        minis.models.build("unet", num_classes=3, depth=0)
