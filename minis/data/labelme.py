"""Convert a folder of labelme annotations into one COCO instance segmentation file.

labelme (https://github.com/wkentaro/labelme) saves one JSON per image: a list of ``shapes``,
each with a ``label``, a ``shape_type``, ``points`` in pixel coordinates and an optional
``group_id``. :func:`labelme_to_coco` turns a folder of them into the COCO format that
:class:`minis.data.CocoInstances` reads::

    coco = labelme_to_coco("my_annotations/", "my_dataset/annotations.json", "labels.txt")
    dataset = CocoInstances("my_dataset/images", "my_dataset/annotations.json")
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import math
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from minis.data.coco import oriented_size, read_json

IGNORE_LABEL = "__ignore__"
BACKGROUND_LABEL = "_background_"
# labels.txt lines that name no object class (labelme's convention).
SPECIAL_LABELS = (IGNORE_LABEL, BACKGROUND_LABEL)

# Shapes that enclose an area and so can be a segmentation; the others are skipped with a warning.
AREA_SHAPES = ("polygon", "rectangle", "circle", "mask")
NO_AREA_SHAPES = ("line", "point", "points", "linestrip")


# --------------------------------------------------------------------------------------------
# One shape -> polygon or bitmap
# --------------------------------------------------------------------------------------------


def rectangle_polygon(points: list) -> list[float]:
    """Two opposite corners (in any order) -> the 4-corner polygon, flat ``[x1, y1, x2, y1, ...]``."""
    (xa, ya), (xb, yb) = points
    x1, x2 = sorted((xa, xb))
    y1, y2 = sorted((ya, yb))
    return [x1, y1, x2, y1, x2, y2, x1, y2]


def circle_polygon(points: list) -> list[float]:
    """labelme's circle (centre, a point on the circle) -> a polygon with a vertex every ~2 pixels.

    At that spacing the polygon's edge stays within a small fraction of a pixel of the true
    circle, so rasterising it gives the disc.
    """
    (cx, cy), (px, py) = points
    radius = math.hypot(px - cx, py - cy)
    n = max(16, math.ceil(2 * math.pi * radius / 2))
    angles = np.linspace(0, 2 * math.pi, n, endpoint=False)
    xy = np.stack([cx + radius * np.cos(angles), cy + radius * np.sin(angles)], axis=1)
    return xy.flatten().tolist()


def bitmap_mask(shape: dict, height: int, width: int, where: str) -> np.ndarray:
    """labelme's ``mask`` shape -> a full-image bool ``[H, W]`` array.

    The shape stores a small PNG (base64) covering the box ``points``; like labelme we paste it
    with its top-left pixel at the first point (rounded down), cropped to the image.
    """
    try:
        png = base64.b64decode(shape["mask"], validate=True)
        with Image.open(io.BytesIO(png)) as image:
            patch = np.asarray(image.convert("L")) > 0
    except (KeyError, TypeError, binascii.Error, OSError) as error:
        raise ValueError(f"{where}: field 'mask' is not a base64 PNG ({error})") from error
    x0, y0 = (int(math.floor(v)) for v in shape["points"][0])
    full = np.zeros((height, width), dtype=bool)
    # Overlap of the patch rectangle with the image, in image and in patch coordinates.
    top, left = max(y0, 0), max(x0, 0)
    bottom, right = min(y0 + patch.shape[0], height), min(x0 + patch.shape[1], width)
    if bottom > top and right > left:
        full[top:bottom, left:right] = patch[top - y0 : bottom - y0, left - x0 : right - x0]
    return full


def shape_region(shape: dict, height: int, width: int, where: str) -> tuple[str, Any]:
    """One area shape -> ``("polygon", flat coords)`` or ``("bitmap", bool [H, W])``.

    Raises ValueError (naming ``where``: file and shape index) when the points cannot describe
    the shape.
    """
    shape_type = shape.get("shape_type") or "polygon"  # labelme 3 files have no shape_type
    points = shape.get("points")
    if not isinstance(points, list) or not all(isinstance(p, list) and len(p) == 2 for p in points):
        raise ValueError(f"{where}: field 'points' must be a list of [x, y] pairs")
    if shape_type == "polygon":
        if len(points) < 3:
            raise ValueError(f"{where}: polygon has {len(points)} point(s); a polygon needs at least 3")
        return "polygon", [float(v) for point in points for v in point]
    if shape_type in ("rectangle", "circle", "mask") and len(points) != 2:
        raise ValueError(f"{where}: a {shape_type} needs exactly 2 points, found {len(points)}")
    if shape_type == "rectangle":
        return "polygon", rectangle_polygon(points)
    if shape_type == "circle":
        return "polygon", circle_polygon(points)
    return "bitmap", bitmap_mask(shape, height, width, where)


def region_rle(polygons: list[list[float]], bitmaps: list[np.ndarray], height: int, width: int) -> dict:
    """Union of polygons and bitmaps -> one compressed RLE (pycocotools rasterises the polygons)."""
    rles = mask_utils.frPyObjects(polygons, height, width) if polygons else []
    rles += [mask_utils.encode(np.asfortranarray(b.astype(np.uint8))) for b in bitmaps]
    return mask_utils.merge(rles)


# --------------------------------------------------------------------------------------------
# One labelme file -> image entry and instances
# --------------------------------------------------------------------------------------------


def read_labelme(path: Path) -> dict:
    """Read one labelme JSON and check that it looks like one."""
    document = read_json(path)
    if not isinstance(document, dict) or not isinstance(document.get("shapes"), list):
        raise ValueError(f"{path}: not a labelme file (no 'shapes' list)")
    return document


def _image_extension(image_bytes: bytes, where: str) -> str:
    try:
        with Image.open(io.BytesIO(image_bytes)) as image:
            fmt = image.format
    except OSError as error:
        raise ValueError(f"{where}: field 'imageData' is not an image ({error})") from error
    return {"JPEG": ".jpg"}.get(fmt, "." + fmt.lower())


def write_image(path: Path, document: dict, image_dir: Path) -> tuple[str, int, int]:
    """Put the image of labelme file ``path`` into ``image_dir``; return ``(file_name, width, height)``.

    The image embedded in ``imageData`` wins when there is one (it is what the annotator saw;
    labelme does the same); otherwise ``imagePath`` is read relative to the labelme file. The
    copy is named after the labelme file (``<stem><ext>``), which is unique within the folder.
    """
    image_data = document.get("imageData")
    if image_data:
        try:
            image_bytes = base64.b64decode(image_data, validate=True)
        except binascii.Error as error:
            raise ValueError(f"{path}: field 'imageData' is not base64 ({error})") from error
        file_name = path.stem + _image_extension(image_bytes, str(path))
        (image_dir / file_name).write_bytes(image_bytes)
    else:
        image_path = document.get("imagePath")
        if not image_path:
            raise ValueError(f"{path}: neither 'imageData' nor 'imagePath' gives the image")
        source = path.parent / image_path.replace("\\", "/")  # labelme on Windows writes backslashes
        if not source.is_file():
            raise FileNotFoundError(f"{path}: image file {source} (field 'imagePath') does not exist")
        file_name = path.stem + source.suffix.lower()
        shutil.copyfile(source, image_dir / file_name)

    width, height = oriented_size(image_dir / file_name)
    stated = (document.get("imageWidth"), document.get("imageHeight"))
    if stated != (None, None) and stated != (width, height):
        raise ValueError(
            f"{path}: the image is {width}x{height} (width x height) but the file says "
            f"imageWidth={stated[0]}, imageHeight={stated[1]}"
        )
    return file_name, width, height


def group_instances(path: Path, shapes: list[dict]) -> dict[tuple, list[tuple[int, dict]]]:
    """Instances of one file: key -> ``[(shape index, shape), ...]`` in order of first appearance.

    Shapes with the same ``label`` and ``group_id`` are parts of one instance (labelme's way to
    annotate an object split by an occluder); a shape without ``group_id`` is an instance alone.
    Shapes without area (lines, points) are skipped with a warning, ``_background_`` too.
    """
    instances: dict[tuple, list[tuple[int, dict]]] = {}
    for index, shape in enumerate(shapes):
        where = f"{path}: shapes[{index}]"
        label = shape.get("label")
        if not isinstance(label, str) or not label:
            raise ValueError(f"{where}: field 'label' is missing or empty")
        shape_type = shape.get("shape_type") or "polygon"
        if shape_type in NO_AREA_SHAPES:
            warnings.warn(f"{where} ({label!r}) is a {shape_type}, which has no area; skipped")
            continue
        if shape_type not in AREA_SHAPES:
            raise ValueError(f"{where}: unknown shape_type {shape_type!r}")
        if label == BACKGROUND_LABEL:
            warnings.warn(f"{where} is labelled {BACKGROUND_LABEL!r}, which is not an object; skipped")
            continue
        group_id = shape.get("group_id")
        key = (label, "group", group_id) if group_id is not None else (label, "shape", index)
        instances.setdefault(key, []).append((index, shape))
    return instances


def instance_regions(
    path: Path, parts: list[tuple[int, dict]], height: int, width: int
) -> tuple[list[list[float]], list[np.ndarray]]:
    """An instance's shapes -> ``(polygons, bitmaps)``, the pieces whose union is its mask."""
    polygons, bitmaps = [], []
    for index, shape in parts:
        kind, region = shape_region(shape, height, width, f"{path}: shapes[{index}] ({shape['label']!r})")
        (polygons if kind == "polygon" else bitmaps).append(region)
    return polygons, bitmaps


