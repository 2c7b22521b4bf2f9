"""Anchors: the reference boxes a detector's heads predict offsets from (Faster R-CNN's RPN).

At every position of a feature map sits the same small set of boxes, one per (size, aspect
ratio) pair, centred on the position's top-left pixel in the image; the positions are one
stride apart. With FPN each level gets its own size (32 px on the stride-4 map up to 512 px on
the stride-64 map), so every object has a level whose anchors fit it.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


def cell_anchors(sizes: Sequence[float], aspect_ratios: Sequence[float],
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> torch.Tensor:
    """Zero-centred anchors ``[len(aspect_ratios) * len(sizes), 4]``, ratio-major.

    An anchor of size ``s`` and aspect ratio ``r = height / width`` has area ``s**2``:
    ``width = s / sqrt(r)``, ``height = s * sqrt(r)``. The corners are rounded to whole pixels,
    as in torchvision (and Detectron before it).
    """
    scales = torch.as_tensor(sizes, dtype=dtype, device=device)
    height_ratios = torch.sqrt(torch.as_tensor(aspect_ratios, dtype=dtype, device=device))
    widths = ((1 / height_ratios)[:, None] * scales[None, :]).reshape(-1)
    heights = (height_ratios[:, None] * scales[None, :]).reshape(-1)
    return (torch.stack([-widths, -heights, widths, heights], dim=1) / 2).round()


def grid_anchors(base: torch.Tensor, grid_size: Sequence[int], stride: Sequence[int], offset: float = 0.0
                 ) -> torch.Tensor:
    """Every anchor of ``base [A,4]`` at every position of a ``(h, w)`` grid: ``[h*w*A, 4]``.

    Position ``(i, j)`` is the image point ``((j + offset) * stride_x, (i + offset) * stride_y)``:
    the cell's top-left corner by default (torchvision's), its centre with ``offset=0.5`` (SSD's and
    YOLACT's). The anchors of one position are consecutive, positions in row-major order (the order
    a head's ``[B, A*4, h, w]`` output has once permuted to ``[B, h, w, A, 4]``).
    """
    (height, width), (stride_y, stride_x) = grid_size, stride
    # whole pixels in int32 at offset 0, exactly as torchvision computes them
    xs = torch.arange(width, dtype=torch.int32, device=base.device)
    ys = torch.arange(height, dtype=torch.int32, device=base.device)
    if offset:
        xs, ys = xs.to(base.dtype) + offset, ys.to(base.dtype) + offset
    xs, ys = xs * stride_x, ys * stride_y
    y, x = torch.meshgrid(ys, xs, indexing="ij")
    centres = torch.stack([x, y, x, y], dim=-1).reshape(-1, 1, 4)  # [h*w, 1, 4]
    return (centres + base[None]).reshape(-1, 4)


class AnchorGenerator(nn.Module):
    """torchvision's ``AnchorGenerator``: anchors for each image, all feature maps concatenated.

    ``sizes`` holds one tuple of sizes per feature map, ``aspect_ratios`` one tuple of ratios per
    feature map (or a single tuple for all). ``forward(image_list, feature_maps)`` takes anything
    with ``.tensors [B,3,H,W]`` and ``.image_sizes`` (torchvision's ``ImageList``) and returns a
    list of ``[sum over levels of h*w*A, 4]`` tensors, one per image; ``offset`` places them in
    their cells (:func:`grid_anchors`, 0 as torchvision). The stride of a level is the
    padded batch size divided by the map size (integer division). One difference: the anchors of
    float16/bfloat16 feature maps (mixed precision) are float32, not the maps' type.
    """

    def __init__(self, sizes: Sequence[Sequence[float]] = ((128, 256, 512),),
                 aspect_ratios: Sequence[Sequence[float]] = ((0.5, 1.0, 2.0),), offset: float = 0.0) -> None:
        super().__init__()
        self.offset = offset  # where the anchors sit in their cell, in strides (see grid_anchors)
        if not isinstance(sizes[0], (list, tuple)):
            sizes = tuple((size,) for size in sizes)
        if not isinstance(aspect_ratios[0], (list, tuple)):
            aspect_ratios = (aspect_ratios,) * len(sizes)
        if len(aspect_ratios) != len(sizes):
            raise ValueError(f"{len(sizes)} levels of sizes but {len(aspect_ratios)} of aspect ratios")
        self.sizes, self.aspect_ratios = tuple(sizes), tuple(aspect_ratios)

    def num_anchors_per_location(self) -> list[int]:
        return [len(sizes) * len(ratios) for sizes, ratios in zip(self.sizes, self.aspect_ratios)]

    def forward(self, image_list, feature_maps: list[torch.Tensor]) -> list[torch.Tensor]:
        if len(feature_maps) != len(self.sizes):
            raise ValueError(f"{len(feature_maps)} feature maps for {len(self.sizes)} levels of anchor sizes")
        image_height, image_width = image_list.tensors.shape[-2:]
        # Coordinates stay in float32 (or float64) when the features are float16/bfloat16 under
        # autocast: in bfloat16 a coordinate near 800 px would be rounded to a multiple of 4.
        dtype = torch.promote_types(feature_maps[0].dtype, torch.float32)
        device = feature_maps[0].device
        levels = []
        for feature_map, sizes, ratios in zip(feature_maps, self.sizes, self.aspect_ratios):
            grid = feature_map.shape[-2:]
            stride = (image_height // grid[0], image_width // grid[1])
            levels.append(grid_anchors(cell_anchors(sizes, ratios, dtype, device), grid, stride, self.offset))
        anchors = torch.cat(levels)
        return [anchors for _ in image_list.image_sizes]
