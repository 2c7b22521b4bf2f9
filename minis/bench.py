"""Benchmarks: the semantic models side by side, and minis against torchvision.

``python -m minis bench semantic`` (a thin wrapper around this module) prints two tables:

1. :func:`bench_semantic` trains every model of :data:`SEMANTIC_MODELS` on the semantic variant
   of the shapes benchmark with the same budget (data, epochs, optimizer, schedule, seed) and
   reports its parameters, CPU inference time per image, training throughput and validation mIoU;
2. :func:`bench_ports` times the models that have a torchvision twin (FCN and DeepLabV3 on
   ResNet-50/101) against torchvision with the same weights, on the same input, in one run.

>>> rows = bench_semantic("data/shapes_semantic", models=["baseline_fcn", "fcn8s"], epochs=2)
>>> print(format_table(rows, SEMANTIC_COLUMNS))

``python -m minis bench rcnn`` prints two more, of detection against torchvision's:

3. :func:`bench_rcnn` times Mask R-CNN R50-FPN (and, if asked, Faster R-CNN) against
   torchvision's with the same random weights (:func:`minis.models.from_torchvision`): CPU
   inference on one COCO-sized image and one training step (forward and backward) on two, with a
   check that both give the same detections and the same losses;
4. :func:`bench_ops` times each plain :mod:`minis.ops` function (IoU, NMS, RoIAlign, RoIPool,
   multi-scale RoIAlign, mask pasting, anchors, box decoding) against torchvision's kernel at the
   sizes Mask R-CNN meets, on the same inputs, with the largest difference of the outputs.

>>> print(format_table(bench_rcnn(min_size=320, runs=1), RCNN_COLUMNS))
>>> print(format_table(bench_ops(["nms", "roi_align_7x7"]), OP_COLUMNS))

Timing rules, so that two numbers in one table can be compared:

- inference: eval mode, ``torch.no_grad()``, one image, on the CPU, a few warm-up calls (the
  first calls allocate memory and pick kernels) and then the *median* of many calls, which a
  single hiccup of a busy machine does not move;
- minis against torchvision: the two calls alternate (A B A B ...), so a change of machine load
  during the measurement hits both equally;
- ``torch.set_num_threads`` is left as it is: the numbers are those of the caller's setting.
  On a machine shared with other busy processes, several threads per process can be many times
  slower than one (each parallel region waits for its slowest thread, which is waiting for a
  core); there, ``OMP_NUM_THREADS=1 python -m minis bench semantic`` (or ``bench rcnn``) gives
  steadier numbers. The load average printed under the tables says how quiet the machine was;
- detection: a forward pass takes seconds at 800 pixels, so the call that compares the two
  outputs is also the warm-up, and the median is of a few rounds (3 by default).
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

# The models the benchmark trains, in the order the book introduces them, at widths a 2-core CPU
# trains in a minute or two each. Every model not listed here uses its builder's defaults.
SEMANTIC_MODELS: list[tuple[str, dict[str, Any]]] = [
    ("baseline_fcn", {}),
    ("fcn32s", {}),
    ("fcn16s", {}),
    ("fcn8s", {}),
    ("unet", {"width": 8, "aux_weight": 0.4}),  # deep supervision, as in the U-Net chapter
    ("deeplabv1", {"head_channels": 128}),
    ("deeplabv2", {"head_channels": 64}),
    ("deeplabv3", {"head_channels": 64}),
    ("deeplabv3plus", {"head_channels": 64}),
    ("pspnet", {"head_channels": 64}),
]

# The semantic variant of the shapes benchmark: plain colours and one or two large objects per
# image, which the small models learn in a few CPU minutes (see minis.data.make_shapes).
SEMANTIC_SHAPES: dict[str, Any] = {"size_range": (0.3, 0.55), "max_objects": 2, "textures": False}

# torchvision builders of the models minis can port (minis.models.from_torchvision).
PORTED_MODELS = ("fcn_resnet50", "fcn_resnet101", "deeplabv3_resnet50", "deeplabv3_resnet101")

# (row key, format spec) of the two printed tables.
SEMANTIC_COLUMNS = [("model", ""), ("args", ""), ("params", ",d"), ("cpu_ms", ".2f"),
                    ("train_img_per_s", ".1f"), ("mIoU", ".4f")]
PORT_COLUMNS = [("model", ""), ("input", ""), ("minis_ms", ".1f"), ("torchvision_ms", ".1f"), ("ratio", ".3f"),
                ("max_abs_diff", ".1e")]

# torchvision detection models minis can port, and the rows of the detection-ops table with their
# default sizes: those of Mask R-CNN R50-FPN on an 800 x 1088 batch (IoU thresholds in percent).
RCNN_MODELS = ("maskrcnn_resnet50_fpn", "fasterrcnn_resnet50_fpn", "fcos_resnet50_fpn")
# torchvision's FCOS loss names -> minis'
FCOS_LOSS_NAMES = {"classification": "loss_classifier", "bbox_regression": "loss_box_giou",
                   "bbox_ctrness": "loss_centerness"}
_ROI = {"boxes": 512, "channels": 256, "height": 200, "width": 272, "stride": 4}  # FPN level P2
OP_SIZES: dict[str, dict[str, int]] = {
    "box_iou": {"boxes": 1000},
    "generalized_box_iou": {"boxes": 1000},
    "nms": {"boxes": 2000, "iou": 70},  # the RPN's NMS of one level's best proposals
    "batched_nms": {"boxes": 2000, "classes": 80, "iou": 50},  # the box head's per-class NMS
    "roi_align_7x7": {**_ROI, "output": 7},
    "roi_align_14x14": {**_ROI, "output": 14},
    # RoIPool's own setting, a stride-16 map (Fast/Faster R-CNN); the plain version compares every
    # cell of the map with every bin, so on the 200 x 272 map it takes minutes, not seconds
    "roi_pool_7x7": {**_ROI, "height": 50, "width": 68, "stride": 16, "output": 7},
    "multiscale_roi_align": {"boxes": 1000, "channels": 256, "height": 800, "width": 1088, "output": 7},
    "paste_masks_in_image": {"masks": 100, "mask_size": 28, "height": 480, "width": 640},
    "AnchorGenerator": {"height": 800, "width": 1088},
    "BoxCoder.decode": {"boxes": 200_000},
}
RCNN_COLUMNS = [("model", ""), ("step", ""), ("input", ""), ("minis_ms", ".0f"), ("torchvision_ms", ".0f"),
                ("ratio", ".3f"), ("outputs", ""), ("max_abs_diff", ".1e")]
OP_COLUMNS = [("op", ""), ("input", ""), ("minis_ms", ".2f"), ("torchvision_ms", ".2f"), ("ratio", ".2f"),
              ("max_abs_diff", ".1e")]


# --------------------------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------------------------


def count_parameters(model: nn.Module) -> int:
    """Number of learnable numbers in ``model`` (frozen parameters included, buffers not)."""
    return sum(parameter.numel() for parameter in model.parameters())


def interleaved_median_ms(calls: Sequence[Callable[[], Any]], runs: int, warmup: int = 1) -> list[float]:
    """Median wall time in milliseconds of each of ``calls``, measured in alternation.

    Every round calls each function once, ``warmup`` rounds untimed then ``runs`` timed ones:
    a slow spell of the machine lands on all calls alike, and the median ignores the rounds it
    spoiled. The order flips from round to round (A B, B A, A B, ...): a call that follows
    another of the same size runs faster (the allocator reuses the memory the first one
    freed, where the first has to fault it in), by 5-10% for an R-CNN training step.
    """
    if runs < 1:
        raise ValueError(f"runs must be at least 1, got {runs}")
    times: list[list[float]] = [[] for _ in calls]
    for round_index in range(warmup + runs):
        order = list(zip(calls, times))
        for call, seconds in order if round_index % 2 == 0 else order[::-1]:
            start = time.perf_counter()
            call()
            if round_index >= warmup:
                seconds.append(time.perf_counter() - start)
    return [1000 * statistics.median(seconds) for seconds in times]


@torch.no_grad()
def inference_ms(model: nn.Module, image_size: int, runs: int = 20, warmup: int = 3) -> float:
    """Median CPU time in milliseconds of ``model`` on one ``[1,3,S,S]`` image, eval mode, no gradients.

    The model is moved to the CPU (where it stays) and put back in its previous train/eval mode.
    """
    was_training = model.training
    model.cpu().eval()
    image = torch.rand(1, 3, image_size, image_size)
    try:
        (milliseconds,) = interleaved_median_ms([lambda: model(image)], runs, warmup)
    finally:
        model.train(was_training)
    return milliseconds


def machine_note() -> str:
    """One line on what the timings ran on: torch version, threads, CPUs and the load average."""
    load = ", ".join(f"{value:.2f}" for value in os.getloadavg()) if hasattr(os, "getloadavg") else "unknown"
    return (f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
            f"load average (1, 5, 15 min) {load}")


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
# Mask R-CNN and the detection ops against torchvision
# --------------------------------------------------------------------------------------------


def torchvision_rcnn(name: str = "maskrcnn_resnet50_fpn", num_classes: int = 91, seed: int = 0,
                     **settings: Any) -> nn.Module:
    """torchvision's ``maskrcnn_resnet50_fpn`` / ``fasterrcnn_resnet50_fpn`` / ``fcos_resnet50_fpn`` as
    its COCO recipe builds it, with random weights drawn from ``seed``.

    The recipe starts from an ImageNet backbone, so torchvision's builder then uses
    ``FrozenBatchNorm2d`` and trains the last three ResNet stages only; built here without a
    download (``resnet_fpn_backbone(..., norm_layer=FrozenBatchNorm2d, trainable_layers=3)``).
    The frozen statistics get small random values (means in +-0.1, variances in 0.8..1.2), so
    that the port's normalisation is really used. ``settings`` are the detector's keyword
    arguments (``min_size``, ``max_size``, ...); the rest are torchvision's defaults.

    FCOS's background column (label 0, never a positive in training) gets a bias of -20, as
    training would leave it: with random weights it would otherwise yield detections of label
    0, which minis never reports.
    """
    from torchvision.models import detection
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
    from torchvision.ops import FrozenBatchNorm2d
    from torchvision.ops.feature_pyramid_network import LastLevelP6P7

    builders = {"maskrcnn_resnet50_fpn": detection.MaskRCNN, "fasterrcnn_resnet50_fpn": detection.FasterRCNN,
                "fcos_resnet50_fpn": detection.FCOS}
    if name not in builders:
        raise ValueError(f"no detection port to benchmark for {name!r}; choose from {', '.join(RCNN_MODELS)}")
    torch.manual_seed(seed)
    layout = ({"returned_layers": [2, 3, 4], "extra_blocks": LastLevelP6P7(256, 256)}
              if name == "fcos_resnet50_fpn" else {})
    backbone = resnet_fpn_backbone(backbone_name="resnet50", weights=None, norm_layer=FrozenBatchNorm2d,
                                   trainable_layers=3, **layout)
    model = builders[name](backbone, num_classes=num_classes, **settings)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, FrozenBatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.8, 1.2)
        if name == "fcos_resnet50_fpn":
            model.head.classification_head.cls_logits.weight[0] = 0.0
            model.head.classification_head.cls_logits.bias[0] = -20.0
    return model


def _random_boxes(count: int, height: int, width: int, generator: torch.Generator, min_side: float = 8.0,
                  max_side: float | None = None) -> torch.Tensor:
    """``[count, 4]`` boxes inside an ``height x width`` image, sides log-uniform in ``min_side..max_side``
    (default: half the short side), so that small and large objects are equally common."""
    max_side = max(max_side or min(height, width) / 2, min_side)
    low, high = torch.log(torch.tensor(min_side)), torch.log(torch.tensor(max_side))
    sides = torch.exp(low + torch.rand(count, 2, generator=generator) * (high - low))
    sides = torch.minimum(sides, torch.tensor([width - 1.0, height - 1.0]))
    x1 = torch.rand(count, generator=generator) * (width - sides[:, 0])
    y1 = torch.rand(count, generator=generator) * (height - sides[:, 1])
    return torch.stack([x1, y1, x1 + sides[:, 0], y1 + sides[:, 1]], dim=1)


def _random_targets(count: int, image_size: tuple[int, int], num_classes: int, objects: int,
                    generator: torch.Generator, with_masks: bool) -> list[dict]:
    """``count`` targets of ``objects`` boxes each (sides 1/8 to 1/2 of the short side), random
    labels ``1..num_classes-1`` and, with ``with_masks``, the boxes filled as masks."""
    height, width = image_size
    targets = []
    for _ in range(count):
        boxes = _random_boxes(objects, height, width, generator, min(height, width) / 8, min(height, width) / 2)
        target = {"boxes": boxes, "labels": torch.randint(1, num_classes, (objects,), generator=generator)}
        if with_masks:
            masks = torch.zeros(objects, height, width, dtype=torch.uint8)
            for k, (x1, y1, x2, y2) in enumerate(boxes.round().long().tolist()):
                masks[k, y1:y2, x1:x2] = 1
            target["masks"] = masks
        targets.append(target)
    return targets


def _shape_text(batch: int, image_size: tuple[int, int], resized: tuple[int, int]) -> str:
    return f"{batch}x3x{image_size[0]}x{image_size[1]} -> {resized[0]}x{resized[1]}"


@torch.no_grad()
def _rcnn_inference_row(name: str, ours: nn.Module, reference: nn.Module, image_size: tuple[int, int], runs: int,
                        warmup: int, seed: int) -> dict:
    """The inference row of :func:`bench_rcnn`: compare the detections, then time both models."""
    ours.eval()
    reference.eval()
    images = [torch.rand(3, *image_size, generator=torch.Generator().manual_seed(seed))]
    resized = ours.transform(images)[0].image_sizes[0]
    # the comparison is also each model's warm-up call
    (expected,), (got,) = reference(images), ours(images)
    same_count = len(got["boxes"]) == len(expected["boxes"])
    keys = [key for key in ("boxes", "scores", "masks") if key in expected]
    max_abs_diff = (max((got[key] - expected[key]).abs().max().item() if len(expected[key]) else 0.0
                        for key in keys) if same_count else None)
    labels_equal = same_count and torch.equal(got["labels"], expected["labels"])
    outputs = (f"{len(got['boxes'])} detections" + (", same labels" if labels_equal else ", labels differ")
               if same_count else f"{len(got['boxes'])} vs {len(expected['boxes'])} detections")
    minis_ms, torchvision_ms = interleaved_median_ms([lambda: ours(images), lambda: reference(images)], runs, warmup)
    return {"model": name, "step": "inference", "input": _shape_text(1, image_size, resized), "minis_ms": minis_ms,
            "torchvision_ms": torchvision_ms, "ratio": minis_ms / torchvision_ms, "outputs": outputs,
            "max_abs_diff": max_abs_diff, "minis_detections": len(got["boxes"]),
            "torchvision_detections": len(expected["boxes"]), "labels_equal": labels_equal}


def _rcnn_train_row(name: str, ours: nn.Module, reference: nn.Module, image_size: tuple[int, int], runs: int,
                    warmup: int, seed: int, num_classes: int) -> dict:
    """The training row of :func:`bench_rcnn`: compare the losses, then time forward + backward."""
    generator = torch.Generator().manual_seed(seed + 1)
    images = [torch.rand(3, *image_size, generator=generator) for _ in range(2)]
    targets = _random_targets(2, image_size, num_classes, 4, generator, with_masks=hasattr(ours, "mask_head"))
    with torch.no_grad():
        resized = ours.eval().transform(images)[0].image_sizes[0]
    ours.train()
    reference.train()

    def step(model: nn.Module) -> dict[str, float]:
        model.zero_grad(set_to_none=True)
        torch.manual_seed(seed)  # both models draw the same anchors and RoIs to train on
        losses = model(images, [dict(target) for target in targets])
        sum(losses.values()).backward()
        return {key: value.item() for key, value in losses.items()}

    expected, got = step(reference), step(ours)  # the comparison is also each model's warm-up call
    expected = {FCOS_LOSS_NAMES.get(key, key): value for key, value in expected.items()}
    same_names = set(got) == set(expected)
    max_abs_diff = max(abs(got[key] - expected[key]) for key in expected) if same_names else None
    minis_ms, torchvision_ms = interleaved_median_ms([lambda: step(ours), lambda: step(reference)], runs, warmup)
    ours.zero_grad(set_to_none=True)
    reference.zero_grad(set_to_none=True)
    return {"model": name, "step": "train step", "input": _shape_text(2, image_size, resized), "minis_ms": minis_ms,
            "torchvision_ms": torchvision_ms, "ratio": minis_ms / torchvision_ms,
            "outputs": f"{len(got)} losses" if same_names else "loss names differ", "max_abs_diff": max_abs_diff,
            "minis_losses": got, "torchvision_losses": expected}


def bench_rcnn(
    names: Sequence[str] = ("maskrcnn_resnet50_fpn",),
    *,
    image_size: tuple[int, int] = (480, 640),
    min_size: int = 800,
    max_size: int = 1333,
    runs: int = 4,
    warmup: int = 0,
    train: bool = True,
    num_classes: int = 91,
    seed: int = 0,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Mask R-CNN on the CPU, minis against torchvision with the same weights, measured in one run.

    For each torchvision model in ``names`` (:data:`RCNN_MODELS`: ``maskrcnn_resnet50_fpn``,
    ``fasterrcnn_resnet50_fpn``, ``fcos_resnet50_fpn``): build it with random weights (:func:`torchvision_rcnn`,
    ``num_classes`` classes, torchvision's default settings but ``min_size``/``max_size``), port it
    with :func:`minis.models.from_torchvision` and measure two rows:

    - ``inference``: eval mode, no gradients, one random ``3 x H x W`` image (``image_size``, a
      COCO-like 480 x 640 by default; both models resize it to ``min_size`` on the short side).
      The random weights are confident enough that both return the full 100 detections (and
      their masks), so the second stage and the mask pasting are timed too;
    - ``train step`` (with ``train``): forward and backward on a fixed batch of two such images
      with four random boxes (labels, masks) each; the random seed is set before each model's
      step, so that both sample the same anchors and RoIs, and the gradients are cleared before
      each step.

    Before timing, each model runs once on the same input and the outputs are compared; that
    call is also the model's warm-up (``warmup`` adds untimed rounds). Then the two models
    alternate for ``runs`` timed rounds and the medians are reported.

    Duration (an estimate: measured once, with one thread on a 2-core CPU that another process
    kept busy, load average about 3): at 800 pixels a Mask R-CNN forward pass took 5-7 s per
    model and a training step 20-25 s, so the defaults (Mask R-CNN only, ``runs=3``: four rounds
    of both models, the comparison included) take about 4 minutes and 4 GB of memory at the peak;
    Faster R-CNN would add somewhat less again. At ``min_size=64`` it takes seconds.

    Returns:
        One dict per (model, step): ``model``, ``step`` (``"inference"`` or ``"train step"``),
        ``input`` (batch and image size, and the size the models resized it to), ``minis_ms``,
        ``torchvision_ms``, ``ratio`` (minis / torchvision), ``outputs`` (what was compared, e.g.
        ``"100 detections, same labels"`` or ``"5 losses"``) and ``max_abs_diff`` (the largest
        difference of boxes, scores and masks, or of the losses; ``None`` when the detection
        counts or loss names differ). Inference rows also hold ``minis_detections``,
        ``torchvision_detections`` and ``labels_equal``; training rows ``minis_losses`` and
        ``torchvision_losses``.
    """
    import minis.models

    unknown = [name for name in names if name not in RCNN_MODELS]
    if unknown:
        raise ValueError(f"no detection port to benchmark for {', '.join(unknown)}; choose from "
                         f"{', '.join(RCNN_MODELS)}")
    if runs < 1:
        raise ValueError(f"runs must be at least 1, got {runs}")
    image_size = (int(image_size[0]), int(image_size[1]))
    rows = []
    for name in names:
        # FCOS's random class scores (0.01 by its prior) sit below its 0.2 threshold; at 0.05 every
        # location is a candidate, and the 1000-per-level top-k, NMS and 100 detections are timed
        thresholds = {"score_thresh": 0.05} if name == "fcos_resnet50_fpn" else {}
        reference = torchvision_rcnn(name, num_classes, seed, min_size=min_size, max_size=max_size, **thresholds)
        ours = minis.models.from_torchvision(reference)
        if progress:
            print(f"timing {name} inference at min_size {min_size} against torchvision", flush=True)
        rows.append(_rcnn_inference_row(name, ours, reference, image_size, runs, warmup, seed))
        if train:
            if progress:
                print(f"timing a {name} training step at min_size {min_size} against torchvision", flush=True)
            rows.append(_rcnn_train_row(name, ours, reference, image_size, runs, warmup, seed, num_classes))
    return rows


