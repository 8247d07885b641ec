"""The source model every method of a (task, seed) starts from: trained once, cached, named by content.

Two names, two facts:
- ``source_config`` (:func:`config_key`): a hash of (task, organs, source data fingerprint, seed, source
  recipe). It names the cache entry, i.e. the *recipe*; two machines (or thread counts) may make different
  weights from one recipe.
- ``source_weights`` (:func:`weights_hash`): SHA-256 of the checkpoint file. It names the *weights*, and it
  is what the matched protocol compares: every method of a (task, seed) must report the same value.

The checkpoint file holds only what the weights determine (state dict and a meta dict of recipe facts), so
identical weights give an identical file and hash; wall-clock facts (``train_seconds``) live in a JSON sidecar.
``sfdabench source export/import`` move a checkpoint between machines byte for byte (sfdabench/cli/source_cli.py).
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from sfdabench.blocks import atomic
from sfdabench.harness import results
from sfdabench.harness.results import stable_hash
from sfdabench.api import SfdaBenchError, SliceDataset, _plain
from sfdabench.harness.determinism import seed_everything
from sfdabench.blocks.nets import build_segmenter

log = logging.getLogger("sfdabench")

#: Hex digits of the SHA-256 kept in rows (64 bits: collisions are not a practical concern).
WEIGHTS_HASH_CHARS = 16


@dataclass
class SourceCheckpoint:
    model: nn.Module
    key: str                  # source_config: the recipe's cache key
    weights: str              # source_weights: SHA-256 prefix of the checkpoint file
    path: Path
    meta: dict[str, Any]      # recipe facts stored in the file + the sidecar's wall-clock facts


def config_key(task, source_cfg: Mapping[str, Any], seed: int) -> str:
    adapter = task.source.dataset
    data_fp = adapter.fingerprint(adapter.case_ids("train"))
    return stable_hash({"task": task.name, "organs": task.organs, "data": data_fp, "seed": seed,
                        "source": recipe_of(source_cfg)})


def recipe_of(source_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The source config without the budget keys the training loop ignores (``epochs`` and
    ``lr_step_epochs`` when the budget is in ``steps``), so the cache key names only what makes the weights."""
    recipe = _plain(source_cfg)
    if recipe.get("steps") is not None:
        recipe = {k: v for k, v in recipe.items() if k not in ("epochs", "lr_step_epochs")}
    return recipe


def cache_path(task, source_cfg: Mapping[str, Any], seed: int, cache_dir: Path) -> Path:
    return Path(cache_dir) / "source" / f"{task.name}-seed{seed}-{config_key(task, source_cfg, seed)}.pt"


def weights_hash(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:WEIGHTS_HASH_CHARS]


def sidecar(path: Path) -> Path:
    return path.with_suffix(".json")


def _read_blob(path: Path) -> dict[str, Any]:
    try:
        blob = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the user's to replace
        raise SfdaBenchError(f"source checkpoint {path} is not a readable torch file ({type(exc).__name__}); "
                             f"delete it to retrain, or import a good one with `sfdabench source import`") from None
    if not isinstance(blob, dict) or "state_dict" not in blob or "meta" not in blob:
        raise SfdaBenchError(f"{path} is not an sfdabench source checkpoint (no state_dict/meta); "
                             f"export one with `sfdabench source export`")
    return blob


def load(path: Path, source_cfg: Mapping[str, Any], num_classes: int) -> SourceCheckpoint:
    blob = _read_blob(path)
    model = build_segmenter(source_cfg, num_classes)
    try:
        model.load_state_dict(blob["state_dict"])
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise SfdaBenchError(f"source checkpoint {path} does not fit the source architecture of this config "
                             f"({first}); use the source settings it was trained with") from None
    meta = dict(blob["meta"])
    side = sidecar(path)
    if side.is_file():
        meta.update(json.loads(side.read_text()))
    return SourceCheckpoint(model, str(blob["meta"].get("key", "")), weights_hash(path), path, meta)


def train_or_load(task, source_cfg: Mapping[str, Any], seed: int, device: torch.device, cache_dir: Path,
                  metrics: Mapping[str, Any], progress) -> SourceCheckpoint:
    """The cached source model of (task, seed), trained now if the cache has none. Concurrent runs wait on a
    lock instead of training the same model twice."""
    from sfdabench.harness.evaluation import evaluate
    from sfdabench.blocks.training import train_supervised

    key = config_key(task, source_cfg, seed)
    path = Path(cache_dir) / "source" / f"{task.name}-seed{seed}-{key}.pt"
    with results.locked(path):
        if path.exists():
            ckpt = load(path, source_cfg, task.num_classes)
            log.info("source model: cached %s (weights %s)", path, ckpt.weights)
            return ckpt
        log.info("source model: training %s (cache key %s)", source_cfg.get("arch", "unet"), key)
        seed_everything(seed)
        model = build_segmenter(source_cfg, task.num_classes)
        start = time.perf_counter()
        losses = train_supervised(model, SliceDataset(task.source.splits["train"], labels=True), source_cfg,
                                  device=device, generator=torch.Generator().manual_seed(seed),
                                  progress=progress, desc="source training")
        train_s = time.perf_counter() - start
        # In-domain quality on the *source* test split: reported, never used to pick a checkpoint.
        _, in_domain = evaluate(model, task.source.splits["test"], task.organs, {"dice": metrics["dice"]},
                                device=device, progress=progress)
        meta = {"key": key, "task": task.name, "seed": seed, "selection": "last",
                "train_threads": torch.get_num_threads(), "device": str(device), "torch": torch.__version__,
                "final_loss": losses[-1] if losses else None,
                "in_domain_dice": {k: float(v) for k, v in in_domain["dice"].items()}}
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        atomic.write_bytes(path, lambda fh: torch.save({"state_dict": state, "meta": meta}, fh))
        results.write_json(sidecar(path), {"train_seconds": train_s, "trained_at": results.now_iso()})
        ckpt = SourceCheckpoint(model.cpu(), key, weights_hash(path), path, {**meta, "train_seconds": train_s})
        log.info("source model: in-domain mean Dice %.4f, weights %s, saved %s",
                 meta["in_domain_dice"]["mean"], ckpt.weights, path)
        return ckpt
