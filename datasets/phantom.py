"""Procedural 3D abdominal phantom: the offline, CPU-sized default task of sfdabench (MRI <-> CT).

The real protocol (spec section 1) adapts a segmenter of spleen, right kidney, left kidney and liver from
CHAOS T2-SPIR MRI to BTCV contrast CT (or back). This module produces the same kind of data without any
download: :func:`generate_anatomy` draws one patient (a set of mutually exclusive tissue masks, deterministic
per seed), :func:`render` turns it into an MR-like or CT-like volume in [0, 1], and :class:`PhantomDataset`
serves cases to the harness.

Frame (same for both modalities, like the spec after its CT flip): arrays are (Z, H, W); slice 0 is the
most superior slice of the organ slab, row 0 is anterior, column 0 is the patient's right (radiological
display), so the liver is on the image left and the spleen on the image right. The slab is the organ
z-crop of spec 1.3 step 3: every slice contains at least one of the four organs.

The domain gap is built in on purpose: shapes and positions follow the same anatomical model in both
modalities, while contrast relations differ (spleen brighter than liver in MR, darker in CT; fat
suppressed grey in MR, black in CT; aorta a flow void in MR, the brightest vessel in CT), as do intensity
ranges, noise model (Rician vs Gaussian) and artefacts (smooth bias field in MR, faint streaks in CT).
"""
from __future__ import annotations

import re
from typing import Any, Mapping, Sequence

import numpy as np
from scipy import ndimage

from sfdabench.api import Case, DatasetAdapter, SfdaBenchError
from sfdabench.hookspecs import hookimpl

#: Organs a task may ask for (label ``i + 1`` = ``organs[i]``); the spec's order is the order below.
ORGANS = ("spleen", "right_kidney", "left_kidney", "liver")
MODALITIES = ("mr", "ct")

#: Mutually exclusive tissue masks returned by :func:`generate_anatomy` (plus ``body``, their union, and
#: the sub-masks in :data:`SUBSTRUCTURES`).
TISSUES = (
    "subcutaneous_fat", "muscle", "visceral_fat", "cortical_bone", "vertebral_body", "disc", "spinal_canal",
    "aorta", "ivc", "right_kidney", "left_kidney", "spleen", "gallbladder", "liver",
    "gi_wall", "gi_fluid", "gi_gas", "gi_stool",
)
#: Sub-masks that lie inside an organ (part of its label) but render differently.
SUBSTRUCTURES = {"liver_vessels": ("liver",), "kidney_medulla": ("right_kidney", "left_kidney")}


# ------------------------------------------------------------------------------------------- anatomy


class _Grid:
    """Voxel coordinates: ``t`` slab fraction (0 superior .. 1 inferior) per slice, ``y`` mm per row (positive
    = posterior = image down), ``x`` mm per column (positive = image right = patient left). Organ z-extents
    are fractions of the slab, so any slice count gives a complete liver-dome-to-kidney-pole slab."""

    def __init__(self, num_slices: int, size: int, spacing: Sequence[float]):
        _, self.dy, self.dx = (float(s) for s in spacing)
        self.shape = (num_slices, size, size)
        self.t = ((np.arange(num_slices, dtype=np.float32) + 0.5) / num_slices)[:, None, None]
        self.y = ((np.arange(size, dtype=np.float32) - (size - 1) / 2) * self.dy)[None, :, None]
        self.x = ((np.arange(size, dtype=np.float32) - (size - 1) / 2) * self.dx)[None, None, :]
        self.half_fov = (size / 2 * self.dy, size / 2 * self.dx)


def _ellipsoid_profile(t: np.ndarray, tc: float, ht: float, p: float = 2.0) -> np.ndarray:
    """Cross-section scale of a (super-)ellipsoid with z-centre ``tc`` and half-length ``ht`` (0 outside).
    ``p > 2`` gives blunter poles: fewer pixel-sized slivers at an organ's ends, which neither a 2D U-Net nor
    a box prompt can resolve (real organs cut by thick slices end abruptly too)."""
    return np.clip(1.0 - np.abs((t - tc) / ht) ** p, 0.0, None) ** (1.0 / p)


def _per_slice(g: _Grid, v: Any) -> np.ndarray:
    return np.broadcast_to(np.asarray(v, dtype=np.float32).reshape(-1, 1, 1), (g.shape[0], 1, 1))


