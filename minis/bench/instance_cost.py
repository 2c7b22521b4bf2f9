"""The CPU cost of instance models side by side, and as the detections grow.

What ``bench condinst`` and ``bench fcis`` (and later instance architectures) share: a few minis
models on one backbone body with the same random weights, every score threshold at 0 so that the
number of detections is exactly the cap, timed in alternation (:func:`interleaved_median_ms`) on
one random image for inference and on two images with four random objects each for a training
step (forward and backward).
"""

from __future__ import annotations

import argparse
from typing import Any, Callable, Sequence

import torch
from torch import nn

from minis.bench.common import add_json_option, count_parameters, interleaved_median_ms, random_targets, shape_text


def set_detections(model: nn.Module, count: int) -> None:
    """Cap ``model``'s detections per image at ``count`` (the two-stage and one-stage field names)."""
    if hasattr(model.config, "box_detections_per_img"):
        model.config.box_detections_per_img = count
    else:
        model.config.detections_per_img = count


def share_body(models: dict[str, nn.Module], bodies: dict[str, Callable[[nn.Module], nn.Module]],
               source: str) -> None:
    """Copy the ResNet body of ``models[source]`` into every other model. ``bodies[name](model)``
    returns that model's body (``model.backbone.body`` under an FPN, ``model.backbone`` for a single
    map); a dilated stage has the same weights as a strided one, so the copy is exact."""
    state = bodies[source](models[source]).state_dict()
    for name, model in models.items():
        bodies[name](model).load_state_dict(state)


def instance_cost(
    models: dict[str, nn.Module],
    *,
    references: Sequence[str],
    scaled: Sequence[str],
    image_size: tuple[int, int],
    detections: int,
    instances: Sequence[int],
    runs: int,
    num_classes: int,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, list[dict[str, Any]]]:
    """Two tables of the CPU cost of ``models`` (name -> minis instance model with a ``transform``):

    - ``models``: per model and step (``inference`` with ``detections`` detections on one image,
      ``train step`` on two), the median ``ms``, the ``params`` and ``vs_<name>``: the time
      divided by that of each model of ``references`` for the same step;
    - ``instances``: inference of each model of ``scaled`` with each count of ``instances``
      detections: ``<name>_ms`` and ``<name>_vs_1``, the time divided by the one with the fewest.
    """
    if runs < 1:
        raise ValueError(f"runs must be at least 1, got {runs}")
    names = list(models)
    image_size = (int(image_size[0]), int(image_size[1]))
    image = [torch.rand(3, *image_size, generator=torch.Generator().manual_seed(seed))]
    first = models[names[0]]
    resized = first.transform(image)[0].image_sizes[0]

    def infer(model: nn.Module, count: int) -> Callable[[], Any]:
        def call() -> Any:
            set_detections(model, count)
            with torch.no_grad():
                return model(image)
        return call

    if progress:
        print(f"timing inference with {detections} detections", flush=True)
    for model in models.values():
        model.eval()
    inference = dict(zip(names, interleaved_median_ms([infer(models[n], detections) for n in names], runs)))
    generator = torch.Generator().manual_seed(seed + 1)
    images = [torch.rand(3, *image_size, generator=generator) for _ in range(2)]
    targets = random_targets(2, image_size, num_classes, 4, generator, with_masks=True)

    def train_step(model: nn.Module) -> Callable[[], Any]:
        def call() -> Any:
            model.zero_grad(set_to_none=True)
            losses = model(images, [dict(target) for target in targets])
            sum(losses.values()).backward()
        return call

    if progress:
        print("timing a training step", flush=True)
    for model in models.values():
        model.train()
    training = dict(zip(names, interleaved_median_ms([train_step(models[n]) for n in names], runs)))
    rows = []
    for step, times, batch in (("inference", inference, 1), ("train step", training, 2)):
        for name in names:
            rows.append({"model": name, "step": step, "input": shape_text(batch, image_size, resized),
                         "ms": times[name], "params": count_parameters(models[name]),
                         **{f"vs_{reference}": times[name] / times[reference] for reference in references}})

    if progress:
        print(f"timing inference with {', '.join(map(str, instances))} detections", flush=True)
    for model in models.values():
        model.eval()
    counts = sorted(instances)
    calls = [infer(models[name], count) for count in counts for name in scaled]
    times = interleaved_median_ms(calls, runs)
    scaling = []
    for index, count in enumerate(counts):
        row: dict[str, Any] = {"instances": count}
        for offset, name in enumerate(scaled):
            milliseconds = times[len(scaled) * index + offset]
            row[f"{name}_ms"] = milliseconds
            row[f"{name}_vs_1"] = milliseconds / times[offset]
        scaling.append(row)
    return {"models": rows, "instances": scaling}


def add_cost_options(parser: argparse.ArgumentParser, min_size: int, max_size: int) -> None:
    """The options every cost suite takes (image size, resize, detection counts, rounds, JSON)."""
    parser.add_argument("--image-size", type=int, nargs=2, default=[480, 640], metavar=("H", "W"))
    parser.add_argument("--min-size", type=int, default=min_size,
                        help=f"short side the models resize to (default {min_size})")
    parser.add_argument("--max-size", type=int, default=max_size)
    parser.add_argument("--instances", type=int, nargs="+", default=[1, 10, 25, 50],
                        help="detection counts to time inference with (default 1 10 25 50)")
    parser.add_argument("--detections", type=int, default=50, help="detections in the model table (default 50)")
    parser.add_argument("--runs", type=int, default=3, help="timed rounds (median; default 3)")
    add_json_option(parser)


def cost_arguments(args: argparse.Namespace) -> dict[str, Any]:
    """The keyword arguments of a cost suite's function from :func:`add_cost_options`' options,
    checked first (a bad count is the user's error, said in one line)."""
    from minis.cli import UserError

    if args.runs < 1:
        raise UserError(f"--runs must be at least 1, got {args.runs}")
    if min(args.instances) < 1:
        raise UserError(f"--instances must be at least 1, got {min(args.instances)}")
    return {"image_size": tuple(args.image_size), "min_size": args.min_size, "max_size": args.max_size,
            "instances": args.instances, "detections": args.detections, "runs": args.runs}
