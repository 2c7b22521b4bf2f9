"""Boxes: area, IoU, generalised IoU, clipping, and the box coder of the R-CNN family.

Every box is ``(x1, y1, x2, y2)`` in pixels with ``x1 <= x2`` and ``y1 <= y2`` (torchvision's
``"xyxy"``). The functions take and return tensors with ``torchvision.ops`` signatures, and the
tests check them against torchvision on random and degenerate boxes, in every dtype.

Areas are products, and products outgrow small types: a 100 x 100 box has an area of 10,000,
beyond int8 (127), and a 300 x 300 one beyond float16 (65,504), where an IoU of ``inf / inf``
becomes ``nan``. So, like torchvision, areas and IoUs are computed in a wider type: int8, uint8
and int16 in int32, float16 and bfloat16 in float32 (:func:`_upcast`). Integer boxes are widened
before anything is subtracted: torchvision subtracts first, so in uint8 the overlap of two boxes
that do not meet wraps around to about 250 pixels, and in int8 corners 200 apart overflow.
"""

from __future__ import annotations

import math

import torch

# Largest log-scale a decoded width or height may grow by: exp(4.135) = 62.5 = 1000 / 16, so a
# 16-pixel anchor can never be decoded into a box wider than 1000 pixels. Without the clamp one
# bad regression early in training overflows exp() and turns the loss into inf.
BBOX_XFORM_CLIP = math.log(1000.0 / 16)


class InvalidBoxesError(ValueError, RuntimeError, AssertionError):
    """Boxes (or their scores or group ids) in a shape or format an op cannot take.

    A ``ValueError``, and also the exception torchvision raises in the same case (a
    ``RuntimeError`` from its kernels' checks, an ``AssertionError`` from its RoI ops' box check),
    so code written against ``torchvision.ops`` catches it too.
    """


def _upcast(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` in a type wide enough for products of box sides (torchvision's ``_upcast``).

    int8, uint8 and int16 become int32; float16 and bfloat16 become float32; int32, int64,
    float32 and float64 are returned as they are, without a copy (the common case costs nothing).
    """
    if tensor.is_floating_point():
        return tensor if tensor.dtype in (torch.float32, torch.float64) else tensor.float()
    return tensor if tensor.dtype in (torch.int32, torch.int64) else tensor.int()


def _upcast_integers(tensor: torch.Tensor) -> torch.Tensor:
    """Small integer types widened before any arithmetic: ``x2 - x1`` already wraps around in
    uint8 when negative and overflows in int8 when more than 127. Floats are left as they are."""
    return tensor if tensor.is_floating_point() else _upcast(tensor)


def _float_compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The floating type torchvision's kernels compute ``dtype`` values in under autocast:
    float64 and float32 stay, anything else (float16, bfloat16, integers) is float32."""
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def box_area(boxes: torch.Tensor) -> torch.Tensor:
    """Area of each box: ``[..., 4] -> [...]``, in the widened type of :func:`_upcast`
    (int32 for int8 boxes, float32 for float16 ones), as ``torchvision.ops.box_area``."""
    boxes = _upcast(boxes)
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def _intersection_and_union(boxes1: torch.Tensor, boxes2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pairwise intersection and union areas: ``[..., N, 4], [..., M, 4] -> [..., N, M]`` twice."""
    boxes1, boxes2 = _upcast_integers(boxes1), _upcast_integers(boxes2)
    top_left = torch.max(boxes1[..., None, :2], boxes2[..., None, :, :2])  # [..., N, M, 2]
    bottom_right = torch.min(boxes1[..., None, 2:], boxes2[..., None, :, 2:])
    # float16 sides are widened after the subtraction, before the product, as torchvision does:
    # the same numbers to the last bit. Clamped: no overlap is a zero side, not a negative one.
    size = _upcast(bottom_right - top_left).clamp(min=0)
    intersection = size[..., 0] * size[..., 1]
    union = box_area(boxes1)[..., None] + box_area(boxes2)[..., None, :] - intersection
    return intersection, union


def box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """Intersection over union of every pair: ``[..., N, 4], [..., M, 4] -> [..., N, M]``.

    Two empty (zero-area) boxes have a union of 0 and an IoU of ``nan``, as in torchvision. The
    result is float64 for float64 boxes, float32 for any other type (integers included).
    """
    intersection, union = _intersection_and_union(boxes1, boxes2)
    return intersection / union


def generalized_box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """Generalised IoU (Rezatofighi et al., CVPR 2019) of every pair: ``[..., N, 4], [..., M, 4] -> [..., N, M]``.

    ``IoU - (C - union) / C`` with ``C`` the area of the smallest box enclosing both. Unlike the
    IoU it keeps falling as two disjoint boxes move apart (down to -1), so as a loss it still has
    a gradient when prediction and target do not overlap. Types as in :func:`box_iou`.
    """
    boxes1, boxes2 = _upcast_integers(boxes1), _upcast_integers(boxes2)
    intersection, union = _intersection_and_union(boxes1, boxes2)
    iou = intersection / union
    top_left = torch.min(boxes1[..., None, :2], boxes2[..., None, :, :2])
    bottom_right = torch.max(boxes1[..., None, 2:], boxes2[..., None, :, 2:])
    size = _upcast(bottom_right - top_left).clamp(min=0)
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
    boxes = _upcast_integers(boxes)  # a uint8 box with x2 < x1 must not wrap around to a wide one
    widths, heights = boxes[..., 2] - boxes[..., 0], boxes[..., 3] - boxes[..., 1]
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
