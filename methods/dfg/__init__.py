"""DFG (Huai et al., IEEE TMI 2025) as an sfdabench plugin; see ``method.py`` for the phases."""
from sfdabench.hookspecs import hookimpl

from .method import DFG


@hookimpl
def sfdabench_methods():
    return [DFG]
