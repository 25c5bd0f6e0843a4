import copy
import gc
import re

import pytest
import segmentation_models_pytorch as smp
import torch
from conftest import ROOT, tiny_unet
from torch import nn
from torch.nn.modules.utils import consume_prefix_in_state_dict_if_present

from adst_plugin import PRESETS, ADSTLoss, ADSTModel, ADSTOutput, wrap_with_adst
from adst_plugin.hooks import Capture


def wrap(model, preset="adst", **kwargs):
    # These tests are about the feature hook: the "adst" preset taps the decoder ("paper" reads the logits).
    return wrap_with_adst(model, preset, **kwargs)


ARCHS = list(smp.MODEL_ARCHITECTURES_MAPPING)


def build(arch: str, **kwargs) -> nn.Module:
    torch.manual_seed(0)
    if arch == "dpt":  # DPT needs a ViT encoder
        return smp.create_model(
            arch, encoder_name="tu-test_vit.r160_in1k", encoder_weights=None, classes=1, dynamic_img_size=True, **kwargs
        )
    return smp.create_model(arch, encoder_name="resnet18", encoder_weights=None, classes=1, **kwargs)


def captures(module: nn.Module) -> int:
    return sum(isinstance(h, Capture) for m in module.modules() for h in m._forward_hooks.values())


