"""An exported model of an ``encoder_weights="imagenet"`` build reloads with downloads blocked, outputs identical."""

from __future__ import annotations

import pytest
import segmentation_models_pytorch as smp
import segmentation_models_pytorch.encoders as smp_encoders
import torch

from adst_plugin import wrap_with_adst


class DownloadBlockedError(RuntimeError):
    pass


def _block(*args, **kwargs):
    raise DownloadBlockedError(f"download attempted: {args} {kwargs}")


@pytest.fixture
def imagenet_built(monkeypatch, tmp_path):
    """A Unet-resnet18 built as a user online builds it (``encoder_weights="imagenet"``), with smp's download served
    from a local file, so its config records the weights exactly as it would after a real download."""
    weights = smp_encoders.get_encoder("resnet18", weights=None).state_dict()
    monkeypatch.setattr(smp_encoders, "hf_hub_download", lambda *a, **k: str(tmp_path / "model.safetensors"))
    monkeypatch.setattr(smp_encoders, "load_file", lambda *a, **k: {**weights, "fc.weight": 0, "fc.bias": 0})
    torch.manual_seed(0)
    model = smp.Unet("resnet18", encoder_weights="imagenet", classes=1)
    assert model.config["encoder_weights"] == "imagenet"
    return model


def _reload_blocked(monkeypatch, folder):
    monkeypatch.setattr(smp_encoders, "hf_hub_download", _block)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return smp.from_pretrained(str(folder)).eval()


def test_exported_folder_reloads_offline_with_identical_outputs(imagenet_built, monkeypatch, tmp_path):
    wrapped = wrap_with_adst(imagenet_built)
    wrapped.train()
    with torch.no_grad():  # move the weights off their initial values: what reloads must be the trained ones
        for p in wrapped.model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    plain = wrapped.export()
    plain.save_pretrained(tmp_path / "exported")
    reloaded = _reload_blocked(monkeypatch, tmp_path / "exported")
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(reloaded(x), plain(x))
    assert type(reloaded) is type(plain)
    assert wrapped.model.config["encoder_weights"] == "imagenet"  # the wrapper's own model is left as built


def test_unexported_model_would_download(imagenet_built, monkeypatch, tmp_path):
    # The failure export() prevents: smp's own save of such a model reloads only with a network.
    imagenet_built.save_pretrained(tmp_path / "plain")
    with pytest.raises(DownloadBlockedError):
        _reload_blocked(monkeypatch, tmp_path / "plain")


def test_plain_state_dict_loads_into_a_random_init_model(imagenet_built):
    wrapped = wrap_with_adst(imagenet_built)
    fresh = smp.Unet("resnet18", encoder_weights=None, classes=1).eval()
    fresh.load_state_dict(wrapped.plain_state_dict())
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(fresh(x), wrapped.model.eval()(x))
