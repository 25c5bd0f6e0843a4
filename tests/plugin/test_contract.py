"""The loss/model contract: one training forward, then its loss.

The forgotten model is reported, a mismatched forward/loss pair raises, no-grad and eval forwards stay quiet, and
no map outlives its step. Call orders at random: test_contract_properties.py; the mask check: test_step_checks.py.
"""

import ast
import contextlib
import copy
import dataclasses
import gc
import inspect
import re
import tempfile
import warnings
import weakref
from pathlib import Path

import pytest
import segmentation_models_pytorch as smp
import torch
import torch.distributed as dist
from conftest import tiny_unet
from torch.optim.swa_utils import update_bn

import adst_plugin
from adst_plugin import ADSTLoss, UnclaimedHeadOutputWarning, functional, get_config, wrap_with_adst
from adst_plugin.hooks import resolve_module
from adst_plugin.targets import adst_targets

FORGOTTEN = r"ADSTLoss\(model\)"
MISMATCH = "last training forward"


def images(seed: int, b: int = 2) -> torch.Tensor:
    return torch.rand(b, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def masks(b: int = 2) -> torch.Tensor:
    y = torch.zeros(b, 1, 32, 32)
    y[:, :, 8:22, 6:18] = 1
    return y


def wrapped(**kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    return wrap_with_adst(tiny_unet(**kwargs))


def unclaimed(record: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in record if issubclass(w.category, UnclaimedHeadOutputWarning)]


def expected_main(maps, y: torch.Tensor) -> torch.Tensor:
    """The default's main-map term: L1 of tanh(main) against the signed distance read off the border map."""
    config = get_config()
    _, border = adst_targets(y)
    sdf = functional.signed_distance(border, y, config.thresh_min, config.thresh_max)
    return functional.sdf_loss(maps.main, sdf)


# ---------------------------------------------------------------------------------------------------------------
# The forgotten model
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss", ["ADSTLoss()", "smp DiceLoss"])
def test_a_loss_without_the_model_is_reported_by_the_second_step(loss):
    model = wrapped()
    criterion = ADSTLoss() if loss == "ADSTLoss()" else smp.losses.DiceLoss("binary")
    y = masks()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        criterion(model(images(0)), y).backward()
        assert unclaimed(record) == []  # the first step cannot know yet
        criterion(model(images(1)), y).backward()
    assert len(unclaimed(record)) == 1 and "ADSTLoss(model)" in unclaimed(record)[0]
    assert all(p.grad is None for p in model.head.parameters())  # what the warning is about


def test_the_forgotten_model_is_reported_under_fullgraph_compile():
    torch._dynamo.reset()
    model = wrapped()
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    criterion, y = ADSTLoss(), masks()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for step in range(3):
            criterion(compiled(images(step)), y).backward()
    assert len(unclaimed(record)) == 2  # steps 2 and 3, from the compiled graph


def test_no_grad_forwards_in_train_mode_keep_nothing_and_stay_quiet():
    model = wrapped()
    criterion, y = ADSTLoss(model), masks()
    loader = [images(seed) for seed in range(3)]
    stats = model.model.decoder.blocks[0].conv1[1].running_mean.clone()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        update_bn(loader, model)  # BN recalibration: train mode, no_grad
        assert model.training and model.pop_maps() is None
        with torch.no_grad():
            model(images(5))
        criterion(model(images(6)), y).backward()
    assert unclaimed(record) == []
    assert not torch.equal(model.model.decoder.blocks[0].conv1[1].running_mean, stats)  # BN did recalibrate
    assert all(p.grad is not None for p in model.head.parameters())


def test_lightning_sanity_check_and_training_stay_quiet(tmp_path: Path):
    lightning = pytest.importorskip("lightning")

    class Module(lightning.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = wrapped()
            self.loss_fn = ADSTLoss(self.model)

        def training_step(self, batch, _):
            return self.loss_fn(self.model(batch[0]), batch[1])

        def validation_step(self, batch, _):
            self.log("valid_loss", self.loss_fn(self.model(batch[0]), batch[1]))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    data = torch.utils.data.TensorDataset(torch.cat([images(s) for s in range(4)]), masks(8))
    loader = torch.utils.data.DataLoader(data, batch_size=2)
    trainer = lightning.Trainer(
        max_epochs=2, limit_train_batches=2, limit_val_batches=2, num_sanity_val_steps=2, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
    )  # fmt: skip
    module = Module()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer.fit(module, loader, loader)
    assert unclaimed(record) == [] and trainer.global_step == 4
    assert module.model.pop_maps() is None


# ---------------------------------------------------------------------------------------------------------------
# The mismatched pair
# ---------------------------------------------------------------------------------------------------------------


VARIANTS = ["eager", "compile", "autocast+channels_last", "aux_params"]


def _variant(name: str):
    """(wrapper, what the loop calls, the context of the step)."""
    model = wrapped(aux_params={"classes": 3}) if name == "aux_params" else wrapped()
    if name == "compile":
        torch._dynamo.reset()
        return model, torch.compile(model, fullgraph=True, backend="eager"), contextlib.nullcontext
    if name == "autocast+channels_last":
        model = model.to(memory_format=torch.channels_last)
        return model, model, lambda: torch.autocast("cpu", dtype=torch.bfloat16)
    return model, model, contextlib.nullcontext


@pytest.mark.parametrize("variant", VARIANTS)
def test_a_forward_between_a_forward_and_its_loss_is_an_error(variant):
    model, runner, context = _variant(variant)
    criterion, y = ADSTLoss(runner), masks()
    with context(), warnings.catch_warnings():
        warnings.simplefilter("ignore", UnclaimedHeadOutputWarning)
        first = runner(images(0))
        runner(images(1))  # an extra training forward: its maps replace the first one's
        with pytest.raises(ValueError, match=MISMATCH):
            criterion(first, y)
        assert model.pop_maps() is None  # the failed call dropped the maps
        # The same call in order works, and so do a slice, a copy and a cast of the output.
        for transform in (lambda t: t, lambda t: t[:, :1], lambda t: t.contiguous(), lambda t: t.float()):
            out = runner(images(2))
            transformed = (transform(out[0]), out[1]) if isinstance(out, tuple) else transform(out)
            assert torch.isfinite(criterion(transformed, y))


def test_a_no_grad_forward_between_a_forward_and_its_loss_keeps_the_pair():
    # An EMA or pseudo-label forward of the same model, in train mode, under no_grad.
    model = wrapped()
    criterion, y = ADSTLoss(model), masks()
    first = model(images(0))
    maps = model._pending
    with torch.no_grad():
        model(images(1))
    criterion(first, y)
    assert torch.allclose(criterion.last_terms["main"], expected_main(maps, y))


def test_detached_logits_and_other_tensors_are_not_the_forwards_output():
    model = wrapped()
    criterion, y = ADSTLoss(model), masks()
    with pytest.raises(ValueError, match="without an autograd graph"):
        criterion(model(images(0)).detach(), y)
    with pytest.raises(ValueError, match="another forward"):
        model(images(1))
        criterion(torch.randn(2, 1, 32, 32, requires_grad=True) * 1.0, y)


def test_a_frozen_model_pairs_by_storage():
    model = wrapped()
    model.model.requires_grad_(False)  # head-only training: the logits carry no graph
    criterion, y = ADSTLoss(model), masks()
    out = model(images(0))
    assert out.grad_fn is None
    criterion(out[:, :1], y).backward()  # a view shares the output's storage
    model(images(1))
    with pytest.raises(ValueError, match=MISMATCH):
        criterion(out.clone(), y)


@pytest.fixture
def single_process_group():
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=0, world_size=1)
        try:
            yield
        finally:
            dist.destroy_process_group()


@pytest.mark.parametrize("static_graph", [False, True])
def test_ddp_output_pairs_and_a_mismatch_raises(single_process_group, static_graph):
    # static_graph=True: the documented setting for encoder_depth < 5 (unused encoder stages), where DDP sends the
    # first step's output through its sink (another autograd node); without it, the full-depth model.
    torch.manual_seed(0)
    if static_graph:
        unet = tiny_unet()
    else:
        unet = smp.Unet("resnet18", encoder_weights=None, decoder_channels=(32, 16, 16, 16, 16), classes=1)
    model = wrap_with_adst(unet)
    ddp = torch.nn.parallel.DistributedDataParallel(model, static_graph=static_graph)
    criterion, y = ADSTLoss(ddp), masks()
    through_sink = []
    for step in range(3):
        out = ddp(images(step))
        maps = model._pending
        through_sink.append(out is not model._pending_output)
        criterion(out, y).backward()
        assert torch.allclose(criterion.last_terms["main"], expected_main(maps, y))
    assert through_sink == [static_graph, False, False]
    first = ddp(images(3))
    with pytest.warns(UnclaimedHeadOutputWarning):
        ddp(images(4))
    with pytest.raises(ValueError, match=MISMATCH):
        criterion(first, y)


# ---------------------------------------------------------------------------------------------------------------
# No map outlives its step
# ---------------------------------------------------------------------------------------------------------------


def _maps_refs(model) -> list[weakref.ref]:
    return [weakref.ref(t) for t in model._pending]


def _alive(refs: list[weakref.ref]) -> bool:
    gc.collect()
    return any(r() is not None for r in refs)


def _path_loss(model, criterion, out):
    criterion(out, masks()).backward()


def _path_eval(model, criterion, out):
    model.eval()


def _path_train(model, criterion, out):
    model.train()


def _path_mismatch(model, criterion, out):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnclaimedHeadOutputWarning)
        second = model(images(9))
    refs = _maps_refs(model)
    with pytest.raises(ValueError, match=MISMATCH):
        criterion(out, masks())
    assert not _alive(refs) and second is not None


def _path_bad_mask(model, criterion, out):
    with pytest.raises(ValueError, match="binary mask"):
        criterion(out, masks() * 0.5)


def _path_remove_hooks(model, criterion, out):
    model.remove_hooks()


@pytest.mark.parametrize(
    "path", [_path_loss, _path_eval, _path_train, _path_mismatch, _path_bad_mask, _path_remove_hooks]
)
def test_no_map_outlives_its_step(path):
    model = wrapped()
    criterion = ADSTLoss(model)
    out = model(images(0))
    refs = _maps_refs(model)
    path(model, criterion, out)
    assert not _alive(refs), path.__name__
    assert model._pending is None and getattr(model, "_pending_output", None) is None
    assert model._tap.capture.output is None


def test_a_kept_step_is_one_step_and_copies_and_exports_take_none_of_it():
    model = wrapped()
    criterion = ADSTLoss(model)
    model(images(0))
    first = _maps_refs(model)
    with pytest.warns(UnclaimedHeadOutputWarning):
        out = model(images(1))
    assert not _alive(first) and _alive(_maps_refs(model))  # one step's worth, the last
    twin = copy.deepcopy(model)  # mid-step (an EMA copy): the copy keeps nothing
    assert twin._pending is None and twin.pop_maps() is None
    plain = model.export()
    assert sum(len(m._forward_hooks) for m in plain.modules()) == 0
    criterion(out, masks()).backward()  # the kept step is still this one
    assert model._pending is None


def test_a_forward_that_fails_half_way_keeps_no_features():
    model = wrapped()

    def broken(_):
        raise RuntimeError("segmentation head failed")

    model.model.segmentation_head.forward = broken  # fails after the decoder, whose output the hook captured
    with pytest.raises(RuntimeError, match="segmentation head failed"):
        model(images(0))
    assert model._tap.capture.output is None and model._pending is None


def test_training_without_grad_at_the_loss_names_the_fix():
    model = wrapped()
    criterion = ADSTLoss(model)
    with torch.no_grad(), pytest.raises(RuntimeError, match=r"torch\.no_grad\(\) runs no head.*model\.eval\(\)"):
        criterion(model(images(0)), masks())


# ---------------------------------------------------------------------------------------------------------------
# Errors name a real action
# ---------------------------------------------------------------------------------------------------------------


def test_module_path_errors_name_the_callers_keyword():
    model = tiny_unet()
    with pytest.raises(ValueError, match=r"Pass stages='<dotted\.path>' to DeepSupervisionModel"):
        resolve_module(model, "decoder.nope", "DeepSupervisionModel", keyword="stages")
    with pytest.raises(ValueError, match=r"Pass features='<dotted\.path>' to wrap_with_adst"):
        wrap_with_adst(tiny_unet(), features="decoder.nope")


def _message_texts():
    """Every string literal in the package (an f-string with its fields as {}), with its file."""
    for path in sorted(Path(adst_plugin.__file__).parent.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.JoinedStr):
                yield path.name, "".join(v.value if isinstance(v, ast.Constant) else "{}" for v in node.values)
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                yield path.name, node.value


def _keywords(obj) -> set[str]:
    """The keywords a user can pass to ``obj`` (its parameters; wrap_with_adst and ADSTLoss: their overrides too)."""
    names = set(inspect.signature(obj).parameters)
    if obj is wrap_with_adst:
        names |= {f.name for f in dataclasses.fields(adst_plugin.ADSTConfig)}
    if obj is ADSTLoss:
        names |= set(adst_plugin.loss.LOSS_FIELDS)
    return names


def test_every_pass_keyword_in_a_message_exists_where_the_user_is():
    public = {name: getattr(adst_plugin, name) for name in adst_plugin.__all__}
    callables = {name: obj for name, obj in public.items() if callable(obj) and not isinstance(obj, type(adst_plugin))}
    warning_types = {obj for obj in callables.values() if isinstance(obj, type) and issubclass(obj, Warning)}
    anywhere = set().union(*(_keywords(obj) for obj in callables.values() if obj not in warning_types))
    checked = []
    for file, text in _message_texts():
        for match in re.finditer(r"[Pp]ass (\w+)=[^.;]*?(?: to (\w+))?(?=[ .;,)]|$)", text):
            keyword, target = match.groups()
            if target in callables:
                assert keyword in _keywords(callables[target]), (file, match.group(0))
            else:
                assert keyword in anywhere, (file, match.group(0))
            checked.append(keyword)
    assert {"in_channels", "classes", "base_loss", "mode"} <= set(checked)  # the scan finds the messages
