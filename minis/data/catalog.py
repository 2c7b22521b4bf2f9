"""The datasets the command line and the book train on, by name: ``"shapes"`` and ``"coco"``.

>>> train_set, val_set = build_datasets("shapes", "data/shapes", "semantic")

Both datasets also get a ``data_description`` attribute, ``{"kind", "root", "task", ...}``: the
Trainer stores it in every checkpoint, so that ``python -m minis eval runs/x/last.pt`` can
rebuild the same validation set without being told where it is.

Folder layouts:

- shapes (written by :func:`minis.data.make_shapes`, generated here when missing)::

      root/{train,val}/images/*.png   root/{train,val}/labels/*.png
      root/annotations/instances_{train,val}.json   root/meta.json

- coco (``python -m minis data coco ROOT`` downloads it)::

      root/{train2017,val2017}/*.jpg   root/annotations/instances_{train,val}2017.json
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

from torch.utils.data import Dataset

KINDS = ("shapes", "coco")
TASKS = ("semantic", "instance")

# make_shapes arguments recorded in meta.json: reusing them lets a benchmark generated with
# non-default settings (python -m minis data shapes --num-train 50 ...) be found again.
_SHAPES_PARAMETERS = ("num_train", "num_val", "image_size", "max_objects", "min_area", "empty_fraction", "size_range",
                      "textures", "seed")
COCO_SEMANTIC_CROP = 512  # side of the square training crops for COCO semantic segmentation


def _shapes(root: Path, progress: bool) -> dict:
    """Paths of the shapes benchmark in ``root``, generating it (default settings) when missing."""
    from minis.data.shapes import make_shapes

    meta_path = root / "meta.json"
    recorded = json.loads(meta_path.read_text(encoding="utf-8")) if meta_path.is_file() else {}
    settings = {name: recorded[name] for name in _SHAPES_PARAMETERS if name in recorded}
    try:
        paths = make_shapes(root, progress=progress, **settings)
    except FileExistsError as error:  # a non-empty folder that make_shapes did not write
        raise FileNotFoundError(
            f"{root} holds no shapes benchmark (no meta.json) and is not empty; choose another folder or "
            f"generate one with `python -m minis data shapes --root DIR`"
        ) from error
    paths["image_size"] = settings.get("image_size", 128)
    for split in ("train", "val"):
        for path in paths[split].values():
            if not Path(path).exists():
                raise FileNotFoundError(
                    f"the shapes benchmark in {root} is incomplete ({path} is missing); regenerate it with "
                    f"`python -m minis data shapes --root {root} --overwrite`"
                )
    return paths


def _coco_paths(root: Path, split: str) -> tuple[Path, Path]:
    """Image folder and annotation file of one COCO 2017 split; a clear error when absent."""
    image_dir, ann_file = root / f"{split}2017", root / "annotations" / f"instances_{split}2017.json"
    missing = [str(path) for path in (image_dir, ann_file) if not path.exists()]
    if missing:
        raise FileNotFoundError(
            f"COCO {split}2017 is not in {root} (missing: {', '.join(missing)}); download it with "
            f"`python -m minis data coco {root} --splits {split}2017`"
        )
    return image_dir, ann_file


def _default_train_transforms(kind: str, task: str, crop_size: int | None) -> Callable:
    """Augmentation used when the caller gives none.

    Shapes: horizontal flips only. The generator already draws every object at a random size,
    position and rotation, and rescaling a 128-pixel image would push its objects out of the
    range the small models see in a few minutes of training. COCO: random scale and crop for
    semantic, the detection recipe's resize and flip for instance.
    """
    from torchvision.transforms import v2

    from minis.data import transforms

    if kind == "shapes" and crop_size is None:
        return v2.RandomHorizontalFlip(p=0.5)
    if task == "semantic":
        return transforms.semantic_train_transforms(crop_size or COCO_SEMANTIC_CROP)
    return transforms.train_transforms()  # its defaults are the COCO recipe


def build_dataset(
    kind: str,
    root: str | os.PathLike,
    task: str,
    split: str,
    *,
    transforms: Callable | None = None,
    progress: bool = True,
) -> Dataset:
    """One split (``"train"`` or ``"val"``) of benchmark ``kind`` for ``task``, with ``transforms`` as given.

    See :func:`build_datasets`; this is the piece ``minis eval`` uses, which needs no training data.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown dataset kind {kind!r}; choose from {KINDS}")
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose from {TASKS}")
    if split not in ("train", "val"):
        raise ValueError(f"unknown split {split!r}; choose 'train' or 'val'")
    from minis.data.coco import CocoInstances, CocoSemantic

    root = Path(root)
    if kind == "shapes":
        paths = _shapes(root, progress)
        image_dir, ann_file = paths[split]["images"], paths[split]["annotations"]
        if task == "instance":
            # the whole benchmark fits in memory: decode each image and its masks once, not once per epoch
            dataset = CocoInstances(image_dir, ann_file, transforms=transforms, cache=True)
        else:
            from minis.data.semantic import SemanticSegmentation

            label_dir = paths[split]["labels"]
            # the whole benchmark fits in memory: decode each image once, not once per epoch
            dataset = SemanticSegmentation(image_dir, label_dir, paths["class_names"], transforms=transforms,
                                           cache=True)
    else:
        image_dir, ann_file = _coco_paths(root, split)
        dataset_class = CocoInstances if task == "instance" else CocoSemantic
        dataset = dataset_class(image_dir, ann_file, transforms=transforms)
    dataset.data_description = {"kind": kind, "root": str(root), "task": task}
    return dataset


