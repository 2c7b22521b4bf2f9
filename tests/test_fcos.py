"""FCOS: its losses, its location targets, and the whole model against torchvision's."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelP6P7

import minis.models
from minis.models.fcos import (FCOS, FCOSConfig, Locations, assign_locations, centerness_target, level_ranges,
                               make_locations)
from minis.models.porting import torchvision_twin
from minis.nn.fpn import FPN
from minis.nn.losses import dice_loss, giou_loss, iou_loss, sigmoid_focal_loss
from test_rcnn import assert_same_detections, assert_same_weights, random_targets

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py

SMALL = dict(backbone="small", fpn_channels=64, min_size=128, max_size=192, head_convs=2)
TV_LOSS_NAMES = {"classification": "loss_classifier", "bbox_regression": "loss_box_giou",
                 "bbox_ctrness": "loss_centerness"}


# --------------------------------------------------------------------------------------------
# the pieces
# --------------------------------------------------------------------------------------------


def test_fpn_with_p6_p7_equals_torchvision() -> None:
    torch.manual_seed(0)
    channels = [16, 32, 64]
    reference = FeaturePyramidNetwork(channels, 24, extra_blocks=LastLevelP6P7(24, 24)).eval()
    ours = FPN(channels, 24, top="p6p7")
    for i in range(3):
        ours.lateral[i].load_state_dict(reference.inner_blocks[i][0].state_dict())
        ours.smooth[i].load_state_dict(reference.layer_blocks[i][0].state_dict())
    ours.p6.load_state_dict(reference.extra_blocks.p6.state_dict())
    ours.p7.load_state_dict(reference.extra_blocks.p7.state_dict())
    features = [torch.randn(2, c, 41 // 2**i, 57 // 2**i) for i, c in enumerate(channels)]  # odd sizes
    expected = list(reference({str(i): f for i, f in enumerate(features)}).values())
    got = ours(features)
    assert len(got) == 5 and got[-1].shape[-2:] == (3, 4)
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e, rtol=0, atol=0)


@pytest.mark.parametrize("alpha,gamma", [(0.25, 2.0), (-1.0, 0.0), (0.5, 1.5)])
def test_focal_loss_equals_torchvision(alpha: float, gamma: float) -> None:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 50, 4, generator=generator) * 3
    targets = (torch.rand(6, 50, 4, generator=generator) > 0.9).float()
    for reduction in ("none", "sum", "mean"):
        expected = torchvision.ops.sigmoid_focal_loss(logits, targets, alpha, gamma, reduction)
        torch.testing.assert_close(sigmoid_focal_loss(logits, targets, alpha, gamma, reduction), expected)
    # gamma = 0 and no alpha is plain binary cross-entropy
    torch.testing.assert_close(sigmoid_focal_loss(logits, targets, -1, 0.0, "mean"),
                               torch.nn.functional.binary_cross_entropy_with_logits(logits, targets))


def test_giou_loss_equals_torchvision_and_keeps_a_gradient_without_overlap() -> None:
    generator = torch.Generator().manual_seed(1)
    corners = torch.rand(40, 2, generator=generator) * 50
    boxes = torch.cat([corners, corners + 1 + torch.rand(40, 2, generator=generator) * 30], 1)
    corners = torch.rand(40, 2, generator=generator) * 50
    targets = torch.cat([corners, corners + 1 + torch.rand(40, 2, generator=generator) * 30], 1)
    for reduction in ("none", "sum"):
        expected = torchvision.ops.generalized_box_iou_loss(boxes, targets, reduction)
        torch.testing.assert_close(giou_loss(boxes, targets, reduction), expected)
    apart = torch.tensor([[0.0, 0.0, 10.0, 10.0]], requires_grad=True)
    loss = giou_loss(apart, torch.tensor([[20.0, 0.0, 30.0, 10.0]]))
    assert 1.0 < float(loss.detach()) < 2.0  # IoU 0, and a penalty for the empty space between them
    loss.sum().backward()
    assert apart.grad[0, 2] < 0  # moving the right side towards the target lowers the loss
    torch.testing.assert_close(giou_loss(targets, targets), torch.zeros(40), atol=1e-6, rtol=0)


def test_iou_loss_is_minus_log_iou() -> None:
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 10.0]])
    targets = torch.tensor([[0.0, 0.0, 10.0, 10.0], [5.0, 0.0, 15.0, 10.0], [20.0, 0.0, 30.0, 10.0]])
    loss = iou_loss(boxes, targets)
    torch.testing.assert_close(loss[:2], torch.tensor([0.0, -torch.log(torch.tensor(1 / 3))]), atol=1e-5, rtol=0)
    assert loss[2] > 10  # no overlap: the floor, -ln(eps)
    model = minis.models.build("fcos", num_classes=3, **SMALL, box_loss="iou").train()
    losses = model([torch.rand(3, 96, 96)], [{"boxes": torch.tensor([[10.0, 10.0, 60.0, 70.0]]),
                                              "labels": torch.tensor([1])}])
    assert set(losses) == {"loss_classifier", "loss_box_iou", "loss_centerness"}
    with pytest.raises(ValueError, match="box_loss must be one of giou, iou"):
        minis.models.build("fcos", num_classes=3, **SMALL, box_loss="l1")


def test_dice_loss_values() -> None:
    target = torch.zeros(3, 8, 8)
    target[:, 2:6, 2:6] = 1
    prediction = torch.stack([target[0], 1 - target[1], target[2] * 0.5])
    loss = dice_loss(prediction, target)
    torch.testing.assert_close(loss[:2], torch.tensor([0.0, 1.0]), atol=1e-6, rtol=0)
    torch.testing.assert_close(loss[2], torch.tensor(1 - 2 * 0.5 * 16 / (0.25 * 16 + 16)), atol=1e-6, rtol=0)


def test_centerness_is_one_at_the_centre_and_falls_towards_the_border() -> None:
    distances = torch.tensor([[10.0, 10.0, 10.0, 10.0], [5.0, 10.0, 15.0, 10.0], [1.0, 1.0, 19.0, 19.0]])
    torch.testing.assert_close(centerness_target(distances), torch.tensor([1.0, (5 / 15) ** 0.5, 1 / 19]))


def test_locations_are_at_the_cells_of_each_level() -> None:
    features = [torch.zeros(1, 1, 4, 6), torch.zeros(1, 1, 2, 3)]
    locations = make_locations(features, (32, 48), (8, 16))
    assert locations.counts == [24, 6]
    assert locations.points[:3].tolist() == [[0, 0], [8, 0], [16, 0]]
    assert locations.points[6].tolist() == [0, 8]  # row-major
    assert locations.points[24 + 4].tolist() == [16, 16]
    centred = make_locations(features, (32, 48), (8, 16), offset=0.5)
    assert centred.points[0].tolist() == [4, 4]


def test_each_location_learns_the_smallest_object_it_falls_in_near_the_centre_in_its_level_range() -> None:
    features = [torch.zeros(1, 1, 16, 16), torch.zeros(1, 1, 8, 8)]
    locations = make_locations(features, (128, 128), (8, 16))
    low, high = level_ranges(locations.strides, locations.levels, 2, bounds=(32,))
    assert low.tolist()[:1] == [0] and high[0] == 32 and low[-1] == 32 and torch.isinf(high[-1])
    boxes = torch.tensor([[8.0, 8.0, 120.0, 120.0],  # large: reach up to 56 px, belongs to level 1
                          [40.0, 40.0, 72.0, 72.0],  # small, inside the large one: level 0
                          [90.0, 90.0, 110.0, 110.0]])  # small, outside the others
    matched = assign_locations(locations, boxes, 1.5, low, high)
    point = {tuple(p): i for i, p in enumerate(locations.points[:locations.counts[0]].tolist())}  # level 0
    assert matched[point[(56, 56)]] == 1  # the small box's centre, on level 0
    assert matched[point[(96, 96)]] == 2
    assert matched[point[(0, 0)]] == -1  # outside every box
    level1 = {tuple(p): i + locations.counts[0] for i, p in enumerate(locations.points[locations.counts[0]:].tolist())}
    assert matched[level1[(64, 64)]] == 0  # the large box's centre on level 1
    assert matched[level1[(16, 16)]] == -1  # inside the large box but far from its centre (radius 1.5 x 16)
    whole_box = assign_locations(locations, boxes, float("inf"), low, high)  # the paper: no centre sampling
    assert whole_box[level1[(16, 16)]] == 0
    assert (matched[locations.levels == 0] != 0).all()  # the large object is out of level 0's range
    assert (matched[locations.levels == 1] != 1).all()
    empty = assign_locations(locations, torch.zeros(0, 4), 1.5, low, high)
    assert (empty == -1).all() and len(empty) == len(locations.points)


def test_level_bounds_need_one_value_between_each_pair_of_levels() -> None:
    locations = make_locations([torch.zeros(1, 1, 2, 2)] * 3, (16, 16), (8, 16, 32))
    with pytest.raises(ValueError, match="needs 2 values for 3 levels"):
        level_ranges(locations.strides, locations.levels, 3, bounds=(64,))


# --------------------------------------------------------------------------------------------
# the whole model against torchvision's
# --------------------------------------------------------------------------------------------


def silence_background_column(class_logits: torch.nn.Conv2d) -> None:
    """torchvision also scores the background column 0, which training always pushes to zero.

    A trained model never reports label 0; with random weights it would, so both sides set
    that column to "never" before comparing the objects they list.
    """
    with torch.no_grad():
        class_logits.weight[0] = 0
        class_logits.bias[0] = -20.0


def torchvision_fcos(seed: int, **settings) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = torchvision.models.detection.fcos_resnet50_fpn(weights=None, weights_backbone=None, num_classes=5,
                                                           **settings)
    with torch.no_grad():  # random BN statistics, so that the ported normalisation is really exercised
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 1.5)
    silence_background_column(model.head.classification_head.cls_logits)
    return model


def test_from_torchvision_gives_the_same_detections() -> None:
    settings = dict(min_size=224, max_size=320, score_thresh=0.05, nms_thresh=0.5, detections_per_img=60,
                    topk_candidates=300, image_mean=[0.5, 0.4, 0.3], image_std=[0.3, 0.2, 0.25])
    reference = torchvision_fcos(seed=0, **settings).eval()
    ours = minis.models.from_torchvision(reference)
    assert isinstance(ours, FCOS) and not ours.training
    assert ours.transform.min_size == (224,) and ours.config.detections_per_img == 60
    assert ours.config.topk_candidates == 300 and ours.config.nms_thresh == 0.5
    assert ours.build_args["name"] == "fcos" and ours.build_args["backbone"] == "resnet50"
    images = [torch.rand(3, 180, 250, generator=torch.Generator().manual_seed(1)),
              torch.rand(3, 300, 200, generator=torch.Generator().manual_seed(2))]  # P6/P7 of odd sizes
    with torch.no_grad():
        expected, got = reference(images), ours(images)
    assert_same_detections(got, expected)
    assert all(len(d["boxes"]) == 60 for d in got)


def test_from_torchvision_with_the_coco_configuration() -> None:
    """800-pixel images, FrozenBatchNorm2d, stages 0-1 frozen, default thresholds."""
    torch.manual_seed(0)
    backbone = torchvision.models.detection.backbone_utils.resnet_fpn_backbone(
        backbone_name="resnet50", weights=None, norm_layer=torchvision.ops.FrozenBatchNorm2d, trainable_layers=3,
        returned_layers=[2, 3, 4], extra_blocks=LastLevelP6P7(256, 256))
    reference = torchvision.models.detection.FCOS(backbone, num_classes=5).eval()
    silence_background_column(reference.head.classification_head.cls_logits)
    with torch.no_grad():  # lift the class scores above the default 0.2 threshold
        reference.head.classification_head.cls_logits.bias[1:] = 0.0
    ours = minis.models.from_torchvision(reference)
    assert ours.config == FCOSConfig()
    assert not ours.backbone.body.layer1[0].conv1.weight.requires_grad
    assert ours.backbone.body.layer2[0].conv1.weight.requires_grad
    image = [torch.rand(3, 240, 320, generator=torch.Generator().manual_seed(3))]
    with torch.no_grad():
        assert_same_detections(ours(image), reference(image))


def test_training_losses_and_gradients_equal_torchvision() -> None:
    """Same weights, same batch: the same targets per location, losses and gradients."""
    reference = torchvision_fcos(seed=1, min_size=(160, 192), max_size=256).train()
    ours = minis.models.from_torchvision(reference).train()
    sizes = [(150, 170), (120, 200), (140, 140)]
    images = [torch.rand(3, h, w, generator=torch.Generator().manual_seed(i)) for i, (h, w) in enumerate(sizes)]
    targets = random_targets(sizes, 5, seed=4)
    targets[2] = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}  # no object
    torch.manual_seed(11)
    expected = reference(images, copy.deepcopy(targets))
    torch.manual_seed(11)
    got = ours(images, copy.deepcopy(targets))
    assert set(got) == set(TV_LOSS_NAMES.values())
    for name, value in expected.items():
        torch.testing.assert_close(got[TV_LOSS_NAMES[name]], value, rtol=1e-5, atol=1e-6, msg=name)
    sum(expected.values()).backward()
    sum(got.values()).backward()
    pairs = [(ours.backbone.body.layer2[0].conv2, reference.backbone.body.layer2[0].conv2),
             (ours.backbone.fpn.p7, reference.backbone.fpn.extra_blocks.p7),
             (ours.head.cls_logits, reference.head.classification_head.cls_logits),
             (ours.head.distances, reference.head.regression_head.bbox_reg),
             (ours.head.centerness, reference.head.regression_head.bbox_ctrness)]
    for mine, theirs in pairs:
        torch.testing.assert_close(mine.weight.grad, theirs.weight.grad, rtol=1e-4, atol=1e-6)


def test_torchvision_twin_of_a_small_minis_model_gives_the_same_detections() -> None:
    torch.manual_seed(0)
    ours = minis.models.build("fcos", num_classes=4, **SMALL, score_thresh=0.05).eval()
    silence_background_column(ours.head.cls_logits)
    twin = torchvision_twin(ours)
    assert type(twin).__name__ == "FCOS" and not twin.training
    images = [torch.rand(3, 100, 120, generator=torch.Generator().manual_seed(0))]
    with torch.no_grad():
        assert_same_detections(ours(images), twin(images))
    assert_same_weights(ours, minis.models.from_torchvision(twin))  # and the round trip
    ours.config.level_bounds = (32, 64, 128, 256)
    with pytest.raises(ValueError, match="fixed level ranges"):
        torchvision_twin(ours)
    scaled = minis.models.build("fcos", num_classes=4, **SMALL, learnable_scales=True)
    with pytest.raises(ValueError, match="no learnable per-level scales"):
        torchvision_twin(scaled)
    with pytest.raises(TypeError, match="CondInst has no torchvision counterpart"):
        torchvision_twin(minis.models.build("condinst", num_classes=4, **SMALL))


# --------------------------------------------------------------------------------------------
# the minis model on its own
# --------------------------------------------------------------------------------------------


def test_fcos_keeps_the_instance_contract() -> None:
    torch.manual_seed(0)
    model = minis.models.build("fcos", num_classes=4, **SMALL, score_thresh=0.0)
    assert model.task == "instance" and model.backbone.strides == (8, 16, 32, 64, 128)
    sizes = [(100, 130), (128, 96)]
    images = [torch.rand(3, h, w) for h, w in sizes]
    targets = random_targets(sizes, 4, seed=0)
    targets[1] = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}
    losses = model.train()(images, targets)
    assert set(losses) == {"loss_classifier", "loss_box_giou", "loss_centerness"}
    assert all(torch.isfinite(v) and v.ndim == 0 for v in losses.values())
    sum(losses.values()).backward()
    with torch.no_grad():
        detections = model.eval()(images)
    for detection, (h, w) in zip(detections, sizes):
        n = len(detection["boxes"])
        assert n == 100  # every candidate passes a zero threshold; NMS keeps the best 100
        assert detection["labels"].dtype == torch.int64 and detection["scores"].shape == (n,)
        assert ((detection["labels"] >= 1) & (detection["labels"] < 4)).all()  # never the background
        assert (detection["boxes"][:, 2] <= w).all() and (detection["boxes"][:, 3] <= h).all()
        assert (detection["scores"][:-1] >= detection["scores"][1:]).all()


def test_learnable_scales_start_as_a_no_op_then_learn_and_rescale_the_distances() -> None:
    """The paper's per-level scalar on the distances: at 1 nothing changes; it is trained; it scales."""
    torch.manual_seed(0)
    plain = minis.models.build("fcos", num_classes=4, **SMALL, score_thresh=0.05).eval()
    scaled = minis.models.build("fcos", num_classes=4, **SMALL, score_thresh=0.05, learnable_scales=True).eval()
    missing, unexpected = scaled.load_state_dict(plain.state_dict(), strict=False)
    assert missing == ["head.scales"] and unexpected == []
    assert torch.equal(scaled.head.scales.detach(), torch.ones(5))  # one per level, P3..P7
    with torch.no_grad():
        raised_scores = plain.head.cls_logits.bias.detach() + 4.0  # enough detections to compare
        plain.head.cls_logits.bias.copy_(raised_scores)
        scaled.head.cls_logits.bias.copy_(raised_scores)
    images = [torch.rand(3, 100, 120, generator=torch.Generator().manual_seed(0))]
    with torch.no_grad():
        expected, got = plain(images)[0], scaled(images)[0]
    assert len(expected["boxes"]) > 0
    for key in ("boxes", "labels", "scores"):
        assert torch.equal(got[key], expected[key]), key

    sizes = [(100, 130)]
    losses = scaled.train()([torch.rand(3, 100, 130)], random_targets(sizes, 4, seed=0))
    sum(losses.values()).backward()
    assert scaled.head.scales.grad is not None and (scaled.head.scales.grad[:3] != 0).any()

    scaled.eval()
    with torch.no_grad():
        scaled.head.scales.copy_(torch.tensor([2.0, 0.5, 1.5, 3.0, 0.25]))
        features = plain.backbone(plain.transform(images)[0].tensors)  # the two share these weights
        outputs_plain, outputs_scaled = plain.head(features), scaled.head(features)
        rescaled = scaled(images)[0]
    start = 0  # each level's distances are its scale times the plain model's (relu(s x) = s relu(x), s > 0)
    for feature, scale in zip(features, scaled.head.scales.detach()):
        level = slice(start, start + feature.shape[-2] * feature.shape[-1])
        torch.testing.assert_close(outputs_scaled.distances[:, level], scale * outputs_plain.distances[:, level])
        start = level.stop
    assert start == outputs_plain.distances.shape[1]
    torch.testing.assert_close(outputs_scaled.class_logits, outputs_plain.class_logits)
    assert not torch.equal(rescaled["boxes"], expected["boxes"])


