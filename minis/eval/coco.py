"""COCO box and mask AP through pycocotools, the reference implementation everyone reports.

Two steps, each usable on its own:

1. :func:`predictions_to_coco_results` turns model outputs (torchvision's per-image dicts:
   ``boxes`` xyxy, contiguous ``labels`` 1..K, ``scores``, optional ``masks``) into COCO's
   *results format*: one dict per detection with ``image_id``, ``category_id`` (the dataset's
   own, possibly gappy, COCO ids), ``bbox`` as ``[x, y, w, h]``, ``score`` and, with masks, a
   compressed RLE ``segmentation``. That list can be written with ``json.dump`` and uploaded
   to the COCO evaluation server as is.
2. :func:`coco_evaluate` feeds those results to ``pycocotools.cocoeval.COCOeval`` and returns
   the twelve summary numbers (AP, AP50, ..., ARl) for ``bbox`` and ``segm``.

The ``dataset`` argument only needs three attributes (the :class:`minis.data.CocoInstances`
convention): ``coco`` (a ``pycocotools.coco.COCO`` of the ground truth), ``ids`` (the image
ids that make up the dataset) and ``label_to_cat_id`` (contiguous label -> COCO category id).
"""

from __future__ import annotations

import contextlib
import copy
import io
import math
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from minis.ops.masks import chunk_slices, encode_rle

# Order of COCOeval.stats after summarize() for boxes and masks.
STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
IOU_TYPES = ("bbox", "segm")


# --------------------------------------------------------------------------------------------
# Model outputs -> COCO results
# --------------------------------------------------------------------------------------------


def _as_tensor(value: Any) -> torch.Tensor:
    """A torch tensor view of ``value`` (tensor, numpy array or nested list), device kept."""
    if isinstance(value, torch.Tensor):
        return value.as_subclass(torch.Tensor)  # drop tv_tensors wrappers, keep the data
    return torch.as_tensor(np.asarray(value))


def _prediction_frame(prediction: Mapping[str, Any], image_hw: tuple[int, int]) -> tuple[int, int]:
    """Height and width of the image the model predicted on.

    In order of preference: an explicit ``prediction["image_size"]`` ``(h, w)``, the size of the
    predicted masks, the ``canvas_size`` of ``tv_tensors.BoundingBoxes``; otherwise the
    original image size (the model predicted at full resolution).
    """
    if "image_size" in prediction:
        h, w = (int(v) for v in prediction["image_size"])
        return h, w
    if "masks" in prediction and _is_rle_list(prediction["masks"]):
        if len(prediction["masks"]):
            h, w = prediction["masks"][0]["size"]
            return int(h), int(w)
    elif "masks" in prediction:
        h, w = np.shape(prediction["masks"])[-2:]
        return int(h), int(w)
    canvas_size = getattr(prediction.get("boxes"), "canvas_size", None)
    if canvas_size is not None:
        return int(canvas_size[0]), int(canvas_size[1])
    return image_hw


def _category_table(label_to_cat_id: Mapping[int, int]) -> torch.Tensor:
    """Lookup table [max_label + 1]: contiguous label -> COCO category id, -1 for no category."""
    table = torch.full((max(label_to_cat_id) + 1,), -1, dtype=torch.int64)
    table[torch.tensor(list(label_to_cat_id.keys()))] = torch.tensor(list(label_to_cat_id.values()))
    return table


def _coco_category_ids(labels: torch.Tensor, table: torch.Tensor, image_id: int) -> list[int]:
    """Map contiguous labels [N] to COCO category ids with one table lookup (no loop per box)."""
    labels = labels.to("cpu", torch.int64)
    inside = (labels >= 0) & (labels < len(table))
    known = inside.clone()
    known[inside] = table[labels[inside]] >= 0
    if not bool(known.all()):
        bad = int(labels[~known][0])
        valid = torch.nonzero(table >= 0).flatten().tolist()
        raise ValueError(
            f"image id {image_id}: predicted label {bad} has no COCO category; labels must be in "
            f"{valid} (contiguous 1..K; 0 is the background and is never predicted)"
        )
    return table[labels].tolist()


def _is_rle_list(masks: Any) -> bool:
    """Whether ``masks`` is a list of COCO RLEs (what models return inside ``minis.ops.masks.rle_masks``)."""
    return isinstance(masks, (list, tuple)) and all(isinstance(m, Mapping) for m in masks)


