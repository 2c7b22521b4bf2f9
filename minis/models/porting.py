"""Conversions between torchvision models and minis models (same weights, same outputs).

:func:`minis.models.from_torchvision` dispatches on the class of the torchvision model it is
given to the converter registered for it with ``@register_port("FCN")`` (the torchvision class
name). The semantic models' converters sit at the end of their model files (``fcn.py``,
``deeplab.py``); the detectors' are here, with their inverse, :func:`torchvision_twin`, which
builds the torchvision model of a minis detector (any backbone, its settings and weights) so that
the two can be trained side by side (``python -m minis bench rcnn-training`` / ``fcos-training``).
A model file then holds only its architecture.

Sections: the registry; renaming state-dict keys; the ResNet-FPN backbone both ways; Faster /
Mask R-CNN; FCOS; RetinaNet.
"""

from __future__ import annotations

import copy
from dataclasses import asdict
from typing import Callable, Sequence

import torch
from torch import nn

# The detectors' files do not import this module (the semantic ones do, for register_port), so
# importing them here makes no cycle that depends on the order of imports in minis.models.
from minis.models.fcos import FCOS, FCOS_LEVELS, FCOSConfig
from minis.models.rcnn import FasterRCNN, MaskRCNN, RCNNConfig
from minis.models.retinanet import RetinaNet, RetinaNetConfig, anchor_sizes_per_level
from minis.nn.fpn import BackboneFPN

Converter = Callable[[torch.nn.Module], torch.nn.Module]
_CONVERTERS: dict[str, Converter] = {}


def register_port(torchvision_class: str) -> Callable[[Converter], Converter]:
    """Decorator: ``converter(tv_model) -> minis model`` handles torchvision's ``torchvision_class``."""

    def wrap(converter: Converter) -> Converter:
        if torchvision_class in _CONVERTERS:
            raise ValueError(f"a port for torchvision {torchvision_class} is registered twice")
        _CONVERTERS[torchvision_class] = converter
        return converter

    return wrap


def convert(tv_model: torch.nn.Module) -> torch.nn.Module:
    kind = type(tv_model).__name__
    if kind not in _CONVERTERS:
        supported = ", ".join(sorted(_CONVERTERS)) or "none yet"
        raise TypeError(f"no minis port for torchvision {kind}; ports exist for: {supported}")
    return _CONVERTERS[kind](tv_model)


def rename_keys(key: str, key_map: Sequence[tuple[str, str]]) -> str:
    """A torchvision state-dict key as the minis key: the first matching ``(source, target)`` prefix swapped.

    A ``{i}`` in a prefix stands for a layer index (``"fpn.inner_blocks.{i}.0."``); keys that no
    prefix matches are the same in both models.
    """
    for source, target in key_map:
        if "{i}" not in source:
            if key.startswith(source):
                return target + key[len(source):]
            continue
        head, tail = source.split("{i}")
        if key.startswith(head):
            index, _, rest = key[len(head):].partition(".")
            if index.isdigit() and ("." + rest).startswith(tail):
                return target.format(i=index) + ("." + rest)[len(tail):]
    return key


def load_into_twin(twin: torch.nn.Module, model: torch.nn.Module, key_map: Sequence[tuple[str, str]]) -> torch.nn.Module:
    """Copy a minis model's weights into its torchvision twin (keys renamed by ``key_map``); same mode and task.

    Raises:
        RuntimeError: the twin has a weight the minis model lacks (the two architectures differ).
    """
    inverse = {rename_keys(key, key_map): key for key in twin.state_dict()}
    state = model.state_dict()
    missing = sorted(set(inverse) - set(state))
    if missing:
        raise RuntimeError(f"no minis weight for torchvision's {', '.join(inverse[k] for k in missing[:5])}")
    twin.load_state_dict({inverse[key]: value for key, value in state.items()}, strict=True)
    twin.task = model.task
    return twin.train(model.training)


_TOP_BLOCKS = {"pool": "LastLevelMaxPool", "p6p7": "LastLevelP6P7"}


