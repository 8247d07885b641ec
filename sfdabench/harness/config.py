"""How a run's config is found, composed and checked, and handed to Hydra (``run``, ``prepare``, ``ablate``).

- Search path: the config folders of every plugin (``sfdabench_config_searchpath`` hooks, built-ins first),
  then the user's own folders: ``--config-dir DIR``, ``hydra.searchpath=[file:///DIR,...]`` and
  ``$SFDABENCH_CONFIG_PATH`` (``DIR1:DIR2``). A folder holding ``task/mytask.yaml`` makes ``task=mytask`` a
  task, without writing a package.
- Names (``method=``, ``task=``, ``sam=``) are checked against the registry and the search path, then every
  job's config is composed with Hydra's compose API (a misspelled key names the closest valid one) and the
  whole composed config is validated (:func:`validate_config`) before Hydra starts and anything runs.
- :mod:`sfdabench.harness.launch` hands the checked overrides to Hydra (``hydra.main``): one protocol run per job.

Every problem is a :class:`~sfdabench.api.UsageError`: one line naming the problem and the fix, exit code 2.
This module imports neither the CLI, the launcher, the protocol nor ``prepare``/``ablate``; they import it.
"""
from __future__ import annotations

import difflib
import logging
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from sfdabench.api import SfdaBenchError, UsageError, _plain

log = logging.getLogger("sfdabench")

#: Extra config folders (``os.pathsep``-separated), as ``--config-dir`` on every command.
CONFIG_PATH_ENV = "SFDABENCH_CONFIG_PATH"
#: The group options ``validate_overrides`` checks by name.
NAMED_GROUPS = ("method", "task", "sam")

_GROUP_OVERRIDE = re.compile(r"^(?P<group>method|task|sam)=(?P<value>[^()]*)$")
_SEARCHPATH = re.compile(r"^\+{0,2}hydra\.searchpath=(?P<value>.*)$")


def setup_logging(level: int = logging.INFO) -> None:
    """One stderr handler for the ``[HH:MM:SS sfdabench INFO]`` lines (also in launcher worker processes)."""
    root = logging.getLogger()
    handler = next((h for h in root.handlers if getattr(h, "_sfdabench", False)), None)
    if handler is None:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("[%(asctime)s %(name)s %(levelname)s] %(message)s", "%H:%M:%S"))
        handler._sfdabench = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    else:
        # sys.stderr may have been replaced since (tests capture it); not setStream(): it flushes the old
        # stream, which may be closed by now.
        handler.stream = sys.stderr
    root.setLevel(level)


# ------------------------------------------------------------------------------------ command line

#: Hydra's flags (hydra/_internal/utils.py get_args_parser). argparse refuses them after the overrides,
#: so they are collected wherever they appear and put first.
_VALUE_FLAGS = {"--cfg": "--cfg", "-c": "--cfg", "--package": "--package", "-p": "--package",
                "--experimental-rerun": "--experimental-rerun"}
_INFO_CHOICES = ("all", "config", "defaults", "defaults-tree", "plugins", "searchpath")
_SWITCHES = {"-m": "--multirun", "--multirun": "--multirun", "--resolve": "--resolve", "-r": "--run",
             "--run": "--run", "--hydra-help": "--hydra-help", "--version": "--version",
             "-sc": "--shell-completion", "--shell-completion": "--shell-completion"}
_CFG_CHOICES = ("job", "hydra", "all")


@dataclass
class RunArgs:
    """A ``run`` command line split into Hydra flags (first) and overrides."""

    flags: list[str] = field(default_factory=list)
    overrides: list[str] = field(default_factory=list)
    help: bool = False

    @property
    def multirun(self) -> bool:
        return "--multirun" in self.flags

    @property
    def runs(self) -> bool:
        """False when Hydra only prints something (``--cfg``, ``--info``, ``--hydra-help``, ...)."""
        return not any(f in self.flags for f in ("--cfg", "--info", "--hydra-help", "--version",
                                                 "--shell-completion"))