def _encode_masks(masks: torch.Tensor, image_hw: tuple[int, int], threshold: float) -> list[dict]:
    """Threshold masks [N,H',W'] (probabilities or 0/1) at the original size and RLE-encode them.

    Masks predicted on a resized image are resized to ``image_hw`` *before* thresholding, with
    bilinear interpolation of the probabilities: thresholding first and resizing a binary mask
    would give blocky edges. A chunk of masks at a time (:func:`minis.ops.masks.chunk_slices`), so
    that the resized float copies and binary masks of a large image never exist all at once.
    """
    if masks.dtype == torch.bool:
        masks = masks.to(torch.uint8)
    rles: list[dict] = []
    for part in chunk_slices(len(masks), *image_hw):
        chunk = masks[part]
        if tuple(chunk.shape[-2:]) != tuple(image_hw):
            chunk = F.interpolate(chunk[:, None].float(), size=image_hw, mode="bilinear", align_corners=False)[:, 0]
        rles += encode_rle(chunk > threshold)  # counts as str, so the results are JSON-able
    return rles


def _checked_rles(rles: Sequence[Mapping], image_hw: tuple[int, int], image_id: int) -> list[dict]:
    """RLE masks given by the model, checked to be at the image's size; ``counts`` as ``str``."""
    checked = []
    for rle in rles:
        if tuple(int(v) for v in rle["size"]) != tuple(image_hw):
            raise ValueError(
                f"image id {image_id}: an RLE mask of size {list(rle['size'])} for an image of size "
                f"{list(image_hw)}; RLE masks must be at the original image size"
            )
        counts = rle["counts"]
        checked.append({"size": [int(v) for v in rle["size"]],
                        "counts": counts.decode("ascii") if isinstance(counts, bytes) else counts})
    return checked


def _image_results(
    image_id: int,
    prediction: Mapping[str, Any],
    image_hw: tuple[int, int],
    category_table: torch.Tensor,
    mask_threshold: float,
) -> list[dict]:
    """COCO results for the detections of one image (see :func:`predictions_to_coco_results`)."""
    for field in ("boxes", "labels", "scores"):
        if field not in prediction:
            raise ValueError(f"image id {image_id}: prediction has no {field!r} (keys: {sorted(prediction)})")
    boxes = _as_tensor(prediction["boxes"]).to("cpu", torch.float64)
    scores = _as_tensor(prediction["scores"]).to("cpu", torch.float64).reshape(-1)
    labels = _as_tensor(prediction["labels"]).reshape(-1)
    if boxes.numel() == 0:
        boxes = boxes.reshape(0, 4)
    if boxes.dim() != 2 or boxes.shape[1] != 4:
        raise ValueError(
            f"image id {image_id}: boxes must be [N, 4] (x1, y1, x2, y2), got shape {tuple(boxes.shape)}"
        )
    n = len(boxes)
    if len(scores) != n or len(labels) != n:
        raise ValueError(
            f"image id {image_id}: {n} boxes but {len(scores)} scores and {len(labels)} labels"
        )
    if n == 0:
        return []
    category_ids = _coco_category_ids(labels, category_table, image_id)

    # Undo a plain resize: boxes predicted in an (h', w') frame are stretched to (H, W).
    frame_h, frame_w = _prediction_frame(prediction, image_hw)
    if (frame_h, frame_w) != tuple(image_hw):
        scale = torch.tensor([image_hw[1] / frame_w, image_hw[0] / frame_h] * 2, dtype=torch.float64)
        boxes = boxes * scale
    xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1)

    results = [
        {"image_id": image_id, "category_id": c, "bbox": b, "score": s}
        for c, b, s in zip(category_ids, xywh.tolist(), scores.tolist())
    ]
    if "mask_scores" in prediction:  # a model that re-scores its masks (MS R-CNN, YOLACT++)
        mask_scores = _as_tensor(prediction["mask_scores"]).to("cpu", torch.float64).reshape(-1)
        if len(mask_scores) != n:
            raise ValueError(f"image id {image_id}: {n} boxes but {len(mask_scores)} mask_scores")
        for result, mask_score in zip(results, mask_scores.tolist()):
            result["mask_score"] = mask_score
    if "masks" in prediction and _is_rle_list(prediction["masks"]):
        if len(prediction["masks"]) != n:
            raise ValueError(f"image id {image_id}: {n} boxes but {len(prediction['masks'])} RLE masks")
        for result, rle in zip(results, _checked_rles(prediction["masks"], image_hw, image_id)):
            result["segmentation"] = rle
    elif "masks" in prediction:
        masks = _as_tensor(prediction["masks"])
        if masks.dim() == 4 and masks.shape[1] == 1:  # [N, 1, H, W] like torchvision -> [N, H, W]
            masks = masks[:, 0]
        if masks.dim() != 3 or len(masks) != n:
            raise ValueError(
                f"image id {image_id}: masks must be [N,1,H,W] or [N,H,W] with N={n}, "
                f"got shape {tuple(masks.shape)}"
            )
        for result, rle in zip(results, _encode_masks(masks, image_hw, mask_threshold)):
            result["segmentation"] = rle
    return results


