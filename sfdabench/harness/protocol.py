"""The matched protocol: load a task, train or load the shared source checkpoint, run one method, evaluate,
record. The harness names no method: it looks everything up in the plugin registry by the config's names.
"""
from __future__ import annotations

import copy
import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pandas as pd
import torch

from sfdabench.harness import results, source_model
from sfdabench.harness.determinism import flush_denormals, seed_everything, use_deterministic_kernels
from sfdabench.api import Case, Context, Method, SfdaBenchError, TargetImages, _plain
from sfdabench.harness.evaluation import evaluate
from sfdabench.harness.label_diagnostics import TargetLabelDiagnostics
from sfdabench.harness.plugins import Registry, get_registry

log = logging.getLogger("sfdabench")

#: Bump when metric code changes results; leaderboards refuse to merge rows of different versions.
METRIC_VERSION = "1"


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SfdaBenchError(f"device={name} was requested but CUDA is not available; use device=cpu or device=auto")
    if name != "cpu" and not name.startswith("cuda"):
        raise SfdaBenchError(f"unknown device '{name}'; use device=auto, cpu or cuda[:N]")
    return torch.device(name)


# ------------------------------------------------------------------------------------------- task


@dataclass
class Domain:
    dataset: Any                      # a DatasetAdapter instance
    splits: dict[str, list[Case]] = field(default_factory=dict)


@dataclass
class Task:
    name: str
    organs: list[str]
    data_protocol: str
    source: Domain
    target: Domain

    @property
    def num_classes(self) -> int:
        return len(self.organs) + 1


def load_task(task_cfg: Mapping[str, Any], registry: Registry, cache_dir: Path) -> Task:
    """Instantiate the task's dataset adapters and load its four splits (source/target x train/test)."""
    organs = list(task_cfg["organs"])
    domains = {}
    for side in ("source", "target"):
        dcfg = task_cfg[side]
        adapter = registry.get("datasets", dcfg["dataset"])(dcfg, organs, cache_dir)
        domain = Domain(adapter)
        for split in ("train", "test"):
            domain.splits[split] = [adapter.load_case(cid) for cid in adapter.case_ids(split)]
            if not domain.splits[split]:
                raise SfdaBenchError(f"task {task_cfg['name']}: {side} split '{split}' is empty; "
                                     f"list its cases under {side}.splits.{split}")
        domains[side] = domain
    return Task(task_cfg["name"], organs, str(task_cfg.get("data_protocol", "")), domains["source"],
                domains["target"])


# ------------------------------------------------------------------------------------------- run


def build_metrics(metrics_cfg: Mapping[str, Any], registry: Registry) -> dict[str, Any]:
    opts = {k: v for k, v in _plain(metrics_cfg).items() if k != "names"}
    return {name: registry.get("metrics", name)(opts) for name in metrics_cfg["names"]}


def run_name(task: str, method: str, variant: str, seed: int, run_id: str) -> str:
    return f"{task}__{method}__{variant}__seed{seed}__{run_id}"


def execute(cfg: Mapping[str, Any], registry: Registry | None = None) -> dict[str, Any]:
    """Run one (task, method, seed) under the protocol; returns the run summary.

    The whole config is validated first (sfdabench.harness.config.validate_config). A run that fails or is
    interrupted (Ctrl-C) leaves no run folder behind: relaunching redoes it anyway, and a half-written folder
    would only mislead readers. Finished runs, cached source models and SAM embeddings are kept."""
    from sfdabench.harness.config import cap_budgets, validate_config

    registry = registry or get_registry()
    cap_budgets(cfg)  # a Hydra job's config is composed by Hydra, not by compose_config
    validate_config(cfg, registry)
    run_dirs: list[Path] = []
    flushing_before = flushes_denormals()
    try:
        return _execute(cfg, registry, run_dirs)
    except BaseException:
        for run_dir in run_dirs:
            if run_dir.is_dir() and not (run_dir / "done").exists():
                shutil.rmtree(run_dir, ignore_errors=True)
        raise
    finally:
        # The flag is process-wide CPU state (numpy too): leave it as found, for callers in the same process.
        torch.set_flush_denormal(flushing_before)


def flushes_denormals() -> bool:
    """Whether the CPU currently flushes denormal floats to zero (a denormal times one gives zero)."""
    return bool((torch.tensor([1e-39], dtype=torch.float32) * 1.0).item() == 0.0)


