"""The one training engine: its step and epoch, the batch sources of train.py and the study, the curves of a run,
and a study run and a train.py run of the same settings computing the same thing."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import segmentation_models_pytorch as smp
import torch
from conftest import tiny_unet, write_lesion_folder
from torch import nn

import adst_examples.studylib as study
from adst_examples import train
from adst_examples.data import LesionSplit, SyntheticLesionDataset, cache
from adst_examples.training.batches import EpochSampler, cached_train_batches, epoch_order
from adst_examples.training.distributed import place_model
from adst_examples.training.engine import Batch, Optimisation, steps_per_epoch, train_epoch, train_step
from adst_examples.training.plots import curves_figure
from adst_plugin import DEFAULT_PRESET, PRESETS, ADSTLoss, wrap_with_adst
from adst_plugin.presets import LOSS_WEIGHTS


class _Recording(nn.Module):
    """A mask loss that records the dtype and autocast state it ran in."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[torch.dtype, bool]] = []

    def forward(self, logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        self.seen.append((logits.dtype, torch.is_autocast_enabled("cpu")))
        return nn.functional.binary_cross_entropy_with_logits(logits, mask)


def _batch(n: int = 2, size: int = 32) -> Batch:
    g = torch.Generator().manual_seed(0)
    masks = torch.zeros(n, 1, size, size)
    masks[:, :, 8:20, 10:24] = 1
    return Batch(torch.rand(n, 3, size, size, generator=g), masks)


def test_the_step_runs_the_forward_under_autocast_and_the_loss_outside_it_in_float32() -> None:
    torch.manual_seed(0)
    model, loss = tiny_unet(), _Recording()
    opt = Optimisation.build(model, lr=1e-3, total_steps=4, device=torch.device("cpu"), amp_dtype=torch.bfloat16)
    before = [p.detach().clone() for p in model.parameters()]
    value, logits = train_step(model, loss, opt, _batch())
    assert loss.seen == [(torch.float32, False)] and logits.dtype == torch.float32
    assert not value.requires_grad and not logits.requires_grad
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert opt.scheduler.last_epoch == 1  # the LR schedule advances per step
    assert not opt.scaler.is_enabled()  # a GradScaler for fp16 only


def test_an_epoch_averages_every_logged_term_over_its_steps() -> None:
    torch.manual_seed(0)
    model = wrap_with_adst(tiny_unet())
    criterion = ADSTLoss(model)
    opt = Optimisation.build(model, lr=1e-2, total_steps=2, device=torch.device("cpu"))
    logged, outputs = [], []
    criterion.register_forward_hook(lambda module, args, out: logged.append(dict(module.last_terms)))
    model.register_forward_hook(lambda module, args, out: outputs.append(out.detach()))
    batches = [_batch(), _batch(), _batch()]
    row = train_epoch(model, criterion, opt, batches, steps=2, device=torch.device("cpu"), aux_scale=0.5)
    assert opt.scheduler.last_epoch == 2 and criterion.aux_scale == 0.5  # at most `steps` of the 3 batches
    assert len(logged) == 2 and logged[0]["total"] != logged[1]["total"]  # two different steps
    assert set(row) == {f"train_{k}" for k in logged[0]} | {"train_dice", "train_s"}
    for name in logged[0]:
        assert row[f"train_{name}"] == pytest.approx(float(sum(step[name] for step in logged)) / 2), name
    # Hard Dice per image at logit >= 0 (empty/empty counts 1), averaged over the images, then the steps.
    truth = batches[0].masks.bool()
    dice = []
    for logits in outputs:
        pred = logits >= 0
        inter, sizes = (pred & truth).sum((1, 2, 3)), pred.sum((1, 2, 3)) + truth.sum((1, 2, 3))
        dice.append(torch.where(sizes > 0, 2 * inter / sizes.clamp_min(1), 1.0).mean())
    assert row["train_dice"] == pytest.approx(float(sum(dice)) / 2)
    with pytest.raises(FloatingPointError, match="not finite"):
        bad = Batch(torch.full((2, 3, 32, 32), math.nan), _batch().masks)
        train_epoch(model, criterion, opt, [bad], steps=1, device=torch.device("cpu"))


def test_steps_per_epoch_drops_the_last_partial_batch() -> None:
    assert steps_per_epoch(11, 4) == 2 and steps_per_epoch(3, 8) == 1 and steps_per_epoch(40, 4, max_steps=3) == 3


def test_train_py_and_the_study_draw_the_same_batches_in_the_same_order() -> None:
    split = LesionSplit(SyntheticLesionDataset(n=10, img_size=32), range(10))
    sampler = EpochSampler(len(split), seed=3)
    sampler.set_epoch(2)
    assert list(sampler) == epoch_order(10, 3, 2).tolist() != epoch_order(10, 3, 1).tolist()
    images = torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1).expand(10, 1, 32, 32).contiguous()
    split_idx = {"train": torch.arange(10), "val": torch.arange(0), "test": torch.arange(0)}
    masks = torch.zeros(10, 1, 32, 32, dtype=torch.bool)
    data = cache.CachedData("x", images, masks, [str(i) for i in range(10)], [None] * 10, split_idx)
    batches = list(cached_train_batches(data, seed=3, epoch=2, batch_size=4, steps=2))
    order = [round(255 * float(x[0, 0, 0])) for b in batches for x in b.images]
    assert order == list(sampler)[:8]


