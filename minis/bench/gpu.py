"""``python -m minis bench gpu``: does every registered model train and predict on a GPU?

For every model of :func:`minis.models.list_models` (or those asked for), :func:`bench_gpu`
overfits one small fixed batch of the shapes benchmark for a few iterations with the minis
:class:`~minis.engine.Trainer` (so with its mixed precision: float16 autocast and a gradient
scaler, on CUDA by default), runs an inference on the same batch, and checks three things:

- **finite**: no loss became nan or inf (the Trainer stops at the first one);
- **falls**: the mean total loss of the last few iterations is below that of the first few (one
  batch, seen again and again, must be learned);
- **contract**: the outputs keep the model interface of :mod:`minis.models`. Instance models: one
  dict per image with ``boxes`` float ``[N,4]``, ``labels`` int64 in ``1..K``, ``scores`` ``[N]``
  in 0..1, ``masks`` ``[N,1,H,W]`` in 0..1 at the input image's size (required of a model that
  learns masks, i.e. has a loss named ``*mask*``; absent from box-only models such as
  ``faster_rcnn`` and ``fcos``), an optional ``mask_scores`` ``[N]``. Semantic models: logits
  ``[B,C,H,W]`` at the input's resolution. All of them finite.

Then :func:`minis.bench.rcnn.bench_rcnn` times Mask R-CNN and FCOS against torchvision's with the
same weights, on the same device and with the same precision. The command exits with status 1
when a check fails, so it can gate a GPU job.

Each model is built with its model file's ``SHAPES_SETTINGS`` (the book's small configuration)
where there is one, resizing to the batch's size (``min_size = image_size``); semantic models
with the widths of ``bench semantic`` (:data:`minis.bench.semantic.SEMANTIC_MODELS`). The tests
run it on the CPU, without mixed precision (``--device cpu``, the default without CUDA).

>>> rows = bench_gpu(["mask_rcnn", "fcn8s"], device="cuda", iterations=20)
>>> print(format_table(rows, GPU_COLUMNS))
"""

from __future__ import annotations

import argparse
import math
import statistics
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from minis.bench.common import add_json_option, finish, format_table, interleaved_median_ms, synchronized
from minis.cli import UserError

GPU_COLUMNS = [("model", ""), ("device", ""), ("amp", ""), ("first_loss", ".4f"), ("last_loss", ".4f"),
               ("falls", ""), ("finite", ""), ("contract", ""), ("train_ms", ".1f"), ("inference_ms", ".1f")]
TORCHVISION_MODELS = ("maskrcnn_resnet50_fpn", "fcos_resnet50_fpn")  # timed against minis after the checks
LOSS_WINDOW = 5  # iterations averaged at each end of the run to say whether the loss fell


def default_device() -> str:
    """``"cuda"`` when a GPU is available, else ``"cpu"``."""
    return "cuda" if torch.cuda.is_available() else "cpu"


# --------------------------------------------------------------------------------------------
# A fixed batch and the models' small settings
# --------------------------------------------------------------------------------------------


def _boxes_of(masks: torch.Tensor) -> torch.Tensor:
    """Tight xyxy boxes ``[N,4]`` of non-empty ``[N,H,W]`` masks, the end exclusive (COCO's ``x + w``)."""
    height, width = masks.shape[-2:]
    columns, rows = masks.any(dim=1), masks.any(dim=2)  # [N,W], [N,H]
    x1, y1 = columns.float().argmax(dim=1), rows.float().argmax(dim=1)
    x2, y2 = width - columns.flip(1).float().argmax(dim=1), height - rows.flip(1).float().argmax(dim=1)
    return torch.stack([x1, y1, x2, y2], dim=1).float()


