"""The command line: ``python -m minis`` (or ``minis``) with five commands.

::

    python -m minis data shapes --root data/shapes            # generate the synthetic benchmark
    python -m minis data coco data/coco --splits val2017        # download COCO 2017
    python -m minis data labelme2coco IN_DIR OUT_JSON           # convert labelme annotations
    python -m minis train baseline_fcn --data shapes --data-root data/shapes --epochs 5 --out runs/demo
    python -m minis eval runs/demo/last.pt                      # metrics on the validation set
    python -m minis predict runs/demo/last.pt image.png --out runs/demo/predictions
    python -m minis bench semantic                              # every semantic model, one table
    python -m minis bench rcnn                                  # Mask R-CNN and minis.ops vs torchvision
    python -m minis bench rcnn-training                         # minis and torchvision Mask R-CNN trained alike
    python -m minis bench ms-rcnn --seeds 0 1 2                 # Mask R-CNN against Mask Scoring R-CNN, same recipe
    python -m minis bench fcos-training                         # minis and torchvision FCOS trained alike
    python -m minis bench condinst                              # CondInst vs FCOS vs Mask R-CNN; cost per instance
    python -m minis bench fcis                                  # FCIS vs Mask R-CNN; cost per detection
    python -m minis bench gpu                                   # every model trained and run on CUDA, checked

``train`` also runs under ``torchrun --nproc_per_node N -m minis train ...`` (one process per
GPU, or N CPU processes). Mistakes in a command (unknown model, missing data or checkpoint) are
reported in one line, without a traceback, with exit status 2.
"""

from __future__ import annotations

import argparse
import ast
import math
import sys
from pathlib import Path
from typing import Any, Sequence

EXIT_USAGE = 2  # argparse's own status for a bad command line; used for every user mistake


class UserError(Exception):
    """A mistake in the command (not a bug): printed as one line, exit status 2."""


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------


def _model_kwargs(pairs: Sequence[str]) -> dict[str, Any]:
    """``["width=16", "name='x'"]`` -> ``{"width": 16, "name": "x"}`` (values read as Python literals)."""
    kwargs = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key.isidentifier():
            raise UserError(f"--model-arg expects KEY=VALUE, got {pair!r}")
        try:
            kwargs[key] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            kwargs[key] = text  # a bare word: keep it as a string
    return kwargs


def _build_model(name: str, num_classes: int, kwargs: dict[str, Any]):
    import minis.models

    if name not in minis.models.list_models():
        raise UserError(f"unknown model {name!r}; available: {', '.join(minis.models.list_models())}")
    try:
        return minis.models.build(name, num_classes=num_classes, **kwargs)
    except TypeError as error:  # an unexpected --model-arg
        raise UserError(f"cannot build {name!r} with {kwargs}: {error}") from error


def _load_checkpoint(path: str) -> dict:
    """What eval and predict need of the checkpoint at ``path``: weights, build arguments, data, class names.

    The file is memory-mapped and the rest (optimizer state: one or two more copies of the
    weights) is never read; the mapping goes once the weights have moved into the model.
    """
    from minis.engine import load_checkpoint

    if not Path(path).is_file():
        raise UserError(f"no checkpoint at {path}")
    checkpoint = load_checkpoint(path, mmap=True)
    return {key: checkpoint[key] for key in ("model", "build_args", "data", "class_names") if key in checkpoint}


def _model_from_checkpoint(checkpoint: dict, path: str):
    """The model of ``checkpoint`` in eval mode; its weights move into it (the dict loses ``"model"``).

    Keeping them in the dict would hold a second copy of the weights for the whole command.
    """
    build_args = dict(checkpoint.get("build_args") or {})
    if "name" not in build_args:
        raise UserError(f"{path} does not say which model it holds (no build_args); was it written by minis?")
    name, num_classes = build_args.pop("name"), build_args.pop("num_classes")
    model = _build_model(name, num_classes, build_args)
    model.load_state_dict(checkpoint.pop("model"))
    return model.eval()


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4f}"
    return str(value)


