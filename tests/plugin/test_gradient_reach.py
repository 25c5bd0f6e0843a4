"""Gradient reach: which parameter groups each loss term trains, per preset and mode.

For every preset and every term with a nonzero weight in it, the term is switched on alone (every other weight,
``w_mask`` included, set to 0 through ``ADSTLoss`` overrides) and one backward pass tells which groups get a
nonzero gradient (binary: a 1-class model; the multiclass and multilabel rows: the same model with 3 classes):
the exported model's ``encoder``, ``decoder`` and ``segmentation_head`` and the head's ``head.main`` and
``head.fusion`` (``head.edge`` has no parameters). ``EXPECTED`` pins the table, and the same table, rendered by
:func:`render_table`, must appear verbatim in docs/design.md ("What trains what").
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_unet
from multiclass_cases import tiny_model

from adst_plugin import PRESETS, ADSTLoss, wrap_with_adst
from adst_plugin.presets import LOSS_WEIGHTS

pytestmark = pytest.mark.usefixtures("single_torch_thread")  # small tensors: one thread is faster on 2 cores

DESIGN_MD = Path(__file__).resolve().parents[2] / "docs" / "design.md"

#: Parameter-name prefixes of each group of the wrapper.
GROUPS = {
    "encoder": "model.encoder.",
    "decoder": "model.decoder.",
    "segmentation_head": "model.segmentation_head.",
    "head.main": "head.main.",
    "head.fusion": "head.fusion.",
}
EXPORTED = ("encoder", "decoder", "segmentation_head")
MODEL = frozenset(EXPORTED)
TERMS = {weight: weight.removeprefix("w_") for weight in LOSS_WEIGHTS}  # w_main -> main
WEIGHT_OF = {term: weight for weight, term in TERMS.items()}

#: (row label, preset, wrap overrides, loss overrides) -> term -> the groups with a nonzero gradient.
EXPECTED: dict[tuple[str, str, tuple, tuple], dict[str, frozenset[str]]] = {
    ("adst", "adst", (), ()): {
        "mask": MODEL,
        # Deep supervision towards the signed distance: the main map reads the live decoder output; the
        # segmentation head is after the tap.
        "main": frozenset({"encoder", "decoder", "head.main"}),
        # T = fusion(main read with fusion_grad=0, detached Laplacian of sigmoid(logits)): the fusion alone.
        "threshold": frozenset({"head.fusion"}),
        # B = sigmoid(k (P - T)) with T detached: the exported logits only.
        "binary": MODEL,
    },
    ("adst, w_boundary=1 (opt-in)", "adst", (("w_boundary", 1.0),), ()): {
        "boundary": MODEL,  # a weighted BCE of the exported logits
    },
    ("adst, detach_threshold=False", "adst", (), (("detach_threshold", False),)): {
        "binary": MODEL | {"head.fusion"},  # also trains T, which stops at the main map (fusion_grad=0)
    },
    ("adst, feature_grad=0", "adst", (("feature_grad", 0.0),), ()): {
        "main": frozenset({"head.main"}),  # the head trains alone
        "threshold": frozenset({"head.fusion"}),
        "binary": MODEL,
    },
    ("adst, fusion_grad=1 (reference wiring)", "adst", (("fusion_grad", 1.0),), ()): {
        "main": frozenset({"encoder", "decoder", "head.main"}),
        # the reference's wiring: T's loss trains the main branch and, through it, the features
        "threshold": frozenset({"encoder", "decoder", "head.main", "head.fusion"}),
        "binary": MODEL,
    },
    ("adst, main_target=core", "adst", (("main_target", "core"),), ()): {
        "main": frozenset({"encoder", "decoder", "head.main"}),  # deep supervision towards the shrunk core
    },
    ("adst, threshold_target=symmetric", "adst", (("threshold_target", "symmetric"),), ()): {
        "threshold": frozenset({"head.fusion"}),  # another target for T, the same path
        "binary": MODEL,
    },
    ("adst, multiclass (C = 3)", "adst", (), (("mode", "multiclass"),)): {
        "mask": MODEL,
        "main": frozenset({"encoder", "decoder", "head.main"}),  # classes 1 and 2 of the main map
        "threshold": frozenset({"head.fusion"}),
        "binary": MODEL,  # the softmax probability of each lesion class: every logit channel
    },
    ("adst, multilabel (C = 3)", "adst", (), (("mode", "multilabel"),)): {
        "mask": MODEL,
        "main": frozenset({"encoder", "decoder", "head.main"}),
        "threshold": frozenset({"head.fusion"}),
        "binary": MODEL,
    },
    ("adst, multiclass, w_boundary=1", "adst", (("w_boundary", 1.0),), (("mode", "multiclass"),)): {
        "boundary": MODEL,  # a band-weighted cross-entropy of the exported logits
    },
    ("paper", "paper", (), ()): {
        "mask": MODEL,
        "main": MODEL | {"head.main"},  # the head reads the mask logits (as the reference does)
        "edge": MODEL,  # the Laplacian of the mask logits: no parameters of its own
        "fused": MODEL | {"head.main", "head.fusion"},  # through the main branch and the Laplacian of the logits
    },
    ("paper, multiclass (C = 3)", "paper", (), (("mode", "multiclass"),)): {
        "mask": MODEL,
        "main": MODEL | {"head.main"},
        "edge": MODEL,
        "fused": MODEL | {"head.main", "head.fusion"},
    },
    ("legacy", "legacy", (), ()): {
        "mask": MODEL,
        "main": frozenset({"head.main"}),  # nothing reaches the exported model: legacy's flaw
        "edge": MODEL,
        "fused": MODEL | {"head.main", "head.fusion"},  # into the model only through the Laplacian of the logits
    },
}


def _cases() -> list:
    return [
        pytest.param(key, term, id=f"{key[0].replace(' ', '')}:{term}")
        for key, terms in EXPECTED.items()
        for term in terms
    ]


def test_every_weighted_term_of_every_preset_is_pinned():
    for name, config in PRESETS.items():
        weighted = {TERMS[w] for w in LOSS_WEIGHTS if getattr(config, w) > 0}
        assert set(EXPECTED[(name, name, (), ())]) == weighted, name


def _batch(mode: str = "binary") -> tuple[torch.Tensor, torch.Tensor]:
    yy, xx = np.mgrid[:64, :64]
    y = np.zeros((2, 1, 64, 64), np.float32)
    y[0, 0] = (yy - 31.5) ** 2 + (xx - 31.5) ** 2 <= 20**2  # a disc
    y[1, 0] = (yy - 20) ** 2 + (xx - 44) ** 2 <= 4**2  # a small blob
    g = torch.Generator().manual_seed(0)
    mask = torch.from_numpy(y)
    if mode == "multiclass":  # the disc is class 1, the blob class 2
        mask = mask[:, 0].long() * torch.tensor([1, 2]).view(2, 1, 1)
    elif mode == "multilabel":  # the lesion, its mirror image and its left half: overlapping labels
        mask = torch.cat([mask, mask.flip(-1), mask * torch.from_numpy(xx < 32).float()], 1)
    return torch.randn(2, 3, 64, 64, generator=g), mask


def _grads(preset: str, term: str, wrap: dict | None = None, loss: dict | None = None) -> dict[str, torch.Tensor]:
    """Parameter gradients (zeros where None) after one backward of ``term`` alone, at the preset's weight."""
    mode = (loss or {}).get("mode", "binary")
    torch.manual_seed(0)
    net = tiny_unet() if mode == "binary" else tiny_model(3)
    model = wrap_with_adst(net, preset, **(wrap or {})).train()
    weights = {w: 0.0 for w in LOSS_WEIGHTS}
    weight = WEIGHT_OF[term]
    weights[weight] = getattr(model.config, weight)
    assert weights[weight] > 0, f"{term} has no weight in {preset}"
    criterion = ADSTLoss(model, **weights, **(loss or {}))
    x, y = _batch(mode)
    criterion(model(x), y).backward()
    assert set(criterion.last_terms) >= {term}
    return {n: (p.grad if p.grad is not None else torch.zeros_like(p)) for n, p in model.named_parameters()}


