"""train_overhead.py: each timed function runs what its name says, and the report reads the medians right."""

from __future__ import annotations

import pytest
import torch

from adst_examples.benchmarks import train_overhead
from adst_plugin import ADSTModel

ARGV = ["--encoder", "resnet18", "--size", "32", "--batch", "2", "--steps", "1", "--warmup", "0"]


@pytest.fixture
def recorded(monkeypatch: pytest.MonkeyPatch) -> dict[str, list]:
    """Replaces the clock by fixed medians and records what each timed function did when it ran once."""
    seen: dict[str, list] = {"steps": [], "aux_terms": [], "parts": {}}
    train_step, aux_terms = train_overhead.train_step, train_overhead.aux_terms

    def recording_step(model, criterion, opt, batch):
        out = train_step(model, criterion, opt, batch)
        head_grads = [p.grad is not None for p in model.head.parameters()] if isinstance(model, ADSTModel) else []
        seen["steps"].append((model, criterion.model, set(criterion.last_terms), head_grads))
        return out

    def recording_terms(config, *args, **kwargs):
        seen["aux_terms"].append(config)
        return aux_terms(config, *args, **kwargs)

    def fixed_medians(fns, steps, warmup):
        for name, fn in fns.items():
            adst = next((m for m, *_ in seen["steps"] if isinstance(m, ADSTModel)), None)
            before = None if adst is None else [p.grad.clone() for p in adst.head.parameters()]
            seen["parts"][name] = (fn(), before, adst)
        medians = {"plain": 0.2, "adst": 0.3, "also": 0.35, "head": 0.05, "targets": 0.01, "terms": 0.02,
                   "plain_nhwc": 0.16, "adst_nhwc": 0.25}  # fmt: skip
        return {name: medians[name] for name in fns}

    monkeypatch.setattr(train_overhead, "train_step", recording_step)
    monkeypatch.setattr(train_overhead, "aux_terms", recording_terms)
    monkeypatch.setattr(train_overhead, "interleaved_medians", fixed_medians)
    return seen


@pytest.mark.slow  # builds three resnet18 Unets and runs one step of each
def test_the_adst_step_trains_head_and_terms_and_the_plain_step_neither(recorded, capsys):
    (row,) = train_overhead.main([*ARGV, "--breakdown"])
    (plain, plain_loss_model, plain_terms, _), (adst, adst_loss_model, adst_terms, head_grads) = recorded["steps"]
    assert not isinstance(plain, ADSTModel) and plain_loss_model is None and plain_terms == {"mask", "total"}
    assert adst_loss_model is adst and {"mask", "total"} < adst_terms and all(head_grads)
    # The parts alone: the head part backpropagates into the head, the targets part builds the batch's targets,
    # the terms part computes the terms of the ADST model's config.
    _, before, _ = recorded["parts"]["head"]
    after = [p.grad for p in adst.head.parameters()]
    assert all(not torch.equal(a, b) for a, b in zip(after, before, strict=True))
    core, border = recorded["parts"]["targets"][0]
    assert core.shape == border.shape == (2, 1, 32, 32) and core.sum() > 0
    assert recorded["aux_terms"] == [adst.config]
    # The report, from the fixed medians: 1.5x, and each part's share of the 0.1 s the ADST step adds.
    assert row["ratio"] == pytest.approx(1.5) and row["parts"] == {"head": 0.05, "targets": 0.01, "terms": 0.02}
    out = capsys.readouterr().out
    assert "| 0.200 | 0.300 | 1.50x |" in out
    assert "| head | 0.050 | 50% |" in out and "| targets | 0.010 | 10% |" in out and "| terms | 0.020 | 20% |" in out


@pytest.mark.slow  # builds three resnet18 Unets and runs one step of each
def test_a_second_main_target_is_timed_in_the_same_loop(recorded, capsys):
    (row,) = train_overhead.main([*ARGV, "--main-target", "sdf", "--also-main-target", "core"])
    heads = [m.config.main_target for m, *_ in recorded["steps"] if isinstance(m, ADSTModel)]
    assert heads == ["sdf", "core"]  # the second ADST step is the other target's, in the same loop
    assert row["also_s"] == 0.35 and row["parts"] == {}
    out = capsys.readouterr().out
    assert "main_target sdf" in out and "main_target core in the same loop: 0.350 s/step, 1.75x the plain" in out


@pytest.mark.slow  # builds three resnet18 Unets and runs one step of each
def test_a_cheaper_head_is_timed_in_the_same_loop(recorded, capsys):
    (row,) = train_overhead.main([*ARGV, "--also-head-stride", "4"])
    strides = [m.config.head_stride for m, *_ in recorded["steps"] if isinstance(m, ADSTModel)]
    assert strides == [2, 4]  # the default's head, then the cheaper one
    assert row["also_s"] == 0.35
    assert "head_stride 4 in the same loop: 0.350 s/step, 1.75x the plain" in capsys.readouterr().out


def _nhwc(model: torch.nn.Module) -> bool:
    return all(m.weight.is_contiguous(memory_format=torch.channels_last)
               for m in model.modules() if isinstance(m, torch.nn.Conv2d))  # fmt: skip


@pytest.mark.slow  # builds four resnet18 Unets and runs one step of each
def test_the_channels_last_steps_are_timed_in_the_same_loop(recorded, capsys):
    (row,) = train_overhead.main([*ARGV, "--also-channels-last"])
    layouts = [(isinstance(m, ADSTModel), _nhwc(m)) for m, *_ in recorded["steps"]]
    assert layouts == [(False, False), (True, False), (False, True), (True, True)]
    assert row["nhwc_s"] == {"plain": 0.16, "adst": 0.25}
    out = capsys.readouterr().out
    assert "plain 0.160 s/step (1.25x faster), ADST 0.250 s/step (1.20x faster); ADST/plain 1.56x" in out