def backbone_fpn_from_torchvision(tv_backbone: torch.nn.Module, levels: Sequence[str] = ("c2", "c3", "c4", "c5"),
                                  top: str = "pool") -> BackboneFPN:
    """A minis ResNet-FPN shaped like a torchvision ``BackboneWithFPN`` (depth, width, norm, frozen stages).

    The weights are not copied here: the model's port loads its whole state dict at once.
    """
    from torchvision.ops import FrozenBatchNorm2d as TorchvisionFrozenBN

    from minis.nn.backbones import DEPTHS, ResNet

    body, fpn = tv_backbone.body, tv_backbone.fpn
    extra = type(fpn.extra_blocks).__name__
    if extra != _TOP_BLOCKS[top]:
        raise ValueError(f"the port expects FPN's {_TOP_BLOCKS[top]} extra block, got {extra}")
    if top == "p6p7" and not fpn.extra_blocks.use_P5:
        raise ValueError("the port expects P6 computed from P5 (LastLevelP6P7 with equal channel counts)")
    blocks = tuple(len(getattr(body, f"layer{i}")) for i in range(1, 5))
    kind = "bottleneck" if hasattr(body.layer1[0], "conv3") else "basic"
    depth = next((d for d, (k, b) in DEPTHS.items() if k == kind and b == blocks), None)
    if depth is None:
        raise ValueError(f"no minis ResNet with {kind} blocks {blocks}")
    frozen = isinstance(body.bn1, TorchvisionFrozenBN)
    minis_body = ResNet(depth, 32, frozen_bn=frozen, width=body.conv1.out_channels)
    for name, parameter in body.named_parameters():  # keep which stages are frozen
        minis_body.get_parameter(name).requires_grad_(parameter.requires_grad)
    return BackboneFPN(minis_body, fpn.layer_blocks[0][0].out_channels, levels, top)


def torchvision_backbone_with_fpn(backbone: BackboneFPN) -> torch.nn.Module:
    """torchvision's ``BackboneWithFPN`` around a copy of this minis ResNet body, with the same FPN layout.

    Its FPN has fresh weights; the caller loads the minis model's state dict into the whole twin.
    """
    from torchvision.models.detection.backbone_utils import BackboneWithFPN
    from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7

    body = copy.deepcopy(backbone.body)
    extra = {"pool": LastLevelMaxPool, "p6p7": lambda: LastLevelP6P7(backbone.channels, backbone.channels),
             "none": lambda: None}[backbone.fpn.top]()
    # ResNet stage layer{i} produces c{i+1}
    return_layers = {f"layer{int(name[1:]) - 1}": str(i) for i, name in enumerate(backbone.levels)}
    return BackboneWithFPN(body, return_layers, [body.channels[name] for name in backbone.levels], backbone.channels,
                           extra_blocks=extra)


# ----------------------------------------------------------------------------------------------
# Shared by the detectors' ports
# ----------------------------------------------------------------------------------------------


def _transform_settings(transform: nn.Module) -> dict:
    """The image settings of a torchvision ``GeneralizedRCNNTransform`` as minis config fields."""
    if getattr(transform, "fixed_size", None) is not None or getattr(transform, "_skip_resize", False):
        raise ValueError("torchvision models with a fixed_size or _skip_resize transform have no minis port")
    return {"min_size": tuple(transform.min_size) if len(transform.min_size) > 1 else transform.min_size[0],
            "max_size": transform.max_size, "image_mean": tuple(transform.image_mean),
            "image_std": tuple(transform.image_std)}


def _build_args(name: str, num_classes: int, backbone: BackboneFPN, config, defaults: type) -> dict:
    """``model.build_args`` of a ported model: what ``minis.models.build`` needs to build it again."""
    return {"name": name, "num_classes": num_classes, "backbone": f"resnet{backbone.body.depth}",
            "fpn_channels": backbone.channels,
            **{k: v for k, v in asdict(config).items() if getattr(defaults, k, None) != v}}


