"""``python -m minis bench ms-rcnn``: Mask R-CNN and Mask Scoring R-CNN trained alike, per seed.

>>> rows = bench_mask_scoring("data/shapes_semantic", seeds=(0, 1))
>>> print(format_table(mask_scoring_means(rows), MASK_SCORING_MEAN_COLUMNS))
"""

from __future__ import annotations

import argparse
import statistics
from typing import Any, Sequence

import torch

from minis.bench.common import (add_recipe_options, finish, format_table, recipe_overrides, shapes_instances,
                                train_with_recipe)
from minis.cli import UserError

MASK_SCORING_COLUMNS = [("seed", "d"), ("model", ""), ("ranking", ""), ("box_AP", ".4f"), ("mask_AP", ".4f"),
                        ("mask_AP50", ".4f"), ("mask_AP75", ".4f"), ("train_s", ".1f")]
MASK_SCORING_MEAN_COLUMNS = ["model", "ranking", ("seeds", "d"), ("mask_AP_mean", ".4f"), ("mask_AP_std", ".4f")]


def bench_mask_scoring(
    root: str = "data/shapes_semantic",
    *,
    seeds: Sequence[int] = (0,),
    train_config: dict[str, Any] | None = None,
    device: str = "cpu",
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Train ``mask_rcnn`` and ``ms_rcnn`` with the same settings, recipe and seed; AP of each.

    The Mask Scoring R-CNN is scored twice, on the same detections: ranked by its class scores
    (what Mask R-CNN would report) and by class score x predicted MaskIoU (its own ranking).
    Both models start from the same weights (the MaskIoU head is created last), but the sixth
    loss changes the shared features, so the two runs part ways from the first step; several
    ``seeds`` show how far two such runs of one model can land apart, against which the
    difference between the models can be read.

    ``root`` as for :func:`~minis.bench.twin_training.bench_twin_training`; the models are built
    with ``rcnn.SHAPES_SETTINGS`` and trained by ``rcnn.SHAPES_RECIPE``, which ``train_config``
    overrides. Returns one row per seed, model and ranking: ``seed``, ``model``, ``ranking``,
    ``box_AP``, ``mask_AP``, ``mask_AP50``, ``mask_AP75``, ``train_s``.
    """
    import minis.models
    from minis.models.rcnn import SHAPES_RECIPE, SHAPES_SETTINGS

    train_set, val_set = shapes_instances(root, progress)
    rows = []
    for seed in seeds:
        for name in ("mask_rcnn", "ms_rcnn"):
            if progress:
                print(f"training {name} with seed {seed}", flush=True)
            torch.manual_seed(seed)
            model = minis.models.build(name, num_classes=train_set.num_classes, **SHAPES_SETTINGS)
            trainer, _, seconds = train_with_recipe(model, train_set, val_set, SHAPES_RECIPE, train_config, seed,
                                                    device, progress)
            # Mask R-CNN ranks by class score; Mask Scoring R-CNN is scored both ways on its detections
            for rescore in ([False] if name == "mask_rcnn" else [False, True]):
                model.score_with_mask_iou = rescore
                ranking = "class x MaskIoU" if rescore else "class score"
                metrics = trainer.evaluate()
                rows.append({"seed": seed, "model": name, "ranking": ranking, "box_AP": metrics["bbox"]["AP"],
                             "mask_AP": metrics["segm"]["AP"], "mask_AP50": metrics["segm"]["AP50"],
                             "mask_AP75": metrics["segm"]["AP75"], "train_s": seconds})
    return rows


def mask_scoring_means(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and standard deviation over seeds of :func:`bench_mask_scoring`'s mask AP, per model and ranking."""
    groups: dict[tuple[str, str], list[float]] = {}
    for row in rows:
        groups.setdefault((row["model"], row["ranking"]), []).append(row["mask_AP"])
    return [{"model": model, "ranking": ranking, "seeds": len(values), "mask_AP_mean": statistics.mean(values),
             "mask_AP_std": statistics.stdev(values) if len(values) > 1 else None}
            for (model, ranking), values in groups.items()]


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def add_parser(suites: argparse._SubParsersAction) -> None:
    """``bench ms-rcnn`` and its options."""
    parser = suites.add_parser("ms-rcnn", help="train Mask R-CNN and Mask Scoring R-CNN alike; mask AP of each")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="one pair of runs per seed (default: 0)")
    add_recipe_options(parser)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    try:
        rows = bench_mask_scoring(args.root, seeds=args.seeds, train_config=recipe_overrides(args), device=args.device)
    except (ValueError, FileExistsError) as error:
        raise UserError(str(error)) from error
    print(f"\nMask R-CNN and Mask Scoring R-CNN trained alike on {args.root} (same settings, recipe and seed):")
    print(format_table(rows, MASK_SCORING_COLUMNS))
    means = mask_scoring_means(rows)
    print("\nmask AP over the seeds:")
    print(format_table(means, MASK_SCORING_MEAN_COLUMNS))
    return finish({"rows": rows, "means": means}, args.json)
