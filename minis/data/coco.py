"""COCO instance segmentation files as PyTorch datasets.

:class:`CocoInstances` reads any COCO ``instances_*.json`` (the official files, the output of
:func:`minis.data.labelme_to_coco`, the synthetic *shapes* benchmark) and returns targets in
torchvision's detection format. :class:`CocoSemantic` paints the same annotations into one
label map per image for semantic segmentation.

Masks are decoded by pycocotools exactly as ``COCO.annToMask`` does, so what a model is
trained on is what the COCO evaluator compares against.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import warnings
from collections import defaultdict
from pathlib import Path
from typing import IO, Any, Callable

import numpy as np
import torch
from PIL import ExifTags, Image, ImageOps
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from torch.utils.data import Dataset
from torchvision import tv_tensors

IGNORE_INDEX = 255
"""Semantic label of pixels that the loss and the metrics skip (COCO crowd regions)."""

# EXIF orientations 5..8 rotate by 90 or 270 degrees (possibly mirrored): width and height swap.
_SWAPPING_ORIENTATIONS = {5, 6, 7, 8}


# --------------------------------------------------------------------------------------------
# Reading images
# --------------------------------------------------------------------------------------------


def read_rgb_image(path: str | os.PathLike) -> Image.Image:
    """Open an image file as an upright 8-bit RGB PIL image.

    The EXIF orientation tag is applied (phone photos store pixels sideways and say so in
    EXIF), then any mode (grayscale, RGBA, CMYK, palette) is converted to RGB. Alpha is
    dropped, not blended: the colour under a transparent pixel is kept.
    """
    with Image.open(path) as image:
        image = ImageOps.exif_transpose(image)
        if image.mode == "P" and "transparency" in image.info:
            # Going through RGBA tells PIL how to read the palette's transparency entry.
            image = image.convert("RGBA")
        return image.convert("RGB")


def oriented_size(path: str | os.PathLike | IO[bytes]) -> tuple[int, int]:
    """``(width, height)`` of an image as :func:`read_rgb_image` returns it, reading only the header."""
    with Image.open(path) as image:
        width, height = image.size
        orientation = image.getexif().get(ExifTags.Base.Orientation, 1)
    if orientation in _SWAPPING_ORIENTATIONS:
        return height, width
    return width, height


def pil_to_image_tensor(image: Image.Image) -> tv_tensors.Image:
    """RGB PIL image -> ``tv_tensors.Image`` float32 ``[3, H, W]`` in 0..1."""
    array = np.asarray(image, dtype=np.uint8)  # [H, W, 3]
    pixels = torch.from_numpy(array.copy()).permute(2, 0, 1)
    return tv_tensors.Image(pixels.to(torch.float32).div_(255.0))


# --------------------------------------------------------------------------------------------
# Reading and checking the annotation file
# --------------------------------------------------------------------------------------------


def read_json(path: str | os.PathLike) -> Any:
    """Read a json file, turning a syntax error into a ValueError that names the file, line and column."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as error:
        raise ValueError(
            f"{path}: not valid JSON (line {error.lineno}, column {error.colno}: {error.msg})"
        ) from error


def load_coco_json(ann_file: str | os.PathLike) -> dict[str, Any]:
    """Read a COCO json file and check that it has the top-level lists a COCO file must have."""
    ann_file = Path(ann_file)
    data = read_json(ann_file)
    if not isinstance(data, dict):
        raise ValueError(f"{ann_file}: a COCO file holds a JSON object, found {type(data).__name__}")
    for key in ("images", "categories"):
        if not isinstance(data.get(key), list):
            raise ValueError(f"{ann_file}: field {key!r} is missing or is not a list")
    # Image-info files (the COCO test sets) have no annotations: that is a valid, empty dataset.
    data.setdefault("annotations", [])
    return data


def _coco_from_dict(data: dict[str, Any]) -> COCO:
    """A pycocotools COCO index over ``data`` (without its 'creating index...' prints)."""
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def _check_images(data: dict[str, Any], ann_file: Path) -> None:
    """Every image entry has the fields the dataset needs, and ids are unique."""
    seen: set[int] = set()
    for index, info in enumerate(data["images"]):
        for field in ("id", "file_name", "height", "width"):
            if field not in info:
                raise ValueError(
                    f"{ann_file}: images[{index}] (id {info.get('id')}) has no field {field!r}"
                )
        if info["id"] in seen:
            raise ValueError(f"{ann_file}: image id {info['id']} appears twice in 'images'")
        seen.add(info["id"])