def torchvision_twin(model: nn.Module) -> nn.Module:
    """The torchvision model with this minis detector's architecture, settings and weights; same mode.

    The inverse of :func:`minis.models.from_torchvision` for Faster / Mask R-CNN, FCOS and RetinaNet, for
    any minis backbone (the small CPU ResNet included: torchvision's ``BackboneWithFPN`` wraps the
    same ResNet body). It lets the two implementations be trained side by side from the same
    starting point (``python -m minis bench rcnn-training`` / ``fcos-training``).

    Raises:
        TypeError: the model has no torchvision counterpart (Mask Scoring R-CNN, CondInst, ...).
        ValueError: a setting torchvision's model cannot follow (FCOS's level ranges, learnable scales).
    """
    if type(model) in (FasterRCNN, MaskRCNN):  # exactly: their subclasses (MS R-CNN, ...) add what torchvision lacks
        return _rcnn_twin(model)
    if type(model) is FCOS:  # not CondInst
        return _fcos_twin(model)
    if type(model) is RetinaNet:  # not YOLACT
        return _retinanet_twin(model)
    raise TypeError(f"{type(model).__name__} has no torchvision counterpart")


# ----------------------------------------------------------------------------------------------
# Faster R-CNN and Mask R-CNN
# ----------------------------------------------------------------------------------------------

# torchvision state-dict key prefixes -> minis ones (the rest of each key is unchanged)
FPN_KEY_MAP = (
    ("backbone.fpn.inner_blocks.{i}.0.", "backbone.fpn.lateral.{i}."),
    ("backbone.fpn.layer_blocks.{i}.0.", "backbone.fpn.smooth.{i}."),
)
RCNN_KEY_MAP = FPN_KEY_MAP + (
    ("rpn.head.conv.0.0.", "rpn.head.conv."),
    ("rpn.head.cls_logits.", "rpn.head.objectness."),
    ("rpn.head.bbox_pred.", "rpn.head.deltas."),
    ("roi_heads.box_head.", "box_head."),
    ("roi_heads.box_predictor.", "box_predictor."),
    ("roi_heads.mask_head.{i}.0.", "mask_head.convs.{i}."),
    ("roi_heads.mask_predictor.conv5_mask.", "mask_head.upsample."),
    ("roi_heads.mask_predictor.mask_fcn_logits.", "mask_head.logits."),
)


def _rcnn_config(tv_model: nn.Module) -> RCNNConfig:
    """The :class:`RCNNConfig` of a torchvision ``FasterRCNN`` / ``MaskRCNN``; refuses layouts minis lacks."""
    images = _transform_settings(tv_model.transform)
    rpn, heads = tv_model.rpn, tv_model.roi_heads
    generator = rpn.anchor_generator
    if any(len(sizes) != 1 for sizes in generator.sizes) or len(set(map(tuple, generator.aspect_ratios))) != 1:
        raise ValueError("the port expects one anchor size per FPN level and the same aspect ratios on every level")
    for pooler, size in ((heads.box_roi_pool, 7), (getattr(heads, "mask_roi_pool", None), 14)):
        if pooler is not None and (tuple(pooler.output_size) != (size, size) or pooler.sampling_ratio != 2
                                   or list(pooler.featmap_names) != ["0", "1", "2", "3"]):
            raise ValueError(f"the port expects RoIAlign {size}x{size}, sampling ratio 2, on FPN levels 0-3")
    return RCNNConfig(
        **images,
        anchor_sizes=tuple(sizes[0] for sizes in generator.sizes), aspect_ratios=tuple(generator.aspect_ratios[0]),
        rpn_pre_nms_top_n_train=rpn._pre_nms_top_n["training"], rpn_pre_nms_top_n_test=rpn._pre_nms_top_n["testing"],
        rpn_post_nms_top_n_train=rpn._post_nms_top_n["training"],
        rpn_post_nms_top_n_test=rpn._post_nms_top_n["testing"],
        rpn_nms_thresh=rpn.nms_thresh, rpn_fg_iou_thresh=rpn.proposal_matcher.high_threshold,
        rpn_bg_iou_thresh=rpn.proposal_matcher.low_threshold,
        rpn_batch_size_per_image=rpn.fg_bg_sampler.batch_size_per_image,
        rpn_positive_fraction=rpn.fg_bg_sampler.positive_fraction, rpn_score_thresh=rpn.score_thresh,
        representation_size=heads.box_head.fc7.out_features,
        box_score_thresh=heads.score_thresh, box_nms_thresh=heads.nms_thresh,
        box_detections_per_img=heads.detections_per_img,
        box_fg_iou_thresh=heads.proposal_matcher.high_threshold, box_bg_iou_thresh=heads.proposal_matcher.low_threshold,
        box_batch_size_per_image=heads.fg_bg_sampler.batch_size_per_image,
        box_positive_fraction=heads.fg_bg_sampler.positive_fraction,
        bbox_reg_weights=tuple(heads.box_coder.weights),
    )


