"""The contracts every plugin implements: methods, dataset adapters, metrics and SAM backends.

A plugin module imports from here (and from ``sfdabench.blocks``, e.g. ``sfdabench.blocks.nets`` /
``sfdabench.blocks.training``, for shared building blocks), never from the CLI, the run orchestration or
another plugin. Each contract is small on purpose (the DomainBed lesson): the harness calls exactly the methods documented below and nothing else.

Data flow of one run (see README, "Architecture")::

    source_model = cached source checkpoint of (task, seed, architecture, hyper-parameters, data)
    adapted      = Method(cfg.method).adapt(source_model, target_train, context)   # sees no target labels
    metrics      = evaluate(adapted, target_test)                                   # per case x organ
"""
from __future__ import annotations

import abc
import contextlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import nn

log = logging.getLogger("sfdabench")


class SfdaBenchError(Exception):
    """An error the user can fix: the CLI prints its message on one line and exits non-zero."""

    exit_code = 1


class UsageError(SfdaBenchError):
    """Bad command-line input (unknown method, task, ...): exit code 2."""

    exit_code = 2


# ---------------------------------------------------------------------------------------------- data


@dataclass
class Case:
    """One volume of a domain, already preprocessed to the task's frame.

    ``image``: float32 (Z, H, W) in [0, 1]. ``label``: uint8 (Z, H, W) with 0 = background and
    ``i + 1`` = ``task.organs[i]``, or None where labels are unknown. ``spacing``: (z, y, x) in mm of the
    arrays as stored (after any in-plane resize), so surface distances can be reported in mm.
    """

    case_id: str
    image: np.ndarray
    label: np.ndarray | None
    spacing: tuple[float, float, float]

    def __post_init__(self) -> None:
        if self.label is not None and self.label.shape != self.image.shape:
            raise SfdaBenchError(
                f"case {self.case_id}: image shape {self.image.shape} != label shape {self.label.shape}; "
                "fix the dataset adapter or the input files")

    @property
    def num_slices(self) -> int:
        return int(self.image.shape[0])


def slice_to_input(image_slice: np.ndarray) -> torch.Tensor:
    """(H, W) slice in [0, 1] -> (3, H, W) float tensor: the same slice replicated 3x (DFG, spec 1.3 step 8)."""
    t = torch.from_numpy(np.ascontiguousarray(image_slice, dtype=np.float32))
    return t.unsqueeze(0).expand(3, -1, -1).contiguous()


class SliceDataset(torch.utils.data.Dataset):
    """2D slices of a list of cases, in (case, slice) order.

    Items are dicts with ``image`` (3, H, W), ``case_index`` and ``slice_index``; with ``labels=True``
    also ``label`` (H, W) int64. Target-train data reaches a method only through
    :class:`TargetImages`, which is built with ``labels=False`` and has no way to reach the labels.
    """

    def __init__(self, cases: Sequence[Case], labels: bool):
        if labels and any(c.label is None for c in cases):
            missing = [c.case_id for c in cases if c.label is None]
            raise SfdaBenchError(f"cases without labels where labels are needed: {missing[:5]}")
        self._images = [c.image for c in cases]
        self._labels = [c.label for c in cases] if labels else None
        self.index = [(ci, z) for ci, c in enumerate(cases) for z in range(c.num_slices)]

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict[str, Any]:
        ci, z = self.index[i]
        item = {"image": slice_to_input(self._images[ci][z]), "case_index": ci, "slice_index": z}
        if self._labels is not None:
            item["label"] = torch.from_numpy(self._labels[ci][z].astype(np.int64))
        return item


