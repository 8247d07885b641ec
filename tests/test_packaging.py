"""Packaging: the import-name mapping of the repo folders is complete and shadows nothing."""
from __future__ import annotations

import tomllib

from conftest import REPO

FOLDERS = {"sfdabench": "sfdabench", "methods": "sfdabench_methods", "datasets": "sfdabench_datasets",
           "configs": "sfdabench_configs"}


def test_every_package_folder_is_listed_in_pyproject():
    meta = tomllib.loads((REPO / "pyproject.toml").read_text())
    listed = set(meta["tool"]["setuptools"]["packages"])
    found = set()
    for folder, import_name in FOLDERS.items():
        for init in (REPO / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(REPO / folder)
            found.add(".".join([import_name, *rel.parts]))
    assert found == listed


def test_no_package_named_datasets():
    meta = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert "datasets" not in meta["tool"]["setuptools"]["packages"]
    assert "datasets" not in meta["tool"]["setuptools"]["package-dir"]
