"""``sfdabench source show|export|import``: where a config's cached source model is, and moving it between
machines byte for byte (same weights hash), so that two machines compare methods on the very same weights.
Source training is bit-identical on one machine only (README "Determinism")."""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Sequence

from sfdabench.blocks import atomic
from sfdabench.harness import results
from sfdabench.api import SfdaBenchError, UsageError
from sfdabench.harness.config import compose_run_config
from sfdabench.harness.plugins import get_registry
from sfdabench.harness.protocol import load_task
from sfdabench.harness.source_model import cache_path, load, sidecar, weights_hash

log = logging.getLogger("sfdabench")

USAGE = """usage: sfdabench source {show,export,import} [overrides]

  show   [overrides]              where the cached source model of a config is, its weights hash and meta
  export DEST [overrides]         copy it (byte for byte: same weights hash) to DEST (a file or folder)
  import FILE [overrides] [--force]
                                  install FILE as the source model of this config's (task, seed), so a run
                                  here starts from the very same weights as the machine that exported it

overrides pick the task, seed and source recipe as for `sfdabench run`, e.g. task=phantom_ct2mri seed=1."""


def _resolve(overrides: Sequence[str]):
    """(composed config, loaded task, cache path) of the overrides."""
    cfg = compose_run_config(list(overrides))
    task = load_task(cfg["task"], get_registry(), Path(cfg["cache_dir"]))
    seed = int(cfg["seed"])
    return cfg, task, cache_path(task, cfg["source"], seed, Path(cfg["cache_dir"]))


def cmd_source(args: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="sfdabench source", usage=USAGE, add_help=False)
    parser.add_argument("action", nargs="?")
    parser.add_argument("-h", "--help", action="store_true")
    parser.add_argument("--force", action="store_true")
    ns, rest = parser.parse_known_args(list(args))
    if ns.help or ns.action is None:
        print(USAGE)
        return 0 if ns.help else 2
    if ns.action not in ("show", "export", "import"):
        raise UsageError(f"unknown source action '{ns.action}'; use show, export or import")
    positional = [a for a in rest if "=" not in a and not a.startswith("-")]
    overrides = [a for a in rest if a not in positional]
    if ns.action == "show":
        return _show(overrides)
    if len(positional) != 1:
        raise UsageError(f"sfdabench source {ns.action} needs one path (got {len(positional)}); "
                         f"e.g. sfdabench source {ns.action} {'src.pt' if ns.action == 'export' else 'FILE.pt'} task=...")
    if ns.action == "export":
        return _export(Path(positional[0]), overrides)
    return _import(Path(positional[0]), overrides, ns.force)


def _missing(path: Path, cfg) -> SfdaBenchError:
    return SfdaBenchError(f"no cached source model for task {cfg['task']['name']} seed {cfg['seed']} ({path}); "
                          f"train it with `sfdabench run task={cfg['task']['name']} seed={cfg['seed']}` (every run "
                          f"trains the source model it lacks) or import one with `sfdabench source import FILE`")


def _show(overrides: Sequence[str]) -> int:
    cfg, task, path = _resolve(overrides)
    if not path.is_file():
        raise _missing(path, cfg)
    ckpt = load(path, cfg["source"], task.num_classes)
    print(json.dumps({"path": str(path), "source_weights": ckpt.weights, "source_config": ckpt.key,
                      **{k: v for k, v in ckpt.meta.items() if k != "key"}}, indent=2, default=str))
    return 0


def _export(dest: Path, overrides: Sequence[str]) -> int:
    cfg, _, path = _resolve(overrides)
    if not path.is_file():
        raise _missing(path, cfg)
    if dest.is_dir():
        dest = dest / path.name
    dest.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_bytes(dest, lambda fh: fh.write(path.read_bytes()))
    print(f"exported {path} -> {dest} (source_weights {weights_hash(dest)})")
    return 0


def _import(src: Path, overrides: Sequence[str], force: bool) -> int:
    if not src.is_file():
        raise UsageError(f"no file {src}; pass the .pt written by `sfdabench source export`")
    cfg, task, path = _resolve(overrides)
    incoming = load(src, cfg["source"], task.num_classes)  # readable, and it fits this config's architecture
    meta, seed, key = incoming.meta, int(cfg["seed"]), path.stem.rsplit("-", 1)[-1]
    if meta.get("task") != task.name or int(meta.get("seed", -1)) != seed:
        raise UsageError(f"{src} is the source model of task {meta.get('task')} seed {meta.get('seed')}, not of "
                         f"task {task.name} seed {seed}; pass task={meta.get('task')} seed={meta.get('seed')}")
    if path.is_file() and weights_hash(path) != incoming.weights and not force:
        raise UsageError(f"{path} already holds other source weights ({weights_hash(path)}, incoming "
                         f"{incoming.weights}); pass --force to replace them (runs made with the old weights keep "
                         f"their rows)")
    with results.locked(path):
        atomic.write_bytes(path, lambda fh: fh.write(src.read_bytes()))
        results.write_json(sidecar(path), {"imported_from": str(src.resolve()), "imported_at": results.now_iso(),
                                           "exported_config_key": meta.get("key")})
    if meta.get("key") != key:
        log.warning("imported weights were trained under source config %s; here they stand for %s "
                    "(same task, seed and architecture; recipe settings may differ)", meta.get("key"), key)
    print(f"imported {src} -> {path} (source_weights {incoming.weights})")
    return 0
