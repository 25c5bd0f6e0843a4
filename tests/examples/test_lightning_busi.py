"""examples/lightning_busi.py: smp's Lightning tutorial with ADST, run at a tiny size on a fake BUSI tree (always)
and on the real BUSI data (when ../shared/data is there)."""

from __future__ import annotations

import ast
import csv
import importlib
import io
import json
import math
import tokenize
from pathlib import Path

import numpy as np
import pytest
import segmentation_models_pytorch as smp
import torch
from conftest import EXAMPLES_DIR, SHARED_DATA
from PIL import Image
from torch.nn.modules.utils import consume_prefix_in_state_dict_if_present

from adst_plugin import DEFAULT_PRESET, PRESETS, ADSTModel, wrap_with_adst
from adst_plugin.presets import LOSS_WEIGHTS

pytest.importorskip("lightning")
pytestmark = pytest.mark.filterwarnings("ignore:`isinstance\\(treespec, LeafSpec\\)` is deprecated")  # Lightning's own
recipe = importlib.import_module("adst_examples.lightning_busi")  # after the skip: a broken import must fail

RECIPE = EXAMPLES_DIR / "lightning_busi.py"
BUSI = SHARED_DATA / "Dataset_BUSI_with_GT"
TINY = ["--img-size", "32", "--encoder", "resnet18", "--batch-size", "4", "--workers", "0", "--limit-batches", "2"]
CLASS_COUNTS = {"benign": 6, "malignant": 4, "normal": 3}  # a 70/10/20 class-stratified split leaves 1 image for val


def write_fake_busi(root: Path) -> Path:
    """A small BUSI tree in the official layout: grayscale PNGs, 1-bit masks, one extra ``_mask_1`` file, lesion-free
    ``normal`` images; 40x48 pixels, so the recipe resizes them."""
    rng = np.random.default_rng(0)
    busi = root / "Dataset_BUSI_with_GT"
    for cls, count in CLASS_COUNTS.items():
        folder = busi / cls
        folder.mkdir(parents=True)
        for i in range(1, count + 1):
            image = (rng.random((40, 48)) * 255).astype(np.uint8)
            mask = np.zeros((40, 48), bool)
            if cls != "normal":
                mask[4 + i : 22 + i, 8 + i : 30] = True
                image[mask] //= 3  # a dark lesion, as in ultrasound
            Image.fromarray(image, "L").save(folder / f"{cls} ({i}).png")
            Image.fromarray(mask).convert("1").save(folder / f"{cls} ({i})_mask.png")
            if cls == "benign" and i == 1:
                second = np.zeros((40, 48), bool)
                second[30:37, 34:44] = True
                Image.fromarray(second).convert("1").save(folder / f"{cls} ({i})_mask_1.png")
    return busi


