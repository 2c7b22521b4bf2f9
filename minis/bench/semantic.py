"""``python -m minis bench semantic``: the semantic models side by side, and minis against torchvision.

Two tables:

1. :func:`bench_semantic` trains every model of :data:`SEMANTIC_MODELS` on the semantic variant
   of the shapes benchmark with the same budget (data, epochs, optimizer, schedule, seed) and
   reports its parameters, CPU inference time per image, training throughput and validation mIoU;
2. :func:`bench_ports` times the models that have a torchvision twin (FCN and DeepLabV3 on
   ResNet-50/101) against torchvision with the same weights, on the same input, in one run.

>>> rows = bench_semantic("data/shapes_semantic", models=["baseline_fcn", "fcn8s"], epochs=2)
>>> print(format_table(rows, SEMANTIC_COLUMNS))

Timing follows the rules of :mod:`minis.bench.common`; inference is timed on one image, on the CPU.
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any, Callable, Sequence

import torch
from torch import nn

from minis.bench.common import (add_json_option, count_parameters, finish, format_table, inference_ms,
                                interleaved_median_ms)
from minis.cli import UserError
from minis.data.shapes import SEMANTIC_SHAPES
from minis.models import unet

# The models the benchmark trains, in the order the book introduces them, at widths a 2-core CPU
# trains in a minute or two each. Every model not listed here uses its builder's defaults.
SEMANTIC_MODELS: list[tuple[str, dict[str, Any]]] = [
    ("baseline_fcn", {}),
    ("fcn32s", {}),
    ("fcn16s", {}),
    ("fcn8s", {}),
    ("unet", unet.SHAPES_OPTIONS),  # the U-Net chapter's model (width 8, deep supervision, fused)
    ("deeplabv1", {"head_channels": 128}),
    ("deeplabv2", {"head_channels": 64}),
    ("deeplabv3", {"head_channels": 64}),
    ("deeplabv3plus", {"head_channels": 64}),
    ("pspnet", {"head_channels": 64}),
]

# torchvision builders of the models minis can port (minis.models.from_torchvision).
PORTED_MODELS = ("fcn_resnet50", "fcn_resnet101", "deeplabv3_resnet50", "deeplabv3_resnet101")

# (row key, format spec) of the two printed tables.
SEMANTIC_COLUMNS = [("model", ""), ("args", ""), ("params", ",d"), ("cpu_ms", ".2f"),
                    ("train_img_per_s", ".1f"), ("mIoU", ".4f")]
PORT_COLUMNS = [("model", ""), ("input", ""), ("minis_ms", ".1f"), ("torchvision_ms", ".1f"), ("ratio", ".3f"),
                ("max_abs_diff", ".1e")]


# --------------------------------------------------------------------------------------------
# The semantic models on the shapes benchmark
# --------------------------------------------------------------------------------------------


def resolve_models(models: Sequence[str | tuple[str, dict[str, Any]]] | None) -> list[tuple[str, dict[str, Any]]]:
    """``(name, builder kwargs)`` pairs; a bare name gets its :data:`SEMANTIC_MODELS` kwargs (or none).

    Raises:
        ValueError: a name that is not registered, or the name of an instance model.
        TypeError: kwargs the model's builder does not take.
    """
    import minis.models

    defaults = dict(SEMANTIC_MODELS)
    entries = list(defaults) if models is None else models
    resolved = []
    for entry in entries:
        name, kwargs = (entry, dict(defaults.get(entry, {}))) if isinstance(entry, str) else (entry[0], dict(entry[1]))
        if name not in minis.models.list_models():
            raise ValueError(f"unknown model {name!r}; available: {', '.join(minis.models.list_models())}")
        resolved.append((name, kwargs))
    for name, kwargs in resolved:  # refuse a bad choice now, not after an hour of training the others
        task = minis.models.build(name, num_classes=2, **kwargs).task
        if task != "semantic":
            raise ValueError(f"{name!r} is an {task} model; the benchmark trains semantic models")
    return resolved


def _train_and_measure(name: str, kwargs: dict[str, Any], train_set, val_set, config, image_size: int,
                       inference_runs: int) -> dict:
    """One row of :func:`bench_semantic`: build (seeded), train, evaluate, time."""
    import minis.models
    from minis.engine import Trainer

    torch.manual_seed(config.seed)  # every model starts from the same random stream
    model = minis.models.build(name, num_classes=train_set.num_classes, **kwargs)
    trainer = Trainer(model, train_set, val_set, config, out_dir=None)
    start = time.perf_counter()
    trainer.fit()
    train_seconds = time.perf_counter() - start
    metrics = trainer.evaluate()
    return {
        "model": name,
        "args": ", ".join(f"{key}={value}" for key, value in kwargs.items()),
        "params": count_parameters(model),
        "cpu_ms": inference_ms(model, image_size, runs=inference_runs),
        # a single process sees every training image once per epoch
        "train_img_per_s": config.epochs * len(train_set) / train_seconds,
        "mIoU": float(metrics["mIoU"]),
        "pixel_accuracy": float(metrics["pixel_accuracy"]),
        "train_seconds": train_seconds,
        "epochs": config.epochs,
    }


def bench_semantic(
    root: str | os.PathLike = "data/shapes_semantic",
    models: Sequence[str | tuple[str, dict[str, Any]]] | None = None,
    *,
    epochs: int = 10,
    batch_size: int = 16,
    image_size: int = 128,
    num_train: int = 1000,
    num_val: int = 200,
    lr: float = 3e-3,
    warmup_iters: int = 50,
    seed: int = 0,
    inference_runs: int = 20,
    device: str = "cpu",
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Train each semantic model on the shapes benchmark with the same budget; one row per model.

    The data is the semantic shapes variant (:data:`SEMANTIC_SHAPES`, ``image_size`` pixels,
    ``num_train``/``num_val`` images), generated in ``root`` the first time and reused after.
    Every model is built from the same seed and trained by the :class:`~minis.engine.Trainer`
    with one recipe: AdamW at ``lr``, ``warmup_iters`` of linear warmup then the poly schedule,
    horizontal flips, ``epochs`` epochs of ``batch_size`` images, no evaluation until the end.

    With the defaults (10 models, 10 epochs of 1000 images in ``channels_last``, then
    :func:`bench_ports`) the whole ``python -m minis bench semantic`` took 8 minutes 16 seconds
    on a quiet 2-core CPU (peak memory 1.4 GB); U-Net takes the longest, the FCNs the least.

    Args:
        root: folder of the benchmark data (``make_shapes`` raises ``ValueError`` if it holds a
            shapes benchmark generated with other settings).
        models: names (their :data:`SEMANTIC_MODELS` kwargs, or the builder's defaults) or
            ``(name, kwargs)`` pairs; default :data:`SEMANTIC_MODELS`.
        inference_runs: timed calls per model for ``cpu_ms``.
        device: where the models train and are evaluated; inference is always timed on the CPU.
        progress: progress bars and a line per model.

    Returns:
        One dict per model: ``model``, ``args`` (builder kwargs as text), ``params``,
        ``cpu_ms`` (median CPU milliseconds per ``[1,3,S,S]`` image), ``train_img_per_s``
        (training images seen / wall time of ``fit``), ``mIoU`` and ``pixel_accuracy`` on the
        validation set, ``train_seconds``, ``epochs``.
    """
    from torchvision.transforms import v2

    from minis.data import build_datasets, make_shapes
    from minis.engine import TrainConfig

    chosen = resolve_models(models)
    make_shapes(root, image_size=image_size, num_train=num_train, num_val=num_val, progress=progress,
                **SEMANTIC_SHAPES)
    train_set, val_set = build_datasets("shapes", root, "semantic", train_transforms=v2.RandomHorizontalFlip(),
                                        progress=progress)
    config = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, optimizer="adamw", schedule="poly",
                         warmup_iters=warmup_iters, eval_every=0, device=device, seed=seed, progress=progress,
                         channels_last=True)
    rows = []
    for index, (name, kwargs) in enumerate(chosen, start=1):
        if progress:
            print(f"[{index}/{len(chosen)}] {name} {kwargs or ''}", flush=True)
        rows.append(_train_and_measure(name, kwargs, train_set, val_set, config, image_size, inference_runs))
    return rows


