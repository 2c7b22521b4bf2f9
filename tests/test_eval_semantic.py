"""minis.eval.semantic: confusion matrix, mIoU and accuracies, checked by hand and with numpy."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from minis.eval import ConfusionMatrix, semantic_evaluate

# 3 classes, 255 = ignore. Each pixel is a (ground truth, prediction) pair:
#   row 0: (0,0) (0,1) (1,1) (1,1)
#   row 1: (0,0) (2,2) (1,2) ignored
#   row 2: (2,2) (2,0) ignored (1,1)
TARGET = torch.tensor([[0, 0, 1, 1], [0, 2, 1, 255], [2, 2, 255, 1]])
PRED = torch.tensor([[0, 1, 1, 1], [0, 2, 2, 0], [2, 0, 1, 1]])
# Counting the pairs: (0,0) x2, (0,1) x1, (1,1) x3, (1,2) x1, (2,2) x2, (2,0) x1.
HAND_MATRIX = [
    [2, 1, 0],  # ground truth 0: 3 pixels
    [0, 3, 1],  # ground truth 1: 4 pixels
    [1, 0, 2],  # ground truth 2: 3 pixels
]
# IoU_c = TP / (row sum + column sum - TP):
#   class 0: 2 / (3 + 3 - 2) = 2/4;  class 1: 3 / (4 + 4 - 3) = 3/5;  class 2: 2 / (3 + 3 - 2) = 2/4
HAND_IOU = [2 / 4, 3 / 5, 2 / 4]
HAND_MIOU = (2 / 4 + 3 / 5 + 2 / 4) / 3  # = 0.5333...
HAND_PIXEL_ACCURACY = (2 + 3 + 2) / 10  # 10 scored pixels (12 minus 2 ignored)
HAND_MEAN_ACCURACY = (2 / 3 + 3 / 4 + 2 / 3) / 3  # TP / row sum per class, = 25/36


def test_hand_computed_example():
    cm = ConfusionMatrix(3)
    cm.update(PRED, TARGET)
    assert cm.matrix.dtype == torch.int64
    assert cm.matrix.tolist() == HAND_MATRIX
    metrics = cm.compute(class_names=["background", "cat", "dog"])
    assert metrics["per_class_iou"] == pytest.approx({"background": 0.5, "cat": 0.6, "dog": 0.5})
    assert metrics["mIoU"] == pytest.approx(HAND_MIOU)
    assert metrics["pixel_accuracy"] == pytest.approx(HAND_PIXEL_ACCURACY)
    assert metrics["mean_accuracy"] == pytest.approx(HAND_MEAN_ACCURACY)
    assert metrics["confusion_matrix"] == HAND_MATRIX
    # semantic_evaluate gives the same, with default class names "0", "1", "2".
    same = semantic_evaluate(PRED, TARGET, num_classes=3)
    assert same["per_class_iou"] == pytest.approx(dict(zip("012", HAND_IOU)))
    assert same["mIoU"] == pytest.approx(HAND_MIOU)


def test_ignored_pixels_do_not_count():
    scored = TARGET != 255
    other_pred = torch.where(scored, PRED, torch.tensor(2))  # change the prediction only where ignored
    assert semantic_evaluate(other_pred, TARGET, 3)["confusion_matrix"] == HAND_MATRIX
    # Another ignore value: the same labels with ignored pixels marked -1.
    marked = torch.where(scored, TARGET, torch.tensor(-1))
    assert semantic_evaluate(PRED, marked, 3, ignore_index=-1)["confusion_matrix"] == HAND_MATRIX
    # With no ignore index, 255 is just an invalid class.
    with pytest.raises(ValueError, match="target holds class 255"):
        semantic_evaluate(PRED, TARGET, 3, ignore_index=None)


def test_absent_classes_are_nan_and_left_out_of_the_mean():
    # Class 3 is in neither maps: IoU 0/0 = nan, not part of the mean.
    absent = semantic_evaluate(PRED, TARGET, num_classes=4)
    assert math.isnan(absent["per_class_iou"]["3"]) and math.isnan(absent["per_class_accuracy"]["3"])
    assert absent["mIoU"] == pytest.approx(HAND_MIOU)
    assert absent["mean_accuracy"] == pytest.approx(HAND_MEAN_ACCURACY)
    # Predicting class 3 on one pixel of ground truth 1 makes it a false positive: IoU 0 and in
    # the mean; class 1 loses a TP: 2 / (4 + 3 - 2) = 2/5. Accuracy of class 3 stays nan (no GT).
    wrong = PRED.clone()
    wrong[0, 2] = 3
    metrics = semantic_evaluate(wrong, TARGET, num_classes=4)
    assert metrics["per_class_iou"]["3"] == 0.0
    assert metrics["per_class_iou"]["1"] == pytest.approx(2 / 5)
    assert metrics["mIoU"] == pytest.approx((2 / 4 + 2 / 5 + 2 / 4 + 0) / 4)
    assert math.isnan(metrics["per_class_accuracy"]["3"])
    # Nothing scored at all: every metric undefined, no crash, no warning.
    nothing = semantic_evaluate(PRED, torch.full_like(TARGET, 255), 3)
    assert all(math.isnan(nothing[k]) for k in ("mIoU", "pixel_accuracy", "mean_accuracy"))


def _random_maps(seed: int, shape: tuple[int, ...], num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random predictions and targets (about 10% ignored); predictions right about half the time."""
    generator = torch.Generator().manual_seed(seed)
    target = torch.randint(0, num_classes, shape, generator=generator)
    noise = torch.randint(0, num_classes, shape, generator=generator)
    pred = torch.where(torch.rand(shape, generator=generator) < 0.5, target, noise)
    target[torch.rand(shape, generator=generator) < 0.1] = 255
    return pred, target


