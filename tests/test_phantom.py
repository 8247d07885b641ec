"""The offline phantom dataset: determinism, frame and label conventions, anatomy sanity, the MR/CT contrast
gap, speed, and (with the real LiteMedSAM weights) that tight boxes segment every CT organ."""
from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from sfdabench.api import Case, SfdaBenchError
from sfdabench_datasets import phantom
from sfdabench_datasets.phantom import ORGANS, SUBSTRUCTURES, TISSUES, PhantomDataset, generate_anatomy, render

SPACING = (8.0, 2.8, 2.8)


def dataset(modality: str, organs=ORGANS, **params) -> PhantomDataset:
    cfg = {"dataset": "phantom", "params": {"modality": modality, **params},
           "splits": {"train": [0, 1, 2], "test": [16, 17]}}
    return PhantomDataset(cfg, list(organs), "/nonexistent-cache")


@pytest.fixture(scope="module")
def anatomies() -> dict[int, dict[str, np.ndarray]]:
    return {seed: generate_anatomy(seed, 128, 20, SPACING) for seed in range(6)}


def centroid_x(mask: np.ndarray) -> float:
    return float(np.nonzero(mask)[2].mean())


# ------------------------------------------------------------------------------------ determinism


def test_generation_and_rendering_are_deterministic_per_seed():
    a, b = generate_anatomy(7, 96, 12, SPACING), generate_anatomy(7, 96, 12, SPACING)
    assert a.keys() == b.keys()
    assert all(np.array_equal(a[k], b[k]) for k in a)
    for modality in ("mr", "ct"):
        assert np.array_equal(render(a, modality, 3), render(a, modality, 3))
        assert not np.array_equal(render(a, modality, 3), render(a, modality, 4))   # noise follows the seed
    ds = dataset("ct")
    c1, c2 = ds.load_case("phantom-ct-0002"), ds.load_case("phantom-ct-0002")
    assert np.array_equal(c1.image, c2.image) and np.array_equal(c1.label, c2.label)


def test_different_seeds_give_different_anatomies(anatomies):
    livers = [anatomies[s]["liver"] for s in range(4)]
    for i in range(4):
        for j in range(i + 1, 4):
            inter = (livers[i] & livers[j]).sum()
            union = (livers[i] | livers[j]).sum()
            assert inter / union < 0.9, (i, j)
    volumes = [anatomies[s]["spleen"].sum() for s in range(6)]
    assert len(set(volumes)) == 6


def test_source_and_target_domains_use_different_patients():
    mr, ct = dataset("mr"), dataset("ct")
    assert mr.case_ids("train") == ["phantom-mr-0000", "phantom-mr-0001", "phantom-mr-0002"]
    a, b = mr.load_case("phantom-mr-0000"), ct.load_case("phantom-ct-0000")
    assert a.label.shape != b.label.shape or not np.array_equal(a.label, b.label)
    # equal seed offsets give paired renderings of the same patient
    pa, pb = dataset("mr", seed_offset=5), dataset("ct", seed_offset=5)
    ca, cb = pa.load_case("phantom-mr-0001"), pb.load_case("phantom-ct-0001")
    assert np.array_equal(ca.label, cb.label) and not np.allclose(ca.image, cb.image)


# ------------------------------------------------------------------------------------ conventions


@pytest.mark.parametrize("modality", ["mr", "ct"])
def test_case_shapes_dtypes_ranges(modality):
    ds = dataset(modality, size=96, num_slices=[10, 14], spacing_mm=[6.0, 3.5, 3.5])
    for cid in ds.case_ids("test"):
        c = ds.load_case(cid)
        assert isinstance(c, Case) and c.case_id == cid
        assert c.image.dtype == np.float32 and c.label.dtype == np.uint8
        assert c.image.shape == c.label.shape and c.image.shape[1:] == (96, 96)
        assert 10 <= c.num_slices <= 14
        assert c.image.min() >= 0.0 and c.image.max() <= 1.0 and c.image.std() > 0.05
        assert set(np.unique(c.label)) <= {0, 1, 2, 3, 4}
        assert c.spacing == (6.0, 3.5, 3.5)
    # default in-plane spacing keeps a 36 cm field of view at any size
    assert dataset(modality, size=64).load_case(f"phantom-{modality}-0000").spacing == (8.0, 5.6, 5.6)


def test_label_order_follows_task_organs():
    full = dataset("ct").load_case("phantom-ct-0001")
    sub = dataset("ct", organs=["liver", "left_kidney"]).load_case("phantom-ct-0001")
    assert np.array_equal(sub.image, full.image)
    assert np.array_equal(sub.label == 1, full.label == ORGANS.index("liver") + 1)
    assert np.array_equal(sub.label == 2, full.label == ORGANS.index("left_kidney") + 1)
    assert set(np.unique(sub.label)) == {0, 1, 2}


def test_config_errors_are_one_line_sfdabench_errors():
    with pytest.raises(SfdaBenchError, match="pancreas"):
        dataset("ct", organs=["liver", "pancreas"])
    with pytest.raises(SfdaBenchError, match="modality"):
        PhantomDataset({"params": {"modality": "pet"}}, list(ORGANS), "/tmp")
    with pytest.raises(SfdaBenchError, match="modality"):
        PhantomDataset({"params": {}}, list(ORGANS), "/tmp")
    with pytest.raises(SfdaBenchError, match="split"):
        dataset("ct").case_ids("validation")
    with pytest.raises(SfdaBenchError, match="phantom-ct"):
        dataset("ct").load_case("phantom-mr-0001")


