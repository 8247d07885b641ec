"""Calibrate DFG's MBS distance cap on the labelled *source* domain.

    python -m sfdabench_methods.dfg.calibrate task=<task> [seed=0] [every=2] [caps=[0.15,0.2,...]] [overrides]

Why: MBS grows a region through the pixels whose SAM-feature cosine distance to the mask's centroid is below
``min(mbs_multiplier x mean in-mask distance, mbs_cap)``. The spec's cap, 0.35, is a distance in MedSAM ViT-B's
feature space on 256x256 CT; our backend (LiteMedSAM), resolution and images differ, and where the cap is too
loose the allowed region spreads past the organ, MBS's box follows it and SAM's mask leaks (measured on the
96 px phantom: a liver of 610 px ended as a 3027 px mask; the liver's pseudo-label Dice fell from 0.90 before SAM
to 0.72 after it).

What it measures, per cap, on every ``every``-th slice of the source *test* split (a validation set the source
model was not trained on) with its ground truth. Source labels are legal here: the source side of SFDA is
labelled; no target label is read, and the target is never looked at.

* ``region``: Dice between each organ and MBS's allowed region around it (the 8-connected components of
  ``distance < min(multiplier x mean in-organ distance, cap)`` that touch the organ, centroid from the organ's
  ground truth). Needs no model.
* ``outside``: the share of the slice's non-organ pixels under that threshold (anywhere, connected or not): how
  well the SAM backend's features separate the organ from the rest. Measured with LiteMedSAM at cap 0.35:
  0.07-0.21 on the phantom's MR, 0.01-0.08 on the real CHAOS MR of the sample data (README "The MBS distance
  cap"); where it is large the cap, not the mask's spread, sets MBS's region (``search.mbs_max_growth``).
* ``search``: pseudo-label Dice of the task's whole box search (DFG's search settings of the composed config, with
  ``mbs_cap`` set) prompted from the source model's own predictions on those slices.

The calibrated value is the largest cap whose mean ``search`` Dice is within 0.01 of the best (``best_cap``); run
it with ``method.search.mbs_cap=<value>``. Measured on the phantom tasks (README, "The MBS distance cap"): it
picks 0.15 / 0.2, which left the target pseudo-labels about where the spec's 0.35 has them and lowered DFG's
test Dice, so dfg.yaml keeps 0.35. A diagnostic of how a SAM backend's feature space fits a domain, not a
default. Writes ``<results_dir>/calibration/<task>_mbs_cap.csv``.
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from scipy import ndimage

from sfdabench.api import SliceDataset
from sfdabench.harness.evaluation import dice_per_organ
from sfdabench.blocks.training import predict

from .box_search import BoxSearchConfig, centroid_distance, mbs_threshold, sam_feature_map, search_slice

log = logging.getLogger("sfdabench")

DEFAULT_CAPS = (0.15, 0.2, 0.25, 0.3, 0.35)
TIE_TOLERANCE = 0.01    # mean Dice; see best_cap
MIN_ORGAN_PIXELS = 30      # organs smaller than this on a slice say little about a region's spread


def allowed_region_dice(distance: np.ndarray, organ: np.ndarray, multiplier: float, cap: float) -> float:
    """Dice of ``organ`` (bool H, W) and MBS's allowed region around it: the 8-connected components of
    ``distance < min(multiplier x mean in-organ distance, cap)`` that touch the organ. ``distance``: MBS's
    ``centroid_distance`` map with the organ's centroid."""
    allowed = distance < mbs_threshold(distance, organ, multiplier, cap)
    components, _ = ndimage.label(allowed, structure=np.ones((3, 3)))
    touching = np.unique(components[organ & allowed])
    region = np.isin(components, touching[touching > 0])
    return float(2 * (region & organ).sum() / (region.sum() + organ.sum()))


def outside_share(distance: np.ndarray, organ: np.ndarray, multiplier: float, cap: float) -> float:
    """Share of the non-organ pixels with ``distance < min(multiplier x mean in-organ distance, cap)``."""
    return float((distance[~organ] < mbs_threshold(distance, organ, multiplier, cap)).mean())


