"""DFG phase 2: the dual-feature-guided box-prompt search (spec 4.1-4.4).

For every foreground class of a slice, a box prompt is grown until SAM's mask becomes stable:

* **TBS** grows a region through pairwise affinities of the (FA-trained) target features and queries SAM with
  the region's box until two consecutive masks barely change;
* **MBS** then grows the stable TBS mask toward pixels close to the mask's centroid in SAM-feature space;
* **stage 3** enlarges the last MBS box a few pixels at a time when MBS converges without stabilising.

The per-class masks are merged into one pseudo-label (spec 4.4): background scores 0.5, a SAM-refined mask 2,
a fallback mask (the target model's argmax) 1; argmax, ties to the lower class index.

Variants (``search``): ``dbs`` (spec 4.3 exactly), ``tbs`` (TBS only), ``mbs`` (MBS from the SAM mask of the
seed's box) and ``naive`` (Fig. 1b: one box around ``P_c > naive_threshold``); ``stage3=False`` disables stage 3.

Choices of this implementation (documented; see also the report of the task that wrote it):

* **Resolution scaling (UNCERTAIN-style project choice).** The spec's pixel values were tuned on 256x256 slices.
  With ``scale_to_resolution`` (default) and a slice of another size, pixel counts (existence count, minimum mask
  area, change tolerances) scale by ``H*W / reference_size**2`` and lengths (box margin, affinity radius,
  stage-3 growth) by ``H / reference_size``, rounded half-up, at least 1 - except the affinity radius, at least
  2, because radius 1 has no neighbour offset at all (``0 < dy^2+dx^2 < 1`` is empty) and nothing could grow.
  Probability/cosine thresholds and step limits are resolution-free and never scaled (by default, see below).
* **Tolerance scaling** (``tolerance_scaling``). ``area`` (default, as above) scales the five change tolerances
  (``tbs_tol_*``, ``mbs_tol_*``) like areas. But they bound how many pixels two successive SAM masks differ by,
  and such differences are boundary rings, whose size grows with the perimeter: ``length`` scales them by
  ``H / reference_size`` like the box margin (at 128 px: TBS 8/18 and MBS 8/15/23 instead of 4/9 and 4/8/11).
  ``existence_pixels`` and ``tbs_min_area`` measure areas and stay area-scaled either way.
* **Step scaling** (``steps_scaling``). A growth step (TBS or MBS) moves the region by at most the longest
  neighbour offset, ``affinity_radius - 1`` px along an axis. The clamp of the radius to 2 breaks the
  proportion: at 128 px the spec's 3 px per step at 256 px would be 1.5 px, the scaled radius 2 reaches 1 px,
  so the same ``max_steps`` give TBS/MBS 2/3 of the spec's reach. ``fixed`` (default) keeps ``max_steps`` as
  written; ``reach`` multiplies every entry by (spec reach in this slice's pixels) / (actual reach)
  = ``(affinity_radius - 1) * H / reference_size / (scaled affinity_radius - 1)``, rounded half-up, at least 1
  (at 128 px x1.5: 38, 30, 30, 53). A no-op at the reference size or without ``scale_to_resolution``.
* **Step limits by organ.** ``max_steps`` is a mapping organ name -> steps (``from_cfg`` orders it by the
  task's organs, class ``i + 1`` = ``organs[i]``) or a list in class order.
* **Twin guard** (``twin_guard``, not in the paper; default ``none``). SAM may hand a class the region of a
  twin organ, e.g. the right-kidney search lands on the left kidney when the target model confuses the two.
  A class whose search ended with a SAM mask is refused that mask and falls back (outcome "fallback",
  ``ClassTrace.guard`` set) when
  ``side``: its organ has a side in ``sides`` (the patient's side; every adapter's frame has column 0 = the
  patient's right) and the mask's centroid column lies beyond the midline ``(W - 1) / 2`` on the other side;
  the fallback is the target prediction of the class on its own half (columns <= or >= the midline);
  ``seed``: the mask covers a pixel of the seed region (``largest_contour(P > max P - seed_delta)``) of
  another class that passed the existence check; the fallback is the target prediction minus those seeds.
  Organs without a side are not side-guarded; names in ``sides`` that are not task organs are ignored (the
  sides come from the organ catalogue, ``task.sides``, which may list more organs than a task uses).
* **Coverage before stability** (``min_coverage``, ``coverage_of``; not in the paper, default 0 = off). SAM
  can lock onto a substructure of a large organ: for a box around the small seed region it returns a small
  mask, the next box (grown by one pixel) returns nearly the same mask, and the search calls it "stable"
  long before the box spans the organ (measured on the phantom: a 63-px mask kept for a 1661-px liver). With
  ``min_coverage = f > 0`` a TBS or MBS mask counts as stable only if it covers at least ``f`` of
  ``coverage_of = region``: the region the step's box was drawn around (the TBS region grown through target
  features, or the MBS region), or ``prediction``: the target model's predicted components of the class that
  touch that region. A mask that fails keeps the search growing; stage 3 (box enlargement without a region)
  is not gated. Both read only the target model and SAM, never labels.
* **MBS growth budget** (``mbs_max_growth``; not in the paper, default 0 = off). MBS's threshold
  ``min(mbs_multiplier x mean in-mask distance, mbs_cap)`` is additionally lowered to the distance below which
  at most ``g x |start mask|`` pixels outside the start mask lie, so the allowed region can at most grow by g
  times the mask. Measured with LiteMedSAM (calibrate.py's ``outside`` measure): on the phantom 7-21% of the
  non-organ pixels lie under the cap, on real CT 0-1%, so it binds where SAM's features do not separate the
  organ and rarely where they do.
* **No border quirk.** The original builds its neighbour table only from pixels with row <= 252 and
  3 <= col <= 252; here every pixel can be a "from" pixel (the spec calls the quirk an implementation detail).
* **Missing SAM masks.** ``largest_contour`` returns none when SAM yields nothing. TBS skips such steps (spec);
  in MBS/stage 3 they stay in the history but never count as stable (a change count against "none" is
  infinite), and a selected "none" mask means "MBS found nothing" (the stable TBS mask is kept).
* **Stage 3 disabled.** ``return history[-7]`` of the spec means "the last MBS mask before stage 3"; with
  ``stage3=False`` that is simply the last MBS mask.
* **Naive box** uses the same margin as every other box (so the variants differ only in how the box is found).
* Cosines and centroid distances are computed in float64 so that threshold decisions do not depend on the
  summation order (the straightforward reference implementation must agree pixel for pixel).
* The per-slice array work (affinities, region growth, MBS distances) is vectorised NumPy on the CPU; inputs on
  another device are copied once per slice. torch's intra-op threads made these small ops 10-100x slower on
  the shared 2-core machines, and SAM's masks come back as NumPy for OpenCV anyway.

Performance: per slice the target-feature affinities are computed once (one product of shifted views per
unordered offset pair), a growth step is a handful of array ops per offset, and a per-slice memo
(``decode_cache``) ensures SAM decodes each distinct box at most once across all classes of the slice.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from sfdabench.api import SamBackend, SamEmbedding
from sfdabench.sam.masks import Box, box_around, largest_contour, round_half_up  # noqa: F401 (re-exported)

SEARCH_VARIANTS = ("naive", "tbs", "mbs", "dbs")
OUTCOMES = ("absent", "sam", "fallback")
TOLERANCE_SCALINGS = ("area", "length")
STEPS_SCALINGS = ("fixed", "reach")
TWIN_GUARDS = ("none", "side", "seed")
COVERAGE_OF = ("region", "prediction")
SIDES = ("left", "right")          # the patient's side (column 0 of every slice = the patient's right)


# ------------------------------------------------------------------------------------------ config


@dataclass(frozen=True)
class BoxSearchConfig:
    """Hyper-parameters of the box search (spec 4.2), in pixels of the slice being searched.

    Build it with :meth:`from_cfg`, which applies the resolution scaling described in the module docstring.
    The fields have no defaults here: a setting not given is the one of ``configs/method/dfg.yaml``
    (``search``, the spec's values for 256x256 slices), the one place they are written (:func:`spec_defaults`).
    """

    search: str
    stage3: bool
    naive_threshold: float
    # existence / seeding
    existence_prob: float
    existence_pixels: int
    seed_delta: float
    box_margin: int
    affinity_radius: int
    # TBS
    tbs_cos_threshold: float
    max_steps: tuple[int, ...]  # per foreground class, in class-index order
    steps_scaling: str  # fixed | reach (module docstring)
    tbs_tol_1step: int
    tbs_tol_2step: int
    tbs_min_area: int
    # MBS
    mbs_multiplier: float
    mbs_cap: float
    mbs_max_growth: float  # 0 = the paper; see mbs()
    mbs_tol_1step: int
    mbs_tol_2step: int
    mbs_tol_3step: int
    # stage 3 (its tolerances are the MBS 2-step / 1-step ones, spec 4.3)
    stage3_growth: int
    stage3_repeats: int
    # merge (spec 4.4)
    score_background: float
    score_sam: float
    score_fallback: float
    # coverage before stability (module docstring)
    min_coverage: float  # 0 = the paper (no coverage condition)
    coverage_of: str  # region | prediction
    # twin guard (module docstring)
    twin_guard: str  # none | side | seed
    sides: tuple[str | None, ...] | None  # per foreground class: "left" | "right" | None
    # resolution scaling
    reference_size: int
    scale_to_resolution: bool
    tolerance_scaling: str  # area | length: how the change tolerances scale
    #: (H, W) the pixel values were scaled for; None = unscaled (values as written, for reference_size).
    image_size: tuple[int, int] | None = None

    _AREAS = ("existence_pixels", "tbs_min_area")
    _TOLERANCES = ("tbs_tol_1step", "tbs_tol_2step", "mbs_tol_1step", "mbs_tol_2step", "mbs_tol_3step")
    _PIXEL_COUNTS = _AREAS + _TOLERANCES
    _LENGTHS = ("box_margin", "affinity_radius", "stage3_growth")

    @classmethod
    def from_cfg(cls, cfg: Mapping[str, Any] | None, image_size: int | Sequence[int],
                 organs: Sequence[str] | None = None) -> "BoxSearchConfig":
        """Config from a mapping (plain dict or OmegaConf) of field values, scaled to ``image_size`` (H, W).

        ``organs``: the task's organ names in label order (class ``i + 1`` = ``organs[i]``); needed when
        ``max_steps`` or ``sides`` are given per organ name. Unknown keys are an error (a typo would otherwise
        silently fall back to a default).
        """
        given = {str(k): cfg[k] for k in cfg} if cfg is not None else {}
        known = {f.name for f in fields(cls)} - {"image_size"}
        unknown = sorted(set(given) - known)
        if unknown:
            raise ValueError(f"unknown box-search settings {unknown}; valid: {sorted(known)}")
        values = {**spec_defaults(), **given}
        organs = None if organs is None else [str(o) for o in organs]
        if "max_steps" in values:
            values["max_steps"] = _steps_in_class_order(values["max_steps"], organs)
        if "sides" in values:
            values["sides"] = _sides_in_class_order(values["sides"], organs, values.get("twin_guard", "none"))
        return cls(**values).scaled_to(image_size)

    def __post_init__(self) -> None:
        if self.search not in SEARCH_VARIANTS:
            raise ValueError(f"box search {self.search!r} unknown; use one of {SEARCH_VARIANTS}")
        for name, choices in (("tolerance_scaling", TOLERANCE_SCALINGS), ("steps_scaling", STEPS_SCALINGS),
                              ("twin_guard", TWIN_GUARDS), ("coverage_of", COVERAGE_OF)):
            if getattr(self, name) not in choices:
                raise ValueError(f"{name}={getattr(self, name)!r} unknown; use one of {', '.join(choices)}")
        if self.mbs_max_growth < 0:
            raise ValueError(f"mbs_max_growth must be >= 0 (0 = off), got {self.mbs_max_growth}")
        if not 0.0 <= self.min_coverage <= 1.0:
            raise ValueError(f"min_coverage must be a fraction in [0, 1], got {self.min_coverage}")
        if not self.max_steps or min(self.max_steps) < 1:
            raise ValueError(f"max_steps must list at least one positive step limit, got {self.max_steps}")
        if self.affinity_radius < 1 or self.box_margin < 0 or self.reference_size < 1:
            raise ValueError("affinity_radius >= 1, box_margin >= 0 and reference_size >= 1 are required")
        if self.sides is not None and any(s is not None and s not in SIDES for s in self.sides):
            raise ValueError(f"sides must be 'left', 'right' or null per class, got {self.sides}")
        if self.twin_guard == "side" and not any(self.sides or ()):
            raise ValueError("twin_guard=side needs the patient's side of the organs, and none of this task's "
                             "organs has one; set task.sides (see configs/organs/abdomen4.yaml) or "
                             "method.search.sides={<organ>: left|right}")

    def side_of(self, class_index: int) -> str | None:
        """The patient's side of a class ("left" | "right"), None when it has none."""
        if self.sides is None or not 1 <= class_index <= len(self.sides):
            return None
        return self.sides[class_index - 1]

    def scaled_to(self, image_size: int | Sequence[int]) -> "BoxSearchConfig":
        """The same config with pixel values for slices of ``image_size`` (see the module docstring)."""
        if self.image_size is not None:
            raise ValueError(f"this config is already scaled to {self.image_size}")
        height, width = (image_size, image_size) if isinstance(image_size, int) else map(int, image_size)
        if not self.scale_to_resolution:
            return replace(self, image_size=(height, width))
        area_scale = height * width / self.reference_size ** 2
        length_scale = height / self.reference_size
        # the change tolerances count boundary-ring pixels: by area (the default) or by length
        tolerance_scale = length_scale if self.tolerance_scaling == "length" else area_scale
        scaled: dict[str, Any] = {}
        for name in self._AREAS:
            scaled[name] = max(1, _round_half_up(getattr(self, name) * area_scale))
        for name in self._TOLERANCES:
            scaled[name] = max(1, _round_half_up(getattr(self, name) * tolerance_scale))
        for name in self._LENGTHS:
            scaled[name] = max(1, _round_half_up(getattr(self, name) * length_scale))
        scaled["affinity_radius"] = max(2, scaled["affinity_radius"])  # radius 1 has no neighbours
        if self.steps_scaling == "reach":
            # spec reach per step in this slice's pixels / the scaled radius's reach, in integers until the
            # one division so that x.5 products round half-up exactly
            spec_reach = (self.affinity_radius - 1) * height
            reach = self.reference_size * (scaled["affinity_radius"] - 1)
            scaled["max_steps"] = tuple(max(1, _round_half_up(s * spec_reach / reach)) for s in self.max_steps)
        return replace(self, image_size=(height, width), **scaled)

    def max_steps_for(self, class_index: int) -> int:
        if not 1 <= class_index <= len(self.max_steps):
            raise ValueError(f"max_steps has {len(self.max_steps)} entries, none for class {class_index}; "
                             "give one step limit per foreground class")
        return self.max_steps[class_index - 1]


_round_half_up = round_half_up  # the shared rule (sfdabench.sam.masks)


@functools.lru_cache(maxsize=1)
def spec_defaults() -> dict[str, Any]:
    """The box-search settings of ``configs/method/dfg.yaml`` (its ``search`` node): what a setting is when a
    caller does not give it. ``sides`` is the task's (an interpolation of ``task.sides``), so None here."""
    from omegaconf import OmegaConf

    import sfdabench_configs

    path = Path(sfdabench_configs.__file__).parent / "method" / "dfg.yaml"
    values = OmegaConf.to_container(OmegaConf.load(path)["search"], resolve=False)
    values["sides"] = None
    return values


def _steps_in_class_order(steps: Any, organs: list[str] | None) -> tuple[int, ...]:
    """``max_steps`` as a tuple in class order, from a mapping organ -> steps or a list in class order."""
    if not isinstance(steps, Mapping):
        return tuple(int(s) for s in steps)
    named = {str(k): steps[k] for k in steps}
    if organs is None:
        raise ValueError(f"max_steps is given per organ ({', '.join(named)}) but the task's organ names are "
                         f"unknown; pass organs=<names in label order> to BoxSearchConfig.from_cfg")
    extra = [name for name in named if name not in organs]
    if extra:
        raise ValueError(f"max_steps has an entry for '{extra[0]}', which is not an organ of this task "
                         f"({', '.join(organs)}); remove it with ~method.search.max_steps.{extra[0]} "
                         f"or correct the name")
    missing = [organ for organ in organs if organ not in named]
    if missing:
        raise ValueError(f"max_steps has no entry for organ {', '.join(repr(m) for m in missing)}; add "
                         f"+method.search.max_steps.{missing[0]}=<steps>" + (" (and so on)" if missing[1:] else ""))
    return tuple(int(named[organ]) for organ in organs)


def _sides_in_class_order(sides: Any, organs: list[str] | None, twin_guard: str) -> tuple[str | None, ...] | None:
    """``sides`` as a tuple in class order (None: no side), from a mapping organ -> side or a list."""
    if sides is None:
        return None
    if not isinstance(sides, Mapping):
        return tuple(None if s is None else str(s) for s in sides)
    named = {str(k): None if sides[k] is None else str(sides[k]) for k in sides}
    wrong = [name for name, side in named.items() if side is not None and side not in SIDES]
    if wrong:
        raise ValueError(f"sides.{wrong[0]}={named[wrong[0]]!r} is not a side of the patient; use left or right")
    if organs is None:
        if twin_guard == "side":
            raise ValueError("twin_guard=side reads the sides per organ name, but the task's organ names are "
                             "unknown; pass organs=<names in label order> to BoxSearchConfig.from_cfg")
        return None          # unused
    return tuple(named.get(organ) for organ in organs)   # names that are not task organs: ignored


# ------------------------------------------------------------------------------------------ results


@dataclass
class SearchStep:
    """One box sent to SAM (or answered from the per-slice memo)."""

    phase: str                   # "naive" | "tbs" | "mbs-init" | "mbs" | "stage3"
    box: Box
    mask_area: int               # pixels of the largest-contour mask; 0 when SAM gave nothing
    changed: int | None          # changed pixels vs the previous step's mask; None: first step / missing mask
    cached: bool                 # answered from the memo, no decoder call


@dataclass
class ClassTrace:
    """How one class of one slice was labelled (for diagnostics and the search figures)."""

    class_index: int
    outcome: str                 # "absent" | "sam" | "fallback" (also when the twin guard refused SAM's mask)
    stage: str | None            # for "sam": "naive" | "tbs" | "mbs" | "stage3" | "mbs-fallback"
    reason: str                  # one line: why this outcome
    mask: np.ndarray             # bool (H, W): the class mask that went into the merge
    steps: list[SearchStep] = field(default_factory=list)
    selected_step: int | None = None     # index into steps of the mask that was kept
    decoder_calls: int = 0
    cache_hits: int = 0
    mbs_threshold: float | None = None   # centroid-distance threshold of MBS, when MBS ran
    guard: str | None = None             # "side" | "seed": the twin guard refused SAM's mask (a fallback)
    refused_step: int | None = None      # index into steps of the refused mask

    @property
    def boxes(self) -> list[Box]:
        return [s.box for s in self.steps]

    @property
    def changed_pixels(self) -> list[int | None]:
        return [s.changed for s in self.steps]


@dataclass
class SliceResult:
    pseudo_label: np.ndarray             # uint8 (H, W)
    classes: dict[int, ClassTrace]       # class index (1..K-1) -> trace

    @property
    def decoder_calls(self) -> int:
        return sum(t.decoder_calls for t in self.classes.values())

    @property
    def cache_hits(self) -> int:
        return sum(t.cache_hits for t in self.classes.values())


# -------------------------------------------------------------------------------- mask primitives


def changed_pixels(a: np.ndarray | None, b: np.ndarray | None) -> float:
    """Number of pixels where two masks differ; infinite when either is missing (never "stable")."""
    if a is None or b is None:
        return math.inf
    return int(np.count_nonzero(a != b))


def neighbour_offsets(radius: int) -> list[tuple[int, int]]:
    """All (dy, dx) with 0 < dy^2 + dx^2 < radius^2, both directions (spec 4.1; 44 offsets for radius 4)."""
    span = range(-radius + 1, radius)
    return [(dy, dx) for dy in span for dx in span if 0 < dy * dy + dx * dx < radius * radius]


def neighbours_of(mask: np.ndarray, offsets: Sequence[tuple[int, int]]) -> np.ndarray:
    """(n_offsets, H, W) bool: entry [k, y, x] = mask[y - dy_k, x - dx_k] (False outside the image).

    Entry k says "the pixel one offset k back is in the mask", i.e. it reaches (y, x) by offset k.
    """
    height, width = mask.shape
    pad = max((max(abs(dy), abs(dx)) for dy, dx in offsets), default=0)
    padded = np.zeros((height + 2 * pad, width + 2 * pad), dtype=mask.dtype)
    padded[pad:pad + height, pad:pad + width] = mask
    return np.stack([padded[pad - dy:pad - dy + height, pad - dx:pad - dx + width] for dy, dx in offsets])


def unit_vectors(features: np.ndarray) -> np.ndarray:
    """L2-normalise a (C, H, W) float64 map per pixel (all-zero vectors stay zero, like F.normalize)."""
    norms = np.sqrt(np.einsum("chw,chw->hw", features, features))
    return features / np.maximum(norms, 1e-12)


def target_affinities(features: torch.Tensor, offsets: Sequence[tuple[int, int]]) -> np.ndarray:
    """(n_offsets, H, W) float64 cosine similarities: [k, y, x] = cos(F[y, x], F[y - dy_k, x - dx_k]).

    ``features`` (C, H, W) raw; they are L2-normalised per pixel here. Neighbours outside the image get
    -inf (never above a threshold). Each unordered pair is computed once, as a product of two shifted views,
    and serves both an offset and its reverse.
    """
    # NumPy, not torch: these are small ops, and torch's intra-op threads slow them down 100x when the
    # cores are shared (seen on the 2-core CI machines); einsum here uses neither threads nor BLAS.
    unit = unit_vectors(features.detach().cpu().numpy().astype(np.float64))
    height, width = unit.shape[-2:]
    cos = np.full((len(offsets), height, width), -np.inf)
    index_of = {offset: k for k, offset in enumerate(offsets)}
    filled: set[int] = set()
    for k, (dy, dx) in enumerate(offsets):
        if k in filled or abs(dy) >= height or abs(dx) >= width:
            continue
        # q = (y, x) in ``here`` has its neighbour q - (dy, dx) at the same position of ``there``.
        here = (slice(max(dy, 0), height + min(dy, 0)), slice(max(dx, 0), width + min(dx, 0)))
        there = (slice(max(-dy, 0), height + min(-dy, 0)), slice(max(-dx, 0), width + min(-dx, 0)))
        similarity = np.einsum("chw,chw->hw", unit[:, here[0], here[1]], unit[:, there[0], there[1]])
        cos[k][here] = similarity
        reverse = index_of.get((-dy, -dx))
        if reverse is not None:
            # The same edges seen from their other end: cos(F_p, F_{p+o}) at p = q - o.
            cos[reverse][there] = similarity
            filled.add(reverse)
    return cos


def grow_by_affinity(region: np.ndarray, accepts: np.ndarray, offsets: Sequence[tuple[int, int]]) -> np.ndarray:
    """One TBS growth step: the region plus every pixel linked to a region pixel by an accepted edge.

    ``accepts[k, y, x]``: the edge from (y - dy_k, x - dx_k) to (y, x) passes the affinity threshold.
    """
    return region | (neighbours_of(region, offsets) & accepts).any(axis=0)


def grow_within(region: np.ndarray, allowed: np.ndarray, offsets: Sequence[tuple[int, int]]) -> np.ndarray:
    """One MBS growth step: the region plus its radius-neighbours that are ``allowed`` (close to the centroid)."""
    return region | (neighbours_of(region, offsets).any(axis=0) & allowed)


def mbs_threshold(distance: np.ndarray, mask: np.ndarray, multiplier: float, cap: float) -> float:
    """MBS's distance threshold (spec): ``min(multiplier x mean in-mask distance, cap)``."""
    return min(multiplier * float(distance[mask].mean()), cap)


def centroid_distance(features: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """MBS's distance map: 1 - cosine of every pixel's unit feature (C, H, W) to the normalised mean feature of
    ``mask`` (bool H, W)."""
    centroid = features[:, mask].mean(axis=1)
    centroid /= max(float(np.sqrt(centroid @ centroid)), 1e-12)
    return 1.0 - np.einsum("chw,c->hw", features, centroid)


def sam_feature_map(sam: SamBackend, embedding: SamEmbedding, size: tuple[int, int]) -> np.ndarray:
    """SAM's embedding bilinearly upsampled to the slice size and L2-normalised per pixel: (C, H, W) float64."""
    features = sam.features(embedding).detach().to(torch.float64)
    upsampled = F.interpolate(features[None], size=tuple(size), mode="bilinear", align_corners=False)[0]
    return unit_vectors(upsampled.cpu().numpy())


# ------------------------------------------------------------------------------------------ search


def search_slice(target_features: torch.Tensor, probs: torch.Tensor, sam: SamBackend, embedding: SamEmbedding,
                 cfg: BoxSearchConfig | Mapping[str, Any], decode_cache: dict | None = None, *,
                 organs: Sequence[str] | None = None) -> SliceResult:
    """Box search for every foreground class of one slice, merged into one pseudo-label (spec 4.3-4.4).

    ``target_features`` (C, H, W) raw target-model features; ``probs`` (K, H, W) softmax probabilities
    (K includes background); ``embedding`` this slice's SAM embedding. ``decode_cache`` maps box tuples to
    largest-contour SAM masks (or None) for this slice; SAM is decoded only for boxes not in it. Pass the same
    dict again only for the same slice and embedding. A mapping ``cfg`` is built with
    :meth:`BoxSearchConfig.from_cfg` for this slice's size and the task's ``organs`` (label order).
    """
    num_classes, height, width = probs.shape
    if tuple(target_features.shape[-2:]) != (height, width):
        raise ValueError(f"target features {tuple(target_features.shape)} and probabilities "
                         f"{tuple(probs.shape)} differ in size")
    if tuple(embedding.image_size) != (height, width):
        raise ValueError(f"the SAM embedding was made for a {embedding.image_size} slice, not {(height, width)}")
    if not isinstance(cfg, BoxSearchConfig):
        cfg = BoxSearchConfig.from_cfg(cfg, (height, width), organs=organs)
    if cfg.image_size is not None and cfg.image_size != (height, width):
        raise ValueError(f"the box-search config is scaled for {cfg.image_size} slices, not {(height, width)}")

    context = _SliceContext(target_features, probs, sam, embedding, cfg,
                            {} if decode_cache is None else decode_cache)
    traces = {c: _ClassSearch(context, c).run() for c in range(1, num_classes)}

    scores = np.zeros((num_classes, height, width), dtype=np.float32)
    scores[0] = cfg.score_background
    for c, trace in traces.items():
        scores[c][trace.mask] = cfg.score_sam if trace.outcome == "sam" else cfg.score_fallback
    pseudo_label = scores.argmax(axis=0).astype(np.uint8)   # numpy: ties go to the first (lower) index
    return SliceResult(pseudo_label=pseudo_label, classes=traces)


class _SliceContext:
    """What the classes of one slice share: inputs, lazily computed feature graphs, the decoder memo."""

    def __init__(self, target_features: torch.Tensor, probs: torch.Tensor, sam: SamBackend,
                 embedding: SamEmbedding, cfg: BoxSearchConfig, decode_cache: dict):
        self.cfg = cfg
        self.sam = sam
        self.embedding = embedding
        self.decode_cache = decode_cache
        self.target_features = target_features
        # float64 so thresholds on probabilities are exact (float32 -> float64 is lossless).
        self.probs = np.asarray(probs.detach().cpu(), dtype=np.float64)
        self.prediction = self.probs.argmax(axis=0)
        self.size = self.probs.shape[1:]
        self.offsets = neighbour_offsets(cfg.affinity_radius)
        self._tbs_accepts: np.ndarray | None = None
        self._sam_features: np.ndarray | None = None
        self._seeds: dict[int, np.ndarray] | None = None

    @property
    def tbs_accepts(self) -> np.ndarray:
        """(n_offsets, H, W) bool target-feature edges above the TBS threshold, computed once per slice."""
        if self._tbs_accepts is None:
            cos = target_affinities(self.target_features, self.offsets)
            self._tbs_accepts = cos > self.cfg.tbs_cos_threshold
        return self._tbs_accepts

    @property
    def sam_features(self) -> np.ndarray:
        """Upsampled, normalised SAM features, computed once per slice and only if MBS runs."""
        if self._sam_features is None:
            self._sam_features = sam_feature_map(self.sam, self.embedding, self.size)
        return self._sam_features

    @property
    def seeds(self) -> dict[int, np.ndarray]:
        """Seed region of every class that passes the existence check (for the seed twin guard), once per slice."""
        if self._seeds is None:
            cfg = self.cfg
            self._seeds = {}
            for c in range(1, len(self.probs)):
                prob = self.probs[c]
                if np.count_nonzero(prob > cfg.existence_prob) >= cfg.existence_pixels:
                    region = largest_contour(prob > prob.max() - cfg.seed_delta)
                    if region is not None:
                        self._seeds[c] = region
        return self._seeds


class _ClassSearch:
    """The search for one class. Every SAM query becomes a step; histories hold step indices."""

    def __init__(self, context: _SliceContext, class_index: int):
        self.ctx = context
        self.cfg = context.cfg
        self.c = class_index
        self.max_steps = self.cfg.max_steps_for(class_index)
        self.steps: list[SearchStep] = []
        self.masks: list[np.ndarray | None] = []    # largest-contour mask per step
        self.regions: list[np.ndarray | None] = []  # the region each step's box was drawn around (or None)
        self._predicted: tuple[np.ndarray, int] | None = None   # labelled components of the class prediction
        self.decoder_calls = 0
        self.cache_hits = 0
        self.mbs_threshold: float | None = None

    # -- bookkeeping
    def query(self, box: Box, phase: str, region: np.ndarray | None = None) -> int:
        """Ask SAM (or the memo) for the mask of ``box`` (drawn around ``region``); returns the new step's index."""
        box = tuple(int(v) for v in box)
        cache = self.ctx.decode_cache
        cached = box in cache
        if cached:
            self.cache_hits += 1
        else:
            raw = np.asarray(self.ctx.sam.decode(self.ctx.embedding, box))
            if raw.shape != self.ctx.size:
                raise ValueError(f"SAM returned a {raw.shape} mask for a {self.ctx.size} slice")
            cache[box] = largest_contour(raw)
            self.decoder_calls += 1
        mask = cache[box]
        previous = self.masks[-1] if self.masks else None
        changed = changed_pixels(mask, previous)
        self.steps.append(SearchStep(phase=phase, box=box, mask_area=0 if mask is None else int(mask.sum()),
                                     changed=None if math.isinf(changed) else int(changed), cached=cached))
        self.masks.append(mask)
        self.regions.append(region)
        return len(self.steps) - 1

    def covers(self, step: int) -> bool:
        """Whether the step's mask covers enough of its region (``min_coverage``); always true when off."""
        cfg = self.cfg
        if cfg.min_coverage <= 0.0:
            return True
        mask, region = self.masks[step], self.regions[step]
        if mask is None:
            return False
        if region is None:            # stage 3: no region to compare with
            return True
        if cfg.coverage_of == "prediction":
            if self._predicted is None:
                from scipy import ndimage
                self._predicted = ndimage.label(self.ctx.prediction == self.c)
            labels, _ = self._predicted
            touched = np.unique(labels[region])
            touched = touched[touched > 0]
            if touched.size == 0:
                return True           # the region left the prediction: nothing to cover
            region = np.isin(labels, touched)
        return np.count_nonzero(mask & region) >= cfg.min_coverage * np.count_nonzero(region)

    def changed(self, step_a: int | None, step_b: int | None) -> float:
        if step_a is None or step_b is None:
            return math.inf
        return changed_pixels(self.masks[step_a], self.masks[step_b])

    def box(self, region: np.ndarray) -> Box:
        return box_around(region, self.cfg.box_margin)

    def finish(self, outcome: str, reason: str, stage: str | None = None, step: int | None = None) -> ClassTrace:
        mask = self.masks[step] if outcome == "sam" else self.ctx.prediction == self.c
        if outcome == "sam" and self.cfg.twin_guard != "none":
            refusal = self.twin_refusal(mask)
            if refusal is not None:
                refusal_reason, fallback = refusal
                return ClassTrace(class_index=self.c, outcome="fallback", stage=None,
                                  reason=f"twin guard ({self.cfg.twin_guard}): {reason} refused, {refusal_reason}",
                                  mask=fallback, steps=self.steps, decoder_calls=self.decoder_calls,
                                  cache_hits=self.cache_hits, mbs_threshold=self.mbs_threshold,
                                  guard=self.cfg.twin_guard, refused_step=step)
        return ClassTrace(class_index=self.c, outcome=outcome, stage=stage, reason=reason, mask=mask,
                          steps=self.steps, selected_step=step, decoder_calls=self.decoder_calls,
                          cache_hits=self.cache_hits, mbs_threshold=self.mbs_threshold)

    def twin_refusal(self, mask: np.ndarray) -> tuple[str, np.ndarray] | None:
        """(why, fallback mask) when the twin guard refuses SAM's mask for this class, else None."""
        prediction = self.ctx.prediction == self.c
        if self.cfg.twin_guard == "side":
            side = self.cfg.side_of(self.c)
            if side is None:
                return None
            midline = (self.ctx.size[1] - 1) / 2          # column 0 = the patient's right
            centroid = float(np.nonzero(mask)[1].mean())
            if (centroid > midline) if side == "right" else (centroid < midline):
                columns = np.arange(self.ctx.size[1])[None]
                own_half = columns <= midline if side == "right" else columns >= midline
                other = "left" if side == "right" else "right"
                return (f"its centroid (column {centroid:.1f}) is on the patient's {other} half, the organ's "
                        f"side is the {side}: target prediction on the {side} half kept", prediction & own_half)
            return None
        # "seed": SAM's mask reaches into where another class is most certain
        others = [k for k, seed in self.ctx.seeds.items() if k != self.c and (mask & seed).any()]
        if not others:
            return None
        foreign = np.zeros_like(mask)
        for k, seed in self.ctx.seeds.items():
            if k != self.c:
                foreign |= seed
        covered = ", ".join(f"{int(np.count_nonzero(mask & self.ctx.seeds[k]))} px of class {k}" for k in others)
        return (f"it covers the seed region of another class ({covered}): target prediction minus the other "
                f"classes' seeds kept", prediction & ~foreign)

    # -- spec 4.3
    def run(self) -> ClassTrace:
        cfg = self.cfg
        prob = self.ctx.probs[self.c]
        confident = int(np.count_nonzero(prob > cfg.existence_prob))
        if confident < cfg.existence_pixels:
            return self.finish("absent", f"{confident} px with p > {cfg.existence_prob} "
                                         f"(< {cfg.existence_pixels}): target prediction kept")
        if cfg.search == "naive":
            return self.run_naive(prob)

        region = largest_contour(prob > prob.max() - cfg.seed_delta)
        if region is None:
            return self.finish("fallback", "empty seed region")
        if cfg.search in ("tbs", "dbs"):
            start = self.tbs(region)
            if start is None:
                return self.finish("fallback", f"TBS did not stabilise within {self.max_steps} steps")
            if cfg.search == "tbs":
                return self.finish("sam", "stable TBS mask", stage="tbs", step=start)
        else:  # "mbs": start from SAM's mask for the seed's box
            start = self.query(self.box(region), "mbs-init")
            mask = self.masks[start]
            if mask is None or mask.sum() <= cfg.tbs_min_area:
                return self.finish("fallback", "SAM mask of the seed box empty or too small")

        final, stage = self.mbs(start)
        if final is None or self.masks[final] is None:
            return self.finish("sam", "MBS found no stable mask: the starting mask is kept",
                               stage="mbs-fallback", step=start)
        return self.finish("sam", f"stable {stage.upper()} mask", stage=stage, step=final)

    def run_naive(self, prob: np.ndarray) -> ClassTrace:
        candidates = prob > self.cfg.naive_threshold
        if not candidates.any():
            return self.finish("fallback", f"no pixel with p > {self.cfg.naive_threshold}")
        step = self.query(self.box(candidates), "naive")
        if self.masks[step] is None:
            return self.finish("fallback", "SAM returned an empty mask for the prediction's box")
        return self.finish("sam", "SAM mask of the prediction's box", stage="naive", step=step)

    def tbs(self, region: np.ndarray) -> int | None:
        """Grow in target-feature space until SAM's mask is stable; the stable step, or None."""
        cfg = self.cfg
        history: list[int | None] = [None, None]       # dummies never match anything
        for _ in range(self.max_steps):
            step = self.query(self.box(region), "tbs", region)
            mask = self.masks[step]
            if mask is not None:
                history.append(step)
                if mask.sum() > cfg.tbs_min_area and (self.changed(step, history[-3]) < cfg.tbs_tol_2step
                                                      or self.changed(step, history[-2]) < cfg.tbs_tol_1step) \
                        and self.covers(step):
                    return step
            region = grow_by_affinity(region, self.ctx.tbs_accepts, self.ctx.offsets)
        return None

    def mbs(self, start: int) -> tuple[int | None, str]:
        """Grow the starting mask toward its SAM-feature centroid (spec MBS); (selected step, stage)."""
        cfg = self.cfg
        features = self.ctx.sam_features
        start_mask = self.masks[start]
        distance = centroid_distance(features, start_mask)
        self.mbs_threshold = mbs_threshold(distance, start_mask, cfg.mbs_multiplier, cfg.mbs_cap)
        if cfg.mbs_max_growth > 0:
            # Option (off = the paper): lower the threshold until at most mbs_max_growth x |start mask| pixels
            # outside the start mask pass it. Where SAM's features separate the organ from the rest (real CT:
            # < 1% of the non-organ pixels within the cap, measured) it never binds; where they do not (the
            # phantom: 13-19%), the cap alone lets the region and the box spread over the body.
            outside = distance[~start_mask]
            budget = int(cfg.mbs_max_growth * start_mask.sum())
            if budget < outside.size:     # the (budget+1)-th smallest outside distance; a partition, not a sort
                self.mbs_threshold = min(self.mbs_threshold, float(np.partition(outside, budget)[budget]))
        allowed = distance < self.mbs_threshold

        region = start_mask.copy()
        history: list[int] = []
        previous_box: Box | None = None
        for _ in range(self.max_steps):
            box = self.box(region)
            if box == previous_box:                      # growth no longer moves the box
                stable = self.first_stable(history)
                if stable is not None:
                    return stable, "mbs"
                last_mbs = history[-1]
                if cfg.stage3:
                    stable = self.stage3(box, history)
                    if stable is not None:
                        return stable, "stage3"
                return last_mbs, "mbs"
            previous_box = box
            history.append(self.query(box, "mbs", region))
            if len(history) >= 4 and self.changed(history[-1], history[-4]) < cfg.mbs_tol_3step \
                    and self.covers(history[-2]):
                return history[-2], "mbs"                # three-step stable: the middle mask
            region = grow_within(region, allowed, self.ctx.offsets)
        return self.first_stable(history), "mbs"

    def first_stable(self, history: list[int]) -> int | None:
        """First two-step-stable mask of the history, else the first one-step-stable one, else None."""
        for i in range(2, len(history)):
            if self.changed(history[i], history[i - 2]) < self.cfg.mbs_tol_2step and self.covers(history[i]):
                return history[i]
        for i in range(1, len(history)):
            if self.changed(history[i], history[i - 1]) < self.cfg.mbs_tol_1step and self.covers(history[i]):
                return history[i]
        return None

    def stage3(self, box: Box, history: list[int]) -> int | None:
        """Enlarge the box by a few pixels per side (not clipped) until SAM's mask is stable."""
        cfg = self.cfg
        x_min, y_min, x_max, y_max = box
        for _ in range(cfg.stage3_repeats):
            g = cfg.stage3_growth
            x_min, y_min, x_max, y_max = x_min - g, y_min - g, x_max + g, y_max + g
            step = self.query((x_min, y_min, x_max, y_max), "stage3")
            history.append(step)
            if ((len(history) > 2 and self.changed(step, history[-3]) < cfg.mbs_tol_2step)
                    or self.changed(step, history[-2]) < cfg.mbs_tol_1step):
                return step
        return None
