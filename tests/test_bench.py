"""The benchmark command: its rows, its tables and the minis/torchvision comparison, on tiny settings.

Only what the numbers *are* is tested (fields, types, ranges, parameter counts, agreement of the
ported models); how fast anything runs depends on the machine and is not asserted.
"""

from __future__ import annotations

import json

import pytest
import torch

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


def test_timed_calls_alternate_and_swap_places_each_round():
    calls = []
    medians = bench.interleaved_median_ms([lambda: calls.append("a"), lambda: calls.append("b")], runs=3, warmup=2)
    assert calls == ["a", "b", "b", "a", "a", "b", "b", "a", "a", "b"]
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


# --------------------------------------------------------------------------------------------
# bench rcnn: Mask R-CNN and minis.ops against torchvision
# --------------------------------------------------------------------------------------------

# every op of the table, at sizes that take milliseconds
TINY_OPS = {
    "box_iou": {"boxes": 50}, "generalized_box_iou": {"boxes": 50}, "nms": {"boxes": 80},
    "batched_nms": {"boxes": 80, "classes": 5},
    **{op: {"boxes": 8, "channels": 4, "height": 20, "width": 24} for op in ("roi_align_7x7", "roi_align_14x14")},
    "roi_pool_7x7": {"boxes": 8, "channels": 4, "height": 10, "width": 12},
    "multiscale_roi_align": {"boxes": 20, "channels": 4, "height": 128, "width": 160},
    "paste_masks_in_image": {"masks": 5, "height": 40, "width": 50},
    "AnchorGenerator": {"height": 128, "width": 160}, "BoxCoder.decode": {"boxes": 100},
}
LOSSES = {"loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg"}


@pytest.fixture(scope="module")
def rcnn_rows(one_thread):
    return bench.bench_rcnn(image_size=(96, 128), min_size=64, runs=1, progress=False)


def test_rcnn_rows_time_inference_and_a_training_step(rcnn_rows):
    assert [(row["model"], row["step"], row["input"]) for row in rcnn_rows] == [
        ("maskrcnn_resnet50_fpn", "inference", "1x3x96x128 -> 64x85"),
        ("maskrcnn_resnet50_fpn", "train step", "2x3x96x128 -> 64x85"),
    ]
    for row in rcnn_rows:
        assert row["minis_ms"] > 0 and row["torchvision_ms"] > 0
        assert row["ratio"] == pytest.approx(row["minis_ms"] / row["torchvision_ms"])


def test_rcnn_rows_show_the_same_detections_and_losses(rcnn_rows):
    inference, train = rcnn_rows
    # random weights, yet confident: the full 100 detections, so masks are predicted and pasted too
    assert inference["minis_detections"] == inference["torchvision_detections"] == 100
    assert inference["labels_equal"] and inference["outputs"] == "100 detections, same labels"
    assert inference["max_abs_diff"] <= 1e-4
    assert set(train["minis_losses"]) == set(train["torchvision_losses"]) == LOSSES | {"loss_mask"}
    assert train["outputs"] == "5 losses" and train["max_abs_diff"] <= 1e-4


def test_torchvision_rcnn_is_the_coco_recipe_with_random_statistics():
    from torchvision.ops import FrozenBatchNorm2d

    model = bench.torchvision_rcnn("fasterrcnn_resnet50_fpn", seed=3, min_size=64)
    assert type(model).__name__ == "FasterRCNN" and model.roi_heads.box_predictor.cls_score.out_features == 91
    assert model.transform.min_size == (64,) and model.transform.max_size == 1333
    assert isinstance(model.backbone.body.bn1, FrozenBatchNorm2d)
    assert not model.backbone.body.layer1[0].conv1.weight.requires_grad  # three trainable stages
    assert model.backbone.body.layer2[0].conv1.weight.requires_grad
    assert 0 < model.backbone.body.bn1.running_mean.abs().max() <= 0.1
    # the seed decides the weights
    again = bench.torchvision_rcnn("fasterrcnn_resnet50_fpn", seed=3, min_size=64)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))


