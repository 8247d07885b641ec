"""Training recipes stated once (``configs/recipe/``) and chosen by name: DFG's retraining is one file shared
by dfg, sam_refine, box_ceiling and oracle; box_ceiling and oracle each run under both recipes (the
``recipe`` switch), so a table can separate label quality from the training recipe."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from conftest import REPO, TINY_PHANTOM, run_cli
from sfdabench.harness.config import compose_run_config
from sfdabench.harness.plugins import get_registry

DFG_RETRAIN = yaml.safe_load((REPO / "configs" / "recipe" / "dfg_retrain.yaml").read_text())


def method_cfg(*overrides: str):
    cfg = compose_run_config(list(overrides))
    return OmegaConf.to_container(cfg, resolve=True)


def test_dfg_retraining_is_stated_once():
    assert method_cfg("method=dfg")["method"]["retrain"] == DFG_RETRAIN
    assert method_cfg("method=box_ceiling")["method"]["recipes"]["dfg"] == DFG_RETRAIN
    assert method_cfg("method=oracle")["method"]["recipes"]["dfg"] == DFG_RETRAIN
    assert method_cfg("method=sam_refine")["method"]["train"] == DFG_RETRAIN       # the same budget too
    assert DFG_RETRAIN["steps"] == 700 and DFG_RETRAIN["lr_step_every"] == 35      # in steps, not epochs
    # an override reaches the method that uses the recipe
    assert method_cfg("method=dfg", "method.retrain.loss=ce+dice")["method"]["retrain"]["loss"] == "ce+dice"


@pytest.mark.parametrize("method, recipe, variant, expected", [
    ("box_ceiling", "dfg", "gt-box", "dfg"),
    ("box_ceiling", "source", "gt-box+source-recipe", "source"),
    ("oracle", "source", "init-source", "source"),
    ("oracle", "dfg", "init-source+dfg-recipe", "dfg"),
])
def test_both_references_run_under_both_recipes(method, recipe, variant, expected):
    cfg = method_cfg(f"method={method}", f"method.recipe={recipe}")
    instance = get_registry().get("methods", method)(cfg["method"])
    assert instance.variant() == variant
    assert instance.recipe == (DFG_RETRAIN if expected == "dfg" else cfg["source"])


def test_an_unknown_recipe_is_a_one_line_usage_error(tmp_path: Path):
    out = run_cli("run", "method=oracle", "method.recipe=dgf", f"results_dir={tmp_path / 'r'}", *TINY_PHANTOM,
                  cwd=tmp_path)
    assert out.returncode == 2, out.stderr
    lines = [line for line in out.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "unknown recipe 'dgf'" in lines[0] and "method.recipe=dfg" in lines[0], out.stderr
    assert not (tmp_path / "r").exists() or not any((tmp_path / "r").rglob("done"))


@pytest.mark.parametrize("task, expected", [("phantom_mri2ct", {"mean": 0.9, "organ": 0.8}),
                                            ("sample_mri2ct", {"mean": 0.85, "organ": 0.75})])
def test_a_task_may_set_its_source_bar_and_the_command_line_wins(task, expected):
    cfg = compose_run_config([f"task={task}"])
    assert OmegaConf.to_container(cfg.source_min_dice, resolve=True) == expected
    cfg = compose_run_config([f"task={task}", "source_min_dice.mean=0.5"])
    assert OmegaConf.to_container(cfg.source_min_dice, resolve=True)["mean"] == 0.5
