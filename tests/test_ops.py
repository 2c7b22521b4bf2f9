"""minis.ops against torchvision: the same numbers on random boxes and on the edge cases."""

from __future__ import annotations

import math

import pytest
import torch
import torchvision.ops as tv_ops
from torchvision.models.detection._utils import BoxCoder as TorchvisionBoxCoder

import minis.ops as ops
from minis.ops.roi import roi_align_matmul_backward, roi_align_matrices

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def random_boxes(n: int, seed: int, size: float = 100.0, max_side: float = 40.0) -> torch.Tensor:
    """``[n,4]`` valid boxes (x1 <= x2, y1 <= y2) inside a ``size`` square, some of them clustered."""
    generator = torch.Generator().manual_seed(seed)
    top_left = torch.rand(n, 2, generator=generator) * size
    sides = torch.rand(n, 2, generator=generator) * max_side
    return torch.cat([top_left, top_left + sides], dim=1)


def degenerate_boxes() -> torch.Tensor:
    """Zero-width, zero-height, single-point, identical and disjoint boxes, and boxes partly outside."""
    return torch.tensor([
        [10.0, 10.0, 10.0, 30.0],  # zero width
        [10.0, 10.0, 30.0, 10.0],  # zero height
        [5.0, 5.0, 5.0, 5.0],  # a point
        [0.0, 0.0, 20.0, 20.0],
        [0.0, 0.0, 20.0, 20.0],  # identical to the one before
        [100.0, 100.0, 120.0, 110.0],  # far from the others
        [-15.0, -5.0, 8.0, 12.0],  # partly outside the image
    ])


# --------------------------------------------------------------------------------------------
# IoU family
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n,m,seed", [(0, 5, 0), (7, 0, 1), (1, 1, 2), (40, 30, 3), (200, 150, 4)])
def test_box_iou_and_giou_equal_torchvision(n: int, m: int, seed: int) -> None:
    boxes1, boxes2 = random_boxes(n, seed), random_boxes(m, seed + 100)
    torch.testing.assert_close(ops.box_area(boxes1), tv_ops.box_area(boxes1), rtol=0, atol=0)
    torch.testing.assert_close(ops.box_iou(boxes1, boxes2), tv_ops.box_iou(boxes1, boxes2), rtol=0, atol=0)
    torch.testing.assert_close(ops.generalized_box_iou(boxes1, boxes2), tv_ops.generalized_box_iou(boxes1, boxes2),
                               rtol=0, atol=0)


def test_iou_of_degenerate_boxes_equals_torchvision_including_nan() -> None:
    boxes = degenerate_boxes()
    ours, theirs = ops.box_iou(boxes, boxes), tv_ops.box_iou(boxes, boxes)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0, equal_nan=True)
    assert torch.isnan(ours[2, 2])  # a point against itself: 0 / 0
    assert ours[3, 4] == 1 and ours[0, 5] == 0
    torch.testing.assert_close(ops.generalized_box_iou(boxes[3:], boxes[3:]),
                               tv_ops.generalized_box_iou(boxes[3:], boxes[3:]), rtol=0, atol=0)


def test_generalized_iou_goes_negative_for_distant_boxes() -> None:
    near = ops.generalized_box_iou(torch.tensor([[0.0, 0, 10, 10]]), torch.tensor([[12.0, 0, 22, 10]]))
    far = ops.generalized_box_iou(torch.tensor([[0.0, 0, 10, 10]]), torch.tensor([[50.0, 0, 60, 10]]))
    assert -1 < far.item() < near.item() < 0  # IoU is 0 for both; GIoU still ranks them


def test_clip_and_remove_small_boxes_equal_torchvision() -> None:
    boxes = torch.cat([random_boxes(50, 5, size=120.0) - 10, degenerate_boxes()])
    torch.testing.assert_close(ops.clip_boxes_to_image(boxes, (90, 110)), tv_ops.clip_boxes_to_image(boxes, (90, 110)))
    batched = boxes.reshape(-1, 3, 4)[:, :2]  # any leading shape, as torchvision allows
    torch.testing.assert_close(ops.clip_boxes_to_image(batched, (50, 60)), tv_ops.clip_boxes_to_image(batched, (50, 60)))
    for min_size in (0.0, 1e-3, 5.0, 25.0):
        assert torch.equal(ops.remove_small_boxes(boxes, min_size), tv_ops.remove_small_boxes(boxes, min_size))


