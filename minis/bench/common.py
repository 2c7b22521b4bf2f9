"""What every benchmark suite shares: timing, the machine note, tables, random detection inputs,
training by a recipe on the shapes benchmark, and the closing of a command (note and JSON).

Timing rules, so that two numbers in one table can be compared:

- inference: eval mode, ``torch.no_grad()``, a few warm-up calls (the first calls allocate memory
  and pick kernels) and then the *median* of many calls, which a single hiccup of a busy machine
  does not move;
- minis against torchvision: the two calls alternate (A B, B A, ...), so a change of machine load
  during the measurement hits both equally;
- on a GPU every timed call ends with ``torch.cuda.synchronize()`` (:func:`synchronized`): CUDA
  runs kernels asynchronously, and without it the clock would stop when the work is queued, not
  done;
- ``torch.set_num_threads`` is left as it is: the numbers are those of the caller's setting.
  On a machine shared with other busy processes, several threads per process can be many times
  slower than one (each parallel region waits for its slowest thread, which is waiting for a
  core); there, ``OMP_NUM_THREADS=1 python -m minis bench ...`` gives steadier numbers. The load
  average printed under the tables (:func:`machine_note`) says how quiet the machine was.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

# --------------------------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------------------------


def count_parameters(model: nn.Module) -> int:
    """Number of learnable numbers in ``model`` (frozen parameters included, buffers not)."""
    return sum(parameter.numel() for parameter in model.parameters())


def interleaved_median_ms(calls: Sequence[Callable[[], Any]], runs: int, warmup: int = 1) -> list[float]:
    """Median wall time in milliseconds of each of ``calls``, measured in alternation.

    Every round calls each function once, ``warmup`` rounds untimed then ``runs`` timed ones:
    a slow spell of the machine lands on all calls alike, and the median ignores the rounds it
    spoiled. The order flips from round to round (A B, B A, A B, ...): a call that follows
    another of the same size runs faster (the allocator reuses the memory the first one
    freed, where the first has to fault it in), by 5-10% for an R-CNN training step.
    """
    if runs < 1:
        raise ValueError(f"runs must be at least 1, got {runs}")
    times: list[list[float]] = [[] for _ in calls]
    for round_index in range(warmup + runs):
        order = list(zip(calls, times))
        for call, seconds in order if round_index % 2 == 0 else order[::-1]:
            start = time.perf_counter()
            call()
            if round_index >= warmup:
                seconds.append(time.perf_counter() - start)
    return [1000 * statistics.median(seconds) for seconds in times]


def synchronized(call: Callable[[], Any], device: torch.device | str) -> Callable[[], Any]:
    """``call`` followed by ``torch.cuda.synchronize(device)`` on a CUDA device (unchanged elsewhere),
    so that a wall clock around it measures the work, not the queuing of the work."""
    device = torch.device(device)
    if device.type != "cuda":
        return call

    def call_and_wait() -> Any:
        result = call()
        torch.cuda.synchronize(device)
        return result

    return call_and_wait


@torch.no_grad()
def inference_ms(model: nn.Module, image_size: int, runs: int = 20, warmup: int = 3) -> float:
    """Median CPU time in milliseconds of ``model`` on one ``[1,3,S,S]`` image, eval mode, no gradients.

    The model is moved to the CPU (where it stays) and put back in its previous train/eval mode.
    """
    was_training = model.training
    model.cpu().eval()
    image = torch.rand(1, 3, image_size, image_size)
    try:
        (milliseconds,) = interleaved_median_ms([lambda: model(image)], runs, warmup)
    finally:
        model.train(was_training)
    return milliseconds


def machine_note(device: torch.device | str | None = None) -> str:
    """One line on what the timings ran on: torch version, threads, CPUs, the load average and,
    for a CUDA ``device``, the GPU's name."""
    load = ", ".join(f"{value:.2f}" for value in os.getloadavg()) if hasattr(os, "getloadavg") else "unknown"
    note = (f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
            f"load average (1, 5, 15 min) {load}")
    if device is not None and torch.device(device).type == "cuda":
        note += f", GPU {torch.cuda.get_device_name(torch.device(device))} (CUDA {torch.version.cuda})"
    return note


# --------------------------------------------------------------------------------------------
# Random detection inputs
# --------------------------------------------------------------------------------------------


def random_boxes(count: int, height: int, width: int, generator: torch.Generator, min_side: float = 8.0,
                 max_side: float | None = None) -> torch.Tensor:
    """``[count, 4]`` boxes inside an ``height x width`` image, sides log-uniform in ``min_side..max_side``
    (default: half the short side), so that small and large objects are equally common."""
    max_side = max(max_side or min(height, width) / 2, min_side)
    low, high = torch.log(torch.tensor(min_side)), torch.log(torch.tensor(max_side))
    sides = torch.exp(low + torch.rand(count, 2, generator=generator) * (high - low))
    sides = torch.minimum(sides, torch.tensor([width - 1.0, height - 1.0]))
    x1 = torch.rand(count, generator=generator) * (width - sides[:, 0])
    y1 = torch.rand(count, generator=generator) * (height - sides[:, 1])
    return torch.stack([x1, y1, x1 + sides[:, 0], y1 + sides[:, 1]], dim=1)


