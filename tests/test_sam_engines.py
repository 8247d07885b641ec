"""SAM engines (sfdabench/sam/engines.py): the split decoder equals the library's bit for bit; ONNX Runtime
gives the torch engine's masks (Dice >= 0.99 on real CT organ boxes and on box-search-like boxes), keeps its
exports by weights, falls back to torch in one line, and is named in fingerprints and rows."""
from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from sfdabench.api import SamEmbedding, UsageError
from sfdabench.harness.protocol import _sam_tag
from sfdabench.sam import LiteMedSamBackend, engines
from sfdabench.sam.cache import EmbeddingCache

CPU = torch.device("cpu")
needs_onnxruntime = pytest.mark.skipif(bool(engines.onnxruntime_missing()), reason=engines.onnxruntime_missing())


def dice(a: np.ndarray, b: np.ndarray) -> float:
    s = a.sum() + b.sum()
    return 1.0 if s == 0 else float(2 * (a & b).sum() / s)


def boxes_around(mask: np.ndarray, rng: np.random.Generator, n: int) -> list[list[int]]:
    """The tight box of ``mask`` and ``n - 1`` boxes grown or shrunk by a few pixels, as a box search asks."""
    ys, xs = np.nonzero(mask)
    tight = np.array([xs.min(), ys.min(), xs.max(), ys.max()])
    h, w = mask.shape
    out = [tight.tolist()]
    for _ in range(n - 1):
        d = rng.integers(-4, 5, size=4) * np.array([-1, -1, 1, 1])
        b = np.clip(tight + d, 0, [w - 1, h - 1, w - 1, h - 1])
        if b[2] > b[0] and b[3] > b[1]:
            out.append(b.tolist())
    return out


@pytest.fixture(scope="module")
def lite() -> LiteMedSamBackend:
    return LiteMedSamBackend({"checkpoint": None}, CPU)


@pytest.fixture(scope="module")
def lite_onnx(tmp_path_factory) -> LiteMedSamBackend:
    if engines.onnxruntime_missing():
        pytest.skip(engines.onnxruntime_missing())
    backend = LiteMedSamBackend({"checkpoint": None, "engine": "onnxruntime"}, CPU)
    backend.cache_dir = tmp_path_factory.mktemp("cache")
    return backend


def library_logits(model, features: torch.Tensor, box) -> torch.Tensor:
    """segment_anything's own prompt encoder + mask decoder, as the backends called them before the split."""
    b = torch.as_tensor(np.asarray(box, dtype=np.float32)).reshape(1, 1, 4)
    with torch.no_grad():
        sparse, dense = model.prompt_encoder(points=None, boxes=b, masks=None)
        logits, _ = model.mask_decoder(image_embeddings=features.unsqueeze(0),
                                       image_pe=model.prompt_encoder.get_dense_pe(),
                                       sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                       multimask_output=False)
    return logits


def test_split_decoder_equals_the_library_bit_for_bit(lite):
    """LiteMedSAM's vendored decoder and segment_anything's own (random weights): same bits, box after box."""
    from segment_anything.modeling import MaskDecoder, PromptEncoder, TwoWayTransformer

    torch.manual_seed(0)
    sam_like = torch.nn.Module()
    sam_like.prompt_encoder = PromptEncoder(embed_dim=256, image_embedding_size=(64, 64), input_image_size=(1024, 1024),
                                            mask_in_chans=16)
    sam_like.mask_decoder = MaskDecoder(num_multimask_outputs=3, transformer=TwoWayTransformer(
        depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8), transformer_dim=256)
    sam_like.image_encoder = torch.nn.Identity()
    sam_like.eval()
    rng = np.random.default_rng(0)
    for model, side in ((lite.model, 256), (sam_like, 1024)):
        engine = engines.TorchEngine(model, CPU)
        features = torch.randn(256, 64, 64, generator=torch.Generator().manual_seed(1))
        for _ in range(4):
            x0, y0 = rng.uniform(0, side / 2, 2)
            box = [x0, y0, x0 + rng.uniform(8, side / 2), y0 + rng.uniform(8, side / 2)]
            assert torch.equal(engine.box_logits(features, np.array(box)), library_logits(model, features, box))


def test_prepared_tensors_are_reused_per_embedding_only(lite):
    engine = engines.TorchEngine(lite.model, CPU)
    a, b = torch.randn(256, 64, 64), torch.randn(256, 64, 64)
    first = engine.prepared(a)
    assert engine.prepared(a) is first            # the same slice: computed once
    assert engine.prepared(b) is not first        # another slice: recomputed, never stale
    box = [10, 10, 90, 90]
    assert torch.equal(engine.box_logits(a, np.array(box)), library_logits(lite.model, a, box))


