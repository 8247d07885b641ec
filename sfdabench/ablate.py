"""``sfdabench ablate task=<t> [seeds=[0,1,2]] [variants=[...]] [table_only=true] [overrides]``: DFG's ablation grid.

The grid (default, 17 variants, stage 3 on): FA on/off x box search naive/tbs/mbs/dbs x CP on/off, plus the
"FA only" row; variants are named as ``DFG.variant()`` names them (``fa+dbs+cp``, ``nofa+naive+nocp``,
``fa-only``; ``fa+dbs+nos3+cp`` turns stage 3 off; ``fa-srcprior+...`` runs FA with the source model's mean
prediction as its class prior instead of the paper's uniform one). Box-search options append tokens after CP, in this order:
``+ltol`` (change tolerances scaled by length), ``+reach`` (step limits scaled to the spec's reach; both for
tbs/mbs/dbs), ``+grow1`` (MBS's threshold lowered so at most 1 x the mask's area outside the mask passes it;
read by MBS), ``+cover-pred50`` / ``+cover-region80`` (a mask counts as stable only when it covers that
percentage of the predicted components / of the search region; tbs/mbs/dbs), ``+guard-side`` / ``+guard-seed``
(twin guard), e.g. ``fa+dbs+cp+ltol+reach``.
``variants=[...]`` picks any subset (``variants=search_options``: these options around fa+dbs+cp),
``seeds=[...]`` the seeds. Every other argument is a Hydra override passed through to every run (``preset=test``,
``device=cpu``, ``results_dir=...``, ``hydra/launcher=joblib hydra.launcher.n_jobs=2``,
``hydra/launcher=sfdabench_slurm``).

How runs are launched: each variant is registered as an option of the config group ``sfdabench_ablation``
(Hydra ConfigStore, package ``_global_``) that sets DFG's switches, and the grid is one ordinary multirun,
``sfdabench run -m method=dfg +sfdabench_ablation=<v1>,<v2>,... seed=<s1>,<s2>,... [overrides]``, through
``config.run``. So every run is a normal protocol run: the configured launcher applies (ConfigStore state
travels to joblib and SLURM jobs with Hydra's singleton state), finished runs are skipped on relaunch, rows
land in the leaderboard, and the resolved config, hence the run id, is the same as for a hand-written
``sfdabench run method=dfg method.cp=false ...``. The expected run ids are computed beforehand from the
composed configs (``config.compose_run_config``), which also checks every grid config before any run starts.

Output: ``<results_dir>/ablations/<task>/ablation.{csv,md}``: variant x organ Dice (mean ± std over seeds) and
the pseudo-label Dice per stage (``summary.json`` ``diagnostics.pseudo_label_dice``: before SAM, after SAM,
after CP, and the ground-truth-box ceiling) and the box-search efficiency (``diagnostics.box_search_efficiency``)
where the run recorded them.
"""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any, Sequence

import pandas as pd

from sfdabench import leaderboard as lb
from sfdabench.api import SfdaBenchError, UsageError

log = logging.getLogger("sfdabench")

GROUP = "sfdabench_ablation"
SEARCHES = ("naive", "tbs", "mbs", "dbs")
#: DFG's ablation switches: set by the grid, so an override of one would mislabel the grid's rows.
SWITCH_KEYS = ("method.fa.enabled", "method.search.search", "method.search.stage3", "method.cp",
               "method.stop_after_fa", "method.search.tolerance_scaling", "method.search.steps_scaling",
               "method.search.twin_guard", "method.search.min_coverage", "method.search.coverage_of",
               "method.search.mbs_max_growth")
_VARIANT = re.compile(r"^(?P<fa>fa|nofa)(?P<prior>-srcprior)?(?:(?P<only>-only)|\+(?P<search>naive|tbs|mbs|dbs)(?P<nos3>\+nos3)?"
                      r"\+(?P<cp>cp|nocp)(?P<ltol>\+ltol)?(?P<reach>\+reach)?(?:\+grow(?P<grow>[0-9]+(?:\.[0-9]+)?))?"
                      r"(?:\+cover-(?P<cover_of>pred|region)(?P<cover>100|[1-9][0-9]?))?"
                      r"(?:\+guard-(?P<guard>side|seed))?)$")
STAGE_LABELS = {"source_model": "PL of the source model", "target_model": "PL before SAM", "sam": "PL after SAM",
                "cp": "PL after CP",
                "gt_box_ceiling": "PL ceiling (GT boxes)", "class_keeping_ceiling": "PL ceiling (class-keeping)",
                "efficiency": "box-search efficiency", "efficiency_class_keeping": "efficiency (class-keeping)"}
