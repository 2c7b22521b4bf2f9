"""The benchmark command: its rows, its tables and the minis/torchvision comparison, on tiny settings.

Only what the numbers *are* is tested (fields, types, ranges, parameter counts, agreement of the
ported models); how fast anything runs depends on the machine and is not asserted.
"""

from __future__ import annotations

import json

import pytest

import minis.models
from minis import bench
from minis.cli import main
from minis.data import SHAPE_CLASSES

TINY = {"num_train": 16, "num_val": 8, "image_size": 64, "epochs": 1}
TWO_MODELS = ["baseline_fcn", ("fcn32s", {"output_stride": 16})]


@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory):
    return tmp_path_factory.mktemp("bench") / "shapes_semantic"


@pytest.fixture(scope="module")
def semantic_rows(shapes_root, one_thread):
    return bench.bench_semantic(shapes_root, TWO_MODELS, inference_runs=2, progress=False, **TINY)


def test_semantic_rows_hold_every_measure(semantic_rows, shapes_root):
    assert [row["model"] for row in semantic_rows] == ["baseline_fcn", "fcn32s"]
    assert [row["args"] for row in semantic_rows] == ["", "output_stride=16"]
    for row in semantic_rows:
        assert isinstance(row["params"], int)
        for key in ("cpu_ms", "train_img_per_s", "train_seconds"):
            assert isinstance(row[key], float) and row[key] > 0, key
        assert 0.0 <= row["mIoU"] <= 1.0 and 0.0 <= row["pixel_accuracy"] <= 1.0
        assert row["epochs"] == 1
    # the semantic variant of the benchmark was generated, with the requested sizes
    meta = json.loads((shapes_root / "meta.json").read_text())
    assert (meta["textures"], meta["max_objects"], tuple(meta["size_range"])) == (False, 2, (0.3, 0.55))
    assert (meta["num_train"], meta["num_val"], meta["image_size"]) == (16, 8, 64)


def test_parameters_are_those_of_the_built_model(semantic_rows):
    num_classes = len(SHAPE_CLASSES) + 1
    for row, (name, kwargs) in zip(semantic_rows, bench.resolve_models(TWO_MODELS)):
        model = minis.models.build(name, num_classes, **kwargs)
        assert row["params"] == sum(parameter.numel() for parameter in model.parameters())


def test_model_choice_defaults_and_mistakes():
    names = [name for name, _ in bench.resolve_models(None)]
    assert names == ["baseline_fcn", "fcn32s", "fcn16s", "fcn8s", "unet", "deeplabv1", "deeplabv2", "deeplabv3",
                     "deeplabv3plus", "pspnet"]
    assert bench.resolve_models(["unet", "fcn8s"]) == [("unet", {"width": 8, "aux_weight": 0.4}), ("fcn8s", {})]
    with pytest.raises(ValueError, match="unknown model 'segformer'"):
        bench.resolve_models(["segformer"])
    with pytest.raises(TypeError):
        bench.resolve_models([("unet", {"no_such_option": 1})])


def test_ports_agree_with_torchvision(one_thread):
    rows = bench.bench_ports(["fcn_resnet50", "deeplabv3_resnet50"], sizes=(64,), runs=1, warmup=0, progress=False)
    assert [(row["model"], row["input"]) for row in rows] == [("fcn_resnet50", "1x3x64x64"),
                                                               ("deeplabv3_resnet50", "1x3x64x64")]
    for row in rows:
        assert row["minis_ms"] > 0 and row["torchvision_ms"] > 0
        assert row["ratio"] == pytest.approx(row["minis_ms"] / row["torchvision_ms"])
        assert row["max_abs_diff"] <= 1e-4


def test_ports_refuse_a_model_without_a_port():
    with pytest.raises(ValueError, match="lraspp_mobilenet_v3_large"):
        bench.bench_ports(["lraspp_mobilenet_v3_large"], progress=False)


def test_timed_calls_alternate():
    calls = []
    medians = bench.interleaved_median_ms([lambda: calls.append("a"), lambda: calls.append("b")], runs=3, warmup=2)
    assert calls == ["a", "b"] * 5
    assert len(medians) == 2 and all(value >= 0 for value in medians)


def test_table_aligns_text_left_and_numbers_right():
    rows = [{"model": "fcn8s", "params": 740479, "mIoU": 0.5}, {"model": "unet", "params": 12, "mIoU": None}]
    table = bench.format_table(rows, ["model", ("params", ",d"), ("mIoU", ".3f")])
    assert table.splitlines() == [
        "model   params   mIoU",
        "-----  -------  -----",
        "fcn8s  740,479  0.500",
        "unet        12      -",
    ]


def test_command_prints_both_tables_and_writes_json(shapes_root, semantic_rows, tmp_path, capsys, one_thread):
    out = tmp_path / "bench.json"
    argv = ["bench", "semantic", "--root", str(shapes_root), "--models", "baseline_fcn", "--epochs", "1",
            "--num-train", "16", "--num-val", "8", "--image-size", "64",
            "--port-models", "fcn_resnet50", "--port-sizes", "64", "--port-runs", "1", "--json", str(out)]
    assert main(argv) == 0
    lines = [line.split() for line in capsys.readouterr().out.splitlines()]
    assert ["model", "args", "params", "cpu_ms", "train_img_per_s", "mIoU"] in lines
    assert ["model", "input", "minis_ms", "torchvision_ms", "ratio", "max_abs_diff"] in lines
    assert any(line[:1] == ["baseline_fcn"] and len(line) == 5 for line in lines)  # empty args column
    assert any(line[:2] == ["fcn_resnet50", "1x3x64x64"] for line in lines)
    assert any("load" in line and "average" in line for line in lines)
    written = json.loads(out.read_text())
    assert [row["model"] for row in written["semantic"]] == ["baseline_fcn"]
    assert [row["model"] for row in written["ports"]] == ["fcn_resnet50"]
    # same seed, same data, same recipe: the command reproduces the library's row
    assert written["semantic"][0]["mIoU"] == pytest.approx(semantic_rows[0]["mIoU"], abs=1e-6)


def test_command_reports_mistakes_in_one_line(capsys):
    assert main(["bench", "semantic", "--models", "segformer", "--no-ports"]) == 2
    assert "unknown model 'segformer'" in capsys.readouterr().err
    assert main(["bench", "semantic", "--ports-only", "--port-models", "resnet50"]) == 2
    assert "no port to benchmark for resnet50" in capsys.readouterr().err
