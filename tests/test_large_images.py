"""Large photos fit in memory: predict and eval with 100 detections, and mask targets of large images.

A 12-megapixel photo with 100 detections would hold 100 float masks of 48 MB each if models
returned torchvision's ``[N,1,H,W]`` probabilities to the engine. The engine asks for RLEs
instead (``minis.ops.masks.rle_masks``); here the peak memory of ``minis predict`` and
``minis eval`` is measured in a subprocess, on a 2000x1500 image (float masks alone would be
1.2 GB there), as the rise of the process's peak RSS over its RSS after a warm-up run on a small
image.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from minis.models.ms_rcnn import gt_area_inside_boxes

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py

# The child process: builds an untrained model with its small settings and 100 forced detections,
# writes it as a checkpoint and a COCO folder with one photo, runs predict and eval once on a small
# photo (imports, lazy allocations), then measures each command on the large photo.
CHILD = r'''
import json, sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import minis.models
from minis.cli import main
from minis.engine import save_checkpoint

root, name, height, width = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
FORCE = {"mask_rcnn": {"box_score_thresh": 0.0, "box_detections_per_img": 100},
         "condinst": {"score_thresh": 0.0, "detections_per_img": 100}}


def status(key):
    line = next(l for l in open("/proc/self/status").read().splitlines() if l.startswith(key))
    return int(line.split()[1]) * 1024


def coco_folder(folder, height, width):
    (folder / "val2017").mkdir(parents=True)
    (folder / "annotations").mkdir()
    rng = np.random.default_rng(0)
    small = rng.integers(0, 255, (max(height // 40, 2), max(width // 40, 2), 3), dtype=np.uint8)
    Image.fromarray(small).resize((width, height), Image.BILINEAR).save(folder / "val2017" / "1.jpg", quality=90)
    s = min(height, width) // 4
    annotations = [{"id": k + 1, "image_id": 1, "category_id": k + 1, "iscrowd": 0, "area": s * s,
                    "bbox": [x, y, s, s], "segmentation": [[x, y, x + s, y, x + s, y + s, x, y + s]]}
                   for k, (x, y) in enumerate([(s // 2, s // 2), (2 * s, s)])]
    data = {"images": [{"id": 1, "file_name": "1.jpg", "height": height, "width": width}],
            "annotations": annotations, "categories": [{"id": i, "name": f"c{i}"} for i in (1, 2, 3)]}
    (folder / "annotations" / "instances_val2017.json").write_text(json.dumps(data))
    return folder


torch.manual_seed(0)
model = minis.models.build(name, num_classes=4, **{**minis.models.shapes_settings(name), **FORCE[name]})
save_checkpoint({"model": model.state_dict(), "build_args": model.build_args,
                 "class_names": ["background", "c1", "c2", "c3"]}, root / "last.pt")
del model
folders = {"small": coco_folder(root / "small", 150, 200), "large": coco_folder(root / "large", height, width)}


def run(command, size):
    folder = folders[size]
    if command == "predict":
        argv = ["predict", str(root / "last.pt"), str(folder / "val2017" / "1.jpg"), "--out", str(root / size),
                "--device", "cpu", "--score-threshold", "0"]
    else:
        argv = ["eval", str(root / "last.pt"), "--data", "coco", "--data-root", str(folder), "--device", "cpu",
                "--batch-size", "1"]
    assert main(argv) == 0


for command in ("predict", "eval"):
    run(command, "small")
rises = {}
for command in ("predict", "eval"):
    open("/proc/self/clear_refs", "w").write("5")  # peak RSS := current RSS
    before = status("VmRSS")
    run(command, "large")
    rises[command] = status("VmHWM") - before
print("RISES " + json.dumps(rises))
'''


def peak_rises(tmp_path: Path, name: str, height: int, width: int) -> dict[str, int]:
    """Bytes by which predict's and eval's peak RSS rise above the RSS before each, on a ``height x width`` photo."""
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run([sys.executable, str(script), str(tmp_path), name, str(height), str(width)],
                          capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    line = next(line for line in done.stdout.splitlines() if line.startswith("RISES "))
    return json.loads(line[len("RISES "):])


def _can_reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as file:
            file.write("5")
        return True
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux") or not _can_reset_peak_rss(),
                    reason="measures the peak RSS through Linux's /proc/self/clear_refs and /proc/self/status")
@pytest.mark.parametrize("name", ["mask_rcnn", "condinst"])
def test_predict_and_eval_of_100_detections_on_a_large_photo_stay_small(tmp_path, name):
    rises = peak_rises(tmp_path, name, 1500, 2000)
    # 100 float masks of 1500 x 2000 pixels alone are 1.2 GB; the image itself is 36 MB of float
    # per copy. Measured: 0.2-0.35 GB (CHUNK_BYTES of float masks at a time, the image and its copies).
    for command, rise in rises.items():
        assert rise < 800 * 2**20, f"{command}: peak RSS rose by {rise / 2**20:.0f} MB"
    print(name, {command: f"{rise / 2**20:.0f} MB" for command, rise in rises.items()})


# --------------------------------------------------------------------------------------------
# Mask Scoring R-CNN's targets: integral images a chunk of objects at a time
# --------------------------------------------------------------------------------------------


def test_gt_area_inside_boxes_counts_pixel_centres_in_each_box_chunk_by_chunk(monkeypatch):
    from minis.ops import masks as mask_ops

    generator = torch.Generator().manual_seed(0)
    masks = (torch.rand(7, 37, 53, generator=generator) > 0.6).to(torch.uint8)
    masks[3] = 0  # an empty object: fraction 0, no division by zero
    corner = torch.rand(40, 2, generator=generator) * torch.tensor([53.0, 37.0]) - 5
    boxes = torch.cat([corner, corner + torch.rand(40, 2, generator=generator) * 40], dim=1)
    matched = torch.randint(0, 7, (40,), generator=generator)
    # brute force from the definition: a pixel counts when its centre (x + 0.5, y + 0.5) is in [x1, x2) x [y1, y2)
    centre_x = torch.arange(53) + 0.5
    centre_y = torch.arange(37) + 0.5
    expected = []
    for box, g in zip(boxes.tolist(), matched.tolist()):
        inside_x = (centre_x >= box[0]) & (centre_x < box[2])
        inside_y = (centre_y >= box[1]) & (centre_y < box[3])
        inside = (masks[g].bool() & inside_y[:, None] & inside_x[None, :]).sum()
        expected.append(float(inside) / max(float(masks[g].sum()), 1.0))
    for chunk_bytes in (mask_ops.CHUNK_BYTES, 38 * 54 * 4 * 2, 1):  # everything at once, 2 objects, 1 object
        monkeypatch.setattr(mask_ops, "CHUNK_BYTES", chunk_bytes)
        torch.testing.assert_close(gt_area_inside_boxes(masks, boxes, matched), torch.tensor(expected))
