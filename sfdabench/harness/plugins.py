"""Plugin loading and the registries (methods, datasets, metrics, SAM backends, config groups).

Every plugin, built-in or third-party, is a module listed under the ``sfdabench`` entry-point group and
implementing hooks of :mod:`sfdabench.hookspecs`. A plugin that fails to import is reported by name with
its error and skipped, so one broken package never takes the tool down; set ``SFDABENCH_STRICT_PLUGINS=1``
to make such failures fatal (CI of a plugin package should do that).
"""
from __future__ import annotations

import functools
import importlib.metadata as md
import importlib.resources
import logging
import os
from dataclasses import dataclass
from typing import Any

import pluggy
import yaml

from sfdabench import hookspecs
from sfdabench.api import SfdaBenchError, UsageError

log = logging.getLogger("sfdabench.harness.plugins")

ENTRY_POINT_GROUP = "sfdabench"
STRICT_ENV = "SFDABENCH_STRICT_PLUGINS"

#: registry kind -> hook name
KINDS = {
    "methods": "sfdabench_methods",
    "datasets": "sfdabench_datasets",
    "metrics": "sfdabench_metrics",
    "sam": "sfdabench_sam_backends",
    "commands": "sfdabench_commands",
}


@dataclass(frozen=True)
class Entry:
    """One registered object and where it came from (for ``sfdabench list``)."""

    kind: str
    name: str
    obj: Any
    plugin: str          # entry-point name
    distribution: str    # e.g. "sfdabench 0.1.0"
    description: str


@dataclass(frozen=True)
class PluginFailure:
    plugin: str
    distribution: str
    error: str


def describe(obj: Any) -> str:
    desc = getattr(obj, "description", "") or (obj.__doc__ or "").strip()
    return desc.splitlines()[0].strip() if desc else ""