def _section(g: _Grid, rng: np.random.Generator, cx: Any, cy: Any, a: float, b: float, scale: Any = 1.0,
             angle: float = 0.0, lobulation: float = 0.0) -> np.ndarray:
    """Bool (Z,H,W): in every slice an ellipse centred (cx, cy) mm with semi-axes (a, b) * scale, rotated by
    ``angle`` (rad, image coordinates), its radius modulated by random harmonics 2..5 whose phases drift
    smoothly along z (lobulated, organic outlines). ``cx``, ``cy``, ``scale`` may vary per slice ((Z,1,1)),
    which makes oblique tubes, tapering lobes and ellipsoids out of one primitive. Evaluated only inside the
    shape's bounding box (the generator's cost is dominated by this function)."""
    cx, cy, scale = _per_slice(g, cx), _per_slice(g, cy), _per_slice(g, scale)
    # draw the harmonics first, so the random stream does not depend on the bounding box
    harmonics = [(k, lobulation * rng.uniform(0.3, 1.0) * 2.0 / k, rng.uniform(0, 2 * np.pi), rng.uniform(-4, 4))
                 for k in (2, 3, 4, 5)] if lobulation > 0 else []
    out = np.zeros(g.shape, bool)
    zs = np.nonzero(scale[:, 0, 0] > 0)[0]
    if zs.size == 0:
        return out
    reach = max(a, b) * scale[:, 0, 0] * (1 + sum(h[1] for h in harmonics)) + max(g.dx, g.dy)
    sl = slice(zs[0], zs[-1] + 1)
    r0, r1 = _index_range(cy[sl, 0, 0], reach[sl], g.y[0, 0, 0], g.dy, g.shape[1])
    c0, c1 = _index_range(cx[sl, 0, 0], reach[sl], g.x[0, 0, 0], g.dx, g.shape[2])
    if r1 <= r0 or c1 <= c0:
        return out
    dx = g.x[:, :, c0:c1] - cx[sl]
    dy = g.y[:, r0:r1, :] - cy[sl]
    c, s = np.float32(np.cos(angle)), np.float32(np.sin(angle))
    u = (dx * c + dy * s) / np.float32(a)
    v = (dy * c - dx * s) / np.float32(b)
    limit = scale[sl]
    if harmonics:
        theta = np.arctan2(v, u)
        pert = 1.0
        for k, amp, phase, drift in harmonics:
            pert = pert + np.float32(amp) * np.cos(k * theta + np.float32(phase) + np.float32(drift) * g.t[sl])
        limit = limit * pert
    out[sl, r0:r1, c0:c1] = (u * u + v * v) < limit * np.abs(limit)
    return out


def _index_range(centre: np.ndarray, reach: np.ndarray, origin: float, step: float, n: int) -> tuple[int, int]:
    """Pixel index range [lo, hi) covering centre +- reach (mm) over all slices, clipped to the image."""
    lo = int(np.floor((float(np.min(centre - reach)) - origin) / step))
    hi = int(np.ceil((float(np.max(centre + reach)) - origin) / step)) + 1
    return max(lo, 0), min(hi, n)


def _dilate(mask: np.ndarray, px: int = 1) -> np.ndarray:
    """In-plane 4-neighbour dilation (slices are thick: a z dilation would grow a whole slab)."""
    for _ in range(px):
        m, mask = mask, mask.copy()
        mask[:, 1:] |= m[:, :-1]
        mask[:, :-1] |= m[:, 1:]
        mask[:, :, 1:] |= m[:, :, :-1]
        mask[:, :, :-1] |= m[:, :, 1:]
    return mask


def _main_parts(mask: np.ndarray, min_fraction: float) -> np.ndarray:
    """Per slice, the in-plane connected components of ``mask`` with at least ``min_fraction`` of the
    slice's largest component."""
    labels, n = ndimage.label(mask, structure=np.array([[[0, 0, 0]] * 3, [[0, 1, 0], [1, 1, 1], [0, 1, 0]],
                                                        [[0, 0, 0]] * 3], bool))
    if n == 0:
        return mask
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    comp_slice = ndimage.maximum(np.arange(mask.shape[0])[:, None, None] * np.ones_like(labels), labels,
                                 np.arange(1, n + 1)).astype(int)
    largest = np.zeros(mask.shape[0], int)
    np.maximum.at(largest, comp_slice, sizes[1:])
    keep = np.concatenate([[False], sizes[1:] >= min_fraction * largest[comp_slice]])
    return keep[labels]


def _erode(mask: np.ndarray, px: int = 1) -> np.ndarray:
    return ~_dilate(~mask, px)


#: Smallest in-plane field of view (mm) the anatomy is drawn on; the largest trunk is 330 mm wide.
MIN_FOV_MM = 350.0


