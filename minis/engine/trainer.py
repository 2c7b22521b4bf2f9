"""The one Trainer every minis model trains with.

It only relies on the model interface (see :mod:`minis.models`): ``model.task`` says
``"semantic"`` or ``"instance"``, and in training mode ``model(images, targets)`` returns a dict
of named losses, which the Trainer sums. So adding an architecture never touches this file.

>>> trainer = Trainer(model, train_set, val_set, TrainConfig(epochs=5, lr=0.05), out_dir="runs/demo")
>>> history = trainer.fit()            # one record per epoch, validation metrics included
>>> trainer.fit(resume=True)           # after a crash or Ctrl-C: continues from runs/demo/last.pt

What it does for you:

- picks the device (``"auto"``: the GPU when there is one), runs mixed precision on CUDA,
  clips gradients, and sets the learning rate every iteration (warmup, then poly/cosine/step);
- checkpoints ``out_dir/last.pt`` after every epoch and when interrupted (Ctrl-C), and resumes
  *exactly*: the same weights, bit for bit on the CPU, as a run that was never interrupted;
- stops with :class:`NonFiniteLossError` as soon as a loss is nan/inf, keeping the last good
  checkpoint;
- writes ``out_dir/metrics.jsonl`` and, at the end, ``out_dir/curves.png``;
- under ``torchrun --nproc_per_node N`` trains with DistributedDataParallel, no change needed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import signal
import sys
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from minis.data.collate import collate_instances, collate_semantic
from minis.engine import distributed
from minis.engine.checkpoint import (
    capture_rng_state,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
    seed_everything,
)
from minis.engine.evaluation import evaluate, predict
from minis.engine.schedules import OPTIMIZERS, SCHEDULES, build_optimizer, build_scheduler

TASKS = ("semantic", "instance")
HEADLINE_METRICS = ("mIoU", "pixel_accuracy", "bbox_AP", "segm_AP")  # drawn in curves.png


class NonFiniteLossError(RuntimeError):
    """A loss became nan or inf. Training stops; the last checkpoint on disk is left untouched."""


@dataclass
class TrainConfig:
    """Every knob of a training run. Stored in each checkpoint (as a dict)."""

    epochs: int = 10
    batch_size: int = 8
    lr: float = 0.01
    optimizer: str = "sgd"  # "sgd" (with momentum) or "adamw"
    momentum: float = 0.9  # SGD only
    weight_decay: float = 1e-4  # not applied to norm layers and biases (see schedules.parameter_groups)
    schedule: str = "poly"  # "poly", "cosine", "step" or "constant", per iteration, after the warmup
    warmup_iters: int = 0  # linear warmup from warmup_factor * lr to lr over this many iterations
    warmup_factor: float = 0.001
    poly_power: float = 0.9
    milestones: tuple[int, ...] = ()  # "step": epochs at which the lr is multiplied by gamma
    gamma: float = 0.1
    clip_grad_norm: float | None = None  # max L2 norm of all gradients together; None = no clipping
    amp: bool = True  # float16 mixed precision; used only on CUDA
    # Store conv weights (hence activations) as NHWC: the same numbers, a faster layout for oneDNN on
    # CPU and for tensor cores on CUDA (1.2-1.6x per step for the CNNs of the semantic chapters)
    channels_last: bool = False
    device: str = "auto"  # "auto", "cpu", "cuda", "cuda:1", ...
    num_workers: int = 0  # DataLoader worker processes (0 = load in the main process)
    seed: int = 0
    eval_every: int = 1  # evaluate every N epochs (and after the last); 0 = never
    eval_batch_size: int | None = None  # None = batch_size
    log_every: int = 10  # iterations between two "train" records of metrics.jsonl
    progress: bool = True  # tqdm progress bars
    find_unused_parameters: bool = False  # DDP: set True for models whose loss skips some parameters

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; choose from {OPTIMIZERS}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; choose from {SCHEDULES}")
        for name in ("epochs", "batch_size", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name} must be at least 1, got {getattr(self, name)}")
        self.milestones = tuple(self.milestones)
        # a step schedule without milestones, or milestones under another schedule, would train at
        # a rate other than the one asked for, silently
        if self.schedule == "step" and not self.milestones:
            raise ValueError("schedule='step' needs milestones, the epochs at which the lr is multiplied by gamma, "
                             "e.g. milestones=(16, 22) (--milestones 16 22); without them the lr would stay constant")
        if self.milestones and self.schedule != "step":
            raise ValueError(f"milestones={self.milestones} only apply to schedule='step', not {self.schedule!r}")
        if any(b <= a for a, b in zip(self.milestones, self.milestones[1:])) or min(self.milestones, default=1) < 1:
            raise ValueError(f"milestones must be increasing epochs >= 1, got {self.milestones}")


def resolve_device(spec: str = "auto", local_rank: int = 0) -> torch.device:
    """``"auto"`` -> this process's GPU when CUDA is available, else the CPU; else ``torch.device(spec)``."""
    if spec == "auto":
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(spec)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"device {spec!r} was asked for but CUDA is not available; use 'auto' or 'cpu'")
        if device.index is None:
            device = torch.device("cuda", local_rank)
    return device


