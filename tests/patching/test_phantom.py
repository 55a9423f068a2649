"""Chest phantom: shapes, determinism, tissue HU, orientation, emboli, argument errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import ndimage as ndi

from patching.data.spec import centred_affine
from patching.errors import InputError
from patching.phantoms.chest import TISSUE_CLASSES as T
from patching.phantoms.chest import Phantom, synth_chest

# Expected HU per tissue class (the ranges a chest CTPA shows), written out here rather than
# read from the generator, so a wrong material value fails the test.
EXPECTED_HU = {
    "air": (-1010, -990),
    "fat": (-130, -60),
    "muscle": (30, 70),
    "lung": (-900, -700),
    "airway": (-1000, -950),
    "soft_tissue": (0, 70),
    "myocardium": (30, 70),
    "pulmonary_artery": (250, 450),
    "right_heart": (250, 450),
    "left_heart": (140, 260),
    "aorta": (150, 250),
    "cancellous_bone": (90, 300),  # vertebral trabecular bone, 89-226 HU by age (docs/data.md)
    "spinal_canal": (0, 50),
    "liver": (40, 80),
}
SEEDS = (0, 1)


@pytest.fixture(scope="module")
def clean():
    """Noise-free 96³ phantoms with labels, with and without emboli (same seeds)."""
    out = {}
    for seed in SEEDS:
        kw = dict(seed=seed, noise_hu=0.0, return_labels=True)
        out[seed] = (synth_chest((96, 96, 96), emboli=True, **kw),
                     synth_chest((96, 96, 96), emboli=False, **kw))
    return out


def _world(ph: Phantom, axis: int) -> np.ndarray:
    n, s = ph.hu.shape[axis], ph.spacing_mm[axis]
    return (np.arange(n) - (n - 1) / 2.0) * s


def test_dtype_shape_spacing_odd_shape():
    ph = synth_chest((40, 52, 36), seed=3, fov_mm=(300.0, 360.0, 330.0))
    assert ph.hu.dtype == np.int16 and ph.hu.shape == (40, 52, 36)
    assert ph.spacing_mm == pytest.approx((7.5, 360 / 52, 330 / 36))
    assert ph.embolus_mask is None and ph.tissue is None
    assert ph.labels["embolus"] is False and ph.labels["num_emboli"] == 0
    assert ph.labels["seed"] == 3
    json.dumps(ph.labels)  # plain JSON
    assert np.allclose(ph.affine(), centred_affine(ph.hu.shape, ph.spacing_mm))
    assert ph.hu.min() >= -1024 and ph.hu.max() <= 3071


@settings(max_examples=6, deadline=None)
@given(shape=st.tuples(*[st.integers(1, 20)] * 3),
       fov=st.tuples(*[st.floats(40.0, 600.0)] * 3), seed=st.integers(0, 2**40))
def test_any_grid(shape, fov, seed):
    ph = synth_chest(shape, seed=seed, fov_mm=fov, emboli=True)
    assert ph.hu.shape == shape and ph.hu.dtype == np.int16
    assert ph.spacing_mm == pytest.approx(tuple(f / n for f, n in zip(fov, shape, strict=True)))
    assert (ph.embolus_mask is None) == (ph.labels["num_emboli"] == 0)
    if ph.embolus_mask is not None:
        assert ph.embolus_mask.shape == shape and ph.embolus_mask.any()


def test_deterministic_and_seed_dependent():
    a = synth_chest((48, 48, 48), seed=7, emboli=True)
    b = synth_chest((48, 48, 48), seed=7, emboli=True)
    c = synth_chest((48, 48, 48), seed=8, emboli=True)
    assert np.array_equal(a.hu, b.hu) and np.array_equal(a.embolus_mask, b.embolus_mask)
    assert a.labels == b.labels
    assert not np.array_equal(a.hu, c.hu)
    assert a.labels["anatomy"] != c.labels["anatomy"]  # body size, heart position, ...


def test_anatomy_does_not_depend_on_grid():
    a = synth_chest((48, 40, 44), seed=4)
    b = synth_chest((64, 64, 64), seed=4, fov_mm=(400.0, 400.0, 380.0))
    assert a.labels["anatomy"] == b.labels["anatomy"]


def test_noise_level():
    quiet = synth_chest((48, 48, 48), seed=2, noise_hu=0.0)
    noisy = synth_chest((48, 48, 48), seed=2, noise_hu=20.0)
    diff = (noisy.hu.astype(np.float64) - quiet.hu)[quiet.hu > -950]  # no clipping at -1024
    assert abs(diff.mean()) < 0.5
    assert diff.std() == pytest.approx(20.0, rel=0.05)


def test_tissue_hu_in_range(clean):
    for seed, (ph, _) in clean.items():
        for name, (lo, hi) in EXPECTED_HU.items():
            core = ndi.binary_erosion(ph.tissue == T[name])  # away from partial-volume edges
            assert core.sum() >= 20, (seed, name)
            med = float(np.median(ph.hu[core]))
            assert lo <= med <= hi, f"seed {seed}: {name} median {med} HU not in [{lo}, {hi}]"
        lung = ph.hu[ndi.binary_erosion(ph.tissue == T["lung"], iterations=2)]
        assert np.percentile(lung, 2) >= -905 and np.percentile(lung, 98) <= -690
        assert lung.std() > 3  # textured, with a gravity gradient


def test_cortical_bone_zoomed():
    # Cortical shells are ~1 mm thick: check them on a 0.5 mm grid around the spine.
    coarse = synth_chest((64, 64, 64), seed=5, noise_hu=0.0, return_labels=True)
    bone = np.argwhere(coarse.tissue == T["cancellous_bone"])
    ys = _world(coarse, 1)[bone[:, 1]]
    centre = np.array([0.0, float(np.median(ys[ys < 0])), 0.0])
    ph = synth_chest((64, 96, 48), seed=5, noise_hu=0.0, blur_mm=0.0, return_labels=True,
                     fov_mm=(32.0, 48.0, 24.0), center_mm=tuple(centre))
    cort = ph.hu[ph.tissue == T["cortical_bone"]]
    assert cort.size > 100
    assert 1200 <= np.percentile(cort, 90) <= 1800  # compact bone: 700-3000 HU (docs/data.md)
    assert ph.hu.max() <= 1800


def test_left_right_and_orientation(clean):
    """RAS+: +x is the patient's right. Heart and descending aorta left, liver right."""
    for seed, (ph, _) in clean.items():
        x, y, z = (_world(ph, a) for a in range(3))
        t = ph.tissue
        heart = np.isin(t, [T["myocardium"], T["left_heart"]])
        hx = x[np.nonzero(heart)[0]]
        assert (hx < 0).mean() > 0.65, seed  # mostly on the patient's left
        liver = np.nonzero(t == T["liver"])
        assert x[liver[0]].mean() > 20 and z[liver[2]].mean() < z[np.nonzero(heart)[2]].mean()
        # Aorta below the heart's centre is the descending aorta: left of the midline.
        ai = np.nonzero(t == T["aorta"])
        low = z[ai[2]] < z[np.nonzero(heart)[2]].mean()
        assert x[ai[0][low]].mean() < -5, seed
        # Spine posterior, sternum anterior (y increases anteriorly), lungs above the liver.
        canal = np.nonzero(t == T["spinal_canal"])
        assert y[canal[1]].mean() < -30
        lung = np.nonzero(t == T["lung"])
        assert z[lung[2]].mean() > z[liver[2]].mean() + 50


