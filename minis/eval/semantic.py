"""Semantic segmentation metrics from a confusion matrix: mIoU, pixel and mean accuracy.

Everything comes from one ``[C, C]`` matrix of pixel counts: ``matrix[g, p]`` is how many
pixels of ground-truth class ``g`` were predicted as class ``p`` (rows = ground truth,
columns = prediction). For class ``c``:

- true positives  ``TP_c = matrix[c, c]``
- false negatives ``FN_c = row sum - TP_c``     (class ``c`` pixels predicted as something else)
- false positives ``FP_c = column sum - TP_c``  (other pixels predicted as ``c``)
- ``IoU_c = TP_c / (TP_c + FP_c + FN_c)`` and ``accuracy_c = TP_c / (TP_c + FN_c)``.

The matrix is a sum of counts, so it can be accumulated image by image, batch by batch, or
on several processes and added up: with ``torch.distributed``, call
``torch.distributed.all_reduce(confusion.matrix)`` (the default op is a sum) before
:meth:`ConfusionMatrix.compute`.
"""

from __future__ import annotations

import itertools
import math
from typing import Any, Iterable, Sequence

import numpy as np
import torch

from minis.data.coco import IGNORE_INDEX


def _as_label_map(value: Any, what: str) -> torch.Tensor:
    """An integer tensor from a tensor or numpy array of class indices (any shape)."""
    if isinstance(value, torch.Tensor):
        tensor = value.as_subclass(torch.Tensor)  # drop tv_tensors.Mask and friends
    else:
        tensor = torch.as_tensor(np.asarray(value))
    if tensor.is_floating_point() or tensor.is_complex() or tensor.dtype == torch.bool:
        raise TypeError(
            f"{what} must hold integer class indices, got dtype {tensor.dtype}"
            + (" (for logits [B,C,H,W], pass logits.argmax(1))" if what == "pred" else "")
        )
    return tensor


def _check_range(labels: torch.Tensor, num_classes: int, message: str, where: torch.Tensor | None = None) -> None:
    """Raise ValueError(message.format(bad value, C - 1)) unless every label (where ``where``) is in 0..C-1."""
    outside = (labels < 0) | (labels >= num_classes)
    if where is not None:
        outside &= where
    if bool(outside.any()):
        raise ValueError(message.format(int(labels[outside][0]), num_classes - 1))


def _nanmean(values: torch.Tensor) -> float:
    """Mean of the non-nan entries; nan when there are none (without numpy's warning)."""
    present = values[~torch.isnan(values)]
    return float(present.mean()) if len(present) else math.nan


