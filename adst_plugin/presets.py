"""Named ADST configurations: the one source of every head and loss default.

An :class:`ADSTConfig` says how the head is built (where it reads, how its gradient reaches the model, what
its fused map means) and how :class:`~adst_plugin.ADSTLoss` weighs each term. ``wrap_with_adst(model,
preset=..., **overrides)`` builds the head from it, and the loss reads the same object from the model, so a
choice is made once.

Presets:

* ``"adst"`` (default): the export-aware head (the dataclass defaults). The SACA main map reads the live decoder
  features (``feature_grad=1``) and regresses the signed distance to the lesion edge (deep supervision,
  ``main_target="sdf"``; ``"core"`` is the DBNet core map it regressed before 2026-12-03); the fused map is a DBNet
  threshold map T, read off the main map without training it (``fusion_grad=0``) and a *detached* Laplacian cue
  of the prediction, and supervised by the border map inside the border band; the model's own probability is
  binarised against T (``B = sigmoid(k (P - T))``) and supervised by the mask. Each term's minimum is its
  target; mask, sdf and binary reach the exported weights, and the threshold term reaches them through the
  binary term whose threshold it sets (docs/design.md, "What trains what"). A band-weighted BCE on the exported
  logits (``w_boundary``) is built and tested but off: at weight 1 it lost 7 validation Dice points in the study.
* ``"paper"``: the reference formulation
  (AdSTNet): the head reads the model's 1-channel output (the mask logits); main map vs core, Laplacian of the
  mask logits vs the border map (BCE), fused map vs the mask, every term training the model.
* ``"legacy"``: the default of adst-plugin 0.1: ``"paper"``'s terms on detached decoder features.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from .constants import DB_STEEPNESS, HEAD_STRIDE, HIDDEN_CHANNELS, SHRINK_RATIO, THRESH_MAX, THRESH_MIN

__all__ = [
    "DEFAULT_PRESET",
    "EDGE_INPUTS",
    "FUSED_ROLES",
    "HEAD_INPUTS",
    "LOSS_WEIGHTS",
    "MAIN_TARGETS",
    "PRESETS",
    "THRESHOLD_TARGETS",
    "ADSTConfig",
    "get_config",
]

#: What the head reads: the output of the ``features`` submodule, or the mask logits (1 channel).
HEAD_INPUTS = ("features", "logits")
#: What the Laplacian edge map is taken of: the mask logits (paper, trained through), or the detached
#: probabilities sigmoid(logits) (a cue for the threshold map that no loss can push on).
EDGE_INPUTS = ("logits", "probs")
#: What the fused map is: mask logits (paper) or the logits of a DBNet threshold map T.
FUSED_ROLES = ("mask", "threshold")
#: What the main map is supervised by: the DBNet core (BCE) or the signed distance to the edge (L1 on tanh).
MAIN_TARGETS = ("core", "sdf")
#: What the threshold map T is supervised by: the border map on the border band (DBNet), or the symmetric target
#: 0.5 + (max - min) / 2 * s on every pixel (zero margin on the true edge).
THRESHOLD_TARGETS = ("border", "symmetric")
#: The loss-weight fields of :class:`ADSTConfig`, in the order of ``ADSTLoss.last_terms``.
LOSS_WEIGHTS = ("w_mask", "w_core", "w_edge", "w_fused", "w_threshold", "w_binary", "w_boundary")


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
            read-out of a main map that only its own (core) term shapes; 1 lets the fused map's term train the
            main branch and, through it, the features (the reference).
        edge_input: see :data:`EDGE_INPUTS`.
        fused_role: see :data:`FUSED_ROLES`.
        db_steepness: k of the binarisation ``sigmoid(k (P - T))``.
        detach_threshold: T enters the binarisation detached, so the binary term trains the model's logits
            only and T is shaped by the border map alone.
        main_target: see :data:`MAIN_TARGETS`; the ``w_core`` term regresses it.
        threshold_target: see :data:`THRESHOLD_TARGETS`; the ``w_threshold`` term regresses it.

    Loss weights (0 switches a term off; a term that does not apply to the role must be 0):
        w_mask: base loss on the mask logits.
        w_core: the main map's term: BCE against the core map, or L1 of tanh against the signed distance.
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
    fusion_grad: float = 0.0  # 1 let the threshold term pull 7x harder than the mask loss (results.md, BUSI 2026-12-01)
    edge_input: str = "probs"
    fused_role: str = "threshold"
    db_steepness: float = DB_STEEPNESS
    detach_threshold: bool = True
    main_target: str = "sdf"  # the boundary study's pick over "core" (docs/results.md, boundary study, 2026-12-03)
    threshold_target: str = "border"
    w_mask: float = 1.0
    w_core: float = 1.0
    w_edge: float = 0.0
    w_fused: float = 0.0
    w_threshold: float = 10.0
    w_binary: float = 1.0
    w_boundary: float = 0.0  # opt-in: at weight 1 it cost 7 Dice points on validation (results.md, BUSI 2026-11-27)
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
            if getattr(self, name) not in valid:
                raise ValueError(f"{where}: unknown {name} {getattr(self, name)!r}; valid options are {valid}")
        if not isinstance(self.head_stride, int) or isinstance(self.head_stride, bool) or self.head_stride < 1:
            raise ValueError(f"{where}: expected head_stride to be an int >= 1, got {self.head_stride!r}")
        for name in ("feature_grad", "fusion_grad"):
            if not 0.0 <= float(getattr(self, name)) <= 1.0:
                raise ValueError(f"{where}: expected 0 <= {name} <= 1, got {getattr(self, name)!r}")
        if not self.db_steepness > 0:
            raise ValueError(f"{where}: expected db_steepness > 0, got {self.db_steepness!r}")
        for name in LOSS_WEIGHTS:
            if not getattr(self, name) >= 0:
                raise ValueError(f"{where}: expected {name} >= 0, got {getattr(self, name)!r}")
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
        if not 0.0 < self.shrink_ratio < 1.0:
            raise ValueError(f"{where}: expected 0 < shrink_ratio < 1, got {self.shrink_ratio!r}")
        if not 0.0 <= self.thresh_min < self.thresh_max <= 1.0:
            raise ValueError(
                f"{where}: expected 0 <= thresh_min < thresh_max <= 1, got {self.thresh_min!r}, {self.thresh_max!r}"
            )

    def replace(self, **overrides: Any) -> ADSTConfig:
        """A copy with some fields changed; unknown names raise a ``TypeError`` that lists the valid ones."""
        valid = [f.name for f in dataclasses.fields(self)]
        unknown = sorted(set(overrides) - set(valid))
        if unknown:
            raise TypeError(f"ADSTConfig: unknown option(s) {unknown}; valid options are {valid}")
        return dataclasses.replace(self, **overrides)

    def term_names(self) -> dict[str, str]:
        """Loss-weight field -> the name its term has in ``ADSTLoss.last_terms`` and the logs: ``w_x`` -> ``x``,
        except ``w_core``, whose term is named after :attr:`main_target` (``"core"`` or ``"sdf"``)."""
        return {w: self.main_target if w == "w_core" else w.removeprefix("w_") for w in LOSS_WEIGHTS}

    def as_dict(self) -> dict[str, Any]:
        """Plain dict (for run configs and logs)."""
        return dataclasses.asdict(self)


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

#: The preset ``wrap_with_adst`` uses when none is named. Chosen by the rule fixed before the study: the best mean
#: paired validation Dice difference against the baseline among the ADST arms (docs/results.md, BUSI 2026-12-01:
#: 6 seeds, "adst" +0.12 [-0.85, +1.08], "paper" -0.47 [-2.37, +1.44]). Both tie with the baseline and with each
#: other; "paper" loses small-lesion Dice (-4.4 there, and -6.0 with -7.4 small recall at 24 seeds on 2026-11-28).
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
    if isinstance(preset, ADSTConfig):
        base = preset
    elif preset in PRESETS:
        base = PRESETS[preset]
    else:
        raise KeyError(f"get_config: unknown preset {preset!r}; valid presets are {sorted(PRESETS)}")
    return base.replace(**overrides) if overrides else base
