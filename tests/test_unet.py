"""U-Net: any input size, the parameter count by hand, the concatenated skips, training, and the
paper's border-weighted loss against a brute-force computation of its formula."""

from __future__ import annotations

import math
from collections import deque

import pytest
import torch
import torch.nn.functional as F

import minis.models
from minis.models.unet import (border_weight_map, class_balance_weights, connected_objects, distance_to_masks,
                               pad_to_multiple, weighted_cross_entropy)

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def test_default_maps_images_to_logits_at_input_resolution() -> None:
    model = minis.models.build("unet", num_classes=4).eval()
    assert model.task == "semantic"
    with torch.no_grad():
        assert model(torch.rand(2, 3, 96, 96)).shape == (2, 4, 96, 96)
        assert model(torch.rand(1, 3, 97, 75)).shape == (1, 4, 97, 75)  # padded to 112x80, cropped back
        assert model(torch.rand(1, 3, 7, 5)).shape == (1, 4, 7, 5)  # smaller than the padding


@pytest.mark.parametrize("depth,width,bilinear", [(2, 8, False), (3, 16, True), (5, 8, False)])
def test_depths_and_widths(depth: int, width: int, bilinear: bool) -> None:
    model = minis.models.build("unet", num_classes=3, depth=depth, width=width, bilinear=bilinear).eval()
    assert len(model.encoder) == depth + 1 and len(model.decoder) == depth
    assert model.encoder[depth][0][0].out_channels == width * 2**depth  # channels double per level
    with torch.no_grad():
        for size in ((96, 96), (65, 43)):
            assert model(torch.rand(1, 3, *size)).shape == (1, 3, *size)


def unet_parameters(depth: int, width: int, num_classes: int) -> int:
    """U-Net's parameter count by hand: 3x3 convolutions without bias (batch norm follows, with
    a scale and a shift per channel), 2x2 transposed convolutions and a 1x1 classifier with bias."""
    c = [width * 2**level for level in range(depth + 1)]

    def double_conv(cin: int, cout: int) -> int:
        return 9 * cin * cout + 2 * cout + 9 * cout * cout + 2 * cout

    encoder = double_conv(3, c[0]) + sum(double_conv(c[level - 1], c[level]) for level in range(1, depth + 1))
    up = sum(4 * c[level + 1] * c[level] + c[level] for level in range(depth))
    decoder = sum(double_conv(2 * c[level], c[level]) for level in range(depth))  # concatenated input
    return encoder + up + decoder + c[0] * num_classes + num_classes


def test_parameter_count_by_hand_and_growth_with_width() -> None:
    counts = {}
    for width in (16, 32):
        model = minis.models.build("unet", num_classes=5, width=width)
        counts[width] = sum(p.numel() for p in model.parameters())
        assert counts[width] == unet_parameters(4, width, 5)
    # almost every weight joins two layers whose widths both double: about 4x the parameters
    assert 3.9 < counts[32] / counts[16] < 4.0
    assert unet_parameters(4, 64, 2) == pytest.approx(31.0e6, rel=0.01)  # the paper's size, ~31 M


def test_decoder_concatenates_the_encoder_map() -> None:
    torch.manual_seed(0)
    model = minis.models.build("unet", num_classes=3, depth=3, width=8).eval()
    seen = {}
    model.encoder[1].register_forward_hook(lambda module, inputs, output: seen.update(encoder=output))
    model.up[1].register_forward_hook(lambda module, inputs, output: seen.update(up=output))
    model.decoder[1].register_forward_hook(lambda module, inputs, output: seen.update(decoder_input=inputs[0]))
    with torch.no_grad():
        model(torch.rand(1, 3, 64, 48))
    assert model.decoder[1][0][0].in_channels == 2 * 16  # the encoder's 16 + the upsampled 16
    assert seen["decoder_input"].shape == (1, 32, 32, 24)
    torch.testing.assert_close(seen["decoder_input"][:, :16], seen["encoder"])
    torch.testing.assert_close(seen["decoder_input"][:, 16:], seen["up"])


