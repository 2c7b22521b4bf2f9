"""FCIS: the assembly, the joint formulation, OHEM, mask voting and the whole model."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
import torchvision.ops as tv_ops

import minis.models
from minis.bench.gpu import fixed_batch
from minis.models.fcis import (FCIS, RoIOutputs, assemble, assemble_sampled, fcis_losses, joint_formulation,
                               resample_masks, vote_masks)
from minis.models.rcnn import with_ground_truth
from test_rcnn import random_targets

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py

SMALL = dict(backbone="small", min_size=128, max_size=192, head_channels=64, anchor_sizes=(16, 32, 64, 128),
             rpn_post_nms_top_n_train=60, rpn_post_nms_top_n_test=30, ohem_rois=24)


def test_the_default_model_has_2_k2_classes_score_maps_and_4_k2_box_maps() -> None:
    for num_classes in (2, 81):  # num_classes counts the background: 2 k^2 (C+1) maps
        model = minis.models.build("fcis", num_classes=num_classes)
        assert isinstance(model, FCIS) and model.task == "instance"
        assert model.score_maps.out_channels == 2 * 7 * 7 * num_classes
        assert model.box_maps.out_channels == 4 * 7 * 7
        assert model.backbone.output_stride == 16 and model.reduce.out_channels == 1024
        assert model.rpn.head.objectness.out_channels == 12  # 4 sizes x 3 aspect ratios on one map
    assert (model.config.group_size, model.config.roi_size, model.config.ohem_rois) == (7, 21, 128)
    assert (model.config.box_nms_thresh, model.config.mask_threshold) == (0.3, 0.4)


def test_unknown_settings_are_refused_by_name() -> None:
    message = r"^FCIS: unknown argument\(s\) roi_sise; settings are the fields of FCISConfig$"
    with pytest.raises(TypeError, match=message):
        minis.models.build("fcis", num_classes=3, backbone="small", roi_sise=14)


# --------------------------------------------------------------------------------------------
# The assembly and the joint formulation
# --------------------------------------------------------------------------------------------


def test_assembly_with_one_bin_per_part_is_torchvision_s_ps_roi_align() -> None:
    generator = torch.Generator().manual_seed(0)
    maps = torch.randn(2, 3 * 2 * 7 * 7, 9, 11, generator=generator, dtype=torch.float64)
    rois = torch.tensor([[0, 3.0, 5.0, 90.0, 120.0], [1, -20.0, 10.0, 60.0, 40.0], [1, 50.0, 50.0, 51.0, 52.0]],
                        dtype=torch.float64)
    for sampling_ratio in (1, 2):
        ours = assemble(maps, rois, 7, 7, 1 / 16, sampling_ratio)
        assert ours.shape == (3, 3, 2, 7, 7)
        theirs = tv_ops.ps_roi_align(maps, rois, 7, 1 / 16, sampling_ratio)
        torch.testing.assert_close(ours.flatten(1, 2), theirs, rtol=1e-12, atol=1e-12)


def bilinear(plane: torch.Tensor, y: float, x: float) -> float:
    """RoIAlign's sample of a 2-d map at ``(y, x)``, written from its rules: 0 beyond a cell outside,
    clamped onto the border within one."""
    height, width = plane.shape
    if y < -1 or y > height or x < -1 or x > width:
        return 0.0
    y, x = max(y, 0.0), max(x, 0.0)
    y0, x0 = min(int(y), height - 1), min(int(x), width - 1)
    y = float(y0) if y0 == height - 1 else y
    x = float(x0) if x0 == width - 1 else x
    y1, x1 = min(y0 + 1, height - 1), min(x0 + 1, width - 1)
    dy, dx = y - y0, x - x0
    return float((1 - dy) * (1 - dx) * plane[y0, x0] + (1 - dy) * dx * plane[y0, x1]
                 + dy * (1 - dx) * plane[y1, x0] + dy * dx * plane[y1, x1])


def test_assembly_of_21_by_21_from_7_by_7_parts_equals_a_loop_over_bins() -> None:
    k, size, classes, scale = 7, 21, 2, 0.25
    maps = torch.randn(1, classes * 2 * k * k, 5, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    rois = torch.tensor([[0, 2.0, 1.0, 19.0, 17.0], [0, -3.0, 6.0, 9.0, 26.0]], dtype=torch.float64)
    ours = assemble(maps, rois, size, k, scale, 1)
    expected = torch.zeros(len(rois), classes, 2, size, size, dtype=torch.float64)
    for n, (_, x1, y1, x2, y2) in enumerate(rois.tolist()):
        x1, y1, x2, y2 = (v * scale - 0.5 for v in (x1, y1, x2, y2))  # torchvision's half-cell shift
        bin_w, bin_h = (x2 - x1) / size, (y2 - y1) / size
        for c in range(classes):
            for kind in range(2):  # inside, outside
                for u in range(size):
                    for v in range(size):
                        part = (u * k // size) * k + v * k // size  # the part of the RoI the bin lies in
                        channel = (c * 2 + kind) * k * k + part
                        expected[n, c, kind, u, v] = bilinear(maps[0, channel], y1 + (u + 0.5) * bin_h,
                                                              x1 + (v + 0.5) * bin_w)
    torch.testing.assert_close(ours, expected, rtol=1e-12, atol=1e-12)


def test_joint_formulation_equals_the_per_pixel_rules() -> None:
    assembled = torch.randn(3, 4, 2, 5, 5, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    class_logits, mask_logits = joint_formulation(assembled)
    for n in range(3):
        for c in range(4):
            pixels = [max(assembled[n, c, 0, i, j], assembled[n, c, 1, i, j]) for i in range(5) for j in range(5)]
            assert math.isclose(class_logits[n, c], sum(pixels) / 25, rel_tol=1e-12)
            for i in range(5):
                for j in range(5):
                    inside, outside = assembled[n, c, 0, i, j], assembled[n, c, 1, i, j]
                    softmax = math.exp(inside) / (math.exp(inside) + math.exp(outside))
                    assert math.isclose(torch.sigmoid(mask_logits[n, c, i, j]), softmax, rel_tol=1e-12)


# --------------------------------------------------------------------------------------------
# OHEM
# --------------------------------------------------------------------------------------------


def test_ohem_back_propagates_exactly_the_largest_loss_rois_of_each_image() -> None:
    generator = torch.Generator().manual_seed(3)
    counts, classes, size, per_image = [7, 5], 3, 4, 3
    total = sum(counts)
    outputs = RoIOutputs(torch.randn(total, classes, generator=generator).requires_grad_(),
                         torch.randn(total, classes, size, size, generator=generator).requires_grad_(),
                         torch.randn(total, 4, generator=generator).requires_grad_())
    labels = torch.tensor([0, 2, 0, 1, 0, 0, 2, 1, 0, 0, 2, 0])
    positive = labels > 0
    mask_targets = (torch.rand(int(positive.sum()), size, size, generator=generator) > 0.5).float()
    box_targets = torch.randn(int(positive.sum()), 4, generator=generator)
    losses = fcis_losses(outputs, labels, mask_targets, box_targets, counts, per_image, mask_loss_weight=2.0)

    # each RoI's loss, one at a time
    per_roi, p = [], 0
    for n in range(total):
        loss = -F.log_softmax(outputs.class_logits[n].detach(), 0)[labels[n]]
        if labels[n] > 0:
            logits = outputs.mask_logits[n, labels[n]].detach()
            loss = loss + 2.0 * F.binary_cross_entropy_with_logits(logits, mask_targets[p])
            loss = loss + F.smooth_l1_loss(outputs.box_deltas[n].detach(), box_targets[p], reduction="sum")
            p += 1
        per_roi.append(float(loss))
    hardest = set(sorted(range(7), key=lambda n: -per_roi[n])[:3]) | {7 + n for n in sorted(range(5), key=lambda n:
                                                                                         -per_roi[7 + n])[:3]}
    total_loss = sum(losses.values())
    assert math.isclose(float(total_loss.detach()), sum(per_roi[n] for n in hardest) / 6, rel_tol=1e-5)
    total_loss.backward()
    with_gradient = {n for n in range(total) if outputs.class_logits.grad[n].abs().sum() > 0}
    assert with_gradient == hardest
    assert {n for n in range(total) if outputs.mask_logits.grad[n].abs().sum() > 0} == {n for n in hardest
                                                                                      if labels[n] > 0}
    assert outputs.box_deltas.grad[~positive].abs().sum() == 0


def test_the_model_s_two_pass_ohem_gives_the_one_pass_losses_and_gradients() -> None:
    """FCIS.losses ranks every RoI without gradient and re-scores the kept ones: the same losses, and the
    same gradient to the score and box maps, as fcis_losses on one pass over all RoIs."""
    torch.manual_seed(0)
    model = minis.models.build("fcis", num_classes=4, **{**SMALL, "ohem_rois": 10}).train()
    sizes = [(128, 128), (128, 128)]
    images, targets = [torch.rand(3, h, w) for h, w in sizes], random_targets(sizes, 4, seed=2)
    batch, targets = model.transform(images, targets)
    with torch.no_grad():
        features = model.backbone(batch.tensors)
        proposals, _ = model.rpn(batch, [features["c4"]], targets)
        hidden = F.relu(model.reduce(features["c5"]))
        maps = (model.score_maps(hidden), model.box_maps(hidden))
    rois = [with_ground_truth(p, t["boxes"]) for p, t in zip(proposals, targets)]
    assert all(len(r) > 10 for r in rois)  # OHEM has RoIs to leave out
    results = []
    for two_pass in (False, True):
        leaves = tuple(m.clone().requires_grad_() for m in maps)
        if two_pass:
            losses = model.losses(leaves, proposals, targets)
        else:
            labels, mask_targets, box_targets = model.roi_targets(rois, targets)
            losses = fcis_losses(model.score_rois(leaves, rois), labels, mask_targets, box_targets,
                                 [len(r) for r in rois], 10)
        sum(losses.values()).backward()
        results.append((losses, [m.grad for m in leaves]))
    (one, one_grads), (two, two_grads) = results
    assert float(one["loss_mask"].detach()) > 0
    for name in one:
        torch.testing.assert_close(two[name], one[name])
    for a, b in zip(two_grads, one_grads):  # summed in another order: equal up to rounding
        assert b.abs().sum() > 0
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


# --------------------------------------------------------------------------------------------
# Mask voting
# --------------------------------------------------------------------------------------------


def zero_padded_bilinear(mask: torch.Tensor, y: float, x: float) -> float:
    """A mask's value at cell coordinates ``(y, x)`` (cell centres at integers), 0 beyond its cells."""
    y0, x0 = math.floor(y), math.floor(x)
    value = 0.0
    for yy, wy in ((y0, 1 - (y - y0)), (y0 + 1, y - y0)):
        for xx, wx in ((x0, 1 - (x - x0)), (x0 + 1, x - x0)):
            if 0 <= yy < mask.shape[0] and 0 <= xx < mask.shape[1]:
                value += wy * wx * float(mask[yy, xx])
    return value


