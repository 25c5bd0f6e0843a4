"""Named ADST configurations: the one source of every head and loss default.

An :class:`ADSTConfig` says how the head is built (where it reads, how its gradient reaches the model, what
its fused map means) and how :class:`~adst_plugin.ADSTLoss` weighs each term. ``wrap_with_adst(model,
preset=..., **overrides)`` builds the head from it, and the loss reads the same object from the model, so a
choice is made once.

Presets:

* ``"adst"`` (default): the export-aware head (the dataclass defaults). The SACA main map reads the live decoder
  features (``feature_grad=1``) and regresses the signed distance to the lesion edge (deep supervision,
  ``main_target="sdf"``; ``"core"``: the DBNet core map); the fused map is a DBNet threshold map T, read off the
  main map without training it (``fusion_grad=0``) and a *detached* Laplacian cue of the prediction, and
  supervised by the border map inside the border band; the model's own probability is binarised against T
  (``B = sigmoid(k (P - T))``) and supervised by the mask. Each term's minimum is its target; the mask, main and
  binary terms reach the exported weights, and the threshold term reaches them through the binary term whose
  threshold it sets (docs/design.md, "What trains what"). A band-weighted BCE on the exported logits
  (``w_boundary``) is built and tested but off by default.
* ``"paper"``: the reference formulation (AdSTNet): the head reads the model's output (the mask logits); main
  map vs core, Laplacian of the mask logits vs the border map (BCE), fused map vs the mask, every term training
  the model.
* ``"legacy"``: the default of adst-plugin 0.1: ``"paper"``'s terms on detached decoder features.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from ._checks import check_choice, check_int, check_number, check_thresholds
from .constants import DB_STEEPNESS, HEAD_STRIDE, HIDDEN_CHANNELS, SHRINK_RATIO, THRESH_MAX, THRESH_MIN

__all__ = [
    "DEFAULT_PRESET",
    "EDGE_INPUTS",
    "FUSED_ROLES",
    "HEAD_INPUTS",
    "LOSS_WEIGHTS",
    "MAIN_TARGETS",
    "PRESETS",
    "RENAMED_FIELDS",
    "THRESHOLD_TARGETS",
    "ADSTConfig",
    "get_config",
    "renamed_fields",
]

#: What the head reads: the output of the ``features`` submodule, or the mask logits (1 channel).
HEAD_INPUTS = ("features", "logits")
#: What the Laplacian edge map is taken of: the mask logits (paper, trained through), or the detached
#: probabilities sigmoid(logits) (a cue for the threshold map that no loss can push on).
EDGE_INPUTS = ("logits", "probs")
#: What the fused map is: mask logits (paper) or the logits of a DBNet threshold map T.
FUSED_ROLES = ("mask", "threshold")
#: What the main map is supervised by: the DBNet core (BCE), the signed distance to the edge (L1 on tanh), or that
#: distance clipped to +-constants.SDF_CLIP, a target tanh reaches with finite logits.
MAIN_TARGETS = ("core", "sdf", "sdf-clip")
#: What the threshold map T is supervised by: the border map on the border band (DBNet), or the symmetric target
#: 0.5 + (max - min) / 2 * s on every pixel (zero margin on the true edge).
THRESHOLD_TARGETS = ("border", "symmetric")
#: The loss-weight fields of :class:`ADSTConfig`, in the order of ``ADSTLoss.last_terms``; ``w_<x>``'s term is
#: logged as ``<x>``.
LOSS_WEIGHTS = ("w_mask", "w_main", "w_edge", "w_fused", "w_threshold", "w_binary", "w_boundary")
#: Former names of :class:`ADSTConfig` fields (former -> current): still accepted as keywords, with a
#: ``DeprecationWarning``, until the next release, and read silently from recorded configs (:func:`renamed_fields`).
RENAMED_FIELDS = {"w_core": "w_main"}


def renamed_fields(values: Mapping[str, Any], where: str | None = None, stacklevel: int = 3) -> dict[str, Any]:
    """``values`` with each former field name (:data:`RENAMED_FIELDS`) replaced by its current one.

    Args:
        values: field name -> value (keywords, or a recorded config such as a run's ``adst_config``).
        where: the caller, for the warning; None reads a record: no warning.
        stacklevel: the warning's stack level, counted from this function (3: the caller's caller).
    Raises:
        TypeError: a former name and its current one both given.
    """
    out = dict(values)
    for former, current in RENAMED_FIELDS.items():
        if former not in out:
            continue
        if current in out:
            raise TypeError(
                f"{where or 'ADSTConfig'}: got both {former}= and {current}=; {former} is the former name of "
                f"{current}: give {current} alone"
            )
        if where is not None:
            warnings.warn(
                f"{where}: {former}= is now {current}= (the main map's term, whatever main_target it regresses); "
                f"the former name goes in the next release",
                DeprecationWarning,
                stacklevel=stacklevel,
            )
        out[current] = out.pop(former)
    return out


@dataclass(frozen=True)
class ADSTConfig:
    """Everything that defines an ADST head and its loss. Build one with :func:`get_config`.

    Head:
        head_input: ``"features"`` (the ``features`` submodule's output) or ``"logits"`` (the mask logits).
        features: dotted path of the submodule the head reads (``head_input="features"``).
        hidden_channels: width of the main and fusion branches (SACA's group/split constraints apply).
        head_stride: the main branch and the fusion run at <= 1/head_stride of the mask size; their
            outputs are resized bilinearly (smooth, no sub-pixel checkerboard).
        feature_grad: gradient scale from the head into the tapped features, in [0, 1]: 0 detaches them
            (the head trains alone), 1 is full deep supervision. The forward value is unchanged.
        fusion_grad: gradient scale from the fusion into the main map, in [0, 1]: 0 makes the fused map a
            read-out of a main map that only its own term shapes; 1 lets the fused map's term train the main
            branch and, through it, the features (the reference).
        edge_input: see :data:`EDGE_INPUTS`.
        fused_role: see :data:`FUSED_ROLES`.
        db_steepness: k of the binarisation ``sigmoid(k (P - T))``.
        detach_threshold: T enters the binarisation detached, so the binary term trains the model's logits
            only and T is shaped by the border map alone.
        main_target: see :data:`MAIN_TARGETS`; the ``w_main`` term regresses it.
        threshold_target: see :data:`THRESHOLD_TARGETS`; the ``w_threshold`` term regresses it.

    Loss weights (0 switches a term off; a term that does not apply to the role must be 0):
        w_mask: base loss on the mask logits.
        w_main: the main map's term (``main``): L1 of tanh against the signed distance, or BCE against the core
            map. ``w_core=``, its former name, is accepted until the next release, with a ``DeprecationWarning``.
        w_edge: BCE of the Laplacian edge map against the border map (paper; needs ``edge_input="logits"``).
        w_fused: base loss of the fused map against the mask (``fused_role="mask"``).
        w_threshold: L1 of sigmoid(T) against the border map inside the border band (``"threshold"``).
        w_binary: BCE of the binarisation ``sigmoid(k (P - T))`` against the mask (``"threshold"``).
        w_boundary: BCE of the mask logits weighted by the border band (1 on the boundary, 0 at D).

    Targets:
        shrink_ratio, thresh_min, thresh_max: see :mod:`adst_plugin.targets`.
    """

    head_input: str = "features"
    features: str = "decoder"
    hidden_channels: int = HIDDEN_CHANNELS
    head_stride: int = HEAD_STRIDE
    feature_grad: float = 1.0
    fusion_grad: float = 0.0  # T is a read-out: the threshold term (weight 10) does not pull on the features
    edge_input: str = "probs"
    fused_role: str = "threshold"
    db_steepness: float = DB_STEEPNESS
    detach_threshold: bool = True
    main_target: str = "sdf"
    threshold_target: str = "border"
    w_mask: float = 1.0
    w_main: float = 1.0
    w_edge: float = 0.0
    w_fused: float = 0.0
    w_threshold: float = 10.0
    w_binary: float = 1.0
    w_boundary: float = 0.0  # opt-in
    shrink_ratio: float = SHRINK_RATIO
    thresh_min: float = THRESH_MIN
    thresh_max: float = THRESH_MAX

    def __post_init__(self) -> None:
        where = "ADSTConfig"
        for name, valid in (
            ("head_input", HEAD_INPUTS),
            ("edge_input", EDGE_INPUTS),
            ("fused_role", FUSED_ROLES),
            ("main_target", MAIN_TARGETS),
            ("threshold_target", THRESHOLD_TARGETS),
        ):
            check_choice(getattr(self, name), valid, name, where)
        check_int(self.head_stride, "head_stride", where)
        for name in ("feature_grad", "fusion_grad"):
            check_number(getattr(self, name), name, where, low=0.0, high=1.0)
        check_number(self.db_steepness, "db_steepness", where, low=0.0, open_low=True)
        for name in LOSS_WEIGHTS:
            check_number(getattr(self, name), name, where, low=0.0)
        needs = {
            "w_edge": ("edge_input", "logits"),
            "w_fused": ("fused_role", "mask"),
            "w_threshold": ("fused_role", "threshold"),
            "w_binary": ("fused_role", "threshold"),
        }
        for weight, (field, value) in needs.items():
            if getattr(self, weight) > 0 and getattr(self, field) != value:
                raise ValueError(
                    f"{where}: {weight}={getattr(self, weight)} needs {field}={value!r}, got {getattr(self, field)!r}. "
                    f"Set {weight}=0 or {field}={value!r}."
                )
        check_number(self.shrink_ratio, "shrink_ratio", where, low=0.0, high=1.0, open_low=True, open_high=True)
        check_thresholds(self.thresh_min, self.thresh_max, where)

    @property
    def w_core(self) -> float:
        """The former name of :attr:`w_main`, read with a ``DeprecationWarning`` until the next release."""
        warnings.warn("ADSTConfig.w_core is now w_main", DeprecationWarning, stacklevel=2)
        return self.w_main

    def replace(self, **overrides: Any) -> ADSTConfig:
        """A copy with some fields changed; unknown names raise a ``TypeError`` that lists the valid ones."""
        overrides = renamed_fields(overrides, "ADSTConfig.replace")
        valid = [f.name for f in dataclasses.fields(self)]
        unknown = sorted(set(overrides) - set(valid))
        if unknown:
            raise TypeError(f"ADSTConfig: unknown option(s) {unknown}; valid options are {valid}")
        return dataclasses.replace(self, **overrides)

    def term_names(self) -> dict[str, str]:
        """Loss-weight field -> the name its term has in ``ADSTLoss.last_terms`` and the logs: ``w_x`` -> ``x``."""
        return {w: w.removeprefix("w_") for w in LOSS_WEIGHTS}

    def as_dict(self) -> dict[str, Any]:
        """Plain dict (for run configs and logs)."""
        return dataclasses.asdict(self)


def _accepting_former_names(init: Callable[..., None]) -> Callable[..., None]:
    # The dataclass's own __init__, taking the former field names too (RENAMED_FIELDS), with a warning.
    @functools.wraps(init)
    def init_with_former_names(self: ADSTConfig, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **renamed_fields(kwargs, "ADSTConfig"))

    return init_with_former_names


ADSTConfig.__init__ = _accepting_former_names(ADSTConfig.__init__)  # type: ignore[method-assign]

#: The named configurations; see the module docstring.
PRESETS: dict[str, ADSTConfig] = {
    "adst": ADSTConfig(),
    "paper": ADSTConfig(
        head_input="logits",
        main_target="core",
        edge_input="logits",
        fused_role="mask",
        w_edge=1.0,
        w_fused=1.0,
        w_threshold=0.0,
        w_binary=0.0,
        w_boundary=0.0,
        fusion_grad=1.0,
    ),
}
PRESETS["legacy"] = PRESETS["paper"].replace(head_input="features", feature_grad=0.0)

#: The preset ``wrap_with_adst`` uses when none is named. This default, ``main_target``, ``fusion_grad`` and
#: ``w_boundary`` were each chosen by the rule docs/results.md ("Rules for choosing defaults") names for it.
DEFAULT_PRESET = "adst"


def get_config(preset: str | ADSTConfig = DEFAULT_PRESET, **overrides: Any) -> ADSTConfig:
    """A preset by name (or an :class:`ADSTConfig`) with ``overrides`` applied.

    Raises:
        KeyError: unknown preset name (the message lists the valid ones).
        TypeError: unknown override name.
        ValueError: an invalid value or an inconsistent combination.
    Example:
        >>> get_config("paper", head_input="features", feature_grad=0.0) == PRESETS["legacy"]
        True
    """
    overrides = renamed_fields(overrides, "get_config")
    if isinstance(preset, ADSTConfig):
        base = preset
    elif preset in PRESETS:
        base = PRESETS[preset]
    else:
        raise KeyError(f"get_config: unknown preset {preset!r}; valid presets are {sorted(PRESETS)}")
    return base.replace(**overrides) if overrides else base
