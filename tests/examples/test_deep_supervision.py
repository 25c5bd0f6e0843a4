"""The nnU-Net-style deep-supervision peer (arm ``dsv``): the model's output is the plain model's, the loss is
nnU-Net's weighted sum over scales, the heads are dropped at export."""

from __future__ import annotations

import shlex

import pytest
import segmentation_models_pytorch as smp
import torch
from torch import nn

from adst_examples.deep_supervision import DeepSupervisionLoss, DeepSupervisionModel, default_stages, scale_weights
from adst_examples.peers import ARMS
from adst_examples.studylib import parse_model_flags
from adst_examples.training.models import build_criterion, build_model, export_model


def _model() -> nn.Module:
    torch.manual_seed(0)
    return smp.Unet("resnet18", encoder_weights=None, encoder_depth=4, decoder_channels=(32, 16, 16, 16), classes=1)


def _mask() -> torch.Tensor:
    mask = torch.zeros(2, 1, 32, 32)
    mask[:, :, 8:20, 10:22] = 1
    return mask


def test_scale_weights_halve_and_sum_to_one() -> None:
    w = scale_weights(3)
    assert w == pytest.approx([8 / 15, 4 / 15, 2 / 15, 1 / 15]) and sum(w) == pytest.approx(1.0)


def test_output_is_the_plain_models_and_the_loss_is_the_weighted_sum_over_scales() -> None:
    plain = _model()
    model = DeepSupervisionModel(_model())
    assert model.stages == default_stages(plain) == ["decoder.blocks.2", "decoder.blocks.1"]
    x, mask = torch.rand(2, 3, 32, 32), _mask()
    logits = model.train()(x)
    torch.testing.assert_close(logits, plain.train()(x))  # exactly the wrapped model's output
    criterion = DeepSupervisionLoss(model)
    aux = model._pending
    loss = criterion(logits, mask)
    w = criterion.weights
    expected = w[0] * criterion.base_loss(logits, mask)
    for weight, stage in zip(w[1:], aux, strict=True):  # finest first, each against the mask at its own size
        f = mask.shape[-1] // stage.shape[-1]  # nearest-exact: the centre pixel of each f x f cell
        expected = expected + weight * criterion.base_loss(stage, mask[..., f // 2 :: f, f // 2 :: f])
    torch.testing.assert_close(loss, expected)
    assert [s.shape[-1] for s in aux] == [16, 8]
    loss.backward()
    assert all(p.grad is not None for p in model.heads.parameters())
    with pytest.raises(RuntimeError, match="no training forward"):
        criterion(logits.detach(), mask)  # the stages were handed over once


def test_eval_loss_is_the_mask_loss_and_export_drops_the_heads() -> None:
    model = DeepSupervisionModel(_model())
    x = torch.rand(1, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        out = model(x)
        assert DeepSupervisionLoss(model)(out, _mask()[:1]) == DeepSupervisionLoss(model).base_loss(out, _mask()[:1])
        plain = export_model(model)
        assert type(plain) is smp.Unet and not any("heads" in k for k in plain.state_dict())
        torch.testing.assert_close(plain(x), out)


def test_the_dsv_arm_builds_the_peer_and_its_loss() -> None:
    args = parse_model_flags([*shlex.split(ARMS["dsv"]), "--encoder", "resnet18"], "dsv")
    model = build_model(args, in_channels=3)
    assert isinstance(model, DeepSupervisionModel) and isinstance(build_criterion(args, model), DeepSupervisionLoss)
    with pytest.raises(TypeError, match="expected a DeepSupervisionModel"):
        DeepSupervisionLoss(_model())
