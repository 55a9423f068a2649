"""Real-CT clean-up at ingest: circular field-of-view padding and the patient table
(patching.data.ct_clean, wired into patching.data.ingest)."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from patching.data.ct_clean import clip_padding, remove_table
from patching.data.ingest import ingest
from patching.data.spec import AIR_HU, VolumeSpec
from patching.data.store import Store
from patching.phantoms.chest import TISSUE_CLASSES, synth_chest

SHAPE, FOV = (128, 128, 64), (420.0, 420.0, 320.0)
FOV_RADIUS_MM = 195.0


def _axes(shape, spacing):
    return [(np.arange(n) - (n - 1) / 2.0) * s for n, s in zip(shape, spacing, strict=True)]


@pytest.fixture(scope="module")
def scan():
    """A phantom as a scanner would write it: on a table, padded with -2048 outside a circle."""
    ph = synth_chest(SHAPE, seed=3, fov_mm=FOV, return_labels=True)
    x, y, _ = _axes(SHAPE, ph.spacing_mm)
    body = ph.tissue != TISSUE_CLASSES["air"]
    back = y[np.nonzero(body.any(axis=(0, 2)))[0].min()]
    hu = ph.hu.astype(np.float32)
    # A foam pad (air-like) under the back, then a 13 mm table top with raised side rails.
    pad = (y >= back - 12.0) & (y < back)
    top = (y >= back - 25.0) & (y < back - 12.0)
    rails = (y >= back - 25.0) & (y < back + 20.0)
    hu[:, pad, :] = np.where(body[:, pad, :], hu[:, pad, :], -950.0)
    hu[:, top, :] = np.where(body[:, top, :], hu[:, top, :], 250.0)
    side = np.abs(x) > 180.0
    hu[np.ix_(side, rails, np.arange(SHAPE[2]))] = 250.0
    table = np.zeros(SHAPE, bool)
    table[:, top, :] = ~body[:, top, :]
    table[np.ix_(side, rails, np.arange(SHAPE[2]))] = True
    outside = (x[:, None] ** 2 + y[None, :] ** 2) > FOV_RADIUS_MM ** 2
    hu[outside] = -2048.0
    return ph, np.rint(hu).astype(np.int16), table & ~outside[:, :, None], outside


def test_padding_and_table_become_air(scan):
    ph, hu, table, outside = scan
    assert (hu == -2048).sum() > 1000 and table.sum() > 1000  # the test volume has both
    out, n_pad = clip_padding(hu)
    assert n_pad == int((hu == -2048).sum())
    assert out.min() >= AIR_HU
    air = float(np.median(ph.hu[ph.tissue == TISSUE_CLASSES["air"]]))
    assert abs(float(out[outside].mean()) - air) < 5  # the scan's own air: no step at the edge
    out, n_table = remove_table(out, ph.spacing_mm)
    assert n_table >= table.sum() * 0.95
    assert out[table].max() < -900  # the table is gone
    # The patient is untouched: every body voxel inside the field of view keeps its HU.
    body = (ph.tissue != TISSUE_CLASSES["air"]) & ~outside[:, :, None]
    np.testing.assert_array_equal(out[body], hu[body].astype(np.float32))
    # Raised arms (separate from the trunk in many slices) are kept.
    arm = body & (np.abs(_axes(SHAPE, ph.spacing_mm)[0]) > 120)[:, None, None]
    assert arm.sum() > 100 and np.all(out[arm] == hu[arm])


def test_not_a_patient_passes_unchanged():
    rng = np.random.default_rng(0)
    noise = rng.uniform(-1000, 1500, size=(40, 40, 40)).astype(np.float32)
    out, n = remove_table(noise.copy(), (1.0, 1.0, 1.0))
    assert n == 0 and np.array_equal(out, noise)


def test_ingest_cleans_a_scanner_volume(tmp_path, scan):
    ph, hu, table, outside = scan
    path = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(hu, np.diag([*ph.spacing_mm, 1.0])), path)
    store = Store(tmp_path / "store", create=True)
    spec = VolumeSpec(SHAPE, ph.spacing_mm)
    report = ingest([path], store, spec, progress=False)
    assert report.ingested == ["scan"] and not report.failed
    ct = np.asarray(store.case("scan").ct[...])
    assert ct.min() >= AIR_HU
    assert ct[table].max() < -900
    assert np.all(ct[outside[:, :, None].repeat(SHAPE[2], 2)] < -900)
    body = (ph.tissue != TISSUE_CLASSES["air"]) & ~outside[:, :, None]
    np.testing.assert_array_equal(ct[body], hu[body])
