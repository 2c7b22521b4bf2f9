"""Instance masks: paste the small ``M x M`` mask of each detection into the full image (Mask R-CNN).

The mask head predicts a ``28 x 28`` map inside each box. To get an image-sized mask, the map is
resized to the box's size in pixels and written at the box's place; everything else is 0.
torchvision's ``paste_masks_in_image`` does this one mask at a time with ``F.interpolate``; here
every mask is resized and pasted at once, with the interpolation written out, and the result is
the same to the last bit.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _axis(box_low: torch.Tensor, box_high: torch.Tensor, image_size: int, mask_size: int,
          dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Where every mask is pasted along one image axis, and from where in the mask it reads.

    ``box_low, box_high [N]`` are whole-pixel box sides, both inclusive: the resized mask covers
    the ``max(box_high - box_low + 1, 1)`` pixels from ``box_low`` on. Returns ``[N, L]`` tensors
    for a window of ``L`` image pixels per mask, ``L`` the most any mask covers inside the image:

    * ``pixel``: the window's image coordinates. It starts at the box, or earlier where the box
      ends less than ``L`` pixels before the image border, so that it always lies inside the image
      and the windows can be written into the image without bounds checks;
    * ``inside``: which of them the mask really covers (inside both the box and the image);
    * ``low, high, w_low, w_high``: the two mask cells to blend and their weights, exactly as
      ``F.interpolate(mode="bilinear", align_corners=False)`` computes them for the resized mask,
      in ``dtype`` (the kernel's accumulation type).
    """
    out_size = (box_high - box_low + 1).clamp(min=1)
    first, stop = box_low.clamp(min=0), (box_high + 1).clamp(max=image_size)  # covered: [first, stop)
    length = int((stop - first).clamp(min=0).max())
    start = torch.minimum(first, torch.full_like(first, image_size - length))
    pixel = start[:, None] + torch.arange(length, device=box_low.device)  # [N, L]
    inside = (pixel >= first[:, None]) & (pixel < stop[:, None])

    # F.interpolate given an output size (no scale factor): scale = in / out, rounded to ``dtype``;
    # source = scale * (destination + 0.5) - 0.5, clamped at 0. The compiled kernel evaluates that
    # with one fused multiply-add, a single rounding: computing it in float64 and rounding once
    # gives the same number (for float32 masks), where float32 steps could be one unit off.
    scale = torch.tensor(mask_size, dtype=dtype, device=box_low.device) / out_size.to(dtype)  # [N]
    destination = (pixel - box_low[:, None]).double()  # pixel within the resized mask
    source = (scale.double()[:, None] * (destination + 0.5) - 0.5).to(dtype).clamp(min=0)
    low = source.floor().long().clamp(max=mask_size - 1)
    high = torch.where(low < mask_size - 1, low + 1, low)  # the last cell blends with itself
    frac = (source - low).clamp(min=0, max=1)
    return {"pixel": pixel, "inside": inside, "low": low, "high": high, "w_low": 1 - frac, "w_high": frac}


def paste_masks_in_image(masks: torch.Tensor, boxes: torch.Tensor, img_shape: tuple[int, int],
                         padding: int = 1) -> torch.Tensor:
    """Paste ``masks [N,1,M,M]`` into their ``boxes [N,4]``: ``[N,1,H,W]`` for ``img_shape (H, W)``.

    As in Mask R-CNN's inference: each mask gets a border of ``padding`` zeros, its box grows by
    the same factor ``(M + 2 padding) / M`` about its centre (so the border lands just outside
    the box and the mask fades to 0 across the box's edge instead of stopping there), the box is
    truncated to whole pixels, the padded mask is bilinearly resized to the box's size
    ``x2 - x1 + 1`` by ``y2 - y1 + 1`` and written where box and image overlap. Pixels outside
    the box are 0. Same numbers as torchvision's ``paste_masks_in_image``.

    All masks are resized at once, separably: first along x, for each of the mask's rows, then
    along y. Only a window as large as the biggest box (within the image) is interpolated per
    mask; the memory is the ``N * H * W`` output plus ``N`` such windows, so boxes covering the
    whole image (or very many masks on a large image) cost as much as the output itself.
    """
    height, width = img_shape
    if len(masks) == 0:
        return masks.new_zeros(0, 1, height, width)

    # the grown box: the same operations as torchvision, then truncated towards 0 like a C cast
    scale = (masks.shape[-1] + 2 * padding) / masks.shape[-1]
    half_w, half_h = (boxes[:, 2] - boxes[:, 0]) * 0.5 * scale, (boxes[:, 3] - boxes[:, 1]) * 0.5 * scale
    centre_x, centre_y = (boxes[:, 2] + boxes[:, 0]) * 0.5, (boxes[:, 3] + boxes[:, 1]) * 0.5
    x1, x2 = (centre_x - half_w).long(), (centre_x + half_w).long()
    y1, y2 = (centre_y - half_h).long(), (centre_y + half_h).long()

    dtype = torch.promote_types(masks.dtype, torch.float32)  # half masks are blended in float32
    padded = F.pad(masks[:, 0], (padding,) * 4).to(dtype)  # [N, M', M']
    rows = _axis(y1, y2, height, padded.shape[-2], dtype)  # [N, Ly] each
    cols = _axis(x1, x2, width, padded.shape[-1], dtype)  # [N, Lx] each

    # along x: every mask row at the window's columns. Then along y: the window's rows. The order
    # (x first, then y) is the interpolation kernel's, and keeps the result bit-identical.
    def columns(index: torch.Tensor) -> torch.Tensor:
        return padded.gather(2, index[:, None, :].expand(-1, padded.shape[1], -1))  # [N, M', Lx]

    across = columns(cols["low"]) * cols["w_low"][:, None, :] + columns(cols["high"]) * cols["w_high"][:, None, :]

    def lines(index: torch.Tensor) -> torch.Tensor:
        return across.gather(1, index[:, :, None].expand(-1, -1, across.shape[2]))  # [N, Ly, Lx]

    window = lines(rows["low"]) * rows["w_low"][:, :, None] + lines(rows["high"]) * rows["w_high"][:, :, None]
    window = torch.where(rows["inside"][:, :, None] & cols["inside"][:, None, :], window, torch.zeros_like(window))

    # each window lies inside the image, no two of its pixels alike: a plain indexed write
    pasted = masks.new_zeros(len(masks), height, width)
    mask_index = torch.arange(len(masks), device=masks.device)[:, None, None]
    pasted[mask_index, rows["pixel"][:, :, None], cols["pixel"][:, None, :]] = window.to(masks.dtype)
    return pasted[:, None]
