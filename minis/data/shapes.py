"""The *shapes* benchmark: a small synthetic segmentation dataset in real COCO format.

Every chapter of the book trains on it, because it is small enough to train a model on a laptop
CPU in minutes and still has the things that make segmentation hard:

- **five classes of distinct geometry** (:data:`SHAPE_CLASSES`): circle, triangle, square,
  five-pointed star and ring (a disc with a hole, so a mask is not always "filled in");
- **random colour, size (about 12 to 60 pixels at 128x128), position and rotation**, so that
  nothing but the outline tells the class;
- **textured backgrounds**: smooth colour noise, linear gradients and stripes, whose colours are
  often *borrowed from the objects in the same image*, so colour alone does not separate an
  object from the background;
- **occlusion**: objects are painted one after the other, later ones cover earlier ones, and
  every mask is the *visible* part of its object (it may be split into pieces). An object left
  with fewer than ``min_area`` visible pixels is dropped everywhere: it is not painted, not in the
  COCO file and not in the label image, so the three always agree;
- **images without objects** (about 5%), which detectors must learn to leave empty.

The semantic-segmentation chapters use an easier variant, ``make_shapes(root, **SEMANTIC_SHAPES)``
(``textures=False``, ``size_range=(0.3, 0.55)``, ``max_objects=2``): plain backgrounds, unstriped
objects and fewer, larger shapes, so that an architecture's differences (how sharp its boundaries
are) show after a CPU minute of training instead of being buried under the time it takes to learn
the textures.

It is generated deterministically from a seed: the same seed and parameters give byte-identical
files on the same library versions. The layout is the one the COCO tools expect::

    root/train/images/000001.png ...        RGB images (image id 1, 2, ...)
    root/train/labels/000001.png ...        semantic labels, mode "L": 0 background, k = class k
    root/annotations/instances_train.json   COCO instances: compressed RLE of the visible masks
    root/val/...  root/annotations/instances_val.json
    root/meta.json                          the generation parameters (written last)

From Python::

    from minis.data import make_shapes
    paths = make_shapes("data/shapes")        # ~1000 train + 200 val images, seconds

or from a shell: ``python -m minis.data.shapes data/shapes --num-train 1000 --num-val 200``.

The first call writes the files; later calls with the same parameters only read ``meta.json``
and return. ``meta.json`` is written last, so an interrupted run is never mistaken for a
finished one: the next call notices the leftover ``.generating`` marker and starts again.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils

SHAPE_CLASSES: tuple[str, ...] = ("circle", "triangle", "square", "star", "ring")
"""Object classes in label order: class ``k`` (COCO category id ``k``) is ``SHAPE_CLASSES[k - 1]``."""

FORMAT_VERSION = 1  # bump when the rendering changes, so cached copies are regenerated
SPLITS = ("train", "val")

# Object size: the diameter of the circle the shape is inscribed in, as a fraction of the image
# side (at 128 px: about 12 to 58 px). Drawn log-uniformly, so small objects are as common as large.
SIZE_RANGE = (0.09, 0.45)
STRIPED_OBJECT_PROBABILITY = 0.25  # some objects carry stripes, like some backgrounds do
BORROWED_COLOUR_PROBABILITY = 0.6  # background reuses an object's colour this often
PIXEL_NOISE_STD = 0.04  # sensor-like noise over the whole image, in 0..1 intensity units

# The chapters' plain variant (``make_shapes(root, **SEMANTIC_SHAPES)``), named after the semantic
# chapters that introduced it; the instance chapters and the benchmarks use it too: plain colours
# and one or two large objects per image, which the small models learn in a few CPU minutes.
SEMANTIC_SHAPES: dict = {"size_range": (0.3, 0.55), "max_objects": 2, "textures": False}

_PNG_OPTIONS = {"format": "PNG", "compress_level": 6, "optimize": False}  # fixed: same bytes every run
_MARKER = ".generating"


# --------------------------------------------------------------------------------------------
# Rendering one image
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShapeObject:
    """One object to paint: its class (1..K), geometry in pixels and appearance."""

    label: int
    center: tuple[float, float]  # (x, y)
    radius: float
    angle: float  # radians
    colour: tuple[float, float, float]  # RGB in 0..1
    stripe_colour: tuple[float, float, float] | None  # None: plain fill


@dataclass(frozen=True)
class ShapesSample:
    """A rendered image and its ground truth.

    ``image`` uint8 ``[H,W,3]``; ``instance_map`` int32 ``[H,W]`` with 0 for background and
    ``i + 1`` where object ``i`` is visible; ``labels`` int64 ``[N]`` the class of each object.
    """

    image: np.ndarray
    instance_map: np.ndarray
    labels: np.ndarray

    def semantic_label(self) -> np.ndarray:
        """uint8 ``[H,W]``: 0 background, ``k`` where an object of class ``k`` is visible."""
        class_of_instance = np.concatenate([[0], self.labels]).astype(np.uint8)
        return class_of_instance[self.instance_map]

    def visible_masks(self) -> np.ndarray:
        """bool ``[N,H,W]``: the visible pixels of every object."""
        instance_ids = np.arange(1, len(self.labels) + 1)
        return self.instance_map[None] == instance_ids[:, None, None]


def _random_colour(rng: np.random.Generator) -> tuple[float, float, float]:
    """A random, reasonably saturated RGB colour in 0..1 (hue uniform)."""
    hue, saturation, value = rng.uniform(0, 1), rng.uniform(0.25, 1.0), rng.uniform(0.3, 1.0)
    # HSV -> RGB without a loop: each channel is the value minus a hue-dependent dip.
    k = (np.array([5.0, 3.0, 1.0]) + hue * 6) % 6
    dip = np.clip(np.minimum(k, 4 - k), 0, 1)
    rgb = value - value * saturation * dip
    return tuple(float(c) for c in rgb)


def _sample_objects(
    rng: np.random.Generator,
    image_size: int,
    max_objects: int,
    size_range: tuple[float, float] = SIZE_RANGE,
    textures: bool = True,
) -> list[ShapeObject]:
    """Random objects for one image, in painting order (later ones on top)."""
    num_objects = int(rng.integers(1, max_objects + 1))
    objects = []
    for _ in range(num_objects):
        diameter = image_size * math.exp(rng.uniform(math.log(size_range[0]), math.log(size_range[1])))
        # Centres may sit near the border, so some objects are cut by the image edge.
        center = tuple(float(c) for c in rng.uniform(0.08 * image_size, 0.92 * image_size, size=2))
        striped = textures and rng.uniform() < STRIPED_OBJECT_PROBABILITY
        objects.append(
            ShapeObject(
                label=int(rng.integers(1, len(SHAPE_CLASSES) + 1)),
                center=center,
                radius=diameter / 2,
                angle=float(rng.uniform(0, 2 * math.pi)),
                colour=_random_colour(rng),
                stripe_colour=_random_colour(rng) if striped else None,
            )
        )
    return objects


def _regular_polygon(obj: ShapeObject, corners: int, inner_ratio: float | None = None) -> list[tuple[float, float]]:
    """Vertices of a regular polygon (or, with ``inner_ratio``, a star) around ``obj.center``."""
    if inner_ratio is None:
        radii = np.full(corners, obj.radius)
        angles = obj.angle + np.arange(corners) * 2 * math.pi / corners
    else:  # a star alternates outer tips and inner notches
        radii = np.tile([obj.radius, obj.radius * inner_ratio], corners)
        angles = obj.angle + np.arange(2 * corners) * math.pi / corners
    xs = obj.center[0] + radii * np.cos(angles)
    ys = obj.center[1] + radii * np.sin(angles)
    return list(zip(xs.tolist(), ys.tolist()))


def _shape_mask(obj: ShapeObject, image_size: int) -> np.ndarray:
    """bool ``[S,S]``: every pixel the whole shape covers (before any occlusion)."""
    canvas = Image.new("L", (image_size, image_size), 0)
    draw = ImageDraw.Draw(canvas)
    cx, cy = obj.center
    name = SHAPE_CLASSES[obj.label - 1]
    if name in ("circle", "ring"):
        r = obj.radius
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=1)
        if name == "ring":  # punch the hole: background (or objects below) show through it
            hole = 0.55 * r
            draw.ellipse([cx - hole, cy - hole, cx + hole, cy + hole], fill=0)
    elif name == "triangle":
        draw.polygon(_regular_polygon(obj, 3), fill=1)
    elif name == "square":
        draw.polygon(_regular_polygon(obj, 4), fill=1)
    elif name == "star":
        draw.polygon(_regular_polygon(obj, 5, inner_ratio=0.45), fill=1)
    else:
        raise ValueError(f"shapes: no drawing rule for class {name!r}")
    return np.asarray(canvas, dtype=bool)


def _visible_instance_map(full_masks: np.ndarray, min_area: int) -> tuple[np.ndarray, np.ndarray]:
    """Paint masks in order and drop objects whose visible part is smaller than ``min_area``.

    ``full_masks`` bool ``[N,H,W]`` in painting order. Returns ``(instance_map int32 [H,W],
    kept int64 [M])``: ``instance_map`` is 0 on background and ``j + 1`` where the ``j``-th kept
    object is visible; ``kept`` holds the indices (into ``full_masks``) of the kept objects.
    """
    kept = np.arange(len(full_masks))
    while len(kept):
        # The last object covering a pixel owns it: argmax over the reversed stack finds it.
        stack = full_masks[kept]
        covered = stack.any(axis=0)
        top = len(kept) - 1 - np.argmax(stack[::-1], axis=0)
        instance_map = np.where(covered, top + 1, 0).astype(np.int32)
        visible_area = np.bincount(instance_map.ravel(), minlength=len(kept) + 1)[1:]
        too_small = visible_area < min_area
        if not too_small.any():
            return instance_map, kept.astype(np.int64)
        # Removing an object only uncovers pixels of objects below it, so the loop ends quickly.
        kept = kept[~too_small]
    return np.zeros(full_masks.shape[1:], dtype=np.int32), kept.astype(np.int64)  # every object was too small


def _coordinate_grid(image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates ``(x [1,S], y [S,1])`` for broadcasting."""
    coords = np.arange(image_size, dtype=np.float32) + 0.5
    return coords[None, :], coords[:, None]


