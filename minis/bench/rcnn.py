"""``python -m minis bench rcnn``: detection against torchvision's, same weights, one run.

Two tables:

1. :func:`bench_rcnn` times Mask R-CNN R50-FPN (and, if asked, Faster R-CNN or FCOS) against
   torchvision's with the same random weights (:func:`minis.models.from_torchvision`): inference
   on one COCO-sized image and one training step (forward and backward) on two, with a check that
   both give the same detections and the same losses (on the CPU by default; ``device="cuda"``,
   optionally with mixed precision, is what ``bench gpu`` times);
2. :func:`bench_ops` times each plain :mod:`minis.ops` function (IoU, NMS, RoIAlign, RoIPool,
   multi-scale RoIAlign, mask pasting, anchors, box decoding) against torchvision's kernel at the
   sizes Mask R-CNN meets (position-sensitive RoIAlign and RoIPool at FCIS's), on the same inputs,
   with the largest difference of the outputs.

>>> print(format_table(bench_rcnn(min_size=320, runs=1), RCNN_COLUMNS))
>>> print(format_table(bench_ops(["nms", "roi_align_7x7"]), OP_COLUMNS))

Timing follows the rules of :mod:`minis.bench.common`. A detector's forward pass takes seconds at
800 pixels on a CPU, so the call that compares the two outputs is also the warm-up, and the median
is of a few rounds (4 by default).
"""

from __future__ import annotations

import argparse
from typing import Any, Callable, Sequence

import torch
from torch import nn

from minis.bench.common import (add_json_option, finish, format_table, interleaved_median_ms, random_boxes,
                                random_targets, shape_text, synchronized)
from minis.cli import UserError

# torchvision detection models minis can port, and the rows of the detection-ops table with their
# default sizes: those of Mask R-CNN R50-FPN on an 800 x 1088 batch (IoU thresholds in percent).
RCNN_MODELS = ("maskrcnn_resnet50_fpn", "fasterrcnn_resnet50_fpn", "fcos_resnet50_fpn", "retinanet_resnet50_fpn")
# torchvision's FCOS loss names -> minis'
FCOS_LOSS_NAMES = {"classification": "loss_classifier", "bbox_regression": "loss_box_giou",
                   "bbox_ctrness": "loss_centerness"}
# torchvision's loss names -> minis', for the models whose names differ
LOSS_NAMES = {"fcos_resnet50_fpn": FCOS_LOSS_NAMES,
              "retinanet_resnet50_fpn": {"classification": "loss_classifier", "bbox_regression": "loss_box_reg"}}
