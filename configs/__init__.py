"""sfdabench's built-in Hydra config groups (installed as the package ``sfdabench_configs``).

This module is itself a plugin: it puts the folder on the config search path, exactly as a third-party
package adds its own ``method/``, ``task/`` or ``sam/`` configs.
"""
from sfdabench.hookspecs import hookimpl


@hookimpl
def sfdabench_config_searchpath():
    return ["pkg://sfdabench_configs"]
