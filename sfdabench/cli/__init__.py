"""The ``sfdabench`` command: ``sfdabench <command> [args]``, where every command is a plugin
(:class:`sfdabench.api.Command`, hook ``sfdabench_commands``; the built-in ``run``, ``list``, ``prepare``,
``leaderboard``, ``compare``, ``ablate``, ``report`` and ``source`` are in sfdabench/cli/commands.py).

``sfdabench run method=<m> task=<t> seed=<n> [overrides]`` composes ``configs/run.yaml`` with the
config groups of every plugin and the user's config folders (Hydra search path) and runs one protocol run
per job; ``-m`` gives a Hydra multirun sweep. Names, keys and values of every job are checked before Hydra
starts (sfdabench/harness/config.py), so a mistake gives one line and exit code 2 instead of a traceback; Ctrl-C
gives one line and exit code 130.
"""
from __future__ import annotations

import logging
import sys
from typing import Sequence

from sfdabench.api import SfdaBenchError
from sfdabench.harness.config import setup_logging

log = logging.getLogger("sfdabench")


def usage(commands) -> str:
    """``sfdabench --help``: every registered command's usage entry."""
    lines = "\n".join(f"  {entry.obj.usage or entry.name}" for entry in commands.values())
    return (f"usage: sfdabench <command> [args]\n\ncommands:\n{lines}\n\n"
            "sfdabench <command> --help: the usage of one command. A mistake stops with one line (exit code 2).\n")


def main(argv: Sequence[str] | None = None) -> int:
    from sfdabench.harness.plugins import get_registry

    argv = list(sys.argv[1:] if argv is None else argv)
    setup_logging()
    try:
        commands = get_registry().entries["commands"]
    except SfdaBenchError as exc:  # e.g. two plugins register the same name
        print(f"sfdabench: error: {exc}", file=sys.stderr)
        return exc.exit_code
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage(commands))
        return 0 if argv else 2
    name, args = argv[0], argv[1:]
    if name not in commands:
        print(f"sfdabench: unknown command '{name}'; available: {', '.join(commands)}", file=sys.stderr)
        return 2
    command = commands[name].obj
    try:
        return command.main(args) or 0
    except SfdaBenchError as exc:
        print(f"sfdabench: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        # 130 = 128 + SIGINT, what a shell reports for a command stopped by Ctrl-C.
        print(f"sfdabench: error: interrupted (Ctrl-C); {command.interrupted}", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`sfdabench run --cfg job | head`): not an error. Point stdout at devnull so
        # that flushing it at exit does not raise again (Python docs, "Note on SIGPIPE").
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
