"""``sfdabench report RUN_DIR [--out DIR] [--max-cases N]``: one finished run as a page to look at.

Writes ``RUN_DIR/report/index.html`` (or ``--out``) with its PNGs beside it, so the folder can be copied or
served as it is (no network, no JavaScript library). The page holds:

- the protocol facts of the run (source checkpoint, selection, ASD unit, empty-mask policy, data protocol,
  SAM backend, versions, git revision) and whether it is SFDA;
- the per-organ table (Dice, ASD, HD95) and the per-case table;
- prediction-vs-ground-truth contour overlays for every target-test case (cases ordered worst to best by
  mean Dice; with more than ``--max-cases`` cases the worst and the best ones are shown), on three slices
  per case: the worst and the best slice by Dice and the slice with the largest ground-truth area;
- pseudo-label quality per phase (DFG and other pseudo-label methods), the box-prompt ceiling and the
  box-search efficiency when the run measured them;
- the box-search figures (``method.figures=N`` of DFG) when the run saved some;
- timings per phase.

The overlays need the run's ``predictions.npz`` (written by every run unless ``eval.save_predictions=false``)
and the task's target-test images, which are loaded again through the run's resolved config (the phantom is
regenerated; real data is read from the prepared cache or its root). Without them the page says why and
keeps every other section.
"""
from __future__ import annotations

import argparse
import html
import json
import logging
import math
import shutil
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from sfdabench.harness import metric_catalogue
from sfdabench.api import SfdaBenchError, UsageError
from sfdabench.harness.label_diagnostics import CEILING_STAGES
from sfdabench.harness.results import read_rows

log = logging.getLogger("sfdabench")

#: Contour colours per organ index (1-based), colour-blind friendly (Okabe-Ito).
COLOURS = ["#E69F00", "#56B4E9", "#009E73", "#D55E00", "#CC79A7", "#0072B2", "#F0E442"]


# --------------------------------------------------------------------------------------- loading


def load_run(run_dir: Path) -> dict[str, Any]:
    """summary, config, environment and per-case table of a finished run folder."""
    import yaml

    summary_path = run_dir / "summary.json"
    if not run_dir.is_dir() or not summary_path.is_file():
        raise UsageError(f"{run_dir} is not a finished run folder (no summary.json); pass a folder under "
                         "<results_dir>/runs/, e.g. sfdabench-results/runs/<task>__<method>__...")
    run = {"summary": json.loads(summary_path.read_text()), "dir": run_dir}
    run["config"] = yaml.safe_load((run_dir / "config.yaml").read_text()) if (run_dir / "config.yaml").is_file() else {}
    env = run_dir / "environment.json"
    run["environment"] = json.loads(env.read_text()) if env.is_file() else {}
    per_case = run_dir / "per_case.csv"
    run["per_case"] = read_rows(per_case) if per_case.is_file() else pd.DataFrame()  # case ids stay strings
    return run


def load_test_cases(run: Mapping[str, Any]) -> list:
    """The run's target-test cases (images + labels), loaded again through its resolved config."""
    from omegaconf import OmegaConf

    from sfdabench.harness.plugins import get_registry

    cfg = OmegaConf.create(run["config"])
    cache = Path(str(cfg.get("cache_dir", "")))
    if not cache.is_absolute():  # relative to where the run was launched: try the run's own results dir
        beside = Path(run["dir"]).resolve().parents[1] / "cache"
        cache = beside if beside.is_dir() or not cache.is_dir() else cache
    target = cfg.task.target
    adapter = get_registry().get("datasets", target.dataset)(target, list(cfg.task.organs), cache)
    return [adapter.load_case(cid) for cid in adapter.case_ids("test")]


# ---------------------------------------------------------------------------------------- overlays


