"""Benchmarks: ``python -m minis bench SUITE``, one module per suite with its command-line wiring.

======================  ====================================================================
suite (module)          what it measures
======================  ====================================================================
``semantic``            every semantic model trained on shapes with one budget; FCN and
                        DeepLabV3 against torchvision with the same weights
``rcnn``                Mask R-CNN / Faster R-CNN / FCOS and each plain ``minis.ops`` function
                        against torchvision: speed and agreement
``rcnn-training``,      a minis detector and its torchvision twin trained alike: AP of each
``fcos-training``       (:mod:`minis.bench.twin_training`)
``ms-rcnn``             Mask R-CNN and Mask Scoring R-CNN trained alike, per seed
                        (:mod:`minis.bench.mask_scoring`)
``condinst``            CondInst against FCOS and Mask R-CNN, and as the instances grow
``fcis``                FCIS against Mask R-CNN on the same body, and as the detections grow
``yolact``              YOLACT against Mask R-CNN on the same body, and as the detections
                        grow; Fast NMS against greedy NMS (minis and torchvision)
``solo``                Matrix NMS against greedy mask NMS as the candidates grow
``gpu``                 every model trained a few mixed-precision steps and run on CUDA, its
                        outputs checked; Mask R-CNN and FCOS against torchvision there
``stability``           each chapter's headline model re-trained by the chapter's recipe over
                        seeds and thread counts: mean, min, max and spread of its result
======================  ====================================================================

Every suite module defines ``add_parser(suites)``, which adds its sub-command(s) to ``bench`` with
``set_defaults(handler=run)``, and ``run(args) -> exit status``. A new suite is a new module listed
in :data:`SUITES`; nothing else changes. What the suites share (timing, tables, the closing
machine note and JSON) lives in :mod:`minis.bench.common`.

The training recipes the suites use are not defined here: they are the chapters' recipes, next to
the models' settings (``minis.models.rcnn.SHAPES_RECIPE``, ``fcos.SHAPES_RECIPE``, ...), and the
benchmark's data is the chapters' plain variant of shapes (``minis.data.shapes.SEMANTIC_SHAPES``).
The functions the chapters call are importable from here, e.g. ``minis.bench.interleaved_median_ms``.
"""

from __future__ import annotations

import argparse
import importlib

from minis.bench.common import (count_parameters, finish, format_table, inference_ms, interleaved_median_ms,
                                machine_note, random_boxes, random_targets, synchronized)
from minis.bench.condinst import CONDINST_COLUMNS, INSTANCE_COLUMNS, bench_condinst
from minis.bench.fcis import FCIS_COLUMNS, FCIS_INSTANCE_COLUMNS, bench_fcis
from minis.bench.gpu import GPU_COLUMNS, bench_gpu
from minis.bench.mask_scoring import MASK_SCORING_COLUMNS, bench_mask_scoring, mask_scoring_means
from minis.bench.rcnn import (FCOS_LOSS_NAMES, OP_COLUMNS, OP_SIZES, RCNN_COLUMNS, RCNN_MODELS, bench_ops, bench_rcnn,
                              torchvision_rcnn)
from minis.bench.solo import MATRIX_NMS_COLUMNS, bench_matrix_nms
from minis.bench.stability import HEADLINES, RUN_COLUMNS, SUMMARY_COLUMNS, bench_stability, stability_summary
from minis.bench.semantic import (PORT_COLUMNS, PORTED_MODELS, SEMANTIC_COLUMNS, SEMANTIC_MODELS, bench_ports,
                                  bench_semantic, resolve_models)
from minis.bench.twin_training import RCNN_TRAINING_COLUMNS, bench_rcnn_training, bench_twin_training
from minis.bench.yolact import (FAST_NMS_COLUMNS, YOLACT_COLUMNS, YOLACT_INSTANCE_COLUMNS, bench_fast_nms,
                                bench_yolact)
from minis.data.shapes import SEMANTIC_SHAPES

# The suite modules, in the order ``python -m minis bench --help`` lists their commands.
SUITES = ("semantic", "rcnn", "twin_training", "mask_scoring", "condinst", "fcis", "yolact", "solo", "gpu", "stability")


def add_parsers(bench: argparse.ArgumentParser) -> None:
    """Give the ``bench`` command one sub-command per suite (each module adds its own)."""
    suites = bench.add_subparsers(dest="suite", required=True)
    for name in SUITES:
        importlib.import_module(f"minis.bench.{name}").add_parser(suites)
    suites.metavar = "{" + ",".join(suites.choices) + "}"


__all__ = [
    "SUITES", "add_parsers", "SEMANTIC_SHAPES",
    "count_parameters", "finish", "format_table", "inference_ms", "interleaved_median_ms", "machine_note",
    "random_boxes", "random_targets", "synchronized",
    "SEMANTIC_MODELS", "PORTED_MODELS", "SEMANTIC_COLUMNS", "PORT_COLUMNS", "resolve_models", "bench_semantic",
    "bench_ports",
    "RCNN_MODELS", "FCOS_LOSS_NAMES", "OP_SIZES", "RCNN_COLUMNS", "OP_COLUMNS", "torchvision_rcnn", "bench_rcnn",
    "bench_ops",
    "RCNN_TRAINING_COLUMNS", "bench_twin_training", "bench_rcnn_training",
    "MASK_SCORING_COLUMNS", "bench_mask_scoring", "mask_scoring_means",
    "CONDINST_COLUMNS", "INSTANCE_COLUMNS", "bench_condinst", "FCIS_COLUMNS", "FCIS_INSTANCE_COLUMNS", "bench_fcis",
    "YOLACT_COLUMNS", "YOLACT_INSTANCE_COLUMNS", "FAST_NMS_COLUMNS", "bench_yolact", "bench_fast_nms", "MATRIX_NMS_COLUMNS", "bench_matrix_nms",
    "GPU_COLUMNS", "bench_gpu",
    "HEADLINES", "RUN_COLUMNS", "SUMMARY_COLUMNS", "bench_stability", "stability_summary",
]
