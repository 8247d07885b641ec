"""sfdabench: a benchmark suite for source-free domain adaptation of medical image segmentation."""
from __future__ import annotations

import importlib.metadata as _md

from sfdabench.hookspecs import hookimpl

try:
    __version__ = _md.version("sfdabench")
except _md.PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0+unknown"

__all__ = ["hookimpl", "__version__"]
