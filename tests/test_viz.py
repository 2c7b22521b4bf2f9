"""minis.viz draws headless, and what it draws is where it should be.

Figures are rendered with Agg and read back as pixels: a mask's interior must show the
instance colour blended at ``alpha``, the outside must keep the image.
"""

from __future__ import annotations

import json
import os

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch

from minis import viz


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def _rendered_pixel(ax, x: float, y: float) -> np.ndarray:
    """RGB (0..1) that the canvas shows at data coordinates ``(x, y)``."""
    fig = ax.figure
    fig.canvas.draw()
    rgba = np.asarray(fig.canvas.buffer_rgba())
    column, row_from_bottom = ax.transData.transform((x, y))
    return rgba[rgba.shape[0] - 1 - int(row_from_bottom), int(column), :3] / 255


def _two_squares():
    """A black 64x64 image with two non-overlapping square instances."""
    masks = torch.zeros(2, 64, 64, dtype=torch.uint8)
    masks[0, 8:24, 8:24] = 1
    masks[1, 36:60, 30:60] = 1
    boxes = torch.tensor([[8.0, 8.0, 24.0, 24.0], [30.0, 36.0, 60.0, 60.0]])
    return torch.zeros(3, 64, 64), boxes, masks


@pytest.mark.skipif(bool(os.environ.get("DISPLAY") or os.environ.get("MPLBACKEND")),
                    reason="a display or an explicit backend is set: viz leaves the choice alone")
def test_backend_is_headless_without_a_display():
    assert matplotlib.get_backend().lower() == "agg"


def test_instance_colors_are_distinct_and_in_range():
    colours = viz.instance_colors(40)
    assert colours.shape == (40, 3) and colours.min() >= 0 and colours.max() <= 1
    as_bytes = np.round(colours * 255).astype(int)
    assert len({tuple(c) for c in as_bytes}) == 40
    # Consecutive instances (the most common neighbours in a picture) differ clearly.
    assert np.abs(np.diff(colours, axis=0)).sum(axis=1).min() > 0.2
    assert not np.allclose(viz.instance_colors(5, seed=1), viz.instance_colors(5, seed=0))


def test_draw_instances_paints_each_mask_in_its_colour():
    image, boxes, masks = _two_squares()
    fig, ax = plt.subplots(figsize=(4, 4), dpi=100)
    returned = viz.draw_instances(image, boxes=boxes, masks=masks, labels=torch.tensor([1, 2]),
                                  class_names=["background", "circle", "square"], ax=ax, alpha=0.5)
    assert returned is ax
    colours = viz.instance_colors(2)
    np.testing.assert_allclose(_rendered_pixel(ax, 16, 16), 0.5 * colours[0], atol=0.02)  # centre of mask 0
    np.testing.assert_allclose(_rendered_pixel(ax, 45, 48), 0.5 * colours[1], atol=0.02)  # centre of mask 1
    np.testing.assert_allclose(_rendered_pixel(ax, 4, 50), 0.0, atol=0.02)  # outside every mask
    assert len(ax.patches) == 2  # one box per instance, in the instance colour
    np.testing.assert_allclose(ax.patches[1].get_edgecolor()[:3], colours[1])
    assert [t.get_text() for t in ax.texts] == ["circle", "square"]


def test_boxes_use_pixel_edge_coordinates():
    """Box [8, 8, 24, 24] is the outline of pixels 8..23: the axes span 0..W and 0..H."""
    image, boxes, masks = _two_squares()
    fig, ax = plt.subplots(figsize=(4, 4), dpi=100)
    viz.draw_instances(image, boxes=boxes, masks=masks, ax=ax, alpha=0.0)
    assert ax.get_xlim() == (0, 64) and ax.get_ylim() == (64, 0)
    colour = viz.instance_colors(2)[0]
    np.testing.assert_allclose(_rendered_pixel(ax, 8.0, 16), colour, atol=0.1)  # on the left edge
    np.testing.assert_allclose(_rendered_pixel(ax, 9.0, 16), 0.0, atol=0.02)  # one pixel inside: image


