"""Unit tests of the UPL-SFDA baseline (``methods/upl_sfda.py``): its Dice and entropy, the per-class largest
component, the rotation ensemble, the head copies, the threshold and reproducibility. Tiny networks, few slices."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from scipy import ndimage
from torch import nn

from helpers_methods import ORGANS, composed_method, make_context, synthetic_cases, with_changes
from sfdabench.api import TargetImages
from sfdabench.blocks.nets import build_segmenter
from sfdabench_methods.upl_sfda import (UPLSFDA, SlabBatches, UPLSegmenter, largest_component_per_class,
                                        mean_prediction_entropy, random_quarter_turns, reliable_pseudo_labels,
                                        slab_windows, upl_dice_loss)

K = len(ORGANS) + 1


pytestmark = pytest.mark.usefixtures("one_thread")   # conftest.py


@pytest.fixture
def net():
    torch.manual_seed(0)
    model = build_segmenter({"width": 4, "depth": 2}, K)
    with torch.no_grad():                    # non-trivial BN running statistics, so eval mode is not identity BN
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    return model


def upl_cfg(**changes):
    """configs/method/upl_sfda.yaml as Hydra composes it, with a 2-step budget."""
    cfg = composed_method("upl_sfda")
    cfg.train.steps = 2
    return with_changes(cfg, changes)


# ---------------------------------------------------------------------------------------------- losses


def test_upl_dice_against_a_hand_computation():
    # 2 images x 3 classes x 1 x 2 pixels. Reliable: image 0 pixel 0 = class 0, image 0 pixel 1 = class 1,
    # image 1 pixel 0 = class 0, image 1 pixel 1 unreliable; class 2 has no reliable pixel.
    probs = torch.tensor([[[0.9, 0.2], [0.05, 0.7], [0.05, 0.1]],
                          [[0.6, 0.3], [0.3, 0.3], [0.1, 0.4]]]).unsqueeze(2)          # (2, 3, 1, 2)
    reliable = torch.zeros_like(probs, dtype=torch.bool)
    reliable[0, 0, 0, 0] = reliable[0, 1, 0, 1] = reliable[1, 0, 0, 0] = True
    s = 1e-4
    # class 0 over the whole batch: e = (0.9, 0.6) on its 2 reliable pixels
    d0 = 1 - (2 * (0.9 + 0.6) + s) / (2 + (0.81 + 0.36) + s)
    d1 = 1 - (2 * 0.7 + s) / (1 + 0.49 + s)                   # class 1: one pixel at 0.7
    d2 = 1 - s / s                                            # no reliable pixel: 0, but counted in the mean
    expected = (d0 + d1 + d2) / 3
    assert float(upl_dice_loss(probs, reliable)) == pytest.approx(expected, rel=1e-6)
    # the unreliable pixels' probabilities play no part
    other = probs.clone()
    other[~reliable] = 0.123
    assert float(upl_dice_loss(other, reliable)) == pytest.approx(expected, rel=1e-6)
    # a perfect prediction on the reliable pixels gives 0
    assert float(upl_dice_loss(reliable.float(), reliable)) == pytest.approx(0.0, abs=1e-7)


def test_mean_prediction_entropy_is_bits_over_classes():
    uniform = torch.full((2, 4, 3, 3), 0.25)
    assert float(mean_prediction_entropy(uniform)) == pytest.approx(2.0 / 4, rel=1e-6)      # 2 bits / C
    certain = torch.zeros(1, 4, 2, 2)
    certain[:, 1] = 1
    assert float(mean_prediction_entropy(certain)) == pytest.approx(0.0, abs=1e-8)
    half = torch.tensor([0.5, 0.5, 0.0, 0.0]).view(1, 4, 1, 1)
    mixed = torch.cat([half, certain[:, :, :1, :1]], dim=3)      # 1 bit and 0 bits over 2 pixels
    assert float(mean_prediction_entropy(mixed)) == pytest.approx(0.5 / 4, rel=1e-5)


# --------------------------------------------------------------------------------- largest component


def crafted_mask() -> np.ndarray:
    """(3 slices, 3 classes, 6, 6) reliable masks (see the test for the components)."""
    m = np.zeros((3, 3, 6, 6), bool)
    m[0:3, 0, 0, 4:6] = True                  # background: 2 px x 3 slices, face-connected across slices (6 px)
    m[2, 0, 5, 0] = True                      # ... and an isolated background pixel
    m[0:2, 1, 0:2, 0:2] = True                # class 1, A: a 2x2 square in slices 0 and 1 (8 px in 3D)
    m[0, 1, 4:6, 3:6] = True                  # class 1, B: 6 px in slice 0 only
    m[1, 1, 3, 0:3] = True                    # class 1, D: 3 px in slice 1, touching B only diagonally in 3D
    return m                                  # class 2: empty


def test_largest_component_per_class_is_3d_6_connected_and_includes_background():
    m = crafted_mask()
    out = largest_component_per_class(m, volumetric=True)
    expected = np.zeros_like(m)
    expected[0:3, 0, 0, 4:6] = True           # the 6-px background column; the isolated pixel is dropped
    expected[0:2, 1, 0:2, 0:2] = True         # A (8) beats B (6) and D (3); with 26-connectivity B+D = 9 would win
    assert np.array_equal(out, expected)
    # the same as scipy.ndimage directly, channel by channel
    structure = ndimage.generate_binary_structure(3, 1)
    for c in range(3):
        labels, n = ndimage.label(m[:, c], structure)
        if n == 0:
            assert not out[:, c].any()
            continue
        sizes = ndimage.sum(m[:, c], labels, range(1, n + 1))
        assert np.array_equal(out[:, c], labels == int(np.argmax(sizes)) + 1)
    full = ndimage.label(m[:, 1], ndimage.generate_binary_structure(3, 3))[0]
    assert full[0, 4, 3] == full[1, 3, 2]     # the crafted D really is 26- but not 6-connected to B


def test_largest_component_per_slice_in_2d_mode():
    m = crafted_mask()
    out = largest_component_per_class(m, volumetric=False)
    assert np.array_equal(out[0, 1], m[0, 1] & (np.arange(6)[:, None] >= 4))       # slice 0: B (6) beats A (4)
    assert np.array_equal(out[1, 1], m[1, 1] & (np.arange(6)[:, None] <= 1))       # slice 1: A (4) beats D (3)
    assert not out[2, 1].any() and not out[:, 2].any()
    assert out[2, 0].sum() == 2 and not out[2, 0, 5, 0]                             # background per slice


def test_no_pixel_at_or_below_tau_is_ever_reliable():
    torch.manual_seed(0)
    logits = torch.randn(4, K, 16, 16) * 4
    probs = logits.softmax(1)
    probs[0, :, 0, 0] = torch.tensor([0.95, 0.05, 0, 0, 0])        # exactly tau: not reliable
    probs[0, :, 0, 1] = torch.tensor([0.949, 0.051, 0, 0, 0])
    probs[0, :, 0, 2] = torch.tensor([0.951, 0.049, 0, 0, 0])
    for largest_cc in (False, True):
        for volumetric in (False, True):
            above, reliable = reliable_pseudo_labels(probs, 0.95, largest_cc=largest_cc, volumetric=volumetric)
            assert not reliable[probs <= 0.95].any()
            assert not reliable[(probs.max(1).values <= 0.95).unsqueeze(1).expand_as(reliable)].any()
            assert bool((reliable <= above).all()) and int(reliable.sum(1).max()) <= 1      # one-hot or empty
    above, reliable = reliable_pseudo_labels(probs, 0.95, largest_cc=False, volumetric=True)
    assert reliable[0, :, 0, :3].sum(0).tolist() == [0, 0, 1]
    assert torch.equal(above, probs > 0.95) and 0 < int(above.sum()) < above[:, 0].numel()


# ---------------------------------------------------------------------------------------- network


def test_rot90_back_rotation_round_trip(net):
    x = torch.rand(2, 3, 16, 24)                               # not square: a wrong back-rotation changes shapes
    for r in range(4):
        assert torch.equal(torch.rot90(torch.rot90(x, r, (2, 3)), -r, (2, 3)), x)
    model = UPLSegmenter(copy.deepcopy(net), dropout=0.5, perturbation="rot90").eval()
    assert model.rotations == [1, 2, 3, 0]
    net.eval()
    with torch.no_grad():
        probs, features = model.head_probs(x)
        for p, r in zip(probs, model.rotations):              # head k = source on the turned input, turned back
            expected = torch.rot90(net(torch.rot90(x, r, (2, 3)))[1].softmax(1), -r, (2, 3))
            assert p.shape == (2, K, 16, 24)
            assert torch.allclose(p, expected, atol=1e-6)
        assert torch.allclose(features, net(x)[0], atol=1e-6)
        feats, logits = model(x)
        assert torch.allclose(logits.exp(), torch.stack(probs).mean(0), atol=1e-6)
        assert torch.equal(feats, features)


def test_random_quarter_turns_follow_upl():
    g = torch.Generator().manual_seed(0)
    draws = np.array([random_quarter_turns(g) for _ in range(8000)])
    shares = np.bincount(draws, minlength=4) / len(draws)
    assert np.allclose(shares, [5 / 8, 1 / 8, 1 / 8, 1 / 8], atol=0.02)


def test_head_copies_reproduce_the_source_prediction_without_rotation_and_dropout(net):
    x = torch.rand(3, 3, 20, 20)
    source = copy.deepcopy(net).eval()
    model = UPLSegmenter(copy.deepcopy(net), dropout=0.5, perturbation="none").eval()
    assert set(source.state_dict()) <= set(model.state_dict())                    # same keys for the source part
    dropouts = [m for m in model.modules() if isinstance(m, nn.Dropout)]
    assert len(dropouts) == 4 and all(d.p == 0.5 for d in dropouts)              # one per head, deepest block
    assert isinstance(model.ups[0].conv[2][1], nn.Dropout)
    for ups, classifier in model.heads():                                         # exact copies of the decoder
        state = {**{f"ups.{k}": v for k, v in ups.state_dict().items()},
                 **{f"classifier.{k}": v for k, v in classifier.state_dict().items()}}
        assert all(torch.equal(v, net.state_dict()[k]) for k, v in state.items())
        assert set(state) == {k for k in net.state_dict() if k.startswith(("ups.", "classifier."))}
    with torch.no_grad():
        expected_features, expected_logits = source(x)
        probs, _ = model.head_probs(x)
        for p in probs:
            assert torch.equal(p, expected_logits.softmax(1))                     # each head: exactly the source
        features, logits = model(x)
        assert torch.equal(features, expected_features)
        assert torch.allclose(logits.exp(), expected_logits.softmax(1), atol=1e-6)
        assert torch.equal(logits.argmax(1), expected_logits.argmax(1))
        model.inference = "identity_head"
        assert torch.equal(model(x)[1], expected_logits)
        model.train()                                                             # dropout on: heads now differ
        probs, _ = model.head_probs(x)
        assert not torch.equal(probs[0], probs[1])


# ------------------------------------------------------------------------------------------ batches


def test_slab_batches_are_consecutive_slices_of_one_case():
    cases = synthetic_cases(2, 21, slices=12)
    target = TargetImages(cases)
    batches = list(SlabBatches(target, 10, torch.Generator().manual_seed(0)))
    assert len(batches) == 2 and sorted(b["case_index"] for b in batches) == [0, 1]       # one epoch: each case
    for b in batches:
        z = b["slice_index"]
        assert len(z) == 10 and z == list(range(z[0], z[0] + 10))
        assert np.allclose(b["image"][:, 0].numpy(), cases[b["case_index"]].image[z])
    assert [list(w) for w in slab_windows(12, 10)] == [list(range(10)), list(range(2, 12))]
    assert [list(w) for w in slab_windows(3, 10)] == [[0, 1, 2]]
    assert len(next(iter(SlabBatches(TargetImages(synthetic_cases(1, 2, slices=3)), 10,
                                     torch.Generator())))["slice_index"]) == 3       # short case: used whole


# ---------------------------------------------------------------------------------------- the method


def adapt(net, tmp_path, seed=0, **changes):
    target = synthetic_cases(2, 21, slices=3)
    ctx, _ = make_context(tmp_path, [c.label for c in target])
    ctx.seed = seed
    model = UPLSFDA(upl_cfg(**changes)).adapt(copy.deepcopy(net), TargetImages(target), ctx)
    return model, ctx


def test_same_seed_gives_identical_weights_and_a_different_seed_does_not(net, tmp_path):
    torch.manual_seed(1)
    state = torch.random.get_rng_state()
    runs = [adapt(net, tmp_path / str(i)) for i in range(2)]
    assert torch.equal(torch.random.get_rng_state(), state)          # the caller's RNG is left alone
    (a, ctx), (b, _) = runs
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    before = net.state_dict()
    assert any(not torch.equal(before[k], sa[k]) for k in before)    # it trained
    c, _ = adapt(net, tmp_path / "other", seed=1)
    assert any(not torch.equal(sa[k], c.state_dict()[k]) for k in sa)
    assert not a.training
    diag = ctx.diagnostics
    assert set(diag["upl"]["reliable_share"]) == {"first", "last"}
    assert set(diag["upl"]["reliable_share"]["first"]) == {"background", *ORGANS, "any"}
    assert {"upl_init", "upl_last"} <= set(diag["pseudo_label_dice"])
    assert set(diag["upl_loss"]) == {"total", "dice", "entropy", "history"}
    first = diag["upl_loss"]
    assert first["total"]["first"] == pytest.approx(first["dice"]["first"] + first["entropy"]["first"])
    for stage in ("first", "last"):                                   # after the filter, never more than before
        shares = diag["upl"]
        assert all(shares["reliable_share"][stage][k] <= shares["above_tau_share"][stage][k] + 1e-9
                   for k in shares["reliable_share"][stage])


def test_options_change_the_variant_and_run(net, tmp_path):
    assert UPLSFDA(upl_cfg()).variant() == "norot"
    assert UPLSFDA(upl_cfg(perturbation="rot90")).variant() == "rot90"
    cfg = {"perturbation": "none", "batching": "shuffled", "augment": "none", "inference": "identity_head",
           "batch_size": 4}
    assert UPLSFDA(upl_cfg(**cfg)).variant() == "norot+shuffled+noaug+headonly"
    model, ctx = adapt(net, tmp_path, **cfg)
    assert model.rotations == [0, 0, 0, 0] and ctx.diagnostics["upl"]["rotations"] == [0, 0, 0, 0]
    with torch.no_grad():
        features, logits = model(torch.rand(2, 3, 24, 24))
    assert logits.shape == (2, K, 24, 24) and features.shape[-2:] == (24, 24)
    with pytest.raises(ValueError, match="batching"):
        adapt(net, tmp_path / "bad", batching="volumes")
