"""minis.ops against torchvision on the edge cases: every dtype, autocast, bad inputs, the exact
IoU threshold, empty and degenerate inputs, non-contiguous tensors, gradients.

Where torchvision itself is wrong (small integer types that wrap around before it widens them,
its batched NMS on negative coordinates, its float16 RoIAlign outside autocast), the reference
is the formula computed in float64 or torchvision on float32 inputs; each such test says why.
"""

from __future__ import annotations

import math

import pytest
import torch
import torchvision.ops as tv_ops
from torchvision.models.detection._utils import BoxCoder as TorchvisionBoxCoder

import minis.ops as ops

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py

INTEGER_DTYPES = [torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64]
FLOAT_DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
LOW_PRECISION = [torch.float16, torch.bfloat16]


def overlapping_boxes(n: int, seed: int, low: int, high: int) -> torch.Tensor:
    """``[n,4]`` whole-number boxes that all contain the strip between ``low`` and ``high``.

    Every pair overlaps, so no subtraction in torchvision goes negative (in uint8 it would wrap
    around); a few boxes have zero width or height inside the strip.
    """
    generator = torch.Generator().manual_seed(seed)
    top_left = torch.randint(0, low + 1, (n, 2), generator=generator)
    bottom_right = torch.randint(high, 2 * high - low, (n, 2), generator=generator)
    boxes = torch.cat([top_left, bottom_right], dim=1)
    boxes[::7, 2] = boxes[::7, 0] = (low + high) // 2  # zero width
    boxes[3::11, 3] = boxes[3::11, 1] = (low + high) // 2  # zero height
    boxes[5] = boxes[4]  # identical boxes
    return boxes


def float_boxes(n: int, seed: int, size: float = 150.0, max_side: float = 60.0) -> torch.Tensor:
    """``[n,4]`` random boxes inside a ``size`` square, dense enough for long NMS chains."""
    generator = torch.Generator().manual_seed(seed)
    top_left = torch.rand(n, 2, generator=generator) * size
    return torch.cat([top_left, top_left + torch.rand(n, 2, generator=generator) * max_side], dim=1)


def assert_same(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    """Same dtype, shape and values (nan where torchvision has nan)."""
    assert ours.dtype == theirs.dtype, (ours.dtype, theirs.dtype)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0, equal_nan=True)


# --------------------------------------------------------------------------------------------
# Box functions in every dtype
# --------------------------------------------------------------------------------------------

BOX_PAIR_FUNCTIONS = ["box_iou", "generalized_box_iou"]


@pytest.mark.parametrize("dtype", INTEGER_DTYPES + FLOAT_DTYPES)
def test_box_functions_give_torchvision_dtypes_and_values(dtype: torch.dtype) -> None:
    # corners 0..127 fit every type; areas up to 127 x 127 overflow int8 and uint8 unless widened
    boxes1, boxes2 = overlapping_boxes(40, 0, 60, 64).to(dtype), overlapping_boxes(30, 1, 60, 64).to(dtype)
    assert_same(ops.box_area(boxes1), tv_ops.box_area(boxes1))
    for name in BOX_PAIR_FUNCTIONS:
        assert_same(getattr(ops, name)(boxes1, boxes2), getattr(tv_ops, name)(boxes1, boxes2))
        assert_same(getattr(ops, name)(boxes1, boxes1), getattr(tv_ops, name)(boxes1, boxes1))  # nan: empty boxes


@pytest.mark.parametrize("dtype", [torch.int16, torch.int32, torch.int64] + FLOAT_DTYPES)
def test_box_functions_with_large_areas_give_torchvision_values(dtype: torch.dtype) -> None:
    # areas up to 1400 x 1400: beyond int16 (32767) and float16 (65504, where inf / inf = nan)
    boxes1, boxes2 = overlapping_boxes(40, 2, 500, 700).to(dtype), overlapping_boxes(30, 3, 500, 700).to(dtype)
    assert_same(ops.box_area(boxes1), tv_ops.box_area(boxes1))
    for name in BOX_PAIR_FUNCTIONS:
        ours = getattr(ops, name)(boxes1, boxes2)
        assert_same(ours, getattr(tv_ops, name)(boxes1, boxes2))
        non_empty = (tv_ops.box_area(boxes1.double()) > 0)[:, None] | (tv_ops.box_area(boxes2.double()) > 0)[None, :]
        assert torch.isfinite(ours[non_empty]).all()  # nan only for two empty boxes


