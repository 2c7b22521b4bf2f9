"""The command line end to end: data -> train -> eval -> predict -> train --resume.

train, eval, predict and the resumed train run ``python -m minis`` in a subprocess, as a user
would. Data generation and the mistakes (unknown model, missing data, missing checkpoint) go
through ``minis.cli.main`` in-process, which is the same code without the start-up time:
``main`` *returning* 2 (rather than raising) is what keeps tracebacks away from the user.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from minis.cli import main

TRAIN = ["train", "baseline_fcn", "--data", "shapes", "--batch-size", "8", "--lr", "0.05", "--model-arg", "width=8"]


def minis(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.run(
        [sys.executable, "-m", "minis", *args], capture_output=True, text=True, timeout=300, env=env, cwd=cwd
    )


def ok(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done.stdout


def value_of(stdout: str, name: str) -> str:
    """The value column of the line ``name  value`` in a printed metrics table."""
    return next(line.split()[1] for line in stdout.splitlines() if line.split()[:1] == [name])


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    argv = ["data", "shapes", "--root", str(tmp / "shapes"), "--num-train", "16", "--num-val", "7", "--image-size", "64"]
    assert main(argv) == 0
    assert json.loads((tmp / "shapes" / "meta.json").read_text())["num_val"] == 7
    return tmp


@pytest.fixture(scope="module")
def trained(workspace):
    stdout = ok(minis(*TRAIN, "--data-root", "shapes", "--epochs", "1", "--out", "runs/one", cwd=workspace))
    return workspace, stdout


def test_train_writes_a_run_and_prints_metrics(trained):
    tmp, stdout = trained
    run = tmp / "runs" / "one"
    assert {"last.pt", "metrics.jsonl", "curves.png"} <= {p.name for p in run.iterdir()}
    checkpoint = torch.load(run / "last.pt", weights_only=True)
    assert checkpoint["build_args"] == {"name": "baseline_fcn", "num_classes": 6, "width": 8}
    assert checkpoint["data"] == {"kind": "shapes", "root": "shapes", "task": "semantic"}
    assert checkpoint["config"]["lr"] == 0.05 and checkpoint["epoch"] == 1
    assert value_of(stdout, "mIoU") == f"{checkpoint['history'][-1]['val']['mIoU']:.4f}"


def test_eval_rebuilds_model_and_data_from_the_checkpoint(trained):
    tmp, train_stdout = trained
    stdout = ok(minis("eval", "runs/one/last.pt", "--device", "cpu", cwd=tmp))
    assert "7 images" in stdout
    assert value_of(stdout, "mIoU") == value_of(train_stdout, "mIoU")
    assert value_of(stdout, "per_class_iou_circle") is not None


def test_predict_draws_one_png_per_image(trained):
    tmp, _ = trained
    images = ["shapes/val/images/000001.png", "shapes/val/images/000002.png"]
    stdout = ok(minis("predict", "runs/one/last.pt", *images, "--out", "predictions", cwd=tmp))
    for name in ("000001.png", "000002.png"):
        path = tmp / "predictions" / name
        assert str(Path("predictions") / name) in stdout
        with Image.open(path) as drawing:
            assert drawing.format == "PNG" and min(drawing.size) > 64


def test_resume_continues_from_last_checkpoint(trained):
    tmp, _ = trained
    before = (tmp / "runs" / "one" / "metrics.jsonl").read_text().splitlines()
    ok(minis(*TRAIN, "--data-root", "shapes", "--epochs", "2", "--out", "runs/one", "--resume", cwd=tmp))
    checkpoint = torch.load(tmp / "runs" / "one" / "last.pt", weights_only=True)
    assert checkpoint["epoch"] == 2 and [r["epoch"] for r in checkpoint["history"]] == [0, 1]
    after = (tmp / "runs" / "one" / "metrics.jsonl").read_text().splitlines()
    assert after[: len(before)] == before  # epoch 0's records kept, epoch 1's appended
    assert {json.loads(line)["epoch"] for line in after[len(before):]} == {1}


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "no_such_model", "--data-root", "shapes", "--out", "r"], "unknown model 'no_such_model'; available: "),
        (["eval", "missing.pt"], "no checkpoint at missing.pt"),
        (["predict", "missing.pt", "x.png", "--out", "p"], "no checkpoint at missing.pt"),
        (["train", "baseline_fcn", "--data", "coco", "--data-root", "nowhere", "--out", "r"], "python -m minis data coco"),
        (["train", "baseline_fcn", "--data-root", "shapes", "--out", "fresh", "--resume"], "no checkpoint"),
        (["train", "baseline_fcn", "--data-root", "shapes", "--out", "r", "--model-arg", "width"], "KEY=VALUE"),
        (["data", "shapes", "--root", "shapes", "--num-val", "9"], "other parameters"),
    ],
)
def test_user_mistakes_in_process(workspace, monkeypatch, capsys, argv, message):
    monkeypatch.chdir(workspace)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("minis: error: ") and message in err


def test_predict_names_a_missing_image(trained, monkeypatch, capsys):
    tmp, _ = trained
    monkeypatch.chdir(tmp)
    assert main(["predict", "runs/one/last.pt", "nope.png", "--out", "p"]) == 2
    assert "no image file nope.png" in capsys.readouterr().err