def _max_abs_diff(ours: torch.Tensor | Sequence[torch.Tensor], theirs: torch.Tensor | Sequence[torch.Tensor],
                  exact: bool) -> float | str:
    """``"equal"``/``"differ"`` for index outputs (``exact``), else the largest absolute difference."""
    if not isinstance(ours, torch.Tensor):
        ours, theirs = torch.cat(list(ours)), torch.cat(list(theirs))
    if exact:
        return "equal" if torch.equal(ours, theirs) else "differ"
    if ours.shape != theirs.shape:
        return "shapes differ"
    return (ours - theirs).abs().max().item() if ours.numel() else 0.0


def _op_case(op: str, size: dict[str, int], generator: torch.Generator) -> tuple[str, Callable, Callable, bool]:
    """``(input description, minis call, torchvision call, exact)`` for one row of :func:`bench_ops`."""
    import torchvision.ops as tv_ops
    from torchvision.models.detection._utils import BoxCoder as TorchvisionBoxCoder
    from torchvision.models.detection.anchor_utils import AnchorGenerator as TorchvisionAnchorGenerator
    from torchvision.models.detection.image_list import ImageList
    from torchvision.models.detection.roi_heads import paste_masks_in_image as tv_paste_masks_in_image

    from minis import ops

    if op in ("box_iou", "generalized_box_iou"):
        n = size["boxes"]
        a, b = (_random_boxes(n, 800, 1088, generator) for _ in range(2))
        ours, theirs = getattr(ops, op), getattr(tv_ops, op)
        return f"{n} x {n} boxes", lambda: ours(a, b), lambda: theirs(a, b), False
    if op in ("nms", "batched_nms"):
        n, threshold = size["boxes"], size["iou"] / 100
        boxes, scores = _random_boxes(n, 800, 1088, generator), torch.rand(n, generator=generator)
        if op == "nms":
            return (f"{n} boxes, IoU {threshold}", lambda: ops.nms(boxes, scores, threshold),
                    lambda: tv_ops.nms(boxes, scores, threshold), True)
        classes = torch.randint(0, size["classes"], (n,), generator=generator)
        return (f"{n} boxes, {size['classes']} classes, IoU {threshold}",
                lambda: ops.batched_nms(boxes, scores, classes, threshold),
                lambda: tv_ops.batched_nms(boxes, scores, classes, threshold), True)
    if op.startswith(("roi_align", "roi_pool")):
        n, channels, height, width, stride, output = (size[key] for key in
                                                      ("boxes", "channels", "height", "width", "stride", "output"))
        features = torch.randn(1, channels, height, width, generator=generator)
        boxes = [_random_boxes(n, stride * height, stride * width, generator)]  # in the pixels of the image
        text = f"{n} boxes, 1x{channels}x{height}x{width} map (stride {stride}), {output}x{output}"
        if op.startswith("roi_pool"):
            return (text, lambda: ops.roi_pool(features, boxes, output, 1 / stride),
                    lambda: tv_ops.roi_pool(features, boxes, output, 1 / stride), False)
        return (f"{text}, sampling 2", lambda: ops.roi_align(features, boxes, output, 1 / stride, 2),
                lambda: tv_ops.roi_align(features, boxes, output, 1 / stride, 2), False)
    if op == "multiscale_roi_align":
        n, channels, height, width, output = (size[key] for key in ("boxes", "channels", "height", "width", "output"))
        features = {str(level): torch.randn(1, channels, -(-height // stride), -(-width // stride), generator=generator)
                    for level, stride in enumerate((4, 8, 16, 32))}
        boxes = [_random_boxes(n, height, width, generator, max_side=min(height, width) * 0.75)]
        names = list(features)
        ours, theirs = ops.MultiScaleRoIAlign(names, output, 2), tv_ops.MultiScaleRoIAlign(names, output, 2)
        return (f"{n} boxes, 4 levels x {channels} ch, {height}x{width} image, {output}x{output}",
                lambda: ours(features, boxes, [(height, width)]), lambda: theirs(features, boxes, [(height, width)]),
                False)
    if op == "paste_masks_in_image":
        n, mask_size, height, width = (size[key] for key in ("masks", "mask_size", "height", "width"))
        masks = torch.rand(n, 1, mask_size, mask_size, generator=generator)
        boxes = _random_boxes(n, height, width, generator)
        return (f"{n} masks {mask_size}x{mask_size} -> {height}x{width}",
                lambda: ops.paste_masks_in_image(masks, boxes, (height, width)),
                lambda: tv_paste_masks_in_image(masks, boxes, (height, width)), False)
    if op == "AnchorGenerator":
        height, width = size["height"], size["width"]
        sizes, ratios = ((32,), (64,), (128,), (256,), (512,)), ((0.5, 1.0, 2.0),) * 5
        images = ImageList(torch.zeros(1, 3, height, width), [(height, width)])
        maps = [torch.zeros(1, 1, -(-height // stride), -(-width // stride)) for stride in (4, 8, 16, 32, 64)]
        ours, theirs = ops.AnchorGenerator(sizes, ratios), TorchvisionAnchorGenerator(sizes, ratios)
        count = 3 * sum(m.shape[-2] * m.shape[-1] for m in maps)
        return (f"5 levels, {height}x{width} image ({count} anchors)", lambda: ours(images, maps),
                lambda: theirs(images, maps), False)
    if op == "BoxCoder.decode":
        n = size["boxes"]
        boxes, codes = _random_boxes(n, 800, 1088, generator), torch.randn(n, 4, generator=generator) * 0.5
        ours, theirs = ops.BoxCoder((1.0, 1.0, 1.0, 1.0)), TorchvisionBoxCoder((1.0, 1.0, 1.0, 1.0))
        return f"{n} boxes", lambda: ours.decode(codes, [boxes]), lambda: theirs.decode(codes, [boxes]), False
    raise ValueError(f"unknown op {op!r}; choose from {', '.join(OP_SIZES)}")


@torch.no_grad()
def bench_ops(
    names: Sequence[str] | None = None,
    sizes: dict[str, dict[str, int]] | None = None,
    *,
    runs: int = 5,
    warmup: int = 0,
    seed: int = 0,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Each plain :mod:`minis.ops` function against torchvision's, same inputs, at detection sizes.

    ``names`` picks rows of :data:`OP_SIZES` (default: all), whose sizes are those of Mask R-CNN
    at 800 pixels (e.g. RoIAlign of 512 RoIs on the 256-channel stride-4 map of an 800 x 1088
    image); ``sizes`` overrides some of them, e.g. ``{"nms": {"boxes": 100}}``. Boxes are random,
    with log-uniform sides. Each op runs once on both sides for the comparison (also the warm-up),
    then the two alternate for ``runs`` timed calls (after ``warmup`` more untimed rounds).

    The plain versions teach; the models call torchvision's compiled kernels where those are much
    faster (RoIAlign, batched NMS), and this table says by how much. With the defaults it takes
    about a minute and a half (an estimate, measured once with one thread on a busy 2-core CPU),
    nearly all of it in the plain RoIAlign and RoIPool.

    Returns:
        One dict per op: ``op``, ``input`` (a description of the sizes), ``minis_ms``,
        ``torchvision_ms``, ``ratio`` (minis / torchvision) and ``max_abs_diff`` (the largest
        absolute difference of the outputs; for the NMS indices ``"equal"`` or ``"differ"``).
    """
    chosen = list(OP_SIZES) if names is None else list(names)
    unknown = [op for op in [*chosen, *(sizes or {})] if op not in OP_SIZES]
    if unknown:
        raise ValueError(f"unknown op {unknown[0]!r}; choose from {', '.join(OP_SIZES)}")
    if runs < 1:
        raise ValueError(f"runs must be at least 1, got {runs}")
    rows = []
    for op in chosen:
        size = {**OP_SIZES[op], **(sizes or {}).get(op, {})}
        if progress:
            print(f"timing {op} against torchvision", flush=True)
        text, ours, theirs, exact = _op_case(op, size, torch.Generator().manual_seed(seed))
        difference = _max_abs_diff(ours(), theirs(), exact)
        minis_ms, torchvision_ms = interleaved_median_ms([ours, theirs], runs, warmup)
        rows.append({"op": op, "input": text, "minis_ms": minis_ms, "torchvision_ms": torchvision_ms,
                     "ratio": minis_ms / torchvision_ms, "max_abs_diff": difference})
    return rows


# --------------------------------------------------------------------------------------------
# Training correctness: minis Mask R-CNN and torchvision's, trained side by side
# --------------------------------------------------------------------------------------------

RCNN_TRAINING_COLUMNS = [("implementation", ""), ("box_AP", ".4f"), ("mask_AP", ".4f"), ("mask_AP50", ".4f"),
                         ("final_loss", ".4f"), ("train_s", ".1f")]
# the two-stage chapters' recipe (book/two_stage/mask_rcnn.ipynb)
# AdamW with a long warm-up and clipping. In trial runs 3e-3 reached mask AP 0.75 with either
# seed; 4e-3 gave 0.60 or 0.42 depending on the seed, and 6e-3 diverged.
RCNN_TRAINING_CONFIG: dict[str, Any] = {"epochs": 6, "batch_size": 8, "lr": 0.003, "optimizer": "adamw",
                                        "weight_decay": 1e-4, "warmup_iters": 200, "schedule": "cosine",
                                        "clip_grad_norm": 5.0}


def _shapes_instances(root: str, progress: bool) -> tuple[Any, Any]:
    """The train and val instance datasets of the shapes benchmark in ``root``; a missing one is
    generated there as the chapters' plain variant (:data:`SEMANTIC_SHAPES`)."""
    from minis.data import build_datasets, make_shapes

    if not (Path(root) / "meta.json").is_file():
        make_shapes(root, progress=progress, **SEMANTIC_SHAPES)
    return build_datasets("shapes", root, "instance", progress=progress)


def _train_with_recipe(model: nn.Module, train_set: Any, val_set: Any, train_config: dict[str, Any] | None,
                       seed: int, device: str, progress: bool) -> tuple[Any, list[dict], float]:
    """Train ``model`` by :data:`RCNN_TRAINING_CONFIG` (``train_config`` overrides it), evaluating
    only at the end; returns the trainer, its history and the training seconds."""
    from minis.engine import TrainConfig, Trainer

    config = TrainConfig(**{**RCNN_TRAINING_CONFIG, **(train_config or {}), "seed": seed, "device": device,
                            "eval_every": 0, "progress": progress})
    trainer = Trainer(model, train_set, val_set, config)
    started = time.perf_counter()
    history = trainer.fit()
    return trainer, history, time.perf_counter() - started


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
    (:data:`SEMANTIC_SHAPES`) is generated there. The torchvision model is the model file's
    ``torchvision_twin`` of the minis one: the same backbone (by default the chapters' small
    one, the model file's ``SHAPES_SETTINGS``), settings and initial weights. The minis Trainer
    trains both with the same data order, optimizer, schedule and seed (``train_config``
    overrides :data:`RCNN_TRAINING_CONFIG`), and pycocotools scores both on the validation set.
    Equal APs show that the losses and the choice of training examples are right, not only
    inference. The runs draw the same random samples, so what separates them is float rounding
    compounding over the steps.

    Returns one row per implementation: ``implementation``, ``box_AP``, ``mask_AP`` and
    ``mask_AP50`` (``None`` for box-only models), ``final_loss`` (mean over the last epoch) and
    ``train_s``.
    """
    import importlib

    import minis.models

    modules = {"mask_rcnn": "rcnn", "faster_rcnn": "rcnn", "fcos": "fcos"}
    if name not in modules:
        raise ValueError(f"no torchvision twin to train for {name!r}; choose from {', '.join(modules)}")
    module = importlib.import_module(f"minis.models.{modules[name]}")
    train_set, val_set = _shapes_instances(root, progress)
    torch.manual_seed(seed)
    ours = minis.models.build(name, num_classes=train_set.num_classes,
                              **(module.SHAPES_SETTINGS if model_kwargs is None else model_kwargs))
    twin = module.torchvision_twin(ours)
    rows = []
    for implementation, model in (("minis", ours), ("torchvision", twin)):
        if progress:
            print(f"training the {implementation} {name}", flush=True)
        trainer, history, seconds = _train_with_recipe(model, train_set, val_set, train_config, seed, device,
                                                       progress)
        metrics = trainer.evaluate()
        segm = metrics.get("segm", {})
        rows.append({"implementation": implementation, "box_AP": metrics["bbox"]["AP"], "mask_AP": segm.get("AP"),
                     "mask_AP50": segm.get("AP50"), "final_loss": history[-1]["loss"], "train_s": seconds})
    return rows


def bench_rcnn_training(root: str = "data/shapes_semantic", **options: Any) -> list[dict[str, Any]]:
    """:func:`bench_twin_training` of ``mask_rcnn``: minis and torchvision's Mask R-CNN trained alike."""
    return bench_twin_training("mask_rcnn", root, **options)


MASK_SCORING_COLUMNS = [("seed", "d"), ("model", ""), ("ranking", ""), ("box_AP", ".4f"), ("mask_AP", ".4f"),
                        ("mask_AP50", ".4f"), ("mask_AP75", ".4f"), ("train_s", ".1f")]


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

    ``root`` and ``train_config`` as for :func:`bench_rcnn_training`. Returns one row per
    seed, model and ranking: ``seed``, ``model``, ``ranking``, ``box_AP``, ``mask_AP``,
    ``mask_AP50``, ``mask_AP75``, ``train_s``.
    """
    import minis.models
    from minis.models.rcnn import SHAPES_SETTINGS

    train_set, val_set = _shapes_instances(root, progress)
    rows = []
    for seed in seeds:
        for name in ("mask_rcnn", "ms_rcnn"):
            if progress:
                print(f"training {name} with seed {seed}", flush=True)
            torch.manual_seed(seed)
            model = minis.models.build(name, num_classes=train_set.num_classes, **SHAPES_SETTINGS)
            trainer, _, seconds = _train_with_recipe(model, train_set, val_set, train_config, seed, device, progress)
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
    body = models["mask_rcnn"].backbone.body.state_dict()
    for model in models.values():
        model.backbone.body.load_state_dict(body)
    return models


def _set_detections(model: nn.Module, count: int) -> None:
    if hasattr(model.config, "box_detections_per_img"):
        model.config.box_detections_per_img = count
    else:
        model.config.detections_per_img = count


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
    random ``image_size`` image to ``min_size``. Two tables:

    - ``models``: inference with ``detections`` instances per image (every score threshold 0,
      so the count is exact), and a training step (forward and backward) on two images with four
      random objects each; ``vs_fcos`` and ``vs_mask_rcnn`` divide each time by those models';
    - ``instances``: CondInst and Mask R-CNN inference with each count of ``instances``
      detections, and each time divided by the one with the fewest. CondInst runs its tiny
      dynamic heads on one shared map, Mask R-CNN its mask head on one RoI per instance, and
      both paste or upsample one mask per instance to the image.

    The calls alternate (:func:`interleaved_median_ms`); medians of ``runs`` rounds.
    """
    if runs < 1:
        raise ValueError(f"runs must be at least 1, got {runs}")
    models = _one_stage_and_two_stage(num_classes, seed, min_size, max_size)
    image_size = (int(image_size[0]), int(image_size[1]))
    image = [torch.rand(3, *image_size, generator=torch.Generator().manual_seed(seed))]
    resized = models["fcos"].transform(image)[0].image_sizes[0]

    def infer(model: nn.Module, count: int) -> Callable[[], Any]:
        def call() -> Any:
            _set_detections(model, count)
            with torch.no_grad():
                return model(image)
        return call

    if progress:
        print(f"timing inference with {detections} detections at min_size {min_size}", flush=True)
    names = list(models)
    for model in models.values():
        model.eval()
    inference = dict(zip(names, interleaved_median_ms([infer(models[n], detections) for n in names], runs)))
    generator = torch.Generator().manual_seed(seed + 1)
    images = [torch.rand(3, *image_size, generator=generator) for _ in range(2)]
    targets = _random_targets(2, image_size, num_classes, 4, generator, with_masks=True)

    def train_step(model: nn.Module) -> Callable[[], Any]:
        def call() -> Any:
            model.zero_grad(set_to_none=True)
            losses = model(images, [dict(target) for target in targets])
            sum(losses.values()).backward()
        return call

    if progress:
        print("timing a training step", flush=True)
    for model in models.values():
        model.train()
    training = dict(zip(names, interleaved_median_ms([train_step(models[n]) for n in names], runs)))
    rows = []
    for step, times, batch in (("inference", inference, 1), ("train step", training, 2)):
        for name in names:
            rows.append({"model": name, "step": step, "input": _shape_text(batch, image_size, resized),
                         "ms": times[name], "vs_fcos": times[name] / times["fcos"],
                         "vs_mask_rcnn": times[name] / times["mask_rcnn"]})

    if progress:
        print(f"timing inference with {', '.join(map(str, instances))} detections", flush=True)
    for model in models.values():
        model.eval()
    counts = sorted(instances)
    calls = [infer(models[name], count) for count in counts for name in ("condinst", "mask_rcnn")]
    times = interleaved_median_ms(calls, runs)
    scaling = []
    for index, count in enumerate(counts):
        condinst_ms, mask_rcnn_ms = times[2 * index], times[2 * index + 1]
        scaling.append({"instances": count, "condinst_ms": condinst_ms, "condinst_vs_1": condinst_ms / times[0],
                        "mask_rcnn_ms": mask_rcnn_ms, "mask_rcnn_vs_1": mask_rcnn_ms / times[1]})
    return {"models": rows, "instances": scaling}


# --------------------------------------------------------------------------------------------
# Printing
# --------------------------------------------------------------------------------------------


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[str | tuple[str, str]]) -> str:
    """An aligned text table of ``rows``: one line per row, one column per key.

    ``columns`` holds row keys or ``(key, format spec)`` pairs, e.g. ``("params", ",d")``.
    Numbers are right-aligned, text left-aligned; a missing value prints as ``-``, and text in a
    column of numbers (``"equal"`` among differences) prints as it is, right-aligned.
    """
    specs = [(column, "") if isinstance(column, str) else column for column in columns]
    cells = [[key for key, _ in specs]]
    for row in rows:
        cells.append(["-" if row.get(key) is None else row[key] if isinstance(row[key], str) else format(row[key], spec)
                      for key, spec in specs])
    widths = [max(len(line[index]) for line in cells) for index in range(len(specs))]
    numeric = [any(isinstance(row.get(key), (int, float)) for row in rows) for key, _ in specs]

    def line(values: list[str]) -> str:
        return "  ".join(value.rjust(width) if right else value.ljust(width)
                         for value, width, right in zip(values, widths, numeric)).rstrip()

    rule = "  ".join("-" * width for width in widths)
    return "\n".join([line(cells[0]), rule, *(line(values) for values in cells[1:])])
