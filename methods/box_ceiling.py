"""``box_ceiling``: SAM prompted with the ground-truth box of every organ, then retraining. NOT source-free.

A diagnostic, not a method to rank: it answers "how good could box-prompted pseudo-labels be with this SAM
backend, and how far would retraining on them get?" Per target-train slice and organ present in the
*ground truth*, one box around the organ (``box_margin`` pixels wider, the margin DFG's search uses; scaled
with the slice side from ``reference_size``) goes to ``context.sam``; the masks are merged as DFG merges
its classes (``merge_scores``, see :mod:`sfdabench.sam.ceiling`). The source model is then retrained on these
pseudo-labels with the recipe ``recipe`` names: ``dfg`` (default), DFG's retraining (spec 6.1: Dice loss, Adam 1e-4, x0.8;
no FA before it), or ``source``, the source model's recipe, which ``oracle`` uses on the true labels. With
both recipes on both methods, the table separates label quality (GT-box SAM labels vs true labels) from the
recipe. Its pseudo-label Dice (``pseudo_label_dice/gt_box``) is the ceiling that DFG's box search is
compared with.

It reads target-train labels (``uses_target_labels = True``): its rows carry ``sfda = False`` and the
leaderboard never ranks them, like the oracle's.
"""
from __future__ import annotations

from torch import nn

from sfdabench.api import Context, Method, TargetImages
from sfdabench.hookspecs import hookimpl
from sfdabench.sam.ceiling import gt_box_pseudo_labels
from sfdabench.sam.masks import scale_pixels
from sfdabench.blocks.self_training import train_on_pseudo_labels
from sfdabench.blocks.training import training_recipe


class BoxCeiling(Method):
    """Ceiling of box prompting: SAM with ground-truth boxes, then retraining (uses target labels)."""

    name = "box_ceiling"
    stage_labels = {"gt_box": "PL (GT boxes)"}
    uses_target_labels = True
    uses_sam = True

    def __init__(self, cfg):
        super().__init__(cfg)
        self.recipe_name, self.recipe = training_recipe(cfg)

    def variant(self) -> str:
        return "gt-box" if self.recipe_name == "dfg" else f"gt-box+{self.recipe_name}-recipe"

    def adapt(self, source_model: nn.Module, target_train: TargetImages, context: Context) -> nn.Module:
        size = tuple(target_train.shapes[0][1:])
        margin = scale_pixels(self.cfg["box_margin"], size, self.cfg["reference_size"], "length")
        labels = context.target_train_labels()
        with context.phase("gt_box_pseudo_labels"):
            pseudo, stats = gt_box_pseudo_labels(
                context.sam, [target_train.volume(i) for i in range(len(target_train.case_ids))], labels,
                context.organs, margin, tuple(map(float, self.cfg["merge_scores"])), context.progress)
        context.record("box_ceiling", stats)
        context.pseudo_label_quality("gt_box", pseudo)
        with context.phase("retrain"):
            losses = train_on_pseudo_labels(source_model, target_train, pseudo, self.recipe, context,
                                            generator=context.generator(2), desc="retraining")
        context.record("retrain_loss", {"first": losses[0], "last": losses[-1]} if losses else {})
        return source_model


@hookimpl
def sfdabench_methods():
    return [BoxCeiling]
