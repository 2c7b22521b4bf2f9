"""Instance masks: paste the small ``M x M`` mask of each detection into the full image (Mask R-CNN).

The mask head predicts a ``28 x 28`` map inside each box. To get an image-sized mask, the map is
resized to the box's size in pixels and written at the box's place; everything else is 0.
torchvision's ``paste_masks_in_image`` does this one mask at a time with ``F.interpolate``.

Here all masks are pasted at once, with one observation: bilinear resizing is a linear map. Row
``y`` of the resized mask is a weighted sum of two mask rows, and column ``x`` of two mask
columns. So resizing a mask and pasting it into the image is two matrix products,

    pasted = R_y @ mask @ R_x.T        R_y: [H, M],  mask: [M, M],  R_x: [W, M]

where row ``y`` of ``R_y`` holds the two weights of the mask rows that image row ``y`` reads, and
is all zeros where ``y`` is outside the box (``R_x`` likewise for columns). ``torch.bmm`` does it
for every mask in one call and writes the ``[N, H, W]`` result directly: zeros outside the boxes
come for free, and no pixel is scattered anywhere.

Compact masks for large images
------------------------------
torchvision's output contract gives every detection an image-sized mask of float probabilities.
On a 12-megapixel photo, 100 detections are ``100 x 12e6 x 4`` bytes = 4.8 GB, and thresholding
or encoding them all at once needs as much again. The evaluator and ``minis predict`` only need
binary masks, which COCO stores as run-length encodings (RLE: a few hundred bytes per object).
So inside ``with rle_masks():`` every instance model returns ``masks`` as a list of COCO RLEs
instead, made a chunk of detections at a time by :func:`detection_masks`: at most
:data:`CHUNK_BYTES` of float masks exist at any moment. A model honours the switch by building
its output masks with :func:`detection_masks` (``DetectionTransform.postprocess`` and
``CondInst.postprocess`` do), so a new architecture gets it by reusing them.
"""

from __future__ import annotations

import contextlib
from contextvars import ContextVar
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

CHUNK_BYTES = 64 * 2**20  # float masks rendered at once on the compact path: 1 detection of 12 Mpx, 15 of 1 Mpx

# The threshold of the active ``rle_masks`` block, None outside one. A ContextVar, so that the
# switch holds for this thread (or asyncio task) only.
_RLE_THRESHOLD: ContextVar[float | None] = ContextVar("minis_rle_mask_threshold", default=None)


def _resize_matrix(box_low: torch.Tensor, box_high: torch.Tensor, image_size: int, mask_size: int,
                   dtype: torch.dtype) -> torch.Tensor:
    """``R [N, image_size, mask_size]``: row ``p`` blends the two mask cells that image pixel ``p`` reads.

    ``box_low, box_high [N]`` are the first and last pixel (whole pixels) of each box along this
    axis; the mask is resized to ``max(box_high - box_low + 1, 1)`` pixels from ``box_low`` on,
    as ``F.interpolate(mode="bilinear", align_corners=False)`` does it, in ``dtype`` (the
    kernel's accumulation type). Rows of pixels outside the box are 0.
    """
    out_size = (box_high - box_low + 1).clamp(min=1)
    pixel = torch.arange(image_size, device=box_low.device)

    # Given an output size (no scale factor), F.interpolate uses scale = in / out, rounded to
    # ``dtype``, and source = scale * (destination + 0.5) - 0.5, clamped at 0. The compiled kernel
    # evaluates the latter as one fused multiply-add, a single rounding: computing it in float64 and
    # rounding once gives the same number, where float32 steps can be one unit off.
    scale = torch.tensor(mask_size, dtype=dtype, device=box_low.device) / out_size.to(dtype)  # [N]
    destination = (pixel - box_low[:, None]).double()  # [N, image_size]: the pixel's place in the box
    source = (scale.double()[:, None] * (destination + 0.5) - 0.5).to(dtype).clamp(min=0)
    low = source.floor().long().clamp(max=mask_size - 1)
    high = torch.where(low < mask_size - 1, low + 1, low)  # the last cell blends with itself
    frac = (source - low).clamp(min=0, max=1)

    weights = (1 - frac)[..., None] * F.one_hot(low, mask_size) + frac[..., None] * F.one_hot(high, mask_size)
    inside = (pixel >= box_low[:, None]) & (pixel <= box_high[:, None])  # empty for an inverted box
    return weights.to(dtype) * inside[..., None]


