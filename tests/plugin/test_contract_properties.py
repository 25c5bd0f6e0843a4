"""Random call orders against the contract ("one training forward, then its loss"), on a tiny smp Unet at 32x32.

Any sequence of forward (with or without grad) / loss (on any earlier output, sliced, copied, cast or detached;
random masks in valid and invalid encodings) / train() / eval() / export() / forward_adst() calls either works or
raises the error a model of the contract predicts. A loss that works pairs its logits with their own forward's
maps (checked against the maps recorded at that forward), and the wrapper keeps no map but the last training
forward's, and no captured features.
"""

import warnings
import weakref
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
from conftest import tiny_unet
from hypothesis import HealthCheck, assume, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from adst_plugin import ADSTLoss, UnclaimedHeadOutputWarning, functional, wrap_with_adst
from adst_plugin.hooks import Capture
from adst_plugin.targets import adst_targets

TRANSFORMS = {
    "as is": lambda t: t,
    "slice": lambda t: t[:, :1],
    "contiguous": lambda t: t.contiguous(memory_format=torch.channels_last),
    "cast": lambda t: t.double(),
    "clone": lambda t: t.clone(),
    "detach": lambda t: t.detach(),
}
PAIRED = {"as is", "slice", "contiguous", "cast", "clone"}  # computed from the output: they keep the pair
ENCODINGS = {
    "float": lambda m: m.float(),
    "bool": lambda m: m.bool(),
    "uint8": lambda m: m.to(torch.uint8) * 255,
    "halves": lambda m: m.float() * 0.5 + 0.25,
    "nan": lambda m: m.float().masked_fill(m == 0, float("nan")),
}
VALID = {"float", "bool", "uint8"}


@dataclass
class Forward:
    output: torch.Tensor
    maps: list[torch.Tensor] | None = None  # detached copies of the head's maps, if this forward kept them
    refs: list[weakref.ref] = field(default_factory=list)  # the maps themselves


def random_mask(seed: int) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    m = np.zeros((1, 1, 32, 32), dtype=np.uint8)
    for b in range(1):
        for _ in range(rng.integers(0, 3)):
            y, x = rng.integers(0, 28, size=2)
            h, w = rng.integers(2, 14, size=2)
            m[b, 0, y : y + h, x : x + w] = 1
    return torch.from_numpy(m)


class Contract(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.threads = torch.get_num_threads()
        torch.set_num_threads(1)  # small tensors: one thread is several times faster on a busy machine
        torch.manual_seed(0)
        self.model = wrap_with_adst(tiny_unet())
        self.criterion = ADSTLoss(self.model)
        self.forwards: list[Forward] = []
        self.pending: Forward | None = None
        self.seed = 0

    @rule(grad=st.booleans())
    def forward(self, grad):
        self.seed += 1
        x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(self.seed))
        keeps = self.model.training and grad
        with warnings.catch_warnings(record=True) as record, torch.set_grad_enabled(grad):
            warnings.simplefilter("always")
            out = self.model(x)
        warned = [w for w in record if issubclass(w.category, UnclaimedHeadOutputWarning)]
        assert len(warned) == int(keeps and self.pending is not None)
        forward = Forward(out)
        if keeps:
            maps = self.model._pending
            forward.maps = [m.detach().clone() for m in maps]
            forward.refs = [weakref.ref(m) for m in maps]
            self.pending = forward
        self.forwards = [*self.forwards[-3:], forward]

    @rule(
        back=st.integers(0, 3),
        transform=st.sampled_from(sorted(TRANSFORMS)),
        encoding=st.sampled_from(sorted(ENCODINGS)),
        mask_seed=st.integers(0, 2**16),
    )
    def loss(self, back, transform, encoding, mask_seed):
        assume(self.forwards)
        forward = self.forwards[-1 - back % len(self.forwards)]
        mask = random_mask(mask_seed)
        y = ENCODINGS[encoding](mask)
        training, pending = self.model.training, self.pending
        if training and pending is not None and (forward is not pending or transform not in PAIRED):
            expected = (ValueError, "last training forward")
        elif encoding not in VALID:
            expected = (ValueError, "binary mask|NaN")
        elif training and pending is None:
            expected = (RuntimeError, "ran no training forward")
        else:
            expected = None
        if training:
            self.pending = None  # handed over (and checked) first, whatever happens next
        if expected is not None:
            with pytest.raises(expected[0], match=expected[1]):
                self.criterion(TRANSFORMS[transform](forward.output), y)
            return
        total = self.criterion(TRANSFORMS[transform](forward.output), y)
        assert torch.isfinite(total)
        if training:  # paired with this forward's maps, not another's
            c = self.criterion.config
            _, border = adst_targets(mask)
            sdf = functional.signed_distance(border, mask, c.thresh_min, c.thresh_max)
            assert torch.allclose(self.criterion.last_terms["main"], functional.sdf_loss(forward.maps[0], sdf))
            total.backward()
            self.model.zero_grad(set_to_none=True)
        else:
            assert set(self.criterion.last_terms) == {"mask", "total"}

    @rule(train=st.booleans())
    def set_mode(self, train):
        self.model.train(train)
        self.pending = None

    @rule()
    def export(self):
        plain = self.model.export()
        assert not any(isinstance(h, Capture) for m in plain.modules() for h in m._forward_hooks.values())

    @rule()
    def forward_adst(self):
        x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(self.seed))
        assert self.model.forward_adst(x).maps.main.shape == (1, 1, 32, 32)

    def teardown(self):
        torch.set_num_threads(self.threads)

    @invariant()
    def keeps_only_the_pending_forward(self):
        model = self.model
        assert model._tap.capture.output is None
        if self.pending is None:
            assert model._pending is None and model._pending_output is None
        else:
            assert all(a is r() for a, r in zip(model._pending, self.pending.refs, strict=True))
        for forward in self.forwards:
            if forward is not self.pending:
                assert all(r() is None for r in forward.refs)


Contract.TestCase.settings = settings(
    max_examples=30, stateful_step_count=10, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
test_contract_call_orders = Contract.TestCase