def parse_run_args(args: Sequence[str]) -> RunArgs:
    """Split ``args`` into Hydra flags and overrides; ``--config-dir DIR`` becomes a search-path override."""
    out, args, i = RunArgs(), expand_config_dirs(args), 0
    while i < len(args):
        arg = args[i]
        name, eq, value = arg.partition("=") if arg.startswith("-") else (arg, "", "")
        i += 1
        if not arg.startswith("-"):
            out.overrides.append(arg)
        elif arg in ("-h", "--help"):
            out.help = True
        elif name in ("--config-path", "-cp", "--config-name", "-cn"):
            raise UsageError(f"{name} is not supported: sfdabench composes its own run config; add your config "
                             f"folders with --config-dir DIR (e.g. DIR/task/mytask.yaml, then task=mytask)")
        elif name in _VALUE_FLAGS:
            if not eq:
                if i >= len(args):
                    raise UsageError(f"{name} needs a value, e.g. {name} job")
                value, i = args[i], i + 1
            if _VALUE_FLAGS[name] == "--cfg" and value not in _CFG_CHOICES:
                raise UsageError(f"--cfg {value} is not one of {', '.join(_CFG_CHOICES)}; e.g. --cfg job")
            out.flags += [_VALUE_FLAGS[name], value]
        elif name in ("--info", "-i"):
            if not eq and i < len(args) and args[i] in _INFO_CHOICES:
                value, i = args[i], i + 1
            out.flags += ["--info", value or "all"]
        elif arg in _SWITCHES:
            if _SWITCHES[arg] not in out.flags:
                out.flags.append(_SWITCHES[arg])
        else:
            raise UsageError(f"unknown option '{arg}'; see sfdabench run --help (overrides look like key=value)")
    shows = [f for f in out.flags if f in ("--cfg", "--info", "--shell-completion")]
    if len(shows) + out.multirun + ("--run" in out.flags) > 1:  # Hydra's own rule, as one line
        raise UsageError(f"{' and '.join((shows + [f for f in out.flags if f in ('--multirun', '--run')])[:2])} "
                         f"cannot be combined; --cfg/--info print one composed config: drop -m to see it")
    return out


def expand_config_dirs(args: Sequence[str]) -> list[str]:
    """``--config-dir DIR`` (also ``-cd DIR``, ``--config-dir=DIR``) -> one ``hydra.searchpath=[file://DIR]``
    override, so that name checks, composition and Hydra all see the folder."""
    out, dirs, args, i = [], [], list(args), 0
    while i < len(args):
        arg, i = args[i], i + 1
        name, eq, value = arg.partition("=")
        if name not in ("--config-dir", "-cd"):
            out.append(arg)
            continue
        if not eq:
            if i >= len(args):
                raise UsageError(f"{name} needs a folder: {name} DIR (DIR/task/<name>.yaml -> task=<name>)")
            value, i = args[i], i + 1
        dirs.append(value)
    if dirs:
        out.append(f"hydra.searchpath=[{','.join(_searchpath_entry(d) for d in dirs)}]")
    return out


def _searchpath_entry(folder: str) -> str:
    path = Path(folder).expanduser()
    if not path.is_dir():
        raise UsageError(f"config folder {folder} does not exist; --config-dir needs a folder holding config "
                         f"groups, e.g. DIR/task/mytask.yaml")
    return "file://" + str(path.resolve())


# ------------------------------------------------------------------------------------- search path


