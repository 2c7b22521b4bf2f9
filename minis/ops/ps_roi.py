"""Position-sensitive RoI pooling (R-FCN, InstanceFCN, FCIS): each bin of a box reads its own channels.

Plain RoI pooling (:mod:`minis.ops.roi`) pools every bin of a box from the same channels, so a
convolutional map cannot tell the top-left of an object from its bottom-right: that is left to
layers run once per box. R-FCN (Dai et al., NIPS 2016) moves the position into the channels
instead. The last convolution gives ``k x k`` score maps per class, and bin ``(i, j)`` of a box's
``k x k`` grid pools only from map ``(i, j)``: the map that learned to fire on, say, the top-left
part of a person. The pooled bins then vote, and a box scores high only where every part sits where
it should. All the work stays shared by the whole image; per box there is nothing left but pooling
and an average. InstanceFCN (Dai et al., ECCV 2016) assembled instance masks from such maps, and
FCIS (Li et al., CVPR 2017) combines both: ``2 k^2 (C+1)`` maps (inside and outside scores for
every class and bin) give each box its mask and class scores.

Shapes and channel layout (torchvision's): ``input [N, C*h*w, H, W]`` with ``output_size = (h, w)``
gives ``[K, C, h, w]``, and input channel ``c*h*w + i*w + j`` feeds output channel ``c`` in bin
``(i, j)``: ``arange(C*h*w).reshape(C, h, w)`` is the layout. Boxes are one ``[K,5]`` tensor
(``batch_index, x1, y1, x2, y2``) or a list of ``[L_i,4]`` tensors, one per image.

* ``ps_roi_align`` samples each bin like :func:`minis.ops.roi_align` and averages the samples;
* ``ps_roi_pool`` averages the whole feature cells of each bin (R-FCN's operator; not a maximum).

torchvision's conventions (verified against its CPU kernels, version 0.29):

* ``ps_roi_align`` shifts the box by half a cell, like ``roi_align(aligned=True)`` (a box from 0
  to 4 on a map whose value is the column index gives 1.5; ``aligned=False`` would give 2), and has
  no minimum size (a box 0.2 wide is sampled at its centre, 0.1 in). ``sampling_ratio <= 0``
  samples ``ceil(bin size)`` points per side.
* ``ps_roi_pool`` rounds ``x * spatial_scale`` half away from zero (C's ``round``), treats the
  rounded end as exclusive (``width = round(x2 s) - round(x1 s)``, at least 1), cuts bins as
  RoIPool does (``floor(p * size / h)`` to ``ceil((p + 1) * size / h)``) and clips them to
  ``[0, H-1]``: the last row and column of the map are never pooled.
* Outside the map, ``ps_roi_align`` follows RoIAlign's rules (a sample more than a cell outside
  counts 0, one within a cell of the border is clamped onto it); a ``ps_roi_pool`` bin clipped
  to nothing gives 0. Boxes of other images, fractional batch indices (truncated) and the boxes'
  gradient (none) are as in RoIAlign and RoIPool.

The original kernels (R-FCN's Caffe ``PSROIPooling``, and MXNet's ``contrib.PSROIPooling`` by the
R-FCN/FCIS authors) differ in ``ps_roi_pool``: they round the box in image pixels before scaling,
count the end pixel in (``round(x2) + 1``), keep at least 0.1 of a cell, add the fractional
start before rounding the bin borders, and clip to ``[0, H]`` (the last row included). MXNet's also
takes a ``group_size``, the number of channel groups per side, which may be smaller than the pooled
size (bin ``p`` then reads group ``floor(p * group / pooled)``); torchvision ties both together.
Both operators here take it too, as a keyword (``group_size=k``): FCIS assembles its ``21 x 21``
masks from ``7 x 7`` groups of maps, each group read by a ``3 x 3`` block of bins. Without it (or
with ``group_size == output_size``) the numbers are torchvision's.

Two departures from torchvision, both where its kernels are wrong:

* with ``sampling_ratio <= 0`` a box of zero width or height has no samples, and torchvision's
  ``ps_roi_align`` divides 0 by 0 (nan, which would poison a training step); here, as in its
  ``roi_align``, such bins are 0;
* torchvision's ``ps_roi_pool`` backward clips the bins to ``[0, H]`` where its forward clips them
  to ``[0, H-1]``, so for a bin that reaches the map's last row or column its gradient is not that
  of its output (it fails ``gradcheck``). Here autograd gives the true gradient; elsewhere both
  give each cell of a bin ``1 / area`` of the bin's gradient.

The rest is computed as RoIAlign and RoIPool are here: in float32 for float16 or bfloat16
features (torchvision's CPU kernels sum float16 in float16 and have no bfloat16, nor CPU
autocast for these ops), and boxes must be finite for ``ps_roi_align`` (its kernel crashes on nan
or inf) and have batch indices inside the batch.
"""

from __future__ import annotations

