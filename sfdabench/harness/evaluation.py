"""Evaluation: predict the test slices, rebuild volumes, score every (case, organ) with every metric.

Aggregation follows the protocol (spec 6.3): a per-organ score is the mean over test volumes, the overall
score the mean of the organ means. NaN values (undefined under the metric's empty-mask policy, e.g. an
organ absent from a case's ground truth and prediction) are left out of the means and counted.
"""
from __future__ import annotations

from typing import Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn

from sfdabench.api import Case, Metric, SliceDataset
from sfdabench.blocks.training import predict


def score_volumes(predictions: Sequence[np.ndarray], cases: Sequence[Case], organs: Sequence[str],
                  metrics: Mapping[str, Metric]) -> pd.DataFrame:
    """Per-case metrics as a long table: one row per (case, organ) with one column per metric."""
    rows = []
    for pred, case in zip(predictions, cases):
        if pred.shape != case.label.shape:
            raise ValueError(f"prediction shape {pred.shape} != label shape {case.label.shape} for {case.case_id}")
        for k, organ in enumerate(organs, start=1):
            p, g = pred == k, case.label == k
            row = {"case": case.case_id, "organ": organ, "gt_voxels": int(g.sum()), "pred_voxels": int(p.sum())}
            for name, metric in metrics.items():
                row[name] = float(metric(p, g, case.spacing))
            rows.append(row)
    return pd.DataFrame(rows)


def summarise(per_case: pd.DataFrame, organs: Sequence[str], metric_names: Sequence[str]) -> pd.DataFrame:
    """Per-organ means over cases plus a ``mean`` row (mean of organ means); ``n_<metric>`` counts values."""
    grouped = per_case.groupby("organ", sort=False)
    table = grouped[list(metric_names)].mean()
    counts = grouped[list(metric_names)].count().add_prefix("n_")
    table = table.join(counts).reindex(list(organs))
    mean = table[list(metric_names)].mean(axis=0)
    mean_counts = table[[f"n_{m}" for m in metric_names]].sum(axis=0)
    table.loc["mean"] = pd.concat([mean, mean_counts])
    table.index.name = "organ"
    return table


def evaluate(model: nn.Module, cases: Sequence[Case], organs: Sequence[str], metrics: Mapping[str, Metric], *,
             device: torch.device, batch_size: int = 16, progress: Callable | None = None,
             predictions: list | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Predict every slice of ``cases`` and score; returns (per-case table, per-organ summary). The predicted
    label volumes are appended to ``predictions`` when a list is given (the run folder keeps them)."""
    preds = predict(model, SliceDataset(cases, labels=False), device=device, batch_size=batch_size,
                    progress=progress, desc="evaluate")["label"]
    if predictions is not None:
        predictions.extend(preds)
    per_case = score_volumes(preds, cases, organs, metrics)
    return per_case, summarise(per_case, organs, list(metrics))


def dice_per_organ(predictions: Sequence[np.ndarray], labels: Sequence[np.ndarray], organs: Sequence[str]
                   ) -> dict[str, float]:
    """Mean 3D Dice per organ (and ``mean``) of label volumes: the pseudo-label quality diagnostic. Per volume
    the Dice metric itself (:class:`sfdabench.metrics.dice.Dice`; an organ absent from both volumes is NaN and
    left out of the mean, as in the rows)."""
    from sfdabench.metrics.dice import Dice

    dice, unit = Dice(), (1.0, 1.0, 1.0)   # Dice does not use the spacing
    out = {}
    for k, organ in enumerate(organs, start=1):
        scores = [dice(p == k, g == k, unit) for p, g in zip(predictions, labels)]
        scores = [v for v in scores if not np.isnan(v)]
        out[organ] = float(np.mean(scores)) if scores else float("nan")
    out["mean"] = float(np.nanmean([out[o] for o in organs])) if organs else float("nan")
    return out


def quality_by_slice_group(predictions: Sequence[np.ndarray], labels: Sequence[np.ndarray],
                           organs: Sequence[str], groups: Mapping[str, Sequence[Sequence[str]]]
                           ) -> dict[str, dict[str, dict[str, float]]]:
    """Pseudo-label quality of each organ on the slices of each group (e.g. the box-search outcome that
    labelled the organ on that slice): ``{organ: {group: {slices, gt_pixels, pixels, recall, precision,
    dice}}}``, pixels pooled over the group's slices. ``groups[organ][case][z]`` names the group of slice z
    of a case (in ``predictions`` order). Recall/precision are NaN where their denominator is 0; Dice is NaN
    when both masks are empty on all the group's slices."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for k, organ in enumerate(organs, start=1):
        if organ not in groups:
            continue
        tallies: dict[str, np.ndarray] = {}
        for p, g, names in zip(predictions, labels, groups[organ]):
            a, b = (p == k).reshape(len(p), -1), (g == k).reshape(len(g), -1)
            per_slice = np.stack([np.ones(len(p)), (a & b).sum(1), a.sum(1), b.sum(1)], axis=1)
            for z, name in enumerate(names):
                tallies.setdefault(str(name), np.zeros(4))
                tallies[str(name)] += per_slice[z]
        out[organ] = {}
        for name, (n, tp, pixels, gt) in sorted(tallies.items()):
            out[organ][name] = {"slices": int(n), "gt_pixels": int(gt), "pixels": int(pixels),
                                "recall": float(tp / gt) if gt else float("nan"),
                                "precision": float(tp / pixels) if pixels else float("nan"),
                                "dice": float(2 * tp / (gt + pixels)) if gt + pixels else float("nan")}
    return out


def label_confusion(predictions: Sequence[np.ndarray], labels: Sequence[np.ndarray], organs: Sequence[str]
                    ) -> dict[str, dict[str, float]]:
    """Where each ground-truth class went: ``{gt_class: {predicted_class: fraction of gt_class voxels}}`` over
    all volumes (rows sum to 1; ``background`` included). Twin-organ swaps (right kidney labelled left kidney)
    and missed organs (mass on ``background``) show up here, not in a Dice."""
    names = ["background", *organs]
    k = len(names)
    counts = np.zeros((k, k), dtype=np.int64)
    for p, g in zip(predictions, labels):
        counts += np.bincount(g.astype(np.int64).ravel() * k + p.astype(np.int64).ravel(),
                              minlength=k * k).reshape(k, k)
    totals = counts.sum(axis=1, keepdims=True)
    fractions = np.divide(counts, totals, out=np.full(counts.shape, np.nan), where=totals > 0)
    return {names[i]: {names[j]: float(fractions[i, j]) for j in range(k)} for i in range(k)}


def confusion_highlights(confusion: Mapping[str, Mapping[str, float]], threshold: float = 0.1) -> list[str]:
    """Off-diagonal flows of at least ``threshold`` of an organ's voxels, e.g. ``right_kidney->left_kidney 0.96``
    (``->background`` is a missed organ)."""
    out = []
    for gt, row in confusion.items():
        if gt == "background":
            continue
        for pred, value in sorted(row.items(), key=lambda kv: -kv[1]):
            if pred != gt and value == value and value >= threshold:
                out.append(f"{gt}->{pred} {value:.2f}")
    return out