def fixed_batch(task: str, image_size: int = 128, batch_size: int = 2,
                seed: int = 0) -> list[tuple[torch.Tensor, dict]]:
    """``batch_size`` dataset items ``(image [3,S,S] in 0..1, target)`` of the shapes benchmark, rendered in memory.

    The images are the chapters' plain variant (:data:`minis.data.shapes.SEMANTIC_SHAPES`), each
    with at least one object. ``task="instance"`` targets hold ``boxes`` (float xyxy), ``labels``
    (int64 ``1..5``), ``masks`` (uint8 ``[N,S,S]``), ``iscrowd``, ``area`` and ``image_id``, as
    :class:`~minis.data.CocoInstances` gives them; ``task="semantic"`` targets ``semantic``
    (int64 ``[S,S]``) and ``image_id``. Deterministic in ``seed``.
    """
    from minis.data.shapes import SEMANTIC_SHAPES, render_sample

    items = []
    for index in range(batch_size):
        rng = np.random.default_rng([seed, index])
        sample = render_sample(rng, image_size=image_size, **SEMANTIC_SHAPES)
        while len(sample.labels) == 0:  # an image without objects teaches a detector little here
            sample = render_sample(rng, image_size=image_size, **SEMANTIC_SHAPES)
        image = torch.from_numpy(sample.image).permute(2, 0, 1).float() / 255
        if task == "semantic":
            target = {"semantic": torch.from_numpy(sample.semantic_label()).long(), "image_id": index + 1}
        else:
            masks = torch.from_numpy(sample.visible_masks()).to(torch.uint8)
            target = {"boxes": _boxes_of(masks.bool()), "labels": torch.from_numpy(sample.labels),
                      "masks": masks, "iscrowd": torch.zeros(len(masks), dtype=torch.int64),
                      "area": masks.sum(dim=(1, 2)).float(), "image_id": index + 1}
        items.append((image, target))
    return items


def small_settings(name: str, image_size: int) -> dict[str, Any]:
    """The builder keyword arguments :func:`bench_gpu` uses for ``name`` (see the module docstring)."""
    import minis.models
    from minis.bench.semantic import SEMANTIC_MODELS

    settings = minis.models.shapes_settings(name) or dict(dict(SEMANTIC_MODELS).get(name, {}))
    if "min_size" in settings:  # a detector: no resizing of the batch
        settings.update(min_size=image_size, max_size=2 * image_size)
    return settings


# --------------------------------------------------------------------------------------------
# The checks
# --------------------------------------------------------------------------------------------


def _in_unit_interval(values: torch.Tensor) -> bool:
    return bool(torch.isfinite(values).all() and (values >= 0).all() and (values <= 1).all())


def instance_contract(outputs: Any, image_sizes: Sequence[tuple[int, int]], num_classes: int,
                      learns_masks: bool) -> list[str]:
    """What ``outputs`` (an instance model's eval output for images of ``image_sizes``) gets wrong
    in the model interface; an empty list when nothing."""
    if not isinstance(outputs, list) or len(outputs) != len(image_sizes):
        return [f"expected a list of {len(image_sizes)} dicts, got {type(outputs).__name__}"]
    problems = []
    for index, (output, (height, width)) in enumerate(zip(outputs, image_sizes)):
        required = ("boxes", "labels", "scores", *(["masks"] if learns_masks else []))
        missing = [key for key in required if key not in output]
        if missing:
            problems.append(f"image {index}: no {', '.join(missing)}")
            continue
        boxes, labels, scores = output["boxes"], output["labels"], output["scores"]
        count = len(boxes)
        if not (boxes.is_floating_point() and boxes.shape == (count, 4) and torch.isfinite(boxes).all()):
            problems.append(f"image {index}: boxes {tuple(boxes.shape)} {boxes.dtype}, expected finite float [N,4]")
        if not (labels.dtype == torch.int64 and labels.shape == (count,)
                and ((labels >= 1) & (labels < num_classes)).all()):
            problems.append(f"image {index}: labels {tuple(labels.shape)} {labels.dtype}, expected int64 [N] in "
                            f"1..{num_classes - 1}")
        for key in ("scores", "mask_scores"):
            if key in output and not (output[key].is_floating_point() and output[key].shape == (count,)
                                      and _in_unit_interval(output[key])):
                problems.append(f"image {index}: {key} {tuple(output[key].shape)} {output[key].dtype}, "
                                "expected float [N] in 0..1")
        if "masks" in output:
            masks = output["masks"]
            if not (masks.is_floating_point() and masks.shape == (count, 1, height, width)
                    and _in_unit_interval(masks)):
                problems.append(f"image {index}: masks {tuple(masks.shape)} {masks.dtype}, expected float "
                                f"[N,1,{height},{width}] in 0..1")
    return problems