def _check_annotations(data: dict[str, Any], ann_file: Path) -> None:
    """Raise a ValueError naming file, annotation id, image id and field on a broken annotation.

    Broken: a required field missing, an ``image_id`` or ``category_id`` that names nothing, a
    ``bbox`` that is not 4 numbers, a ``segmentation`` that is neither polygons nor an RLE of the
    image's size.
    """
    for index, category in enumerate(data["categories"]):
        if "id" not in category or "name" not in category:
            raise ValueError(f"{ann_file}: categories[{index}] needs both 'id' and 'name', got {category!r}")
    images = {info["id"]: info for info in data["images"]}
    category_ids = {category["id"] for category in data["categories"]}
    for ann in data["annotations"]:
        where = f"{ann_file}: annotation id {ann.get('id')} (image id {ann.get('image_id')})"
        for field in ("id", "image_id", "category_id", "bbox", "segmentation"):
            if field not in ann:
                raise ValueError(f"{where}: field {field!r} is missing")
        if ann["image_id"] not in images:
            raise ValueError(f"{where}: field 'image_id' names an image that is not in 'images'")
        if ann["category_id"] not in category_ids:
            raise ValueError(
                f"{where}: field 'category_id' = {ann['category_id']} is not in 'categories' "
                f"(known ids: {sorted(category_ids)})"
            )
        bbox = ann["bbox"]
        if not (isinstance(bbox, list) and len(bbox) == 4):
            raise ValueError(f"{where}: field 'bbox' must be [x, y, width, height], got {bbox!r}")

        segmentation = ann["segmentation"]
        info = images[ann["image_id"]]
        if isinstance(segmentation, dict):
            if "counts" not in segmentation or "size" not in segmentation:
                raise ValueError(f"{where}: field 'segmentation' is an RLE without 'counts' and 'size'")
            if list(segmentation["size"]) != [info["height"], info["width"]]:
                raise ValueError(
                    f"{where}: field 'segmentation.size' = {segmentation['size']} is not the image's "
                    f"[height, width] = {[info['height'], info['width']]}"
                )
        elif not isinstance(segmentation, list):
            raise ValueError(f"{where}: field 'segmentation' must be polygons (a list) or an RLE (a dict)")


def _polygon_parts_are_valid(parts: list) -> list[bool]:
    """For each polygon part: does it have an even number (>= 6) of coordinates, i.e. >= 3 points?"""
    return [isinstance(part, list) and len(part) >= 6 and len(part) % 2 == 0 for part in parts]


def _clipped_xyxy(bbox: list[float], width: int, height: int) -> tuple[float, float, float, float]:
    """COCO ``[x, y, w, h]`` -> ``(x1, y1, x2, y2)`` clipped to the image."""
    x, y, w, h = (float(v) for v in bbox)
    return (
        min(max(x, 0.0), width),
        min(max(y, 0.0), height),
        min(max(x + w, 0.0), width),
        min(max(y + h, 0.0), height),
    )


# --------------------------------------------------------------------------------------------
# The datasets
# --------------------------------------------------------------------------------------------


