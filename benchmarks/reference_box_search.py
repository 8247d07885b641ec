"""A straightforward reference implementation of DFG's box search (spec 4.3-4.4), for tests and benchmarks.

Written the obvious way, as the original code does it: per-pixel Python loops build the neighbour tables, the
region grows by looping over its pixels' neighbour lists, and SAM is decoded at every step (no memo). It
shares no search logic with ``sfdabench_methods.dfg.box_search``; only ``largest_contour`` (sfdabench.sam.masks) and the config
dataclass are imported. It follows the same documented choices (no border quirk, float64 cosines, missing
masks never stable, naive box with the usual margin) so the two must agree pixel for pixel.
"""
from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


def _ensure_methods_package() -> None:
    """Make ``sfdabench_methods`` importable from the work tree when the project is not installed yet."""
    try:
        import sfdabench_methods  # noqa: F401
    except ModuleNotFoundError:
        root = Path(__file__).resolve().parents[1]
        sys.path.insert(0, str(root))          # for ``sfdabench`` itself
        spec = importlib.util.spec_from_file_location("sfdabench_methods", root / "methods" / "__init__.py",
                                                      submodule_search_locations=[str(root / "methods")])
        module = importlib.util.module_from_spec(spec)
        sys.modules["sfdabench_methods"] = module
        spec.loader.exec_module(module)


_ensure_methods_package()

from sfdabench.sam.masks import largest_contour  # noqa: E402
from sfdabench_methods.dfg.box_search import BoxSearchConfig  # noqa: E402


