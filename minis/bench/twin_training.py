"""``python -m minis bench rcnn-training`` and ``bench fcos-training``: a minis detector and its
torchvision twin, trained alike on the shapes benchmark; AP of each.

Equal APs show that the losses and the choice of training examples are right, not only inference
(which ``bench rcnn`` compares).

>>> rows = bench_twin_training("fcos", "data/shapes_semantic", train_config={"epochs": 1})
>>> print(format_table(rows, RCNN_TRAINING_COLUMNS))
"""

from __future__ import annotations

import argparse
import importlib
from typing import Any

import torch

from minis.bench.common import (add_recipe_options, finish, format_table, recipe_overrides, shapes_instances,
                                train_with_recipe)
from minis.cli import UserError

RCNN_TRAINING_COLUMNS = [("implementation", ""), ("box_AP", ".4f"), ("mask_AP", ".4f"), ("mask_AP50", ".4f"),
                         ("final_loss", ".4f"), ("train_s", ".1f")]
# the detectors with a torchvision twin to train -> the model file that holds their settings and recipe
TWIN_MODEL_FILES = {"mask_rcnn": "rcnn", "faster_rcnn": "rcnn", "fcos": "fcos"}


def bench_twin_training(
    name: str = "mask_rcnn",
    root: str = "data/shapes_semantic",
    *,
    model_kwargs: dict[str, Any] | None = None,
    train_config: dict[str, Any] | None = None,
    seed: int = 0,
    device: str = "cpu",
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Train a minis detector (``mask_rcnn``, ``faster_rcnn`` or ``fcos``) and its torchvision twin the same way.

    ``root`` holds a shapes benchmark; when it holds none, the chapters' plain variant
    (:data:`minis.data.shapes.SEMANTIC_SHAPES`) is generated there. The torchvision model is
    :func:`minis.models.porting.torchvision_twin` of the minis one: the same backbone (by default
    the chapters' small one, the model file's ``SHAPES_SETTINGS``), settings and initial weights. The
    minis Trainer trains both with the same data order, optimizer, schedule and seed: the model
    file's ``SHAPES_RECIPE`` (the chapters' recipe), which ``train_config`` overrides, and
    pycocotools scores both on the validation set. The runs draw the same random samples, so what
    separates them is float rounding compounding over the steps.

    Returns one row per implementation: ``implementation``, ``box_AP``, ``mask_AP`` and
    ``mask_AP50`` (``None`` for box-only models), ``final_loss`` (mean over the last epoch) and
    ``train_s``.
    """
    import minis.models
    from minis.models.porting import torchvision_twin

    if name not in TWIN_MODEL_FILES:
        raise ValueError(f"no torchvision twin to train for {name!r}; choose from {', '.join(TWIN_MODEL_FILES)}")
    module = importlib.import_module(f"minis.models.{TWIN_MODEL_FILES[name]}")
    train_set, val_set = shapes_instances(root, progress)
    torch.manual_seed(seed)
    ours = minis.models.build(name, num_classes=train_set.num_classes,
                              **(module.SHAPES_SETTINGS if model_kwargs is None else model_kwargs))
    twin = torchvision_twin(ours)
    rows = []
    for implementation, model in (("minis", ours), ("torchvision", twin)):
        if progress:
            print(f"training the {implementation} {name}", flush=True)
        trainer, history, seconds = train_with_recipe(model, train_set, val_set, module.SHAPES_RECIPE, train_config,
                                                      seed, device, progress)
        metrics = trainer.evaluate()
        segm = metrics.get("segm", {})
        rows.append({"implementation": implementation, "box_AP": metrics["bbox"]["AP"], "mask_AP": segm.get("AP"),
                     "mask_AP50": segm.get("AP50"), "final_loss": history[-1]["loss"], "train_s": seconds})
    return rows


def bench_rcnn_training(root: str = "data/shapes_semantic", **options: Any) -> list[dict[str, Any]]:
    """:func:`bench_twin_training` of ``mask_rcnn``: minis and torchvision's Mask R-CNN trained alike."""
    return bench_twin_training("mask_rcnn", root, **options)


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------

# command -> (model, title, the AP whose gap is printed, help)
_COMMANDS = {
    "rcnn-training": ("mask_rcnn", "Mask R-CNN", "mask_AP",
                      "train minis' and torchvision's Mask R-CNN alike; AP of each"),
    "fcos-training": ("fcos", "FCOS", "box_AP", "train minis' and torchvision's FCOS alike; box AP of each"),
}


def add_parser(suites: argparse._SubParsersAction) -> None:
    """``bench rcnn-training`` and ``bench fcos-training`` and their options."""
    for command, (name, title, metric, help_text) in _COMMANDS.items():
        parser = suites.add_parser(command, help=help_text)
        parser.add_argument("--seed", type=int, default=0)
        add_recipe_options(parser)
        parser.set_defaults(handler=run, twin=(name, title, metric))


def run(args: argparse.Namespace) -> int:
    name, title, metric = args.twin
    try:
        rows = bench_twin_training(name, args.root, train_config=recipe_overrides(args), seed=args.seed,
                                   device=args.device)
    except (ValueError, FileExistsError) as error:
        raise UserError(str(error)) from error
    print(f"\n{title} trained by the minis Trainer on {args.root}, minis against torchvision "
          "(same start, same recipe):")
    print(format_table(rows, RCNN_TRAINING_COLUMNS))
    gap = abs(rows[0][metric] - rows[1][metric])
    label = metric.replace("_AP", " AP")
    print(f"{label} gap: {gap:.4f}")
    return finish({"rows": rows, f"{metric}_gap": gap}, args.json)