def area_labels(documents: list[dict]) -> list[str]:
    """Sorted labels of the shapes that have an area: the classes when there is no labels file."""
    return sorted(
        {
            shape["label"]
            for document in documents
            for shape in document["shapes"]
            if isinstance(shape.get("label"), str)
            and shape["label"] not in SPECIAL_LABELS
            and (shape.get("shape_type") or "polygon") in AREA_SHAPES
        }
    )


def file_annotations(
    path: Path, document: dict, category_ids: dict[str, int], height: int, width: int
) -> list[dict]:
    """The COCO annotations (without ``id``/``image_id``) of one labelme file, in shape order."""
    annotations = []
    for (label, *_), parts in group_instances(path, document["shapes"]).items():
        first_index = parts[0][0]
        if label != IGNORE_LABEL and label not in category_ids:
            raise ValueError(f"{path}: shapes[{first_index}]: label {label!r} is not in the labels file")
        polygons, bitmaps = instance_regions(path, parts, height, width)
        rle = region_rle(polygons, bitmaps, height, width)
        if mask_utils.area(rle) == 0:
            warnings.warn(f"{path}: shapes[{first_index}] ({label!r}) covers no pixel of the image; skipped")
            continue
        rle_json = {"size": rle["size"], "counts": rle["counts"].decode("ascii")}
        common = {"area": float(mask_utils.area(rle)), "bbox": mask_utils.toBbox(rle).tolist()}
        if label == IGNORE_LABEL:  # one crowd region per category: see labelme_to_coco
            for category_id in category_ids.values():
                annotations.append({"category_id": category_id, "segmentation": rle_json, **common, "iscrowd": 1})
        else:
            segmentation = rle_json if bitmaps else polygons
            category_id = category_ids[label]
            annotations.append({"category_id": category_id, "segmentation": segmentation, **common, "iscrowd": 0})
    return annotations


