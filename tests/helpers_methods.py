"""Tiny synthetic problems for method tests (DFG, the baselines, the method contract, the box ceiling): a fake
box-sensitive SAM, blob volumes, the Context the harness builds, and method configs with tiny budgets."""
from __future__ import annotations

import numpy as np
import torch
from omegaconf import OmegaConf

from sfdabench.api import Case, SamBackend, SamEmbedding
from sfdabench.harness.config import compose_run_config

ORGANS = ["spleen", "right_kidney", "left_kidney", "liver"]


class ThresholdSam(SamBackend):
    """Fake SAM: the bright pixels (> 0.45) inside the box. Too small a box cuts the organ: box-sensitive."""

    name = "threshold"

    def __init__(self):
        super().__init__({}, torch.device("cpu"))
        self.calls = 0

    def embed(self, image):
        small = torch.nn.functional.avg_pool2d(torch.from_numpy(image)[None, None].float(), 4)[0]
        feats = torch.cat([small, 1 - small, small ** 2], 0)
        return SamEmbedding(feats, image.shape, {"image": image})

    def decode(self, embedding, box):
        self.calls += 1
        image = embedding.extra["image"]
        x0, y0, x1, y1 = (int(round(v)) for v in box)
        mask = np.zeros(image.shape, bool)
        mask[max(y0, 0):y1 + 1, max(x0, 0):x1 + 1] = image[max(y0, 0):y1 + 1, max(x0, 0):x1 + 1] > 0.45
        return mask


def synthetic_cases(n: int, seed: int, size: int = 48, slices: int = 3) -> list[Case]:
    """Blobs of distinct brightness per organ on a dark background."""
    rng = np.random.default_rng(seed)
    cases = []
    yy, xx = np.mgrid[:size, :size]
    for i in range(n):
        image = rng.normal(0.1, 0.02, (slices, size, size)).astype(np.float32)
        label = np.zeros((slices, size, size), np.uint8)
        centres = [(12, 36), (34, 12), (34, 36), (14, 12)]
        for k, (cy, cx) in enumerate(centres, start=1):
            cy, cx = cy + rng.integers(-2, 3), cx + rng.integers(-2, 3)
            r = 6 + rng.integers(0, 3)
            blob = (yy - cy) ** 2 + (xx - cx) ** 2 < r ** 2
            label[:, blob] = k
            image[:, blob] = 0.5 + 0.1 * k + rng.normal(0, 0.02, (slices, blob.sum()))
        cases.append(Case(f"syn{seed}-{i}", np.clip(image, 0, 1), label, (5.0, 2.0, 2.0)))
    return cases


def composed_method(name: str, *overrides: str):
    """configs/method/<name>.yaml as Hydra composes it for a run (resolved, open for changes)."""
    cfg = compose_run_config([f"method={name}", *overrides])
    OmegaConf.resolve(cfg)
    OmegaConf.set_struct(cfg.method, False)
    return cfg.method


def with_changes(cfg, changes):
    """``cfg`` with dotted-key ``changes`` applied (e.g. ``{"retrain.steps": 4}``)."""
    for key, value in changes.items():
        OmegaConf.update(cfg, key, value)
    return cfg


def dfg_cfg(**changes):
    """dfg.yaml as Hydra composes it under preset=test (its retraining recipe comes from configs/recipe/;
    budgets capped by run.yaml's budget_cap)."""
    return with_changes(composed_method("dfg", "preset=test"), changes)


def make_context(tmp_path, labels, sam=None, images=None, allow_labels=False):
    """The Context the harness builds (``adaptation_context``) for a target of these labels: target-label
    diagnostics of them; with ``images`` (the slices the labels belong to) also the box-prompt ceilings."""
    from sfdabench.harness.protocol import adaptation_context

    slices = images if images is not None else [np.zeros(lab.shape, np.float32) for lab in labels]
    cases = [Case(str(i), im, lab, (1.0, 1.0, 1.0)) for i, (im, lab) in enumerate(zip(slices, labels))]
    sam = sam or ThresholdSam()
    ctx = adaptation_context(cases, ORGANS, device=torch.device("cpu"), seed=0, cache_dir=tmp_path / "cache",
                             run_dir=tmp_path / "run", sam_factory=lambda: sam, allow_labels=allow_labels,
                             progress=False, box_prompts=images is not None)
    return ctx, sam


def method_config(name: str):
    """configs/method/<name>.yaml under preset=test: every budget capped (run.yaml ``budget_cap``)."""
    return composed_method(name, "preset=test")