@needs_onnxruntime
def test_onnxruntime_masks_equal_torch_on_real_ct(sample_data, lite, lite_onnx):
    """Real AMOS CT slices, the organ boxes a box search asks about: Dice >= 0.99 each, >= 0.999 on average."""
    path = sample_data / "tiny" / "amos_ct_0018_tiny.npz"
    if not path.is_file():
        pytest.skip(f"{path} not found in the sample data")
    with np.load(path) as npz:
        images, labels = npz["image"].astype(np.float32), npz["label"]
    rng = np.random.default_rng(0)
    scores, relative = [], []
    for z in np.argsort([(lab > 0).sum() for lab in labels])[-2:]:
        img = (images[z] - images[z].min()) / max(float(np.ptp(images[z])), 1e-8)
        emb_t, emb_o = lite.embed(img), lite_onnx.embed(img)
        relative.append(float((emb_o.features - emb_t.features).norm() / emb_t.features.norm()))
        for organ in (1, 2, 3, 4):
            gt = labels[z] == organ
            if gt.sum() >= 100:
                for box in boxes_around(gt, rng, 4):
                    scores.append(dice(lite.decode(emb_t, box), lite_onnx.decode(emb_o, box)))
    assert len(scores) >= 20
    assert max(relative) < 1e-4, relative
    assert min(scores) >= 0.99 and np.mean(scores) >= 0.999, scores


@needs_onnxruntime
def test_onnxruntime_exports_once_per_weights(tmp_path, caplog, monkeypatch):
    monkeypatch.delenv("SFDABENCH_SAM_EXPORT_DIR", raising=False)   # the run's cache_dir, as outside the tests
    img = np.random.default_rng(0).random((64, 80), dtype=np.float32)
    first, again = (LiteMedSamBackend({"checkpoint": None, "engine": "onnxruntime"}, CPU) for _ in range(2))
    first.cache_dir = again.cache_dir = tmp_path
    emb = first.embed(img)                        # exports on first use
    directory = first.engine.directory
    assert directory.parent == tmp_path / "sam_onnx"
    files = {p.name: p.stat().st_mtime_ns for p in directory.glob("*.onnx")}
    assert set(files) == {"encoder.onnx", "prepare.onnx", "decoder.onnx"}
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="sfdabench"):
        emb_again = again.embed(img)
    assert "exporting" not in caplog.text         # the cached export is reused
    assert {p.name: p.stat().st_mtime_ns for p in directory.glob("*.onnx")} == files
    # Same slice, same engine: the same embedding and mask (ONNX Runtime is deterministic on one thread count).
    assert torch.equal(emb.features, emb_again.features)
    assert np.array_equal(again.decode(emb, [5, 5, 40, 50]), first.decode(emb, [5, 5, 40, 50]))


@needs_onnxruntime
def test_engine_is_named_in_fingerprint_and_rows(lite, lite_onnx, tmp_path):
    assert "engine" not in lite.fingerprint()     # the torch engine keeps its old cache key
    assert lite_onnx.fingerprint().endswith("|engine=onnxruntime")
    assert EmbeddingCache(lite, tmp_path).directory != EmbeddingCache(lite_onnx, tmp_path).directory
    assert _sam_tag({"name": "litemedsam", "precision": "fp32", "engine": "onnxruntime"}, lite_onnx) == \
        "litemedsam:onnxruntime"
    assert _sam_tag({"name": "litemedsam", "precision": "fp32", "engine": "torch"}, lite) == "litemedsam"


def test_missing_onnxruntime_falls_back_to_torch_in_one_line(monkeypatch, caplog):
    missing = "onnxruntime not installed (pip install onnxruntime onnx)"
    monkeypatch.setattr(engines, "onnxruntime_missing", lambda: missing)
    with caplog.at_level(logging.WARNING, logger="sfdabench"):
        backend = LiteMedSamBackend({"checkpoint": None, "engine": "onnxruntime"}, CPU)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert warnings == ["sam.engine=onnxruntime: onnxruntime not installed (pip install onnxruntime onnx); "
                        "using sam.engine=torch"]
    assert backend.engine_name == "torch" and "engine" not in backend.fingerprint()
    assert _sam_tag({"name": "litemedsam", "engine": "onnxruntime"}, backend) == "litemedsam"
    assert isinstance(backend.engine, engines.TorchEngine) and not isinstance(backend.engine, engines.OnnxRuntimeEngine)


@pytest.mark.parametrize("cfg, message", [
    ({"engine": "tensorrt"}, "sam.engine='tensorrt' is not supported; use sam.engine=torch or sam.engine=onnxruntime"),
    ({"engine": "onnxruntime", "precision": "bf16"}, "apply to the torch engine only"),
    ({"engine": "onnxruntime", "channels_last": True}, "apply to the torch engine only"),
])
def test_bad_engine_settings_are_one_line_errors(cfg, message):
    with pytest.raises(UsageError) as exc:
        LiteMedSamBackend.check_config(cfg)
    assert message in str(exc.value) and "\n" not in str(exc.value)


def test_embedding_extra_is_not_polluted(lite):
    """Prepared decoder tensors live in the engine, not in the embedding (which the cache writes to disk)."""
    emb = lite.embed(np.random.default_rng(1).random((32, 32), dtype=np.float32))
    lite.decode(emb, [2, 2, 20, 20])
    assert isinstance(emb, SamEmbedding) and set(emb.extra) == {"new_size"}
