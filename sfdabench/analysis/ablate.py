"""``sfdabench ablate method=<m> task=<t> [seeds=[0,1,2]] [variants=[...]] [table_only=true] [overrides]``.

Runs the ablation grid a method declares (``Method.ablation``, an :class:`sfdabench.api.Ablation`): its
variants x the seeds, then tabulates them. Variants are named as the method's ``variant()`` names its runs;
``variants=[...]`` picks any of them or a named grid (``variants=<grid name>``; without it, the grid
``default``), ``seeds=[...]`` the seeds. Every other argument is a Hydra override passed through to every run
(``preset=test``, ``device=cpu``, ``results_dir=...``, ``hydra/launcher=joblib hydra.launcher.n_jobs=2``,
``hydra/launcher=sfdabench_slurm``); an override of a setting the grid sets is refused, since it would
mislabel the grid's rows. ``sfdabench list methods`` marks the methods that declare a grid.

How runs are launched: each variant is registered as an option of the config group ``sfdabench_ablation``
(Hydra ConfigStore, package ``_global_``) that sets the method's settings of that variant, and the grid is one
ordinary multirun, ``sfdabench run -m method=<m> +sfdabench_ablation=<v1>,<v2>,... seed=<s1>,... [overrides]``,
through ``launch.run``. So every run is a normal protocol run: the configured launcher applies (ConfigStore
state travels to joblib and SLURM jobs with Hydra's singleton state), finished runs are skipped on relaunch,
rows land in the leaderboard, and the resolved config, hence the run id, is the same as for the same
settings written by hand. The expected run ids are computed beforehand from the composed configs
(``config.compose_run_config``), which also checks every grid config, and that each composes to a run of that
variant name, before any run starts.

Output: ``<results_dir>/ablations/<method>/<task>/ablation.{csv,md}``: variant x organ Dice (mean ± std over seeds), the method's columns
and the pseudo-label Dice per stage (``summary.json`` ``diagnostics.pseudo_label_dice``, labelled by the
method's ``stage_labels``; the harness's box-prompt ceilings) and the box-search efficiency where the run
recorded them.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import pandas as pd

from sfdabench.analysis import leaderboard as lb
from sfdabench.harness import metric_catalogue
from sfdabench.api import Ablation, SfdaBenchError, UsageError
from sfdabench.harness.label_diagnostics import CEILING_STAGES

log = logging.getLogger("sfdabench")

GROUP = "sfdabench_ablation"
#: Labels of the ceilings' stages and of the efficiencies (ratios against them) in the table's columns.
HARNESS_STAGE_LABELS = {**CEILING_STAGES, "efficiency": "box-search efficiency",
                        "efficiency_class_keeping": "efficiency (class-keeping)"}
#: Not a pseudo-label Dice but a ratio of two (``diagnostics.box_search_efficiency``): PL after SAM / ceiling.
EFFICIENCY = "efficiency"


def method_ablation(name: str) -> tuple[type, Ablation]:
    """The registered method class of that name and its ablation grid (a one-line error if it has none)."""
    from sfdabench.harness.plugins import get_registry

    registry = get_registry()
    cls = registry.get("methods", name)
    if cls.ablation is None:
        with_grids = [m for m in registry.names("methods") if registry.get("methods", m).ablation is not None]
        raise UsageError(f"method '{name}' declares no ablation grid; pass method=<name> of one that does: "
                         f"{', '.join(with_grids) or '(none installed)'}")
    return cls, cls.ablation


def flat_keys(settings: Mapping[str, Any], prefix: str = "method") -> set[str]:
    """Dotted keys of nested settings, e.g. {"method.cp", "method.search.search"}."""
    keys = set()
    for key, value in settings.items():
        keys |= flat_keys(value, f"{prefix}.{key}") if isinstance(value, Mapping) else {f"{prefix}.{key}"}
    return keys


def register_variants(ablation: Ablation, variants: Sequence[str]) -> None:
    """Each variant becomes an option of the ``sfdabench_ablation`` config group (see the module doc)."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    for variant in variants:
        store.store(group=GROUP, name=variant, node={"method": ablation.settings(variant)}, package="_global_",
                    provider="sfdabench")


def _list(value: str) -> list[str]:
    return [v.strip() for v in value.strip().strip("[]").split(",") if v.strip()]


