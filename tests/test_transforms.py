"""Joint transforms: boxes, masks and semantic maps stay consistent with the image."""

from __future__ import annotations

import pytest
import torch
from torchvision import tv_tensors
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import masks_to_boxes

from minis.data.coco import IGNORE_INDEX
from minis.data.transforms import (
    DropEmptyBoxes,
    PadTo,
    ResizeMinMax,
    eval_transforms,
    resized_shape,
    semantic_train_transforms,
    train_transforms,
)


def rectangles_sample(height=30, width=40, rects=((2, 3, 12, 20), (20, 5, 38, 9), (0, 0, 40, 30))):
    """An instance sample whose masks are the axis-aligned rectangles ``(x1, y1, x2, y2)``."""
    masks = torch.zeros(len(rects), height, width, dtype=torch.uint8)
    for i, (x1, y1, x2, y2) in enumerate(rects):
        masks[i, y1:y2, x1:x2] = 1
    image = tv_tensors.Image(torch.rand(3, height, width))
    target = {
        "boxes": tv_tensors.BoundingBoxes(torch.tensor(rects, dtype=torch.float32), format="XYXY",
                                          canvas_size=(height, width)),
        "labels": torch.arange(1, len(rects) + 1),
        "masks": tv_tensors.Mask(masks),
        "iscrowd": torch.tensor([0, 1, 0][: len(rects)]),
        "area": torch.tensor([float(m.sum()) for m in masks]),
        "image_id": 7,
    }
    return image, target


def mask_boxes(masks: torch.Tensor) -> torch.Tensor:
    """Boxes ``(x1, y1, x2, y2)`` enclosing each mask, in the same pixel-edge convention as COCO boxes."""
    boxes = masks_to_boxes(masks.as_subclass(torch.Tensor))
    return boxes + torch.tensor([0.0, 0.0, 1.0, 1.0])  # masks_to_boxes gives the last pixel, not its far edge


def assert_consistent(image, target, atol):
    """Every field has one entry per instance, canvases match the image, boxes enclose masks."""
    height, width = image.shape[-2:]
    n = len(target["boxes"])
    assert target["masks"].shape == (n, height, width)
    assert tuple(target["boxes"].canvas_size) == (height, width)
    assert len(target["labels"]) == len(target["iscrowd"]) == len(target["area"]) == n
    assert target["masks"].flatten(1).any(1).all()
    torch.testing.assert_close(mask_boxes(target["masks"]), target["boxes"].as_subclass(torch.Tensor),
                               rtol=0, atol=atol)