# --------------------------------------------------------------------------------------------
# Box coder
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("weights", [(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0)])
def test_box_coder_encodes_and_decodes_like_torchvision(weights) -> None:
    ours, theirs = ops.BoxCoder(weights), TorchvisionBoxCoder(weights)
    proposals = [random_boxes(30, 6) + 1, random_boxes(0, 7), random_boxes(12, 8) + 1]
    targets = [random_boxes(30, 9) + 1, random_boxes(0, 10), random_boxes(12, 11) + 1]
    for mine, reference in zip(ours.encode(targets, proposals), theirs.encode(targets, proposals)):
        torch.testing.assert_close(mine, reference, rtol=0, atol=0)

    codes = torch.randn(42, 4 * 3, generator=torch.Generator().manual_seed(12))  # 3 classes per box
    codes[0, 2] = 50.0  # a huge log-width: must be clamped before exp
    decoded = ours.decode(codes, proposals)
    torch.testing.assert_close(decoded, theirs.decode(codes, proposals), rtol=0, atol=0)
    assert decoded.shape == (42, 3, 4) and torch.isfinite(decoded).all()
    width = decoded[0, 0, 2] - decoded[0, 0, 0]
    reference = torch.cat(proposals)[0]
    assert width == pytest.approx(math.exp(ops.BBOX_XFORM_CLIP) * (reference[2] - reference[0]).item(), rel=1e-5)


def test_box_coder_round_trip() -> None:
    coder = ops.BoxCoder((10.0, 10.0, 5.0, 5.0))
    anchors, boxes = random_boxes(25, 13), random_boxes(25, 14)
    anchors[:, 2:] += 5  # sides of 5 to 45 pixels: size ratios stay below the decoding clamp (62.5)
    boxes[:, 2:] += 5
    (codes,) = coder.encode([boxes], [anchors])
    torch.testing.assert_close(coder.decode_single(codes, anchors), boxes, rtol=1e-5, atol=1e-4)


# --------------------------------------------------------------------------------------------
# NMS
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n,seed,threshold", [(0, 0, 0.5), (1, 1, 0.5), (60, 2, 0.5), (300, 3, 0.3),
                                              (300, 4, 0.7), (800, 5, 0.5)])
def test_nms_equals_torchvision(n: int, seed: int, threshold: float) -> None:
    boxes = random_boxes(n, seed, size=150.0, max_side=60.0)  # dense: many overlaps, long chains
    scores = torch.rand(n, generator=torch.Generator().manual_seed(seed + 1))
    kept = ops.nms(boxes, scores, threshold)
    assert kept.dtype == torch.int64
    assert torch.equal(kept, tv_ops.nms(boxes, scores, threshold))


def test_nms_with_equal_scores_and_degenerate_boxes_equals_torchvision() -> None:
    boxes = torch.cat([degenerate_boxes(), random_boxes(40, 6, size=40.0, max_side=30.0)])
    scores = torch.rand(len(boxes), generator=torch.Generator().manual_seed(7)).mul(4).round() / 4  # 5 values only
    for threshold in (0.0, 0.3, 0.5, 1.0):
        assert torch.equal(ops.nms(boxes, scores, threshold), tv_ops.nms(boxes, scores, threshold)), threshold
    ties = torch.ones(len(boxes))  # every score equal: the order of the input decides
    assert torch.equal(ops.nms(boxes, ties, 0.5), tv_ops.nms(boxes, ties, 0.5))


def test_nms_suppression_is_greedy_not_pairwise() -> None:
    # A overlaps B, B overlaps C, A does not overlap C: greedy NMS keeps A and C (B is gone, so it
    # cannot suppress C); dropping every box with any better overlapping box would lose C.
    boxes = torch.tensor([[0.0, 0, 10, 10], [6.0, 0, 16, 10], [12.0, 0, 22, 10]])
    scores = torch.tensor([0.9, 0.8, 0.7])
    assert ops.nms(boxes, scores, 0.2).tolist() == [0, 2] == tv_ops.nms(boxes, scores, 0.2).tolist()