def test_training_refuses_bad_targets_and_unknown_settings() -> None:
    model = minis.models.build("fcos", num_classes=3, **SMALL).train()
    target = {"boxes": torch.tensor([[10.0, 10.0, 30.0, 30.0], [20.0, 5.0, 20.0, 40.0]]),
              "labels": torch.tensor([1, 2]), "image_id": 17}
    with pytest.raises(ValueError, match=r"image id 17: box 1 .* no width or no height"):
        model([torch.rand(3, 64, 64)], [target])
    with pytest.raises(TypeError, match="unknown argument.*score_threshold"):
        minis.models.build("fcos", num_classes=3, backbone="small", score_threshold=0.3)


def scene(boxes: list[tuple[int, int, int, int]], colours: list[tuple[float, float, float]]) -> torch.Tensor:
    """A 128x128 grey image with a flat-coloured rectangle per box."""
    image = torch.full((3, 128, 128), 0.2)
    for (x1, y1, x2, y2), colour in zip(boxes, colours):
        image[:, y1:y2, x1:x2] = torch.tensor(colour)[:, None, None]
    return image


def two_scenes() -> tuple[list[torch.Tensor], list[dict]]:
    """The one-stage detectors' fixed batch: two images of a red (class 2) and a blue (class 1)
    rectangle each, with boxes, labels and rectangle masks."""
    red, blue = (0.9, 0.3, 0.1), (0.1, 0.3, 0.9)
    boxes = [[(40, 30, 80, 90), (90, 10, 120, 40)], [(10, 60, 60, 110), (70, 70, 100, 120)]]
    images = [scene(boxes[0], [red, blue]), scene(boxes[1], [blue, red])]
    targets = []
    for image_boxes, labels in zip(boxes, ([2, 1], [1, 2])):
        masks = torch.zeros(len(image_boxes), 128, 128, dtype=torch.uint8)
        for k, (x1, y1, x2, y2) in enumerate(image_boxes):
            masks[k, y1:y2, x1:x2] = 1
        targets.append({"boxes": torch.tensor(image_boxes, dtype=torch.float32), "labels": torch.tensor(labels),
                        "masks": masks})
    return images, targets


