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

from sfdabench.api import UsageError
# Shared with run and ablate (and imported from here by older callers).
from sfdabench.harness.config import compose_run_config  # noqa: F401

HELP = """usage: sfdabench prepare task=<t> [data.<dataset>.root=<dir>] [--config-dir DIR] [overrides]

Preprocess the real data of a task (both domains, train and test splits) into <cache_dir>/prepared/, with
timings. Optional: sfdabench run prepares missing cases by itself. The phantom tasks have nothing to prepare.
  sfdabench prepare task=mri2ct data.chaos.root=/data/CHAOS data.btcv.root=/data/BTCV
An interrupted prepare keeps the cases it finished; running it again continues."""


def cmd_prepare(args: list[str]) -> int:
    from sfdabench.harness.plugins import get_registry

    if any(a in ("-h", "--help") for a in args):
        print(HELP)
        return 0
    if any(a in ("-m", "--multirun") for a in args):
        raise UsageError("prepare takes no -m: list one task (it prepares every split of both domains)")
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

