"""minis.eval.coco against pycocotools: conversion to COCO results, AP/AR, edge cases."""

from __future__ import annotations

import contextlib
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torchvision import tv_tensors

from minis.eval import coco_evaluate, evaluate_coco_results, predictions_to_coco_results
from minis.eval.coco import STAT_NAMES

# pycocotools' decode (used by COCO.annToMask to build perfect predictions here) trips a numpy 2
# DeprecationWarning inside pycocotools itself; minis.eval.coco does not call it.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


# --------------------------------------------------------------------------------------------
# A small COCO ground truth: category ids with gaps (1, 3, 7, and 9 never used), a crowd region
# stored as uncompressed RLE, a compressed RLE object, a two-part polygon, one image without
# annotations, and objects in all three size ranges (small < 32^2 <= medium < 96^2 <= large).
# --------------------------------------------------------------------------------------------


def _rect(x0: int, y0: int, x1: int, y1: int) -> list[float]:
    """Polygon of the axis-aligned rectangle with corners (x0, y0), (x1, y1)."""
    return [x0, y0, x1, y0, x1, y1, x0, y1]


def _uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO's uncompressed RLE (counts as a list, column-major, starting with a run of 0s)."""
    flat = mask.flatten(order="F").astype(np.int8)
    change = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat[0] == 1:
        counts = [0] + counts
    return {"size": list(mask.shape), "counts": counts}


def _write_ground_truth(path: Path) -> Path:
    images = [
        {"id": 1, "file_name": "a.png", "height": 120, "width": 160},
        {"id": 2, "file_name": "b.png", "height": 100, "width": 130},
        {"id": 3, "file_name": "c.png", "height": 64, "width": 64},  # no annotation
        {"id": 4, "file_name": "d.png", "height": 80, "width": 80},
    ]
    crowd = np.zeros((100, 130), np.uint8)
    crowd[70:95, 5:40] = 1
    blob = np.zeros((80, 80), np.uint8)
    blob[30:70, 40:75] = 1  # 40 x 35 = 1400 px: medium
    blob[50:70, 40:50] = 0  # a notch, so it is not a box
    blob_rle = mask_utils.encode(np.asfortranarray(blob))
    blob_rle["counts"] = blob_rle["counts"].decode("ascii")
    segmentations = [
        # (image id, category id, segmentation, iscrowd)
        (1, 1, [_rect(5, 5, 25, 15)], 0),  # small
        (1, 3, [_rect(60, 40, 100, 80)], 0),  # medium
        (2, 7, [_rect(10, 2, 120, 92)], 0),  # large: 110 x 90
        (2, 1, [_rect(100, 95, 110, 99)], 0),  # small
        (2, 1, _uncompressed_rle(crowd), 1),  # crowd region: ignored by COCOeval
        (4, 1, [_rect(2, 2, 12, 12), [20, 2, 30, 2, 25, 12]], 0),  # two-part polygon
        (4, 3, blob_rle, 0),  # compressed RLE, medium
    ]
    annotations = []
    for ann_id, (image_id, cat_id, segmentation, iscrowd) in enumerate(segmentations, start=10):
        info = images[image_id - 1]
        rle = _to_rle(segmentation, info["height"], info["width"])
        annotations.append(
            {
                "id": ann_id,
                "image_id": image_id,
                "category_id": cat_id,
                "segmentation": segmentation,
                "area": float(mask_utils.area(rle)),
                "bbox": mask_utils.toBbox(rle).tolist(),
                "iscrowd": iscrowd,
            }
        )
    names = {1: "circle", 3: "square", 7: "triangle", 9: "star"}
    categories = [{"id": i, "name": n} for i, n in names.items()]
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return path


def _to_rle(segmentation, height: int, width: int) -> dict:
    """Compressed RLE of a polygon list, uncompressed RLE or compressed RLE."""
    if isinstance(segmentation, list):
        return mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    if isinstance(segmentation["counts"], list):
        return mask_utils.frPyObjects(segmentation, height, width)
    return segmentation