@register_port("FasterRCNN")
@register_port("MaskRCNN")
def from_torchvision_rcnn(tv_model: nn.Module) -> FasterRCNN:
    """torchvision's ``fasterrcnn_resnet50_fpn`` / ``maskrcnn_resnet50_fpn`` (any weights) as a minis model.

    Same weights, same settings (image sizes, normalisation, thresholds, detections per image),
    same outputs. The ``_v2`` variants (convolutional box head with batch norm) are refused.
    """
    heads = tv_model.roi_heads
    if type(heads.box_head).__name__ != "TwoMLPHead":
        raise ValueError(f"the port handles the TwoMLPHead box head (not the _v2 models), got "
                         f"{type(heads.box_head).__name__}")
    has_mask = getattr(heads, "mask_predictor", None) is not None
    num_classes = heads.box_predictor.cls_score.out_features
    config = _rcnn_config(tv_model)
    if has_mask:
        config.mask_head_channels = heads.mask_predictor.conv5_mask.out_channels
        config.mask_head_layers = len(heads.mask_head)
    backbone = backbone_fpn_from_torchvision(tv_model.backbone)
    model = (MaskRCNN if has_mask else FasterRCNN)(backbone, num_classes, config)
    model.load_state_dict({rename_keys(k, RCNN_KEY_MAP): v for k, v in tv_model.state_dict().items()}, strict=True)
    model.build_args = _build_args("mask_rcnn" if has_mask else "faster_rcnn", num_classes, backbone, config,
                                   RCNNConfig)
    return model.train(tv_model.training)


def _rcnn_twin(model: FasterRCNN) -> nn.Module:
    """torchvision's ``FasterRCNN`` / ``MaskRCNN`` for a minis one (see :func:`torchvision_twin`)."""
    from torchvision.models.detection import FasterRCNN as TorchvisionFasterRCNN
    from torchvision.models.detection import MaskRCNN as TorchvisionMaskRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator as TorchvisionAnchorGenerator
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
    from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor

    cfg, channels = model.config, model.backbone.channels
    backbone = torchvision_backbone_with_fpn(model.backbone)
    options = dict(
        min_size=cfg.min_size, max_size=cfg.max_size, image_mean=list(cfg.image_mean), image_std=list(cfg.image_std),
        rpn_anchor_generator=TorchvisionAnchorGenerator(tuple((s,) for s in cfg.anchor_sizes),
                                                        (tuple(cfg.aspect_ratios),) * len(cfg.anchor_sizes)),
        rpn_pre_nms_top_n_train=cfg.rpn_pre_nms_top_n_train, rpn_pre_nms_top_n_test=cfg.rpn_pre_nms_top_n_test,
        rpn_post_nms_top_n_train=cfg.rpn_post_nms_top_n_train, rpn_post_nms_top_n_test=cfg.rpn_post_nms_top_n_test,
        rpn_nms_thresh=cfg.rpn_nms_thresh, rpn_fg_iou_thresh=cfg.rpn_fg_iou_thresh,
        rpn_bg_iou_thresh=cfg.rpn_bg_iou_thresh, rpn_batch_size_per_image=cfg.rpn_batch_size_per_image,
        rpn_positive_fraction=cfg.rpn_positive_fraction, rpn_score_thresh=cfg.rpn_score_thresh,
        box_head=TwoMLPHead(channels * FasterRCNN.box_pool_size ** 2, cfg.representation_size),
        box_predictor=FastRCNNPredictor(cfg.representation_size, model.num_classes),
        box_score_thresh=cfg.box_score_thresh, box_nms_thresh=cfg.box_nms_thresh,
        box_detections_per_img=cfg.box_detections_per_img, box_fg_iou_thresh=cfg.box_fg_iou_thresh,
        box_bg_iou_thresh=cfg.box_bg_iou_thresh, box_batch_size_per_image=cfg.box_batch_size_per_image,
        box_positive_fraction=cfg.box_positive_fraction, bbox_reg_weights=cfg.bbox_reg_weights,
    )
    if isinstance(model, MaskRCNN):
        options.update(mask_head=MaskRCNNHeads(channels, [cfg.mask_head_channels] * cfg.mask_head_layers, 1),
                       mask_predictor=MaskRCNNPredictor(cfg.mask_head_channels, cfg.mask_head_channels,
                                                        model.num_classes))
        twin = TorchvisionMaskRCNN(backbone, num_classes=None, **options)
    else:
        twin = TorchvisionFasterRCNN(backbone, num_classes=None, **options)
    return load_into_twin(twin, model, RCNN_KEY_MAP)


