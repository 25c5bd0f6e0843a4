"""Named ADST configurations (adst_plugin.presets): build, validate, and share one object between head and loss."""

from __future__ import annotations

import dataclasses
import math
import warnings

import pytest
import torch
from conftest import tiny_unet

from adst_plugin import DEFAULT_PRESET, PRESETS, ADSTConfig, ADSTLoss, get_config, wrap_with_adst
from adst_plugin.loss import LOSS_FIELDS
from adst_plugin.presets import EDGE_INPUTS, FUSED_ROLES, HEAD_INPUTS, LOSS_WEIGHTS

pytestmark = pytest.mark.usefixtures("single_torch_thread")  # tiny models: one thread is faster on 2 cores

FIELDS = [f.name for f in dataclasses.fields(ADSTConfig)]


def _batch(size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    y = torch.zeros(2, 1, size, size)
    y[0, :, 8:24, 6:20] = 1
    y[1, :, 3:7, 20:26] = 1
    return torch.randn(2, 3, size, size, generator=g), y


def test_the_presets_are_the_documented_ones():
    assert sorted(PRESETS) == ["adst", "legacy", "paper"]
    # The default preset and its defaults were each chosen by a rule (docs/results.md, "Rules for choosing
    # defaults"); the dataclass defaults are the export-aware redesign ("adst").
    assert DEFAULT_PRESET == "adst" and get_config() is PRESETS["adst"]
    assert PRESETS["adst"] == ADSTConfig()


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_validates_and_round_trips(name):
    config = PRESETS[name]
    assert get_config(name) is config  # no overrides: the very object, not a copy
    assert get_config(config) is config
    assert ADSTConfig(**config.as_dict()) == config  # as_dict holds everything
    assert config.replace() == config
    assert hash(config) == hash(config.replace())  # frozen: usable as a dict key / run id
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.w_mask = 2.0  # type: ignore[misc]


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_builds_trains_one_step_and_logs_its_terms(name):
    torch.manual_seed(0)
    model = wrap_with_adst(tiny_unet(), name)
    criterion = ADSTLoss(model)
    x, y = _batch()
    loss = criterion(model(x), y)
    assert torch.isfinite(loss)
    loss.backward()
    config = PRESETS[name]
    expected = {
        "adst": {"mask", "main", "threshold", "binary", "total"},
        "paper": {"mask", "main", "edge", "fused", "total"},
        "legacy": {"mask", "main", "edge", "fused", "total"},
    }[name]
    assert set(criterion.last_terms) == expected
    # The logged total is the weighted sum of the logged terms (w_* of the one config).
    total = sum(getattr(config, f"w_{k}") * v for k, v in criterion.last_terms.items() if k != "total")
    assert torch.allclose(criterion.last_terms["total"], total)


def test_preset_contents():
    adst, paper, legacy = PRESETS["adst"], PRESETS["paper"], PRESETS["legacy"]
    assert (adst.feature_grad, adst.edge_input, adst.fused_role, adst.detach_threshold) == (
        1.0,
        "probs",
        "threshold",
        True,
    )
    assert (adst.w_edge, adst.w_fused) == (0.0, 0.0) and min(adst.w_threshold, adst.w_binary) > 0
    assert adst.w_boundary == 0.0  # built and tested, opt-in
    # The main map regresses the signed distance; the reference regresses the core.
    assert (adst.main_target, paper.main_target, legacy.main_target) == ("sdf", "core", "core")
    # Each weight names its term, whatever the main map regresses.
    assert adst.term_names() == paper.term_names() == {w: w.removeprefix("w_") for w in LOSS_WEIGHTS}
    # The threshold map is read off the main map without training it; the reference's wiring trains through.
    assert (adst.fusion_grad, paper.fusion_grad, legacy.fusion_grad) == (0.0, 1.0, 1.0)
    assert (paper.head_input, paper.feature_grad, paper.edge_input, paper.fused_role) == (
        "logits",
        1.0,
        "logits",
        "mask",
    )
    assert (paper.w_threshold, paper.w_binary, paper.w_boundary) == (0.0, 0.0, 0.0)
    assert paper.w_main == paper.w_edge == paper.w_fused == paper.w_mask == 1.0
    # legacy == paper's terms on detached decoder features (adst-plugin 0.1), and nothing else.
    assert legacy == get_config("paper", head_input="features", feature_grad=0.0)
    assert {f for f in FIELDS if getattr(legacy, f) != getattr(paper, f)} == {"head_input", "feature_grad"}


def test_unknown_preset_lists_the_names():
    with pytest.raises(KeyError, match=r"unknown preset 'dbnet'.*\['adst', 'legacy', 'paper'\]"):
        get_config("dbnet")
    with pytest.raises(KeyError, match="valid presets"):
        wrap_with_adst(tiny_unet(), "Paper")  # names are case-sensitive


def test_unknown_option_lists_the_valid_names():
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['feature_grads'\]") as info:
        get_config("adst", feature_grads=0.5)
    for name in FIELDS:
        assert repr(name) in str(info.value)
    with pytest.raises(TypeError, match="feature_grads"):
        wrap_with_adst(tiny_unet(), "adst", feature_grads=0.5)


def test_the_former_name_w_core_still_works_with_a_deprecation_warning():
    with pytest.warns(DeprecationWarning, match=r"ADSTConfig: w_core= is now w_main="):
        assert ADSTConfig(w_core=0.5) == ADSTConfig(w_main=0.5)
    with pytest.warns(DeprecationWarning, match="get_config: w_core= is now w_main="):
        assert get_config("paper", w_core=0.25) == get_config("paper", w_main=0.25)
    with pytest.warns(DeprecationWarning, match=r"ADSTConfig\.replace: w_core="):
        assert PRESETS["adst"].replace(w_core=2.0).w_main == 2.0
    with pytest.warns(DeprecationWarning, match="wrap_with_adst: w_core="):
        model = wrap_with_adst(tiny_unet(), w_core=0.5)
    assert model.config == get_config(w_main=0.5)
    with pytest.warns(DeprecationWarning, match="ADSTLoss: w_core="):
        assert ADSTLoss(model, w_core=0.0).config == model.config.replace(w_main=0.0)
    with pytest.warns(DeprecationWarning, match=r"ADSTConfig\.w_core is now w_main"):
        assert model.config.w_core == 0.5
    with pytest.raises(TypeError, match="got both w_core= and w_main="):
        get_config(w_core=1.0, w_main=2.0)
    # Each warning names the caller's line, so Python's default filters show it where the old name is written.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        get_config(w_core=1.0), wrap_with_adst(tiny_unet(), w_core=1.0), ADSTConfig(w_core=1.0)
    assert [w.filename for w in caught] == [__file__] * 3


@pytest.mark.parametrize(
    ("preset", "overrides", "message"),
    [
        (
            "adst",
            {"w_edge": 1.0},
            "w_edge=1.0 needs edge_input='logits', got 'probs'. Set w_edge=0 or edge_input='logits'.",
        ),
        (
            "adst",
            {"w_fused": 1.0},
            "w_fused=1.0 needs fused_role='mask', got 'threshold'. Set w_fused=0 or fused_role='mask'.",
        ),
        (
            "paper",
            {"w_threshold": 10.0},
            "w_threshold=10.0 needs fused_role='threshold', got 'mask'. Set w_threshold=0",
        ),
        ("paper", {"w_binary": 1.0}, "w_binary=1.0 needs fused_role='threshold', got 'mask'. Set w_binary=0"),
        ("paper", {"fused_role": "threshold"}, "w_fused=1.0 needs fused_role='mask', got 'threshold'. Set w_fused=0"),
        ("paper", {"edge_input": "probs"}, "w_edge=1.0 needs edge_input='logits', got 'probs'. Set w_edge=0"),
        (
            "adst",
            {"fused_role": "mask"},
            "w_threshold=10.0 needs fused_role='threshold', got 'mask'. Set w_threshold=0",
        ),
    ],
)
def test_inconsistent_combinations_name_the_field_and_the_fix(preset, overrides, message):
    with pytest.raises(ValueError) as info:
        get_config(preset, **overrides)
    assert message in str(info.value)


@pytest.mark.parametrize(
    ("preset", "overrides"),
    [
        ("paper", {"edge_input": "probs", "w_edge": 0.0}),
        ("paper", {"fused_role": "threshold", "w_fused": 0.0, "w_threshold": 10.0, "w_binary": 1.0}),
        ("adst", {"fused_role": "mask", "w_threshold": 0.0, "w_binary": 0.0, "w_fused": 1.0}),
        ("adst", {"edge_input": "logits", "w_edge": 0.5}),
        ("adst", {"w_boundary": 0.0, "feature_grad": 0.0, "detach_threshold": False, "head_stride": 1}),
    ],
)
def test_consistent_combinations_train_exactly_the_terms_they_weigh(preset, overrides):
    # Switching a role off together with its weights is fine in either direction, and the loss then computes the
    # terms with a weight, no more and no fewer.
    config = get_config(preset, **overrides)
    assert config == dataclasses.replace(PRESETS[preset], **overrides)  # taken as given, nothing else moved
    torch.manual_seed(0)
    model = wrap_with_adst(tiny_unet(), config)
    criterion = ADSTLoss(model)
    x, y = _batch()
    criterion(model(x), y).backward()
    names = config.term_names()
    assert set(criterion.last_terms) == {"total"} | {names[w] for w in LOSS_WEIGHTS if getattr(config, w) > 0}
    assert all(p.grad is not None for p in model.head.parameters())


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (
            {"head_input": "encoder"},
            r"unknown head_input 'encoder'.*" + str(HEAD_INPUTS).replace("(", r"\(").replace(")", r"\)"),
        ),
        (
            {"edge_input": "image"},
            r"unknown edge_input 'image'.*" + str(EDGE_INPUTS).replace("(", r"\(").replace(")", r"\)"),
        ),
        (
            {"fused_role": "core"},
            r"unknown fused_role 'core'.*" + str(FUSED_ROLES).replace("(", r"\(").replace(")", r"\)"),
        ),
        ({"head_stride": 0}, "head_stride to be an int >= 1, got 0"),
        ({"feature_grad": 1.5}, "0 <= feature_grad <= 1, got 1.5"),
        ({"feature_grad": -0.1}, "0 <= feature_grad <= 1"),
        ({"feature_grad": math.nan}, "0 <= feature_grad <= 1, got nan"),
        ({"fusion_grad": 2.0}, "0 <= fusion_grad <= 1, got 2.0"),
        ({"fusion_grad": math.nan}, "0 <= fusion_grad <= 1, got nan"),
        ({"db_steepness": 0.0}, "db_steepness > 0, got 0.0"),
        ({"w_mask": -1.0}, "w_mask >= 0, got -1.0"),
        ({"w_boundary": math.nan}, "w_boundary >= 0, got nan"),
        ({"shrink_ratio": 1.0}, "0 < shrink_ratio < 1, got 1.0"),
        ({"thresh_min": 0.7, "thresh_max": 0.3}, "0 <= thresh_min < thresh_max <= 1"),
        ({"thresh_max": 1.5}, "thresh_max <= 1"),
    ],
)
def test_invalid_values_raise_value_errors_naming_the_field(overrides, match):
    with pytest.raises(ValueError, match=match):
        get_config("adst", **overrides)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"head_stride": 2.0}, "head_stride to be an int >= 1, got 2.0"),
        ({"head_stride": True}, "head_stride to be an int >= 1, got True"),
        ({"feature_grad": "1"}, "feature_grad to be a real number, got str"),
        ({"w_threshold": None}, "w_threshold to be a real number, got NoneType"),
        ({"main_target": None}, r"main_target to be one of \('core', 'sdf', 'sdf-clip'\), got NoneType"),
    ],
)
def test_values_of_the_wrong_type_raise_type_errors_naming_the_field(overrides, match):
    with pytest.raises(TypeError, match=match):
        get_config("adst", **overrides)