from typing import Sequence

import torch

from minis.ops.boxes import _float_compute_dtype
from minis.ops.roi import (_CHUNK_ELEMENTS, _as_rois, _batch_indices, _bin_edges, _pair, _roi_align_chunk,
                           _round_half_away, _sampled_rois, _sampling_grid)

Edges = tuple[torch.Tensor, torch.Tensor]  # the first and one-past-last cell of every bin along an axis


def _bin_channels(channels: int, output_size: tuple[int, int], device: torch.device,
                  group_size: int | Sequence[int] | None = None) -> torch.Tensor:
    """The input channel each output channel reads in each bin: ``[C, h, w]`` for ``C*gh*gw`` channels.

    With ``gh x gw`` groups (``group_size``, by default the output size), bin ``(i, j)`` of output
    channel ``c`` reads channel ``c*gh*gw + floor(i*gh/h)*gw + floor(j*gw/w)``: the group of the
    part of the box the bin lies in. When the groups are the bins, that is ``c*h*w + i*w + j``, and
    the layout is simply ``arange(C*h*w)`` read as ``[C, h, w]``.
    """
    pooled_h, pooled_w = output_size
    group_h, group_w = output_size if group_size is None else _pair(group_size)
    if pooled_h * pooled_w <= 0:  # torchvision's kernels divide by zero here
        raise ValueError(f"position-sensitive pooling needs an output size of at least 1 x 1, got "
                         f"{pooled_h} x {pooled_w}")
    if group_h <= 0 or group_w <= 0:
        raise ValueError(f"position-sensitive pooling needs at least 1 x 1 groups, got {group_h} x {group_w}")
    groups = group_h * group_w
    if channels % groups:
        what = f"to {pooled_h} x {pooled_w} bins" if group_size is None else f"with {group_h} x {group_w} groups"
        raise ValueError(f"position-sensitive pooling {what} needs a multiple of {group_h} * {group_w} = {groups} "
                         f"input channels (one group per {'bin' if group_size is None else 'part'}), got {channels}")
    row_group = torch.arange(pooled_h, device=device) * group_h // pooled_h  # floor(i * gh / h)
    col_group = torch.arange(pooled_w, device=device) * group_w // pooled_w
    first = torch.arange(channels // groups, device=device) * groups  # each output channel's first group
    return first[:, None, None] + row_group[None, :, None] * group_w + col_group[None, None, :]


def ps_roi_align(input: torch.Tensor, boxes: torch.Tensor | Sequence[torch.Tensor], output_size: int | Sequence[int],
                 spatial_scale: float = 1.0, sampling_ratio: int = -1, *,
                 group_size: int | Sequence[int] | None = None) -> torch.Tensor:
    """Position-sensitive RoIAlign: ``input [N, C*h*w, H, W]`` -> ``[K, C, h, w]``.

    Bin ``(i, j)`` of output channel ``c`` is RoIAlign's average of bilinear samples (with the
    half-cell shift of ``aligned=True``) taken from input channel ``c*h*w + i*w + j`` only.
    ``sampling_ratio > 0`` samples that many points per bin side; ``<= 0`` picks ``ceil(bin size)``
    per box. Same signature and numbers as ``torchvision.ops.ps_roi_align`` (but 0, not nan, for
    a zero-width box with an adaptive grid; see the module's notes).

    ``group_size = (gh, gw)`` (MXNet's ``PSROIPooling`` option, FCIS's assembly) splits the box into
    ``gh x gw`` parts with one channel each: ``input [N, C*gh*gw, H, W]``, and bin ``(i, j)`` reads
    channel ``c*gh*gw + floor(i*gh/h)*gw + floor(j*gw/w)``. ``None`` means the output size.
    """
    output_size = _pair(output_size)
    bin_channels = _bin_channels(input.shape[1], output_size, input.device, group_size)
    rois, batch_index = _sampled_rois(boxes, input, "ps_roi_align")
    if len(rois) == 0:
        return input.new_zeros(0, len(bin_channels), *output_size)
    # torchvision's kernel shifts by half a cell and keeps tiny boxes tiny: exactly aligned=True
    grid = _sampling_grid(rois, output_size, spatial_scale, sampling_ratio, aligned=True)
    # each output value gathers its own samples: [K, C, h*gh, w*gw] per corner (C*h*w values per box: the
    # input's channels, or more with groups larger than one bin)
    samples_per_box = bin_channels.numel() * max(int(grid[:, 4].max()), 1) * max(int(grid[:, 5].max()), 1)
    chunk = max(1, _CHUNK_ELEMENTS // max(1, samples_per_box))
    pooled = torch.cat([_roi_align_chunk(input, index, part, output_size, bin_channels)
                        for index, part in zip(batch_index.split(chunk), grid.split(chunk))])
    return pooled.to(input.dtype)


def _cells(first: torch.Tensor, last: torch.Tensor, limit: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The cells of every bin along one axis, padded to the longest bin: ``[K, bins * L]`` indices
    (clamped into the map, so that padding can be gathered too) and a mask of the real ones."""
    longest = max(int((last - first).max()), 1)
    offset = torch.arange(longest, device=first.device)
    cells = first[:, :, None] + offset  # [K, bins, L]
    real = cells < last[:, :, None]
    return cells.clamp(max=max(limit - 1, 0)).flatten(1), real.flatten(1)


def _ps_roi_pool_chunk(features: torch.Tensor, batch_index: torch.Tensor, bin_channels: torch.Tensor, rows: Edges,
                       cols: Edges) -> torch.Tensor:
    """The average of each bin's cells for some boxes, given the bins' first and one-past-last rows
    and columns (``[K, h]`` and ``[K, w]`` pairs): ``[K, C, h, w]`` in the features' type."""
    _, _, height, width = features.shape
    channels, pooled_h, pooled_w = bin_channels.shape
    y, real_y = _cells(*rows, height)  # [K, h*Lh]
    x, real_x = _cells(*cols, width)  # [K, w*Lw]
    long_h, long_w = y.shape[1] // pooled_h, x.shape[1] // pooled_w
    channel = bin_channels.repeat_interleave(long_h, dim=1).repeat_interleave(long_w, dim=2)[None]  # [1,C,h*Lh,w*Lw]
    values = features[batch_index[:, None, None, None], channel, y[:, None, :, None], x[:, None, None, :]]
    real = real_y[:, None, :, None] & real_x[:, None, None, :]  # [K,1,h*Lh,w*Lw]
    # where, not a product with the mask: the padding may hold nan or inf, and 0 * inf is nan
    values = torch.where(real, values, values.new_zeros(()))
    sums = values.reshape(len(y), channels, pooled_h, long_h, pooled_w, long_w).sum(dim=(3, 5))
    area = (rows[1] - rows[0])[:, None, :, None] * (cols[1] - cols[0])[:, None, None, :]  # [K,1,h,w]
    return torch.where(area > 0, sums / area.clamp(min=1), sums.new_zeros(()))


def ps_roi_pool(input: torch.Tensor, boxes: torch.Tensor | Sequence[torch.Tensor], output_size: int | Sequence[int],
                spatial_scale: float = 1.0, *, group_size: int | Sequence[int] | None = None) -> torch.Tensor:
    """Position-sensitive RoIPool (R-FCN): ``input [N, C*h*w, H, W]`` -> ``[K, C, h, w]``.

    Bin ``(i, j)`` of output channel ``c`` is the mean of input channel ``c*h*w + i*w + j`` over
    the bin's whole cells (0 for an empty bin). The box is rounded to cells with an exclusive end,
    the bins' borders to whole cells as in RoIPool, and only rows ``< H-1`` and columns ``< W-1``
    are pooled (see the module's notes). Same signature and numbers as ``torchvision.ops.ps_roi_pool``
    and, except for bins that reach the map's last row or column, where torchvision's is wrong, the
    same gradient: each cell of a bin gets ``1 / area`` of the bin's. float16 and bfloat16 features
    are summed in float32. ``group_size`` as in :func:`ps_roi_align`.
    """
    output_size = _pair(output_size)
    bin_channels = _bin_channels(input.shape[1], output_size, input.device, group_size)
    compute_dtype = _float_compute_dtype(input.dtype)
    rois = _as_rois(boxes, compute_dtype, input.device)
    batch_index = _batch_indices(rois, len(input))
    if len(rois) == 0:
        return input.new_zeros(0, len(bin_channels), *output_size)
    _, _, height, width = input.shape
    start_x, start_y, end_x, end_y = _round_half_away(rois[:, 1:] * spatial_scale).long().unbind(1)
    # unlike RoIPool, the rounded end is not counted in, and the bins stop one cell short of the map's end
    roi_w = (end_x - start_x).clamp(min=1).to(compute_dtype)
    roi_h = (end_y - start_y).clamp(min=1).to(compute_dtype)
    rows = _bin_edges(start_y, roi_h, output_size[0], height - 1)  # ([K, h], [K, h])
    cols = _bin_edges(start_x, roi_w, output_size[1], width - 1)  # ([K, w], [K, w])

    # every bin is padded to the longest bin of all boxes: bound the memory of the gathered cells by that
    longest = max(int((rows[1] - rows[0]).max()), 1) * max(int((cols[1] - cols[0]).max()), 1)
    chunk = max(1, _CHUNK_ELEMENTS // max(1, bin_channels.numel() * longest))
    features = input.to(compute_dtype)
    pooled = [_ps_roi_pool_chunk(features, batch_index[part], bin_channels,
                                 (rows[0][part], rows[1][part]), (cols[0][part], cols[1][part]))
              for part in torch.arange(len(rois), device=input.device).split(chunk)]
    return torch.cat(pooled).to(input.dtype)