# ----------------------------------------------------------------------------------------------
# FCOS
# ----------------------------------------------------------------------------------------------

FCOS_KEY_MAP = FPN_KEY_MAP + (
    ("backbone.fpn.extra_blocks.", "backbone.fpn."),
    ("head.classification_head.conv.", "head.cls_tower."),
    ("head.classification_head.cls_logits.", "head.cls_logits."),
    ("head.regression_head.conv.", "head.box_tower."),
    ("head.regression_head.bbox_reg.", "head.distances."),
    ("head.regression_head.bbox_ctrness.", "head.centerness."),
)


def _fcos_config(tv_model: nn.Module) -> FCOSConfig:
    """The :class:`FCOSConfig` of a torchvision ``FCOS``; refuses layouts minis lacks."""
    images = _transform_settings(tv_model.transform)
    generator, head = tv_model.anchor_generator, tv_model.head
    sizes = tuple(s for level in generator.sizes for s in level)
    if sizes != (8, 16, 32, 64, 128) or any(tuple(r) != (1.0,) for r in generator.aspect_ratios):
        raise ValueError(f"the port expects one square anchor per location of the size of its stride "
                         f"(8, 16, 32, 64, 128), got sizes {sizes}")
    if any(isinstance(m, nn.Conv2d) and m.out_channels != m.in_channels for m in head.classification_head.conv):
        raise ValueError("the port expects head towers that keep the channel count")
    return FCOSConfig(
        **images,
        head_convs=sum(isinstance(m, nn.Conv2d) for m in head.classification_head.conv),
        center_sampling_radius=tv_model.center_sampling_radius, score_thresh=tv_model.score_thresh,
        nms_thresh=tv_model.nms_thresh, detections_per_img=tv_model.detections_per_img,
        topk_candidates=tv_model.topk_candidates)


@register_port("FCOS")
def from_torchvision_fcos(tv_model: nn.Module) -> FCOS:
    """torchvision's ``fcos_resnet50_fpn`` (any weights) as a minis :class:`FCOS`: same weights, settings, outputs."""
    num_classes = tv_model.head.classification_head.num_classes
    config = _fcos_config(tv_model)
    backbone = backbone_fpn_from_torchvision(tv_model.backbone, levels=FCOS_LEVELS, top="p6p7")
    model = FCOS(backbone, num_classes, config)
    model.load_state_dict({rename_keys(k, FCOS_KEY_MAP): v for k, v in tv_model.state_dict().items()}, strict=True)
    model.build_args = _build_args("fcos", num_classes, backbone, config, FCOSConfig)
    return model.train(tv_model.training)


