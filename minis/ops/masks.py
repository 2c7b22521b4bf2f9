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
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


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
    # along x first (each mask row at every image column), then along y: the kernel's order
    pasted = rows @ (padded @ cols.transpose(1, 2))  # [N, H, M'] @ [N, M', W] -> [N, H, W]
    return pasted.to(masks.dtype)[:, None]