# --------------------------------------------------------------------------------------------
# minis against torchvision, same weights
# --------------------------------------------------------------------------------------------


def _torchvision_with_normalisation(tv_model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """``images in 0..1 -> logits`` through torchvision's model, ImageNet normalisation included.

    torchvision's models expect normalised images (its preset transforms normalise); minis
    normalises inside ``forward``. Timing this function against the minis model compares the
    same work.
    """
    from torchvision.transforms.v2 import functional as F

    from minis.nn.layers import IMAGENET_MEAN, IMAGENET_STD

    def run(images: torch.Tensor) -> torch.Tensor:
        return tv_model(F.normalize(images, list(IMAGENET_MEAN), list(IMAGENET_STD)))["out"]

    return run


@torch.no_grad()
def _compare_port(name: str, size: int, runs: int, warmup: int, seed: int) -> dict:
    """One row of :func:`bench_ports`."""
    import torchvision.models.segmentation as segmentation

    import minis.models

    torch.manual_seed(seed)
    # Random weights: the time of a forward pass does not depend on their values.
    tv_model = getattr(segmentation, name)(weights=None, weights_backbone=None, num_classes=21, aux_loss=False).eval()
    ours = minis.models.from_torchvision(tv_model).eval()
    reference = _torchvision_with_normalisation(tv_model)
    images = torch.rand(1, 3, size, size)
    max_abs_diff = (ours(images) - reference(images)).abs().max().item()
    minis_ms, torchvision_ms = interleaved_median_ms([lambda: ours(images), lambda: reference(images)], runs, warmup)
    return {
        "model": name,
        "input": "x".join(str(side) for side in images.shape),
        "minis_ms": minis_ms,
        "torchvision_ms": torchvision_ms,
        "ratio": minis_ms / torchvision_ms,
        "max_abs_diff": max_abs_diff,
    }


def bench_ports(
    names: Sequence[str] = PORTED_MODELS,
    sizes: Sequence[int] = (256,),
    *,
    runs: int = 7,
    warmup: int = 1,
    seed: int = 0,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """CPU inference time of minis and torchvision with the same weights, measured in one run.

    For each torchvision builder in ``names`` (default :data:`PORTED_MODELS`) and each square
    input side in ``sizes``: build it with random weights (21 classes, no auxiliary head), port it
    with :func:`minis.models.from_torchvision`, check that both give the same logits on one
    random image ``[1,3,S,S]`` and time both on it, alternating, ``warmup`` rounds then the median
    of ``runs``. A ResNet-101 forward pass at 256 pixels takes about 0.35 s on a 2-core CPU, so
    the defaults keep this to a minute or two.

    Returns:
        One dict per (model, size): ``model``, ``input`` (e.g. ``"1x3x256x256"``), ``minis_ms``,
        ``torchvision_ms``, ``ratio`` (minis / torchvision; the target is at most 1) and
        ``max_abs_diff`` (largest absolute difference between the two models' logits).
    """
    import torchvision.models.segmentation as segmentation

    unknown = [name for name in names if name not in PORTED_MODELS or not hasattr(segmentation, name)]
    if unknown:
        raise ValueError(f"no port to benchmark for {', '.join(unknown)}; choose from {', '.join(PORTED_MODELS)}")
    rows = []
    for name in names:
        for size in sizes:
            if progress:
                print(f"timing {name} at {size}x{size} against torchvision", flush=True)
            rows.append(_compare_port(name, size, runs, warmup, seed))
    return rows



# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def add_parser(suites: argparse._SubParsersAction) -> None:
    """``bench semantic`` and its options."""
    parser = suites.add_parser("semantic", help="train every semantic model on shapes; minis vs torchvision speed")
    parser.add_argument("--root", default="data/shapes_semantic", help="benchmark data (generated when missing)")
    parser.add_argument("--models", nargs="+", metavar="MODEL", help="default: all of minis.bench.SEMANTIC_MODELS")
    parser.add_argument("--epochs", type=int, help="training epochs per model (default: bench_semantic's)")
    parser.add_argument("--num-train", type=int, help="training images")
    parser.add_argument("--num-val", type=int, help="validation images")
    parser.add_argument("--image-size", type=int, help="side of the benchmark images (default 128)")
    parser.add_argument("--device", default="cpu", help="where the models train (inference is timed on the CPU)")
    ports = parser.add_mutually_exclusive_group()
    ports.add_argument("--no-ports", action="store_true", help="skip the minis vs torchvision timing")
    ports.add_argument("--ports-only", action="store_true", help="only the minis vs torchvision timing")
    parser.add_argument("--port-models", nargs="+", metavar="TV_MODEL",
                        help="torchvision models to time (default: all of minis.bench.PORTED_MODELS)")
    parser.add_argument("--port-sizes", type=int, nargs="+", default=[256], metavar="SIZE",
                        help="input sides for the port timing (default: 256)")
    parser.add_argument("--port-runs", type=int, default=7, help="timed forward passes per port (median)")
    add_json_option(parser, "every row")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    rows: dict[str, list] = {"semantic": [], "ports": []}
    if not args.ports_only:
        options = {name: getattr(args, name) for name in ("epochs", "num_train", "num_val", "image_size")
                   if getattr(args, name) is not None}
        try:
            models = resolve_models(args.models)
        except (ValueError, TypeError) as error:  # an unknown or instance model
            raise UserError(str(error)) from error
        try:
            rows["semantic"] = bench_semantic(args.root, models, device=args.device, **options)
        except (ValueError, FileExistsError) as error:  # data of other settings in --root, --epochs 0, ...
            raise UserError(str(error)) from error
        print(f"\nsemantic models on the shapes benchmark ({args.root}):")
        print(format_table(rows["semantic"], SEMANTIC_COLUMNS))
    if not args.no_ports:
        try:
            rows["ports"] = bench_ports(args.port_models or PORTED_MODELS, sizes=args.port_sizes, runs=args.port_runs)
        except ValueError as error:  # a model without a port
            raise UserError(str(error)) from error
        print("\nCPU inference, minis against torchvision with the same weights (ratio = minis / torchvision):")
        print(format_table(rows["ports"], PORT_COLUMNS))
    return finish(rows, args.json)
