"""``python -m minis bench fcis``: FCIS's CPU cost against Mask R-CNN on the same body, and as the
detections grow.

FCIS computes its score maps once per image and assembles every RoI's mask from them by pooling,
with no learned layer per RoI; Mask R-CNN runs a small FCN on each RoI. The suite measures what
that buys on the CPU:

>>> rows = bench_fcis(min_size=320, runs=1)
>>> print(format_table(rows["models"], FCIS_COLUMNS))
>>> print(format_table(rows["instances"], FCIS_INSTANCE_COLUMNS))
"""

from __future__ import annotations

import argparse
from typing import Any, Sequence

import torch
from torch import nn

from minis.bench.common import finish, format_table
from minis.bench.instance_cost import add_cost_options, cost_arguments, instance_cost, share_body

FCIS_COLUMNS = [("model", ""), ("step", ""), ("input", ""), ("params", ",d"), ("ms", ".0f"), ("vs_mask_rcnn", ".2f")]
FCIS_INSTANCE_COLUMNS = [("instances", "d"), ("fcis_ms", ".0f"), ("fcis_vs_1", ".2f"), ("mask_rcnn_ms", ".0f"),
                         ("mask_rcnn_vs_1", ".2f")]


def _fcis_and_mask_rcnn(num_classes: int, seed: int, min_size: int, max_size: int,
                        mask_voting: bool) -> dict[str, nn.Module]:
    """minis ``fcis`` (dilated ResNet-50, one stride-16 map) and ``mask_rcnn`` (ResNet-50-FPN) with
    the same body weights; every score threshold 0, so ``box_detections_per_img`` sets the count."""
    import minis.models

    torch.manual_seed(seed)
    sizes = {"min_size": min_size, "max_size": max_size, "box_score_thresh": 0.0}
    models = {"fcis": minis.models.build("fcis", num_classes, **sizes, mask_voting=mask_voting),
              "mask_rcnn": minis.models.build("mask_rcnn", num_classes, **sizes)}
    bodies = {"fcis": lambda model: model.backbone, "mask_rcnn": lambda model: model.backbone.body}
    share_body(models, bodies, "mask_rcnn")
    return models


def bench_fcis(
    *,
    image_size: tuple[int, int] = (480, 640),
    min_size: int = 600,
    max_size: int = 1000,
    instances: Sequence[int] = (1, 10, 25, 50),
    detections: int = 50,
    runs: int = 3,
    num_classes: int = 81,
    mask_voting: bool = True,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, list[dict[str, Any]]]:
    """FCIS against Mask R-CNN on the CPU in one run: the two minis models on one ResNet-50 body
    (same random weights) resize a random ``image_size`` image to ``min_size`` (600, FCIS's
    published scale). Two tables (:func:`minis.bench.instance_cost.instance_cost`):

    - ``models``: inference with ``detections`` detections, a training step on two images with
      four random objects each, the parameters, and ``vs_mask_rcnn``;
    - ``instances``: inference with each count of ``instances`` detections, each divided by its
      time with the fewest. FCIS's per-RoI work is pooling (and, with ``mask_voting``, one
      weighted average per kept box over its neighbours' masks); Mask R-CNN's is its mask head.
    """
    models = _fcis_and_mask_rcnn(num_classes, seed, min_size, max_size, mask_voting)
    return instance_cost(models, references=("mask_rcnn",), scaled=("fcis", "mask_rcnn"), image_size=image_size,
                         detections=detections, instances=instances, runs=runs, num_classes=num_classes, seed=seed,
                         progress=progress)


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def add_parser(suites: argparse._SubParsersAction) -> None:
    """``bench fcis`` and its options."""
    parser = suites.add_parser("fcis", help="FCIS against Mask R-CNN on the CPU; cost per detection")
    add_cost_options(parser, min_size=600, max_size=1000)
    parser.add_argument("--no-voting", action="store_true", help="FCIS without mask voting")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    rows = bench_fcis(**cost_arguments(args), mask_voting=not args.no_voting)
    voting = "without" if args.no_voting else "with"
    print(f"\nminis FCIS ({voting} mask voting) and Mask R-CNN (same ResNet-50 body weights) on the CPU:")
    print(format_table(rows["models"], FCIS_COLUMNS))
    print("\ninference time as the number of detections grows (each divided by its time with the fewest):")
    print(format_table(rows["instances"], FCIS_INSTANCE_COLUMNS))
    return finish(rows, args.json)
