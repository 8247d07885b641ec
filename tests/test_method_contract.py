"""Contract tests generated from the registry (the DomainBed / timm lesson): every registered method,
built-in or plugin, adapts on a tiny problem, returns a model with the right output shape, changes its
parameters where it trains, and is deterministic for a fixed seed on CPU. A new method gets these for free.

Budgets are capped generically by preset=test (run.yaml ``budget_cap``): every ``epochs`` / ``iterations`` /
``steps`` key of a method's config at most 2 and every ``batch_size`` at most 4, so a method only has to use
those names to be tested quickly. The source model is the suite's one session-wide tiny model (conftest.py).
"""
from __future__ import annotations

import copy

import pytest
import torch

from helpers_methods import ORGANS, ThresholdSam, make_context, method_config, synthetic_cases
from sfdabench.api import TargetImages
from sfdabench.harness.plugins import get_registry

METHODS = get_registry().names("methods")
#: methods that return the source model unchanged by design
NO_TRAINING = {"source_only"}


def test_registry_lists_the_builtin_methods():
    assert {"source_only", "oracle", "dfg"} <= set(METHODS)


@pytest.mark.parametrize("name", METHODS)
def test_method_contract(name, source_model, tmp_path):
    method_cls = get_registry().get("methods", name)
    cfg = method_config(name)
    target = synthetic_cases(2, 21, slices=2)
    labels = [c.label for c in target]
    states = []
    for attempt in range(2):
        ctx, _ = make_context(tmp_path / str(attempt), labels, sam=ThresholdSam(),
                              allow_labels=method_cls.uses_target_labels)
        torch.manual_seed(0)
        method = method_cls(copy.deepcopy(cfg))
        assert isinstance(method.variant(), str) and method.variant()
        model = method.adapt(copy.deepcopy(source_model), TargetImages(target), ctx)
        model.eval()
        with torch.no_grad():
            features, logits = model(torch.rand(2, 3, 48, 48))
        assert logits.shape == (2, len(ORGANS) + 1, 48, 48)
        assert features.shape[0] == 2 and features.shape[-2:] == (48, 48)
        states.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    before = source_model.state_dict()
    changed = any(not torch.equal(before[k], states[0][k]) for k in before)
    assert changed == (name not in NO_TRAINING), "a training method must change its parameters"
    for key in states[0]:
        assert torch.equal(states[0][key], states[1][key]), f"{name} is not deterministic for a fixed seed ({key})"
