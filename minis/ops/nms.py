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

Fast NMS (YOLACT) stops after the first round: a box goes when any better box overlaps it, kept or
not. It keeps a subset of what greedy NMS keeps.

The IoU matrix costs ``N^2`` memory: fine for the few thousand boxes per image and class that
detectors pass to NMS, not for tens of thousands at once. The batched versions compute one block
per group (class), so their cost is that of the largest group, not of all boxes together.

Two details follow torchvision's CPU kernel exactly. The IoU is computed in float32 for boxes of
any other type than float32 and float64 (torchvision's kernel under autocast: float16 or
bfloat16 boxes from a mixed-precision detector would otherwise round IoUs to 2 or 3 digits and
change which boxes survive). And the threshold is a Python float, a float64: an IoU is compared
with that number, not with its nearest float32 (``0.2`` would become ``0.2000000030``, and an
IoU of exactly ``float32(0.2)`` would survive where the kernel suppresses it).
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import torch

from minis.ops.boxes import InvalidBoxesError, _float_compute_dtype, box_iou
from minis.ops.masks import mask_iou, mask_overlaps


def _greedy_keep(overlaps: torch.Tensor) -> torch.Tensor:
    """bool ``[N]``: which boxes greedy NMS keeps, given ``overlaps [N,N]`` in score order.

    ``overlaps[i, j]`` must be false for ``j >= i`` (a box is only suppressed by better boxes).
    """
    keep = torch.ones(overlaps.shape[:-1], dtype=torch.bool, device=overlaps.device)  # [..., N]: blocks too
    while True:
        suppressed = (overlaps & keep[..., None, :]).any(dim=-1)  # some kept, better box overlaps me
        new_keep = ~suppressed
        if torch.equal(new_keep, keep):
            return keep
        keep = new_keep


@functools.lru_cache(maxsize=64)  # a detector asks for the same one or two thresholds every time
def _largest_not_above(threshold: float, dtype: torch.dtype) -> float:
    """The largest number of ``dtype`` that is not above ``threshold`` (a float64)."""
    exact = torch.tensor(threshold, dtype=torch.float64)
    rounded = exact.to(dtype)  # to the nearest: possibly just above the threshold
    if rounded.double() > exact:
        rounded = torch.nextafter(rounded, torch.tensor(-math.inf, dtype=dtype))
    return rounded.item()


def _exceeds(values: torch.Tensor, threshold: float) -> torch.Tensor:
    """``values > threshold``, exactly as if both were float64 (as torchvision's kernel compares).

    ``tensor > 0.2`` would round 0.2 to the tensor's type first. Instead the threshold is replaced
    by the largest number of that type not above it: a value of the type exceeds one exactly
    when it exceeds the other. A ``nan`` on either side compares false.
    """
    # exactly representable in values.dtype, so the comparison rounds it no further
    return values > _largest_not_above(float(threshold), values.dtype)


def _check_boxes_and_scores(boxes: torch.Tensor, scores: torch.Tensor) -> None:
    """Raise :class:`InvalidBoxesError` unless ``boxes`` is ``[N, 4]`` and ``scores`` is ``[N]``."""
    if boxes.dim() != 2 or boxes.shape[1] != 4:
        raise InvalidBoxesError(f"boxes must be [N, 4] (x1, y1, x2, y2), got shape {tuple(boxes.shape)}")
    if scores.dim() != 1 or len(scores) != len(boxes):
        raise InvalidBoxesError(f"scores must be [N] with N = {len(boxes)}, one per box, got shape {tuple(scores.shape)}")


def _fast_keep(overlaps: torch.Tensor) -> torch.Tensor:
    """bool ``[N]``: which boxes Fast NMS keeps, given ``overlaps [N,N]`` in score order: those that no
    better box overlaps, kept or not (the first round of :func:`_greedy_keep`)."""
    return ~overlaps.any(dim=-1)