@dataclass
class Run:
    """One run between its phases: what :func:`_load` gathered, what the phases after it add."""

    cfg: Mapping[str, Any]
    registry: Registry
    seed: int
    device: torch.device
    results_dir: Path
    cache_dir: Path
    method_cls: type[Method]
    method: Method
    variant: str
    run_id: str
    run_dir: Path
    t_start: float
    timings: dict[str, float] = field(default_factory=dict)
    sam: Any = None
    metrics: dict[str, Any] = field(default_factory=dict)
    task: Task | None = None
    source: Any = None
    source_flag: str = ""


def _execute(cfg: Mapping[str, Any], registry: Registry, run_dirs: list[Path]) -> dict[str, Any]:
    run = _start(cfg, registry)
    if (run.run_dir / "done").exists() and not cfg.get("force", False):
        log.info("run %s is already done (force=true to run it again): %s", run.run_id, run.run_dir)
        return json.loads((run.run_dir / "summary.json").read_text())
    run_dirs.append(run.run_dir)  # removed by execute() unless the run finishes
    progress = _load(run)
    adapted, context = _adapt(run, progress)
    return _record(run, adapted, context, progress)


def _start(cfg: Mapping[str, Any], registry: Registry) -> Run:
    """The process settings (threads, kernels, denormals), the method and the run's name: nothing loaded."""
    t_start = time.perf_counter()
    seed = int(cfg["seed"])
    device = resolve_device(str(cfg["device"]))
    if cfg.get("num_threads"):
        torch.set_num_threads(int(cfg["num_threads"]))
    use_deterministic_kernels(bool(cfg.get("deterministic", True)))
    flush_denormals()  # up to 2x faster on some targets (determinism.flush_denormals)
    results_dir = Path(cfg["results_dir"])
    method_cls: type[Method] = registry.get("methods", cfg["method"]["name"])
    method = method_cls(cfg["method"])
    variant = method.variant()
    run_id = results.config_hash(_plain(cfg))
    run_dir = results_dir / "runs" / run_name(cfg["task"]["name"], method_cls.name, variant, seed, run_id)
    return Run(cfg, registry, seed, device, results_dir, Path(cfg["cache_dir"]), method_cls, method, variant,
               run_id, run_dir, t_start)


def _load(run: Run):
    """SAM, metrics, data, the run folder's config and environment, the source model; returns the progress
    factory the later phases share."""
    cfg, registry, device, cache_dir = run.cfg, run.registry, run.device, run.cache_dir
    # SAM before anything is trained: a missing, corrupt or wrong-architecture checkpoint must not cost a
    # source training and feature aggregation first. Built once and handed to the method.
    run.sam = _build_sam(cfg["sam"], registry, device, cache_dir) if run.method.uses_sam else None
    # Data and metrics first: a missing dataset or a bad metric setting stops before a run folder exists.
    run.metrics = build_metrics(cfg["metrics"], registry)
    t0 = time.perf_counter()
    run.task = load_task(cfg["task"], registry, cache_dir)
    run.timings["load_data"] = time.perf_counter() - t0
    run.run_dir.mkdir(parents=True, exist_ok=True)
    import yaml

    results.atomic_write_text(run.run_dir / "config.yaml", yaml.safe_dump(_plain(cfg), sort_keys=False))
    plugins = {e.plugin: e.distribution for kind in registry.entries.values() for e in kind.values()}
    results.write_json(run.run_dir / "environment.json", results.environment_record(plugins, str(device)))

    progress_enabled = bool(cfg.get("progress", True))
    from tqdm.auto import tqdm

    def progress(iterable=None, **kw):
        return tqdm(iterable, disable=not progress_enabled, leave=False, dynamic_ncols=True, **kw)

    t0 = time.perf_counter()
    run.source = source_model.train_or_load(run.task, cfg["source"], run.seed, device, cache_dir, run.metrics,
                                            progress)
    run.timings["source_model"] = time.perf_counter() - t0
    run.source_flag = weak_source_flag(run.source.meta.get("in_domain_dice") or {}, run.task.organs,
                                       cfg.get("source_min_dice"))
    if run.source_flag:
        log.warning("source model %s is weak: %s (source_min_dice); its target results say little about "
                    "adaptation", run.source.weights, run.source_flag)
    return progress


