"""End-to-end tests of the training scripts (train.py, compare.py) on tiny synthetic data (CPU)."""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import segmentation_models_pytorch as smp
import torch
from conftest import EXAMPLES_DIR as EXAMPLES
from conftest import ROOT, SHARED_DATA
from PIL import Image
from torch.utils.data import DataLoader, RandomSampler

from adst_examples import compare, train
from adst_examples.data import DATASET_NAMES, LesionSplit, SyntheticLesionDataset
from adst_examples.metrics import METRIC_NAMES
from adst_examples.training.models import build_criterion, build_model
from adst_examples.training.plots import OverlayRow, overlay_figure, plot_overlays
from adst_plugin import DEFAULT_PRESET, PRESETS, ADSTConfig
from adst_plugin.collate import ADSTTargetCollate
from adst_plugin.presets import LOSS_WEIGHTS
from adst_plugin.targets import adst_targets

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
    assert metrics["variant"] == result["variant"] == ("adst" if adst else "baseline")
    split = _read(out / "split.json")
    assert metrics["per_image"]["name"] == split["test"]
    for m in METRIC_NAMES:
        assert metrics["test"][m]["n"] == len(metrics["per_image"][m]) == len(split["test"])
        assert all(math.isfinite(v) for v in metrics["per_image"][m])
        # The summary is the mean of the per-image values it was written with.
        assert metrics["test"][m]["mean"] == pytest.approx(np.mean(metrics["per_image"][m]), rel=1e-12)
    log = _read(out / "log.json")
    assert [row["epoch"] for row in log] == [1]
    config = PRESETS[DEFAULT_PRESET]
    names = config.term_names()
    aux_terms = {f"train_{names[w]}" for w in LOSS_WEIGHTS[1:] if getattr(config, w) > 0}
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
        return [{k: v for k, v in row.items() if k not in ("time_s", "train_s")} for row in rows]

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
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
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
def test_compare_two_seeds_reports_paired_intervals_and_is_resumable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "cmp"
    argv = ["--dataset", "synthetic", "--seeds", "2", "--out", str(out), *TINY, "--max-steps", "1"]
    report = compare.main(argv)
    for variant in ("baseline", "adst"):
        for seed in (0, 1):
            assert (out / f"{variant}-seed{seed}" / "metrics.json").is_file()
    assert not (out / "baseline-seed0" / "split.json").exists()  # the shared split is used
    markdown = (out / "comparison.md").read_text(encoding="utf-8")
    assert "| baseline |" in markdown and "| adst |" in markdown and "Rule (fixed before the runs)" in markdown
    arms = _read(out / "comparison.json")["datasets"]["synthetic"]["arms"]
    # The paired intervals are the study's, recomputed here from each run's own metrics.json.
    for key, split in (("paired", "test"), ("paired_val", "val")):
        for metric in ("dice", "boundary_iou"):
            runs = {v: [_read(out / f"{v}-seed{s}" / "metrics.json")[split][metric]["mean"] for s in (0, 1)]
                    for v in ("baseline", "adst")}  # fmt: skip
            diffs = np.subtract(runs["adst"], runs["baseline"])
            paired = arms["adst"][key][metric]
            assert paired["n"] == 2 and paired["mean"] == pytest.approx(diffs.mean()), (key, metric)
            lo, hi = paired["ci95"]
            assert lo <= paired["mean"] <= hi
    assert report["datasets"]["synthetic"]["arms"]["adst"]["test"]["dice"]["n"] == 2

    # A tagged ablation shares the baselines and joins the same report as its own arm.
    compare.main([*argv, "--tag", "w0", "--adst-flags", "--w-boundary 0"])
    assert (out / "adst-w0-seed1" / "metrics.json").is_file()
    assert _read(out / "adst-w0-seed0" / "config.json")["args"]["w_boundary"] == 0
    arms = _read(out / "comparison.json")["datasets"]["synthetic"]["arms"]
    assert list(arms) == ["baseline", "adst", "adst-w0"] and arms["adst-w0"]["flags"] == "--w-boundary 0"
    assert arms["adst"]["paired"]["dice"]["mean"] == pytest.approx(
        report["datasets"]["synthetic"]["arms"]["adst"]["paired"]["dice"]["mean"]
    )

    # Finished runs are reused: a second call trains nothing.
    def no_training(argv: list[str]) -> dict:
        raise AssertionError(f"retrained {argv}")

    monkeypatch.setattr(compare.train, "main", no_training)
    again = compare.main(argv)
    assert again["datasets"]["synthetic"]["arms"]["adst"]["paired"]["dice"]["mean"] == pytest.approx(
        arms["adst"]["paired"]["dice"]["mean"]
    )


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
        (["--skip-bad"], "--skip-bad applies to datasets read from files; --dataset synthetic has none"),
        (["--arch", "UNetX"], "unknown architecture 'UNetX'; valid: Unet, UnetPlusPlus, MAnet"),
        (["--encoder", "resnet7"], "unknown encoder 'resnet7'; valid: resnet18"),
        (["--img-size", "100"], "--img-size: expected a multiple of 32"),
        (["--epochs", "0"], "expected an integer >= 1"),
        (["--lr", "-1"], "--lr: expected a number >= 0"),
        (["--head-input", "encoder"], "invalid choice: 'encoder'"),
        (["--preset", "dbnet"], "invalid choice: 'dbnet'"),
        (["--preset", "adst", "--w-edge", "1"], "w_edge=1.0 needs edge_input='logits'"),
        (["--aux-fcn", "0.4"], "--aux-fcn: the peer FCN head replaces the ADST head; add --no-adst"),
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


