"""Faster / Mask / Mask Scoring R-CNN: each piece and the whole models against torchvision's."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torchvision.models.detection import _utils as tv_utils
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelMaxPool

import minis.models
from minis.models.porting import torchvision_twin
from minis.models.ms_rcnn import MaskScoringRCNN, gt_area_inside_boxes, mask_iou_targets
from minis.models.rcnn import RCNNConfig, project_masks_on_boxes
from minis.nn.detection import DetectionTransform, match_boxes, sample_balanced
from minis.nn.fpn import FPN

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def random_targets(sizes: list[tuple[int, int]], num_classes: int, seed: int, max_objects: int = 4) -> list[dict]:
    """Targets with rectangular masks inside their boxes (some images without objects)."""
    generator = torch.Generator().manual_seed(seed)
    targets = []
    for i, (height, width) in enumerate(sizes):
        count = int(torch.randint(0, max_objects + 1, (1,), generator=generator)) if i else max_objects
        x1 = torch.randint(0, width - 20, (count,), generator=generator)
        y1 = torch.randint(0, height - 20, (count,), generator=generator)
        w = torch.randint(8, 60, (count,), generator=generator)
        h = torch.randint(8, 60, (count,), generator=generator)
        x2, y2 = (x1 + w).clamp(max=width), (y1 + h).clamp(max=height)
        masks = torch.zeros(count, height, width, dtype=torch.uint8)
        for k in range(count):
            masks[k, y1[k]:y2[k], x1[k]:x2[k]] = 1
        targets.append({"boxes": torch.stack([x1, y1, x2, y2], 1).float(),
                        "labels": torch.randint(1, num_classes, (count,), generator=generator), "masks": masks,
                        "image_id": i})
    return targets


# --------------------------------------------------------------------------------------------
# the pieces
# --------------------------------------------------------------------------------------------


def test_fpn_equals_torchvision() -> None:
    torch.manual_seed(0)
    channels = [16, 32, 64, 128]
    reference = FeaturePyramidNetwork(channels, 24, extra_blocks=LastLevelMaxPool()).eval()
    ours = FPN(channels, 24)
    for i in range(4):
        ours.lateral[i].load_state_dict(reference.inner_blocks[i][0].state_dict())
        ours.smooth[i].load_state_dict(reference.layer_blocks[i][0].state_dict())
    features = [torch.randn(2, c, 67 // 2**i, 45 // 2**i) for i, c in enumerate(channels)]  # odd sizes
    expected = list(reference({str(i): f for i, f in enumerate(features)}).values())
    got = ours(features)
    assert len(got) == 5
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e, rtol=0, atol=0)


@pytest.mark.parametrize("min_size,max_size", [(96, 160), (200, 240), ((64, 96, 128), 1000)])
def test_detection_transform_equals_torchvision(min_size, max_size) -> None:
    sizes = [(75, 120), (130, 90)]
    images = [torch.rand(3, h, w, generator=torch.Generator().manual_seed(i)) for i, (h, w) in enumerate(sizes)]
    targets = random_targets(sizes, 4, seed=1)
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    reference = GeneralizedRCNNTransform(min_size, max_size, mean, std)
    ours = DetectionTransform(min_size, max_size, mean, std)
    for training in (True, False):
        reference.train(training)
        ours.train(training)
        torch.manual_seed(5)
        expected_batch, expected_targets = reference(images, copy.deepcopy(targets))
        torch.manual_seed(5)
        batch, got_targets = ours(images, copy.deepcopy(targets))
        torch.testing.assert_close(batch.tensors, expected_batch.tensors, rtol=0, atol=0)
        assert batch.image_sizes == [tuple(s) for s in expected_batch.image_sizes]
        for g, e in zip(got_targets, expected_targets):
            torch.testing.assert_close(g["boxes"], e["boxes"], rtol=0, atol=0)
            torch.testing.assert_close(g["masks"], e["masks"], rtol=0, atol=0)
    assert targets[0]["boxes"].max() <= 120  # the caller's targets are not modified


def test_detection_transform_postprocess_equals_torchvision() -> None:
    reference, ours = GeneralizedRCNNTransform(100, 200, (0.5,) * 3, (0.2,) * 3).eval(), DetectionTransform(100, 200).eval()
    generator = torch.Generator().manual_seed(0)
    boxes = torch.rand(6, 2, generator=generator) * 60
    boxes = torch.cat([boxes, boxes + 5 + torch.rand(6, 2, generator=generator) * 40], 1)
    result = {"boxes": boxes, "labels": torch.arange(6), "scores": torch.rand(6, generator=generator),
              "masks": torch.rand(6, 1, 28, 28, generator=generator)}
    expected = reference.postprocess([copy.deepcopy(result)], [(100, 133)], [(150, 200)])[0]
    got = ours.postprocess([copy.deepcopy(result)], [(100, 133)], [(150, 200)])[0]
    torch.testing.assert_close(got["boxes"], expected["boxes"], rtol=0, atol=0)
    torch.testing.assert_close(got["masks"], expected["masks"], rtol=0, atol=1e-6)


@pytest.mark.parametrize("allow_low_quality", [True, False])
def test_match_boxes_equals_torchvision_matcher(allow_low_quality: bool) -> None:
    generator = torch.Generator().manual_seed(0)
    quality = torch.rand(5, 300, generator=generator).pow(3)
    quality[2, 10:14] = quality[2].max() + 0.01  # ties for a ground truth's best prediction
    quality[4] = 0.05  # a ground truth no prediction covers well
    matcher = tv_utils.Matcher(0.7, 0.3, allow_low_quality_matches=allow_low_quality)
    expected = matcher(quality.clone())
    got = match_boxes(quality.clone(), 0.7, 0.3, allow_low_quality)
    assert torch.equal(got, expected)


def test_sample_balanced_draws_like_torchvision() -> None:
    generator = torch.Generator().manual_seed(0)
    labels = [torch.randint(-1, 4, (500,), generator=generator), torch.randint(-1, 1, (80,), generator=generator)]
    sampler = tv_utils.BalancedPositiveNegativeSampler(128, 0.25)
    torch.manual_seed(3)
    expected = sampler(labels)
    torch.manual_seed(3)
    got = sample_balanced(labels, 128, 0.25)
    for e, g in zip(expected, got):
        for ei, gi in zip(e, g):
            assert torch.equal(ei, gi)
    positive, negative = got
    assert int(positive[0].sum()) == 32 and int(negative[0].sum()) == 96
    assert int(positive[1].sum()) == 0  # no positives: all negatives (as many as exist)
    assert not (positive[0].bool() & (labels[0] < 1)).any() and not (negative[0].bool() & (labels[0] != 0)).any()


# --------------------------------------------------------------------------------------------
# whole models against torchvision's, through from_torchvision
# --------------------------------------------------------------------------------------------

TV_SETTINGS = dict(min_size=224, max_size=320, box_score_thresh=0.02, box_nms_thresh=0.45, box_detections_per_img=40,
                   rpn_pre_nms_top_n_test=500, rpn_post_nms_top_n_test=300, image_mean=[0.5, 0.4, 0.3],
                   image_std=[0.3, 0.2, 0.25])


def torchvision_model(kind: str, seed: int, **settings) -> torch.nn.Module:
    torch.manual_seed(seed)
    builder = {"faster": torchvision.models.detection.fasterrcnn_resnet50_fpn,
               "mask": torchvision.models.detection.maskrcnn_resnet50_fpn}[kind]
    model = builder(weights=None, weights_backbone=None, num_classes=5, **settings)
    # random BN statistics, so that the ported normalisation is really exercised
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 1.5)
    return model


def assert_same_detections(got: list[dict], expected: list[dict]) -> None:
    for g, e in zip(got, expected):
        assert set(e) <= set(g)
        assert len(e["boxes"]) > 0  # the comparison means something
        assert torch.equal(g["labels"], e["labels"])
        torch.testing.assert_close(g["boxes"], e["boxes"], rtol=0, atol=1e-4)
        torch.testing.assert_close(g["scores"], e["scores"], rtol=0, atol=1e-6)
        if "masks" in e:
            torch.testing.assert_close(g["masks"], e["masks"], rtol=0, atol=1e-5)


def assert_same_weights(model: torch.nn.Module, other: torch.nn.Module) -> None:
    for (name, a), b in zip(model.state_dict().items(), other.state_dict().values()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("kind", ["faster", "mask"])
def test_from_torchvision_gives_the_same_detections(kind: str) -> None:
    reference = torchvision_model(kind, seed=0, **TV_SETTINGS).eval()
    ours = minis.models.from_torchvision(reference)
    assert type(ours).__name__ == {"faster": "FasterRCNN", "mask": "MaskRCNN"}[kind]
    assert not ours.training
    # the torchvision model's settings came across
    assert ours.transform.min_size == (224,) and ours.transform.max_size == 320
    assert ours.config.box_detections_per_img == 40 and ours.config.rpn_post_nms_top_n_test == 300
    images = [torch.rand(3, 180, 250, generator=torch.Generator().manual_seed(1)),
              torch.rand(3, 300, 200, generator=torch.Generator().manual_seed(2))]
    with torch.no_grad():
        expected, got = reference(images), ours(images)
    assert_same_detections(got, expected)
    assert got[0]["masks"].shape[-2:] == (180, 250) if kind == "mask" else True


def test_from_torchvision_with_default_settings_and_frozen_batch_norm() -> None:
    """The COCO configuration: 800 px, 1000 proposals, FrozenBatchNorm2d, stages 0-1 frozen."""
    torch.manual_seed(0)
    backbone = torchvision.models.detection.backbone_utils.resnet_fpn_backbone(
        backbone_name="resnet50", weights=None, norm_layer=torchvision.ops.FrozenBatchNorm2d, trainable_layers=3)
    reference = torchvision.models.detection.MaskRCNN(backbone, num_classes=5).eval()
    ours = minis.models.from_torchvision(reference)
    assert not ours.backbone.body.layer1[0].conv1.weight.requires_grad
    assert ours.backbone.body.layer2[0].conv1.weight.requires_grad
    image = [torch.rand(3, 240, 320, generator=torch.Generator().manual_seed(3))]
    with torch.no_grad():
        assert_same_detections(ours(image), reference(image))


@pytest.mark.parametrize("kind", ["faster", "mask"])
def test_training_losses_and_gradients_equal_torchvision(kind: str) -> None:
    """Same weights, same batch, same random state: the same samples, losses and gradients."""
    reference = torchvision_model(kind, seed=1, min_size=(160, 192), max_size=256).train()
    ours = minis.models.from_torchvision(reference).train()
    assert ours.training
    sizes = [(150, 170), (120, 200)]
    images = [torch.rand(3, h, w, generator=torch.Generator().manual_seed(i)) for i, (h, w) in enumerate(sizes)]
    targets = random_targets(sizes, 5, seed=4)
    if kind == "faster":
        for t in targets:
            del t["masks"]
    torch.manual_seed(11)
    expected = reference(images, copy.deepcopy(targets))
    torch.manual_seed(11)
    got = ours(images, copy.deepcopy(targets))
    assert set(got) == set(expected)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)
    sum(expected.values()).backward()
    sum(got.values()).backward()
    pairs = [(ours.backbone.body.layer2[0].conv2, reference.backbone.body.layer2[0].conv2),
             (ours.rpn.head.conv, reference.rpn.head.conv[0][0]),
             (ours.box_predictor.bbox_pred, reference.roi_heads.box_predictor.bbox_pred)]
    if kind == "mask":
        pairs.append((ours.mask_head.logits, reference.roi_heads.mask_predictor.mask_fcn_logits))
    for mine, theirs in pairs:
        torch.testing.assert_close(mine.weight.grad, theirs.weight.grad, rtol=1e-4, atol=1e-5)


def test_from_torchvision_refuses_what_it_cannot_port() -> None:
    v2 = torchvision.models.detection.maskrcnn_resnet50_fpn_v2(weights=None, weights_backbone=None, num_classes=3)
    with pytest.raises(ValueError, match="TwoMLPHead"):
        minis.models.from_torchvision(v2)


# --------------------------------------------------------------------------------------------
# the minis models on their own
# --------------------------------------------------------------------------------------------

SMALL = dict(backbone="small", fpn_channels=32, min_size=128, max_size=192, anchor_sizes=(16, 32, 64, 128, 256),
             representation_size=128, mask_head_channels=32, rpn_post_nms_top_n_train=300, rpn_post_nms_top_n_test=100,
             box_batch_size_per_image=64)


@pytest.mark.parametrize("name", ["faster_rcnn", "mask_rcnn", "ms_rcnn"])
def test_every_rcnn_keeps_the_instance_contract(name: str) -> None:
    torch.manual_seed(0)
    model = minis.models.build(name, num_classes=4, **SMALL)
    assert model.task == "instance" and model.build_args["name"] == name
    sizes = [(100, 130), (128, 96)]
    images = [torch.rand(3, h, w) for h, w in sizes]
    targets = random_targets(sizes, 4, seed=0)
    targets[1] = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64),
                  "masks": torch.zeros(0, 128, 96, dtype=torch.uint8)}  # an image with no object
    losses = model.train()(images, targets)
    expected = {"loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg"}
    expected |= {"loss_mask"} if name != "faster_rcnn" else set()
    expected |= {"loss_maskiou"} if name == "ms_rcnn" else set()
    assert set(losses) == expected
    assert all(torch.isfinite(v) and v.ndim == 0 for v in losses.values())
    sum(losses.values()).backward()
    with torch.no_grad():
        detections = model.eval()(images)
    for detection, (h, w) in zip(detections, sizes):
        n = len(detection["boxes"])
        assert detection["boxes"].shape == (n, 4) and detection["labels"].dtype == torch.int64
        assert detection["scores"].shape == (n,)
        assert ((detection["labels"] >= 1) & (detection["labels"] < 4)).all()
        assert (detection["boxes"][:, 2] <= w).all() and (detection["boxes"][:, 3] <= h).all()
        if name != "faster_rcnn":
            assert detection["masks"].shape == (n, 1, h, w)
            assert detection["masks"].min() >= 0 and detection["masks"].max() <= 1


def test_training_refuses_degenerate_boxes_naming_the_image() -> None:
    model = minis.models.build("mask_rcnn", num_classes=3, **SMALL).train()
    target = {"boxes": torch.tensor([[10.0, 10.0, 30.0, 30.0], [20.0, 5.0, 20.0, 40.0]]),
              "labels": torch.tensor([1, 2]), "masks": torch.zeros(2, 64, 64, dtype=torch.uint8), "image_id": 17}
    with pytest.raises(ValueError, match=r"image id 17: box 1 .* no width or no height"):
        model([torch.rand(3, 64, 64)], [target])
    target["boxes"] = target["boxes"][:1]
    with pytest.raises(ValueError, match="image id 17: 1 boxes but 2 labels"):
        model([torch.rand(3, 64, 64)], [target])
    with pytest.raises(ValueError, match="needs targets"):
        model([torch.rand(3, 64, 64)])


def test_unknown_settings_are_refused() -> None:
    with pytest.raises(TypeError, match="unknown argument.*box_thresh"):
        minis.models.build("faster_rcnn", num_classes=3, backbone="small", box_thresh=0.3)


def test_mask_targets_are_the_object_inside_the_proposal() -> None:
    masks = torch.zeros(2, 40, 40, dtype=torch.uint8)
    masks[0, 10:30, 10:30] = 1
    masks[1, :, :20] = 1
    boxes = torch.tensor([[10.0, 10.0, 30.0, 30.0], [0.0, 10.0, 20.0, 30.0], [0.0, 0.0, 40.0, 40.0]])
    targets = project_masks_on_boxes(masks, boxes, torch.tensor([0, 0, 1]), 28)
    assert targets.shape == (3, 28, 28)
    # RoIAlign (aligned=False, as in torchvision) puts pixel centres at integers: only the last
    # row and column of the box straddle the object's edge
    assert targets[0][:-1, :-1].min() > 0.99
    assert targets[1][:-1, :12].max() < 0.01 and targets[1][:-1, 15:-1].min() > 0.99  # right half of the box
    assert abs(targets[2].mean() - 0.5) < 0.02


def test_mask_iou_targets_count_the_object_outside_the_box() -> None:
    masks = torch.zeros(1, 50, 50, dtype=torch.uint8)
    masks[0, 10:30, 10:40] = 1  # 20 x 30 object
    boxes = torch.tensor([[10.0, 10.0, 40.0, 30.0], [10.0, 10.0, 25.0, 30.0]])  # whole object, its left half
    inside = gt_area_inside_boxes(masks, boxes, torch.tensor([0, 0]))
    torch.testing.assert_close(inside, torch.tensor([1.0, 0.5]))
    size = 28
    targets = project_masks_on_boxes(masks, boxes, torch.tensor([0, 0]), size)
    perfect = torch.where(targets >= 0.5, 5.0, -5.0)  # predicted logits equal to the target inside the box
    iou = mask_iou_targets(perfect, targets, inside)
    # a perfect mask of the whole object has IoU 1; a perfect mask of the half inside a half box has 0.5
    torch.testing.assert_close(iou, torch.tensor([1.0, 0.5]), atol=0.02, rtol=0)


def test_mask_scoring_rescores_the_masks_only() -> None:
    torch.manual_seed(0)
    model = minis.models.build("ms_rcnn", num_classes=3, **SMALL, box_score_thresh=0.0).eval()
    assert isinstance(model, MaskScoringRCNN)
    image = torch.rand(3, 96, 96, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        detection = model([image])[0]
    assert len(detection["scores"]) > 0
    torch.testing.assert_close(detection["mask_scores"], detection["scores"] * detection["mask_iou"].clamp(0, 1))
    # The boxes keep Mask R-CNN's class scores: the same model without its MaskIoU head.
    as_mask_rcnn = minis.models.build("mask_rcnn", num_classes=3, **SMALL, box_score_thresh=0.0).eval()
    as_mask_rcnn.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("maskiou_head.")})
    with torch.no_grad():
        reference = as_mask_rcnn([image])[0]
    assert torch.equal(detection["scores"], reference["scores"]) and torch.equal(detection["boxes"], reference["boxes"])
    model.score_with_mask_iou = False  # Mask R-CNN's ranking of the same detections
    with torch.no_grad():
        plain = model([image])[0]
    assert "mask_scores" not in plain and torch.equal(plain["scores"], detection["scores"])


def test_config_fields_are_builder_arguments() -> None:
    model = minis.models.build("faster_rcnn", num_classes=3, backbone="small", fpn_channels=16, min_size=64,
                               box_nms_thresh=0.3)
    assert model.config == RCNNConfig(min_size=64, box_nms_thresh=0.3)
    assert model.backbone.channels == 16


def test_torchvision_twin_of_a_small_minis_model_gives_the_same_detections() -> None:
    torch.manual_seed(0)
    ours = minis.models.build("mask_rcnn", num_classes=4, **SMALL, box_score_thresh=0.0).eval()
    twin = torchvision_twin(ours)
    assert type(twin).__name__ == "MaskRCNN" and not twin.training
    images = [torch.rand(3, 100, 120, generator=torch.Generator().manual_seed(0))]
    with torch.no_grad():
        assert_same_detections(ours(images), twin(images))
    assert_same_weights(ours, minis.models.from_torchvision(twin))  # and the round trip
    with pytest.raises(TypeError, match="MaskScoringRCNN has no torchvision counterpart"):
        torchvision_twin(minis.models.build("ms_rcnn", num_classes=4, **SMALL))


def test_box_geometry_stays_float32_under_autocast() -> None:
    """Anchors, proposals, ground truth and detections are not rounded to bfloat16 / float16."""
    torch.manual_seed(0)
    model = minis.models.build("mask_rcnn", num_classes=3, **SMALL).train()
    gt_boxes = torch.tensor([[10.3, 12.7, 100.1, 60.9], [40.55, 70.15, 120.35, 127.85]])
    masks = torch.zeros(2, 128, 128, dtype=torch.uint8)
    masks[0, 13:61, 10:100], masks[1, 70:128, 41:120] = 1, 1
    target = {"boxes": gt_boxes, "labels": torch.tensor([1, 2]), "masks": masks}
    seen = {}

    def spy(proposals, targets):
        samples = type(model).sample_proposals(model, proposals, targets)
        seen["targets"], seen["samples"] = targets, samples
        return samples

    model.sample_proposals = spy
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model([torch.rand(3, 128, 128)], [target])
        anchors = model.rpn.anchor_generator(*_batch_and_features(model))
    assert anchors[0].dtype == torch.float32
    resized_gt = seen["targets"][0]["boxes"]
    proposals = seen["samples"].proposals[0]
    assert proposals.dtype == torch.float32
    # the ground-truth boxes joined the proposals exactly, so each positive gt-proposal has zero targets
    is_gt = (proposals[:, None, :] == resized_gt[None]).all(-1).any(-1)
    assert is_gt.any()
    assert torch.equal(seen["samples"].regression_targets[0][is_gt], torch.zeros(int(is_gt.sum()), 4))
    model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        detections = model([torch.rand(3, 128, 128)])[0]
    assert detections["boxes"].dtype == torch.float32


def _batch_and_features(model):
    batch, _ = model.transform([torch.rand(3, 128, 128)])
    return batch, model.backbone(batch.tensors)
