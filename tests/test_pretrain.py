"""The small backbone's shipped pretrained weights (minis/pretrain.py) and the run that makes them."""

import torch

import minis.models
from minis.data.shapes import SEMANTIC_SHAPES
from minis.nn import build_backbone
from minis.nn.backbones import SMALL_PRETRAINED_PATH, small_pretrained_state_dict
from minis.pretrain import PRETRAIN_MODEL, PRETRAIN_RECIPE, PRETRAIN_SHAPES, pretrain_small_backbone


def test_shipped_weights_load_at_every_output_stride():
    shipped = small_pretrained_state_dict()
    for stride in (8, 16, 32):
        backbone = build_backbone("small", stride, pretrained=True)
        assert backbone.output_stride == stride
        for key, value in backbone.state_dict().items():
            assert torch.equal(value, shipped[key]), key
    torch.manual_seed(0)
    fresh = build_backbone("small", 16)
    assert not torch.equal(fresh.conv1.weight, shipped["conv1.weight"])


def test_shipped_weights_record_how_they_were_made():
    """A changed pretraining recipe without new weights fails here: the file would be stale."""
    meta = torch.load(SMALL_PRETRAINED_PATH, map_location="cpu", weights_only=True)["meta"]
    expected_data = {key: list(value) if isinstance(value, tuple) else value for key, value in PRETRAIN_SHAPES.items()}
    assert meta["data"] == expected_data
    assert meta["model"] == PRETRAIN_MODEL and meta["recipe"] == PRETRAIN_RECIPE
    assert meta["val_mIoU"] > 0.5  # FCN-32s on the pretraining set's validation images


def test_pretraining_set_shares_no_image_with_the_chapters_sets():
    assert PRETRAIN_SHAPES["seed"] != 0  # the chapters' variant is generated from seed 0
    assert {key: PRETRAIN_SHAPES[key] for key in SEMANTIC_SHAPES} == SEMANTIC_SHAPES  # the same world


def test_models_on_the_small_backbone_start_from_the_shipped_weights():
    shipped = small_pretrained_state_dict()
    for name in ("deeplabv3", "deeplabv3plus", "pspnet"):
        model = minis.models.build(name, num_classes=6, pretrained_backbone=True)
        assert torch.equal(model.backbone.layer4[1].conv2.weight, shipped["layer4.1.conv2.weight"]), name


def test_a_tiny_pretraining_run_gives_weights_a_model_loads(tmp_path):
    tiny = {**SEMANTIC_SHAPES, "seed": 1, "num_train": 16, "num_val": 4, "image_size": 64}
    torch.manual_seed(0)
    initial = build_backbone("small", 32).state_dict()
    checkpoint = pretrain_small_backbone(str(tmp_path / "shapes"), epochs=1, shapes=tiny, progress=False)
    assert set(checkpoint["backbone"]) == set(initial)
    assert not torch.equal(checkpoint["backbone"]["conv1.weight"], initial["conv1.weight"])  # it trained
    assert checkpoint["meta"]["data"]["num_train"] == 16 and checkpoint["meta"]["recipe"]["epochs"] == 1
    assert 0.0 <= checkpoint["meta"]["val_mIoU"] <= 1.0
    model = minis.models.build("deeplabv3plus", num_classes=6)
    model.backbone.load_state_dict(checkpoint["backbone"], strict=True)