@pytest.mark.parametrize("n,classes,seed", [(0, 3, 0), (50, 1, 1), (400, 5, 2), (400, 40, 3)])
def test_batched_nms_equals_torchvision(n: int, classes: int, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    boxes = random_boxes(n, seed, size=150.0, max_side=60.0)
    scores = torch.rand(n, generator=generator)
    idxs = torch.randint(0, classes, (n,), generator=generator)
    kept = ops.batched_nms(boxes, scores, idxs, 0.5)
    assert torch.equal(kept, tv_ops.batched_nms(boxes, scores, idxs, 0.5))
    if n:  # boxes of different classes never suppress each other
        identical = boxes[:1].repeat(classes, 1)
        assert len(ops.batched_nms(identical, torch.rand(classes), torch.arange(classes), 0.5)) == classes


def yolact_fast_nms_loop(boxes: torch.Tensor, scores: torch.Tensor, threshold: float) -> list[int]:
    """YOLACT's rule written out box by box: in score order, keep a box when its largest IoU with the
    boxes before it (kept or not) is at most the threshold."""
    order = torch.sort(scores, descending=True, stable=True).indices.tolist()
    ious = tv_ops.box_iou(boxes, boxes)
    return [i for rank, i in enumerate(order) if all(ious[i, j] <= threshold for j in order[:rank])]


@pytest.mark.parametrize("n,seed,threshold", [(0, 0, 0.5), (1, 1, 0.5), (60, 2, 0.5), (200, 3, 0.3), (200, 4, 0.7)])
def test_fast_nms_is_yolact_s_rule_and_keeps_a_subset_of_greedy_nms(n: int, seed: int, threshold: float) -> None:
    boxes = random_boxes(n, seed + 10, size=150.0, max_side=60.0)
    scores = torch.rand(n, generator=torch.Generator().manual_seed(seed + 11))
    kept = ops.fast_nms(boxes, scores, threshold)
    assert kept.dtype == torch.int64 and kept.tolist() == yolact_fast_nms_loop(boxes, scores, threshold)
    greedy = tv_ops.nms(boxes, scores, threshold)
    assert set(kept.tolist()) <= set(greedy.tolist())
    # equal to greedy NMS exactly when no box that greedy NMS removes overlaps a box it keeps, below it
    ious = tv_ops.box_iou(boxes, boxes)
    removed = sorted(set(range(n)) - set(greedy.tolist()))
    chain = any(ious[r, k] > threshold and scores[r] > scores[k] for r in removed for k in greedy.tolist())
    assert torch.equal(kept, greedy) == (not chain)


def test_fast_nms_differs_from_greedy_nms_on_a_chain() -> None:
    # A overlaps B, B overlaps C, A does not overlap C: greedy keeps A and C; Fast NMS lets the
    # removed B still remove C
    boxes = torch.tensor([[0.0, 0, 10, 10], [6.0, 0, 16, 10], [12.0, 0, 22, 10]])
    scores = torch.tensor([0.9, 0.8, 0.7])
    assert ops.fast_nms(boxes, scores, 0.2).tolist() == [0]
    assert ops.nms(boxes, scores, 0.2).tolist() == [0, 2]


def test_batched_fast_nms_works_per_group() -> None:
    generator = torch.Generator().manual_seed(12)
    boxes = random_boxes(300, 13, size=150.0, max_side=60.0)
    scores = torch.rand(300, generator=generator)
    idxs = torch.randint(0, 6, (300,), generator=generator)
    kept = ops.batched_fast_nms(boxes, scores, idxs, 0.5)
    per_group = torch.cat([torch.nonzero(idxs == g).flatten()[ops.fast_nms(boxes[idxs == g], scores[idxs == g], 0.5)]
                           for g in range(6)])
    assert torch.equal(kept, per_group[torch.sort(scores[per_group], descending=True, stable=True).indices])
    assert ops.batched_fast_nms(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.int64), 0.5).numel() == 0