@contextlib.contextmanager
def hold_keyboard_interrupt() -> Iterator[None]:
    """Postpone Ctrl-C until the block has finished.

    A Ctrl-C that lands halfway through ``optimizer.step()`` would leave some weights updated
    and others not, and the checkpoint saved on interrupt would match no iteration at all. Inside
    this block SIGINT is only noted; ``KeyboardInterrupt`` is raised when the block is done.
    (Signal handlers can only be set from the main thread; elsewhere this does nothing.)
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous if previous is not None else signal.default_int_handler)
        if received:
            raise KeyboardInterrupt


def _flatten(metrics: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Numbers only, nested names joined: ``{"bbox": {"AP": .5}}`` -> ``{"bbox_AP": .5}``.

    Lists (the evaluated image ids, a confusion matrix) are left out of the logs.
    """
    flat: dict[str, Any] = {}
    for key, value in metrics.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}_"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[f"{prefix}{key}"] = value
    return flat


def curves_figure(log: str | os.PathLike):
    """The figure of ``curves.png``: the training loss and its terms (log scale) on the left, the
    validation headline metrics (:data:`HEADLINE_METRICS`) on the right when the run evaluated.

    A loss with a single term (a semantic model's ``loss_ce``) is drawn once, as ``loss``; per-class
    numbers are left out, they would crowd the plot.
    """
    import matplotlib.pyplot as plt

    from minis.viz import plot_curves

    records = [json.loads(line) for line in Path(log).read_text(encoding="utf-8").splitlines() if line.strip()]
    train = [r for r in records if r.get("kind", "train") == "train"]
    val = [r for r in records if r.get("kind") == "val"]
    terms = sorted({key for r in train for key in r if key.startswith("loss_")})
    losses = ["loss", *terms] if len(terms) > 1 else ["loss"]
    metrics = [key for key in HEADLINE_METRICS if any(key in r for r in val)]
    panels = [("training loss (mean over the logging interval)", train, losses)] * bool(train)
    panels += [("validation", records, metrics)] * bool(metrics)
    if not panels:
        raise ValueError(f"{log}: no training record and no validation metric to plot")
    figure, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    for ax, (title, chosen, keys) in zip(axes[0], panels):
        plot_curves(chosen, keys=keys, ax=ax)
        ax.set_title(title, fontsize=10)
        if chosen is train:
            ax.set_yscale("log")
    figure.tight_layout()
    return figure


