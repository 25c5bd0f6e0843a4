"""Every guarantee of the binary plugin, for C = 3 classes in multiclass and multilabel mode: all 12 smp
architectures, a ``tu-`` encoder, ``aux_params``, fullgraph compile in train mode, autocast, DDP, export with +0
parameters and bit-identical outputs, ``plain_state_dict``.

The architecture matrix, the second mode of compile, scripting and DDP are ``slow``; one architecture per mode,
the timm encoder, ``aux_params``, compile (multiclass), autocast and ``plain_state_dict`` run in the fast suite.
"""

from __future__ import annotations

import copy
import os

import pytest
import segmentation_models_pytorch as smp
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from multiclass_cases import MODES, images, mode_mask, smp_loss, tiny_model
from torch import nn

from adst_plugin import ADSTLoss, wrap_with_adst
from adst_plugin.hooks import Capture

pytestmark = pytest.mark.usefixtures("single_torch_thread")

CLASSES = 3
ARCHS = list(smp.MODEL_ARCHITECTURES_MAPPING)


def build(arch: str, **kwargs) -> nn.Module:
    torch.manual_seed(0)
    if arch == "dpt":  # DPT needs a ViT encoder
        return smp.create_model(
            arch, "tu-test_vit.r160_in1k", encoder_weights=None, classes=CLASSES, dynamic_img_size=True, **kwargs
        )
    return smp.create_model(arch, "resnet18", encoder_weights=None, classes=CLASSES, **kwargs)


def captures(module: nn.Module) -> int:
    return sum(isinstance(h, Capture) for m in module.modules() for h in m._forward_hooks.values())


def _matrix() -> list:
    fast = {("unet", "multiclass"), ("fpn", "multilabel")}
    return [
        pytest.param(arch, mode, marks=() if (arch, mode) in fast else pytest.mark.slow, id=f"{arch}-{mode}")
        for arch in ARCHS
        for mode in MODES
    ]


def test_twelve_architectures_are_covered():
    assert len(ARCHS) == 12


@pytest.mark.parametrize(("arch", "mode"), _matrix())
def test_every_architecture_and_mode_wraps_trains_and_exports(arch, mode):
    base = build(arch)
    model = wrap_with_adst(base)
    criterion = ADSTLoss(model, base_loss=smp_loss(mode))
    size = 128 if arch == "pan" else 64  # PAN's pyramid pooling needs 128
    x, y = images(size=size), mode_mask(mode, size=size)
    out = model(x)
    assert type(out) is torch.Tensor and out.shape == (2, CLASSES, size, size)  # the plain logits, also in training
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    criterion(out, y).backward()
    assert [n for n, p in model.head.named_parameters() if p.grad is None] == []  # DDP: nothing unused
    optimizer.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert any(n.startswith("head.") for n in changed) and any(n.startswith("model.decoder") for n in changed)

    model.eval()
    plain = model.export()
    fresh = build(arch)
    assert type(plain) is type(base) and captures(plain) == 0
    assert plain.state_dict().keys() == fresh.state_dict().keys()
    assert sum(p.numel() for p in plain.parameters()) == sum(p.numel() for p in fresh.parameters())  # +0
    fresh.load_state_dict(model.plain_state_dict())  # strict: exactly the plain model's keys
    fresh.eval()
    with torch.no_grad():
        reference = model(x)
        assert torch.equal(plain(x), reference) and torch.equal(fresh(x), reference)


@pytest.mark.parametrize("mode", MODES)
def test_timm_encoder_and_one_input_channel(mode):
    model = wrap_with_adst(tiny_model(CLASSES, encoder_name="tu-resnet10t", in_channels=1))
    criterion = ADSTLoss(model, base_loss=smp_loss(mode))
    criterion(model(images(channels=1)), mode_mask(mode)).backward()
    assert [n for n, p in model.head.named_parameters() if p.grad is None] == []
    model.eval()
    with torch.no_grad():
        assert torch.equal(model.export()(images(channels=1)), model(images(channels=1)))


@pytest.mark.parametrize("mode", MODES)
def test_aux_params_labels_pass_through(mode):
    model = wrap_with_adst(tiny_model(CLASSES, aux_params={"classes": 4}))
    criterion = ADSTLoss(model, base_loss=smp_loss(mode))
    masks, labels = model(images())
    assert masks.shape == (2, CLASSES, 32, 32) and labels.shape == (2, 4)
    criterion((masks, labels), mode_mask(mode)).backward()  # the loss takes the tuple as smp returns it
    model.eval()
    assert model.forward_adst(images()).labels.shape == (2, 4)