def test_curves_show_the_terms_the_default_preset_trains() -> None:
    torch.manual_seed(0)
    model = wrap_with_adst(tiny_unet())
    criterion = ADSTLoss(model)
    opt = Optimisation.build(model, lr=1e-3, total_steps=2, device=torch.device("cpu"))
    history = []
    for epoch in (1, 2):
        row = train_epoch(model, criterion, opt, [_batch()], steps=1, device=torch.device("cpu"))
        history.append({"epoch": epoch, **row, "val_loss": 0.5, "val_dice": 0.1, "val_iou": 0.05})
    drawn = {line.get_label() for line in curves_figure(history).axes[0].get_lines()}
    config = PRESETS[DEFAULT_PRESET]
    active = {"train_" + config.term_names()[w] for w in LOSS_WEIGHTS if getattr(config, w) > 0}
    assert active <= drawn and {"train_total", "val_loss"} <= drawn
    assert len(active) > 1  # the preset trains auxiliary terms, and each has its own curve
    assert not {"train_dice", "train_s"} & drawn


@pytest.mark.filterwarnings("ignore:folder dataset.*skipping 1 bad:UserWarning")
def test_a_bad_folder_gets_the_same_error_from_train_py_and_the_study(tmp_path: Path) -> None:
    images, masks = write_lesion_folder(tmp_path / "d", n=6)
    (masks / "case2.png").unlink()  # an image without its mask
    with pytest.raises(train.UsageError) as from_train:
        train.main(
            ["--dataset", "folder", "--images", str(images), "--masks", str(masks), "--out", str(tmp_path / "r")]
        )
    with pytest.raises(study.UsageError) as from_study:
        study.main(["--folder", "mine", str(images), str(masks), "--datasets", "mine", "--out", str(tmp_path / "s"),
                    "--cache-dir", str(tmp_path / "c")])  # fmt: skip
    for message in (str(from_train.value), str(from_study.value)):
        assert "case2.png" in message and message.endswith("Fix the files or pass --skip-bad to skip them.")
        assert "skip_bad" not in message
    assert str(from_study.value).startswith("--folder mine: ") and str(from_train.value) in str(from_study.value)
    with pytest.raises(study.UsageError, match="does not exist"):
        study.main(["--folder", "mine", str(tmp_path / "nope"), str(masks), "--datasets", "mine",
                    "--cache-dir", str(tmp_path / "c"), "--out", str(tmp_path / "s")])  # fmt: skip
    with pytest.raises(study.UsageError, match="already taken"):
        study.main(["--folder", "busi", str(images), str(masks), "--datasets", "busi"])
    with pytest.raises(study.UsageError, match=r"unknown dataset 'cvc'.*--folder"):
        study.main(["--datasets", "cvc", "--cache-dir", str(tmp_path / "c"), "--out", str(tmp_path / "s")])
    # With --skip-bad the study caches the good pairs.
    study.main(["--folder", "mine", str(images), str(masks), "--datasets", "mine", "--skip-bad", "--prepare-cache",
                "--img-size", "32", "--cache-dir", str(tmp_path / "c"), "--no-progress"])  # fmt: skip
    assert cache.load_cache(tmp_path / "c" / "mine-32.npz").names == [f"case{i}" for i in (0, 1, 3, 4, 5)]


TINY = ["--encoder", "resnet18", "--img-size", "32", "--batch-size", "4", "--epochs", "2", "--no-progress"]


@pytest.mark.slow
def test_a_study_run_and_a_train_py_run_of_the_same_settings_compute_the_same(tmp_path: Path) -> None:
    """The same images, batches, initialisation, loss, schedule and evaluation: the same numbers. (Augmentation is
    off: the two draw the same pipeline's random numbers in different places, DataLoader workers and the device.)"""
    images, masks = write_lesion_folder(tmp_path / "data", n=14)
    trained = train.main(["--dataset", "folder", "--images", str(images), "--masks", str(masks), "--workers", "0",
                          "--seed", "0", "--out", str(tmp_path / "train"), "--no-augment", *TINY])  # fmt: skip
    report = study.main(["--folder", "tiny", str(images), str(masks), "--datasets", "tiny", "--arms", "adst",
                         "--seed-list", "0", "--out", str(tmp_path / "study"), "--cache-dir", str(tmp_path / "cache"),
                         "--no-augment", *TINY])  # fmt: skip
    run = json.loads((tmp_path / "study" / "runs" / "tiny" / "adst" / "seed0" / "result.json").read_text())
    log = json.loads((tmp_path / "train" / "log.json").read_text())
    assert len(log) == len(run["history"]) == 2
    for ours, theirs in zip(log, run["history"], strict=True):
        for key in ("train_total", "train_mask", "train_dice", "val_dice", "val_iou"):
            assert ours[key] == pytest.approx(theirs[key], rel=1e-6, abs=1e-7), key
    for split in ("val", "test"):
        for metric in ("dice", "iou", "hd95", "boundary_iou"):
            assert trained[split][metric]["mean"] == pytest.approx(run[split][metric], rel=1e-6, abs=1e-7)
    # The study on the folder end to end: its report names the dataset and pairs the arm with the baseline.
    arms = report["datasets"]["tiny"]["arms"]
    assert arms["baseline"]["n_runs"] == arms["adst"]["n_runs"] == 1 and arms["adst"]["paired_val"]["dice"]["n"] == 1