def test_ops_rows_agree_with_torchvision(one_thread):
    rows = bench.bench_ops(sizes=TINY_OPS, runs=1, progress=False)
    assert [row["op"] for row in rows] == list(bench.OP_SIZES)
    for row in rows:
        assert row["minis_ms"] > 0 and row["torchvision_ms"] > 0
        assert row["ratio"] == pytest.approx(row["minis_ms"] / row["torchvision_ms"])
        if row["op"] in ("nms", "batched_nms"):
            assert row["max_abs_diff"] == "equal", row
        else:
            assert isinstance(row["max_abs_diff"], float) and row["max_abs_diff"] <= 1e-5, row
    by_op = {row["op"]: row["input"] for row in rows}
    assert by_op["roi_align_14x14"] == "8 boxes, 1x4x20x24 map (stride 4), 14x14, sampling 2"
    assert by_op["batched_nms"] == "80 boxes, 5 classes, IoU 0.5"


def test_rcnn_and_ops_refuse_what_they_cannot_time():
    with pytest.raises(ValueError, match="no detection port to benchmark for retinanet_resnet50_fpn"):
        bench.bench_rcnn(["retinanet_resnet50_fpn"], progress=False)
    with pytest.raises(ValueError, match="runs must be at least 1"):
        bench.bench_rcnn(runs=0, progress=False)
    with pytest.raises(ValueError, match="unknown op 'roi_align'"):
        bench.bench_ops(["roi_align"], progress=False)
    with pytest.raises(ValueError, match="unknown op 'nmss'"):
        bench.bench_ops(["nms"], sizes={"nmss": {"boxes": 3}}, progress=False)


def test_table_prints_text_in_a_column_of_numbers_as_it_is():
    rows = [{"op": "nms", "max_abs_diff": "equal"}, {"op": "roi_align", "max_abs_diff": 2.4e-7}]
    assert bench.format_table(rows, ["op", ("max_abs_diff", ".1e")]).splitlines()[2:] == [
        "nms               equal",
        "roi_align       2.4e-07",
    ]


def test_rcnn_command_prints_both_tables_and_writes_json(tmp_path, capsys, one_thread):
    out = tmp_path / "rcnn.json"
    argv = ["bench", "rcnn", "--models", "fasterrcnn_resnet50_fpn", "--no-train", "--min-size", "64",
            "--image-size", "96", "128", "--runs", "1", "--ops", "box_iou", "nms", "--op-runs", "1", "--json", str(out)]
    assert main(argv) == 0
    lines = [line.split() for line in capsys.readouterr().out.splitlines()]
    assert ["model", "step", "input", "minis_ms", "torchvision_ms", "ratio", "outputs", "max_abs_diff"] in lines
    assert ["op", "input", "minis_ms", "torchvision_ms", "ratio", "max_abs_diff"] in lines
    assert any(line[:5] == ["fasterrcnn_resnet50_fpn", "inference", "1x3x96x128", "->", "64x85"] for line in lines)
    assert any(line[:1] == ["nms"] and line[-1] == "equal" for line in lines)
    assert any("load" in line and "average" in line for line in lines)
    written = json.loads(out.read_text())
    assert [(row["model"], row["step"]) for row in written["rcnn"]] == [("fasterrcnn_resnet50_fpn", "inference")]
    assert written["rcnn"][0]["minis_detections"] == written["rcnn"][0]["torchvision_detections"]
    assert [row["op"] for row in written["ops"]] == ["box_iou", "nms"]