def test_the_reported_overflows() -> None:
    assert ops.box_area(torch.tensor([[0, 0, 100, 100]], dtype=torch.int8)).tolist() == [10000]
    big, small = torch.tensor([[0, 0, 300, 300]], dtype=torch.int16), torch.tensor([[100, 100, 200, 200]], dtype=torch.int16)
    expected = tv_ops.generalized_box_iou(big.double(), small.double()).float()  # 10000 / 90000
    torch.testing.assert_close(ops.generalized_box_iou(big, small), expected)
    half = torch.tensor([[0.0, 0.0, 300.0, 300.0], [10.0, 10.0, 290.0, 310.0]], dtype=torch.float16)
    for name in BOX_PAIR_FUNCTIONS:
        ours = getattr(ops, name)(half, half)
        assert not torch.isnan(ours).any()
        assert_same(ours, getattr(tv_ops, name)(half, half))


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8])
def test_small_integer_boxes_are_widened_before_subtracting(dtype: torch.dtype) -> None:
    # torchvision subtracts in the boxes' own type: in uint8 a negative overlap wraps to ~250
    # and disjoint boxes get an IoU above 1; in int8 corners -100 and 100 are 56 apart. Here
    # the reference is the formula in float64 on the same whole numbers.
    low, high = (0, 255) if dtype == torch.uint8 else (-128, 127)
    generator = torch.Generator().manual_seed(4)
    corners = torch.randint(low, high + 1, (50, 4), generator=generator)
    boxes = torch.cat([corners[:, :2].minimum(corners[:, 2:]), corners[:, :2].maximum(corners[:, 2:])], dim=1)
    typed, exact = boxes.to(dtype), boxes.double()
    assert torch.equal(ops.box_area(typed), tv_ops.box_area(exact).int())
    for name in BOX_PAIR_FUNCTIONS:
        ours = getattr(ops, name)(typed, typed)
        assert ours.dtype == torch.float32
        torch.testing.assert_close(ours, getattr(tv_ops, name)(exact, exact).float(), equal_nan=True)
    inverted = torch.tensor([[10, 10, 5, 20], [0, 0, 30, 30]], dtype=dtype)  # x2 < x1: no wrap to 251 wide
    assert ops.remove_small_boxes(inverted, 1.0).tolist() == [1]


@pytest.mark.parametrize("dtype", INTEGER_DTYPES + FLOAT_DTYPES)
def test_clip_and_remove_small_boxes_in_every_dtype(dtype: torch.dtype) -> None:
    boxes = overlapping_boxes(40, 5, 60, 64).to(dtype)
    assert_same(ops.clip_boxes_to_image(boxes, (90, 100)), tv_ops.clip_boxes_to_image(boxes, (90, 100)))
    for min_size in (0, 1, 40.5, 70):
        assert torch.equal(ops.remove_small_boxes(boxes, min_size), tv_ops.remove_small_boxes(boxes, min_size))


def test_box_functions_on_batches_and_empty_sets() -> None:
    boxes1, boxes2 = float_boxes(24, 6).reshape(2, 3, 4, 4), float_boxes(10, 7).reshape(2, 1, 5, 4)
    assert_same(ops.box_area(boxes1), tv_ops.box_area(boxes1))  # [..., 4] -> [...]
    assert_same(ops.remove_small_boxes(boxes1, 20.0), tv_ops.remove_small_boxes(boxes1, 20.0))
    for name in BOX_PAIR_FUNCTIONS:  # [..., N, 4], [..., M, 4] -> [..., N, M], leading dims broadcast
        assert_same(getattr(ops, name)(boxes1, boxes2), getattr(tv_ops, name)(boxes1, boxes2))
        for a, b in ((torch.zeros(0, 4), float_boxes(3, 8)), (float_boxes(3, 8), torch.zeros(0, 4)),
                     (torch.zeros(0, 4, dtype=torch.int8), torch.zeros(0, 4, dtype=torch.int8))):
            assert_same(getattr(ops, name)(a, b), getattr(tv_ops, name)(a, b))


def test_box_functions_on_a_single_1d_box() -> None:
    box, boxes = float_boxes(1, 11)[0], float_boxes(6, 12)
    assert_same(ops.box_area(box), tv_ops.box_area(box))
    for name in BOX_PAIR_FUNCTIONS:
        assert_same(getattr(ops, name)(box, boxes), getattr(tv_ops, name)(box, boxes))  # [1, 6]


def test_box_functions_on_non_contiguous_boxes() -> None:
    storage = float_boxes(30, 9).repeat(1, 2)  # [30, 8]: every other column is a box
    boxes = storage[:, ::2]
    transposed = float_boxes(20, 10).t().contiguous().t()
    assert not boxes.is_contiguous() and not transposed.is_contiguous()
    assert_same(ops.box_area(boxes), tv_ops.box_area(boxes))
    for name in BOX_PAIR_FUNCTIONS:
        assert_same(getattr(ops, name)(boxes, transposed), getattr(tv_ops, name)(boxes, transposed))


# --------------------------------------------------------------------------------------------
# NMS: the threshold, dtypes, autocast, inputs
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_nms_iou_exactly_at_the_threshold_equals_torchvision(dtype: torch.dtype) -> None:
    # [0,0,100,100] against [0,0,100,k]: IoU k / 100, the division rounded once, so the IoU is
    # exactly the threshold k / 100 rounded to the dtype. In float32 that is above the float64
    # threshold for some k (0.2 -> 0.2000000030): torchvision suppresses, keeping would be wrong.
    scores = torch.tensor([0.9, 0.8], dtype=dtype)
    suppressed = 0
    for k in range(101):
        boxes = torch.tensor([[0, 0, 100, 100], [0, 0, 100, k]], dtype=dtype)
        for threshold in (k / 100, k / 100 + 1e-12, k / 100 - 1e-12):
            theirs = tv_ops.nms(boxes, scores, threshold)
            assert torch.equal(ops.nms(boxes, scores, threshold), theirs), (k, threshold)
            assert torch.equal(ops.batched_nms(boxes, scores, torch.zeros(2), threshold), theirs), (k, threshold)
        suppressed += len(tv_ops.nms(boxes, scores, k / 100)) == 1
    assert suppressed > 0 if dtype == torch.float32 else suppressed == 0  # the case really occurs