class CocoInstances(Dataset):
    """A COCO instance segmentation file as a dataset of ``(image, target)`` pairs.

    Args:
        image_dir: folder that the images' ``file_name`` entries are relative to.
        ann_file: the COCO json (``instances_val2017.json`` or any file in that format).
        transforms: optional joint transform ``(image, target) -> (image, target)``, e.g.
            :func:`minis.data.transforms.train_transforms`.

    Item ``i`` (image id ``dataset.ids[i]``):

    - ``image``: ``tv_tensors.Image`` float32 ``[3, H, W]`` in 0..1, RGB, EXIF orientation applied;
    - ``target``: ``boxes`` (``tv_tensors.BoundingBoxes`` XYXY float32 ``[N, 4]``, from each
      annotation's ``bbox``, clipped to the image), ``labels`` (int64 ``[N]``, 1..K),
      ``masks`` (``tv_tensors.Mask`` uint8 ``[N, H, W]``, equal to ``COCO.annToMask``),
      ``iscrowd`` (int64 ``[N]``), ``area`` (float32 ``[N]``, the annotation's COCO area) and
      ``image_id`` (int). Images without annotations are items with ``N = 0``.

    Crowd regions are kept with ``iscrowd = 1``: models ignore them when assigning targets and
    the COCO evaluator ignores detections inside them.

    Labels: the K categories in ``categories``, sorted by COCO id, become labels 1..K (0 is the
    background), so COCO's gaps (ids 1..90 for 80 classes) disappear. ``cat_id_to_label`` and
    ``label_to_cat_id`` convert both ways; ``class_names[label]`` is the name
    (``class_names[0] == "background"``) and ``num_classes == K + 1``.

    Bad input:

    - a file that is not valid JSON: ``ValueError`` naming the file, line and column;
    - an annotation whose ``category_id`` is not in ``categories``, or whose ``image_id`` is not
      in ``images``, or that lacks a required field (``id``, ``image_id``, ``category_id``,
      ``bbox``, ``segmentation``), or whose RLE ``size`` is not the image's: ``ValueError`` at
      construction naming the file, annotation id, image id and field;
    - polygon parts with fewer than 3 points (or an odd number of coordinates) are dropped with
      a warning; an annotation left without any part, or whose box is empty (``w <= 0`` or
      ``h <= 0``, or outside the image) is skipped with a warning naming the file, annotation id
      and image id. This is COCO practice (detectron2 and torchvision's reference scripts drop
      them too): one broken annotation should not cost the whole dataset;
    - an image file that does not exist: ``FileNotFoundError`` from ``dataset[i]`` naming the
      file and image id. :meth:`check` scans every image up front.
    - an image whose size (after EXIF orientation) is not the ``width``/``height`` in the json:
      ``ValueError`` naming the file and image id. COCO annotations are coordinates in the frame
      the json describes; when the stored EXIF tag rotates the picture away from that frame,
      guessing which frame the annotator saw could silently misplace every mask, so we stop and
      say so instead (COCO's own images carry no rotating EXIF tag).

    ``cache=True`` decodes each item once and keeps its pixels (uint8) and target in memory, so
    that later epochs skip the image and mask decoding; the items are the same. For a dataset that
    fits in memory (the shapes benchmark); off by default.
    """

    def __init__(
        self,
        image_dir: str | os.PathLike,
        ann_file: str | os.PathLike,
        transforms: Callable | None = None,
        cache: bool = False,
    ) -> None:
        self.image_dir = Path(image_dir)
        self.ann_file = Path(ann_file)
        self.transforms = transforms
        self.cache: dict[int, tuple[torch.Tensor, dict[str, Any]]] | None = {} if cache else None

        data = load_coco_json(self.ann_file)
        _check_images(data, self.ann_file)
        _check_annotations(data, self.ann_file)  # before pycocotools indexes them (it would KeyError)
        self.coco = _coco_from_dict(data)

        self.cat_ids: list[int] = sorted(self.coco.cats)
        self.cat_id_to_label: dict[int, int] = {cat_id: i + 1 for i, cat_id in enumerate(self.cat_ids)}
        self.label_to_cat_id: dict[int, int] = {label: cat_id for cat_id, label in self.cat_id_to_label.items()}
        self.class_names: list[str] = ["background"] + [self.coco.cats[c]["name"] for c in self.cat_ids]
        self.num_classes: int = len(self.class_names)

        # torchvision's CocoDetection order: image ids sorted, images without annotations kept.
        self.ids: list[int] = sorted(self.coco.imgs)
        self._annotations = self._usable_annotations(data["annotations"])

    # ---- construction-time checks -----------------------------------------------------------

    def _usable_annotations(self, annotations: list[dict]) -> dict[int, list[dict]]:
        """Image id -> its annotations that can be turned into a mask and a box.

        Warns about and skips degenerate annotations (broken ones were refused by
        :func:`_check_annotations` already). Returned annotations are shallow copies whose polygon list holds only valid parts.
        """
        usable: dict[int, list[dict]] = defaultdict(list)
        for ann in annotations:
            info = self.coco.imgs[ann["image_id"]]
            where = f"{self.ann_file}: annotation id {ann['id']} (image id {ann['image_id']})"

            x1, y1, x2, y2 = _clipped_xyxy(ann["bbox"], info["width"], info["height"])
            if x2 <= x1 or y2 <= y1:
                warnings.warn(f"{where}: empty box bbox={ann['bbox']} inside the image; annotation skipped")
                continue

            segmentation = ann["segmentation"]
            if isinstance(segmentation, list):
                valid = _polygon_parts_are_valid(segmentation)
                if not all(valid):
                    bad = [i for i, ok in enumerate(valid) if not ok]
                    kept = [part for part, ok in zip(segmentation, valid) if ok]
                    action = "dropped" if kept else "dropped, no part left: annotation skipped"
                    warnings.warn(
                        f"{where}: segmentation polygon part(s) {bad} have fewer than 3 points "
                        f"or an odd number of coordinates; {action}"
                    )
                    if not kept:
                        continue
                    ann = {**ann, "segmentation": kept}
            usable[ann["image_id"]].append(ann)
        return usable

    # ---- reading items ----------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.ids)

    def image_path(self, index: int) -> Path:
        """Path of the image file of item ``index``."""
        return self.image_dir / self.coco.imgs[self.ids[index]]["file_name"]

    def load_image(self, index: int) -> tv_tensors.Image:
        """Item ``index``'s image as float32 ``[3, H, W]`` in 0..1, checked against the json size."""
        return tv_tensors.Image(self.load_pixels(index).to(torch.float32).div_(255.0))

    def load_pixels(self, index: int) -> torch.Tensor:
        """Item ``index``'s image as uint8 ``[3, H, W]``, checked against the json size."""
        image_id = self.ids[index]
        info = self.coco.imgs[image_id]
        path = self.image_path(index)
        if not path.is_file():
            raise FileNotFoundError(
                f"{path}: image file of image id {image_id} (listed in {self.ann_file}) does not exist"
            )
        image = read_rgb_image(path)
        if image.size != (info["width"], info["height"]):
            raise ValueError(
                f"{path}: image id {image_id} is {image.width}x{image.height} (width x height, after "
                f"EXIF orientation) but {self.ann_file} says {info['width']}x{info['height']}"
            )
        return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)

    def load_target(self, index: int) -> dict[str, Any]:
        """Item ``index``'s target dict (see the class docstring), before transforms."""
        image_id = self.ids[index]
        info = self.coco.imgs[image_id]
        height, width = info["height"], info["width"]
        anns = self._annotations.get(image_id, [])

        boxes = torch.tensor([ann["bbox"] for ann in anns], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]  # xywh -> xyxy
        boxes[:, 0::2].clamp_(0, width)
        boxes[:, 1::2].clamp_(0, height)

        rles = [self.annotation_rle(ann) for ann in anns]
        # COCO's stored area (what the evaluator's size ranges use); the mask's pixel count if absent.
        area = [float(a["area"]) if "area" in a else float(mask_utils.area(rle)) for a, rle in zip(anns, rles)]
        return {
            "boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(height, width)),
            "labels": torch.tensor([self.cat_id_to_label[a["category_id"]] for a in anns], dtype=torch.int64),
            "masks": tv_tensors.Mask(decode_masks(rles, height, width)),
            "iscrowd": torch.tensor([int(a.get("iscrowd", 0)) for a in anns], dtype=torch.int64),
            "area": torch.tensor(area, dtype=torch.float32),
            "image_id": image_id,
        }

    def annotation_rle(self, ann: dict) -> dict:
        """One annotation's segmentation as a compressed RLE (what ``COCO.annToRLE`` returns)."""
        info = self.coco.imgs[ann["image_id"]]
        return segmentation_to_rle(ann["segmentation"], info["height"], info["width"])

    def __getitem__(self, index: int) -> tuple[tv_tensors.Image, dict[str, Any]]:
        if self.cache is None:
            image, target = self.load_image(index), self.load_target(index)
        else:
            if index not in self.cache:
                self.cache[index] = (self.load_pixels(index), self.load_target(index))
            pixels, cached = self.cache[index]
            image = tv_tensors.Image(pixels.to(torch.float32).div_(255.0))
            # copies: a transform or a model that changed a target in place would change the cache
            target = {key: value.clone() if isinstance(value, torch.Tensor) else value for key, value in cached.items()}
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target

    def check(self, raise_on_problem: bool = False) -> list[str]:
        """Scan every image file without decoding it; return (or raise) the problems found.

        Problems: a missing file, a file PIL cannot open, a size (after EXIF orientation) other
        than the json's. With ``raise_on_problem=True`` a non-empty list becomes a ValueError
        listing them all.
        """
        problems = []
        for index, image_id in enumerate(self.ids):
            info = self.coco.imgs[image_id]
            path = self.image_path(index)
            if not path.is_file():
                problems.append(f"{path}: image id {image_id}: file does not exist")
                continue
            try:
                size = oriented_size(path)
            except (OSError, SyntaxError) as error:  # PIL raises SyntaxError on some broken headers
                problems.append(f"{path}: image id {image_id}: cannot be opened ({error})")
                continue
            if size != (info["width"], info["height"]):
                problems.append(
                    f"{path}: image id {image_id}: size {size[0]}x{size[1]} after EXIF orientation, "
                    f"json says {info['width']}x{info['height']}"
                )
        if problems and raise_on_problem:
            raise ValueError(f"{self.ann_file}: {len(problems)} image problem(s):\n" + "\n".join(problems))
        return problems

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({len(self)} images, {self.num_classes - 1} classes, "
            f"image_dir={str(self.image_dir)!r}, ann_file={str(self.ann_file)!r})"
        )