def format_metrics(metrics: dict[str, Any]) -> str:
    """A two-column text table of (possibly nested) metrics; image ids and confusion matrix left out."""
    rows: list[tuple[str, str]] = []

    def add(prefix: str, values: dict) -> None:
        for key, value in values.items():
            if key in ("image_ids", "confusion_matrix"):
                continue
            name = f"{prefix}{key}"
            if isinstance(value, dict):
                add(f"{name}_", value)
            elif isinstance(value, (list, tuple)) and len(value) > 12:
                rows.append((name, f"[{len(value)} values]"))
            elif isinstance(value, (list, tuple)):
                rows.append((name, "[" + ", ".join(_format_value(v) for v in value) + "]"))
            else:
                rows.append((name, _format_value(value)))

    add("", metrics)
    width = max((len(name) for name, _ in rows), default=0)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


# --------------------------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------------------------


def cmd_data_shapes(args: argparse.Namespace) -> int:
    from minis.data.shapes import make_shapes

    options = {
        name: getattr(args, name)
        for name in ("num_train", "num_val", "image_size", "max_objects", "size_range", "seed")
        if getattr(args, name) is not None
    }
    if "size_range" in options:
        options["size_range"] = tuple(options["size_range"])
    if args.plain:
        options["textures"] = False
    try:
        paths = make_shapes(args.root, overwrite=args.overwrite, **options)
    except (ValueError, FileExistsError) as error:  # other settings already there, foreign folder
        raise UserError(str(error)) from error
    print(f"shapes benchmark ready in {paths['root']}: classes {', '.join(paths['class_names'][1:])}")
    return 0


def cmd_data_coco(args: argparse.Namespace) -> int:
    from minis.data.download import download_coco

    try:
        paths = download_coco(args.root, splits=tuple(args.splits))
    except (OSError, ValueError) as error:  # no network, a corrupted archive (kept aside, retry)
        raise UserError(f"downloading COCO failed: {error}") from error
    print(f"COCO {', '.join(args.splits)} ready in {args.root}")
    for split, files in paths.items():
        print(f"  {split}: images {files['image_dir']}, annotations {files['ann_file']}")
    return 0


def cmd_data_labelme(args: argparse.Namespace) -> int:
    from minis.data.labelme import labelme_to_coco

    if not Path(args.in_dir).is_dir():
        raise UserError(f"no folder {args.in_dir}")
    coco = labelme_to_coco(args.in_dir, args.out_json, labels_file=args.labels)
    print(
        f"wrote {args.out_json}: {len(coco['images'])} images, {len(coco['annotations'])} annotations, "
        f"{len(coco['categories'])} categories"
    )
    return 0


def _train_config(args: argparse.Namespace, recipe: dict[str, Any] | None = None):
    """The TrainConfig of ``minis train``: ``recipe`` (``--recipe shapes``: the chapter's), then the
    options given on the command line; what neither sets keeps TrainConfig's defaults."""
    from minis.engine import TrainConfig

    options = {
        **(recipe or {}),
        "device": args.device,
        "num_workers": args.workers,
        "seed": args.seed,
        "amp": not args.no_amp,
        "eval_every": args.eval_every,
        "progress": not args.no_progress,
        "find_unused_parameters": args.find_unused_parameters,
    }
    if args.channels_last:
        options["channels_last"] = True
    if args.clip_grad is not None:
        options["clip_grad_norm"] = args.clip_grad
    # every field of TrainConfig has its option
    for name in ("epochs", "batch_size", "lr", "optimizer", "momentum", "weight_decay", "schedule", "warmup_iters",
                 "warmup_factor", "poly_power", "milestones", "gamma", "eval_batch_size", "log_every"):
        if getattr(args, name) is not None:
            options[name] = getattr(args, name)
    options.setdefault("epochs", 10)
    options.setdefault("batch_size", 8)
    try:
        return TrainConfig(**options)
    except ValueError as error:
        raise UserError(str(error)) from error