ONE_STAGE = ("fcos_resnet50_fpn", "retinanet_resnet50_fpn")  # P3-P7, P6 from P5; a background column
_ROI = {"boxes": 512, "channels": 256, "height": 200, "width": 272, "stride": 4}  # FPN level P2
OP_SIZES: dict[str, dict[str, int]] = {
    "box_iou": {"boxes": 1000},
    "generalized_box_iou": {"boxes": 1000},
    "nms": {"boxes": 2000, "iou": 70},  # the RPN's NMS of one level's best proposals
    "batched_nms": {"boxes": 2000, "classes": 80, "iou": 50},  # the box head's per-class NMS
    "roi_align_7x7": {**_ROI, "output": 7},
    "roi_align_14x14": {**_ROI, "output": 14},
    # training: the forward and the features' gradient (the two-stage models' backward on a CPU)
    "roi_align_backward_7x7": {**_ROI, "output": 7},
    # RoIPool's own setting, a stride-16 map (Fast/Faster R-CNN); the plain version compares every
    # cell of the map with every bin, so on the 200 x 272 map it takes minutes, not seconds
    "roi_pool_7x7": {**_ROI, "height": 50, "width": 68, "stride": 16, "output": 7},
    # FCIS (R-FCN's head): 300 RoIs on the stride-16 map of a ~600 x 1000 image, 2 * 7 * 7 * (80 + 1)
    # position-sensitive score maps; about a second per call for the plain versions on one CPU thread
    "ps_roi_align_7x7": {"boxes": 300, "channels": 7938, "height": 38, "width": 63, "stride": 16, "output": 7},
    "ps_roi_pool_7x7": {"boxes": 300, "channels": 7938, "height": 38, "width": 63, "stride": 16, "output": 7},
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
# Mask R-CNN and the detection ops against torchvision
# --------------------------------------------------------------------------------------------


def torchvision_rcnn(name: str = "maskrcnn_resnet50_fpn", num_classes: int = 91, seed: int = 0,
                     **settings: Any) -> nn.Module:
    """torchvision's ``maskrcnn_resnet50_fpn`` / ``fasterrcnn_resnet50_fpn`` / ``fcos_resnet50_fpn`` /
    ``retinanet_resnet50_fpn`` as
    its COCO recipe builds it, with random weights drawn from ``seed``.

    The recipe starts from an ImageNet backbone, so torchvision's builder then uses
    ``FrozenBatchNorm2d`` and trains the last three ResNet stages only; built here without a
    download (``resnet_fpn_backbone(..., norm_layer=FrozenBatchNorm2d, trainable_layers=3)``).
    The frozen statistics get small random values (means in +-0.1, variances in 0.8..1.2), so
    that the port's normalisation is really used. ``settings`` are the detector's keyword
    arguments (``min_size``, ``max_size``, ...); the rest are torchvision's defaults.

    The one-stage models' background column (label 0, never a positive in training) gets a bias
    of -20, as training would leave it: with random weights it would otherwise yield detections
    of label 0, which minis never reports. RetinaNet's other classes start at -1 instead of its
    prior's -4.6, which leaves every random score under the 0.05 threshold and nothing to compare.
    """
    from torchvision.models import detection
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
    from torchvision.ops import FrozenBatchNorm2d
    from torchvision.ops.feature_pyramid_network import LastLevelP6P7

    builders = {"maskrcnn_resnet50_fpn": detection.MaskRCNN, "fasterrcnn_resnet50_fpn": detection.FasterRCNN,
                "fcos_resnet50_fpn": detection.FCOS, "retinanet_resnet50_fpn": detection.RetinaNet}
    if name not in builders:
        raise ValueError(f"no detection port to benchmark for {name!r}; choose from {', '.join(RCNN_MODELS)}")
    torch.manual_seed(seed)
    layout = ({"returned_layers": [2, 3, 4], "extra_blocks": LastLevelP6P7(256, 256)}
              if name in ONE_STAGE else {})
    backbone = resnet_fpn_backbone(backbone_name="resnet50", weights=None, norm_layer=FrozenBatchNorm2d,
                                   trainable_layers=3, **layout)
    model = builders[name](backbone, num_classes=num_classes, **settings)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, FrozenBatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.8, 1.2)
        if name in ONE_STAGE:
            logits = model.head.classification_head.cls_logits
            if name == "retinanet_resnet50_fpn":
                logits.bias.fill_(-1.0)
            logits.weight[::num_classes] = 0.0  # column 0 of every anchor
            logits.bias[::num_classes] = -20.0
    return model


def _autocast(device: torch.device, amp: bool) -> torch.autocast:
    """float16 mixed precision on ``device`` when ``amp`` (the Trainer's kind), else a no-op context."""
    return torch.autocast(device.type, dtype=torch.float16, enabled=amp)