def generate_anatomy(seed: int, size: int = 128, num_slices: int = 20,
                     spacing: Sequence[float] = (8.0, 2.8, 2.8)) -> dict[str, np.ndarray]:
    """Draw one patient: bool (Z, H, W) masks, deterministic in ``seed``.

    Keys: :data:`TISSUES` (mutually exclusive; air is what none of them covers), ``body`` (their union) and
    the :data:`SUBSTRUCTURES` sub-masks. ``spacing`` is (z, y, x) in mm; in-plane sizes are physical (mm),
    z-extents are fractions of the slab. Labelled organs are separated from every other structure by at
    least one voxel of fat (a fat plane), so that each organ has a visible boundary in both modalities.
    """
    rng = np.random.default_rng(seed)
    # A field of view too small for an adult trunk (e.g. size 64 at 2.8 mm) shrinks the patient instead of
    # cutting it: the geometry is drawn on a grid of at least MIN_FOV_MM.
    dz, dy, dx = (float(s) for s in spacing)
    geo_spacing = (dz, max(dy, MIN_FOV_MM / size), max(dx, MIN_FOV_MM / size))
    g = _Grid(int(num_slices), int(size), geo_spacing)
    t = g.t
    u = rng.uniform

    # --- trunk: ellipse with flattened back (lying on the table), subcutaneous fat, muscle wall
    cx0, cy0 = rng.normal(0, 4), rng.normal(-6, 4)
    A = min(u(130, 165), 0.94 * g.half_fov[1])
    B = min(A * u(0.7, 0.8), 0.9 * g.half_fov[0])
    widen = 1.0 + u(-0.08, 0.08) * (t - 0.5)          # trunk narrows or widens towards the pelvis
    fat, wall = u(8, 22), u(7, 12)
    back = g.y < cy0 + B * u(0.86, 0.94)
    body = _section(g, rng, cx0, cy0, A, B, widen, lobulation=0.015) & back
    muscle_outer = _section(g, rng, cx0, cy0 + 0.15 * fat, A - fat, B - 1.1 * fat, widen, lobulation=0.015) & back
    Ai, Bi = A - fat - wall, B - 1.1 * fat - wall
    cavity = _section(g, rng, cx0, cy0 + 0.15 * fat, Ai, Bi, widen, lobulation=0.02) & muscle_outer

    # --- spine: vertebral body (with discs), canal, posterior arch; paraspinal muscles behind it
    vx = cx0 + rng.normal(0, 3)
    back_y = cy0 + B * 0.9 - fat                      # inner edge of the posterior fat
    canal_y = back_y - B * u(0.3, 0.37)
    rc, rv = u(6, 8), u(15, 20)
    vy = canal_y - rc - u(2, 4) - rv
    vertebra = _section(g, rng, vx, vy, rv * u(1.1, 1.25), rv, lobulation=0.02)
    slab_mm = num_slices * dz
    period, phase = u(30, 36), u(0, 36)
    disc_slices = ((t * slab_mm + phase) % period) < u(7, 10)
    disc = vertebra & disc_slices
    vertebra &= ~disc_slices
    canal = _section(g, rng, vx, canal_y, rc * 1.1, rc)
    arch = (_section(g, rng, vx, canal_y, rc + 4, rc + 4) & ~canal & (g.y > canal_y - 2)) \
        | _section(g, rng, vx, canal_y + rc + u(9, 13), u(2.5, 3.5), u(8, 12)) \
        | _section(g, rng, vx - 19, canal_y - 3, u(8, 11), 3, angle=0.25) \
        | _section(g, rng, vx + 19, canal_y - 3, u(8, 11), 3, angle=-0.25)
    paraspinal = (_section(g, rng, vx - u(22, 28), canal_y + u(12, 18), u(18, 24), u(14, 19), angle=0.3,
                           lobulation=0.04)
                  | _section(g, rng, vx + u(22, 28), canal_y + u(12, 18), u(18, 24), u(14, 19), angle=-0.3,
                             lobulation=0.04)) & muscle_outer
    t_ps = u(0.3, 0.5)
    grow = np.clip((t - t_ps) / (1.0 - t_ps), 0, 1) ** 0.7
    psoas = (_section(g, rng, vx - rv * 1.2 - u(8, 14), vy - u(0, 8), u(15, 20), u(12, 17), grow, lobulation=0.04)
             | _section(g, rng, vx + rv * 1.2 + u(8, 14), vy - u(0, 8), u(15, 20), u(12, 17), grow, lobulation=0.04))

    # --- ribs: short oblique cross-sections inside the muscle wall, dashed along z, upper slab
    ribs = np.zeros(g.shape, bool)
    ra, rb = A - fat - wall / 2, B - 1.1 * fat - wall / 2
    for side in (-1, 1):
        for th in np.deg2rad(np.sort(u(-75, 65, size=rng.integers(4, 7)))):
            reach = u(0.35, 0.5) if th < np.deg2rad(-20) else u(0.5, 0.75)
            visible = (np.cos(2 * np.pi * t * slab_mm / u(25, 40) + u(0, 2 * np.pi)) > u(-0.2, 0.3)) & (t < reach)
            px, py = cx0 + side * ra * np.cos(th), cy0 + 0.15 * fat + rb * np.sin(th)
            ribs |= _section(g, rng, px, py, u(4, 7), u(3, 4.5), angle=side * th + np.pi / 2) & visible

    # --- great vessels (tubes along z, slight drift)
    ar = u(9, 12.5)
    aorta = _section(g, rng, vx + u(6, 16) + u(-4, 4) * t, vy - rv - ar - u(0, 3), ar, ar)
    ivx, ivy = vx - u(22, 32), vy - rv - u(4, 12)
    ivc = _section(g, rng, ivx + u(-4, 4) * t, ivy, u(10, 14), u(6, 10), angle=u(-0.3, 0.3))

    # --- kidneys: bean = rotated ellipsoid minus an antero-medial hilum notch; medulla inside
    kidneys, medulla = {}, np.zeros(g.shape, bool)
    ht = {"right_kidney": u(0.24, 0.32), "left_kidney": u(0.24, 0.32)}
    right_lower = u(0.02, 0.1) if rng.random() < 0.8 else -u(0, 0.04)   # right kidney usually lower (liver)
    bottom = u(1.0, 1.06)                                             # lower pole of the lower kidney
    tc = {"right_kidney": bottom - ht["right_kidney"], "left_kidney": bottom - ht["left_kidney"]}
    if right_lower > 0:
        tc["left_kidney"] -= right_lower
    else:
        tc["right_kidney"] += right_lower
    for name, s in (("right_kidney", -1), ("left_kidney", 1)):
        alpha = np.deg2rad(u(20, 45))
        ka, kb = u(25, 33), u(18, 24)                 # long axis antero-lateral, short axis
        prof = _ellipsoid_profile(t, tc[name], ht[name], p=3.0)
        drift = (t - tc[name]) / ht[name]                # upper pole medial/posterior, lower lateral/anterior
        kx = vx + s * (u(54, 68) + u(4, 12) * drift)
        ky = vy + u(4, 16) - u(0, 10) * drift
        kidney = _section(g, rng, kx, ky, ka, kb, prof, angle=s * -alpha, lobulation=0.03)
        nx, ny = -s * np.sin(alpha), -np.cos(alpha)    # unit vector towards the hilum (antero-medial)
        off = kb * u(0.75, 0.95)
        hilum = _section(g, rng, kx + nx * off, ky + ny * off, ka * u(0.3, 0.4), kb * u(0.45, 0.6),
                         angle=s * -alpha) & (np.abs(t - tc[name]) < ht[name] * u(0.35, 0.55))
        kidneys[name] = kidney & ~hilum
        core = _section(g, rng, kx, ky, ka * u(0.55, 0.65), kb * u(0.5, 0.6), prof, angle=s * -alpha,
                        lobulation=0.15)
        medulla |= core & ~_dilate(hilum, 2)

    # --- spleen: crescent against the posterolateral left wall
    sx, sy = cx0 + Ai * u(0.5, 0.66), cy0 + Bi * u(0.12, 0.38)
    normal = np.arctan2((sy - cy0) / Bi ** 2, (sx - cx0) / Ai ** 2)
    sa, sb = u(40, 55), u(18, 25)
    s_prof = _ellipsoid_profile(t, u(0.2, 0.35), u(0.17, 0.27), p=3.0)
    spleen = _section(g, rng, sx, sy, sa, sb, s_prof, angle=normal + np.pi / 2 + u(-0.2, 0.2), lobulation=0.06)
    spleen &= ~_section(g, rng, sx - np.cos(normal) * sb * 2.0, sy - np.sin(normal) * sb * 2.0,
                        sa * 0.7, sb * 1.3, s_prof, angle=normal + np.pi / 2)

    # --- liver: right lobe (dome-shaped, tapering to the right-lobe tip) + left lobe + bridge
    t0, tp, t1 = u(-0.08, -0.03), u(0.15, 0.35), u(0.62, 0.88)
    up = np.sqrt(np.clip(1 - ((tp - t) / (tp - t0)) ** 2, 0, None))
    down = np.clip(1 - np.clip((t - tp) / (t1 - tp), 0, None) ** 1.6, 0, None) ** 0.6
    l_prof = np.where(t <= tp, up, down)
    lx, ly = cx0 - Ai * u(0.3, 0.45), cy0 - Bi * u(0.0, 0.2)
    right_lobe = _section(g, rng, lx - u(0, 20) * np.clip(t - tp, 0, None), ly + u(0, 25) * np.clip(t - tp, 0, None),
                          Ai * u(0.5, 0.65), Bi * u(0.7, 0.85), l_prof, angle=u(-0.3, 0.3), lobulation=0.05)
    ll_end = u(0.3, 0.5)
    ll_prof = _ellipsoid_profile(t, (t0 + ll_end) / 2 + u(0.0, 0.04), (ll_end - t0) / 2)
    llx, lly = cx0 + u(-5, 35), cy0 - Bi * u(0.35, 0.55)
    left_lobe = _section(g, rng, llx, lly, Ai * u(0.3, 0.5), Bi * u(0.2, 0.3), ll_prof, angle=u(-0.4, 0.1),
                         lobulation=0.08)
    # the bridge (medial segment) ends with the left lobe, so low slices hold no liver wrapped around the aorta
    bridge = _section(g, rng, (lx + llx) / 2, (ly + lly) / 2 - Bi * 0.05, Ai * 0.35, Bi * 0.26,
                      _ellipsoid_profile(t, (t0 + ll_end) / 2 + 0.02, (ll_end - t0) / 2), lobulation=0.05)
    # nothing of the liver medial to and behind the IVC (that is crus, adrenal and aorta territory)
    liver = (right_lobe | left_lobe | bridge) & ~((g.x > ivx - 5) & (g.y > ivy - 5))

    # gallbladder under the inferior liver surface (most patients)
    gall = np.zeros(g.shape, bool)
    if rng.random() < 0.85:
        gall = _section(g, rng, cx0 - Ai * u(0.05, 0.25), cy0 - Bi * u(0.25, 0.45), u(10, 15), u(14, 22),
                        _ellipsoid_profile(t, u(0.4, 0.55), u(0.07, 0.12)), angle=u(0, np.pi), lobulation=0.03)

    # intrahepatic vessels: hepatic veins fanning out of the IVC at the top, portal branches lower down
    vessels = np.zeros(g.shape, bool)
    for _ in range(rng.integers(2, 4)):
        ang, dist, tend = u(-np.pi, -np.pi / 6), u(40, 80), u(0.2, 0.4)
        f = np.clip(t / tend, 0, 1)
        r = u(3, 5)
        vessels |= _section(g, rng, ivx + np.cos(ang) * dist * f, ivy + np.sin(ang) * dist * f, r, r) & (t < tend)
    for _ in range(rng.integers(2, 5)):
        ta = u(0.3, 0.5)
        r = u(2.5, 4.5)
        vessels |= _section(g, rng, lx + u(-25, 25), ly + u(-25, 25), r * u(1.5, 4), r, angle=u(0, np.pi)) \
            & (np.abs(t - ta) < u(0.04, 0.1))

    # --- GI tract: stomach, colon, small-bowel loops (wall + gas / fluid / stool content)
    gi_masks: list[tuple[np.ndarray, str]] = []           # (mask, content kind), carved in this order
    if rng.random() < 0.9:
        st = _section(g, rng, cx0 + Ai * u(0.12, 0.38), cy0 - Bi * u(0.1, 0.4), u(25, 40), u(20, 32),
                      _ellipsoid_profile(t, u(0.15, 0.35), u(0.15, 0.3)), angle=u(-0.6, 0.6), lobulation=0.08)
        gi_masks.append((st, rng.choice(["fluid", "mixed", "collapsed"], p=[0.4, 0.45, 0.15])))
    for s, rr, start in ((-1, u(15, 21), u(0.5, 0.7)), (1, u(10, 16), u(0.45, 0.65))):
        colon = _section(g, rng, cx0 + s * Ai * u(0.55, 0.72), cy0 + Bi * u(-0.2, 0.25), rr, rr * u(0.8, 1.0),
                         (t > start).astype(np.float32), lobulation=0.06)
        gi_masks.append((colon, "stool"))
    for _ in range(rng.integers(6, 14)):
        loop = _section(g, rng, cx0 + Ai * u(-0.75, 0.75), u(cy0 - 0.85 * Bi, vy - rv - 10), u(9, 20), u(9, 18),
                        _ellipsoid_profile(t, u(0.3, 1.05), u(0.06, 0.2)), angle=u(0, np.pi), lobulation=0.1)
        gi_masks.append((loop, rng.choice(["gas", "fluid", "collapsed", "mixed"], p=[0.2, 0.3, 0.3, 0.2])))

    # --- resolve overlaps by priority; organs keep a 1-voxel fat plane to every other structure
    out: dict[str, np.ndarray] = {}
    muscle_outer &= body
    ribs &= muscle_outer                                  # ribs lie in the wall, never in subcutaneous fat
    out["cortical_bone"] = (ribs | arch) & muscle_outer
    out["vertebral_body"] = vertebra & muscle_outer & ~out["cortical_bone"]
    out["disc"] = disc & muscle_outer & ~out["cortical_bone"]
    out["spinal_canal"] = canal & muscle_outer & ~out["cortical_bone"]
    bones = out["cortical_bone"] | out["vertebral_body"] | out["disc"] | out["spinal_canal"]
    paraspinal &= ~bones
    occupied = bones | paraspinal
    inner = _erode(cavity)                                # organs keep off the abdominal wall (properitoneal fat)

    reserved = occupied.copy()                            # claimed tissue + fat kept free around it

    def claim(mask: np.ndarray, gap: bool, fat_rim: int = 0) -> np.ndarray:
        nonlocal occupied, reserved
        keep = mask & inner & ~(_dilate(reserved) if gap else reserved)
        occupied |= keep
        reserved |= _dilate(keep, fat_rim) if fat_rim else keep
        return keep

    out["aorta"] = claim(aorta, gap=False)
    out["ivc"] = claim(ivc, gap=False)
    psoas = claim(psoas, gap=False)
    for name in ("right_kidney", "left_kidney"):
        out[name] = claim(kidneys[name], gap=True, fat_rim=1)     # perirenal fat
    out["spleen"] = claim(spleen, gap=True)
    out["gallbladder"] = claim(gall, gap=True)
    out["liver"] = claim(liver, gap=True)
    # Carving (IVC, gallbladder, kidney) can leave crumbs of liver; a crumb would stretch the organ's box over
    # half the abdomen, so it goes back to the pool (becomes fat or bowel).
    crumbs = out["liver"] & ~_main_parts(out["liver"], 0.15)
    out["liver"] &= ~crumbs
    occupied &= ~crumbs
    reserved &= ~crumbs

    wall_m, fluid, gas, stool = (np.zeros(g.shape, bool) for _ in range(4))
    mottle = ndimage.gaussian_filter(rng.standard_normal(g.shape).astype(np.float32), (0, 1.5, 1.5))
    mottle /= mottle.std()
    rows = np.arange(g.shape[1])[None, :, None]
    for mask, kind in gi_masks:
        m = claim(mask, gap=True)
        lumen = _erode(m, 1)                              # ~3 mm wall
        wall_m |= m & ~lumen
        if kind == "collapsed" or not lumen.any():
            wall_m |= lumen
        elif kind == "fluid":
            fluid |= lumen
        elif kind == "gas":
            gas |= lumen
        elif kind == "mixed":                             # gas rises anteriorly (patient supine): air-fluid level
            ys = np.nonzero(lumen.any(axis=(0, 2)))[0]
            is_gas = lumen & (rows < ys.min() + (ys.max() - ys.min()) * u(0.25, 0.6))
            gas |= is_gas
            fluid |= lumen & ~is_gas
        else:                                             # stool: mottled with gas bubbles
            bubbles = lumen & (mottle > u(0.8, 1.3))
            gas |= bubbles
            stool |= lumen & ~bubbles
    out["gi_wall"], out["gi_fluid"], out["gi_gas"], out["gi_stool"] = wall_m, fluid, gas, stool

    out["muscle"] = (muscle_outer & ~cavity & ~bones) | paraspinal | psoas
    out["visceral_fat"] = cavity & ~occupied & ~out["muscle"]
    out["subcutaneous_fat"] = body & ~muscle_outer
    out["body"] = body
    out["liver_vessels"] = vessels & out["liver"]
    out["kidney_medulla"] = medulla & (out["right_kidney"] | out["left_kidney"])
    return out