class Registry:
    """Loaded plugins and what they contribute. Build one with :func:`get_registry`."""

    def __init__(self, entry_points: list[md.EntryPoint] | None = None, strict: bool | None = None):
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.failures: list[PluginFailure] = []
        self._dist: dict[str, str] = {}
        strict = os.environ.get(STRICT_ENV, "") not in ("", "0") if strict is None else strict
        eps = entry_points if entry_points is not None else list(md.entry_points(group=ENTRY_POINT_GROUP))
        for ep in sorted(eps, key=lambda e: e.name):
            dist = f"{ep.dist.name} {ep.dist.version}" if ep.dist else "?"
            if self.pm.has_plugin(ep.name):
                continue  # the same entry point seen twice (e.g. editable + regular install metadata)
            try:
                module = ep.load()
                self.pm.register(module, name=ep.name)
            except Exception as exc:  # noqa: BLE001 - any import error of a plugin is reported, not fatal
                msg = f"{type(exc).__name__}: {exc}".splitlines()[0]
                if strict:
                    raise SfdaBenchError(f"plugin '{ep.name}' ({dist}) failed to load: {msg}") from exc
                log.warning("plugin '%s' (%s) failed to load and is skipped: %s (set %s=1 to make this fatal)",
                            ep.name, dist, msg, STRICT_ENV)
                self.failures.append(PluginFailure(ep.name, dist, msg))
                continue
            self._dist[ep.name] = dist
        self.entries: dict[str, dict[str, Entry]] = {kind: self._collect(kind, hook) for kind, hook in KINDS.items()}

    def _collect(self, kind: str, hook_name: str) -> dict[str, Entry]:
        found: dict[str, Entry] = {}
        for impl in getattr(self.pm.hook, hook_name).get_hookimpls():
            try:
                objs = impl.function() or []
            except Exception as exc:  # noqa: BLE001
                self.failures.append(PluginFailure(impl.plugin_name, self._dist.get(impl.plugin_name, "?"),
                                                   f"{hook_name}: {type(exc).__name__}: {exc}"))
                continue
            for obj in objs:
                name = getattr(obj, "name", None)
                if not name:
                    raise SfdaBenchError(f"plugin '{impl.plugin_name}' registers {obj!r} without a 'name'")
                if name in found:
                    raise SfdaBenchError(
                        f"{kind} name '{name}' is registered twice: by plugin '{found[name].plugin}' and by "
                        f"'{impl.plugin_name}'; uninstall one of them or rename it")
                found[name] = Entry(kind, name, obj, impl.plugin_name, self._dist.get(impl.plugin_name, "?"),
                                    describe(obj))
        return dict(sorted(found.items()))

    # ------------------------------------------------------------------ lookups
    def names(self, kind: str) -> list[str]:
        return list(self.entries[kind])

    def get(self, kind: str, name: str) -> Any:
        try:
            return self.entries[kind][name].obj
        except KeyError:
            singular = {"methods": "method", "datasets": "dataset", "metrics": "metric", "sam": "sam backend",
                        "commands": "command"}
            raise UsageError(f"unknown {singular[kind]} '{name}'; available: {', '.join(self.names(kind)) or '(none)'}"
                             ) from None

    def references(self) -> dict[str, str]:
        """``{"lower": name, "upper": name}``: the methods that declare those ``reference`` roles."""
        roles: dict[str, str] = {}
        for name, entry in self.entries["methods"].items():
            role = getattr(entry.obj, "reference", "")
            if role not in ("", "lower", "upper"):
                raise SfdaBenchError(f"method '{name}' declares reference = {role!r}; use 'lower', 'upper' or ''")
            if role and role in roles:
                raise SfdaBenchError(f"methods '{roles[role]}' and '{name}' both declare reference = '{role}'; "
                                     f"one method takes each role")
            if role:
                roles[role] = name
        return roles

    # ------------------------------------------------------------------ config groups
    def config_searchpath(self) -> list[tuple[str, str]]:
        """``[(plugin name, "pkg://...")]`` from every plugin, built-ins first."""
        out = []
        for impl in reversed(self.pm.hook.sfdabench_config_searchpath.get_hookimpls()):
            for path in impl.function() or []:
                out.append((impl.plugin_name, path))
        return out

    def config_options(self, group: str) -> dict[str, tuple[str, dict]]:
        """Options of a config group across the search path: ``{name: (plugin, yaml content)}``."""
        found: dict[str, tuple[str, dict]] = {}
        for plugin, path in self.config_searchpath():
            folder = _resolve_pkg_path(path)
            if folder is None:
                continue
            sub = folder.joinpath(group)
            if not sub.is_dir():
                continue
            for item in sub.iterdir():
                if item.name.endswith(".yaml"):
                    found.setdefault(item.name[:-5], (plugin, yaml.safe_load(item.read_text()) or {}))
        return dict(sorted(found.items()))

    def tasks(self) -> dict[str, Entry]:
        """Tasks are config files ``task/<name>.yaml``; the plugin that ships the file provides the task."""
        out = {}
        for name, (plugin, content) in self.config_options("task").items():
            body = content.get("task", content)  # task files are `@package _global_` with a `task:` block
            desc = str(body.get("description") or "").strip()
            out[name] = Entry("tasks", name, body, plugin, self._dist.get(plugin, "?"),
                              desc.splitlines()[0] if desc else "")
        return out


def _resolve_pkg_path(path: str):
    if not path.startswith("pkg://"):
        return _file_path(path)
    module = path[len("pkg://"):].replace("/", ".")
    try:
        return importlib.resources.files(module)
    except ModuleNotFoundError:
        log.warning("config search path %s: package not importable", path)
        return None


def _file_path(path: str):
    from pathlib import Path

    p = Path(path[len("file://"):] if path.startswith("file://") else path)
    return p if p.is_dir() else None


@functools.lru_cache(maxsize=1)
def get_registry() -> Registry:
    """The process-wide registry (plugins load once)."""
    return Registry()
