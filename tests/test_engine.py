"""The engine's pieces against references: schedules vs torch's schedulers, sharding, collation,
checkpoints, and the Trainer's behaviour (learning, logs, non-finite losses, clipping, evaluation
of semantic and instance models against independent computations)."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision import tv_tensors

import minis.models
from minis.data.collate import collate_instances, collate_semantic
from minis.engine import (
    NonFiniteLossError,
    TrainConfig,
    Trainer,
    evaluate,
    load_checkpoint,
    lr_factor,
    predict,
    resolve_device,
    save_checkpoint,
)
from minis.engine import distributed
from minis.engine.checkpoint import capture_rng_state, restore_rng_state
from minis.engine.schedules import build_optimizer, build_scheduler, parameter_groups
from test_realdata_models import low_thresholds

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


# --------------------------------------------------------------------------------------------
# Small in-memory data and models
# --------------------------------------------------------------------------------------------


class Squares(torch.utils.data.Dataset):
    """Semantic items: a bright square (class 1) and a dark one (class 2) on grey, 16x16."""

    class_names = ["background", "bright", "dark"]
    num_classes = 3

    def __init__(self, size: int, offset: int = 0) -> None:
        self.size, self.offset = size, offset
        self.ids = [offset + i + 1 for i in range(size)]

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int):
        generator = torch.Generator().manual_seed(self.offset + index)
        image = 0.5 * torch.ones(3, 16, 16)
        label = torch.zeros(16, 16, dtype=torch.int64)
        for cls, value in ((1, 1.0), (2, 0.0)):
            y, x = torch.randint(0, 11, (2,), generator=generator).tolist()
            image[:, y : y + 5, x : x + 5] = value
            label[y : y + 5, x : x + 5] = cls
        return tv_tensors.Image(image), {"semantic": tv_tensors.Mask(label), "image_id": self.ids[index]}


def baseline(num_classes: int = 3) -> nn.Module:
    torch.manual_seed(0)
    return minis.models.build("baseline_fcn", num_classes=num_classes, width=8)


def config(**overrides) -> TrainConfig:
    options = {"epochs": 2, "batch_size": 4, "lr": 0.05, "progress": False, "log_every": 2}
    return TrainConfig(**{**options, **overrides})


class LossAtCall(nn.Module):
    """Wraps a semantic model; its ``loss_aux`` term becomes nan at the ``nan_at``-th training call."""

    task = "semantic"

    def __init__(self, inner: nn.Module, nan_at: int, on_call=None) -> None:
        super().__init__()
        self.inner, self.nan_at, self.on_call = inner, nan_at, on_call
        self.calls = 0

    def forward(self, images, targets=None):
        if not (self.training and targets is not None):
            return self.inner(images)
        self.calls += 1
        if self.on_call is not None:
            self.on_call(self.calls)
        losses = dict(self.inner(images, targets))
        losses["loss_aux"] = 0.0 * losses["loss_ce"] + (math.nan if self.calls == self.nan_at else 0.0)
        return losses


# --------------------------------------------------------------------------------------------
# Schedules and optimizer
# --------------------------------------------------------------------------------------------


def _lrs(scheduler, optimizer, steps: int) -> list[float]:
    lrs = []
    for _ in range(steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


def _our_lrs(steps: int, iters_per_epoch: int = 1, **overrides) -> list[float]:
    model = nn.Linear(2, 2)
    cfg = TrainConfig(epochs=steps // iters_per_epoch, lr=0.1, **overrides)
    optimizer = build_optimizer(model, cfg)
    return _lrs(build_scheduler(optimizer, cfg, iters_per_epoch), optimizer, steps)


def _torch_lrs(make_scheduler, steps: int) -> list[float]:
    optimizer = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1)
    return _lrs(make_scheduler(optimizer), optimizer, steps)


@pytest.mark.parametrize(
    "ours, reference",
    [
        ({"schedule": "poly", "poly_power": 0.9},
         lambda o: torch.optim.lr_scheduler.PolynomialLR(o, total_iters=20, power=0.9)),
        ({"schedule": "cosine"}, lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=20)),
        ({"schedule": "step", "milestones": (2, 3), "gamma": 0.5},  # epochs of 4 iterations
         lambda o: torch.optim.lr_scheduler.MultiStepLR(o, milestones=[8, 12], gamma=0.5)),
        ({"schedule": "constant", "warmup_iters": 6, "warmup_factor": 0.01},
         lambda o: torch.optim.lr_scheduler.LinearLR(o, start_factor=0.01, total_iters=6)),
    ],
)
def test_schedules_match_torch_schedulers(ours, reference):
    iters_per_epoch = 4 if ours["schedule"] == "step" else 1
    np.testing.assert_allclose(_our_lrs(20, iters_per_epoch, **ours), _torch_lrs(reference, 20), rtol=1e-6, atol=1e-12)


def test_warmup_multiplies_the_schedule():
    total, warmup = 100, 10
    assert lr_factor(0, total_iters=total, schedule="poly", warmup_iters=warmup, warmup_factor=0.1) == pytest.approx(0.1)
    halfway = lr_factor(5, total_iters=total, schedule="poly", warmup_iters=warmup, warmup_factor=0.1, poly_power=1.0)
    assert halfway == pytest.approx((0.1 * 0.5 + 0.5) * (1 - 5 / 100))
    after = lr_factor(10, total_iters=total, schedule="cosine", warmup_iters=warmup)
    assert after == pytest.approx(0.5 * (1 + math.cos(math.pi * 10 / 100)))


def test_no_weight_decay_on_norms_and_biases():
    model = baseline()
    decay, no_decay = parameter_groups(model, weight_decay=0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(p.ndim == 4 for p in decay["params"])
    assert {names[id(p)] for p in no_decay["params"]} == {n for n, p in model.named_parameters() if p.ndim == 1}
    assert any(".bias" in names[id(p)] for p in no_decay["params"])
    # AdamW with zero gradients only applies the decoupled decay: conv weights shrink, BN stays.
    optimizer = build_optimizer(model, TrainConfig(optimizer="adamw", lr=0.5, weight_decay=0.1))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    for name, p in model.named_parameters():
        if p.ndim == 4:
            torch.testing.assert_close(p, before[name] * (1 - 0.5 * 0.1))
        else:
            torch.testing.assert_close(p, before[name], rtol=0, atol=0)


def test_config_rejects_unknown_choices():
    with pytest.raises(ValueError, match="optimizer"):
        TrainConfig(optimizer="adam")
    with pytest.raises(ValueError, match="schedule"):
        TrainConfig(schedule="linear")
    with pytest.raises(ValueError, match="epochs"):
        TrainConfig(epochs=0)


def test_config_refuses_a_step_schedule_it_would_not_follow():
    """Without milestones a step schedule would train at a constant rate, silently."""
    with pytest.raises(ValueError, match="schedule='step' needs milestones"):
        TrainConfig(schedule="step")
    with pytest.raises(ValueError, match="only apply to schedule='step'"):
        TrainConfig(schedule="cosine", milestones=(8, 11))
    with pytest.raises(ValueError, match="increasing"):
        TrainConfig(schedule="step", milestones=(11, 8))
    with pytest.raises(ValueError, match="increasing"):
        TrainConfig(schedule="step", milestones=(0, 8))
    assert TrainConfig(schedule="step", milestones=[8, 11]).milestones == (8, 11)


# --------------------------------------------------------------------------------------------
# Sampling and sharding
# --------------------------------------------------------------------------------------------


def test_epoch_batches_are_a_seeded_permutation():
    a = distributed.epoch_batches(10, 3, seed=1, epoch=0)
    assert a == distributed.epoch_batches(10, 3, seed=1, epoch=0)
    assert a != distributed.epoch_batches(10, 3, seed=1, epoch=1)
    assert a != distributed.epoch_batches(10, 3, seed=2, epoch=0)
    assert [len(b) for b in a] == [3, 3, 3, 1]
    assert sorted(i for b in a for i in b) == list(range(10))
    assert distributed.derive_seed(0, 1) != distributed.derive_seed(1, 0)


@pytest.mark.parametrize("num_samples, world_size", [(12, 2), (10, 3), (7, 4)])
def test_ranks_deal_out_one_permutation(num_samples, world_size):
    single = [i for b in distributed.epoch_batches(num_samples, 100, seed=3, epoch=2) for i in b]
    per_rank = [
        [i for b in distributed.epoch_batches(num_samples, 2, seed=3, epoch=2, rank=r, world_size=world_size) for i in b]
        for r in range(world_size)
    ]
    per_rank_count = math.ceil(num_samples / world_size)
    assert all(len(indices) == per_rank_count for indices in per_rank)  # DDP: equal step counts
    assert all(
        len(distributed.epoch_batches(num_samples, 2, seed=3, epoch=2, rank=r, world_size=world_size))
        == distributed.num_batches(num_samples, 2, world_size)
        for r in range(world_size)
    )
    dealt = [per_rank[r][k] for k in range(per_rank_count) for r in range(world_size)]
    padded = (single * 2)[: per_rank_count * world_size]  # wrapped around to a multiple
    assert dealt == padded


@pytest.mark.parametrize("num_samples, world_size", [(7, 2), (7, 3), (2, 4)])
def test_evaluation_shards_cover_each_index_once(num_samples, world_size):
    shards = [distributed.shard_indices(num_samples, r, world_size) for r in range(world_size)]
    assert sorted(i for shard in shards for i in shard) == list(range(num_samples))


# --------------------------------------------------------------------------------------------
# Collate functions
# --------------------------------------------------------------------------------------------


def test_collate_semantic_stacks_plain_tensors():
    batch = [Squares(3)[i] for i in range(3)]
    images, targets, ids = collate_semantic(batch)
    assert type(images) is torch.Tensor and type(targets) is torch.Tensor
    assert images.shape == (3, 3, 16, 16) and images.dtype == torch.float32
    assert targets.shape == (3, 16, 16) and targets.dtype == torch.int64
    assert ids == [1, 2, 3]
    torch.testing.assert_close(targets[1], batch[1][1]["semantic"].as_subclass(torch.Tensor))


def test_collate_semantic_names_the_images_of_different_sizes():
    small = (torch.zeros(3, 8, 8), {"semantic": torch.zeros(8, 8, dtype=torch.int64), "image_id": 42})
    with pytest.raises(ValueError, match=r"semantic_train_transforms\(crop_size\).*image id 1.*image id 42"):
        collate_semantic([Squares(1)[0], small])


def test_collate_instances_keeps_lists_and_keys():
    image = tv_tensors.Image(torch.rand(3, 10, 12))
    target = {
        "boxes": tv_tensors.BoundingBoxes(torch.tensor([[1.0, 2.0, 5.0, 6.0]]), format="XYXY", canvas_size=(10, 12)),
        "labels": torch.tensor([1]),
        "masks": tv_tensors.Mask(torch.ones(1, 10, 12, dtype=torch.uint8)),
        "iscrowd": torch.tensor([0]),
        "area": torch.tensor([16.0]),
        "image_id": 7,
    }
    other = (torch.rand(3, 20, 8), {**target, "image_id": 8})
    images, targets = collate_instances([(image, target), other])
    assert [tuple(i.shape) for i in images] == [(3, 10, 12), (3, 20, 8)]
    assert type(images[0]) is torch.Tensor
    assert set(targets[0]) == set(target) and targets[1]["image_id"] == 8
    assert type(targets[0]["boxes"]) is torch.Tensor and type(targets[0]["masks"]) is torch.Tensor
    torch.testing.assert_close(targets[0]["boxes"], torch.tensor([[1.0, 2.0, 5.0, 6.0]]))


# --------------------------------------------------------------------------------------------
# Checkpoints and random state
# --------------------------------------------------------------------------------------------


def test_failed_save_keeps_the_previous_checkpoint(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint({"weights": torch.arange(4), "epoch": 3}, path)
    with pytest.raises(Exception):
        save_checkpoint({"weights": torch.zeros(4), "unpicklable": lambda: None}, path)
    loaded = load_checkpoint(path)
    assert loaded["epoch"] == 3 and torch.equal(loaded["weights"], torch.arange(4))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temporary file left behind
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_checkpoint(tmp_path / "missing.pt")
    mapped = load_checkpoint(path, mmap=True)  # the same values, read from the file when used
    assert mapped["epoch"] == 3 and torch.equal(mapped["weights"], torch.arange(4))


def test_rng_state_round_trip_through_a_safe_checkpoint(tmp_path):
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    np.random.normal()  # leaves a cached gaussian in numpy's state
    save_checkpoint({"rng": capture_rng_state()}, tmp_path / "rng.pt")
    expected = (random.random(), np.random.normal(), np.random.rand(), torch.rand(3))
    random.seed(2), np.random.seed(2), torch.manual_seed(2)
    restore_rng_state(load_checkpoint(tmp_path / "rng.pt")["rng"])
    got = (random.random(), np.random.normal(), np.random.rand(), torch.rand(3))
    assert got[:3] == expected[:3] and torch.equal(got[3], expected[3])


# --------------------------------------------------------------------------------------------
# The Trainer
# --------------------------------------------------------------------------------------------


def test_device_selection():
    if not torch.cuda.is_available():
        assert resolve_device("auto") == torch.device("cpu")
        with pytest.raises(RuntimeError, match="CUDA is not available"):
            resolve_device("cuda")
    assert resolve_device("cpu") == torch.device("cpu")


def test_trainer_learns_logs_and_checkpoints(tmp_path):
    model = baseline()
    trainer = Trainer(model, Squares(16), Squares(6, offset=100), config(epochs=4, lr=0.1), out_dir=tmp_path)
    assert not trainer.use_amp  # mixed precision is for CUDA only
    history = trainer.fit()

    assert [r["epoch"] for r in history] == [0, 1, 2, 3]
    assert history[-1]["loss"] < 0.7 * history[0]["loss"]
    assert history[-1]["iteration"] == 16 and history[-1]["val"]["num_images"] == 6
    assert 0 <= history[-1]["val"]["mIoU"] <= 1

    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    val = [r for r in records if r["kind"] == "val"]
    assert [r["iteration"] for r in train] == [2, 4, 6, 8, 10, 12, 14, 16]  # log_every=2
    assert {"epoch", "iteration", "loss", "loss_ce", "lr"} <= set(train[0])
    assert [r["epoch"] for r in val] == [0, 1, 2, 3] and val[-1]["mIoU"] == history[-1]["val"]["mIoU"]
    assert (tmp_path / "curves.png").stat().st_size > 0

    checkpoint = torch.load(tmp_path / "last.pt", weights_only=True)  # the safe loader accepts it
    assert checkpoint["epoch"] == 4 and checkpoint["batch_in_epoch"] == 0 and checkpoint["iteration"] == 16
    assert checkpoint["build_args"] == {"name": "baseline_fcn", "num_classes": 3, "width": 8}
    assert checkpoint["class_names"] == Squares.class_names and checkpoint["task"] == "semantic"
    assert checkpoint["config"]["lr"] == 0.1
    for name, value in model.state_dict().items():
        assert torch.equal(checkpoint["model"][name], value)


def test_channels_last_trains_the_same_model_in_another_layout(tmp_path):
    reference = baseline()
    Trainer(reference, Squares(16), None, config(epochs=2)).fit()
    model = baseline()
    trainer = Trainer(model, Squares(16), None, config(epochs=2, channels_last=True), out_dir=tmp_path)
    convolution = next(m for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size != (1, 1))
    assert convolution.weight.is_contiguous(memory_format=torch.channels_last)
    trainer.fit()
    for name, value in reference.state_dict().items():  # same arithmetic, summed in another order
        torch.testing.assert_close(model.state_dict()[name], value, rtol=1e-3, atol=1e-4)
    checkpoint = torch.load(tmp_path / "last.pt", weights_only=True)
    assert checkpoint["config"]["channels_last"] is True
    resumed = baseline()  # a checkpoint written in NHWC loads into a fresh NCHW model
    resumed.load_state_dict(checkpoint["model"])
    images = torch.rand(2, 3, 16, 16)
    torch.testing.assert_close(resumed.eval()(images), model.eval()(images), rtol=1e-4, atol=1e-5)


def test_semantic_evaluation_matches_an_independent_confusion_matrix():
    model = baseline()
    Trainer(model, Squares(16), None, config(epochs=2)).fit()
    val_set = Squares(5, offset=50)
    metrics = evaluate(model, val_set, batch_size=2, progress=False)

    matrix = np.zeros((3, 3), dtype=np.int64)
    model.eval()
    with torch.no_grad():
        for image, target in (val_set[i] for i in range(len(val_set))):
            predicted = model(image[None]).argmax(1)[0].numpy().ravel()
            truth = target["semantic"].numpy().ravel()
            np.add.at(matrix, (truth, predicted), 1)
    iou = np.diag(matrix) / (matrix.sum(0) + matrix.sum(1) - np.diag(matrix))
    assert metrics["mIoU"] == pytest.approx(np.nanmean(iou))
    assert metrics["pixel_accuracy"] == pytest.approx(np.diag(matrix).sum() / matrix.sum())
    assert metrics["image_ids"] == val_set.ids and metrics["num_images"] == 5
    assert model.training is False  # evaluate restores the mode it found


def test_predict_accepts_one_image_a_batch_or_a_list():
    model = baseline()
    trainer = Trainer(model, None, None, config())
    model.train()
    assert trainer.predict(torch.rand(3, 16, 16)).shape == (3, 16, 16)
    assert trainer.predict(torch.rand(2, 3, 16, 16)).shape == (2, 3, 16, 16)
    assert [o.shape for o in trainer.predict([torch.rand(3, 16, 16), torch.rand(3, 8, 24)])] == [(3, 16, 16), (3, 8, 24)]
    assert model.training  # predict restores the mode
    model.eval()
    torch.testing.assert_close(predict(model, torch.ones(1, 3, 16, 16)), model(torch.ones(1, 3, 16, 16)))


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    checkpoint = tmp_path / "last.pt"
    saved = {}

    def remember_checkpoint(call: int) -> None:
        if call == 5:  # first step of epoch 1: epoch 0's checkpoint is on disk
            saved["bytes"] = checkpoint.read_bytes()

    model = LossAtCall(baseline(), nan_at=6, on_call=remember_checkpoint)  # 4 steps per epoch
    trainer = Trainer(model, Squares(16), None, config(epochs=3), out_dir=tmp_path)
    with pytest.raises(NonFiniteLossError) as error:
        trainer.fit()
    message = str(error.value)
    assert "loss_aux=nan" in message and "loss_ce" not in message
    assert "iteration 5" in message and "epoch 1" in message and "batch 1 of 4" in message
    assert str(checkpoint) in message
    assert checkpoint.read_bytes() == saved["bytes"]
    assert [p.name for p in tmp_path.iterdir() if p.suffix == ".tmp"] == []


def test_non_finite_loss_before_any_checkpoint(tmp_path):
    trainer = Trainer(LossAtCall(baseline(), nan_at=1), Squares(8), None, config(), out_dir=tmp_path)
    with pytest.raises(NonFiniteLossError, match="no checkpoint had been written yet"):
        trainer.fit()
    assert not (tmp_path / "last.pt").exists()


def _parameter_change(clip: float | None) -> float:
    model = baseline()
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    cfg = config(epochs=1, batch_size=16, lr=1.0, momentum=0.0, weight_decay=0.0, schedule="constant", clip_grad_norm=clip)
    Trainer(model, Squares(16), None, cfg).fit()  # one step
    after = torch.cat([p.detach().flatten() for p in model.parameters()])
    return float((after - before).norm())


def test_gradient_clipping_bounds_the_update():
    # Plain SGD with lr 1: the update is the (clipped) gradient itself.
    assert _parameter_change(None) > 1e-2
    assert 0 < _parameter_change(1e-3) <= 1e-3 * (1 + 1e-4)


def test_training_mode_must_return_a_loss_dict():
    class Logits(nn.Module):
        task = "semantic"

        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)

        def forward(self, images, targets=None):
            return self.conv(images)

    with pytest.raises(TypeError, match="dict of losses"):
        Trainer(Logits(), Squares(4), None, config(epochs=1)).fit()
    with pytest.raises(ValueError, match="task"):
        Trainer(nn.Conv2d(3, 3, 1), Squares(4))


# --------------------------------------------------------------------------------------------
# Instance models: collation, training and COCO evaluation through the same Trainer
# --------------------------------------------------------------------------------------------


class Oracle(nn.Module):
    """A stand-in instance model that trains through the Trainer and "knows" the validation set.

    Training pulls one parameter towards the mean ground-truth box size (a real loss with a real
    gradient). In eval mode it recognises each validation image and returns its ground truth as
    detections - for every other image only, so that AP lands strictly between 0 and 1. What is
    tested is the engine's plumbing: batching, image ids, gathering, the call to pycocotools.
    """

    task = "instance"

    def __init__(self, val_set) -> None:
        super().__init__()
        self.half_size = nn.Parameter(torch.tensor(1.0))
        self.build_args = {"name": "oracle", "num_classes": val_set.num_classes}
        self.answers = {}
        for index in range(len(val_set)):
            image, target = val_set[index]
            keep = (target["iscrowd"] == 0) & torch.tensor(index % 2 == 0)
            self.answers[self._key(image)] = {
                "boxes": target["boxes"][keep].as_subclass(torch.Tensor),
                "labels": target["labels"][keep],
                "scores": torch.ones(int(keep.sum())),
                "masks": target["masks"][keep][:, None].float().as_subclass(torch.Tensor),
            }

    @staticmethod
    def _key(image: torch.Tensor) -> tuple:
        return tuple(image.shape), round(float(image.sum()), 2)

    def forward(self, images, targets=None):
        if self.training and targets is not None:
            sizes = torch.cat([(t["boxes"][:, 2:] - t["boxes"][:, :2]).flatten() / 2 for t in targets])
            goal = sizes.mean() if len(sizes) else self.half_size.detach()
            return {"loss_size": (self.half_size - goal) ** 2}
        return [self.answers[self._key(image.cpu())] for image in images]


@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory):
    from minis.data.shapes import make_shapes

    root = tmp_path_factory.mktemp("shapes")
    make_shapes(root, num_train=8, num_val=5, image_size=48, seed=3, progress=False)
    return root


def test_instance_model_trains_and_is_evaluated_by_coco_evaluate(tmp_path, shapes_root):
    from minis.data.catalog import build_datasets
    from minis.eval.coco import coco_evaluate

    train_set, val_set = build_datasets("shapes", shapes_root, "instance", progress=False)
    model = Oracle(val_set)
    trainer = Trainer(model, train_set, val_set, config(epochs=2, lr=0.2, batch_size=3), out_dir=tmp_path)
    history = trainer.fit()
    assert history[-1]["loss"] < history[0]["loss"]
    assert "bbox_AP" in history[-1]["val"] and "segm_AP" in history[-1]["val"]

    metrics = trainer.evaluate()
    model.eval()
    with torch.no_grad():
        reference = coco_evaluate(val_set, {val_set[i][1]["image_id"]: model([val_set[i][0]])[0] for i in range(len(val_set))})
    for iou_type in ("bbox", "segm"):
        np.testing.assert_equal(metrics[iou_type], reference[iou_type])
        assert 0.2 < metrics[iou_type]["AP"] < 1  # half the images predicted perfectly, half missed
    assert metrics["image_ids"] == sorted(val_set.ids)
    assert load_checkpoint(tmp_path / "last.pt")["data"] == {"kind": "shapes", "root": str(shapes_root), "task": "instance"}


def test_catalog_builds_shapes_datasets(shapes_root):
    from minis.data.catalog import build_dataset, build_datasets, class_names

    train_set, val_set = build_datasets("shapes", shapes_root, "semantic", progress=False)
    assert len(train_set) == 8 and len(val_set) == 5
    assert train_set.class_names == class_names("shapes", shapes_root) == val_set.class_names
    image, target = train_set[0]
    assert image.shape == (3, 48, 48) and target["semantic"].shape == (48, 48)  # default crop: the image size
    assert val_set.data_description == {"kind": "shapes", "root": str(shapes_root), "task": "semantic"}
    instances = build_dataset("shapes", shapes_root, "instance", "val", progress=False)
    assert instances.ids == val_set.ids  # label PNG stems are the COCO image ids


def test_catalog_explains_how_to_get_missing_coco(tmp_path):
    from minis.data.catalog import build_datasets

    with pytest.raises(FileNotFoundError, match=r"python -m minis data coco .* --splits val2017"):
        build_datasets("coco", tmp_path / "coco", "instance")
    with pytest.raises(ValueError, match="kind"):
        build_datasets("voc", tmp_path, "instance")


@pytest.mark.realdata
def test_catalog_reads_real_coco_validation(tmp_path):
    root = SHARED_DATA / "coco-tiny"
    if not root.is_dir():
        pytest.skip("../shared/data is not available")
    from minis.data.catalog import build_dataset, class_names

    val_set = build_dataset("coco", root, "instance", "val")
    assert len(val_set) == 50 and val_set.class_names == class_names("coco", root)
    semantic = build_dataset("coco", root, "semantic", "val")
    images, targets = collate_instances([val_set[0], val_set[1]])  # COCO images differ in size
    assert len(images) == 2 and targets[0]["masks"].shape[-2:] == images[0].shape[-2:]
    assert semantic[0][1]["semantic"].shape == images[0].shape[-2:]


# --------------------------------------------------------------------------------------------
# Compact masks: the engine asks instance models for RLEs (large photos fit in memory)
# --------------------------------------------------------------------------------------------


class PastingOracle(nn.Module):
    """Detections made from each validation image's ground truth, finished by the shared postprocess.

    Each object becomes a detection whose box is shifted by a pixel and whose mask is the object
    inside that box shrunk to 28x28, as a Mask R-CNN head predicts it; ``DetectionTransform.postprocess``
    pastes it back, so the model honours ``rle_masks`` as every instance model does. Pasted 28x28
    masks are not the objects' exact shapes, and a shifted copy of each object scores lower: AP
    lands strictly between 0 and 1, where a difference between the two mask formats would show.
    """

    task = "instance"

    def __init__(self, val_set) -> None:
        from minis.models.rcnn import project_masks_on_boxes
        from minis.nn.detection import DetectionTransform

        super().__init__()
        self.transform = DetectionTransform()
        self.answers = {}
        for index in range(len(val_set)):
            image, target = val_set[index]
            keep = target["iscrowd"] == 0
            boxes = target["boxes"][keep].as_subclass(torch.Tensor) + 1.0
            masks = target["masks"][keep].as_subclass(torch.Tensor)
            shifted = boxes + torch.tensor([4.0, 3.0, 4.0, 3.0])  # a worse duplicate of each object
            all_boxes = torch.cat([boxes, shifted])
            objects = torch.arange(len(boxes)).repeat(2)
            self.answers[Oracle._key(image)] = {
                "boxes": all_boxes,
                "labels": target["labels"][keep].repeat(2),
                "scores": torch.cat([torch.linspace(0.9, 0.6, len(boxes)), torch.linspace(0.7, 0.5, len(boxes))]),
                "masks": project_masks_on_boxes(masks, all_boxes, objects, 28)[:, None],  # [2N,1,28,28]
            }

    def forward(self, images, targets=None):
        detections = [{key: value.clone() for key, value in self.answers[Oracle._key(image.cpu())].items()}
                      for image in images]
        sizes = [tuple(image.shape[-2:]) for image in images]
        return self.transform.postprocess(detections, sizes, sizes)


def test_evaluation_with_rle_masks_gives_the_metrics_of_probability_masks(shapes_root, monkeypatch):
    from minis.data.catalog import build_datasets
    from minis.eval.coco import coco_evaluate, predictions_to_coco_results
    from minis.ops import masks as mask_ops

    monkeypatch.setattr(mask_ops, "CHUNK_BYTES", 48 * 48 * 4 * 2)  # two detections per chunk: several chunks
    _, val_set = build_datasets("shapes", shapes_root, "instance", progress=False)
    model = PastingOracle(val_set)
    metrics = evaluate(model, val_set, batch_size=2, progress=False)  # asks for RLE masks
    floats, rles = {}, {}
    for index in range(len(val_set)):
        image, target = val_set[index]
        floats[target["image_id"]] = predict(model, image)
        rles[target["image_id"]] = predict(model, image, rle=True)
    assert sum(len(output["masks"]) for output in rles.values()) > 4
    for float_output, rle_output in zip(floats.values(), rles.values()):
        assert float_output["masks"].dtype == torch.float32 and float_output["masks"].shape[1] == 1
        assert isinstance(rle_output["masks"], list)
    # the same COCO results, RLE strings included, and the same metrics as probabilities thresholded at 0.5
    assert predictions_to_coco_results(val_set, rles) == predictions_to_coco_results(val_set, floats)
    reference = coco_evaluate(val_set, floats)
    for iou_type in ("bbox", "segm"):
        np.testing.assert_equal(metrics[iou_type], reference[iou_type])
        assert 0.2 < metrics[iou_type]["AP"] < 1


INSTANCE_MODELS = [name for name in minis.models.list_models()
                   if minis.models.build(name, num_classes=3, **minis.models.shapes_settings(name)).task == "instance"]


@pytest.mark.parametrize("name", INSTANCE_MODELS)
def test_every_instance_model_gives_the_same_masks_as_rles(name, monkeypatch):
    """``predict(rle=True)`` encodes, chunk by chunk, exactly the probabilities > 0.5 of the ordinary output."""
    from pycocotools import mask as mask_utils

    from minis.ops import masks as mask_ops

    torch.manual_seed(0)
    model = minis.models.build(name, num_classes=3, **minis.models.shapes_settings(name))
    low_thresholds(model)  # untrained: let the candidates through
    if name == "decoupled_solo":  # its untrained masks are products of two ~0.5 probabilities: lift them over 0.5
        for conv in (*model.mask_logits_x, *model.mask_logits_y):
            torch.nn.init.constant_(conv.bias, 2.0)
    image = torch.rand(3, 90, 120, generator=torch.Generator().manual_seed(1))
    plain = predict(model, image)
    monkeypatch.setattr(mask_ops, "CHUNK_BYTES", 90 * 120 * 4 * 3)  # three detections per chunk
    compact = predict(model, image, rle=True)
    for field in ("boxes", "labels", "scores"):
        torch.testing.assert_close(compact[field], plain[field], rtol=0, atol=0)
    if "masks" not in plain:  # a box-only detector
        assert "masks" not in compact
        return
    assert len(plain["masks"]) > 3
    binary = (plain["masks"][:, 0] > 0.5).numpy().astype(np.uint8)  # [N,H,W]
    decoded = mask_utils.decode(compact["masks"])  # [H,W,N]
    np.testing.assert_array_equal(decoded.transpose(2, 0, 1), binary)
    assert binary.any(axis=(1, 2)).sum() > 0  # not every mask is empty


def test_curves_draw_each_loss_once_and_the_validation_metrics_beside(tmp_path):
    from minis.engine.trainer import curves_figure

    def write(records):
        (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        figure = curves_figure(tmp_path / "metrics.jsonl")
        return [[line.get_label() for line in ax.lines] for ax in figure.axes]

    semantic = [{"kind": "train", "iteration": i, "epoch": 0, "loss": 1.0 / i, "loss_ce": 1.0 / i, "lr": 0.1}
                for i in (10, 20)] + [{"kind": "val", "epoch": 0, "mIoU": 0.4, "pixel_accuracy": 0.9, "num_images": 4}]
    # one loss term is the loss itself: one line, not two identical ones
    assert write(semantic) == [["train loss"], ["val mIoU", "val pixel_accuracy"]]
    instance = [{"kind": "train", "iteration": 10, "epoch": 0, "loss": 2.0, "loss_mask": 1.0, "loss_box": 1.0}]
    assert write(instance) == [["train loss", "train loss_box", "train loss_mask"]]
    assert write([{"kind": "val", "epoch": 0, "segm_AP": 0.1, "bbox_AP": 0.2}]) == [["val bbox_AP", "val segm_AP"]]


def test_a_run_shorter_than_the_logging_interval_still_logs_and_plots(tmp_path, recwarn):
    """The steps after the last full logging interval are logged at the end of training, so a
    short run gets a training record and its curves (4 steps with log_every=10)."""
    trainer = Trainer(baseline(), Squares(16), None, config(epochs=1, log_every=10), out_dir=tmp_path)
    trainer.fit()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["kind"], r["iteration"]) for r in records] == [("train", 4)]
    assert records[0]["loss"] == pytest.approx(trainer.history[0]["loss"])  # the mean of the same 4 steps
    assert (tmp_path / "curves.png").is_file()
    assert not [w for w in recwarn if "could not plot" in str(w.message)]
