"""DFG phase 2 over the target-train split: SAM-refined pseudo-labels for every slice (spec 4.1).

The post-FA model (eval mode, no augmentation) gives per-slice features and probabilities; the SAM backend
embeds each slice once (cached on disk by the harness); the box search turns both into a pseudo-label.
Slices are streamed batch by batch, so memory does not grow with the dataset (full-size features of a
real CT training set would not fit in RAM).
"""
from __future__ import annotations

import collections
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn

from sfdabench.api import Context, TargetImages

from .box_search import BoxSearchConfig, SliceResult, search_slice


@dataclass
class PseudoLabels:
    """Per-case label volumes (in TargetImages order) and what the search did."""

    target_model: list[np.ndarray]          # argmax of the model the search started from
    refined: list[np.ndarray]               # merged box-search pseudo-labels
    stats: dict[str, Any] = field(default_factory=dict)
    #: organ -> case -> slice -> how the search labelled it ("absent", "fallback", "guarded", "sam:<stage>")
    outcome_of_slice: dict[str, list[list[str]]] = field(default_factory=dict)


def figure_slices(total: int, count: int) -> set[int]:
    """Evenly spread dataset indices of the slices that get box-search figures."""
    if count <= 0 or total == 0:
        return set()
    return {int(i) for i in np.linspace(0, total - 1, min(count, total)).round()}


@torch.no_grad()
def refine_pseudo_labels(model: nn.Module, target_train: TargetImages, search_cfg: Mapping[str, Any],
                         context: Context, *, batch_size: int = 8, figures: int = 0) -> PseudoLabels:
    model.eval().to(context.device)
    sam = context.sam
    shapes = target_train.shapes
    raw = [np.zeros(s, dtype=np.uint8) for s in shapes]
    refined = [np.zeros(s, dtype=np.uint8) for s in shapes]
    cfg = BoxSearchConfig.from_cfg(search_cfg, shapes[0][1:], organs=context.organs)
    draw = figure_slices(len(target_train), figures)
    outcomes: dict[str, collections.Counter] = {o: collections.Counter() for o in context.organs}
    outcome_of_slice = {o: [[""] * s[0] for s in shapes] for o in context.organs}
    totals = collections.Counter()
    seconds = collections.Counter()
    thresholds: dict[str, list[float]] = {o: [] for o in context.organs}   # MBS threshold per organ and slice
    data = torch.utils.data.DataLoader(target_train, batch_size=batch_size, shuffle=False, num_workers=0)
    index = 0
    for batch in context.progress(data, desc=f"box search ({cfg.search})"):
        features, logits = model(batch["image"].to(context.device))
        probs = logits.softmax(1).float().cpu()
        features = features.float().cpu()
        for i, (ci, z) in enumerate(zip(batch["case_index"].tolist(), batch["slice_index"].tolist())):
            image = target_train.volume(ci)[z]
            start = time.perf_counter()
            embedding = sam.embed(image)
            seconds["sam_embed"] += time.perf_counter() - start
            start = time.perf_counter()
            result = search_slice(features[i], probs[i], sam, embedding, cfg, decode_cache={})
            seconds["search"] += time.perf_counter() - start
            raw[ci][z] = probs[i].argmax(0).numpy().astype(np.uint8)
            refined[ci][z] = result.pseudo_label
            _count(result, context.organs, outcomes, totals)
            for c, trace in result.classes.items():
                outcome_of_slice[context.organs[c - 1]][ci][z] = outcome_key(trace)
                if trace.mbs_threshold is not None:
                    thresholds[context.organs[c - 1]].append(trace.mbs_threshold)
            if index in draw:
                _save_figures(context.run_dir / "figures", image, result, context.organs,
                              figure_stem(target_train.case_ids[ci], z))
            index += 1
    stats = {
        "search": cfg.search, "stage3": cfg.stage3, "slices": index,
        "mbs_cap": cfg.mbs_cap, "mbs_max_growth": cfg.mbs_max_growth,
        # how often MBS's threshold is the cap: where it always is, the cap, not the mask's spread, sets the region
        "mbs_threshold": {organ: {"median": float(np.median(v)), "at_cap": float(np.mean(np.isclose(v, cfg.mbs_cap))),
                                  "slices": len(v)} for organ, v in thresholds.items() if v},
        "tolerance_scaling": cfg.tolerance_scaling, "steps_scaling": cfg.steps_scaling,
        "twin_guard": cfg.twin_guard,
        "merge_scores": {"background": cfg.score_background, "sam": cfg.score_sam, "fallback": cfg.score_fallback},
        "scaled_settings": {**{n: getattr(cfg, n) for n in cfg._PIXEL_COUNTS + cfg._LENGTHS},
                            "max_steps": dict(zip(context.organs, cfg.max_steps))},
        "outcomes": {organ: dict(c) for organ, c in outcomes.items()},
        "decoder_calls": totals["decoder_calls"], "decoder_cache_hits": totals["cache_hits"],
        "decoder_calls_per_slice": totals["decoder_calls"] / max(index, 1),
        "seconds": dict(seconds),
    }
    return PseudoLabels(raw, refined, stats, outcome_of_slice)


def outcome_key(trace) -> str:
    """"absent" | "fallback" | "guarded" (a fallback because the twin guard refused SAM's mask) | "sam:<stage>"."""
    return "guarded" if trace.guard else trace.outcome if trace.outcome != "sam" else f"sam:{trace.stage}"


def _count(result: SliceResult, organs, outcomes, totals) -> None:
    for c, trace in result.classes.items():
        outcomes[organs[c - 1]][outcome_key(trace)] += 1
    totals["decoder_calls"] += result.decoder_calls
    totals["cache_hits"] += result.cache_hits


def figure_stem(case_id: str, z: int) -> str:
    """A flat file stem for one slice: case ids of combined tasks are '<part>/<case>' and must not nest folders."""
    return f"{case_id.replace('/', '_')}_z{z:03d}"


def _save_figures(folder: Path, image: np.ndarray, result: SliceResult, organs, stem: str) -> None:
    from .figures import save_search_figure

    folder.mkdir(parents=True, exist_ok=True)
    for c, trace in result.classes.items():
        if trace.steps:
            save_search_figure(folder / f"{stem}_{organs[c - 1]}.png", image, result, c, organs[c - 1])
