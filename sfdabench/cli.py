"""The ``sfdabench`` command: ``run`` (Hydra), ``list``, ``prepare`` (real data, see sfdabench/prepare.py),
``leaderboard``, ``compare``, ``ablate`` and ``report`` (see sfdabench/leaderboard.py, compare.py, ablate.py,
report.py).

``sfdabench run method=<m> task=<t> seed=<n> [overrides]`` composes ``configs/run.yaml`` with the
config groups of every plugin (Hydra search path) and runs one protocol run per job; ``-m`` gives a
Hydra multirun sweep. Names are checked against the registry before Hydra starts, so a typo gives one
line and exit code 2 instead of a traceback.
"""
from __future__ import annotations

import logging
import re
import sys
from typing import Sequence

from sfdabench.api import SfdaBenchError, UsageError

log = logging.getLogger("sfdabench")

USAGE = """usage: sfdabench <command> [args]

commands:
  run [overrides]        run one method on one task (Hydra: method=<m> task=<t> seed=<n> device=auto|cpu|cuda)
                         add -m for a multirun sweep, e.g. sfdabench run -m method=source_only,oracle seed=0,1,2
  list [KIND]            list plugins: methods | tasks | datasets | metrics | sam (default: all)
  prepare task=<t> [data.<dataset>.root=<dir>]
                         preprocess a task's real data into the cache (run does it too when needed)
  leaderboard [RESULTS...] [--out DIR] [--allow-mixed COL[,COL]]
                         aggregate leaderboard rows over seeds (mean ± std, n, ranks) -> CSV, Markdown, PNG
  compare A B [--metric dice] [--max-regression 0.01] [--out report.md]
                         deltas, rank changes and paired Wilcoxon tests between two leaderboards;
                         exit code 1 when a row regressed by more than --max-regression (for CI)
  ablate task=<t> [seeds=[0,1,2]] [variants=[fa+dbs+cp,fa-only]] [overrides]
                         run the DFG ablation grid (Hydra multirun) and write the ablation table
  report RUN_DIR [--out DIR] [--max-cases N]
                         an HTML page of one run: metrics, overlays, pseudo-label quality, box search, timings
"""

LIST_KINDS = {"methods": "methods", "tasks": "tasks", "datasets": "datasets", "metrics": "metrics", "sam": "sam"}


def setup_logging(level: int = logging.INFO) -> None:
    root = logging.getLogger()
    if not any(getattr(h, "_sfdabench", False) for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("[%(asctime)s %(name)s %(levelname)s] %(message)s", "%H:%M:%S"))
        handler._sfdabench = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    root.setLevel(level)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    setup_logging()
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0 if argv else 2
    command, args = argv[0], argv[1:]
    commands = {"run": cmd_run, "list": cmd_list, "prepare": _cmd_prepare, "leaderboard": _cmd_leaderboard,
                "compare": _cmd_compare, "ablate": _cmd_ablate, "report": _cmd_report}
    if command not in commands:
        print(f"sfdabench: unknown command '{command}'; available: {', '.join(commands)}", file=sys.stderr)
        return 2
    try:
        return commands[command](args) or 0
    except SfdaBenchError as exc:
        print(f"sfdabench: error: {exc}", file=sys.stderr)
        return exc.exit_code


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


def _cmd_ablate(args: Sequence[str]) -> int:
    from sfdabench.ablate import cmd_ablate

    return cmd_ablate(list(args))


# ------------------------------------------------------------------------------------------- list


def cmd_list(args: Sequence[str]) -> int:
    from sfdabench.plugins import get_registry

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
            print(f"  {name:<{width}}  {entry.distribution:<{dwidth}}  {entry.description}{flag}")
        if not entries:
            print("  (none)")
    for failure in registry.failures:
        print(f"failed plugin: {failure.plugin} ({failure.distribution}): {failure.error}")
    return 0


# -------------------------------------------------------------------------------------------- run

_GROUP_OVERRIDE = re.compile(r"^(?P<group>method|task|sam)=(?P<value>[^()]*)$")


def validate_overrides(args: Sequence[str]) -> None:
    """Check ``method=``, ``task=`` and ``sam=`` values (also comma sweeps) against what is registered."""
    from sfdabench.plugins import get_registry

    registry = get_registry()
    for arg in args:
        m = _GROUP_OVERRIDE.match(arg)
        if not m:
            continue
        group = m["group"]
        configs = registry.config_options(group)
        for value in filter(None, (v.strip() for v in m["value"].split(","))):
            if group == "task":
                available = list(configs)
            else:
                kind = {"method": "methods", "sam": "sam"}[group]
                available = [n for n in registry.names(kind) if n in configs]
                if value in registry.names(kind) and value not in configs:
                    raise UsageError(f"{group} '{value}' is registered but has no config file {group}/{value}.yaml "
                                     f"on the config search path; its plugin must ship one")
            if value not in available:
                raise UsageError(f"unknown {group} '{value}'; available: {', '.join(available) or '(none)'}")


def hydra_searchpath_override(args: Sequence[str]) -> list[str]:
    """Plugin config groups enter Hydra's search path through a ``hydra.searchpath`` override."""
    from sfdabench.plugins import get_registry

    paths = [p for _, p in get_registry().config_searchpath()]
    user = [a for a in args if a.startswith("hydra.searchpath=")]
    if user:
        extra = user[0].split("=", 1)[1].strip("[]")
        paths += [p.strip() for p in extra.split(",") if p.strip()]
    return [a for a in args if not a.startswith("hydra.searchpath=")] + [f"hydra.searchpath=[{','.join(paths)}]"]


def cmd_run(args: Sequence[str]) -> int:
    validate_overrides(args)
    hydra_args = hydra_searchpath_override(args)
    saved = sys.argv
    sys.argv = ["sfdabench run", *hydra_args]
    try:
        _hydra_run()
    finally:
        sys.argv = saved
    return 0


def _job(cfg) -> None:
    """One Hydra job = one protocol run. User errors end the process with one line and their exit code."""
    from sfdabench.protocol import execute, format_table

    setup_logging()
    try:
        summary = execute(cfg)
    except SfdaBenchError as exc:
        print(f"sfdabench: error: {exc}", file=sys.stderr)
        raise SystemExit(exc.exit_code) from None
    print(format_table(summary))
    print(f"run folder: {summary['run_dir']}")


def _hydra_run() -> None:
    import hydra

    hydra.main(version_base=None, config_path="pkg://sfdabench_configs", config_name="run")(_job)()