def test_draw_instances_numpy_hwc_uint8_and_probability_masks():
    """Model outputs: [N,1,H,W] probabilities thresholded at 0.5, low scores hidden."""
    image = np.full((64, 64, 3), 255, dtype=np.uint8)  # white image given as HWC uint8
    probabilities = np.zeros((3, 1, 64, 64), dtype=np.float32)
    probabilities[0, 0, 8:24, 8:24] = 0.9
    probabilities[0, 0, 30:40, 30:40] = 0.4  # below 0.5: not part of the mask
    probabilities[1, 0, 40:60, 40:60] = 0.8
    scores = np.array([0.95, 0.3, 0.7])  # instance 1 is below the threshold
    probabilities[2, 0, 0:6, 50:60] = 0.7
    ax = viz.draw_instances(image, masks=probabilities, labels=np.array([1, 2, 1]), scores=scores,
                            class_names=["background", "a", "b"], alpha=1.0)
    kept_colours = viz.instance_colors(2)  # colours go to the instances that are drawn
    np.testing.assert_allclose(_rendered_pixel(ax, 16, 16), kept_colours[0], atol=0.02)
    np.testing.assert_allclose(_rendered_pixel(ax, 35, 35), 1.0, atol=0.02)  # p = 0.4 stays white
    np.testing.assert_allclose(_rendered_pixel(ax, 50, 50), 1.0, atol=0.02)  # score 0.3 hidden
    np.testing.assert_allclose(_rendered_pixel(ax, 55, 3), kept_colours[1], atol=0.02)
    assert [t.get_text() for t in ax.texts] == ["a 0.95", "a 0.70"]


def test_draw_instances_later_instances_cover_earlier_ones():
    image = torch.zeros(3, 32, 32)
    masks = torch.zeros(2, 32, 32, dtype=torch.bool)
    masks[0, 4:28, 4:28] = True
    masks[1, 12:20, 12:20] = True  # on top of instance 0
    ax = viz.draw_instances(image, masks=masks, alpha=1.0)
    colours = viz.instance_colors(2)
    np.testing.assert_allclose(_rendered_pixel(ax, 16, 16), colours[1], atol=0.02)
    np.testing.assert_allclose(_rendered_pixel(ax, 6, 6), colours[0], atol=0.02)


def test_draw_instances_rejects_inconsistent_inputs():
    image, boxes, masks = _two_squares()
    with pytest.raises(ValueError, match="disagree"):
        viz.draw_instances(image, boxes=boxes, masks=masks[:1])
    with pytest.raises(ValueError, match="masks"):
        viz.draw_instances(image, masks=masks[:, :32])


def _overlapping_instances(height: int = 40, width: int = 56):
    """Four random blobs on a random image, overlapping, with scores (one below 0.5)."""
    generator = torch.Generator().manual_seed(0)
    image = torch.rand(3, height, width, generator=generator)
    masks = torch.zeros(4, height, width, dtype=torch.uint8)
    for i, (y, x) in enumerate([(2, 3), (10, 12), (14, 20), (20, 30)]):
        masks[i, y:y + 18, x:x + 22] = (torch.rand(18, 22, generator=generator) > 0.3).to(torch.uint8)
    return image, masks, torch.tensor([0.9, 0.8, 0.3, 0.7])


def _shown_picture(ax) -> np.ndarray:
    """The RGB array an Axes shows (what draw_instances composed), as uint8."""
    return np.asarray(ax.images[0].get_array())


def _reference_overlay(image, masks, scores, alpha):
    """Brute force from the definition: each pixel blends the colour of the last shown instance covering it."""
    picture = image.permute(1, 2, 0).double().numpy()
    shown = [i for i in range(len(masks)) if scores[i] >= 0.5]
    colours = viz.instance_colors(len(shown))
    out = picture.copy()
    for y in range(picture.shape[0]):
        for x in range(picture.shape[1]):
            covering = [k for k, i in enumerate(shown) if masks[i, y, x]]
            if covering:
                out[y, x] = (1 - alpha) * picture[y, x] + alpha * colours[covering[-1]]
    return np.round(out * 255).astype(np.uint8)