def cmd_train(args: argparse.Namespace) -> int:
    import torch

    import minis.models
    from minis.data import catalog
    from minis.engine import Trainer, distributed

    recipe, kwargs = None, _model_kwargs(args.model_arg)
    if args.recipe == "shapes":  # the chapter's model settings and training recipe; explicit options win
        try:
            recipe = minis.models.shapes_recipe(args.model)
        except KeyError as error:  # an unknown model, or one without a recipe
            raise UserError(f"--recipe shapes: {error.args[0]}") from error
        kwargs = {**minis.models.shapes_settings(args.model), **minis.models.chapter_options(args.model), **kwargs}
    config = _train_config(args, recipe)
    if args.resume and not (Path(args.out) / "last.pt").is_file():
        raise UserError(f"--resume: no checkpoint at {Path(args.out) / 'last.pt'}")
    # The classes fix num_classes; the model's task then picks the datasets.
    names = catalog.class_names(args.data, args.data_root)
    torch.manual_seed(args.seed)  # the initial weights too are a function of --seed
    model = _build_model(args.model, len(names), kwargs)
    train_set, val_set = catalog.build_datasets(args.data, args.data_root, model.task, crop_size=args.crop_size)
    trainer = Trainer(model, train_set, val_set, config, out_dir=args.out)
    history = trainer.fit(resume=args.resume)
    if trainer.dist.is_main:
        last = history[-1] if history else {}
        print(f"trained {args.model} for {len(history)} epochs; checkpoint {Path(args.out) / 'last.pt'}")
        print(format_metrics({k: v for k, v in last.items() if k != "val"}))
        if "val" in last:
            print("validation:")
            print(format_metrics(last["val"]))
    distributed.cleanup()
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from minis.data import catalog
    from minis.engine import evaluate, resolve_device

    checkpoint = _load_checkpoint(args.checkpoint)
    data = checkpoint.get("data")
    if not data and not args.data_root:
        raise UserError(f"{args.checkpoint} does not record its dataset; give --data and --data-root")
    data = dict(data or {})
    kind = args.data or data.get("kind")
    root = args.data_root or data.get("root")
    if kind is None:
        raise UserError(f"{args.checkpoint} does not record its dataset kind; give --data shapes|coco")
    model = _model_from_checkpoint(checkpoint, args.checkpoint)
    device = resolve_device(args.device)
    dataset = catalog.build_dataset(kind, root, model.task, "val")
    metrics = evaluate(model.to(device), dataset, device=device, batch_size=args.batch_size)
    print(f"{checkpoint['build_args']['name']} on {kind} val ({root}): {metrics['num_images']} images")
    print(format_metrics(metrics))
    return 0


def _draw_prediction(model, image, output, class_names, score_threshold: float, target: dict | None = None):
    """A figure with the prediction overlaid on ``image`` ([3,H,W] in 0..1); with a ``target`` (a
    dataset's annotations of the image), the ground truth beside it, drawn the same way."""
    import matplotlib.pyplot as plt

    from minis import viz

    panels = 1 if target is None else 2
    figure, axes = plt.subplots(1, panels, figsize=(5 * panels, 5), squeeze=False)
    ax = axes[0, -1]
    if model.task == "semantic":
        viz.draw_semantic(image, output.argmax(0), class_names, ax=ax)
    else:  # masks: RLEs for segmenting models; none for box-only ones (Faster R-CNN, FCOS)
        viz.draw_instances(image, output["boxes"], output.get("masks"), output["labels"], output["scores"],
                           class_names, ax=ax, score_threshold=score_threshold)
    if target is not None:
        if model.task == "semantic":
            viz.draw_semantic(image, target["semantic"], class_names, ax=axes[0, 0])
        else:  # crowd regions are not objects to find: left out, as the evaluation leaves them out
            objects = ~target["iscrowd"].bool() if "iscrowd" in target else slice(None)
            viz.draw_instances(image, target["boxes"][objects], target["masks"][objects] if "masks" in target else None,
                               target["labels"][objects], None, class_names, ax=axes[0, 0])
        axes[0, 0].set_title(f"image {int(target['image_id'])}: ground truth", fontsize=10)
        ax.set_title("prediction" + ("" if model.task == "semantic" else f" (score >= {score_threshold})"),
                     fontsize=10)
        figure.tight_layout()
    return figure


