"""The benchmark command: its rows, its tables and the minis/torchvision comparison, on tiny settings.

Only what the numbers *are* is tested (fields, types, ranges, parameter counts, agreement of the
ported models); how fast anything runs depends on the machine and is not asserted.
"""

from __future__ import annotations

import importlib
import json
import sys
import types

import pytest
import torch
import torchvision

import minis.models
from minis import bench
from minis.bench import gpu
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
    from minis.models import unet

    assert bench.resolve_models(["unet", "fcn8s"]) == [("unet", unet.SHAPES_OPTIONS), ("fcn8s", {})]
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
    **{op: {"boxes": 8, "channels": 4, "height": 20, "width": 24}
       for op in ("roi_align_7x7", "roi_align_14x14", "roi_align_backward_7x7")},
    "roi_pool_7x7": {"boxes": 8, "channels": 4, "height": 10, "width": 12},
    **{op: {"boxes": 8, "channels": 2 * 7 * 7, "height": 10, "width": 12}
       for op in ("ps_roi_align_7x7", "ps_roi_pool_7x7")},
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
    with pytest.raises(ValueError, match="no detection port to benchmark for ssd300_vgg16"):
        bench.bench_rcnn(["ssd300_vgg16"], progress=False)
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
    (["--models", "ssd300_vgg16", "--no-ops"], "no detection port to benchmark for ssd300_vgg16"),
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


def test_retinanet_port_is_timed_against_torchvision_with_the_same_detections_and_losses(one_thread):
    rows = bench.bench_rcnn(["retinanet_resnet50_fpn"], image_size=(96, 128), min_size=64, max_size=96, runs=1,
                            progress=False)
    inference, training = rows
    assert inference["outputs"] == "300 detections, same labels" and inference["max_abs_diff"] <= 1e-4
    assert training["outputs"] == "2 losses" and training["max_abs_diff"] <= 1e-4
    assert set(training["minis_losses"]) == {"loss_classifier", "loss_box_reg"}


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


def test_fcis_bench_times_fcis_against_mask_rcnn_on_one_body(capsys, tmp_path, one_thread):
    out = tmp_path / "fcis.json"
    argv = ["bench", "fcis", "--image-size", "96", "128", "--min-size", "64", "--max-size", "96", "--runs", "1",
            "--instances", "1", "3", "--detections", "3", "--json", str(out)]
    assert main(argv) == 0
    lines = [line.split() for line in capsys.readouterr().out.splitlines()]
    assert ["model", "step", "input", "params", "ms", "vs_mask_rcnn"] in lines
    written = json.loads(out.read_text())
    assert [(row["model"], row["step"]) for row in written["models"]] == [
        (model, step) for step in ("inference", "train step") for model in ("fcis", "mask_rcnn")]
    for row in written["models"]:
        reference = next(r["ms"] for r in written["models"] if r["model"] == "mask_rcnn" and r["step"] == row["step"])
        assert row["ms"] > 0 and row["vs_mask_rcnn"] == pytest.approx(row["ms"] / reference)
    assert [row["instances"] for row in written["instances"]] == [1, 3]
    assert written["instances"][0]["fcis_vs_1"] == 1.0 and written["instances"][0]["mask_rcnn_vs_1"] == 1.0
    assert main(["bench", "fcis", "--runs", "0"]) == 2


def test_yolact_bench_times_yolact_against_mask_rcnn_and_fast_nms_against_nms(capsys, tmp_path, one_thread):
    out = tmp_path / "yolact.json"
    argv = ["bench", "yolact", "--image-size", "96", "128", "--min-size", "64", "--max-size", "96", "--runs", "1",
            "--instances", "1", "3", "--detections", "3", "--json", str(out)]
    assert main(argv) == 0
    lines = [line.split() for line in capsys.readouterr().out.splitlines()]
    assert ["model", "step", "input", "params", "ms", "vs_mask_rcnn"] in lines
    written = json.loads(out.read_text())
    assert [(row["model"], row["step"]) for row in written["models"]] == [
        (model, step) for step in ("inference", "train step") for model in ("yolact", "mask_rcnn")]
    assert [row["instances"] for row in written["instances"]] == [1, 3]
    fast, greedy, compiled = written["fast_nms"]
    assert greedy["kept"] == compiled["kept"] and 0 < fast["kept"] < greedy["kept"]  # Fast NMS keeps a subset
    assert compiled["vs_torchvision"] == 1.0


