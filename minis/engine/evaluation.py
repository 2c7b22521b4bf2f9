"""One evaluator and one predictor for every model, chosen by ``model.task``.

- semantic models: argmax of the logits against the label maps, accumulated in a
  :class:`minis.eval.ConfusionMatrix` (mIoU, pixel accuracy, ...);
- instance models: per-image detections scored by pycocotools through
  :func:`minis.eval.coco_evaluate` (box and mask AP). The models are asked for their masks as
  COCO RLEs (:func:`minis.ops.masks.rle_masks`), encoded a few detections at a time, so a large
  photo never holds ``detections x H x W`` float masks.

Under ``torchrun`` each rank evaluates its own shard of the images (every image exactly once)
and the partial results are combined before the metrics are computed.
"""

from __future__ import annotations

import contextlib
from typing import Any, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from minis.data.coco import IGNORE_INDEX
from minis.data.collate import collate_instances
from minis.engine import distributed
from minis.ops.masks import rle_masks


def _rank_and_world() -> tuple[int, int]:
    if distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _model_device(model: nn.Module) -> torch.device:
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def _num_classes(model: nn.Module, dataset: Dataset) -> int:
    """Classes the model scores (background included): from its build arguments, else the dataset's."""
    build_args = getattr(model, "build_args", None) or {}
    if "num_classes" in build_args:
        return int(build_args["num_classes"])
    if hasattr(dataset, "num_classes"):
        return int(dataset.num_classes)
    raise ValueError("cannot tell the number of classes: the model has no build_args and the dataset no num_classes")


