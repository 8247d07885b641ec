"""The sfdabench plugin hooks: the one place that says how a plugin contributes to sfdabench.

A plugin is any importable module registered under the ``sfdabench`` entry-point group::

    # pyproject.toml of a third-party package
    [project.entry-points.sfdabench]
    my_method = "my_package.my_method"

The module implements any of the hooks below with ``@sfdabench.hookimpl``. The built-in methods,
datasets, metrics and SAM backends are registered exactly this way in sfdabench's own pyproject.toml.
Each hook returns a list of classes; a class carries its registry key in ``name`` and a one-line
``description`` (default: the first line of its docstring). Names must be unique across plugins.
"""
from __future__ import annotations

import pluggy

PROJECT = "sfdabench"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def sfdabench_methods() -> list[type]:
    """Adaptation methods: subclasses of :class:`sfdabench.api.Method`.

    Each method also needs a config file ``method/<name>.yaml`` (with ``name: <name>`` and its
    hyper-parameters) on the config search path: ship it in a package directory returned by
    :func:`sfdabench_config_searchpath`.
    """


@hookspec
def sfdabench_datasets() -> list[type]:
    """Dataset adapters: subclasses of :class:`sfdabench.api.DatasetAdapter`.

    Tasks are config files ``task/<name>.yaml`` that name one adapter for the source and one for the
    target domain; ``sfdabench list tasks`` lists the task configs found on the config search path.
    """


@hookspec
def sfdabench_metrics() -> list[type]:
    """Volume metrics: subclasses of :class:`sfdabench.api.Metric`."""


@hookspec
def sfdabench_sam_backends() -> list[type]:
    """Promptable segmenters: subclasses of :class:`sfdabench.api.SamBackend` (config ``sam/<name>.yaml``)."""


@hookspec
def sfdabench_commands() -> list[type]:
    """Subcommands of the ``sfdabench`` command line: subclasses of :class:`sfdabench.api.Command`
    (``sfdabench <name> ...``). The built-in ``run``, ``list``, ``leaderboard``, ... are registered this way."""


@hookspec
def sfdabench_config_searchpath() -> list[str]:
    """Hydra config search-path entries (e.g. ``"pkg://my_package.configs"``) holding the plugin's config
    groups (``method/``, ``task/``, ``sam/``, ...). They are added to every ``sfdabench`` command."""
