"""Well-posedness of every auxiliary term in adst_plugin.functional.

Each term is checked on a disc, a ring and a two-lesion mask (48 x 48, built with NumPy; targets from
``adst_targets``, band from ``band_weights``), and for C = 3 classes on a multiclass mask (two touching lesion
classes) and a multilabel mask (three overlapping labels), one channel per target class:

* on ideal inputs of growing confidence ``a`` (mask logits ``a (2y - 1)``) the term does not increase;
* minimising the term alone with Adam from a noisy start reaches its own target on >= 99 % of the pixels
  the term looks at;
* the paper's ``edge_loss`` fails both (pinned as a known flaw);

plus ``grad_scale`` (forward identity, gradient times the scale) and a hypothesis property of ``band_weights``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adst_plugin import functional as fn
from adst_plugin.constants import DB_STEEPNESS, THRESH_MAX, THRESH_MIN
from adst_plugin.laplacian import edge_map
from adst_plugin.targets import adst_targets, boundary_map

pytestmark = pytest.mark.usefixtures("single_torch_thread")  # tiny tensors: threads only add contention

SIZE = 48
CONFIDENCES = (1.0, 5.0, 20.0)


def _disc(size: int, radius: float, centre: tuple[float, float] | None = None) -> np.ndarray:
    cy, cx = centre if centre is not None else ((size - 1) / 2, (size - 1) / 2)
    yy, xx = np.mgrid[:size, :size]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2


def _ring(size: int, outer: float, inner: float) -> np.ndarray:
    return _disc(size, outer) & ~_disc(size, inner)


MASKS = {
    "disc": _disc(SIZE, 18),
    "ring": _ring(SIZE, 20, 9),
    "two_lesions": _disc(SIZE, 12, (14, 14)) | _disc(SIZE, 6, (34, 34)),
}


class Case:
    """A mask with its targets: y, core, border (float32 (1, 1, H, W)), band, and T = logit(border)."""

    def __init__(self, mask: np.ndarray):
        self.y = torch.from_numpy(mask.astype(np.float32))[None, None]
        self.core, self.border = adst_targets(self.y)
        self.band = fn.band_weights(self.border, THRESH_MIN, THRESH_MAX)
        self.threshold_logits = torch.logit(self.border.double()).float()  # sigmoid(T) = border


@pytest.fixture(scope="module", params=sorted(MASKS))
def case(request: pytest.FixtureRequest) -> Case:
    return Case(MASKS[request.param])


def test_the_masks_are_what_they_claim(case: Case) -> None:
    # Every mask has a core, a band and background far from every boundary (band == 0), so no check is vacuous.
    assert case.core.sum() > 0 and (case.core <= case.y).all()
    assert (case.band > 0).sum() > 100 and (case.band == 0).sum() > 100


# --------------------------------------------------------------------------------------------------------------
# 1. Ideal inputs of growing confidence
# --------------------------------------------------------------------------------------------------------------


def _ideal_values(case: Case) -> dict[str, list[float]]:
    values: dict[str, list[float]] = {name: [] for name in ("core", "threshold", "binarization", "boundary")}
    for a in CONFIDENCES:
        mask_logits = a * (2 * case.y - 1)
        values["core"].append(fn.core_loss(a * (2 * case.core - 1), case.core).item())
        # T's target is the border map itself, not a binary map: confidence a sharpens sigmoid(T) from 1/2
        # (a = 0) to the border map (a = 20).
        threshold = (a / CONFIDENCES[-1]) * case.threshold_logits
        values["threshold"].append(fn.threshold_loss(threshold, case.border, case.band).item())
        values["binarization"].append(
            fn.binarization_loss(mask_logits, case.threshold_logits, case.y, DB_STEEPNESS).item()
        )
        values["boundary"].append(fn.boundary_loss(mask_logits, case.y, case.band).item())
    return values


def test_every_term_decreases_with_the_confidence_of_ideal_inputs(case: Case) -> None:
    values = _ideal_values(case)
    for name, (v1, v5, v20) in values.items():
        # Non-increasing up to float32 rounding: Dice bottoms out at ~1e-7 (B <= sigmoid(k (1 - 0.7)) on the
        # boundary), where a and 20 differ by an ulp.
        assert v1 >= v5 >= v20 - 1e-6 and v20 >= 0.0, (name, values[name])
        assert v1 > v5, (name, values[name])  # a = 1 is still far from the minimum for every term
    # Strictly decreasing all the way where the term is a BCE / L1 that never saturates to exactly 0 early.
    for name in ("core", "threshold", "boundary"):
        v1, v5, v20 = values[name]
        assert v1 > v5 > v20, (name, values[name])
    # At a = 20 each term sits at its minimum (0 for BCE up to softplus(-20), Dice and L1).
    for name, (_, _, v20) in values.items():
        assert v20 < 1e-6, (name, v20)


def test_binarization_at_fixed_threshold_prefers_the_mask_to_any_flip(case: Case) -> None:
    # Flipping the confident prediction on a few boundary pixels must cost something.
    logits = 5.0 * (2 * case.y - 1)
    flipped = logits.clone()
    boundary = boundary_map(case.y.bool())
    flipped[boundary] = -flipped[boundary]
    loss = fn.binarization_loss(logits, case.threshold_logits, case.y, DB_STEEPNESS)
    worse = fn.binarization_loss(flipped, case.threshold_logits, case.y, DB_STEEPNESS)
    assert worse > loss + 0.01


# --------------------------------------------------------------------------------------------------------------
# 2. Minimising each term alone
# --------------------------------------------------------------------------------------------------------------


def _minimise(loss_fn, shape: torch.Size, std: float, steps: int = 300, lr: float = 0.1, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    x = (std * torch.randn(shape, generator=generator)).requires_grad_()
    optimiser = torch.optim.Adam([x], lr=lr)
    for _ in range(steps):
        optimiser.zero_grad()
        loss_fn(x).backward()
        optimiser.step()
    return x.detach()


def _agreement(pred: torch.Tensor, target: torch.Tensor, where: torch.Tensor | None = None) -> float:
    same = pred.bool() == target.bool()
    return (same[where] if where is not None else same).float().mean().item()


def test_core_loss_alone_reaches_the_core_map(case: Case) -> None:
    main = _minimise(lambda x: fn.core_loss(x, case.core), case.core.shape, std=2.0)
    assert _agreement(main > 0, case.core) >= 0.99


def test_threshold_loss_alone_reaches_the_border_map_on_the_band(case: Case) -> None:
    thresh = _minimise(lambda x: fn.threshold_loss(x, case.border, case.band), case.y.shape, std=2.0)
    on_band = case.band > 0
    close = (torch.sigmoid(thresh) - case.border).abs() < 0.05
    assert close[on_band].float().mean().item() >= 0.99


def test_boundary_loss_alone_reaches_the_mask_on_the_band(case: Case) -> None:
    logits = _minimise(lambda x: fn.boundary_loss(x, case.y, case.band), case.y.shape, std=2.0)
    assert _agreement(logits > 0, case.y, case.band > 0) >= 0.99


def test_binarization_loss_alone_reaches_the_mask_from_an_undecided_start(case: Case) -> None:
    # T fixed at the border map. Start: P = sigmoid(logits) near 1/2, i.e. within ~1/k of the threshold.
    def loss(x: torch.Tensor) -> torch.Tensor:
        return fn.binarization_loss(x, case.threshold_logits, case.y, DB_STEEPNESS)

    prob = torch.sigmoid(_minimise(loss, case.y.shape, std=0.1))
    assert _agreement(prob > 0.5, case.y) >= 0.99
    assert _agreement(prob > case.border, case.y) >= 0.99


def test_binarization_loss_alone_undoes_confident_errors(case: Case) -> None:
    """From a noisy start (logits ~ N(0, 2^2)) the term alone reaches the mask: scaled by 1/k, its gradient in P is
    B - y, which does not vanish for pixels far on the wrong side of T (a Dice on B would stall there)."""

    def binary(x: torch.Tensor) -> torch.Tensor:
        return fn.binarization_loss(x, case.threshold_logits, case.y, DB_STEEPNESS)

    alone = torch.sigmoid(_minimise(binary, case.y.shape, std=2.0))
    assert _agreement(alone > 0.5, case.y) >= 0.99
    assert _agreement(alone > case.border, case.y) >= 0.99


# --------------------------------------------------------------------------------------------------------------
# 3. The paper's edge term is not well-posed (pinned)
# --------------------------------------------------------------------------------------------------------------


def test_edge_loss_penalises_confident_correct_logits_pinned_numbers() -> None:
    # A disc of R = 25 on 128 x 128. Logits a (2y - 1), edge = Laplacian of the logits vs the border map.
    y = torch.from_numpy(_disc(128, 25).astype(np.float32))[None, None]
    _, border = adst_targets(y)
    values = [fn.edge_loss(edge_map(a * (2 * y - 1)), border).item() for a in (0.0, 1.0, 5.0, 20.0)]
    assert values[0] == pytest.approx(math.log(2), abs=1e-6)  # zero edge map: BCE(0, border) = log 2
    assert values[0] < values[1] < values[2] < values[3]
    # 0.693 / 0.720 / 0.865 at a = 0 / 5 / 20 (docs/design.md).
    assert values[2] == pytest.approx(0.719, abs=0.005) and values[3] == pytest.approx(0.863, abs=0.005)


def test_edge_loss_grows_with_confidence_and_its_minimiser_is_not_the_mask(case: Case) -> None:
    values = [fn.edge_loss(edge_map(a * (2 * case.y - 1)), case.border).item() for a in (0.0, *CONFIDENCES)]
    assert values == sorted(values) and values[-1] > values[0] + 0.5
    logits = _minimise(lambda x: fn.edge_loss(edge_map(x), case.border), case.y.shape, std=2.0)
    assert _agreement(logits > 0, case.y) < 0.9  # measured 0.56-0.64
    reached = fn.edge_loss(edge_map(logits), case.border).item()
    assert reached < values[1]  # a wrong mask beats the correct one (a = 1)


# --------------------------------------------------------------------------------------------------------------
# 4. grad_scale
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scale", [0.0, 0.25, 0.5, 1.0])
def test_grad_scale_forward_is_identity_and_gradient_is_scaled_exactly(scale: float) -> None:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 5, 4, generator=generator, dtype=torch.float64, requires_grad=True)
    out = fn.grad_scale(x, scale)
    assert torch.equal(out, x) and out.dtype == x.dtype
    assert out.requires_grad == (scale != 0.0)

    def f(t: torch.Tensor) -> torch.Tensor:  # nonlinear downstream, so the check sees a real chain rule
        return (torch.sin(t) * t).sum()

    (reference,) = torch.autograd.grad(f(x), x)
    if scale == 0.0:
        assert not out.requires_grad
        return
    (scaled,) = torch.autograd.grad(f(out), x)
    assert torch.equal(scaled, scale * reference)  # powers of two: exact
    jacobian = torch.autograd.functional.jacobian(lambda t: fn.grad_scale(t, scale), x[0, 0])
    assert torch.equal(jacobian.reshape(20, 20), scale * torch.eye(20, dtype=torch.float64))


def test_grad_scale_gradcheck() -> None:
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: torch.tanh(fn.grad_scale(t, 1.0)), (x,))
    # For scale != 1 the analytic gradient is deliberately not the numerical one (the forward is the identity):
    # gradcheck must notice, which shows the scaling is real and not a no-op.
    assert not torch.autograd.gradcheck(lambda t: fn.grad_scale(t, 0.25), (x,), raise_exception=False)


def test_grad_scale_composes_with_float32_terms() -> None:
    # The head's path: features -> grad_scale -> term; the term's gradient arrives scaled, its value unchanged.
    case = Case(MASKS["disc"])
    x = torch.randn(case.core.shape, requires_grad=True)
    (full,) = torch.autograd.grad(fn.core_loss(x, case.core), x)
    (half,) = torch.autograd.grad(fn.core_loss(fn.grad_scale(x, 0.5), case.core), x)
    assert torch.equal(half, 0.5 * full)


# --------------------------------------------------------------------------------------------------------------
# 5. band_weights (hypothesis)
# --------------------------------------------------------------------------------------------------------------


@st.composite
def masks(draw: st.DrawFn) -> np.ndarray:
    height, width = draw(st.integers(1, 40)), draw(st.integers(1, 40))
    if draw(st.booleans()):  # union of discs (lesion-like, sometimes cut by the frame)
        mask = np.zeros((height, width), bool)
        for _ in range(draw(st.integers(0, 3))):
            centre = (draw(st.floats(-5, height + 5)), draw(st.floats(-5, width + 5)))
            yy, xx = np.mgrid[:height, :width]
            mask |= (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= draw(st.floats(0.5, 15)) ** 2
        return mask
    seed = draw(st.integers(0, 2**31 - 1))  # speckle
    return np.random.default_rng(seed).random((height, width)) < draw(st.floats(0.0, 1.0))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    batch=st.lists(masks(), min_size=1, max_size=2),
    thresh_min=st.floats(0.0, 0.5),
    spread=st.floats(0.05, 0.5),
    shrink_ratio=st.floats(0.1, 0.9),
)
def test_band_weights_property(batch: list[np.ndarray], thresh_min: float, spread: float, shrink_ratio: float) -> None:
    shape = batch[0].shape
    mask = torch.from_numpy(np.stack([m for m in batch if m.shape == shape])[:, None])
    thresh_max = thresh_min + spread
    _, border = adst_targets(mask, shrink_ratio=shrink_ratio, thresh_min=thresh_min, thresh_max=thresh_max)
    band = fn.band_weights(border, thresh_min, thresh_max)
    boundary = boundary_map(mask)
    assert band.dtype == torch.float32 and band.shape == mask.shape
    assert ((band >= 0) & (band <= 1)).all()
    assert (band[boundary] == 1.0).all()  # exactly 1 on every boundary pixel ...
    assert not (band[~boundary] == 1.0).any()  # ... and only there
    at_min = border == torch.tensor(thresh_min, dtype=torch.float32)
    assert (band[at_min] == 0.0).all() and (band[~at_min] > 0).all()


def test_band_weights_accepts_float64_and_empty_masks() -> None:
    border = torch.full((1, 1, 4, 4), THRESH_MIN)
    assert torch.equal(fn.band_weights(border, THRESH_MIN, THRESH_MAX), torch.zeros_like(border))
    case = Case(MASKS["disc"])
    assert torch.equal(fn.band_weights(case.border.double(), THRESH_MIN, THRESH_MAX), case.band)


def test_mask_logits_takes_the_first_item_of_smp_tuples() -> None:
    masks, labels = torch.randn(2, 1, 4, 4), torch.randn(2, 3)
    assert fn.mask_logits(masks) is masks
    assert fn.mask_logits((masks, labels)) is masks and fn.mask_logits([masks, labels]) is masks


# --------------------------------------------------------------------------------------------------------------
# 6. C > 1: the same minimisers, one channel per target class
# --------------------------------------------------------------------------------------------------------------


def _class_index() -> torch.Tensor:
    """(1, 48, 48) class indices: a class-1 disc touched by a class-2 block (painted over it), background around."""
    index = np.zeros((SIZE, SIZE), np.int64)
    index[_disc(SIZE, 12, (16, 16))] = 1
    index[26:44, 20:44] = 2
    return torch.from_numpy(index)[None]


class ClassCase:
    """A C = 3 mask of ``mode`` with its targets: ``y`` (1, K, H, W) target classes, ``index`` (multiclass) or the
    labels (multilabel), core, border, band and T = logit(border), each (1, K, H, W)."""

    def __init__(self, mode: str):
        self.mode = mode
        if mode == "multiclass":
            self.index = _class_index()
            self.all = F.one_hot(self.index, 3).permute(0, 3, 1, 2).float()  # every class, background included
            self.y = self.all[:, 1:]
            self.core, self.border = adst_targets(self.index, mode="multiclass", classes=3)
        else:
            labels = np.stack([_disc(SIZE, 18), _disc(SIZE, 12, (14, 14)) | _disc(SIZE, 6, (34, 34)), MASKS["ring"]])
            self.y = self.all = torch.from_numpy(labels.astype(np.float32))[None]  # overlapping labels
            self.index = self.y
            self.core, self.border = adst_targets(self.y, mode="multilabel")
        self.band = fn.band_weights(self.border, THRESH_MIN, THRESH_MAX)
        self.threshold_logits = torch.logit(self.border.double()).float()

    def probability(self, logits: torch.Tensor) -> torch.Tensor:
        """P of each target class: softmax over the 3 classes (multiclass, classes 1 and 2), else the sigmoid."""
        probs = fn.class_probability(logits, self.mode)
        return probs[:, 1:] if self.mode == "multiclass" else probs


@pytest.fixture(scope="module", params=["multiclass", "multilabel"])
def class_case(request: pytest.FixtureRequest) -> ClassCase:
    return ClassCase(request.param)


def test_the_class_masks_are_what_they_claim(class_case: ClassCase) -> None:
    assert class_case.y.shape[1] == (2 if class_case.mode == "multiclass" else 3)
    for k in range(class_case.y.shape[1]):  # every target class has a core, a band and pixels far from its edges
        assert class_case.core[:, k].sum() > 0 and (class_case.core[:, k] <= class_case.y[:, k]).all()
        assert (class_case.band[:, k] > 0).sum() > 100 and (class_case.band[:, k] == 0).sum() > 100
    if class_case.mode == "multilabel":
        assert (class_case.y.sum(1) > 1).any()  # labels overlap


def test_every_term_decreases_with_confidence_for_every_class(class_case: ClassCase) -> None:
    c = class_case
    values: dict[str, list[float]] = {name: [] for name in ("core", "threshold", "binarization", "boundary")}
    for a in CONFIDENCES:
        logits = a * (2 * c.all - 1)  # ideal logits over all C channels
        values["core"].append(fn.core_loss(a * (2 * c.core - 1), c.core).item())
        threshold = (a / CONFIDENCES[-1]) * c.threshold_logits
        values["threshold"].append(fn.threshold_loss(threshold, c.border, c.band).item())
        binary = fn.binarization_loss(logits, c.threshold_logits, c.y, DB_STEEPNESS, mode=c.mode)
        values["binarization"].append(binary.item())
        values["boundary"].append(fn.boundary_loss(logits, c.index, c.band, mode=c.mode).item())
    for name, (v1, v5, v20) in values.items():
        assert v1 > v5 >= v20 - 1e-6 and 0.0 <= v20 < 1e-6, (name, values[name])


def test_terms_alone_reach_their_targets_for_every_class(class_case: ClassCase) -> None:
    c = class_case
    main = _minimise(lambda x: fn.core_loss(x, c.core), c.core.shape, std=2.0)
    assert _agreement(main > 0, c.core) >= 0.99
    thresh = _minimise(lambda x: fn.threshold_loss(x, c.border, c.band), c.border.shape, std=2.0)
    close = (torch.sigmoid(thresh) - c.border).abs() < 0.05
    assert close[c.band > 0].float().mean().item() >= 0.99
    # Binarisation (T fixed at the border map): the model's own probability of class k exceeds T_k exactly on k;
    # multiclass: the argmax is each pixel's class, background included.
    logits = _minimise(
        lambda x: fn.binarization_loss(x, c.threshold_logits, c.y, DB_STEEPNESS, mode=c.mode), c.all.shape, std=2.0
    )
    assert _agreement(c.probability(logits) > c.border, c.y) >= 0.99
    if c.mode == "multiclass":
        assert (logits.argmax(1) == c.index).float().mean().item() >= 0.99
    # Boundary: the mask on every band pixel (the class of the largest logit; each label's sign in multilabel).
    logits = _minimise(lambda x: fn.boundary_loss(x, c.index, c.band, mode=c.mode), c.all.shape, std=2.0)
    if c.mode == "multiclass":
        on_band = c.band.amax(1) > 0
        assert (logits.argmax(1) == c.index)[on_band].float().mean().item() >= 0.99
    else:
        assert _agreement(logits > 0, c.y, c.band > 0) >= 0.99