def _user_searchpath(overrides: Sequence[str]) -> tuple[list[str], list[str]]:
    """(search-path entries of ``hydra.searchpath=`` overrides and ``$SFDABENCH_CONFIG_PATH``, the other
    overrides)."""
    paths, rest = [], []
    for arg in overrides:
        m = _SEARCHPATH.match(arg)
        if not m:
            rest.append(arg)
            continue
        for item in m["value"].strip().strip("[]").split(","):
            item = item.strip().strip("'\"")
            if item:
                paths.append(item if "://" in item else "file://" + str(Path(item).expanduser().resolve()))
    for item in os.environ.get(CONFIG_PATH_ENV, "").split(os.pathsep):
        if item.strip():
            if not Path(item).expanduser().is_dir():
                raise UsageError(f"{CONFIG_PATH_ENV} names {item}, which is not a folder; fix or unset it")
            paths.append("file://" + str(Path(item).expanduser().resolve()))
    for item in paths:
        if item.startswith("file://") and not Path(item[len("file://"):]).is_dir():
            raise UsageError(f"config search path entry {item} is not a folder; use hydra.searchpath=[file:///abs/dir] "
                             f"or --config-dir DIR with an existing folder")
    return paths, rest


def search_path(overrides: Sequence[str]) -> list[str]:
    """Plugin config folders (built-ins first), then the user's folders."""
    from sfdabench.harness.plugins import get_registry

    user, _ = _user_searchpath(overrides)
    return list(dict.fromkeys([p for _, p in get_registry().config_searchpath()] + user))


def hydra_searchpath_override(args: Sequence[str]) -> list[str]:
    """``args`` with one ``hydra.searchpath=[...]`` override holding the whole search path."""
    _, rest = _user_searchpath(args)
    quoted = [p if re.fullmatch(r"[\w./:@~+-]+", p) else "'" + p.replace("'", "\\'") + "'"
              for p in search_path(args)]
    return rest + [f"hydra.searchpath=[{','.join(quoted)}]"]


def group_options(group: str, paths: Sequence[str]) -> list[str]:
    """Option names of a config group (``<folder>/<group>/<name>.yaml``) across the search path."""
    from sfdabench.harness.plugins import _resolve_pkg_path

    names: list[str] = []
    for path in paths:
        folder = _resolve_pkg_path(path)
        sub = folder.joinpath(group) if folder is not None else None
        if sub is not None and sub.is_dir():
            names += [item.name[:-5] for item in sub.iterdir() if item.name.endswith(".yaml")]
    return sorted(set(names))


def validate_overrides(args: Sequence[str]) -> None:
    """Check ``method=``, ``task=`` and ``sam=`` values (also comma sweeps) against the registry and the
    search path (user folders included)."""
    from sfdabench.harness.plugins import get_registry

    registry = get_registry()
    paths = search_path(args)
    for arg in args:
        m = _GROUP_OVERRIDE.match(arg)
        if not m:
            continue
        group = m["group"]
        configs = group_options(group, paths)
        for value in filter(None, (v.strip() for v in m["value"].split(","))):
            if group == "task":
                available = configs
            else:
                kind = {"method": "methods", "sam": "sam"}[group]
                available = [n for n in registry.names(kind) if n in configs]
                if value in registry.names(kind) and value not in configs:
                    raise UsageError(f"{group} '{value}' is registered but has no config file {group}/{value}.yaml "
                                     f"on the config search path; its plugin must ship one")
            if value not in available:
                hint = " (your own tasks: --config-dir DIR with DIR/task/<name>.yaml)" if group == "task" else ""
                raise UsageError(f"unknown {group} '{value}'; available: {', '.join(available) or '(none)'}{hint}")


# ------------------------------------------------------------------------------------- composition


def compose_config(overrides: Sequence[str]) -> Any:
    """The composed, resolved ``run`` config of one job (Hydra compose API: no job, no output folder)."""
    from hydra import compose, initialize_config_module
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        with initialize_config_module("sfdabench_configs", version_base=None):
            cfg = compose("run", overrides=hydra_searchpath_override(overrides))
        OmegaConf.resolve(cfg)  # a bad interpolation is a usage error now, not a traceback later
    except (HydraException, OmegaConfBaseException) as exc:
        raise _composition_error(exc, overrides) from None
    cap_budgets(cfg)
    return cfg


#: The method-config keys ``budget_cap`` caps (run.yaml): a method names its budgets so.
BUDGET_KEYS = ("epochs", "iterations", "steps")