# --------------------------------------------------------------------------------------------
# Anchors
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sizes,ratios,image,maps", [
    (((32,), (64,), (128,), (256,), (512,)), ((0.5, 1.0, 2.0),) * 5, (2, 3, 800, 1216),
     [(200, 304), (100, 152), (50, 76), (25, 38), (13, 19)]),  # Faster R-CNN R50-FPN at 800 px
    (((128, 256, 512),), ((0.5, 1.0, 2.0),), (1, 3, 96, 130), [(6, 9)]),  # one map, three sizes
    (((16, 24),), ((0.25, 1.0, 3.0),), (3, 3, 64, 64), [(8, 8)]),
])
def test_anchor_generator_equals_torchvision(sizes, ratios, image, maps) -> None:
    from torchvision.models.detection.anchor_utils import AnchorGenerator as TorchvisionAnchorGenerator
    from torchvision.models.detection.image_list import ImageList

    images = ImageList(torch.zeros(image), [tuple(image[-2:])] * image[0])
    feature_maps = [torch.zeros(image[0], 4, *shape) for shape in maps]
    ours = ops.AnchorGenerator(sizes, ratios)
    theirs = TorchvisionAnchorGenerator(sizes, ratios)
    assert ours.num_anchors_per_location() == theirs.num_anchors_per_location()
    mine, reference = ours(images, feature_maps), theirs(images, feature_maps)
    assert len(mine) == len(reference) == image[0]
    for a, b in zip(mine, reference):
        assert a.dtype == b.dtype and torch.equal(a, b)


def test_cell_anchors_keep_the_area_and_set_the_ratio() -> None:
    base = ops.cell_anchors((64.0,), (0.5, 1.0, 2.0))  # [3,4], zero-centred
    widths, heights = base[:, 2] - base[:, 0], base[:, 3] - base[:, 1]
    assert torch.allclose(widths * heights, torch.full((3,), 64.0**2), rtol=0.02)  # rounding to pixels
    assert torch.allclose(heights / widths, torch.tensor([0.5, 1.0, 2.0]), rtol=0.03)
    assert torch.equal(base[:, :2], -base[:, 2:])


# --------------------------------------------------------------------------------------------
# RoIPool and RoIAlign
# --------------------------------------------------------------------------------------------


def random_rois(k: int, seed: int, batch: int = 2, extent: float = 40.0) -> torch.Tensor:
    """``[k,5]`` (batch index, box) with boxes partly outside a 40-pixel image, plus the edge cases."""
    generator = torch.Generator().manual_seed(seed)
    top_left = torch.rand(k, 2, generator=generator) * (extent + 20) - 10
    sides = torch.rand(k, 2, generator=generator) * extent
    rois = torch.cat([torch.randint(0, batch, (k, 1), generator=generator).float(), top_left, top_left + sides], 1)
    edge_cases = torch.tensor([
        [0.0, 5.0, 6.0, 5.0, 6.0],  # zero area
        [1.0, 3.0, 4.0, 3.0, 30.0],  # zero width
        [0.0, -30.0, -30.0, -12.0, -15.0],  # entirely outside, above-left
        [1.0, 50.0, 50.0, 90.0, 70.0],  # entirely outside, below-right
        [0.0, 0.0, 0.0, 40.0, 40.0],  # the whole image
        [1.0, 10.5, 10.5, 12.5, 11.5],  # half-pixel coordinates (rounding in RoIPool)
    ])
    return torch.cat([rois, edge_cases])


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [-1, 0, 1, 2, 4])
@pytest.mark.parametrize("spatial_scale,output_size", [(1.0, 7), (0.5, (5, 3)), (0.25, (14, 14))])
def test_roi_align_equals_torchvision(aligned: bool, sampling_ratio: int, spatial_scale: float, output_size) -> None:
    features = torch.randn(2, 3, 40, 36, generator=torch.Generator().manual_seed(0))
    rois = random_rois(40, 1)
    ours = ops.roi_align(features, rois, output_size, spatial_scale, sampling_ratio, aligned)
    theirs = tv_ops.roi_align(features, rois, output_size, spatial_scale, sampling_ratio, aligned)
    assert ours.shape == theirs.shape
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_roi_align_gradients_equal_torchvision() -> None:
    rois = random_rois(25, 2)
    grads = []
    for roi_align in (ops.roi_align, tv_ops.roi_align):
        features = torch.randn(2, 4, 30, 30, generator=torch.Generator().manual_seed(3)).requires_grad_()
        output = roi_align(features, rois, (6, 6), 0.5, 0, True)
        (output * torch.linspace(-1, 1, output.numel()).reshape(output.shape)).sum().backward()
        grads.append(features.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [0, 1, 2, 4])
