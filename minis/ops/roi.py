"""RoI pooling: a fixed-size feature map for every box, whatever its size (Fast/Mask R-CNN).

* ``roi_pool`` (Fast R-CNN) snaps the box to the feature grid, cuts it into ``h x w`` bins whose
  borders are rounded to whole cells, and max-pools each bin. Every rounding shifts the features
  against the box by up to one cell: 16 image pixels at stride 16.
* ``roi_align`` (Mask R-CNN) rounds nothing. Each bin is sampled at a few points of a regular
  grid, each point bilinearly interpolated from its four neighbouring cells, and the samples are
  averaged. ``aligned=True`` shifts the box by half a cell first, so that the pixel-centre
  convention is right (a box from 0 to 1 covers the first cell's centre); ``sampling_ratio=0``
  picks ``ceil(bin size)`` points per bin side, separately for every box.

Both take the boxes as one ``[K,5]`` tensor (``batch_index, x1, y1, x2, y2``) or as a list of
``[L_i,4]`` tensors, one per image, with ``torchvision.ops`` signatures. All boxes are processed
together; only the samples of very many boxes are gathered in chunks, to bound the memory.

As in torchvision's kernels, the boxes are constants (no gradient flows into them), and the
arithmetic on coordinates and weights is float32 for float16 or bfloat16 features: in bfloat16
a coordinate of 300.3 is 300, so every sample would move by up to a cell. The result has the
features' type (torchvision's kernels under autocast, CPU or CUDA, do the same).

* ``multiscale_roi_align`` / ``MultiScaleRoIAlign`` (FPN, Lin et al. 2017) pool each box from one
  level of a feature pyramid, chosen by the box's size (``fpn_level``): small boxes from the fine
  maps, large ones from the coarse maps, so every box covers about the same number of cells.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from torch import nn
from torchvision.ops import roi_align as tv_roi_align

from minis.ops.boxes import InvalidBoxesError, _float_compute_dtype, box_area

# Upper bound on the elements of one chunk's gathered samples ([K, C, h*gh, w*gw] per corner).
_CHUNK_ELEMENTS = 2**23


def _as_rois(boxes: torch.Tensor | Sequence[torch.Tensor], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``[K,5]`` rows ``(batch_index, x1, y1, x2, y2)`` from either accepted box format, detached.

    ``boxes`` is one ``[K, 5]`` tensor or a list (or tuple) of ``[L_i, 4]`` tensors, one per
    image (torchvision's ``check_roi_boxes_shape``); anything else raises :class:`InvalidBoxesError`.
    """
    if isinstance(boxes, torch.Tensor):
        if boxes.dim() != 2 or boxes.shape[1] != 5:
            raise InvalidBoxesError(f"boxes as one tensor must be a Tensor[K, 5] (batch index, x1, y1, x2, y2), got "
                                    f"shape {tuple(boxes.shape)}; per-image boxes go in a list of Tensor[L_i, 4]")
        return boxes.detach().to(device=device, dtype=dtype)
    if not isinstance(boxes, (list, tuple)):
        raise InvalidBoxesError(f"boxes must be a Tensor[K, 5] or a list of Tensor[L_i, 4], one per image; "
                                f"got {type(boxes).__name__}")
    for i, image_boxes in enumerate(boxes):
        if not isinstance(image_boxes, torch.Tensor) or image_boxes.dim() != 2 or image_boxes.shape[1] != 4:
            shape = tuple(image_boxes.shape) if isinstance(image_boxes, torch.Tensor) else type(image_boxes).__name__
            raise InvalidBoxesError(f"boxes as a list must hold one Tensor[L_i, 4] (x1, y1, x2, y2) per image; "
                                    f"image {i} has {shape}")
    rows = [torch.cat([torch.full_like(b[:, :1], i), b], dim=1) for i, b in enumerate(boxes)]
    rois = torch.cat(rows) if rows else torch.zeros(0, 5)
    return rois.detach().to(device=device, dtype=dtype)