def predictions_to_coco_results(
    dataset: Any, predictions: Mapping[Any, Mapping[str, Any]], mask_threshold: float = 0.5
) -> list[dict]:
    """Convert model outputs to COCO's results format (one dict per detection).

    Args:
        dataset: has ``coco`` (ground-truth ``COCO``), ``ids`` and ``label_to_cat_id``.
        predictions: image id -> the model's output for that image: ``boxes`` [N,4] xyxy in
            pixels, ``labels`` [N] contiguous 1..K, ``scores`` [N] and optionally ``masks``
            [N,1,H,W] or [N,H,W] (probabilities, or 0/1 / bool) or a list of N COCO RLEs at the
            image's original size (already binary, so ``mask_threshold`` does not apply: what
            models return inside :func:`minis.ops.masks.rle_masks`), and ``mask_scores`` [N]
            (a model that re-scores its masks: they rank the masks for ``segm``, while
            ``scores`` rank the boxes). Tensors on any device, numpy
            arrays or lists. Image ids may be ints or one-element tensors.
        mask_threshold: a pixel belongs to a mask when its probability is ``> mask_threshold``.

    Returns:
        ``[{"image_id", "category_id", "bbox": [x, y, w, h], "score", "segmentation"?, "mask_score"?}, ...]``
        with COCO category ids (``dataset.label_to_cat_id``) and RLE ``segmentation`` whose
        ``counts`` is a ``str`` (JSON-serialisable).

    Predictions on a resized image: when the prediction's frame differs from the image's
    ``height``/``width`` in ``dataset.coco.imgs``, masks are resized to the original size
    (bilinear on the probabilities, then thresholded) and boxes are scaled by the two size
    ratios. The frame is ``prediction["image_size"]`` ``(h, w)`` if given, else the masks'
    size, else the ``canvas_size`` of ``tv_tensors.BoundingBoxes``; a prediction with none of
    these is taken to be at the original size. Only a plain resize is undone: predictions on
    a padded or cropped image must be cropped back to the resized image first.

    Raises:
        ValueError: an image id that is not in ``dataset.ids``, a label outside 1..K, or
            fields whose lengths disagree (the message names the image id).
    """
    known_ids = set(int(i) for i in dataset.ids)
    category_table = _category_table(dataset.label_to_cat_id)
    results: list[dict] = []
    for key, prediction in predictions.items():
        image_id = int(key)
        if image_id not in known_ids:
            raise ValueError(f"prediction for image id {image_id}, which is not in the dataset's ids")
        info = dataset.coco.imgs[image_id]
        image_hw = (int(info["height"]), int(info["width"]))
        results += _image_results(image_id, prediction, image_hw, category_table, mask_threshold)
    return results


# --------------------------------------------------------------------------------------------
# COCO results -> AP
# --------------------------------------------------------------------------------------------


def _load_results(coco_gt: COCO, results: list[dict]) -> COCO:
    """``coco_gt.loadRes(results)`` that also works for an empty list (loadRes crashes on it).

    With no detections we build the results object by hand: the same images and categories and
    no annotations. COCOeval then scores 0 wherever there is ground truth, as it should.
    """
    if results:
        # loadRes writes "id", "area", ... into the dicts it gets: give it copies.
        return coco_gt.loadRes([dict(r) for r in results])
    empty = COCO()
    empty.dataset = {
        "images": list(coco_gt.dataset["images"]),
        "categories": copy.deepcopy(coco_gt.dataset["categories"]),
        "annotations": [],
    }
    empty.createIndex()
    return empty


def _run_cocoeval(
    coco_gt: COCO, results: list[dict], iou_type: str, image_ids: list[int]
) -> dict[str, float]:
    """Evaluate, accumulate and summarise one IoU type; returns the 12 named stats."""
    coco_dt = _load_results(coco_gt, results)
    evaluator = COCOeval(coco_gt, coco_dt, iouType=iou_type)
    evaluator.params.imgIds = image_ids
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    # pycocotools writes -1 when no ground truth falls in a size range: the metric is undefined,
    # so it becomes nan (a -1 would silently drag down any average it ends up in).
    return {name: (float(v) if v >= 0 else math.nan) for name, v in zip(STAT_NAMES, evaluator.stats)}


def _num_detections(prediction: Mapping[str, Any]) -> int:
    """How many detections a prediction dict holds (the length of its ``scores``)."""
    return int(np.prod(np.shape(prediction.get("scores", []))))


def _images_with_unmasked_detections(predictions: Mapping[Any, Mapping[str, Any]]) -> list[int]:
    """Ids of images that predict at least one detection but carry no ``masks``."""
    return [
        int(key)
        for key, prediction in predictions.items()
        if "masks" not in prediction and _num_detections(prediction) > 0
    ]


