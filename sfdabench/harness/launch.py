"""``sfdabench run``: check every job's config (sfdabench.harness.config), then launch Hydra, one protocol run per job.

Hydra's ``hydra.main`` reads its flags (``-m``, ``--cfg``, ``hydra/launcher=...``) from ``sys.argv``; it has no
other entry that keeps the launchers and sweepers, so :func:`run` sets ``sys.argv`` for the call and restores
it. Launchers pickle :func:`_job` by its qualified name, ``sfdabench.harness.launch._job``.
"""
from __future__ import annotations

import sys
from typing import Sequence

from sfdabench.api import SfdaBenchError
from sfdabench.harness.config import (compose_config, hydra_searchpath_override, parse_run_args, setup_logging,
                                      sweep_jobs, validate_config, validate_overrides)


def run(args: Sequence[str], prevalidated: bool = False) -> int:
    """``sfdabench run``: check names, compose and validate every job, then launch Hydra (exit code).
    ``prevalidated``: the caller already composed and validated every job (``ablate``)."""
    ra = parse_run_args(args)
    validate_overrides(ra.overrides)
    if not prevalidated:
        # A sweep only Hydra can expand (None) is left to the checks execute() repeats in every job.
        jobs = (sweep_jobs(ra.overrides) or []) if ra.multirun else [ra.overrides]
        from sfdabench.harness.plugins import get_registry

        registry = get_registry()
        for job in jobs:
            cfg = compose_config(job)
            if ra.runs:
                validate_config(cfg, registry)
    saved = sys.argv
    sys.argv = ["sfdabench run", *ra.flags, *hydra_searchpath_override(ra.overrides)]
    try:
        _hydra_main()
    except SystemExit as exc:  # Hydra and _job end with sys.exit(code)
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        sys.argv = saved
        from hydra.core.global_hydra import GlobalHydra

        GlobalHydra.instance().clear()  # hydra.main leaves itself initialised; a later compose would refuse
    return 0


def _hydra_main() -> None:
    import hydra

    hydra.main(version_base=None, config_path="pkg://sfdabench_configs", config_name="run")(_job)()


def _job(cfg) -> None:
    """One Hydra job = one protocol run. User errors end the process with one line and their exit code."""
    from sfdabench.harness.protocol import execute, format_table

    setup_logging()
    try:
        summary = execute(cfg)
    except SfdaBenchError as exc:
        print(f"sfdabench: error: {exc}", file=sys.stderr)
        raise SystemExit(exc.exit_code) from None
    print(format_table(summary))
    print(f"run folder: {summary['run_dir']}")
