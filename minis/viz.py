"""Pictures of segmentations: instance overlays, class colour maps, side-by-side panels, curves.

Everything takes PyTorch tensors or NumPy arrays as they come out of a dataset or a model
(image ``[3,H,W]`` float in 0..1 or ``[H,W,3]`` uint8; masks ``[N,H,W]`` bool/uint8,
``[N,1,H,W]`` probabilities, or a list of COCO RLEs as models return them inside
:func:`minis.ops.masks.rle_masks`) and draws on a matplotlib ``Axes``, which it returns. Nothing here
calls ``plt.show()``: in a notebook the figure appears by itself, in a script save it with
:func:`save_figure`.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import matplotlib
import numpy as np

# Without a display (a CI machine, ssh) and outside a notebook, draw off-screen with Agg. A
# backend the user chose (MPLBACKEND, %matplotlib inline, a GUI session) is left alone.
if (
    "MPLBACKEND" not in os.environ
    and "ipykernel" not in sys.modules
    and sys.platform.startswith("linux")
    and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))
):
    matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.patches import Patch, Rectangle  # noqa: E402

from minis.data.coco import IGNORE_INDEX  # noqa: E402

_GOLDEN_RATIO_CONJUGATE = (math.sqrt(5) - 1) / 2


# --------------------------------------------------------------------------------------------
# Inputs: tensors or arrays -> NumPy in one layout
# --------------------------------------------------------------------------------------------


def _to_numpy(x) -> np.ndarray:
    """A NumPy copy of a tensor (any device, with or without grad) or array-like."""
    if hasattr(x, "detach"):  # torch.Tensor and tv_tensors, without importing torch here
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _image_hwc(image) -> np.ndarray:
    """float ``[H,W,3]`` in 0..1 from ``[3,H,W]``/``[1,H,W]``/``[H,W,3]``/``[H,W]``, float or uint8."""
    array = _to_numpy(image)
    if array.ndim == 3 and array.shape[0] in (1, 3) and array.shape[-1] not in (1, 3, 4):
        array = array.transpose(1, 2, 0)  # CHW -> HWC
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[-1] not in (1, 3, 4):
        raise ValueError(f"image must be [3,H,W] or [H,W,3], got shape {tuple(_to_numpy(image).shape)}")
    array = array[..., :3]  # drop alpha
    if array.shape[-1] == 1:
        array = np.repeat(array, 3, axis=-1)
    if array.dtype == np.uint8:
        return array.astype(np.float32) / 255
    array = array.astype(np.float32)  # a copy: clipped in place (a 12-megapixel photo is 144 MB of it)
    return np.clip(array, 0, 1, out=array)


def _is_rle_list(masks) -> bool:
    """Whether ``masks`` is a list of COCO RLE dicts (``{"size": [H, W], "counts": ...}``)."""
    return isinstance(masks, (list, tuple)) and all(isinstance(m, Mapping) for m in masks)


def _mask_source(masks, height: int, width: int) -> list | np.ndarray:
    """The masks to draw, checked and not copied: a list of RLEs, or an array ``[N,H,W]``.

    The array keeps its type (bool/uint8, or probabilities drawn where > 0.5); binary copies are
    made a few masks at a time by :func:`_binary_chunk`, because ``N`` image-sized masks of a
    large photo do not fit in memory.
    """
    if _is_rle_list(masks):
        sizes = {tuple(int(v) for v in rle["size"]) for rle in masks}
        if sizes - {(height, width)}:
            raise ValueError(f"RLE masks must have size {[height, width]}, got sizes {sorted(sizes)}")
        return list(masks)
    array = _to_numpy(masks)
    if array.ndim == 4:
        array = array[:, 0]
    if array.ndim == 2:
        array = array[None]
    if array.ndim != 3 or array.shape[1:] != (height, width):
        raise ValueError(f"masks must be [N,H,W] or [N,1,H,W] with H,W = {height},{width}; got {array.shape}")
    return array


def _binary_chunk(masks: list | np.ndarray, index: np.ndarray) -> np.ndarray:
    """bool ``[n,H,W]``: the masks number ``index`` of a :func:`_mask_source`.

    RLEs decode column-major (pycocotools' layout): each ``[H,W]`` mask is then Fortran-ordered.
    """
    if isinstance(masks, list):
        from pycocotools import mask as mask_utils

        decoded = mask_utils.decode([masks[i] for i in index])  # uint8 0/1 [H,W,n]
        return np.moveaxis(decoded, -1, 0).view(bool)
    chunk = masks[index]
    return chunk > 0.5 if chunk.dtype.kind == "f" else chunk != 0


DRAW_CHUNK_PIXELS = 2**24  # mask pixels decoded or thresholded at once when drawing (16 MB of bool)


def _top_instance(masks: list | np.ndarray, index: np.ndarray, height: int, width: int) -> np.ndarray:
    """int32 ``[H,W]``: position in ``index`` of the last of those masks covering each pixel, -1 where none.

    Each mask paints its position over the map in turn, so later instances end on top. Masks are
    made binary a chunk at a time (:data:`DRAW_CHUNK_PIXELS`): drawing 100 detections on a
    12-megapixel photo needs one ``[H,W]`` map, not 100 masks. The map is laid out in memory
    like the masks (column-major for RLEs), which makes painting several times faster.
    """
    order = "F" if isinstance(masks, list) else "C"
    top = np.full((height, width), -1, dtype=np.int32, order=order)
    step = max(1, DRAW_CHUNK_PIXELS // max(1, height * width))
    for start in range(0, len(index), step):
        for offset, binary in enumerate(_binary_chunk(masks, index[start:start + step])):
            top[binary] = start + offset
    return top


def _label_map(mask) -> np.ndarray:
    """int64 ``[H,W]`` class indices from a mask ``[H,W]``/``[1,H,W]``, scores ``[C,H,W]`` or a target dict."""
    if isinstance(mask, Mapping):
        mask = mask["semantic"]
    array = _to_numpy(mask)
    if array.ndim == 3 and array.shape[0] == 1:
        array = array[0]
    elif array.ndim == 3 and array.dtype.kind == "f":
        array = array.argmax(axis=0)  # per-class scores (logits or probabilities)
    if array.ndim != 2:
        raise ValueError(f"semantic mask must be [H,W] (or [C,H,W] scores), got shape {array.shape}")
    return array.astype(np.int64)


def _show_picture(ax: Axes, picture: np.ndarray) -> None:
    """``imshow`` an ``[H,W,3]`` picture in pixel-edge coordinates, subsampled when far larger than the axes.

    extent: pixel (row i, column j) covers [j, j+1] x [i, i+1], the continuous coordinates in
    which xyxy boxes are given (a box [0, 0, W, H] frames the whole image). A 12-megapixel photo
    shown in a figure a few hundred pixels wide is resampled by matplotlib anyway, through float
    copies of several hundred MB; taking every ``step``-th pixel first, while keeping at least
    two picture pixels per screen pixel, shows the same picture at a fraction of the memory.
    """
    height, width = picture.shape[:2]
    box = ax.get_window_extent()  # the axes on screen, in pixels at the figure's dpi
    step = max(1, int(min(height / max(box.height, 1.0), width / max(box.width, 1.0)) // 2))
    ax.imshow(picture[::step, ::step], interpolation="nearest", extent=(0, width, height, 0))


def _new_axes(ax: Axes | None, figsize=(5, 5)) -> Axes:
    if ax is not None:
        return ax
    _, ax = plt.subplots(figsize=figsize)
    return ax


# --------------------------------------------------------------------------------------------
# Colours
# --------------------------------------------------------------------------------------------


def instance_colors(n: int, seed: int = 0) -> np.ndarray:
    """``n`` visually distinct RGB colours, float ``[n,3]`` in 0..1.

    Hues step around the colour wheel by the golden ratio, so neighbours in the list are far
    apart however many colours are asked for; saturation and brightness cycle through three
    levels so that colours with close hues still differ. ``seed`` rotates the palette.
    """
    k = np.arange(n)
    hue = (seed * 0.1234 + k * _GOLDEN_RATIO_CONJUGATE) % 1.0
    saturation = np.array([0.85, 0.6, 1.0])[k % 3]
    value = np.array([0.95, 0.8, 0.65])[(k // 3) % 3]
    return matplotlib.colors.hsv_to_rgb(np.stack([hue, saturation, value], axis=1)).reshape(n, 3)


def semantic_colormap(num_classes: int) -> np.ndarray:
    """Look-up table uint8 ``[256,3]``: row ``k`` is the colour of class ``k``.

    Class 0 (background) is black, 255 (ignore) is white, classes ``1..num_classes-1`` get
    distinct colours. Index it with a label map: ``semantic_colormap(6)[labels]`` is ``[H,W,3]``.
    """
    if not 1 <= num_classes <= 255:
        raise ValueError(f"semantic_colormap: num_classes must be in 1..255, got {num_classes}")
    table = np.full((256, 3), 128, dtype=np.uint8)  # grey for values no class uses
    table[0] = 0
    table[1:num_classes] = np.round(instance_colors(num_classes - 1) * 255).astype(np.uint8)
    table[IGNORE_INDEX] = 255
    return table


def _text_colour(background: np.ndarray) -> str:
    """Black or white, whichever reads better on ``background`` (RGB 0..1)."""
    return "black" if float(background @ np.array([0.299, 0.587, 0.114])) > 0.55 else "white"


# --------------------------------------------------------------------------------------------
# Instances
# --------------------------------------------------------------------------------------------


def draw_instances(
    image,
    boxes=None,
    masks=None,
    labels=None,
    scores=None,
    class_names: Sequence[str] | None = None,
    ax: Axes | None = None,
    score_threshold: float = 0.5,
    alpha: float = 0.5,
) -> Axes:
    """Overlay instances on ``image``: one colour per instance for its mask, box and caption.

    Args:
        image: ``[3,H,W]`` float 0..1 or ``[H,W,3]`` uint8 (tensor or array).
        boxes: ``[N,4]`` xyxy in pixels.
        masks: ``[N,H,W]`` bool/uint8, ``[N,1,H,W]`` probabilities (drawn where > 0.5), or a list
            of ``N`` COCO RLEs of the image's size (decoded a few at a time: large photos fit).
        labels: ``[N]`` class indices (into ``class_names``; 1..K, 0 is the background).
        scores: ``[N]``; instances below ``score_threshold`` are not drawn (ground truth has none).
        alpha: opacity of the mask colour.

    Later instances are painted over earlier ones. Returns the ``Axes``.
    """
    picture = _image_hwc(image)
    height, width = picture.shape[:2]
    arrays = {"boxes": boxes, "labels": labels, "scores": scores}
    arrays = {k: _to_numpy(v) for k, v in arrays.items() if v is not None}
    counts = {k: len(v) for k, v in arrays.items()}
    if masks is not None:
        counts["masks"] = len(masks)
    if len(set(counts.values())) > 1:
        raise ValueError(f"draw_instances: boxes/masks/labels/scores disagree on the number of instances: {counts}")
    if masks is not None:
        masks = _mask_source(masks, height, width)
    shown = np.arange(next(iter(counts.values()), 0))  # the instances drawn, by their index in the inputs
    if "scores" in arrays:  # keep confident detections only
        shown = np.flatnonzero(arrays["scores"] >= score_threshold)
        arrays = {k: v[shown] for k, v in arrays.items()}
    num_instances = len(shown)
    colours = instance_colors(num_instances)

    if masks is not None and num_instances:
        # the last instance covering a pixel is on top; only covered pixels are blended
        _blend(picture, _top_instance(masks, shown, height, width), colours.astype(np.float32), alpha)
    # 8-bit colour, what the screen shows anyway: a quarter of the float picture's memory for
    # matplotlib to convert and resample (large photos)
    picture = np.rint(np.multiply(picture, 255, out=picture), out=picture).astype(np.uint8)

    ax = _new_axes(ax)
    _show_picture(ax, picture)
    ax.set_axis_off()
    for i in range(num_instances):  # one patch and one caption per instance: matplotlib objects
        anchor = _draw_box(ax, arrays, masks, shown[i], i, colours[i])
        caption = _caption(arrays, i, class_names)
        if caption and anchor is not None:
            ax.text(*anchor, caption, fontsize=8, color=_text_colour(colours[i]), va="bottom",
                    bbox={"facecolor": colours[i], "alpha": 0.8, "pad": 1, "edgecolor": "none"})
    return ax


def _blend(picture: np.ndarray, top: np.ndarray, colours: np.ndarray, alpha: float) -> None:
    """``picture [H,W,3]`` := ``(1 - alpha) picture + alpha colours[top]`` where ``top >= 0``, in place.

    A band of rows at a time: the covered pixels' copies then stay small, where a whole
    12-megapixel photo covered by masks would need several 144 MB temporaries.
    """
    band = max(1, DRAW_CHUNK_PIXELS // 16 // max(1, picture.shape[1]))
    for start in range(0, picture.shape[0], band):
        rows, owners = picture[start:start + band], top[start:start + band]
        covered = owners >= 0
        rows[covered] = (1 - alpha) * rows[covered] + alpha * colours[owners[covered]]


def _draw_box(ax: Axes, arrays: dict, masks: list | np.ndarray | None, source: int, i: int, colour: np.ndarray):
    """Draw the ``i``-th shown instance's box (if any) and return where its caption goes (top-left corner).

    ``source`` is its index in ``masks`` (all inputs), ``i`` its index in ``arrays`` (the shown ones).
    """
    if "boxes" in arrays:
        x0, y0, x1, y1 = arrays["boxes"][i].tolist()
        ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor=colour, linewidth=1.5))
        return x0, y0
    if masks is not None:  # no box: put the caption at the mask's top-left corner
        ys, xs = np.nonzero(_binary_chunk(masks, np.array([source]))[0])
        return (float(xs.min()), float(ys.min())) if len(xs) else None
    return None


def _caption(arrays: dict, i: int, class_names: Sequence[str] | None) -> str:
    parts = []
    if "labels" in arrays:
        label = int(arrays["labels"][i])
        parts.append(class_names[label] if class_names is not None and label < len(class_names) else str(label))
    if "scores" in arrays:
        parts.append(f"{float(arrays['scores'][i]):.2f}")
    return " ".join(parts)


# --------------------------------------------------------------------------------------------
# Semantic
# --------------------------------------------------------------------------------------------


def draw_semantic(
    image,
    mask,
    class_names: Sequence[str],
    ax: Axes | None = None,
    alpha: float = 0.6,
    legend: bool = True,
) -> Axes:
    """Overlay a class map on ``image`` (background left uncoloured) with a legend.

    ``mask`` is ``[H,W]`` class indices (255 = ignore, drawn white), a target dict with
    ``"semantic"``, or ``[C,H,W]`` per-class scores (their argmax is drawn). ``image`` may be
    ``None`` to draw the colour map alone. The legend lists the classes present. Returns the Axes.
    """
    labels = _label_map(mask)
    table = semantic_colormap(len(class_names)).astype(np.float32) / 255
    colours = table[np.clip(labels, 0, 255)]
    if image is None:
        picture = colours
    else:
        picture = _image_hwc(image)
        if picture.shape[:2] != labels.shape:
            raise ValueError(f"draw_semantic: image is {picture.shape[:2]} but mask is {labels.shape}")
        weight = (alpha * (labels != 0))[..., None]
        picture = (1 - weight) * picture + weight * colours
    ax = _new_axes(ax)
    _show_picture(ax, picture)
    ax.set_axis_off()
    if legend:
        present = [int(k) for k in np.unique(labels)]
        handles = [
            Patch(facecolor=table[k], edgecolor="grey",
                  label=class_names[k] if k < len(class_names) else ("ignore" if k == IGNORE_INDEX else str(k)))
            for k in present
        ]
        ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8, frameon=False)
    return ax


# --------------------------------------------------------------------------------------------
# Ground truth next to prediction
# --------------------------------------------------------------------------------------------


def show_side_by_side(
    image,
    ground_truth,
    prediction,
    class_names: Sequence[str],
    kind: str = "instance",
    score_threshold: float = 0.5,
    alpha: float = 0.5,
    figsize: tuple[float, float] = (9, 4.5),
) -> Figure:
    """A figure with two panels: ground truth (left) and prediction (right).

    ``kind="instance"``: ``ground_truth`` is a dataset target (``boxes``, ``labels``, ``masks``)
    and ``prediction`` a model output (``boxes``, ``labels``, ``scores``, ``masks``).
    ``kind="semantic"``: each is a class map ``[H,W]``, a target dict with ``"semantic"``, or
    scores ``[C,H,W]``.
    """
    fig, (ax_truth, ax_prediction) = plt.subplots(1, 2, figsize=figsize)
    if kind == "instance":
        for ax, instances in ((ax_truth, ground_truth), (ax_prediction, prediction)):
            fields = {k: instances.get(k) for k in ("boxes", "masks", "labels", "scores")}
            draw_instances(image, **fields, class_names=class_names, ax=ax,
                           score_threshold=score_threshold, alpha=alpha)
    elif kind == "semantic":
        draw_semantic(image, ground_truth, class_names, ax=ax_truth, alpha=alpha, legend=False)
        draw_semantic(image, prediction, class_names, ax=ax_prediction, alpha=alpha, legend=True)
    else:
        raise ValueError(f"show_side_by_side: kind must be 'instance' or 'semantic', got {kind!r}")
    ax_truth.set_title("ground truth")
    ax_prediction.set_title("prediction")
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------------------------
# Training curves
# --------------------------------------------------------------------------------------------


def _read_log(log: str | os.PathLike | Iterable[Mapping]) -> list[dict]:
    if isinstance(log, (str, os.PathLike)):
        lines = Path(log).read_text(encoding="utf-8").splitlines()
        return [json.loads(line) for line in lines if line.strip()]
    return [dict(record) for record in log]


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def plot_curves(log: str | os.PathLike | Iterable[Mapping], keys: Sequence[str] | None = None,
                ax: Axes | None = None) -> Axes:
    """Plot training/validation curves from a list of records or a JSONL file.

    Records carry ``"kind"`` (``"train"`` when absent), ``"iteration"`` and/or ``"epoch"`` and
    numeric fields, e.g. ``{"kind": "train", "iteration": 10, "epoch": 0, "loss": 1.2}`` and
    ``{"kind": "val", "epoch": 0, "mIoU": 0.5}``. One line per (kind, key); ``keys`` defaults to
    every numeric field except ``iteration``, ``epoch`` and ``lr``.

    The x axis is the iteration. A record without one (typically validation after an epoch) is
    placed at the last training iteration of its epoch; when no record has an iteration at all,
    the x axis is the epoch. Returns the Axes.
    """
    records = _read_log(log)
    if not records:
        raise ValueError("plot_curves: the log is empty")
    if keys is None:
        keys = sorted({k for r in records for k, v in r.items() if _is_number(v)} - {"iteration", "epoch", "lr"})
    by_iteration = any("iteration" in r for r in records)
    end_of_epoch = {}  # epoch -> last iteration seen in it
    for r in records:
        if "iteration" in r and "epoch" in r:
            end_of_epoch[r["epoch"]] = max(end_of_epoch.get(r["epoch"], r["iteration"]), r["iteration"])

    def x_of(record):
        if not by_iteration:
            return record.get("epoch")
        if "iteration" in record:
            return record["iteration"]
        return end_of_epoch.get(record.get("epoch"))

    ax = _new_axes(ax, figsize=(6, 4))
    kinds = list(dict.fromkeys(r.get("kind", "train") for r in records))  # first-seen order
    for kind in kinds:
        for key in keys:
            points = [(x_of(r), r[key]) for r in records
                      if r.get("kind", "train") == kind and _is_number(r.get(key)) and x_of(r) is not None]
            if points:
                xs, ys = zip(*sorted(points))
                ax.plot(xs, ys, marker="o" if len(points) < 30 else None, markersize=3, label=f"{kind} {key}")
    ax.set_xlabel("iteration" if by_iteration else "epoch")
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=8)
    return ax


def save_figure(fig: Figure | Axes, path: str | os.PathLike, dpi: int = 120) -> Path:
    """Save a figure (or the figure an Axes belongs to) to ``path``, creating folders. Returns the path."""
    figure = fig.figure if isinstance(fig, Axes) else fig
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=dpi, bbox_inches="tight")
    return path
