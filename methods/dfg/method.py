"""DFG: SAM-based SFDA via dual-feature-guided auto-prompting.

Huai et al., "SAM-based Source-Free Domain Adaptation for Medical Image Segmentation via Dual Feature
Guided Auto-Prompting", IEEE Transactions on Medical Imaging, 2025 (arXiv 2505.08527).

Phases (each its own module of this package, spec sections 3-6):
1. ``feature_aggregation``: align target features to the frozen classifier prototypes.
2. ``pseudo_labels`` + ``box_search``: per slice and class, grow a SAM box prompt guided by target
   features (TBS) and SAM features (MBS) until SAM's mask is stable; merge classes.
3. ``postprocess``: keep the largest 3D component per class of each target-train volume (CP).
4. retraining: the FA model, classifier unfrozen, on the refined pseudo-labels with the Dice loss.

Protocol notes: the released code picked the FA checkpoint by target test Dice; here every phase runs a
fixed budget and the last model is returned (``selection = last``). Ground truth of the target-train split
is only *measured* (pseudo-label Dice before SAM, after SAM, after CP, and the ground-truth-box ceiling of
the SAM backend with the search's box margin, ``box_ceiling: true``) and never reaches a decision.

Ablation switches (config): ``fa.enabled``, ``search.search`` (naive | tbs | mbs | dbs), ``search.stage3``,
``cp``, and ``stop_after_fa`` (the "FA only" row), plus sfdabench's box-search options. The variant name lists
them, e.g. ``fa+dbs+cp`` or ``fa+dbs+cp+ltol+guard-side`` (grammar and grids: ``variants``).
"""
from __future__ import annotations

from torch import nn

from sfdabench.api import Context, Method, TargetImages
from sfdabench.blocks.training import predict_target, train_supervised

from .feature_aggregation import feature_aggregation
from .postprocess import connectivity_postprocess
from .pseudo_labels import refine_pseudo_labels
from .variants import DfgAblation, variant_name


class DFG(Method):
    """DFG (Huai et al., IEEE TMI 2025): feature aggregation, dual-feature-guided SAM box search, CP, retraining."""

    name = "dfg"
    stage_labels = {"source_model": "PL of the source model", "target_model": "PL before SAM",
                    "sam": "PL after SAM", "cp": "PL after CP"}
    ablation = DfgAblation()

    @property
    def uses_sam(self) -> bool:  # the "FA only" ablation never prompts SAM
        return not self.cfg["stop_after_fa"]

    def variant(self) -> str:
        return variant_name(self.cfg)

    def adapt(self, source_model: nn.Module, target_train: TargetImages, context: Context) -> nn.Module:
        model = source_model
        if self.cfg["fa"]["enabled"]:
            # measured only: the source model's labels, so the summary shows what FA did to each class
            # ("target_model" below is the FA model's)
            context.pseudo_label_quality("source_model", predict_target(model, target_train, context)["label"])
            with context.phase("feature_aggregation"):
                losses = feature_aggregation(model, target_train, self.cfg["fa"], context)
            context.record("fa_loss", {"first": losses[0], "last": losses[-1]} if losses else {})
        if self.cfg["stop_after_fa"]:
            if self.cfg["fa"]["enabled"]:    # measured only: the FA model's labels, against the source model's
                context.pseudo_label_quality("target_model", predict_target(model, target_train, context)["label"])
            return model

        with context.phase("box_search"):
            labels = refine_pseudo_labels(model, target_train, self.cfg["search"], context,
                                          batch_size=int(self.cfg["predict_batch_size"]),
                                          figures=int(self.cfg["figures"]))
        context.record("box_search", labels.stats)
        context.pseudo_label_quality("target_model", labels.target_model)
        context.pseudo_label_quality("sam", labels.refined)
        # per search outcome: what SAM did to the slices each outcome labelled, against the prediction it started from
        context.pseudo_label_quality_by_group("target_model", labels.target_model, labels.outcome_of_slice)
        context.pseudo_label_quality_by_group("sam", labels.refined, labels.outcome_of_slice)
        if self.cfg["box_ceiling"]:  # diagnostic: the harness measures, with labels this method never sees
            merge = labels.stats["merge_scores"]   # the search's own merge, minus the fallback (it needs a prediction)
            context.box_prompt_ceiling("sam", margin=labels.stats["scaled_settings"]["box_margin"],
                                       scores=(merge["background"], merge["sam"]), classes_from="target_model")
        pseudo = labels.refined
        if self.cfg["cp"]:
            with context.phase("cp"):
                pseudo = [connectivity_postprocess(v, context.num_classes) for v in pseudo]
            context.pseudo_label_quality("cp", pseudo)

        with context.phase("retrain"):
            train_supervised(model, target_train.labelled(pseudo), self.cfg["retrain"], device=context.device,
                             generator=context.generator(offset=2), progress=context.progress, desc="retraining")
        return model