def coco_evaluate(
    dataset: Any,
    predictions: Mapping[Any, Mapping[str, Any]],
    iou_types: Sequence[str] | None = None,
    verbose: bool = False,
    mask_threshold: float = 0.5,
) -> dict[str, dict[str, float]]:
    """COCO AP/AR of ``predictions`` on ``dataset``, computed by pycocotools.

    Args:
        dataset: has ``coco``, ``ids`` and ``label_to_cat_id`` (see the module docstring).
        predictions: image id -> model output dict, as for :func:`predictions_to_coco_results`.
        iou_types: any of ``"bbox"``, ``"segm"``. ``None`` (default) means ``bbox`` and, when
            any prediction has ``masks``, ``segm``. Asking for ``"segm"`` explicitly when some
            image has detections without masks is a ``ValueError``.
        verbose: print pycocotools' usual output (it is silenced otherwise).
        mask_threshold: probability above which a mask pixel is foreground.

    Returns:
        ``{"bbox": {"AP": ..., "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100",
        "ARs", "ARm", "ARl"}, "segm": {...}}`` as fractions in 0..1 (not percent). A metric
        with no ground truth at all (e.g. ``APl`` when the dataset has no large object) is
        ``nan`` where pycocotools would print -1.

    Every image of ``dataset.ids`` is evaluated, so an image missing from ``predictions``
    counts as one where the model found nothing (its objects are misses), and empty
    ``predictions`` give 0 for every metric that has ground truth. Crowd annotations are
    ignore regions, as in COCO: detections on them are neither rewarded nor penalised.

    For ``segm`` the results are given to pycocotools *without* their boxes, so that the
    small/medium/large split of detections uses the mask area rather than the box area
    (with a box, pycocotools takes the box area; Detectron2 drops the box for the same reason).
    """
    if iou_types is None:
        has_masks = any("masks" in p for p in predictions.values())
        iou_types = ("bbox", "segm") if has_masks else ("bbox",)
    unknown = [t for t in iou_types if t not in IOU_TYPES]
    if unknown:
        raise ValueError(f"unknown iou_types {unknown}; choose from {IOU_TYPES}")
    if "segm" in iou_types:
        unmasked = _images_with_unmasked_detections(predictions)
        if unmasked:
            raise ValueError(
                f"iou_types asks for 'segm' but the predictions for image ids {unmasked[:5]} have "
                "detections without 'masks'; evaluate with iou_types=('bbox',)"
            )

    results = predictions_to_coco_results(dataset, predictions, mask_threshold)
    return evaluate_coco_results(dataset, results, iou_types, verbose=verbose)


def _result_for(result: Mapping[str, Any], iou_type: str) -> dict:
    """One result as pycocotools should see it for ``iou_type``.

    ``bbox``: without the mask, ranked by ``score``. ``segm``: without the box (see
    :func:`coco_evaluate`) and ranked by ``mask_score`` when the model gave one.
    """
    dropped = ("segmentation", "mask_score") if iou_type == "bbox" else ("bbox", "mask_score")
    typed = {k: v for k, v in result.items() if k not in dropped}
    if iou_type == "segm" and "mask_score" in result:
        typed["score"] = result["mask_score"]
    return typed


def evaluate_coco_results(
    dataset: Any,
    results: Sequence[Mapping[str, Any]],
    iou_types: Sequence[str] = ("bbox", "segm"),
    verbose: bool = False,
) -> dict[str, dict[str, float]]:
    """The pycocotools half of :func:`coco_evaluate`, on results already in COCO's format.

    ``results`` is what :func:`predictions_to_coco_results` returns (``image_id``,
    ``category_id``, ``bbox`` xywh, ``score`` and, for ``segm``, an RLE ``segmentation``).
    Encoding each batch as it is predicted and evaluating at the end keeps the memory of a
    whole COCO validation run small (an RLE is a short string; a mask is ``H x W`` bytes), and
    the lists from several processes are simply concatenated. Same return value as
    :func:`coco_evaluate`.
    """
    unknown = [t for t in iou_types if t not in IOU_TYPES]
    if unknown:
        raise ValueError(f"unknown iou_types {unknown}; choose from {IOU_TYPES}")
    if "segm" in iou_types:
        unmasked = sorted({int(r["image_id"]) for r in results if "segmentation" not in r})
        if unmasked:
            raise ValueError(
                f"iou_types asks for 'segm' but the results for image ids {unmasked[:5]} have no "
                "'segmentation'; evaluate with iou_types=('bbox',)"
            )
    image_ids = [int(i) for i in dataset.ids]
    metrics: dict[str, dict[str, float]] = {}
    output = contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())
    with output:
        for iou_type in iou_types:
            typed = [_result_for(r, iou_type) for r in results]
            if verbose:
                print(f"--- {iou_type} ---")
            metrics[iou_type] = _run_cocoeval(dataset.coco, typed, iou_type, image_ids)
    return metrics