def cmd_predict(args: argparse.Namespace) -> int:
    if not args.images and not args.val:
        raise UserError("predict: give IMAGE files, or --val N for the first N validation images")
    checkpoint = _load_checkpoint(args.checkpoint)
    missing = [path for path in args.images if not Path(path).is_file()]
    if missing:
        raise UserError(f"no image file {', '.join(missing)}")

    import matplotlib.pyplot as plt
    import torch

    from minis import viz
    from minis.data.coco import pil_to_image_tensor, read_rgb_image
    from minis.engine import predict, resolve_device
    model = _model_from_checkpoint(checkpoint, args.checkpoint)
    device = resolve_device(args.device)
    model.to(device)
    class_names = checkpoint.get("class_names")
    out_dir = Path(args.out)
    for path in args.images:
        image = pil_to_image_tensor(read_rgb_image(path)).as_subclass(torch.Tensor)
        # masks as RLEs: 100 float masks of a 12-megapixel photo would take 4.8 GB
        output = predict(model, image, device=device, rle=True)
        figure = _draw_prediction(model, image, output, class_names, args.score_threshold)
        saved = viz.save_figure(figure, out_dir / f"{Path(path).stem}.png")
        plt.close(figure)
        print(f"{path} -> {saved}")
    if args.val:
        for image, target in _validation_samples(checkpoint, args, model.task):
            output = predict(model, image, device=device, rle=True)
            figure = _draw_prediction(model, image, output, class_names, args.score_threshold, target)
            saved = viz.save_figure(figure, out_dir / f"val_{int(target['image_id']):06d}.png")
            plt.close(figure)
            print(f"validation image {int(target['image_id'])}: ground truth | prediction -> {saved}")
    return 0


def _validation_samples(checkpoint: dict, args: argparse.Namespace, task: str):
    """The first ``args.val`` (image, target) pairs of the checkpoint's validation set."""
    from minis.data import catalog

    data = dict(checkpoint.get("data") or {})
    if not data.get("kind") or not data.get("root"):
        raise UserError(f"{args.checkpoint} does not record its dataset: --val needs one")
    dataset = catalog.build_dataset(data["kind"], data["root"], task, "val")
    for index in range(min(args.val, len(dataset))):
        yield dataset[index]