class TargetImages(SliceDataset):
    """The unlabelled target-train split, as a method sees it: images, case ids and spacings only."""

    def __init__(self, cases: Sequence[Case]):
        super().__init__(cases, labels=False)
        self.case_ids = [c.case_id for c in cases]
        self.spacings = [c.spacing for c in cases]
        self.shapes = [c.image.shape for c in cases]

    def volume(self, case_index: int) -> np.ndarray:
        """The (Z, H, W) image volume of one case (for 3D steps such as connectivity post-processing)."""
        return self._images[case_index]

    def labelled(self, labels: Sequence[np.ndarray]) -> SliceDataset:
        """These images paired with label volumes (pseudo-labels, or the oracle's target labels), in case order:
        the training set of a method that trains on its own labels."""
        if len(labels) != len(self.case_ids):
            raise ValueError(f"{len(labels)} label volumes for {len(self.case_ids)} target-train cases")
        cases = [Case(cid, self.volume(i), labels[i], self.spacings[i]) for i, cid in enumerate(self.case_ids)]
        return SliceDataset(cases, labels=True)


# --------------------------------------------------------------------------------------------- SAM


class SamBackend(abc.ABC):
    """A promptable segmenter (SAM, MedSAM, LiteMedSAM, ...) used by SAM-guided methods.

    ``embed`` runs the image encoder once per slice; ``decode`` runs the prompt encoder + mask decoder
    for one box. Boxes are ``(x_min, y_min, x_max, y_max)`` in pixel indices of the slice as given to
    ``embed`` (inclusive), the convention of spec 4.1. Masks come back at the slice's resolution.
    """

    name: ClassVar[str]
    description: ClassVar[str] = ""
    #: Where the backend may keep files derived from its weights (e.g. exported models); the harness sets it
    #: to the run's cache dir right after building the backend. None when built outside a run.
    cache_dir: Path | None = None

    def __init__(self, cfg: Mapping[str, Any], device: torch.device):
        self.cfg = cfg
        self.device = device

    @abc.abstractmethod
    def embed(self, image: np.ndarray) -> "SamEmbedding":
        """Encode a (H, W) slice with values in [0, 1]."""

    @abc.abstractmethod
    def decode(self, embedding: "SamEmbedding", box: Sequence[float]) -> np.ndarray:
        """Bool (H, W) mask for one box prompt (before any largest-component filtering)."""

    def features(self, embedding: "SamEmbedding") -> torch.Tensor:
        """The image embedding as a (C, h, w) feature map, for feature-guided prompt search (MBS)."""
        return embedding.features

    def fingerprint(self) -> str:
        """Identifies weights + preprocessing, so cached embeddings are never reused across backends."""
        return self.name


@dataclass
class SamEmbedding:
    """What ``SamBackend.embed`` returns: the encoder output plus what ``decode`` needs to map boxes back."""

    features: torch.Tensor          # (C, h, w) image embedding
    image_size: tuple[int, int]     # (H, W) of the slice given to embed
    extra: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------ context