def test_invalid_hidden_width_is_caught_when_the_head_is_built():
    config = get_config("adst", hidden_channels=12)  # SACA's constraints are checked by SACA itself
    with pytest.raises(ValueError, match=r"channels=12 does not fit.*Valid widths include \[8, 16"):
        wrap_with_adst(tiny_unet(), config)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_wrapper_and_loss_share_the_one_config_object(name):
    model = wrap_with_adst(tiny_unet(), preset=name)
    assert model.config is PRESETS[name]
    criterion = ADSTLoss(model)
    assert criterion.config is model.config  # the loss reads it from the model: the choice is made once


def test_wrap_overrides_reach_the_loss_and_loss_overrides_stay_in_the_loss():
    model = wrap_with_adst(tiny_unet(), "adst", feature_grad=0.5, w_boundary=2.0)
    assert model.config == PRESETS["adst"].replace(feature_grad=0.5, w_boundary=2.0)
    assert PRESETS["adst"].w_boundary == 0.0  # the preset itself is untouched
    shared = ADSTLoss(model)
    assert shared.config is model.config and shared.config.w_boundary == 2.0

    own = ADSTLoss(model, w_boundary=0.0, w_threshold=3.0)
    assert own.config == model.config.replace(w_boundary=0.0, w_threshold=3.0)
    assert model.config.w_boundary == 2.0 and model.config.w_threshold == 10.0  # the model's copy is untouched
    assert shared.config.w_boundary == 2.0  # and so is the other loss's
    assert own.config.feature_grad == 0.5  # everything not overridden comes from the model