def test_registered_as_dataset_plugin():
    assert phantom.sfdabench_datasets() == [PhantomDataset]
    assert PhantomDataset.name == "phantom"


# ------------------------------------------------------------------------------------ anatomy


def test_tissues_are_mutually_exclusive_and_organs_present(anatomies):
    for seed, an in anatomies.items():
        count = sum(an[k].astype(np.uint8) for k in TISSUES)
        assert count.max() == 1, seed
        assert np.array_equal(count.astype(bool), an["body"]), seed
        for sub, parents in SUBSTRUCTURES.items():
            assert not (an[sub] & ~np.logical_or.reduce([an[p] for p in parents])).any()
        organs = np.stack([an[o] for o in ORGANS])
        per_slice = organs.any(axis=(2, 3))                   # (organ, slice)
        assert per_slice.any(axis=0).all(), f"seed {seed}: a slice without any organ"
        assert per_slice[ORGANS.index("liver")].mean() >= 0.5, seed
        for i, organ in enumerate(ORGANS):
            assert organs[i].sum() > 200, (seed, organ)
        # a fat plane separates every organ from everything else (clear boundaries for SAM)
        for organ in ORGANS:
            ring = phantom._dilate(an[organ]) & ~an[organ]
            others = np.logical_or.reduce([an[o] for o in ORGANS if o != organ])
            assert not (ring & others).any(), (seed, organ)


def test_laterality_radiological_display(anatomies):
    mid = 127 / 2
    for seed, an in anatomies.items():
        assert centroid_x(an["liver"]) < mid < centroid_x(an["spleen"]), seed       # patient right = image left
        assert centroid_x(an["right_kidney"]) < mid < centroid_x(an["left_kidney"]), seed
        # anterior is up: the liver lies in front of the spine
        assert np.nonzero(an["liver"])[1].mean() < np.nonzero(an["vertebral_body"])[1].mean(), seed


def test_small_field_of_view_shrinks_the_patient_instead_of_cutting_it():
    an = generate_anatomy(3, 64, 12, SPACING)            # 18 cm field of view at 2.8 mm
    assert not an["body"][:, [0, -1], :].any() and not an["body"][:, :, [0, -1]].any()
    assert all(an[o].any() for o in ORGANS)


# ------------------------------------------------------------------------------------ rendering


def test_modalities_differ_in_contrast_relations(anatomies):
    for seed, an in list(anatomies.items())[:4]:
        mr, ct = render(an, "mr", seed), render(an, "ct", seed)
        m = {k: float(mr[an[k]].mean()) for k in ("liver", "spleen", "right_kidney", "subcutaneous_fat", "aorta")}
        c = {k: float(ct[an[k]].mean()) for k in m}
        assert m["spleen"] > m["liver"] + 0.05 and c["spleen"] < c["liver"] - 0.01, seed   # the order flips
        assert m["aorta"] < m["liver"] and c["aorta"] > c["right_kidney"] - 0.1, seed       # flow void vs contrast
        assert c["subcutaneous_fat"] < 0.1, seed                                           # fat black in CT,
        assert 0.05 < m["subcutaneous_fat"] < m["liver"], seed                              # suppressed grey in MR
        # every organ stands out from the fat around it in both modalities
        for img in (mr, ct):
            for organ in ORGANS:
                ring = phantom._dilate(an[organ], 2) & ~phantom._dilate(an[organ]) & an["visceral_fat"]
                assert img[an[organ]].mean() - img[ring].mean() > 0.08, (seed, organ)


def test_generation_is_fast():
    best = np.inf
    for seed in range(3):
        start = time.perf_counter()
        an = generate_anatomy(seed, 128, 20, SPACING)
        render(an, "mr", seed)
        render(an, "ct", seed)
        best = min(best, time.perf_counter() - start)
    assert best < 1.0, f"anatomy + two renderings took {best:.2f} s"


# ------------------------------------------------------------------------------------ SAM


def test_litemedsam_segments_ct_phantom_organs_from_tight_boxes():
    try:
        from sfdabench.sam.litemedsam import LiteMedSamBackend
        sam = LiteMedSamBackend({"checkpoint": None, "precision": "fp32"}, torch.device("cpu"))
    except (ImportError, SfdaBenchError) as exc:
        pytest.skip(f"LiteMedSAM backend not available: {exc}")
    torch.set_num_threads(2)
    case = dataset("ct").load_case("phantom-ct-0016")
    dices: dict[str, list[float]] = {o: [] for o in ORGANS}
    for z in range(0, case.num_slices, 3):
        emb = sam.embed(case.image[z])
        for i, organ in enumerate(ORGANS):
            gt = case.label[z] == i + 1
            if gt.sum() < 30:                                 # slivers at an organ's pole: box = the organ
                continue
            ys, xs = np.nonzero(gt)
            pred = sam.decode(emb, [xs.min(), ys.min(), xs.max(), ys.max()])
            dices[organ].append(2 * (pred & gt).sum() / (pred.sum() + gt.sum()))
    for organ, values in dices.items():
        assert values, organ
        assert np.mean(values) >= 0.85, f"{organ}: mean tight-box Dice {np.mean(values):.3f} over {len(values)}"
