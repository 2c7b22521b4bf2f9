"""``python -m minis bench stability``: how far each chapter's headline result moves with the seed and
the thread count.

A chapter trains its model once, with seed 0, on the reader's machine. A reader in Colab, on another
CPU or with another seed must land near the book's number, or the book's claim does not hold. This
suite re-trains each chapter's headline model(s) with the chapter's own recipe (the model files'
``SHAPES_RECIPE`` and options, which the chapters use) for several seeds and thread counts, and
reports per chapter the mean, minimum and maximum of the headline metric, the spread (max - min)
and whether the minimum clears the floor that the chapter asserts.

Why threads: a float sum taken in another order differs in its last bits, and over thousands of
training steps those bits grow into different weights. One thread more or less is the cheapest
"another machine" there is.

>>> rows = bench_stability(["fcos"], runs=[(0, 2), (1, 2)])
>>> print(format_table(stability_summary(rows), SUMMARY_COLUMNS))

It is a benchmark, not a test: a chapter's run takes minutes, the default four runs per chapter take
about as long as four executions of the chapter's training section.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from minis.bench.common import add_json_option, finish, format_table, shapes_instances, train_with_recipe
from minis.cli import UserError

# (seed, threads): seeds 0-2 at 2 threads (the book's machines), seed 0 at 1 thread
DEFAULT_RUNS: tuple[tuple[int, int], ...] = ((0, 2), (1, 2), (2, 2), (0, 1))
RUN_COLUMNS = ["chapter", "metric", ("seed", "d"), ("threads", "d"), ("value", ".4f"), ("train_s", ".0f")]
SUMMARY_COLUMNS = ["chapter", "metric", ("runs", "d"), ("mean", ".4f"), ("min", ".4f"), ("max", ".4f"),
                   ("spread", ".4f"), ("floor", ".2f"), "verdict", ("train_s", ".0f")]
MAX_SPREAD = 0.05  # the book's budget for a headline result over seeds (DESIGN.md, "Budgets")


# ----------------------------------------------------------------------------------------------
# One training run per chapter, by the chapter's recipe
# ----------------------------------------------------------------------------------------------


def _semantic_data(root: str, progress: bool, variant: dict[str, Any] | None) -> tuple[Any, Any]:
    """Train and val sets of a semantic shapes benchmark, augmented by a horizontal flip alone (the
    semantic chapters' choice); generated in ``root`` when missing."""
    from pathlib import Path

    from torchvision.transforms import v2

    from minis.data import build_datasets, make_shapes

    if not (Path(root) / "meta.json").is_file():
        make_shapes(root, progress=progress, **(variant or {}))
    return build_datasets("shapes", root, task="semantic", train_transforms=v2.RandomHorizontalFlip(),
                          progress=progress)


def _train_semantic(name: str, options: dict, recipe: dict, data: tuple[Any, Any], seed: int, device: str,
                    progress: bool, overrides: dict | None,
                    start_from: torch.nn.Module | None = None) -> tuple[torch.nn.Module, float, float]:
    """Build ``name`` with the seed's initial weights (optionally loading a coarser model's), train it by
    ``recipe`` (``overrides`` change some fields); returns the model, its validation mIoU and the training seconds."""
    import minis.models

    train_set, val_set = data
    torch.manual_seed(seed)  # the initial weights; the Trainer seeds data order and augmentation itself
    model = minis.models.build(name, num_classes=train_set.num_classes, **options)
    if start_from is not None:
        model.load_state_dict(start_from.state_dict(), strict=False)  # the new skip layers keep their zero init
    trainer, _, seconds = train_with_recipe(model, train_set, val_set, recipe, overrides, seed, device, progress)
    return model, float(trainer.evaluate()["mIoU"]), seconds


def _tasks_data_metrics(seed: int, device: str, progress: bool, roots: dict[str, str],
                        overrides: dict | None) -> tuple[dict, float]:
    from minis.models.baseline import SHAPES_CLASS_WEIGHT_POWER, SHAPES_RECIPE
    from minis.nn import median_frequency_weights

    data = _semantic_data(roots["shapes"], progress, None)
    weights = median_frequency_weights(data[0], data[0].num_classes, SHAPES_CLASS_WEIGHT_POWER).tolist()
    _, miou, seconds = _train_semantic("baseline_fcn", {"class_weights": weights}, SHAPES_RECIPE, data, seed, device,
                                       progress, overrides)
    return {"baseline_fcn mIoU": miou}, seconds


def _fcn(seed: int, device: str, progress: bool, roots: dict[str, str], overrides: dict | None) -> tuple[dict, float]:
    from minis.data.shapes import SEMANTIC_SHAPES
    from minis.models.fcn import SHAPES_RECIPE, SHAPES_STAGES

    data = _semantic_data(roots["semantic"], progress, SEMANTIC_SHAPES)
    model, total = None, 0.0
    for name, epochs in SHAPES_STAGES:  # FCN-32s, then FCN-16s from it, then FCN-8s from that
        model, miou, seconds = _train_semantic(name, {}, {**SHAPES_RECIPE, "epochs": epochs}, data, seed, device,
                                               progress, overrides, start_from=model)
        total += seconds
    return {"FCN-8s mIoU": miou}, total


def _unet(seed: int, device: str, progress: bool, roots: dict[str, str], overrides: dict | None) -> tuple[dict, float]:
    from minis.data.shapes import SEMANTIC_SHAPES
    from minis.models.unet import SHAPES_OPTIONS, SHAPES_RECIPE

    data = _semantic_data(roots["semantic"], progress, SEMANTIC_SHAPES)
    _, miou, seconds = _train_semantic("unet", SHAPES_OPTIONS, SHAPES_RECIPE, data, seed, device, progress,
                                   overrides)
    return {"U-Net mIoU": miou}, seconds


def _deeplab_pspnet(seed: int, device: str, progress: bool, roots: dict[str, str],
                    overrides: dict | None) -> tuple[dict, float]:
    from minis.data.shapes import SEMANTIC_SHAPES
    from minis.models import deeplab, pspnet

    data = _semantic_data(roots["semantic"], progress, SEMANTIC_SHAPES)
    values, total = {}, 0.0
    # the headline (DeepLab v3+) first; the chapter's ranking of the three needs the other two
    for name, module in (("deeplabv3plus", deeplab), ("deeplabv3", deeplab), ("pspnet", pspnet)):
        _, values[f"{name} mIoU"], seconds = _train_semantic(name, module.SHAPES_OPTIONS, module.SHAPES_RECIPE, data,
                                                             seed, device, progress, overrides)
        total += seconds
    return values, total


def _instance_chapter(name: str, module_name: str, metric: str,
                      extra: Callable[..., tuple[dict, float]] | None = None) -> Callable:
    """The run of an instance chapter: ``name`` built with its model file's ``SHAPES_SETTINGS``, trained
    by its ``SHAPES_RECIPE``, scored with pycocotools."""
    def run(seed: int, device: str, progress: bool, roots: dict[str, str], overrides: dict | None) -> tuple[dict, float]:
        import importlib

        import minis.models
        from minis.engine import evaluate

        module = importlib.import_module(f"minis.models.{module_name}")
        data = shapes_instances(roots["semantic"], progress)
        torch.manual_seed(seed)
        model = minis.models.build(name, num_classes=data[0].num_classes, **module.SHAPES_SETTINGS)
        trainer, _, seconds = train_with_recipe(model, data[0], data[1], module.SHAPES_RECIPE, overrides, seed,
                                                device, progress)
        metrics = trainer.evaluate()
        kind, label = ("segm", "mask") if metric == "mask" else ("bbox", "box")
        values = {f"{name} {label} AP": float(metrics[kind]["AP"])}
        if extra is not None:
            more, more_seconds = extra(seed, device, progress, data, overrides)
            values.update(more)
            seconds += more_seconds
        return values, seconds
    return run


def _condinst_without_coordinates(seed: int, device: str, progress: bool, data: tuple,
                                  overrides: dict | None) -> tuple[dict, float]:
    """The CondInst chapter's ablation, whose gap to the full model the chapter's prose quotes."""
    import minis.models
    from minis.models import condinst

    torch.manual_seed(seed)
    model = minis.models.build("condinst", num_classes=data[0].num_classes, **condinst.SHAPES_SETTINGS,
                               relative_coords=False)
    trainer, _, seconds = train_with_recipe(model, data[0], data[1], condinst.SHAPES_RECIPE, overrides, seed, device,
                                            progress)
    return {"condinst (no coords) mask AP": float(trainer.evaluate()["segm"]["AP"])}, seconds


@dataclass(frozen=True)
class Headline:
    """A chapter's headline result: the metric its results section asserts (the first of the values
    its run returns) and the floor of that assert."""

    chapter: str
    metric: str
    floor: float
    run: Callable[[int, str, bool, dict[str, str], dict | None], tuple[dict[str, float], float]]


# The chapters in the book's order. Their floors are the numbers in each chapter's closing assert.
HEADLINES: dict[str, Headline] = {h.chapter: h for h in (
    Headline("tasks_data_metrics", "baseline_fcn mIoU", 0.55, _tasks_data_metrics),
    Headline("fcn", "FCN-8s mIoU", 0.80, _fcn),
    Headline("unet", "U-Net mIoU", 0.80, _unet),
    Headline("deeplab_pspnet", "deeplabv3plus mIoU", 0.85, _deeplab_pspnet),
    Headline("mask_rcnn", "mask_rcnn mask AP", 0.50, _instance_chapter("mask_rcnn", "rcnn", "mask")),
    Headline("ms_rcnn", "ms_rcnn mask AP", 0.50, _instance_chapter("ms_rcnn", "ms_rcnn", "mask")),
    Headline("fcis", "fcis mask AP", 0.50, _instance_chapter("fcis", "fcis", "mask")),
    Headline("fcos", "fcos box AP", 0.65, _instance_chapter("fcos", "fcos", "box")),
    Headline("condinst", "condinst mask AP", 0.50,
             _instance_chapter("condinst", "condinst", "mask", extra=_condinst_without_coordinates)),
    Headline("yolact", "yolact mask AP", 0.50, _instance_chapter("yolact", "yolact", "mask")),
)}


# ----------------------------------------------------------------------------------------------
# The suite
# ----------------------------------------------------------------------------------------------


def bench_stability(
    chapters: Sequence[str] = tuple(HEADLINES),
    *,
    runs: Sequence[tuple[int, int]] = DEFAULT_RUNS,
    device: str = "cpu",
    shapes_root: str = "data/shapes",
    semantic_root: str = "data/shapes_semantic",
    overrides: dict[str, Any] | None = None,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Train each chapter's headline model(s) once per ``(seed, threads)`` of ``runs``.

    ``shapes_root`` holds the default benchmark (the foundations chapter's), ``semantic_root`` the
    chapters' plain variant; a missing one is generated. ``overrides`` change fields of every recipe
    (e.g. ``{"epochs": 1}`` for a quick check; the chapters' numbers need none). Returns one row per chapter, run and metric:
    ``chapter``, ``metric``, ``seed``, ``threads``, ``value``, ``train_s`` (the run's training time,
    all its models together), ``headline`` (whether it is the metric the chapter asserts).
    """
    unknown = [name for name in chapters if name not in HEADLINES]
    if unknown:
        raise ValueError(f"unknown chapter(s) {', '.join(unknown)}; available: {', '.join(HEADLINES)}")
    roots = {"shapes": shapes_root, "semantic": semantic_root}
    threads_before = torch.get_num_threads()
    rows = []
    try:
        for chapter in chapters:
            headline = HEADLINES[chapter]
            for seed, threads in runs:
                torch.set_num_threads(threads)
                if progress:
                    print(f"{chapter}: seed {seed}, {threads} thread(s)", flush=True)
                started = time.perf_counter()
                values, seconds = headline.run(seed, device, progress, roots, overrides)
                if progress:
                    print(f"  {', '.join(f'{k} {v:.4f}' for k, v in values.items())} "
                          f"({time.perf_counter() - started:.0f} s)", flush=True)
                rows += [{"chapter": chapter, "metric": metric, "seed": seed, "threads": threads, "value": value,
                          "train_s": seconds, "headline": metric == headline.metric}
                         for metric, value in values.items()]
    finally:
        torch.set_num_threads(threads_before)
    return rows


def stability_summary(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per chapter and metric: number of runs, mean, min, max, spread (max - min), total training
    seconds; for the asserted metric also its floor and a verdict (``ok`` when the spread is within
    :data:`MAX_SPREAD` and the minimum clears the floor)."""
    summary = []
    keys = list(dict.fromkeys((row["chapter"], row["metric"]) for row in rows))
    for chapter, metric in keys:
        chosen = [row for row in rows if row["chapter"] == chapter and row["metric"] == metric]
        values = [row["value"] for row in chosen]
        entry = {"chapter": chapter, "metric": metric, "runs": len(values), "mean": statistics.fmean(values),
                 "min": min(values), "max": max(values), "spread": max(values) - min(values),
                 "train_s": sum(row["train_s"] for row in chosen)}
        if chosen[0]["headline"]:
            floor = HEADLINES[chapter].floor
            problems = [f"spread > {MAX_SPREAD}"] * (entry["spread"] > MAX_SPREAD) + ["min < floor"] * (entry["min"] < floor)
            entry.update(floor=floor, verdict="ok" if not problems else ", ".join(problems))
        summary.append(entry)
    return summary


def _run_spec(text: str) -> tuple[int, int]:
    try:
        seed, threads = (int(part) for part in text.split("@"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a run is SEED@THREADS, e.g. 0@2; got {text!r}") from None
    if threads < 1:
        raise argparse.ArgumentTypeError(f"threads must be at least 1; got {text!r}")
    return seed, threads


def add_parser(suites: argparse._SubParsersAction) -> None:
    """``bench stability`` and its options."""
    parser = suites.add_parser("stability", help="re-train each chapter's headline model over seeds and thread "
                                                 "counts; spread of its headline result")
    parser.add_argument("chapters", nargs="*", default=list(HEADLINES),
                        help=f"chapters to measure (default: all): {', '.join(HEADLINES)}")
    parser.add_argument("--runs", type=_run_spec, nargs="+", default=list(DEFAULT_RUNS), metavar="SEED@THREADS",
                        help="one training run each (default: 0@2 1@2 2@2 0@1)")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda, ...")
    parser.add_argument("--shapes-root", default="data/shapes", help="the default benchmark (generated when missing)")
    parser.add_argument("--semantic-root", default="data/shapes_semantic",
                        help="the chapters' plain variant (generated when missing)")
    parser.add_argument("--epochs", type=int, help="train every model this many epochs (a quick check; the "
                                                   "chapters' numbers need the recipes' own)")
    add_json_option(parser)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    try:
        rows = bench_stability(args.chapters, runs=args.runs, device=args.device, shapes_root=args.shapes_root,
                               semantic_root=args.semantic_root,
                               overrides={"epochs": args.epochs} if args.epochs else None)
    except (ValueError, FileExistsError) as error:
        raise UserError(str(error)) from error
    print("\nevery run (value: the metric on the chapter's validation set; train_s: the run's training time):")
    print(format_table(rows, RUN_COLUMNS))
    summary = stability_summary(rows)
    print(f"\nper chapter (spread = max - min; budget {MAX_SPREAD}; floor: the chapter's assert):")
    print(format_table(summary, SUMMARY_COLUMNS))
    return finish({"rows": rows, "summary": summary}, args.json)