class StandInDataset:
    """The attributes of the CocoInstances convention that evaluation needs, from pycocotools."""

    def __init__(self, ann_file: Path, ids: list[int] | None = None):
        with contextlib.redirect_stdout(io.StringIO()):
            self.coco = COCO(str(ann_file))
        self.ids = sorted(self.coco.getImgIds()) if ids is None else list(ids)
        self.cat_ids = sorted(self.coco.getCatIds())
        self.cat_id_to_label = {cat_id: label for label, cat_id in enumerate(self.cat_ids, start=1)}
        self.label_to_cat_id = {label: cat_id for cat_id, label in self.cat_id_to_label.items()}


@pytest.fixture(scope="module")
def ann_file(tmp_path_factory) -> Path:
    return _write_ground_truth(tmp_path_factory.mktemp("coco") / "instances.json")


@pytest.fixture(scope="module")
def dataset(ann_file) -> StandInDataset:
    return StandInDataset(ann_file)


def ground_truth_as_predictions(dataset, image_ids=None) -> dict[int, dict[str, torch.Tensor]]:
    """Non-crowd ground truth of each image as a perfect model output (score 1, masks [N,1,H,W])."""
    coco = dataset.coco
    predictions = {}
    for image_id in dataset.ids if image_ids is None else image_ids:
        info = coco.imgs[image_id]
        anns = [a for a in coco.imgToAnns[image_id] if not a["iscrowd"]]  # crowds are ignore regions
        xywh = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        masks = np.zeros((len(anns), info["height"], info["width"]), np.uint8)
        for i, ann in enumerate(anns):
            masks[i] = coco.annToMask(ann)
        predictions[image_id] = {
            "boxes": torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], dim=1),
            "labels": torch.tensor([dataset.cat_id_to_label[a["category_id"]] for a in anns]).long(),
            "scores": torch.ones(len(anns)),
            "masks": torch.as_tensor(masks, dtype=torch.float32)[:, None],
        }
    return predictions


def cocoeval_by_hand(coco_gt: COCO, results: list[dict], iou_type: str, image_ids: list[int]) -> np.ndarray:
    """pycocotools used directly, as its README shows; returns the 12 stats."""
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator = COCOeval(coco_gt, coco_gt.loadRes(results), iou_type)
        evaluator.params.imgIds = image_ids
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return evaluator.stats


def as_stats(metrics: dict[str, float]) -> np.ndarray:
    """Our named metrics back in COCOeval's order, nan -> -1 like pycocotools."""
    return np.array([-1.0 if math.isnan(metrics[n]) else metrics[n] for n in STAT_NAMES])


# --------------------------------------------------------------------------------------------
# AP
# --------------------------------------------------------------------------------------------


def test_ground_truth_as_predictions_gives_perfect_scores(dataset):
    metrics = coco_evaluate(dataset, ground_truth_as_predictions(dataset))
    assert set(metrics) == {"bbox", "segm"}
    for iou_type in ("bbox", "segm"):
        assert list(metrics[iou_type]) == list(STAT_NAMES)
        # AR1 is 1 too: maxDets counts detections per image *and class*, and no image holds two
        # non-crowd objects of one class (image 2's second class-1 object is a crowd region).
        for name in STAT_NAMES:
            assert metrics[iou_type][name] == pytest.approx(1.0), (iou_type, name)


def test_metric_without_ground_truth_is_nan(ann_file):
    only_image_1 = StandInDataset(ann_file, ids=[1])  # a small and a medium object, nothing large
    metrics = coco_evaluate(only_image_1, ground_truth_as_predictions(only_image_1))
    for iou_type in ("bbox", "segm"):
        assert math.isnan(metrics[iou_type]["APl"]) and math.isnan(metrics[iou_type]["ARl"])
        assert metrics[iou_type]["AP"] == pytest.approx(1.0) == metrics[iou_type]["APs"]