def segmentation_to_rle(segmentation: list | dict, height: int, width: int) -> dict:
    """A COCO ``segmentation`` (polygons, uncompressed or compressed RLE) -> compressed RLE.

    Same rules as ``COCO.annToRLE``: the parts of a multi-part polygon are rasterised one by one
    and merged (their union); an uncompressed RLE (``counts`` a list, used by COCO's crowd
    regions) is compressed; a compressed RLE is returned as it is.
    """
    if isinstance(segmentation, list):
        return mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    if isinstance(segmentation["counts"], list):
        return mask_utils.frPyObjects(segmentation, height, width)
    return segmentation


def decode_masks(rles: list[dict], height: int, width: int) -> torch.Tensor:
    """Compressed RLEs -> uint8 ``[N, H, W]`` tensor of 0/1, all decoded in one pycocotools call."""
    if not rles:
        return torch.zeros((0, height, width), dtype=torch.uint8)
    masks = mask_utils.decode(rles)  # [H, W, N], Fortran order
    return torch.from_numpy(np.ascontiguousarray(masks.transpose(2, 0, 1)))


def paint_semantic(masks: torch.Tensor, labels: torch.Tensor, iscrowd: torch.Tensor) -> torch.Tensor:
    """Instance masks -> one semantic label map.

    Args:
        masks: ``[N, H, W]`` 0/1 instance masks.
        labels: ``[N]`` int64 class of each instance (1..K).
        iscrowd: ``[N]`` 1 for crowd regions.

    Returns:
        int64 ``[H, W]``: 0 background, the instance's label where an instance covers the pixel,
        :data:`IGNORE_INDEX` where only a crowd region does. Where instances overlap, the
        smallest wins (as if painted largest first), so small objects on top of big ones stay
        visible; a real instance always wins over a crowd region.
    """
    height, width = masks.shape[-2:]
    is_crowd = iscrowd.bool()
    objects, object_labels = masks[~is_crowd], labels[~is_crowd]

    # Rank the objects from largest (rank 1) to smallest (rank N). Painting largest first means
    # a pixel ends up with the label of the highest rank covering it: a max over the instances.
    pixel_counts = objects.flatten(1).sum(1, dtype=torch.int32)
    order = pixel_counts.argsort(descending=True, stable=True)
    rank_dtype = torch.uint8 if len(order) < 256 else torch.int32  # uint8 is the fast path
    ranks = torch.arange(1, len(order) + 1, dtype=rank_dtype)
    if len(order):
        top_rank = (objects[order].to(rank_dtype) * ranks[:, None, None]).amax(0)  # [H, W], 0 = none
    else:
        top_rank = torch.zeros((height, width), dtype=rank_dtype)
    label_of_rank = torch.cat([labels.new_zeros(1), object_labels[order]])  # rank 0 -> background
    semantic = label_of_rank[top_rank.long()]

    if is_crowd.any():
        crowd_only = masks[is_crowd].bool().any(0) & (top_rank == 0)
        semantic[crowd_only] = IGNORE_INDEX
    return semantic


