"""YOLACT: its pieces against loops written from the paper's formulas, and the model's contract."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision

import minis.models
from minis.models.yolact import (YOLACT, assemble_masks, box_region, mask_iou, masks_at, ohem_cross_entropy,
                                 published_anchor_sizes, top_k_per_class)
from test_fcos import fit_two_scenes
from test_rcnn import random_targets

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py

SMALL = dict(backbone="small", fpn_channels=64, min_size=128, max_size=192, protonet_channels=32)


# --------------------------------------------------------------------------------------------
# the pieces, each against a loop
# --------------------------------------------------------------------------------------------


def test_assembly_is_a_linear_combination_of_the_prototypes() -> None:
    generator = torch.Generator().manual_seed(0)
    prototypes, coefficients = torch.rand(5, 6, 7, generator=generator), torch.randn(3, 5, generator=generator)
    expected = torch.stack([sum(c[j] * prototypes[j] for j in range(5)) for c in coefficients])
    torch.testing.assert_close(assemble_masks(prototypes, coefficients), expected)


def test_box_region_keeps_the_pixels_whose_centre_is_in_the_box() -> None:
    boxes = torch.tensor([[3.0, 2.0, 17.0, 9.5], [0.0, 0.0, 40.0, 40.0], [10.0, 10.0, 10.0, 12.0]])
    got = box_region(boxes, (6, 8), (4.0, 4.0))
    for n, (x1, y1, x2, y2) in enumerate(boxes.tolist()):
        for i in range(6):
            for j in range(8):
                cy, cx = (i + 0.5) * 4, (j + 0.5) * 4
                assert bool(got[n, i, j]) == (x1 <= cx < x2 and y1 <= cy < y2)


def test_top_k_per_class_keeps_each_class_best() -> None:
    generator = torch.Generator().manual_seed(1)
    scores, labels = torch.rand(60, generator=generator), torch.randint(1, 5, (60,), generator=generator)
    kept = set(top_k_per_class(scores, labels, 4).tolist())
    expected = set()
    for label in labels.unique():
        members = torch.nonzero(labels == label).squeeze(1)
        expected |= set(members[scores[members].argsort(descending=True)[:4]].tolist())
    assert kept == expected


def test_ohem_takes_the_hardest_negatives_three_per_positive_per_image() -> None:
    generator = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 30, 4, generator=generator)
    positive = torch.zeros(2, 30, dtype=torch.bool)
    positive[0, [1, 5]] = True  # image 1 has no positive: no negatives either
    labels = torch.zeros(2, 30, dtype=torch.int64)
    labels[0, [1, 5]] = torch.tensor([2, 3])
    negative = ~positive
    negative[0, 7] = False  # ignored
    expected = 0.0
    for image in range(2):
        loss = F.cross_entropy(logits[image], labels[image], reduction="none")
        negatives = [a for a in range(30) if negative[image, a]]
        hardest = sorted(negatives, key=lambda a: -float(loss[a]))[:3 * int(positive[image].sum())]
        expected += float(loss[positive[image]].sum()) + sum(float(loss[a]) for a in hardest)
    got = ohem_cross_entropy(logits, labels, positive, negative, 3)
    assert abs(float(got) - expected) < 1e-5


def test_mask_iou_and_masks_at_prototype_resolution() -> None:
    a = torch.zeros(1, 4, 4)
    a[0, :2] = 1
    b = torch.zeros(1, 4, 4)
    b[0, 1:3] = 1
    assert float(mask_iou(a, b)) == pytest.approx(4 / 12)
    masks = torch.zeros(1, 10, 12, dtype=torch.uint8)
    masks[0, 2:6, 4:12] = 1
    resized = masks_at([{"masks": masks}], (16, 16), (4, 4))  # padded to 16x16, then stride 4
    assert resized.shape == (1, 4, 4) and set(resized.unique().tolist()) <= {0.0, 1.0}
    assert resized[0, :, 3].sum() == 0  # the padding


def test_published_anchors_scale_with_the_input() -> None:
    assert published_anchor_sizes(550) == (24, 48, 96, 192, 384)
    model = minis.models.build("yolact", num_classes=3, backbone="small", fpn_channels=32)
    assert model.num_anchors == 3 and model.config.num_prototypes == 32
    assert model.anchor_generator.sizes == ((24,), (48,), (96,), (192,), (384,))
    from minis.nn.detection import ImageBatch
    features = [torch.zeros(1, 32, 64 // s, 64 // s) for s in (8, 16, 32)] + [torch.zeros(1, 32, 1, 1)] * 2
    anchors = model.anchor_generator(ImageBatch(torch.zeros(1, 3, 64, 64), [(64, 64)]), features)[0]
    first = anchors[:3]  # P3's top-left cell: three anchors of equal area centred at (4, 4), not squares
    torch.testing.assert_close((first[:, :2] + first[:, 2:]) / 2, torch.full((3, 2), 4.0))
    widths, heights = first[:, 2] - first[:, 0], first[:, 3] - first[:, 1]
    assert len(set(zip(widths.tolist(), heights.tolist()))) == 3


# --------------------------------------------------------------------------------------------
# the model
# --------------------------------------------------------------------------------------------


def test_yolact_keeps_the_instance_contract() -> None:
    torch.manual_seed(0)
    model = minis.models.build("yolact", num_classes=4, **SMALL, score_thresh=0.0, detections_per_img=20)
    assert isinstance(model, YOLACT) and model.task == "instance"
    sizes = [(100, 130), (128, 96)]
    images = [torch.rand(3, h, w) for h, w in sizes]
    losses = model.train()(images, random_targets(sizes, 4, seed=0))
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_mask", "loss_semantic"}
    assert all(torch.isfinite(v) and v.ndim == 0 for v in losses.values())
    sum(losses.values()).backward()
    assert model.protonet.out.weight.grad.abs().sum() > 0 and model.head.coefficients.weight.grad.abs().sum() > 0
    with torch.no_grad():
        detections = model.eval()(images)
    for detection, (h, w) in zip(detections, sizes):
        n = len(detection["boxes"])
        assert n == 20 and detection["masks"].shape == (n, 1, h, w)
        assert ((detection["labels"] >= 1) & (detection["labels"] < 4)).all()
        assert (detection["scores"][:-1] >= detection["scores"][1:]).all()
        masks = detection["masks"][:, 0]
        assert masks.min() >= 0 and masks.max() <= 1
        # cropped at stride 4 then upsampled: nothing further than one prototype pixel outside the box
        far_outside = ~box_region(detection["boxes"] + torch.tensor([-4.0, -4.0, 4.0, 4.0]), (h, w), (1.0, 1.0))
        assert (masks[far_outside] == 0).all()


def test_crowd_only_images_give_no_positives() -> None:
    torch.manual_seed(0)
    model = minis.models.build("yolact", num_classes=3, **SMALL).train()
    image = [torch.rand(3, 128, 128, generator=torch.Generator().manual_seed(0))]
    masks = torch.zeros(1, 128, 128, dtype=torch.uint8)
    masks[0, 20:90, 20:100] = 1
    crowd = {"boxes": torch.tensor([[20.0, 20.0, 100.0, 90.0]]), "labels": torch.tensor([1]), "masks": masks,
             "iscrowd": torch.tensor([1])}
    losses = model(image, [crowd])
    losses = {name: float(value.detach()) for name, value in losses.items()}
    assert losses["loss_classifier"] == 0 and losses["loss_box_reg"] == 0
    assert losses["loss_mask"] == 0


def test_rescoring_changes_only_the_mask_scores() -> None:
    torch.manual_seed(0)
    plain = minis.models.build("yolact", num_classes=3, **SMALL, score_thresh=0.0, detections_per_img=10).eval()
    rescored = minis.models.build("yolact", num_classes=3, **SMALL, score_thresh=0.0, detections_per_img=10,
                                  rescore=True).eval()
    missing = rescored.load_state_dict(plain.state_dict(), strict=False).missing_keys
    assert missing and all(key.startswith("rescorer.") for key in missing)
    images = [torch.rand(3, 120, 128, generator=torch.Generator().manual_seed(3))]
    with torch.no_grad():
        (a,), (b,) = plain(images), rescored(images)
    for key in ("boxes", "labels", "scores", "masks"):
        torch.testing.assert_close(a[key], b[key])
    assert "mask_scores" not in a
    torch.testing.assert_close(b["mask_scores"], b["scores"] * b["mask_iou"].clamp(0, 1))
    targets = random_targets([(120, 128)], 3, seed=1)
    losses = rescored.train()(images, targets)
    assert "loss_mask_iou" in losses and torch.isfinite(losses["loss_mask_iou"])


def test_the_rescoring_net_starts_alive_at_a_middling_iou() -> None:
    """Its last layer has a ReLU: started below zero, a class's prediction would stay 0 for good."""
    from minis.models.yolact import MaskRescorer

    torch.manual_seed(0)
    rescorer = MaskRescorer(5)
    masks = (torch.rand(6, 1, 32, 32, generator=torch.Generator().manual_seed(0)) > 0.5).float()
    predicted = rescorer(torch.cat([masks, torch.zeros(1, 1, 32, 32)]))
    assert predicted.shape == (7, 5)
    torch.testing.assert_close(predicted, torch.full_like(predicted, 0.5), atol=0.05, rtol=0)


