"""Box, RoI and mask operations in plain, vectorised PyTorch with ``torchvision.ops`` signatures.

Each is tested equal to torchvision's implementation (tests/test_ops.py); the detection chapters
show these plain versions.
"""

from minis.ops.anchors import AnchorGenerator, cell_anchors, grid_anchors
from minis.ops.boxes import (
    BBOX_XFORM_CLIP,
    BoxCoder,
    InvalidBoxesError,
    box_area,
    box_iou,
    clip_boxes_to_image,
    generalized_box_iou,
    remove_small_boxes,
)
from minis.ops.masks import mask_boxes, mask_iou, paste_masks_in_image
from minis.ops.nms import batched_fast_nms, batched_mask_nms, batched_nms, fast_nms, matrix_nms, nms
from minis.ops.ps_roi import ps_roi_align, ps_roi_pool
from minis.ops.roi import MultiScaleRoIAlign, feature_scales, fpn_level, multiscale_roi_align, roi_align, roi_pool

__all__ = ["AnchorGenerator", "BBOX_XFORM_CLIP", "BoxCoder", "InvalidBoxesError", "batched_nms", "cell_anchors", "grid_anchors", "box_area", "box_iou", "clip_boxes_to_image",
           "generalized_box_iou", "nms", "fast_nms", "batched_fast_nms", "remove_small_boxes", "roi_align", "roi_pool", "ps_roi_align", "ps_roi_pool", "fpn_level", "feature_scales",
           "multiscale_roi_align", "MultiScaleRoIAlign", "paste_masks_in_image", "mask_boxes", "mask_iou", "matrix_nms", "batched_mask_nms"]