def slice_dice(pred: np.ndarray, gt: np.ndarray, num_classes: int) -> np.ndarray:
    """(Z,) mean Dice over the organs present in either mask of each slice; NaN where no organ is present."""
    scores = np.full((pred.shape[0], num_classes - 1), np.nan)
    for k in range(1, num_classes):
        p, g = pred == k, gt == k
        inter = np.logical_and(p, g).sum(axis=(1, 2))
        total = p.sum(axis=(1, 2)) + g.sum(axis=(1, 2))
        with np.errstate(invalid="ignore", divide="ignore"):
            scores[:, k - 1] = np.where(total > 0, 2 * inter / total, np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)   # all-NaN slices stay NaN
        return np.nanmean(scores, axis=1)


def pick_slices(pred: np.ndarray, gt: np.ndarray, num_classes: int) -> list[tuple[str, int, float]]:
    """(why, z, Dice) of the worst and best slice by Dice and the slice with the largest GT area."""
    dice = slice_dice(pred, gt, num_classes)
    scored = np.flatnonzero(~np.isnan(dice))
    if not len(scored):
        return []
    picks = [("worst", int(scored[np.argmin(dice[scored])])),
             ("largest organ area", int(np.argmax((gt > 0).sum(axis=(1, 2))))),
             ("best", int(scored[np.argmax(dice[scored])]))]
    seen, out = set(), []
    for why, z in picks:
        if z not in seen:
            seen.add(z)
            out.append((why, z, float(dice[z])))
    return out