# ------------------------------------------------------------------------------------------ rendering

# Per tissue: (mean, between-case sd of the mean, texture amplitude). MR in raw T2-SPIR-like units
# (normalised with the spec's fixed [0, 1200] window), CT in HU (window [-125, 275]).
_MR = {
    "air": (0, 0, 0), "subcutaneous_fat": (140, 15, 12), "visceral_fat": (130, 15, 14), "muscle": (190, 15, 10),
    "cortical_bone": (60, 10, 5), "vertebral_body": (170, 20, 20), "disc": (450, 50, 20),
    "spinal_canal": (1100, 60, 20), "aorta": (70, 20, 10), "ivc": (300, 60, 20),
    "liver": (320, 25, 14), "liver_vessels": (140, 20, 10), "spleen": (520, 35, 14),
    "right_kidney": (760, 40, 18), "left_kidney": (760, 40, 18), "kidney_medulla": (900, 40, 18),
    "gallbladder": (1100, 80, 10), "gi_wall": (300, 30, 20), "gi_fluid": (950, 120, 40), "gi_gas": (15, 5, 3),
    "gi_stool": (350, 60, 60),
}
_CT = {
    "air": (-1000, 0, 0), "subcutaneous_fat": (-100, 8, 8), "visceral_fat": (-90, 8, 12), "muscle": (50, 6, 8),
    "cortical_bone": (700, 100, 50), "vertebral_body": (230, 30, 30), "disc": (85, 10, 8),
    "spinal_canal": (15, 5, 5), "aorta": (210, 25, 6), "ivc": (130, 15, 8),
    "liver": (102, 8, 7), "liver_vessels": (165, 15, 8), "spleen": (88, 6, 6),
    "right_kidney": (165, 15, 8), "left_kidney": (165, 15, 8), "kidney_medulla": (110, 12, 8),
    "gallbladder": (10, 5, 4), "gi_wall": (55, 8, 8), "gi_fluid": (15, 8, 8), "gi_gas": (-950, 20, 20),
    "gi_stool": (20, 15, 40),
}
_PAINT_ORDER = ("air",) + TISSUES + tuple(SUBSTRUCTURES)