def _batch_indices(rois: torch.Tensor, batch_size: int) -> torch.Tensor:
    """The image of each RoI, int64 ``[K]``; an index outside the batch raises :class:`InvalidBoxesError`
    (torchvision's kernels would read outside the features, and Python's indexing counts a
    negative one from the end)."""
    index = rois[:, 0].long()  # a fractional index is truncated, like the kernels' cast to int
    if len(index) and (index.min() < 0 or index.max() >= batch_size):
        raise InvalidBoxesError(f"the boxes' batch indices must be in [0, {batch_size - 1}] for {batch_size} images, "
                                f"got {int(index.min())}..{int(index.max())}")
    return index


def _sampled_rois(boxes: torch.Tensor | Sequence[torch.Tensor], input: torch.Tensor,
                  op: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``[K,5]`` rois for sampling ``input`` (float32 coordinates for float16/bfloat16 features: in
    bfloat16 a coordinate of 300.3 is 300) and their image indices; boxes with nan or inf, on which
    torchvision's kernels crash, raise :class:`InvalidBoxesError` naming ``op``."""
    rois = _as_rois(boxes, _float_compute_dtype(input.dtype), input.device)
    batch_index = _batch_indices(rois, len(input))
    if not torch.isfinite(rois).all():
        raise InvalidBoxesError(f"{op} needs finite boxes; these hold nan or inf (a diverged box regression?)")
    return rois, batch_index


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def _sample_coordinates(start: torch.Tensor, bin_size: torch.Tensor, grid: torch.Tensor, bins: int,
                        max_grid: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample positions along one axis: ``[K, bins * max_grid]`` and a validity mask of that shape.

    Box ``k``'s bin ``p`` is sampled at ``start + p * bin + (i + 0.5) * bin / grid[k]`` for
    ``i < grid[k]``; the positions ``i >= grid[k]`` exist only to give every box the same shape.
    """
    p = torch.arange(bins, dtype=start.dtype, device=start.device)[None, :, None]  # [1,bins,1]
    i = torch.arange(max_grid, dtype=start.dtype, device=start.device)[None, None, :]  # [1,1,G]
    start, bin_size, grid_f = start[:, None, None], bin_size[:, None, None], grid[:, None, None].to(start.dtype)
    # the same order of operations as torchvision's kernel, so the samples match to the last bit;
    # an empty box (grid 0, possible with aligned=True) has no valid sample, and no 0 / 0 either
    positions = start + p * bin_size + (i + 0.5) * bin_size / grid_f.clamp(min=1)
    valid = (i < grid_f).expand_as(positions)
    return positions.reshape(len(start), bins * max_grid), valid.reshape(len(start), bins * max_grid)


def _bilinear_weights(positions: torch.Tensor, size: int) -> tuple[torch.Tensor, ...]:
    """Low/high cell indices and weights for positions along an axis of ``size`` cells.

    torchvision's rules: a sample more than one cell outside the map contributes 0; one within a
    cell of the border is clamped onto it.
    """
    inside = (positions >= -1.0) & (positions <= size)
    positions = positions.clamp(min=0)
    low = positions.floor().long()
    at_edge = low >= size - 1
    low = torch.where(at_edge, size - 1, low)
    high = torch.where(at_edge, size - 1, low + 1)
    positions = torch.where(at_edge, low.to(positions.dtype), positions)
    frac = positions - low
    return low, high, 1 - frac, frac, inside


def _sampling_grid(rois: torch.Tensor, output_size: tuple[int, int], spatial_scale: float, sampling_ratio: int,
                   aligned: bool) -> torch.Tensor:
    """Per box ``[K,6]``: ``x1, y1`` on the feature map, the bin size ``bin_w, bin_h`` and the
    number of samples per bin side ``grid_w, grid_h`` (whole numbers, stored as floats)."""
    pooled_h, pooled_w = output_size
    offset = 0.5 if aligned else 0.0
    x1, y1, x2, y2 = (rois[:, i] * spatial_scale - offset for i in range(1, 5))
    roi_w, roi_h = x2 - x1, y2 - y1
    if not aligned:  # the original Mask R-CNN code forced boxes to at least one cell
        roi_w, roi_h = roi_w.clamp(min=1.0), roi_h.clamp(min=1.0)
    if sampling_ratio > 0:
        grid_w, grid_h = torch.full_like(roi_w, sampling_ratio), torch.full_like(roi_h, sampling_ratio)
    else:  # adaptive: about one sample per feature cell
        grid_w, grid_h = torch.ceil(roi_w / pooled_w), torch.ceil(roi_h / pooled_h)
    return torch.stack([x1, y1, roi_w / pooled_w, roi_h / pooled_h, grid_w, grid_h], dim=1)


def _roi_align_chunk(features: torch.Tensor, batch_index: torch.Tensor, grid: torch.Tensor,
                     output_size: tuple[int, int], bin_channels: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`roi_align` for the boxes of ``grid [K,6]`` (see :func:`_sampling_grid`): ``[K, C, h, w]``.

    ``bin_channels [C_out, h, w]``, if given, is the input channel each output channel reads in
    each bin (position-sensitive pooling, :mod:`minis.ops.ps_roi`); by default output channel
    ``c`` reads input channel ``c`` in every bin.
    """
    _, _, height, width = features.shape
    pooled_h, pooled_w = output_size
    x1, y1, bin_w, bin_h, grid_w, grid_h = grid.unbind(1)
    max_gh, max_gw = max(int(grid_h.max()), 1), max(int(grid_w.max()), 1)

    ys, valid_y = _sample_coordinates(y1, bin_h, grid_h, pooled_h, max_gh)  # [K, h*gh]
    xs, valid_x = _sample_coordinates(x1, bin_w, grid_w, pooled_w, max_gw)  # [K, w*gw]
    y_low, y_high, wy_low, wy_high, inside_y = _bilinear_weights(ys, height)
    x_low, x_high, wx_low, wx_high, inside_x = _bilinear_weights(xs, width)

    batch = batch_index[:, None, None, None]  # [K,1,1,1]
    if bin_channels is None:
        channel = torch.arange(features.shape[1], device=features.device)[None, :, None, None]  # [1,C,1,1]
    else:  # every sample of bin (i, j) reads that bin's channel
        channel = bin_channels.repeat_interleave(max_gh, dim=1).repeat_interleave(max_gw, dim=2)[None]
    channels = channel.shape[1]

    def corner(wy: torch.Tensor, wx: torch.Tensor, y_index: torch.Tensor, x_index: torch.Tensor) -> torch.Tensor:
        """One of the four bilinear terms, weight times value: ``[K, C, h*gh, w*gw]``."""
        weight = (wy[:, :, None] * wx[:, None, :])[:, None]  # [K,1,h*gh,w*gw]
        return weight * features[batch, channel, y_index[:, None, :, None], x_index[:, None, None, :]]

    values = (corner(wy_low, wx_low, y_low, x_low) + corner(wy_low, wx_high, y_low, x_high)
              + corner(wy_high, wx_low, y_high, x_low) + corner(wy_high, wx_high, y_high, x_high))
    keep = (valid_y & inside_y)[:, :, None] & (valid_x & inside_x)[:, None, :]  # [K,h*gh,w*gw]
    # where, not a product with the mask: a padding or outside sample may have read an inf, and
    # 0 * inf is nan (torchvision's kernel never reads them)
    values = torch.where(keep[:, None], values, values.new_zeros(()))
    sums = values.reshape(len(grid), channels, pooled_h, max_gh, pooled_w, max_gw).sum(dim=(3, 5))
    count = (grid_h * grid_w).clamp(min=1)[:, None, None, None]
    return sums / count


def roi_align(input: torch.Tensor, boxes: torch.Tensor | Sequence[torch.Tensor], output_size: int | Sequence[int],
              spatial_scale: float = 1.0, sampling_ratio: int = -1, aligned: bool = False) -> torch.Tensor:
    """RoIAlign (He et al., Mask R-CNN, ICCV 2017): ``input [N,C,H,W]`` -> ``[K, C, h, w]``.

    ``boxes`` are in image coordinates; ``spatial_scale`` (1 / stride) maps them onto the feature
    map. ``sampling_ratio > 0`` samples that many points per bin side; ``<= 0`` picks
    ``ceil(bin size)`` per box. Same signature and numbers as ``torchvision.ops.roi_align``; the
    output has the type of ``input``, computed in float32 when that is float16 or bfloat16.
    """
    output_size = _pair(output_size)
    # float16/bfloat16 features: positions and weights in float32; the weighted sums promote to it
    rois, batch_index = _sampled_rois(boxes, input, "roi_align")
    if len(rois) == 0 or 0 in output_size:
        return input.new_zeros(len(rois), input.shape[1], *output_size)
    grid = _sampling_grid(rois, output_size, spatial_scale, sampling_ratio, aligned)
    # every box of a chunk is sampled on the chunk's largest grid: bound the memory by that
    samples_per_box = output_size[0] * output_size[1] * max(int(grid[:, 4].max()), 1) * max(int(grid[:, 5].max()), 1)
    chunk = max(1, _CHUNK_ELEMENTS // max(1, input.shape[1] * samples_per_box))
    pooled = torch.cat([_roi_align_chunk(input, index, part, output_size)
                        for index, part in zip(batch_index.split(chunk), grid.split(chunk))])
    return pooled.to(input.dtype)


def roi_align_matrices(rois: torch.Tensor, feature_size: tuple[int, int], output_size: int | Sequence[int],
                       spatial_scale: float = 1.0, sampling_ratio: int = -1,
                       aligned: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """RoIAlign as two matrix products: ``(rows [K, h, H], cols [K, w, W])`` for ``rois [K,5]``.

    A sample's bilinear weight on cell ``(y, x)`` is a weight on row ``y`` times one on column
    ``x``, its validity is a condition on its y times one on its x, and a bin's samples form a
    grid; so the whole average over a bin factorises, and for box ``k`` on image ``b``::

        roi_align(features)[k, c] == rows[k] @ features[b, c] @ cols[k].T      # [h, w]

    with the ``1 / (grid_h * grid_w)`` of the average folded into ``rows``. Each matrix row holds
    a box's few non-zero weights on an ``H`` (or ``W``) axis; :func:`roi_align_matmul_backward`
    uses them to spread gradients back, which is just the transposed product.
    """
    output_size = _pair(output_size)
    height, width = feature_size
    grid = _sampling_grid(rois, output_size, spatial_scale, sampling_ratio, aligned)
    x1, y1, bin_w, bin_h, grid_w, grid_h = grid.unbind(1)

    def axis(start: torch.Tensor, bin_size: torch.Tensor, samples: torch.Tensor, bins: int, size: int) -> torch.Tensor:
        max_grid = max(int(samples.max()), 1) if len(samples) else 1
        positions, valid = _sample_coordinates(start, bin_size, samples, bins, max_grid)  # [K, bins*G]
        low, high, w_low, w_high, inside = _bilinear_weights(positions, size)
        keep = valid & inside
        w_low, w_high = (torch.where(keep, w, w.new_zeros(())) for w in (w_low, w_high))
        matrix = positions.new_zeros(len(positions), bins, size)
        for index, weight in ((low, w_low), (high, w_high)):  # a sample's two neighbouring cells
            matrix.scatter_add_(2, index.view(len(index), bins, max_grid), weight.view(len(index), bins, max_grid))
        return matrix

    rows = axis(y1, bin_h, grid_h, output_size[0], height) / (grid_h * grid_w).clamp(min=1)[:, None, None]
    return rows, axis(x1, bin_w, grid_w, output_size[1], width)


def _support(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """First index and length of the span of ``matrix [K, bins, size]``'s non-zero columns, per box."""
    used = (matrix != 0).any(dim=1)  # [K, size]
    size = used.shape[1]
    first = used.to(torch.uint8).argmax(dim=1)
    last = size - 1 - used.flip(1).to(torch.uint8).argmax(dim=1)
    return first, torch.where(used.any(dim=1), last - first + 1, 0)


def _window(matrix: torch.Tensor, first: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``matrix [k, bins, size]`` cut to ``length`` columns from ``first``: ``[k, bins, length]``, and
    the columns' indices (clamped to the axis; past its end the weights are 0)."""
    index = first[:, None] + torch.arange(length, device=matrix.device)  # [k, length]
    inside = index < matrix.shape[2]
    index = index.clamp(max=matrix.shape[2] - 1)
    cut = matrix.gather(2, index[:, None, :].expand(-1, matrix.shape[1], -1))
    return cut * inside[:, None, :], index


class _RoIAlignMatmulBackward(torch.autograd.Function):
    """torchvision's compiled RoIAlign forward; the input's gradient from :func:`roi_align_matrices`."""

    @staticmethod
    def forward(ctx, input: torch.Tensor, rois: torch.Tensor, output_size: tuple[int, int], spatial_scale: float,
                sampling_ratio: int, aligned: bool) -> torch.Tensor:
        ctx.save_for_backward(rois)
        ctx.settings = (input.shape, input.dtype, output_size, spatial_scale, sampling_ratio, aligned)
        return tv_roi_align(input, rois, output_size, spatial_scale, sampling_ratio, aligned)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (rois,) = ctx.saved_tensors
        shape, dtype, output_size, spatial_scale, sampling_ratio, aligned = ctx.settings
        batch, channels, height, width = shape
        pooled_h, pooled_w = output_size
        # accumulated as rows of C values, one per feature cell (a channels-last layout)
        grad_cells = grad_output.new_zeros(batch * height * width, channels, dtype=torch.float32)
        rows, cols = roi_align_matrices(rois.float(), (height, width), output_size, spatial_scale, sampling_ratio,
                                        aligned)
        image = _batch_indices(rois, batch)
        (top, span_y), (left, span_x) = _support(rows), _support(cols)
        # Each box touches only the cells under it: work on that window, padded to a power of two
        # so that boxes of similar size share one batched product (a few groups, not one per box).
        spans = torch.stack([span_y, span_x], dim=1)  # [K,2]; a box outside the map has a span of 0
        buckets = torch.where(spans > 0, 2 ** torch.ceil(torch.log2(spans.clamp(min=1))), 0).long()
        for bucket in torch.unique(buckets[(spans > 0).all(dim=1)], dim=0):
            window_h, window_w = min(int(bucket[0]), height), min(int(bucket[1]), width)
            boxes = torch.nonzero((buckets == bucket).all(dim=1)).flatten()
            chunk = max(1, _CHUNK_ELEMENTS // (channels * window_w * (pooled_h + window_h)))
            for part in boxes.split(chunk):
                k = len(part)
                rows_k, y_index = _window(rows[part], top[part], window_h)  # [k,h,Wy], [k,Wy]
                cols_k, x_index = _window(cols[part], left[part], window_w)  # [k,w,Wx], [k,Wx]
                # the transposed RoIAlign, per box: cols first ([C*h, w] @ [w, Wx]), then rows
                spread_x = torch.bmm(grad_output[part].float().reshape(k, channels * pooled_h, pooled_w), cols_k)
                spread = torch.einsum("kiy,kcix->kyxc", rows_k, spread_x.view(k, channels, pooled_h, window_w))
                cell = (image[part, None, None] * height + y_index[:, :, None]) * width + x_index[:, None, :]
                grad_cells.index_add_(0, cell.flatten(), spread.reshape(-1, channels))
        grad_input = grad_cells.view(batch, height, width, channels).permute(0, 3, 1, 2)
        return grad_input.to(dtype), None, None, None, None, None


def roi_align_matmul_backward(input: torch.Tensor, boxes: torch.Tensor | Sequence[torch.Tensor],
                              output_size: int | Sequence[int], spatial_scale: float = 1.0, sampling_ratio: int = -1,
                              aligned: bool = False) -> torch.Tensor:
    """``torchvision.ops.roi_align`` whose CPU backward is two matrix products per box (faster).

    The compiled CPU backward kernel visits every sample of every bin of every box and channel
    one at a time, on one thread: in the two-stage chapters' training it was a quarter of a step,
    five times its forward. The gradient is the transposed product of :func:`roi_align_matrices`,
    which batched matrix products compute on every core. Same values and gradients as
    torchvision's (tests/test_ops.py); on other devices, or without a gradient, torchvision's own.
    """
    output_size = _pair(output_size)
    if input.device.type != "cpu" or not (torch.is_grad_enabled() and input.requires_grad):
        return tv_roi_align(input, boxes, output_size, spatial_scale, sampling_ratio, aligned)
    rois, _ = _sampled_rois(boxes, input, "roi_align")
    return _RoIAlignMatmulBackward.apply(input, rois, output_size, spatial_scale, sampling_ratio, aligned)


def _round_half_away(x: torch.Tensor) -> torch.Tensor:
    """C's ``round()``: halves away from zero (``torch.round`` rounds them to even)."""
    return torch.sign(x) * torch.floor(x.abs() + 0.5)


def _bin_edges(start: torch.Tensor, size: torch.Tensor, bins: int, limit: int) -> tuple[torch.Tensor, torch.Tensor]:
    """RoIPool's bins along one axis: the first and one-past-last cell of each, ``[K, bins]`` int64.

    Bin ``p`` of a box starting at cell ``start [K]`` and ``size [K]`` (float) cells long covers
    ``floor(p * size / bins)`` to ``ceil((p + 1) * size / bins)`` from the start, clipped to ``[0, limit]``.
    """
    p = torch.arange(bins, device=size.device, dtype=size.dtype)[None]
    bin_size = size[:, None] / bins
    first = torch.floor(p * bin_size).long() + start[:, None]
    last = torch.ceil((p + 1) * bin_size).long() + start[:, None]
    return first.clamp(0, limit), last.clamp(0, limit)


def roi_pool(input: torch.Tensor, boxes: torch.Tensor | Sequence[torch.Tensor], output_size: int | Sequence[int],
             spatial_scale: float = 1.0) -> torch.Tensor:
    """RoIPool (Girshick, Fast R-CNN, ICCV 2015): ``input [N,C,H,W]`` -> ``[K, C, h, w]``.

    The box is rounded to whole cells (``round(x * spatial_scale)``), at least one cell wide; bin
    ``p`` covers the cells from ``floor(p * size / h)`` to ``ceil((p + 1) * size / h)`` of it,
    clipped to the map; the output is the maximum over the bin, 0 for an empty bin. Same
    signature, numbers and gradient as ``torchvision.ops.roi_pool``: the gradient of a bin goes to
    the first cell (row by row) holding its maximum; ``nan`` never wins, and the maximum is at
    least ``-3.4e38`` (the kernel starts from ``-FLT_MAX``). Box coordinates are rounded in
    float32 for float16 or bfloat16 features.
    """
    pooled_h, pooled_w = _pair(output_size)
    compute_dtype = _float_compute_dtype(input.dtype)
    rois = _as_rois(boxes, compute_dtype, input.device)
    batch_index = _batch_indices(rois, len(input))
    _, channels, height, width = input.shape
    if len(rois) == 0 or 0 in (pooled_h, pooled_w):
        return input.new_zeros(len(rois), channels, pooled_h, pooled_w)
    start_x, start_y, end_x, end_y = _round_half_away(rois[:, 1:] * spatial_scale).long().unbind(1)
    roi_w = (end_x - start_x + 1).clamp(min=1).to(compute_dtype)
    roi_h = (end_y - start_y + 1).clamp(min=1).to(compute_dtype)
    y_first, y_last = _bin_edges(start_y, roi_h, pooled_h, height)  # [K, h]
    x_first, x_last = _bin_edges(start_x, roi_w, pooled_w, width)  # [K, w]
    # Every cell's membership in every bin: [K, h, H] and [K, w, W]; the bins overlap by design.
    rows = torch.arange(height, device=input.device)
    cols = torch.arange(width, device=input.device)
    in_row = (rows[None, None] >= y_first[..., None]) & (rows[None, None] < y_last[..., None])
    in_col = (cols[None, None] >= x_first[..., None]) & (cols[None, None] < x_last[..., None])

    empty_bin = (y_last <= y_first)[:, :, None] | (x_last <= x_first)[:, None, :]  # [K, h, w]
    features = input.masked_fill(input.isnan(), -math.inf)  # the kernel's "value > max so far" skips nan
    # amax is the fast maximum, but its gradient is shared among tied maxima (the zeros after a
    # ReLU); the kernel's goes to the first maximum only. max(dim) does that, at several times the
    # cost, so it is used only when a gradient will be asked for. First by column, then by row, is
    # the kernel's row-major first.
    needs_gradient = torch.is_grad_enabled() and input.requires_grad

    def maximum(t: torch.Tensor) -> torch.Tensor:
        """Maximum over the last dimension."""
        return t.max(dim=-1).values if needs_gradient else t.amax(dim=-1)

    outputs = []
    per_box = channels * pooled_w * height * width  # the column-masked maps, the largest intermediate
    chunk = max(1, _CHUNK_ELEMENTS // max(1, per_box))
    for part in torch.arange(len(rois), device=input.device).split(chunk):
        maps = features[batch_index[part]]  # [k, C, H, W]
        # max over columns of each column bin, then over rows of each row bin
        masked = maps[:, :, None, :, :].masked_fill(~in_col[part][:, None, :, None, :], -math.inf)  # [k,C,w,H,W]
        by_column = maximum(masked)  # [k, C, w, H]
        masked = by_column[:, :, None].masked_fill(~in_row[part][:, None, :, None, :], -math.inf)  # [k,C,h,w,H]
        pooled = maximum(masked)  # [k, C, h, w]
        if pooled.dtype in (torch.float32, torch.float64):  # in float16 and bfloat16, -FLT_MAX is -inf
            pooled = pooled.clamp(min=-torch.finfo(torch.float32).max)
        outputs.append(pooled.masked_fill(empty_bin[part][:, None], 0))
    return torch.cat(outputs)


# --------------------------------------------------------------------------------------------
# Multi-scale RoIAlign: one FPN level per box
# --------------------------------------------------------------------------------------------


def fpn_level(boxes: torch.Tensor, k_min: int, k_max: int, canonical_scale: int = 224, canonical_level: int = 4,
              eps: float = 1e-6) -> torch.Tensor:
    """The FPN level each box is pooled from: ``boxes [K,4]`` -> ``[K]`` int64, counted from ``k_min``.

    Eq. 1 of the FPN paper (Lin et al., CVPR 2017): ``k = floor(k0 + log2(sqrt(w h) / 224))``. A
    224-pixel box (an ImageNet-sized object) goes to level ``k0 = 4`` (stride 16), a box half as
    big to the level below, and so on, clamped to the levels there are. ``eps`` lifts a size that
    rounding left just below a level's border (``224 * 2**j``) back onto it; a zero-area box
    (``log2(0) = -inf``) ends on ``k_min``. Same numbers as torchvision's ``LevelMapper``.
    """
    size = torch.sqrt(box_area(boxes))  # float32 for float16 boxes, whose areas overflow at 256 x 256
    # torchvision's order: eps added after the logarithm, not inside it
    level = torch.floor(canonical_level + torch.log2(size / canonical_scale) + torch.tensor(eps, dtype=size.dtype))
    return level.clamp(min=k_min, max=k_max).to(torch.int64) - k_min


def feature_scales(feature_shapes: Sequence[Sequence[int]], image_sizes: Sequence[tuple[int, int]]) -> list[float]:
    """Each feature map's scale against the images, a power of two: ``[1/4, 1/8, ...]`` for an FPN.

    ``feature_shapes`` are the maps' shapes (``[..., H_l, W_l]``; ``tensor.shape`` will do) and
    ``image_sizes`` the ``(height, width)`` of the images before padding to a batch. The scale is
    ``2 ** round(log2(H_l / H))`` with ``H`` the tallest image: the batch was padded to at least
    that, and the rounding absorbs the extra padding up to a multiple of the stride. Like
    torchvision, only the heights decide, and the ratio is taken in float32.
    """
    if not image_sizes:
        raise ValueError("feature_scales needs the size of at least one image")
    height = max(int(size[0]) for size in image_sizes)
    ratios = torch.tensor([float(shape[-2]) / float(height) for shape in feature_shapes], dtype=torch.float32)
    return [2.0 ** float(exponent) for exponent in ratios.log2().round()]


def multiscale_roi_align(features: Sequence[torch.Tensor], boxes: Sequence[torch.Tensor],
                         image_sizes: Sequence[tuple[int, int]], output_size: int | Sequence[int], sampling_ratio: int,
                         canonical_scale: int = 224, canonical_level: int = 4,
                         roi_align: Callable[..., torch.Tensor] = roi_align) -> torch.Tensor:
    """RoIAlign on a feature pyramid (FPN): each box pooled from the level that suits its size.

    ``features`` are the maps ``[B, C, H_l, W_l]``, finest first; ``boxes`` one ``[L_i, 4]`` tensor
    per image, in image pixels; ``image_sizes`` the images' ``(height, width)``. Returns
    ``[K, C, h, w]`` for the ``K = sum L_i`` boxes in their concatenated order. Every box gets the
    level of :func:`fpn_level` and is pooled there with ``roi_align(..., aligned=False)`` at that
    level's scale (:func:`feature_scales`); with a single map, every box is pooled on it.

    ``roi_align`` may be ``torchvision.ops.roi_align`` (the compiled kernel, much faster); by default
    it is this module's plain one. Same numbers as ``torchvision.ops.MultiScaleRoIAlign``.
    """
    output_size = _pair(output_size)
    scales = feature_scales([feature.shape for feature in features], image_sizes)
    rois = _as_rois(boxes, boxes[0].dtype if len(boxes) else features[0].dtype, features[0].device)
    if len(features) == 1:
        return roi_align(features[0], rois, output_size, spatial_scale=scales[0], sampling_ratio=sampling_ratio)

    # levels are numbered by their stride, 2**k: scale 1/4 is level 2 of the FPN paper
    k_min, k_max = (int(-torch.log2(torch.tensor(scale, dtype=torch.float32)).item()) for scale in (scales[0], scales[-1]))
    levels = fpn_level(rois[:, 1:], k_min, k_max, canonical_scale, canonical_level)
    pooled = features[0].new_zeros(len(rois), features[0].shape[1], *output_size)
    # one call per level (a handful), all of a level's boxes at once, written back to their rows
    for level, (feature, scale) in enumerate(zip(features, scales)):
        index = torch.nonzero(levels == level).flatten()
        pooled[index] = roi_align(feature, rois[index], output_size, spatial_scale=scale,
                                  sampling_ratio=sampling_ratio).to(pooled.dtype)
    return pooled


class MultiScaleRoIAlign(nn.Module):
    """:func:`multiscale_roi_align` on the maps named ``featmap_names`` of an FPN's output dict.

    The constructor and ``forward(x, boxes, image_shapes)`` are torchvision's; ``roi_align`` picks
    the implementation as in :func:`multiscale_roi_align`. Two small differences: the maps are
    taken in the order of ``featmap_names`` (torchvision keeps the dict's order, the same for an
    FPN's output), and the scales are inferred on every call instead of being fixed by the first
    batch (it costs nothing).
    """

    def __init__(self, featmap_names: list[str], output_size: int | Sequence[int], sampling_ratio: int, *,
                 canonical_scale: int = 224, canonical_level: int = 4,
                 roi_align: Callable[..., torch.Tensor] = roi_align) -> None:
        super().__init__()
        self.featmap_names = list(featmap_names)
        self.output_size = _pair(output_size)
        self.sampling_ratio = sampling_ratio
        self.canonical_scale = canonical_scale
        self.canonical_level = canonical_level
        self.roi_align = roi_align

    def forward(self, x: dict[str, torch.Tensor], boxes: list[torch.Tensor],
                image_shapes: list[tuple[int, int]]) -> torch.Tensor:
        """``x`` maps name -> ``[B, C, H_l, W_l]`` (others are ignored), ``boxes`` one ``[L_i, 4]``
        per image, ``image_shapes`` their ``(height, width)``: ``[sum L_i, C, h, w]``."""
        features = [x[name] for name in self.featmap_names]
        return multiscale_roi_align(features, boxes, image_shapes, self.output_size, self.sampling_ratio,
                                    self.canonical_scale, self.canonical_level, roi_align=self.roi_align)

    def extra_repr(self) -> str:
        return (f"featmap_names={self.featmap_names}, output_size={self.output_size}, "
                f"sampling_ratio={self.sampling_ratio}")
