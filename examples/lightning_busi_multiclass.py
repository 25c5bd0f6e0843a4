"""smp's multiclass segmentation tutorial (a Lightning module), trained on BUSI as three classes with ADST.

``BUSIMulticlassModel`` has the shape of segmentation_models_pytorch's multiclass tutorial
(``examples/camvid_segmentation_multiclass.ipynb``): an FPN, ``DiceLoss("multiclass", from_logits=True)``, masks
of class indices ``(B, H, W)`` (0 background, 1 benign, 2 malignant; ``normal`` images are all background),
``logits.softmax(dim=1).argmax(dim=1)`` as the prediction and ``smp.metrics.get_stats(..., mode="multiclass",
num_classes=3)``. It is a subclass of the binary recipe's ``BUSIModel`` (``examples/lightning_busi.py``) that
changes the loss's mode and the step; the binary recipe's :func:`~adst_examples.lightning_busi.main` trains it.
So ADST changes the same four lines, all in ``lightning_busi.py``, each marked ``# ADST``: the import, the wrap,
the loss (``ADSTLoss`` reads ``multiclass`` from the Dice loss) and the export. This file uses no ADST name.

Run (a seeded, class-stratified 70/10/20 split; the test metrics are those of the exported model)::

    python examples/lightning_busi_multiclass.py --root ../shared/data/Dataset_BUSI_with_GT --epochs 10 \\
        --img-size 128 --out runs/lightning-busi3
    python examples/lightning_busi_multiclass.py --root ../shared/data/Dataset_BUSI_with_GT --epochs 10 \\
        --img-size 128 --out runs/lightning-busi3-plain --no-adst
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import segmentation_models_pytorch as smp
import torch

from adst_examples.data import BUSI3Dataset
from adst_examples.lightning_busi import BUSIModel, RecipeResult, build_parser
from adst_examples.lightning_busi import main as train_recipe

__all__ = ["BUSIMulticlassModel", "main"]


class BUSIMulticlassModel(BUSIModel):
    """The multiclass tutorial's module: ``out_classes`` softmax classes, masks of class indices."""

    mode = smp.losses.MULTICLASS_MODE

    def shared_step(self, batch: Sequence[torch.Tensor], stage: str) -> dict[str, torch.Tensor]:
        image, mask = batch
        assert image.ndim == 4  # (B, C, H, W)
        mask = mask.long()
        assert mask.ndim == 3  # (B, H, W) class indices
        h, w = image.shape[2:]
        assert h % 32 == 0 and w % 32 == 0  # smp encoders downsample by 32

        logits_mask = self.forward(image)
        num_classes = self.hparams.out_classes
        assert logits_mask.shape[1] == num_classes  # (B, number_of_classes, H, W)
        logits_mask = logits_mask.contiguous()
        loss = self.loss_fn(logits_mask, mask)
        prob_mask = logits_mask.softmax(dim=1)
        pred_mask = prob_mask.argmax(dim=1)
        tp, fp, fn, tn = smp.metrics.get_stats(pred_mask, mask, mode="multiclass", num_classes=num_classes)
        self.log(f"{stage}_loss", loss, prog_bar=stage != "test", on_step=False, on_epoch=True, sync_dist=True)
        self.step_outputs[stage].append({"tp": tp, "fp": fp, "fn": fn, "tn": tn})
        return {"loss": loss, "tp": tp, "fp": fp, "fn": fn, "tn": tn}


def main(argv: Sequence[str] | None = None) -> RecipeResult:
    """Train on BUSI as three classes with the binary recipe's runner (its four ADST lines), export, test."""
    parser = build_parser()
    parser.description = __doc__.split("\n\n")[0]
    parser.set_defaults(arch="FPN", out="runs/lightning-busi3")  # smp's multiclass tutorial trains an FPN
    return train_recipe(argv, parser=parser, module_cls=BUSIMulticlassModel, dataset_cls=BUSI3Dataset)


if __name__ == "__main__":
    result = main()
    print(json.dumps(result.metrics, indent=2))
