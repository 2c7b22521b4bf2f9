"""Boxes: area, IoU, generalised IoU, clipping, and the box coder of the R-CNN family.

Every box is ``(x1, y1, x2, y2)`` in pixels with ``x1 <= x2`` and ``y1 <= y2`` (torchvision's
``"xyxy"``). The functions take and return tensors with ``torchvision.ops`` signatures, and the
tests check them against torchvision on random and degenerate boxes.
"""

from __future__ import annotations

import math

import torch

# Largest log-scale a decoded width or height may grow by: exp(4.135) = 62.5 = 1000 / 16, so a
# 16-pixel anchor can never be decoded into a box wider than 1000 pixels. Without the clamp one
# bad regression early in training overflows exp() and turns the loss into inf.
BBOX_XFORM_CLIP = math.log(1000.0 / 16)


def box_area(boxes: torch.Tensor) -> torch.Tensor:
    """Area of each box: ``[N,4] -> [N]``."""
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


def _intersection_and_union(boxes1: torch.Tensor, boxes2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pairwise intersection and union areas: ``[N,4], [M,4] -> [N,M], [N,M]``."""
    top_left = torch.max(boxes1[:, None, :2], boxes2[None, :, :2])  # [N,M,2]
    bottom_right = torch.min(boxes1[:, None, 2:], boxes2[None, :, 2:])
    size = (bottom_right - top_left).clamp(min=0)  # no overlap -> a zero side, not a negative one
    intersection = size[..., 0] * size[..., 1]
    union = box_area(boxes1)[:, None] + box_area(boxes2)[None, :] - intersection
    return intersection, union


def box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """Intersection over union of every pair: ``[N,4], [M,4] -> [N,M]``.

    Two empty (zero-area) boxes have a union of 0 and an IoU of ``nan``, as in torchvision.
    """
    intersection, union = _intersection_and_union(boxes1, boxes2)
    return intersection / union


def generalized_box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """Generalised IoU (Rezatofighi et al., CVPR 2019) of every pair: ``[N,4], [M,4] -> [N,M]``.

    ``IoU - (C - union) / C`` with ``C`` the area of the smallest box enclosing both. Unlike the
    IoU it keeps falling as two disjoint boxes move apart (down to -1), so as a loss it still has
    a gradient when prediction and target do not overlap.
    """
    intersection, union = _intersection_and_union(boxes1, boxes2)
    iou = intersection / union
    top_left = torch.min(boxes1[:, None, :2], boxes2[None, :, :2])
    bottom_right = torch.max(boxes1[:, None, 2:], boxes2[None, :, 2:])
    size = (bottom_right - top_left).clamp(min=0)
    enclosing = size[..., 0] * size[..., 1]
    return iou - (enclosing - union) / enclosing


def clip_boxes_to_image(boxes: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Clamp ``[..., 4]`` boxes into an image of ``size = (height, width)``."""
    height, width = size
    x = boxes[..., 0::2].clamp(min=0, max=width)
    y = boxes[..., 1::2].clamp(min=0, max=height)
    return torch.stack((x, y), dim=-1).reshape(boxes.shape)


def remove_small_boxes(boxes: torch.Tensor, min_size: float) -> torch.Tensor:
    """Indices (int64 ``[K]``) of the boxes whose width and height are both at least ``min_size``."""
    widths, heights = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    return torch.where((widths >= min_size) & (heights >= min_size))[0]


class BoxCoder:
    """Boxes as offsets from reference boxes (anchors or proposals), and back (R-CNN's encoding).

    A box with centre ``(x, y)`` and size ``(w, h)`` relative to a reference ``(xa, ya, wa, ha)``:

        tx = wx (x - xa) / wa     ty = wy (y - ya) / ha     tw = ww log(w / wa)     th = wh log(h / ha)

    Offsets scaled by the reference size make the targets independent of the object's scale;
    the log makes growing and shrinking symmetric. ``weights = (wx, wy, ww, wh)`` rescale the four
    targets to similar variances (torchvision: 1, 1, 1, 1 for the RPN and 10, 10, 5, 5 for the
    box head). Decoding clamps ``tw, th`` at ``bbox_xform_clip`` before ``exp``.
    """

    def __init__(self, weights: tuple[float, float, float, float],
                 bbox_xform_clip: float = BBOX_XFORM_CLIP) -> None:
        self.weights = weights
        self.bbox_xform_clip = bbox_xform_clip

    @staticmethod
    def _centres_and_sizes(boxes: torch.Tensor) -> tuple[torch.Tensor, ...]:
        widths = boxes[..., 2] - boxes[..., 0]
        heights = boxes[..., 3] - boxes[..., 1]
        return boxes[..., 0] + 0.5 * widths, boxes[..., 1] + 0.5 * heights, widths, heights

    def encode_single(self, reference_boxes: torch.Tensor, proposals: torch.Tensor) -> torch.Tensor:
        """Targets ``[N,4]`` that turn ``proposals [N,4]`` into ``reference_boxes [N,4]``.

        torchvision's argument names: ``reference_boxes`` are the ground-truth boxes to reach,
        ``proposals`` the anchors or proposals they are expressed against.
        """
        wx, wy, ww, wh = self.weights
        x, y, w, h = self._centres_and_sizes(reference_boxes)
        xa, ya, wa, ha = self._centres_and_sizes(proposals)
        return torch.stack((wx * (x - xa) / wa, wy * (y - ya) / ha,
                            ww * torch.log(w / wa), wh * torch.log(h / ha)), dim=1)

    def encode(self, reference_boxes: list[torch.Tensor], proposals: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """:meth:`encode_single` on lists (one tensor per image), returned split the same way."""
        counts = [len(boxes) for boxes in reference_boxes]
        targets = self.encode_single(torch.cat(reference_boxes), torch.cat(proposals))
        return targets.split(counts, 0)

    def decode_single(self, rel_codes: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """Boxes from offsets: ``rel_codes [N,4K]`` against ``boxes [N,4]`` -> ``[N,4K]``.

        ``K`` sets of offsets per reference box (one per class in the box head) decode at once.
        """
        boxes = boxes.to(rel_codes.dtype)
        wx, wy, ww, wh = self.weights
        xa, ya, wa, ha = (t[:, None] for t in self._centres_and_sizes(boxes))  # [N,1]
        dx, dy = rel_codes[:, 0::4] / wx, rel_codes[:, 1::4] / wy  # [N,K]
        dw = (rel_codes[:, 2::4] / ww).clamp(max=self.bbox_xform_clip)
        dh = (rel_codes[:, 3::4] / wh).clamp(max=self.bbox_xform_clip)
        x, y = dx * wa + xa, dy * ha + ya
        w, h = torch.exp(dw) * wa, torch.exp(dh) * ha
        # torchvision writes the half sizes as c_to_c_h = 0.5 * h, the same numbers
        corners = torch.stack((x - 0.5 * w, y - 0.5 * h, x + 0.5 * w, y + 0.5 * h), dim=2)  # [N,K,4]
        return corners.flatten(1)

    def decode(self, rel_codes: torch.Tensor, boxes: list[torch.Tensor]) -> torch.Tensor:
        """:meth:`decode_single` for the boxes of all images: ``[sum N, 4K] -> [sum N, K, 4]``."""
        reference = torch.cat(boxes, dim=0)
        return self.decode_single(rel_codes.reshape(len(reference), -1), reference).reshape(len(reference), -1, 4)
