"""Pretraining the small backbone: the book's stand-in for ImageNet weights.

DeepLab and PSPNet were designed to fine-tune a ResNet pretrained on ImageNet (DeepLab v3 and v3+
also pretrain on COCO before PASCAL VOC); none of the papers trains its dilated network from
scratch. Trained from scratch on the shapes benchmark with the book's CPU budget, they are a
lottery: ``python -m minis bench stability deeplab_pspnet`` measured DeepLab v3+ at 0.84, 0.38,
0.40 and 0.86 mIoU over seeds 0, 1, 2 (2 threads) and seed 0 (1 thread), PSPNet between 0.43 and
0.89 - the runs that fail stay on a plateau where they find the objects but not their classes.
Mask R-CNN from scratch was less extreme but still too loose for a book: mask AP 0.729, 0.637,
0.656 and 0.704 over the same four runs; from these weights, 0.757 to 0.762.

ImageNet cannot be downloaded here, and a ResNet-50 would not train in a chapter's minutes on a
CPU anyway, so the book makes its own "ImageNet": 2000 *other* images of the shape world (the
semantic chapters' plain variant generated from another seed, so that no image of the chapters'
training or validation sets is among them), on which the small ResNet learns as the encoder of an
FCN-32s, the simplest segmenter (validation mIoU 0.575). Its weights ship with minis
(``minis/weights/small_shapes.pt``, about 3 MB) and load with ``build_backbone("small",
pretrained=True)``, or ``pretrained_backbone=True`` in any model built on the small backbone;
``python -m minis pretrain`` makes them again, bit for bit at 2 threads (130 s of training on 2
cores, plus 20 s to generate the images).

Dense labels, not image labels: the first attempt pretrained a shape *classifier* (one object
per image, global average pooling, cross-entropy), the closer analogue of ImageNet. In 6 epochs of
640 images its training loss stayed at ln 5 (chance) - one label per image is a far weaker signal
than one per pixel, and the budget did not allow the hundreds of epochs it would need.
"""

from __future__ import annotations

import argparse
import platform
from pathlib import Path
from typing import Any

import torch

from minis.data.shapes import SEMANTIC_SHAPES
from minis.nn import SEMANTIC_SHAPES_RECIPE
from minis.nn.backbones import SMALL_PRETRAINED_PATH

# The pretraining data: the chapters' plain variant, generated from seed 1 (the chapters' sets use
# seed 0), twice the size of their training set.
PRETRAIN_SHAPES: dict = {**SEMANTIC_SHAPES, "seed": 1, "num_train": 2000, "num_val": 200}
# The pretraining run: FCN-32s by the semantic chapters' recipe for 12 epochs (1500 iterations).
PRETRAIN_MODEL = "fcn32s"
PRETRAIN_RECIPE: dict = {**SEMANTIC_SHAPES_RECIPE, "epochs": 12}


def pretrain_small_backbone(root: str = "data/shapes_pretrain", *, epochs: int | None = None, seed: int = 0,
                            device: str = "cpu", progress: bool = True,
                            shapes: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train FCN-32s on the small backbone on the pretraining shapes (generated in ``root`` when
    missing) and return the checkpoint ``{"backbone": state_dict, "meta": {...}}``.

    ``meta`` records how the weights were made: the data settings, the model and recipe, the
    validation mIoU of the FCN-32s, the seconds, the threads and the library versions.
    ``shapes`` and ``epochs`` replace :data:`PRETRAIN_SHAPES` and the recipe's epochs (tests use a
    tiny run).
    """
    from torchvision.transforms import v2

    import minis.models
    from minis.bench.common import train_with_recipe
    from minis.data import build_datasets, make_shapes

    shapes = dict(PRETRAIN_SHAPES if shapes is None else shapes)
    recipe = {**PRETRAIN_RECIPE, **({} if epochs is None else {"epochs": epochs})}
    if not (Path(root) / "meta.json").is_file():
        make_shapes(root, progress=progress, **shapes)
    train_set, val_set = build_datasets("shapes", root, task="semantic", train_transforms=v2.RandomHorizontalFlip(),
                                        progress=progress)
    torch.manual_seed(seed)  # the initial weights; the Trainer seeds data order and augmentation itself
    model = minis.models.build(PRETRAIN_MODEL, num_classes=train_set.num_classes)
    trainer, _, seconds = train_with_recipe(model, train_set, val_set, recipe, None, seed, device, progress)
    meta = {"data": {key: list(value) if isinstance(value, tuple) else value for key, value in shapes.items()},
            "model": PRETRAIN_MODEL, "recipe": recipe, "seed": seed,
            "val_mIoU": float(trainer.evaluate()["mIoU"]), "train_s": round(seconds, 1),
            "threads": torch.get_num_threads(), "device": device, "torch": str(torch.__version__),
            "python": platform.python_version()}
    state = {key: value.detach().cpu().clone() for key, value in model.backbone.state_dict().items()}
    return {"backbone": state, "meta": meta}


def add_parser(commands: argparse._SubParsersAction) -> None:
    """``python -m minis pretrain``: make the small backbone's shipped weights again."""
    parser = commands.add_parser("pretrain", help="pretrain the small backbone (the weights minis ships)")
    parser.add_argument("--root", default="data/shapes_pretrain", help="the pretraining shapes (generated when missing)")
    parser.add_argument("--out", default=str(SMALL_PRETRAINED_PATH), help="where to write the checkpoint "
                        "(default: the file minis ships, which build_backbone('small', pretrained=True) loads)")
    parser.add_argument("--epochs", type=int, help=f"default: {PRETRAIN_RECIPE['epochs']}")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    checkpoint = pretrain_small_backbone(args.root, epochs=args.epochs, seed=args.seed, device=args.device)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    torch.save(checkpoint, args.out)
    meta = checkpoint["meta"]
    print(f"FCN-32s on the pretraining shapes: val mIoU {meta['val_mIoU']:.4f} after {meta['train_s']:.0f} s; "
          f"backbone written to {args.out}")
    return 0
