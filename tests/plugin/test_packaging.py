"""The package alone: its wheel holds ``adst_plugin`` only, and it imports and trains with its core dependencies."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# In a fresh interpreter: train one step and export, then list the modules of the examples' and tests' own
# dependencies that got imported (torchvision, Pillow and tqdm come with smp; these do not).
_CORE_ONLY = """
import sys

NOT_CORE = {"scipy", "matplotlib", "lightning", "monai", "hypothesis", "adst_examples"}
import segmentation_models_pytorch as smp, torch
from adst_plugin import ADSTLoss, wrap_with_adst

model = wrap_with_adst(smp.Unet("resnet18", encoder_weights=None, encoder_depth=3, decoder_channels=(32, 16, 16)))
mask = torch.zeros(2, 1, 32, 32)
mask[:, :, 8:20, 8:20] = 1
ADSTLoss(model)(model.train()(torch.rand(2, 3, 32, 32)), mask).backward()
assert type(model.export()) is smp.Unet
print("ok", sorted(m for m in sys.modules if m.split(".")[0] in NOT_CORE))
"""


@pytest.mark.slow  # a fresh interpreter and a wheel build
def test_the_wheel_holds_the_package_alone_and_it_trains_with_the_core_dependencies(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-c", _CORE_ONLY], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "ok []"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path),
         str(ROOT)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert build.returncode == 0, f"pip wheel failed: {build.stderr[-2000:]}"  # setuptools: in the test extra
    (wheel,) = tmp_path.glob("adst_plugin-*.whl")
    tops = {name.split("/")[0] for name in zipfile.ZipFile(wheel).namelist()}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"adst_plugin"}
