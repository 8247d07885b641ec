"""SAM engines side by side on the same slices at the same moment: encoder per slice, decoder per call, and the
DFG box search of a whole slice set, for

* ``library``: the torch path before the decoder split (segment_anything's prompt encoder + mask decoder per box),
* ``torch``: ``sam.engine=torch`` (the split decoder: per-slice work done once per embedding),
* ``onnxruntime``: ``sam.engine=onnxruntime``.

Run separately (minutes): ``python -m pytest benchmarks/bench_sam_engines.py -s`` (``SFDABENCH_BENCH_THREADS``,
default 1 = the reference sweep's setting; ``SFDABENCH_BENCH_SLICES``, default 24). The slices are the phantom_mri2ct
target-train slices (offline); the box search's target features and probabilities are built from their ground
truth (one feature cluster per organ plus noise; probabilities from the organ masks eroded by one pixel), so the
search runs its TBS/MBS/stage-3 steps with the real LiteMedSAM on real-size slices. Asserted: the split torch
decoder gives the library's pseudo-labels exactly; ONNX Runtime's pseudo-labels agree with Dice >= 0.99.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage

_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(_ROOT))

from sfdabench.harness.config import compose_config  # noqa: E402
from sfdabench.harness.plugins import get_registry  # noqa: E402
from sfdabench.harness.protocol import load_task  # noqa: E402
from sfdabench.sam import LiteMedSamBackend, engines  # noqa: E402
from sfdabench_methods.dfg.box_search import BoxSearchConfig, search_slice  # noqa: E402

THREADS = int(os.environ.get("SFDABENCH_BENCH_THREADS", "1"))
SLICES = int(os.environ.get("SFDABENCH_BENCH_SLICES", "24"))


class LibraryEngine(engines.TorchEngine):
    """The decoder as it was called before the split: the library's modules, everything per box."""

    name = "library"

    def box_logits(self, features, box):
        m = self.decoder
        b = torch.as_tensor(np.asarray(box, dtype=np.float32)).reshape(1, 1, 4)
        with torch.no_grad():
            sparse, dense = m.prompt_encoder(points=None, boxes=b, masks=None)
            logits, _ = m.mask_decoder(image_embeddings=features.unsqueeze(0),
                                       image_pe=m.prompt_encoder.get_dense_pe(), sparse_prompt_embeddings=sparse,
                                       dense_prompt_embeddings=dense, multimask_output=False)
        return logits.float()


def search_inputs(label: np.ndarray, organs: int, seed: int):
    """Target features and probabilities of one slice, from its ground truth (see the module docstring)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(organs + 1, 8))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    features = centres[label].transpose(2, 0, 1) + 0.03 * rng.normal(size=(8, *label.shape))
    logits = np.full((organs + 1, *label.shape), 0.0)
    for c in range(1, organs + 1):
        predicted = ndimage.binary_erosion(label == c, iterations=1)
        distance = ndimage.distance_transform_edt(predicted) - ndimage.distance_transform_edt(~predicted)
        logits[c] = 1.5 * np.clip(distance, -4, 6) if predicted.any() else -6.0
    probs = torch.softmax(torch.from_numpy(logits).float(), dim=0)
    return torch.from_numpy(features).float(), probs


@pytest.fixture(scope="module")
def slices():
    cfg = compose_config(["task=phantom_mri2ct"])
    task = load_task(cfg["task"], get_registry(), Path(cfg.get("cache_dir") or "/tmp/sfdabench-bench-cache"))
    out = []
    for case in task.target.splits["train"]:
        for z in range(case.image.shape[0]):
            if (case.label[z] > 0).sum() >= 50:
                out.append((case.image[z], case.label[z].astype(np.int64)))
    pick = np.linspace(0, len(out) - 1, min(SLICES, len(out))).round().astype(int)
    return [out[i] for i in pick], len(task.organs), task


def time_engine(backend, engine, slices, organs, cfg):
    backend._engine = engine
    encode = search = 0.0
    calls = 0
    labels = []
    for i, (image, label) in enumerate(slices):
        start = time.perf_counter()
        embedding = backend.embed(image)
        encode += time.perf_counter() - start
        features, probs = search_inputs(label, organs, i)
        start = time.perf_counter()
        result = search_slice(features, probs, backend, embedding, cfg, decode_cache={})
        search += time.perf_counter() - start
        calls += result.decoder_calls
        labels.append(result.pseudo_label)
    return {"encode": encode, "search": search, "calls": calls, "labels": labels}


def dice(a, b, organs):
    scores = [2 * np.count_nonzero((a == c) & (b == c)) / max(np.count_nonzero(a == c) + np.count_nonzero(b == c), 1)
              for c in range(1, organs + 1) if (a == c).any() or (b == c).any()]
    return float(np.mean(scores)) if scores else 1.0


def test_engines_side_by_side(slices):
    slice_list, organs, task = slices
    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        backend = LiteMedSamBackend({"checkpoint": None, "engine": "torch"}, torch.device("cpu"))
        cfg = BoxSearchConfig.from_cfg(compose_config(["method=dfg"])["method"]["search"],
                                       slice_list[0][0].shape, organs=task.organs)
        runs = {"library": LibraryEngine(backend.model, backend.device),
                "torch": engines.TorchEngine(backend.model, backend.device)}
        if not engines.onnxruntime_missing():
            runs["onnxruntime"] = engines.OnnxRuntimeEngine(backend.model, backend.device, backend.fingerprint(),
                                                            Path("/tmp/sfdabench-bench-cache/sam_onnx"), 256)
        for engine in runs.values():                      # warm-up: first calls allocate
            time_engine(backend, engine, slice_list[:1], organs, cfg)
        results = {name: time_engine(backend, engine, slice_list, organs, cfg) for name, engine in runs.items()}
    finally:
        torch.set_num_threads(threads)
    base = results["library"]
    n = len(slice_list)
    print(f"\nSAM engines on {n} phantom_mri2ct target-train slices ({slice_list[0][0].shape[0]} px), "
          f"{THREADS} thread(s), LiteMedSAM")
    print("| engine | encoder s/slice | search ms/decoder call | box search s (search only) | encoder + search s | ratio "
          "| pseudo-label Dice vs library |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, r in results.items():
        total = r["encode"] + r["search"]
        agree = np.mean([dice(a, b, organs) for a, b in zip(r["labels"], base["labels"])])
        print(f"| {name} | {r['encode'] / n:.3f} | {1000 * r['search'] / max(r['calls'], 1):.1f} | {r['search']:.1f} "
              f"| {total:.1f} | {(base['encode'] + base['search']) / total:.2f}x | {agree:.4f} |")
    for a, b in zip(results["torch"]["labels"], base["labels"]):
        np.testing.assert_array_equal(a, b)
    if "onnxruntime" in results:
        agree = [dice(a, b, organs) for a, b in zip(results["onnxruntime"]["labels"], base["labels"])]
        assert min(agree) >= 0.99, agree