HELP = """usage: sfdabench ablate method=<m> task=<t> [seeds=[0,1,2]] [variants=[<v1>,<v2>,...|<grid>]]
                       [table_only=true] [--config-dir DIR] [overrides]

Run the ablation grid that method <m> declares (its grid "default" unless variants= names variants or a
named grid) over the seeds as one Hydra multirun, then write
<results_dir>/ablations/<m>/<task>/ablation.{csv,md}. Finished runs are skipped; table_only=true only writes
the table. Other overrides apply to every run (preset=test, device=cpu, hydra/launcher=joblib, ...).
`sfdabench list methods` marks the methods that declare a grid, with its variants."""


@dataclass(frozen=True)
class Request:
    """What ``sfdabench ablate`` was asked for."""

    method: str
    seeds: list[int]
    variants: list[str]
    table_only: bool
    overrides: list[str]


def parse_args(args: Sequence[str]) -> Request:
    """The method, seeds, variants, table_only and the pass-through Hydra overrides; names checked first."""
    from sfdabench.harness.config import expand_config_dirs

    method, seeds, names, table_only, overrides, settings_keys = None, [0, 1, 2], None, False, [], []
    for arg in expand_config_dirs(args):
        if arg in ("-m", "--multirun"):
            continue  # ablate always sweeps
        if arg.startswith("-"):
            raise UsageError(f"unknown option '{arg}' for ablate; see sfdabench ablate --help")
        key, _, value = arg.partition("=")
        bare = key.lstrip("+~")
        if key == "seeds":
            try:
                seeds = [int(s) for s in _list(value)]
            except ValueError:
                raise UsageError(f"seeds must be integers, e.g. seeds=[0,1,2]; got '{value}'") from None
        elif key in ("variants", "grid"):
            names = _list(value)
        elif key == "table_only":
            table_only = value.lower() in ("1", "true", "yes")
        elif bare == "seed":
            raise UsageError("ablate takes seeds=[0,1,2] (a list), not seed=")
        elif key == "method":
            if "," in value:
                raise UsageError("ablate runs one method's grid at a time; give one method=<name>")
            method = value
        elif bare.startswith("method."):
            settings_keys.append(bare)
            overrides.append(arg)
        else:
            overrides.append(arg)
    if method is None:
        raise UsageError("ablate needs method=<name>, a method that declares an ablation grid "
                         "(sfdabench list methods marks them)")
    _, ablation = method_ablation(method)
    grids = {name: list(grid) for name, grid in ablation.grids.items()}
    variants = list(dict.fromkeys(v for name in (names if names is not None else ["default"])
                                  for v in grids.get(name, [name])))
    if not seeds or not variants:
        raise UsageError("ablate needs at least one seed and one variant")
    # names checked before anything runs; the keys any grid variant sets may not be overridden
    set_by_grid = set().union(*(flat_keys(ablation.settings(v)) for v in variants),
                              *(flat_keys(ablation.settings(v)) for grid in grids.values() for v in grid))
    for key in settings_keys:
        if key in set_by_grid:
            raise UsageError(f"{key} is set by the ablation grid; choose variants=[...] instead "
                             f"(e.g. variants=[{','.join(variants[:2])}])")
    _refuse_sweeps(overrides)
    return Request(method, seeds, variants, table_only, overrides)


def _refuse_sweeps(overrides: Sequence[str]) -> None:
    # The grid is variants x seeds; a sweep in an override would make runs the table does not know about.
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        parsed = OverridesParser.create().parse_overrides([o for o in overrides if not o.startswith("hydra")])
    except Exception as exc:  # noqa: BLE001 - Hydra's parse errors have several types
        raise UsageError(" ".join(str(exc).split())) from None
    sweeps = [o.input_line for o in parsed if o.is_sweep_override()]
    if sweeps:
        raise UsageError(f"ablate sweeps variants x seeds only; run one setting at a time: {', '.join(sweeps)}")


# ------------------------------------------------------------------------------------ expected runs


def expected_runs(request: Request) -> tuple[pd.DataFrame, Any]:
    """(variant, seed, run_id) of every grid run, from the composed configs; and one composed config."""
    from sfdabench.api import _plain
    from sfdabench.harness.config import compose_run_config
    from sfdabench.harness.results import config_hash

    cls, _ = method_ablation(request.method)
    records, cfg = [], None
    for variant in request.variants:
        for seed in request.seeds:
            cfg = compose_run_config([f"method={request.method}", f"+{GROUP}={variant}", f"seed={seed}",
                                      *request.overrides])
            named = cls(cfg.method).variant()
            if named != variant:  # the grid's names must be the names the runs get
                raise SfdaBenchError(f"ablation variant '{variant}' of {request.method} composes to a run named "
                                     f"'{named}'")
            records.append({"variant": variant, "seed": seed, "run_id": config_hash(_plain(cfg))})
    return pd.DataFrame(records), cfg


