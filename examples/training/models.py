"""The model and the criterion of a run: every call that constructs or exports an ADST (or peer) object is here.

:func:`add_model_arguments` adds the model flags to any parser (train.py, study.py): the architecture, ``--no-adst``,
``--preset`` and one flag per :class:`~adst_plugin.ADSTConfig` field, generated from the dataclass, so a head or loss
default has one source (:mod:`adst_plugin.presets`); a flag left out keeps the preset's value. The peers' flags
(``--loss``, ``--aux-fcn``) come from :mod:`adst_examples.peers`. The code that uses the model's outputs and the loss
is the engine's (:mod:`adst_examples.training.engine`).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import sys
import warnings
from pathlib import Path
from typing import Any

import segmentation_models_pytorch as smp
from torch import nn

from adst_examples.deep_supervision import DeepSupervisionLoss, DeepSupervisionModel
from adst_examples.peers import AuxFCNLoss, AuxFCNModel, add_peer_arguments, build_loss
from adst_examples.training.encoder_weights import build_smp_model
from adst_plugin import (
    DEFAULT_PRESET,
    PRESETS,
    ADSTConfig,
    ADSTLoss,
    ADSTModel,
    DiceCELoss,
    get_config,
    wrap_with_adst,
)
from adst_plugin.presets import (
    EDGE_INPUTS,
    FUSED_ROLES,
    HEAD_INPUTS,
    MAIN_TARGETS,
    RENAMED_FIELDS,
    THRESHOLD_TARGETS,
    renamed_fields,
)

__all__ = [
    "ARCHS",
    "CONFIG_FIELDS",
    "add_model_arguments",
    "build_criterion",
    "build_model",
    "check_model_args",
    "config_flag",
    "config_overrides",
    "count_params",
    "export_model",
    "head_settings",
    "parse_encoder_weights",
]

#: smp architectures: lower-case key (what ``smp.create_model`` accepts) → class name (what users type).
ARCHS: dict[str, str] = {key: cls.__name__ for key, cls in smp.MODEL_ARCHITECTURES_MAPPING.items()}
#: The ADSTConfig fields that become flags (``--feature-grad``, ``--w-boundary``, ...).
CONFIG_FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(ADSTConfig))
_CHOICES = {
    "head_input": HEAD_INPUTS,
    "edge_input": EDGE_INPUTS,
    "fused_role": FUSED_ROLES,
    "main_target": MAIN_TARGETS,
    "threshold_target": THRESHOLD_TARGETS,
}


def _arch(name: str) -> str:
    key = name.lower()
    if key not in ARCHS:
        raise argparse.ArgumentTypeError(f"unknown architecture {name!r}; valid: {', '.join(ARCHS.values())}")
    return ARCHS[key]


def _encoder(name: str) -> str:
    known = smp.encoders.get_encoder_names()
    if name not in known and not name.startswith("tu-"):
        raise argparse.ArgumentTypeError(
            f"unknown encoder {name!r}; valid: {', '.join(known)} or any timm model as 'tu-<name>'"
        )
    return name


def parse_encoder_weights(value: str) -> str | None:
    """``--encoder-weights``: ``None`` (random init), ``"imagenet"`` or an existing checkpoint file."""
    if value.lower() in ("", "none", "null"):
        return None
    if value == "imagenet" or Path(value).is_file():
        return value
    raise argparse.ArgumentTypeError(
        f"expected 'imagenet', 'none' or an encoder checkpoint file, got {value!r} (no such file)"
    )


def add_model_arguments(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """Architecture, ADST head/loss and peer flags. Every ADST flag defaults to the preset's value.

    Returns the "ADST head and loss" group, so a script can add its own ADST flags to it (train.py's --aux-fade).
    """
    g = parser.add_argument_group("model")
    g.add_argument(
        "--arch", type=_arch, default="Unet", help=f"smp architecture: {', '.join(ARCHS.values())} [%(default)s]"
    )
    g.add_argument("--encoder", type=_encoder, default="resnet34", help="smp encoder name [%(default)s]")
    g.add_argument(
        "--encoder-weights",
        type=parse_encoder_weights,
        default=None,
        help="imagenet (offline for tu-efficientnet_lite0 with the 'pretrained' extra, else smp's download) or a "
        "checkpoint file of the encoder or its classifier; the ImageNet mean/std are folded into the stem, so "
        "images stay in [0, 1] [random init]",
    )

    g = parser.add_argument_group("ADST head and loss (defaults: the preset's values, see adst_plugin/presets.py)")
    g.add_argument("--no-adst", action="store_true", help="train the plain model (baseline)")
    g.add_argument(
        "--preset", choices=sorted(PRESETS), default=DEFAULT_PRESET, help="head and loss preset [%(default)s]"
    )
    default = PRESETS[DEFAULT_PRESET]
    for name in CONFIG_FIELDS:
        value = getattr(default, name)
        flag = config_flag(name)
        help_text = f"ADSTConfig.{name} [preset; {DEFAULT_PRESET}: {value}]"
        if isinstance(value, bool):
            g.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            g.add_argument(flag, type=type(value), choices=_CHOICES.get(name), default=None, help=help_text)
    for former in RENAMED_FIELDS:  # a renamed field's former flag, for one more release (config_overrides reads it)
        g.add_argument(config_flag(former), type=float, action=_FormerFlag, default=None, help=argparse.SUPPRESS)
    add_peer_arguments(parser)
    return g


class _FormerFlag(argparse.Action):
    """A renamed field's former flag: stored under its former name, with a DeprecationWarning naming the new flag."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any, option: Any = None):
        # Attributed to the script run (the flag is on its command line), so Python's default filters show it.
        message = f"{option} is now {config_flag(RENAMED_FIELDS[self.dest])}; the former flag goes in the next release"
        warnings.warn_explicit(message, DeprecationWarning, sys.argv[0] or "<command line>", 0, module="__main__")
        setattr(namespace, self.dest, values)


def config_flag(name: str) -> str:
    """The command-line flag of an ADSTConfig field (``main_target`` -> ``--main-target``)."""
    return "--" + name.replace("_", "-")


def check_model_args(args: argparse.Namespace) -> None:
    """Reject flag combinations before any work: an inconsistent ADST config, or a peer head that would be ignored.

    ADST options given with ``--no-adst`` are ignored (study.py passes shared flags to every arm, the baseline too).

    Raises:
        ValueError: with the message to show as a usage error.
    """
    if args.no_adst:
        return
    if args.aux_fcn > 0:
        raise ValueError("--aux-fcn: the peer FCN head replaces the ADST head; add --no-adst")
    if args.deep_supervision:
        raise ValueError("--deep-supervision: the peer heads replace the ADST head; add --no-adst")
    try:
        get_config(args.preset, **config_overrides(args))
    except (TypeError, ValueError) as exc:
        raise ValueError(str(exc)) from None


def config_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The ADSTConfig fields given on the command line (the rest keep the preset's values)."""
    given = {name: getattr(args, name, None) for name in (*CONFIG_FIELDS, *RENAMED_FIELDS)}
    return renamed_fields({name: value for name, value in given.items() if value is not None})


def head_settings(args: argparse.Namespace) -> dict[str, Any] | None:
    """The resolved :class:`~adst_plugin.ADSTConfig` of an ADST arm as a dict (``None`` for ``--no-adst``).

    A preset's defaults can change between releases, so a run records what its flags resolved to on the day."""
    if args.no_adst:
        return None
    return dataclasses.asdict(get_config(args.preset, **config_overrides(args)))


def _check_classes(args: argparse.Namespace, classes: int) -> None:
    """Multi-class data train the ADST head or the plain model with Dice + CE; the peers are binary only."""
    if classes == 1:
        return
    peers = {"--loss": args.loss != "dice+bce", "--aux-fcn": args.aux_fcn > 0}
    peers["--deep-supervision"] = args.deep_supervision
    given = [flag for flag, on in peers.items() if on]
    if given:
        raise ValueError(
            f"{', '.join(given)}: expected a binary dataset for the peer arms, got a {classes}-class one; "
            "multi-class data (e.g. busi3) train the ADST arms and the baseline with Dice + CE: drop the flag"
        )


def build_model(args: argparse.Namespace, in_channels: int, classes: int = 1) -> nn.Module:
    """The smp model with ``classes`` outputs (1: binary; C > 1: multiclass, softmax), wrapped with the ADST head
    unless ``--no-adst`` (or with the peer head, ``--aux-fcn``)."""
    _check_classes(args, classes)
    model = build_smp_model(args.arch, args.encoder, args.encoder_weights, in_channels, classes)
    if not args.no_adst:
        return wrap_with_adst(model, args.preset, **config_overrides(args))
    if args.aux_fcn > 0 and args.deep_supervision:
        raise ValueError("--aux-fcn and --deep-supervision are two peer heads; pick one")
    if args.aux_fcn > 0:
        return AuxFCNModel(model, features=args.aux_fcn_features)
    if args.deep_supervision:
        return DeepSupervisionModel(model)
    return model


def build_criterion(args: argparse.Namespace, model: nn.Module, classes: int = 1) -> nn.Module:
    """The loss for what :func:`build_model` returned; ``--loss`` is the mask loss of every binary variant.

    With ``classes > 1`` the mask loss is :class:`~adst_plugin.DiceCELoss` (smp's ``DiceLoss("multiclass",
    from_logits=True)`` + cross-entropy), for the baseline and the ADST arms alike; ``ADSTLoss`` reads the mode
    (``multiclass``) from it.
    """
    _check_classes(args, classes)
    base = DiceCELoss() if classes > 1 else build_loss(args.loss, hausdorff_weight=args.hausdorff_weight)
    if isinstance(model, ADSTModel):
        return ADSTLoss(model, base)
    if isinstance(model, AuxFCNModel):
        return AuxFCNLoss(model, base, weight=args.aux_fcn)
    if isinstance(model, DeepSupervisionModel):
        return DeepSupervisionLoss(model, base)
    return ADSTLoss(None, base)


def export_model(model: nn.Module) -> nn.Module:
    """A plain copy of the trained model for inference: any auxiliary head is left behind."""
    if isinstance(model, (ADSTModel, AuxFCNModel, DeepSupervisionModel)):
        return model.export()
    return copy.deepcopy(model).eval()


def count_params(module: nn.Module) -> int:
    """Number of parameters (trainable or not)."""
    return sum(p.numel() for p in module.parameters())