def test_padding_mirrors_the_image() -> None:
    images = torch.arange(20 * 18, dtype=torch.float32).view(1, 1, 20, 18)
    padded = pad_to_multiple(images, 16)
    assert padded.shape == (1, 1, 32, 32)
    torch.testing.assert_close(padded[..., :20, :18], images)
    torch.testing.assert_close(padded[..., 20, :18], images[..., 18, :])  # mirrored about the last row
    torch.testing.assert_close(padded[..., :20, 18], images[..., :, 16])
    assert pad_to_multiple(images[..., :16, :16], 16).shape == (1, 1, 16, 16)
    tiny = pad_to_multiple(images[..., :5, :7], 16)  # too small to mirror: the edge is repeated
    torch.testing.assert_close(tiny[..., 15, :7], images[..., 4, :7])


def test_one_training_step_lowers_the_loss() -> None:
    torch.manual_seed(0)
    model = minis.models.build("unet", num_classes=3).train()
    coarse = torch.randint(0, 3, (2, 6, 6))  # random 16x16 blocks in their class's colour
    targets = coarse.repeat_interleave(16, dim=1).repeat_interleave(16, dim=2)
    palette = torch.tensor([[0.1, 0.1, 0.1], [0.9, 0.2, 0.2], [0.2, 0.2, 0.9]])
    images = (palette[targets].permute(0, 3, 1, 2) + 0.1 * torch.randn(2, 3, 96, 96)).clamp(0, 1)
    targets[:, :10] = 255
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = model(images, targets)
    assert set(losses) == {"loss_ce"}
    optimizer.zero_grad()
    losses["loss_ce"].backward()
    optimizer.step()
    with torch.no_grad():
        assert model(images, targets)["loss_ce"] < 0.97 * losses["loss_ce"]


def test_deep_supervision_classifies_the_bottom_of_the_u() -> None:
    torch.manual_seed(0)
    images, targets = torch.rand(2, 3, 40, 56), torch.randint(0, 3, (2, 40, 56))
    model = minis.models.build("unet", num_classes=3, depth=3, width=4, aux_weight=0.4).train()
    bottom = {}
    model.encoder[3].register_forward_hook(lambda module, inputs, output: bottom.setdefault("map", output))
    losses = model(images, targets)
    assert set(losses) == {"loss_ce", "loss_aux"}
    assert bottom["map"].shape == (2, 32, 5, 7)  # 40x56 is already a multiple of 8: no padding
    with torch.no_grad():
        aux_logits = torch.nn.functional.interpolate(model.aux_classifier(bottom["map"]), size=(40, 56),
                                                     mode="bilinear", align_corners=False)
    expected = 0.4 * torch.nn.functional.cross_entropy(aux_logits, targets)
    assert torch.allclose(losses["loss_aux"], expected, rtol=1e-4)
    assert model.eval()(images).shape == (2, 3, 40, 56)
    assert minis.models.build("unet", num_classes=3).aux_classifier is None  # off by default, as in the paper


def test_fused_output_adds_the_bottom_scores_to_the_top_scores() -> None:
    torch.manual_seed(0)
    images = torch.rand(2, 3, 40, 56)
    model = minis.models.build("unet", num_classes=3, depth=3, width=4, aux_weight=0.4, fuse_aux=True).eval()
    captured = {}
    model.decoder[0].register_forward_hook(lambda module, inputs, output: captured.setdefault("top", output))
    model.encoder[3].register_forward_hook(lambda module, inputs, output: captured.setdefault("bottom", output))
    with torch.no_grad():
        logits = model(images)
        bottom = torch.nn.functional.interpolate(model.aux_classifier(captured["bottom"]), size=(40, 56),
                                                 mode="bilinear", align_corners=False)
        expected = model.classifier(captured["top"]) + bottom
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    # the same weights without the fusion give the top classifier's scores alone
    plain = minis.models.build("unet", num_classes=3, depth=3, width=4, aux_weight=0.4).eval()
    plain.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(plain(images), model.classifier(captured["top"]), rtol=1e-5, atol=1e-5)
    # training: the fused logits get loss_ce, the bottom's own scores loss_aux
    assert set(model.train()(images, torch.randint(0, 3, (2, 40, 56)))) == {"loss_ce", "loss_aux"}
    with pytest.raises(ValueError, match="needs aux_weight > 0"):
        minis.models.build("unet", num_classes=3, fuse_aux=True)


def test_bad_depth_is_refused() -> None:
    with pytest.raises(ValueError, match="at least one downsampling"):
        minis.models.build("unet", num_classes=3, depth=0)