@pytest.mark.parametrize("chunk_pixels", [2**24, 40 * 56])  # all masks at once; one mask per chunk
def test_rle_binary_and_probability_masks_draw_the_same_overlay(monkeypatch, chunk_pixels):
    from pycocotools import mask as mask_utils

    monkeypatch.setattr(viz, "DRAW_CHUNK_PIXELS", chunk_pixels)
    image, masks, scores = _overlapping_instances()
    rles = mask_utils.encode(np.asfortranarray(masks.numpy().transpose(1, 2, 0)))
    probabilities = masks[:, None].float() * 0.4 + 0.3  # 0.7 inside, 0.3 outside
    reference = _reference_overlay(image, masks, scores, alpha=0.6)
    for given in (masks, masks.bool(), probabilities, rles):
        ax = viz.draw_instances(image, masks=given, scores=scores, alpha=0.6)
        np.testing.assert_allclose(_shown_picture(ax), reference, atol=1)  # float32 vs float64 rounding
        plt.close(ax.figure)


def test_draw_instances_places_rle_captions_and_checks_their_size():
    from pycocotools import mask as mask_utils

    image, masks, scores = _overlapping_instances()
    rles = mask_utils.encode(np.asfortranarray(masks.numpy().transpose(1, 2, 0)))
    ax = viz.draw_instances(image, masks=rles, labels=torch.tensor([1, 1, 1, 1]), scores=scores,
                            class_names=["background", "blob"])
    corners = [text.get_position() for text in ax.texts]
    expected = [(float(np.nonzero(m.numpy())[1].min()), float(np.nonzero(m.numpy())[0].min()))
                for m, s in zip(masks, scores) if s >= 0.5]
    assert corners == expected
    with pytest.raises(ValueError, match="RLE masks must have size"):
        viz.draw_instances(torch.zeros(3, 20, 56), masks=rles)
    ax = viz.draw_instances(image, boxes=torch.zeros(0, 4), masks=[], scores=torch.zeros(0))  # no detection
    assert len(ax.patches) == 0


def test_a_photo_far_larger_than_the_figure_is_shown_subsampled():
    """Only every k-th pixel reaches matplotlib (at least 2 per screen pixel); coordinates stay the image's."""
    image = torch.zeros(3, 1600, 2400)
    masks = torch.zeros(1, 1600, 2400, dtype=torch.bool)
    masks[0, 400:1200, 600:1800] = True
    fig, ax = plt.subplots(figsize=(4, 3), dpi=100)
    viz.draw_instances(image, boxes=torch.tensor([[600.0, 400.0, 1800.0, 1200.0]]), masks=masks, ax=ax, alpha=1.0)
    shown = _shown_picture(ax)
    box = ax.get_window_extent()
    assert shown.shape[0] < 1600 and shown.shape[0] >= 2 * box.height and shown.shape[1] >= 2 * box.width
    assert ax.images[0].get_extent() == [0, 2400, 1600, 0]
    np.testing.assert_allclose(_rendered_pixel(ax, 1200, 800), viz.instance_colors(1)[0], atol=0.02)
    np.testing.assert_allclose(_rendered_pixel(ax, 300, 200), 0.0, atol=0.02)
    small = viz.draw_instances(torch.zeros(3, 64, 64), masks=masks[:, :64, :64])
    assert _shown_picture(small).shape == (64, 64, 3)  # a small image is shown whole


def test_semantic_colormap_conventions_and_distinct_colours():
    table = viz.semantic_colormap(81)
    assert table.shape == (256, 3) and table.dtype == np.uint8
    assert table[0].tolist() == [0, 0, 0] and table[255].tolist() == [255, 255, 255]
    used = {tuple(c) for c in table[:81].tolist()} | {tuple(table[255].tolist())}
    assert len(used) == 82  # background, 80 classes and ignore: all different
    with pytest.raises(ValueError):
        viz.semantic_colormap(300)


