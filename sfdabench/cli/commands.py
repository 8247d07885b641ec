"""The built-in subcommands of ``sfdabench``, registered through the ``sfdabench_commands`` hook exactly as a
plugin adds its own (sfdabench/hookspecs.py). Each imports what it needs when it runs, so ``sfdabench list``
does not load Hydra, pandas or matplotlib.
"""
from __future__ import annotations

from typing import Sequence

from sfdabench.api import Command, UsageError
from sfdabench.hookspecs import hookimpl
from sfdabench.harness.plugins import KINDS, get_registry

RESUMABLE = ("the unfinished run's folder was removed; finished runs and cached source models are kept: run the "
             "same command again to resume")

LIST_KINDS = ["methods", "tasks", *[kind for kind in KINDS if kind != "methods"]]

RUN_HELP = """usage: sfdabench run [-m] [--cfg job|hydra|all [--resolve]] [--config-dir DIR] [key=value ...]

Run one method on one task under the matched protocol; every setting is a Hydra override, e.g.
  sfdabench run method=<m> task=phantom_mri2ct seed=0 device=cpu
  sfdabench run method=<m1>,<m2> seed=0,1,2 -m               # multirun: every combination is one run
Names: sfdabench list. The settings of a method: sfdabench run method=<m> --cfg job.

options (anywhere on the line):
  -m, --multirun        sweep the comma-separated values (launchers: hydra/launcher=joblib|sfdabench_slurm)
  --cfg job|hydra|all   print the composed config instead of running (--resolve: resolve interpolations)
  --config-dir DIR      add DIR to the config search path: DIR/task/mytask.yaml makes task=mytask a task
                        (the same: hydra.searchpath=[file:///abs/DIR] or SFDABENCH_CONFIG_PATH=DIR1:DIR2)
  --info [searchpath|defaults|config|...]   how Hydra composed the config
  --hydra-help          Hydra's own help
  -h, --help            this help

Every setting is checked before anything runs; a mistake stops with one line and exit code 2."""

LIST_HELP = """usage: sfdabench list [methods|tasks|datasets|metrics|sam|commands ...]

List the registered plugins of each kind (default: all) with the package that provides them;
methods that read target labels are flagged "not SFDA"; the references of the tables (lower: no adaptation,
upper: target-supervised) and the methods that declare ablation grids (sfdabench ablate method=<m>) say so."""


class Run(Command):
    """Run one method on one task under the matched protocol (Hydra; -m sweeps)."""

    name = "run"
    usage = """run [overrides]        run one method on one task (Hydra: method=<m> task=<t> seed=<n> device=auto|cpu|cuda)
                         add -m for a multirun sweep, e.g. sfdabench run -m method=<m1>,<m2> seed=0,1,2;
                         --cfg job prints the config, --config-dir DIR adds your own tasks (DIR/task/<t>.yaml)"""
    interrupted = RESUMABLE

    @staticmethod
    def main(args: Sequence[str]) -> int:
        from sfdabench.harness.launch import run

        if any(a in ("-h", "--help") for a in args):
            print(RUN_HELP)
            return 0
        return run(args)


class List(Command):
    """List the registered plugins of each kind."""

    name = "list"
    usage = """list [KIND]            list plugins: """ + " | ".join(LIST_KINDS) + """ (default: all)"""

    @staticmethod
    def main(args: Sequence[str]) -> int:
        return cmd_list(args)


class Prepare(Command):
    """Preprocess a task's real data into the cache."""

    name = "prepare"
    usage = """prepare task=<t> [data.<dataset>.root=<dir>]
                         preprocess a task's real data into the cache (run does it too when needed)"""
    interrupted = "cases prepared so far stay cached: run the same command again to finish"

    @staticmethod
    def main(args: Sequence[str]) -> int:
        from sfdabench.harness.prepare import cmd_prepare

        return cmd_prepare(list(args))


class Leaderboard(Command):
    """Aggregate leaderboard rows over seeds."""

    name = "leaderboard"
    usage = """leaderboard [RESULTS...] [--out DIR] [--allow-mixed COL[,COL]]
                         aggregate leaderboard rows over seeds (mean ± std, n, ranks) -> CSV, Markdown, PNG"""

    @staticmethod
    def main(args: Sequence[str]) -> int:
        from sfdabench.analysis.leaderboard import cmd_leaderboard

        return cmd_leaderboard(list(args))


class Compare(Command):
    """Deltas, rank changes and paired tests between two leaderboards."""

    name = "compare"
    usage = """compare A B [--metric dice] [--max-regression 0.01] [--out report.md]
                         deltas, rank changes and paired Wilcoxon tests between two leaderboards;
                         exit code 1 when a row regressed by more than --max-regression (for CI)"""

    @staticmethod
    def main(args: Sequence[str]) -> int:
        from sfdabench.analysis.compare import cmd_compare

        return cmd_compare(list(args))


class Ablate(Command):
    """Run the ablation grid a method declares and write its table."""

    name = "ablate"
    usage = """ablate method=<m> task=<t> [seeds=[0,1,2]] [variants=[<v1>,<v2>|<grid>]] [overrides]
                         run the ablation grid a method declares (Hydra multirun) and write its table"""
    interrupted = RESUMABLE

    @staticmethod
    def main(args: Sequence[str]) -> int:
        from sfdabench.analysis.ablate import cmd_ablate

        return cmd_ablate(list(args))


class Report(Command):
    """An HTML page of one run."""

    name = "report"
    usage = """report RUN_DIR [--out DIR] [--max-cases N]
                         an HTML page of one run: metrics, overlays, pseudo-label quality, box search, timings"""

    @staticmethod
    def main(args: Sequence[str]) -> int:
        from sfdabench.analysis.report import cmd_report

        return cmd_report(list(args))


class Source(Command):
    """Show, export or import a cached source model."""

    name = "source"
    usage = """source show|export|import ...
                         share a source checkpoint so two people compare methods on the very same weights"""

    @staticmethod
    def main(args: Sequence[str]) -> int:
        from sfdabench.cli.source_cli import cmd_source

        return cmd_source(list(args))


def cmd_list(args: Sequence[str]) -> int:
    if any(a in ("-h", "--help") for a in args):
        print(LIST_HELP)
        return 0
    registry = get_registry()
    kinds = list(args) or list(LIST_KINDS)
    for kind in kinds:
        if kind not in LIST_KINDS:
            raise UsageError(f"unknown list kind '{kind}'; available: {', '.join(LIST_KINDS)}")
    for kind in kinds:
        entries = registry.tasks() if kind == "tasks" else registry.entries[kind]
        print(f"{kind}:")
        width = max((len(n) for n in entries), default=0)
        dwidth = max((len(e.distribution) for e in entries.values()), default=0)
        for name, entry in entries.items():
            flag = ""
            if kind == "methods":
                flag = " [uses target labels: not SFDA]" if entry.obj.uses_target_labels else ""
                if entry.obj.reference:
                    flag += f" [{entry.obj.reference} reference]"
                if entry.obj.ablation is not None:
                    grids = entry.obj.ablation.grids
                    flag += (" [ablation grids: " + ", ".join(f"{g} ({len(v)} variants)" for g, v in grids.items())
                             + "]")
            print(f"  {name:<{width}}  {entry.distribution:<{dwidth}}  {entry.description}{flag}")
        if not entries:
            print("  (none)")
    for failure in registry.failures:
        print(f"failed plugin: {failure.plugin} ({failure.distribution}): {failure.error}")
    return 0


@hookimpl
def sfdabench_commands():
    return [Run, List, Prepare, Leaderboard, Compare, Ablate, Report, Source]