def render(anatomy: Mapping[str, np.ndarray], modality: str, seed: int, *, noise: float = 1.0,
           bias: float = 1.0) -> np.ndarray:
    """Float32 (Z, H, W) image in [0, 1] of ``anatomy`` as ``"mr"`` (T2-SPIR-like) or ``"ct"``
    (contrast-enhanced, portal-venous-like). ``noise`` and ``bias`` scale the noise level and the MR bias
    field (1 = default). Deterministic in ``seed``."""
    if modality not in MODALITIES:
        raise SfdaBenchError(f"unknown phantom modality {modality!r}; expected one of {list(MODALITIES)}")
    rng = np.random.default_rng(seed)
    table = _MR if modality == "mr" else _CT
    shape = anatomy["body"].shape
    index = np.zeros(shape, np.uint8)
    means = np.zeros(len(_PAINT_ORDER), np.float32)
    tex = np.zeros(len(_PAINT_ORDER), np.float32)
    for i, name in enumerate(_PAINT_ORDER):
        mean, sd, amp = table[name]
        means[i], tex[i] = mean + rng.normal(0, sd), amp
        if name != "air":
            index[anatomy[name]] = i
    if modality == "mr":                                  # same physiology: kidneys share one value per case
        means[_PAINT_ORDER.index("left_kidney")] = means[_PAINT_ORDER.index("right_kidney")] * rng.uniform(0.95, 1.05)
    else:
        means[_PAINT_ORDER.index("left_kidney")] = means[_PAINT_ORDER.index("right_kidney")] + rng.normal(0, 5)

    # piecewise-constant tissues + two-scale texture, then partial-volume blur
    fine = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), (0, 1.0, 1.0)) * 2.0
    coarse = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), (0, 3.0, 3.0)) * 4.0
    img = means[index] + tex[index] * (fine + coarse)
    img = ndimage.gaussian_filter(img, (0, 0.6, 0.6))

    z, h, w = shape
    zz, yy, xx = np.meshgrid(np.linspace(-1, 1, z), np.linspace(-1, 1, h), np.linspace(-1, 1, w),
                             indexing="ij", sparse=True)
    if modality == "mr":
        # smooth multiplicative bias field (coil sensitivity): low-order polynomial in log space
        c = rng.normal(0, 0.12 * bias, size=6)
        log_b = c[0] * xx + c[1] * yy + c[2] * xx * yy + c[3] * xx ** 2 + c[4] * zz \
            + bias * rng.uniform(0.0, 0.3) * yy ** 2
        img = img * np.exp(log_b).astype(np.float32)
        sigma = rng.uniform(12, 25) * noise          # Rician: magnitude of a complex signal with Gaussian noise
        img = np.hypot(img + rng.normal(0, sigma, shape), rng.normal(0, sigma, shape))
        img = img * rng.uniform(0.75, 1.35)          # scanner gain (MR units are arbitrary)
        out = np.clip(img, 0, 1200) / 1200.0
    else:
        # faint streaks through the spine (beam hardening), per slice at random angles
        bone = (anatomy["vertebral_body"] | anatomy["cortical_bone"]).any(axis=0)
        rows, cols = np.nonzero(bone) if bone.any() else ([h / 2], [w / 2])
        cy_, cx_ = np.mean(rows) / (h - 1) * 2 - 1, np.mean(cols) / (w - 1) * 2 - 1   # in [-1, 1] like yy, xx
        for _ in range(rng.integers(2, 6)):
            ang = rng.uniform(0, np.pi, size=(z, 1, 1))
            dist = np.abs((xx - cx_) * np.sin(ang) - (yy - cy_) * np.cos(ang)) * (w / 2)     # pixels
            img = img + (rng.uniform(-18, 18) * np.exp(-(dist / 1.2) ** 2)).astype(np.float32)
        sigma = rng.uniform(8, 15) * noise
        n = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), (0, 0.5, 0.5))
        img = img + n / n.std() * sigma
        out = (np.clip(img, -125, 275) + 125) / 400.0
    return out.astype(np.float32)