def test_nms_with_thresholds_taken_from_the_ious_equals_torchvision() -> None:
    boxes, scores = float_boxes(200, 11), torch.rand(200, generator=torch.Generator().manual_seed(12))
    ious = tv_ops.box_iou(boxes, boxes)
    candidates = ious[(ious > 0.05) & (ious < 0.95)]
    chosen = candidates[torch.randperm(len(candidates), generator=torch.Generator().manual_seed(13))[:15]]
    for value in chosen.tolist():  # each an IoU of some pair, exactly
        for threshold in (value, math.nextafter(value, 0.0), math.nextafter(value, 1.0)):
            assert torch.equal(ops.nms(boxes, scores, threshold), tv_ops.nms(boxes, scores, threshold)), threshold


@pytest.mark.parametrize("threshold", [-1.0, 0.0, 1.0, 2.0, math.inf, -math.inf, math.nan, 1e300])
def test_nms_with_extreme_thresholds_equals_torchvision(threshold: float) -> None:
    boxes = torch.cat([float_boxes(60, 14), float_boxes(3, 14)])  # three exact duplicates: IoU 1
    scores = torch.rand(63, generator=torch.Generator().manual_seed(15))
    assert torch.equal(ops.nms(boxes, scores, threshold), tv_ops.nms(boxes, scores, threshold))


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_nms_under_cpu_autocast_equals_torchvision(seed: int, dtype: torch.dtype) -> None:
    # a mixed-precision detector hands NMS float16/bfloat16 boxes; torchvision's kernel casts
    # them to float32 under autocast, so IoUs are not rounded to 2-3 digits
    boxes = float_boxes(300, seed, size=120.0).to(dtype)
    scores = torch.rand(300, generator=torch.Generator().manual_seed(seed + 50))
    classes = torch.randint(0, 4, (300,), generator=torch.Generator().manual_seed(seed + 60))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for typed_scores in (scores.to(dtype), scores):
            assert torch.equal(ops.nms(boxes, typed_scores, 0.5), tv_ops.nms(boxes, typed_scores, 0.5))
        batched = ops.batched_nms(boxes, scores, classes, 0.5)
    assert torch.equal(ops.nms(boxes, scores, 0.5), tv_ops.nms(boxes.float(), scores, 0.5))  # outside autocast
    # torchvision's batched NMS shifts the boxes in their own type, which rounds them in
    # float16: the reference is its plain NMS on each class's float32 boxes
    kept = torch.cat([torch.where(classes == c)[0][tv_ops.nms(boxes[classes == c].float(), scores[classes == c], 0.5)]
                      for c in range(4)])
    assert torch.equal(batched, kept[scores[kept].sort(descending=True).indices])


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.float64])
def test_nms_in_other_dtypes(dtype: torch.dtype) -> None:
    boxes = float_boxes(200, 16).round()
    scores = torch.rand(200, generator=torch.Generator().manual_seed(17))
    # torchvision takes float64 boxes with float64 scores only, and no integer boxes at all:
    # integer boxes are computed in float32, as torchvision under autocast
    expected = tv_ops.nms(boxes.to(dtype).to(torch.float64 if dtype == torch.float64 else torch.float32),
                          scores.to(torch.float64 if dtype == torch.float64 else torch.float32), 0.4)
    assert torch.equal(ops.nms(boxes.to(dtype), scores, 0.4), expected)
    assert torch.equal(ops.nms(boxes.to(dtype), scores.double(), 0.4), expected)


def test_nms_on_non_contiguous_and_degenerate_boxes() -> None:
    storage = float_boxes(80, 18).repeat(1, 2)
    boxes, scores = storage[:, ::2], torch.rand(160, generator=torch.Generator().manual_seed(19))[::2]
    assert not boxes.is_contiguous() and not scores.is_contiguous()
    assert torch.equal(ops.nms(boxes, scores, 0.3), tv_ops.nms(boxes, scores, 0.3))
    degenerate = torch.tensor([[5.0, 5, 5, 5], [5.0, 5, 5, 5], [3.0, 3, 3, 9], [-20.0, -20, -5, -5],
                               [-18.0, -18, -5, -5], [10.0, 10, 4, 4]])  # points, lines, outside, inverted
    ties = torch.ones(6)
    for threshold in (0.0, 0.5):
        assert torch.equal(ops.nms(degenerate, ties, threshold), tv_ops.nms(degenerate, ties, threshold))
    assert ops.nms(degenerate[:1], ties[:1], 0.5).tolist() == [0]  # a single box


def test_nms_with_nan_and_infinite_scores_and_boxes_equals_torchvision() -> None:
    boxes, scores = float_boxes(50, 24), torch.rand(50, generator=torch.Generator().manual_seed(25))
    odd_scores, odd_boxes = scores.clone(), boxes.clone()
    odd_scores[[3, 10, 20]] = torch.tensor([math.nan, math.inf, -math.inf])
    odd_boxes[4, 2], odd_boxes[7], odd_boxes[9, :2] = math.nan, math.nan, -math.inf
    idxs = torch.randint(-3, 3, (50,), generator=torch.Generator().manual_seed(26))  # negative groups too
    for b, sc in ((boxes, odd_scores), (odd_boxes, scores), (odd_boxes, odd_scores)):
        assert torch.equal(ops.nms(b, sc, 0.5), tv_ops.nms(b, sc, 0.5))
    assert torch.equal(ops.batched_nms(boxes, scores, idxs, 0.5), tv_ops.batched_nms(boxes, scores, idxs, 0.5))
    float_idxs = idxs.float() / 2  # any type of group id
    assert torch.equal(ops.batched_nms(boxes, scores, float_idxs, 0.5), tv_ops.batched_nms(boxes, scores, float_idxs, 0.5))