# --------------------------------------------------------------------------------------------
# Parser
# --------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="minis", description="Image segmentation from FCN to CondInst.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="{data,train,eval,predict,bench,pretrain}")

    data = commands.add_parser("data", help="generate, download or convert datasets")
    sources = data.add_subparsers(dest="source", required=True, metavar="{shapes,coco,labelme2coco}")
    shapes = sources.add_parser("shapes", help="generate the synthetic shapes benchmark")
    shapes.add_argument("--root", default="data/shapes", help="output folder (default: data/shapes)")
    shapes.add_argument("--num-train", type=int, help="training images (default: make_shapes' default)")
    shapes.add_argument("--num-val", type=int, help="validation images")
    shapes.add_argument("--image-size", type=int, help="side of the square images in pixels")
    shapes.add_argument("--max-objects", type=int, help="objects per non-empty image, at most")
    shapes.add_argument("--size-range", type=float, nargs=2, metavar=("MIN", "MAX"),
                        help="object diameters as fractions of the image side")
    shapes.add_argument("--plain", action="store_true", help="plain backgrounds and fills (textures=False)")
    shapes.add_argument("--seed", type=int)
    shapes.add_argument("--overwrite", action="store_true", help="replace a copy generated with other settings")
    shapes.set_defaults(handler=cmd_data_shapes)
    coco = sources.add_parser("coco", help="download COCO 2017 (images and instance annotations)")
    coco.add_argument("root", help="output folder, e.g. data/coco")
    coco.add_argument("--splits", nargs="+", default=["val2017"], choices=["val2017", "train2017"])
    coco.set_defaults(handler=cmd_data_coco)
    labelme = sources.add_parser("labelme2coco", help="convert a folder of labelme JSON files to one COCO file")
    labelme.add_argument("in_dir")
    labelme.add_argument("out_json")
    labelme.add_argument("--labels", help="labelme's labels.txt (class order)")
    labelme.set_defaults(handler=cmd_data_labelme)

    train = commands.add_parser("train", help="train a model (also under torchrun)")
    train.add_argument("model", help="a name from minis.models.list_models()")
    train.add_argument("--data", choices=["shapes", "coco"], default="shapes")
    train.add_argument("--data-root", default="data/shapes")
    train.add_argument("--recipe", choices=["shapes"],
                       help="shapes: the book's settings and chapter recipe for MODEL on the shapes benchmark "
                            "(its model file's SHAPES_SETTINGS and SHAPES_RECIPE); options given here override them")
    train.add_argument("--epochs", type=int, help="default: the recipe's, else 10")
    train.add_argument("--batch-size", type=int, help="default: the recipe's, else 8")
    train.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    train.add_argument("--out", required=True, help="run folder: last.pt, metrics.jsonl, curves.png")
    train.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    train.add_argument("--lr", type=float)
    train.add_argument("--optimizer", choices=["sgd", "adamw"])
    train.add_argument("--momentum", type=float, help="SGD's momentum (default 0.9)")
    train.add_argument("--schedule", choices=["poly", "cosine", "step", "constant"])
    train.add_argument("--milestones", type=int, nargs="+", metavar="EPOCH",
                       help="--schedule step: epochs at which the lr is multiplied by --gamma, e.g. 16 22")
    train.add_argument("--gamma", type=float, help="--schedule step: the factor at each milestone (default 0.1)")
    train.add_argument("--poly-power", type=float, help="--schedule poly: the exponent (default 0.9)")
    train.add_argument("--warmup-iters", type=int)
    train.add_argument("--warmup-factor", type=float, help="the warmup starts at this fraction of the lr (default 0.001)")
    train.add_argument("--weight-decay", type=float)
    train.add_argument("--clip-grad", type=float, help="max gradient norm (default: no clipping)")
    train.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--no-amp", action="store_true", help="no mixed precision on CUDA")
    train.add_argument("--channels-last", action="store_true", help="NHWC weights and activations (faster CNNs)")
    train.add_argument("--eval-every", type=int, default=1, help="epochs between evaluations (0: never)")
    train.add_argument("--eval-batch-size", type=int, help="default: --batch-size")
    train.add_argument("--log-every", type=int, help="iterations between two records of metrics.jsonl (default 10)")
    train.add_argument("--no-progress", action="store_true", help="no progress bars")
    train.add_argument("--find-unused-parameters", action="store_true",
                       help="DistributedDataParallel: for models whose loss skips some parameters")
    train.add_argument("--crop-size", type=int, help="semantic training crop (default: per dataset)")
    train.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE",
                       help="extra keyword for the model builder, e.g. width=16 (repeatable)")
    train.set_defaults(handler=cmd_train)

    evaluate = commands.add_parser("eval", help="evaluate a checkpoint on its validation set")
    evaluate.add_argument("checkpoint")
    evaluate.add_argument("--data", choices=["shapes", "coco"], help="default: the one it was trained on")
    evaluate.add_argument("--data-root", help="default: the folder it was trained on")
    evaluate.add_argument("--device", default="auto")
    evaluate.add_argument("--batch-size", type=int, default=8)
    evaluate.set_defaults(handler=cmd_eval)

    predict = commands.add_parser("predict", help="draw a checkpoint's predictions on images")
    predict.add_argument("checkpoint")
    predict.add_argument("images", nargs="*", metavar="IMAGE")
    predict.add_argument("--val", type=int, default=0, metavar="N",
                         help="also draw the first N images of the validation set it was trained with, "
                              "ground truth | prediction side by side")
    predict.add_argument("--out", required=True, help="folder for the overlay PNGs (one per image)")
    predict.add_argument("--score-threshold", type=float, default=0.5, help="instance models: detections shown")
    predict.add_argument("--device", default="auto")
    predict.set_defaults(handler=cmd_predict)

    bench = commands.add_parser("bench", help="compare models: size, speed and accuracy in one table")
    from minis.bench import add_parsers as add_bench_suites  # each suite module wires its own sub-command

    add_bench_suites(bench)
    from minis.pretrain import add_parser as add_pretrain

    add_pretrain(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 success, 2 a mistake in the command)."""
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except (UserError, FileNotFoundError) as error:
        print(f"minis: error: {error}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