class CocoSemantic(Dataset):
    """A COCO instance file seen as semantic segmentation: one label map per image.

    Same constructor as :class:`CocoInstances` (which it wraps as ``self.instances``). Item:
    ``(image, {"semantic": tv_tensors.Mask int64 [H, W], "image_id": int})`` where the map is
    0 for background, the contiguous label 1..K of the object covering the pixel (smaller
    objects drawn over larger ones) and 255 (ignore) inside crowd regions not covered by an
    object. Labels, ``class_names`` and ``num_classes`` are those of the instance dataset.
    """

    def __init__(
        self,
        image_dir: str | os.PathLike,
        ann_file: str | os.PathLike,
        transforms: Callable | None = None,
    ) -> None:
        self.instances = CocoInstances(image_dir, ann_file)
        self.transforms = transforms
        self.ids = self.instances.ids
        self.class_names = self.instances.class_names
        self.num_classes = self.instances.num_classes

    def __len__(self) -> int:
        return len(self.instances)

    def __getitem__(self, index: int) -> tuple[tv_tensors.Image, dict[str, Any]]:
        image = self.instances.load_image(index)
        instances = self.instances.load_target(index)
        semantic = paint_semantic(instances["masks"], instances["labels"], instances["iscrowd"])
        target = {"semantic": tv_tensors.Mask(semantic), "image_id": instances["image_id"]}
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self)} images, {self.num_classes - 1} classes)"