def fit_two_scenes(model: torch.nn.Module, steps: int, lr: float, check_boxes: bool = True
                   ) -> tuple[list[float], list[dict], list[dict]]:
    """Train ``model`` with Adam on :func:`two_scenes` for ``steps`` steps; with ``check_boxes``, check
    that both images' objects are then the two best detections, with their classes. Returns the
    losses per step, the eval detections and the targets."""
    images, targets = two_scenes()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        loss = sum(model(images, targets).values())
        losses.append(float(loss.detach()))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        detections = model.eval()(images)
    for detection, target in zip(detections, targets if check_boxes else []):
        iou = torchvision.ops.box_iou(detection["boxes"][:2], target["boxes"])  # the two best detections
        assert (iou.max(dim=0).values > 0.7).all()
        assert torch.equal(detection["labels"][iou.argmax(dim=0)], target["labels"])
    return losses, detections, targets


def test_fcos_learns_two_images() -> None:
    """80 steps on two images: the loss falls and every object is found with its class.

    (One object alone is not enough: with few positive locations, a distance whose ReLU starts
    negative at all of them never gets a gradient.)
    """
    torch.manual_seed(0)
    model = minis.models.build("fcos", num_classes=3, **SMALL).train()
    losses, _, _ = fit_two_scenes(model, steps=80, lr=2e-3)
    assert sum(losses[-5:]) / 5 < 0.5 * losses[0]
