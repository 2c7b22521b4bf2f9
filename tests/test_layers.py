"""FCN's bilinear upsampling kernel: a transposed convolution that is ``F.interpolate`` inside the map."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from minis.nn import bilinear_upsampling, bilinear_upsampling_weight

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def test_bilinear_kernel_by_hand() -> None:
    weight = bilinear_upsampling_weight(channels=2, factor=2)
    taps = torch.tensor([0.25, 0.75, 0.75, 0.25])  # a tent centred between the middle taps
    assert weight.shape == (2, 2, 4, 4)
    torch.testing.assert_close(weight[0, 0], torch.outer(taps, taps))
    torch.testing.assert_close(weight[1, 1], weight[0, 0])
    assert weight[0, 1].abs().sum() == 0 and weight[1, 0].abs().sum() == 0  # no mixing of classes
    odd = bilinear_upsampling_weight(channels=1, factor=3)[0, 0]  # odd factor: 5 taps, centred on one
    torch.testing.assert_close(odd[2], torch.tensor([1 / 3, 2 / 3, 1, 2 / 3, 1 / 3]))


@pytest.mark.parametrize("factor", [2, 3, 4, 8])
def test_transposed_convolution_equals_interpolate_away_from_the_border(factor: int) -> None:
    x = torch.randn(2, 3, 7, 10)
    with torch.no_grad():
        ours = bilinear_upsampling(3, factor)(x)
    reference = F.interpolate(x, scale_factor=factor, mode="bilinear", align_corners=False)
    assert ours.shape == reference.shape == (2, 3, 7 * factor, 10 * factor)
    b = factor // 2  # border where they differ
    torch.testing.assert_close(ours[..., b:-b, b:-b], reference[..., b:-b, b:-b], rtol=1e-5, atol=1e-5)
    # At the border the transposed convolution sees zeros beyond the edge, interpolate repeats the
    # edge pixel: on a constant map the first is darker there, the second stays constant.
    ones = torch.ones(1, 3, 7, 10)
    with torch.no_grad():
        faded = bilinear_upsampling(3, factor)(ones)
    assert (faded[..., 0, :] < 1).all() and (faded[..., b:-b, b:-b] - 1).abs().max() < 1e-5


def test_learnable_or_fixed() -> None:
    assert bilinear_upsampling(4, 2).weight.requires_grad
    fixed = bilinear_upsampling(4, 2, learnable=False)
    assert not fixed.weight.requires_grad and fixed.bias is None
