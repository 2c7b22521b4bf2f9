"""minis.ops.matrix_nms, mask_iou and mask_boxes against loops written from their formulas and torchvision."""

import math

import pytest
import torch

from minis.ops import mask_iou, matrix_nms


def iou_loop(a: torch.Tensor, b: torch.Tensor) -> float:
    intersection = (a * b).sum().item()
    union = a.sum().item() + b.sum().item() - intersection
    return intersection / union if union > 0 else 0.0


def matrix_nms_loop(masks, labels, scores, kernel="gaussian", sigma=2.0):
    """decay_j = min over better i of the same class of f(iou_ij) / f(comp_i), one pair at a time."""
    f = (lambda x: math.exp(-sigma * x * x)) if kernel == "gaussian" else (lambda x: 1 - x)
    order = sorted(range(len(scores)), key=lambda k: -float(scores[k]))  # stable: ties by index
    rank = {k: r for r, k in enumerate(order)}

    def compensation(i):
        return max([iou_loop(masks[k], masks[i]) for k in order[:rank[i]] if labels[k] == labels[i]], default=0.0)

    out = scores.clone()
    for j in order:
        decay = 1.0
        for i in order[:rank[j]]:
            if labels[i] != labels[j]:
                continue
            own = f(compensation(i))
            if own > 0:  # an exact duplicate (linear kernel) decays nothing
                decay = min(decay, f(iou_loop(masks[i], masks[j])) / own)
        out[j] = scores[j] * decay
    return out


def random_masks(count: int, size: int = 24, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Overlapping random rectangles and blobs, a few classes, distinct scores."""
    generator = torch.Generator().manual_seed(seed)
    corners = torch.randint(0, size // 2, (count, 2), generator=generator)
    sides = torch.randint(4, size // 2, (count, 2), generator=generator)
    ys, xs = torch.arange(size).view(1, -1, 1), torch.arange(size).view(1, 1, -1)
    masks = ((ys >= corners[:, 0, None, None]) & (ys < (corners[:, 0] + sides[:, 0])[:, None, None])
             & (xs >= corners[:, 1, None, None]) & (xs < (corners[:, 1] + sides[:, 1])[:, None, None]))
    masks &= torch.rand(count, size, size, generator=generator) > 0.1  # holes: not just boxes
    labels = torch.randint(0, 3, (count,), generator=generator)
    scores = torch.rand(count, generator=generator)
    return masks.float(), labels, scores


def test_mask_iou_matches_loop():
    masks, _, _ = random_masks(7)
    expected = torch.tensor([[iou_loop(a, b) for b in masks[:5]] for a in masks])
    torch.testing.assert_close(mask_iou(masks, masks[:5]), expected)
    assert mask_iou(torch.zeros(1, 4, 4), torch.zeros(1, 4, 4)).item() == 0.0


@pytest.mark.parametrize("kernel", ["gaussian", "linear"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matrix_nms_matches_the_formula(kernel, seed):
    masks, labels, scores = random_masks(30, seed=seed)
    decayed = matrix_nms(masks, labels, scores, kernel=kernel, sigma=2.0)
    torch.testing.assert_close(decayed, matrix_nms_loop(masks, labels, scores, kernel, 2.0))
    assert (decayed <= scores).all()
    best = torch.stack([scores[labels == c].max() for c in labels.unique()])  # each class's best keeps its score
    assert torch.isin(best, decayed).all()


def test_matrix_nms_keeps_classes_apart_and_decays_duplicates():
    mask = torch.zeros(3, 8, 8)
    mask[:, 2:6, 2:6] = 1
    scores = torch.tensor([0.9, 0.8, 0.7])
    # one object found three times, each time as another class: nothing decays
    torch.testing.assert_close(matrix_nms(mask, torch.tensor([0, 1, 2]), scores), scores)
    # the same class: the gaussian kernel decays each copy by exp(-2) relative to the best (compensated)
    decayed = matrix_nms(mask, torch.tensor([1, 1, 1]), scores, kernel="gaussian", sigma=2.0)
    torch.testing.assert_close(decayed, torch.tensor([0.9, 0.8 * math.exp(-2), 0.7 * math.exp(-2)]))


def test_matrix_nms_linear_kernel_identical_masks_stay_finite():
    # the released code divides 0 by 0 for the third copy of a mask; here it is 0, not nan
    mask = torch.zeros(4, 8, 8)
    mask[:, 1:5, 1:7] = 1
    decayed = matrix_nms(mask, torch.zeros(4, dtype=torch.long), torch.tensor([0.5, 0.9, 0.7, 0.6]), kernel="linear")
    assert torch.isfinite(decayed).all()
    torch.testing.assert_close(decayed, torch.tensor([0.0, 0.9, 0.0, 0.0]))


def test_matrix_nms_input_order_and_empty():
    masks, labels, scores = random_masks(12, seed=3)
    permutation = torch.randperm(12, generator=torch.Generator().manual_seed(0))
    decayed = matrix_nms(masks, labels, scores)
    torch.testing.assert_close(matrix_nms(masks[permutation], labels[permutation], scores[permutation]),
                               decayed[permutation])
    assert matrix_nms(torch.zeros(0, 5, 5), torch.zeros(0, dtype=torch.long), torch.zeros(0)).shape == (0,)
    with pytest.raises(ValueError, match="kernel"):
        matrix_nms(masks, labels, scores, kernel="box")


def test_mask_boxes_match_torchvision():
    from torchvision.ops import masks_to_boxes

    from minis.ops import mask_boxes

    masks, _, _ = random_masks(9, seed=4)
    masks = masks.bool()
    expected = masks_to_boxes(masks) + torch.tensor([0.0, 0.0, 1.0, 1.0])  # torchvision: last pixel's index
    torch.testing.assert_close(mask_boxes(masks), expected)
    assert mask_boxes(torch.zeros(2, 5, 6, dtype=torch.bool)).eq(0).all()


def test_batched_mask_nms_matches_a_greedy_loop():
    from minis.ops import batched_mask_nms

    masks, labels, scores = random_masks(40, seed=5)
    kept = []
    for i in sorted(range(40), key=lambda k: -float(scores[k])):
        if all(labels[i] != labels[j] or iou_loop(masks[i], masks[j]) <= 0.3 for j in kept):
            kept.append(i)
    assert batched_mask_nms(masks, scores, labels, 0.3).tolist() == kept
    assert batched_mask_nms(masks[:0], scores[:0], labels[:0], 0.3).shape == (0,)