class Context:
    """What the harness lends a method during ``adapt``: device, seed, caches, progress, SAM, diagnostics.

    Diagnostics (``pseudo_label_quality``, ``pseudo_label_quality_by_group``, ``box_prompt_ceiling``) measure
    pseudo-labels against target-train ground truth that the method never sees: the method passes its
    pseudo-labels in and gets nothing back, so ground truth cannot influence a decision. The harness lends the
    measuring service (``target_labels``, a :class:`sfdabench.harness.label_diagnostics.TargetLabelDiagnostics`; None
    for an unlabelled target, and then the diagnostics record nothing). Methods that declare
    ``uses_target_labels = True`` (the oracle, the box-prompt ceiling) may call ``target_train_labels``; they
    are marked as not SFDA in every result row.
    """

    def __init__(self, *, device: torch.device, seed: int, cache_dir: Path, run_dir: Path,
                 organs: Sequence[str], sam_factory: Callable[[], SamBackend] | None = None,
                 target_labels: Any = None, allow_labels: bool = False, progress: bool = True):
        self.device = device
        self.seed = seed
        self.cache_dir = Path(cache_dir)
        self.run_dir = Path(run_dir)
        self.organs = list(organs)
        self.num_classes = len(self.organs) + 1
        self.show_progress = progress
        self.diagnostics: dict[str, Any] = {}
        self._stage_volumes: dict[str, list[np.ndarray]] = {}   # for the class-keeping ceiling
        self.timings: dict[str, float] = {}
        self._sam_factory = sam_factory
        self._sam: SamBackend | None = None
        self._labels = target_labels
        self._allow_labels = allow_labels
        self.log = log

    # -- resources
    @property
    def sam(self) -> SamBackend:
        """The configured SAM backend, built on first use (methods that never prompt SAM never load it)."""
        if self._sam is None:
            if self._sam_factory is None:
                raise SfdaBenchError("this run has no SAM backend configured; set sam=<backend>")
            self._sam = self._sam_factory()
        return self._sam

    def generator(self, offset: int = 0) -> torch.Generator:
        """A CPU torch.Generator seeded from the run seed (``offset`` separates independent streams)."""
        return torch.Generator().manual_seed(self.seed * 1000003 + offset)

    def progress(self, iterable: Iterable | None = None, **kwargs: Any) -> Any:
        from tqdm.auto import tqdm

        return tqdm(iterable, disable=not self.show_progress, leave=False, dynamic_ncols=True, **kwargs)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time a phase of the method; timings go into the run summary."""
        start = time.perf_counter()
        self.log.info("phase %s ...", name)
        try:
            yield
        finally:
            self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - start
            self.log.info("phase %s done in %.1f s", name, self.timings[name])

    # -- diagnostics and labels
    def record(self, key: str, value: Any) -> None:
        """Store a diagnostic value (JSON-serialisable) in the run summary."""
        self.diagnostics[key] = value

    def pseudo_label_quality(self, stage: str, volumes: list[np.ndarray]) -> dict[str, float]:
        """Score target-train pseudo-label volumes (one (Z, H, W) array per case, in TargetImages order)
        against the hidden ground truth; recorded under ``pseudo_label_dice/<stage>`` and, which class went
        where (twin-organ swaps, missed organs), ``pseudo_label_confusion/<stage>``. Measurement only. Name
        the stages in the method's ``stage_labels``."""
        if self._labels is None:
            return {}
        scores = self._labels.dice(volumes)
        self.diagnostics.setdefault("pseudo_label_dice", {})[stage] = scores
        self.diagnostics.setdefault("pseudo_label_confusion", {})[stage] = self._labels.confusion(volumes)
        self._stage_volumes[stage] = volumes
        return scores

    def pseudo_label_quality_by_group(self, stage: str, volumes: list[np.ndarray],
                                      groups: Mapping[str, Sequence[Sequence[str]]]) -> None:
        """Score pseudo-label volumes per organ on groups of slices the method names, e.g. by the search
        outcome that labelled the organ there: ``groups[organ][case][z]`` (TargetImages order). Recorded
        under ``pseudo_label_by_group/<stage>`` as ``{organ: {group: {slices, gt_pixels, pixels, recall,
        precision, dice}}}``. Measurement only: nothing is returned. Score several stages with the same
        groups to see what a stage did to the slices of each group (e.g. the target prediction vs SAM's)."""
        if self._labels is None:
            return
        self.diagnostics.setdefault("pseudo_label_by_group", {})[stage] = self._labels.by_group(volumes, groups)

    def box_prompt_ceiling(self, stage: str, *, margin: int, scores: tuple[float, float],
                           classes_from: str | None = None) -> None:
        """For a method that prompts SAM with boxes: how close its pseudo-labels of ``stage`` came to what SAM
        gives for ground-truth boxes (measurement only, nothing is returned).

        The harness prompts ``self.sam`` with ground-truth boxes (``margin`` pixels wider on each side: pass
        the method's own margin) on every target-train slice and merges the classes' masks with the method's
        ``scores`` (background, mask), then scores those pseudo-labels:
        - ``gt_box_ceiling``: every organ present in the ground truth, with its true class. It hands class
          identity and presence over for free, so it bounds detection + classification + box together.
        - ``class_keeping_ceiling`` (when ``classes_from`` names an earlier ``pseudo_label_quality`` stage,
          e.g. the model the search started from): for each class that stage predicts on a slice, the
          ground-truth box of the organ its region overlaps most, labelled with the *predicted* class. It
          keeps that model's class identity and presence, so it bounds the box prompts alone.
        ``box_search_efficiency`` (against the first) and ``box_search_efficiency_class_keeping`` (against
        the second) = pseudo-label Dice of ``stage`` / ceiling Dice, per organ and ``mean``. Call it after
        ``pseudo_label_quality(stage, ...)``.
        """
        searched = self.diagnostics.get("pseudo_label_dice", {}).get(stage)
        if self._labels is None or not self._labels.box_prompts or searched is None:
            return
        start = time.perf_counter()
        ceiling, stats = self._labels.box_prompt_ceiling(self.sam, int(margin), scores)
        self.diagnostics["pseudo_label_dice"]["gt_box_ceiling"] = ceiling
        self.diagnostics["gt_box_ceiling"] = {**stats, "stage": stage, "seconds": time.perf_counter() - start}
        self.diagnostics["box_search_efficiency"] = _ratio(searched, ceiling)
        if classes_from is not None and classes_from in self._stage_volumes:
            start = time.perf_counter()
            keeping, stats = self._labels.box_prompt_ceiling(self.sam, int(margin), scores,
                                                             classes=self._stage_volumes[classes_from])
            self.diagnostics["pseudo_label_dice"]["class_keeping_ceiling"] = keeping
            self.diagnostics["class_keeping_ceiling"] = {**stats, "stage": stage, "classes_from": classes_from,
                                                         "seconds": time.perf_counter() - start}
            self.diagnostics["box_search_efficiency_class_keeping"] = _ratio(searched, keeping)

    def target_train_labels(self) -> list[np.ndarray]:
        """Ground-truth target-train label volumes. Only for methods with ``uses_target_labels = True``."""
        if not self._allow_labels:
            raise SfdaBenchError("target-train labels are not available to source-free methods; a method "
                                 "that needs them must declare uses_target_labels = True (and is not SFDA)")
        if self._labels is None:
            raise SfdaBenchError("this task's target-train split has no labels; a method that reads them "
                                 "(uses_target_labels) cannot run on it")
        return self._labels.labels