def _stripes(rng: np.random.Generator, image_size: int) -> np.ndarray:
    """float ``[S,S]`` in 0..1: stripes of random angle, period and softness."""
    x, y = _coordinate_grid(image_size)
    angle = rng.uniform(0, math.pi)
    period = rng.uniform(5, 20)
    phase = np.cos(angle) * x + np.sin(angle) * y
    wave = 0.5 + 0.5 * np.sin(2 * math.pi * phase / period + rng.uniform(0, 2 * math.pi))
    sharpness = rng.uniform(1, 8)  # 1: soft sine, 8: nearly hard-edged bars
    return np.clip(0.5 + (wave - 0.5) * sharpness, 0, 1)


def _background(
    rng: np.random.Generator, image_size: int, object_colours: Sequence[tuple], textures: bool = True
) -> np.ndarray:
    """float ``[S,S,3]`` in 0..1: one of three textures, sometimes in the objects' own colours.

    With ``textures=False``: one plain random colour (never borrowed from an object).
    """
    if not textures:
        return np.broadcast_to(np.array(_random_colour(rng)), (image_size, image_size, 3)).copy()
    colour_a, colour_b = np.array(_random_colour(rng)), np.array(_random_colour(rng))
    if object_colours and rng.uniform() < BORROWED_COLOUR_PROBABILITY:
        colour_a = np.array(object_colours[int(rng.integers(len(object_colours)))])
    kind = int(rng.integers(3))
    if kind == 0:  # smooth colour noise: a few random colours on a coarse grid, upsampled
        cells = int(rng.integers(2, 7))
        weights = rng.uniform(0, 1, size=(cells, cells)).astype(np.float32)
        coarse = Image.fromarray(weights).resize((image_size, image_size), Image.BICUBIC)
        mix = np.clip(np.asarray(coarse), 0, 1)
    elif kind == 1:  # linear gradient in a random direction
        x, y = _coordinate_grid(image_size)
        angle = rng.uniform(0, 2 * math.pi)
        ramp = np.cos(angle) * x + np.sin(angle) * y
        mix = (ramp - ramp.min()) / (ramp.max() - ramp.min())
    else:
        mix = _stripes(rng, image_size)
    return (1 - mix)[..., None] * colour_a + mix[..., None] * colour_b


