"""PSPNet: shapes, the pyramid pooling module, deep supervision, training."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import minis.models
from minis.models.pspnet import PoolingBranch, PyramidPooling

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def test_logits_at_input_resolution_for_any_size() -> None:
    model = minis.models.build("pspnet", num_classes=5).eval()
    assert model.task == "semantic" and model.backbone.output_stride == 8
    with torch.no_grad():
        assert model(torch.rand(2, 3, 96, 96)).shape == (2, 5, 96, 96)
        assert model(torch.rand(1, 3, 97, 75)).shape == (1, 5, 97, 75)  # c5 is 13x10: 3 and 6 do not divide it


def test_bin_1_is_the_global_average_broadcast_everywhere() -> None:
    torch.manual_seed(0)
    branch = PoolingBranch(8, 2, bins=1).eval()
    x = torch.randn(2, 8, 11, 7)
    with torch.no_grad():
        out = branch(x)
        expected = branch.relu(branch.bn(branch.conv(x.mean(dim=(2, 3), keepdim=True))))
    torch.testing.assert_close(out, expected.expand(2, 2, 11, 7))


def test_bin_2_pools_each_quadrant_on_its_own() -> None:
    """Changing one quadrant of the input changes only that quadrant's pooled value."""
    branch = PoolingBranch(3, 3, bins=2).eval()
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        pooled = branch.pool(x)
        torch.testing.assert_close(pooled[..., 0, 1], x[..., :4, 4:].mean(dim=(-2, -1)))
        y = x.clone()
        y[..., 4:, :4] += 1.0  # bottom-left quadrant
        changed = (branch.pool(y) - pooled).abs().sum(dim=(0, 1)) > 0
    assert changed.tolist() == [[False, False], [True, False]]


def test_pyramid_keeps_the_features_and_adds_a_quarter_per_bin() -> None:
    torch.manual_seed(0)
    pyramid = PyramidPooling(16, bins=(1, 2, 3, 6)).eval()
    x = torch.randn(2, 16, 13, 10)
    with torch.no_grad():
        out = pyramid(x)
    assert pyramid.out_channels == 32 and out.shape == (2, 32, 13, 10)
    torch.testing.assert_close(out[:, :16], x)  # the local features pass through unchanged
    assert [branch.pool.output_size for branch in pyramid.branches] == [1, 2, 3, 6]
    assert all(branch.conv.out_channels == 4 for branch in pyramid.branches)
    global_context = out[:, 16:20]
    torch.testing.assert_close(global_context, global_context[..., :1, :1].expand_as(global_context))
    finer = out[:, 28:32]  # bins=6 really varies over space
    assert not torch.allclose(finer, finer[..., :1, :1].expand_as(finer))


def test_auxiliary_loss_in_training_only_weighted_0_4() -> None:
    torch.manual_seed(0)
    model = minis.models.build("pspnet", num_classes=3, head_channels=32, dropout=0.0)
    images, targets = torch.rand(2, 3, 48, 48), torch.randint(0, 3, (2, 48, 48))
    model.aux_head[3].p = 0.0  # no dropout, so the loss can be recomputed by hand
    losses = model.train()(images, targets)
    assert set(losses) == {"loss_ce", "loss_aux"}
    with torch.no_grad():
        features = model.backbone(model.normalize(images))  # train mode: the same batch statistics
        aux_logits = F.interpolate(model.aux_head(features["c4"]), size=(48, 48), mode="bilinear", align_corners=False)
    torch.testing.assert_close(losses["loss_aux"].detach(), 0.4 * F.cross_entropy(aux_logits, targets))
    assert model.eval()(images, targets).shape == (2, 3, 48, 48)  # eval: logits only
    assert model.train()(images).shape == (2, 3, 48, 48)  # no targets: logits too
    no_aux = minis.models.build("pspnet", num_classes=3, aux=False).train()
    assert set(no_aux(images, targets)) == {"loss_ce"}


def test_trains_with_a_single_image() -> None:
    """Bin 1 pools one image to one value per channel; batch norm must still work there."""
    model = minis.models.build("pspnet", num_classes=3, head_channels=32).train()
    losses = model(torch.rand(1, 3, 48, 48), torch.randint(0, 3, (1, 48, 48)))
    assert all(torch.isfinite(loss) for loss in losses.values())


def test_one_training_step_lowers_the_loss() -> None:
    torch.manual_seed(0)
    model = minis.models.build("pspnet", num_classes=3).train()
    # random 16x16 blocks coloured by their class plus noise; the top rows are ignored
    targets = torch.randint(0, 3, (2, 4, 4)).repeat_interleave(16, dim=1).repeat_interleave(16, dim=2)
    images = (torch.rand(3, 3)[targets].permute(0, 3, 1, 2) + 0.1 * torch.randn(2, 3, 64, 64)).clamp(0, 1)
    targets[:, :8] = 255
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4)

    def loss_on_batch() -> torch.Tensor:
        torch.manual_seed(1)  # the same dropout masks before and after the step
        return sum(model(images, targets).values())

    before = loss_on_batch()
    optimizer.zero_grad()
    before.backward()
    optimizer.step()
    with torch.no_grad():
        after = loss_on_batch()
    assert after < 0.95 * before, (before.item(), after.item())