def calibrate(cases: Sequence, model: torch.nn.Module, sam, organs: Sequence[str], search_cfg: Mapping[str, Any],
              caps: Sequence[float] = DEFAULT_CAPS, every: int = 1,
              device: torch.device = torch.device("cpu")) -> pd.DataFrame:
    """One row per cap and measure: ``cap``, ``measure`` (region | outside | search), one column per organ and
    ``mean``, over every ``every``-th slice of the labelled source ``cases``. ``search`` is the Dice of all those slices pooled."""
    predicted = predict(model, SliceDataset(cases, labels=False), device=device, want=("probs", "features"))
    picked = [(ci, z) for ci, case in enumerate(cases) for z in range(case.num_slices)][::every]
    multiplier = float(search_cfg.get("mbs_multiplier", 2.5))
    region: dict[float, dict[str, list[float]]] = {cap: {o: [] for o in organs} for cap in caps}
    outside: dict[float, dict[str, list[float]]] = {cap: {o: [] for o in organs} for cap in caps}
    pseudo: dict[float, list[np.ndarray]] = {cap: [] for cap in caps}
    for ci, z in picked:
        image, label = cases[ci].image[z], cases[ci].label[z]
        embedding = sam.embed(image)
        features = sam_feature_map(sam, embedding, label.shape)
        for k, organ in enumerate(organs, 1):
            if (label == k).sum() >= MIN_ORGAN_PIXELS:
                distance = centroid_distance(features, label == k)
                for cap in caps:
                    region[cap][organ].append(allowed_region_dice(distance, label == k, multiplier, cap))
                    outside[cap][organ].append(outside_share(distance, label == k, multiplier, cap))
        probs = torch.from_numpy(predicted["probs"][ci][z])
        target_features = torch.from_numpy(predicted["features"][ci][z])
        for cap in caps:
            cfg = BoxSearchConfig.from_cfg({**search_cfg, "mbs_cap": cap}, label.shape, organs=list(organs))
            pseudo[cap].append(search_slice(target_features, probs, sam, embedding, cfg, decode_cache={}).pseudo_label)
    labels = [np.stack([cases[ci].label[z] for ci, z in picked])]
    rows = []
    for cap in caps:
        for measure, values in (("region", region[cap]), ("outside", outside[cap])):
            by_organ = {o: float(np.mean(v)) if v else float("nan") for o, v in values.items()}
            rows.append({"cap": cap, "measure": measure, **by_organ,
                         "mean": float(np.nanmean(list(by_organ.values())))})
        rows.append({"cap": cap, "measure": "search", **dice_per_organ([np.stack(pseudo[cap])], labels,
                                                                        list(organs))})
    return pd.DataFrame(rows)


def best_cap(table: pd.DataFrame, tolerance: float = TIE_TOLERANCE) -> float:
    """The largest cap whose mean search Dice is within ``tolerance`` of the best one: differences that small
    are below what a few dozen slices can tell apart, and the larger cap is the paper's side."""
    search = table[table["measure"] == "search"]
    best = search["mean"].max()
    return float(search[search["mean"] >= best - tolerance - 1e-12]["cap"].max())


def main(argv: Sequence[str] | None = None) -> int:
    from omegaconf import OmegaConf

    from sfdabench.harness import source_model
    from sfdabench.api import SfdaBenchError
    from sfdabench.harness.config import compose_run_config
    from sfdabench.harness.plugins import get_registry
    from sfdabench.harness.protocol import _build_sam, build_metrics, load_task, resolve_device

    args = list(sys.argv[1:] if argv is None else argv)
    every, caps, overrides = 2, list(DEFAULT_CAPS), []
    for arg in args:
        key, _, value = arg.partition("=")
        if key == "every":
            every = int(value)
        elif key == "caps":
            caps = [float(v) for v in value.strip("[]").split(",") if v.strip()]
        else:
            overrides.append(arg)
    if every < 1 or not caps:
        print("error: every must be >= 1 and caps a non-empty list, e.g. caps=[0.2,0.35]", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s %(name)s %(levelname)s] %(message)s",
                        datefmt="%H:%M:%S")
    try:
        cfg = compose_run_config(["method=dfg", *overrides])
        OmegaConf.resolve(cfg)
        torch.set_num_threads(int(cfg.num_threads))
        registry = get_registry()
        device = resolve_device(str(cfg.device))
        cache = Path(cfg.cache_dir)
        task = load_task(cfg.task, registry, cache)
        source_cfg = OmegaConf.to_container(cfg.source)
        checkpoint = source_model.train_or_load(task, source_cfg, int(cfg.seed), device, cache,
                                                build_metrics(OmegaConf.to_container(cfg.metrics), registry),
                                                progress=None)
        sam = _build_sam(cfg.sam, registry, device, cache)
    except SfdaBenchError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    cases = task.source.splits["test"]
    log.info("calibrating mbs_cap on every %d. slice of the %d source-test cases of %s, caps %s", every, len(cases),
             task.name, caps)
    table = calibrate(cases, checkpoint.model, sam, list(task.organs), OmegaConf.to_container(cfg.method.search),
                      caps, every, device)
    out = Path(cfg.results_dir) / "calibration" / f"{task.name}_mbs_cap.csv"
    out.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(out, index=False)
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print(f"calibrated mbs_cap for {task.name}: {best_cap(table):g} (the largest cap within {TIE_TOLERANCE} of the "
          f"best mean search Dice); table: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