# --------------------------------------------------------------------------------------------
# The folder
# --------------------------------------------------------------------------------------------


def read_labels_file(labels_file: str | os.PathLike) -> list[str]:
    """labelme's ``labels.txt`` -> class names in file order, without ``__ignore__``/``_background_``."""
    names = [line.strip() for line in Path(labels_file).read_text(encoding="utf-8").splitlines()]
    names = [name for name in names if name and name not in SPECIAL_LABELS]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"{labels_file}: class name(s) listed twice: {duplicates}")
    return names


def labelme_to_coco(
    in_dir: str | os.PathLike,
    out_json: str | os.PathLike,
    labels_file: str | os.PathLike | None = None,
) -> dict:
    """Convert every labelme ``*.json`` in ``in_dir`` (sorted by name) to one COCO file.

    Writes ``out_json`` and copies each image into the folder ``images/`` next to it; every
    image's ``file_name`` is relative to that folder, so the result loads with
    ``CocoInstances(Path(out_json).parent / "images", out_json)``. Returns the COCO dict.

    - Categories: the names in ``labels_file`` (labelme's ``labels.txt``, whose
      ``__ignore__`` and ``_background_`` lines are not classes) in file order, or else the
      sorted labels of the shapes; ids 1..K. A shape whose label is not in ``labels_file``
      is an error.
    - Instances: shapes sharing ``label`` and ``group_id`` form one instance whose mask is the
      union of its parts (written as a multi-part polygon); any other shape is one instance.
      Polygons, rectangles and circles (as polygons with a vertex every ~2 px) are written as
      COCO polygons; an instance with a ``mask`` shape (a PNG pasted at the shape's first point)
      is written as RLE. ``bbox`` and ``area`` are those of the rasterised mask.
    - ``__ignore__`` shapes become crowd regions (``iscrowd=1``, RLE). labelme's own converter
      drops them; we keep them so that training and evaluation can ignore that area. A COCO
      crowd region only ignores detections of its own category, and an ignore region means
      "do not judge anything here", so each one is written once per category.
    - line, point and linestrip shapes have no area: skipped with a warning.
    - Images: ``imageData`` when present, else ``imagePath`` relative to the labelme file.

    Bad input raises, naming the labelme file and the shape index: broken JSON (ValueError with
    line and column), a polygon with fewer than 3 points, a rectangle/circle without 2 points,
    an unknown shape type or label (ValueError), an image that does not exist
    (FileNotFoundError), an image whose size is not the file's ``imageWidth``/``imageHeight``.
    """
    in_dir, out_json = Path(in_dir), Path(out_json)
    paths = [p for p in sorted(in_dir.glob("*.json")) if p.resolve() != out_json.resolve()]
    if not paths:
        raise FileNotFoundError(f"{in_dir}: no labelme *.json files")
    documents = [read_labelme(path) for path in paths]

    names = read_labels_file(labels_file) if labels_file is not None else area_labels(documents)
    category_ids = {name: i for i, name in enumerate(names, start=1)}

    image_dir = out_json.parent / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for image_id, (path, document) in enumerate(zip(paths, documents), start=1):
        file_name, width, height = write_image(path, document, image_dir)
        images.append({"id": image_id, "file_name": file_name, "width": width, "height": height})
        for annotation in file_annotations(path, document, category_ids, height, width):
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, **annotation})

    coco = {
        "info": {"description": f"converted from the labelme files in {in_dir.name}", "version": "1.0"},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i, "name": name, "supercategory": "none"} for name, i in category_ids.items()],
    }
    out_json.write_text(json.dumps(coco), encoding="utf-8")
    return coco