def test_clustered_detections_overlap_within_a_class():
    from minis.bench.yolact import clustered_detections

    boxes, scores, labels = clustered_detections(3, 50, 200, torch.Generator().manual_seed(0))
    assert boxes.shape == (150, 4) and scores.shape == (150,) and labels.bincount().tolist() == [50, 50, 50]
    assert (boxes[:, 2:] >= boxes[:, :2]).all() and boxes.min() >= 0 and boxes.max() <= 200
    iou = torchvision.ops.box_iou(boxes[:50], boxes[:50])
    assert (iou > 0.5).sum() > 100  # jittered copies of a few objects: many overlapping pairs


def test_instance_cost_models_share_one_body():
    from minis.bench.condinst import _one_stage_and_two_stage
    from minis.bench.fcis import _fcis_and_mask_rcnn

    fcis_models = _fcis_and_mask_rcnn(4, 0, 64, 96, mask_voting=True)
    for name, parameter in fcis_models["mask_rcnn"].backbone.body.state_dict().items():
        assert torch.equal(fcis_models["fcis"].backbone.state_dict()[name], parameter), name
    assert fcis_models["fcis"].backbone.output_stride == 16  # dilated last stage, the same weights
    condinst_models = _one_stage_and_two_stage(4, 0, 64, 96)
    body = condinst_models["mask_rcnn"].backbone.body.state_dict()
    for model in condinst_models.values():
        assert all(torch.equal(model.backbone.body.state_dict()[name], value) for name, value in body.items())


# --------------------------------------------------------------------------------------------
# The package: one module per suite, recipes beside the models
# --------------------------------------------------------------------------------------------

SUITE_COMMANDS = ["semantic", "rcnn", "rcnn-training", "fcos-training", "ms-rcnn", "condinst", "fcis", "yolact", "solo", "gpu",
                  "stability"]


@pytest.mark.parametrize("suite", SUITE_COMMANDS)
def test_every_suite_has_its_help(suite, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", suite, "--help"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: minis bench {suite} ")