def test_resume_without_a_run_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        train.parse_args(["--out", str(tmp_path / "nothing"), "--resume"])
    assert "no run to resume" in capsys.readouterr().err


def test_compare_takes_a_single_dash_flag_as_adst_flags() -> None:
    argv = ["--dataset", "synthetic", "--adst-flags", "--no-detach-threshold", "--epochs", "1"]
    args, rest = compare.build_parser().parse_known_args(compare._glue_adst_flags(argv))
    assert args.adst_flags == "--no-detach-threshold" and rest == ["--epochs", "1"]
    with pytest.raises(SystemExit):  # what argparse alone does with it
        compare.build_parser().parse_known_args(argv)


def test_compare_refuses_flags_it_owns(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        compare.main(["--seeds", "1", "--seed", "3"])
    assert "set by compare.py itself" in capsys.readouterr().err


def test_missing_dataset_folder_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(train.UsageError, match="BUSI dataset"):
        train.main(["--dataset", "busi", "--root", str(tmp_path / "nope"), "--out", str(tmp_path / "run")])


@pytest.mark.parametrize("channels", [1, 3])
def test_overlays_plot_gray_and_rgb_images(tmp_path: Path, channels: int) -> None:
    rng = np.random.default_rng(0)
    image = rng.random((32, 32)) if channels == 1 else rng.random((32, 32, 3))
    target = np.zeros((32, 32))
    target[8:20, 10:24] = 1
    prob = np.zeros((32, 32))
    prob[0:16, :] = 0.9  # predicted lesion: the top half
    maps = {"main": rng.random((32, 32)), "edge": rng.random((32, 32)), "fused": rng.random((32, 32))}
    rows = [OverlayRow("img0", image, target, prob, 0.5, maps), OverlayRow("img1", image, target, prob, 0.25, maps)]

    fig = overlay_figure(rows, "title")
    assert len(fig.axes) == 2 * 6  # image | truth | prediction | 3 maps, per row
    titles = [ax.get_title() for ax in fig.axes]
    assert titles[:6] == ["img0", "ground truth", "prediction (Dice 0.500)", "ADST main", "ADST edge", "ADST fused"]
    assert titles[6:9] == ["img1", "ground truth", "prediction (Dice 0.250)"]
    overlay = np.asarray(fig.axes[2].get_images()[0].get_array())
    rgb = image if channels == 3 else np.stack([image] * 3, axis=-1)
    np.testing.assert_allclose(overlay[:16], 0.5 * rgb[:16] + [0.5, 0.0, 0.0], rtol=1e-6)  # predicted: tinted red
    np.testing.assert_allclose(overlay[16:], rgb[16:], rtol=1e-6)  # elsewhere: the image itself

    plot_overlays(rows, tmp_path / "overlays.png", "title")
    png = np.asarray(Image.open(tmp_path / "overlays.png").convert("RGB"), dtype=np.float32)
    assert png.shape[:2] == (round(2.3 * 2 * 110), round(2.2 * 6 * 110))
    for r in range(2):  # every panel of every row has drawn content (not a blank background)
        band = png[r * png.shape[0] // 2 : (r + 1) * png.shape[0] // 2]
        for c in range(6):
            assert band[:, c * png.shape[1] // 6 : (c + 1) * png.shape[1] // 6].std() > 10, (r, c)


@pytest.mark.parametrize(
    ("flags", "preset", "changed"),
    [
        ([], DEFAULT_PRESET, {}),
        (["--preset", "adst"], "adst", {}),
        (["--feature-grad", "0.5", "--w-boundary", "0"], DEFAULT_PRESET, {"feature_grad": 0.5, "w_boundary": 0.0}),
        (["--preset", "paper", "--no-detach-threshold"], "paper", {"detach_threshold": False}),
    ],
)
def test_adst_flags_come_from_the_config_and_reach_model_and_loss(
    flags: list[str], preset: str, changed: dict[str, object]
) -> None:
    args = train.parse_args(["--encoder", "resnet18", *flags])
    model = build_model(args, in_channels=1)
    criterion = build_criterion(args, model)
    expected = PRESETS[preset].replace(**changed)
    assert model.config == expected and criterion.config == expected and criterion.model is model
    assert type(criterion.base_loss).__name__ == "DiceBCELoss"


def test_every_config_field_has_a_flag_whose_default_keeps_the_preset() -> None:
    help_text = train.build_parser().format_help()
    args = train.parse_args([])
    for name in (f.name for f in dataclasses.fields(ADSTConfig)):
        assert "--" + name.replace("_", "-") in help_text
        assert getattr(args, name) is None  # not given: the preset decides


def test_training_batches_carry_targets_built_in_the_workers() -> None:
    dataset = SyntheticLesionDataset(n=8, img_size=64, seed=0)
    split = LesionSplit(dataset, range(8))
    collate = ADSTTargetCollate(shrink_ratio=0.4, thresh_min=0.3, thresh_max=0.7)
    sampler = RandomSampler(split, generator=torch.Generator().manual_seed(0))
    loader = DataLoader(split, batch_size=4, sampler=sampler, num_workers=1, collate_fn=collate)
    seen = []
    for index, images, masks, (core, border) in loader:  # built in a worker process
        seen += index.tolist()
        # Each index names its own image and mask, whatever order the sampler drew.
        for i, image, mask in zip(index.tolist(), images, masks, strict=True):
            assert torch.equal(image, dataset[i][0]) and torch.equal(mask, dataset[i][1])
        expected_core, expected_border = adst_targets(masks)
        assert torch.equal(core, expected_core) and torch.equal(border, expected_border)
        assert core.shape == border.shape == masks.shape and bool(core.any())
    assert sorted(seen) == list(range(8)) and seen != list(range(8))  # every image once, shuffled


@pytest.mark.slow  # a fresh interpreter
def test_the_script_runs_as_a_file_and_reports_bad_data_in_one_line(tmp_path: Path) -> None:
    assert f"--dataset {{{','.join(DATASET_NAMES)}}}" in train.build_parser().format_help()
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / "train.py"), "--dataset", "busi", "--root", str(tmp_path / "nope"),
         "--out", str(tmp_path / "run")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith("train.py: error: BUSI dataset")
    assert "Traceback" not in proc.stderr


@pytest.mark.slow  # a fresh interpreter
def test_the_script_runs_as_a_module_from_the_repository_root() -> None:
    proc = subprocess.run([sys.executable, "-m", "examples.train", "--help"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"--dataset {{{','.join(DATASET_NAMES)}}}" in proc.stdout
