"""Ingest of NIfTI files and DICOM series into a store: orientation, resampling, validation,
privacy, re-runs and concurrent writers."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydicom.uid import generate_uid

from patching.data.ct_clean import air_value
from patching.data.ingest import (
    IngestReport,
    ingest,
    load_dicom_series,
    load_nifti,
    resample_to_spec,
    resampled_affine,
)
from patching.data.spec import AIR_HU, VolumeSpec
from patching.data.store import Store
from patching.errors import InputError
from tests.patching.dicom_factory import AXIAL, BIRTH_DATE, PATIENT_NAME, write_ct_series

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def store(tmp_path):
    return Store(tmp_path / "store", create=True)


def _write_nifti(path, data, affine, *, slope_inter=None):
    img = nib.Nifti1Image(np.asarray(data), np.asarray(affine, dtype=float))
    if slope_inter is not None:
        img.header.set_slope_inter(*slope_inter)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, path)
    return path


def _hu(shape, seed=0):
    return np.random.default_rng(seed).integers(-1000, 1500, size=shape).astype(np.int16)


def _world(affine, shape):
    """World coordinates ``[3, N]`` of every voxel of a grid (C order)."""
    idx = np.indices(shape).reshape(3, -1).astype(float)
    return affine[:3, :3] @ idx + affine[:3, 3:4]


def _assert_ras(affine):
    assert np.all(np.diag(affine)[:3] > 0), affine


def _ingest(sources, store, spec, **kw) -> IngestReport:
    kw.setdefault("progress", False)
    return ingest(sources, store, spec, **kw)


# ---- NIfTI ------------------------------------------------------------------------------------

LPS_LIKE = np.array([[-2.0, 0, 0, 10], [0, -3.0, 0, 20], [0, 0, 4.0, -5], [0, 0, 0, 1]])
PERMUTED = np.array([[0, 0, -4.0, 7], [0, 2.0, 0, -3], [-3.0, 0, 0, 11], [0, 0, 0, 1]])


@pytest.mark.parametrize("affine", [LPS_LIKE, PERMUTED], ids=["lps-like", "permuted"])
def test_nifti_round_trip_lands_in_ras(tmp_path, store, affine):
    data = _hu((6, 7, 8))
    path = _write_nifti(tmp_path / "src" / "chest_01.nii.gz", data, affine, slope_inter=(2.0, -10.0))
    hu, spacing, ras = load_nifti(path)
    ref = nib.as_closest_canonical(nib.load(path))                      # reference
    np.testing.assert_array_equal(hu, ref.get_fdata())
    np.testing.assert_allclose(ras, ref.affine)
    _assert_ras(ras)

    spec = VolumeSpec(hu.shape, spacing)
    report = _ingest([path], store, spec)
    assert report == IngestReport(ingested=["chest_01"], skipped=[], failed=[])
    case = store.case("chest_01")
    out = case.ct[...]
    assert case.spacing_mm == spacing and case.attrs["source"] == "chest_01.nii.gz"
    _assert_ras(case.affine)
    # Every stored voxel holds the source voxel at the same world position (scaling applied).
    src_idx = np.linalg.inv(affine) @ np.vstack([_world(case.affine, out.shape), np.ones(out.size)])
    src_idx = np.rint(src_idx[:3]).astype(int)
    expected = 2.0 * data[tuple(src_idx)] - 10.0
    # Below -1024 HU is field-of-view padding, not tissue: ingest makes it air (ct_clean).
    expected = np.where(expected < AIR_HU, air_value(2.0 * data - 10.0), expected)
    np.testing.assert_array_equal(out.reshape(-1), np.rint(expected))


def test_nifti_singleton_4d_is_squeezed(tmp_path, store):
    data = _hu((5, 6, 7))[..., None]
    path = _write_nifti(tmp_path / "t.nii", data, np.eye(4))
    hu, _, _ = load_nifti(path)
    assert hu.shape == (5, 6, 7)


def test_resample_crop_pad_keeps_world_positions(tmp_path, store):
    # 1×1×2 mm, x flipped; HU linear in world coordinates so every interior voxel is checkable.
    shape = (20, 20, 10)
    affine = np.array([[-1.0, 0, 0, 30], [0, 1.0, 0, -12], [0, 0, 2.0, 40], [0, 0, 0, 1]])
    world = _world(affine, shape)
    field = lambda w: 5 * w[0] + 3 * w[1] + 2 * w[2]  # noqa: E731
    data = field(world).reshape(shape).astype(np.int16)
    path = _write_nifti(tmp_path / "ramp.nii.gz", data, affine)
    # x: 20 mm → 10 voxels, padded to 14; y: 20 mm → 10, cropped to 8; z: unchanged spacing, padded.
    spec = VolumeSpec((14, 8, 12), (2.0, 2.0, 2.0))
    assert _ingest([path], store, spec).ingested == ["ramp"]
    case = store.case("ramp")
    out = case.ct[...].astype(float)
    assert out.shape == spec.shape
    np.testing.assert_allclose(np.linalg.norm(case.affine[:3, :3], axis=0), spec.spacing_mm)
    _assert_ras(case.affine)
    # Padding with air, exactly the voxels outside the source's extent.
    assert np.all(out[:2] == AIR_HU) and np.all(out[-2:] == AIR_HU)
    assert np.all(out[:, :, 0] == AIR_HU) and np.all(out[:, :, -1] == AIR_HU)
    assert not np.any(out[2:-2, :, 1:-1] == AIR_HU)
    # World positions preserved: away from the edges (filter and interpolation support),
    # the stored value is the field at the voxel's world position.
    w_out = _world(case.affine, out.shape)
    src = (np.linalg.inv(affine) @ np.vstack([w_out, np.ones(out.size)]))[:3]
    interior = np.all((src >= 3) & (src <= np.array(shape)[:, None] - 4), axis=0)
    assert interior.sum() > 50
    np.testing.assert_allclose(out.reshape(-1)[interior], field(w_out)[interior], atol=1.0)


def test_resample_identity_and_integer_crop_pad():
    hu = _hu((5, 6, 7)).astype(np.float32)
    same = resample_to_spec(hu, (1, 1, 1), VolumeSpec((5, 6, 7), (1, 1, 1)))
    np.testing.assert_array_equal(same, hu)
    # Odd size change at unchanged spacing: copied, not interpolated (off-centre by ≤ half a voxel).
    spec = VolumeSpec((8, 5, 7), (1, 1, 1))
    out = resample_to_spec(hu, (1, 1, 1), spec)
    assert set(np.unique(out)) <= set(np.unique(hu)) | {AIR_HU}
    aff = resampled_affine(np.eye(4), hu.shape, (1, 1, 1), spec)
    src = np.rint(_world(aff, spec.shape)).astype(int)
    inside = np.all((src >= 0) & (src < np.array(hu.shape)[:, None]), axis=0)
    np.testing.assert_array_equal(out.reshape(-1)[inside], hu[tuple(src[:, inside])])
    assert np.all(out.reshape(-1)[~inside] == AIR_HU)


@settings(max_examples=40, deadline=None)
@given(shape=st.tuples(*[st.integers(2, 9)] * 3), out=st.tuples(*[st.integers(1, 9)] * 3),
       sp_in=st.tuples(*[st.sampled_from([0.5, 1.0, 1.5, 2.0, 3.0])] * 3),
       sp_out=st.tuples(*[st.sampled_from([0.5, 1.0, 1.5, 2.0, 3.0])] * 3))
def test_resample_grid_is_centred_and_pads_exactly_outside(shape, out, sp_in, sp_out):
    spec = VolumeSpec(out, sp_out)
    hu = np.random.default_rng(0).uniform(-900, 900, size=shape).astype(np.float32)
    res = resample_to_spec(hu, sp_in, spec)
    aff_in = np.diag([*sp_in, 1.0])
    aff_out = resampled_affine(aff_in, shape, sp_in, spec)
    np.testing.assert_allclose(np.linalg.norm(aff_out[:3, :3], axis=0), sp_out)
    centre_in = aff_in[:3, :3] @ ((np.array(shape) - 1) / 2)
    centre_out = aff_out[:3, :3] @ ((np.array(out) - 1) / 2) + aff_out[:3, 3]
    assert np.all(np.abs(centre_out - centre_in) <= 0.5 * np.array(sp_in) + 1e-9)
    # Air exactly where the output voxel centre lies outside the input's voxel extent.
    src = np.linalg.solve(aff_in[:3, :3], _world(aff_out, out))
    outside = np.any((src < -0.5 - 1e-9) | (src > np.array(shape)[:, None] - 0.5 + 1e-9), axis=0)
    np.testing.assert_array_equal(res.reshape(-1) == AIR_HU, outside)
    inside = res.reshape(-1)[~outside]
    assert np.all((inside >= hu.min() - 1e-3) & (inside <= hu.max() + 1e-3))   # no overshoot


# ---- DICOM ------------------------------------------------------------------------------------

def _stored(num_slices=10, rows=16, cols=16, seed=0):
    return np.random.default_rng(seed).integers(0, 2500, size=(num_slices, rows, cols)).astype(np.int16)


def _dicom_expected(series, affine, shape):
    """HU the stored grid must hold, looked up in the DICOM slices by world position."""
    lps = _world(affine, shape) * np.array([[-1.0], [-1.0], [1.0]])
    row_dir, col_dir = np.array(series.orientation[:3]), np.array(series.orientation[3:])
    d = lps - series.positions[0][:, None]
    step = series.positions[1] - series.positions[0]
    c = (row_dir @ d) / series.pixel_spacing[1]
    r = (col_dir @ d) / series.pixel_spacing[0]
    k = (step @ d) / (step @ step)
    for v in (c, r, k):
        np.testing.assert_allclose(v, np.rint(v), atol=1e-3)
    k, r, c = (np.rint(v).astype(int) for v in (k, r, c))
    return (series.stored[k, r, c] + series.intercept).reshape(shape)


@pytest.mark.parametrize("orientation", [AXIAL, (0, 1, 0, 0, 0, -1), (-1, 0, 0, 0, 1, 0)],
                         ids=["axial", "sagittal", "flipped-axial"])
def test_dicom_series_matches_expected_ras_volume(tmp_path, store, orientation):
    series = write_ct_series(tmp_path / "dcm" / "series1", _stored(), orientation=orientation)
    hu, spacing, affine = load_dicom_series(series.files[::-1])
    _assert_ras(affine)
    spec = VolumeSpec(hu.shape, spacing)
    if orientation == AXIAL:
        assert hu.shape == (16, 16, 10)
        np.testing.assert_allclose(spacing, (0.7, 0.8, 2.0))
    report = _ingest([tmp_path / "dcm"], store, spec)
    case_id = "P001-" + hashlib.sha256(series.series_uid.encode()).hexdigest()[:8]
    assert report == IngestReport(ingested=[case_id], skipped=[], failed=[])
    case = store.case(case_id)
    assert case.attrs["source"] == "dicom-series-10-slices"  # never the folder name
    np.testing.assert_array_equal(case.ct[...], _dicom_expected(series, case.affine, case.shape))


def test_folder_with_two_series_and_a_nifti_gives_three_cases(tmp_path, store):
    a = write_ct_series(tmp_path / "study" / "a", _stored(8, seed=1))
    b = write_ct_series(tmp_path / "study" / "b" / "deeper", _stored(12, seed=2), patient_id="P002",
                        slice_spacing=1.5)
    _write_nifti(tmp_path / "study" / "vol.nii", _hu((8, 8, 8)), np.eye(4))
    (tmp_path / "study" / "notes.txt").write_text("not an image")
    spec = VolumeSpec((12, 12, 10), (1.0, 1.0, 2.0))
    report = _ingest([tmp_path / "study"], store, spec)
    ids = sorted(["P001-" + hashlib.sha256(a.series_uid.encode()).hexdigest()[:8],
                  "P002-" + hashlib.sha256(b.series_uid.encode()).hexdigest()[:8], "vol"])
    assert report.ingested == ids and not report.failed
    assert store.case_ids() == ids
    assert {store.case(i).shape for i in ids} == {spec.shape}


def test_rerun_skips_without_reading(tmp_path, store, monkeypatch):
    write_ct_series(tmp_path / "src" / "s", _stored(6))
    _write_nifti(tmp_path / "src" / "v.nii.gz", _hu((6, 6, 6)), np.eye(4))
    spec = VolumeSpec((8, 8, 8), (1.0, 1.0, 1.0))
    first = _ingest([tmp_path / "src"], store, spec)
    assert len(first.ingested) == 2 and not first.failed

    def boom(*a, **k):
        raise AssertionError("pixel data read for a finished case")

    monkeypatch.setattr("patching.data.ingest.load_nifti", boom)
    monkeypatch.setattr("patching.data.ingest.load_dicom_series", boom)
    again = _ingest([tmp_path / "src"], store, spec)
    assert again == IngestReport(ingested=[], skipped=first.ingested, failed=[])


# ---- one line per bad case, the others still ingested -----------------------------------------

def _series(src, **kw):
    return write_ct_series(src / "series", _stored(8), **kw)


def _edit(path, **changes):
    ds = pydicom.dcmread(path)
    for key, value in changes.items():
        setattr(ds, key, value)
    ds.save_as(path)


def bad_truncated_gz(src):
    p = _write_nifti(src / "trunc.nii.gz", _hu((16, 16, 16), seed=3), np.eye(4))
    p.write_bytes(p.read_bytes()[: p.stat().st_size * 2 // 3])
    return p, "unreadable NIfTI"


def bad_2d(src):
    return _write_nifti(src / "flat.nii.gz", _hu((8, 8)), np.eye(4)), "2D"


def bad_4d(src):
    return _write_nifti(src / "time.nii.gz", _hu((6, 6, 6, 3)), np.eye(4)), "3 volumes"


def bad_nan(src):
    data = _hu((6, 6, 6)).astype(np.float32)
    data[2, 3, 4] = np.nan
    return _write_nifti(src / "nan.nii.gz", data, np.eye(4)), "1 NaN or Inf voxel"


def bad_truncated_dicom(src):
    s = _series(src)
    f = s.files[3]
    f.write_bytes(f.read_bytes()[:-100])
    return f, "truncated DICOM file"


def bad_corrupt_dicom_header(src):
    f = src / "junk"
    f.write_bytes(b"\0" * 128 + b"DICM" + bytes(range(256)) * 2)
    return f, "corrupt or truncated DICOM header"


def bad_size(src):
    s = _series(src)
    _edit(s.files[5], Rows=20, PixelData=np.zeros((20, 16), np.int16).tobytes())
    return s.folder, f"slices of different size: {s.files[5].name} is 20×16"


def bad_orientation(src):
    s = _series(src)
    _edit(s.files[2], ImageOrientationPatient=[1, 0, 0, 0, 0.995037, 0.0995037])
    return s.folder, "slices of different orientation"


def bad_pixel_spacing(src):
    s = _series(src)
    _edit(s.files[6], PixelSpacing=[0.9, 0.7])
    return s.folder, "slices of different pixel spacing"


def bad_missing(src):
    s = _series(src)
    s.files[4].unlink()
    return s.folder, "missing slice(s) between z=36.00 and z=40.00 mm"


def bad_duplicate(src):
    s = _series(src)
    dup = s.folder / "copy"
    shutil.copy(s.files[5], dup)
    _edit(dup, SOPInstanceUID=generate_uid())
    return s.folder, "duplicate slice at z=40.00 mm"


def bad_tilt(src):
    k = np.arange(8)[:, None]
    shear = np.tan(np.radians(12.0)) * 2.0
    positions = np.array([-5.0, -6.0, 30.0]) + k * np.array([0.0, shear, 2.0])
    s = _series(src, positions=positions, gantry_tilt=12.0)
    return s.folder, "gantry tilt of 12.0° is not supported"


def bad_uneven(src):
    positions = np.array([[0.0, 0.0, z] for z in (0, 2, 4, 6, 8.5, 10.5, 12.5, 14.5)])
    s = _series(src, positions=positions)
    return s.folder, "non-uniform slice spacing"


BAD = [bad_truncated_gz, bad_2d, bad_4d, bad_nan, bad_truncated_dicom, bad_corrupt_dicom_header,
       bad_size, bad_orientation, bad_pixel_spacing, bad_missing, bad_duplicate, bad_tilt, bad_uneven]


@pytest.mark.parametrize("make_bad", BAD, ids=[f.__name__[4:] for f in BAD])
def test_bad_case_gives_one_line_and_others_are_ingested(tmp_path, store, make_bad):
    src = tmp_path / "src"
    _write_nifti(src / "good.nii.gz", _hu((6, 6, 6)), np.eye(4))
    bad_path, phrase = make_bad(src)
    report = _ingest([src], store, VolumeSpec((8, 8, 8), (1.0, 1.0, 2.0)))
    assert report.ingested == ["good"]
    assert len(report.failed) == 1, report.failed
    path, problem = report.failed[0]
    assert path == str(bad_path)
    assert phrase in problem and "\n" not in problem, problem
    assert store.case_ids() == ["good"] and not store.incomplete()


def test_bad_sources(tmp_path, store):
    (tmp_path / "empty").mkdir()
    (tmp_path / "x.txt").write_text("hello")
    report = _ingest([tmp_path / "nope.nii", tmp_path / "empty", tmp_path / "x.txt"], store,
                     VolumeSpec((4, 4, 4), (1, 1, 1)))
    assert not report.ingested
    assert [p for p, _ in report.failed] == sorted(str(tmp_path / n) for n in ("empty", "nope.nii", "x.txt"))
    with pytest.raises(InputError, match="2D"):
        load_nifti(_write_nifti(tmp_path / "f.nii", _hu((4, 4)), np.eye(4)))


def test_same_case_id_from_two_sources_is_reported(tmp_path, store):
    a = _write_nifti(tmp_path / "a" / "ct.nii.gz", _hu((4, 4, 4)), np.eye(4))
    b = _write_nifti(tmp_path / "b" / "ct.nii.gz", _hu((4, 4, 4)), np.eye(4))
    report = _ingest([a, b], store, VolumeSpec((4, 4, 4), (1, 1, 1)))
    assert report.ingested == ["ct"]
    assert report.failed == [(str(b), f"case id 'ct' is also produced by {a}; rename one of them")]


# ---- privacy ----------------------------------------------------------------------------------

def test_patient_id_cannot_escape_and_no_identifiers_are_stored(tmp_path, store):
    s = write_ct_series(tmp_path / "export" / "s1", _stored(6), patient_id="../../x")
    report = _ingest([tmp_path / "export"], store, VolumeSpec((8, 8, 8), (1, 1, 2)))
    case_id = "x-" + hashlib.sha256(s.series_uid.encode()).hexdigest()[:8]
    assert report.ingested == [case_id]
    assert (store.path / "cases" / case_id).is_dir()
    beside = [p for p in tmp_path.rglob("*") if not p.is_relative_to(store.path)
              and not p.is_relative_to(tmp_path / "export")]
    assert beside == []                                                 # nothing escaped the store
    files = [p for p in store.path.rglob("*") if p.is_file()]
    needles = [PATIENT_NAME.encode(), b"Janetest", BIRTH_DATE.encode(), s.series_uid.encode()]
    for p in files:
        data = p.read_bytes()
        for needle in needles:
            assert needle not in data, (p, needle)


# ---- concurrency ------------------------------------------------------------------------------

_CHILD = """
import json, sys, time
from pathlib import Path
from patching.data.ingest import ingest
from patching.data.spec import VolumeSpec
from patching.data.store import Store
store_path, tag, workers, *sources = sys.argv[1:]
Path(store_path + "." + tag + ".ready").touch()
while not Path(store_path + ".go").exists():   # start both writers together, imports done
    time.sleep(0.005)
