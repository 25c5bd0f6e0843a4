import copy

import pytest
import segmentation_models_pytorch as smp
import torch
import torch.distributed as dist
from conftest import tiny_unet
from torch import nn

from adst_plugin import ADSTLoss, ADSTModel, ADSTOutput, wrap_with_adst

ARCHS = [
    "Unet",
    "UnetPlusPlus",
    "FPN",
    "PSPNet",
    "DeepLabV3",
    "DeepLabV3Plus",
    "Linknet",
    "MAnet",
    "PAN",
    "UPerNet",
    "Segformer",
    "DPT",
]


def build(arch: str, **kwargs) -> nn.Module:
    torch.manual_seed(0)
    if arch == "DPT":  # DPT needs a ViT encoder
        return smp.create_model(
            arch, encoder_name="tu-test_vit.r160_in1k", encoder_weights=None, classes=1, dynamic_img_size=True, **kwargs
        )
    return smp.create_model(arch, encoder_name="resnet18", encoder_weights=None, classes=1, **kwargs)


def hooks_left(module: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules())


@pytest.mark.parametrize("arch", ARCHS)
def test_every_architecture_wraps_trains_and_exports(arch):
    base = build(arch)
    model = wrap_with_adst(base)
    x = torch.rand(2, 3, 128, 128)
    y = (torch.rand(2, 1, 128, 128) > 0.7).float()
    out = model(x)
    assert isinstance(out, ADSTOutput)
    for m in (out.masks, out.main, out.edge, out.fused):
        assert m.shape == (2, 1, 128, 128)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    ADSTLoss()(out, y).backward()
    assert [n for n, p in model.head.named_parameters() if p.grad is None] == []
    optimizer.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert any(n.startswith("head.") for n in changed) and any(n.startswith("model.decoder") for n in changed)
    assert hooks_left(model) == 0

    model.eval()
    plain = model.export()
    assert type(plain) is type(base)
    assert plain.state_dict().keys() == build(arch).state_dict().keys()
    assert sum(p.numel() for p in plain.parameters()) == sum(p.numel() for p in build(arch).parameters())
    with torch.no_grad():
        assert torch.equal(plain(x), model(x))
    assert hooks_left(plain) == 0


def test_eval_mode_returns_exactly_the_model_output(unet):
    model = wrap_with_adst(unet).eval()
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), unet(x))
        maps = model.forward_adst(x)
    assert isinstance(maps, ADSTOutput) and maps.main.shape == (2, 1, 64, 64)


def test_export_is_a_deep_copy_and_wrapper_keeps_training(unet):
    model = wrap_with_adst(unet)
    plain = model.export()
    assert not plain.training and model.training
    with torch.no_grad():
        next(model.model.parameters()).add_(1.0)
    assert not torch.equal(next(plain.parameters()), next(model.model.parameters()))


def test_state_dict_round_trip_resumes_training(unet):
    model = wrap_with_adst(unet)
    model(torch.rand(2, 3, 64, 64))  # update BN statistics
    clone = wrap_with_adst(tiny_unet())
    clone.load_state_dict(model.state_dict())
    assert {k for k in model.state_dict() if not k.startswith(("model.", "head."))} == set()
    x = torch.rand(2, 3, 64, 64)
    model.eval(), clone.eval()
    with torch.no_grad():
        a, b = model.forward_adst(x), clone.forward_adst(x)
    for u, v in zip(a[:4], b[:4], strict=True):
        assert torch.equal(u, v)


def test_aux_params_labels_pass_through():
    model = wrap_with_adst(tiny_unet(aux_params={"classes": 3}))
    out = model(torch.rand(2, 3, 64, 64))
    assert out.labels.shape == (2, 3)
    model.eval()
    _, labels = model(torch.rand(2, 3, 64, 64))
    assert labels.shape == (2, 3)


@pytest.mark.parametrize("in_channels", [1, 3])
def test_in_channels_and_timm_encoder(in_channels):
    out = wrap_with_adst(tiny_unet(in_channels, encoder_name="tu-resnet10t"))(torch.rand(2, in_channels, 64, 64))
    assert out.fused.shape == (2, 1, 64, 64)


def test_logits_tap_and_named_features(unet):
    model = wrap_with_adst(unet, tap="logits")
    assert model.head.main[0].in_channels == 1
    assert model(torch.rand(1, 3, 32, 32)).main.shape == (1, 1, 32, 32)
    deep = wrap_with_adst(tiny_unet(), features="decoder.blocks.1")
    assert deep.head.main[0].in_channels == 16
    assert deep(torch.rand(1, 3, 32, 32)).main.shape == (1, 1, 32, 32)


