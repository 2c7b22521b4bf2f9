"""``python -m minis bench yolact``: YOLACT's CPU cost against Mask R-CNN, and Fast NMS against NMS.

YOLACT's claim is speed: masks from one matrix product per image instead of a head per RoI, and
Fast NMS (one IoU matrix per class and a maximum) instead of greedy NMS's sequential loop. The
suite measures both on the CPU, in one run:

>>> rows = bench_yolact(min_size=320, max_size=320, runs=1)
>>> print(format_table(rows["models"], YOLACT_COLUMNS))
>>> print(format_table(bench_fast_nms(), FAST_NMS_COLUMNS))

RetinaNet, the detector underneath, is timed against torchvision's by ``bench rcnn --models
retinanet_resnet50_fpn``.
"""

from __future__ import annotations

import argparse
from typing import Any, Sequence

import torch
from torch import nn

from minis.bench.common import finish, format_table, interleaved_median_ms
from minis.bench.instance_cost import add_cost_options, cost_arguments, instance_cost, share_body

YOLACT_COLUMNS = [("model", ""), ("step", ""), ("input", ""), ("params", ",d"), ("ms", ".0f"),
                  ("vs_mask_rcnn", ".2f")]
YOLACT_INSTANCE_COLUMNS = [("instances", "d"), ("yolact_ms", ".0f"), ("yolact_vs_1", ".2f"), ("mask_rcnn_ms", ".0f"),
                           ("mask_rcnn_vs_1", ".2f")]
FAST_NMS_COLUMNS = [("method", ""), ("input", ""), ("ms", ".2f"), ("kept", "d"), ("vs_torchvision", ".2f")]


def _yolact_and_mask_rcnn(num_classes: int, seed: int, min_size: int, max_size: int) -> dict[str, nn.Module]:
    """minis ``yolact`` and ``mask_rcnn`` (both ResNet-50-FPN) with the same body weights; every score
    threshold 0, so the detection cap sets the count."""
    import minis.models

    torch.manual_seed(seed)
    sizes = {"min_size": min_size, "max_size": max_size}
    models = {"yolact": minis.models.build("yolact", num_classes, **sizes, score_thresh=0.0),
              "mask_rcnn": minis.models.build("mask_rcnn", num_classes, **sizes, box_score_thresh=0.0)}
    share_body(models, dict.fromkeys(models, lambda model: model.backbone.body), "mask_rcnn")
    return models


def bench_yolact(
    *,
    image_size: tuple[int, int] = (480, 640),
    min_size: int = 550,
    max_size: int = 550,
    instances: Sequence[int] = (1, 10, 25, 50),
    detections: int = 50,
    runs: int = 3,
    num_classes: int = 81,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, list[dict[str, Any]]]:
    """YOLACT against Mask R-CNN on the CPU: the two minis models on one ResNet-50 body (same random
    weights) resize a random ``image_size`` image to fit ``max_size`` (550, YOLACT-550's input).
    Two tables (:func:`minis.bench.instance_cost.instance_cost`): ``models`` (inference with
    ``detections`` detections, a training step on two images, the parameters, ``vs_mask_rcnn``)
    and ``instances`` (inference time as the detections grow, each divided by its time with the
    fewest: YOLACT's per-detection work is a row of one matrix product and a crop; Mask R-CNN's
    is its mask head on each RoI).
    """
    models = _yolact_and_mask_rcnn(num_classes, seed, min_size, max_size)
    return instance_cost(models, references=("mask_rcnn",), scaled=("yolact", "mask_rcnn"), image_size=image_size,
                         detections=detections, instances=instances, runs=runs, num_classes=num_classes, seed=seed,
                         progress=progress)


def clustered_detections(classes: int, per_class: int, image_size: int, generator: torch.Generator
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``classes x per_class`` candidate boxes as a detector leaves them before NMS: per class, a
    few objects each surrounded by jittered copies of its box; random scores. Returns boxes
    ``[N,4]``, scores ``[N]``, class indices ``[N]``."""
    objects = 8
    centres = torch.rand(classes, objects, 2, generator=generator) * image_size
    sides = torch.exp(torch.empty(classes, objects, 2).uniform_(3.0, 5.5, generator=generator))  # 20..245 px
    pick = torch.randint(0, objects, (classes, per_class), generator=generator)
    centre = torch.gather(centres, 1, pick[..., None].expand(-1, -1, 2))
    side = torch.gather(sides, 1, pick[..., None].expand(-1, -1, 2))
    centre = centre + torch.randn(classes, per_class, 2, generator=generator) * side * 0.15
    side = side * torch.exp(torch.randn(classes, per_class, 2, generator=generator) * 0.15)
    boxes = torch.cat([centre - side / 2, centre + side / 2], dim=-1).clamp(0, image_size).reshape(-1, 4)
    scores = torch.rand(classes * per_class, generator=generator)
    labels = torch.arange(classes).repeat_interleave(per_class)
    return boxes, scores, labels


@torch.no_grad()
def bench_fast_nms(classes: int = 80, per_class: int = 200, iou: float = 0.5, runs: int = 10, seed: int = 0,
                   image_size: int = 550) -> list[dict[str, Any]]:
    """Per-class NMS of YOLACT's candidates (``classes x per_class`` boxes, the paper's 80 x 200) three
    ways: ``minis.ops.batched_fast_nms``, ``minis.ops.batched_nms`` (greedy, plain tensor code)
    and ``torchvision.ops.batched_nms`` (greedy, compiled). Rows: median ``ms``, boxes ``kept``
    (Fast NMS keeps fewer: a box removed by a box that is itself removed stays removed), and the
    time divided by torchvision's."""
    import torchvision.ops as tv_ops

    from minis import ops

    boxes, scores, labels = clustered_detections(classes, per_class, image_size, torch.Generator().manual_seed(seed))
    calls = {"fast NMS (minis.ops.batched_fast_nms)": lambda: ops.batched_fast_nms(boxes, scores, labels, iou),
             "greedy NMS (minis.ops.batched_nms)": lambda: ops.batched_nms(boxes, scores, labels, iou),
             "greedy NMS (torchvision.ops.batched_nms)": lambda: tv_ops.batched_nms(boxes, scores, labels, iou)}
    times = interleaved_median_ms(list(calls.values()), runs, warmup=1)
    text = f"{classes} classes x {per_class} boxes, IoU {iou}"
    return [{"method": method, "input": text, "ms": ms, "kept": len(call()), "vs_torchvision": ms / times[-1]}
            for (method, call), ms in zip(calls.items(), times)]


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def add_parser(suites: argparse._SubParsersAction) -> None:
    """``bench yolact`` and its options."""
    parser = suites.add_parser("yolact", help="YOLACT against Mask R-CNN on the CPU; Fast NMS against NMS")
    add_cost_options(parser, min_size=550, max_size=550)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    rows = bench_yolact(**cost_arguments(args))
    print("\nminis YOLACT and Mask R-CNN (same ResNet-50 body weights) on the CPU:")
    print(format_table(rows["models"], YOLACT_COLUMNS))
    print("\ninference time as the number of detections grows (each divided by its time with the fewest):")
    print(format_table(rows["instances"], YOLACT_INSTANCE_COLUMNS))
    rows["fast_nms"] = bench_fast_nms(runs=max(args.runs, 5))
    print("\nper-class NMS of 80 classes x 200 candidates:")
    print(format_table(rows["fast_nms"], FAST_NMS_COLUMNS))
    return finish(rows, args.json)