def test_emboli_inside_arteries_and_dark(clean):
    for seed, (emb, plain) in clean.items():
        assert emb.labels["embolus"] is True and 1 <= emb.labels["num_emboli"] <= 3
        assert len(emb.labels["emboli"]) == emb.labels["num_emboli"]
        mask = emb.embolus_mask
        assert mask.dtype == np.uint8 and mask.shape == emb.hu.shape
        assert set(np.unique(mask)) <= {0, 1}
        m = mask.astype(bool)
        assert m.sum() > 0
        # The same patient without clots has contrast-filled artery at every mask voxel.
        assert np.all(plain.tissue[m] == T["pulmonary_artery"]), seed
        assert np.all(emb.tissue[m] == T["embolus"])
        artery = ndi.binary_erosion(plain.tissue == T["pulmonary_artery"])
        assert emb.hu[m].mean() < 150 < 250 < np.median(plain.hu[artery])
        # Nothing but the clots changed.
        far = ndi.distance_transform_edt(~m) > 2.5  # beyond the antialiasing ramp and blur
        assert np.array_equal(emb.hu[far], plain.hu[far])
        assert plain.embolus_mask is None and plain.labels["num_emboli"] == 0


def test_emboli_at_coarse_grid_still_marked():
    ph = synth_chest((48, 48, 48), seed=11, emboli=True)
    assert ph.embolus_mask.sum() > 0 and ph.labels["num_emboli"] >= 1


