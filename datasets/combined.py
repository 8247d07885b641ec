"""Several datasets as one domain: e.g. a real CT target made of the AMOS and the 3D-IRCADb volumes at hand.

A task's domain names one dataset adapter; ``combined`` is that adapter for a domain whose cases come from
several datasets, each read by its own adapter with its own parameters (label map, window, layout)::

    target:
      dataset: combined
      params:
        parts:
          amos:   {dataset: nifti_folder, params: {...}}     # any registered dataset adapter
          ircadb: {dataset: ircadb, params: {...}}
      splits:
        train: [amos/0018, ircadb/1.1]                       # <part>/<that dataset's case id>
        test: [amos/0018, ircadb/1.1]

Case ids are ``<part>/<case id of that part>``, so two datasets may use the same local ids. Each part sees the
domain's splits restricted to its own cases (and the domain's ``allow_split_overlap``), so it prepares and
caches its cases exactly as it would alone; ``sfdabench prepare`` prepares every part that needs it.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any, Mapping, Sequence

from sfdabench.api import Case, DatasetAdapter, SfdaBenchError, _plain
from sfdabench.hookspecs import hookimpl

SEPARATOR = "/"


class CombinedDataset(DatasetAdapter):
    """Cases of several datasets as one domain (``params.parts``: name -> {dataset, params})."""

    name = "combined"
    description = "Several datasets as one domain (cases named <part>/<case id>); e.g. real CT from two sources"

    def __init__(self, cfg: Mapping[str, Any], organs: Sequence[str], cache_dir: Any):
        super().__init__(cfg, organs, cache_dir)
        from sfdabench.harness.plugins import get_registry

        parts = _plain((cfg.get("params") or {}).get("parts")) or {}
        if not parts:
            raise SfdaBenchError("dataset combined: params.parts is empty; give each part a dataset and params, "
                                 "e.g. parts: {amos: {dataset: nifti_folder, params: {...}}}")
        splits = _plain(cfg.get("splits")) or {}
        for split, ids in splits.items():
            if not isinstance(ids, list):
                raise SfdaBenchError(f"dataset combined: splits.{split} must list <part>/<case id> entries, got "
                                     f"{ids!r}")
            for cid in ids:
                self._part_of(str(cid), parts)
        registry = get_registry()
        self.parts: dict[str, DatasetAdapter] = {}
        for part, spec in parts.items():
            if "dataset" not in spec:
                raise SfdaBenchError(f"dataset combined: part {part!r} has no 'dataset'; name its adapter")
            local = {split: [str(c).split(SEPARATOR, 1)[1] for c in ids if str(c).split(SEPARATOR, 1)[0] == part]
                     for split, ids in splits.items()}
            part_cfg = {"dataset": spec["dataset"], "params": spec.get("params") or {}, "splits": local,
                        "allow_split_overlap": bool(cfg.get("allow_split_overlap", False))}
            self.parts[part] = registry.get("datasets", spec["dataset"])(part_cfg, organs, cache_dir)

    @staticmethod
    def _part_of(case_id: str, parts: Mapping[str, Any]) -> tuple[str, str]:
        part, sep, local = case_id.partition(SEPARATOR)
        if not sep or part not in parts or not local:
            raise SfdaBenchError(f"dataset combined: case {case_id!r} is not <part>/<case id> of a known part "
                                 f"({', '.join(parts)}); write e.g. {next(iter(parts))}/<id>")
        return part, local

    def case_ids(self, split: str) -> list[str]:
        """``<part>/<id>`` in the split's order, each id as its part spells it (the part checks and normalises
        its own ids: e.g. the phantom's ``1`` is ``phantom-ct-0001``)."""
        ids = super().case_ids(split)
        normalised = {}
        for part, adapter in self.parts.items():
            mine = [c.split(SEPARATOR, 1)[1] for c in ids if c.split(SEPARATOR, 1)[0] == part]
            if mine:
                normalised.update({(part, local): own for local, own in zip(mine, adapter.case_ids(split))})
        return [f"{part}{SEPARATOR}{normalised[(part, local)]}"
                for part, local in (self._part_of(c, self.parts) for c in ids)]

    def load_case(self, case_id: str) -> Case:
        part, local = self._part_of(str(case_id), self.parts)
        case = self.parts[part].load_case(local)
        return dataclasses.replace(case, case_id=f"{part}{SEPARATOR}{case.case_id}")

    def prepare(self, case_ids: Sequence[str] | None = None) -> list:
        """Prepare every part that prepares (the others are read on the fly); records named <part>/<id>."""
        records = []
        for part, adapter in self.parts.items():
            if not hasattr(adapter, "prepare"):
                continue
            wanted = None if case_ids is None else [self._part_of(c, self.parts)[1] for c in case_ids
                                                    if c.startswith(part + SEPARATOR)]
            for record in adapter.prepare(wanted):
                records.append(dataclasses.replace(record, case_id=f"{part}{SEPARATOR}{record.case_id}"))
        return records

    @property
    def cache(self):
        """Where prepared cases go (for `sfdabench prepare`'s report): the parts' cache folders."""
        folders = [str(a.cache.folder) for a in self.parts.values() if hasattr(a, "cache")]
        return _Folders(", ".join(folders) or str(self.cache_dir))

    def fingerprint(self, case_ids: Sequence[str]) -> str:
        by_part: dict[str, list[str]] = {}
        for cid in case_ids:
            part, local = self._part_of(str(cid), self.parts)
            by_part.setdefault(part, []).append(local)
        return json.dumps({"dataset": self.name,
                           "parts": {p: self.parts[p].fingerprint(ids) for p, ids in sorted(by_part.items())}},
                          sort_keys=True)


@dataclasses.dataclass(frozen=True)
class _Folders:
    folder: str


@hookimpl
def sfdabench_datasets() -> list[type]:
    return [CombinedDataset]