def _fcos_twin(model: FCOS) -> nn.Module:
    """torchvision's ``FCOS`` for a minis one (see :func:`torchvision_twin`)."""
    from torchvision.models.detection import FCOS as TorchvisionFCOS
    from torchvision.models.detection.fcos import FCOSHead as TorchvisionFCOSHead

    cfg = model.config
    if cfg.level_bounds is not None or cfg.location_offset != 0.0:
        raise ValueError("torchvision's FCOS has fixed level ranges (8 x stride) and locations at offset 0")
    if cfg.learnable_scales:
        raise ValueError("torchvision's FCOS has no learnable per-level scales")
    if tuple(model.backbone.strides) != (8, 16, 32, 64, 128):
        raise ValueError(f"torchvision's FCOS expects levels of strides 8..128, got {model.backbone.strides}")
    if (cfg.focal_alpha, cfg.focal_gamma, cfg.box_loss) != (0.25, 2.0, "giou"):
        raise ValueError("torchvision's FCOS uses the focal loss with alpha 0.25 and gamma 2, and the GIoU loss")
    backbone = torchvision_backbone_with_fpn(model.backbone)
    head = TorchvisionFCOSHead(backbone.out_channels, 1, model.num_classes, cfg.head_convs)
    twin = TorchvisionFCOS(backbone, num_classes=model.num_classes, head=head, min_size=cfg.min_size,
                           max_size=cfg.max_size, image_mean=list(cfg.image_mean), image_std=list(cfg.image_std),
                           center_sampling_radius=cfg.center_sampling_radius, score_thresh=cfg.score_thresh,
                           nms_thresh=cfg.nms_thresh, detections_per_img=cfg.detections_per_img,
                           topk_candidates=cfg.topk_candidates)
    return load_into_twin(twin, model, FCOS_KEY_MAP)


# ----------------------------------------------------------------------------------------------
# RetinaNet
# ----------------------------------------------------------------------------------------------

RETINANET_KEY_MAP = FPN_KEY_MAP + (
    ("backbone.fpn.extra_blocks.", "backbone.fpn."),
    ("head.classification_head.conv.", "head.cls_tower."),
    ("head.classification_head.cls_logits.", "head.cls_logits."),
    ("head.regression_head.conv.", "head.box_tower."),
    ("head.regression_head.bbox_reg.", "head.deltas."),
)


def _retinanet_config(tv_model: nn.Module) -> RetinaNetConfig:
    """The :class:`RetinaNetConfig` of a torchvision ``RetinaNet``; refuses layouts minis lacks."""
    images = _transform_settings(tv_model.transform)
    generator, head, matcher = tv_model.anchor_generator, tv_model.head, tv_model.proposal_matcher
    sizes = tuple(tuple(level) for level in generator.sizes)
    defaults = RetinaNetConfig()
    bases = tuple(level[0] for level in sizes)
    if sizes != anchor_sizes_per_level(bases, defaults.anchor_scales):
        raise ValueError(f"the port expects anchor sizes int(base x 2^(k/3)), k = 0, 1, 2, per level; got {sizes}")
    ratios = {tuple(r) for r in generator.aspect_ratios}
    if len(ratios) != 1:
        raise ValueError(f"the port expects the same aspect ratios on every level, got {generator.aspect_ratios}")
    convs = [m for m in head.classification_head.conv.modules() if isinstance(m, nn.Conv2d)]
    if any(isinstance(m, (nn.GroupNorm, nn.BatchNorm2d)) for m in head.modules()):
        raise ValueError("the port expects the paper's head without normalisation (retinanet_resnet50_fpn, not _v2)")
    if not matcher.allow_low_quality_matches:
        raise ValueError("the port expects the matcher to keep each object's best anchors (allow_low_quality_matches)")
    loss_type = head.regression_head._loss_type
    if loss_type not in ("l1", "smooth_l1", "giou"):
        raise ValueError(f"minis RetinaNet has no {loss_type!r} box loss")
    return RetinaNetConfig(
        **images, anchor_sizes=bases, aspect_ratios=ratios.pop(), head_convs=len(convs),
        fg_iou_thresh=matcher.high_threshold, bg_iou_thresh=matcher.low_threshold, box_loss=loss_type,
        smooth_l1_beta=1.0 if loss_type == "smooth_l1" else defaults.smooth_l1_beta,  # torchvision's beta
        score_thresh=tv_model.score_thresh, nms_thresh=tv_model.nms_thresh,
        detections_per_img=tv_model.detections_per_img, topk_candidates=tv_model.topk_candidates)


