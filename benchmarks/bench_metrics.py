"""Speed of the built-in metrics against medpy 0.5.2: Dice + ASD + HD95 of 4 organs of an abdominal volume.

Not part of the default test run (the file name does not match ``test_*.py`` and ``testpaths`` is
``tests``). Run it explicitly::

    python -m pytest benchmarks/bench_metrics.py --benchmark-only     # the two pytest-benchmark timings
    python -m pytest benchmarks/bench_metrics.py -q -s                  # also prints the speed ratio

(``python -m pytest benchmarks/ ...`` needs ``bench_*.py`` in pytest's ``python_files``.)

The scene: a (100, 256, 256) volume at (2.5, 1.5, 1.5) mm with four organ-sized ellipsoids (a liver,
two kidneys, a spleen) as ground truth, and as prediction each organ shifted by a few voxels and
resized by a few percent, as a reasonable segmenter would produce. Both sides compute the same three
numbers per organ with their defaults (medpy: ``dc``, ``assd``, ``hd95``).
"""
from __future__ import annotations

import time

import medpy.metric.binary as medpy_binary
import numpy as np
import pytest

from sfdabench.metrics import ASD, HD95, Dice
from sfdabench.metrics.surface import clear_cache

SHAPE = (100, 256, 256)
SPACING = (2.5, 1.5, 1.5)
# (centre, radii) in voxels (z, y, x): liver, right kidney, left kidney, spleen.
ORGANS = (((50, 120, 90), (26, 62, 55)), ((48, 150, 190), (12, 22, 16)),
          ((52, 150, 62), (12, 21, 16)), ((40, 88, 205), (15, 34, 24)))


def _ellipsoid(center, radii):
    z, y, x = np.ogrid[:SHAPE[0], :SHAPE[1], :SHAPE[2]]
    return ((z - center[0]) / radii[0]) ** 2 + ((y - center[1]) / radii[1]) ** 2 \
        + ((x - center[2]) / radii[2]) ** 2 <= 1.0


@pytest.fixture(scope="module")
def organ_pairs():
    """[(pred, gt)] bool (100, 256, 256) masks, one pair per organ."""
    rng = np.random.default_rng(0)
    pairs = []
    for center, radii in ORGANS:
        gt = _ellipsoid(center, radii)
        shifted = [c + int(d) for c, d in zip(center, rng.integers(-3, 4, 3))]
        scaled = [r * float(f) for r, f in zip(radii, rng.uniform(0.93, 1.07, 3))]
        pairs.append((_ellipsoid(shifted, scaled), gt))
    return pairs


def medpy_metrics(pairs):
    out = []
    for pred, gt in pairs:
        out.append((medpy_binary.dc(pred, gt), medpy_binary.assd(pred, gt, voxelspacing=SPACING),
                    medpy_binary.hd95(pred, gt, voxelspacing=SPACING)))
    return out


_DICE, _ASD, _HD95 = Dice(), ASD(), HD95()


def our_metrics(pairs):
    clear_cache()  # time the real work every round, not a memo hit from the previous round
    return [(_DICE(pred, gt, SPACING), _ASD(pred, gt, SPACING), _HD95(pred, gt, SPACING))
            for pred, gt in pairs]


def test_bench_medpy(benchmark, organ_pairs):
    benchmark.group = "dice+asd+hd95, 4 organs, (100, 256, 256)"
    benchmark.pedantic(medpy_metrics, args=(organ_pairs,), rounds=3, iterations=1)


def test_bench_sfdabench(benchmark, organ_pairs):
    benchmark.group = "dice+asd+hd95, 4 organs, (100, 256, 256)"
    benchmark.pedantic(our_metrics, args=(organ_pairs,), rounds=10, iterations=1, warmup_rounds=1)


def _best_of(fn, pairs, repeat=3):
    best, result = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn(pairs)
        best = min(best, time.perf_counter() - start)
    return best, result


def test_speed_ratio(organ_pairs):
    """Same numbers as medpy, and faster; prints the ratio (goal >= 5x, not asserted: machines vary)."""
    t_medpy, ref = _best_of(medpy_metrics, organ_pairs)
    t_ours, got = _best_of(our_metrics, organ_pairs)
    np.testing.assert_allclose(np.array(got), np.array(ref), rtol=0, atol=1e-6)
    print(f"\ndice+asd+hd95 for {len(organ_pairs)} organs in {SHAPE} at {SPACING} mm (best of 3): "
          f"medpy {t_medpy:.3f} s, sfdabench {t_ours:.3f} s, speed-up {t_medpy / t_ours:.1f}x")
    assert t_ours < t_medpy
