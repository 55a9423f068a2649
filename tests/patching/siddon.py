"""An exact Siddon ray tracer: a slow NumPy oracle for :mod:`patching.projection.drr` (tests only).

Siddon (1985), "Fast calculation of the exact radiological path for a three-dimensional CT
array": the volume is piecewise constant (each voxel a box of ``spacing`` mm around its centre);
a ray's line integral is the sum over the voxels it crosses of ``mu × (length inside the
voxel)``, the lengths found exactly from the ray's crossings of the voxel-boundary planes. No
interpolation and no sampling step, so it shares nothing with the projector under test except the
geometry, which is written out here again from the conventions (RAS+ world mm, origin at the
volume centre, source at ``-sid * beam``, pixel ``(r, c)`` at ``source + sdd * beam + u_c * col +
v_r * row``); see ``tests/patching/test_drr.py``.
"""

from __future__ import annotations

import numpy as np

BEAM = {"pa": (0, 1, 0), "ap": (0, -1, 0), "lateral": (-1, 0, 0)}
COL = {"pa": (-1, 0, 0), "ap": (1, 0, 0), "lateral": (0, -1, 0)}
ROW = (0, 0, -1)


def ray_segments(view: str, geometry) -> tuple[np.ndarray, np.ndarray]:
    """(start, end) points of every pixel's ray, each (H*W)×3 mm, row-major pixel order."""
    beam, col, row = (np.asarray(x, dtype=np.float64) for x in (BEAM[view], COL[view], ROW))
    v = (np.arange(geometry.height) - (geometry.height - 1) / 2) * geometry.row_mm
    u = (np.arange(geometry.width) - (geometry.width - 1) / 2) * geometry.col_mm
    offsets = (v[:, None, None] * row + u[None, :, None] * col).reshape(-1, 3)
    if geometry.parallel:
        far = 1e4
        return offsets - far * beam, offsets + far * beam
    source = -geometry.sid_mm * beam
    return np.broadcast_to(source, offsets.shape), source + geometry.sdd_mm * beam + offsets


def siddon_line_integrals(mu: np.ndarray, spacing_mm, view: str, geometry, chunk_rays: int = 1024) -> np.ndarray:
    """Exact line integrals of the piecewise-constant ``mu`` (X×Y×Z, 1/mm) for every pixel, H×W."""
    mu = np.asarray(mu, dtype=np.float64)
    spacing = np.asarray(spacing_mm, dtype=np.float64)
    shape = np.asarray(mu.shape)
    planes = [(np.arange(n + 1) - n / 2) * s for n, s in zip(shape, spacing, strict=True)]
    starts, ends = ray_segments(view, geometry)
    out = np.empty(len(starts))
    for i in range(0, len(starts), chunk_rays):
        p0, d = starts[i:i + chunk_rays], ends[i:i + chunk_rays] - starts[i:i + chunk_rays]
        # The ray's parameter range inside the box: from the source on, through the whole volume
        # (also past the detector plane, as patching.projection.drr integrates it).
        lo, hi = np.zeros(len(p0)), np.full(len(p0), np.inf)
        crossings = []
        for k in range(3):
            with np.errstate(divide="ignore", invalid="ignore"):
                alpha = (planes[k][None, :] - p0[:, k:k + 1]) / d[:, k:k + 1]  # r n+1
            parallel = d[:, k] == 0
            inside = (p0[:, k] > planes[k][0]) & (p0[:, k] < planes[k][-1])
            a0, a1 = np.minimum(alpha[:, 0], alpha[:, -1]), np.maximum(alpha[:, 0], alpha[:, -1])
            a0 = np.where(parallel, np.where(inside, -np.inf, np.inf), a0)
            a1 = np.where(parallel, np.where(inside, np.inf, -np.inf), a1)
            lo, hi = np.maximum(lo, a0), np.minimum(hi, a1)
            crossings.append(np.where(parallel[:, None], np.nan, alpha))
        alphas = np.concatenate(crossings + [lo[:, None], hi[:, None]], axis=1)
        alphas = np.where((alphas >= lo[:, None]) & (alphas <= hi[:, None]), alphas, np.nan)
        alphas = np.sort(alphas, axis=1)  # NaNs last
        seg = np.diff(alphas, axis=1)  # r m; NaN where either end is not a crossing
        mid = 0.5 * (alphas[:, 1:] + alphas[:, :-1])
        points = p0[:, None, :] + mid[..., None] * d[:, None, :]  # r m 3
        with np.errstate(invalid="ignore"):
            index = np.floor((points - planes_start(planes)) / spacing)
        index = np.where(np.isfinite(index), index, -1).astype(np.int64)
        valid = np.isfinite(seg) & (seg > 0) & np.all((index >= 0) & (index < shape), axis=-1)
        index = np.where(valid[..., None], index, 0)
        values = mu[index[..., 0], index[..., 1], index[..., 2]]
        lengths = np.where(valid, seg, 0.0) * np.linalg.norm(d, axis=1)[:, None]
        out[i:i + chunk_rays] = (values * lengths).sum(axis=1)
    return out.reshape(geometry.height, geometry.width)


def planes_start(planes) -> np.ndarray:
    return np.array([p[0] for p in planes])


def ncc(a, b) -> float:
    """Normalised cross-correlation of two images (Pearson's r over all pixels)."""
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    a, b = a - a.mean(), b - b.mean()
    return float((a @ b) / np.sqrt((a @ a) * (b @ b)))