def test_empty_predictions_score_zero_without_crashing(dataset):
    nothing = coco_evaluate(dataset, {}, iou_types=("bbox", "segm"))
    assert set(nothing) == {"bbox", "segm"}
    for iou_type in ("bbox", "segm"):
        assert all(v == 0.0 for v in nothing[iou_type].values()), nothing[iou_type]
    # Without masks anywhere, the default evaluates boxes only.
    assert set(coco_evaluate(dataset, {})) == {"bbox"}
    # Dicts with zero detections (what a model returns when nothing passes its threshold).
    empty = {
        i: {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64), "scores": torch.zeros(0),
            "masks": torch.zeros(0, 1, 8, 8)}
        for i in dataset.ids
    }
    assert coco_evaluate(dataset, empty) == nothing


def test_images_without_predictions_count_as_misses(dataset):
    predictions = ground_truth_as_predictions(dataset, image_ids=[1])
    metrics = coco_evaluate(dataset, predictions)
    # Non-crowd ground truth per category: 1 -> 3 objects (images 1, 2, 4), 3 -> 2 objects
    # (images 1, 4), 7 -> 1 object (image 2); image 1's perfect predictions find one of class 1
    # and one of class 3, each with precision 1.
    # Recall: (1/3 + 1/2 + 0) / 3 = 5/18.
    # AP over the 101 recall thresholds 0, 0.01, ..., 1: precision is 1 up to recall 1/3
    # (34 thresholds 0..0.33) for class 1, up to 1/2 (51 thresholds) for class 3, so
    # AP = (34/101 + 51/101 + 0) / 3 = 85/303.
    for iou_type in ("bbox", "segm"):
        assert metrics[iou_type]["AR100"] == pytest.approx(5 / 18)
        assert metrics[iou_type]["AP"] == pytest.approx(85 / 303)
    # The same, with the evaluation of image 2 and 4 left to pycocotools itself.
    results = predictions_to_coco_results(dataset, predictions)
    by_hand = cocoeval_by_hand(dataset.coco, results, "bbox", dataset.ids)
    np.testing.assert_allclose(as_stats(metrics["bbox"]), by_hand)