def _reached(grads: dict[str, torch.Tensor], prefix: str) -> set[str]:
    return {n for n, g in grads.items() if n.startswith(prefix) and bool(g.ne(0).any())}


@pytest.fixture(scope="module")
def used_by_the_model() -> dict[str, set[str]]:
    """The exported parameters the mask loss reaches: those the forward uses (the depth-3 encoder leaves
    layer3/layer4 unused)."""
    grads = _grads("adst", "mask")
    return {group: _reached(grads, GROUPS[group]) for group in EXPORTED}


@pytest.mark.parametrize(("key", "term"), _cases())
def test_gradient_reach(key, term, used_by_the_model):
    label, preset, wrap, loss = key
    grads = _grads(preset, term, dict(wrap), dict(loss))
    reached = {group for group, prefix in GROUPS.items() if _reached(grads, prefix)}
    assert reached == EXPECTED[key][term], f"{label}: {term}"
    # All or nothing within a group: a reached group is reached in every parameter the forward uses
    # (so "the decoder" means the whole decoder, and every head parameter, SRU's GroupNorm included, trains).
    for group in reached:
        everything = (
            used_by_the_model[group] if group in EXPORTED else {n for n in grads if n.startswith(GROUPS[group])}
        )
        assert _reached(grads, GROUPS[group]) == everything, f"{label}: {term} reaches part of {group}"


