"""Mask validation in the training step: one value check per step, and no device -> host read after the first
batch of a shape (checked structurally on the CPU, and with CUDA's sync debug mode where a GPU is present)."""

import copy

import numpy as np
import pytest
import torch
from conftest import tiny_unet
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

from adst_plugin import ADSTLoss, _step_checks, wrap_with_adst
from adst_plugin._checks import check_mask
from adst_plugin._step_checks import StepMaskCheck
from adst_plugin.targets import adst_targets

#: aten ops that read a tensor's values back to the host (each a sync on CUDA).
HOST_READS = {"_local_scalar_dense", "nonzero", "masked_select", "_unique2", "unique_dim", "unique_consecutive"}


class HostReads(TorchDispatchMode):
    """Records the aten ops that read values back to the host, except while ``paused``."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []
        self.paused = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        is_bool_index = name == "index" and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] or [])
        )
        if not self.paused and (name in HOST_READS or is_bool_index):
            self.ops.append(name)
        return func(*args, **(kwargs or {}))


@pytest.fixture
def cpu_as_device(monkeypatch):
    """Treat CPU masks as CUDA ones: their value checks are deferred (read later, not at once)."""
    monkeypatch.setattr(_step_checks, "DEFERRED_DEVICES", ("cpu",))


def batch(seed: int, b: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.zeros(b, 1, 32, 32)
    y[:, :, 4 + seed % 5 : 20, 6:24] = 1
    return torch.rand(b, 3, 32, 32, generator=g), y


def test_after_the_first_batch_of_a_shape_a_training_step_reads_nothing_back(cpu_as_device, monkeypatch):
    torch.manual_seed(0)
    model = wrap_with_adst(tiny_unet())
    criterion = ADSTLoss(model)
    recorder = HostReads()
    holds = _step_checks._Verdict.holds

    def paused_holds(self):  # the verdict is read from pinned host memory once its copy arrived: no sync
        recorder.paused = True
        try:
            return holds(self)
        finally:
            recorder.paused = False

    monkeypatch.setattr(_step_checks._Verdict, "holds", paused_holds)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    reads = []
    for step in range(4):
        x, y = batch(step)
        targets = adst_targets(y)  # as ADSTTargetCollate builds them in the workers
        recorder.ops = []
        with recorder:
            optimizer.zero_grad(set_to_none=True)
            criterion(model(x), y, targets=targets).backward()
            optimizer.step()
        reads.append(recorder.ops)
    assert reads[0] == ["_local_scalar_dense"]  # the first batch of the shape: checked at once, one read
    assert reads[1:] == [[], [], []]


def test_a_loss_without_a_model_defers_in_training_steps_too(cpu_as_device):
    # The baseline (ADSTLoss() on a plain model) must not sync where the ADST arm does not.
    torch.manual_seed(0)
    plain, criterion = tiny_unet(), ADSTLoss()
    reads = []
    for step in range(3):
        x, y = batch(step)
        with HostReads() as recorder:
            criterion(plain(x), y).backward()
        reads.append(len(recorder.ops))
    with torch.no_grad(), HostReads() as recorder:
        criterion(plain(x), y)  # validation: every verdict read, and this mask checked at once
    assert reads[0] == 1 and reads[1] == 0 and recorder.ops


def test_cpu_masks_are_checked_once_per_step_with_one_read():
    torch.manual_seed(0)
    model = wrap_with_adst(tiny_unet())
    criterion = ADSTLoss(model)
    x, y = batch(0)
    targets = adst_targets(y)
    for encoding in (y, y.bool(), (y * 255).to(torch.uint8), y.long()):
        with HostReads() as recorder:
            criterion(model(x), encoding, targets=targets).backward()
        assert len(recorder.ops) == (0 if encoding.dtype == torch.bool else 1), encoding.dtype


def test_a_bad_mask_after_the_first_is_reported_at_a_later_call(cpu_as_device):
    torch.manual_seed(0)
    model = wrap_with_adst(tiny_unet())
    criterion = ADSTLoss(model)
    x, y = batch(0)
    criterion(model(x), y).backward()  # call 1: checked at once
    criterion(model(x), y * 0.5).backward()  # call 2: deferred, not raised here
    with pytest.raises(ValueError, match=r"masks of call 2 .*reported 1 call\(s\) later"):
        criterion(model(x), y)
    criterion(model(x), y).backward()  # reported once, then training goes on
    criterion(model(x), y * 0.5).backward()
    model.eval()
    with pytest.raises(ValueError, match="masks of call 5"), torch.no_grad():
        criterion(model(x), y)  # an eval-mode (validation) call waits for every verdict


def test_a_bad_first_batch_is_reported_at_once_with_its_values(cpu_as_device):
    criterion = ADSTLoss(wrap_with_adst(tiny_unet()))
    with pytest.raises(ValueError, match=r"values such as \[0\.5\]"):
        criterion(torch.zeros(2, 1, 32, 32), batch(0)[1] * 0.5)


def test_copies_of_the_loss_start_afresh(cpu_as_device):
    check = StepMaskCheck("here")
    y = batch(0)[1]
    check(check_mask, y, "here")
    check(check_mask, y * 2, "here")  # a pending bad verdict
    twin = copy.deepcopy(check)
    twin.raise_failed(wait=True)  # nothing pending in the copy
    with pytest.raises(ValueError, match="call 2"):
        check.raise_failed(wait=True)


ENCODINGS = ["float", "bool", "uint8", "long", "float-half", "uint8-mixed", "nan", "negative"]


def _encode(m: np.ndarray, encoding: str) -> torch.Tensor:
    t = torch.from_numpy(m)[:, None]
    return {
        "float": lambda: t.float(),
        "bool": lambda: t.bool(),
        "uint8": lambda: t.to(torch.uint8) * 255,
        "long": lambda: t.long(),
        "float-half": lambda: t.float() * 0.5,
        "uint8-mixed": lambda: t.to(torch.uint8) * 255 + (t == 0).to(torch.uint8),
        "nan": lambda: t.float().masked_fill(t == 0, float("nan")),
        "negative": lambda: -t.long(),
    }[encoding]()


def _reference(mask: torch.Tensor) -> torch.Tensor | None:
    try:
        return check_mask(mask, "reference")
    except ValueError:
        return None


@settings(max_examples=60, deadline=None)
@given(
    calls=st.lists(
        st.tuples(st.integers(0, 2**16), st.sampled_from(ENCODINGS), st.sampled_from([(2, 8, 8), (1, 6, 10)])),
        min_size=1,
        max_size=10,
    )
)
def test_every_bad_mask_is_reported_and_every_good_one_converted(calls):
    """Random masks in random orders against a model of the check: a bad mask raises at its own call (the first of
    its shape) or at a later call (naming it), and a final wait reports the rest; no bad mask goes unreported. A
    call that reports an earlier mask raises before its own mask is used, so it trains nothing."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_step_checks, "DEFERRED_DEVICES", ("cpu",))
        check = StepMaskCheck("here")
        pending, seen = [], set()
        for call, (seed, encoding, shape) in enumerate(calls, start=1):
            rng = np.random.default_rng(seed)
            mask = _encode((rng.random(shape) < rng.random()).astype(np.uint8), encoding)
            expected = _reference(mask)
            key = (tuple(mask.shape), mask.dtype)
            if pending:
                want = pending.pop(0)  # an earlier deferred mask is reported first
            elif key not in seen:  # checked at once; the shape counts as seen once a mask of it passed
                want = call if expected is None else None
                if expected is not None:
                    seen.add(key)
            else:
                want = None
                if expected is None:
                    pending.append(call)
            try:
                result = check(check_mask, mask, "here")
            except ValueError as error:
                assert _reported_call(str(error), call) == want
                continue
            assert want is None
            if expected is not None:
                assert torch.equal(result, expected)
        drained = []
        while True:
            try:
                check.raise_failed(wait=True)
                break
            except ValueError as error:
                drained.append(_reported_call(str(error), -1))
        assert drained == pending


def _reported_call(message: str, call: int) -> int:
    if "masks of call" in message:
        return int(message.split("masks of call ")[1].split()[0])
    return call  # checked at once: this call


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_training_step_has_no_host_sync():
    torch.manual_seed(0)
    device = torch.device("cuda")
    model = wrap_with_adst(tiny_unet()).to(device)
    criterion = ADSTLoss(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    steps = []
    for seed in range(4):  # inputs and targets arrive on the device as a DataLoader with pin_memory sends them
        x, y = batch(seed)
        steps.append((x.to(device), y.to(device), tuple(t.to(device) for t in adst_targets(y))))
    x, y, targets = steps[0]
    criterion(model(x), y, targets=targets).backward()  # first batch of the shape: checked at once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for x, y, targets in steps[1:]:
            optimizer.zero_grad(set_to_none=True)
            criterion(model(x), y, targets=targets).backward()
            optimizer.step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    criterion.eval()
    model.eval()
    with torch.no_grad():
        criterion(model(x), y)  # validation reads the pending verdicts: all held