@torch.no_grad()
def _rcnn_inference_row(name: str, ours: nn.Module, reference: nn.Module, image_size: tuple[int, int], runs: int,
                        warmup: int, seed: int, device: torch.device, amp: bool) -> dict:
    """The inference row of :func:`bench_rcnn`: compare the detections, then time both models."""
    ours.eval()
    reference.eval()
    images = [torch.rand(3, *image_size, generator=torch.Generator().manual_seed(seed)).to(device)]
    resized = ours.transform(images)[0].image_sizes[0]

    def infer(model: nn.Module) -> Callable[[], Any]:
        def call() -> Any:
            with _autocast(device, amp):
                return model(images)
        return synchronized(call, device)

    # the comparison is also each model's warm-up call
    (expected,), (got,) = infer(reference)(), infer(ours)()
    same_count = len(got["boxes"]) == len(expected["boxes"])
    keys = [key for key in ("boxes", "scores", "masks") if key in expected]
    max_abs_diff = (max((got[key].float() - expected[key].float()).abs().max().item() if len(expected[key]) else 0.0
                        for key in keys) if same_count else None)
    labels_equal = same_count and torch.equal(got["labels"], expected["labels"])
    outputs = (f"{len(got['boxes'])} detections" + (", same labels" if labels_equal else ", labels differ")
               if same_count else f"{len(got['boxes'])} vs {len(expected['boxes'])} detections")
    minis_ms, torchvision_ms = interleaved_median_ms([infer(ours), infer(reference)], runs, warmup)
    return {"model": name, "step": "inference", "input": shape_text(1, image_size, resized), "minis_ms": minis_ms,
            "torchvision_ms": torchvision_ms, "ratio": minis_ms / torchvision_ms, "outputs": outputs,
            "max_abs_diff": max_abs_diff, "minis_detections": len(got["boxes"]),
            "torchvision_detections": len(expected["boxes"]), "labels_equal": labels_equal}


