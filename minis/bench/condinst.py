"""``python -m minis bench condinst``: CondInst's CPU cost against FCOS alone and Mask R-CNN, and as
the instances grow.

>>> rows = bench_condinst(min_size=320, runs=1)
>>> print(format_table(rows["models"], CONDINST_COLUMNS))
>>> print(format_table(rows["instances"], INSTANCE_COLUMNS))
"""

from __future__ import annotations

import argparse
from typing import Any, Sequence

import torch
from torch import nn

from minis.bench.common import finish, format_table
from minis.bench.instance_cost import add_cost_options, cost_arguments, instance_cost, share_body

CONDINST_COLUMNS = [("model", ""), ("step", ""), ("input", ""), ("ms", ".0f"), ("vs_fcos", ".2f"),
                    ("vs_mask_rcnn", ".2f")]
INSTANCE_COLUMNS = [("instances", "d"), ("condinst_ms", ".0f"), ("condinst_vs_1", ".2f"), ("mask_rcnn_ms", ".0f"),
                    ("mask_rcnn_vs_1", ".2f")]


def _one_stage_and_two_stage(num_classes: int, seed: int, min_size: int, max_size: int) -> dict[str, nn.Module]:
    """minis ``fcos``, ``condinst`` and ``mask_rcnn`` on one ResNet-50 body (same random weights), in eval mode.

    Every score threshold is 0, so that the number of detections is set by ``detections_per_img``
    (``box_detections_per_img`` for Mask R-CNN) alone.
    """
    import minis.models

    torch.manual_seed(seed)
    sizes = {"min_size": min_size, "max_size": max_size}
    models = {"fcos": minis.models.build("fcos", num_classes, **sizes, score_thresh=0.0),
              "condinst": minis.models.build("condinst", num_classes, **sizes, score_thresh=0.0),
              "mask_rcnn": minis.models.build("mask_rcnn", num_classes, **sizes, box_score_thresh=0.0)}
    share_body(models, dict.fromkeys(models, lambda model: model.backbone.body), "mask_rcnn")
    return models


def bench_condinst(
    *,
    image_size: tuple[int, int] = (480, 640),
    min_size: int = 512,
    max_size: int = 853,
    instances: Sequence[int] = (1, 10, 25, 50),
    detections: int = 50,
    runs: int = 3,
    num_classes: int = 81,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, list[dict[str, Any]]]:
    """CondInst's CPU cost against FCOS alone and against Mask R-CNN, and as the instances grow, in one run.

    The three minis models share a ResNet-50 body with the same random weights and resize a
    random ``image_size`` image to ``min_size``. Two tables (:func:`minis.bench.instance_cost.instance_cost`):

    - ``models``: inference with ``detections`` instances per image (every score threshold 0,
      so the count is exact), and a training step (forward and backward) on two images with four
      random objects each; ``vs_fcos`` and ``vs_mask_rcnn`` divide each time by those models';
    - ``instances``: CondInst and Mask R-CNN inference with each count of ``instances``
      detections, and each time divided by the one with the fewest. CondInst runs its tiny
      dynamic heads on one shared map, Mask R-CNN its mask head on one RoI per instance, and
      both paste or upsample one mask per instance to the image.

    The calls alternate (:func:`interleaved_median_ms`); medians of ``runs`` rounds.
    """
    models = _one_stage_and_two_stage(num_classes, seed, min_size, max_size)
    return instance_cost(models, references=("fcos", "mask_rcnn"), scaled=("condinst", "mask_rcnn"),
                         image_size=image_size, detections=detections, instances=instances, runs=runs,
                         num_classes=num_classes, seed=seed, progress=progress)


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def add_parser(suites: argparse._SubParsersAction) -> None:
    """``bench condinst`` and its options."""
    parser = suites.add_parser("condinst", help="CondInst against FCOS and Mask R-CNN on the CPU; cost per instance")
    add_cost_options(parser, min_size=512, max_size=853)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    rows = bench_condinst(**cost_arguments(args))
    print("\nminis CondInst, FCOS and Mask R-CNN (ResNet-50-FPN, same backbone weights) on the CPU:")
    print(format_table(rows["models"], CONDINST_COLUMNS))
    print("\ninference time as the number of detections grows (each divided by its time with the fewest):")
    print(format_table(rows["instances"], INSTANCE_COLUMNS))
    return finish(rows, args.json)