#: Not a pseudo-label Dice but a ratio of two (``diagnostics.box_search_efficiency``): PL after SAM / ceiling.
EFFICIENCY = "efficiency"


def default_grid() -> list[str]:
    """FA only, then FA on/off x search x CP on/off (stage 3 on)."""
    return ["fa-only"] + [f"{fa}+{search}+{cp}" for fa in ("fa", "nofa") for search in SEARCHES
                          for cp in ("cp", "nocp")]


def search_options_grid() -> list[str]:
    """fa+dbs+cp and the box-search options around it (``variants=search_options``)."""
    return ["fa+dbs+cp", "fa+dbs+cp+ltol", "fa+dbs+cp+reach", "fa+dbs+cp+ltol+reach", "fa+dbs+cp+grow1",
            "fa+dbs+cp+cover-pred50", "fa+dbs+cp+cover-region80", "fa+dbs+cp+guard-side", "fa+dbs+cp+guard-seed"]


#: Named grids for ``variants=<name>``.
GRIDS = {"default": default_grid, "search_options": search_options_grid}


def switches(variant: str) -> dict[str, Any]:
    """The ``method`` settings of a variant name (the inverse of ``DFG.variant()``)."""
    m = _VARIANT.match(variant)
    if m is None or (m["nos3"] and m["search"] not in ("mbs", "dbs")) or (m["prior"] and m["fa"] == "nofa") or \
            ((m["ltol"] or m["reach"] or m["grow"] or m["cover"]) and m["search"] == "naive") or \
            (m["grow"] and (float(m["grow"]) == 0 or f"{float(m['grow']):g}" != m["grow"])):
        raise UsageError(f"unknown DFG variant '{variant}'; names look like fa+dbs+cp, nofa+naive+nocp, "
                         f"fa+mbs+nos3+cp (stage 3 off; mbs/dbs only), "
                         f"fa+dbs+cp+ltol+reach+grow1+cover-pred50+guard-side "
                         f"(options in this order; ltol, reach, grow and cover not for naive), fa-only, "
                         f"fa-srcprior+dbs+cp (FA with the source model's class prior); the default "
                         f"grid: "
                         f"{','.join(default_grid())}")
    fa = {"enabled": m["fa"] == "fa"}
    if m["prior"]:      # only then: the paper's uniform prior is dfg.yaml's default, not a key, so run ids stay
        fa["prior"] = "source_prediction"
    if m["only"]:
        return {"fa": fa, "stop_after_fa": True}
    search = {"search": m["search"], "stage3": not m["nos3"],
              "tolerance_scaling": "length" if m["ltol"] else "area",
              "steps_scaling": "reach" if m["reach"] else "fixed",
              "mbs_max_growth": float(m["grow"]) if m["grow"] else 0.0,
              "min_coverage": int(m["cover"]) / 100 if m["cover"] else 0.0,
              "coverage_of": "prediction" if m["cover_of"] == "pred" else "region",
              "twin_guard": m["guard"] or "none"}
    return {"fa": fa, "search": search, "cp": m["cp"] == "cp", "stop_after_fa": False}


#: (column, Markdown header) of the box-search options that are sfdabench's, not the paper's.
SEARCH_OPTION_COLUMNS = (("tolerances", "tolerances"), ("steps", "step limits"), ("growth", "MBS growth budget"),
                         ("coverage", "coverage"),
                         ("guard", "twin guard"))


def switch_columns(variant: str) -> dict[str, Any]:
    """fa, search, stage3, cp, tolerances, steps, guard of a variant ("-" where the FA-only row has no such
    phase)."""
    sw = switches(variant)
    search = sw.get("search", {})
    return {"fa": sw["fa"]["enabled"], "search": search.get("search", "-"), "stage3": search.get("stage3", "-"),
            "cp": sw.get("cp", "-"), "tolerances": search.get("tolerance_scaling", "-"),
            "steps": search.get("steps_scaling", "-"),
            "growth": ("-" if "mbs_max_growth" not in search
                       else f"{search['mbs_max_growth']:g}" if search["mbs_max_growth"] else "off"),
            "coverage": _coverage_label(search),
            "guard": search.get("twin_guard", "-")}


def _coverage_label(search: dict[str, Any]) -> str:
    """"off", "pred 0.5", "region 0.8" ("-" for the FA-only row)."""
    if "min_coverage" not in search:
        return "-"
    if not search["min_coverage"]:
        return "off"
    return f"{'pred' if search['coverage_of'] == 'prediction' else 'region'} {search['min_coverage']:g}"