def overlay_figure(path: Path, image: np.ndarray, pred: np.ndarray, gt: np.ndarray, organs: Sequence[str],
                   picks: Sequence[tuple[str, int, float]], title: str) -> None:
    """One row of slices: ground truth as a translucent fill, the prediction as a contour, one colour per organ.

    Two line styles of one colour (solid vs dashed) cannot be told apart on a 128 px slice where the two
    boundaries lie a pixel apart; fill vs line can, and a missed organ shows as a fill with no line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import to_rgba
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    fig, axes = plt.subplots(1, len(picks), figsize=(3.4 * len(picks), 3.8), squeeze=False)
    for ax, (why, z, dice) in zip(axes[0], picks):
        ax.imshow(image[z], cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        fill = np.zeros(gt[z].shape + (4,))
        for k, _ in enumerate(organs, start=1):
            colour = COLOURS[(k - 1) % len(COLOURS)]
            fill[gt[z] == k] = to_rgba(colour, alpha=0.40)
            if (pred[z] == k).any():
                ax.contour(pred[z] == k, levels=[0.5], colors=[colour], linewidths=1.5)
        ax.imshow(fill, interpolation="nearest")
        ax.set_title(f"z={z} ({why})\nslice Dice {dice:.3f}", fontsize=9)
        ax.axis("off")
    handles = [Line2D([], [], color=COLOURS[(k - 1) % len(COLOURS)], label=o) for k, o in enumerate(organs, 1)]
    handles += [Patch(color="0.5", alpha=0.4, label="ground truth (fill)"),
                Line2D([], [], color="0.3", label="prediction (line)")]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 6), fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.08, 1, 0.93))   # room for the legend below and the case title above
    fig.savefig(path, dpi=90)
    plt.close(fig)


def overlays(run: Mapping[str, Any], out: Path, max_cases: int) -> tuple[list[dict], str]:
    """Overlay PNGs (one per shown case) and a note (why some or all are missing)."""
    pred_path = Path(run["dir"]) / "predictions.npz"
    if not pred_path.is_file():
        return [], ("no overlays: the run folder has no predictions.npz (runs made with "
                    "eval.save_predictions=false or by an older sfdabench)")
    try:
        cases = load_test_cases(run)
    except (SfdaBenchError, KeyError, OSError, ValueError) as exc:
        return [], f"no overlays: the target-test images could not be loaded again ({exc})"
    organs = list(run["config"]["task"]["organs"])
    with np.load(pred_path) as stored:
        predictions = {k: stored[k] for k in stored.files}
    per_case = run["per_case"]
    head = (run_metrics(run) or ["dice"])[0]  # cases from worst to best by the headline metric
    order = (per_case.groupby("case")[head].mean() if len(per_case) and head in per_case else pd.Series(dtype=float))
    worst_first = 1.0 if metric_catalogue.higher_is_better(head) else -1.0
    known = [c for c in cases if c.case_id in predictions and c.label is not None]
    known.sort(key=lambda c: worst_first * order.get(c.case_id, worst_first * math.inf))
    note = ""
    if len(known) > max_cases:
        worst, best = known[: (max_cases + 1) // 2], known[len(known) - max_cases // 2:]
        note = f"{len(known) - max_cases} of {len(known)} cases not shown (the worst and the best ones are)"
        known = worst + best
    shown = []
    for case in known:
        pred = predictions[case.case_id]
        picks = pick_slices(pred, case.label, len(organs) + 1)
        if not picks:
            continue
        name = f"overlay_{_safe(case.case_id)}.png"
        dice = order.get(case.case_id, math.nan)
        overlay_figure(out / name, case.image, pred, case.label, organs, picks,
                       f"case {case.case_id}: mean {metric_catalogue.label(head)} {dice:.3f}")
        shown.append({"case": case.case_id, "png": name, "value": dice, "metric": metric_catalogue.label(head)})
    return shown, note


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in str(name))


# ------------------------------------------------------------------------------------------- HTML


def _table(frame: pd.DataFrame, digits: int = 4) -> str:
    def fmt(v: Any) -> str:
        if isinstance(v, (float, np.floating)):
            return "n/a" if math.isnan(v) else f"{v:.{digits}f}"
        return html.escape(str(v))

    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in [frame.index.name or "", *frame.columns])
    def td(v: Any) -> str:  # numbers right-aligned (CSS default here), text left-aligned
        numeric = isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)
        return f"<td>{fmt(v)}</td>" if numeric else f"<td class='text'>{fmt(v)}</td>"

    body = "".join("<tr>" + f"<th>{html.escape(str(i))}</th>" + "".join(td(v) for v in row) + "</tr>"
                   for i, row in zip(frame.index, frame.itertuples(index=False)))
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _facts(run: Mapping[str, Any]) -> pd.DataFrame:
    s, env = run["summary"], run["environment"]
    source = s.get("source", {}) or {}
    in_domain = (source.get("in_domain_dice") or {}).get("mean")
    facts = {
        "task": s.get("task"), "method": s.get("method"), "variant": s.get("variant"), "seed": s.get("seed"),
        "source-free (SFDA)": "yes" if s.get("sfda", True) else "NO: uses target labels (upper bound / diagnostic)",
        # source_weights: hash of the checkpoint file (what the model was); source_config: the recipe that named
        # it (runs before source_weights existed recorded only that, as source_ckpt).
        "source checkpoint": f"weights {s.get('source_weights') or 'not recorded'} "
                             f"({source.get('checkpoint', '?')})",
        "source config": s.get("source_config", s.get("source_ckpt")),
        "source in-domain mean Dice": "n/a" if in_domain is None else f"{in_domain:.4f} (source test split)",
        "checkpoint selection": s.get("selection"), "ASD/HD95 unit": s.get("asd_unit"),
        "empty-mask policy": s.get("empty_policy"), "data protocol": s.get("data_protocol"),
        "SAM backend": s.get("sam") or "(none)", "test cases": s.get("n_cases"),
        "metric version": s.get("metric_version"), "run id (config hash)": s.get("run_id"),
        "git revision": s.get("git_rev"), "sfdabench": s.get("sfdabench_version"),
        "python / torch / numpy / medpy": " / ".join(str(env.get(k, "?")) for k in ("python", "torch", "numpy", "medpy")),
        "device / threads": f"{env.get('device', '?')} / {env.get('torch_threads', '?')}",
        "finished at": s.get("finished_at"), "runtime": f"{s.get('runtime_s', float('nan')):.1f} s",
    }
    frame = pd.DataFrame({"value": [str(v) for v in facts.values()]}, index=list(facts))
    frame.index.name = "fact"
    return frame


#: The pseudo-label stages the harness itself records (after the method's own, see ``Method.stage_labels``).
HARNESS_STAGES = CEILING_STAGES


def stage_labels(method: str) -> dict[str, str]:
    """The run's method's pseudo-label stages in the order it produces them, then the harness's; {} for a method
    that is not installed (its stages then follow in their recorded order, unlabelled)."""
    from sfdabench.harness.plugins import get_registry

    registry = get_registry()
    own = dict(registry.get("methods", method).stage_labels) if method in registry.names("methods") else {}
    return {**own, **HARNESS_STAGES}


def _organ_order(keys: Sequence[str], organs: Sequence[str]) -> list[str]:
    """The task's organ order, then ``mean``, then anything else (summary.json stores keys sorted)."""
    first = [o for o in [*organs, "mean"] if o in keys]
    return first + [k for k in keys if k not in first]