def test_mask_voting_equals_a_loop_over_kept_boxes_and_voters() -> None:
    generator = torch.Generator().manual_seed(4)
    size, classes = 5, 3
    boxes = torch.tensor([[10.0, 10.0, 50.0, 60.0], [12.0, 8.0, 48.0, 55.0], [15.0, 14.0, 55.0, 62.0],
                          [70.0, 70.0, 90.0, 95.0], [72.0, 68.0, 92.0, 90.0], [11.0, 30.0, 50.0, 62.0]],
                         dtype=torch.float64)
    scores = torch.softmax(torch.randn(6, classes, generator=generator, dtype=torch.float64), 1)
    mask_logits = torch.randn(6, classes, size, size, generator=generator, dtype=torch.float64)
    kept, labels = torch.tensor([0, 3, 5]), torch.tensor([1, 2, 1])
    ours = vote_masks(boxes[kept], labels, boxes, scores, mask_logits.float(), 0.5)
    for d, (k, c) in enumerate(zip(kept.tolist(), labels.tolist())):
        x1, y1, x2, y2 = boxes[k].tolist()
        voters = [m for m in range(6) if tv_ops.box_iou(boxes[k:k + 1], boxes[m:m + 1])[0, 0] >= 0.5]
        assert k in voters and len(voters) >= 2
        for u in range(size):
            for v in range(size):
                y, x = y1 + (u + 0.5) * (y2 - y1) / size, x1 + (v + 0.5) * (x2 - x1) / size
                total = weights = 0.0
                for m in voters:
                    mx1, my1, mx2, my2 = boxes[m].tolist()
                    own = torch.sigmoid(mask_logits[m, c])
                    value = zero_padded_bilinear(own, (y - my1) / (my2 - my1) * size - 0.5,
                                                 (x - mx1) / (mx2 - mx1) * size - 0.5)
                    total, weights = total + float(scores[m, c]) * value, weights + float(scores[m, c])
                assert math.isclose(ours[d, u, v], total / weights, abs_tol=1e-5)