@pytest.mark.parametrize("feature_grad", [None, False, True])  # None: the default, which is False
def test_feature_grad_decides_whether_the_main_branch_trains_the_model(unet, feature_grad):
    kwargs = {} if feature_grad is None else {"feature_grad": feature_grad}
    model = wrap_with_adst(unet, **kwargs)
    out = model(torch.rand(2, 3, 32, 32))
    out.main.mean().backward()  # only the main branch
    reached = [p.grad is not None and bool(p.grad.abs().sum() > 0) for p in model.model.decoder.parameters()]
    assert any(reached) is bool(feature_grad)
    assert not any(p.grad is not None for p in model.model.segmentation_head.parameters())  # main never uses it
    assert model.head.main[0].weight.grad is not None


def test_edge_term_reaches_the_model_without_feature_grad(unet):
    model = wrap_with_adst(unet)
    model(torch.rand(2, 3, 32, 32)).edge.square().mean().backward()
    assert model.model.segmentation_head[0].weight.grad.abs().sum() > 0


def test_generic_module_needs_channels_when_unknown():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
            self.out = nn.Conv2d(8, 1, 1)

        def forward(self, x):
            return self.out(self.body(x))

    model = wrap_with_adst(Net(), features="body")
    assert model.head.main[0].in_channels == 8
    assert model(torch.rand(1, 3, 16, 16)).fused.shape == (1, 1, 16, 16)
    wrong = wrap_with_adst(Net(), features="body", in_channels=5)
    with pytest.raises(ValueError, match="expected 5-channel features"):
        wrong(torch.rand(1, 3, 16, 16))


def test_bad_configurations_raise_clear_errors(unet):
    with pytest.raises(ValueError, match=r"classes=1.*got classes=2"):
        wrap_with_adst(smp.Unet("resnet18", encoder_weights=None, classes=2))
    with pytest.raises(ValueError, match="no submodule 'neck'"):
        wrap_with_adst(unet, features="neck")
    with pytest.raises(ValueError, match="unknown tap"):
        wrap_with_adst(unet, tap="encoder")
    with pytest.raises(ValueError, match="Valid widths"):
        wrap_with_adst(unet, hidden_channels=20)
    with pytest.raises(TypeError, match="already wrapped"):
        wrap_with_adst(wrap_with_adst(unet))
    with pytest.raises(TypeError, match=r"nn\.Module"):
        wrap_with_adst("Unet")


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
def test_exported_model_scripts_exports_and_round_trips_the_hub(tmp_path, unet):
    model = wrap_with_adst(unet)
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
    model = wrap_with_adst(unet).to(memory_format=torch.channels_last)
    x = torch.rand(2, 3, 64, 64).to(memory_format=torch.channels_last)
    y = (torch.rand(2, 1, 64, 64) > 0.5).float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
        loss = ADSTLoss()(out, y)
    loss.backward()
    assert torch.isfinite(loss) and out.fused.dtype == torch.bfloat16
    assert all(torch.isfinite(p.grad).all() for p in model.head.parameters())


def test_torch_compile_train_step(unet):
    model = wrap_with_adst(unet)
    compiled = torch.compile(model, backend="aot_eager")
    x, y = torch.rand(2, 3, 32, 32), (torch.rand(2, 1, 32, 32) > 0.5).float()
    out = compiled(x)
    ADSTLoss()(out, y).backward()
    eager = wrap_with_adst(copy.deepcopy(unet))
    eager.load_state_dict(model.state_dict())
    assert [n for n, p in model.head.named_parameters() if p.grad is None] == []
    assert hooks_left(model) == 0


def test_ddp_without_find_unused_parameters(tmp_path):
    # With find_unused_parameters=False, DDP fails on the second step if any parameter got no gradient.
    # (Full-depth encoder: smp keeps unused deep stages when encoder_depth < 5.)
    torch.manual_seed(0)
    unet = smp.Unet("resnet18", encoder_weights=None, decoder_channels=(32, 16, 16, 16, 16), classes=1)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = nn.parallel.DistributedDataParallel(wrap_with_adst(unet), find_unused_parameters=False)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
        criterion = ADSTLoss()
        for _ in range(3):
            optimizer.zero_grad()
            criterion(model(torch.rand(2, 3, 32, 32)), torch.rand(2, 1, 32, 32) > 0.5).backward()
            optimizer.step()
    finally:
        dist.destroy_process_group()


def test_deepcopy_of_wrapper_is_independent(unet):
    model = wrap_with_adst(unet)
    twin = copy.deepcopy(model)
    assert isinstance(twin, ADSTModel)
    twin(torch.rand(1, 3, 32, 32))
    assert hooks_left(model) == 0 and hooks_left(twin) == 0
