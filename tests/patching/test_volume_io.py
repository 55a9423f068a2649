"""NIfTI outputs: nibabel and SimpleITK read the same spacing, geometry and voxels."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from patching.data.spec import centred_affine
from patching.data.volume_io import write_nifti


@pytest.mark.parametrize("shape, spacing", [((40, 36, 30), (2.0, 3.0, 4.0)), ((64, 64, 64), (5.625,) * 3)])
def test_nifti_spacing_geometry_and_voxels_agree_in_nibabel_and_simpleitk(tmp_path, shape, spacing):
    rng = np.random.default_rng(0)
    hu = rng.integers(-1024, 1600, size=shape).astype(np.int16)
    affine = centred_affine(shape, spacing)
    path = write_nifti(tmp_path / "v.nii.gz", hu, affine)
    img = nib.load(path)
    assert img.header.get_zooms() == pytest.approx(spacing)
    assert nib.aff2axcodes(img.affine) == ("R", "A", "S") and np.allclose(img.affine, affine)
    s = sitk.ReadImage(str(path))
    assert s.GetSpacing() == pytest.approx(spacing)
    assert s.GetSize() == shape  # SimpleITK sizes are (i, j, k) like nibabel's shape
    # SimpleITK works in LPS: x and y flip sign; the origin is voxel (0, 0, 0)'s centre
    lps = np.diag([-1.0, -1.0, 1.0])
    assert np.allclose(np.asarray(s.GetDirection()).reshape(3, 3), lps @ np.eye(3))
    assert np.allclose(s.GetOrigin(), lps @ affine[:3, 3])
    # the same voxels: SimpleITK's array is indexed [k, j, i]
    assert np.array_equal(sitk.GetArrayFromImage(s).transpose(2, 1, 0), np.asarray(img.dataobj))
    assert np.array_equal(np.asarray(img.dataobj), hu)