@pytest.mark.parametrize("kwargs, source", [
    (dict(shape=(0, 32, 32)), "synth_chest.shape"),
    (dict(shape=(32, 32)), "synth_chest.shape"),
    (dict(shape=(32, 32, 32, 1)), "synth_chest.shape"),
    (dict(shape=(32, -4, 32)), "synth_chest.shape"),
    (dict(shape=(32.5, 32, 32)), "synth_chest.shape"),
    (dict(shape=32), "synth_chest.shape"),
    (dict(fov_mm=(360.0, -1.0, 360.0)), "synth_chest.fov_mm"),
    (dict(fov_mm=(360.0, 0.0, 360.0)), "synth_chest.fov_mm"),
    (dict(fov_mm=(360.0, 360.0)), "synth_chest.fov_mm"),
    (dict(fov_mm=(360.0, float("nan"), 360.0)), "synth_chest.fov_mm"),
    (dict(seed=-1), "synth_chest.seed"),
    (dict(seed=1.5), "synth_chest.seed"),
    (dict(noise_hu=-1.0), "synth_chest.noise_hu"),
    (dict(blur_mm=float("inf")), "synth_chest.blur_mm"),
])
def test_bad_arguments(kwargs, source):
    kw = dict(shape=(16, 16, 16), seed=0) | kwargs
    with pytest.raises(InputError) as err:
        synth_chest(kw.pop("shape"), **kw)
    assert err.value.source == source
    assert "\n" not in str(err.value)


# ----------------------------------------------------------------------------------------
# Anatomical invariants: what a radiologist expects of a chest CT, checked on the rendered
# labels (and, for the ribs' course, on the sampled anatomy the renderer draws).

def _body_mask(ph: Phantom) -> np.ndarray:
    """Everything inside the skin (air in airways and stomach included)."""
    return ndi.binary_fill_holes(ph.tissue != T["air"], structure=np.ones((3, 3, 1)))


def test_bones_inside_body_contour(clean):
    for seed, (ph, _) in clean.items():
        body = _body_mask(ph)
        bone = np.isin(ph.tissue, [T["cortical_bone"], T["cancellous_bone"]])
        # Every bone voxel lies under the skin: inside the body eroded by one voxel (the spine
    # and the raised arms leave the field of view: its faces do not count as skin).
        assert bone.any() and np.all(ndi.binary_erosion(body, border_value=1)[bone]), seed


def test_lungs_above_diaphragm_liver_below_right_dome(clean):
    for seed, (ph, _) in clean.items():
        x, _, z = (_world(ph, a) for a in range(3))
        lung = ph.tissue == T["lung"]
        liver = ph.tissue == T["liver"]
        both = lung.any(axis=2) & liver.any(axis=2)
        assert both.sum() > 50, seed  # the liver lies under the lung over a wide area
        zz = np.broadcast_to(z, lung.shape)
        lung_low = np.where(lung, zz, np.inf).min(axis=2)
        liver_top = np.where(liver, zz, -np.inf).max(axis=2)
        # In every (x, y) column, all lung lies above all liver: a diaphragm in between.
        assert np.all(lung_low[both] > liver_top[both]), seed
        # The liver's dome is under the right hemidiaphragm (patient's right = +x in RAS).
        top = np.unravel_index(np.argmax(np.where(liver, zz, -np.inf)), liver.shape)
        assert x[top[0]] > 0, seed
        assert abs(z[top[2]] - ph.labels["anatomy"]["right_dome_z_mm"]) < 15.0, seed
        assert x[np.nonzero(liver)[0]].mean() > 20, seed


