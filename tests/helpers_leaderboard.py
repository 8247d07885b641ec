"""Synthetic finished runs in a results dir (a leaderboard row per organ + a run folder with per_case.csv,
summary.json and done, exactly as protocol.execute writes them). Shared by tests/test_leaderboard.py and
tests/test_statistics.py."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from sfdabench.harness.results import append_rows


def write_run(results: Path, *, dice: dict[str, list[float]], task="phantom_mri2ct", method="m", variant="default",
              seed=0, sfda=True, asd_unit="mm", source_weights=None, data_protocol="phantom",
              metric_version="1;asd=union",
              selection="last", sam="", run_id=None, finished_at="2025-01-01T00:00:00+00:00",
              pseudo_label_dice=None, efficiency=None) -> str:
    """One finished run: per-case Dice per organ (one list entry per case), ASD = 10 (1 - Dice), HD95 = 3 ASD."""
    run_id = run_id or f"{method}-{variant}-{task}-{seed}-{asd_unit}-{sam}".replace("+", "")
    cases = pd.DataFrame([{"run_id": run_id, "case": f"case{i}", "organ": organ, "dice": v, "asd": 10 * (1 - v),
                           "hd95": 30 * (1 - v)} for organ, values in dice.items() for i, v in enumerate(values)])
    table = cases.groupby("organ", sort=False)[["dice", "asd", "hd95"]].mean()
    table.loc["mean"] = table.mean()
    rows = table.reset_index()
    protocol = {"task": task, "method": method, "variant": variant, "seed": seed, "asd_unit": asd_unit,
                "empty_policy": "diagonal", "selection": selection,
                "source_weights": f"src{seed}" if source_weights is None else source_weights,
                "source_config": f"cfg{seed}", "train_threads": 1,
                "sfda": sfda, "sam": sam, "data_protocol": data_protocol, "n_cases": len(next(iter(dice.values()))),
                "config_hash": run_id, "run_id": run_id, "metric_version": metric_version, "runtime_s": 1.0,
                "finished_at": finished_at}
    for key, value in protocol.items():
        rows[key] = value
    run_dir = results / "runs" / f"{task}__{method}__{variant}__seed{seed}__{run_id}"
    run_dir.mkdir(parents=True, exist_ok=True)
    cases.to_csv(run_dir / "per_case.csv", index=False)
    diagnostics = {"pseudo_label_dice": pseudo_label_dice} if pseudo_label_dice else {}
    if efficiency:
        diagnostics["box_search_efficiency"] = efficiency
    (run_dir / "summary.json").write_text(json.dumps({**protocol, "diagnostics": diagnostics}))
    append_rows(results / "leaderboard.csv", rows)
    (run_dir / "done").write_text("x\n")
    return run_id