@pytest.mark.parametrize(
    "height, width, min_size, max_size",
    [(480, 640, 800, 1333), (427, 640, 800, 1333), (100, 1000, 800, 1333), (333, 500, 64, 100), (64, 48, 96, 96)],
)
def test_resize_rule_matches_torchvision_detection(height, width, min_size, max_size):
    new_height, new_width = resized_shape(height, width, min_size, max_size)
    # The rule: shorter side = min_size unless the longer side would pass max_size.
    assert max(new_height, new_width) <= max_size
    assert min(new_height, new_width) == min_size or max(new_height, new_width) == max_size
    # The reference: torchvision's Mask R-CNN preprocessing (it floors where we round).
    reference = GeneralizedRCNNTransform(min_size, max_size, [0, 0, 0], [1, 1, 1]).eval()
    resized, _ = reference.resize(torch.rand(3, height, width), None)
    assert abs(resized.shape[-2] - new_height) <= 1 and abs(resized.shape[-1] - new_width) <= 1

    image, target = rectangles_sample(height, width, rects=((0, 0, width // 2, height // 2),))
    image, target = ResizeMinMax(min_size, max_size)(image, target)
    assert tuple(image.shape[-2:]) == (new_height, new_width)
    assert tuple(target["masks"].shape[-2:]) == (new_height, new_width)


def test_resize_and_flip_keep_boxes_and_masks_together_exactly():
    # 30x40 -> 60x80: an integer scale, so the transformed masks' boxes are exact.
    image, target = rectangles_sample()
    transform = train_transforms(min_size=60, max_size=1000, flip=1.0)
    image, out = transform(image, target)
    assert image.shape == (3, 60, 80)
    assert_consistent(image, out, atol=0)
    flipped = torch.tensor([[40 - 12, 3, 40 - 2, 20], [40 - 38, 5, 40 - 20, 9], [0, 0, 40, 30]]) * 2.0
    assert out["boxes"].as_subclass(torch.Tensor).tolist() == flipped.tolist()
    assert out["labels"].tolist() == [1, 2, 3] and out["image_id"] == 7


def test_random_train_transforms_keep_boxes_and_masks_within_a_pixel():
    torch.manual_seed(0)
    transform = train_transforms(min_size=(37, 45, 51), max_size=70, flip=0.5, jitter=0.3)
    for _ in range(20):
        image, target = transform(*rectangles_sample())
        assert min(image.shape[-2:]) in (37, 45, 51) or max(image.shape[-2:]) == 70
        assert_consistent(image, target, atol=1.0)  # nearest-neighbour masks round edges to a pixel


def test_semantic_crops_keep_instances_consistent_and_drop_cropped_away_ones():
    torch.manual_seed(0)
    transform = semantic_train_transforms(crop_size=(16, 20), scale_range=(0.75, 1.5))
    counts = set()
    for _ in range(30):
        image, target = transform(*rectangles_sample())
        assert image.shape == (3, 16, 20)
        assert_consistent(image, target, atol=1.0)
        counts.add(len(target["boxes"]))
    assert len(counts) > 1  # some crops lost an instance, and its fields went with it


def test_drop_empty_boxes_drops_every_per_instance_field():
    image, target = rectangles_sample()
    target["boxes"][1, 2] = target["boxes"][1, 0]  # zero width
    _, out = DropEmptyBoxes()(image, target)
    assert out["labels"].tolist() == [1, 3]
    assert out["iscrowd"].tolist() == [0, 0]
    assert torch.equal(out["masks"], target["masks"][[0, 2]])
    assert torch.equal(out["area"], target["area"][[0, 2]])
    assert isinstance(out["masks"], tv_tensors.Mask) and isinstance(out["boxes"], tv_tensors.BoundingBoxes)


def semantic_sample(height=30, width=40):
    semantic = torch.zeros(height, width, dtype=torch.int64)
    semantic[5:20, 3:15] = 1
    semantic[10:30, 20:40] = 5
    semantic[0:4, 30:40] = IGNORE_INDEX
    return tv_tensors.Image(torch.rand(3, height, width)), {"semantic": tv_tensors.Mask(semantic), "image_id": 3}


def test_semantic_resize_is_nearest_neighbour():
    image, target = semantic_sample()
    for transform in (train_transforms(min_size=77, max_size=1000, flip=0.5), eval_transforms(min_size=13)):
        out_image, out = transform(image, target)
        assert out["semantic"].shape == out_image.shape[-2:]
        assert out["semantic"].dtype == torch.int64 and out["image_id"] == 3
        assert set(out["semantic"].unique().tolist()) == {0, 1, 5, IGNORE_INDEX}  # no blended labels


def test_semantic_padding_is_ignore_and_image_padding_is_zero():
    image, target = semantic_sample()
    transform = semantic_train_transforms(crop_size=(50, 48), scale_range=(1.0, 1.0), flip=0.0)
    out_image, out = transform(image, target)
    assert out_image.shape == (3, 50, 48) and out["semantic"].shape == (50, 48)
    assert torch.equal(out["semantic"][:30, :40], target["semantic"])  # pads right/bottom only
    assert (out["semantic"][30:] == IGNORE_INDEX).all() and (out["semantic"][:, 40:] == IGNORE_INDEX).all()
    assert (out_image[:, 30:] == 0).all() and (out_image[:, :, 40:] == 0).all()
    torch.testing.assert_close(out_image[:, :30, :40], image.as_subclass(torch.Tensor))


def test_pad_to_pads_instance_masks_with_zero_and_keeps_boxes():
    image, target = rectangles_sample()
    out_image, out = PadTo((32, 45))(image, target)
    assert out_image.shape == (3, 32, 45)
    assert out["masks"].shape == (3, 32, 45)
    assert out["masks"][:, 30:].sum() == 0 and out["masks"][:, :, 40:].sum() == 0
    assert torch.equal(out["boxes"], target["boxes"]) and tuple(out["boxes"].canvas_size) == (32, 45)


def test_colour_jitter_changes_the_image_only():
    torch.manual_seed(1)
    image, target = rectangles_sample()
    transform = train_transforms(min_size=30, max_size=1000, flip=0.0, jitter=0.5)
    out_image, out = transform(image, target)
    assert not torch.allclose(out_image, image)
    assert torch.equal(out["masks"], target["masks"]) and torch.equal(out["boxes"], target["boxes"])


def test_eval_transforms_without_size_is_the_identity():
    image, target = rectangles_sample()
    out_image, out = eval_transforms(min_size=None)(image, target)
    assert torch.equal(out_image, image) and out_image.dtype == image.dtype
    assert out.keys() == target.keys()
    assert all(out[key] is target[key] for key in target)