def _nms_in_order(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float,
                  keep_rule: Callable[[torch.Tensor], torch.Tensor] = _greedy_keep) -> torch.Tensor:
    # A stable sort keeps equal scores in index order, as torchvision's kernel does.
    order = torch.sort(scores, descending=True, stable=True).indices
    boxes = boxes[order].to(_float_compute_dtype(boxes.dtype))  # float16 boxes: IoU in float32
    overlaps = _exceeds(box_iou(boxes, boxes), iou_threshold)  # nan (two empty boxes) compares false
    overlaps = torch.tril(overlaps, diagonal=-1)  # row i: only the boxes ranked before i
    return order[keep_rule(overlaps)]


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Indices (int64 ``[K]``, by decreasing score) of the boxes greedy NMS keeps.

    ``boxes [N,4]`` (x1, y1, x2, y2), ``scores [N]``. A box is dropped when a higher-scoring kept
    box has IoU ``> iou_threshold`` with it. Same signature and result as ``torchvision.ops.nms``
    (its CPU kernel: the CUDA kernel compares ``intersection > threshold * union`` in float32,
    which can differ in the last bit). Boxes or scores of other shapes raise
    :class:`InvalidBoxesError`.
    """
    _check_boxes_and_scores(boxes, scores)
    return _nms_in_order(boxes, scores, iou_threshold)


def fast_nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Fast NMS (Bolya et al., *YOLACT*, ICCV 2019): indices (int64 ``[K]``, by decreasing score) of
    the boxes that no higher-scoring box overlaps by IoU ``> iou_threshold``, whether or not that box
    is itself kept.

    YOLACT's rule, in its terms: sort by score, take the IoU matrix, keep its upper triangle (each
    box against the better ones), and keep a box when its column's maximum is at most the
    threshold. It is the first round of the iteration that greedy NMS needs (see the module's
    notes), so a box suppressed by a box that is itself suppressed stays suppressed: the kept set
    is a subset of :func:`nms`'s, and equal to it when no removed box would have removed another.
    One IoU matrix and a maximum, no sequential step: the speed YOLACT wanted on a GPU.
    """
    _check_boxes_and_scores(boxes, scores)
    return _nms_in_order(boxes, scores, iou_threshold, keep_rule=_fast_keep)


def batched_fast_nms(boxes: torch.Tensor, scores: torch.Tensor, idxs: torch.Tensor,
                     iou_threshold: float) -> torch.Tensor:
    """:func:`fast_nms` within each group (``idxs [N]``, e.g. the class), as :func:`batched_nms`:
    boxes of different groups never suppress each other (YOLACT runs it per class, all classes at once)."""
    return _batched(boxes, scores, idxs, iou_threshold, _fast_keep)