class ConfusionMatrix:
    """Pixel counts ``matrix[ground truth, prediction]`` accumulated over a dataset.

    Args:
        num_classes: C, background included (semantic class 0 is the background).
        ignore_index: target value of pixels that are not scored (VOC's object borders,
            unlabelled pixels); ``None`` when every pixel counts.
        device: where the counts live; inputs are moved there. Keep it on the device the
            predictions are on to avoid copying every batch to the CPU.

    >>> cm = ConfusionMatrix(3)
    >>> cm.update(torch.tensor([0, 1, 2, 2]), torch.tensor([0, 1, 1, 255]))
    >>> cm.matrix.tolist()
    [[1, 0, 0], [0, 1, 1], [0, 0, 0]]
    """

    def __init__(
        self, num_classes: int, ignore_index: int | None = IGNORE_INDEX, device: torch.device | str | None = None
    ) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be at least 1, got {num_classes}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)

    def reset(self) -> None:
        """Forget every pixel counted so far."""
        self.matrix.zero_()

    def update(self, pred: Any, target: Any) -> None:
        """Count one prediction against its ground truth.

        Args:
            pred: predicted class indices, any shape (e.g. ``[H,W]`` or ``[B,H,W]``), values in
                0..C-1; a tensor (any device) or numpy array.
            target: ground-truth class indices of the same shape; pixels equal to
                ``ignore_index`` are skipped, every other value must be in 0..C-1.

        Raises:
            ValueError: shapes differ or a value is out of range (the message says which).
            TypeError: a float/bool input, e.g. logits passed instead of ``argmax``.
        """
        pred = _as_label_map(pred, "pred").to(self.matrix.device)
        target = _as_label_map(target, "target").to(self.matrix.device)
        if pred.shape != target.shape:
            raise ValueError(f"pred has shape {tuple(pred.shape)} but target has {tuple(target.shape)}")
        c = self.num_classes
        _check_range(pred, c, "pred holds class {}, outside 0..{}")
        ignored = None if self.ignore_index is None else target == self.ignore_index
        not_ignored = f" and not ignore_index={self.ignore_index}" if ignored is not None else ""
        _check_range(target, c, "target holds class {}, outside 0..{}" + not_ignored,
                     where=None if ignored is None else ~ignored)
        # Each (ground truth g, prediction p) pair gets its own bin g * C + p: one bincount
        # counts every pixel at once, and the flat histogram reshapes into the C x C matrix.
        # Ignored pixels go to one extra bin, C * C, which is dropped. The bin numbers are built
        # in place in one int64 array (a 12-megapixel photo: 96 MB, and no masked copies).
        bins = target.to(torch.int64, copy=True)
        bins.mul_(c).add_(pred)
        if ignored is not None:
            bins.masked_fill_(ignored, c * c)
        counts = torch.bincount(bins.flatten(), minlength=c * c + 1)[: c * c]
        self.matrix += counts.reshape(c, c)

    def compute(self, class_names: Sequence[str] | None = None) -> dict[str, Any]:
        """Metrics of everything counted so far.

        Returns:
            ``mIoU``: mean of the per-class IoUs that are defined; ``pixel_accuracy``: correct
            pixels / scored pixels; ``mean_accuracy``: mean over classes of TP / (TP + FN);
            ``per_class_iou`` and ``per_class_accuracy``: ``{class name: value}`` (names are
            ``class_names`` or ``"0"``, ``"1"``, ...); ``confusion_matrix``: the matrix as a
            list of lists (rows = ground truth). All metrics are fractions in 0..1.

        A class absent from both ground truth and predictions has IoU ``nan`` (0/0: there was
        nothing to get right or wrong) and is left out of ``mIoU``, the usual convention
        (mmsegmentation's ``nanmean``); a class never in the ground truth but predicted somewhere
        has IoU 0 and does count. Likewise a class without ground-truth pixels has accuracy
        ``nan`` and is left out of ``mean_accuracy``. The background (class 0) is a class like
        the others, as in PASCAL VOC's mIoU.
        """
        names = [str(c) for c in range(self.num_classes)] if class_names is None else list(class_names)
        if len(names) != self.num_classes:
            raise ValueError(f"{len(names)} class_names for {self.num_classes} classes")
        matrix = self.matrix.to("cpu", torch.float64)
        true_positives = matrix.diagonal()
        ground_truth = matrix.sum(dim=1)  # TP + FN
        predicted = matrix.sum(dim=0)  # TP + FP
        union = ground_truth + predicted - true_positives  # TP + FP + FN
        # 0 / 0 gives nan, which is exactly "undefined" for the two per-class ratios.
        iou = true_positives / union
        accuracy = true_positives / ground_truth
        total = float(matrix.sum())
        return {
            "mIoU": _nanmean(iou),
            "pixel_accuracy": float(true_positives.sum()) / total if total else math.nan,
            "mean_accuracy": _nanmean(accuracy),
            "per_class_iou": dict(zip(names, iou.tolist())),
            "per_class_accuracy": dict(zip(names, accuracy.tolist())),
            "confusion_matrix": self.matrix.tolist(),
        }


def _label_maps(maps: Any) -> Iterable[Any]:
    """A single tensor/array is one item; anything else is iterated."""
    return [maps] if isinstance(maps, (torch.Tensor, np.ndarray)) else maps


def semantic_evaluate(
    predictions: Any,
    targets: Any,
    num_classes: int,
    ignore_index: int | None = IGNORE_INDEX,
    class_names: Sequence[str] | None = None,
) -> dict[str, Any]:
    """mIoU, pixel accuracy and per-class IoU of predicted label maps against ground truth.

    Args:
        predictions: predicted label maps (integer class indices, not logits): an iterable of
            tensors or numpy arrays ``[H,W]`` or ``[B,H,W]``, or one such tensor/array.
        targets: ground-truth label maps paired one to one with ``predictions``, same shapes.
        num_classes: C, background included.
        ignore_index: target value of pixels left out of every metric (``None``: none).
        class_names: names for ``per_class_iou`` (default ``"0"``, ``"1"``, ...).

    Returns:
        ``{"mIoU", "pixel_accuracy", "mean_accuracy", "per_class_iou": {name: iou},
        "per_class_accuracy": {name: acc}, "confusion_matrix": [[...], ...]}``; see
        :meth:`ConfusionMatrix.compute` for the definitions and the ``nan`` convention
        (classes absent from both prediction and ground truth are left out of the mean).

    Images of different sizes are fine: each pair is counted on its own and the counts added.
    """
    confusion = ConfusionMatrix(num_classes, ignore_index=ignore_index)
    missing = object()
    pairs = itertools.zip_longest(_label_maps(predictions), _label_maps(targets), fillvalue=missing)
    for index, (pred, target) in enumerate(pairs):
        if pred is missing or target is missing:
            shorter = "predictions" if pred is missing else "targets"
            raise ValueError(f"{shorter} ran out at item {index}: predictions and targets must pair up")
        confusion.update(pred, target)
    return confusion.compute(class_names)
