"""End-to-end tests of examples/train.py and examples/compare.py on tiny synthetic data (CPU)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import ablations
import compare
import lesion_metrics as lm
import numpy as np
import pytest
import segmentation_models_pytorch as smp
import torch
import train
from conftest import EXAMPLES_DIR as EXAMPLES
from conftest import ROOT, SHARED_DATA

BUSI = SHARED_DATA / "Dataset_BUSI_with_GT"
# 16 images → 11 train (2 steps of 4) / 2 val / 3 test: an odd test split, so DDP pads it.
TINY = [
    "--encoder", "resnet18", "--img-size", "64", "--limit", "16", "--batch-size", "4", "--workers", "0",
    "--no-progress", "--epochs", "1",
]  # fmt: skip
RUN_FILES = (
    "metrics.json", "log.csv", "log.json", "curves.png", "overlays.png", "split.json", "config.json", "best.pt",
    "last.pt", "exported/config.json", "exported/model.safetensors", "exported/README.md",
)  # fmt: skip


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


def _read(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def _state(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


@pytest.mark.slow
@pytest.mark.parametrize("adst", [False, True], ids=["baseline", "adst"])
def test_tiny_run_writes_every_output(tmp_path: Path, adst: bool) -> None:
    out = tmp_path / "run"
    result = train.main([*TINY, "--out", str(out), *([] if adst else ["--no-adst"])])

    missing = [name for name in RUN_FILES if not (out / name).is_file()]
    assert not missing, f"missing outputs: {missing}"
    metrics = _read(out / "metrics.json")
    assert metrics["variant"] == ("adst" if adst else "baseline")
    assert metrics["test"] == result["test"]
    split = _read(out / "split.json")
    assert metrics["per_image"]["name"] == split["test"]
    for m in lm.METRIC_NAMES:
        assert math.isfinite(metrics["test"][m]["mean"]) and metrics["test"][m]["n"] == len(split["test"])
        assert len(metrics["per_image"][m]) == len(split["test"])
        assert all(math.isfinite(v) for v in metrics["per_image"][m])
    log = _read(out / "log.json")
    assert [row["epoch"] for row in log] == [1]
    aux_terms = {"train_main", "train_edge", "train_fused"}
    assert aux_terms <= set(log[0]) if adst else not aux_terms & set(log[0])
    assert (out / "log.csv").read_text().splitlines()[0].startswith("epoch,")
    assert _read(out / "config.json")["args"]["no_adst"] is (not adst)

    # The exported folder reloads as the plain smp model: same class, same parameters, no head.
    reloaded = smp.from_pretrained(str(out / "exported"))
    plain = smp.create_model("unet", "resnet18", encoder_weights=None, in_channels=1, classes=1)
    assert type(reloaded) is type(plain)
    assert reloaded.state_dict().keys() == plain.state_dict().keys()
    assert sum(p.numel() for p in reloaded.parameters()) == sum(p.numel() for p in plain.parameters())
    assert metrics["params"]["exported"] == sum(p.numel() for p in plain.parameters())
    assert (metrics["params"]["train"] > metrics["params"]["exported"]) is adst

    # ... and holds exactly the best checkpoint's weights.
    best = _state(out / "best.pt")
    prefix = "model." if adst else ""
    for key, value in reloaded.state_dict().items():
        torch.testing.assert_close(value, best[prefix + key], rtol=0, atol=0)


@pytest.mark.slow
def test_resume_after_interruption_matches_uninterrupted_run(tmp_path: Path) -> None:
    args = [*TINY, "--epochs", "2", "--aux-fade", "linear"]
    full = train.main([*args, "--out", str(tmp_path / "full")])
    part = tmp_path / "part"
    stopped = train.main([*args, "--out", str(part), "--stop-after-epoch", "1"])
    assert stopped["stopped_after_epoch"] == 1
    assert (part / "last.pt").is_file() and not (part / "metrics.json").exists()
    resumed = train.main([*args, "--out", str(part), "--resume"])

    full_state, resumed_state = _state(tmp_path / "full" / "last.pt"), _state(part / "last.pt")
    assert full_state.keys() == resumed_state.keys()
    for key in full_state:
        torch.testing.assert_close(resumed_state[key], full_state[key], rtol=0, atol=1e-6, msg=key)
    for metric, stats in full["test"].items():
        assert resumed["test"][metric] == pytest.approx(stats, rel=0, abs=1e-9), metric
    for key, values in full["per_image"].items():
        assert resumed["per_image"][key] == (values if key in ("name", "tag") else pytest.approx(values, abs=1e-9))
    assert resumed["best_epoch"] == full["best_epoch"]

    def strip(rows: list[dict]) -> list[dict]:
        return [{k: v for k, v in row.items() if k != "time_s"} for row in rows]

    for got, want in zip(strip(_read(part / "log.json")), strip(_read(tmp_path / "full" / "log.json")), strict=True):
        assert got == pytest.approx(want, rel=0, abs=1e-6)
    assert [row["epoch"] for row in _read(part / "log.json")] == [1, 2]

    # The run's flags come from its config.json; a conflicting one is refused.
    with pytest.raises(SystemExit):
        train.main([*args, "--out", str(part), "--resume", "--lr", "0.1"])


@pytest.mark.slow
def test_ddp_two_processes_gloo(tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        str(EXAMPLES / "train.py"), *TINY, "--device", "cpu", "--out", str(out),
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    log = proc.stdout + proc.stderr
    # Only rank 0 prints and writes: one epoch line, one test line, one set of files, no stray temporaries.
    assert log.count("epoch 1/1 ") == 1 and log.count("test (3 images)") == 1, log[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ddp"]
    assert not list(out.rglob("*.tmp"))
    missing = [name for name in RUN_FILES if not (out / name).is_file()]
    assert not missing, f"missing outputs: {missing}"
    metrics = _read(out / "metrics.json")
    assert metrics["world_size"] == 2
    # Every test image exactly once, although DistributedSampler pads 3 images to 2 x 2.
    split = _read(out / "split.json")
    assert metrics["per_image"]["name"] == split["test"]
    assert metrics["test"]["dice"]["n"] == len(split["test"]) == 3
    assert metrics["best_val"]["dice"]["n"] == len(split["val"])
    assert _read(out / "config.json")["world_size"] == 2


@pytest.mark.slow
def test_compare_two_seeds_writes_table_and_is_resumable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "cmp"
    argv = ["--dataset", "synthetic", "--seeds", "2", "--out", str(out), *TINY, "--max-steps", "1"]
    report = compare.main(argv)
    for variant in ("baseline", "adst"):
        for seed in (0, 1):
            assert (out / f"{variant}-seed{seed}" / "metrics.json").is_file()
    assert not (out / "baseline-seed0" / "split.json").exists()  # the shared split is used
    markdown = (out / "comparison.md").read_text(encoding="utf-8")
    assert "| baseline |" in markdown and "| ADST |" in markdown
    assert "Paired test Dice difference" in markdown and "**mean ± std**" in markdown
    paired = _read(out / "comparison.json")["paired_dice"]
    assert sorted(paired["per_seed"]) == ["0", "1"]
    diffs = [row["adst"] - row["baseline"] for row in paired["per_seed"].values()]
    assert paired["mean"] == pytest.approx(sum(diffs) / 2)
    assert report["summary"]["adst"]["dice"]["n"] == 2
    # Settings are chosen on the validation difference, recomputed here from each run's own metrics.json.
    val = report["paired_val_dice"]
    for seed in (0, 1):
        best = {v: _read(out / f"{v}-seed{seed}" / "metrics.json")["best_val"] for v in ("baseline", "adst")}
        assert val["per_seed"][seed]["diff"] == pytest.approx(
            best["adst"]["dice"]["mean"] - best["baseline"]["dice"]["mean"]
        )
    assert "Paired validation Dice difference" in markdown

    # A tagged ablation shares the baselines; ablations.py tabulates it next to the defaults.
    tagged = compare.main([*argv, "--tag", "w0", "--adst-flags", "--aux-weight 0"])
    assert (out / "adst-w0-seed1" / "metrics.json").is_file() and (out / "comparison-w0.md").is_file()
    assert _read(out / "adst-w0-seed0" / "config.json")["args"]["aux_weight"] == 0
    rows = {row["tag"]: row for row in ablations.main([str(out)])}
    assert set(rows) == {"default", "w0"}
    assert rows["w0"]["flags"] == "--aux-weight 0"
    assert rows["w0"]["val"]["mean"] == pytest.approx(tagged["paired_val_dice"]["mean"])
    assert rows["default"]["test"]["mean"] == pytest.approx(paired["mean"])
    with pytest.raises(FileNotFoundError, match="no comparison"):
        ablations.collect(tmp_path)

    # Finished runs are reused: a second call trains nothing.
    def no_training(argv: list[str]) -> dict:
        raise AssertionError(f"retrained {argv}")

    monkeypatch.setattr(compare.train, "main", no_training)
    again = compare.main(argv)
    assert again["paired_dice"]["mean"] == pytest.approx(paired["mean"])


@pytest.mark.slow
@pytest.mark.skipif(not BUSI.is_dir(), reason="BUSI not available at ../shared/data")
def test_busi_reports_with_and_without_normal(tmp_path: Path) -> None:
    args = ["--dataset", "busi", "--root", str(BUSI), *TINY, "--limit", "40", "--max-steps", "1", "--no-adst"]
    result = train.main([*args, "--out", str(tmp_path / "busi")])
    tags = result["per_image"]["tag"]
    assert result["test"]["dice"]["n"] == len(tags)
    assert result["test_without_normal"]["dice"]["n"] == sum(tag != "normal" for tag in tags)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--dataset", "folder"], "--dataset folder needs --images DIR and --masks DIR"),
        (["--dataset", "folder", "--images", "x"], "--dataset folder needs --images DIR and --masks DIR"),
        (["--dataset", "busi"], "--dataset busi needs --root DIR"),
        (["--root", "data/Dataset_BUSI_with_GT"], "--root is not used by --dataset synthetic"),
        (["--exclude-normal"], "--exclude-normal only applies to --dataset busi"),
        (["--arch", "UNetX"], "unknown architecture 'UNetX'; valid: Unet, UnetPlusPlus, MAnet"),
        (["--encoder", "resnet7"], "unknown encoder 'resnet7'; valid: resnet18"),
        (["--img-size", "100"], "--img-size: expected a multiple of 32"),
        (["--epochs", "0"], "expected an integer >= 1"),
        (["--lr", "-1"], "--lr: expected a number >= 0"),
        (["--tap", "encoder"], "invalid choice: 'encoder'"),
        (["--include-normal", "--exclude-normal"], "not allowed with argument"),
    ],
)
def test_bad_arguments_exit_with_a_clear_message(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        train.parse_args(argv)
    assert info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("legacy", [True, False])
def test_resume_reads_the_legacy_no_feature_grad_key(tmp_path: Path, legacy: bool) -> None:
    (tmp_path / "last.pt").touch()
    saved = {"dataset": "synthetic", "no_feature_grad": legacy}
    (tmp_path / "config.json").write_text(json.dumps({"args": saved}), encoding="utf-8")
    assert train.parse_args(["--resume", "--out", str(tmp_path)]).feature_grad is (not legacy)


def test_resume_without_a_run_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        train.parse_args(["--out", str(tmp_path / "nothing"), "--resume"])
    assert "no run to resume" in capsys.readouterr().err


def test_compare_takes_a_single_dash_flag_as_adst_flags() -> None:
    argv = ["--dataset", "synthetic", "--adst-flags", "--no-feature-grad", "--epochs", "1"]
    args, rest = compare.build_parser().parse_known_args(compare._glue_adst_flags(argv))
    assert args.adst_flags == "--no-feature-grad" and rest == ["--epochs", "1"]
    with pytest.raises(SystemExit):  # what argparse alone does with it
        compare.build_parser().parse_known_args(argv)


def test_compare_refuses_flags_it_owns(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        compare.main(["--seeds", "1", "--seed", "3"])
    assert "set by compare.py itself" in capsys.readouterr().err


def test_missing_dataset_folder_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(train.UsageError, match="BUSI dataset"):
        train.main(["--dataset", "busi", "--root", str(tmp_path / "nope"), "--out", str(tmp_path / "run")])
    # From the command line: a one-line error, no traceback.
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / "train.py"), "--dataset", "busi", "--root", str(tmp_path / "nope"),
         "--out", str(tmp_path / "run")],
        env=_env(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith("train.py: error: BUSI dataset")
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("channels", [1, 3])
def test_overlays_plot_gray_and_rgb_images(tmp_path, channels):
    import train_utils as tu

    rng = np.random.default_rng(0)
    image = rng.random((32, 32)) if channels == 1 else rng.random((32, 32, 3))
    target = np.zeros((32, 32))
    target[8:20, 10:24] = 1
    maps = {"main": rng.random((32, 32)), "edge": rng.random((32, 32)), "fused": rng.random((32, 32))}
    row = tu.OverlayRow("img", image, target, rng.random((32, 32)), 0.5, maps)
    tu.plot_overlays([row, row], tmp_path / "overlays.png", "title")
    assert (tmp_path / "overlays.png").stat().st_size > 0


@pytest.mark.parametrize(
    ("flags", "mask_loss", "fused_loss"),
    [
        ([], "DiceBCELoss", "DiceBCELoss"),
        (["--fused-loss", "bce"], "DiceBCELoss", "BCEWithLogitsLoss"),
        (["--base-loss", "bce"], "BCEWithLogitsLoss", "BCEWithLogitsLoss"),
        (["--base-loss", "bce", "--fused-loss", "dicebce"], "BCEWithLogitsLoss", "DiceBCELoss"),
    ],
)
def test_loss_flags_pick_the_mask_and_fused_losses(flags: list[str], mask_loss: str, fused_loss: str) -> None:
    criterion = train.build_criterion(train.parse_args(["--aux-weight", "0.5", *flags]))
    assert type(criterion.base_loss).__name__ == mask_loss
    assert type(criterion.fused_loss).__name__ == fused_loss
    assert (criterion.w_main, criterion.w_edge, criterion.w_fused) == (0.5, 0.5, 0.5)


def test_training_batches_carry_targets_built_in_the_workers() -> None:
    import lesion_data as ld
    import train_utils as tu
    from torch.utils.data import DataLoader

    from adst_plugin.targets import adst_targets

    dataset = tu.IndexedDataset(ld.SyntheticLesionDataset(n=8, img_size=64, seed=0))
    collate = tu.TargetCollate(shrink_ratio=0.4, thresh_min=0.3, thresh_max=0.7)
    loader = DataLoader(dataset, batch_size=4, num_workers=1, collate_fn=collate)
    for index, images, masks, (core, border) in loader:  # built in a worker process
        assert index.tolist() == sorted(index.tolist()) and images.shape[0] == 4
        expected_core, expected_border = adst_targets(masks)
        assert torch.equal(core, expected_core) and torch.equal(border, expected_border)
        assert core.shape == border.shape == masks.shape and bool(core.any())