BAD_NMS_INPUTS = {
    "1-D boxes": (torch.tensor([0.0, 0, 10, 10]), torch.tensor([0.9])),
    "boxes [N,5]": (torch.zeros(3, 5), torch.zeros(3)),
    "boxes [N,4,1]": (torch.zeros(3, 4, 1), torch.zeros(3)),
    "scores [N,1]": (torch.zeros(3, 4), torch.zeros(3, 1)),
    "fewer scores": (torch.zeros(3, 4), torch.zeros(2)),
    "more scores": (torch.zeros(3, 4), torch.zeros(4)),
    "no boxes, some scores": (torch.zeros(0, 4), torch.zeros(3)),
    "1-D empty boxes": (torch.zeros(0), torch.zeros(0)),
}


@pytest.mark.parametrize("case", BAD_NMS_INPUTS)
def test_nms_rejects_bad_inputs_with_a_clear_error(case: str) -> None:
    boxes, scores = BAD_NMS_INPUTS[case]
    with pytest.raises(RuntimeError):  # torchvision's kernel checks
        tv_ops.nms(boxes, scores, 0.5)
    with pytest.raises(ops.InvalidBoxesError, match="boxes must be|scores must be") as error:
        ops.nms(boxes, scores, 0.5)
    assert isinstance(error.value, (ValueError, RuntimeError))  # not an IndexError from deep inside


@pytest.mark.parametrize("scores,idxs", [
    (torch.zeros(0), torch.zeros(0, dtype=torch.int64)),
    (torch.zeros(0), torch.zeros(5)),  # idxs of another length and type
    (torch.zeros(3), torch.zeros(7, dtype=torch.bool)),
    (torch.zeros(0, dtype=torch.float64), torch.zeros(2, 2)),
])
@pytest.mark.parametrize("boxes", [torch.zeros(0, 4), torch.zeros(0, 4, dtype=torch.float64), torch.zeros(0)])
def test_batched_nms_without_boxes_is_empty_whatever_the_rest(boxes, scores, idxs) -> None:
    ours = ops.batched_nms(boxes, scores, idxs, 0.5)
    assert_same(ours, tv_ops.batched_nms(boxes, scores, idxs, 0.5))
    assert ours.dtype == torch.int64 and ours.shape == (0,)


def test_batched_nms_rejects_mismatched_inputs() -> None:
    boxes, scores = float_boxes(5, 20), torch.rand(5)
    for bad_scores, bad_idxs in ((torch.rand(4), torch.zeros(5)), (scores, torch.zeros(4)), (scores, torch.zeros(5, 1))):
        with pytest.raises(ops.InvalidBoxesError, match="must be"):
            ops.batched_nms(boxes, bad_scores, bad_idxs, 0.5)
        with pytest.raises(RuntimeError):
            tv_ops.batched_nms(boxes, bad_scores, bad_idxs, 0.5)


def test_batched_nms_on_negative_coordinates_keeps_groups_apart() -> None:
    # torchvision shifts group g by g * (max coordinate + 1): with every coordinate below -1
    # the shift is negative and small, and boxes of different groups overlap after it. The
    # reference is plain NMS per group.
    boxes = torch.tensor([[-50.0, -50, -10, -10], [-50.0, -50, -10, -10], [-48.0, -48, -8, -8], [-20.0, -20, -1, -1]])
    scores, idxs = torch.tensor([0.9, 0.8, 0.7, 0.6]), torch.tensor([0, 1, 1, 0])
    per_group = torch.cat([torch.where(idxs == g)[0][tv_ops.nms(boxes[idxs == g], scores[idxs == g], 0.5)] for g in (0, 1)])
    expected = per_group.sort().values.tolist()  # scores decrease with the index
    assert expected == [0, 1, 3]  # 1 survives 0 (another group), 2 does not survive 1 (IoU 0.82)
    assert ops.batched_nms(boxes, scores, idxs, 0.5).tolist() == expected


@pytest.mark.parametrize("n,classes", [(1, 1), (1500, 7)])  # 1500 boxes: torchvision's per-class loop
def test_batched_nms_single_box_and_many_boxes_equal_torchvision(n: int, classes: int) -> None:
    boxes, scores = float_boxes(n, 21, size=400.0), torch.rand(n, generator=torch.Generator().manual_seed(22))
    idxs = torch.randint(0, classes, (n,), generator=torch.Generator().manual_seed(23))
    assert torch.equal(ops.batched_nms(boxes, scores, idxs, 0.5), tv_ops.batched_nms(boxes, scores, idxs, 0.5))
    assert torch.equal(ops.batched_nms(boxes.double(), scores.double(), idxs, 0.5),
                       tv_ops.batched_nms(boxes.double(), scores.double(), idxs, 0.5))


# --------------------------------------------------------------------------------------------
# RoIAlign and RoIPool
# --------------------------------------------------------------------------------------------


def feature_map(batch: int = 2, channels: int = 3, height: int = 24, width: int = 20, seed: int = 30) -> torch.Tensor:
    return torch.randn(batch, channels, height, width, generator=torch.Generator().manual_seed(seed))