def test_channels_last_trains_the_same_step_and_its_export_reloads_contiguous(tmp_path: Path) -> None:
    """``--channels-last`` changes the weights' layout, not the computation: one step of each layout gives the
    same loss and gradients (float rounding aside), and the saved export is an ordinary contiguous smp model."""
    torch.manual_seed(0)
    base = wrap_with_adst(tiny_unet())
    cpu = torch.device("cpu")
    nchw = place_model(copy.deepcopy(base), cpu)
    nhwc = place_model(copy.deepcopy(base), cpu, channels_last=True)
    weights = [m.weight for m in nhwc.modules() if isinstance(m, nn.Conv2d)]
    assert all(w.is_contiguous(memory_format=torch.channels_last) for w in weights)
    assert any(not w.is_contiguous() for w in weights)  # the 3x3 kernels really are NHWC
    batch = _batch()
    losses = []
    for model in (nchw, nhwc):
        opt = Optimisation.build(model, lr=1e-3, total_steps=2, device=cpu)
        losses.append(train_step(model, ADSTLoss(model), opt, batch)[0])
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    # Gradients, not the stepped weights: Adam's first step is lr * sign(grad), which rounding flips near 0.
    grads = {name: p.grad for name, p in nhwc.named_parameters()}
    assert {n for n, g in grads.items() if g is None} == {n for n, p in nchw.named_parameters() if p.grad is None}
    scale = max(p.grad.abs().max().item() for p in nchw.parameters() if p.grad is not None)
    for name, p in nchw.named_parameters():
        if p.grad is not None:  # a gradient that cancels to ~1e-7 differs in its rounding: atol on the largest one
            torch.testing.assert_close(grads[name], p.grad, rtol=1e-3, atol=1e-5 * scale, msg=name)

    nhwc.export().save_pretrained(str(tmp_path / "exported"))
    reloaded = smp.from_pretrained(str(tmp_path / "exported")).eval()
    assert all(p.is_contiguous() for p in reloaded.parameters())
    with torch.no_grad():
        torch.testing.assert_close(reloaded(batch.images), nchw.export()(batch.images), rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_train_py_and_the_study_place_the_model_as_channels_last_asks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The flag reaches the model in both; the study records it per run and does not pin it in its folder."""
    import adst_examples.studylib.run as study_run
    from adst_examples.training import parts

    seen: list[bool] = []

    def recording(model: nn.Module, device: torch.device, *, channels_last: bool = False) -> nn.Module:
        seen.append(channels_last)
        return place_model(model, device, channels_last=channels_last)

    monkeypatch.setattr(parts, "place_model", recording)
    monkeypatch.setattr(study_run, "place_model", recording)
    images, masks = write_lesion_folder(tmp_path / "data", n=14)
    folder = ["--dataset", "folder", "--images", str(images), "--masks", str(masks), "--workers", "0"]
    train.main([*folder, "--out", str(tmp_path / "train"), "--channels-last", *TINY[:-3], "--epochs", "1",
                "--max-steps", "1"])  # fmt: skip
    assert seen == [True]
    config = json.loads((tmp_path / "train" / "config.json").read_text())
    assert config["args"]["channels_last"] is True

    argv = ["--folder", "tiny", str(images), str(masks), "--datasets", "tiny", "--arms", "adst", "--out",
            str(tmp_path / "study"), "--cache-dir", str(tmp_path / "cache"), "--max-steps", "1", *TINY]  # fmt: skip
    study.main([*argv, "--seeds", "1"])
    study.main([*argv, "--seeds", "2", "--channels-last"])  # the same folder resumes with the flag
    runs = tmp_path / "study" / "runs" / "tiny"
    recorded = {
        (arm, seed): json.loads((runs / arm / f"seed{seed}" / "result.json").read_text())["channels_last"]
        for arm in ("baseline", "adst")
        for seed in (0, 1)
    }
    assert recorded == {("baseline", 0): False, ("adst", 0): False, ("baseline", 1): True, ("adst", 1): True}
    assert seen[1:] == [False, False, True, True]