def random_targets(count: int, image_size: tuple[int, int], num_classes: int, objects: int,
                   generator: torch.Generator, with_masks: bool) -> list[dict]:
    """``count`` targets of ``objects`` boxes each (sides 1/8 to 1/2 of the short side), random
    labels ``1..num_classes-1`` and, with ``with_masks``, the boxes filled as masks."""
    height, width = image_size
    targets = []
    for _ in range(count):
        boxes = random_boxes(objects, height, width, generator, min(height, width) / 8, min(height, width) / 2)
        target = {"boxes": boxes, "labels": torch.randint(1, num_classes, (objects,), generator=generator)}
        if with_masks:
            corners = boxes.round().long()
            rows, columns = torch.arange(height), torch.arange(width)
            inside_rows = (rows >= corners[:, 1, None]) & (rows < corners[:, 3, None])  # [objects, H]
            inside_columns = (columns >= corners[:, 0, None]) & (columns < corners[:, 2, None])  # [objects, W]
            target["masks"] = (inside_rows[:, :, None] & inside_columns[:, None, :]).to(torch.uint8)
        targets.append(target)
    return targets


def shape_text(batch: int, image_size: tuple[int, int], resized: tuple[int, int]) -> str:
    """``"2x3x480x640 -> 800x1066"``: a batch's shape and the size the model resized it to."""
    return f"{batch}x3x{image_size[0]}x{image_size[1]} -> {resized[0]}x{resized[1]}"


# --------------------------------------------------------------------------------------------
# Training detectors on the shapes benchmark by a chapter's recipe
# --------------------------------------------------------------------------------------------


def shapes_instances(root: str, progress: bool) -> tuple[Any, Any]:
    """The train and val instance datasets of the shapes benchmark in ``root``; a missing one is
    generated there as the chapters' plain variant (:data:`minis.data.shapes.SEMANTIC_SHAPES`)."""
    from minis.data import build_datasets, make_shapes
    from minis.data.shapes import SEMANTIC_SHAPES

    if not (Path(root) / "meta.json").is_file():
        make_shapes(root, progress=progress, **SEMANTIC_SHAPES)
    return build_datasets("shapes", root, "instance", progress=progress)


def train_with_recipe(model: nn.Module, train_set: Any, val_set: Any, recipe: dict[str, Any],
                      overrides: dict[str, Any] | None, seed: int, device: str,
                      progress: bool) -> tuple[Any, list[dict], float]:
    """Train ``model`` by ``recipe`` (a model file's ``SHAPES_RECIPE``: :class:`~minis.engine.TrainConfig`
    fields; ``overrides`` change some), evaluating only at the end; returns the trainer, its
    history and the training seconds."""
    from minis.engine import TrainConfig, Trainer

    config = TrainConfig(**{**recipe, **(overrides or {}), "seed": seed, "device": device, "eval_every": 0,
                            "progress": progress})
    trainer = Trainer(model, train_set, val_set, config)
    started = time.perf_counter()
    history = trainer.fit()
    return trainer, history, time.perf_counter() - started


# --------------------------------------------------------------------------------------------
# Printing and the command line
# --------------------------------------------------------------------------------------------


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[str | tuple[str, str]]) -> str:
    """An aligned text table of ``rows``: one line per row, one column per key.

    ``columns`` holds row keys or ``(key, format spec)`` pairs, e.g. ``("params", ",d")``.
    Numbers are right-aligned, text left-aligned; a missing value prints as ``-``, and text in a
    column of numbers (``"equal"`` among differences) prints as it is, right-aligned.
    """
    specs = [(column, "") if isinstance(column, str) else column for column in columns]
    cells = [[key for key, _ in specs]]
    for row in rows:
        cells.append(["-" if row.get(key) is None else row[key] if isinstance(row[key], str) else format(row[key], spec)
                      for key, spec in specs])
    widths = [max(len(line[index]) for line in cells) for index in range(len(specs))]
    numeric = [any(isinstance(row.get(key), (int, float)) for row in rows) for key, _ in specs]

    def line(values: list[str]) -> str:
        return "  ".join(value.rjust(width) if right else value.ljust(width)
                         for value, width, right in zip(values, widths, numeric)).rstrip()

    rule = "  ".join("-" * width for width in widths)
    return "\n".join([line(cells[0]), rule, *(line(values) for values in cells[1:])])


def add_json_option(parser: argparse.ArgumentParser, what: str = "the rows") -> None:
    """``--json OUT``, which every suite offers (read by :func:`finish`)."""
    parser.add_argument("--json", metavar="OUT", help=f"also write {what} to this JSON file")


def add_recipe_options(parser: argparse.ArgumentParser) -> None:
    """The options of the suites that train detectors on shapes by a chapter's recipe."""
    parser.add_argument("--root", default="data/shapes_semantic", help="benchmark data (generated when missing)")
    parser.add_argument("--epochs", type=int, help="default: the model file's SHAPES_RECIPE (the chapters')")
    parser.add_argument("--lr", type=float)
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda, ...")
    add_json_option(parser)


def recipe_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The training-recipe options given on the command line (the rest stay the recipe's)."""
    return {name: getattr(args, name) for name in ("epochs", "lr") if getattr(args, name) is not None}


def finish(rows: dict, json_path: str | None, device: torch.device | str | None = None) -> int:
    """Print the machine note under the tables and, when asked, write rows and note as JSON; returns 0."""
    note = machine_note(device)
    print(f"\n{note}")
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps({**rows, "machine": note}, indent=2) + "\n", encoding="utf-8")
        print(f"rows written to {json_path}")
    return 0