def test_bench_lists_the_commands_of_every_suite_module(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    assert "{" + ",".join(SUITE_COMMANDS) + "}" in capsys.readouterr().out
    for name in bench.SUITES:
        module = importlib.import_module(f"minis.bench.{name}")
        assert callable(module.add_parser) and callable(module.run), name


def test_a_new_suite_is_one_module_listed_in_suites(monkeypatch, capsys):
    """A suite module added to SUITES gets its command, and no other suite changes."""
    suite = types.ModuleType("minis.bench.hello")

    def add_parser(suites):
        parser = suites.add_parser("hello", help="says hello")
        parser.add_argument("--name", default="world")
        parser.set_defaults(handler=lambda args: print(f"hello {args.name}") or 0)

    suite.add_parser = add_parser
    monkeypatch.setitem(sys.modules, "minis.bench.hello", suite)
    monkeypatch.setattr(bench, "SUITES", (*bench.SUITES, "hello"))
    assert main(["bench", "hello", "--name", "suite"]) == 0
    assert capsys.readouterr().out == "hello suite\n"
    assert main(["bench", "semantic", "--models", "segformer", "--no-ports"]) == 2  # the others still answer


def test_recipes_live_beside_the_models_and_are_defined_once():
    from minis.data import shapes
    from minis.engine import TrainConfig
    from minis.models import condinst, fcos, rcnn

    config = TrainConfig(**rcnn.SHAPES_RECIPE)  # every key is a TrainConfig field
    assert (config.epochs, config.batch_size, config.lr, config.optimizer) == (6, 8, 0.003, "adamw")
    # FCOS and CondInst train with Mask R-CNN's recipe: the same dict, not a copy of its numbers
    assert fcos.SHAPES_RECIPE is rcnn.SHAPES_RECIPE and condinst.SHAPES_RECIPE is rcnn.SHAPES_RECIPE
    assert bench.SEMANTIC_SHAPES is shapes.SEMANTIC_SHAPES
    assert not hasattr(bench, "RCNN_TRAINING_CONFIG")  # no recipe left in the benchmarks
    # the semantic chapters share one recipe; each model file adds its epochs (and FCN its stages)
    from minis.models import baseline, deeplab, fcn, pspnet, unet
    from minis.nn import SEMANTIC_SHAPES_RECIPE

    for module in (baseline, fcn, unet, deeplab, pspnet):
        TrainConfig(**module.SHAPES_RECIPE)
    for module in (fcn, unet, deeplab, pspnet):
        assert module.SHAPES_RECIPE.items() >= SEMANTIC_SHAPES_RECIPE.items()


def test_random_target_masks_fill_their_rounded_boxes():
    generator = torch.Generator().manual_seed(0)
    (target,) = bench.random_targets(1, (40, 50), 5, 6, generator, with_masks=True)
    expected = torch.zeros(6, 40, 50, dtype=torch.uint8)
    for k, (x1, y1, x2, y2) in enumerate(target["boxes"].round().long().tolist()):
        expected[k, y1:y2, x1:x2] = 1
    assert torch.equal(target["masks"], expected)
    assert ((target["labels"] >= 1) & (target["labels"] < 5)).all()


# --------------------------------------------------------------------------------------------
# bench gpu, run on the CPU without mixed precision
# --------------------------------------------------------------------------------------------


def test_fixed_batch_boxes_are_the_tight_boxes_of_the_masks():
    items = gpu.fixed_batch("instance", image_size=64, batch_size=3, seed=1)
    for image, target in items:
        assert image.shape == (3, 64, 64) and 0 <= image.min() and image.max() <= 1
        masks = target["masks"]
        assert len(masks) >= 1 and masks.dtype == torch.uint8 and target["labels"].dtype == torch.int64
        tight = torchvision.ops.masks_to_boxes(masks) + torch.tensor([0.0, 0.0, 1.0, 1.0])  # its ends are inclusive
        assert torch.equal(target["boxes"], tight)
        assert torch.equal(target["area"], masks.sum(dim=(1, 2)).float())
    semantic = gpu.fixed_batch("semantic", image_size=64, batch_size=3, seed=1)
    for (image, target), (same_image, instance_target) in zip(semantic, items):
        assert torch.equal(image, same_image)  # the same images, labelled per pixel
        expected = (instance_target["masks"].long() * instance_target["labels"][:, None, None]).sum(0)
        assert torch.equal(target["semantic"], expected)


def _detections(count: int, size: tuple[int, int], num_classes: int = 6) -> dict:
    return {"boxes": torch.rand(count, 4) * 10, "labels": torch.randint(1, num_classes, (count,)),
            "scores": torch.rand(count), "masks": torch.rand(count, 1, *size)}


@pytest.mark.parametrize("change, message", [
    (lambda d: d.update(labels=d["labels"] * 0), "labels"),  # the background label
    (lambda d: d.update(labels=d["labels"].float()), "labels"),
    (lambda d: d.update(labels=torch.full_like(d["labels"], 6)), "labels"),  # K + 1
    (lambda d: d.update(scores=d["scores"] + 1), "scores"),
    (lambda d: d.update(masks=d["masks"][..., :-1]), "masks"),  # not at the image's size
    (lambda d: d.update(masks=d["masks"][:, 0]), "masks"),  # [N,H,W] instead of [N,1,H,W]
    (lambda d: d.update(boxes=d["boxes"][:, :3]), "boxes"),
    (lambda d: d.update(mask_scores=torch.rand(2)), "mask_scores"),  # one per detection
    (lambda d: d.pop("masks"), "no masks"),
])
def test_instance_contract_names_what_is_wrong(change, message):
    good = _detections(3, (20, 30))
    assert gpu.instance_contract([good, _detections(0, (20, 30))], [(20, 30), (20, 30)], 6, True) == []
    change(good)
    problems = gpu.instance_contract([good], [(20, 30)], 6, learns_masks=True)
    assert len(problems) == 1 and message in problems[0]


def test_box_only_models_need_no_masks_and_semantic_logits_are_checked():
    boxes_only = _detections(2, (20, 30))
    del boxes_only["masks"]
    assert gpu.instance_contract([boxes_only], [(20, 30)], 6, learns_masks=False) == []
    assert "2 dicts" in gpu.instance_contract([boxes_only], [(20, 30)] * 2, 6, learns_masks=False)[0]
    assert gpu.semantic_contract(torch.zeros(2, 6, 16, 16), (2, 3, 16, 16), 6) == []
    assert gpu.semantic_contract(torch.zeros(2, 6, 8, 8), (2, 3, 16, 16), 6)  # not at input resolution
    assert gpu.semantic_contract(torch.full((2, 6, 16, 16), float("nan")), (2, 3, 16, 16), 6)


@pytest.mark.slow
def test_gpu_command_trains_and_checks_every_model_on_the_cpu(tmp_path, capsys, one_thread):
    out = tmp_path / "gpu.json"
    argv = ["bench", "gpu", "--device", "cpu", "--iterations", "6", "--image-size", "64", "--inference-runs", "1",
            "--no-torchvision", "--json", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert ["model", "device", "amp", "first_loss", "last_loss", "falls", "finite", "contract", "train_ms",
            "inference_ms"] in [line.split() for line in printed.splitlines()]
    rows = json.loads(out.read_text())["models"]
    assert [row["model"] for row in rows] == minis.models.list_models()  # new models join by registering
    for row in rows:
        assert row["passed"] and row["problems"] == [], row
        assert (row["device"], row["amp"], row["falls"], row["finite"], row["contract"]) == ("cpu", "no", "yes",
                                                                                             "yes", "ok")
        assert len(row["losses"]) == 6 and row["last_loss"] < row["first_loss"]
        assert row["train_ms"] > 0 and row["inference_ms"] > 0
    assert f"{len(rows)} of {len(rows)} models passed every check" in printed


def test_gpu_command_fails_when_a_loss_does_not_fall(capsys, one_thread):
    # with a learning rate of 0 nothing is learned: the same batch gives the same loss at every step
    argv = ["bench", "gpu", "--device", "cpu", "--models", "baseline_fcn", "--iterations", "4", "--image-size", "32",
            "--lr", "0", "--inference-runs", "1", "--no-torchvision"]
    assert main(argv) == 1
    printed = capsys.readouterr().out
    assert "baseline_fcn: the loss did not fall" in printed and "0 of 1 models passed" in printed


def test_gpu_bench_reports_a_non_finite_loss_and_a_crash(monkeypatch, one_thread):
    class Exploding(torch.nn.Module):
        task = "semantic"

        def __init__(self, num_classes: int, fail: bool = False) -> None:
            super().__init__()
            self.scale, self.fail = torch.nn.Parameter(torch.ones(())), fail

        def forward(self, images, targets=None):
            if self.fail:
                raise RuntimeError("expected scalar type Half but found Float")
            return {"loss_ce": self.scale * float("inf")}

    monkeypatch.setitem(minis.models._REGISTRY, "exploding", Exploding)
    monkeypatch.setitem(minis.models._REGISTRY, "crashing", lambda num_classes: Exploding(num_classes, fail=True))
    exploding, crashing = gpu.bench_gpu(["exploding", "crashing"], device="cpu", iterations=3, image_size=32,
                                        progress=False)
    assert exploding["finite"] == "no" and not exploding["passed"] and "non-finite loss" in exploding["problems"][0]
    assert not crashing["passed"]
    assert crashing["problems"] == ["RuntimeError: expected scalar type Half but found Float"]


def test_gpu_command_times_mask_rcnn_and_fcos_with_bench_rcnn(monkeypatch, capsys):
    """The torchvision timing is bench rcnn's, on the command's device and precision."""
    calls = []

    def fake_bench_rcnn(names, **options):
        calls.append((names, options))
        return [{"model": name, "step": "inference", "minis_ms": 1.0, "torchvision_ms": 1.0, "ratio": 1.0}
                for name in names]

    monkeypatch.setattr("minis.bench.rcnn.bench_rcnn", fake_bench_rcnn)
    argv = ["bench", "gpu", "--device", "cpu", "--models", "baseline_fcn", "--iterations", "4", "--image-size", "32",
            "--inference-runs", "1", "--tv-min-size", "64", "--tv-runs", "1"]
    assert main(argv) == 0
    ((names, options),) = calls
    assert names == ("maskrcnn_resnet50_fpn", "fcos_resnet50_fpn")
    assert options["device"] == torch.device("cpu") and options["amp"] is False
    assert (options["min_size"], options["max_size"], options["runs"]) == (64, 1333, 1)
    assert "fcos_resnet50_fpn" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--device", "cpu", "--amp"], "mixed precision"),
    (["--device", "cpu", "--models", "segformer"], "unknown model 'segformer'"),
    (["--device", "cpu", "--iterations", "0"], "at least 1"),
    (["--device", "gpu"], "--device"),
])
def test_gpu_command_reports_mistakes_in_one_line(argv, message, capsys):
    assert main(["bench", "gpu", "--no-torchvision", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("minis: error: ") and message in err


def test_solo_bench_times_matrix_nms_against_greedy_mask_nms(capsys, tmp_path, one_thread):
    out = tmp_path / "solo.json"
    assert main(["bench", "solo", "--masks", "20", "60", "--runs", "1", "--json", str(out)]) == 0
    assert ["method", "masks", "ms", "kept", "vs_greedy"] in [line.split() for line in capsys.readouterr().out.splitlines()]
    rows = json.loads(out.read_text())["matrix_nms"]
    assert [(row["method"].split()[0], row["masks"]) for row in rows] == [("Matrix", 20), ("greedy", 20),
                                                                          ("Matrix", 60), ("greedy", 60)]
    assert all(0 < row["kept"] <= row["masks"] for row in rows) and rows[1]["vs_greedy"] == 1.0


def test_clustered_masks_overlap_within_a_class():
    from minis.bench.solo import clustered_masks
    from minis.ops import mask_iou

    masks, labels, scores = clustered_masks(60, 4, 80, torch.Generator().manual_seed(0))
    assert masks.shape == (60, 80, 80) and masks.dtype == torch.bool and labels.max() < 4 and scores.shape == (60,)
    iou = mask_iou(masks, masks)
    same = labels[:, None] == labels[None, :]
    assert (iou[same] > 0.5).sum() > 60 + 20  # beyond the diagonal: copies of one object overlap