def test_voting_by_one_box_alone_is_its_own_mask() -> None:
    generator = torch.Generator().manual_seed(5)
    boxes = torch.tensor([[0.0, 0.0, 30.0, 20.0], [40.0, 40.0, 70.3, 61.7], [10.0, 5.0, 50.0, 25.0]])
    scores = torch.softmax(torch.randn(3, 4, generator=generator), 1)
    mask_logits = torch.randn(3, 4, 21, 21, generator=generator)
    labels = torch.tensor([3, 1, 2])
    voted = vote_masks(boxes, labels, boxes, scores, mask_logits, 0.5)  # no two boxes overlap by IoU 0.5
    torch.testing.assert_close(voted, mask_logits[torch.arange(3), labels].sigmoid(), atol=1e-6, rtol=0)
    # and a mask resampled into its own box is itself
    masks = torch.rand(3, 21, 21, generator=generator)
    torch.testing.assert_close(resample_masks(masks, boxes, boxes), masks, atol=1e-6, rtol=0)


# --------------------------------------------------------------------------------------------
# The whole model
# --------------------------------------------------------------------------------------------


def test_fcis_keeps_the_instance_contract() -> None:
    torch.manual_seed(0)
    model = minis.models.build("fcis", num_classes=4, **SMALL)
    sizes = [(100, 130), (128, 96)]
    images = [torch.rand(3, h, w) for h, w in sizes]
    targets = random_targets(sizes, 4, seed=0)
    targets[1] = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64),
                  "masks": torch.zeros(0, 128, 96, dtype=torch.uint8)}  # an image with no object
    losses = model.train()(images, targets)
    assert set(losses) == {"loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_mask", "loss_box_reg"}
    assert all(torch.isfinite(v) and v.ndim == 0 for v in losses.values())
    sum(losses.values()).backward()
    assert all(p.grad is not None for p in model.parameters())
    assert model.score_maps.weight.grad.abs().sum() > 0 and model.box_maps.weight.grad.abs().sum() > 0
    with torch.no_grad():
        detections = model.eval()(images)
    for detection, (h, w) in zip(detections, sizes):
        n = len(detection["boxes"])
        assert 0 < n <= 100 and set(detection) == {"boxes", "labels", "scores", "masks"}
        assert detection["boxes"].shape == (n, 4) and detection["boxes"].dtype == torch.float32
        assert (detection["boxes"] >= 0).all() and (detection["boxes"][:, 2] <= w).all()
        assert (detection["boxes"][:, 3] <= h).all()
        labels = detection["labels"]
        assert labels.dtype == torch.int64 and ((labels >= 1) & (labels < 4)).all()
        assert detection["scores"].shape == (n,) and ((detection["scores"] >= 0) & (detection["scores"] <= 1)).all()
        assert detection["masks"].shape == (n, 1, h, w) and detection["masks"].dtype == torch.float32
        assert detection["masks"].min() >= 0 and detection["masks"].max() <= 1
    model.config.box_score_thresh = 1.0  # nothing passes: an image without detections
    model.config.sampling_ratio = 2  # and the plain assembly, which the compiled kernel cannot do
    with torch.no_grad():
        detection = model([torch.rand(3, 80, 90)])[0]
    assert len(detection["boxes"]) == 0 and detection["masks"].shape == (0, 1, 80, 90)
    assert all(torch.isfinite(v) for v in model.train()(images, targets).values())