def batch(b=2, size=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.zeros(b, 1, size, size)
    y[:, :, size // 4 : size // 2, size // 5 : size // 2] = 1
    return torch.rand(b, 3, size, size, generator=g), y


README = ROOT / "README.md"


def _readme_architecture_table() -> dict[str, tuple[int, int, float]]:
    # README, "Supported architectures": name -> (tapped channels, head parameters, model parameters in millions).
    rows = re.findall(r"^\| (\w+)[^|]* \| (\d+), 1/\d \| ([\d,]+) \| ([\d.]+) M \|$", README.read_text(), re.M)
    return {name: (int(ch), int(head.replace(",", "")), float(total)) for name, ch, head, total in rows}


@pytest.mark.slow  # builds the 12 architectures with a resnet34 encoder (about 8 s)
def test_the_readme_architecture_table_is_what_the_code_builds():
    table = _readme_architecture_table()
    assert set(table) == {cls.__name__ for cls in smp.MODEL_ARCHITECTURES_MAPPING.values()}
    assert f"All {len(table)} smp" in README.read_text()
    for arch, cls in smp.MODEL_ARCHITECTURES_MAPPING.items():
        encoder = {"encoder_name": "tu-vit_tiny_patch16_224", "dynamic_img_size": True} if arch == "dpt" else {}
        model = smp.create_model(arch, **{"encoder_name": "resnet34", **encoder}, encoder_weights=None, classes=1)
        head = wrap(model, "adst").head
        counted = (head.in_channels, sum(p.numel() for p in head.parameters()))
        millions = round(sum(p.numel() for p in model.parameters()) / 1e6, 1)
        assert (*counted, millions) == table[cls.__name__], cls.__name__
        paper = sum(p.numel() for p in wrap(model, "paper").head.parameters())
        assert f"has {paper:,} parameters for every" in README.read_text().replace("\n", " ")


@pytest.mark.slow
@pytest.mark.parametrize("preset", sorted(PRESETS))
@pytest.mark.parametrize("arch", ARCHS)
def test_every_architecture_and_preset_wraps_trains_and_exports(arch, preset):
    base = build(arch)
    model = wrap(base, preset)
    criterion = ADSTLoss(model)
    x, y = batch(size=128)
    out = model(x)
    assert type(out) is torch.Tensor and out.shape == (2, 1, 128, 128)  # the plain logits, also in training
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    criterion(out, y).backward()
    assert [n for n, p in model.head.named_parameters() if p.grad is None] == []
    optimizer.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert any(n.startswith("head.") for n in changed) and any(n.startswith("model.decoder") for n in changed)
    assert captures(model) == (model.config.head_input == "features")  # "paper" reads the logits: no hook

    model.eval()
    plain = model.export()
    fresh = build(arch)
    assert type(plain) is type(base)
    assert plain.state_dict().keys() == fresh.state_dict().keys()
    assert sum(p.numel() for p in plain.parameters()) == sum(p.numel() for p in fresh.parameters())
    with torch.no_grad():
        assert torch.equal(plain(x), model(x))
    assert captures(plain) == 0


def test_training_output_is_exactly_the_model_output(unet):
    twin = copy.deepcopy(unet).train()
    model = wrap(unet)
    x, _ = batch()
    assert torch.equal(model(x), twin(x))
    model.eval(), twin.eval()
    with torch.no_grad():
        assert torch.equal(model(x), twin(x))
        inspected = model.forward_adst(x)
    assert isinstance(inspected, ADSTOutput) and inspected.maps.fused.shape == (2, 1, 64, 64)
    assert model.pop_maps() is None  # eval forwards keep nothing


def test_tutorial_metrics_line_works_on_the_training_output(unet):
    # smp's Lightning tutorial: loss, then sigmoid, threshold and smp.metrics on the same training output.
    twin = copy.deepcopy(unet).train()
    model = wrap(unet)
    dice = smp.losses.DiceLoss(smp.losses.BINARY_MODE, from_logits=True)
    criterion = ADSTLoss(model, dice)
    x, y = batch()
    logits_mask = model(x)
    loss = criterion(logits_mask, y)
    pred_mask = (logits_mask.sigmoid() > 0.5).float()
    tp, fp, fn, tn = smp.metrics.get_stats(pred_mask.long(), y.long(), mode="binary")
    iou = smp.metrics.iou_score(tp, fp, fn, tn, reduction="micro")
    # The same line on the plain model's training output, and IoU counted by hand: the wrapper changes neither.
    twin_pred = (twin(x).sigmoid() > 0.5).float()
    tp, fp, fn, tn = smp.metrics.get_stats(twin_pred.long(), y.long(), mode="binary")
    assert torch.equal(iou, smp.metrics.iou_score(tp, fp, fn, tn, reduction="micro"))
    inter, union = (pred_mask * y).sum(), ((pred_mask + y) > 0).sum()
    assert torch.isclose(iou, inter / union)
    # The loss is the tutorial's Dice loss on those logits (the base loss given, not a default) plus the head's terms.
    assert torch.equal(criterion.last_terms["mask"], dice(logits_mask, y).detach())
    aux = loss.detach() - criterion.last_terms["mask"]
    assert aux > 0 and torch.equal(criterion.last_terms["total"], loss.detach())


def test_export_is_independent_of_the_wrapper(unet):
    model = wrap(unet)
    plain = model.export()
    assert not plain.training and model.training
    live = {t.untyped_storage().data_ptr() for t in model.state_dict().values()}
    copied = {t.untyped_storage().data_ptr() for t in plain.state_dict().values()}
    assert live.isdisjoint(copied)
    with torch.no_grad():
        next(model.model.parameters()).add_(1.0)
    assert not torch.equal(next(plain.parameters()), next(model.model.parameters()))
    assert captures(model) == 1 and captures(plain) == 0  # the live wrapper keeps its hook


def test_hooks_are_removed_by_remove_with_and_garbage_collection():
    unet = tiny_unet()
    model = wrap(unet)
    assert captures(unet) == 1
    model.remove_hooks()
    model.remove_hooks()  # idempotent
    assert captures(unet) == 0
    with wrap(unet) as scoped:
        scoped(batch()[0])
        assert captures(unet) == 1
    assert captures(unet) == 0
    wrap(unet)  # dropped at once
    gc.collect()
    assert captures(unet) == 0


def test_deepcopy_of_wrapper_is_independent(unet):
    model = wrap(unet)
    twin = copy.deepcopy(model)
    assert isinstance(twin, ADSTModel) and captures(twin) == 1
    twin(batch()[0])
    assert twin.pop_maps() is not None and model.pop_maps() is None  # the copy's hook feeds the copy
    twin.remove_hooks()
    assert captures(model) == 1 and captures(twin) == 0


def test_state_dict_round_trip_resumes_training(unet):
    model = wrap(unet)
    model(batch()[0])  # update BN statistics
    clone = wrap(tiny_unet())
    clone.load_state_dict(model.state_dict())
    assert {k.split(".")[0] for k in model.state_dict()} == {"model", "head"}
    x, _ = batch(seed=1)
    model.eval(), clone.eval()
    with torch.no_grad():
        a, b = model.forward_adst(x), clone.forward_adst(x)
    assert torch.equal(a.masks, b.masks) and all(torch.equal(u, v) for u, v in zip(a.maps, b.maps, strict=True))


def test_the_mode_the_loss_gives_the_head_is_restored_with_its_weights():
    model = wrap(tiny_unet(classes=3))  # no mode=: the loss sets it, from its base loss
    ADSTLoss(model, smp.losses.DiceLoss("multilabel", from_logits=True))
    assert model.mode == "multilabel"
    resumed = wrap(tiny_unet(classes=3))
    resumed.load_state_dict(model.state_dict())
    assert resumed.mode == "multilabel"
    x = batch()[0]
    model.eval(), resumed.eval()
    with torch.no_grad():  # the edge cue takes the same probability (a 3-class head without a mode cannot run)
        a, b = model.forward_adst(x), resumed.forward_adst(x)
    assert torch.equal(a.masks, b.masks) and all(torch.equal(u, v) for u, v in zip(a.maps, b.maps, strict=True))
    # A state_dict from before the mode was saved loads strictly; the head keeps the mode it has.
    older = {k: v for k, v in model.state_dict().items() if k != "head.mode_code"}
    multiclass = wrap(tiny_unet(classes=3), mode="multiclass")
    multiclass.load_state_dict(older)
    assert multiclass.mode == "multiclass"
    with pytest.raises(ValueError, match=r"'multiclass' head, got one saved in mode 'multilabel'"):
        multiclass.load_state_dict(model.state_dict())


def test_plain_state_dict_and_lightning_checkpoints(unet):
    model = wrap(unet)
    model(batch()[0])
    plain = tiny_unet()
    plain.load_state_dict(model.plain_state_dict())  # strict: exactly the plain model's keys
    # A LightningModule with `self.model = wrap(...)` saves keys under "model.".
    lightning = {f"model.{k}": v for k, v in model.state_dict().items()}
    consume_prefix_in_state_dict_if_present(lightning, "model.")
    resumed = wrap(tiny_unet())
    resumed.load_state_dict(lightning)
    # ... and a wrapper can start from a plain checkpoint (a fresh head).
    warm = wrap(tiny_unet())
    warm.model.load_state_dict(plain.state_dict())
    x, _ = batch(seed=2)
    for m in (plain, resumed, warm):
        m.eval()
    model.eval()
    with torch.no_grad():
        assert torch.equal(plain(x), model(x)) and torch.equal(resumed(x), model(x)) and torch.equal(warm(x), model(x))


def test_aux_params_labels_pass_through():
    model = wrap(tiny_unet(aux_params={"classes": 3}))
    criterion = ADSTLoss(model)
    x, y = batch()
    masks, labels = model(x)
    assert masks.shape == (2, 1, 64, 64) and labels.shape == (2, 3)
    criterion((masks, labels), y).backward()  # the loss takes the tuple as smp returns it
    model.eval()
    _, labels = model(x)
    assert labels.shape == (2, 3)
    assert model.forward_adst(x).labels.shape == (2, 3)


@pytest.mark.parametrize("in_channels", [1, 3])
def test_in_channels_and_timm_encoder(in_channels):
    model = wrap(tiny_unet(in_channels, encoder_name="tu-resnet10t"))
    model(torch.rand(2, in_channels, 64, 64))
    assert model.pop_maps().fused.shape == (2, 1, 64, 64)


def test_logits_input_and_named_features(unet):
    model = wrap(unet, head_input="logits")
    assert model.head.in_channels == 1 and captures(unet) == 0
    model(torch.rand(1, 3, 32, 32))
    assert model.pop_maps().main.shape == (1, 1, 32, 32)
    deep = wrap(tiny_unet(), features="decoder.blocks.1")
    assert deep.head.in_channels == 16
    deep(torch.rand(1, 3, 32, 32))
    assert deep.pop_maps().main.shape == (1, 1, 32, 32)


def test_generic_module_needs_channels_when_unknown():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
            self.out = nn.Conv2d(8, 1, 1)

        def forward(self, x):
            return self.out(self.body(x))

    model = wrap(Net(), features="body")
    assert model.head.in_channels == 8
    model(torch.rand(1, 3, 16, 16))
    assert model.pop_maps().fused.shape == (1, 1, 16, 16)
    wrong = wrap(Net(), features="body", in_channels=5)
    with pytest.raises(ValueError, match="expected 5-channel features"):
        wrong(torch.rand(1, 3, 16, 16))


def test_bad_configurations_raise_clear_errors(unet):
    with pytest.raises(ValueError, match=r"'binary' mode for a 1-class model, got a 2-class model"):
        wrap(smp.Unet("resnet18", encoder_weights=None, classes=2), mode="binary")
    with pytest.raises(ValueError, match="no submodule 'neck'"):
        wrap(unet, features="neck")
    with pytest.raises(ValueError, match="unknown head_input"):
        wrap(unet, head_input="encoder")
    with pytest.raises(ValueError, match=r"no in_channels with head_input='logits'.*Drop in_channels="):
        wrap(unet, head_input="logits", in_channels=16)  # the head reads the 1-channel logits, whatever it is told
    with pytest.raises(KeyError, match="valid presets"):
        wrap(unet, "dbnet")
    with pytest.raises(TypeError, match="unknown option"):
        wrap(unet, tap="decoder")
    with pytest.raises(ValueError, match="Valid widths"):
        wrap(unet, hidden_channels=20)
    with pytest.raises(TypeError, match="already wrapped"):
        wrap(wrap(unet))
    with pytest.raises(TypeError, match=r"nn\.Module"):
        wrap("Unet")


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
def test_exported_model_scripts_exports_and_round_trips_the_hub(tmp_path, unet):
    model = wrap(unet)
    model(torch.rand(2, 3, 64, 64))
    plain = model.export()
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        reference = plain(x)
        assert torch.allclose(torch.jit.script(plain)(x), reference, atol=1e-5)
        exported = torch.export.export(plain, (x,))
        assert torch.allclose(exported.module()(x), reference, atol=1e-5)
    plain.save_pretrained(tmp_path / "exported")
    reloaded = smp.from_pretrained(tmp_path / "exported").eval()
    assert type(reloaded) is type(unet)
    with torch.no_grad():
        assert torch.equal(reloaded(x), reference)


def test_autocast_and_channels_last(unet):
    x, y = batch()
    model = wrap(unet)
    reference, layout = copy.deepcopy(model), copy.deepcopy(model)  # the same weights, head included
    criterion_ref = ADSTLoss(reference)
    criterion_ref(reference(x), y).backward()  # float32, contiguous
    grads_ref = {n: p.grad for n, p in reference.named_parameters() if p.grad is not None}

    model = model.to(memory_format=torch.channels_last)
    criterion = ADSTLoss(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = criterion(model(x.to(memory_format=torch.channels_last)), y)
    loss.backward()
    # Every term is computed in float32 from bfloat16 maps: each within bfloat16's ~3 digits of its float32 value,
    # and the step goes the same way.
    assert criterion.last_terms.keys() == criterion_ref.last_terms.keys()
    for name, value in criterion.last_terms.items():
        assert value.dtype == torch.float32 and torch.allclose(value, criterion_ref.last_terms[name], rtol=2e-2), name
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads.keys() == grads_ref.keys()
    flat, flat_ref = (torch.cat([g.flatten() for g in gs.values()]) for gs in (grads, grads_ref))
    assert torch.nn.functional.cosine_similarity(flat, flat_ref, dim=0) > 0.9

    # channels_last alone changes the memory layout, not the result.
    layout = layout.to(memory_format=torch.channels_last)
    loss_cl, grads_cl = _step_grads(layout, layout, x.to(memory_format=torch.channels_last), y)
    assert torch.allclose(loss_cl, criterion_ref.last_terms["total"], rtol=1e-5, atol=1e-6)
    for name, grad in grads_ref.items():
        assert torch.allclose(grads_cl[name], grad, rtol=1e-3, atol=2e-4), name  # other conv kernels: float noise


def _step_grads(model: ADSTModel, runner: nn.Module, x, y) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    criterion = ADSTLoss(model)
    loss = criterion(runner(x), y)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.slow  # compiles twice (about 10 s each)
@pytest.mark.parametrize("preset", ["adst", "paper"])
def test_fullgraph_compile_train_step_matches_eager(unet, preset):
    eager = wrap(unet, preset)
    compiled_twin = copy.deepcopy(eager)
    compiled = torch.compile(compiled_twin, fullgraph=True, backend="eager")
    x, y = batch()
    loss_e, grads_e = _step_grads(eager, eager, x, y)
    loss_c, grads_c = _step_grads(compiled_twin, compiled, x, y)
    assert torch.allclose(loss_c, loss_e, atol=1e-6)
    assert grads_c.keys() == grads_e.keys() and any(k.startswith("head.") for k in grads_c)
    for name in grads_e:
        assert torch.allclose(grads_c[name], grads_e[name], atol=1e-5, rtol=1e-4), name
    compiled.eval()
    with torch.no_grad():
        assert torch.allclose(compiled(x), eager.eval()(x), atol=1e-6)
    assert captures(compiled_twin) == (compiled_twin.config.head_input == "features")


@pytest.mark.slow
def test_inductor_compile_train_step():
    # Fresh dynamo state: after the eager-backend compiles above at another size, dynamo would recompile with
    # automatic dynamic shapes, which torch 2.14's inductor fails to lower for this head (docs/recipes.md).
    torch._dynamo.reset()
    model = wrap(tiny_unet())
    compiled = torch.compile(model, fullgraph=True, dynamic=False)
    x, y = batch(size=32)
    loss = ADSTLoss(compiled)(compiled(x), y)  # the loss finds the wrapper behind torch.compile
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in model.head.parameters())


def test_training_flags_set_without_train_still_feed_the_head(unet):
    # Lightning restores each submodule's `training` flag directly after validation, bypassing train().
    model = wrap(unet).eval()
    for module in model.modules():
        module.training = True
    criterion = ADSTLoss(model)
    x, y = batch()
    criterion(model(x), y).backward()
    assert "main" in criterion.last_terms and model.head.main[0].weight.grad is not None
