"""Resuming is exact: an interrupted and resumed run ends with the very same weights.

The setup draws random numbers everywhere a real run does - dropout in the model, and data
augmentation from Python's ``random``, numpy and torch - so that restoring only part of the
random state, or replaying a batch, or skipping one, changes the final weights. The last test
checks that this sensitivity is real.
"""

from __future__ import annotations

import os
import random
import signal

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from minis.engine import TrainConfig, Trainer, load_checkpoint, save_checkpoint

NUM_CLASSES = 3
IMAGE_SIZE = 16


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


class NoisySquares(torch.utils.data.Dataset):
    """Images with a bright square (class 1) and a dark one (class 2), randomly augmented."""

    class_names = ["background", "bright", "dark"]

    def __init__(self, size: int, interrupt_at_fetch: int | None = None) -> None:
        self.size = size
        self.ids = list(range(1, size + 1))
        self.interrupt_at_fetch = interrupt_at_fetch  # simulate Ctrl-C while loading data
        self.fetches = 0

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int):
        self.fetches += 1
        if self.fetches == self.interrupt_at_fetch:
            raise KeyboardInterrupt
        generator = torch.Generator().manual_seed(index)
        image = 0.5 * torch.ones(3, IMAGE_SIZE, IMAGE_SIZE)
        label = torch.zeros(IMAGE_SIZE, IMAGE_SIZE, dtype=torch.int64)
        for cls, value in ((1, 1.0), (2, 0.0)):
            y, x = torch.randint(0, IMAGE_SIZE - 5, (2,), generator=generator).tolist()
            image[:, y : y + 5, x : x + 5] = value
            label[y : y + 5, x : x + 5] = cls
        # Augmentation drawing from all three global generators.
        if random.random() < 0.5:
            image, label = image.flip(-1), label.flip(-1)
        image = image + 0.05 * torch.randn_like(image) + float(np.random.uniform(-0.05, 0.05))
        return image.clamp(0, 1), {"semantic": label, "image_id": index + 1}


class DropoutNet(nn.Module):
    """A tiny semantic model with batch norm (buffers) and dropout (randomness in the forward)."""

    task = "semantic"

    def __init__(self, num_classes: int = NUM_CLASSES, interrupt_at_call: int | None = None) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout2d(0.3),
            nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
        )
        self.head = nn.Conv2d(8, num_classes, 1)
        self.aux = nn.Conv2d(8, num_classes, 1)
        self.build_args = {"name": "dropout_net", "num_classes": num_classes}
        self.interrupt_at_call = interrupt_at_call  # simulate Ctrl-C in the forward pass
        self.training_calls = 0

    def forward(self, images, targets=None):
        features = self.body(images)
        logits = self.head(features)
        if self.training and targets is not None:
            self.training_calls += 1
            if self.training_calls == self.interrupt_at_call:
                raise KeyboardInterrupt
            return {
                "loss_ce": F.cross_entropy(logits, targets, ignore_index=255),
                "loss_aux": 0.4 * F.cross_entropy(self.aux(features), targets, ignore_index=255),
            }
        return logits


def make_config(epochs: int = 2, schedule: str = "poly") -> TrainConfig:
    return TrainConfig(
        epochs=epochs, batch_size=4, lr=0.05, schedule=schedule, warmup_iters=2, seed=7,
        clip_grad_norm=5.0, log_every=1, progress=False,
    )


def new_model(**kwargs) -> DropoutNet:
    torch.manual_seed(0)  # the same initial weights in every run
    return DropoutNet(**kwargs)


def final_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [name for name in a if not torch.equal(a[name], b[name])]
    assert not different, f"parameters/buffers differ after resuming: {different}"


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    """Two epochs without interruption: the reference."""
    out = tmp_path_factory.mktemp("straight")
    model = new_model()
    history = Trainer(model, NoisySquares(14), NoisySquares(5), make_config(), out_dir=out).fit()
    return {"state": final_state(model), "history": history, "metrics": (out / "metrics.jsonl").read_text()}


def test_resume_at_epoch_boundary_extends_a_run(tmp_path):
    """1 epoch, then resume with epochs=2, equals 2 epochs in one go (constant schedule)."""
    reference = new_model()
    Trainer(reference, NoisySquares(14), None, make_config(2, "constant"), out_dir=tmp_path / "a").fit()

    first = new_model()
    Trainer(first, NoisySquares(14), None, make_config(1, "constant"), out_dir=tmp_path / "b").fit()
    assert load_checkpoint(tmp_path / "b" / "last.pt")["epoch"] == 1
    resumed = new_model()
    history = Trainer(resumed, NoisySquares(14), None, make_config(2, "constant"), out_dir=tmp_path / "b").fit(resume=True)

    assert [record["epoch"] for record in history] == [0, 1]
    assert_same_state(final_state(reference), final_state(resumed))