def adaptation_context(target_train: list[Case], organs: list[str], *, device: torch.device, seed: int,
                       cache_dir: Path, run_dir: Path, sam_factory, allow_labels: bool = False,
                       progress: bool = True, log_progress=None, box_prompts: bool = True) -> Context:
    """The Context a method adapts with: its devices and dirs, a lazy SAM, and the target-label diagnostics of
    ``target_train`` (labels the method never sees; none for an unlabelled target). The one place a Context is
    built, so tests use it too."""
    diagnostics = TargetLabelDiagnostics.of(target_train, organs, log_progress, box_prompts)
    return Context(device=device, seed=seed, cache_dir=cache_dir, run_dir=run_dir, organs=list(organs),
                   sam_factory=sam_factory, target_labels=diagnostics, allow_labels=allow_labels,
                   progress=progress)


def _adapt(run: Run, progress) -> tuple[torch.nn.Module, Context]:
    """The method adapts a copy of the source model to the target-train images (no labels)."""
    cfg, registry, device, cache_dir, sam = run.cfg, run.registry, run.device, run.cache_dir, run.sam
    target_train = run.task.target.splits["train"]
    context = adaptation_context(
        target_train, run.task.organs, device=device, seed=run.seed, cache_dir=cache_dir, run_dir=run.run_dir,
        sam_factory=(lambda: sam) if sam is not None else lambda: _build_sam(cfg["sam"], registry, device,
                                                                             cache_dir),
        allow_labels=run.method_cls.uses_target_labels, progress=bool(cfg.get("progress", True)),
        log_progress=progress)
    seed_everything(run.seed)
    t0 = time.perf_counter()
    adapted = run.method.adapt(copy.deepcopy(run.source.model).to(device), TargetImages(target_train), context)
    run.timings["adapt"] = time.perf_counter() - t0
    return adapted, context


def _record(run: Run, adapted: torch.nn.Module, context: Context, progress) -> dict[str, Any]:
    """Evaluate on target-test, then write per_case.csv, predictions, summary.json, the leaderboard rows and
    the done marker (last: a run folder without it is unfinished)."""
    cfg, task, source, metrics, device = run.cfg, run.task, run.source, run.metrics, run.device
    method_cls, run_dir, timings = run.method_cls, run.run_dir, run.timings
    target_train = task.target.splits["train"]
    t0 = time.perf_counter()
    predictions: list[np.ndarray] = []
    per_case, table = evaluate(adapted, task.target.splits["test"], task.organs, metrics, device=device,
                               batch_size=int(cfg["eval"]["batch_size"]), progress=progress, predictions=predictions)
    timings["evaluate"] = time.perf_counter() - t0
    # Label-free, for every method: how much of target-train each class covers before and after adaptation.
    # A collapse (organs vanishing, or painted over the background) shows here without any label.
    context.diagnostics["prediction_share"] = {
        stage: prediction_shares(model, target_train, task.organs, device, int(cfg["eval"]["batch_size"]))
        for stage, model in (("source_model", source.model), ("adapted", adapted))}
    runtime = time.perf_counter() - run.t_start

    from sfdabench.metrics import empty_policy_tag

    protocol = {
        "task": task.name, "method": method_cls.name, "variant": run.variant, "seed": run.seed,
        # The unit of every spatial metric (ASD, HD95, a plugin's distance): the rows' one distance unit.
        "asd_unit": next((m.unit for m in metrics.values() if getattr(m, "spatial", False)), ""),
        "empty_policy": empty_policy_tag(cfg["metrics"]), "selection": method_cls.selection,
        "source_weights": source.weights, "source_config": source.key,
        "train_threads": source.meta.get("train_threads", ""),
        "source_dice": (source.meta.get("in_domain_dice") or {}).get("mean", float("nan")),
        "source_flag": run.source_flag, "sfda": not method_cls.uses_target_labels,
        "sam": _sam_tag(cfg["sam"], run.sam) if run.method.uses_sam else "",
        "data_protocol": task.data_protocol, "n_cases": len(task.target.splits["test"]),
        "config_hash": run.run_id, "run_id": run.run_id, "git_rev": results.git_revision(),
        "sfdabench_version": results.version("sfdabench"),
        "metric_version": f"{METRIC_VERSION};asd={cfg['metrics'].get('asd_reduction', 'union')}",
    }
    per_case.insert(0, "run_id", run.run_id)
    results.atomic_write_text(run_dir / "per_case.csv", per_case.to_csv(index=False))
    if cfg["eval"].get("save_predictions", True):  # for `sfdabench report` (uint8, compressed: small)
        results.save_predictions(run_dir / "predictions.npz",
                                 {c.case_id: p for c, p in zip(task.target.splits["test"], predictions)})
    summary = {
        **protocol, "runtime_s": runtime, "finished_at": results.now_iso(),
        "source": {"checkpoint": str(source.path), "weights": source.weights, "flag": run.source_flag, **source.meta},
        "metric_names": list(metrics),  # the run's order (JSON keys below are written sorted)
        "metrics": {organ: {k: _nan_to_none(v) for k, v in row.items()} for organ, row in table.iterrows()},
        "timings": {**timings, **{f"adapt/{k}": v for k, v in context.timings.items()}},
        "diagnostics": context.diagnostics, "run_dir": str(run_dir),
    }
    results.write_json(run_dir / "summary.json", summary)
    rows = table.reset_index()[["organ", *[m for m in metrics if m in table.columns]]]
    for key, value in {**protocol, "runtime_s": round(runtime, 2), "finished_at": summary["finished_at"]}.items():
        rows[key] = value
    results.append_rows(run.results_dir / "leaderboard.csv", rows)
    (run_dir / "done").write_text(summary["finished_at"] + "\n")
    return summary