def _rcnn_train_row(name: str, ours: nn.Module, reference: nn.Module, image_size: tuple[int, int], runs: int,
                    warmup: int, seed: int, num_classes: int, device: torch.device, amp: bool) -> dict:
    """The training row of :func:`bench_rcnn`: compare the losses, then time forward + backward."""
    generator = torch.Generator().manual_seed(seed + 1)
    images = [torch.rand(3, *image_size, generator=generator) for _ in range(2)]
    targets = random_targets(2, image_size, num_classes, 4, generator, with_masks=hasattr(ours, "mask_head"))
    images = [image.to(device) for image in images]
    targets = [{key: value.to(device) for key, value in target.items()} for target in targets]
    with torch.no_grad():
        resized = ours.eval().transform(images)[0].image_sizes[0]
    ours.train()
    reference.train()

    def step(model: nn.Module) -> dict[str, float]:
        model.zero_grad(set_to_none=True)
        torch.manual_seed(seed)  # both models draw the same anchors and RoIs to train on
        with _autocast(device, amp):
            losses = model(images, [dict(target) for target in targets])
        sum(losses.values()).backward()
        return {key: value.item() for key, value in losses.items()}  # .item() waits for the GPU

    expected, got = step(reference), step(ours)  # the comparison is also each model's warm-up call
    expected = {LOSS_NAMES.get(name, {}).get(key, key): value for key, value in expected.items()}
    same_names = set(got) == set(expected)
    max_abs_diff = max(abs(got[key] - expected[key]) for key in expected) if same_names else None
    minis_ms, torchvision_ms = interleaved_median_ms([lambda: step(ours), lambda: step(reference)], runs, warmup)
    ours.zero_grad(set_to_none=True)
    reference.zero_grad(set_to_none=True)
    return {"model": name, "step": "train step", "input": shape_text(2, image_size, resized), "minis_ms": minis_ms,
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
    device: torch.device | str = "cpu",
    amp: bool = False,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Mask R-CNN, minis against torchvision with the same weights, measured in one run.

    For each torchvision model in ``names`` (:data:`RCNN_MODELS`: ``maskrcnn_resnet50_fpn``,
    ``fasterrcnn_resnet50_fpn``, ``fcos_resnet50_fpn``, ``retinanet_resnet50_fpn``): build it with random
    weights (:func:`torchvision_rcnn`, ``num_classes`` classes, torchvision's default settings but
    ``min_size``/``max_size``), port it
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

    ``device`` is where both models run (the CPU by default); ``amp`` runs both under float16
    autocast, as the Trainer does on CUDA (the outputs then agree less closely).

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
    device = torch.device(device)
    rows = []
    for name in names:
        # FCOS's random class scores (0.01 by its prior) sit below its 0.2 threshold; at 0.05 every
        # location is a candidate, and the 1000-per-level top-k, NMS and 100 detections are timed
        thresholds = {"score_thresh": 0.05} if name == "fcos_resnet50_fpn" else {}
        reference = torchvision_rcnn(name, num_classes, seed, min_size=min_size, max_size=max_size, **thresholds)
        ours = minis.models.from_torchvision(reference).to(device)
        reference.to(device)
        if progress:
            print(f"timing {name} inference at min_size {min_size} against torchvision", flush=True)
        rows.append(_rcnn_inference_row(name, ours, reference, image_size, runs, warmup, seed, device, amp))
        if train:
            if progress:
                print(f"timing a {name} training step at min_size {min_size} against torchvision", flush=True)
            rows.append(_rcnn_train_row(name, ours, reference, image_size, runs, warmup, seed, num_classes, device,
                                        amp))
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
        a, b = (random_boxes(n, 800, 1088, generator) for _ in range(2))
        ours, theirs = getattr(ops, op), getattr(tv_ops, op)
        return f"{n} x {n} boxes", lambda: ours(a, b), lambda: theirs(a, b), False
    if op in ("nms", "batched_nms"):
        n, threshold = size["boxes"], size["iou"] / 100
        boxes, scores = random_boxes(n, 800, 1088, generator), torch.rand(n, generator=generator)
        if op == "nms":
            return (f"{n} boxes, IoU {threshold}", lambda: ops.nms(boxes, scores, threshold),
                    lambda: tv_ops.nms(boxes, scores, threshold), True)
        classes = torch.randint(0, size["classes"], (n,), generator=generator)
        return (f"{n} boxes, {size['classes']} classes, IoU {threshold}",
                lambda: ops.batched_nms(boxes, scores, classes, threshold),
                lambda: tv_ops.batched_nms(boxes, scores, classes, threshold), True)
    if op.startswith(("roi_align", "roi_pool", "ps_roi_align", "ps_roi_pool")):
        n, channels, height, width, stride, output = (size[key] for key in
                                                      ("boxes", "channels", "height", "width", "stride", "output"))
        features = torch.randn(1, channels, height, width, generator=generator)
        boxes = [random_boxes(n, stride * height, stride * width, generator)]  # in the pixels of the image
        text = f"{n} boxes, 1x{channels}x{height}x{width} map (stride {stride}), {output}x{output}"
        if op.startswith("roi_align_backward"):  # training: the forward and the features' gradient
            upstream = torch.randn(n, channels, output, output, generator=generator)

            def gradient(roi_align: Callable) -> Callable[[], torch.Tensor]:
                def call() -> torch.Tensor:
                    with torch.enable_grad():
                        leaf = features.clone().requires_grad_()
                        roi_align(leaf, boxes, output, 1 / stride, 2).backward(upstream)
                    return leaf.grad
                return call
            return (f"{text}, forward + features' gradient", gradient(ops.roi.roi_align_matmul_backward),
                    gradient(tv_ops.roi_align), False)
        name = op.rsplit("_", 1)[0]  # "ps_roi_align_7x7" -> "ps_roi_align"
        ours, theirs = getattr(ops, name), getattr(tv_ops, name)
        if name.endswith("pool"):
            return (text, lambda: ours(features, boxes, output, 1 / stride),
                    lambda: theirs(features, boxes, output, 1 / stride), False)
        return (f"{text}, sampling 2", lambda: ours(features, boxes, output, 1 / stride, 2),
                lambda: theirs(features, boxes, output, 1 / stride, 2), False)
    if op == "multiscale_roi_align":
        n, channels, height, width, output = (size[key] for key in ("boxes", "channels", "height", "width", "output"))
        features = {str(level): torch.randn(1, channels, -(-height // stride), -(-width // stride), generator=generator)
                    for level, stride in enumerate((4, 8, 16, 32))}
        boxes = [random_boxes(n, height, width, generator, max_side=min(height, width) * 0.75)]
        names = list(features)
        ours, theirs = ops.MultiScaleRoIAlign(names, output, 2), tv_ops.MultiScaleRoIAlign(names, output, 2)
        return (f"{n} boxes, 4 levels x {channels} ch, {height}x{width} image, {output}x{output}",
                lambda: ours(features, boxes, [(height, width)]), lambda: theirs(features, boxes, [(height, width)]),
                False)
    if op == "paste_masks_in_image":
        n, mask_size, height, width = (size[key] for key in ("masks", "mask_size", "height", "width"))
        masks = torch.rand(n, 1, mask_size, mask_size, generator=generator)
        boxes = random_boxes(n, height, width, generator)
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
        boxes, codes = random_boxes(n, 800, 1088, generator), torch.randn(n, 4, generator=generator) * 0.5
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
    nearly all of it in the plain RoIAlign and RoIPool, before the two position-sensitive rows were
    added: they take about 17 s more (measured alone the same way).

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
# Command line
# --------------------------------------------------------------------------------------------


def add_parser(suites: argparse._SubParsersAction) -> None:
    """``bench rcnn`` and its options."""
    parser = suites.add_parser("rcnn",
                               help="Mask R-CNN (or FCOS) and minis.ops against torchvision: speed and agreement")
    parser.add_argument("--models", nargs="+", default=["maskrcnn_resnet50_fpn"], metavar="TV_MODEL",
                        help=f"{', '.join(RCNN_MODELS)} (default: the first)")
    parser.add_argument("--runs", type=int, default=4, help="timed rounds per model and step (median; the order flips "
                                                            "each round, so even is fairer; default 4)")
    parser.add_argument("--min-size", type=int, default=800, help="short side the models resize to (default 800)")
    parser.add_argument("--max-size", type=int, default=1333, help="long side at most (default 1333)")
    parser.add_argument("--image-size", type=int, nargs=2, default=[480, 640], metavar=("H", "W"),
                        help="the random input images (default 480 640)")
    parser.add_argument("--no-train", action="store_true", help="time inference only, not the training step")
    op_choice = parser.add_mutually_exclusive_group()
    op_choice.add_argument("--no-ops", action="store_true", help="skip the minis.ops table")
    op_choice.add_argument("--ops-only", action="store_true", help="only the minis.ops table")
    parser.add_argument("--ops", nargs="+", metavar="OP", help="default: all of minis.bench.OP_SIZES")
    parser.add_argument("--op-runs", type=int, default=5, help="timed calls per op (median; default 5)")
    add_json_option(parser, "every row")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    # refuse a mistake in the second table now, not after minutes of the first
    unknown = [op for op in args.ops or [] if op not in OP_SIZES]
    if unknown and not args.no_ops:
        raise UserError(f"unknown op {unknown[0]!r}; choose from {', '.join(OP_SIZES)}")
    for option, runs in (("--runs", args.runs), ("--op-runs", args.op_runs)):
        if runs < 1:
            raise UserError(f"{option} must be at least 1, got {runs}")
    rows: dict[str, list] = {"rcnn": [], "ops": []}
    if not args.ops_only:
        try:
            rows["rcnn"] = bench_rcnn(args.models, image_size=tuple(args.image_size), min_size=args.min_size,
                                      max_size=args.max_size, runs=args.runs, train=not args.no_train)
        except ValueError as error:  # a model without a port
            raise UserError(str(error)) from error
        print("\nR-CNN on the CPU, minis against torchvision with the same weights (ratio = minis / torchvision):")
        print(format_table(rows["rcnn"], RCNN_COLUMNS))
    if not args.no_ops:
        rows["ops"] = bench_ops(args.ops, runs=args.op_runs)
        print("\nminis.ops (plain PyTorch) against torchvision's kernels, same inputs (ratio = minis / torchvision):")
        print(format_table(rows["ops"], OP_COLUMNS))
    return finish(rows, args.json)