def _paint_objects(
    canvas: np.ndarray, instance_map: np.ndarray, objects: Sequence[ShapeObject], rng: np.random.Generator
) -> None:
    """Fill the visible pixels of each object (in place) with its colour, shading and stripes."""
    x, y = _coordinate_grid(canvas.shape[0])
    for index, obj in enumerate(objects, start=1):
        visible = instance_map == index
        # A soft light ramp across the object, so its fill is not perfectly flat.
        light_angle = rng.uniform(0, 2 * math.pi)
        ramp = ((x - obj.center[0]) * np.cos(light_angle) + (y - obj.center[1]) * np.sin(light_angle)) / obj.radius
        fill = np.array(obj.colour) * (1 + 0.2 * np.clip(ramp, -1, 1))[..., None]
        if obj.stripe_colour is not None:
            mix = _stripes(rng, canvas.shape[0])[..., None]
            fill = (1 - mix) * fill + mix * np.array(obj.stripe_colour)
        canvas[visible] = fill[visible]


def render_sample(
    rng: np.random.Generator,
    image_size: int = 128,
    max_objects: int = 6,
    min_area: int = 20,
    empty: bool = False,
    size_range: tuple[float, float] = SIZE_RANGE,
    textures: bool = True,
) -> ShapesSample:
    """Render one image of the benchmark from ``rng`` (see the module docstring for the recipe).

    With ``empty=True`` the image holds background only. Objects whose visible part is smaller
    than ``min_area`` pixels are removed before painting, so image, masks and labels agree.
    """
    objects = [] if empty else _sample_objects(rng, image_size, max_objects, size_range, textures)
    if objects:
        full_masks = np.stack([_shape_mask(obj, image_size) for obj in objects])
        instance_map, kept = _visible_instance_map(full_masks, min_area)
        objects = [objects[i] for i in kept]  # may leave none: the image is then empty too
    else:
        instance_map = np.zeros((image_size, image_size), dtype=np.int32)
    canvas = _background(rng, image_size, [obj.colour for obj in objects], textures)
    _paint_objects(canvas, instance_map, objects, rng)
    canvas = canvas + rng.normal(0, PIXEL_NOISE_STD, size=canvas.shape)
    image = np.round(np.clip(canvas, 0, 1) * 255).astype(np.uint8)
    labels = np.array([obj.label for obj in objects], dtype=np.int64)
    return ShapesSample(image=image, instance_map=instance_map, labels=labels)