@pytest.mark.parametrize("argv, message", [
    (["--ops", "roi_align"], "unknown op 'roi_align'; choose from box_iou, "),
    (["--runs", "0"], "--runs must be at least 1"),
    (["--op-runs", "0", "--ops-only"], "--op-runs must be at least 1"),
    (["--models", "retinanet_resnet50_fpn", "--no-ops"], "no detection port to benchmark for retinanet_resnet50_fpn"),
])
def test_rcnn_command_reports_mistakes_in_one_line(capsys, argv, message):
    assert main(["bench", "rcnn", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("minis: error: ") and message in err


def test_rcnn_training_trains_minis_and_torchvision_alike(tmp_path, one_thread):
    """Same start, same data order and samples: the two runs end with (nearly) the same loss and AP."""
    from minis.data import make_shapes

    root = tmp_path / "shapes"
    make_shapes(root, num_train=16, num_val=4, image_size=96, progress=False, **bench.SEMANTIC_SHAPES)
    rows = bench.bench_rcnn_training(str(root), train_config={"epochs": 1, "batch_size": 4, "warmup_iters": 2},
                                     progress=False)
    assert [row["implementation"] for row in rows] == ["minis", "torchvision"]
    for row in rows:
        assert 0 <= row["mask_AP"] <= 1 and 0 <= row["box_AP"] <= 1 and row["train_s"] > 0
    assert rows[0]["final_loss"] == pytest.approx(rows[1]["final_loss"], rel=1e-3)
    assert abs(rows[0]["mask_AP"] - rows[1]["mask_AP"]) <= 0.02


def test_mask_scoring_bench_trains_both_models_and_scores_ms_rcnn_both_ways(tmp_path, one_thread):
    from minis.data import make_shapes

    root = tmp_path / "shapes"
    make_shapes(root, num_train=8, num_val=4, image_size=96, progress=False, **bench.SEMANTIC_SHAPES)
    rows = bench.bench_mask_scoring(str(root), seeds=(0, 1), train_config={"epochs": 1, "batch_size": 4,
                                                                          "warmup_iters": 2}, progress=False)
    assert [(row["seed"], row["model"], row["ranking"]) for row in rows] == [
        (seed, model, ranking) for seed in (0, 1)
        for model, ranking in (("mask_rcnn", "class score"), ("ms_rcnn", "class score"), ("ms_rcnn", "class x MaskIoU"))]
    for row in rows:
        assert 0 <= row["mask_AP"] <= 1 and 0 <= row["box_AP"] <= 1 and row["train_s"] > 0
    means = bench.mask_scoring_means(rows)
    assert [(m["model"], m["ranking"], m["seeds"]) for m in means] == [
        ("mask_rcnn", "class score", 2), ("ms_rcnn", "class score", 2), ("ms_rcnn", "class x MaskIoU", 2)]
    assert means[0]["mask_AP_mean"] == pytest.approx((rows[0]["mask_AP"] + rows[3]["mask_AP"]) / 2)


def test_fcos_training_trains_minis_and_torchvision_alike(tmp_path, one_thread):
    from minis.data import make_shapes

    root = tmp_path / "shapes"
    make_shapes(root, num_train=16, num_val=4, image_size=96, progress=False, **bench.SEMANTIC_SHAPES)
    rows = bench.bench_twin_training("fcos", str(root), train_config={"epochs": 1, "batch_size": 4,
                                                                      "warmup_iters": 2}, progress=False)
    assert [row["implementation"] for row in rows] == ["minis", "torchvision"]
    for row in rows:
        assert 0 <= row["box_AP"] <= 1 and row["mask_AP"] is None and row["train_s"] > 0
    assert rows[0]["final_loss"] == pytest.approx(rows[1]["final_loss"], rel=1e-3)
    assert abs(rows[0]["box_AP"] - rows[1]["box_AP"]) <= 0.02
    with pytest.raises(ValueError, match="no torchvision twin to train for 'condinst'"):
        bench.bench_twin_training("condinst", str(root), progress=False)


def test_fcos_port_is_timed_against_torchvision_with_the_same_detections_and_losses(one_thread):
    rows = bench.bench_rcnn(["fcos_resnet50_fpn"], image_size=(96, 128), min_size=64, max_size=96, runs=1,
                            progress=False)
    inference, training = rows
    assert inference["outputs"] == "100 detections, same labels" and inference["max_abs_diff"] <= 1e-4
    assert training["outputs"] == "3 losses" and training["max_abs_diff"] <= 1e-4
    assert set(training["minis_losses"]) == {"loss_classifier", "loss_box_giou", "loss_centerness"}


def test_condinst_bench_times_three_models_and_the_growth_with_instances(capsys, tmp_path, one_thread):
    out = tmp_path / "condinst.json"
    argv = ["bench", "condinst", "--image-size", "96", "128", "--min-size", "64", "--max-size", "96", "--runs", "1",
            "--instances", "1", "4", "--detections", "4", "--json", str(out)]
    assert main(argv) == 0
    lines = [line.split() for line in capsys.readouterr().out.splitlines()]
    assert ["model", "step", "input", "ms", "vs_fcos", "vs_mask_rcnn"] in lines
    written = json.loads(out.read_text())
    assert [(row["model"], row["step"]) for row in written["models"]] == [
        (model, step) for step in ("inference", "train step") for model in ("fcos", "condinst", "mask_rcnn")]
    for row in written["models"]:
        assert row["ms"] > 0
        assert row["vs_fcos"] == pytest.approx(row["ms"] / next(r["ms"] for r in written["models"]
                                                                 if r["model"] == "fcos" and r["step"] == row["step"]))
    assert [row["instances"] for row in written["instances"]] == [1, 4]
    assert written["instances"][0]["condinst_vs_1"] == 1.0 and written["instances"][0]["mask_rcnn_vs_1"] == 1.0
    assert main(["bench", "condinst", "--instances", "0"]) == 2
