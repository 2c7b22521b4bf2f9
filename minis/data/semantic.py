"""Semantic segmentation from a folder of images and a folder of label PNGs.

The simplest dataset format there is, used by PASCAL VOC, Cityscapes-style exports and the
shapes benchmark's ``labels/`` folders: ``image_dir/NAME.png`` (or ``.jpg``) is paired with
``label_dir/NAME.png``, a single-channel image whose pixel values are class indices
(0 background, 1..K classes, 255 "ignore": not counted in the loss or the metrics).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import tv_tensors

from minis.data.coco import IGNORE_INDEX

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


class SemanticSegmentation(Dataset):
    """Pairs of ``(image, label map)`` read from two folders, sorted by file name.

    Item ``i`` is ``(image, target)`` with ``image`` a :class:`tv_tensors.Image` float32
    ``[3,H,W]`` in 0..1 and ``target = {"semantic": tv_tensors.Mask int64 [H,W], "image_id": int}``;
    ``transforms(image, target)``, when given, is applied to both (torchvision v2 transforms
    resize and crop the mask with nearest-neighbour sampling because it is a ``Mask``).

    Attributes:
        class_names: names with index 0 the background.
        num_classes: ``len(class_names)`` (background included, like the models' ``num_classes``).
        ids: ``int(stem)`` of each file when every stem is a number (for the shapes benchmark
            these are the COCO image ids), otherwise the index ``0..n-1``.
        image_paths, label_paths: the paired files, in item order.

    With ``cache=True`` each pair is decoded once and kept in memory (as uint8 arrays: 64 KB for a
    128-pixel image and its labels), so that later epochs skip the PNG decoding: the same
    arrays, hence the same items, a fifth to a quarter less time per epoch for the small models of
    the semantic chapters on 2 CPU cores. Worth it for a benchmark that fits in memory (the shapes
    benchmark: 65 MB for its 1000 training images); off by default, since a real dataset does not.

    Raises at construction when a folder is missing or empty, or an image has no label file;
    at item access when image and label sizes disagree, the label is not single-channel, or it
    holds values that are neither a class index nor 255. Each message names the file.
    """

    def __init__(
        self,
        image_dir: str | os.PathLike,
        label_dir: str | os.PathLike,
        class_names: Sequence[str],
        transforms: Callable | None = None,
        cache: bool = False,
    ) -> None:
        self.image_dir, self.label_dir = Path(image_dir), Path(label_dir)
        self.cache: dict[int, tuple[np.ndarray, np.ndarray]] | None = {} if cache else None
        for folder in (self.image_dir, self.label_dir):
            if not folder.is_dir():
                raise FileNotFoundError(f"SemanticSegmentation: folder {folder} does not exist")
        self.class_names = list(class_names)
        self.num_classes = len(self.class_names)
        self.transforms = transforms

        self.image_paths = sorted(p for p in self.image_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not self.image_paths:
            raise FileNotFoundError(f"SemanticSegmentation: no {'/'.join(IMAGE_SUFFIXES)} images in {self.image_dir}")
        stems = [p.stem for p in self.image_paths]
        duplicated = sorted({s for s in stems if stems.count(s) > 1})
        if duplicated:
            raise ValueError(
                f"SemanticSegmentation: {self.image_dir} has several images named {duplicated[:5]} "
                "(different extensions); each would pair with the same label PNG"
            )
        self.label_paths = [self.label_dir / f"{p.stem}.png" for p in self.image_paths]
        missing = [str(image) for image, label in zip(self.image_paths, self.label_paths) if not label.is_file()]
        if missing:
            shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            raise FileNotFoundError(
                f"SemanticSegmentation: {len(missing)} image(s) have no label PNG in {self.label_dir}: {shown}"
            )
        self.ids = [int(s) for s in stems] if all(s.isdigit() for s in stems) else list(range(len(stems)))

    def __len__(self) -> int:
        return len(self.image_paths)

    def _read_label(self, index: int, image_size: tuple[int, int]) -> np.ndarray:
        """uint8 ``[H,W]`` class indices of item ``index``, checked against the image."""
        path = self.label_paths[index]
        with Image.open(path) as label:
            # "P" (palette) PNGs, as VOC ships them, store the class index as the palette index.
            if label.mode not in ("L", "P"):
                raise ValueError(
                    f"SemanticSegmentation: label {path} has mode {label.mode!r}; expected a single-channel "
                    "PNG (mode 'L' or 'P') whose pixel values are class indices"
                )
            if label.size != image_size:
                raise ValueError(
                    f"SemanticSegmentation: label {path} is {label.size[0]}x{label.size[1]} but image "
                    f"{self.image_paths[index]} is {image_size[0]}x{image_size[1]} (width x height)"
                )
            values = np.array(label, dtype=np.uint8)
        invalid = (values >= self.num_classes) & (values != IGNORE_INDEX)
        if invalid.any():
            bad = sorted(set(np.unique(values[invalid]).tolist()))
            raise ValueError(
                f"SemanticSegmentation: label {path} holds values {bad[:10]} that are neither a class index "
                f"(0..{self.num_classes - 1}) nor {IGNORE_INDEX} (ignore)"
            )
        return values

    def _read_pair(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """uint8 ``[H,W,3]`` image and ``[H,W]`` labels of item ``index``, decoded and checked."""
        with Image.open(self.image_paths[index]) as image:
            rgb = np.array(image.convert("RGB"), dtype=np.uint8)  # [H,W,3]
            image_size = image.size
        return rgb, self._read_label(index, image_size)

    def __getitem__(self, index: int):
        if self.cache is None:
            rgb, label = self._read_pair(index)
        else:
            if index not in self.cache:
                self.cache[index] = self._read_pair(index)
            rgb, label = self.cache[index]
        image_tensor = tv_tensors.Image(torch.from_numpy(rgb).permute(2, 0, 1).float().div_(255))
        target = {
            "semantic": tv_tensors.Mask(torch.from_numpy(label).long()),
            "image_id": self.ids[index],
        }
        if self.transforms is not None:
            image_tensor, target = self.transforms(image_tensor, target)
        return image_tensor, target

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({len(self)} images from {self.image_dir}, labels from {self.label_dir}, "
            f"{self.num_classes} classes)"
        )