def rois_for(batch: int, k: int, seed: int, extent: float = 40.0) -> torch.Tensor:
    """``[k,5]`` RoIs on a ``batch`` of images (at 2x the feature map), some partly or wholly outside."""
    generator = torch.Generator().manual_seed(seed)
    top_left = torch.rand(k, 2, generator=generator) * (extent + 16) - 8
    sides = torch.rand(k, 2, generator=generator) * extent * 0.6
    index = torch.arange(k) % batch  # every image gets boxes
    rois = torch.cat([index[:, None].float(), top_left, top_left + sides], dim=1)
    edge_cases = torch.tensor([[0.0, 6.0, 6.0, 6.0, 6.0], [batch - 1.0, 3.0, 4.0, 3.0, 30.0],
                               [0.0, -30.0, -30.0, -12.0, -15.0], [batch - 1.0, 60.0, 60.0, 90.0, 70.0],
                               [0.0, 0.0, 0.0, 40.0, 48.0]])
    return torch.cat([rois, edge_cases])


BAD_ROI_BOXES = {
    "tensor [K,4]": torch.zeros(3, 4),
    "tensor [K,6]": torch.zeros(3, 6),
    "1-D tensor": torch.zeros(5),
    "list of [L,5]": [torch.zeros(3, 5)],
    "list with a 1-D tensor": [torch.zeros(2, 4), torch.zeros(4)],
    "numpy array": torch.zeros(3, 5).numpy(),
    "list of lists": [[0.0, 0.0, 1.0, 1.0]],
}


@pytest.mark.parametrize("case", BAD_ROI_BOXES)
@pytest.mark.parametrize("name", ["roi_align", "roi_pool"])
def test_roi_ops_reject_boxes_of_the_wrong_format_with_one_clear_error(name: str, case: str) -> None:
    features, boxes = feature_map(), BAD_ROI_BOXES[case]
    with pytest.raises((AssertionError, IndexError, AttributeError)):  # torchvision's check_roi_boxes_shape
        getattr(tv_ops, name)(features, boxes, 2)
    with pytest.raises(ops.InvalidBoxesError, match=r"Tensor\[K, 5\]|Tensor\[L_i, 4\]") as error:
        getattr(ops, name)(features, boxes, 2)
    assert isinstance(error.value, (ValueError, AssertionError))
    with pytest.raises(ops.InvalidBoxesError):
        getattr(ops, name)(features, torch.zeros(3, 5, 1), 2)  # torchvision lets this through to its kernel


@pytest.mark.parametrize("name", ["roi_align", "roi_pool"])
def test_roi_ops_accept_both_box_formats_as_torchvision(name: str) -> None:
    features = feature_map(batch=3)
    per_image = [rois_for(1, 6, 31)[:, 1:], torch.zeros(0, 4), rois_for(1, 4, 32)[:, 1:]]
    ours, theirs = getattr(ops, name), getattr(tv_ops, name)
    for boxes in (per_image, tuple(per_image), tv_ops._utils.convert_boxes_to_roi_format(per_image)):
        torch.testing.assert_close(ours(features, boxes, (3, 2), 0.5), theirs(features, boxes, (3, 2), 0.5),
                                   rtol=1e-5, atol=1e-5)
    for empty in (torch.zeros(0, 5), [torch.zeros(0, 4)] * 3, []):
        result = ours(features.double(), empty, (3, 2))
        assert result.shape == (0, 3, 3, 2) and result.dtype == torch.float64


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [-1, 2])
def test_roi_align_in_float64_and_on_non_contiguous_inputs_equals_torchvision(aligned: bool, sampling_ratio: int) -> None:
    features, rois = feature_map(batch=3), rois_for(3, 30, 33)
    for f, r in ((features.double(), rois.double()),
                 (features.to(memory_format=torch.channels_last), rois.t().contiguous().t()),
                 (feature_map(batch=3, width=40)[..., ::2], rois[:, [0, 1, 2, 3, 4]])):
        ours = ops.roi_align(f, r, (4, 3), 0.5, sampling_ratio, aligned)
        theirs = tv_ops.roi_align(f, r, (4, 3), 0.5, sampling_ratio, aligned)
        assert ours.dtype == theirs.dtype
        tolerance = 1e-12 if f.dtype == torch.float64 else 1e-5
        torch.testing.assert_close(ours, theirs, rtol=tolerance, atol=tolerance)


def test_roi_pool_in_float64_and_on_non_contiguous_inputs_equals_torchvision() -> None:
    features, rois = feature_map(batch=3), rois_for(3, 30, 34)
    for f, r in ((features.double(), rois.double()),
                 (features.to(memory_format=torch.channels_last), rois.t().contiguous().t()),
                 (feature_map(batch=3, width=40)[..., ::2], rois)):
        assert_same(ops.roi_pool(f, r, (4, 3), 0.5), tv_ops.roi_pool(f, r, (4, 3), 0.5))


@pytest.mark.parametrize("name", ["roi_align", "roi_pool"])
def test_roi_ops_reject_batch_indices_outside_the_batch(name: str) -> None:
    # torchvision's kernels read outside the features; Python's indexing would take -1 as the last image
    features = feature_map(batch=2)
    for index in (-1.0, 2.0, 7.0):
        with pytest.raises(ops.InvalidBoxesError, match=r"batch indices must be in \[0, 1\]"):
            getattr(ops, name)(features, torch.tensor([[0.0, 1, 1, 5, 5], [index, 1, 1, 5, 5]]), 2)
    with pytest.raises(ops.InvalidBoxesError):
        getattr(ops, name)(features, [torch.zeros(1, 4)] * 3, 2)  # boxes for three images, two images
    rois = torch.tensor([[0.7, 1.0, 1, 9, 9], [1.2, 2, 3, 8, 9]])  # fractional: truncated, as the kernels do
    torch.testing.assert_close(getattr(ops, name)(features, rois, 2), getattr(tv_ops, name)(features, rois, 2))