def _ratio(searched: Mapping[str, float], ceiling: Mapping[str, float]) -> dict[str, float]:
    return {key: (searched[key] / value if value and key in searched else float("nan"))
            for key, value in ceiling.items()}


# ------------------------------------------------------------------------------------------ methods


class Method(abc.ABC):
    """An adaptation method: ``adapt(source_model, target_train, context) -> model``.

    ``cfg`` is the method's config group (``configs/method/<name>.yaml``), including ``name``.
    ``source_model`` is a fresh copy of the cached source checkpoint (the method may modify it);
    it returns ``(features, logits)`` from ``forward``. The returned model is evaluated with ``eval()``
    and the argmax of its logits.
    """

    name: ClassVar[str]
    description: ClassVar[str] = ""
    #: True only for upper bounds / diagnostics that read target labels; such rows are never SFDA.
    uses_target_labels: ClassVar[bool] = False
    #: How the returned model was chosen, for the leaderboard's ``selection`` column. sfdabench methods
    #: train for a fixed budget and return the last model ("last"); none may select by target test metrics.
    selection: ClassVar[str] = "last"
    #: True if the method prompts ``context.sam``; the SAM backend then goes into the result rows.
    uses_sam: ClassVar[bool] = False
    #: The method's role as a reference of the tables: ``"lower"`` (no adaptation: the paired differences and
    #: the gap closed are measured from it), ``"upper"`` (target-supervised: the gap closed is measured to it)
    #: or ``""`` (a method to compare). At most one registered method takes each role.
    reference: ClassVar[str] = ""
    #: The pseudo-label stages the method scores (``context.pseudo_label_quality(stage, ...)``), in the order
    #: it produces them, with the label tables and the report give them.
    stage_labels: ClassVar[Mapping[str, str]] = {}
    #: The method's ablation grid (``sfdabench ablate method=<name>``), or None: the method has none.
    ablation: ClassVar["Ablation | None"] = None

    def __init__(self, cfg: Mapping[str, Any]):
        self.cfg = cfg

    def variant(self) -> str:
        """Names the configuration variant (ablation switches) for the leaderboard's ``variant`` column."""
        return "default"

    @abc.abstractmethod
    def adapt(self, source_model: nn.Module, target_train: TargetImages, context: Context) -> nn.Module:
        """Return the adapted segmenter."""