def _noisy_predictions(dataset, seed: int = 0) -> dict[int, dict[str, torch.Tensor]]:
    """Ground truth with jittered boxes, eroded/shifted masks, random scores and false positives."""
    generator = torch.Generator().manual_seed(seed)
    predictions = ground_truth_as_predictions(dataset)
    for image_id, p in predictions.items():
        h, w = dataset.coco.imgs[image_id]["height"], dataset.coco.imgs[image_id]["width"]
        n = len(p["boxes"])
        boxes = p["boxes"] + torch.randn(n, 4, generator=generator) * 3
        masks = torch.roll(p["masks"], shifts=(int(image_id) % 3, 2), dims=(2, 3)) * 0.9
        # False positives: a thin L shape (box area medium, mask area small) and a random box.
        fp_mask = torch.zeros(2, 1, h, w)
        fp_mask[0, 0, 10:50, 10:13] = 0.8
        fp_mask[0, 0, 47:50, 10:50] = 0.8
        fp_mask[1, 0, h // 2 :, w // 2 :] = 0.6
        fp_boxes = torch.tensor([[10.0, 10, 50, 50], [w / 2, h / 2, w, h]])
        predictions[image_id] = {
            "boxes": torch.cat([boxes, fp_boxes]),
            "labels": torch.cat([p["labels"], torch.tensor([1, 2])]),
            "scores": torch.rand(n + 2, generator=generator),
            "masks": torch.cat([masks, fp_mask]),
        }
    return predictions


def test_matches_pycocotools_used_by_hand(dataset):
    predictions = _noisy_predictions(dataset)
    metrics = coco_evaluate(dataset, predictions)
    results = predictions_to_coco_results(dataset, predictions)
    by_hand_bbox = cocoeval_by_hand(dataset.coco, [dict(r) for r in results], "bbox", dataset.ids)
    # For masks pycocotools must get no "bbox", or it uses the box area for small/medium/large.
    mask_only = [{k: v for k, v in r.items() if k != "bbox"} for r in results]
    by_hand_segm = cocoeval_by_hand(dataset.coco, mask_only, "segm", dataset.ids)
    np.testing.assert_allclose(as_stats(metrics["bbox"]), by_hand_bbox)
    np.testing.assert_allclose(as_stats(metrics["segm"]), by_hand_segm)
    assert 0.0 < metrics["bbox"]["AP"] < 1.0 and 0.0 < metrics["segm"]["AP"] < 1.0
    # The thin L false positive is small by mask area: it lowers mask APs (it would not if
    # pycocotools measured it by its 40 x 40 box).
    with_boxes = cocoeval_by_hand(dataset.coco, [dict(r) for r in results], "segm", dataset.ids)
    assert metrics["segm"]["APs"] < with_boxes[3]


def test_mask_scores_rank_the_masks_and_scores_rank_the_boxes(dataset):
    """A model that re-scores its masks (MS R-CNN, YOLACT++): segm by mask_scores, bbox by scores."""
    predictions = _noisy_predictions(dataset)
    generator = torch.Generator().manual_seed(5)
    rescored = {image_id: {**p, "mask_scores": torch.rand(len(p["scores"]), generator=generator)}
                for image_id, p in predictions.items()}
    metrics = coco_evaluate(dataset, rescored)
    # The reference: pycocotools given the mask scores as the scores of the masks.
    as_mask_scores = {image_id: {**p, "scores": p["mask_scores"]} for image_id, p in rescored.items()}
    results = predictions_to_coco_results(dataset, as_mask_scores)
    by_hand_segm = cocoeval_by_hand(dataset.coco, [{k: v for k, v in r.items() if k != "bbox"} for r in results],
                                    "segm", dataset.ids)
    np.testing.assert_allclose(as_stats(metrics["segm"]), by_hand_segm)
    plain = coco_evaluate(dataset, predictions)
    assert metrics["bbox"] == plain["bbox"]  # the boxes keep their own ranking
    assert metrics["segm"]["AP"] != plain["segm"]["AP"]  # and the masks' ranking did change
    bad = {image_id: {**p, "mask_scores": p["scores"][:-1]} for image_id, p in predictions.items()}
    with pytest.raises(ValueError, match=r"image id \d+: \d+ boxes but \d+ mask_scores"):
        coco_evaluate(dataset, bad)


def test_results_encoded_image_by_image_give_the_same_metrics(dataset):
    """What the engine does: encode each image's detections as they come, evaluate at the end."""
    predictions = _noisy_predictions(dataset)
    results = [r for image_id, p in predictions.items() for r in predictions_to_coco_results(dataset, {image_id: p})]
    assert evaluate_coco_results(dataset, results) == coco_evaluate(dataset, predictions)
    with pytest.raises(ValueError, match="no 'segmentation'"):
        evaluate_coco_results(dataset, [{k: v for k, v in r.items() if k != "segmentation"} for r in results])


def test_subset_of_images_is_evaluated_on_its_ids_only(ann_file):
    subset = StandInDataset(ann_file, ids=[2, 3])
    predictions = _noisy_predictions(subset)
    results = predictions_to_coco_results(subset, predictions)
    metrics = coco_evaluate(subset, predictions, iou_types=("bbox",))
    by_hand = cocoeval_by_hand(subset.coco, results, "bbox", [2, 3])
    np.testing.assert_allclose(as_stats(metrics["bbox"]), by_hand)


def test_silent_unless_verbose(dataset, capsys):
    predictions = ground_truth_as_predictions(dataset)
    coco_evaluate(dataset, predictions)
    coco_evaluate(dataset, {})
    assert capsys.readouterr().out == ""
    coco_evaluate(dataset, predictions, verbose=True)
    assert "Average Precision" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------
# Model outputs -> COCO results
# --------------------------------------------------------------------------------------------


def test_results_have_coco_category_ids_xywh_boxes_and_rle_masks(dataset):
    probabilities = torch.rand(3, 1, 120, 160, generator=torch.Generator().manual_seed(1))
    prediction = {
        "boxes": torch.tensor([[1.0, 2.0, 11.0, 22.0], [0.0, 0.0, 160.0, 120.0], [5.5, 6.5, 7.5, 9.0]]),
        "labels": torch.tensor([1, 3, 4]),
        "scores": torch.tensor([0.9, 0.5, 0.25]),
        "masks": probabilities,
    }
    results = predictions_to_coco_results(dataset, {torch.tensor(1): prediction}, mask_threshold=0.7)
    assert [r["image_id"] for r in results] == [1, 1, 1]
    assert [r["category_id"] for r in results] == [1, 7, 9]  # labels 1, 3, 4 -> ids with gaps
    xywh = [[1, 2, 10, 20], [0, 0, 160, 120], [5.5, 6.5, 2, 2.5]]
    np.testing.assert_allclose([r["bbox"] for r in results], xywh)
    np.testing.assert_allclose([r["score"] for r in results], [0.9, 0.5, 0.25], rtol=1e-6)
    decoded = mask_utils.decode([r["segmentation"] for r in results])  # [H, W, N]
    np.testing.assert_array_equal(decoded, (probabilities[:, 0] > 0.7).numpy().transpose(1, 2, 0))
    assert all(isinstance(r["segmentation"]["counts"], str) for r in results)
    json.dumps(results)  # the results format is JSON

    # numpy input, [N, H, W] binary masks and bool masks convert to the same thing.
    binary = probabilities > 0.7
    same = [
        {k: v.numpy() for k, v in {**prediction, "masks": binary[:, 0].to(torch.uint8)}.items()},
        {**prediction, "masks": binary},
    ]
    for variant in same:
        assert predictions_to_coco_results(dataset, {1: variant}) == results


def test_prediction_on_resized_image_is_rescaled(dataset):
    # Image 1 is 120 x 160; the model saw it at 60 x 80.
    small = torch.zeros(1, 1, 60, 80)
    small[0, 0, 2:6, 10:20] = 1.0
    prediction = {
        "boxes": torch.tensor([[10.0, 2.0, 20.0, 6.0]]),
        "labels": torch.tensor([2]),
        "scores": torch.tensor([0.8]),
    }
    (result,) = predictions_to_coco_results(dataset, {1: {**prediction, "masks": small}})
    assert result["bbox"] == [20.0, 4.0, 20.0, 8.0]
    # Bilinear upsampling by 2 (align_corners=False) of a 0/1 block, thresholded at 0.5, is the
    # block doubled: output row y samples input row y/2 - 1/4, so rows 4..11 come from rows 2..5
    # with weight >= 0.75 and rows 3 and 12 get 0.25.
    expected = np.zeros((120, 160), np.uint8)
    expected[4:12, 20:40] = 1
    np.testing.assert_array_equal(mask_utils.decode(result["segmentation"]), expected)

    # Boxes only: the frame comes from BoundingBoxes' canvas_size or an explicit image_size.
    boxes = tv_tensors.BoundingBoxes(prediction["boxes"], format="XYXY", canvas_size=(60, 80))
    (from_canvas,) = predictions_to_coco_results(dataset, {1: {**prediction, "boxes": boxes}})
    (from_size,) = predictions_to_coco_results(dataset, {1: {**prediction, "image_size": (30, 40)}})
    (full_size,) = predictions_to_coco_results(dataset, {1: prediction})
    assert from_canvas["bbox"] == [20.0, 4.0, 20.0, 8.0]
    assert from_size["bbox"] == [40.0, 8.0, 40.0, 16.0]
    assert full_size["bbox"] == [10.0, 2.0, 10.0, 4.0]


def test_resized_ground_truth_still_scores_perfect_boxes(dataset):
    # Halve every prediction (boxes and masks, as a model working at half size would output).
    predictions = ground_truth_as_predictions(dataset)
    for p in predictions.values():
        p["boxes"] = p["boxes"] / 2
        p["masks"] = torch.nn.functional.interpolate(p["masks"], scale_factor=0.5, mode="bilinear")
    metrics = coco_evaluate(dataset, predictions)
    assert metrics["bbox"]["AP"] == pytest.approx(1.0)
    assert metrics["segm"]["AP50"] == pytest.approx(1.0)  # masks lose detail at half size, but overlap well


def _pycocotools_rles(binary: torch.Tensor) -> list[dict]:
    """``[N,H,W]`` 0/1 masks encoded by pycocotools directly, all at once, ``counts`` as str."""
    rles = mask_utils.encode(np.asfortranarray(binary.numpy().astype(np.uint8).transpose(1, 2, 0)))
    return [{"size": rle["size"], "counts": rle["counts"].decode("ascii")} for rle in rles]


def test_rle_masks_give_the_results_and_metrics_of_probability_masks(dataset):
    """What models return inside ``rle_masks``: already binary, evaluated like the probabilities > 0.5."""
    predictions = _noisy_predictions(dataset)
    as_rles = {image_id: {**p, "masks": _pycocotools_rles(p["masks"][:, 0] > 0.5)}
               for image_id, p in predictions.items()}
    assert predictions_to_coco_results(dataset, as_rles) == predictions_to_coco_results(dataset, predictions)
    metrics, reference = coco_evaluate(dataset, as_rles), coco_evaluate(dataset, predictions)
    for iou_type in ("bbox", "segm"):
        np.testing.assert_equal(metrics[iou_type], reference[iou_type])
    assert 0.1 < metrics["segm"]["AP"] < 0.9
    bytes_counts = {1: {**as_rles[1], "masks": [{**r, "counts": r["counts"].encode()} for r in as_rles[1]["masks"]]}}
    assert predictions_to_coco_results(dataset, bytes_counts) == predictions_to_coco_results(dataset, {1: as_rles[1]})


def test_masks_are_encoded_a_chunk_at_a_time_as_pycocotools_encodes_them_at_once(dataset, monkeypatch):
    from minis.ops import masks as mask_ops

    monkeypatch.setattr(mask_ops, "CHUNK_BYTES", 120 * 160 * 4 * 2)  # two masks per chunk at image 1's size
    probabilities = torch.rand(5, 1, 120, 160, generator=torch.Generator().manual_seed(2))
    one = {"boxes": torch.tensor([[0.0, 0, 5, 5]] * 5), "labels": torch.ones(5, dtype=torch.int64),
           "scores": torch.ones(5)}
    results = predictions_to_coco_results(dataset, {1: {**one, "masks": probabilities}})
    assert [r["segmentation"] for r in results] == _pycocotools_rles(probabilities[:, 0] > 0.5)
    # predicted at half size: each chunk resized, then thresholded
    half = probabilities[:, :, ::2, ::2].contiguous()
    resized = torch.nn.functional.interpolate(half, size=(120, 160), mode="bilinear", align_corners=False)
    results = predictions_to_coco_results(dataset, {1: {**one, "masks": half}})
    assert [r["segmentation"] for r in results] == _pycocotools_rles(resized[:, 0] > 0.5)


def test_bad_rle_masks_raise_naming_the_image(dataset):
    one = {"boxes": torch.tensor([[0.0, 0, 5, 5]]), "labels": torch.tensor([1]), "scores": torch.ones(1)}
    rle = _pycocotools_rles(torch.ones(1, 100, 130))
    with pytest.raises(ValueError, match=r"image id 1: an RLE mask of size \[100, 130\] for an image of size \[120, 160\]"):
        predictions_to_coco_results(dataset, {1: {**one, "masks": rle}})
    with pytest.raises(ValueError, match="image id 2: 1 boxes but 2 RLE masks"):
        predictions_to_coco_results(dataset, {2: {**one, "masks": rle * 2}})
    assert predictions_to_coco_results(dataset, {2: {**one, "masks": rle}})[0]["segmentation"] == rle[0]


def test_bad_predictions_raise_naming_the_image(dataset):
    one = {"boxes": torch.tensor([[0.0, 0, 5, 5]]), "labels": torch.tensor([1]), "scores": torch.ones(1)}
    with pytest.raises(ValueError, match="image id 99"):
        predictions_to_coco_results(dataset, {99: one})
    for label in (0, 5, -1):  # K = 4 classes: labels 1..4
        with pytest.raises(ValueError, match=f"image id 4: predicted label {label}"):
            predictions_to_coco_results(dataset, {4: {**one, "labels": torch.tensor([label])}})
    with pytest.raises(ValueError, match="image id 2.*2 scores"):
        predictions_to_coco_results(dataset, {2: {**one, "scores": torch.tensor([1.0, 0.5])}})
    with pytest.raises(ValueError, match="image id 2.*masks"):
        predictions_to_coco_results(dataset, {2: {**one, "masks": torch.zeros(2, 1, 100, 130)}})
    with pytest.raises(ValueError, match="image id 2.*masks"):
        predictions_to_coco_results(dataset, {2: {**one, "masks": torch.zeros(1, 3, 100, 130)}})
    with pytest.raises(ValueError, match="image id 2: boxes must be"):
        predictions_to_coco_results(dataset, {2: {**one, "boxes": torch.zeros(1, 5)}})
    with pytest.raises(ValueError, match="'segm'.*image ids \\[3\\]"):
        coco_evaluate(dataset, {3: one}, iou_types=("bbox", "segm"))
    with pytest.raises(ValueError, match="unknown iou_types"):
        coco_evaluate(dataset, {}, iou_types=("keypoints",))


# --------------------------------------------------------------------------------------------
# Real COCO annotations (../shared/data, skipped when absent)
# --------------------------------------------------------------------------------------------


def _coco_tiny_val() -> Path:
    ann_file = SHARED_DATA / "coco-tiny" / "annotations" / "instances_val2017.json"
    if not ann_file.exists():
        pytest.skip(f"real data not found at {ann_file}")
    return ann_file


@pytest.mark.realdata
def test_coco_tiny_val_ground_truth_scores_one():
    # Real COCO: 80 categories with id gaps, crowd regions as uncompressed RLE, images without
    # annotations, multi-part polygons, objects under 10 px^2.
    dataset = StandInDataset(_coco_tiny_val())
    metrics = coco_evaluate(dataset, ground_truth_as_predictions(dataset))
    for iou_type in ("bbox", "segm"):
        for name in ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR100"):
            assert metrics[iou_type][name] == pytest.approx(1.0), (iou_type, name, metrics[iou_type])


@pytest.mark.realdata
def test_coco_tiny_val_through_coco_instances_scores_one():
    ann_file = _coco_tiny_val()
    coco_module = pytest.importorskip("minis.data.coco")
    dataset = coco_module.CocoInstances(ann_file.parents[1] / "val2017", ann_file)
    predictions = {}
    for image, target in dataset:  # the dataset's own targets, as a perfect model would output
        keep = target["iscrowd"] == 0
        predictions[target["image_id"]] = {
            "boxes": target["boxes"][keep],
            "labels": target["labels"][keep],
            "scores": torch.ones(int(keep.sum())),
            "masks": target["masks"][keep][:, None].float(),
        }
    metrics = coco_evaluate(dataset, predictions)
    for iou_type in ("bbox", "segm"):
        assert metrics[iou_type]["AP"] == pytest.approx(1.0), (iou_type, metrics[iou_type])