def semantic_contract(logits: Any, batch_shape: Sequence[int], num_classes: int) -> list[str]:
    """What a semantic model's eval output for a ``[B,3,H,W]`` batch gets wrong; empty when nothing."""
    batch, _, height, width = batch_shape
    expected = (batch, num_classes, height, width)
    if not isinstance(logits, torch.Tensor):
        return [f"expected logits {list(expected)}, got {type(logits).__name__}"]
    if not (logits.is_floating_point() and tuple(logits.shape) == expected and torch.isfinite(logits).all()):
        return [f"logits {tuple(logits.shape)} {logits.dtype}, expected finite float {list(expected)}"]
    return []


def _train(model: nn.Module, items: list, iterations: int, lr: float, amp: bool, device: torch.device,
           seed: int) -> tuple[list[dict], str | None]:
    """Overfit ``items`` (one batch) for ``iterations`` steps with the Trainer; its history and the
    error that stopped it (``None`` when none)."""
    from minis.engine import NonFiniteLossError, TrainConfig, Trainer

    # one epoch = one step on the whole batch, so the history holds every iteration's losses and time
    config = TrainConfig(epochs=iterations, batch_size=len(items), lr=lr, optimizer="adamw", schedule="constant",
                         clip_grad_norm=5.0, amp=amp, device=str(device), seed=seed, eval_every=0, progress=False)
    trainer = Trainer(model, items, None, config)
    try:
        trainer.fit()
    except NonFiniteLossError as error:
        return trainer.history, str(error)
    return trainer.history, None