def run_metrics(run: Mapping[str, Any]) -> list[str]:
    """The run's metrics in its configured order (``metrics.names``: the headline first), registered ones only."""
    names = list(((run.get("config") or {}).get("metrics") or {}).get("names") or ["dice", "asd", "hd95"])
    return metric_catalogue.columns(names)


def _metrics_table(summary: Mapping[str, Any], organs: Sequence[str], names: Sequence[str]) -> pd.DataFrame:
    table = pd.DataFrame(summary.get("metrics", {})).T
    table = table[[c for c in names if c in table.columns]].astype(float)
    table = table.loc[_organ_order(list(table.index), organs)]
    table.index.name = "organ"
    return table


def _pseudo_label_table(diagnostics: Mapping[str, Any], organs: Sequence[str],
                        labels: Mapping[str, str] = HARNESS_STAGES) -> pd.DataFrame | None:
    """stage x organ pseudo-label Dice; a stage the method labels is shown as ``label (stage)``."""
    stages = diagnostics.get("pseudo_label_dice") or {}
    if not stages:
        return None
    order = [s for s in labels if s in stages] + [s for s in stages if s not in labels]
    table = pd.DataFrame({(f"{labels[stage]} ({stage})" if stage in labels else stage):
                          {k: (np.nan if v is None else v) for k, v in stages[stage].items()}
                          for stage in order}).T.astype(float)
    table = table[_organ_order(list(table.columns), organs)]
    if diagnostics.get("box_search_efficiency"):
        stage = (diagnostics.get("gt_box_ceiling") or {}).get("stage", "sam")
        table.loc[f"box-search efficiency ({stage} / gt_box_ceiling)"] = pd.Series(
            {k: (np.nan if v is None else v) for k, v in diagnostics["box_search_efficiency"].items()})
    if diagnostics.get("box_search_efficiency_class_keeping"):
        stage = (diagnostics.get("class_keeping_ceiling") or {}).get("stage", "sam")
        table.loc[f"box-search efficiency ({stage} / class_keeping_ceiling)"] = pd.Series(
            {k: (np.nan if v is None else v) for k, v in diagnostics["box_search_efficiency_class_keeping"].items()})
    table.index.name = "stage"
    return table


def _grouped_quality_table(diagnostics: Mapping[str, Any], organs: Sequence[str]) -> pd.DataFrame | None:
    """organ x group rows: slices, GT pixels, then recall and precision per stage (diagnostics.pseudo_label_by_group)."""
    by_stage = diagnostics.get("pseudo_label_by_group") or {}
    if not by_stage:
        return None
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    for stage, per_organ in by_stage.items():
        for organ in _organ_order(list(per_organ), organs):
            for group, q in per_organ[organ].items():
                row = rows.setdefault((organ, group), {"slices": q["slices"], "gt pixels": q["gt_pixels"]})
                row[f"recall {stage}"] = q["recall"]
                row[f"precision {stage}"] = q["precision"]
    frame = pd.DataFrame.from_dict(rows, orient="index")
    frame.index = pd.MultiIndex.from_tuples(frame.index, names=["organ", "group"])
    return frame.reset_index().set_index("organ")