def test_roi_ops_with_non_finite_boxes() -> None:
    # RoIPool's kernel casts the rounded corners to int: nan and inf become empty bins, as here.
    # torchvision's RoIAlign crashes the process on a nan box; ours raises a clear error.
    features = feature_map()
    for bad in (math.nan, math.inf, -math.inf):
        for column in (1, 3):
            rois = torch.tensor([[0, 1.0, 1, 10, 10], [1, 3, 3, 30, 8]])
            rois[0, column] = bad
            assert_same(ops.roi_pool(features, rois, 3), tv_ops.roi_pool(features, rois, 3))
            with pytest.raises(ops.InvalidBoxesError, match="finite"):
                ops.roi_align(features, rois, 3)


@pytest.mark.parametrize("name", ["roi_align", "roi_pool"])
def test_roi_ops_on_degenerate_shapes_equal_torchvision(name: str) -> None:
    rois = rois_for(2, 6, 27)
    ours, theirs = getattr(ops, name), getattr(tv_ops, name)
    for features, output_size in ((feature_map()[:, :0], 2),  # no channels
                                  (feature_map(), (0, 3)),  # an empty output
                                  (feature_map(height=1, width=1), 3),  # a single cell
                                  (feature_map(), 1)):
        mine, reference = ours(features, rois, output_size, 0.5), theirs(features, rois, output_size, 0.5)
        assert mine.shape == reference.shape
        torch.testing.assert_close(mine, reference, rtol=1e-5, atol=1e-5)
    assert ours(feature_map()[:0], torch.zeros(0, 5), 2).shape == (0, 3, 2, 2)  # no images, no boxes


def test_roi_ops_on_inverted_boxes_equal_torchvision() -> None:
    # x2 < x1 or y2 < y1: with aligned=True the bins have a negative size, and a fixed sampling
    # grid walks backwards; an adaptive grid has no samples (torchvision: 0 where both sides are
    # inverted; where one is, its kernel fails to allocate a negative number of samples)
    features = feature_map(batch=2)
    corners = torch.rand(40, 4, generator=torch.Generator().manual_seed(30)) * 44 - 2
    rois = torch.cat([(torch.arange(40) % 2)[:, None].float(), corners], dim=1)
    assert_same(ops.roi_pool(features, rois, 3, 0.5), tv_ops.roi_pool(features, rois, 3, 0.5))
    for aligned in (False, True):
        for sampling_ratio in (1, 2, 3) if aligned else (-1, 2):
            torch.testing.assert_close(ops.roi_align(features, rois, 3, 0.5, sampling_ratio, aligned),
                                       tv_ops.roi_align(features, rois, 3, 0.5, sampling_ratio, aligned))
    inverted = rois[(rois[:, 3] < rois[:, 1]) & (rois[:, 4] < rois[:, 2])]
    assert_same(ops.roi_align(features, inverted, 3, 0.5, -1, True), tv_ops.roi_align(features, inverted, 3, 0.5, -1, True))
    one_side = rois[(rois[:, 3] < rois[:, 1]) & (rois[:, 4] > rois[:, 2])]
    assert len(inverted) and len(one_side)
    assert ops.roi_align(features, one_side, 3, 0.5, -1, True).abs().max() == 0


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [-1, 1, 3])
def test_roi_align_gradients_in_float64_equal_torchvision(aligned: bool, sampling_ratio: int) -> None:
    rois = rois_for(3, 25, 28).double()
    grads = []
    for roi_align in (ops.roi_align, tv_ops.roi_align):
        features = feature_map(batch=3, channels=2).double().requires_grad_()
        output = roi_align(features, rois, (4, 3), 0.5, sampling_ratio, aligned)
        (output * torch.linspace(-1, 1, output.numel(), dtype=torch.float64).reshape(output.shape)).sum().backward()
        grads.append(features.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-12, atol=1e-12)


def test_roi_pool_gradients_in_float64_equal_torchvision() -> None:
    rois = rois_for(3, 25, 29).double()
    grads = []
    for roi_pool in (ops.roi_pool, tv_ops.roi_pool):
        features = feature_map(batch=3, channels=2).double().requires_grad_()
        output = roi_pool(features, rois, (4, 3), 0.5)
        (output * torch.linspace(-1, 1, output.numel(), dtype=torch.float64).reshape(output.shape)).sum().backward()
        grads.append(features.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [0, 2])
def test_roi_align_gradcheck(aligned: bool, sampling_ratio: int) -> None:
    features = feature_map(batch=2, channels=2, height=7, width=6).double().requires_grad_()
    rois = torch.tensor([[0, 1.3, 0.7, 9.6, 11.1], [1, -3.0, 2.0, 5.5, 6.0], [1, 4.0, 4.0, 4.0, 4.0],
                         [0, 0.0, 0.0, 12.0, 14.0]], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda f: ops.roi_align(f, rois, (3, 2), 0.5, sampling_ratio, aligned), (features,))


def test_roi_pool_gradcheck() -> None:
    features = feature_map(batch=2, channels=2, height=7, width=6).double().requires_grad_()
    rois = torch.tensor([[0, 1.3, 0.7, 9.6, 11.1], [1, -3.0, 2.0, 5.5, 6.0], [1, 4.0, 4.0, 4.0, 4.0],
                         [0, 0.0, 0.0, 12.0, 14.0]], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda f: ops.roi_pool(f, rois, (3, 2), 0.5), (features,))


