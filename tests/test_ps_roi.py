"""minis.ops.ps_roi_align / ps_roi_pool against torchvision's kernels: random inputs, the channel
layout, the conventions the module documents, edge cases, low precision and gradients.

Where minis departs from torchvision (0, not nan, for a zero-width box with an adaptive sampling
grid; float32 sums for float16 and bfloat16 features), the test says so and checks both sides.
"""

from __future__ import annotations

import math

import pytest
import torch
import torchvision.ops as tv_ops

import minis.ops as ops

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py

OUTPUT_SIZES = [1, 3, 7, (3, 5)]
SCALES = [1.0, 0.25, 1 / 16]


def bins_of(output_size: int | tuple[int, int]) -> int:
    return output_size * output_size if isinstance(output_size, int) else output_size[0] * output_size[1]


def ps_features(output_size: int | tuple[int, int], classes: int = 2, batch: int = 3, height: int = 12,
                width: int = 14, seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """``[batch, classes * h * w, height, width]`` random features."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, classes * bins_of(output_size), height, width, generator=generator, dtype=dtype)


def ps_rois(batch: int, k: int, seed: int, scale: float = 1.0, height: int = 12, width: int = 14,
            dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """``[k,5]`` RoIs in image pixels (the map's cells / ``scale``), positive sides, some partly
    outside the map; every image of the batch gets boxes."""
    generator = torch.Generator().manual_seed(seed)
    extent = torch.tensor([width, height], dtype=dtype)
    top_left = torch.rand(k, 2, generator=generator, dtype=dtype) * (extent + 6) - 3
    sides = 0.2 + torch.rand(k, 2, generator=generator, dtype=dtype) * extent * 0.8
    index = (torch.arange(k) % batch).to(dtype)
    return torch.cat([index[:, None], top_left / scale, (top_left + sides) / scale], dim=1)


def per_image(rois: torch.Tensor, batch: int) -> list[torch.Tensor]:
    """The same boxes as a list of ``[L_i, 4]`` tensors, and the order of ``rois`` it gives."""
    return [rois[rois[:, 0] == i, 1:] for i in range(batch)]


def image_order(rois: torch.Tensor) -> torch.Tensor:
    return torch.argsort(rois[:, 0], stable=True)


def assert_close_to(ours: torch.Tensor, theirs: torch.Tensor, tolerance: float) -> None:
    assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
    torch.testing.assert_close(ours, theirs, rtol=tolerance, atol=tolerance, equal_nan=True)


# --------------------------------------------------------------------------------------------
# Random inputs in float64: both box formats, every output size, scale and sampling ratio
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("output_size", OUTPUT_SIZES)
@pytest.mark.parametrize("spatial_scale", SCALES)
@pytest.mark.parametrize("sampling_ratio", [-1, 0, 1, 2])
def test_ps_roi_align_equals_torchvision(output_size, spatial_scale: float, sampling_ratio: int) -> None:
    features, rois = ps_features(output_size, seed=1), ps_rois(3, 24, seed=2, scale=spatial_scale)
    theirs = tv_ops.ps_roi_align(features, rois, output_size, spatial_scale, sampling_ratio)
    ours = ops.ps_roi_align(features, rois, output_size, spatial_scale, sampling_ratio)
    assert_close_to(ours, theirs, 1e-12)
    listed = ops.ps_roi_align(features, per_image(rois, 3), output_size, spatial_scale, sampling_ratio)
    assert_close_to(listed, theirs[image_order(rois)], 1e-12)


@pytest.mark.parametrize("output_size", OUTPUT_SIZES)
@pytest.mark.parametrize("spatial_scale", SCALES)
def test_ps_roi_pool_equals_torchvision(output_size, spatial_scale: float) -> None:
    features, rois = ps_features(output_size, seed=3), ps_rois(3, 24, seed=4, scale=spatial_scale)
    theirs = tv_ops.ps_roi_pool(features, rois, output_size, spatial_scale)
    assert_close_to(ops.ps_roi_pool(features, rois, output_size, spatial_scale), theirs, 1e-12)
    listed = ops.ps_roi_pool(features, per_image(rois, 3), output_size, spatial_scale)
    assert_close_to(listed, theirs[image_order(rois)], 1e-12)


def test_ps_ops_on_several_images_read_each_box_from_its_own_image() -> None:
    features, rois = ps_features(3, batch=3, seed=5), ps_rois(3, 9, seed=6)
    for name in ("ps_roi_align", "ps_roi_pool"):
        ours = getattr(ops, name)(features, rois, 3)
        for image in range(3):
            mine = rois[:, 0] == image
            alone = rois[mine].clone()
            alone[:, 0] = 0
            assert_close_to(ours[mine], getattr(tv_ops, name)(features[image:image + 1], alone, 3), 1e-12)
        # a list with an image that has no boxes
        boxes = [rois[:2, 1:], torch.zeros(0, 4, dtype=torch.float64), rois[2:5, 1:]]
        assert_close_to(getattr(ops, name)(features, boxes, 3), getattr(tv_ops, name)(features, boxes, 3), 1e-12)


# --------------------------------------------------------------------------------------------
# The channel layout and the documented conventions
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("output_size", [3, (3, 5)])
@pytest.mark.parametrize("name", ["ps_roi_align", "ps_roi_pool"])
def test_output_bin_i_j_of_class_c_reads_input_channel_c_h_w_plus_i_w_plus_j(name: str, output_size) -> None:
    h, w = (output_size, output_size) if isinstance(output_size, int) else output_size
    classes = 4
    # channel g holds the constant g everywhere: any average of it is g
    features = torch.arange(classes * h * w, dtype=torch.float64)[None, :, None, None].expand(2, -1, 16, 20)
    rois = torch.tensor([[0, 1.0, 2.0, 15.0, 12.0], [1, 4.0, 0.5, 18.5, 14.0], [1, 0.0, 0.0, 19.0, 15.0]],
                        dtype=torch.float64)
    expected = torch.arange(classes * h * w, dtype=torch.float64).reshape(classes, h, w).expand(3, -1, -1, -1)
    for module in (ops, tv_ops):
        assert torch.equal(getattr(module, name)(features.contiguous(), rois, output_size), expected)


def ramp(width: int = 12, height: int = 8, channels: int = 1) -> torch.Tensor:
    """A map whose value is the column index: a pooled value is the mean column it read."""
    return torch.arange(width, dtype=torch.float64)[None, None, None, :].expand(1, channels, height, width).contiguous()


def both(name: str, features: torch.Tensor, box: list[float], *args) -> list[float]:
    """The value of a 1 x 1 pooling of ``box`` with minis and with torchvision (they must agree)."""
    rois = torch.tensor([[0.0, *box]], dtype=torch.float64)
    ours, theirs = (getattr(module, name)(features, rois, 1, *args) for module in (ops, tv_ops))
    assert_close_to(ours, theirs, 1e-12)
    return ours.flatten().tolist()


def test_ps_roi_align_conventions() -> None:
    # the half-cell shift of roi_align(aligned=True): a box from 0 to 4 is centred on column 1.5
    assert both("ps_roi_align", ramp(), [0, 0, 4, 4], 1.0, 1) == [1.5]
    assert tv_ops.roi_align(ramp(), torch.tensor([[0.0, 0, 0, 4, 4]], dtype=torch.float64), 1, 1.0, 1).item() == 2.0
    # no minimum size: a box 0.2 wide is sampled at its centre (roi_align(aligned=False) makes it a cell)
    assert both("ps_roi_align", ramp(), [2, 2, 2.2, 2.2], 1.0, 1) == [pytest.approx(1.6, abs=1e-12)]
    # the adaptive grid samples ceil(bin size) points per side: 3 columns 1 apart, centred
    assert both("ps_roi_align", ramp(), [1, 1, 4, 4], 1.0, 0) == [pytest.approx(2.0)]


def test_ps_roi_pool_conventions() -> None:
    features = torch.randn(1, 1, 6, 6, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    # an average, not a maximum; the rounded end is exclusive: columns and rows 0..3
    assert both("ps_roi_pool", features, [0, 0, 4, 4]) == [pytest.approx(features[0, 0, :4, :4].mean().item())]
    # clipped to H-1 and W-1: the last row and column are never pooled, even by a box covering the map
    for end in (6.0, 20.0):
        assert both("ps_roi_pool", features, [0, 0, end, end]) == [pytest.approx(features[0, 0, :5, :5].mean().item())]
    # C's round(), half away from zero, of the scaled coordinates: 0.5 -> 1 and 2.5 -> 3 (not 0 and 2)
    assert both("ps_roi_pool", ramp(), [0.5, 0, 3.5, 5]) == [2.0]  # columns 1..3
    assert both("ps_roi_pool", ramp(), [10, 0, 22, 20], 0.25) == [4.0]  # 2.5..5.5 -> columns 3..5
    # a box narrower than a cell, or inverted, is one cell wide
    assert both("ps_roi_pool", ramp(), [3, 0, 3, 5]) == [3.0]
    assert both("ps_roi_pool", ramp(), [5, 0, 3, 5]) == [5.0]
    # RoIPool's bins: a 4-cell box cut in 3 gives the overlapping bins 0..1, 1..2, 2..3 of it
    rois = torch.tensor([[0.0, 2, 0, 6, 5]], dtype=torch.float64)
    for module in (ops, tv_ops):
        assert module.ps_roi_pool(ramp(channels=3), rois, (1, 3)).flatten().tolist() == [2.5, 3.5, 4.5]


# --------------------------------------------------------------------------------------------
# Edge cases: boxes outside the map, empty, inverted; no boxes; bad inputs
# --------------------------------------------------------------------------------------------

EDGE_BOXES = torch.tensor([
    [0, -30.0, -30.0, -12.0, -15.0],  # wholly outside, above and left
    [1, 40.0, 30.0, 70.0, 60.0],  # wholly outside, below and right
    [0, -6.0, 4.0, 10.0, 40.0],  # partly outside
    [1, -100.0, -100.0, 100.0, 100.0],  # around the whole map
    [0, 5.0, 5.0, 9.0, 5.0],  # zero height
    [1, 7.0, 3.0, 7.0, 11.0],  # zero width
    [0, 6.0, 6.0, 6.0, 6.0],  # a point
    [1, 9.0, 9.0, 3.0, 2.0],  # inverted
    [0, 9.0, 2.0, 3.0, 8.0],  # inverted in x only
    [1, 23.0, 10.0, 27.5, 13.0],  # over the last columns
], dtype=torch.float64)
ZERO_AREA = (EDGE_BOXES[:, 3] == EDGE_BOXES[:, 1]) | (EDGE_BOXES[:, 4] == EDGE_BOXES[:, 2])


def test_ps_roi_pool_on_edge_boxes_equals_torchvision() -> None:
    features = ps_features(3, batch=2, height=12, width=14, seed=8)
    for scale in (1.0, 0.5):
        theirs = tv_ops.ps_roi_pool(features, EDGE_BOXES, 3, scale)
        assert_close_to(ops.ps_roi_pool(features, EDGE_BOXES, 3, scale), theirs, 1e-12)


@pytest.mark.parametrize("sampling_ratio", [-1, 0, 1, 2])
def test_ps_roi_align_on_edge_boxes_equals_torchvision(sampling_ratio: int) -> None:
    features = ps_features(3, batch=2, height=12, width=14, seed=9)
    for scale in (1.0, 0.5):
        ours = ops.ps_roi_align(features, EDGE_BOXES, 3, scale, sampling_ratio)
        theirs = tv_ops.ps_roi_align(features, EDGE_BOXES, 3, scale, sampling_ratio)
        if sampling_ratio > 0:  # a fixed grid samples even an empty or inverted box
            assert_close_to(ours, theirs, 1e-12)
            continue
        # an adaptive grid has no samples in an empty box: torchvision divides 0 by 0, minis gives 0
        assert theirs[ZERO_AREA].isnan().all() and torch.equal(ours[ZERO_AREA], torch.zeros_like(ours[ZERO_AREA]))
        assert_close_to(ours[~ZERO_AREA], theirs[~ZERO_AREA], 1e-12)


@pytest.mark.parametrize("name", ["ps_roi_align", "ps_roi_pool"])
def test_ps_ops_without_boxes_give_an_empty_output(name: str) -> None:
    features = ps_features((3, 5), classes=4, batch=2)
    assert getattr(tv_ops, name)(features, torch.zeros(0, 5, dtype=torch.float64), (3, 5)).shape == (0, 4, 3, 5)
    for empty in (torch.zeros(0, 5), [torch.zeros(0, 4)] * 2, []):
        result = getattr(ops, name)(features, empty, (3, 5))
        assert result.shape == (0, 4, 3, 5) and result.dtype == torch.float64
    result = getattr(ops, name)(features[:, :0], ps_rois(2, 3, seed=10), 3)  # no channels: nothing to pool
    assert result.shape == (3, 0, 3, 3)


@pytest.mark.parametrize("name", ["ps_roi_align", "ps_roi_pool"])
def test_ps_ops_reject_channel_counts_that_are_not_a_multiple_of_the_bins(name: str) -> None:
    features = torch.randn(1, 18, 8, 8)
    rois = torch.tensor([[0, 1.0, 1, 6, 6]])
    with pytest.raises(RuntimeError, match="multiple of pooling height"):
        getattr(tv_ops, name)(features, rois, 4)
    with pytest.raises(ValueError, match=r"multiple of 4 \* 4 = 16 input channels .*got 18"):
        getattr(ops, name)(features, rois, 4)
    with pytest.raises(ValueError, match=r"multiple of 2 \* 4 = 8 input channels .*got 18"):
        getattr(ops, name)(features, rois, (2, 4))
    with pytest.raises(ValueError, match="at least 1 x 1, got 0 x 3"):  # torchvision's kernel divides by zero
        getattr(ops, name)(features, rois, (0, 3))


BAD_ROI_BOXES = {
    "tensor [K,4]": torch.zeros(3, 4),
    "tensor [K,6]": torch.zeros(3, 6),
    "list of [L,5]": [torch.zeros(3, 5)],
    "numpy array": torch.zeros(3, 5).numpy(),
}


@pytest.mark.parametrize("case", BAD_ROI_BOXES)
@pytest.mark.parametrize("name", ["ps_roi_align", "ps_roi_pool"])
def test_ps_ops_reject_boxes_of_the_wrong_format_as_roi_align_does(name: str, case: str) -> None:
    features = torch.randn(2, 8, 6, 6)
    with pytest.raises(ops.InvalidBoxesError, match=r"Tensor\[K, 5\]|Tensor\[L_i, 4\]"):
        getattr(ops, name)(features, BAD_ROI_BOXES[case], 2)


@pytest.mark.parametrize("name", ["ps_roi_align", "ps_roi_pool"])
def test_ps_ops_reject_batch_indices_outside_the_batch(name: str) -> None:
    features = torch.randn(2, 8, 10, 10, generator=torch.Generator().manual_seed(11))
    for index in (-1.0, 2.0, 7.0):
        with pytest.raises(ops.InvalidBoxesError, match=r"batch indices must be in \[0, 1\]"):
            getattr(ops, name)(features, torch.tensor([[0.0, 1, 1, 5, 5], [index, 1, 1, 5, 5]]), 2)
    with pytest.raises(ops.InvalidBoxesError):
        getattr(ops, name)(features, [torch.zeros(1, 4)] * 3, 2)  # boxes for three images, two images
    rois = torch.tensor([[0.7, 1.0, 1, 9, 9], [1.2, 2, 3, 8, 9]])  # fractional: truncated, as the kernels do
    torch.testing.assert_close(getattr(ops, name)(features, rois, 2), getattr(tv_ops, name)(features, rois, 2))


def test_ps_ops_with_non_finite_boxes_and_features() -> None:
    # ps_roi_pool's kernel casts the rounded corners to int, as ours does; ps_roi_align's crashes
    # the process on a nan or inf box, ours raises a clear error
    features = ps_features(3, batch=2, seed=12, dtype=torch.float32)
    for bad in (math.nan, math.inf, -math.inf):
        for column in (1, 3):
            rois = torch.tensor([[0, 1.0, 1, 10, 10], [1, 3, 3, 13, 8]])
            rois[0, column] = bad
            assert_close_to(ops.ps_roi_pool(features, rois, 3), tv_ops.ps_roi_pool(features, rois, 3), 1e-6)
            with pytest.raises(ops.InvalidBoxesError, match="finite"):
                ops.ps_roi_align(features, rois, 3)
    # nan and inf in the features stay in the bins that hold them, as in the kernels' sums
    features[0, :, 2:4, 3:6] = math.nan
    features[1, ::2, 5:, :2] = math.inf
    features[1, 1::4, 6:, 1:] = -math.inf
    rois = ps_rois(2, 20, seed=13, dtype=torch.float32)
    for name in ("ps_roi_align", "ps_roi_pool"):
        assert_close_to(getattr(ops, name)(features, rois, 3, 1.0), getattr(tv_ops, name)(features, rois, 3, 1.0), 1e-5)


def test_roi_align_sampler_ignores_what_it_does_not_keep() -> None:
    # the sampler shared with roi_align: a sample outside the map, or padding of a box whose grid is
    # smaller than its chunk's, may read an inf; it must not turn the bin into nan (0 * inf)
    features = torch.randn(1, 1, 8, 8, generator=torch.Generator().manual_seed(26))
    features[0, 0, 7] = math.inf
    rois = torch.tensor([[0, 1.0, 1, 5, 5], [0, 1, 1, 20, 20]])
    for sampling_ratio in (-1, 2):
        assert_close_to(ops.roi_align(features, rois, 2, 1.0, sampling_ratio, True),
                        tv_ops.roi_align(features, rois, 2, 1.0, sampling_ratio, True), 1e-6)


# --------------------------------------------------------------------------------------------
# float32, float16, bfloat16, autocast
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["ps_roi_align", "ps_roi_pool"])
def test_ps_ops_in_float32_and_on_non_contiguous_inputs_equal_torchvision(name: str) -> None:
    features = ps_features(7, classes=2, batch=2, height=20, width=24, seed=14, dtype=torch.float32)
    rois = ps_rois(2, 30, seed=15, scale=0.25, height=20, width=24, dtype=torch.float32)
    ours, theirs = getattr(ops, name), getattr(tv_ops, name)
    transposed = features.transpose(2, 3).contiguous().transpose(2, 3)
    for f in (features, features.to(memory_format=torch.channels_last), transposed):
        assert_close_to(ours(f, rois, 7, 0.25), theirs(f, rois, 7, 0.25), 1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", ["ps_roi_align", "ps_roi_pool"])
def test_ps_ops_in_low_precision_compute_in_float32(name: str, dtype: torch.dtype) -> None:
    # torchvision's CPU kernels have no bfloat16 and sum float16 in float16; minis computes in
    # float32 and returns the features' type, so the reference is torchvision on float32 inputs
    features = ps_features(3, classes=3, batch=2, height=20, width=24, seed=16, dtype=torch.float32).to(dtype)
    rois = ps_rois(2, 30, seed=17, scale=0.125, height=20, width=24, dtype=torch.float32)
    rois[:, 1:] *= 1.3  # coordinates that are not multiples of the stride
    reference = getattr(tv_ops, name)(features.float(), rois, 3, 0.125).to(dtype)
    ours = getattr(ops, name)(features, rois, 3, 0.125)
    assert ours.dtype == dtype
    unit = 2**-7 if dtype == torch.bfloat16 else 2**-10  # the same sums in float32, rounded once: one unit
    torch.testing.assert_close(ours.double(), reference.double(), rtol=unit, atol=1e-4)
    # boxes in the low type are taken to float32 before anything is computed on them
    assert torch.equal(getattr(ops, name)(features, rois.to(dtype), 3, 0.125),
                       getattr(ops, name)(features, rois.to(dtype).float(), 3, 0.125))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # torchvision has no CPU autocast for these: float32 stays
        float_features = features.float()
        ours = getattr(ops, name)(float_features, rois, 3, 0.125)
        theirs = getattr(tv_ops, name)(float_features, rois, 3, 0.125)
        assert ours.dtype == theirs.dtype == torch.float32
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------
# Gradients
# --------------------------------------------------------------------------------------------


def input_gradient(op, features: torch.Tensor, rois: torch.Tensor, *args) -> torch.Tensor:
    leaf = features.clone().requires_grad_()
    output = op(leaf, rois, *args)
    output.backward(torch.linspace(-1, 1, output.numel(), dtype=output.dtype).reshape(output.shape))
    return leaf.grad


@pytest.mark.parametrize("sampling_ratio", [-1, 1, 2])
def test_ps_roi_align_gradients_in_float64_equal_torchvision(sampling_ratio: int) -> None:
    features = ps_features((3, 2), batch=2, seed=18)
    rois = torch.cat([ps_rois(2, 12, seed=19, scale=0.5), EDGE_BOXES[~ZERO_AREA] * torch.tensor([1.0, 2, 2, 2, 2])])
    ours = input_gradient(ops.ps_roi_align, features, rois, (3, 2), 0.5, sampling_ratio)
    theirs = input_gradient(tv_ops.ps_roi_align, features, rois, (3, 2), 0.5, sampling_ratio)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)


def clear_of_the_far_border(rois: torch.Tensor, scale: float, height: int, width: int) -> torch.Tensor:
    """The boxes whose ``ps_roi_pool`` bins all end before the map's last row and column."""
    corners = rois[:, 1:] * scale
    x1, y1, x2, y2 = (torch.sign(corners) * torch.floor(corners.abs() + 0.5)).unbind(1)  # C's round()
    return (torch.maximum(x2, x1 + 1) <= width - 1) & (torch.maximum(y2, y1 + 1) <= height - 1)


def test_ps_roi_pool_gradients_in_float64_equal_torchvision() -> None:
    # each cell of a bin gets 1 / area of the bin's gradient; for bins that reach the map's last
    # row or column torchvision's backward disagrees with its own forward (next test)
    features = ps_features((3, 2), batch=2, seed=20)  # 12 x 14 cells
    rois = torch.cat([ps_rois(2, 24, seed=21, scale=0.5), EDGE_BOXES * torch.tensor([1.0, 2, 2, 2, 2])])
    rois = rois[clear_of_the_far_border(rois, 0.5, 12, 14)]
    assert len(rois) >= 12
    ours = input_gradient(ops.ps_roi_pool, features, rois, (3, 2), 0.5)
    theirs = input_gradient(tv_ops.ps_roi_pool, features, rois, (3, 2), 0.5)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    # with nan and inf in the features: every cell of a bin still gets its share
    features[0, :, 2:4, 3:6] = math.nan
    features[1, ::3, 5:, :2] = math.inf
    ours = input_gradient(ops.ps_roi_pool, features, rois, (3, 2), 0.5)
    theirs = input_gradient(tv_ops.ps_roi_pool, features, rois, (3, 2), 0.5)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)


def test_ps_roi_pool_gradient_is_that_of_its_output_where_torchvision_s_is_not() -> None:
    # torchvision's forward clips the bins to rows [0, H-1) and columns [0, W-1), its backward to
    # [0, H) and [0, W), as the original kernels did in both: for a bin that reaches the last row
    # or column, its gradient goes to cells the output never read, and by a smaller share
    features = torch.randn(1, 6, 5, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(24))
    features.requires_grad_()
    rois = torch.tensor([[0, -3.0, -2.0, 30.0, 20.0], [0, 1.0, 1.0, 4.0, 3.0]], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda f: ops.ps_roi_pool(f, rois, (3, 2)), (features,))
    assert not torch.autograd.gradcheck(lambda f: tv_ops.ps_roi_pool(f, rois, (3, 2)), (features,),
                                        raise_exception=False)
    ours = input_gradient(ops.ps_roi_pool, features.detach(), rois[:1], (3, 2))
    theirs = input_gradient(tv_ops.ps_roi_pool, features.detach(), rois[:1], (3, 2))
    assert ours[..., -1, :].abs().max() == 0 and ours[..., -1].abs().max() == 0
    assert theirs[..., -1, :].abs().max() > 0 and theirs[..., -1].abs().max() > 0


def test_ps_roi_align_gradcheck() -> None:
    features = torch.randn(2, 6, 5, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(25))
    features.requires_grad_()
    rois = torch.tensor([[0, 1.3, 0.7, 9.6, 11.1], [1, -3.0, 2.0, 5.5, 6.0], [1, 4.0, 4.0, 4.0, 4.0]],
                        dtype=torch.float64)
    for sampling_ratio in (0, 2):
        assert torch.autograd.gradcheck(lambda f: ops.ps_roi_align(f, rois, (3, 2), 0.5, sampling_ratio), (features,))


def test_ps_ops_give_no_gradient_to_the_boxes() -> None:
    features = ps_features(2, batch=2, seed=22, dtype=torch.float32).requires_grad_()
    for name in ("ps_roi_align", "ps_roi_pool"):
        for module in (ops, tv_ops):
            rois = ps_rois(2, 5, seed=23, dtype=torch.float32).requires_grad_()
            getattr(module, name)(features, rois, 2, 0.5).sum().backward()
            assert rois.grad is None, (module.__name__, name)


# --------------------------------------------------------------------------------------------
# Channel groups larger than one bin (MXNet's group_size; FCIS's 21 x 21 assembly from 7 x 7 parts)
# --------------------------------------------------------------------------------------------


def one_channel_per_bin(features: torch.Tensor, output_size: tuple[int, int], group_size: tuple[int, int]
                        ) -> torch.Tensor:
    """The maps rewritten for torchvision's layout, written out bin by bin: output channel ``c`` in
    bin ``(i, j)`` gets its own input channel, a copy of the one of its group,
    ``c*gh*gw + floor(i*gh/h)*gw + floor(j*gw/w)``."""
    (h, w), (gh, gw) = output_size, group_size
    copies = []
    for c in range(features.shape[1] // (gh * gw)):
        for i in range(h):
            for j in range(w):
                copies.append(features[:, c * gh * gw + (i * gh // h) * gw + j * gw // w])
    return torch.stack(copies, dim=1)


@pytest.mark.parametrize("output_size, group_size", [((21, 21), (7, 7)), ((6, 6), (3, 3)), ((5, 5), (3, 3)),
                                                     ((4, 6), (2, 3)), ((3, 3), (1, 1))])
@pytest.mark.parametrize("name", ["ps_roi_align", "ps_roi_pool"])
def test_grouped_ps_ops_equal_torchvision_on_maps_with_one_channel_per_bin(name: str, output_size, group_size) -> None:
    groups = group_size[0] * group_size[1]
    features = torch.randn(2, 3 * groups, 12, 14, generator=torch.Generator().manual_seed(30), dtype=torch.float64)
    rois = ps_rois(2, 12, seed=31, scale=0.5)
    ours = getattr(ops, name)(features, rois, output_size, 0.5, group_size=group_size)
    theirs = getattr(tv_ops, name)(one_channel_per_bin(features, output_size, group_size), rois, output_size, 0.5)
    assert_close_to(ours, theirs, 1e-12)


@pytest.mark.parametrize("name", ["ps_roi_align", "ps_roi_pool"])
def test_groups_as_many_as_the_bins_are_torchvision_s_layout(name: str) -> None:
    features, rois = ps_features((3, 5), seed=32), ps_rois(3, 10, seed=33)
    default = getattr(ops, name)(features, rois, (3, 5))
    assert torch.equal(getattr(ops, name)(features, rois, (3, 5), group_size=(3, 5)), default)
    assert_close_to(default, getattr(tv_ops, name)(features, rois, (3, 5)), 1e-12)


@pytest.mark.parametrize("name", ["ps_roi_align", "ps_roi_pool"])
def test_grouped_ps_ops_reject_channel_counts_that_are_not_a_multiple_of_the_groups(name: str) -> None:
    features, rois = torch.randn(1, 18, 8, 8), torch.tensor([[0, 1.0, 1, 6, 6]])
    assert getattr(ops, name)(features, rois, 21, group_size=3).shape == (1, 2, 21, 21)
    with pytest.raises(ValueError, match=r"2 x 2 groups needs a multiple of 2 \* 2 = 4 input channels .*got 18"):
        getattr(ops, name)(features, rois, 6, group_size=2)
    with pytest.raises(ValueError, match="at least 1 x 1 groups, got 0 x 3"):
        getattr(ops, name)(features, rois, 6, group_size=(0, 3))