def test_heart_left_anterior_spine_posterior(clean):
    for seed, (ph, _) in clean.items():
        x, y, z = (_world(ph, a) for a in range(3))
        t = ph.tissue
        heart = np.nonzero(np.isin(t, [T["myocardium"], T["right_heart"], T["left_heart"]]))
        canal = np.nonzero(t == T["spinal_canal"])
        # Heart: centroid left of the midline (-x) and well in front of the spine.
        assert x[heart[0]].mean() < -5, seed
        assert y[heart[1]].mean() > y[canal[1]].mean() + 60, seed
        # Spinal canal on the midline, in the posterior third of the body.
        body = _body_mask(ph)
        ys = y[np.nonzero(body)[1]]
        assert abs(x[canal[0]].mean()) < 5, seed
        assert y[canal[1]].mean() < ys.min() + (ys.max() - ys.min()) / 3, seed


def test_cross_section_changes_along_z(clean):
    """Bell-shaped rib cage (narrow apices, wide bases), shoulders at the top, and a body
    outline whose width changes along z (it is not a prism)."""
    for seed, (ph, _) in clean.items():
        x, _, z = (_world(ph, a) for a in range(3))
        lung = ph.tissue == T["lung"]
        lz = z[np.nonzero(lung)[2]]
        top, bottom = lz.max(), ph.labels["anatomy"]["right_dome_z_mm"]

        def lung_width(level, x=x, z=z, lung=lung):
            k = int(np.argmin(np.abs(z - level)))
            xs = x[np.nonzero(lung[:, :, k])[0]]
            return xs.max() - xs.min()

        assert lung_width(top - 25) < 0.7 * lung_width(bottom + 30), seed
        body = _body_mask(ph)
        width = np.array([np.ptp(x[np.nonzero(body[:, :, k])[0]]) if body[:, :, k].any() else 0
                          for k in range(len(z))])
        chest = (z > bottom) & (z < top)
        assert width[chest].max() > 1.15 * width[chest].min(), seed
        # Shoulders and raised arms: the body is widest above the lung apices.
        assert width[z > top].max() > width[chest].max(), seed


def test_ribs_curve_around_thorax_and_slope_down():
    from patching.phantoms.anatomy import sample_chest

    for seed in range(4):
        ch = sample_chest(np.random.default_rng(seed))
        assert len(ch.ribs) == 24
        for bone, cartilage in ch.ribs:
            pts = np.vstack([bone[:, :3], bone[-1:, 3:6]])
            # Anterior end lower than the posterior end (the ribs slope downwards).
            assert pts[-1, 2] < pts[0, 2] - 10.0, seed
            if len(cartilage):  # ribs 1-7 reach the sternum through their cartilage
                assert pts[-1, 1] > pts[0, 1] + 40.0, seed  # from the back to the front
                # Curved: the heading turns by more than a quarter turn round the cage.
                heading = np.arctan2(np.diff(pts[:, 1]), np.abs(np.diff(pts[:, 0])) + 1e-9)
                assert np.ptp(heading) > np.pi / 2, seed
            # Outside the lungs and inside the trunk.
            x, y, z = pts[1:].T
            assert np.all(ch.sd_trunk(x, y, z) > 2.0), seed
            for side in (1, -1):
                assert np.all(ch.sd_lung(x, y, z, side) < 0), seed


def test_breasts_in_some_phantoms():
    has = [synth_chest((8, 8, 8), seed=s).labels["anatomy"]["breasts"] for s in range(16)]
    assert 2 <= sum(has) <= 14
    s = has.index(True)
    ph = synth_chest((64, 64, 64), seed=s, noise_hu=0.0, return_labels=True)
    gland = np.nonzero(ph.tissue == T["glandular"])
    assert len(gland[0]) > 0
    y = _world(ph, 1)
    assert y[gland[1]].mean() > 40  # on the anterior chest wall
