"""The command line end to end: data -> train -> eval -> predict -> train --resume.

train, eval, predict and the resumed train run ``python -m minis`` in a subprocess, as a user
would. Data generation and the mistakes (unknown model, missing data, missing checkpoint) go
through ``minis.cli.main`` in-process, which is the same code without the start-up time:
``main`` *returning* 2 (rather than raising) is what keeps tracebacks away from the user.

Also in-process: ``predict`` on a checkpoint of every registered model, and every TrainConfig
field said on the command line.
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

from minis import models as registry  # `minis` below is the subprocess helper
from minis.cli import main
import minis.cli as cli_module

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
    # The first run ended with a record of its last steps (fewer than --log-every); the resumed run
    # logs those steps with the ones that follow, as one uninterrupted run would, so that record goes.
    ended = json.loads(before[-1])
    assert ended["kind"] == "train" and ended["iteration"] == checkpoint["history"][0]["iteration"]
    assert after[: len(before) - 1] == before[:-1]  # epoch 0's other records kept, epoch 1's appended
    assert {json.loads(line)["epoch"] for line in after[len(before) - 1:]} == {1}
    assert json.loads(after[-1])["kind"] == "train" and json.loads(after[-1])["iteration"] == checkpoint["iteration"]


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


# --------------------------------------------------------------------------------------------
# predict on every registered model
# --------------------------------------------------------------------------------------------


def _trainer_checkpoint(model, path: Path, class_names: list[str]) -> None:
    """Write ``model`` to ``path`` as the Trainer writes ``last.pt`` (its own checkpoint state)."""
    from minis.engine import TrainConfig, Trainer, save_checkpoint
    from minis.engine.checkpoint import capture_rng_state

    trainer = Trainer(model, None, None, TrainConfig(device="cpu", progress=False), class_names=class_names)
    save_checkpoint(trainer._checkpoint_state([capture_rng_state()]), path)


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("name", registry.list_models())
def test_predict_draws_every_registered_model(name, tmp_path, monkeypatch, capsys):
    """Untrained, with its small settings: box-only detectors, segmenting ones and semantic models all draw."""
    torch.manual_seed(0)
    model = registry.build(name, num_classes=4, **registry.shapes_settings(name))
    _trainer_checkpoint(model, tmp_path / "last.pt", ["background", "circle", "square", "triangle"])
    generator = torch.Generator().manual_seed(0)
    pixels = (torch.rand(72, 96, 3, generator=generator) * 255).to(torch.uint8).numpy()
    Image.fromarray(pixels).save(tmp_path / "photo.png")
    monkeypatch.chdir(tmp_path)
    # threshold 0: an untrained detector's low scores are drawn too, masks included
    assert main(["predict", "last.pt", "photo.png", "--out", "drawn", "--device", "cpu", "--score-threshold", "0"]) == 0
    assert str(Path("drawn") / "photo.png") in capsys.readouterr().out
    with Image.open(tmp_path / "drawn" / "photo.png") as drawing:
        assert drawing.format == "PNG" and min(drawing.size) > 50


def test_eval_and_predict_read_only_what_they_use_of_a_checkpoint(trained):
    """Weights, build arguments, data and class names; not the optimizer's state (more copies of the weights)."""
    from minis.cli import _load_checkpoint, _model_from_checkpoint

    tmp, _ = trained
    path = str(tmp / "runs" / "one" / "last.pt")
    full = torch.load(path, weights_only=True)
    assert full["optimizer"]["state"]  # SGD's momentum buffers
    checkpoint = _load_checkpoint(path)
    assert set(checkpoint) == {"model", "build_args", "data", "class_names"}
    model = _model_from_checkpoint(checkpoint, path)
    assert "model" not in checkpoint and not model.training  # the weights moved into the model
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, full["model"][name], rtol=0, atol=0)


# --------------------------------------------------------------------------------------------
# Every TrainConfig field can be said on the command line
# --------------------------------------------------------------------------------------------

