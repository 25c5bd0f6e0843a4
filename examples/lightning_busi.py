"""smp's binary segmentation tutorial (a Lightning module), trained on BUSI with ADST.

``BUSIModel`` has the shape of segmentation_models_pytorch's own binary segmentation tutorial: ``__init__``
creates the model with ``smp.create_model`` and a Dice loss, ``forward`` normalises and calls the model,
``shared_step`` computes ``logits_mask``, the loss, ``logits_mask.sigmoid()`` and ``smp.metrics.get_stats``, the
epoch ends log the IoU, and ``configure_optimizers`` returns Adam with a cosine schedule. ADST adds four lines,
each marked ``# ADST``: the import, the wrap, the loss and the export. Nothing else in the tutorial changes.
``--no-adst`` skips the wrap, loss and export lines, so it trains the unchanged tutorial: the baseline, with
everything else equal.

The optional extras are a separate callback, ``ADSTExtras``, that the trainer gets in ADST runs: it logs
``criterion.last_terms`` (each loss term, as epoch means) and fades the auxiliary terms with ``--aux-fade
linear|cosine``. Fading is off by default: the ``adst`` preset was chosen with the auxiliary terms at full
weight, and a cosine fade lowered validation Dice on both seeds it was tried on (docs/results.md, "fade").

Run (the split is a seeded, class-stratified 70/10/20 split; the test metrics are those of the exported
model, reloaded with ``smp.from_pretrained``)::

    python examples/lightning_busi.py --root ../shared/data/Dataset_BUSI_with_GT --epochs 10 --img-size 128 \\
        --out runs/lightning-busi
    python examples/lightning_busi.py --root ../shared/data/Dataset_BUSI_with_GT --epochs 10 --img-size 128 \\
        --out runs/lightning-busi-plain --no-adst

smp's multiclass tutorial on BUSI as three classes is ``examples/lightning_busi_multiclass.py``: a subclass of
``BUSIModel`` that changes the loss's mode and the metrics, run by this file's :func:`main`, so the same four lines
bring ADST to it.

The output folder holds ``logs/metrics.csv`` (CSV logger), ``last.ckpt`` (the Lightning checkpoint),
``exported/`` (a plain smp model) and ``metrics.json`` (test IoU of the exported model). See docs/recipes.md.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import segmentation_models_pytorch as smp
import torch
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.optim import lr_scheduler
from torch.utils.data import DataLoader, Subset

from adst_examples.data import BUSIDataset, make_split, split_indices
from adst_examples.training.encoder_weights import load_encoder
from adst_examples.training.engine import AUX_FADES, fade_factor
from adst_examples.training.models import parse_encoder_weights
from adst_plugin import ADSTLoss, wrap_with_adst  # ADST

__all__ = ["AUX_FADES", "ADSTExtras", "BUSIModel", "RecipeResult", "build_parser", "fade_factor", "main"]

#: ImageNet statistics (what smp's ``imagenet`` encoder weights expect); 1-channel images use their mean.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class BUSIModel(L.LightningModule):
    """The tutorial's module; ``adst=False`` is the plain tutorial, ``adst=True`` adds the ADST head and loss.

    ``mode`` is the smp mode of the Dice loss (``binary`` here; the multiclass recipe's subclass sets
    ``multiclass``): ``ADSTLoss`` reads it from the loss.

    Args:
        arch, encoder_name, in_channels, out_classes, **kwargs: passed to ``smp.create_model``.
        adst: wrap the model with the ADST head and train it with ``ADSTLoss``.
        lr: Adam's learning rate; the cosine schedule runs over all training steps down to ``lr / 20``.
    """

    mode: str = smp.losses.BINARY_MODE

    def __init__(
        self,
        arch: str = "Unet",
        encoder_name: str = "resnet34",
        in_channels: int = 1,
        out_classes: int = 1,
        *,
        adst: bool = True,
        lr: float = 2e-4,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = smp.create_model(
            arch, encoder_name=encoder_name, in_channels=in_channels, classes=out_classes, **kwargs
        )
        mean = torch.tensor(IMAGENET_MEAN if in_channels == 3 else [sum(IMAGENET_MEAN) / 3] * in_channels)
        std = torch.tensor(IMAGENET_STD if in_channels == 3 else [sum(IMAGENET_STD) / 3] * in_channels)
        self.register_buffer("mean", mean.view(1, -1, 1, 1))
        self.register_buffer("std", std.view(1, -1, 1, 1))
        self.loss_fn = smp.losses.DiceLoss(self.mode, from_logits=True)
        if adst:
            self.model = wrap_with_adst(self.model)  # ADST
            self.loss_fn = ADSTLoss(self.model, base_loss=self.loss_fn)  # ADST
        self.step_outputs: dict[str, list[dict[str, torch.Tensor]]] = {"train": [], "valid": [], "test": []}

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        image = (image - self.mean) / self.std
        return self.model(image)

    def shared_step(self, batch: Sequence[torch.Tensor], stage: str) -> dict[str, torch.Tensor]:
        image, mask = batch
        assert image.ndim == 4 and mask.ndim == 4  # (B, C, H, W) and (B, 1, H, W)
        h, w = image.shape[2:]
        assert h % 32 == 0 and w % 32 == 0  # smp encoders downsample by 32
        assert mask.max() <= 1.0 and mask.min() >= 0

        logits_mask = self.forward(image)
        loss = self.loss_fn(logits_mask, mask)
        prob_mask = logits_mask.sigmoid()
        pred_mask = (prob_mask > 0.5).float()
        tp, fp, fn, tn = smp.metrics.get_stats(pred_mask.long(), mask.long(), mode="binary")
        self.log(f"{stage}_loss", loss, prog_bar=stage != "test", on_step=False, on_epoch=True, sync_dist=True)
        self.step_outputs[stage].append({"tp": tp, "fp": fp, "fn": fn, "tn": tn})
        return {"loss": loss, "tp": tp, "fp": fp, "fn": fn, "tn": tn}

    def shared_epoch_end(self, stage: str) -> None:
        outputs = self.step_outputs[stage]
        if not outputs:
            return
        tp, fp, fn, tn = (torch.cat([x[k] for x in outputs]) for k in ("tp", "fp", "fn", "tn"))
        # per-image IoU: each image's IoU, then the mean; an empty prediction of an empty mask counts as 1
        per_image_iou = smp.metrics.iou_score(tp, fp, fn, tn, reduction="micro-imagewise", zero_division=1.0)
        # dataset IoU: the pixels of all images pooled, then one IoU
        dataset_iou = smp.metrics.iou_score(tp, fp, fn, tn, reduction="micro")
        self.log_dict({f"{stage}_per_image_iou": per_image_iou, f"{stage}_dataset_iou": dataset_iou}, prog_bar=True)
        outputs.clear()

    def training_step(self, batch: Sequence[torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self.shared_step(batch, "train")["loss"]

    def on_train_epoch_end(self) -> None:
        self.shared_epoch_end("train")

    def validation_step(self, batch: Sequence[torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self.shared_step(batch, "valid")["loss"]

    def on_validation_epoch_end(self) -> None:
        self.shared_epoch_end("valid")

    def test_step(self, batch: Sequence[torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self.shared_step(batch, "test")["loss"]

    def on_test_epoch_end(self) -> None:
        self.shared_epoch_end("test")

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
        steps = max(1, int(self.trainer.estimated_stepping_batches))
        scheduler = lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps, eta_min=self.hparams.lr / 20)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1}}


class ADSTExtras(L.Callback):
    """Optional ADST extras: log each term of the loss and fade the auxiliary terms.

    Logs ``train_<term>`` (epoch means of ``criterion.last_terms``: ``mask``, ``main``, ``threshold``, ``binary``,
    ``total`` for ``preset="adst"``, plus ``boundary`` when ``w_boundary > 0``) and ``aux_scale``, which it sets
    at the start of every epoch with :func:`fade_factor` (1 throughout for ``aux_fade="none"``, the default).
    """

    def __init__(self, aux_fade: str = "none") -> None:
        if aux_fade not in AUX_FADES:
            raise ValueError(f"ADSTExtras: expected aux_fade in {AUX_FADES}, got {aux_fade!r}")
        self.aux_fade = aux_fade

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        pl_module.loss_fn.aux_scale = fade_factor(self.aux_fade, trainer.current_epoch, trainer.max_epochs)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        terms = {f"train_{name}": value for name, value in pl_module.loss_fn.last_terms.items()}
        terms["aux_scale"] = pl_module.loss_fn.aux_scale
        pl_module.log_dict(terms, on_step=False, on_epoch=True, sync_dist=True)


@dataclass
class RecipeResult:
    """What :func:`main` produced: the trained module and its trainer, the export and the test metrics."""

    module: BUSIModel
    trainer: L.Trainer
    exported: nn.Module
    out: Path
    metrics: dict[str, float]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--root", required=True, help="Dataset_BUSI_with_GT folder (or its parent)")
    p.add_argument("--out", default="runs/lightning-busi", help="output folder [%(default)s]")
    p.add_argument("--arch", default="Unet", help="smp architecture [%(default)s]")
    p.add_argument("--encoder", default="resnet34", help="smp encoder [%(default)s]")
    p.add_argument(
        "--encoder-weights",
        type=parse_encoder_weights,
        default=None,
        help="imagenet (offline for tu-efficientnet_lite0 with the 'pretrained' extra) or an encoder checkpoint file",
    )
    p.add_argument("--img-size", type=int, default=256, help="square image size, a multiple of 32 [%(default)s]")
    p.add_argument("--epochs", type=int, default=10, help="[%(default)s]")
    p.add_argument("--batch-size", type=int, default=8, help="[%(default)s]")
    p.add_argument("--lr", type=float, default=2e-4, help="Adam learning rate [%(default)s]")
    p.add_argument("--seed", type=int, default=0, help="split and training seed [%(default)s]")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers [%(default)s]")
    p.add_argument("--no-adst", dest="adst", action="store_false", help="train smp's plain tutorial (the baseline)")
    p.add_argument("--aux-fade", choices=AUX_FADES, default="none", help="fade the auxiliary terms [%(default)s]")
    p.add_argument("--accelerator", default="auto", help="Lightning accelerator [%(default)s]")
    p.add_argument("--precision", default=None, help="Lightning precision, e.g. bf16-mixed [32]")
    p.add_argument("--max-steps", type=int, default=-1, help="stop after this many training steps (tests)")
    p.add_argument("--limit-batches", type=float, default=None, help="batches per epoch and stage (tests)")
    return p


def _loaders(args: argparse.Namespace, dataset_cls: type[BUSIDataset]) -> tuple[dict[str, DataLoader], int, int]:
    dataset = dataset_cls(args.root, img_size=args.img_size)
    split = make_split(dataset.names, seed=args.seed, labels=dataset.tags)  # stratified by class
    indices = split_indices(dataset.names, split)
    loaders = {
        stage: DataLoader(
            Subset(dataset, indices[stage]),
            batch_size=args.batch_size,
            shuffle=stage == "train",
            drop_last=stage == "train" and len(indices[stage]) > args.batch_size,  # BatchNorm needs batches > 1
            num_workers=args.workers,
            persistent_workers=args.workers > 0,
        )
        for stage in ("train", "val", "test")
    }
    return loaders, dataset.in_channels, getattr(dataset, "num_classes", 1)


def main(
    argv: Sequence[str] | None = None,
    *,
    parser: argparse.ArgumentParser | None = None,
    module_cls: type[BUSIModel] = BUSIModel,
    dataset_cls: type[BUSIDataset] = BUSIDataset,
) -> RecipeResult:
    """Train, export and test; ``module_cls`` / ``dataset_cls`` / ``parser`` are the multiclass recipe's."""
    parser = parser or build_parser()
    args = parser.parse_args(argv)
    if args.aux_fade != "none" and not args.adst:
        parser.error("--aux-fade fades the ADST auxiliary terms; it cannot be combined with --no-adst")
    if args.img_size % 32:
        parser.error(f"--img-size must be a multiple of 32, got {args.img_size}")
    out = Path(args.out)
    L.seed_everything(args.seed, workers=True, verbose=False)
    loaders, in_channels, classes = _loaders(args, dataset_cls)
    module = module_cls(
        args.arch,
        args.encoder,
        in_channels=in_channels,
        out_classes=classes,
        adst=args.adst,
        lr=args.lr,
        encoder_weights=None,  # loaded below, offline where a local source exists
    )
    if args.encoder_weights is not None:
        plain = module.model.model if args.adst else module.model
        load_encoder(plain.encoder, args.encoder, args.encoder_weights, fold_normalisation=False)  # forward normalises
    limits = {} if args.limit_batches is None else {f"limit_{s}_batches": args.limit_batches for s in ("train", "val")}
    trainer = L.Trainer(
        max_epochs=args.epochs,
        max_steps=args.max_steps,
        accelerator=args.accelerator,
        devices=1,
        precision=args.precision,
        logger=CSVLogger(out, name="logs", version=""),
        enable_checkpointing=False,  # the checkpoint is saved once, below
        log_every_n_steps=1,
        default_root_dir=out,
        callbacks=[ADSTExtras(args.aux_fade)] if args.adst else [],
        **limits,
    )
    trainer.fit(module, train_dataloaders=loaders["train"], val_dataloaders=loaders["val"])
    trainer.save_checkpoint(out / "last.ckpt")  # the whole module: wrapper and head (resume with ckpt_path=)

    smp_model = module.model
    if args.adst:
        smp_model = smp_model.export()  # ADST
    smp_model.save_pretrained(out / "exported")

    # Test the export as a user would load it: a plain tutorial module around smp.from_pretrained.
    tester = module_cls(
        args.arch, args.encoder, in_channels=in_channels, out_classes=classes, adst=False, encoder_weights=None
    )
    tester.model = smp.from_pretrained(out / "exported")
    test_limit = {} if args.limit_batches is None else {"limit_test_batches": args.limit_batches}
    test_trainer = L.Trainer(
        accelerator=args.accelerator, devices=1, logger=False, enable_checkpointing=False, **test_limit
    )
    (metrics,) = test_trainer.test(tester, dataloaders=loaders["test"], verbose=False)
    metrics = {k: float(v) for k, v in metrics.items()}
    (out / "metrics.json").write_text(json.dumps({"adst": args.adst, **metrics}, indent=2) + "\n")
    return RecipeResult(module, trainer, tester.model, out, metrics)


if __name__ == "__main__":
    result = main()
    print(json.dumps(result.metrics, indent=2))