def test_feature_grad_scales_the_main_terms_feature_gradient_exactly():
    full = _grads("adst", "main")
    half = _grads("adst", "main", wrap={"feature_grad": 0.5})
    for name in full:
        if name.startswith(("model.encoder.", "model.decoder.")):
            assert torch.allclose(half[name], 0.5 * full[name], rtol=1e-6, atol=1e-12), name
        else:  # the head's own gradient is not scaled; the segmentation head gets none
            assert torch.allclose(half[name], full[name], rtol=1e-6, atol=1e-12), name
    assert any(bool(full[n].ne(0).any()) for n in full if n.startswith("model.decoder."))


def test_fusion_grad_scales_the_threshold_terms_gradient_into_the_main_branch_exactly():
    full = _grads("adst", "threshold", wrap={"fusion_grad": 1.0})
    half = _grads("adst", "threshold", wrap={"fusion_grad": 0.5})
    scaled = ("model.encoder.", "model.decoder.", "head.main.")
    for name in full:
        factor = 0.5 if name.startswith(scaled) else 1.0  # the fusion's own gradient is not scaled
        assert torch.allclose(half[name], factor * full[name], rtol=1e-5, atol=1e-10), name
    assert any(bool(full[n].ne(0).any()) for n in full if n.startswith("head.main."))


def render_table() -> str:
    """The markdown table of EXPECTED, as it appears in docs/design.md."""
    columns = list(GROUPS)
    lines = [
        "| preset | term | " + " | ".join(f"`{c}`" for c in columns) + " |",
        "|---|---|" + "|".join(":-:" for _ in columns) + "|",
    ]
    order = [TERMS[w] for w in LOSS_WEIGHTS]
    for (label, _, _, _), terms in EXPECTED.items():
        assert set(terms) <= set(order), f"{label}: a term the table would not show"
        for term in order:
            if term in terms:
                marks = " | ".join("✓" if c in terms[term] else "-" for c in columns)
                lines.append(f"| {label} | {term} | {marks} |")
    return "\n".join(lines)


def test_design_doc_shows_the_pinned_table():
    text = DESIGN_MD.read_text(encoding="utf-8")
    table = render_table()
    assert table in text, f"docs/design.md must contain the gradient-reach table exactly:\n{table}"


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_head_parameter_stays_in_the_graph_with_zero_weights(preset):
    # DDP without find_unused_parameters: a zero weight still multiplies its term, so no head parameter is
    # left without a .grad (it is zero, not None), whichever terms are switched off.
    torch.manual_seed(0)
    model = wrap_with_adst(tiny_unet(), preset)
    criterion = ADSTLoss(model, **{w: 0.0 for w in LOSS_WEIGHTS if w != "w_mask"})
    x, y = _batch()
    criterion(model(x), y).backward()
    assert [n for n, p in model.head.named_parameters() if p.grad is None] == []