# field -> (options, the value they give), each value other than TrainConfig's default
TRAIN_OPTIONS = {
    "epochs": (["--epochs", "3"], 3),
    "batch_size": (["--batch-size", "5"], 5),
    "lr": (["--lr", "0.02"], 0.02),
    "optimizer": (["--optimizer", "adamw"], "adamw"),
    "momentum": (["--momentum", "0.8"], 0.8),
    "weight_decay": (["--weight-decay", "0.001"], 0.001),
    "schedule": (["--schedule", "step"], "step"),
    "warmup_iters": (["--warmup-iters", "7"], 7),
    "warmup_factor": (["--warmup-factor", "0.2"], 0.2),
    "poly_power": (["--poly-power", "2.0"], 2.0),
    "milestones": (["--milestones", "16", "22"], (16, 22)),
    "gamma": (["--gamma", "0.5"], 0.5),
    "clip_grad_norm": (["--clip-grad", "5"], 5.0),
    "amp": (["--no-amp"], False),
    "channels_last": (["--channels-last"], True),
    "device": (["--device", "cpu"], "cpu"),
    "num_workers": (["--workers", "2"], 2),
    "seed": (["--seed", "4"], 4),
    "eval_every": (["--eval-every", "2"], 2),
    "eval_batch_size": (["--eval-batch-size", "3"], 3),
    "log_every": (["--log-every", "5"], 5),
    "progress": (["--no-progress"], False),
    "find_unused_parameters": (["--find-unused-parameters"], True),
}


def test_every_train_config_field_has_an_option():
    """A recipe written as a TrainConfig can be typed as a command; a new field fails here until it has one."""
    import dataclasses

    from minis.cli import _train_config, build_parser
    from minis.engine import TrainConfig

    assert set(TRAIN_OPTIONS) == {field.name for field in dataclasses.fields(TrainConfig)}
    defaults = dataclasses.asdict(TrainConfig())
    assert all(value != defaults[name] for name, (_, value) in TRAIN_OPTIONS.items())
    argv = ["train", "mask_rcnn", "--out", "r"] + [token for options, _ in TRAIN_OPTIONS.values() for token in options]
    config = _train_config(build_parser().parse_args(argv))
    assert dataclasses.asdict(config) == {name: value for name, (_, value) in TRAIN_OPTIONS.items()}
    # options left out keep TrainConfig's defaults
    assert dataclasses.asdict(_train_config(build_parser().parse_args(["train", "mask_rcnn", "--out", "r"]))) == {
        **defaults, "epochs": 10, "batch_size": 8}  # the command line's own defaults


@pytest.mark.parametrize(
    "options, message",
    [
        (["--schedule", "step"], "schedule='step' needs milestones"),
        (["--milestones", "8", "11"], "only apply to schedule='step'"),
        (["--schedule", "step", "--milestones", "11", "8"], "milestones must be increasing"),
    ],
)
def test_train_refuses_a_schedule_it_would_not_follow(workspace, monkeypatch, capsys, options, message):
    monkeypatch.chdir(workspace)
    assert main([*TRAIN, "--data-root", "shapes", "--out", "refused", *options]) == 2
    assert message in capsys.readouterr().err
    assert not (workspace / "refused").exists()  # refused before anything was built or written


@pytest.mark.usefixtures("one_thread")
def test_step_schedule_from_the_command_line_multiplies_the_rate_at_each_milestone(workspace, monkeypatch):
    monkeypatch.chdir(workspace)
    argv = [*TRAIN, "--data-root", "shapes", "--epochs", "3", "--out", "runs/step", "--eval-every", "0",
            "--no-progress", "--log-every", "1", "--schedule", "step", "--milestones", "1", "2", "--gamma", "0.5",
            "--momentum", "0.5"]
    assert main(argv) == 0
    checkpoint = torch.load(workspace / "runs" / "step" / "last.pt", weights_only=True)
    assert checkpoint["config"]["milestones"] == (1, 2) and checkpoint["config"]["momentum"] == 0.5
    assert checkpoint["optimizer"]["param_groups"][0]["momentum"] == 0.5
    # the rate each epoch's last step used: 0.05, then halved at epoch 1 and again at epoch 2
    assert [record["lr"] for record in checkpoint["history"]] == pytest.approx([0.05, 0.025, 0.0125])