# --------------------------------------------------------------------------------------------
# COCO annotations
# --------------------------------------------------------------------------------------------


def _coco_annotations(sample: ShapesSample, image_id: int, first_annotation_id: int) -> list[dict]:
    """One COCO annotation per object: compressed RLE, pixel area and tight box of the visible mask."""
    masks = sample.visible_masks()  # [N,H,W]
    # pycocotools wants a Fortran-ordered uint8 [H,W,N] stack.
    rles = mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))
    rows_any, cols_any = masks.any(axis=2), masks.any(axis=1)  # [N,H], [N,W]
    annotations = []
    for i, (rle, label) in enumerate(zip(rles, sample.labels.tolist())):
        ys, xs = np.flatnonzero(rows_any[i]), np.flatnonzero(cols_any[i])
        x0, y0, x1, y1 = int(xs[0]), int(ys[0]), int(xs[-1]), int(ys[-1])
        annotations.append(
            {
                "id": first_annotation_id + i,
                "image_id": image_id,
                "category_id": label,
                "segmentation": {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")},
                "area": int(masks[i].sum()),
                "bbox": [x0, y0, x1 - x0 + 1, y1 - y0 + 1],
                "iscrowd": 0,
            }
        )
    return annotations


def _coco_header(split: str) -> dict:
    return {
        "info": {
            "description": f"minis shapes benchmark, {split} split: synthetic images generated by "
            "minis.data.make_shapes (no photographs, no people, no real-world content)",
            "contributor": "minis.data.shapes (generated)",
            "version": str(FORMAT_VERSION),
            "url": "",
        },
        "licenses": [{"id": 1, "name": "Generated data, free to use (CC0 1.0)", "url": ""}],
        "categories": [{"id": k, "name": name, "supercategory": "shape"} for k, name in enumerate(SHAPE_CLASSES, 1)],
    }


# --------------------------------------------------------------------------------------------
# Writing a split and caching
# --------------------------------------------------------------------------------------------


def _write_json(path: Path, data: dict) -> None:
    """Write deterministic JSON (sorted keys, no timestamps) through a temporary file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, sort_keys=True, separators=(",", ":")) + "\n", encoding="utf-8")
    os.replace(tmp, path)  # atomic: readers see the old file or the whole new one


def _split_paths(root: Path, split: str) -> dict[str, Path]:
    return {
        "images": root / split / "images",
        "labels": root / split / "labels",
        "annotations": root / "annotations" / f"instances_{split}.json",
    }


def _layout(root: Path) -> dict:
    return {
        "root": root,
        "class_names": ["background", *SHAPE_CLASSES],
        "num_classes": len(SHAPE_CLASSES) + 1,
        **{split: _split_paths(root, split) for split in SPLITS},
    }


def _write_split(root: Path, split: str, num_images: int, params: dict, progress_bar) -> None:
    paths = _split_paths(root, split)
    paths["images"].mkdir(parents=True, exist_ok=True)
    paths["labels"].mkdir(parents=True, exist_ok=True)
    split_code = SPLITS.index(split)
    # Which images are empty is decided per split; each image then has its own random stream,
    # so an image depends only on (seed, split, index), never on the images before it.
    num_empty = int(round(params["empty_fraction"] * num_images))
    empty = set(np.random.default_rng([params["seed"], split_code]).permutation(num_images)[:num_empty].tolist())
    coco = {**_coco_header(split), "images": [], "annotations": []}
    for index in range(num_images):
        image_id = index + 1
        rng = np.random.default_rng([params["seed"], split_code, image_id])
        sample = render_sample(
            rng, params["image_size"], params["max_objects"], params["min_area"], empty=index in empty,
            size_range=tuple(params["size_range"]), textures=params["textures"],
        )
        file_name = f"{image_id:06d}.png"
        Image.fromarray(sample.image).save(paths["images"] / file_name, **_PNG_OPTIONS)
        Image.fromarray(sample.semantic_label()).save(paths["labels"] / file_name, **_PNG_OPTIONS)
        height, width = sample.instance_map.shape
        coco["images"].append(
            {"id": image_id, "file_name": file_name, "width": width, "height": height, "license": 1}
        )
        coco["annotations"] += _coco_annotations(sample, image_id, first_annotation_id=len(coco["annotations"]) + 1)
        progress_bar.update(1)
    _write_json(paths["annotations"], coco)


def _remove_generated(root: Path) -> None:
    """Delete what :func:`make_shapes` writes under ``root`` (and nothing else)."""
    for split in SPLITS:
        paths = _split_paths(root, split)
        for folder in (paths["images"], paths["labels"]):
            shutil.rmtree(folder, ignore_errors=True)
        paths["annotations"].unlink(missing_ok=True)
        if (root / split).is_dir() and not any((root / split).iterdir()):
            (root / split).rmdir()
    (root / "meta.json").unlink(missing_ok=True)


def make_shapes(
    root: str | os.PathLike,
    *,
    num_train: int = 1000,
    num_val: int = 200,
    image_size: int = 128,
    max_objects: int = 6,
    min_area: int = 20,
    empty_fraction: float = 0.05,
    size_range: tuple[float, float] = SIZE_RANGE,
    textures: bool = True,
    seed: int = 0,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Generate the shapes benchmark under ``root`` (once) and return its paths.

    Args:
        root: output folder (created if needed).
        num_train, num_val: images per split (image ids ``1..n``).
        image_size: side of the square images in pixels; object sizes scale with it.
        max_objects: each non-empty image holds ``1..max_objects`` objects before occlusion.
        min_area: objects with fewer visible pixels are dropped (from image, JSON and labels).
        empty_fraction: fraction of images with no object at all.
        size_range: ``(smallest, largest)`` object diameter as a fraction of ``image_size``, drawn
            log-uniformly; the default gives about 12 to 58 px at 128 px.
        textures: ``False`` paints plain one-colour backgrounds and objects without stripes: the
            easier variant the semantic-segmentation chapters train on in a CPU minute.
        seed: same seed and parameters -> byte-identical files.
        overwrite: delete what a previous run wrote under ``root`` and generate again.
        progress: show a progress bar.

    Caching: if ``root/meta.json`` records the same parameters, nothing is written and the paths
    are returned at once. If it records different ones, :class:`ValueError` is raised (naming
    the differences) rather than silently replacing data a notebook may rely on; pass
    ``overwrite=True`` or another ``root``. A run that was interrupted (``.generating`` marker,
    no ``meta.json``) is cleaned up and redone. A non-empty ``root`` that holds neither is not
    ours: :class:`FileExistsError` unless ``overwrite=True``.

    Returns:
        ``{"root", "class_names" (["background", *SHAPE_CLASSES]), "num_classes" (K+1),
        "train": {"images", "labels", "annotations"}, "val": {...}}`` with :class:`~pathlib.Path`
        values.
    """
    root = Path(root)
    if num_train < 0 or num_val < 0:
        raise ValueError(f"make_shapes: image counts must be >= 0, got num_train={num_train}, num_val={num_val}")
    if max_objects < 1 or min_area < 1:
        raise ValueError(f"make_shapes: max_objects and min_area must be >= 1, got {max_objects}, {min_area}")
    if image_size < 32:
        raise ValueError(f"make_shapes: image_size must be at least 32 pixels, got {image_size}")
    if not 0 <= empty_fraction <= 1:
        raise ValueError(f"make_shapes: empty_fraction must be in [0, 1], got {empty_fraction}")
    if len(size_range) != 2 or not 0 < size_range[0] <= size_range[1] <= 1:
        raise ValueError(f"make_shapes: size_range must be (smallest, largest) with 0 < smallest <= largest <= 1, "
                         f"got {size_range}")
    params = {
        "generator": "minis.data.shapes",
        "format_version": FORMAT_VERSION,
        "classes": list(SHAPE_CLASSES),
        "num_train": num_train,
        "num_val": num_val,
        "image_size": image_size,
        "max_objects": max_objects,
        "min_area": min_area,
        "empty_fraction": empty_fraction,
        "size_range": [float(size_range[0]), float(size_range[1])],
        "textures": bool(textures),
        "seed": seed,
    }
    meta_path, marker = root / "meta.json", root / _MARKER
    if not overwrite and meta_path.exists():
        existing = json.loads(meta_path.read_text(encoding="utf-8"))
        # copies written before these were parameters used their defaults
        existing.setdefault("size_range", list(SIZE_RANGE))
        existing.setdefault("textures", True)
        if existing == params:
            return _layout(root)
        changed = sorted(k for k in params.keys() | existing.keys() if params.get(k) != existing.get(k))
        details = ", ".join(f"{k}: {existing.get(k)!r} -> {params.get(k)!r}" for k in changed)
        raise ValueError(
            f"make_shapes: {root} already holds a shapes benchmark generated with other parameters "
            f"({details}); pass overwrite=True to replace it or choose another root"
        )
    interrupted = marker.exists()
    if root.is_dir() and any(root.iterdir()) and not (overwrite or interrupted):
        raise FileExistsError(
            f"make_shapes: {root} is not empty and was not written by make_shapes (no meta.json); "
            "choose an empty folder or pass overwrite=True"
        )

    from tqdm.auto import tqdm

    root.mkdir(parents=True, exist_ok=True)
    _remove_generated(root)
    (root / "annotations").mkdir(exist_ok=True)
    marker.write_text(json.dumps(params, sort_keys=True) + "\n", encoding="utf-8")
    with tqdm(total=num_train + num_val, desc="shapes", disable=not progress) as bar:
        _write_split(root, "train", num_train, params, bar)
        _write_split(root, "val", num_val, params, bar)
    _write_json(meta_path, params)  # last: its presence means "complete"
    marker.unlink()
    return _layout(root)


def main(argv: Sequence[str] | None = None) -> dict:
    """Command line: ``python -m minis.data.shapes ROOT [--num-train N] [--num-val N] ...``."""
    parser = argparse.ArgumentParser(prog="python -m minis.data.shapes", description=__doc__.split("\n")[0])
    parser.add_argument("root", help="output folder")
    parser.add_argument("--num-train", type=int, default=1000)
    parser.add_argument("--num-val", type=int, default=200)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--max-objects", type=int, default=6)
    parser.add_argument("--size-range", type=float, nargs=2, default=SIZE_RANGE, metavar=("MIN", "MAX"),
                        help="object diameter range as fractions of the image side")
    parser.add_argument("--plain", action="store_true", help="plain backgrounds, no stripes (textures=False)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing copy")
    args = parser.parse_args(argv)
    paths = make_shapes(
        args.root,
        num_train=args.num_train,
        num_val=args.num_val,
        image_size=args.image_size,
        max_objects=args.max_objects,
        size_range=tuple(args.size_range),
        textures=not args.plain,
        seed=args.seed,
        overwrite=args.overwrite,
    )
    print(f"shapes benchmark ready in {paths['root']} ({paths['num_classes'] - 1} classes)")
    return paths


if __name__ == "__main__":
    main()