class Trainer:
    """Trains any minis model on any minis dataset; see the module docstring.

    Args:
        model: a minis model (has ``task``; training mode returns a dict of losses).
        train_set: dataset of ``(image, target)`` items; may be ``None`` to only evaluate/predict.
        val_set: evaluated every ``config.eval_every`` epochs and after the last one.
        config: :class:`TrainConfig` (defaults if ``None``).
        out_dir: where ``last.pt``, ``metrics.jsonl`` and ``curves.png`` go; ``None`` = nowhere.
        data: how ``minis eval`` can rebuild the datasets, e.g. ``{"kind": "shapes", "root": ...}``,
            stored in the checkpoint; defaults to ``train_set.data_description`` when the datasets
            come from :func:`minis.data.build_datasets`.
        class_names: stored in the checkpoint for drawing predictions; defaults to
            ``train_set.class_names``.
    """

    def __init__(
        self,
        model: nn.Module,
        train_set: Dataset | None,
        val_set: Dataset | None = None,
        config: TrainConfig | None = None,
        out_dir: str | Path | None = None,
        *,
        data: dict | None = None,
        class_names: Sequence[str] | None = None,
    ) -> None:
        task = getattr(model, "task", None)
        if task not in TASKS:
            raise ValueError(f"the model must have a class attribute task in {TASKS}, got {task!r}")
        self.config = config if config is not None else TrainConfig()
        self.device = resolve_device(self.config.device, distributed.local_rank())
        self.dist = distributed.init_distributed(self.device)
        self.model = model.to(self.device)
        if self.config.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.task = model.task
        self.train_set, self.val_set = train_set, val_set
        self.out_dir = Path(out_dir) if out_dir is not None else None
        source = train_set if train_set is not None else val_set
        self.data = data if data is not None else getattr(source, "data_description", None)
        names = class_names if class_names is not None else getattr(source, "class_names", None)
        self.class_names = list(names) if names is not None else None
        self.use_amp = self.config.amp and self.device.type == "cuda"
        self.collate = collate_semantic if self.task == "semantic" else collate_instances
        self.iters_per_epoch = (
            distributed.num_batches(len(train_set), self.config.batch_size, self.dist.world_size)
            if train_set is not None
            else 0
        )
        self._build_optimization()
        self.train_model = self.model
        if self.dist.enabled and train_set is not None:
            self.train_model = nn.parallel.DistributedDataParallel(
                self.model,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=self.config.find_unused_parameters,
            )
        self._reset_progress()

    # ----------------------------------------------------------------------------------------
    # Public API
    # ----------------------------------------------------------------------------------------

    def fit(self, resume: bool = False) -> list[dict]:
        """Train for ``config.epochs`` epochs; returns one record per epoch (all epochs so far).

        A record holds the epoch, the global iteration, the mean of every loss over the epoch,
        the learning rate, the seconds spent and, when it was evaluated, ``"val"`` metrics.

        ``resume=True`` continues from ``out_dir/last.pt``, also from the middle of an epoch.
        With the same config the result is exactly that of an uninterrupted run (bit for bit on
        the CPU with ``num_workers=0``; with worker processes the data order is the same but the
        workers' augmentation randomness restarts). A larger ``epochs`` extends a finished run,
        though the schedule then differs from a run planned that long.

        Raises:
            NonFiniteLossError: a loss was nan or inf (nothing is saved at that point).
            FileNotFoundError: ``resume=True`` and there is no ``out_dir/last.pt``.
        """
        if self.train_set is None:
            raise ValueError("Trainer.fit needs a train_set")
        if resume:
            self._resume()
        else:
            self._start()
        try:
            for epoch in range(self.epoch, self.config.epochs):
                self._train_epoch(epoch)
                self._end_epoch(epoch)
        except KeyboardInterrupt:
            self._save_after_interrupt()
            raise
        if self._window_count:  # the last steps, fewer than log_every: a short run still has its record
            # (after the last checkpoint: a run resumed from it drops this record and logs those
            # steps with the following ones, as an uninterrupted run would)
            self._log_train(self.config.epochs - 1)
        self._plot_curves()
        return self.history

    def evaluate(self, dataset: Dataset | None = None) -> dict[str, Any]:
        """Metrics of the model on ``dataset`` (default: the validation set); see :func:`minis.engine.evaluate`."""
        dataset = dataset if dataset is not None else self.val_set
        if dataset is None:
            raise ValueError("Trainer.evaluate needs a dataset: none given and no val_set")
        distributed.broadcast_buffers(self.model)  # every rank evaluates the checkpointed model
        return evaluate(
            self.model,
            dataset,
            device=self.device,
            batch_size=self.config.eval_batch_size or self.config.batch_size,
            num_workers=self.config.num_workers,
            amp=self.use_amp,
            progress=self.config.progress,
        )

    def predict(self, images: torch.Tensor | Sequence[torch.Tensor]) -> Any:
        """Outputs of the model in eval mode, without gradients, on the CPU; see :func:`minis.engine.predict`."""
        return predict(self.model, images, device=self.device)

    @property
    def checkpoint_path(self) -> Path | None:
        return self.out_dir / "last.pt" if self.out_dir is not None else None

    # ----------------------------------------------------------------------------------------
    # Setting up, saving, resuming
    # ----------------------------------------------------------------------------------------

    def _build_optimization(self) -> None:
        self.optimizer = build_optimizer(self.model, self.config)
        self.scheduler = build_scheduler(self.optimizer, self.config, max(self.iters_per_epoch, 1))
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.use_amp)

    def _reset_progress(self) -> None:
        """Position of the run: the next batch to train is batch ``batch_in_epoch`` of ``epoch``."""
        self.epoch = 0
        self.batch_in_epoch = 0
        self.iteration = 0  # optimizer steps taken since the start of the run
        self.history: list[dict] = []
        self._epoch_stats = self._new_epoch_stats()
        self._window: dict[str, float] = {}  # loss sums since the last "train" log record
        self._window_count = 0
        self._metrics_lines = 0  # lines in metrics.jsonl, stored so a resume can drop later ones
        self._rng_after_step: dict | None = None
        self._buffers_after_step: dict[str, torch.Tensor] = {}
        self._saved_buffer_names = set(self.model.state_dict()) - {name for name, _ in self.model.named_parameters()}
        self.last_lr = self._lr()

    @staticmethod
    def _new_epoch_stats() -> dict:
        return {"sums": {}, "count": 0, "seconds": 0.0}

    def _start(self) -> None:
        """A fresh run: seed everything (each rank differently, for varied augmentation)."""
        self._build_optimization()
        self._reset_progress()
        seed_everything(self.config.seed + self.dist.rank)
        self._snapshot_after_step()
        if self._writes_files():
            self.out_dir.mkdir(parents=True, exist_ok=True)
            (self.out_dir / "metrics.jsonl").write_text("", encoding="utf-8")

    def _resume(self) -> None:
        """Load ``last.pt``: weights, optimizer, schedule, position and random state."""
        if self.out_dir is None:
            raise ValueError("fit(resume=True) needs the out_dir that holds last.pt")
        if not self.checkpoint_path.is_file():
            raise FileNotFoundError(f"cannot resume: no checkpoint at {self.checkpoint_path}")
        checkpoint = load_checkpoint(self.checkpoint_path)  # on the CPU: RNG states must stay there
        self.model.load_state_dict(checkpoint["model"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.scheduler.load_state_dict(checkpoint["scheduler"])
        if self.use_amp and checkpoint["scaler"]:
            self.scaler.load_state_dict(checkpoint["scaler"])
        self.epoch = checkpoint["epoch"]
        self.batch_in_epoch = checkpoint["batch_in_epoch"]
        self.iteration = checkpoint["iteration"]
        self.history = checkpoint["history"]
        self._epoch_stats = checkpoint["epoch_stats"]
        # the losses since the last "train" record (older checkpoints did not keep them)
        self._window, self._window_count = checkpoint.get("log_window", ({}, 0))
        self._metrics_lines = checkpoint["metrics_lines"]
        rng_states = checkpoint["rng"]
        if self.dist.rank < len(rng_states):
            restore_rng_state(rng_states[self.dist.rank], self.device)
        else:  # saved on interrupt by rank 0 alone: other ranks cannot get their exact state back
            warnings.warn(f"rank {self.dist.rank}: no saved random state, reseeding (resume is not bit-exact)")
            seed_everything(distributed.derive_seed(self.config.seed, self.dist.rank, self.iteration))
        self._snapshot_after_step()
        self.last_lr = self._lr()
        if self._writes_files():
            self._truncate_metrics(self._metrics_lines)

    def _truncate_metrics(self, lines: int) -> None:
        """Drop records written after the checkpoint (they will be written again)."""
        path = self.out_dir / "metrics.jsonl"
        kept = path.read_text(encoding="utf-8").splitlines(keepends=True)[:lines] if path.exists() else []
        path.write_text("".join(kept), encoding="utf-8")

    def _writes_files(self) -> bool:
        return self.out_dir is not None and self.dist.is_main

    def _checkpoint_state(self, rng_states: list[dict]) -> dict[str, Any]:
        """Everything to resume training and to rebuild model and data (``minis eval``).

        Buffers come from the snapshot after the last completed step (see :meth:`_snapshot_after_step`).
        """
        import minis

        model_state = self.model.state_dict()
        model_state.update(self._buffers_after_step)
        return {
            "model": model_state,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "iteration": self.iteration,
            "epoch_stats": self._epoch_stats,
            "history": self.history,
            "metrics_lines": self._metrics_lines,
            "log_window": (self._window, self._window_count),
            "rng": rng_states,  # one state per rank
            "world_size": self.dist.world_size,
            "config": dataclasses.asdict(self.config),
            "task": self.task,
            "build_args": getattr(self.model, "build_args", None),
            "data": self.data,
            "class_names": self.class_names,
            "minis_version": minis.__version__,
        }

    def _save_after_epoch(self) -> None:
        """Every rank hands in its random state; rank 0 writes ``last.pt``."""
        self._snapshot_after_step()
        rng_states = distributed.all_gather_objects(self._rng_after_step)
        if self._writes_files():
            save_checkpoint(self._checkpoint_state(rng_states), self.checkpoint_path)

    def _save_after_interrupt(self) -> None:
        """Save the state after the last *completed* iteration, then let the interrupt go on."""
        if not self._writes_files():
            return
        save_checkpoint(self._checkpoint_state([self._rng_after_step]), self.checkpoint_path)
        tqdm.write(
            f"interrupted: saved {self.checkpoint_path} at epoch {self.epoch}, batch {self.batch_in_epoch}; "
            "continue with fit(resume=True) or --resume",
            file=sys.stderr,
        )

    # ----------------------------------------------------------------------------------------
    # The training loop
    # ----------------------------------------------------------------------------------------

    def _train_loader(self, epoch: int) -> tuple[DataLoader, int]:
        """This epoch's batches from ``batch_in_epoch`` on, and the epoch's full batch count."""
        cfg = self.config
        batches = distributed.epoch_batches(
            len(self.train_set), cfg.batch_size, seed=cfg.seed, epoch=epoch,
            rank=self.dist.rank, world_size=self.dist.world_size,
        )
        loader = DataLoader(
            self.train_set,
            batch_sampler=batches[self.batch_in_epoch :],  # skip what a resumed run already did
            collate_fn=self.collate,
            num_workers=cfg.num_workers,
            pin_memory=self.device.type == "cuda",
            # Its own generator, so creating the loader draws nothing from the global one (that
            # would shift the random stream on resume); it also seeds the worker processes.
            generator=torch.Generator().manual_seed(distributed.derive_seed(cfg.seed, epoch, self.dist.rank)),
        )
        return loader, len(batches)

    def _to_device(self, batch: tuple) -> tuple[Any, Any]:
        if self.task == "semantic":
            images, labels, _ = batch
            return images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)
        images, targets = batch
        images = [image.to(self.device, non_blocking=True) for image in images]
        targets = [
            {key: value.to(self.device, non_blocking=True) if isinstance(value, torch.Tensor) else value
             for key, value in target.items()}
            for target in targets
        ]
        return images, targets

    def _train_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        loader, total = self._train_loader(epoch)
        self.train_model.train()
        bar = tqdm(
            total=total, initial=self.batch_in_epoch, desc=f"epoch {epoch + 1}/{self.config.epochs}",
            disable=not (self.config.progress and self.dist.is_main), dynamic_ncols=True,
        )
        with bar:
            started = time.perf_counter()
            for batch in loader:
                losses = self._train_step(batch, epoch, total, started)
                started = time.perf_counter()
                bar.update()
                bar.set_postfix(loss=f"{losses['loss']:.4f}", lr=f"{self.last_lr:.2e}", refresh=False)
                if self.iteration % self.config.log_every == 0:
                    self._log_train(epoch)

    def _train_step(self, batch: tuple, epoch: int, total: int, started: float) -> dict[str, float]:
        """Forward, loss check, backward and update for one batch; returns the loss values.

        ``started`` is when loading this batch began, for the epoch's time.
        """
        images, targets = self._to_device(batch)
        with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.use_amp):
            losses = self.train_model(images, targets)
        if not isinstance(losses, dict) or not losses:
            raise TypeError(
                f"in training mode model(images, targets) must return a dict of losses, got {type(losses).__name__}"
            )
        loss = sum(losses.values())
        values = self._loss_values(loss, losses)
        self._check_finite(values, epoch, total)

        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()  # scaled only under AMP, so float16 gradients do not underflow
        with hold_keyboard_interrupt():  # the update below happens entirely or not at all
            if self.config.clip_grad_norm is not None:
                self.scaler.unscale_(self.optimizer)  # clip the true gradients, not the scaled ones
                nn.utils.clip_grad_norm_(self.model.parameters(), self.config.clip_grad_norm)
            self.last_lr = self._lr()  # the rate this step used, for the logs
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.scheduler.step()
            self.batch_in_epoch += 1
            self.iteration += 1
            self._record_step(values, time.perf_counter() - started)
            self._snapshot_after_step()
        return values

    def _snapshot_after_step(self) -> None:
        """Remember what the next forward pass changes before the next step completes.

        An interrupt may land in the middle of the next iteration, after its forward pass has
        already drawn random numbers and updated the batch-norm running statistics. The
        checkpoint saved on interrupt takes the random state and the buffers from here, the end
        of the last completed step (parameters and optimizer only change inside the step).
        """
        self._rng_after_step = capture_rng_state(self.device)
        self._buffers_after_step = {
            name: buffer.detach().clone()
            for name, buffer in self.model.named_buffers()
            if name in self._saved_buffer_names
        }

    def _loss_values(self, loss: torch.Tensor, losses: dict[str, torch.Tensor]) -> dict[str, float]:
        """Total and every term as Python floats, averaged over ranks.

        Averaging over ranks also means every rank sees a nan from any rank, so they all stop
        together instead of leaving the others waiting in the next gradient all-reduce.
        """
        names = ["loss", *losses]
        stacked = torch.stack([loss.detach().float(), *(value.detach().float() for value in losses.values())])
        if self.dist.enabled:
            distributed.all_reduce_sum(stacked)
            stacked /= self.dist.world_size
        return dict(zip(names, stacked.tolist()))

    def _check_finite(self, values: dict[str, float], epoch: int, total: int) -> None:
        bad = {name: value for name, value in values.items() if name != "loss" and not math.isfinite(value)}
        if not bad and math.isfinite(values["loss"]):
            return
        terms = ", ".join(f"{name}={value}" for name, value in bad.items()) or f"loss={values['loss']}"
        kept = (
            f"the last good checkpoint, {self.checkpoint_path}, was kept"
            if self.checkpoint_path is not None and self.checkpoint_path.exists()
            else "no checkpoint had been written yet"
        )
        raise NonFiniteLossError(
            f"non-finite loss at iteration {self.iteration} (epoch {epoch}, batch {self.batch_in_epoch} of {total}; "
            f"counted from 0): {terms}. Training stopped; {kept}. Try a lower lr, warmup_iters or clip_grad_norm."
        )

    def _record_step(self, values: dict[str, float], seconds: float) -> None:
        stats = self._epoch_stats
        for name, value in values.items():
            stats["sums"][name] = stats["sums"].get(name, 0.0) + value
            self._window[name] = self._window.get(name, 0.0) + value
        stats["count"] += 1
        stats["seconds"] += seconds
        self._window_count += 1

    def _lr(self) -> float:
        """The learning rate of the next step (of the first parameter group)."""
        return self.optimizer.param_groups[0]["lr"]

    # ----------------------------------------------------------------------------------------
    # End of epoch, logs, curves
    # ----------------------------------------------------------------------------------------

    def _eval_due(self, epoch: int) -> bool:
        every = self.config.eval_every
        last = epoch + 1 == self.config.epochs
        return self.val_set is not None and every > 0 and ((epoch + 1) % every == 0 or last)

    def _end_epoch(self, epoch: int) -> None:
        stats = self._epoch_stats
        means = {name: total / max(stats["count"], 1) for name, total in stats["sums"].items()}
        record = {"epoch": epoch, "iteration": self.iteration, **means, "lr": self.last_lr, "seconds": stats["seconds"]}
        if self._eval_due(epoch):
            metrics = _flatten(self.evaluate())
            record["val"] = metrics
            self._append_log({"kind": "val", "epoch": epoch, "iteration": self.iteration, **metrics})
        self.history.append(record)
        self._print_summary(record)
        self.epoch, self.batch_in_epoch = epoch + 1, 0
        self._epoch_stats = self._new_epoch_stats()
        self._save_after_epoch()

    def _print_summary(self, record: dict) -> None:
        """One line per epoch under the progress bars: mean loss and the headline metrics."""
        if not (self.config.progress and self.dist.is_main):
            return
        parts = [f"epoch {record['epoch'] + 1}/{self.config.epochs}", f"loss {record.get('loss', math.nan):.4f}"]
        parts += [f"{name} {record['val'][name]:.4f}" for name in HEADLINE_METRICS if name in record.get("val", {})]
        tqdm.write(", ".join(parts))

    def _log_train(self, epoch: int) -> None:
        means = {name: total / self._window_count for name, total in self._window.items()}
        self._append_log({"kind": "train", "epoch": epoch, "iteration": self.iteration, **means, "lr": self.last_lr})
        self._window, self._window_count = {}, 0

    def _append_log(self, record: dict) -> None:
        if not self._writes_files():
            return
        with open(self.out_dir / "metrics.jsonl", "a", encoding="utf-8") as file:
            file.write(json.dumps(record) + "\n")
        self._metrics_lines += 1

    def _plot_curves(self) -> None:
        """``out_dir/curves.png`` from metrics.jsonl; a plotting problem never fails a finished run."""
        if not self._writes_files():
            return
        try:
            import matplotlib.pyplot as plt

            from minis.viz import plot_curves, save_figure

            figure = curves_figure(self.out_dir / "metrics.jsonl")
            save_figure(figure, self.out_dir / "curves.png")
            plt.close(figure)
        except Exception as error:  # noqa: BLE001 - curves are a convenience, the run succeeded
            warnings.warn(f"could not plot the training curves: {error!r}")