# 14 images, batch 4 -> 4 iterations per epoch (the last batch has 2 images), 8 in all.
@pytest.mark.parametrize(
    "where, at",
    [
        ("model", 2),  # during the 2nd forward: epoch 0, one batch done
        ("model", 5),  # first batch of epoch 1: the interrupt lands on the epoch boundary
        ("model", 7),  # epoch 1, two batches done
        ("data", 25),  # while loading the third batch of epoch 1 (14 fetches per epoch)
    ],
)
def test_interrupted_run_resumes_bit_for_bit(tmp_path, straight_run, where, at):
    model = new_model(interrupt_at_call=at if where == "model" else None)
    train_set = NoisySquares(14, interrupt_at_fetch=at if where == "data" else None)
    with pytest.raises(KeyboardInterrupt):
        Trainer(model, train_set, NoisySquares(5), make_config(), out_dir=tmp_path).fit()

    checkpoint = load_checkpoint(tmp_path / "last.pt")  # saved on the way out, weights_only
    assert 0 < checkpoint["iteration"] < 8
    assert checkpoint["iteration"] == 4 * checkpoint["epoch"] + checkpoint["batch_in_epoch"]

    resumed = new_model()
    history = Trainer(resumed, NoisySquares(14), NoisySquares(5), make_config(), out_dir=tmp_path).fit(resume=True)

    assert_same_state(straight_run["state"], final_state(resumed))
    # The per-epoch losses and validation metrics match too, and so does the log, line by line:
    # the records written after the checkpoint were dropped and written again.
    for got, expected in zip(history, straight_run["history"], strict=True):
        assert {k: v for k, v in got.items() if k != "seconds"} == {
            k: v for k, v in expected.items() if k != "seconds"
        }
    assert (tmp_path / "metrics.jsonl").read_text() == straight_run["metrics"]


def test_ctrl_c_during_the_update_waits_for_the_step_to_finish(tmp_path, straight_run):
    """A real SIGINT arriving inside ``optimizer.step()`` is held until the step is complete.

    Raised right away, it would leave the weights updated but the step uncounted, and the
    resumed run would apply that step twice.
    """
    steps = []

    def ctrl_c_on_third_step(optimizer, args, kwargs):
        steps.append(1)
        if len(steps) == 3:
            os.kill(os.getpid(), signal.SIGINT)

    handle = register_optimizer_step_post_hook(ctrl_c_on_third_step)  # every optimizer
    try:
        with pytest.raises(KeyboardInterrupt):
            Trainer(new_model(), NoisySquares(14), NoisySquares(5), make_config(), out_dir=tmp_path).fit()
    finally:
        handle.remove()
    assert load_checkpoint(tmp_path / "last.pt")["iteration"] == 3  # the interrupted step counts

    resumed = new_model()
    Trainer(resumed, NoisySquares(14), NoisySquares(5), make_config(), out_dir=tmp_path).fit(resume=True)
    assert_same_state(straight_run["state"], final_state(resumed))


def test_resume_depends_on_the_saved_random_state(tmp_path, straight_run):
    """Sanity check of the test setup: with another random state the result is different."""
    model = new_model(interrupt_at_call=6)
    with pytest.raises(KeyboardInterrupt):
        Trainer(model, NoisySquares(14), NoisySquares(5), make_config(), out_dir=tmp_path).fit()
    checkpoint = load_checkpoint(tmp_path / "last.pt")
    torch.manual_seed(12345)
    random.seed(12345)
    np.random.seed(12345)
    from minis.engine.checkpoint import capture_rng_state

    checkpoint["rng"] = [capture_rng_state()]
    save_checkpoint(checkpoint, tmp_path / "last.pt")

    resumed = new_model()
    Trainer(resumed, NoisySquares(14), NoisySquares(5), make_config(), out_dir=tmp_path).fit(resume=True)
    state = final_state(resumed)
    assert any(not torch.equal(state[name], straight_run["state"][name]) for name in state)


def test_resume_without_checkpoint_is_a_clear_error(tmp_path):
    trainer = Trainer(new_model(), NoisySquares(6), None, make_config(), out_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="last.pt"):
        trainer.fit(resume=True)