def launch(request: Request) -> int:
    """One Hydra multirun over variants x seeds (launchers apply); the exit code of the sweep."""
    from sfdabench.harness.launch import run

    # prevalidated: expected_runs() composed and checked every grid config already
    return run(["-m", f"method={request.method}", f"+{GROUP}={','.join(request.variants)}",
                f"seed={','.join(map(str, request.seeds))}", *request.overrides], prevalidated=True)


# -------------------------------------------------------------------------------------------- table


def pseudo_label_rows(expected: pd.DataFrame, folders: dict[str, Path]) -> pd.DataFrame:
    """Long table (variant, seed, stage, organ, value) of the runs' pseudo-label Dice diagnostics."""
    rows = []
    for run in expected.itertuples(index=False):
        path = folders.get(run.run_id, Path("/nonexistent")) / "summary.json"
        if not path.is_file():
            continue
        diagnostics = json.loads(path.read_text()).get("diagnostics", {}) or {}
        stages = dict(diagnostics.get("pseudo_label_dice", {}) or {})
        if diagnostics.get("box_search_efficiency"):
            stages[EFFICIENCY] = diagnostics["box_search_efficiency"]
        if diagnostics.get("box_search_efficiency_class_keeping"):
            stages[EFFICIENCY + "_class_keeping"] = diagnostics["box_search_efficiency_class_keeping"]
        for stage, organs in stages.items():
            for organ, value in organs.items():
                rows.append({"variant": run.variant, "seed": run.seed, "stage": stage, "organ": organ,
                             "value": float("nan") if value is None else float(value)})
    return pd.DataFrame(rows, columns=["variant", "seed", "stage", "organ", "value"])


def ablation_table(expected: pd.DataFrame, results_dir: Path, ablation: Ablation) -> tuple[pd.DataFrame, list[str]]:
    """Variant x organ: the ablation's columns, Dice/ASD/HD95 mean, std, n over seeds, plus
    ``pl_<stage>_{mean,std,n}`` columns. Returns the table and the (variant, seed) of runs that have no
    leaderboard rows yet."""
    board = lb.read_leaderboard(results_dir) if (results_dir / "leaderboard.csv").is_file() else None
    rows = board[board["run_id"].isin(set(expected["run_id"]))] if board is not None else pd.DataFrame()
    found = set(rows["run_id"]) if len(rows) else set()
    missing = [f"{r.variant} seed {r.seed}" for r in expected.itertuples(index=False) if r.run_id not in found]
    variants = list(dict.fromkeys(expected["variant"]))
    if not len(rows):
        return pd.DataFrame(columns=["variant", "organ"]), missing
    summary = lb.aggregate(rows)
    stats = [f"{m}_{s}" for m in metric_catalogue.of_summary(summary) for s in ("mean", "std", "n")]
    keep = ["variant", "organ", "n_seeds", "seeds", *stats] + (["asd_unit"] if "asd_unit" in summary else [])
    columns = pd.DataFrame([{"variant": v, **ablation.columns(v)} for v in variants])  # for readers of the CSV
    table = summary[keep].merge(columns, on="variant", how="left")
    pl = pseudo_label_rows(expected[expected["run_id"].isin(found)], lb.run_folders(results_dir))
    if len(pl):
        pl_stats = pl.groupby(["variant", "organ", "stage"], sort=False)["value"].agg(["mean", "std", "count"])
        pl_stats = pl_stats.rename(columns={"count": "n"}).unstack("stage")
        pl_stats = pl_stats.reorder_levels([1, 0], axis=1)[list(dict.fromkeys(pl["stage"]))]  # stage: mean, std, n
        pl_stats.columns = [f"pl_{stage}_{stat}" for stage, stat in pl_stats.columns]
        table = table.merge(pl_stats.reset_index(), on=["variant", "organ"], how="left")
        counts = [c for c in table if c.startswith("pl_") and c.endswith("_n")]
        table[counts] = table[counts].fillna(0).astype(int)  # variants without pseudo-labels: 0 values
    order = {v: i for i, v in enumerate(variants)}
    organs = lb.organ_order(rows)
    table = table.assign(_v=table["variant"].map(order), _o=table["organ"].map({o: i for i, o in enumerate(organs)}))
    table = table.sort_values(["_v", "_o"]).drop(columns=["_v", "_o"]).reset_index(drop=True)
    lead = ["variant", *[c for c in columns.columns if c != "variant"], "organ", "n_seeds", "seeds"]
    return table[lead + [c for c in table.columns if c not in lead]], missing


