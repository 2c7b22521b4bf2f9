"""Every registered instance model trains and evaluates on real COCO files (coco-tiny).

coco-tiny (``../shared/data``, skipped when absent) has what the shapes benchmark lacks: 80
categories with id gaps, crowd regions in uncompressed RLE, multi-part polygons and images
without annotations. Each model, with its small settings, trains a few iterations on images
chosen to hold all of those, then is evaluated through ``coco_evaluate``. A new model joins by
registering itself.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

import minis.models
from minis.data import collate_instances
from minis.data.coco import CocoInstances
from minis.engine import evaluate
from minis.eval import predictions_to_coco_results

COCO_TINY = Path(__file__).resolve().parents[2] / "shared" / "data" / "coco-tiny"
pytestmark = [pytest.mark.realdata,
              pytest.mark.skipif(not COCO_TINY.is_dir(), reason="../shared/data/coco-tiny is absent")]
INSTANCE_MODELS = [name for name in minis.models.list_models()
                   if minis.models.build(name, 3, **minis.models.shapes_settings(name)).task == "instance"]
SIZE = 128  # the models' short side: the small settings' own


def split(name: str, first: int | None = None) -> CocoInstances:
    dataset = CocoInstances(COCO_TINY / f"{name}2017", COCO_TINY / "annotations" / f"instances_{name}2017.json")
    if first is not None:
        dataset.ids = dataset.ids[:first]
    return dataset


@pytest.fixture(scope="module")
def train_batches():
    """Three batches of two: crowd regions, multi-part polygons and an image without annotations."""
    dataset = split("train")
    coco = dataset.coco

    def index_where(condition) -> list[int]:
        return [i for i, image_id in enumerate(dataset.ids)
                if condition(coco.loadAnns(coco.getAnnIds(imgIds=image_id, iscrowd=None)))]

    crowd = index_where(lambda anns: any(a["iscrowd"] for a in anns))
    multipart = index_where(lambda anns: any(isinstance(a["segmentation"], list) and len(a["segmentation"]) > 1
                                             for a in anns))
    empty = index_where(lambda anns: not anns)
    assert crowd and multipart and empty, "coco-tiny lost the cases this test is about"
    chosen = [crowd[0], empty[0], multipart[0], crowd[-1], multipart[-1], 0]
    items = [dataset[i] for i in chosen]
    return dataset.num_classes, [collate_instances(items[i:i + 2]) for i in range(0, len(items), 2)]


def low_thresholds(model: torch.nn.Module) -> None:
    """Keep every detection, so that an untrained model still sends results to pycocotools.

    The SOLO family also drops a candidate whose binary mask is (nearly) empty; untrained, its
    masks hover around its 0.5 mask threshold (Decoupled SOLO's products around 0.25), so that
    threshold goes down as well.
    """
    for name in ("box_score_thresh", "score_thresh", "update_thresh"):
        if hasattr(model.config, name):
            setattr(model.config, name, 0.0)
    if hasattr(model.config, "mask_thresh"):
        model.config.mask_thresh = 0.2


@pytest.mark.parametrize("name", INSTANCE_MODELS)
def test_trains_and_evaluates_on_coco_tiny(name, train_batches):
    num_classes, batches = train_batches
    assert num_classes == 81  # 80 categories, ids 1..90 with gaps, + background
    torch.manual_seed(0)
    model = minis.models.build(name, num_classes, **{**minis.models.shapes_settings(name), "min_size": SIZE})
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model.train()
    for images, targets in batches:
        losses = model(images, targets)
        for loss_name, value in losses.items():
            assert math.isfinite(float(value.detach())), f"{name}: {loss_name} = {float(value.detach())}"
        optimizer.zero_grad()
        sum(losses.values()).backward()
        optimizer.step()

    val = split("val", first=4)
    low_thresholds(model)
    metrics = evaluate(model, val, batch_size=2, progress=False)
    assert metrics["num_images"] == 4 and "bbox" in metrics
    assert all(0.0 <= value <= 1.0 for value in metrics["bbox"].values() if not math.isnan(value))
    model.eval()
    with torch.no_grad():
        image, _ = val[0]
        output = model([image.as_subclass(torch.Tensor)])[0]
    assert len(output["boxes"]) > 0
    results = predictions_to_coco_results(val, {val.ids[0]: output})
    category_ids = {result["category_id"] for result in results}
    assert category_ids <= set(val.coco.cats) and category_ids  # COCO's own ids, never a contiguous label
    if "masks" in output:
        assert "segm" in metrics
        assert output["masks"].shape[-2:] == image.shape[-2:]  # at the photo's own size
