"""Conversions from torchvision models to minis models (same weights, same outputs).

A model file declares its converter with ``@register_port("FCN")`` (the torchvision class
name); :func:`minis.models.from_torchvision` dispatches on the class of the model it is given.
"""

from __future__ import annotations

import copy
from typing import Callable, Sequence

import torch

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