store = Store(store_path, create=True)
r = ingest(sources, store, VolumeSpec((8, 8, 8), (1.0, 1.0, 2.0)), workers=int(workers), progress=False)
print(json.dumps({"ingested": r.ingested, "skipped": r.skipped, "failed": r.failed}))
"""


def _sources(tmp_path):
    src = tmp_path / "src"
    for i in range(4):
        _write_nifti(src / f"n{i}.nii.gz", _hu((10, 10, 6), seed=i), np.diag([1.0, 1.0, 2.0, 1.0]))
    write_ct_series(src / "dcm", _stored(6))
    return src


def test_two_concurrent_ingests_leave_one_intact_store(tmp_path):
    src = _sources(tmp_path)
    store_path = tmp_path / "store"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    # Writer a takes the folder, writer b the same cases as single sources in reverse order, so
    # they meet in the middle and race on the same case ids.
    orders = {"a": [str(src)], "b": [str(src / "dcm")] + [str(src / f"n{i}.nii.gz") for i in range(3, -1, -1)]}
    procs = [subprocess.Popen([sys.executable, "-c", _CHILD, str(store_path), tag, "1", *orders[tag]], cwd=REPO,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for tag in ("a", "b")]
    deadline = time.monotonic() + 60
    while not all(Path(f"{store_path}.{t}.ready").exists() for t in "ab") and time.monotonic() < deadline:
        time.sleep(0.01)
    Path(f"{store_path}.go").touch()
    results = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        results.append(json.loads(out.strip().splitlines()[-1]))
    store = Store(store_path)
    ids = store.case_ids()
    assert len(ids) == 5 and not any(r["failed"] for r in results)
    assert sorted(results[0]["ingested"] + results[1]["ingested"]) == ids   # each case written once
    for r in results:
        assert sorted(r["ingested"] + r["skipped"]) == ids
    assert sorted(p.name for p in (store_path / "cases").iterdir() if p.is_dir()) == ids  # no strays
    assert not store.incomplete() and not any((store_path / ".staging").iterdir())
    for i in range(4):
        expected, _, _ = load_nifti(src / f"n{i}.nii.gz")
        out = store.case(f"n{i}").ct[...]
        # 10×10×6 → 8×8×8 at the same spacing: x, y cropped by one each side, z padded by one.
        np.testing.assert_array_equal(out[:, :, 1:-1], expected[1:9, 1:9, :])
        assert np.all(out[:, :, [0, -1]] == AIR_HU)


def test_worker_pool_gives_the_same_store(tmp_path):
    src = _sources(tmp_path)
    bad = _write_nifti(src / "nan.nii.gz", np.full((4, 4, 4), np.nan, np.float32), np.eye(4))
    spec = VolumeSpec((8, 8, 8), (1.0, 1.0, 2.0))
    one = _ingest([src], Store(tmp_path / "one", create=True), spec, workers=1)
    two = _ingest([src], Store(tmp_path / "two", create=True), spec, workers=2)
    assert one == two and len(two.ingested) == 5
    assert [p for p, _ in two.failed] == [str(bad)]
    for cid in two.ingested:
        a, b = Store(tmp_path / "one").case(cid), Store(tmp_path / "two").case(cid)
        np.testing.assert_array_equal(a.ct[...], b.ct[...])
        np.testing.assert_array_equal(a.affine, b.affine)
