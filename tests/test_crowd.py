"""Crowd regions (``iscrowd = 1``) are never trained as objects, in any instance model.

The property, for every registered instance model: an image whose only annotations are crowd
regions trains exactly like an image without objects, and crowd regions next to real objects
change nothing. New models join these tests by registering themselves.
"""

from __future__ import annotations

import pytest
import torch

import minis.models
from minis.nn.detection import drop_crowd, training_targets

INSTANCE_MODELS = [name for name in minis.models.list_models()
                   if getattr(minis.models.build(name, 3, **minis.models.shapes_settings(name)), "task", "") == "instance"]
SIZE = 96


def small_model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    settings = {**minis.models.shapes_settings(name), "min_size": SIZE, "max_size": SIZE}
    return minis.models.build(name, num_classes=3, **settings).train()


def target(boxes: list[list[float]], crowd: list[int], labels: list[int] | None = None) -> dict:
    """Boxes with their rectangle masks; ``crowd`` flags per box."""
    masks = torch.zeros(len(boxes), SIZE, SIZE, dtype=torch.uint8)
    for mask, (x1, y1, x2, y2) in zip(masks, boxes):
        mask[int(y1):int(y2), int(x1):int(x2)] = 1
    return {
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        "labels": torch.tensor(labels or [1 + i % 2 for i in range(len(boxes))], dtype=torch.int64),
        "masks": masks,
        "iscrowd": torch.tensor(crowd, dtype=torch.int64),
        "area": masks.flatten(1).sum(1).float(),
        "image_id": 1,
    }


def losses_of(model: torch.nn.Module, image: torch.Tensor, image_target: dict) -> dict[str, float]:
    torch.manual_seed(1)  # the samplers draw at random: the same draws for both calls
    return {name: float(value.detach()) for name, value in model([image], [image_target]).items()}


OBJECTS = [[10.0, 12.0, 50.0, 60.0], [55.0, 20.0, 90.0, 44.0]]
CROWDS = [[0.0, 0.0, 70.0, 80.0], [40.0, 40.0, 96.0, 96.0], [30.0, 30.0, 30.0, 50.0]]  # the last one degenerate, as COCO's can be


@pytest.mark.parametrize("name", INSTANCE_MODELS)
def test_an_image_of_crowd_regions_trains_like_an_image_without_objects(name):
    model = small_model(name)
    image = torch.rand(3, SIZE, SIZE)
    empty = losses_of(model, image, target([], []))
    crowd_only = losses_of(model, image, target(CROWDS, [1, 1, 1]))
    assert empty.keys() == crowd_only.keys()
    for loss_name, value in empty.items():
        if value == 0.0:  # the terms an image without objects leaves at zero stay at zero
            assert crowd_only[loss_name] == 0.0, f"{name}: {loss_name} learns from crowd regions"
    assert crowd_only == pytest.approx(empty, rel=0, abs=0)


@pytest.mark.parametrize("name", INSTANCE_MODELS)
def test_crowd_regions_beside_objects_change_no_loss(name):
    model = small_model(name)
    image = torch.rand(3, SIZE, SIZE)
    objects_only = losses_of(model, image, target(OBJECTS, [0, 0]))
    mixed = target([CROWDS[0], OBJECTS[0], CROWDS[1], OBJECTS[1]], [1, 0, 1, 0], labels=[2, 1, 1, 2])
    assert losses_of(model, image, mixed) == pytest.approx(objects_only, rel=0, abs=0)
    assert any(value > 0 for value in objects_only.values())


def test_training_targets_drop_every_per_instance_field_of_crowd_regions_and_copy():
    original = target([CROWDS[0], OBJECTS[0], CROWDS[1]], [1, 0, 1], labels=[2, 1, 1])
    (kept,) = training_targets([original], 1)
    assert kept["boxes"].tolist() == [OBJECTS[0]]
    assert kept["labels"].tolist() == [1] and kept["iscrowd"].tolist() == [0]
    assert torch.equal(kept["masks"], original["masks"][1:2]) and torch.equal(kept["area"], original["area"][1:2])
    assert kept["image_id"] == 1
    assert len(original["boxes"]) == 3  # the caller's target is untouched
    no_flags = {key: value for key, value in original.items() if key != "iscrowd"}
    assert len(drop_crowd(no_flags)["boxes"]) == 3  # without iscrowd, every annotation is an object


def test_a_degenerate_box_is_refused_unless_it_is_a_crowd_region():
    bad = target([[30.0, 30.0, 30.0, 50.0]], [0])
    with pytest.raises(ValueError, match="image id 1: box 0 .* no width or no height"):
        training_targets([bad], 1)
    bad["iscrowd"] = torch.tensor([1, 0])
    with pytest.raises(ValueError, match="image id 1: 1 boxes but 2 iscrowd"):
        training_targets([bad], 1)