def paste_masks_in_image(masks: torch.Tensor, boxes: torch.Tensor, img_shape: tuple[int, int],
                         padding: int = 1) -> torch.Tensor:
    """Paste ``masks [N,1,M,M]`` into their ``boxes [N,4]``: ``[N,1,H,W]`` for ``img_shape (H, W)``.

    As in Mask R-CNN's inference: each mask gets a border of ``padding`` zeros, its box grows by
    the same factor ``(M + 2 padding) / M`` about its centre (so the border lands just outside
    the box and the mask fades to 0 across the box's edge instead of stopping there), the box is
    truncated to whole pixels, and the padded mask is bilinearly resized to the box's size
    ``x2 - x1 + 1`` by ``y2 - y1 + 1`` and written where box and image overlap. Pixels outside
    the box are 0. Same numbers as torchvision's ``paste_masks_in_image`` up to float rounding
    (a unit or two in the last place).

    Cost: ``N * H * W * (M + 2 padding)`` multiply-adds whatever the boxes' sizes, mostly with zeros
    but at matrix-multiply speed; memory: the output plus two small ``[N, H or W, M + 2 padding]``
    matrices. The masks must be finite (probabilities are): ``0 * inf`` would spread a NaN along
    the whole row and column.
    """
    height, width = img_shape
    if len(masks) == 0:
        return masks.new_zeros(0, 1, height, width)

    # the grown box, in the same operations as torchvision, then truncated towards 0 like a C cast
    scale = (masks.shape[-1] + 2 * padding) / masks.shape[-1]
    half_w, half_h = (boxes[:, 2] - boxes[:, 0]) * 0.5 * scale, (boxes[:, 3] - boxes[:, 1]) * 0.5 * scale
    centre_x, centre_y = (boxes[:, 2] + boxes[:, 0]) * 0.5, (boxes[:, 3] + boxes[:, 1]) * 0.5
    x1, x2 = (centre_x - half_w).long(), (centre_x + half_w).long()
    y1, y2 = (centre_y - half_h).long(), (centre_y + half_h).long()

    dtype = torch.promote_types(masks.dtype, torch.float32)  # half masks are blended in float32
    padded = F.pad(masks[:, 0], (padding,) * 4).to(dtype)  # [N, M', M']
    rows = _resize_matrix(y1, y2, height, padded.shape[1], dtype)  # [N, H, M']
    cols = _resize_matrix(x1, x2, width, padded.shape[2], dtype)  # [N, W, M']
    # along x first (each mask row at every image column), then along y: the kernel's order. Not
    # under autocast, which would multiply in float16/bfloat16 and round the masks to 2-3 digits
    # (torchvision's F.interpolate keeps float32 there).
    with torch.autocast(masks.device.type, enabled=False):
        pasted = rows @ (padded @ cols.transpose(1, 2))  # [N, H, M'] @ [N, M', W] -> [N, H, W]
    return pasted.to(masks.dtype)[:, None]