# -------------------------------------------------------------------------------------------- adapter

#: Bump when generate_anatomy / render change their output, so cached source models are not reused.
PHANTOM_VERSION = 1
_DEFAULT_SEED_OFFSET = {"mr": 0, "ct": 1_000_000}
_DEFAULT_FOV_MM = 358.4
_DEFAULT_SPLITS = {"train": list(range(16)), "test": list(range(16, 20))}


class PhantomDataset(DatasetAdapter):
    """Procedural abdominal phantom (MR T2-SPIR-like or contrast CT), generated on the fly; no download.

    ``cfg["params"]`` (all optional except ``modality``):

    - ``modality``: ``"mr"`` or ``"ct"``.
    - ``size`` (128): in-plane size H = W in pixels.
    - ``num_slices`` ([16, 24]): slices of the organ slab, an int or an inclusive range drawn per case.
    - ``spacing_mm`` ([8.0, 358.4 / size, 358.4 / size], i.e. 2.8 mm at 128 px): (z, y, x) voxel size in
      mm. The default keeps a 36 cm field of view (an adult trunk) at any ``size``; a field of view below
      35 cm draws a smaller patient (see :data:`MIN_FOV_MM`).
    - ``seed_offset`` (0 for MR, 1000000 for CT): case index ``i`` is the patient drawn with seed
      ``seed_offset + i``. The defaults differ per modality, so source and target patients differ (unpaired
      data, as CHAOS vs BTCV); equal offsets give paired MR/CT renderings of the same patients.
    - ``noise`` (1.0), ``bias`` (1.0): multipliers of the noise level and of the MR bias field.

    ``cfg["splits"]`` maps a split name to case indices (ints) or full case ids; default
    ``train`` = 0..15, ``test`` = 16..19 (the CHAOS 16/4 split sizes). Case ids read
    ``phantom-<modality>-<index:04d>``, e.g. ``phantom-ct-0017``.
    """

    name = "phantom"
    default_splits = _DEFAULT_SPLITS
    description = "Procedural abdominal MR/CT phantom (offline, CPU-sized); spleen, kidneys, liver"

    def __init__(self, cfg: Mapping[str, Any], organs: Sequence[str], cache_dir: Any):
        super().__init__(cfg, organs, cache_dir)
        unknown = [o for o in self.organs if o not in ORGANS]
        if unknown:
            raise SfdaBenchError(f"phantom dataset has no organ {unknown[0]!r}; available: {list(ORGANS)}")
        p = dict(cfg.get("params") or {})
        self.modality = str(p.get("modality", "")).lower()
        if self.modality not in MODALITIES:
            raise SfdaBenchError(f"phantom dataset: params.modality must be one of {list(MODALITIES)}, "
                                 f"got {p.get('modality')!r}")
        self.size = int(p.get("size", 128))
        ns = p.get("num_slices", [16, 24])
        self.num_slices = (int(ns), int(ns)) if isinstance(ns, (int, np.integer)) else (int(ns[0]), int(ns[-1]))
        inplane = _DEFAULT_FOV_MM / self.size
        self.spacing = tuple(float(s) for s in p.get("spacing_mm", (8.0, inplane, inplane)))
        self.seed_offset = int(p.get("seed_offset", _DEFAULT_SEED_OFFSET[self.modality]))
        self.noise = float(p.get("noise", 1.0))
        self.bias = float(p.get("bias", 1.0))
        if self.size < 32 or not 1 <= self.num_slices[0] <= self.num_slices[1] or len(self.spacing) != 3 \
                or min(self.spacing) <= 0:
            raise SfdaBenchError(f"phantom dataset: invalid params size={self.size}, "
                                 f"num_slices={list(self.num_slices)}, spacing_mm={list(self.spacing)}")
        self._id_re = re.compile(rf"^phantom-{self.modality}-(\d+)$")

    def case_id(self, index: int) -> str:
        return f"phantom-{self.modality}-{int(index):04d}"

    def normalise_case_id(self, case_id) -> str:
        """An index (``3``) or an id (``phantom-ct-0003``); checked when the split is read, not at load time."""
        cid = self.case_id(case_id) if isinstance(case_id, (int, np.integer)) else str(case_id)
        self._index(cid)
        return cid

    def _index(self, case_id: str) -> int:
        m = self._id_re.match(case_id)
        if not m:
            raise SfdaBenchError(f"not a case of this phantom domain: {case_id!r} "
                                 f"(expected phantom-{self.modality}-<index>)")
        return int(m.group(1))

    def load_case(self, case_id: str) -> Case:
        seed = self.seed_offset + self._index(case_id)
        lo, hi = self.num_slices
        num_slices = int(np.random.default_rng([seed, 1]).integers(lo, hi + 1))
        anatomy = generate_anatomy(seed, self.size, num_slices, self.spacing)
        # the rendering noise differs per modality even for paired (equal-seed) patients
        image = render(anatomy, self.modality, int(np.random.SeedSequence([seed, 2, MODALITIES.index(self.modality)])
                                                   .generate_state(1)[0]), noise=self.noise, bias=self.bias)
        label = np.zeros(image.shape, np.uint8)
        for i, organ in enumerate(self.organs):
            label[anatomy[organ]] = i + 1
        return Case(case_id=case_id, image=image, label=label, spacing=self.spacing)

    def fingerprint(self, case_ids: Sequence[str]) -> str:
        return super().fingerprint(case_ids) + f"|phantom-v{PHANTOM_VERSION}"


@hookimpl
def sfdabench_datasets() -> list[type]:
    return [PhantomDataset]