def _step(model, runner, mode):
    criterion = ADSTLoss(model, base_loss=smp_loss(mode))
    loss = criterion(runner(images()), mode_mask(mode))
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("mode", [MODES[0], pytest.param(MODES[1], marks=pytest.mark.slow)])
def test_fullgraph_compile_train_step_matches_eager(mode):
    eager = wrap_with_adst(tiny_model(CLASSES), mode=mode)
    twin = copy.deepcopy(eager)
    compiled = torch.compile(twin, fullgraph=True, backend="eager")
    loss_e, grads_e = _step(eager, eager, mode)
    loss_c, grads_c = _step(twin, compiled, mode)
    torch.testing.assert_close(loss_c, loss_e, atol=1e-6, rtol=1e-6)
    assert grads_c.keys() == grads_e.keys() and any(k.startswith("head.") for k in grads_c)
    for name in grads_e:
        torch.testing.assert_close(grads_c[name], grads_e[name], atol=1e-5, rtol=1e-4, msg=name)
    compiled.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(images()), eager.eval()(images()), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("mode", MODES)
def test_autocast_bf16_and_channels_last(mode):
    model = wrap_with_adst(tiny_model(CLASSES)).to(memory_format=torch.channels_last)
    criterion = ADSTLoss(model, base_loss=smp_loss(mode), w_boundary=1.0)
    x = images().to(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(x)
        loss = criterion(logits, mode_mask(mode))
    assert logits.dtype == torch.bfloat16
    assert all(v.dtype == torch.float32 for k, v in criterion.last_terms.items() if k not in ("mask", "total"))
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
def test_exported_multiclass_model_scripts_and_exports():
    model = wrap_with_adst(tiny_model(CLASSES), mode="multiclass")
    model(images())
    plain = model.export()
    x = images(1)
    with torch.no_grad():
        reference = plain(x)
        torch.testing.assert_close(torch.jit.script(plain)(x), reference, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(torch.export.export(plain, (x,)).module()(x), reference, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------------------------
# DDP (gloo, CPU), as tests/plugin/test_ddp.py for the binary model
# --------------------------------------------------------------------------------------------------------------

WORLD = 2


def _ddp_model() -> nn.Module:
    # Full-depth encoder: with encoder_depth < 5 smp keeps unused deep stages, which DDP would rightly reject.
    torch.manual_seed(0)
    unet = smp.Unet("resnet18", encoder_weights=None, decoder_channels=(32, 16, 16, 16, 16), classes=CLASSES)
    return wrap_with_adst(unet)


def _ddp_batch(rank: int, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    return images(2, 32, seed=100 + rank), mode_mask(mode, 2, 32).roll(4 * rank, dims=-1)


def _worker(rank: int, store: str, out: str, mode: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        wrapped = _ddp_model()
        ddp = torch.nn.parallel.DistributedDataParallel(wrapped, find_unused_parameters=False)
        criterion = ADSTLoss(ddp, base_loss=smp_loss(mode))
        optimizer = torch.optim.SGD(ddp.parameters(), lr=0.01)
        x, y = _ddp_batch(rank, mode)
        for step in range(2):  # DDP raises on the second step if a parameter got no gradient in the first
            optimizer.zero_grad()
            criterion(ddp(x), y).backward()
            if step == 0:
                grads = {n: p.grad.detach().clone() for n, p in wrapped.named_parameters()}
                torch.save(grads, os.path.join(out, f"rank{rank}.pt"))
            optimizer.step()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
def test_ddp_gradients_are_synchronised_and_averaged(tmp_path, mode):
    mp.spawn(_worker, args=(str(tmp_path / "store"), str(tmp_path), mode), nprocs=WORLD, join=True)
    synced = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    local = []
    for rank in range(WORLD):  # what each rank's batch gives alone (same initial weights)
        model = _ddp_model()
        x, y = _ddp_batch(rank, mode)
        ADSTLoss(model, base_loss=smp_loss(mode))(model(x), y).backward()
        local.append({n: p.grad.detach().clone() for n, p in model.named_parameters()})
    assert synced[0].keys() == local[0].keys() and any(k.startswith("head.") for k in synced[0])
    differs = 0
    for name in local[0]:
        assert torch.equal(synced[0][name], synced[1][name]), name
        torch.testing.assert_close(synced[0][name], (local[0][name] + local[1][name]) / 2, atol=1e-6, rtol=1e-4)
        differs += not torch.allclose(local[0][name], local[1][name])
    assert differs > len(local[0]) // 2  # negative control: without the all-reduce the ranks disagree
