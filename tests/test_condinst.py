"""CondInst: the dynamic mask heads, their parameter count, the aligned upsampling and the whole model."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import minis.models
from minis.models.condinst import (CondInst, count_dynamic_params, dynamic_layer_shapes, mask_targets,
                                   run_dynamic_heads, split_dynamic_params, upsample_aligned)
from test_fcos import fit_two_scenes
from test_rcnn import random_targets

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py

SMALL = dict(backbone="small", fpn_channels=64, min_size=128, max_size=192, head_convs=2, mask_branch_channels=32,
             mask_branch_convs=2)


def test_the_default_dynamic_head_has_169_parameters() -> None:
    shapes = dynamic_layer_shapes(8 + 2, 8, 3)
    assert shapes == [(8, 10), (8, 8), (1, 8)]
    assert count_dynamic_params(shapes) == 169  # (10*8 + 8) + (8*8 + 8) + (8*1 + 1)
    model = minis.models.build("condinst", num_classes=4, backbone="small", fpn_channels=64)
    assert model.num_dynamic_params == 169 and model.controller.out_channels == 169
    without = minis.models.build("condinst", num_classes=4, backbone="small", fpn_channels=64, relative_coords=False)
    assert without.num_dynamic_params == 169 - 2 * 8


def test_grouped_convolution_equals_one_small_network_per_instance() -> None:
    generator = torch.Generator().manual_seed(0)
    shapes = dynamic_layer_shapes(10, 8, 3)
    inputs = torch.randn(5, 10, 12, 14, generator=generator)
    params = torch.randn(5, count_dynamic_params(shapes), generator=generator)
    got = run_dynamic_heads(inputs, params, shapes)
    assert got.shape == (5, 1, 12, 14)
    for n in range(5):  # the loop the grouped convolution replaces
        x = inputs[n:n + 1]
        layers = split_dynamic_params(params[n:n + 1], shapes)
        for index, (weight, bias) in enumerate(layers):
            x = F.conv2d(x, weight, bias)
            x = F.relu(x) if index < len(layers) - 1 else x
        torch.testing.assert_close(got[n:n + 1], x, rtol=1e-5, atol=1e-5)


def test_aligned_upsampling_keeps_a_mask_where_it_was() -> None:
    """A stride-8 map upsampled to stride 4: the centre of mass must stay at the same image point."""
    coarse = torch.zeros(1, 1, 8, 8)
    coarse[..., 6, 5] = 1.0  # off-centre: the shift of align_corners=True grows towards the borders

    def centre_in_image(mask: torch.Tensor, stride: int) -> torch.Tensor:
        ys, xs = torch.meshgrid(torch.arange(mask.shape[-2]), torch.arange(mask.shape[-1]), indexing="ij")
        weights = mask[0, 0] / mask.sum()
        # a pixel of a stride-s map stands for the centre of its s x s cell
        return torch.stack([((xs + 0.5) * weights).sum(), ((ys + 0.5) * weights).sum()]) * stride

    fine = upsample_aligned(coarse, 2)
    assert fine.shape == (1, 1, 16, 16)
    torch.testing.assert_close(centre_in_image(fine, 4), centre_in_image(coarse, 8), atol=1e-4, rtol=0)
    corners = F.interpolate(coarse, scale_factor=2, mode="bilinear", align_corners=True)
    assert (centre_in_image(corners, 4) - centre_in_image(coarse, 8)).abs().max() > 1.0  # shifted by over a pixel


def test_condinst_keeps_the_instance_contract() -> None:
    torch.manual_seed(0)
    model = minis.models.build("condinst", num_classes=4, **SMALL, semantic_loss_weight=1.0, score_thresh=0.0,
                               detections_per_img=7)
    assert isinstance(model, CondInst) and model.task == "instance"
    sizes = [(100, 130), (128, 96)]
    images = [torch.rand(3, h, w) for h, w in sizes]
    targets = random_targets(sizes, 4, seed=0)
    losses = model.train()(images, targets)
    assert set(losses) == {"loss_classifier", "loss_box_giou", "loss_centerness", "loss_mask", "loss_semantic"}
    assert all(torch.isfinite(v) and v.ndim == 0 for v in losses.values())
    sum(losses.values()).backward()
    assert model.controller.weight.grad.abs().sum() > 0 and model.mask_branch.out.weight.grad.abs().sum() > 0
    with torch.no_grad():
        detections = model.eval()(images)
    for detection, (h, w) in zip(detections, sizes):
        assert len(detection["boxes"]) == 7  # masks only for the detections kept after NMS
        assert detection["masks"].shape == (7, 1, h, w)
        assert detection["masks"].min() >= 0 and detection["masks"].max() <= 1
        assert ((detection["labels"] >= 1) & (detection["labels"] < 4)).all()


def test_no_detection_gives_no_mask() -> None:
    torch.manual_seed(0)
    model = minis.models.build("condinst", num_classes=3, **SMALL, score_thresh=1.0).eval()  # nothing passes
    with torch.no_grad():
        detection = model([torch.rand(3, 80, 90)])[0]
    assert len(detection["boxes"]) == 0 and detection["masks"].shape == (0, 1, 80, 90)


def test_a_batch_without_objects_still_trains() -> None:
    torch.manual_seed(0)
    model = minis.models.build("condinst", num_classes=3, **SMALL).train()
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64),
             "masks": torch.zeros(0, 96, 96, dtype=torch.uint8)}
    losses = model([torch.rand(3, 96, 96)], [empty])
    assert float(losses["loss_mask"].detach()) == 0.0
    sum(losses.values()).backward()


def test_training_without_masks_is_refused_naming_the_image() -> None:
    model = minis.models.build("condinst", num_classes=3, **SMALL).train()
    target = {"boxes": torch.tensor([[10.0, 10.0, 50.0, 50.0]]), "labels": torch.tensor([1]), "image_id": 42}
    with pytest.raises(ValueError, match="image id 42: CondInst needs 'masks'"):
        model([torch.rand(3, 64, 64)], [target])


def test_mask_targets_average_each_cell_or_sample_its_middle_pixel() -> None:
    masks = (torch.rand(3, 16, 24, generator=torch.Generator().manual_seed(0)) > 0.6).to(torch.uint8)
    averaged, sampled = mask_targets(masks, 4), mask_targets(masks, 4, sampled=True)
    assert averaged.shape == sampled.shape == (3, 1, 4, 6)
    for m in range(3):  # written out cell by cell
        for i in range(4):
            for j in range(6):
                cell = masks[m, 4 * i:4 * i + 4, 4 * j:4 * j + 4].float()
                assert averaged[m, 0, i, j] == cell.mean()
                assert sampled[m, 0, i, j] == cell[2, 2]
    assert set(sampled.unique().tolist()) == {0.0, 1.0}


def test_sampled_mask_targets_change_only_the_mask_loss() -> None:
    images = [torch.rand(3, 100, 130, generator=torch.Generator().manual_seed(1))]
    targets = random_targets([(100, 130)], 3, seed=2)
    for target in targets:  # a thin object, which 4x4 averages keep and sampling may not
        target["masks"][0] = 0
        target["masks"][0, 20:60, 33] = 1
        target["boxes"][0] = torch.tensor([33.0, 20.0, 34.0, 60.0])
    losses = {}
    for sampled in (False, True):
        torch.manual_seed(0)
        model = minis.models.build("condinst", num_classes=3, **SMALL, sampled_mask_targets=sampled).train()
        torch.manual_seed(1)
        losses[sampled] = {k: float(v.detach()) for k, v in model(images, targets).items()}
    assert losses[False]["loss_classifier"] == losses[True]["loss_classifier"]
    assert losses[False]["loss_mask"] != losses[True]["loss_mask"]


def test_relative_coordinates_make_the_same_head_draw_at_its_own_location() -> None:
    torch.manual_seed(0)
    model = minis.models.build("condinst", num_classes=3, **SMALL).eval()
    features = torch.randn(1, 8, 16, 16)
    params = torch.randn(1, 169).repeat(2, 1)
    points = torch.tensor([[20.0, 20.0], [100.0, 100.0]])
    logits = model.mask_logits(features, torch.tensor([0, 0]), points, torch.tensor([8.0, 8.0]), params, (128, 128))
    assert logits.shape == (2, 1, 32, 32)  # stride 4
    assert not torch.allclose(logits[0], logits[1])
    model.config.relative_coords = False
    model.dynamic_shapes = dynamic_layer_shapes(8, 8, 3)
    params = params[:, :count_dynamic_params(model.dynamic_shapes)]
    logits = model.mask_logits(features, torch.tensor([0, 0]), points, torch.tensor([8.0, 8.0]), params, (128, 128))
    torch.testing.assert_close(logits[0], logits[1])  # without them, the location makes no difference


def test_condinst_learns_the_masks_of_two_images() -> None:
    """120 steps on two images: each object's mask is found, not its neighbour's."""
    torch.manual_seed(0)
    model = minis.models.build("condinst", num_classes=3, **SMALL).train()
    _, detections, targets = fit_two_scenes(model, steps=120, lr=2e-3, check_boxes=False)
    for detection, target in zip(detections, targets):
        predicted = detection["masks"][:, 0] >= 0.5  # [D,H,W]
        truth = target["masks"].bool()
        intersection = (predicted[:, None] & truth[None]).sum((2, 3)).float()
        union = (predicted[:, None] | truth[None]).sum((2, 3)).float()
        mask_iou = intersection / union.clamp(min=1)  # [D,M]
        assert (mask_iou.max(dim=0).values > 0.7).all()  # every object has a good mask
        best = mask_iou.argmax(dim=0)
        assert torch.equal(detection["labels"][best], target["labels"])