@pytest.mark.parametrize("spatial_scale,output_size", [(1.0, 7), (0.5, (5, 3)), (0.25, (14, 14))])
def test_roi_align_matmul_backward_gives_torchvision_s_values_and_gradients(aligned: bool, sampling_ratio: int,
                                                                           spatial_scale: float, output_size) -> None:
    # the boxes of random_rois: partly or wholly outside the map, zero-sized, on two images
    rois = random_rois(40, 7)
    results = []
    for roi_align in (roi_align_matmul_backward, tv_ops.roi_align):
        features = torch.randn(2, 3, 40, 36, generator=torch.Generator().manual_seed(8)).requires_grad_()
        output = roi_align(features, rois, output_size, spatial_scale, sampling_ratio, aligned)
        output.backward(torch.randn(output.shape, generator=torch.Generator().manual_seed(9)))
        results.append((output.detach(), features.grad))
    (ours, our_grad), (theirs, their_grad) = results
    assert torch.equal(ours, theirs)  # the same compiled forward
    torch.testing.assert_close(our_grad, their_grad, rtol=1e-5, atol=1e-5)


def test_roi_align_matmul_backward_with_several_images_no_boxes_and_a_list_of_boxes() -> None:
    per_image = [random_boxes(5, 10, size=64.0, max_side=40.0), random_boxes(0, 11), random_boxes(3, 12, size=64.0)]
    for boxes, expect_zero in ((per_image, False), (torch.zeros(0, 5), True)):
        grads = []
        for roi_align in (roi_align_matmul_backward, tv_ops.roi_align):
            features = torch.randn(3, 2, 16, 16, generator=torch.Generator().manual_seed(13)).requires_grad_()
            output = roi_align(features, boxes, 3, 0.25, 2, True)
            (output * 1.5).sum().backward() if output.numel() else output.sum().backward()
            grads.append(features.grad)
        torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-6)
        assert bool((grads[0] == 0).all()) == expect_zero