class Ablation(abc.ABC):
    """A method's ablation grid: variant names (as ``Method.variant()`` names its runs) and their settings.

    ``sfdabench ablate method=<name>`` runs the variants of a grid as ordinary protocol runs (each variant's
    ``settings`` merged into the method's config) and tabulates them with the ``cells`` this class gives.
    """

    #: Named lists of variant names; ``"default"`` is the grid ``ablate`` runs without ``variants=``.
    grids: ClassVar[Mapping[str, Sequence[str]]] = {}
    #: The variant the paper reports; a cell listed in ``optional_cells`` is shown only when some row's value
    #: differs from this variant's (and is not ``"-"``).
    reference: ClassVar[str] = ""
    optional_cells: ClassVar[Sequence[str]] = ()

    @abc.abstractmethod
    def settings(self, variant: str) -> dict[str, Any]:
        """The method-config settings of a variant name; a ``UsageError`` names a name that is not one."""

    def columns(self, variant: str) -> dict[str, Any]:
        """Machine-readable columns of the ablation CSV (e.g. ``{"cp": True}``)."""
        return {}

    def cells(self, variant: str) -> dict[str, str]:
        """The ablation table's Markdown cells of a variant, ``{header: text}``, in column order."""
        return {}


# -------------------------------------------------------------------------------------- datasets


#: The splits the harness reads; train/test of one domain must not share cases unless a task allows it.
HARNESS_SPLITS = ("train", "test")


class DatasetAdapter(abc.ABC):
    """Reads one dataset (a domain) and maps its native labels to the task's organ list.

    ``cfg`` is the task's ``source``/``target`` block (dataset name, ``params``, ``splits``);
    ``organs`` the task's organ names (labels ``1..len(organs)`` in that order).
    """

    name: ClassVar[str]
    description: ClassVar[str] = ""
    #: The splits used when the task config gives none (None: the config must give them).
    default_splits: ClassVar[Mapping[str, Any] | None] = None

    def __init__(self, cfg: Mapping[str, Any], organs: Sequence[str], cache_dir: Path):
        self.cfg = cfg
        self.organs = list(organs)
        self.cache_dir = Path(cache_dir)

    def case_ids(self, split: str) -> list[str]:
        """Case ids of a split named in the task config (``splits.<split>``), the one split grammar of every
        adapter: a list of case ids (each through :meth:`normalise_case_id`), a keyword of the dataset
        (:meth:`named_cases`), or ``rest`` (the cases of ``splits.all`` that no other split lists). Cases listed
        twice, and train/test sharing cases (unless ``allow_split_overlap``), are one-line errors."""
        splits = dict(_plain(self.cfg.get("splits") or self.default_splits) or {})
        if split not in splits:
            raise SfdaBenchError(f"dataset {self.name}: the task config has no split '{split}' "
                                 f"(has: {sorted(splits)}); add splits.{split} to the task config")
        ids = self._expand_split(split, splits)
        duplicates = sorted({c for c in ids if ids.count(c) > 1})
        if duplicates:
            raise SfdaBenchError(f"dataset {self.name}: split '{split}' lists cases twice: {duplicates}")
        if split in HARNESS_SPLITS and not self.cfg.get("allow_split_overlap", False):
            for other in HARNESS_SPLITS:
                if other != split and other in splits:
                    shared = sorted(set(ids) & set(self._expand_split(other, splits)))
                    if shared:
                        raise SfdaBenchError(
                            f"dataset {self.name}: splits '{split}' and '{other}' share cases {shared}; "
                            "override both splits, or list the pool in splits.all and set 'train: rest'")
        return ids

    def _expand_split(self, split: str, splits: Mapping[str, Any]) -> list[str]:
        value = splits[split]
        if isinstance(value, str):
            if value == "rest":
                if "all" not in splits or split == "all":
                    raise SfdaBenchError(f"dataset {self.name}: split '{split}: rest' needs splits.all "
                                         "(the pool it takes the remaining cases from)")
                taken = {c for name in splits if name not in (split, "all") and splits[name] != "rest"
                         for c in self._expand_split(name, splits)}
                return [c for c in self._expand_split("all", splits) if c not in taken]
            named = self.named_cases(value)
            if named is None:
                raise SfdaBenchError(f"dataset {self.name}: split '{split}' is '{value}', which is neither a list "
                                     "of case ids nor a keyword this dataset knows")
            return named
        if value is None:
            return []
        return [self.normalise_case_id(c) for c in value]

    def normalise_case_id(self, case_id: Any) -> str:
        """A case id as this dataset spells it (e.g. ``2`` -> ``"2"``); raise SfdaBenchError if it is none."""
        return str(case_id)

    def named_cases(self, keyword: str) -> list[str] | None:
        """Case ids for a keyword used as a split value (e.g. AMOS ``imagesTr``); None: unknown keyword."""
        return None

    @abc.abstractmethod
    def load_case(self, case_id: str) -> Case:
        """Load and preprocess one case to the task frame."""

    def fingerprint(self, case_ids: Sequence[str]) -> str:
        """A string that changes whenever the data of these cases would change (for cache keys)."""
        import json

        params = self.cfg.get("params", {})
        return json.dumps({"dataset": self.name, "params": _plain(params), "cases": list(case_ids)},
                          sort_keys=True, default=str)