def prediction_shares(model: torch.nn.Module, cases: list[Case], organs: list[str], device: torch.device,
                      batch_size: int) -> dict[str, float]:
    """Share of all pixels of ``cases`` that ``model``'s argmax gives each class (background first)."""
    from sfdabench.blocks.self_training import class_shares
    from sfdabench.blocks.training import predict

    labels = predict(model, TargetImages(cases), device=device, batch_size=batch_size)["label"]
    return class_shares(labels, ["background", *organs])


def _build_sam(sam_cfg: Mapping[str, Any], registry: Registry, device: torch.device, cache_dir: Path):
    from sfdabench.sam.cache import EmbeddingCache

    backend = registry.get("sam", sam_cfg["name"])(sam_cfg, device)
    backend.cache_dir = cache_dir
    return EmbeddingCache(backend, cache_dir)


def _sam_tag(sam_cfg: Mapping[str, Any], sam: Any = None) -> str:
    """Backend name plus any non-default numerics or engine, e.g. ``litemedsam:bf16``,
    ``litemedsam:onnxruntime``; the engine is the one that ran (``sam``), which may be torch's fallback."""
    precision = sam_cfg.get("precision", "fp32")
    engine = getattr(sam, "engine_name", None) or str(sam_cfg.get("engine", "torch") or "torch")
    return (sam_cfg["name"] + ("" if precision == "fp32" else f":{precision}")
            + ("" if engine == "torch" else f":{engine}"))


def _nan_to_none(v: Any) -> Any:
    try:
        return None if np.isnan(v) else float(v)
    except TypeError:
        return v


def weak_source_flag(in_domain: Mapping[str, float], organs: list[str], minimum: Mapping[str, float] | None
                     ) -> str:
    """Why a source model is below ``source_min_dice`` (in-domain mean, or any organ), or "" if it is not."""
    if not minimum or not in_domain:
        return ""
    problems = []
    if "mean" in minimum and in_domain.get("mean", 1.0) < float(minimum["mean"]):
        problems.append(f"in-domain mean Dice {in_domain['mean']:.3f} < {float(minimum['mean']):.2f}")
    if "organ" in minimum:
        problems += [f"{o} {in_domain[o]:.3f} < {float(minimum['organ']):.2f}" for o in organs
                     if o in in_domain and in_domain[o] < float(minimum["organ"])]
    return "; ".join(problems)


def format_table(summary: Mapping[str, Any]) -> str:
    """The per-organ table printed at the end of a run."""
    table = pd.DataFrame(summary["metrics"]).T
    from sfdabench.harness import metric_catalogue

    names = summary.get("metric_names") or metric_catalogue.columns(table.columns)
    table = table[[c for c in names if c in table.columns]].astype(float)
    head = (f"{summary['task']} | {summary['method']} ({summary['variant']}) | seed {summary['seed']} | "
            f"ASD/HD95 in {summary['asd_unit']} | source weights {summary['source_weights']} | "
            f"selection {summary['selection']}" + ("" if summary["sfda"] else " | NOT SFDA (uses target labels)"))
    return head + "\n" + table.to_string(float_format=lambda v: f"{v:.4f}")