# The 20 PASCAL VOC classes and the COCO category id of each, in VOC's order. torchvision's
# semantic models "COCO_WITH_VOC_LABELS" were trained and evaluated on COCO with these labels.
VOC_CLASSES = ("background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
               "tvmonitor")
VOC_COCO_CATEGORY_IDS = (5, 2, 16, 9, 44, 6, 3, 17, 62, 21, 67, 18, 19, 4, 1, 64, 20, 63, 7, 72)


class CocoVOCSemantic(CocoSemantic):
    """COCO images labelled with the 20 PASCAL VOC classes, the way torchvision scores its models.

    torchvision publishes mIoU for ``fcn_resnet50`` (60.5), ``deeplabv3_resnet50`` (66.4), ... on
    COCO val2017 restricted to the VOC classes; reproducing those numbers needs the same labels:

    - annotations of the other 60 COCO categories are dropped (their pixels become background);
    - every kept annotation, crowd regions included, paints its VOC label (1..20);
    - a pixel covered by two or more kept annotations is ambiguous and set to 255 (ignored).

    Item: ``(image, {"semantic": tv_tensors.Mask int64 [H, W], "image_id": int})``;
    ``class_names`` is :data:`VOC_CLASSES` and ``num_classes`` 21, whatever the file holds.
    """

    def __init__(
        self,
        image_dir: str | os.PathLike,
        ann_file: str | os.PathLike,
        transforms: Callable | None = None,
    ) -> None:
        super().__init__(image_dir, ann_file, transforms)
        self.class_names = list(VOC_CLASSES)
        self.num_classes = len(VOC_CLASSES)
        voc_label_of_cat = {cat_id: voc for voc, cat_id in enumerate(VOC_COCO_CATEGORY_IDS, start=1)}
        # contiguous label of the instance file -> VOC label (0 for categories VOC does not have)
        table = torch.zeros(len(self.instances.label_to_cat_id) + 1, dtype=torch.int64)
        for label, cat_id in self.instances.label_to_cat_id.items():
            table[label] = voc_label_of_cat.get(cat_id, 0)
        self.voc_label_of_label = table

    def __getitem__(self, index: int) -> tuple[tv_tensors.Image, dict[str, Any]]:
        image = self.instances.load_image(index)
        instances = self.instances.load_target(index)
        height, width = image.shape[-2:]
        voc_labels = self.voc_label_of_label[instances["labels"]]  # [N]
        kept = voc_labels > 0
        masks = instances["masks"][kept].bool()  # [M, H, W]
        semantic = torch.zeros((height, width), dtype=torch.int64)
        if len(masks):
            semantic = (masks.long() * voc_labels[kept][:, None, None]).amax(0)
            semantic[masks.sum(0) > 1] = IGNORE_INDEX
        target = {"semantic": tv_tensors.Mask(semantic), "image_id": instances["image_id"]}
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target
