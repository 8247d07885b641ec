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
``cp``, and ``stop_after_fa`` (the "FA only" row). The variant name lists them, e.g. ``fa+dbs+cp``. Box-search
options away from their defaults append a token, in this order: ``+ltol`` (``search.tolerance_scaling:
length``), ``+reach`` (``search.steps_scaling: reach``; both for tbs/mbs/dbs only, naive uses neither) and
``+grow1`` (``search.mbs_max_growth: 1``), ``+cover-pred50`` / ``+cover-region80`` (``search.min_coverage`` of
``search.coverage_of``) and ``+guard-side`` /
``+guard-seed`` (``search.twin_guard``), e.g. ``fa+dbs+cp+ltol+guard-side``.
"""
from __future__ import annotations

from torch import nn

from sfdabench.api import Case, Context, Method, SliceDataset, TargetImages
from sfdabench.training import predict_target, train_supervised

from .feature_aggregation import feature_aggregation
from .postprocess import connectivity_postprocess
from .pseudo_labels import refine_pseudo_labels


#: (search setting, default, value -> variant-name token) in name order; "" for the default value.
_SEARCH_OPTION_TOKENS = (
    ("tolerance_scaling", "area", {"area": "", "length": "ltol"}),
    ("steps_scaling", "fixed", {"fixed": "", "reach": "reach"}),
    ("twin_guard", "none", {"none": "", "side": "guard-side", "seed": "guard-seed"}),
)


def _growth_token(search) -> list[str]:
    """["grow1"] for mbs_max_growth 1, [] when off (the paper)."""
    growth = float(search.get("mbs_max_growth", 0.0))
    return [f"grow{growth:g}"] if growth else []


def _coverage_token(search) -> list[str]:
    """["cover-pred50"] for min_coverage 0.5 of the prediction, [] when off (the paper)."""
    fraction = float(search.get("min_coverage", 0.0))
    if not fraction:
        return []
    percent = round(fraction * 100)
    if abs(percent - fraction * 100) > 1e-9 or not 1 <= percent <= 100:
        raise ValueError(f"search.min_coverage={fraction} cannot be named in the variant; use a whole "
                         f"percentage between 0.01 and 1")
    of = str(search.get("coverage_of", "region"))
    if of not in ("region", "prediction"):
        raise ValueError(f"search.coverage_of={of!r} unknown; use one of region, prediction")
    return [f"cover-{'pred' if of == 'prediction' else 'region'}{percent}"]


class DFG(Method):
    """DFG (Huai et al., IEEE TMI 2025): feature aggregation, dual-feature-guided SAM box search, CP, retraining."""

    name = "dfg"

    @property
    def uses_sam(self) -> bool:  # the "FA only" ablation never prompts SAM
        return not self.cfg["stop_after_fa"]

    def variant(self) -> str:
        fa = "fa" if self.cfg["fa"]["enabled"] else "nofa"
        if fa == "fa" and self.cfg["fa"].get("prior", "uniform") == "source_prediction":
            fa = "fa-srcprior"          # the paper's uniform prior adds nothing to the name
        if self.cfg["stop_after_fa"]:
            return f"{fa}-only"
        search = self.cfg["search"]
        parts = [fa, search["search"]]
        if search["search"] in ("mbs", "dbs") and not search["stage3"]:
            parts.append("nos3")
        parts.append("cp" if self.cfg["cp"] else "nocp")
        # the defaults add nothing, so the names of the paper's variants never change
        tokens = _SEARCH_OPTION_TOKENS if search["search"] != "naive" else _SEARCH_OPTION_TOKENS[-1:]
        for key, default, names in tokens:
            if key == "twin_guard" and search["search"] != "naive":
                parts.extend(_growth_token(search) + _coverage_token(search))   # these precede the guard's
            value = str(search.get(key, default))
            if value not in names:
                raise ValueError(f"search.{key}={value!r} unknown; use one of {', '.join(names)}")
            if names[value]:
                parts.append(names[value])
        return "+".join(parts)

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
            context.compare_with_box_ceiling("sam", margin=labels.stats["scaled_settings"]["box_margin"],
                                             classes_from="target_model")
        pseudo = labels.refined
        if self.cfg["cp"]:
            with context.phase("cp"):
                pseudo = [connectivity_postprocess(v, context.num_classes) for v in pseudo]
            context.pseudo_label_quality("cp", pseudo)

        cases = [Case(cid, target_train.volume(i), pseudo[i], target_train.spacings[i])
                 for i, cid in enumerate(target_train.case_ids)]
        with context.phase("retrain"):
            train_supervised(model, SliceDataset(cases, labels=True), self.cfg["retrain"], device=context.device,
                             generator=context.generator(offset=2), progress=context.progress, desc="retraining")
        return model