def ablation_markdown(table: pd.DataFrame, task: str, seeds: Sequence[int], missing: Sequence[str], method: str,
                      ablation: Ablation, stage_labels: Mapping[str, str]) -> str:
    organs = [o for o in dict.fromkeys(table["organ"]) if o != "mean"]
    labels = {**stage_labels, **HARNESS_STAGE_LABELS}
    stages = [c[3:-5] for c in table.columns if c.startswith("pl_") and c.endswith("_mean")]
    stages = sorted(stages, key=lambda s: list(labels).index(s) if s in labels else len(labels))
    variants = list(dict.fromkeys(table["variant"]))
    cells = {v: ablation.cells(v) for v in variants}
    # an optional cell (a setting off the paper's value) gets a column only when a row of the table sets it
    # off the reference variant's value (so the defaults are stated once, by the reference variant)
    reference = ablation.cells(ablation.reference) if ablation.reference else {}
    shown = [h for h in (cells[variants[0]] if variants else {})
             if h not in ablation.optional_cells
             or any(cells[v].get(h) not in (reference.get(h), "-") for v in variants)]
    header = ["variant", *shown, "seeds", *organs, "mean", *[labels.get(s, f"PL {s}") for s in stages]]
    lines = []
    for variant, g in table.groupby("variant", sort=False):
        by_organ = g.set_index("organ")
        row = [variant, *[cells[variant].get(h, "") for h in shown], str(int(g["n_seeds"].max()))]
        row += [lb.cell(by_organ, o, "dice") for o in organs + ["mean"]]
        for stage in stages:
            mean_row = by_organ.loc["mean"] if "mean" in by_organ.index else None
            value = None if mean_row is None else mean_row.get(f"pl_{stage}_mean")
            # "-": this variant has no such stage (e.g. a variant that makes no pseudo-labels)
            row.append("-" if value is None or pd.isna(value) else lb.fmt(value, mean_row.get(f"pl_{stage}_std")))
        lines.append(row)
    text = (f"### {method} ablation on {task}\n\nTarget-test Dice per organ and mean over organs, mean ± std over "
            f"seeds {', '.join(map(str, seeds))}. PL: pseudo-label Dice (mean over organs) on target-train "
            f"against its ground truth (measured only, never used by the method). PL ceiling: SAM prompted with "
            f"the ground-truth boxes; box-search efficiency: PL after SAM / PL ceiling (mean row).\n\n")
    left = 1 + len(shown)
    text += lb.markdown_table(header, lines, ["l"] * left + ["r"] * (len(header) - left)) if lines else "(no runs yet)"
    if missing:
        text += f"\n\nMissing runs ({len(missing)}): {', '.join(missing)}"
    return text + "\n"


def write_table(expected: pd.DataFrame, results_dir: Path, task: str, seeds: Sequence[int],
                method: str) -> tuple[str, list[str]]:
    from sfdabench.harness.results import atomic_write_text

    cls, ablation = method_ablation(method)
    table, missing = ablation_table(expected, results_dir, ablation)
    text = ablation_markdown(table, task, seeds, missing, method, ablation, cls.stage_labels)
    out = results_dir / "ablations" / method / task
    atomic_write_text(out / "ablation.csv", table.to_csv(index=False))
    atomic_write_text(out / "ablation.md", text)
    log.info("ablation table: %s, %s", out / "ablation.csv", out / "ablation.md")
    return text, missing


def cmd_ablate(args: Sequence[str]) -> int:
    if any(a in ("-h", "--help") for a in args):
        print(HELP)
        return 0
    request = parse_args(args)
    _, ablation = method_ablation(request.method)
    register_variants(ablation, request.variants)
    expected, cfg = expected_runs(request)
    results_dir, task = Path(cfg.results_dir), str(cfg.task.name)
    folders = lb.run_folders(results_dir)
    todo = [r for r in expected.itertuples(index=False)
            if not (folders.get(r.run_id, Path("/nonexistent")) / "done").exists()]
    log.info("ablation of %s on %s: %d variants x %d seeds, %d run(s) to do", request.method, task,
             len(request.variants), len(request.seeds), len(todo))
    if todo and not request.table_only:
        code = launch(request)  # finished runs are skipped by the protocol itself
        if code:
            return code  # the failing run printed its one line
    text, missing = write_table(expected, results_dir, task, request.seeds, request.method)
    print(text)
    return 1 if missing and not request.table_only else 0