def resize_masks(masks: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Whole-image probabilities ``[N,1,h,w]`` -> ``[N,1,*size]``, bilinear; unchanged when already that size.

    For models whose masks cover the whole (resized) image rather than a box (CondInst, ...).
    """
    if tuple(masks.shape[-2:]) != tuple(size) and len(masks):
        masks = F.interpolate(masks, size=size, mode="bilinear", align_corners=False)
    return masks.reshape(len(masks), 1, *size)


# --------------------------------------------------------------------------------------------
# Compact output masks (see the module docstring)
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def rle_masks(threshold: float = 0.5) -> Iterator[None]:
    """Within the block, instance models return ``masks`` as COCO RLEs of ``probability > threshold``.

    One RLE per detection, ``{"size": [H, W], "counts": str}`` as pycocotools writes it (``counts``
    decoded to ``str``, so results are JSON-able); the same binary masks the evaluator would get
    by thresholding the probabilities. Outside the block models keep torchvision's ``[N,1,H,W]``
    probabilities. ``minis.engine.evaluate`` and ``minis predict`` use it.
    """
    token = _RLE_THRESHOLD.set(float(threshold))
    try:
        yield
    finally:
        _RLE_THRESHOLD.reset(token)


def encode_rle(binary: torch.Tensor) -> list[dict]:
    """COCO compressed RLE of each mask of ``binary [N,H,W]`` (bool or 0/1), ``counts`` as ``str``."""
    from pycocotools import mask as mask_utils

    if len(binary) == 0:
        return []
    binary = (binary if binary.dtype == torch.bool else binary != 0).cpu()
    # pycocotools wants a Fortran-ordered uint8 [H,W,N] array: the bytes of [N,W,H] in C order
    columns = binary.transpose(1, 2).contiguous().view(torch.uint8).numpy()  # [N,W,H], 0 or 1
    rles = mask_utils.encode(columns.transpose(2, 1, 0))
    for rle in rles:
        rle["counts"] = rle["counts"].decode("ascii")
    return rles


def chunk_slices(count: int, height: int, width: int, bytes_per_pixel: int = 4) -> list[slice]:
    """Consecutive slices of ``count`` detections whose ``[n,H,W]`` masks fit in :data:`CHUNK_BYTES` (1 at least)."""
    step = max(1, CHUNK_BYTES // max(1, height * width * bytes_per_pixel))
    return [slice(start, min(start + step, count)) for start in range(0, count, step)]


def detection_masks(count: int, image_size: tuple[int, int], render: Callable[[slice], torch.Tensor]
                    ) -> torch.Tensor | list[dict]:
    """The ``masks`` of an output dict: ``[N,1,H,W]`` probabilities, or N COCO RLEs inside :func:`rle_masks`.

    ``render(part)`` returns the probabilities ``[n,1,H,W]`` at ``image_size (H, W)`` of the
    detections in slice ``part`` of the ``count`` detections. Normally it is called once for all
    of them; inside :func:`rle_masks` once per chunk of :func:`chunk_slices`, each chunk
    thresholded and encoded before the next is rendered.
    """
    threshold = _RLE_THRESHOLD.get()
    if threshold is None:
        return render(slice(0, count))
    rles: list[dict] = []
    for part in chunk_slices(count, *image_size):
        rles += encode_rle(render(part)[:, 0] > threshold)
    return rles


def mask_overlaps(masks1: torch.Tensor, masks2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Intersection and union of every pair of masks: ``[N,H,W]`` x ``[M,H,W]`` (binary or soft, 0..1)
    -> two ``[N,M]`` float32 tensors.

    The intersections of all pairs are one matrix product of the flattened masks (the way SOLOv2's
    Matrix NMS computes them). For binary masks both are whole pixel counts, exact below 2^24 pixels.
    """
    flat1, flat2 = masks1.flatten(1).float(), masks2.flatten(1).float()
    intersection = flat1 @ flat2.T  # [N, M]
    return intersection, flat1.sum(1)[:, None] + flat2.sum(1)[None, :] - intersection


def mask_iou(masks1: torch.Tensor, masks2: torch.Tensor) -> torch.Tensor:
    """IoU of every pair of masks: ``[N,H,W]`` x ``[M,H,W]`` -> ``[N,M]`` (:func:`mask_overlaps`); two empty
    masks have IoU 0."""
    intersection, union = mask_overlaps(masks1, masks2)
    return intersection / union.clamp(min=1e-6)


def mask_boxes(masks: torch.Tensor) -> torch.Tensor:
    """The box around each binary mask: ``[N,H,W]`` -> ``[N,4]`` float (x1, y1, x2, y2) in pixel edges.

    A mask covering columns ``3..7`` gets ``x1 = 3``, ``x2 = 8``: the box of its pixels' squares,
    as COCO measures boxes (``torchvision.ops.masks_to_boxes`` returns the last pixel's index,
    ``7``, one less; it also loops over the masks, where the first and last occupied row and column
    of every mask here come from one ``any`` and ``argmax`` each). An empty mask gets ``[0, 0, 0, 0]``.
    """
    count, height, width = masks.shape
    rows, columns = masks.any(dim=2), masks.any(dim=1)  # [N,H], [N,W]: which rows / columns hold a pixel
    y1 = rows.int().argmax(dim=1)  # first True (argmax returns the first maximum)
    y2 = height - rows.flip(1).int().argmax(dim=1)
    x1 = columns.int().argmax(dim=1)
    x2 = width - columns.flip(1).int().argmax(dim=1)
    boxes = torch.stack([x1, y1, x2, y2], dim=1).float()
    return torch.where(rows.any(dim=1, keepdim=True), boxes, torch.zeros_like(boxes))