def test_fast_nms_keeps_a_subset_of_standard_nms() -> None:
    torch.manual_seed(0)
    fast = minis.models.build("yolact", num_classes=3, **SMALL, score_thresh=0.01, detections_per_img=300).eval()
    standard = minis.models.build("yolact", num_classes=3, **SMALL, score_thresh=0.01, detections_per_img=300,
                                  suppression="standard").eval()
    standard.load_state_dict(fast.state_dict())
    images = [torch.rand(3, 128, 128, generator=torch.Generator().manual_seed(4))]
    with torch.no_grad():
        (f,), (s,) = fast(images), standard(images)
    assert 0 < len(f["boxes"]) <= len(s["boxes"])
    kept = {(tuple(b.tolist()), int(l)) for b, l in zip(s["boxes"].round(decimals=3), s["labels"])}
    assert all((tuple(b.tolist()), int(l)) in kept for b, l in zip(f["boxes"].round(decimals=3), f["labels"]))


def test_yolact_learns_two_images() -> None:
    """Steps on two images: the loss falls, every object is found with its class and a mask that fits it."""
    torch.manual_seed(0)
    model = minis.models.build("yolact", num_classes=3, **SMALL).train()
    losses, detections, targets = fit_two_scenes(model, steps=100, lr=1e-3)
    assert sum(losses[-5:]) / 5 < 0.3 * losses[0]
    for detection, target in zip(detections, targets):
        best = torchvision.ops.box_iou(detection["boxes"][:2], target["boxes"]).argmax(dim=0)
        predicted = (detection["masks"][best, 0] > 0.5).float()
        assert (mask_iou(predicted, target["masks"].float()) > 0.7).all()


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="suppression"):
        minis.models.build("yolact", num_classes=3, **SMALL, suppression="soft")
    with pytest.raises(TypeError):
        minis.models.build("yolact", num_classes=3, **SMALL, prototypes=16)
