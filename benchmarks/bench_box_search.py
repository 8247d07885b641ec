"""Speed of the vectorised DFG box search against the straightforward reference implementation.

Run separately: ``python -m pytest benchmarks/bench_box_search.py -s``. On the same synthetic 128x128 slices
both implementations must produce identical pseudo-labels; the printed ratio is reference time / vectorised
time (goal: >= 10x). With ``sfdabench.sam.litemedsam`` importable, the comparison is repeated with the real
LiteMedSAM decoder on a few slices (one fixed embedding per slice, shared by both implementations).
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(_ROOT / "benchmarks"))
sys.path.insert(0, str(_ROOT / "tests"))
from reference_box_search import reference_search_slice  # noqa: E402  (also makes sfdabench_methods importable)
from helpers_box_search import ABDOMEN, SyntheticSlice, random_slice  # noqa: E402

from sfdabench_methods.dfg.box_search import BoxSearchConfig, search_slice  # noqa: E402

SIZE = 128
FAKE_SEEDS = tuple(range(200, 208))
LITEMEDSAM_SEEDS = (300, 301)
#: the project default (spec values scaled to 128x128: radius 2) and the spec's unscaled pixel values (radius 4)
SETTINGS = {"scaled": {}, "unscaled": {"scale_to_resolution": False}}


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Both implementations on one torch thread: on the shared 2-core machines torch's intra-op threads make
    small ops (the SAM decoder, interpolation) up to 10-100x slower, which would drown the comparison."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _compare(benchmark, slices: list[SyntheticSlice], cfg: BoxSearchConfig, label: str, rounds: int = 3) -> float:
    start = time.perf_counter()
    expected = [reference_search_slice(s.features, s.probs, s.sam, s.embedding, cfg) for s in slices]
    reference_seconds = time.perf_counter() - start

    timings: list[float] = []

    def vectorised():
        t0 = time.perf_counter()
        out = [search_slice(s.features, s.probs, s.sam, s.embedding, cfg) for s in slices]
        timings.append(time.perf_counter() - t0)
        return out

    results = benchmark.pedantic(vectorised, rounds=rounds, iterations=1, warmup_rounds=0)
    for result, (label_map, outcomes, _) in zip(results, expected):
        np.testing.assert_array_equal(result.pseudo_label, label_map)
        assert {c: (t.outcome, t.stage) for c, t in result.classes.items()} == outcomes

    fast_seconds = min(timings)
    calls = sum(r.decoder_calls for r in results)
    reference_calls = sum(calls_ for _, _, calls_ in expected)
    ratio = reference_seconds / fast_seconds
    print(f"\n[{label}] {len(slices)} slices {SIZE}x{SIZE}, search={cfg.search}, radius={cfg.affinity_radius}: "
          f"reference {reference_seconds:.2f} s ({reference_calls} decoder calls), vectorised "
          f"{fast_seconds:.3f} s ({calls} decoder calls) -> {ratio:.1f}x faster")
    return ratio


@pytest.mark.parametrize("setting", sorted(SETTINGS))
def test_speed_with_fake_sam(benchmark, setting):
    slices = [random_slice(SIZE, seed) for seed in FAKE_SEEDS]
    cfg = BoxSearchConfig.from_cfg(SETTINGS[setting], (SIZE, SIZE), organs=ABDOMEN)
    ratio = _compare(benchmark, slices, cfg, f"fake SAM, {setting}")
    assert ratio >= 10, f"vectorised search only {ratio:.1f}x faster than the reference"


def _litemedsam():
    try:
        from sfdabench.sam.litemedsam import LiteMedSamBackend
    except ImportError as exc:
        pytest.skip(f"sfdabench.sam.litemedsam not importable: {exc}")
    return LiteMedSamBackend({"checkpoint": None, "precision": "fp32", "channels_last": False},
                             torch.device("cpu"))


def test_speed_with_litemedsam(benchmark):
    sam = _litemedsam()
    slices = []
    for seed in LITEMEDSAM_SEEDS:
        synthetic = random_slice(SIZE, seed)
        # Same organs, features and probabilities; the real decoder on one fixed embedding of the phantom image.
        slices.append(SyntheticSlice(synthetic.organs, synthetic.features, synthetic.probs, sam))
    cfg = BoxSearchConfig.from_cfg({}, (SIZE, SIZE), organs=ABDOMEN)
    # The decoder dominates here; the vectorised search saves only the repeated boxes and the Python loops.
    ratio = _compare(benchmark, slices, cfg, "LiteMedSAM", rounds=1)
    assert ratio > 1.0