def read_log(out: Path) -> list[dict[str, str]]:
    with open(out / "logs" / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def fresh_plain() -> torch.nn.Module:
    return smp.create_model("Unet", encoder_name="resnet18", in_channels=1, classes=1, encoder_weights=None)


@pytest.fixture(scope="module")
def fake_busi(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_fake_busi(tmp_path_factory.mktemp("busi"))


@pytest.fixture(scope="module")
def run(fake_busi: Path, tmp_path_factory: pytest.TempPathFactory) -> recipe.RecipeResult:
    out = tmp_path_factory.mktemp("lightning-busi")
    return recipe.main(["--root", str(fake_busi), "--out", str(out), "--epochs", "2", "--aux-fade", "linear", *TINY])


@pytest.mark.slow
def test_recipe_trains_logs_the_adst_terms_and_fades_them(run):
    assert run.trainer.global_step == 4  # 2 epochs x 2 batches
    rows = read_log(run.out)
    train = [r for r in rows if r["train_total"]]
    assert [int(r["epoch"]) for r in train] == [0, 1]
    for row in train:
        # the default preset's terms (see adst_plugin.presets.DEFAULT_PRESET)
        config = PRESETS[DEFAULT_PRESET]
        names = config.term_names()
        expected = {"mask", "total", *(names[w] for w in LOSS_WEIGHTS[1:] if getattr(config, w) > 0)}
        for term in expected:
            assert math.isfinite(float(row[f"train_{term}"])), term
        assert float(row["train_total"]) == pytest.approx(float(row["train_loss"]))
    assert [float(r["aux_scale"]) for r in train] == [1.0, 0.0]  # --aux-fade linear over 2 epochs
    # the total of the last epoch is the mask loss alone: the auxiliary terms are faded out
    assert float(train[1]["train_total"]) == pytest.approx(float(train[1]["train_mask"]))
    valid = [r for r in rows if r["valid_loss"]]
    assert len(valid) == 2 and all(0 <= float(r["valid_dataset_iou"]) <= 1 for r in valid)
    metrics = json.loads((run.out / "metrics.json").read_text())
    assert metrics["adst"] is True and 0 <= metrics["test_dataset_iou"] <= 1


@pytest.mark.slow
def test_export_is_a_plain_smp_model_that_reloads_bit_identically(run):
    exported = smp.from_pretrained(run.out / "exported").eval()
    assert type(exported) is type(fresh_plain()) is smp.Unet
    assert exported.state_dict().keys() == fresh_plain().state_dict().keys()
    assert not any(k.startswith("head.") for k in exported.state_dict())
    assert not any(isinstance(m, ADSTModel) for m in exported.modules())
    x = torch.rand(2, 1, 32, 32)
    wrapper = run.module.model.eval()
    with torch.no_grad():
        assert torch.equal(exported(x), wrapper(x))
        assert torch.equal(run.exported(x), wrapper(x))  # what the recipe tested


@pytest.mark.slow
def test_lightning_checkpoint_and_plain_state_dict_load(run):
    ckpt = torch.load(run.out / "last.ckpt", map_location="cpu", weights_only=False)
    state = {k: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}  # drop the module's mean/std
    assert {k.split(".")[1] for k in state} == {"model", "head"}
    consume_prefix_in_state_dict_if_present(state, "model.")
    resumed = wrap_with_adst(fresh_plain())
    resumed.load_state_dict(state)  # strict: the wrapper's keys exactly
    plain = fresh_plain()
    plain.load_state_dict(run.module.model.plain_state_dict())  # strict: the plain model's keys exactly
    reloaded = recipe.BUSIModel.load_from_checkpoint(run.out / "last.ckpt", map_location="cpu")
    x = torch.rand(2, 1, 32, 32)
    for m in (resumed, plain, reloaded, run.module):
        m.eval()
    with torch.no_grad():
        expected = run.module.model(x)
        assert torch.equal(resumed(x), expected) and torch.equal(plain(x), expected)
        assert torch.equal(reloaded(x), run.module(x))


@pytest.mark.slow
def test_no_adst_is_the_plain_tutorial(fake_busi, tmp_path):
    result = recipe.main(["--root", str(fake_busi), "--out", str(tmp_path), "--epochs", "1", "--no-adst", *TINY])
    assert type(result.module.model) is smp.Unet and type(result.module.loss_fn) is smp.losses.DiceLoss
    assert not any(r.get("train_main") for r in read_log(tmp_path))
    assert smp.from_pretrained(tmp_path / "exported").state_dict().keys() == fresh_plain().state_dict().keys()
    with pytest.raises(SystemExit):
        recipe.main(["--root", str(fake_busi), "--out", str(tmp_path), "--no-adst", "--aux-fade", "cosine"])


# -- the recipe is the tutorial plus the four marked lines ----------------------------------------------------------

#: Names of the adst_plugin API (and of what its objects carry): a line that uses one is an ADST line.
ADST_NAMES = {"adst_plugin", "wrap_with_adst", "ADSTLoss", "ADSTModel", "ADSTOutput", "get_config", "ADSTConfig"}
ADST_ATTRS = {"export", "last_terms", "aux_scale", "pop_maps", "forward_adst", "plain_state_dict", "masks", "maps"}


def _marked_lines(source: str, marker: str) -> set[int]:
    tokens = tokenize.generate_tokens(io.StringIO(source).readline)
    return {t.start[0] for t in tokens if t.type == tokenize.COMMENT and t.string.strip() == marker}


def _adst_lines(tree: ast.AST) -> set[int]:
    lines = set()
    for node in ast.walk(tree):
        if (
            (isinstance(node, ast.Name) and node.id in ADST_NAMES)
            or (isinstance(node, ast.Attribute) and node.attr in ADST_ATTRS)
            or (isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "adst_plugin")
        ):
            lines.add(node.lineno)
    return lines


def recipe_problems(source: str) -> list[str]:
    """What makes ``source`` more than smp's tutorial plus the four marked ADST lines (empty: nothing)."""
    tree = ast.parse(source)
    lines = source.splitlines()
    marked = _marked_lines(source, "# ADST")
    roles = {
        "import": [n for n in marked if lines[n - 1].lstrip().startswith("from adst_plugin import")],
        "wrap": [n for n in marked if "wrap_with_adst(" in lines[n - 1]],
        "loss": [n for n in marked if "ADSTLoss(" in lines[n - 1]],
        "export": [n for n in marked if ".export()" in lines[n - 1]],
    }
    problems = []
    if len(marked) != 4 or any(len(found) != 1 for found in roles.values()):
        problems.append(f"expected 4 '# ADST' lines (import, wrap, loss, export), got {roles} of {sorted(marked)}")
    # Every use of the ADST API is one of the four lines, or in the optional ADSTExtras callback.
    extras = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "ADSTExtras"]
    optional = {i for c in extras for i in range(c.lineno, c.end_lineno + 1)}
    unmarked = sorted(_adst_lines(tree) - optional - marked)
    problems += [f"unmarked ADST line {n}: {lines[n - 1].strip()}" for n in unmarked]
    # The wrap, loss and export lines sit in `if adst:` blocks made of marked lines only: `--no-adst` runs the
    # rest of the file, i.e. the tutorial.
    guarded = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and ast.unparse(node.test) in ("adst", "args.adst"):
            body = {stmt.lineno for stmt in node.body}
            if body & marked:
                if not body <= marked or node.orelse:
                    problems.append(f"the `if {ast.unparse(node.test)}:` block at line {node.lineno} does more")
                guarded |= body
    unguarded = sorted(marked - set(roles["import"]) - guarded)
    problems += [f"ADST line {n} also runs with --no-adst: {lines[n - 1].strip()}" for n in unguarded]
    return problems


def test_the_recipe_is_the_tutorial_plus_four_marked_lines():
    source = RECIPE.read_text()
    assert recipe_problems(source) == []
    # ... and the check sees what it is there for (each mutation is a way the recipe could drift)
    wrap = "            self.model = wrap_with_adst(self.model)  # ADST\n"
    metrics = "        prob_mask = logits_mask.sigmoid()\n"
    guard = "        if adst:\n"
    assert source.count(guard + wrap) == 1 and source.count(metrics) == 1
    mutations = {
        "unmarked wrap": source.replace(wrap, wrap.replace("  # ADST", "")),
        "unguarded wrap": source.replace(guard + wrap, wrap[4:] + guard),
        "changed metrics line": source.replace(metrics, metrics.replace("logits_mask.", "logits_mask.masks.")),
        "fifth marked line": source.replace(metrics, metrics.rstrip() + "  # ADST\n"),
    }
    for name, mutated in mutations.items():
        assert recipe_problems(mutated), name


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")
def test_adst_and_plain_modules_compute_the_same_tutorial_step():
    # The unmarked lines do the same in both modules: same model weights, same logits (so the same metrics), and
    # the ADST loss's mask term is the tutorial's Dice loss.
    image = torch.rand(2, 1, 32, 32)
    mask = torch.zeros(2, 1, 32, 32)
    mask[:, :, 8:20, 6:24] = 1
    steps = {}
    for adst in (False, True):
        torch.manual_seed(0)
        module = recipe.BUSIModel("Unet", "resnet18", in_channels=1, adst=adst, encoder_weights=None)
        steps[adst] = module, module.shared_step((image, mask), "train")
    (plain, s_plain), (wrapped, s_adst) = steps[False], steps[True]
    assert type(plain.model) is smp.Unet and isinstance(wrapped.model, ADSTModel)
    assert not any(isinstance(m, ADSTModel) for m in plain.modules())
    assert plain.model.state_dict().keys() == wrapped.model.plain_state_dict().keys()
    assert all(torch.equal(v, wrapped.model.plain_state_dict()[k]) for k, v in plain.model.state_dict().items())
    for stat in ("tp", "fp", "fn", "tn"):
        assert torch.equal(s_plain[stat], s_adst[stat]), stat
    assert torch.allclose(wrapped.loss_fn.last_terms["mask"], s_plain["loss"])
    assert s_adst["loss"] > s_plain["loss"]  # plus the auxiliary terms


def test_fade_factor():
    assert [recipe.fade_factor("none", e, 3) for e in range(3)] == [1.0, 1.0, 1.0]
    assert [recipe.fade_factor("linear", e, 3) for e in range(3)] == [1.0, 0.5, 0.0]
    assert [recipe.fade_factor("cosine", e, 3) for e in range(3)] == pytest.approx([1.0, 0.5, 0.0])
    assert recipe.fade_factor("cosine", 0, 1) == 1.0
    assert recipe.build_parser().get_default("aux_fade") == "none"
    with pytest.raises(ValueError, match="expected one of"):
        recipe.fade_factor("exp", 0, 3)


@pytest.mark.slow
@pytest.mark.skipif(not BUSI.is_dir(), reason=f"BUSI data not found at {BUSI}")
def test_recipe_on_real_busi(tmp_path):
    result = recipe.main(["--root", str(BUSI), "--out", str(tmp_path), "--epochs", "1", *TINY])
    assert result.trainer.global_step == 2 and 0 <= result.metrics["test_dataset_iou"] <= 1
    assert read_log(tmp_path)[-1]["train_main"]


@pytest.mark.slow
def test_recipe_loads_encoder_weights_from_a_file(fake_busi, tmp_path):
    # The tutorial's module normalises its input itself, so the checkpoint's tensors load unchanged (gray: summed).
    torch.manual_seed(3)
    state = smp.encoders.get_encoder("resnet18", weights=None).state_dict()
    torch.save(state, tmp_path / "resnet18.pth")
    args = ["--root", str(fake_busi), "--out", str(tmp_path / "out"), "--epochs", "1", "--lr", "0", *TINY]
    result = recipe.main([*args, "--encoder-weights", str(tmp_path / "resnet18.pth")])
    encoder = result.exported.encoder
    assert torch.equal(encoder.layer4[1].conv2.weight, state["layer4.1.conv2.weight"])  # lr 0: as loaded
    assert torch.equal(encoder.conv1.weight, state["conv1.weight"].sum(1, keepdim=True))  # 1-channel BUSI