def test_recipe_shapes_takes_the_chapters_settings_and_recipe_and_options_override_it(monkeypatch):
    import dataclasses

    from minis.cli import _train_config, build_parser
    from minis.models import condinst

    args = build_parser().parse_args(["train", "condinst", "--recipe", "shapes", "--out", "r", "--lr", "0.01"])
    config = dataclasses.asdict(_train_config(args, registry.shapes_recipe("condinst")))
    assert {k: config[k] for k in condinst.SHAPES_RECIPE if k != "lr"} == {
        k: v for k, v in condinst.SHAPES_RECIPE.items() if k != "lr"}
    assert config["lr"] == 0.01  # given on the command line: it wins
    from minis.models import pspnet

    monkeypatch.delattr(pspnet, "SHAPES_RECIPE")  # a model file without a recipe
    with pytest.raises(KeyError, match="'pspnet' has no shapes recipe; models with one: .*condinst"):
        registry.shapes_recipe("pspnet")


@pytest.mark.usefixtures("one_thread")
def test_recipe_shapes_trains_with_the_model_settings(workspace, monkeypatch, capsys):
    monkeypatch.chdir(workspace)
    argv = ["train", "fcos", "--recipe", "shapes", "--data-root", "shapes", "--epochs", "1", "--eval-every", "0",
            "--no-progress", "--out", "runs/recipe"]
    assert main(argv) == 0
    checkpoint = torch.load(workspace / "runs" / "recipe" / "last.pt", weights_only=True)
    assert checkpoint["build_args"] == {"name": "fcos", "num_classes": 6, **registry.shapes_settings("fcos")}
    assert checkpoint["config"]["warmup_iters"] == registry.shapes_recipe("fcos")["warmup_iters"]
    assert main(["train", "no_such_model", "--recipe", "shapes", "--data-root", "shapes", "--out", "r"]) == 2
    assert "--recipe shapes: unknown model 'no_such_model'" in capsys.readouterr().err


def test_recipe_shapes_builds_the_chapters_model_options_and_model_args_win(workspace, monkeypatch):
    # the semantic chapters' options live in SHAPES_OPTIONS (U-Net: width 8, depth 4, fused deep supervision)
    built = {}

    class Built(Exception):
        pass

    def capture(name, num_classes, kwargs):
        built.update(kwargs)
        raise Built

    monkeypatch.chdir(workspace)
    monkeypatch.setattr(cli_module, "_build_model", capture)
    from minis.models import unet

    for extra, expected in (([], unet.SHAPES_OPTIONS), (["--model-arg", "width=4"], {**unet.SHAPES_OPTIONS, "width": 4})):
        built.clear()
        with pytest.raises(Built):
            main(["train", "unet", "--recipe", "shapes", "--data-root", "shapes", "--out", "r", *extra])
        assert built == expected
    assert registry.chapter_options("fcos") == {}
    with pytest.raises(KeyError, match="unknown model 'no_such_model'"):
        registry.chapter_options("no_such_model")


def test_predict_val_draws_ground_truth_beside_the_prediction(trained, monkeypatch, capsys):
    tmp, _ = trained
    monkeypatch.chdir(tmp)
    assert main(["predict", "runs/one/last.pt", "--val", "2", "--out", "beside", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    drawn = sorted((tmp / "beside").iterdir())
    assert [p.name for p in drawn] == ["val_000001.png", "val_000002.png"] and "ground truth | prediction" in printed
    with Image.open(drawn[0]) as beside:
        assert beside.size[0] > 1.6 * beside.size[1]  # two square panels side by side
    assert main(["predict", "runs/one/last.pt", "--out", "nothing"]) == 2
    assert "give IMAGE files, or --val N" in capsys.readouterr().err