def _semantic_label_maps(model: nn.Module, images: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """Predicted label maps ``[H,W]`` for a list of images ``[3,H,W]``.

    Images of one size go through the model as one batch; images of different sizes (COCO
    validation images are not cropped) go one at a time, as views of themselves (a 12-megapixel
    photo is not copied). Only the ``[H,W]`` label maps outlive the call, not the logits.
    """
    if len(images) > 1 and len({tuple(image.shape) for image in images}) == 1:
        logits = model(torch.stack(images).to(device))  # [B, C, H, W]
        return list(logits.argmax(dim=1))
    return [model(image[None].to(device))[0].argmax(dim=0) for image in images]


def _evaluate_semantic(model, loader, device, num_classes, bar) -> tuple[dict, list]:
    """Metrics over all ranks (confusion matrices summed) and the image ids of this rank's shard."""
    from minis.eval.semantic import ConfusionMatrix

    confusion = ConfusionMatrix(num_classes, ignore_index=IGNORE_INDEX, device=device)
    image_ids: list = []
    for images, targets in loader:
        for label_map, target in zip(_semantic_label_maps(model, images, device), targets):
            confusion.update(label_map, target["semantic"].to(device))
        image_ids += [target["image_id"] for target in targets]
        bar.update(len(images))
    distributed.all_reduce_sum(confusion.matrix)  # sum of every rank's counts = counts of the whole set
    names = getattr(loader.dataset, "class_names", None)
    return confusion.compute(class_names=names if names is not None and len(names) == num_classes else None), image_ids


def _evaluate_instances(model, loader, device, dataset, bar) -> tuple[dict, list]:
    """COCO metrics over all ranks (results gathered) and the image ids of this rank's shard.

    Each batch's detections are converted to COCO results (boxes xywh, masks RLE-encoded) as soon
    as they are predicted: a full COCO validation run then holds short RLE strings, not
    ``detections x H x W`` mask pixels, and the ranks' lists simply concatenate. The model itself
    encodes its masks (``rle_masks``: the same binary masks as thresholding its probabilities at
    0.5, the evaluator's threshold), a chunk of detections at a time.
    """
    from minis.eval.coco import evaluate_coco_results, predictions_to_coco_results

    results: list[dict] = []
    image_ids: list[int] = []
    has_masks = False
    for images, targets in loader:
        with rle_masks():
            outputs = model([image.to(device) for image in images])
        batch = {int(target["image_id"]): output for output, target in zip(outputs, targets)}
        has_masks = has_masks or any("masks" in output for output in outputs)
        results += predictions_to_coco_results(dataset, batch)
        image_ids += list(batch)
        bar.update(len(images))
    shards = distributed.all_gather_objects((results, has_masks))
    metrics = None
    if not distributed.is_initialized() or torch.distributed.get_rank() == 0:
        merged = [result for shard_results, _ in shards for result in shard_results]
        iou_types = ("bbox", "segm") if any(masks for _, masks in shards) else ("bbox",)
        metrics = evaluate_coco_results(dataset, merged, iou_types)  # pycocotools runs once, on rank 0
    return distributed.broadcast_object(metrics), image_ids


@torch.no_grad()
def evaluate(
    model: nn.Module,
    dataset: Dataset,
    *,
    device: torch.device | str | None = None,
    batch_size: int = 1,
    num_workers: int = 0,
    amp: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Evaluate ``model`` on every image of ``dataset``; the metric depends on ``model.task``.

    Returns:
        semantic: the :meth:`minis.eval.ConfusionMatrix.compute` metrics (``mIoU``,
        ``pixel_accuracy``, ``mean_accuracy``, ``per_class_iou``, ...); instance: the
        :func:`minis.eval.coco_evaluate` result (``{"bbox": {"AP", ...}, "segm": {...}}``).
        Both also hold ``num_images`` and ``image_ids`` (sorted, over all ranks), the images
        actually evaluated - under ``torchrun`` every id appears exactly once.

    The model is put in eval mode for the call and back in its previous mode afterwards.
    ``amp`` runs the forward pass in float16 autocast (CUDA only).
    """
    device = torch.device(device) if device is not None else _model_device(model)
    rank, world_size = _rank_and_world()
    shard = distributed.shard_indices(len(dataset), rank, world_size)
    batches = [shard[start : start + batch_size] for start in range(0, len(shard), batch_size)]
    loader = DataLoader(
        dataset,
        batch_sampler=batches,
        collate_fn=collate_instances,  # lists of images and targets: sizes may differ
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
    )
    was_training = model.training
    model.eval()
    bar = tqdm(total=len(shard), desc="eval", leave=False, disable=not (progress and rank == 0), dynamic_ncols=True)
    try:
        with bar, torch.autocast(device.type, dtype=torch.float16, enabled=amp and device.type == "cuda"):
            if model.task == "semantic":
                metrics, image_ids = _evaluate_semantic(model, loader, device, _num_classes(model, dataset), bar)
            elif model.task == "instance":
                metrics, image_ids = _evaluate_instances(model, loader, device, dataset, bar)
            else:
                raise ValueError(f"model.task must be 'semantic' or 'instance', got {model.task!r}")
    finally:
        model.train(was_training)
    all_ids = sorted(image_id for ids in distributed.all_gather_objects(image_ids) for image_id in ids)
    return {**metrics, "num_images": len(all_ids), "image_ids": all_ids}


def _move_output(output: Any) -> Any:
    if isinstance(output, torch.Tensor):
        return output.detach().cpu()
    if isinstance(output, dict):
        return {key: _move_output(value) for key, value in output.items()}
    if isinstance(output, (list, tuple)):
        return type(output)(_move_output(value) for value in output)
    return output


@torch.no_grad()
def predict(
    model: nn.Module,
    images: torch.Tensor | Sequence[torch.Tensor],
    *,
    device: torch.device | str | None = None,
    rle: bool = False,
) -> Any:
    """Run ``model`` in eval mode without gradients; outputs come back on the CPU.

    ``images`` (values in 0..1) may be one image ``[3,H,W]``, a batch ``[B,3,H,W]`` or a list
    of ``[3,H,W]`` images of any sizes.

    Returns:
        semantic models: logits ``[C,H,W]`` for one image, ``[B,C,H,W]`` for a batch, a list
        of ``[C,H,W]`` for a list; instance models: one output dict (``boxes``, ``labels``,
        ``scores``, ``masks``) for one image, a list of them otherwise.

    ``rle=True`` asks instance models for ``masks`` as a list of COCO RLEs (pixels with
    probability > 0.5; see :func:`minis.ops.masks.rle_masks`) instead of ``[N,1,H,W]``
    probabilities: what to use on large photos, where 100 float masks of 12 megapixels take 4.8 GB.
    """
    device = torch.device(device) if device is not None else _model_device(model)
    single = isinstance(images, torch.Tensor) and images.dim() == 3
    if single:
        images = images[None]
    if isinstance(images, torch.Tensor) and images.dim() != 4:
        raise ValueError(f"images must be [3,H,W], [B,3,H,W] or a list of [3,H,W]; got shape {tuple(images.shape)}")
    was_training = model.training
    model.eval()
    try:
        if model.task == "semantic":
            if isinstance(images, torch.Tensor):
                outputs = model(images.to(device))
            else:
                outputs = [model(image[None].to(device))[0] for image in images]
        else:
            with rle_masks() if rle else contextlib.nullcontext():
                outputs = model([image.to(device) for image in images])
    finally:
        model.train(was_training)
    outputs = _move_output(outputs)
    return outputs[0] if single else outputs