def register_variants(variants: Sequence[str]) -> None:
    """Each variant becomes an option of the ``sfdabench_ablation`` config group (see the module doc)."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    for variant in variants:
        store.store(group=GROUP, name=variant, node={"method": switches(variant)}, package="_global_",
                    provider="sfdabench")


def _list(value: str) -> list[str]:
    return [v.strip() for v in value.strip().strip("[]").split(",") if v.strip()]


HELP = """usage: sfdabench ablate task=<t> [seeds=[0,1,2]] [variants=[fa+dbs+cp,fa-only,...]] [table_only=true]
                       [--config-dir DIR] [overrides]

Run DFG's ablation grid (17 variants by default: FA on/off x box search naive/tbs/mbs/dbs x CP on/off, plus
fa-only; fa+mbs+nos3+cp turns stage 3 off; box-search options append +ltol, +reach, +guard-side|seed, and
variants=search_options runs them around fa+dbs+cp) over the seeds as one Hydra multirun, then write
<results_dir>/ablations/<task>/ablation.{csv,md}. Finished runs are skipped; table_only=true only writes
the table. Other overrides apply to every run (preset=test, device=cpu, hydra/launcher=joblib, ...)."""


def parse_args(args: Sequence[str]) -> tuple[list[int], list[str], bool, list[str]]:
    """(seeds, variants, table_only, pass-through Hydra overrides)."""
    from sfdabench.config import expand_config_dirs

    seeds, variants, table_only, overrides = [0, 1, 2], default_grid(), False, []
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
            variants = list(dict.fromkeys(v for name in names
                                          for v in (GRIDS[name]() if name in GRIDS else [name])))
        elif key == "table_only":
            table_only = value.lower() in ("1", "true", "yes")
        elif bare == "seed":
            raise UsageError("ablate takes seeds=[0,1,2] (a list), not seed=")
        elif bare == "method":
            raise UsageError("ablate runs DFG's grid (method=dfg); run other methods with sfdabench run -m")
        elif bare in SWITCH_KEYS:
            raise UsageError(f"{bare} is set by the ablation grid; choose variants=[...] instead "
                             f"(e.g. variants=[fa+dbs+cp,fa+dbs+nocp])")
        else:
            overrides.append(arg)
    if not seeds or not variants:
        raise UsageError("ablate needs at least one seed and one variant")
    for variant in variants:
        switches(variant)  # names checked before anything runs
    _refuse_sweeps(overrides)
    return seeds, variants, table_only, overrides


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


def expected_runs(seeds: Sequence[int], variants: Sequence[str], overrides: Sequence[str]) -> tuple[pd.DataFrame, Any]:
    """(variant, seed, run_id) of every grid run, from the composed configs; and one composed config."""
    from sfdabench.api import _plain
    from sfdabench.plugins import get_registry
    from sfdabench.config import compose_run_config
    from sfdabench.results import config_hash

    dfg = get_registry().get("methods", "dfg")
    records, cfg = [], None
    for variant in variants:
        for seed in seeds:
            cfg = compose_run_config(["method=dfg", f"+{GROUP}={variant}", f"seed={seed}", *overrides])
            named = dfg(cfg.method).variant()
            if named != variant:  # the grid's names must be the names the runs get
                raise SfdaBenchError(f"ablation variant '{variant}' composes to a run named '{named}'")
            records.append({"variant": variant, "seed": seed, "run_id": config_hash(_plain(cfg))})
    return pd.DataFrame(records), cfg


def launch(seeds: Sequence[int], variants: Sequence[str], overrides: Sequence[str]) -> int:
    """One Hydra multirun over variants x seeds (launchers apply); the exit code of the sweep."""
    from sfdabench.config import run

    # prevalidated: expected_runs() composed and checked every grid config already
    return run(["-m", "method=dfg", f"+{GROUP}={','.join(variants)}", f"seed={','.join(map(str, seeds))}",
                *overrides], prevalidated=True)


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


def ablation_table(expected: pd.DataFrame, results_dir: Path) -> tuple[pd.DataFrame, list[str]]:
    """Variant x organ: Dice/ASD/HD95 mean, std, n over seeds, plus ``pl_<stage>_{mean,std,n}`` columns.
    Returns the table and the (variant, seed) of runs that have no leaderboard rows yet."""
    board = lb.read_leaderboard(results_dir) if (results_dir / "leaderboard.csv").is_file() else None
    rows = board[board["run_id"].isin(set(expected["run_id"]))] if board is not None else pd.DataFrame()
    found = set(rows["run_id"]) if len(rows) else set()
    missing = [f"{r.variant} seed {r.seed}" for r in expected.itertuples(index=False) if r.run_id not in found]
    variants = list(dict.fromkeys(expected["variant"]))
    if not len(rows):
        return pd.DataFrame(columns=["variant", "organ"]), missing
    summary = lb.aggregate(rows)
    stats = [f"{m}_{s}" for m in lb.METRICS for s in ("mean", "std", "n") if f"{m}_{s}" in summary]
    keep = ["variant", "organ", "n_seeds", "seeds", *stats] + (["asd_unit"] if "asd_unit" in summary else [])
    columns = pd.DataFrame([{"variant": v, **switch_columns(v)} for v in variants])  # for readers of the CSV
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
    lead = ["variant", "fa", "search", "stage3", "cp", "organ", "n_seeds", "seeds"]
    return table[lead + [c for c in table.columns if c not in lead]], missing


def ablation_markdown(table: pd.DataFrame, task: str, seeds: Sequence[int], missing: Sequence[str]) -> str:
    organs = [o for o in dict.fromkeys(table["organ"]) if o != "mean"]
    stages = [c[3:-5] for c in table.columns if c.startswith("pl_") and c.endswith("_mean")]
    stages = sorted(stages, key=lambda s: list(STAGE_LABELS).index(s) if s in STAGE_LABELS else len(STAGE_LABELS))
    # sfdabench's search options get columns only when a row of the table sets one off its default
    # (the defaults are the paper's variant's values, so they are stated once, by switches())
    paper = switch_columns("fa+dbs+cp")
    options = [(key, label) for key, label in SEARCH_OPTION_COLUMNS
               if key in table.columns and (~table[key].isin([paper[key], "-"])).any()]
    header = ["variant", "FA", "search", "CP", *[label for _, label in options], "seeds", *organs, "mean",
              *[STAGE_LABELS.get(s, f"PL {s}") for s in stages]]
    lines = []
    for variant, g in table.groupby("variant", sort=False):
        by_organ = g.set_index("organ")
        first = g.iloc[0]
        fa_only = first["search"] == "-"
        cells = [variant, "yes" if first["fa"] else "no", "(stop after FA)" if fa_only else first["search"],
                 "-" if fa_only else ("yes" if first["cp"] else "no"),
                 *[str(first[key]) for key, _ in options], str(int(g["n_seeds"].max()))]
        cells += [lb.cell(by_organ, o, "dice") for o in organs + ["mean"]]
        for stage in stages:
            mean_row = by_organ.loc["mean"] if "mean" in by_organ.index else None
            value = None if mean_row is None else mean_row.get(f"pl_{stage}_mean")
            # "-": this variant has no such stage (FA only has no pseudo-labels)
            cells.append("-" if value is None or pd.isna(value) else lb.fmt(value, mean_row.get(f"pl_{stage}_std")))
        lines.append(cells)
    text = (f"### DFG ablation on {task}\n\nTarget-test Dice per organ and mean over organs, mean ± std over "
            f"seeds {', '.join(map(str, seeds))}. PL: pseudo-label Dice (mean over organs) on target-train "
            f"against its ground truth (measured only, never used by the method). PL ceiling: SAM prompted with "
            f"the ground-truth boxes; box-search efficiency: PL after SAM / PL ceiling (mean row).\n\n")
    left = 4 + len(options)
    text += lb.markdown_table(header, lines, ["l"] * left + ["r"] * (len(header) - left)) if lines else "(no runs yet)"
    if missing:
        text += f"\n\nMissing runs ({len(missing)}): {', '.join(missing)}"
    return text + "\n"


def write_table(expected: pd.DataFrame, results_dir: Path, task: str, seeds: Sequence[int]) -> tuple[str, list[str]]:
    from sfdabench.results import atomic_write_text

    table, missing = ablation_table(expected, results_dir)
    text = ablation_markdown(table, task, seeds, missing)
    out = results_dir / "ablations" / task
    atomic_write_text(out / "ablation.csv", table.to_csv(index=False))
    atomic_write_text(out / "ablation.md", text)
    log.info("ablation table: %s, %s", out / "ablation.csv", out / "ablation.md")
    return text, missing


def cmd_ablate(args: Sequence[str]) -> int:
    if any(a in ("-h", "--help") for a in args):
        print(HELP)
        return 0
    seeds, variants, table_only, overrides = parse_args(args)
    register_variants(variants)
    expected, cfg = expected_runs(seeds, variants, overrides)
    results_dir, task = Path(cfg.results_dir), str(cfg.task.name)
    folders = lb.run_folders(results_dir)
    todo = [r for r in expected.itertuples(index=False)
            if not (folders.get(r.run_id, Path("/nonexistent")) / "done").exists()]
    log.info("ablation on %s: %d variants x %d seeds, %d run(s) to do", task, len(variants), len(seeds), len(todo))
    if todo and not table_only:
        code = launch(seeds, variants, overrides)  # finished runs are skipped by the protocol itself
        if code:
            return code  # the failing run printed its one line
    text, missing = write_table(expected, results_dir, task, seeds)
    print(text)
    return 1 if missing and not table_only else 0
