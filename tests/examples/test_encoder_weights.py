"""Encoder weights without a network: the offline ImageNet package, checkpoint files, and their errors."""

from __future__ import annotations

import argparse
import json

import pytest
import segmentation_models_pytorch as smp
import timm
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from adst_examples.training import encoder_weights as ew
from adst_examples.training.models import parse_encoder_weights

LITE0 = "tu-efficientnet_lite0"
needs_lite0 = pytest.mark.skipif(
    ew.offline_imagenet_path(LITE0) is None, reason="needs the examples' 'pretrained' extra"
)


def _block_downloads(monkeypatch):
    def refuse(*args, **kwargs):
        raise RuntimeError("download attempted")

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", refuse)
    monkeypatch.setattr(timm.models._builder, "load_pretrained", refuse)
    monkeypatch.setattr(smp.encoders, "hf_hub_download", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _classify(model: torch.nn.Module, photo) -> int:
    x = torch.from_numpy(photo).permute(2, 0, 1)[None].float() / 255.0
    x = F.interpolate(x, size=(224, 224), mode="bilinear", antialias=True, align_corners=False)
    mean, std = ew.imagenet_stats(LITE0)
    with torch.no_grad():
        return int(model((x - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)).argmax())


def _lite0_classifier(mapping: dict[str, torch.Tensor]) -> torch.nn.Module:
    model = timm.create_model("efficientnet_lite0", pretrained=False).eval()
    model.load_state_dict(mapping)
    return model


@needs_lite0
def test_package_weights_map_onto_timm_and_label_photos():
    skdata = pytest.importorskip("skimage.data")
    checkpoint = ew.load_checkpoint(ew.offline_imagenet_path(LITE0))
    assert len(checkpoint) == 296
    target = timm.create_model("efficientnet_lite0", pretrained=False).state_dict()
    model = _lite0_classifier(ew.order_mapped(checkpoint, target, "test"))
    assert 281 <= _classify(model, skdata.chelsea()) <= 285  # a cat
    assert _classify(model, skdata.coffee()) == 967  # espresso


@needs_lite0
def test_a_wrongly_ordered_mapping_fails_the_photo_check():
    skdata = pytest.importorskip("skimage.data")
    checkpoint = ew.load_checkpoint(ew.offline_imagenet_path(LITE0))
    target = timm.create_model("efficientnet_lite0", pretrained=False).state_dict()
    # Scramble the order within each group of same-shaped tensors: every shape still fits, the meaning does not.
    names, groups = list(checkpoint), {}
    for name, value in checkpoint.items():
        groups.setdefault(tuple(value.shape), []).append(name)
    g = torch.Generator().manual_seed(0)
    order = {}
    for members in groups.values():
        perm = torch.randperm(len(members), generator=g).tolist()
        order.update({m: members[p] for m, p in zip(members, perm, strict=True)})
    scrambled = {order[n]: checkpoint[n] for n in names}
    scrambled = {n: scrambled[n] for n in names}  # same names, same order, tensors swapped among equal shapes
    assert any(not torch.equal(scrambled[n], checkpoint[n]) for n in names)
    model = _lite0_classifier(ew.order_mapped(scrambled, target, "test"))
    labels = (_classify(model, skdata.chelsea()), _classify(model, skdata.coffee()))
    assert not (281 <= labels[0] <= 285 and labels[1] == 967)


@needs_lite0
@pytest.mark.parametrize("in_channels", [1, 3])
def test_imagenet_builds_offline_and_matches_the_package(monkeypatch, in_channels):
    _block_downloads(monkeypatch)
    model = ew.build_smp_model("Unet", LITE0, "imagenet", in_channels, 1, fold_normalisation=False)
    checkpoint = ew.load_checkpoint(ew.offline_imagenet_path(LITE0))
    enc = model.encoder.model
    block = checkpoint["_blocks.3._project_conv.weight"]
    assert torch.equal(enc.blocks[2][0].conv_pwl.weight, block)  # block 3 of 16 is stage 2's first
    stem = checkpoint["_conv_stem.weight"]
    expected = stem if in_channels == 3 else stem.sum(1, keepdim=True)  # smp's and timm's rule for gray images
    torch.testing.assert_close(enc.conv_stem.weight, expected)
    assert model.config["encoder_weights"] is None  # the weights are the model's own: it reloads offline


@needs_lite0
@settings(max_examples=5, deadline=None)
@given(seed=st.integers(0, 2**16), size=st.sampled_from([16, 24, 40]))
def test_folded_stem_equals_normalised_input(seed, size):
    # Exact away from the border: the folded encoder on raw images = the ImageNet encoder on normalised ones.
    plain = _cached("plain")
    folded = _cached("folded")
    x = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(seed))
    mean, std = ew.imagenet_stats(LITE0)
    xn = (x - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
    with torch.no_grad():
        a = plain.encoder.model.bn1(plain.encoder.model.conv_stem(xn))
        b = folded.encoder.model.bn1(folded.encoder.model.conv_stem(x))
    torch.testing.assert_close(a[..., 1:-1, 1:-1], b[..., 1:-1, 1:-1], atol=1e-4, rtol=1e-4)


_MODELS: dict[str, torch.nn.Module] = {}


def _cached(kind: str) -> torch.nn.Module:
    if kind not in _MODELS:
        _MODELS[kind] = ew.build_smp_model("Unet", LITE0, "imagenet", 3, 1, fold_normalisation=kind == "folded").eval()
    return _MODELS[kind]


def _resnet18_classifier_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    encoder = smp.encoders.get_encoder("resnet18", weights=None)
    return {**encoder.state_dict(), "fc.weight": torch.randn(1000, 512), "fc.bias": torch.zeros(1000)}


@pytest.mark.parametrize("prefix", ["", "encoder.", "module.encoder."])
@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_checkpoint_file_loads_every_encoder_tensor(tmp_path, prefix, suffix):
    state = _resnet18_classifier_state()
    path = tmp_path / f"resnet18{suffix}"
    named = {prefix + k: v.contiguous() for k, v in state.items()}
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(named, str(path))
    else:
        torch.save({"state_dict": named}, path)  # nested, as Lightning writes it
    model = ew.build_smp_model("Unet", "resnet18", str(path), 3, 1, fold_normalisation=False)
    own = model.encoder.state_dict()
    assert all(torch.equal(own[k], state[k]) for k in own)


def test_timm_classifier_checkpoint_loads_into_the_tu_encoder(tmp_path):
    torch.manual_seed(2)
    classifier = timm.create_model("efficientnet_lite0", pretrained=False)
    torch.save(classifier.state_dict(), tmp_path / "lite0.pth")
    model = ew.build_smp_model("Unet", LITE0, str(tmp_path / "lite0.pth"), 3, 1, fold_normalisation=False)
    assert torch.equal(model.encoder.model.blocks[6][0].conv_pwl.weight, classifier.blocks[6][0].conv_pwl.weight)


def _save(tmp_path, state) -> str:
    path = tmp_path / "ckpt.pth"
    torch.save(state, path)
    return str(path)


def test_missing_tensor_is_named(tmp_path):
    state = _resnet18_classifier_state()
    del state["layer3.1.bn2.weight"]
    with pytest.raises(ValueError, match=r"'layer3\.1\.bn2\.weight'"):
        ew.build_smp_model("Unet", "resnet18", _save(tmp_path, state), 3, 1)


def test_shape_mismatch_is_named(tmp_path):
    state = _resnet18_classifier_state()
    state["layer2.0.conv1.weight"] = torch.zeros(128, 64, 1, 1)
    with pytest.raises(ValueError, match=r"'layer2\.0\.conv1\.weight' is \(128, 64, 1, 1\)"):
        ew.build_smp_model("Unet", "resnet18", _save(tmp_path, state), 3, 1)


def test_stray_tensor_is_named(tmp_path):
    state = {**_resnet18_classifier_state(), "projector.weight": torch.zeros(4, 4)}
    with pytest.raises(ValueError, match=r"'projector\.weight' maps onto no encoder tensor"):
        ew.build_smp_model("Unet", "resnet18", _save(tmp_path, state), 3, 1)


def test_another_architecture_is_refused(tmp_path):
    with pytest.raises(ValueError, match="has no tensor for the encoder's"):
        ew.build_smp_model("Unet", LITE0, _save(tmp_path, _resnet18_classifier_state()), 3, 1)


def test_cli_value_is_imagenet_none_or_a_file(tmp_path):
    assert parse_encoder_weights("none") is None and parse_encoder_weights("imagenet") == "imagenet"
    path = _save(tmp_path, {})
    assert parse_encoder_weights(path) == path
    with pytest.raises(argparse.ArgumentTypeError, match="no such file"):
        parse_encoder_weights(str(tmp_path / "missing.pth"))


@needs_lite0
@pytest.mark.slow
def test_train_cli_imagenet_offline_and_its_export_reloads_offline(tmp_path, monkeypatch):
    from adst_examples import train

    _block_downloads(monkeypatch)
    out = tmp_path / "run"
    argv = ["--encoder", LITE0, "--encoder-weights", "imagenet", "--img-size", "64", "--limit", "16"]
    argv += ["--batch-size", "4", "--workers", "0", "--no-progress", "--epochs", "1", "--out", str(out)]
    train.main(argv)
    assert json.loads((out / "exported" / "config.json").read_text())["encoder_weights"] is None
    reloaded = smp.from_pretrained(str(out / "exported")).eval()
    x = torch.rand(1, reloaded.config["in_channels"], 64, 64)
    with torch.no_grad():
        assert torch.isfinite(reloaded(x)).all()
    # The run started from ImageNet, not from a random init: a late block moved little from the package's values.
    pretrained = ew.build_smp_model("Unet", LITE0, "imagenet", 3, 1).encoder.state_dict()
    random_init = ew.build_smp_model("Unet", LITE0, None, 3, 1).encoder.state_dict()
    key = "model.blocks.6.0.conv_pwl.weight"
    trained = reloaded.encoder.state_dict()[key]
    assert (trained - pretrained[key]).norm() < 0.1 * (random_init[key] - pretrained[key]).norm()