# --------------------------------------------------------------------------- the border-weighted loss


def flood_fill_objects(labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Reference: 4-connected regions of one class (not 0, not 255) by breadth-first search: ids, count."""
    height, width = labels.shape
    ids = torch.zeros(height, width, dtype=torch.long)
    count = 0
    for y in range(height):
        for x in range(width):
            if int(labels[y, x]) in (0, 255) or ids[y, x]:
                continue
            count += 1
            ids[y, x] = count
            queue = deque([(y, x)])
            while queue:
                a, b = queue.popleft()
                for c, d in ((a + 1, b), (a - 1, b), (a, b + 1), (a, b - 1)):
                    if 0 <= c < height and 0 <= d < width and not ids[c, d] and labels[c, d] == labels[y, x]:
                        ids[c, d] = count
                        queue.append((c, d))
    return ids, count


def brute_force_weights(labels: torch.Tensor, w0: float, sigma: float) -> torch.Tensor:
    """The paper's w(x) for one label map [H,W], pixel by pixel, from the formula."""
    height, width = labels.shape
    ids, count = flood_fill_objects(labels)
    pixels_of = [(ids == k).nonzero().tolist() for k in range(1, count + 1)]
    scored = labels != 255
    classes = labels[scored].unique().tolist()
    weights = torch.zeros(height, width, dtype=torch.float64)
    for y in range(height):
        for x in range(width):
            if not scored[y, x]:
                continue
            w_c = int(scored.sum()) / (len(classes) * int((labels == labels[y, x]).sum()))
            border = 0.0
            if labels[y, x] == 0 and count >= 2:
                d1, d2 = sorted(min(math.hypot(y - a, x - b) for a, b in pixels) for pixels in pixels_of)[:2]
                border = w0 * math.exp(-((d1 + d2) ** 2) / (2 * sigma**2))
            weights[y, x] = w_c + border
    return weights


def random_label_maps(seed: int, batch: int = 2, height: int = 17, width: int = 23) -> torch.Tensor:
    """Rectangles of classes 1-2 that overlap, touch and nest, with an ignored strip."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.zeros(batch, height, width, dtype=torch.long)
    for image in labels:
        for _ in range(5):
            y, x = torch.randint(0, height - 2, (2,), generator=generator).tolist()
            h, w = torch.randint(1, 6, (2,), generator=generator).tolist()
            image[y:y + h, x:x + w] = int(torch.randint(1, 3, (1,), generator=generator))
        image[0, :3] = 255
    return labels


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_connected_objects_match_a_flood_fill(seed: int) -> None:
    labels = random_label_maps(seed)
    labels[0, 10:12, 0:2], labels[0, 12:14, 2:4] = 1, 1  # touching only diagonally: two objects
    ids = connected_objects(labels)
    for image, image_ids in zip(labels, ids):
        expected, count = flood_fill_objects(image)
        pairs = set(zip(image_ids.flatten().tolist(), expected.flatten().tolist()))
        assert len(pairs) == len({a for a, _ in pairs}) == len({b for _, b in pairs}) == count + 1  # same partition
        assert ((image_ids == 0) == (expected == 0)).all()


def test_a_snake_is_one_object() -> None:
    """A long winding object: the numbers must travel its whole length."""
    labels = torch.zeros(1, 15, 15, dtype=torch.long)
    labels[0, ::2] = 3  # rows 0, 2, ..., 14
    labels[0, 1::4, -1] = labels[0, 3::4, 0] = 3  # joined alternately at the right and left ends
    ids = connected_objects(labels)
    assert ids[labels > 0].unique().numel() == 1 and (ids[labels == 0] == 0).all()


def test_distances_to_masks_are_euclidean_up_to_the_limit() -> None:
    generator = torch.Generator().manual_seed(0)
    masks = torch.rand(3, 19, 26, generator=generator) > 0.97
    masks[2] = False  # an empty mask: infinitely far
    grid = torch.stack(torch.meshgrid(torch.arange(19.0), torch.arange(26.0), indexing="ij"), -1).reshape(-1, 2)
    ours = distance_to_masks(masks, max_distance=8)
    for mask, distance in zip(masks[:2], ours[:2]):
        expected = torch.cdist(grid, mask.nonzero().float()).amin(1).reshape(19, 26)
        near = expected <= 8
        torch.testing.assert_close(distance[near], expected[near])
        assert (distance[~near] >= expected[~near]).all() and (distance[~near] > 8).all()
    assert torch.isinf(ours[2]).all()


def test_class_balance_gives_every_class_the_same_total_weight() -> None:
    labels = random_label_maps(3)
    weights = class_balance_weights(labels)
    for image, image_weights in zip(labels, weights):
        scored = image != 255
        totals = [float(image_weights[image == c].sum()) for c in image[scored].unique()]
        assert max(totals) == pytest.approx(min(totals))
        assert float(image_weights[scored].mean()) == pytest.approx(1.0)
        assert (image_weights[~scored] == 0).all()


@pytest.mark.parametrize("seed,w0,sigma", [(0, 10.0, 5.0), (1, 10.0, 5.0), (2, 4.0, 1.5)])
def test_border_weight_map_is_the_papers_formula(seed: int, w0: float, sigma: float) -> None:
    labels = random_label_maps(seed)
    labels[1] = torch.where(labels[1] == 255, 255, 0)  # an image without objects: w = w_c = 1
    labels[1, 5:8, 5:9] = 2  # ... then with a single object: still no border term
    weights = border_weight_map(labels, w0=w0, sigma=sigma)
    for image, image_weights in zip(labels, weights):
        torch.testing.assert_close(image_weights.double(), brute_force_weights(image, w0, sigma), rtol=1e-5,
                                   atol=1e-5)


def test_the_narrowest_gap_weighs_most() -> None:
    """Two objects one background pixel apart: the gap gets w_c + w0 exp(-2^2 / (2 sigma^2))."""
    labels = torch.zeros(1, 9, 12, dtype=torch.long)
    labels[0, 2:7, 1:5] = 1
    labels[0, 2:7, 6:11] = 1  # column 5 separates them
    weights = border_weight_map(labels)
    w_c = class_balance_weights(labels)
    gap = weights[0, 2:7, 5] - w_c[0, 2:7, 5]
    torch.testing.assert_close(gap, torch.full((5,), 10 * math.exp(-4 / 50)))
    assert weights[0].argmax() // 12 in range(2, 7) and weights[0].argmax() % 12 == 5


def test_weighted_cross_entropy_with_unit_weights_is_cross_entropy() -> None:
    logits, targets = torch.randn(2, 4, 6, 7), torch.randint(0, 4, (2, 6, 7))
    targets[0, 0] = 255
    ones = torch.ones(2, 6, 7)
    torch.testing.assert_close(weighted_cross_entropy(logits, targets, ones),
                               F.cross_entropy(logits, targets, ignore_index=255))
    weights = torch.rand(2, 6, 7)
    per_pixel = F.cross_entropy(logits, targets, ignore_index=255, reduction="none")
    torch.testing.assert_close(weighted_cross_entropy(logits, targets, weights),
                               (weights * per_pixel).sum() / (targets != 255).sum())


def test_unet_trains_with_the_border_weighted_loss() -> None:
    labels = random_label_maps(0, batch=2, height=24, width=24)
    images = torch.rand(2, 3, 24, 24)
    torch.manual_seed(0)
    plain = minis.models.build("unet", num_classes=3, depth=2, width=4, aux_weight=0.4)
    torch.manual_seed(0)
    weighted = minis.models.build("unet", num_classes=3, depth=2, width=4, aux_weight=0.4, border_weight=True,
                                  w0=10.0, sigma=5.0)
    assert weighted.build_args["border_weight"] is True
    plain_losses, losses = plain.train()(images, labels), weighted.train()(images, labels)
    with torch.no_grad():
        logits = weighted(images)  # training mode without targets: the same logits
    expected = weighted_cross_entropy(logits, labels, border_weight_map(labels, 10.0, 5.0))
    torch.testing.assert_close(losses["loss_ce"], expected)
    assert not torch.allclose(losses["loss_ce"], plain_losses["loss_ce"])
    torch.testing.assert_close(losses["loss_aux"], plain_losses["loss_aux"])  # deep supervision stays plain
    losses["loss_ce"].backward()
    assert weighted.classifier.weight.grad.abs().sum() > 0
