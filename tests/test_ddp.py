"""Distributed training and evaluation: 2 CPU processes (gloo) started by torchrun.

The script below trains the baseline for one epoch with the Trainer, evaluates it, and evaluates
a stand-in instance model; rank 0 writes what it saw to a JSON file. The test then checks that
every validation image was evaluated exactly once (7 images on 2 ranks: an odd count, so the
shards differ in size and padding would show up as a duplicate), that the ranks ended with the
same weights, that only rank 0 wrote files, and that the distributed metrics equal a single
process evaluation of the same model.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

SCRIPT = textwrap.dedent(
    '''
    import json, sys
    import torch
    torch.set_num_threads(1)
    from torch import nn
    import minis.models
    from minis.data.catalog import build_dataset, build_datasets
    from minis.engine import Trainer, TrainConfig, distributed, evaluate
    from minis.eval.coco import coco_evaluate

    root, out = sys.argv[1], sys.argv[2]
    train_set, val_set = build_datasets("shapes", root, "semantic", progress=False)
    torch.manual_seed(0)
    model = minis.models.build("baseline_fcn", num_classes=train_set.num_classes, width=8)
    config = TrainConfig(epochs=1, batch_size=4, lr=0.05, log_every=1, progress=False, eval_batch_size=2)
    trainer = Trainer(model, train_set, val_set, config, out_dir=out + "/run")
    history = trainer.fit()
    semantic = trainer.evaluate()
    weights = distributed.all_gather_objects([p.detach().double().sum().item() for p in model.parameters()])

    class Oracle(nn.Module):
        """Returns the ground truth of every other validation image, recognised by its pixels."""
        task = "instance"
        def __init__(self, dataset):
            super().__init__()
            self.answers = {}
            for index in range(len(dataset)):
                image, target = dataset[index]
                keep = (target["iscrowd"] == 0) & torch.tensor(index % 2 == 0)
                self.answers[round(float(image.sum()), 2)] = {
                    "boxes": target["boxes"][keep].as_subclass(torch.Tensor), "labels": target["labels"][keep],
                    "scores": torch.ones(int(keep.sum())),
                    "masks": target["masks"][keep][:, None].float().as_subclass(torch.Tensor),
                }
        def forward(self, images, targets=None):
            return [self.answers[round(float(image.sum()), 2)] for image in images]

    instance_val = build_dataset("shapes", root, "instance", "val", progress=False)
    oracle = Oracle(instance_val)
    instance = evaluate(oracle, instance_val, batch_size=2, progress=False)
    if trainer.dist.is_main:
        reference = coco_evaluate(instance_val, {i: oracle([instance_val[k][0]])[0] for k, i in enumerate(instance_val.ids)})
        json.dump({
            "world_size": trainer.dist.world_size, "val_ids": val_set.ids, "history": history,
            "semantic": {k: v for k, v in semantic.items() if k in ("mIoU", "pixel_accuracy", "num_images", "image_ids")},
            "instance": instance, "instance_reference": reference, "weights": weights,
        }, open(out + "/result.json", "w"))
    distributed.cleanup()
    '''
)


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    from minis.data.shapes import make_shapes

    tmp = tmp_path_factory.mktemp("ddp")
    make_shapes(tmp / "shapes", num_train=16, num_val=7, image_size=64, seed=1, progress=False)
    (tmp / "script.py").write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        str(tmp / "script.py"), str(tmp / "shapes"), str(tmp),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, cwd=tmp)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return tmp, json.loads((tmp / "result.json").read_text())


def test_every_validation_image_is_evaluated_exactly_once(ddp_run):
    _, result = ddp_run
    assert result["world_size"] == 2
    expected = sorted(result["val_ids"])
    assert len(expected) == 7
    assert result["semantic"]["image_ids"] == expected and result["semantic"]["num_images"] == 7
    assert result["instance"]["image_ids"] == expected and result["instance"]["num_images"] == 7
    assert result["history"][0]["val"]["num_images"] == 7


def test_ranks_train_the_same_model_and_only_rank_0_writes(ddp_run):
    tmp, result = ddp_run
    rank0, rank1 = result["weights"]
    assert rank0 == rank1  # DDP averaged the gradients: identical weights on both ranks
    # 16 images on 2 ranks with batch 4: 2 steps; one log line per step, not one per rank.
    lines = [json.loads(line) for line in (tmp / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["kind"], r["iteration"]) for r in lines] == [("train", 1), ("train", 2), ("val", 2)]
    checkpoint = torch.load(tmp / "run" / "last.pt", weights_only=True)
    assert checkpoint["world_size"] == 2 and len(checkpoint["rng"]) == 2 and checkpoint["iteration"] == 2


def test_distributed_metrics_equal_single_process_metrics(ddp_run):
    tmp, result = ddp_run
    import minis.models
    from minis.data.catalog import build_dataset
    from minis.engine import evaluate, load_checkpoint

    # Instance: gathered shards scored once by pycocotools == all images scored in one process.
    for iou_type in ("bbox", "segm"):
        assert result["instance"][iou_type] == result["instance_reference"][iou_type]
        assert 0 < result["instance"][iou_type]["AP"] < 1

    # Semantic: the summed confusion matrices == one process evaluating the saved model.
    checkpoint = load_checkpoint(tmp / "run" / "last.pt")
    model = minis.models.build(**checkpoint["build_args"])
    model.load_state_dict(checkpoint["model"])
    metrics = evaluate(model, build_dataset("shapes", tmp / "shapes", "semantic", "val", progress=False), progress=False)
    assert metrics["mIoU"] == pytest.approx(result["semantic"]["mIoU"], abs=1e-4)
    assert metrics["pixel_accuracy"] == pytest.approx(result["semantic"]["pixel_accuracy"], abs=1e-4)