def _check_model(name: str, batch_for: Callable[[str], list], *, iterations: int, lr: float, amp: bool,
                 device: torch.device, seed: int, inference_runs: int, num_classes: int,
                 image_size: int) -> dict[str, Any]:
    """One row of :func:`bench_gpu`; ``batch_for(task)`` gives the fixed batch of a task."""
    import minis.models

    row: dict[str, Any] = {"model": name, "device": str(device), "amp": "yes" if amp else "no", "problems": []}
    torch.manual_seed(seed)
    model = minis.models.build(name, num_classes, **small_settings(name, image_size))
    items = batch_for(model.task)
    history, error = _train(model, items, iterations, lr, amp, device, seed)
    losses = [record["loss"] for record in history]
    window = max(1, min(LOSS_WINDOW, len(losses) // 4))
    row["finite"] = "yes" if error is None else "no"
    if error is not None:
        row["problems"].append(error)
    if losses:
        row["first_loss"], row["last_loss"] = statistics.mean(losses[:window]), statistics.mean(losses[-window:])
        row["falls"] = "yes" if row["last_loss"] < row["first_loss"] else "no"
        seconds = [record["seconds"] for record in history[1:] or history]  # the first step also warms up
        row["train_ms"] = 1000 * statistics.median(seconds)
        row["losses"] = losses
    if row.get("falls") != "yes" and error is None:
        row["problems"].append(f"the loss did not fall: {row.get('first_loss', math.nan):.4f} over the first "
                               f"{window} iterations, {row.get('last_loss', math.nan):.4f} over the last {window}")

    model.eval()
    images = [image.to(device) for image, _ in items]
    inputs: Any = torch.stack(images) if model.task == "semantic" else images

    def infer() -> Any:
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.float16, enabled=amp):
            return model(inputs)

    outputs = infer()
    if model.task == "semantic":
        problems = semantic_contract(outputs, inputs.shape, num_classes)
    else:
        learns_masks = any("mask" in key for key in history[0] if key.startswith("loss_")) if history else False
        problems = instance_contract(outputs, [tuple(image.shape[-2:]) for image in images], num_classes,
                                     learns_masks)
        row["detections"] = sum(len(output["boxes"]) for output in outputs if isinstance(output, dict)
                                and "boxes" in output)
    row["contract"] = "ok" if not problems else "FAIL"
    row["problems"] += problems
    (row["inference_ms"],) = interleaved_median_ms([synchronized(infer, device)], inference_runs, warmup=1)
    row["passed"] = not row["problems"]
    return row


def bench_gpu(
    models: Sequence[str] | None = None,
    *,
    device: torch.device | str | None = None,
    iterations: int = 20,
    amp: bool | None = None,
    image_size: int = 128,
    batch_size: int = 2,
    lr: float = 1e-3,
    inference_runs: int = 5,
    seed: int = 0,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Train and run every model in ``models`` (default: all registered) on ``device``; one row per model.

    Args:
        models: registered model names.
        device: default ``"cuda"`` when available, else ``"cpu"``.
        iterations: training steps on the fixed batch (AdamW at ``lr``, constant rate, gradient
            norm clipped at 5). "Falls" compares the mean loss of the first and the last
            ``min(5, iterations // 4)`` steps (at least one each). Under mixed precision the
            gradient scaler may skip the first few steps while it finds its scale.
        amp: float16 mixed precision, as the Trainer does it; default on CUDA, and it needs CUDA.
        image_size: side of the square images of the batch (``batch_size`` of them, see
            :func:`fixed_batch`); detectors are set to keep that size.
        inference_runs: timed inference calls on the batch (median, after one warm-up call).

    Returns:
        One dict per model: ``model``, ``device``, ``amp``, ``first_loss``, ``last_loss``,
        ``falls``, ``finite`` (``"yes"``/``"no"``), ``contract`` (``"ok"``/``"FAIL"``),
        ``train_ms`` (median time of a training step as the Trainer records it, the first left
        out; on CUDA a step reading its losses waits for the previous step's queued work, so in a
        run of steps each one is counted whole), ``inference_ms`` (median time of the batch's
        inference), ``losses`` (the total loss of every step),
        ``detections`` (instance models), ``problems`` (one line per failed check, or the error
        that stopped the model) and ``passed``.

    Raises:
        ValueError: an unknown model, fewer than 1 iteration, or ``amp`` without CUDA.
    """
    import minis.models
    from minis.data.shapes import SHAPE_CLASSES

    device = torch.device(device if device is not None else default_device())
    amp = device.type == "cuda" if amp is None else amp
    if amp and device.type != "cuda":
        raise ValueError(f"mixed precision is the Trainer's float16 on CUDA; it cannot run on {device}")
    names = list(minis.models.list_models() if models is None else models)
    unknown = [name for name in names if name not in minis.models.list_models()]
    if unknown:
        raise ValueError(f"unknown model {unknown[0]!r}; available: {', '.join(minis.models.list_models())}")
    if iterations < 1 or inference_runs < 1:
        raise ValueError(f"iterations and inference_runs must be at least 1, got {iterations} and {inference_runs}")
    num_classes = len(SHAPE_CLASSES) + 1
    batches: dict[str, list] = {}

    def batch_for(task: str) -> list:  # one batch per task, the same for every model
        if task not in batches:
            batches[task] = fixed_batch(task, image_size, batch_size, seed)
        return batches[task]

    rows = []
    for index, name in enumerate(names, start=1):
        if progress:
            print(f"[{index}/{len(names)}] {name}: {iterations} training steps and an inference on {device}"
                  f"{' with mixed precision' if amp else ''}", flush=True)
        try:
            row = _check_model(name, batch_for, iterations=iterations, lr=lr, amp=amp, device=device, seed=seed,
                               inference_runs=inference_runs, num_classes=num_classes, image_size=image_size)
        except Exception as error:  # noqa: BLE001 - a model that crashes is a finding; check the others too
            row = {"model": name, "device": str(device), "amp": "yes" if amp else "no", "contract": "FAIL",
                   "problems": [f"{type(error).__name__}: {error}".splitlines()[0]], "passed": False}
        rows.append(row)
    return rows



# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def add_parser(suites: argparse._SubParsersAction) -> None:
    """``bench gpu`` and its options."""
    parser = suites.add_parser("gpu", help="every model: mixed-precision training steps and an inference on CUDA, "
                                            "checked; Mask R-CNN and FCOS timed against torchvision")
    parser.add_argument("--device", help="default: cuda when available, else cpu")
    parser.add_argument("--models", nargs="+", metavar="MODEL", help="default: every registered model")
    parser.add_argument("--iterations", type=int, default=20, help="training steps on the fixed batch (default 20)")
    parser.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                        help="float16 mixed precision (default: on with CUDA, off on the CPU)")
    parser.add_argument("--image-size", type=int, default=128, help="side of the batch's images (default 128)")
    parser.add_argument("--batch-size", type=int, default=2, help="images in the fixed batch (default 2)")
    parser.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (default 0.001)")
    parser.add_argument("--inference-runs", type=int, default=5, help="timed inference calls (median; default 5)")
    torchvision = parser.add_argument_group("the timing against torchvision (bench rcnn's, on --device)")
    torchvision.add_argument("--no-torchvision", action="store_true", help="skip it")
    torchvision.add_argument("--tv-min-size", type=int, default=800, help="short side the models resize to (800)")
    torchvision.add_argument("--tv-max-size", type=int, default=1333, help="long side at most (1333)")
    torchvision.add_argument("--tv-image-size", type=int, nargs=2, default=[480, 640], metavar=("H", "W"),
                             help="the random input images (default 480 640)")
    torchvision.add_argument("--tv-runs", type=int, help="timed rounds (median; default 10 on CUDA, 4 on the CPU)")
    add_json_option(parser, "every row")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from minis.bench.rcnn import RCNN_COLUMNS, bench_rcnn

    try:
        device = torch.device(args.device or default_device())
    except RuntimeError as error:
        raise UserError(f"--device: {error}") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {args.device}: CUDA is not available here; use --device cpu")
    if args.tv_runs is not None and args.tv_runs < 1:
        raise UserError(f"--tv-runs must be at least 1, got {args.tv_runs}")
    try:
        rows = bench_gpu(args.models, device=device, iterations=args.iterations, amp=args.amp,
                         image_size=args.image_size, batch_size=args.batch_size, lr=args.lr,
                         inference_runs=args.inference_runs)
    except ValueError as error:  # an unknown model, --amp on the CPU, --iterations 0
        raise UserError(str(error)) from error
    amp = rows[0]["amp"] == "yes" if rows else False
    print(f"\nevery model on {device}: {args.iterations} training steps on one fixed batch of {args.batch_size} "
          f"{args.image_size}-pixel images, then an inference (times in ms):")
    print(format_table(rows, GPU_COLUMNS))
    failed = [row for row in rows if not row["passed"]]
    for row in failed:
        for problem in row["problems"]:
            print(f"{row['model']}: {problem}")
    print(f"{len(rows) - len(failed)} of {len(rows)} models passed every check")

    results: dict[str, list] = {"models": rows, "torchvision": []}
    if not args.no_torchvision:
        runs = args.tv_runs or (10 if device.type == "cuda" else 4)
        results["torchvision"] = bench_rcnn(TORCHVISION_MODELS, image_size=tuple(args.tv_image_size),
                                            min_size=args.tv_min_size, max_size=args.tv_max_size, runs=runs,
                                            warmup=1 if device.type == "cuda" else 0, device=device, amp=amp)
        print(f"\nMask R-CNN and FCOS on {device}{' with mixed precision' if amp else ''}, minis against torchvision "
              "with the same weights (ratio = minis / torchvision):")
        print(format_table(results["torchvision"], RCNN_COLUMNS))
    finish(results, args.json, device)
    return 1 if failed else 0