def test_training_without_masks_is_refused_naming_the_image() -> None:
    model = minis.models.build("fcis", num_classes=3, **SMALL).train()
    target = {"boxes": torch.tensor([[10.0, 10.0, 50.0, 50.0]]), "labels": torch.tensor([1]), "image_id": 42}
    with pytest.raises(ValueError, match="image id 42: FCIS needs 'masks'"):
        model([torch.rand(3, 64, 64)], [target])


def test_box_geometry_and_targets_stay_float32_under_autocast() -> None:
    torch.manual_seed(0)
    model = minis.models.build("fcis", num_classes=3, **SMALL).train()
    gt_boxes = torch.tensor([[10.3, 12.7, 100.1, 60.9], [40.55, 70.15, 120.35, 127.85]])
    masks = torch.zeros(2, 128, 128, dtype=torch.uint8)
    masks[0, 13:61, 10:100], masks[1, 70:128, 41:120] = 1, 1
    seen = {}

    def spy(rois, targets):
        seen["rois"], seen["targets"] = rois, targets
        seen["result"] = type(model).roi_targets(model, rois, targets)
        return seen["result"]

    model.roi_targets = spy
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = model([torch.rand(3, 128, 128)], [{"boxes": gt_boxes, "labels": torch.tensor([1, 2]), "masks": masks}])
    assert all(torch.isfinite(v) for v in losses.values())
    labels, mask_targets, box_targets = seen["result"]
    assert seen["rois"][0].dtype == mask_targets.dtype == box_targets.dtype == torch.float32
    # the ground-truth boxes joined the RoIs exactly: their box targets are exactly zero
    rois, positive = seen["rois"][0], seen["rois"][0][labels > 0]
    is_gt = (positive[:, None, :] == seen["targets"][0]["boxes"][None]).all(-1).any(-1)
    assert int(is_gt.sum()) == 2 and torch.equal(box_targets[is_gt], torch.zeros(2, 4))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        detection = model.eval()([torch.rand(3, 128, 128)])[0]
    assert detection["boxes"].dtype == detection["masks"].dtype == torch.float32