# ------------------------------------------------------------------------------------------ metrics


class Metric(abc.ABC):
    """A per-organ volume metric: ``metric(pred, gt, spacing) -> float``.

    ``pred``/``gt`` are bool (Z, H, W) masks of one organ; ``spacing`` is (z, y, x) in mm. Each metric
    documents its behaviour on empty masks (see ``empty_policy``) and returns NaN where the value is
    undefined under that policy (NaN values are left out of means and counted in the summary).
    """

    name: ClassVar[str]
    description: ClassVar[str] = ""
    higher_is_better: ClassVar[bool] = True  # ranks, paired differences, gap-closed and compare follow it
    bounded: ClassVar[bool] = False          # values in [0, 1] (an overlap score) rather than a distance
    digits: ClassVar[int] = 3                # decimals shown in the Markdown tables
    label: ClassVar[str] = ""                # name in table headers (default: ``name``)
    spatial: ClassVar[bool] = False          # values in the run's distance unit (row column ``asd_unit``)

    def __init__(self, cfg: Mapping[str, Any] | None = None):
        self.cfg = dict(cfg or {})

    @property
    def unit(self) -> str:
        return ""

    @abc.abstractmethod
    def __call__(self, pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float]) -> float:
        ...



class Command(abc.ABC):
    """A subcommand of the ``sfdabench`` command line: ``sfdabench <name> [args]``.

    ``usage`` is its entry in ``sfdabench --help`` (first line: ``<name> <arguments>``, further lines
    indented explanation); ``interrupted`` what Ctrl-C leaves behind, for the one line printed then.
    ``main`` gets the arguments after the name and returns the exit code; a
    :class:`SfdaBenchError` it raises becomes one line and that error's exit code.
    """

    name: ClassVar[str]
    description: ClassVar[str] = ""
    usage: ClassVar[str] = ""
    interrupted: ClassVar[str] = "nothing was left half-written"

    @staticmethod
    @abc.abstractmethod
    def main(args: Sequence[str]) -> int:
        ...

def _plain(obj: Any) -> Any:
    """OmegaConf containers -> plain Python (for hashing and JSON)."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(obj, (DictConfig, ListConfig)):
            return OmegaConf.to_container(obj, resolve=True)
    except ImportError:  # pragma: no cover
        pass
    return obj