def test_batch_and_per_image_accumulation_agree():
    pred, target = _random_maps(0, (4, 17, 23), num_classes=5)
    whole = ConfusionMatrix(5)
    whole.update(pred, target)
    one_by_one = ConfusionMatrix(5)
    for p, t in zip(pred, target):
        one_by_one.update(p, t)
    assert torch.equal(whole.matrix, one_by_one.matrix)
    # semantic_evaluate: one [B,H,W] tensor, a list of [H,W] tensors, numpy arrays, mixed sizes.
    batch = semantic_evaluate(pred, target, 5)
    assert semantic_evaluate(list(pred), list(target), 5) == batch
    as_numpy = [p.numpy().astype(np.uint8) for p in pred], [t.numpy() for t in target]
    assert semantic_evaluate(*as_numpy, 5) == batch
    other_size = _random_maps(1, (9, 31), num_classes=5)
    mixed = semantic_evaluate([pred, other_size[0]], [target, other_size[1]], 5)["confusion_matrix"]
    alone = semantic_evaluate(other_size[0], other_size[1], 5)["confusion_matrix"]
    np.testing.assert_array_equal(np.array(mixed), np.array(batch["confusion_matrix"]) + np.array(alone))


def test_matrices_add_up_like_all_reduce_and_reset():
    pred, target = _random_maps(2, (6, 10, 10), num_classes=4)
    shards = [ConfusionMatrix(4), ConfusionMatrix(4)]
    shards[0].update(pred[:2], target[:2])
    shards[1].update(pred[2:], target[2:])
    whole = ConfusionMatrix(4)
    whole.update(pred, target)
    shards[0].matrix += shards[1].matrix  # what all_reduce(SUM) does across processes
    assert torch.equal(shards[0].matrix, whole.matrix)
    whole.reset()
    assert whole.matrix.sum() == 0 and math.isnan(whole.compute()["mIoU"])


def _numpy_reference(pred: np.ndarray, target: np.ndarray, num_classes: int, ignore: int = 255) -> dict:
    """Per-class TP/FP/FN with boolean masks, one class at a time (no confusion matrix)."""
    scored = target != ignore
    iou, accuracy = [], []
    for c in range(num_classes):
        tp = np.sum((pred == c) & (target == c) & scored)
        fp = np.sum((pred == c) & (target != c) & scored)
        fn = np.sum((pred != c) & (target == c) & scored)
        iou.append(tp / (tp + fp + fn) if tp + fp + fn else np.nan)
        accuracy.append(tp / (tp + fn) if tp + fn else np.nan)
    return {
        "iou": iou,
        "mIoU": np.nanmean(iou),
        "mean_accuracy": np.nanmean(accuracy),
        "pixel_accuracy": np.sum((pred == target) & scored) / np.sum(scored),
    }


@pytest.mark.parametrize("seed", [3, 4, 5])
def test_matches_independent_numpy_computation(seed):
    num_classes = 7
    pred, target = _random_maps(seed, (3, 40, 50), num_classes=num_classes - 1)  # class 6 never appears
    pred[0, :5, :5] = 5 - pred[0, :5, :5]  # some more confusion
    metrics = semantic_evaluate(pred, target, num_classes)
    reference = _numpy_reference(pred.numpy(), target.numpy(), num_classes)
    np.testing.assert_allclose(list(metrics["per_class_iou"].values()), reference["iou"])
    for key in ("mIoU", "mean_accuracy", "pixel_accuracy"):
        assert metrics[key] == pytest.approx(reference[key]), key