@register_port("RetinaNet")
def from_torchvision_retinanet(tv_model: nn.Module) -> RetinaNet:
    """torchvision's ``retinanet_resnet50_fpn`` (any weights) as a minis :class:`RetinaNet`: same weights, outputs."""
    num_classes = tv_model.head.classification_head.num_classes
    config = _retinanet_config(tv_model)
    backbone = backbone_fpn_from_torchvision(tv_model.backbone, levels=FCOS_LEVELS, top="p6p7")
    model = RetinaNet(backbone, num_classes, config)
    model.load_state_dict({rename_keys(k, RETINANET_KEY_MAP): v for k, v in tv_model.state_dict().items()},
                          strict=True)
    model.build_args = _build_args("retinanet", num_classes, backbone, config, RetinaNetConfig)
    return model.train(tv_model.training)


def _retinanet_twin(model: RetinaNet) -> nn.Module:
    """torchvision's ``RetinaNet`` for a minis one (see :func:`torchvision_twin`)."""
    from torchvision.models.detection import RetinaNet as TorchvisionRetinaNet
    from torchvision.models.detection.retinanet import RetinaNetHead as TorchvisionRetinaNetHead
    from torchvision.models.detection.anchor_utils import AnchorGenerator as TorchvisionAnchorGenerator

    cfg = model.config
    if tuple(cfg.anchor_scales) != RetinaNetConfig().anchor_scales:
        raise ValueError("the twin expects torchvision's anchor scales 2^(k/3), k = 0, 1, 2")
    if cfg.anchor_offset != 0.0 or tuple(cfg.box_weights) != (1.0, 1.0, 1.0, 1.0):
        raise ValueError("torchvision's RetinaNet has anchors at offset 0 and box weights (1, 1, 1, 1)")
    if (cfg.focal_alpha, cfg.focal_gamma) != (0.25, 2.0) or cfg.prior_probability != 0.01:
        raise ValueError("torchvision's RetinaNet uses the focal loss with alpha 0.25 and gamma 2, prior 0.01")
    if cfg.box_loss == "smooth_l1" and cfg.smooth_l1_beta != 1.0:
        raise ValueError("torchvision's smooth L1 box loss has beta 1")
    backbone = torchvision_backbone_with_fpn(model.backbone)
    sizes = anchor_sizes_per_level(cfg.anchor_sizes, cfg.anchor_scales)
    generator = TorchvisionAnchorGenerator(sizes, (tuple(cfg.aspect_ratios),) * len(sizes))
    head = TorchvisionRetinaNetHead(backbone.out_channels, model.num_anchors, model.num_classes)
    if cfg.head_convs != 4:  # torchvision's head always has four; rebuild its towers with the minis count
        for tower in (head.classification_head.conv, head.regression_head.conv):
            del tower[cfg.head_convs:]
    head.regression_head._loss_type = cfg.box_loss
    twin = TorchvisionRetinaNet(backbone, num_classes=model.num_classes, anchor_generator=generator, head=head,
                                min_size=cfg.min_size, max_size=cfg.max_size, image_mean=list(cfg.image_mean),
                                image_std=list(cfg.image_std), score_thresh=cfg.score_thresh,
                                nms_thresh=cfg.nms_thresh, detections_per_img=cfg.detections_per_img,
                                fg_iou_thresh=cfg.fg_iou_thresh, bg_iou_thresh=cfg.bg_iou_thresh,
                                topk_candidates=cfg.topk_candidates)
    return load_into_twin(twin, model, RETINANET_KEY_MAP)