def cap_budgets(cfg: Any) -> bool:
    """Apply ``cfg.budget_cap`` to ``cfg.method`` in place (idempotent); True when a value changed."""
    from omegaconf import OmegaConf, open_dict

    cap = cfg.get("budget_cap") or {}
    steps, batch = cap.get("steps"), cap.get("batch_size")
    for key, value in (("budget_cap.steps", steps), ("budget_cap.batch_size", batch)):
        if value is not None and (not _is_int(value) or value < 1):
            raise UsageError(f"{key} must be a positive integer or null, got {value!r}; e.g. {key}=2")
    if (steps is None and batch is None) or cfg.get("method") is None:
        return False

    def cap_node(node) -> bool:
        changed = False
        for key in list(node.keys()):
            value = node[key]
            limit = steps if key in BUDGET_KEYS else batch if key == "batch_size" else None
            if isinstance(value, Mapping):
                changed |= cap_node(value)
            elif limit is not None and _is_int(value) and value > limit:
                node[key] = limit
                changed = True
        return changed

    # A resolved copy: a method key that interpolates another block (the oracle's ``recipes.source: ${source}``)
    # must be capped in the method's copy, never in the block itself (the shared source model).
    method = OmegaConf.to_container(cfg["method"], resolve=True) if OmegaConf.is_config(cfg["method"]) \
        else cfg["method"]
    if not cap_node(method):
        return False
    if OmegaConf.is_config(cfg):
        with open_dict(cfg):
            cfg["method"] = OmegaConf.create(method)
    return True


def _composition_error(exc: Exception, overrides: Sequence[str]) -> UsageError:
    message = " ".join(str(exc).split())
    m = re.search(r"Could not override '([^']+)'", message)
    if not m:
        return UsageError(message)
    key = m[1]
    given = next((o for o in overrides if o.lstrip("~+").partition("=")[0] == key), f"{key}=...")
    value = given.partition("=")[2]
    try:  # the config without the bad override: its keys are the candidates
        base = compose_config([o for o in overrides if o is not given])
    except UsageError:
        base = None
    group = key.split(".")[0]
    where = ""
    if base is not None and group in NAMED_GROUPS and isinstance(base.get(group), Mapping):
        where = f" for {group}={base[group].get('name')}"
    close = closest_key(key, _plain(base)) if base is not None else None
    choice = f" {group}={base[group].get('name')}" if where else ""
    fix = f"did you mean {close}={value}?" if close else f"sfdabench run{choice} --cfg job lists the valid keys"
    return UsageError(f"unknown config key '{key}'{where}; {fix} (to add a new key write +{key}={value})")


def closest_key(key: str, tree: Mapping[str, Any]) -> str | None:
    """The valid dotted key nearest to ``key``: its first missing part replaced by the closest sibling
    (difflib), provided the rest of the path then exists. ``method.fa.iteratons`` -> ``method.fa.iterations``,
    ``task.sourc.params.size`` -> ``task.source.params.size``; None when nothing is close."""
    parts, node, i = key.split("."), tree, 0
    while i < len(parts) and isinstance(node, Mapping) and parts[i] in node:
        node, i = node[parts[i]], i + 1
    if i == len(parts) or not isinstance(node, Mapping):
        return None
    close = difflib.get_close_matches(parts[i], [str(k) for k in node], n=1, cutoff=0.6)
    if not close:
        return None
    fixed, node = parts[:i] + close + parts[i + 1:], tree
    for part in fixed:
        if not (isinstance(node, Mapping) and part in node):
            return None
        node = node[part]
    return ".".join(fixed)