def test_loss_overrides_are_limited_to_loss_fields_and_validated():
    model = wrap_with_adst(tiny_unet(), "adst")
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['feature_grad'\]") as info:
        ADSTLoss(model, feature_grad=0.0)  # a head field: it must be set at wrap time
    for name in LOSS_FIELDS:
        assert repr(name) in str(info.value)
    assert set(LOSS_WEIGHTS) <= set(LOSS_FIELDS) and "feature_grad" not in LOSS_FIELDS
    with pytest.raises(ValueError, match="Set w_edge=0 or edge_input='logits'"):
        ADSTLoss(model, w_edge=1.0)  # the loss's copy is validated like any config
    with pytest.raises(ValueError, match="w_main >= 0"):
        ADSTLoss(model, w_main=-1.0)


def test_loss_without_a_model_uses_the_default_preset():
    assert ADSTLoss().config is get_config()
    assert ADSTLoss(None, w_mask=2.0).config == get_config(w_mask=2.0)


@pytest.mark.parametrize(("preset", "overrides"), [("adst", {"w_boundary": 1.0}), ("paper", {})])
def test_loss_weight_fields_are_the_logged_terms_in_their_order(preset, overrides):
    # Every w_* field is a loss weight (a new one cannot be left out), and the terms are logged in LOSS_WEIGHTS's
    # order, each under the name term_names() gives its weight.
    assert tuple(name for name in FIELDS if name.startswith("w_")) == LOSS_WEIGHTS
    config = get_config(preset, **overrides)
    model = wrap_with_adst(tiny_unet(), config)
    criterion = ADSTLoss(model)
    x, y = _batch()
    criterion(model(x), y)
    names = config.term_names()
    logged = [name for name in criterion.last_terms if name != "total"]
    assert logged == [names[w] for w in LOSS_WEIGHTS if names[w] in logged]
    assert set(logged) == {names[w] for w in LOSS_WEIGHTS if getattr(config, w) > 0}
