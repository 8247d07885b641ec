"""Box-search figures in the style of the DFG paper's Fig. 1d/1e: the boxes SAM was prompted with, and how
much its mask changed from one box to the next."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from matplotlib.ticker import MaxNLocator

from .box_search import ClassTrace, SliceResult

_PHASE_LABELS = {"naive": "naive box", "tbs": "TBS", "mbs-init": "seed box", "mbs": "MBS", "stage3": "stage 3"}


def save_search_figure(path: str | Path, image: np.ndarray, result: SliceResult, class_index: int,
                       organ_name: str) -> Path:
    """Write one PNG for one (slice, class): left the slice with the numbered boxes (colour ramp by step)
    and the final mask's contour; right the changed-pixel count per step, with the stopping step marked."""
    trace = result.classes[class_index]
    figure = Figure(figsize=(10, 4.6), dpi=100)
    FigureCanvasAgg(figure)             # Agg canvas without pyplot: no global state, no display needed
    left, right = figure.subplots(1, 2, gridspec_kw={"width_ratios": [1, 1.15]})
    _draw_boxes(left, np.asarray(image, dtype=np.float32), trace)
    _draw_change_curve(right, trace)
    stage = f", stage {trace.stage}" if trace.stage else ""
    figure.suptitle(f"{organ_name} (class {class_index}): {trace.outcome}{stage} - {trace.reason}", fontsize=9)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png")
    return path


def _step_colours(count: int) -> np.ndarray:
    from matplotlib import colormaps

    return colormaps["viridis"](np.linspace(0.0, 1.0, max(count, 2)))


def _draw_boxes(ax, image: np.ndarray, trace: ClassTrace) -> None:
    ax.imshow(image, cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
    colours = _step_colours(len(trace.steps))
    # Number a handful of boxes only (first, every k-th, last): all numbers would pile up at one corner.
    label_every = max(1, -(-len(trace.steps) // 8))
    for index, (step, colour) in enumerate(zip(trace.steps, colours)):
        x_min, y_min, x_max, y_max = step.box
        # Pixel indices are inclusive: the rectangle spans the pixels' outer edges.
        ax.add_patch(Rectangle((x_min - 0.5, y_min - 0.5), x_max - x_min + 1, y_max - y_min + 1,
                               fill=False, edgecolor=colour, linewidth=0.9,
                               linestyle="--" if step.phase == "stage3" else "-"))
        if index % label_every == 0 or index == len(trace.steps) - 1:
            ax.text(x_max + 0.6, y_min + 0.3 * index, str(index + 1), color=colour, fontsize=6,
                    va="top", ha="left")
    if trace.mask.any():
        ax.contour(trace.mask.astype(float), levels=[0.5], colors=["red"], linewidths=1.2)
    ax.set_title(f"{len(trace.steps)} boxes ({trace.decoder_calls} decoder calls, {trace.cache_hits} memo hits)"
                 "; red: final mask", fontsize=8)
    (y_lo, y_hi), (x_lo, x_hi) = _zoom(image.shape, trace)
    ax.set_xlim(x_lo - 0.5, x_hi + 0.5)
    ax.set_ylim(y_hi + 0.5, y_lo - 0.5)
    ax.set_xticks([])
    ax.set_yticks([])


def _zoom(shape: tuple[int, ...], trace: ClassTrace) -> tuple[tuple[int, int], tuple[int, int]]:
    """Square window around the boxes and the mask with some context (the whole slice if nothing to show)."""
    height, width = shape
    ys, xs = [], []
    for step in trace.steps:
        xs += [step.box[0], step.box[2]]
        ys += [step.box[1], step.box[3]]
    if trace.mask.any():
        rows, cols = np.nonzero(trace.mask)
        ys += [rows.min(), rows.max()]
        xs += [cols.min(), cols.max()]
    if not xs:
        return (0, height - 1), (0, width - 1)
    centre_y, centre_x = (min(ys) + max(ys)) / 2, (min(xs) + max(xs)) / 2
    half = max(max(ys) - min(ys), max(xs) - min(xs)) * 0.75 + 4
    return ((int(max(centre_y - half, 0)), int(min(centre_y + half, height - 1))),
            (int(max(centre_x - half, 0)), int(min(centre_x + half, width - 1))))


def _draw_change_curve(ax, trace: ClassTrace) -> None:
    ax.set_xlabel("step (box number)")
    ax.set_ylabel("changed mask pixels vs previous box")
    if not trace.steps:
        ax.text(0.5, 0.5, "no box was searched", ha="center", va="center", transform=ax.transAxes)
        return
    numbers = np.arange(1, len(trace.steps) + 1)
    changes = np.array([np.nan if c is None else c for c in trace.changed_pixels], dtype=float)
    colours = _step_colours(len(trace.steps))
    ax.plot(numbers, changes, color="0.6", linewidth=1.0, zorder=1)
    ax.scatter(numbers, changes, c=colours[:len(numbers)], s=18, zorder=2)
    # Phase boundaries and names, so TBS / MBS / stage 3 read apart.
    for i, step in enumerate(trace.steps):
        if i == 0 or step.phase != trace.steps[i - 1].phase:
            if i:
                ax.axvline(i + 0.5, color="0.75", linewidth=0.8, linestyle=":")
            ax.text(i + 0.6, 0.97, _PHASE_LABELS.get(step.phase, step.phase), fontsize=7, color="0.35",
                    transform=ax.get_xaxis_transform(), va="top")
    ax.axvline(len(trace.steps), color="black", linewidth=1.0, label=f"stopped (step {len(trace.steps)})")
    if trace.selected_step is not None:
        kept = trace.selected_step + 1
        ax.axvline(kept, color="red", linewidth=1.0, linestyle="--", label=f"mask kept (step {kept})")
    top = np.nanmax(changes) if np.isfinite(changes).any() else 1.0
    ax.set_ylim(-0.04 * top - 0.5, top * 1.18 + 1)
    ax.set_xlim(0.5, len(trace.steps) + 0.5)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(fontsize=7, loc="best", framealpha=0.8)
    ax.grid(alpha=0.3)
