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
    semantic_train_transforms,
    train_transforms,
)
from minis.nn.detection import DetectionTransform, resized_shape


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
    [(480, 640, 800, 1333), (427, 640, 800, 1333), (100, 1000, 800, 1333), (333, 500, 64, 100), (64, 48, 96, 96),
     (3000, 4000, 800, 1333), (37, 101, 128, 256)],
)
def test_the_one_resize_rule_is_torchvision_detection_rule(height, width, min_size, max_size):
    new_height, new_width = resized_shape(height, width, min_size, max_size)
    # The rule: shorter side = min_size unless the longer side would pass max_size.
    assert max(new_height, new_width) <= max_size
    assert min(new_height, new_width) == min_size or max(new_height, new_width) == max_size
    # The reference: torchvision's Mask R-CNN preprocessing, to the pixel.
    reference = GeneralizedRCNNTransform(min_size, max_size, [0, 0, 0], [1, 1, 1]).eval()
    image = torch.rand(3, height, width)
    expected, _ = reference.resize(image, None)
    assert tuple(expected.shape[-2:]) == (new_height, new_width)
    ours = DetectionTransform(min_size, max_size, [0, 0, 0], [1, 1, 1]).eval()
    resized, _ = ours.resize(image, None)
    torch.testing.assert_close(resized, expected, rtol=0, atol=0)


def test_training_transforms_do_not_resize_the_model_does():
    # 30x40: flipped, never resized (a detector's DetectionTransform is the one owner of resizing).
    image, target = rectangles_sample()
    transform = train_transforms(flip=1.0)
    image, out = transform(image, target)
    assert image.shape == (3, 30, 40)
    assert_consistent(image, out, atol=0)
    flipped = torch.tensor([[40 - 12, 3, 40 - 2, 20], [40 - 38, 5, 40 - 20, 9], [0, 0, 40, 30]]) * 1.0
    assert out["boxes"].as_subclass(torch.Tensor).tolist() == flipped.tolist()
    assert out["labels"].tolist() == [1, 2, 3] and out["image_id"] == 7
    with pytest.raises(TypeError):
        train_transforms(min_size=(640, 800))  # the sizes belong to the model


def test_multi_scale_training_draws_one_short_side_per_image_in_the_model():
    torch.manual_seed(0)
    transform = DetectionTransform((37, 45, 51), 70, [0, 0, 0], [1, 1, 1]).train()
    image, target = rectangles_sample()
    target = {key: value.as_subclass(torch.Tensor) if isinstance(value, torch.Tensor) else value
              for key, value in target.items()}
    seen = set()
    for _ in range(30):
        batch, targets = transform([image.as_subclass(torch.Tensor)], [target])
        height, width = batch.image_sizes[0]
        seen.add(min(height, width))
        assert targets[0]["masks"].shape[-2:] == (height, width)
        assert_boxes_enclose_masks(targets[0], atol=1.5)
    assert seen == {37, 45, 51}
    transform.eval()
    batch, _ = transform([image.as_subclass(torch.Tensor)], None)
    assert min(batch.image_sizes[0]) == 51  # evaluation: the last size


def assert_boxes_enclose_masks(target, atol):
    torch.testing.assert_close(mask_boxes(target["masks"]), target["boxes"], rtol=0, atol=atol)


def test_random_train_transforms_keep_boxes_and_masks_together():
    torch.manual_seed(0)
    transform = train_transforms(flip=0.5, jitter=0.3)
    for _ in range(20):
        image, target = transform(*rectangles_sample())
        assert image.shape == (3, 30, 40)
        assert_consistent(image, target, atol=0)


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
    for transform in (semantic_train_transforms(crop_size=77, scale_range=(2.5, 2.5), flip=0.5),
                      semantic_train_transforms(crop_size=13, scale_range=(0.4, 0.4), flip=0.0)):
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
    transform = train_transforms(flip=0.0, jitter=0.5)
    out_image, out = transform(image, target)
    assert not torch.allclose(out_image, image)
    assert torch.equal(out["masks"], target["masks"]) and torch.equal(out["boxes"], target["boxes"])


