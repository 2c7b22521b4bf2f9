"""SOLO, Decoupled SOLO and SOLOv2: their pieces against loops written from the papers' rules, and the
models' contract."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import minis.models
from minis.models.solo import SOLO, assign_cells, centre_of_mass, points_nms, solo_levels, upsample2
from minis.models.solov2 import SOLOv2
from minis.ops import mask_boxes, mask_iou
from test_fcos import fit_two_scenes
from test_rcnn import random_targets

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py

SMALL = dict(backbone="small", fpn_channels=32, min_size=128, max_size=192, head_channels=32, head_convs=1,
             grids=(12, 10, 8, 6, 4))
SMALL_V2 = dict(SMALL, kernel_channels=32, feature_channels=32)
MODELS = [("solo", SMALL), ("decoupled_solo", SMALL), ("solov2", SMALL_V2)]


# --------------------------------------------------------------------------------------------
# the pieces, each against a loop
# --------------------------------------------------------------------------------------------


def assign_cells_loop(boxes, masks, size, grid, scale_range, radius):
    """The rule one object and one cell at a time: centre of mass, centre region, 3 x 3 clip, smallest wins."""
    height, width = size
    owner = torch.full((grid, grid), -1)
    best = torch.full((grid, grid), math.inf)
    for m in range(len(boxes)):
        w, h = (boxes[m, 2] - boxes[m, 0]).item(), (boxes[m, 3] - boxes[m, 1]).item()
        area = masks[m].sum().item()
        if area == 0 or not scale_range[0] <= math.sqrt(w * h) <= scale_range[1]:
            continue
        ys, xs = masks[m].nonzero(as_tuple=True)
        cx, cy = (xs.double() + 0.5).mean().item(), (ys.double() + 0.5).mean().item()

        def cell(value, extent):  # in float32, as the model computes: a boundary case rounds alike
            index = torch.floor(torch.tensor(value, dtype=torch.float32) / extent * grid)
            return min(max(int(index), 0), grid - 1)

        row, column = cell(cy, height), cell(cx, width)
        top, bottom = max(cell(cy - 0.5 * radius * h, height), row - 1), min(cell(cy + 0.5 * radius * h, height), row + 1)
        left, right = max(cell(cx - 0.5 * radius * w, width), column - 1), min(cell(cx + 0.5 * radius * w, width), column + 1)
        for i in range(top, bottom + 1):
            for j in range(left, right + 1):
                if area < best[i, j]:
                    best[i, j], owner[i, j] = area, m
    return owner


@pytest.mark.parametrize("grid,radius", [(12, 0.2), (7, 0.2), (20, 0.6)])
def test_assign_cells_matches_the_rule(grid: int, radius: float) -> None:
    size = (96, 128)
    targets = random_targets([size], 4, seed=grid)[0]
    boxes, masks = targets["boxes"], targets["masks"]
    owner, = assign_cells(boxes, masks, size, (grid,), ((0, 1e5),), radius)
    assert torch.equal(owner, assign_cells_loop(boxes, masks, size, grid, (0, 1e5), radius))
    # the scale range selects objects by sqrt(w h) of the box
    scales = (boxes[:, 2:] - boxes[:, :2]).prod(dim=1).sqrt()
    middle = float(scales.median())
    everything, small_only = assign_cells(boxes, masks, size, (grid, grid), ((0, 1e5), (0, middle)), radius)
    assert torch.equal(everything, owner)
    assert set(small_only[small_only >= 0].tolist()) <= set((scales <= middle).nonzero()[:, 0].tolist())


def test_a_cell_is_never_farther_than_one_from_the_centre_cell() -> None:
    masks = torch.zeros(1, 64, 64, dtype=torch.uint8)
    masks[0, 2:62, 2:62] = 1  # a large object: 0.2 of its half-size spans several cells of a fine grid
    owner, = assign_cells(torch.tensor([[2.0, 2.0, 62.0, 62.0]]), masks, (64, 64), (40,), ((0, 1e5),), 0.2)
    rows, columns = (owner == 0).nonzero(as_tuple=True)
    assert rows.tolist() == [19, 19, 19, 20, 20, 20, 21, 21, 21] and columns.tolist() == [19, 20, 21] * 3


def test_centre_of_mass_of_an_l_shape_and_of_an_empty_mask() -> None:
    masks = torch.zeros(2, 10, 10)
    masks[0, 0:4, 0] = 1
    masks[0, 3, 0:4] = 1  # 7 pixels
    centres, has_pixels = centre_of_mass(masks)
    torch.testing.assert_close(centres[0], torch.tensor([(4 * 0.5 + 1.5 + 2.5 + 3.5) / 7, (0.5 + 1.5 + 2.5 + 4 * 3.5) / 7]))
    assert has_pixels.tolist() == [True, False]


def test_points_nms_keeps_the_cells_no_upper_left_neighbour_beats() -> None:
    probabilities = torch.rand(9, 9, 3, generator=torch.Generator().manual_seed(0))
    kept = points_nms(probabilities)
    for i in range(9):
        for j in range(9):
            for k in range(3):
                neighbours = [probabilities[a, b, k] for a in (i - 1, i) for b in (j - 1, j) if a >= 0 and b >= 0]
                expected = probabilities[i, j, k] if probabilities[i, j, k] >= max(neighbours) else 0.0
                assert kept[i, j, k] == expected


def test_solo_levels_and_the_convolution_before_the_upsampling() -> None:
    features = [torch.rand(1, 4, 64 // 2 ** i, 64 // 2 ** i) for i in range(5)]  # strides 4..64 of a 256 image
    assert [f.shape[-1] for f in solo_levels(features)] == [32, 32, 16, 8, 8]  # strides 8, 8, 16, 32, 32
    # a 1x1 convolution and a bilinear upsampling commute: SOLO convolves first, at a quarter of the cost
    conv = torch.nn.Conv2d(4, 9, 1)
    x = torch.rand(2, 4, 6, 7)
    torch.testing.assert_close(upsample2(conv(x)), conv(upsample2(x)), atol=1e-6, rtol=1e-5)


def test_decoupled_masks_are_row_times_column() -> None:
    torch.manual_seed(0)
    model = minis.models.build("decoupled_solo", num_classes=3, **SMALL)
    x, y = torch.randn(2, 12, 8, 8), torch.randn(2, 12, 8, 8)
    image, cell = torch.tensor([0, 1, 1]), torch.tensor([0, 13, 143])  # cells (0, 0), (1, 1), (11, 11)
    masks = model.instance_masks([(x, y)], 0, image, cell)
    for n, (b, c) in enumerate(zip(image.tolist(), cell.tolist())):
        torch.testing.assert_close(masks[n], y[b, c // 12].sigmoid() * x[b, c % 12].sigmoid())


def test_solov2_masks_are_a_dynamic_1x1_convolution() -> None:
    torch.manual_seed(0)
    model = minis.models.build("solov2", num_classes=3, **SMALL_V2)
    feature = torch.randn(3, 32, 16, 20)
    kernels = [torch.randn(3, 32, s, s) for s in SMALL["grids"]]
    image, cell = torch.tensor([2, 0, 2, 1]), torch.tensor([5, 99, 0, 37])
    masks = model.instance_masks((feature, kernels), 1, image, cell)  # level 1: a 10 x 10 grid
    for n, (b, c) in enumerate(zip(image.tolist(), cell.tolist())):
        weight = kernels[1][b, :, c // 10, c % 10].view(1, 32, 1, 1)
        torch.testing.assert_close(masks[n], F.conv2d(feature[b:b + 1], weight)[0, 0].sigmoid(), atol=1e-5, rtol=1e-4)


# --------------------------------------------------------------------------------------------
# the models
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,settings", MODELS)
def test_solo_family_keeps_the_instance_contract(name: str, settings: dict) -> None:
    torch.manual_seed(0)
    # untrained masks hover around 0.5 (0.25 for Decoupled SOLO's products): a low mask threshold
    model = minis.models.build(name, num_classes=4, **settings, score_thresh=0.0, update_thresh=0.0,
                               mask_thresh=0.2, detections_per_img=20)
    assert isinstance(model, SOLO) and model.task == "instance"
    sizes = [(100, 130), (128, 96)]
    images = [torch.rand(3, h, w) for h, w in sizes]
    losses = model.train()(images, random_targets(sizes, 4, seed=0))
    assert set(losses) == {"loss_category", "loss_mask"}
    assert all(torch.isfinite(v) and v.ndim == 0 for v in losses.values())
    sum(losses.values()).backward()
    assert model.category.logits.weight.grad.abs().sum() > 0
    with torch.no_grad():
        detections = model.eval()(images)
    for detection, (h, w) in zip(detections, sizes):
        n = len(detection["scores"])
        assert 0 < n <= 20 and detection["masks"].shape == (n, 1, h, w) and detection["boxes"].shape == (n, 4)
        assert ((detection["labels"] >= 1) & (detection["labels"] < 4)).all()
        assert (detection["scores"][:-1] >= detection["scores"][1:]).all()
        masks = detection["masks"][:, 0]
        assert masks.min() >= 0 and masks.max() <= 1
        # the boxes are the binary masks' boxes (found at the model's input size, up to a pixel or two here)
        found = (masks > 0.2).flatten(1).any(dim=1)
        assert found.any()
        torch.testing.assert_close(detection["boxes"][found], mask_boxes(masks[found] > 0.2), atol=2.5, rtol=0)


def test_greedy_suppression_keeps_no_two_overlapping_masks_of_a_class() -> None:
    torch.manual_seed(0)
    model = minis.models.build("solov2", num_classes=4, **SMALL_V2, score_thresh=0.0, mask_thresh=0.2,
                               suppression="greedy", nms_thresh=0.5).eval()
    image = torch.rand(3, 96, 128, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        detection = model([image])[0]
    binary = (detection["masks"][:, 0] > 0.2).float()
    assert len(binary) > 1
    iou = mask_iou(binary, binary)
    same = detection["labels"][:, None] == detection["labels"][None, :]
    off_diagonal = ~torch.eye(len(binary), dtype=torch.bool)
    assert (iou[same & off_diagonal] <= 0.5 + 0.05).all()  # masks resized after NMS: a little slack


@pytest.mark.parametrize("name,settings", MODELS)
def test_crowd_only_and_empty_images_give_no_positives(name: str, settings: dict) -> None:
    torch.manual_seed(0)
    model = minis.models.build(name, num_classes=3, **settings).train()
    image = [torch.rand(3, 128, 128, generator=torch.Generator().manual_seed(0))]
    masks = torch.zeros(1, 128, 128, dtype=torch.uint8)
    masks[0, 20:90, 20:100] = 1
    crowd = {"boxes": torch.tensor([[20.0, 20.0, 100.0, 90.0]]), "labels": torch.tensor([1]), "masks": masks,
             "iscrowd": torch.tensor([1])}
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long),
             "masks": torch.zeros(0, 128, 128, dtype=torch.uint8)}
    with_crowd, without = model(image, [crowd]), model(image, [empty])
    assert float(with_crowd["loss_mask"].detach()) == 0 and float(without["loss_mask"].detach()) == 0
    torch.testing.assert_close(with_crowd["loss_category"], without["loss_category"])
    (with_crowd["loss_category"] + with_crowd["loss_mask"]).backward()  # still a graph: an empty batch trains


@pytest.mark.parametrize("name,settings", MODELS)
def test_solo_family_learns_two_images(name: str, settings: dict) -> None:
    """Steps on two images: the loss falls, every object is found with its class and a mask that fits it."""
    torch.manual_seed(0)
    model = minis.models.build(name, num_classes=3, **settings).train()
    losses, detections, targets = fit_two_scenes(model, steps=80, lr=2e-3)
    assert sum(losses[-5:]) / 5 < 0.3 * losses[0]
    for detection, target in zip(detections, targets):
        best = mask_iou(target["masks"].float(), (detection["masks"][:, 0] > 0.5).float())  # [objects, detections]
        assert (best.max(dim=1).values > 0.7).all()


@pytest.mark.parametrize("name,settings", MODELS)
def test_coordinates_false_drops_exactly_the_coordinate_inputs(name: str, settings: dict) -> None:
    """The CoordConv ablation: with coordinates=False no input channel says where a pixel is."""
    torch.manual_seed(0)
    with_coords = minis.models.build(name, num_classes=3, **settings)
    torch.manual_seed(0)
    without = minis.models.build(name, num_classes=3, **settings, coordinates=False)
    extra = sum(p.numel() for p in with_coords.parameters()) - sum(p.numel() for p in without.parameters())
    per_conv = settings.get("head_channels") * 9  # one 3x3 filter row per coordinate channel
    # SOLO: x and y into the mask tower; Decoupled SOLO: x into one tower, y into the other; SOLOv2: x and y
    # into the kernel tower and into the feature branch's P5 convolution
    expected = 2 * per_conv + (2 * settings["feature_channels"] * 9 if name == "solov2" else 0)
    assert extra == expected


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="five levels"):
        minis.models.build("solo", num_classes=3, **{**SMALL, "grids": (12, 10)})
    with pytest.raises(ValueError, match="nms_kernel"):
        minis.models.build("solov2", num_classes=3, **SMALL_V2, nms_kernel="box")
    with pytest.raises(ValueError, match="suppression"):
        minis.models.build("solo", num_classes=3, **SMALL, suppression="soft")
    with pytest.raises(TypeError, match="SOLOv2"):
        minis.models.build("solov2", num_classes=3, **SMALL_V2, kernels=16)
    assert isinstance(minis.models.build("solov2", num_classes=3, **SMALL_V2), SOLOv2)