def test_roi_pool_gradient_with_ties_and_infinities_equals_torchvision() -> None:
    # after a ReLU many cells are 0: torchvision's kernel gives a bin's gradient to the first
    # maximum (row by row); -inf and nan never win, and the maximum is at least -FLT_MAX
    features = feature_map(batch=2, channels=4, height=12, width=10, seed=35).relu()
    features[0, 1] = -math.inf
    features[1, 2, 3:7, 2:6] = math.nan
    features[1, 3, ::2] = -math.inf
    rois = rois_for(2, 20, 36, extent=20.0)
    grads, outputs = [], []
    for roi_pool in (ops.roi_pool, tv_ops.roi_pool):
        leaf = features.clone().requires_grad_()
        output = roi_pool(leaf, rois, (3, 3), 0.5)
        (output * torch.linspace(-1, 1, output.numel()).reshape(output.shape)).sum().backward()
        outputs.append(output)
        grads.append(leaf.grad)
    assert_same(outputs[0].detach(), outputs[1].detach())
    assert torch.equal(grads[0] != 0, grads[1] != 0)  # the same cells get the gradient...
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-6, atol=1e-6)  # ...summed in another order


def test_roi_ops_give_no_gradient_to_the_boxes() -> None:
    # torchvision's kernels treat the boxes as constants
    features = feature_map().requires_grad_()
    for name in ("roi_align", "roi_pool"):
        for module in (ops, tv_ops):
            rois = rois_for(2, 5, 37).requires_grad_()
            getattr(module, name)(features, rois, 2, 0.5).sum().backward()
            assert rois.grad is None, (module.__name__, name)


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [-1, 2])
def test_roi_align_under_cpu_autocast_equals_torchvision(aligned: bool, sampling_ratio: int) -> None:
    # features from a bfloat16 convolution, boxes in float32; torchvision computes in float32 and
    # returns the features' type. A unit in the last place of bfloat16 is 2**-8 of the value.
    features, rois = feature_map(channels=8, seed=38), rois_for(2, 60, 39) * torch.tensor([1.0, 7.3, 7.3, 7.3, 7.3])
    exact = tv_ops.roi_align(features.bfloat16().double(), rois.double(), 5, 0.125, sampling_ratio, aligned)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for f in (features.bfloat16(), features):
            ours = ops.roi_align(f, rois, 5, 0.125, sampling_ratio, aligned)
            theirs = tv_ops.roi_align(f, rois, 5, 0.125, sampling_ratio, aligned)
            assert ours.dtype == theirs.dtype == f.dtype
            # float32 sums in another order may round to the neighbouring bfloat16: one unit
            torch.testing.assert_close(ours.double(), theirs.double(), rtol=2**-7, atol=1e-6)
    # the same outside autocast: within a unit of bfloat16 of the exact result (bfloat16 sampling
    # positions and weights would be off by ~0.04)
    ours = ops.roi_align(features.bfloat16(), rois, 5, 0.125, sampling_ratio, aligned)
    assert ours.dtype == torch.bfloat16
    torch.testing.assert_close(ours.double(), exact, rtol=2**-7, atol=1e-6)


def test_roi_align_in_float16_samples_in_float32() -> None:
    # torchvision's own float16 CPU kernel samples in float16 (errors near 1 here); minis computes
    # as torchvision under autocast: float32 inside, float16 out
    features, rois = feature_map(channels=4, seed=40), rois_for(2, 40, 41)
    ours = ops.roi_align(features.half(), rois.half(), 7, 0.5, 2, True)
    reference = tv_ops.roi_align(features.half().float(), rois.half().float(), 7, 0.5, 2, True).half()
    assert ours.dtype == torch.float16
    torch.testing.assert_close(ours, reference, rtol=2**-10, atol=1e-4)


@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_roi_pool_in_low_precision_rounds_boxes_in_float32(dtype: torch.dtype) -> None:
    # the maximum of a bin is exact in any type: only the box rounding could differ. torchvision's
    # CPU kernel has no bfloat16 and no CPU autocast for RoIPool; its CUDA autocast casts to float32.
    features, rois = feature_map(channels=4, seed=42), rois_for(2, 40, 43) * torch.tensor([1.0, 9.1, 9.1, 9.1, 9.1])
    expected = tv_ops.roi_pool(features.to(dtype).float(), rois, 4, 0.25).to(dtype)
    assert_same(ops.roi_pool(features.to(dtype), rois, 4, 0.25), expected)
    assert_same(ops.roi_pool(features.to(dtype), rois.to(dtype).float(), 4, 0.25),
                ops.roi_pool(features.to(dtype), rois.to(dtype), 4, 0.25))  # float16 boxes: rounded in float32
    with torch.autocast("cpu", dtype=dtype):
        assert_same(ops.roi_pool(features.to(dtype), rois, 4, 0.25), expected)
        assert_same(ops.roi_pool(features, rois, 4, 0.25), tv_ops.roi_pool(features, rois, 4, 0.25))


