"""The ``sfdabench`` command: ``run`` (Hydra), ``list``, ``prepare`` (real data, see sfdabench/prepare.py),
``leaderboard``, ``compare``, ``ablate`` and ``report`` (see sfdabench/leaderboard.py, compare.py, ablate.py,
report.py).

``sfdabench run method=<m> task=<t> seed=<n> [overrides]`` composes ``configs/run.yaml`` with the
config groups of every plugin and the user's config folders (Hydra search path) and runs one protocol run
per job; ``-m`` gives a Hydra multirun sweep. Names, keys and values of every job are checked before Hydra
starts (sfdabench/config.py), so a mistake gives one line and exit code 2 instead of a traceback; Ctrl-C
gives one line and exit code 130.
"""
from __future__ import annotations

import logging
import sys
from typing import Sequence

from sfdabench.api import SfdaBenchError, UsageError
# Composition, validation and the Hydra entry live in sfdabench.config (prepare and ablate use them too,
# without importing this module). Re-exported for existing callers; launchers pickle ``_job`` by its
# qualified name, sfdabench.config._job.
from sfdabench.config import _job, hydra_searchpath_override, setup_logging, validate_overrides  # noqa: F401

log = logging.getLogger("sfdabench")

USAGE = """usage: sfdabench <command> [args]

commands:
  run [overrides]        run one method on one task (Hydra: method=<m> task=<t> seed=<n> device=auto|cpu|cuda)
                         add -m for a multirun sweep, e.g. sfdabench run -m method=<m1>,<m2> seed=0,1,2;
                         --cfg job prints the config, --config-dir DIR adds your own tasks (DIR/task/<t>.yaml)
  list [KIND]            list plugins: methods | tasks | datasets | metrics | sam (default: all)
  prepare task=<t> [data.<dataset>.root=<dir>]
                         preprocess a task's real data into the cache (run does it too when needed)
  leaderboard [RESULTS...] [--out DIR] [--allow-mixed COL[,COL]]
                         aggregate leaderboard rows over seeds (mean ± std, n, ranks) -> CSV, Markdown, PNG
  compare A B [--metric dice] [--max-regression 0.01] [--out report.md]
                         deltas, rank changes and paired Wilcoxon tests between two leaderboards;
                         exit code 1 when a row regressed by more than --max-regression (for CI)
  ablate method=<m> task=<t> [seeds=[0,1,2]] [variants=[<v1>,<v2>|<grid>]] [overrides]
                         run the ablation grid a method declares (Hydra multirun) and write its table
  report RUN_DIR [--out DIR] [--max-cases N]
                         an HTML page of one run: metrics, overlays, pseudo-label quality, box search, timings
  source export|import ...
                         share a source checkpoint so two people compare methods on the very same weights

sfdabench <command> --help: the usage of one command. A mistake stops with one line (exit code 2).
"""

LIST_KINDS = {"methods": "methods", "tasks": "tasks", "datasets": "datasets", "metrics": "metrics", "sam": "sam"}


#: What an interrupted command leaves behind, for the one line printed on Ctrl-C.
INTERRUPTED = {
    "run": "the unfinished run's folder was removed; finished runs and cached source models are kept: "
           "run the same command again to resume",
    "ablate": "the unfinished run's folder was removed; finished runs and cached source models are kept: "
              "run the same command again to resume",
    "prepare": "cases prepared so far stay cached: run the same command again to finish",
}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    setup_logging()
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0 if argv else 2
    command, args = argv[0], argv[1:]
    commands = {"run": cmd_run, "list": cmd_list, "prepare": _cmd_prepare, "leaderboard": _cmd_leaderboard,
                "compare": _cmd_compare, "ablate": _cmd_ablate, "report": _cmd_report, "source": _cmd_source}
    if command not in commands:
        print(f"sfdabench: unknown command '{command}'; available: {', '.join(commands)}", file=sys.stderr)
        return 2
    try:
        return commands[command](args) or 0
    except SfdaBenchError as exc:
        print(f"sfdabench: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        # 130 = 128 + SIGINT, what a shell reports for a command stopped by Ctrl-C.
        print(f"sfdabench: error: interrupted (Ctrl-C); {INTERRUPTED.get(command, 'nothing was left half-written')}",
              file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`sfdabench run --cfg job | head`): not an error. Point stdout at devnull so
        # that flushing it at exit does not raise again (Python docs, "Note on SIGPIPE").
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def _cmd_prepare(args: Sequence[str]) -> int:
    from sfdabench.prepare import cmd_prepare  # lazy: imports Hydra and the dataset readers

    return cmd_prepare(list(args))


# Lazy imports: pandas/matplotlib/scipy load only for the command that needs them.
def _cmd_leaderboard(args: Sequence[str]) -> int:
    from sfdabench.leaderboard import cmd_leaderboard

    return cmd_leaderboard(list(args))


def _cmd_compare(args: Sequence[str]) -> int:
    from sfdabench.compare import cmd_compare

    return cmd_compare(list(args))


def _cmd_report(args: Sequence[str]) -> int:
    from sfdabench.report import cmd_report

    return cmd_report(list(args))


def _cmd_source(args: Sequence[str]) -> int:
    from sfdabench.source_model import cmd_source

    return cmd_source(list(args))


def _cmd_ablate(args: Sequence[str]) -> int:
    from sfdabench.ablate import cmd_ablate

    return cmd_ablate(list(args))


# ------------------------------------------------------------------------------------------- list


def cmd_list(args: Sequence[str]) -> int:
    from sfdabench.plugins import get_registry

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
                    flag += (f" [ablation grids: " + ", ".join(f"{g} ({len(v)} variants)" for g, v in grids.items())
                             + "]")
            print(f"  {name:<{width}}  {entry.distribution:<{dwidth}}  {entry.description}{flag}")
        if not entries:
            print("  (none)")
    for failure in registry.failures:
        print(f"failed plugin: {failure.plugin} ({failure.distribution}): {failure.error}")
    return 0


# -------------------------------------------------------------------------------------------- run

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

LIST_HELP = """usage: sfdabench list [methods|tasks|datasets|metrics|sam ...]

List the registered plugins of each kind (default: all) with the package that provides them;
methods that read target labels are flagged "not SFDA"; the references of the tables (lower: no adaptation,
upper: target-supervised) and the methods that declare ablation grids (sfdabench ablate method=<m>) say so."""


def cmd_run(args: Sequence[str]) -> int:
    from sfdabench.config import run

    if any(a in ("-h", "--help") for a in args):
        print(RUN_HELP)
        return 0
    return run(args)