def test_roi_align_is_two_matrix_products() -> None:
    # the separability roi_align_matmul_backward relies on: rows[k] @ features[b, c] @ cols[k].T
    features = torch.randn(2, 3, 40, 36, generator=torch.Generator().manual_seed(14))
    rois = random_rois(30, 15)
    for aligned, sampling_ratio in ((False, 2), (True, 0)):
        rows, cols = roi_align_matrices(rois, (40, 36), (5, 4), 0.5, sampling_ratio, aligned)
        assert rows.shape == (len(rois), 5, 40) and cols.shape == (len(rois), 4, 36)
        product = torch.einsum("kiy,kcyx,kjx->kcij", rows, features[rois[:, 0].long()], cols)
        torch.testing.assert_close(product, tv_ops.roi_align(features, rois, (5, 4), 0.5, sampling_ratio, aligned),
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("spatial_scale,output_size", [(1.0, 7), (0.5, (4, 6)), (1 / 16, (2, 2))])
def test_roi_pool_equals_torchvision(spatial_scale: float, output_size) -> None:
    features = torch.randn(2, 3, 40, 36, generator=torch.Generator().manual_seed(4))
    rois = random_rois(40, 5)
    ours, theirs = ops.roi_pool(features, rois, output_size, spatial_scale), tv_ops.roi_pool(features, rois, output_size,
                                                                                          spatial_scale)
    assert torch.equal(ours, theirs)


def test_roi_ops_accept_a_list_of_boxes_per_image_and_no_boxes() -> None:
    features = torch.randn(3, 2, 16, 16, generator=torch.Generator().manual_seed(6))
    per_image = [random_boxes(4, 7, size=16.0, max_side=8.0), random_boxes(0, 8), random_boxes(2, 9, size=16.0)]
    for ours, theirs in ((ops.roi_align, tv_ops.roi_align), (ops.roi_pool, tv_ops.roi_pool)):
        torch.testing.assert_close(ours(features, per_image, 3), theirs(features, per_image, 3), rtol=1e-5, atol=1e-5)
        assert ours(features, torch.zeros(0, 5), (3, 5)).shape == (0, 2, 3, 5)
        assert ours(features, [torch.zeros(0, 4)] * 3, 2).shape == (0, 2, 2, 2)
    with pytest.raises(ValueError, match=r"\[K, 5\]"):
        ops.roi_align(features, torch.zeros(3, 4), 2)


def test_roi_align_samples_between_cells_where_roi_pool_snaps() -> None:
    # A ramp along x: RoIAlign of a box shifted by a quarter cell moves by a quarter; RoIPool does not move.
    features = torch.arange(16.0).repeat(16, 1)[None, None]  # value = x
    box = torch.tensor([[0.0, 4.0, 4.0, 8.0, 8.0]])
    shifted = box + torch.tensor([[0.0, 0.25, 0.0, 0.25, 0.0]])
    align = [ops.roi_align(features, b, 1, sampling_ratio=2, aligned=True) for b in (box, shifted)]
    pool = [ops.roi_pool(features, b, 1) for b in (box, shifted)]
    assert (align[1] - align[0]).item() == pytest.approx(0.25)
    assert torch.equal(pool[0], pool[1])


# --------------------------------------------------------------------------------------------
# Multi-scale RoIAlign (FPN)
# --------------------------------------------------------------------------------------------


def pyramid_boxes(n: int, seed: int, extent: float = 700.0) -> torch.Tensor:
    """``[n,4]`` boxes from a few pixels to most of an ``extent`` image: every FPN level gets some."""
    generator = torch.Generator().manual_seed(seed)
    top_left = torch.rand(n, 2, generator=generator) * extent
    sides = torch.rand(n, 2, generator=generator) ** 2 * 600 + 1  # squared: many small boxes, some huge
    return torch.cat([top_left, top_left + sides], dim=1)


def test_fpn_level_equals_torchvision_level_mapper() -> None:
    from torchvision.ops.poolers import LevelMapper

    boxes = torch.cat([pyramid_boxes(300, 20), torch.tensor([
        [10.0, 10.0, 10.0, 50.0],  # zero area: log2(0) = -inf, the finest level
        [5.0, 5.0, 5.0, 5.0],  # a point
        [0.0, 0.0, 0.01, 0.02],  # tiny
        [0.0, 0.0, 5000.0, 4000.0],  # far larger than any image: the coarsest level
        [0.0, 0.0, 112.0, 112.0],  # exactly on the borders between levels: eps decides
        [0.0, 0.0, 224.0, 224.0],
        [0.0, 0.0, 448.0, 448.0],
        [3.0, 7.0, 451.0, 455.0],  # the same sizes elsewhere in the image
        [0.0, 0.0, 50.0, 1003.52],  # sqrt(area) = 224 from a very elongated box
    ])])
    for k_min, k_max, scale, level in [(2, 5, 224, 4), (3, 6, 224, 4), (2, 2, 224, 4), (2, 5, 160, 3)]:
        ours = ops.fpn_level(boxes, k_min, k_max, scale, level)
        assert ours.dtype == torch.int64
        assert torch.equal(ours, LevelMapper(k_min, k_max, scale, level)([boxes[:100], boxes[100:]]))
    assert ops.fpn_level(boxes, 2, 5)[-5:].tolist() == [1, 2, 3, 3, 2]  # 112 -> level 3, 224 -> 4, 448 -> 5
    assert ops.fpn_level(torch.zeros(0, 4), 2, 5).shape == (0,)


def test_feature_scales_equal_torchvision() -> None:
    from torchvision.ops.poolers import _setup_scales

    for image_sizes, padded in [([(800, 1066), (736, 1200)], (800, 1216)), ([(600, 600)], (608, 608)),
                                ([(97, 130)], (128, 160))]:
        features = [torch.zeros(1, 1, -(-padded[0] // s), -(-padded[1] // s)) for s in (4, 8, 16, 32, 64)]
        ours = ops.feature_scales([f.shape for f in features], image_sizes)
        assert ours == _setup_scales(features, image_sizes, 224, 4)[0]
    assert ops.feature_scales([(1, 256, 200, 304), (50, 76)], [(800, 1216)]) == [0.25, 0.0625]
    with pytest.raises(ValueError, match="at least one image"):
        ops.feature_scales([(10, 10)], [])


def fpn_features(seed: int, channels: int = 4) -> dict[str, torch.Tensor]:
    """An FPN's output for a batch padded to 800 x 1216: maps '0'..'3' at strides 4..32, and 'pool'."""
    generator = torch.Generator().manual_seed(seed)
    maps = {str(i): torch.randn(2, channels, 800 // s, 1216 // s, generator=generator)
            for i, s in enumerate((4, 8, 16, 32))}
    maps["pool"] = torch.randn(2, channels, 13, 19, generator=generator)  # LastLevelMaxPool: never pooled from
    return maps


@pytest.mark.parametrize("kernel", ["plain", "torchvision"])
@pytest.mark.parametrize("output_size,sampling_ratio", [(7, 2), (7, 0), (14, 2), (14, 0)])
def test_multiscale_roi_align_equals_torchvision(kernel: str, output_size: int, sampling_ratio: int) -> None:
    features, image_sizes = fpn_features(21), [(800, 1066), (736, 1200)]  # two sizes, one padded batch
    boxes = [pyramid_boxes(40, 22), pyramid_boxes(30, 23)]
    names = ["0", "1", "2", "3"]
    roi_align = ops.roi_align if kernel == "plain" else tv_ops.roi_align
    ours = ops.MultiScaleRoIAlign(names, output_size, sampling_ratio, roi_align=roi_align)(features, boxes, image_sizes)
    theirs = tv_ops.MultiScaleRoIAlign(names, output_size, sampling_ratio)(features, boxes, image_sizes)
    assert ours.shape == theirs.shape == (70, 4, output_size, output_size)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    # every level pooled some box: the test covers them all
    levels = ops.fpn_level(torch.cat(boxes), 2, 5)
    assert set(levels.tolist()) == {0, 1, 2, 3}


def test_multiscale_roi_align_images_without_boxes_and_a_single_level() -> None:
    features, image_sizes = fpn_features(24), [(800, 1066), (736, 1200)]
    names = ["0", "1", "2", "3"]
    for boxes in ([pyramid_boxes(25, 25), torch.zeros(0, 4)], [torch.zeros(0, 4), pyramid_boxes(5, 26)],
                  [torch.zeros(0, 4), torch.zeros(0, 4)]):
        ours = ops.MultiScaleRoIAlign(names, (7, 5), 2)(features, boxes, image_sizes)
        theirs = tv_ops.MultiScaleRoIAlign(names, (7, 5), 2)(features, boxes, image_sizes)
        assert ours.shape == theirs.shape
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    boxes = [pyramid_boxes(10, 27), pyramid_boxes(10, 28)]  # one map: every box pooled on it
    ours = ops.multiscale_roi_align([features["2"]], boxes, image_sizes, 7, 2)
    theirs = tv_ops.MultiScaleRoIAlign(["2"], 7, 2)(features, boxes, image_sizes)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_multiscale_roi_align_infers_the_scales_on_every_call() -> None:
    # torchvision's module keeps the scales of its first batch; ours recomputes them, so a module
    # used on a batch of another size agrees with a fresh torchvision module
    ours = ops.MultiScaleRoIAlign(["0", "1"], 5, 2)
    small = {"0": torch.randn(1, 2, 50, 50), "1": torch.randn(1, 2, 25, 25)}  # strides 8 and 16, not 4 and 8
    boxes = [pyramid_boxes(8, 29, extent=300.0)]
    ours(fpn_features(30), [pyramid_boxes(3, 31)], [(800, 1216)] * 2)
    theirs = tv_ops.MultiScaleRoIAlign(["0", "1"], 5, 2)(small, boxes, [(400, 400)])
    torch.testing.assert_close(ours(small, boxes, [(400, 400)]), theirs, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------
# Pasting masks
# --------------------------------------------------------------------------------------------


def paste_boxes(n: int, seed: int, height: int, width: int) -> torch.Tensor:
    """``[n,4]`` boxes centred inside the image, some much larger than it, plus the edge cases.

    None lies entirely outside the image: torchvision's slicing fails on most of those.
    """
    generator = torch.Generator().manual_seed(seed)
    centre = torch.rand(n, 2, generator=generator) * torch.tensor([width, height])
    half = torch.rand(n, 2, generator=generator) ** 2 * torch.tensor([width, height]) * 0.7
    edge_cases = torch.tensor([
        [10.0, 10.0, 10.0, 30.0],  # zero width
        [10.0, 10.0, 30.0, 10.0],  # zero height
        [5.0, 5.0, 5.0, 5.0],  # a point
        [20.3, 8.1, 20.6, 8.5],  # smaller than a pixel
        [0.0, 0.0, width - 1.0, height - 1.0],  # the whole image
        [-50.0, -40.0, width + 30.0, height + 60.0],  # larger than the image on every side
        [width - 3.0, height - 2.0, width + 20.0, height + 10.0],  # mostly outside, bottom right
        [-25.0, 3.0, 1.0, 9.0],  # mostly outside, left
    ])
    return torch.cat([torch.cat([centre - half, centre + half], dim=1), edge_cases])


@pytest.mark.parametrize("padding", [0, 1])
@pytest.mark.parametrize("mask_size,image", [(28, (61, 83)), (14, (90, 47)), (5, (40, 40))])
def test_paste_masks_in_image_equals_torchvision(padding: int, mask_size: int, image: tuple[int, int]) -> None:
    from torchvision.models.detection.roi_heads import paste_masks_in_image

    boxes = paste_boxes(30, mask_size, *image)
    masks = torch.rand(len(boxes), 1, mask_size, mask_size, generator=torch.Generator().manual_seed(padding))
    ours = ops.paste_masks_in_image(masks, boxes, image, padding)
    theirs = paste_masks_in_image(masks, boxes, image, padding)
    assert ours.shape == theirs.shape == (len(boxes), 1, *image)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)


def test_paste_masks_in_image_without_masks_and_outside_the_image() -> None:
    assert ops.paste_masks_in_image(torch.zeros(0, 1, 28, 28), torch.zeros(0, 4), (30, 50)).shape == (0, 1, 30, 50)
    # boxes entirely outside the image paste nothing. torchvision raises an error for most of these:
    # a box that ends before the image gives its slices negative ends, which count from the other side
    boxes = torch.tensor([[-60.0, 10.0, -20.0, 40.0], [100.0, 10.0, 130.0, 40.0], [10.0, -90.0, 40.0, -50.0],
                          [10.0, 65.0, 30.0, 69.0], [-30.0, -30.0, -4.0, -4.0]])
    pasted = ops.paste_masks_in_image(torch.rand(5, 1, 28, 28), boxes, (60, 80))
    assert pasted.shape == (5, 1, 60, 80) and pasted.abs().sum() == 0


def test_pasted_mask_covers_the_box_pixels_both_ends_included() -> None:
    # padding 0 keeps the box as it is; a mask of ones resizes to ones on pixels x1..x2, y1..y2
    pasted = ops.paste_masks_in_image(torch.ones(1, 1, 7, 7), torch.tensor([[3.0, 2.0, 9.0, 5.0]]), (8, 12), padding=0)
    expected = torch.zeros(8, 12)
    expected[2:6, 3:10] = 1
    torch.testing.assert_close(pasted[0, 0], expected)