def test_multiscale_roi_align_with_low_precision_boxes_and_features() -> None:
    from torchvision.ops.poolers import LevelMapper

    generator = torch.Generator().manual_seed(44)
    boxes = torch.rand(300, 2, generator=generator) * 500
    boxes = torch.cat([boxes, boxes + torch.rand(300, 2, generator=generator) ** 2 * 500 + 1], dim=1)
    for dtype in (torch.float16, torch.bfloat16, torch.float64):  # float16 areas overflow at 256 x 256
        assert torch.equal(ops.fpn_level(boxes.to(dtype), 2, 5), LevelMapper(2, 5)([boxes.to(dtype)]))
    features = {str(i): torch.randn(1, 2, 800 // s, 800 // s, generator=generator) for i, s in enumerate((4, 8, 16, 32))}
    names, image_sizes = list(features), [(800, 800)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = {name: f.bfloat16() for name, f in features.items()}
        ours = ops.MultiScaleRoIAlign(names, 7, 2)(low, [boxes.bfloat16()], image_sizes)
        theirs = tv_ops.MultiScaleRoIAlign(names, 7, 2)(low, [boxes.bfloat16()], image_sizes)
    assert ours.dtype == theirs.dtype == torch.bfloat16
    torch.testing.assert_close(ours.double(), theirs.double(), rtol=2**-7, atol=1e-6)  # a unit of bfloat16


# --------------------------------------------------------------------------------------------
# Mask pasting, the box coder and anchors in other dtypes and under autocast
# --------------------------------------------------------------------------------------------


def test_paste_masks_in_image_under_autocast_equals_torchvision() -> None:
    from torchvision.models.detection.roi_heads import paste_masks_in_image

    masks = torch.rand(6, 1, 28, 28, generator=torch.Generator().manual_seed(45))
    boxes = torch.tensor([[3.0, 4, 40, 50], [10, 10, 60, 30], [0, 0, 63, 47], [5.5, 6.2, 20.1, 33.3],
                          [30, 2, 50, 40], [20, 20, 20, 20]])
    expected = paste_masks_in_image(masks, boxes, (48, 64))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the matrix products must not drop to bfloat16
        ours = ops.paste_masks_in_image(masks, boxes, (48, 64))
        torch.testing.assert_close(ours, paste_masks_in_image(masks, boxes, (48, 64)), rtol=0, atol=1e-6)
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("mask_dtype,box_dtype", [(torch.float64, torch.float64), (torch.float32, torch.int64),
                                                  (torch.float32, torch.float16), (torch.float16, torch.float32),
                                                  (torch.bfloat16, torch.float32)])
def test_paste_masks_in_image_in_other_dtypes_equals_torchvision(mask_dtype: torch.dtype, box_dtype: torch.dtype) -> None:
    from torchvision.models.detection.roi_heads import paste_masks_in_image

    masks = torch.rand(6, 1, 28, 28, generator=torch.Generator().manual_seed(31)).to(mask_dtype)
    boxes = torch.tensor([[3.0, 4, 40, 50], [10, 10, 60, 30], [0, 0, 63, 47], [5.5, 6.2, 20.1, 33.3],
                          [30, 2, 50, 40], [20, 20, 20, 20]]).to(box_dtype)
    ours, theirs = ops.paste_masks_in_image(masks, boxes, (48, 64)), paste_masks_in_image(masks, boxes, (48, 64))
    assert ours.dtype == theirs.dtype == mask_dtype
    # float16/bfloat16 masks are blended in float32 here, in their own type there: a unit apart
    tolerance = {torch.float64: 1e-12, torch.float32: 1e-6, torch.float16: 2**-10, torch.bfloat16: 2**-7}[mask_dtype]
    torch.testing.assert_close(ours.double(), theirs.double(), rtol=0, atol=tolerance)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_box_coder_in_every_float_dtype_equals_torchvision(dtype: torch.dtype) -> None:
    ours, theirs = ops.BoxCoder((10.0, 10.0, 5.0, 5.0)), TorchvisionBoxCoder((10.0, 10.0, 5.0, 5.0))
    proposals = [float_boxes(20, 46).to(dtype) + 1, float_boxes(0, 47).to(dtype)]
    targets = [float_boxes(20, 48).to(dtype) + 1, float_boxes(0, 49).to(dtype)]
    for mine, reference in zip(ours.encode(targets, proposals), theirs.encode(targets, proposals)):
        assert_same(mine, reference)
    codes = torch.randn(20, 8, generator=torch.Generator().manual_seed(50)).to(dtype)
    assert_same(ours.decode(codes, proposals), theirs.decode(codes, proposals))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_anchor_generator_in_every_float_dtype(dtype: torch.dtype) -> None:
    # torchvision's anchors take the feature maps' type; ours stay float32 for float16/bfloat16
    # maps (mixed precision), where bfloat16 would round a corner near 800 px to a multiple of 4
    from torchvision.models.detection.anchor_utils import AnchorGenerator as TorchvisionAnchorGenerator
    from torchvision.models.detection.image_list import ImageList

    sizes, ratios = ((32,), (64,), (128,)), ((0.5, 1.0, 2.0),) * 3
    images = ImageList(torch.zeros(2, 3, 96, 128, dtype=dtype), [(96, 128), (90, 120)])
    maps = [torch.zeros(2, 1, 96 // s, 128 // s, dtype=dtype) for s in (8, 16, 32)]
    reference_maps = [m.to(torch.promote_types(dtype, torch.float32)) for m in maps]
    for mine, reference in zip(ops.AnchorGenerator(sizes, ratios)(images, maps),
                               TorchvisionAnchorGenerator(sizes, ratios)(images, reference_maps)):
        assert_same(mine, reference)