def sweep_jobs(overrides: Sequence[str]) -> list[list[str]] | None:
    """The override lists of a multirun's jobs (Hydra's basic sweeper); None when the sweep cannot be
    expanded without Hydra's config loader (e.g. glob sweeps): Hydra then checks them itself."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    _, rest = _user_searchpath(overrides)
    try:
        parsed = OverridesParser.create().parse_overrides(list(rest))
    except HydraException as exc:
        raise UsageError(" ".join(str(exc).split())) from None
    try:
        (batch,) = BasicSweeper.split_arguments(parsed, None)
    except Exception:  # noqa: BLE001 - sweep types only Hydra's config loader can expand
        return None
    searchpath = [o for o in overrides if _SEARCHPATH.match(o)]
    return [list(job) + searchpath for job in batch]


def compose_run_config(args: Sequence[str], validate: bool = True) -> Any:
    """The composed ``run`` config for these overrides, names and (``validate``) values checked."""
    ra = parse_run_args(args)
    if ra.multirun:
        raise UsageError("this command takes no -m: it composes one config (sweeps: sfdabench run -m ...)")
    if ra.flags or ra.help:
        raise UsageError(f"unexpected option {(ra.flags or ['--help'])[0]}; only key=value overrides and "
                         f"--config-dir DIR are accepted here")
    validate_overrides(ra.overrides)
    cfg = compose_config(ra.overrides)
    if validate:
        validate_config(cfg)
    return cfg


# -------------------------------------------------------------------------------------- validation


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _positive_int(cfg: Mapping[str, Any], key: str, example: int, null_ok: bool = False, label: str = "") -> None:
    value = cfg.get(key)
    label = label or key
    if value is None and null_ok:
        return
    if not _is_int(value) or value < 1:
        alt = " or null" if null_ok else ""
        raise UsageError(f"{label} must be a positive integer{alt}, got {value!r}; e.g. {label}={example}")


def _boolean(cfg: Mapping[str, Any], key: str, label: str = "") -> None:
    if key in cfg and not isinstance(cfg[key], bool):
        label = label or key
        raise UsageError(f"{label} must be true or false, got {cfg[key]!r}; e.g. {label}=false")


def check_writable(key: str, value: Any) -> None:
    """``value`` is a folder that exists and is writable, or can be created (nothing is created here)."""
    if not isinstance(value, str) or not value.strip():
        raise UsageError(f"{key} must be a folder path, got {value!r}; e.g. {key}=sfdabench-results")
    probe = Path(value)
    try:
        while not probe.exists() and probe.parent != probe:
            probe = probe.parent
        ok_dir = probe.is_dir()
    except OSError as exc:
        raise UsageError(f"{key}={value} cannot be used ({exc.strerror}); set {key}= to a writable folder") from None
    if not ok_dir:
        raise UsageError(f"{key}={value} cannot be created: {probe} is a file, not a folder; "
                         f"set {key}= to a writable folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UsageError(f"{key}={value} is not writable ({probe}: permission denied or read-only); "
                         f"set {key}= to a folder you can write")


def validate_config(cfg: Mapping[str, Any], registry=None) -> None:
    """Check the whole composed config before anything runs: types and ranges of the run settings, the
    output folders, metrics, method and (when the method prompts SAM) the SAM settings. Cheap: no data,
    no weights are loaded (the protocol builds the SAM backend before training, which reads the checkpoint).
    """
    from sfdabench.harness.plugins import get_registry

    registry = registry or get_registry()
    cfg = _plain(cfg)
    seed = cfg.get("seed")
    if not _is_int(seed) or seed < 0:
        raise UsageError(f"seed must be a non-negative integer, got {seed!r}; e.g. seed=0 "
                         f"(several seeds: sfdabench run -m seed=0,1,2)")
    _positive_int(cfg, "num_threads", 2, null_ok=True)
    device = cfg.get("device")
    if not isinstance(device, str) or not re.fullmatch(r"auto|cpu|cuda(:\d+)?", device):
        raise UsageError(f"unknown device {device!r}; use device=auto, cpu or cuda[:N]")
    for key in ("progress", "force", "deterministic"):
        _boolean(cfg, key)
    check_writable("results_dir", cfg.get("results_dir"))
    check_writable("cache_dir", cfg.get("cache_dir"))
    ev = cfg.get("eval") or {}
    _positive_int(ev, "batch_size", 16, label="eval.batch_size")
    _boolean(ev, "save_predictions", label="eval.save_predictions")
    minimum = cfg.get("source_min_dice") or {}
    if not isinstance(minimum, dict):
        raise UsageError(f"source_min_dice must be a mapping like {{mean: 0.9, organ: 0.8}}, got {minimum!r}; "
                         f"e.g. source_min_dice.mean=0.9")
    for key, value in minimum.items():
        if key not in ("mean", "organ") or isinstance(value, bool) or not isinstance(value, (int, float)) \
                or not 0 <= value <= 1:
            raise UsageError(f"source_min_dice.{key}={value!r} is not a Dice in [0, 1] for 'mean' or 'organ'; "
                             f"e.g. source_min_dice.mean=0.9")
    source = cfg.get("source") or {}
    for key, example in (("epochs", 60), ("batch_size", 16), ("width", 16), ("depth", 4)):
        if key in source:
            _positive_int(source, key, example, label=f"source.{key}")
    for key, example in (("steps", 1200), ("lr_step_every", 60)):
        if key in source:
            _positive_int(source, key, example, null_ok=True, label=f"source.{key}")
    if "lr" in source and (not isinstance(source["lr"], (int, float)) or isinstance(source["lr"], bool)
                           or not source["lr"] > 0):
        raise UsageError(f"source.lr must be a positive number, got {source['lr']!r}; e.g. source.lr=3e-4")
    _validate_metrics(cfg.get("metrics") or {}, registry)
    task = cfg.get("task") or {}
    organs = task.get("organs")
    if not isinstance(organs, list) or not organs or not all(isinstance(o, str) and o for o in organs):
        raise UsageError(f"task.organs must be a non-empty list of organ names, got {organs!r}; "
                         f"e.g. task.organs=[spleen,liver]")
    for side in ("source", "target"):
        dataset = (task.get(side) or {}).get("dataset")
        if dataset is not None:
            registry.get("datasets", dataset)  # UsageError naming the registered datasets
    method = _build_method(cfg.get("method") or {}, registry)
    if getattr(method, "uses_sam", False):
        validate_sam(cfg.get("sam") or {}, registry)


def _validate_metrics(metrics: Mapping[str, Any], registry) -> None:
    from sfdabench.metrics.surface import EMPTY_POLICIES, UNITS

    names = metrics.get("names")
    if not isinstance(names, list) or not names:
        raise UsageError(f"metrics.names must be a non-empty list, got {names!r}; e.g. metrics.names=[dice,asd,hd95]")
    choices = {"asd_unit": UNITS, "empty_policy": EMPTY_POLICIES}
    for key, allowed in choices.items():
        if key in metrics and metrics[key] not in allowed:
            raise UsageError(f"metrics.{key}={metrics[key]!r} is not one of {', '.join(allowed)}; "
                             f"e.g. metrics.{key}={allowed[0]}")
    opts = {k: v for k, v in metrics.items() if k != "names"}
    for name in names:
        cls = registry.get("metrics", str(name))
        try:
            cls(opts)  # the metric's own checks (e.g. asd_reduction), without any data
        except (ValueError, TypeError, KeyError) as exc:
            raise UsageError(f"metrics: {exc}; fix the metrics.* setting it names") from None


def _build_method(method_cfg: Mapping[str, Any], registry):
    cls = registry.get("methods", str(method_cfg.get("name")))
    try:
        return cls(method_cfg)
    except SfdaBenchError:
        raise
    except (ValueError, TypeError, KeyError) as exc:
        raise UsageError(f"method {cls.name}: {exc}; check its settings with "
                         f"sfdabench run method={cls.name} --cfg job") from None


def validate_sam(sam_cfg: Mapping[str, Any], registry=None) -> None:
    """Cheap SAM checks (backend name, precision, model type, checkpoint file present) via the backend's
    ``check_config`` classmethod when it has one; reading the weights is left to building the backend."""
    from sfdabench.harness.plugins import get_registry

    registry = registry or get_registry()
    backend = registry.get("sam", str(sam_cfg.get("name")))
    check = getattr(backend, "check_config", None)
    if check is not None:
        check(sam_cfg)