def batched_nms(boxes: torch.Tensor, scores: torch.Tensor, idxs: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """NMS within each group (``idxs [N]``, e.g. the class): boxes of different groups never
    suppress each other. Returns the kept indices by decreasing score, as
    ``torchvision.ops.batched_nms``.

    torchvision shifts each group's boxes far apart so that one plain NMS cannot mix them; here
    the IoU matrix is simply masked to pairs of the same group (the shift rounds float16 boxes,
    and lets groups meet when coordinates are negative; the mask does neither). Without boxes the
    result is empty whatever ``scores`` and ``idxs`` are, as in torchvision.
    """
    return _batched(boxes, scores, idxs, iou_threshold, _greedy_keep)


def _batched(boxes: torch.Tensor, scores: torch.Tensor, idxs: torch.Tensor, iou_threshold: float,
             keep_rule: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """NMS per group on one block per group: ``[G, M, M]`` overlaps, ``M`` the largest group's size.

    Boxes of different groups are never compared, so 80 classes of 200 boxes cost 80 x 200^2
    IoUs rather than 16000^2 (YOLACT's layout for Fast NMS: one padded row of boxes per class).
    """
    if boxes.numel() == 0:
        return torch.empty(0, dtype=torch.int64, device=boxes.device)
    _check_boxes_and_scores(boxes, scores)
    if idxs.dim() != 1 or len(idxs) != len(boxes):
        raise InvalidBoxesError(f"idxs must be [N] with N = {len(boxes)}, one per box, got shape {tuple(idxs.shape)}")
    # by group, then by decreasing score within the group (ties in index order, as torchvision's kernel)
    order = torch.sort(scores, descending=True, stable=True).indices
    order = order[torch.sort(idxs[order], stable=True).indices]
    _, counts = torch.unique_consecutive(idxs[order], return_counts=True)
    group = torch.repeat_interleave(torch.arange(len(counts), device=boxes.device), counts)
    rank = torch.arange(len(order), device=boxes.device) - (torch.cumsum(counts, 0) - counts)[group]
    dtype = _float_compute_dtype(boxes.dtype)  # float16 boxes: IoU in float32
    blocks = torch.zeros(len(counts), int(counts.max()), 4, dtype=dtype, device=boxes.device)
    blocks[group, rank] = boxes[order].to(dtype)
    real = torch.zeros(blocks.shape[:2], dtype=torch.bool, device=boxes.device)
    real[group, rank] = True
    overlaps = _exceeds(box_iou(blocks, blocks), iou_threshold) & real[:, None, :]  # padding suppresses nothing
    overlaps = torch.tril(overlaps, diagonal=-1)  # row i: only the boxes ranked before i in its group
    kept = order[keep_rule(overlaps)[group, rank]].sort().values
    return kept[torch.sort(scores[kept], descending=True, stable=True).indices]  # all groups, by score


def matrix_nms(masks: torch.Tensor, labels: torch.Tensor, scores: torch.Tensor, kernel: str = "gaussian",
               sigma: float = 2.0) -> torch.Tensor:
    """Matrix NMS (Wang et al., *SOLOv2*, NeurIPS 2020): every mask's score decayed by the better
    masks of its class that overlap it, all in one matrix computation. Returns ``[N]`` decayed
    scores in the input's order; nothing is removed (the caller thresholds them).

    ``masks [N,H,W]`` (binary, or probabilities), ``labels [N]``, ``scores [N]``. With the masks
    ranked by score, mask ``j`` is decayed by each better mask ``i`` of its class, by ``f(iou_ij)``;
    but mask ``i`` may itself be a duplicate that will be suppressed, so its effect is divided by
    the decay it most likely suffers, ``f(comp_i)``, where ``comp_i`` is ``i``'s largest IoU with a
    better mask of its class:

        decay_j = min over better i of  f(iou_ij) / f(comp_i),    score_j <- score_j * decay_j

    ``kernel="gaussian"``: ``f(x) = exp(-sigma x^2)`` (the released code's form; the paper writes
    ``exp(-x^2 / sigma)``); ``"linear"``: ``f(x) = 1 - x``. Greedy NMS needs one round per kept mask;
    here the IoU of every pair is one matrix product, and the rest is element-wise, which is what
    makes it fast on a GPU with hundreds of masks.

    One departure from the released code: with the linear kernel a mask ``i`` that is identical to
    a better one has ``f(comp_i) = 0``, and the released code divides by it (``inf``, or ``nan``
    where ``f(iou_ij)`` is 0 too: three identical masks give the third a ``nan`` score). Such a mask
    is decayed to 0 itself, so here it decays nothing (its ratio counts as ``inf``): the decayed
    scores are the released code's wherever that is finite, and never ``nan``.
    """
    if kernel not in ("gaussian", "linear"):
        raise ValueError(f"kernel must be 'gaussian' or 'linear', got {kernel!r}")
    count = len(scores)
    if masks.shape[0] != count or labels.shape != (count,) or scores.dim() != 1:
        raise ValueError(f"masks [N,H,W], labels [N] and scores [N] must agree: got {tuple(masks.shape)}, "
                         f"{tuple(labels.shape)}, {tuple(scores.shape)}")
    if count == 0:
        return scores.clone()
    order = torch.sort(scores, descending=True, stable=True).indices
    iou = mask_iou(masks[order], masks[order])  # [N, N], rows and columns by decreasing score
    same_class = labels[order][:, None] == labels[order][None, :]
    better = torch.ones(count, count, dtype=torch.bool, device=scores.device).triu(diagonal=1)  # [i, j]: i ranks before j
    decay_iou = torch.where(same_class & better, iou, 0.0)  # [i, j]: what better mask i does to j
    compensation = decay_iou.max(dim=0).values  # [N]: comp_i, mask i's largest IoU with a better one
    if kernel == "gaussian":
        ratio = torch.exp(-sigma * (decay_iou ** 2 - compensation[:, None] ** 2))  # f(iou_ij) / f(comp_i)
    else:
        own = 1 - compensation[:, None]  # f(comp_i); 0 for an exact duplicate
        ratio = torch.where(own > 0, (1 - decay_iou) / own.clamp(min=1e-12), torch.inf)
    # Pairs that are not (better, same class) have decay_iou 0, a ratio 1 / f(comp_i) >= 1. The best
    # mask has comp 0, so its row holds f(iou) <= 1: every column's minimum is at most 1, and the
    # minimum may run over all i, as in the released code.
    decay = ratio.min(dim=0).values  # [N]
    decayed = torch.empty_like(scores)
    decayed[order] = scores[order] * decay.to(scores.dtype)
    return decayed


def batched_mask_nms(masks: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor,
                     iou_threshold: float) -> torch.Tensor:
    """Greedy NMS on masks within each class: indices (int64 ``[K]``, by decreasing score) of the kept masks.

    ``masks [N,H,W]``, ``scores [N]``, ``labels [N]``. A mask goes when a better, *kept* mask of its
    class overlaps it by mask IoU ``> iou_threshold`` (:func:`minis.ops.mask_iou`). The reference for
    :func:`matrix_nms`: the same IoU matrix, but greedy NMS must settle which masks are kept before it
    knows what they suppress (:func:`_greedy_keep` iterates to that fixed point), where Matrix NMS
    only decays scores and needs one pass.
    """
    if len(scores) == 0:
        return torch.empty(0, dtype=torch.int64, device=scores.device)
    order = torch.sort(scores, descending=True, stable=True).indices
    same_class = labels[order][:, None] == labels[order][None, :]
    # IoU > t as intersection > t x union in float64: exact for the pixel counts of binary masks, where a
    # float32 IoU of exactly 0.3 rounds to 0.30000001 and would suppress
    intersection, union = mask_overlaps(masks[order], masks[order])
    overlaps = (intersection.double() > iou_threshold * union.double()) & same_class
    return order[_greedy_keep(torch.tril(overlaps, diagonal=-1))]