def test_bad_inputs_raise_clearly():
    cm = ConfusionMatrix(3)
    with pytest.raises(ValueError, match="pred holds class 3, outside 0..2"):
        cm.update(torch.tensor([0, 3]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="pred holds class -1"):
        cm.update(torch.tensor([0, -1]), torch.tensor([0, 255]))  # even on an ignored pixel
    with pytest.raises(ValueError, match="target holds class 7"):
        cm.update(torch.tensor([0, 1]), torch.tensor([0, 7]))
    with pytest.raises(ValueError, match="shape"):
        cm.update(torch.zeros(2, 3, dtype=torch.int64), torch.zeros(3, 2, dtype=torch.int64))
    with pytest.raises(TypeError, match="argmax"):
        cm.update(torch.zeros(1, 3, 2, 2), torch.zeros(1, 2, 2, dtype=torch.int64))
    assert cm.matrix.sum() == 0  # failed updates counted nothing
    with pytest.raises(ValueError, match="targets ran out at item 1"):
        semantic_evaluate([PRED, PRED], [TARGET], 3)
    with pytest.raises(ValueError, match="2 class_names for 3 classes"):
        semantic_evaluate(PRED, TARGET, 3, class_names=["a", "b"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_counts_on_the_gpu_match_the_cpu():
    pred, target = _random_maps(6, (2, 30, 30), num_classes=4)
    gpu = ConfusionMatrix(4, device="cuda")
    gpu.update(pred.cuda(), target.cuda())
    gpu.update(pred, target)  # CPU inputs are moved to the matrix's device
    assert gpu.matrix.device.type == "cuda"
    cpu = ConfusionMatrix(4)
    cpu.update(pred, target)
    assert torch.equal(gpu.matrix.cpu(), 2 * cpu.matrix)
    # Doubling every count leaves every ratio unchanged.
    assert gpu.compute()["per_class_iou"] == pytest.approx(cpu.compute()["per_class_iou"])
    assert gpu.compute()["mIoU"] == pytest.approx(cpu.compute()["mIoU"])


# --------------------------------------------------------------------------- memory on large photos

_UPDATE_PEAK_SCRIPT = """
import torch
from minis.eval import ConfusionMatrix

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024

pred = torch.randint(0, 6, (2000, 2500))
target = torch.randint(0, 6, (2000, 2500))
target[:100] = 255
confusion = ConfusionMatrix(6)
confusion.update(pred[:2], target[:2])  # warm up: lazy initialisation is not the update's memory
before = status("VmRSS")
open("/proc/self/clear_refs", "w").write("5")  # restart the high-water mark from here
confusion.update(pred, target)
print((status("VmHWM") - before) / pred.numel())
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux's /proc to read peak memory")
def test_update_makes_no_full_size_copies_of_its_inputs():
    """Counting a 5-megapixel int64 pair allocates one int64 array of bins and a few boolean masks:
    about 13 bytes per pixel. Masked copies of both maps and their products (the obvious way, and
    this function before) cost about 34; a float or one-hot [C,H,W] intermediate would cost 24 or more."""
    result = subprocess.run([sys.executable, "-c", _UPDATE_PEAK_SCRIPT], capture_output=True, text=True, check=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    bytes_per_pixel = float(result.stdout.split()[-1])
    assert bytes_per_pixel < 16, bytes_per_pixel


def test_evaluator_feeds_one_image_to_the_model_without_copying_it():
    """A single image (a large photo) reaches the model as a view of the dataset's tensor."""
    from minis.engine.evaluation import evaluate

    image = torch.rand(3, 20, 30)
    target = torch.randint(0, 3, (20, 30))

    class Recorder(torch.nn.Module):
        task = "semantic"
        build_args = {"num_classes": 3}

        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(3))
            self.seen = []

        def forward(self, images):
            self.seen.append(images.data_ptr())
            return torch.zeros(images.shape[0], 3, *images.shape[-2:])  # predicts class 0 everywhere

    model = Recorder()
    metrics = evaluate(model, [(image, {"semantic": target, "image_id": 0})], progress=False)
    assert model.seen == [image.data_ptr()]
    assert metrics["confusion_matrix"][0] == [int((target == 0).sum()), 0, 0]
