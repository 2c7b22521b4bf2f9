"""Non-maximum suppression: keep the best box of every cluster of overlapping detections.

Greedy NMS visits the boxes from the highest score down and keeps a box unless a box it has
already kept overlaps it by more than ``iou_threshold``. Written that way it is a Python loop
over boxes. Here it is a few matrix operations instead, with the same result:

1. sort by score and compute the IoU of every pair once: ``overlaps[i, j]`` is true when box
   ``j`` scores higher than box ``i`` and their IoU exceeds the threshold;
2. box ``i`` is kept exactly when no *kept* box in row ``i`` overlaps it. That rule refers to
   the answer itself, but only to boxes that come earlier in the order, so it can be iterated:
   start by keeping everything and re-apply the rule until nothing changes. After ``k`` rounds
   the first ``k`` boxes are certainly right, and the answer is the unique fixed point; in
   practice a handful of rounds suffices, because the chains "A suppresses B, which would
   have suppressed C" are short.

The IoU matrix costs ``N^2`` memory: fine for the few thousand boxes per image and class that
detectors pass to NMS, not for tens of thousands at once.
"""

from __future__ import annotations

import torch

from minis.ops.boxes import box_iou


def _greedy_keep(overlaps: torch.Tensor) -> torch.Tensor:
    """bool ``[N]``: which boxes greedy NMS keeps, given ``overlaps [N,N]`` in score order.

    ``overlaps[i, j]`` must be false for ``j >= i`` (a box is only suppressed by better boxes).
    """
    keep = torch.ones(overlaps.shape[0], dtype=torch.bool, device=overlaps.device)
    while True:
        suppressed = (overlaps & keep[None, :]).any(dim=1)  # some kept, better box overlaps me
        new_keep = ~suppressed
        if torch.equal(new_keep, keep):
            return keep
        keep = new_keep


def _nms_in_order(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float,
                  groups: torch.Tensor | None) -> torch.Tensor:
    # A stable sort keeps equal scores in index order, as torchvision's kernel does.
    order = torch.sort(scores, descending=True, stable=True).indices
    boxes = boxes[order]
    overlaps = box_iou(boxes, boxes) > iou_threshold  # nan (two empty boxes) compares false
    if groups is not None:
        groups = groups[order]
        overlaps &= groups[:, None] == groups[None, :]  # only boxes of the same group compete
    overlaps = torch.tril(overlaps, diagonal=-1)  # row i: only the boxes ranked before i
    return order[_greedy_keep(overlaps)]


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Indices (int64 ``[K]``, by decreasing score) of the boxes greedy NMS keeps.

    ``boxes [N,4]`` (x1, y1, x2, y2), ``scores [N]``. A box is dropped when a higher-scoring kept
    box has IoU ``> iou_threshold`` with it. Same signature and result as ``torchvision.ops.nms``.
    """
    return _nms_in_order(boxes, scores, iou_threshold, None)


def batched_nms(boxes: torch.Tensor, scores: torch.Tensor, idxs: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """NMS within each group (``idxs [N]``, e.g. the class): boxes of different groups never
    suppress each other. Returns the kept indices by decreasing score, as
    ``torchvision.ops.batched_nms``.

    torchvision shifts each group's boxes far apart so that one plain NMS cannot mix them; here
    the IoU matrix is simply masked to pairs of the same group.
    """
    return _nms_in_order(boxes, scores, iou_threshold, idxs)