def test_draw_semantic_colours_classes_and_lists_them():
    mask = torch.zeros(32, 32, dtype=torch.int64)
    mask[4:14, 4:14] = 2
    mask[20:30, 20:30] = 255
    image = torch.zeros(3, 32, 32)
    names = ["background", "circle", "triangle"]
    ax = viz.draw_semantic(image, mask, names, alpha=1.0)
    table = viz.semantic_colormap(3) / 255
    np.testing.assert_allclose(_rendered_pixel(ax, 9, 9), table[2], atol=0.02)
    np.testing.assert_allclose(_rendered_pixel(ax, 25, 25), 1.0, atol=0.02)  # ignore is white
    np.testing.assert_allclose(_rendered_pixel(ax, 25, 5), 0.0, atol=0.02)  # background keeps the image
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == ["background", "triangle", "ignore"]


def test_show_side_by_side_instance_and_semantic(tmp_path):
    image, boxes, masks = _two_squares()
    truth = {"boxes": boxes, "labels": torch.tensor([1, 2]), "masks": masks}
    prediction = {"boxes": boxes[:1], "labels": torch.tensor([1]), "scores": torch.tensor([0.9]),
                  "masks": masks[:1, None].float()}
    fig = viz.show_side_by_side(image, truth, prediction, ["background", "a", "b"])
    assert [ax.get_title() for ax in fig.axes] == ["ground truth", "prediction"]
    assert len(fig.axes[0].patches) == 2 and len(fig.axes[1].patches) == 1
    saved = viz.save_figure(fig, tmp_path / "figs" / "instances.png")
    assert saved.is_file() and saved.stat().st_size > 1000

    logits = torch.zeros(3, 64, 64)
    logits[1, :32] = 5.0  # top half predicted as class 1
    semantic = viz.show_side_by_side(image, {"semantic": masks[1].long() * 2}, logits,
                                     ["background", "a", "b"], kind="semantic", alpha=1.0)
    table = viz.semantic_colormap(3) / 255
    np.testing.assert_allclose(_rendered_pixel(semantic.axes[1], 10, 10), table[1], atol=0.02)
    np.testing.assert_allclose(_rendered_pixel(semantic.axes[0], 45, 48), table[2], atol=0.02)
    with pytest.raises(ValueError, match="kind"):
        viz.show_side_by_side(image, truth, prediction, ["background"], kind="panoptic")


def test_plot_curves_from_jsonl(tmp_path):
    log = tmp_path / "log.jsonl"
    records = [{"kind": "train", "iteration": i, "epoch": i // 5, "loss": 2.0 / (i + 1), "lr": 0.01}
               for i in range(10)]
    records += [{"kind": "val", "epoch": 0, "mIoU": 0.3}, {"kind": "val", "epoch": 1, "mIoU": 0.5}]
    log.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    ax = viz.plot_curves(log)
    lines = {line.get_label(): line for line in ax.lines}
    assert set(lines) == {"train loss", "val mIoU"}  # lr is left out unless asked for
    np.testing.assert_allclose(lines["train loss"].get_ydata(), [2.0 / (i + 1) for i in range(10)])
    # Validation after epoch e sits at the last training iteration of epoch e.
    assert list(lines["val mIoU"].get_xdata()) == [4, 9]
    assert ax.get_xlabel() == "iteration"

    only_lr = viz.plot_curves(records, keys=["lr"])
    assert [line.get_label() for line in only_lr.lines] == ["train lr"]
    by_epoch = viz.plot_curves([{"epoch": 0, "acc": 0.1}, {"epoch": 1, "acc": 0.4}])
    assert by_epoch.get_xlabel() == "epoch" and list(by_epoch.lines[0].get_xdata()) == [0, 1]
    with pytest.raises(ValueError, match="empty"):
        viz.plot_curves([])


def test_save_figure_accepts_axes(tmp_path):
    ax = viz.draw_semantic(None, np.array([[0, 1], [1, 0]]), ["background", "thing"])
    path = viz.save_figure(ax, tmp_path / "semantic.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
