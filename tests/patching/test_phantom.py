"""Chest phantom: shapes, determinism, tissue HU, orientation, emboli, argument errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import ndimage as ndi

from patching.errors import InputError
from patching.phantom import TISSUE_CLASSES as T
from patching.phantom import Phantom, synth_chest
from patching.spec import centred_affine

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
    "cancellous_bone": (150, 400),
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
    assert 1000 <= np.percentile(cort, 90) <= 1500
    assert ph.hu.max() <= 1500


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
