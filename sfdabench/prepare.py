"""``sfdabench prepare task=<t> [data.<dataset>.root=<dir>] [overrides]``: preprocess a task's real data once.

The config is composed exactly as for ``run`` (same primary config, plugin search path and name checks), then
both domains' dataset adapters prepare every case of their train and test splits into the cache
(``<cache_dir>/prepared/<dataset>-<hash of settings>/``). ``run`` reuses that cache, and prepares missing or
outdated cases by itself, so this command is optional: it front-loads the work and reports timings.
Adapters without a ``prepare`` method (the generated phantom) have nothing to prepare.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Sequence

from sfdabench.api import UsageError


def compose_run_config(args: Sequence[str]) -> Any:
    """The composed ``run`` config for these overrides, via Hydra's compose API (no job, no output dir)."""
    from hydra import compose, initialize_config_module
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from sfdabench.cli import hydra_searchpath_override, validate_overrides

    if any(a in ("-m", "--multirun") for a in args):
        raise UsageError("prepare takes no -m: list one task (it prepares every split of both domains)")
    validate_overrides(args)
    try:
        with initialize_config_module("sfdabench_configs", version_base=None):
            cfg = compose("run", overrides=hydra_searchpath_override(args))
        # resolve now, so that a bad interpolation is a usage error and not a traceback later
        from omegaconf import OmegaConf

        OmegaConf.resolve(cfg)
    except (HydraException, OmegaConfBaseException) as exc:
        raise UsageError(" ".join(str(exc).split())) from None
    return cfg


def cmd_prepare(args: list[str]) -> int:
    from sfdabench.plugins import get_registry

    cfg = compose_run_config(args)
    registry = get_registry()
    task = cfg.task
    organs = list(task.organs)
    cache_dir = Path(cfg.cache_dir)
    print(f"task {task.name}: {task.get('data_protocol', '')}")
    total_start = time.perf_counter()
    counts = {"prepared": 0, "cached": 0}
    for side in ("source", "target"):
        domain = task[side]
        adapter = registry.get("datasets", domain.dataset)(domain, organs, cache_dir)
        if not hasattr(adapter, "prepare"):
            print(f"{side}: dataset {domain.dataset} is generated on the fly; nothing to prepare")
            continue
        start = time.perf_counter()
        records = adapter.prepare()
        print(f"{side}: dataset {domain.dataset}, {len(records)} cases -> {adapter.cache.folder}")
        width = max((len(r.case_id) for r in records), default=0)
        for r in records:
            counts[r.status] += 1
            print(f"  {r.case_id:<{width}}  {r.status:<8}  {r.seconds:7.2f} s  {'x'.join(map(str, r.shape))}")
        print(f"  {side} total {time.perf_counter() - start:.1f} s")
    print(f"total: {counts['prepared']} prepared, {counts['cached']} already cached, "
          f"{time.perf_counter() - total_start:.1f} s")
    return 0