def build_datasets(
    kind: str,
    root: str | os.PathLike,
    task: str,
    *,
    train_transforms: Callable | None = None,
    val_transforms: Callable | None = None,
    crop_size: int | None = None,
    progress: bool = True,
) -> tuple[Dataset, Dataset]:
    """``(train_set, val_set)`` of benchmark ``kind`` for ``task``.

    Args:
        kind: ``"shapes"`` (generated under ``root`` if it is not there yet) or ``"coco"``.
        root: the benchmark's folder.
        task: ``"semantic"`` (:class:`~minis.data.SemanticSegmentation` on the shapes label PNGs,
            :class:`~minis.data.CocoSemantic` on COCO) or ``"instance"``
            (:class:`~minis.data.CocoInstances`).
        train_transforms: augmentation of the training set; ``None`` means the default:
            horizontal flips for shapes; on COCO random scale, crop (``crop_size``) and flip for
            semantic, :func:`minis.data.transforms.train_transforms` for instance.
        val_transforms: applied to the validation set; ``None`` (default) keeps the images as
            they are, which is what the COCO evaluator expects.
        crop_size: semantic training crop (random scale, crop and flip); default 512 on COCO and
            no crops on shapes.
        progress: progress bar while generating the shapes benchmark.

    Both datasets get ``data_description = {"kind", "root", "task"}`` (see the module docstring).

    Raises:
        FileNotFoundError: the COCO files are missing (the message gives the command that
            downloads them) or the shapes folder is incomplete.
        ValueError: unknown ``kind`` or ``task``.
    """
    val_set = build_dataset(kind, root, task, "val", transforms=val_transforms, progress=progress)
    if train_transforms is None:
        train_transforms = _default_train_transforms(kind, task, crop_size)
    train_set = build_dataset(kind, root, task, "train", transforms=train_transforms, progress=progress)
    return train_set, val_set


def class_names(kind: str, root: str | os.PathLike, *, progress: bool = True) -> list[str]:
    """Class names of a benchmark (index 0 = background) without building a dataset.

    The command line needs them before it knows the task: they give the model's ``num_classes``,
    and the model's ``task`` then chooses the dataset.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown dataset kind {kind!r}; choose from {KINDS}")
    if kind == "shapes":
        return list(_shapes(Path(root), progress)["class_names"])
    _, ann_file = _coco_paths(Path(root), "val")
    categories = json.loads(Path(ann_file).read_text(encoding="utf-8"))["categories"]
    return ["background"] + [category["name"] for category in sorted(categories, key=lambda c: c["id"])]