def reference_search_slice(target_features, probs, sam, embedding, cfg: BoxSearchConfig):
    """Returns (pseudo_label uint8 (H, W), {class: (outcome, stage)}, number of decoder calls)."""
    probs = np.asarray(probs.detach().cpu(), dtype=np.float64)
    num_classes, height, width = probs.shape
    prediction = np.argmax(probs, axis=0)
    radius = cfg.affinity_radius
    decoder_calls = [0]

    # ---- neighbour offsets, both directions
    offsets = []
    for dy in range(-radius + 1, radius):
        for dx in range(-radius + 1, radius):
            if 0 < dy * dy + dx * dx < radius * radius:
                offsets.append((dy, dx))

    # ---- geometric neighbour table: pixel index -> list of neighbour pixel indices
    geometric = []
    for y in range(height):
        for x in range(width):
            row = []
            for dy, dx in offsets:
                ny, nx = y + dy, x + dx
                if 0 <= ny < height and 0 <= nx < width:
                    row.append(ny * width + nx)
            geometric.append(row)

    # ---- target-feature affinity table (built on first use)
    affinity_table = []

    def build_affinity_table():
        feats = target_features.detach().cpu().to(torch.float64).numpy()
        feats = np.transpose(feats, (1, 2, 0)).reshape(height * width, -1)
        norms = np.sqrt((feats * feats).sum(axis=1))
        feats = feats / np.maximum(norms, 1e-12)[:, None]
        for i in range(height * width):
            linked = []
            for j in geometric[i]:
                if float(np.dot(feats[i], feats[j])) > cfg.tbs_cos_threshold:
                    linked.append(j)
            affinity_table.append(linked)

    # ---- SAM features (computed on first use)
    sam_unit = []

    def sam_features():
        if not sam_unit:
            f = sam.features(embedding).detach().cpu().to(torch.float64)
            f = F.interpolate(f[None], size=(height, width), mode="bilinear", align_corners=False)[0].numpy()
            f = np.transpose(f, (1, 2, 0)).reshape(height * width, -1)
            norms = np.sqrt((f * f).sum(axis=1))
            sam_unit.append(f / np.maximum(norms, 1e-12)[:, None])
        return sam_unit[0]

    # ---- helpers
    def to_mask(pixels):
        mask = np.zeros(height * width, dtype=bool)
        mask[list(pixels)] = True
        return mask.reshape(height, width)

    def to_pixels(mask):
        return set(np.flatnonzero(mask.reshape(-1)).tolist())

    def bbox_with_margin(pixels):
        ys = [p // width for p in pixels]
        xs = [p % width for p in pixels]
        m = cfg.box_margin
        return (max(min(xs) - m, 0), max(min(ys) - m, 0), min(max(xs) + m, width - 1), min(max(ys) + m, height - 1))

    def sam_mask(box):
        decoder_calls[0] += 1
        return largest_contour(np.asarray(sam.decode(embedding, box)))

    def changed(a, b):
        if a is None or b is None:
            return math.inf
        return int((a != b).sum())

    def area(mask):
        return int(mask.sum())

    # ---- TBS / MBS / STAGE3, following the spec's pseudocode
    def expand_tbs(region):
        grown = set(region)
        for i in region:
            grown.update(affinity_table[i])
        return grown

    def tbs(region, max_steps):
        if not affinity_table:
            build_affinity_table()
        history = [None, None]
        for _ in range(max_steps):
            box = bbox_with_margin(region)
            m = sam_mask(box)
            if m is None:
                region = expand_tbs(region)
                continue
            history.append(m)
            if area(m) > cfg.tbs_min_area and (changed(m, history[-3]) < cfg.tbs_tol_2step
                                               or changed(m, history[-2]) < cfg.tbs_tol_1step):
                return m
            region = expand_tbs(region)
        return None

    def first_stable(history):
        for i in range(2, len(history)):
            if changed(history[i], history[i - 2]) < cfg.mbs_tol_2step:
                return history[i]
        for i in range(1, len(history)):
            if changed(history[i], history[i - 1]) < cfg.mbs_tol_1step:
                return history[i]
        return None

    def stage3(box, history):
        for _ in range(cfg.stage3_repeats):
            g = cfg.stage3_growth
            box = (box[0] - g, box[1] - g, box[2] + g, box[3] + g)
            m = sam_mask(box)
            history.append(m)
            if (len(history) > 2 and changed(m, history[-3]) < cfg.mbs_tol_2step) \
                    or changed(m, history[-2]) < cfg.mbs_tol_1step:
                return m
        return None

    def mbs(m0, max_steps):
        e = sam_features()
        members = to_pixels(m0)
        mean = np.mean([e[p] for p in sorted(members)], axis=0)
        mu = mean / max(float(np.sqrt((mean * mean).sum())), 1e-12)
        distance = np.empty(height * width)
        for p in range(height * width):
            distance[p] = 1.0 - float(np.dot(e[p], mu))
        avg_dist = float(np.mean([distance[p] for p in sorted(members)]))
        thr = min(cfg.mbs_multiplier * avg_dist, cfg.mbs_cap)
        if cfg.mbs_max_growth > 0:        # at most mbs_max_growth x |m0| pixels outside m0 below the threshold
            outside = sorted(distance[p] for p in range(height * width) if p not in members)
            budget = int(cfg.mbs_max_growth * len(members))
            if budget < len(outside):
                thr = min(thr, outside[budget])

        region = set(members)
        history = []
        prev_box = None
        for _ in range(max_steps):
            box = bbox_with_margin(region)
            if box == prev_box:
                s = first_stable(history)
                if s is not None:
                    return s, "mbs"
                if cfg.stage3:
                    s = stage3(box, history)
                    if s is not None:
                        return s, "stage3"
                    # the last MBS mask before stage 3 started (history[-7] with the spec's 6 repeats)
                    return history[-(cfg.stage3_repeats + 1)], "mbs"
                return history[-1], "mbs"
            prev_box = box
            m = sam_mask(box)
            history.append(m)
            if len(history) >= 4 and changed(history[-1], history[-4]) < cfg.mbs_tol_3step:
                return history[-2], "mbs"
            grown = set(region)
            for i in region:
                for j in geometric[i]:
                    if distance[j] < thr:
                        grown.add(j)
            region = grown
        return first_stable(history), "mbs"

    def refine_class(c):
        """(mask, weight, outcome, stage)"""
        fallback = prediction == c
        p = probs[c]
        if int((p > cfg.existence_prob).sum()) < cfg.existence_pixels:
            return fallback, cfg.score_fallback, "absent", None
        max_steps = cfg.max_steps[c - 1]
        if cfg.search == "naive":
            above = p > cfg.naive_threshold
            if not above.any():
                return fallback, cfg.score_fallback, "fallback", None
            m = sam_mask(bbox_with_margin(to_pixels(above)))
            if m is None:
                return fallback, cfg.score_fallback, "fallback", None
            return m, cfg.score_sam, "sam", "naive"
        seed = p > p.max() - cfg.seed_delta
        if not seed.any():
            return fallback, cfg.score_fallback, "fallback", None
        r = largest_contour(seed)
        if r is None:
            return fallback, cfg.score_fallback, "fallback", None
        region = to_pixels(r)
        if cfg.search == "mbs":
            m = sam_mask(bbox_with_margin(region))
            if m is None or area(m) <= cfg.tbs_min_area:
                return fallback, cfg.score_fallback, "fallback", None
        else:
            m = tbs(region, max_steps)
            if m is None:
                return fallback, cfg.score_fallback, "fallback", None
            if cfg.search == "tbs":
                return m, cfg.score_sam, "sam", "tbs"
        final, stage = mbs(m, max_steps)
        if final is None:
            return m, cfg.score_sam, "sam", "mbs-fallback"
        return final, cfg.score_sam, "sam", stage

    # ---- merge (spec 4.4)
    scores = np.zeros((num_classes, height, width))
    scores[0] = cfg.score_background
    outcomes = {}
    for c in range(1, num_classes):
        mask, weight, outcome, stage = refine_class(c)
        scores[c][mask] = weight
        outcomes[c] = (outcome, stage)
    pseudo_label = np.argmax(scores, axis=0).astype(np.uint8)
    return pseudo_label, outcomes, decoder_calls[0]