def test_fcis_learns_a_fixed_batch_of_shapes() -> None:
    """50 steps on four shapes images: the total loss falls below half, and every object is found, with its
    class and a mask. (The OHEM losses are those of the hardest RoIs of the moment, so single terms may rise
    while the model improves: the mask loss does, as positives become the hard examples.)"""
    torch.manual_seed(0)
    items = fixed_batch("instance", image_size=128, batch_size=4, seed=0)
    images, targets = [image for image, _ in items], [target for _, target in items]
    model = minis.models.build("fcis", num_classes=6, **minis.models.shapes_settings("fcis")).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    history = []
    for _ in range(50):
        loss = sum(model(images, targets).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append(float(loss.detach()))
    assert sum(history[-5:]) < 0.5 * sum(history[:5]), history
    with torch.no_grad():
        detections = model.eval()(images)
    mask_ious = []
    for detection, target in zip(detections, targets):
        top = slice(0, 2 * len(target["boxes"]))
        box_iou = tv_ops.box_iou(target["boxes"], detection["boxes"][top])  # [M,D]
        same_class = target["labels"][:, None] == detection["labels"][top][None]
        assert ((box_iou >= 0.5) & same_class).any(dim=1).all()  # every object, with its class
        predicted, truth = detection["masks"][top, 0] >= 0.5, target["masks"].bool()
        intersection = (truth[:, None] & predicted[None]).sum((2, 3))
        union = (truth[:, None] | predicted[None]).sum((2, 3))
        mask_ious += (intersection / union.clamp(min=1)).max(dim=1).values.tolist()
    assert sum(mask_ious) / len(mask_ious) > 0.5, mask_ious


def test_the_sampled_assembly_computes_the_plain_one() -> None:
    generator = torch.Generator().manual_seed(6)
    maps = torch.randn(2, 3 * 2 * 7 * 7, 6, 9, generator=generator, dtype=torch.float64, requires_grad=True)
    # inside, partly and wholly outside the 6 x 9 map (96 x 144 pixels), zero-sized, on both images
    boxes = [torch.tensor([[3.0, 5.0, 90.0, 80.0], [-20.0, 10.0, 60.0, 40.0], [50.0, 50.0, 50.0, 52.0],
                           [150.0, 100.0, 200.0, 130.0]], dtype=torch.float64),
             torch.tensor([[100.0, 30.0, 160.0, 110.0], [0.0, 0.0, 144.0, 96.0]], dtype=torch.float64)]
    for roi_size in (7, 21):
        plain = assemble(maps, boxes, roi_size, 7, 1 / 16, 1)
        sampled = assemble_sampled(maps, boxes, roi_size, 7, 1 / 16).unflatten(1, (-1, 2))
        torch.testing.assert_close(sampled, plain, rtol=1e-10, atol=1e-10)
        weights = torch.randn(plain.shape, generator=generator, dtype=torch.float64)
        plain_grad, = torch.autograd.grad((plain * weights).sum(), maps)
        sampled_grad, = torch.autograd.grad((sampled * weights).sum(), maps)
        torch.testing.assert_close(sampled_grad, plain_grad, rtol=1e-10, atol=1e-10)
    # float32, as the model runs it: equal up to the rounding of grid_sample's normalised coordinates
    single = maps.detach().float()
    torch.testing.assert_close(assemble_sampled(single, [b.float() for b in boxes], 21, 7, 1 / 16).unflatten(1, (-1, 2)),
                               assemble(single, [b.float() for b in boxes], 21, 7, 1 / 16, 1), rtol=1e-4, atol=1e-4)
    no_boxes = [torch.zeros(0, 4, dtype=torch.float64)] * 2
    assert assemble_sampled(maps, no_boxes, 21, 7, 1 / 16).shape == (0, 6, 21, 21)
