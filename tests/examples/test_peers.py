"""The study's peer arms: the mask-loss swaps, the mmseg-style auxiliary FCN head, and their flags."""

from __future__ import annotations

import argparse
import copy
import shlex
import subprocess
import sys

import pytest
import segmentation_models_pytorch as smp
import torch
from conftest import tiny_unet

from adst_examples import peers
from adst_examples.peers import (
    ARMS,
    LOSSES,
    MONAI_LOSSES,
    PEER_ARMS,
    AuxFCNLoss,
    AuxFCNModel,
    add_peer_arguments,
    build_loss,
)
from adst_plugin import DiceBCELoss, wrap_with_adst
from adst_plugin.hooks import Capture


def _mask(size: int = 32, batch: int = 2) -> torch.Tensor:
    """Two blobs of different sizes per image (a square and a disc)."""
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    m = torch.zeros(batch, 1, size, size)
    for b in range(batch):
        c = size // 3 + 2 * b
        m[b, 0] = ((yy - c) ** 2 + (xx - c) ** 2 < (size // 5) ** 2).float()
        m[b, 0, size - size // 4 :, size - size // 4 :] = 1.0
    return m


def _needs(name: str) -> None:
    if name in MONAI_LOSSES:
        pytest.importorskip("monai")


@pytest.mark.parametrize("name", list(LOSSES))
def test_loss_is_finite_scalar_with_gradient(name: str) -> None:
    _needs(name)
    torch.manual_seed(0)
    y = _mask()
    logits = torch.randn_like(y, requires_grad=True)
    loss = build_loss(name)(logits, y)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


@pytest.mark.parametrize("name", list(LOSSES))
def test_loss_is_minimised_by_the_mask(name: str) -> None:
    _needs(name)
    y = _mask()
    loss = build_loss(name)
    assert loss(5.0 * (2 * y - 1), y) < loss(1.0 * (2 * y - 1), y)
    assert loss(5.0 * (2 * y - 1), y) < loss(5.0 * (1 - 2 * y), y)  # the inverted mask is worse


def test_unknown_loss_lists_the_valid_names() -> None:
    with pytest.raises(KeyError, match="dice\\+lovasz"):
        build_loss("lovasz")


def test_tversky_penalises_false_negatives_more() -> None:
    loss = build_loss("tversky")
    assert (loss.alpha, loss.beta) == (peers.TVERSKY_ALPHA, peers.TVERSKY_BETA) == (0.3, 0.7)
    y = torch.zeros(1, 1, 16, 16)
    y[..., 4:12, 4:12] = 1.0  # 64 pixels
    under, over = y.clone(), y.clone()
    under[..., 4:12, 4:6] = 0.0  # 16 false negatives
    over[..., 4:12, 12:14] = 1.0  # 16 false positives
    hard = lambda m: 30.0 * (2 * m - 1)  # noqa: E731
    assert loss(hard(under), y) > loss(hard(over), y)


def test_dice_hausdorff_adds_the_weighted_monai_term() -> None:
    pytest.importorskip("monai")
    torch.manual_seed(0)
    y, logits = _mask(), torch.randn(2, 1, 32, 32)
    loss = build_loss("dice+hausdorff", hausdorff_weight=0.5)
    total = loss(logits, y)
    terms = loss.last_terms
    torch.testing.assert_close(terms["dicebce"], DiceBCELoss()(logits, y))
    torch.testing.assert_close(total, terms["dicebce"] + 0.5 * terms["hausdorff"])
    assert terms["hausdorff"] > 0
    torch.testing.assert_close(build_loss("dice+hausdorff", hausdorff_weight=0.0)(logits, y), DiceBCELoss()(logits, y))
    with pytest.raises(ValueError, match="hausdorff_weight"):
        build_loss("dice+hausdorff", hausdorff_weight=-1.0)


def test_monai_dicece_includes_the_bce_term() -> None:
    # MONAI < 1.3 silently returned a zero CE term for one-channel logits (MONAI #6923); examples[peers] pins >= 1.3.
    monai_losses = pytest.importorskip("monai.losses")
    torch.manual_seed(0)
    y, logits = _mask(), torch.randn(2, 1, 32, 32)
    expected = monai_losses.DiceLoss(sigmoid=True)(logits, y) + torch.nn.functional.binary_cross_entropy_with_logits(
        logits, y
    )
    torch.testing.assert_close(build_loss("monai-dicece")(logits, y), expected)


def test_hausdorff_term_keeps_its_scale_across_image_sizes() -> None:
    pytest.importorskip("monai")
    y = _mask(64)
    logits = 3.0 * torch.nn.functional.avg_pool2d(2 * y - 1, 5, 1, 2)
    term = peers.HausdorffDTTerm()
    small = term(logits, y)
    up = torch.nn.functional.interpolate
    big = term(up(logits, scale_factor=2), up(y, scale_factor=2))
    assert 0.7 < float(big / small) < 1.4  # unscaled, MONAI's value grows ~4x


@pytest.mark.slow  # a fresh interpreter
def test_monai_is_imported_lazily_and_its_absence_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    code = "import sys, adst_examples.peers as p; p.build_loss('dice+lovasz'); assert 'monai' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
    monkeypatch.setitem(sys.modules, "monai", None)
    monkeypatch.setitem(sys.modules, "monai.losses", None)
    for name in sorted(MONAI_LOSSES):
        with pytest.raises(ImportError, match=r'pip install -e "\./examples\[peers\]"'):
            build_loss(name)


# --------------------------------------------------------------------------------------------------------------------
# Auxiliary FCN head
# --------------------------------------------------------------------------------------------------------------------


@pytest.fixture
def pair() -> tuple[AuxFCNModel, torch.nn.Module]:
    torch.manual_seed(0)
    model = tiny_unet()
    plain = copy.deepcopy(model)
    return AuxFCNModel(model), plain


def test_aux_fcn_output_is_the_plain_models_output(pair: tuple[AuxFCNModel, torch.nn.Module]) -> None:
    wrapped, plain = pair
    x = torch.randn(2, 3, 32, 32)
    for train in (True, False):
        wrapped.train(train)
        plain.train(train)
        out = wrapped(x)
        torch.testing.assert_close(out, plain(x), rtol=0, atol=0)
        aux = wrapped.pop_aux()
        if train:
            assert aux is not None and aux.shape == out.shape
            assert wrapped.pop_aux() is None  # handed over once
        else:
            assert aux is None and wrapped._tap.capture.output is None  # eval: nothing captured, no head


def test_aux_fcn_head_on_a_decoder_stage_is_upsampled_to_the_mask() -> None:
    model = AuxFCNModel(tiny_unet(), features="decoder.blocks.0")
    assert model.head[0].in_channels == 32  # tiny_unet's first decoder block
    out = model.train()(torch.randn(2, 3, 32, 32))
    assert model.pop_aux().shape == out.shape
    with pytest.raises(ValueError, match=r"no submodule 'decoder\.nope'"):
        AuxFCNModel(tiny_unet(), features="decoder.nope")
    with pytest.raises(TypeError, match="already wrapped"):
        AuxFCNModel(wrap_with_adst(tiny_unet()))


def test_aux_fcn_loss_is_base_plus_weighted_aux_and_trains_the_head(pair: tuple[AuxFCNModel, torch.nn.Module]) -> None:
    model, _ = pair
    base = DiceBCELoss()
    criterion = AuxFCNLoss(model, base)
    assert criterion.weight == 0.4
    x, y = torch.randn(2, 3, 32, 32), _mask()
    logits = model.train()(x)
    aux = model._pending
    total = criterion(logits, y)
    torch.testing.assert_close(total, base(logits, y) + 0.4 * base(aux, y))
    assert set(criterion.last_terms) == {"mask", "aux", "total"}
    total.backward()
    for p in model.head.parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0
    with pytest.raises(RuntimeError, match="no training forward"):
        criterion(logits.detach(), y)
    model.eval()
    with torch.no_grad():
        logits = model(x)
        torch.testing.assert_close(criterion(logits, y), base(logits, y))
    assert set(criterion.last_terms) == {"mask", "total"}


def test_aux_fcn_weight_zero_leaves_the_head_without_gradient(pair: tuple[AuxFCNModel, torch.nn.Module]) -> None:
    model, _ = pair
    AuxFCNLoss(model, weight=0.0)(model.train()(torch.randn(2, 3, 32, 32)), _mask()).backward()
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in model.head.parameters())


def test_aux_fcn_export_is_the_plain_model_without_hooks(pair: tuple[AuxFCNModel, torch.nn.Module]) -> None:
    wrapped, plain = pair
    wrapped.train()(torch.randn(2, 3, 32, 32))
    exported = wrapped.export()
    assert type(exported) is type(plain) and not exported.training
    assert list(exported.state_dict()) == list(plain.state_dict()) == list(wrapped.plain_state_dict())
    assert not any(isinstance(h, Capture) for m in exported.modules() for h in m._forward_hooks.values())
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(exported(x), wrapped.eval()(x))
    assert wrapped._tap.attached  # the wrapper can keep training
    wrapped.remove_hooks()
    wrapped.remove_hooks()
    assert not wrapped._tap.attached


# --------------------------------------------------------------------------------------------------------------------
# Flags and arms
# --------------------------------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(exit_on_error=False)
    add_peer_arguments(parser)
    return parser


def test_peer_arms_parse_with_the_peer_flags() -> None:
    assert ARMS is PEER_ARMS
    assert {"lovasz", "focal", "tversky", "hausdorff", "monai-dicece", "auxfcn"} <= set(ARMS)
    defaults = _parser().parse_args([])
    assert (defaults.loss, defaults.aux_fcn, defaults.aux_fcn_features) == ("dice+bce", 0.0, "decoder")
    seen = set()
    for arm, flags in ARMS.items():
        tokens = shlex.split(flags)
        assert tokens[0] == "--no-adst", arm
        args = _parser().parse_args(tokens[1:])
        assert args.loss in LOSSES
        key = (args.loss, args.hausdorff_weight, args.aux_fcn, args.aux_fcn_features, args.deep_supervision)
        assert key not in seen and key != (defaults.loss, defaults.hausdorff_weight, 0.0, "decoder", False), arm
        seen.add(key)
        if args.aux_fcn > 0:  # the stage exists in the study's model (smp Unet, encoder depth 5)
            AuxFCNModel(smp.Unet("resnet18", encoder_weights=None, classes=1), features=args.aux_fcn_features)
    assert _parser().parse_args(shlex.split(ARMS["auxfcn"])[1:]).aux_fcn == 0.4


@pytest.mark.parametrize("flags", ["--loss lovasz", "--hausdorff-weight -1", "--aux-fcn nan"])
def test_bad_peer_flags_are_rejected(flags: str) -> None:
    with pytest.raises((argparse.ArgumentError, SystemExit)):
        _parser().parse_args(shlex.split(flags))
