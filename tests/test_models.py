"""The model registry and the baseline model's contract."""

from __future__ import annotations

import pytest
import torch

import minis.models


def test_registry_builds_by_name_and_records_build_args() -> None:
    assert "baseline_fcn" in minis.models.list_models()
    model = minis.models.build("baseline_fcn", num_classes=4, width=8)
    assert model.task == "semantic"
    assert model.build_args == {"name": "baseline_fcn", "num_classes": 4, "width": 8}
    with pytest.raises(KeyError, match="unknown model 'nope'"):
        minis.models.build("nope", num_classes=2)


def test_from_torchvision_refuses_models_without_a_port() -> None:
    with pytest.raises(TypeError, match="no minis port for torchvision Linear"):
        minis.models.from_torchvision(torch.nn.Linear(2, 2))


def test_baseline_maps_images_to_logits_at_input_resolution() -> None:
    model = minis.models.build("baseline_fcn", num_classes=5).eval()
    with torch.no_grad():
        assert model(torch.rand(2, 3, 96, 96)).shape == (2, 5, 96, 96)
        assert model(torch.rand(1, 3, 70, 53)).shape == (1, 5, 70, 53)  # sizes not divisible by the stride


def test_baseline_training_step_lowers_the_loss() -> None:
    torch.manual_seed(0)
    model = minis.models.build("baseline_fcn", num_classes=3, width=8).train()
    # blocks of 8x8 pixels, each coloured by its class plus noise: learnable at the model's stride
    coarse = torch.randint(0, 3, (4, 4, 4))
    targets = coarse.repeat_interleave(8, dim=1).repeat_interleave(8, dim=2)
    palette = torch.tensor([[0.1, 0.1, 0.1], [0.9, 0.2, 0.2], [0.2, 0.2, 0.9]])
    images = (palette[targets].permute(0, 3, 1, 2) + 0.1 * torch.randn(4, 3, 32, 32)).clamp(0, 1)
    targets[:, :2] = 255  # ignored rows must not count
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    losses = []
    for _ in range(20):
        loss = model(images, targets)["loss_ce"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


SEMANTIC_NAMES = ("fcn32s", "fcn16s", "fcn8s", "unet", "deeplabv1", "deeplabv2", "deeplabv3", "deeplabv3plus", "pspnet")


@pytest.mark.parametrize("name", SEMANTIC_NAMES)
def test_every_semantic_model_keeps_the_contract(name: str) -> None:
    """Default build: logits at input size in eval, a dict of finite losses in training."""
    assert name in minis.models.list_models()
    torch.manual_seed(0)
    model = minis.models.build(name, num_classes=7)
    assert model.task == "semantic" and model.build_args["name"] == name
    images = torch.rand(2, 3, 96, 96)
    with torch.no_grad():
        assert model.eval()(images).shape == (2, 7, 96, 96)
    targets = torch.randint(0, 7, (2, 96, 96))
    targets[:, :10] = 255
    losses = model.train()(images, targets)
    assert "loss_ce" in losses and all(torch.isfinite(v) and v.ndim == 0 for v in losses.values())
    sum(losses.values()).backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


@pytest.mark.parametrize("name", ("baseline_fcn",) + SEMANTIC_NAMES)
def test_every_semantic_model_runs_the_shared_forward(name: str) -> None:
    """One forward pass for all (minis.nn.SemanticModel): the main loss is the cross-entropy of the very
    logits the model returns, at input resolution, with label 255 ignored."""
    from minis.nn import SemanticModel

    torch.manual_seed(0)
    model = minis.models.build(name, num_classes=4).train()
    assert isinstance(model, SemanticModel)
    images, targets = torch.rand(2, 3, 45, 38), torch.randint(0, 4, (2, 45, 38))
    targets[:, :5] = 255
    torch.manual_seed(1)  # the same dropout masks in both calls
    logits = model(images)  # training mode without targets: logits, batch statistics
    torch.manual_seed(1)
    losses = model(images, targets)
    assert logits.shape == (2, 4, 45, 38)
    torch.testing.assert_close(losses["loss_ce"], torch.nn.functional.cross_entropy(logits, targets, ignore_index=255))


@pytest.mark.parametrize("name,model,config", [
    ("faster_rcnn", "FasterRCNN", "RCNNConfig"), ("ms_rcnn", "MaskScoringRCNN", "RCNNConfig"),
    ("fcos", "FCOS", "FCOSConfig"), ("condinst", "CondInst", "CondInstConfig")])
def test_unknown_detector_settings_are_refused_by_name(name: str, model: str, config: str) -> None:
    with pytest.raises(TypeError, match=rf"^{model}: unknown argument\(s\) bogus, min_sise; "
                                        rf"settings are the fields of {config}$"):
        minis.models.build(name, num_classes=3, backbone="small", min_sise=128, bogus=1)


def test_config_from_kwargs_sets_the_given_fields_only() -> None:
    from dataclasses import dataclass

    from minis.models.config import config_from_kwargs

    @dataclass
    class Settings:
        size: int = 1
        names: tuple = ("a",)

    assert config_from_kwargs(Settings, {"size": 3}, "toy") == Settings(size=3, names=("a",))
    assert config_from_kwargs(Settings, {}, "toy") == Settings()
    with pytest.raises(TypeError, match="toy: unknown argument"):
        config_from_kwargs(Settings, {"sizes": 3}, "toy")


def test_a_semantic_model_without_scores_cannot_be_built():
    import pytest

    from minis.nn import SemanticModel

    class NoScores(SemanticModel):
        pass

    with pytest.raises(TypeError, match="scores"):
        NoScores()


def test_class_weights_weight_each_pixel_by_its_true_class() -> None:
    """The weighted cross-entropy is the weighted mean of the per-pixel losses (a loop over pixels);
    the weights stay out of the state dict, so weights trained either way load into the other."""
    torch.manual_seed(0)
    weights = [0.2, 1.0, 3.0]
    model = minis.models.build("baseline_fcn", num_classes=3, class_weights=weights).train()
    images, targets = torch.rand(2, 3, 24, 24), torch.randint(0, 3, (2, 24, 24))
    targets[:, :4] = 255
    torch.manual_seed(1)
    logits = model(images)
    torch.manual_seed(1)
    loss = model(images, targets)["loss_ce"]
    per_pixel = torch.nn.functional.cross_entropy(logits, targets, ignore_index=255, reduction="none")
    w = torch.tensor(weights)[targets.clamp(max=2)] * (targets != 255)
    torch.testing.assert_close(loss, (w * per_pixel).sum() / w.sum())
    plain = minis.models.build("baseline_fcn", num_classes=3)
    assert "class_weights" not in model.state_dict()
    plain.load_state_dict(model.state_dict())  # strict: the same keys


def test_median_frequency_weights_are_median_over_frequency_to_a_power() -> None:
    from minis.nn import median_frequency_weights

    # pixels per class over two images: 0: 10+6, 1: 4+0, 2: 2+0, 3: none; 255 ignored
    first = torch.tensor([0] * 10 + [1] * 4 + [2] * 2).view(4, 4)
    second = torch.tensor([0] * 6 + [255] * 10).view(4, 4)
    dataset = [(None, {"semantic": first}), (None, {"semantic": second})]
    frequency = torch.tensor([16, 4, 2]) / 22
    expected = (frequency[1] / frequency) ** 0.5  # the median of the present classes' frequencies
    weights = median_frequency_weights(dataset, num_classes=4, power=0.5)
    torch.testing.assert_close(weights[:3], expected.float())
    assert weights[3] == weights[:3].max()  # an absent class: the largest weight of the others
    torch.testing.assert_close(median_frequency_weights(dataset, 4, power=0.0)[:3], torch.ones(3))
    with pytest.raises(ValueError, match="no labelled pixel"):
        median_frequency_weights([(None, {"semantic": torch.full((2, 2), 255)})], 3)