def _timings_table(summary: Mapping[str, Any]) -> pd.DataFrame:
    timings = summary.get("timings") or {}
    frame = pd.DataFrame({"seconds": [float(v) for v in timings.values()]}, index=list(timings))
    frame.index.name = "phase"
    return frame


CSS = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1200px;color:#222;padding:0 1em}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:1.8em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.5em 0;font-size:.9em}td,th{border:1px solid #ccc;padding:3px 8px}
td{text-align:right;font-variant-numeric:tabular-nums}td.text{text-align:left}thead th{background:#f3f3f3}.warn{color:#a40000;font-weight:bold}
figure{margin:1em 0}figcaption{font-size:.85em;color:#555}img{max-width:100%;border:1px solid #eee}
.note{color:#555;font-style:italic}"""

#: Marks the page with how many images decoded (read by the headless-browser test and handy for humans).
SCRIPT = """window.addEventListener('load',function(){var imgs=Array.prototype.slice.call(document.images);
var ok=imgs.filter(function(i){return i.complete&&i.naturalWidth>0;}).length;
document.body.setAttribute('data-images-total',imgs.length);document.body.setAttribute('data-images-loaded',ok);
document.getElementById('image-status').textContent=ok+' of '+imgs.length+' images loaded';});"""


def render(run: Mapping[str, Any], out: Path, max_cases: int) -> Path:
    s = run["summary"]
    sections = []
    title = f"{s.get('task')} · {s.get('method')} ({s.get('variant')}) · seed {s.get('seed')}"
    warn = "" if s.get("sfda", True) else '<p class="warn">Not source-free: this run read target labels.</p>'
    sections.append(f"<h1>sfdabench run report: {html.escape(title)}</h1>{warn}"
                    f'<p class="note" id="image-status"></p>')
    sections.append("<h2>Protocol</h2>" + _table(_facts(run)))
    organs = list((run["config"].get("task") or {}).get("organs") or [])
    names = run_metrics(run)
    metrics = _metrics_table(s, organs, names)
    distances = [metric_catalogue.label(m) for m in names if metric_catalogue.spatial(m)]
    unit = f"; {' and '.join(distances)} in {s.get('asd_unit', '')}" if distances else ""
    sections.append(f"<h2>Target-test metrics per organ</h2><p class='note'>Mean over test volumes; mean = mean of "
                    f"organ means{html.escape(unit)}.</p>" + _table(metrics))
    shown, note = overlays(run, out, max_cases)
    head = html.escape(metric_catalogue.label(names[0] if names else "dice"))
    part = ["<h2>Prediction vs ground truth</h2><p class='note'>Filled: ground truth; line: prediction. "
            f"Cases from worst to best by mean {head}; per case the worst and best slice by Dice and the slice "
            "with the largest ground-truth area.</p>"]
    if note:
        part.append(f"<p class='note'>{html.escape(note)}</p>")
    for item in shown:
        part.append(f"<figure><img src='{item['png']}' alt='overlays of case {html.escape(item['case'])}'>"
                    f"<figcaption>case {html.escape(item['case'])}, mean {item['metric']} {item['value']:.3f}</figcaption></figure>")
    sections.append("".join(part))
    diagnostics = s.get("diagnostics") or {}
    pl = _pseudo_label_table(diagnostics, organs, stage_labels(str(s.get("method", ""))))
    if pl is not None:
        sections.append("<h2>Pseudo-label quality per phase</h2><p class='note'>Dice of the target-train "
                        "pseudo-labels against target-train ground truth: measured, never used by the method. "
                        "gt_box_ceiling: SAM prompted with ground-truth boxes (the best any box search can do "
                        "with this backend); class_keeping_ceiling: ground-truth boxes for the classes the "
                        "search's starting model predicts, labelled as it labels them (the best this box search "
                        "can do without fixing that model's class errors).</p>" + _table(pl))
    confusion = diagnostics.get("pseudo_label_confusion") or {}
    if confusion:
        from sfdabench.harness.evaluation import confusion_highlights

        rows = {stage: "; ".join(confusion_highlights(table)) or "none" for stage, table in confusion.items()}
        sections.append("<h2>Where each organ went</h2><p class='note'>Pseudo-label confusion against "
                        "target-train ground truth: flows of at least 10% of an organ's voxels to another class "
                        "(twin-organ swaps, missed organs as -&gt;background).</p>"
                        + _table(pd.DataFrame({"off-diagonal flows": rows}).rename_axis("stage")))
    grouped = _grouped_quality_table(diagnostics, organs)
    if grouped is not None:
        sections.append("<h2>Pseudo-label quality per slice group</h2><p class='note'>Per organ and group of "
                        "slices the method names (e.g. the box-search outcome that labelled the organ there), "
                        "recall and precision of each stage pooled over the group's slices, against target-train "
                        "ground truth: a stage that loses recall on one outcome (e.g. SAM keeping a small mask "
                        "as stable) shows here.</p>" + _table(grouped, digits=3))
    shares = diagnostics.get("prediction_share") or {}
    if shares:
        sections.append("<h2>How much of target-train each class covers</h2><p class='note'>Share of the "
                        "target-train pixels the argmax gives each class, before and after adaptation: needs no "
                        "label, and shows a collapse (organs vanishing, or painted over the background).</p>"
                        + _table(pd.DataFrame(shares).T.rename_axis("model"), digits=4))
    figure_dir = Path(run["dir"]) / "figures"
    figures = sorted(figure_dir.rglob("*.png"))   # rglob: runs of combined tasks once nested them by part
    if figures:
        (out / "figures").mkdir(exist_ok=True)
        part = ["<h2>Box search</h2><p class='note'>Successive numbered boxes, the final mask and the changed "
                "pixels per step, as the method drew them.</p>"]
        for fig in figures:
            name = "_".join(fig.relative_to(figure_dir).parts)
            shutil.copy2(fig, out / "figures" / name)
            part.append(f"<figure><img src='figures/{html.escape(name)}' alt='{html.escape(Path(name).stem)}'>"
                        f"<figcaption>{html.escape(Path(name).stem)}</figcaption></figure>")
        sections.append("".join(part))
    sections.append("<h2>Timings</h2>" + _table(_timings_table(s), digits=1))
    if len(run["per_case"]):
        cols = [c for c in ("case", "organ", *run_metrics(run), "gt_voxels", "pred_voxels") if c in run["per_case"]]
        sections.append("<h2>Per case</h2>" + _table(run["per_case"][cols].set_index("case")))
    page = (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{CSS}</style></head><body>{''.join(sections)}<script>{SCRIPT}</script></body></html>\n")
    from sfdabench.harness.results import atomic_write_text

    path = out / "index.html"
    atomic_write_text(path, page)
    return path


def cmd_report(args: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="sfdabench report", description="Write an HTML report of one run.")
    parser.add_argument("run_dir", type=Path, help="a run folder: <results_dir>/runs/<task>__<method>__...")
    parser.add_argument("--out", type=Path, help="output folder (default RUN_DIR/report)")
    parser.add_argument("--max-cases", type=int, default=6, help="overlay at most this many test cases (default 6)")
    ns = parser.parse_args(list(args))
    if ns.max_cases < 1:
        raise UsageError("--max-cases must be at least 1")
    run = load_run(ns.run_dir)
    out = ns.out or ns.run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    path = render(run, out, ns.max_cases)
    print(path)
    log.info("report: %s", path)
    return 0
