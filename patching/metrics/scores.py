"""Evaluation metrics: one set for every method, with the conventions stated (``docs/metrics.md``).

Every function takes HU volumes ``[x, y, z]`` (numpy arrays or torch tensors, any device; leading
singleton axes such as ``1×1×X×Y×Z`` are dropped), prediction first, and returns Python floats or
small dicts. Nothing here keeps state. The intensity metrics (PSNR, MAE, SSIM) work in slabs along
``x``, so their float64 scratch stays near a few hundred MB however big the volume; the masks
(lungs, vessels) are whole-volume boolean and label arrays.

- :func:`psnr` — the headline: PSNR with an explicit HU data range (and an optional HU window).
- :func:`psnr_x2ctgan`, :func:`ssim_x2ctgan` — X2CT-GAN's published conventions, reproduced from
  its evaluation code so numbers line up with the literature; reported separately, never as PSNR.
- :func:`ssim3d` — 3D SSIM, Gaussian window (σ 1.5), equal to scikit-image's
  ``gaussian_weights=True, use_sample_covariance=False`` on 3D arrays.
- :func:`mae_hu`, :func:`dice`, :func:`lung_mask`, :func:`vessel_mask`, :func:`dice_lungs`,
  :func:`dice_vessels`, :func:`projection_consistency`, :func:`embolus_contrast`,
  :func:`lpips25d` (with :func:`load_feature_net`), :func:`bootstrap_ci`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
from scipy import ndimage as ndi

from patching.checks import metric_array as _array
from patching.checks import metric_pair as _pair
from patching.checks import metric_window as _window
from patching.checks import positive_number as _positive
from patching.checks import slabs as _slabs
from patching.errors import InputError

# X2CT-GAN (kylekma/X2CT): stored CT values are HU + 1024 (``convert2hu`` subtracts 1024), clipped to
# CT_MIN_MAX = [0, 2500] and scaled to [0, 1]; PSNR de-normalises to 0..2500 but divides by 4095.
X2CTGAN_HU_OFFSET = 1024.0
X2CTGAN_CT_MAX = 2500.0
X2CTGAN_PIXEL_MAX = 4095.0
X2CTGAN_ZERO_MSE_PSNR = 100.0  # their code's value for identical volumes


def _as_float(x: np.ndarray, window: tuple[float, float] | None) -> np.ndarray:
    x = x.astype(np.float64)
    return x if window is None else np.clip(x, *window, out=x)


# --- intensity metrics -----------------------------------------------------------------------------


def _sums(a: np.ndarray, b: np.ndarray, window) -> tuple[float, float]:
    """(sum of squared, sum of absolute) differences in float64, slab by slab."""
    sq = ab = 0.0
    for sl in _slabs(a.shape):
        d = _as_float(a[sl], window) - _as_float(b[sl], window)
        ab += float(np.abs(d).sum())
        sq += float(np.square(d).sum())  # pairwise sum: the same bits for any BLAS thread count
    return sq, ab


def psnr(pred_hu, target_hu, data_range_hu: float, *, window=None) -> float:
    """PSNR in dB with an explicit data range: ``10·log10(data_range² / MSE)``.

    Args:
        pred_hu, target_hu: HU volumes of the same shape.
        data_range_hu: the peak in HU; state it (a preset's HU window width, e.g. 2624 for
            [-1024, 1600], or 2000). Nothing is inferred from the data.
        window: optional ``(lo, hi)`` HU: both volumes are clipped to it first.

    Returns ``math.inf`` for identical volumes (no cap; :func:`bootstrap_ci` refuses it).
    """
    r = _positive(data_range_hu, "data_range_hu")
    a, b = _pair(pred_hu, target_hu)
    sq, _ = _sums(a, b, _window(window))
    mse = sq / a.size
    return math.inf if mse == 0 else float(10.0 * math.log10(r * r / mse))


def mae_hu(pred_hu, target_hu, *, window=None) -> float:
    """Mean absolute error in HU (both clipped to ``window`` first when given)."""
    a, b = _pair(pred_hu, target_hu)
    return _sums(a, b, _window(window))[1] / a.size


def _x2ctgan_unit(hu: np.ndarray) -> np.ndarray:
    """HU → X2CT-GAN's network range: ``clip((HU + 1024) / 2500, 0, 1)``, float32 like their tensors."""
    return np.clip((hu.astype(np.float32) + np.float32(X2CTGAN_HU_OFFSET)) / np.float32(X2CTGAN_CT_MAX),
                   0, 1).astype(np.float32)


def psnr_x2ctgan(pred_hu, target_hu, *, per_slice: bool = False) -> float:
    """PSNR as X2CT-GAN's ``test.py`` computes it — **not** comparable with :func:`psnr`.

    Reproduces kylekma/X2CT ``3DGAN/test.py`` + ``lib/utils/metrics_np.py``: HU + 1024 clipped to
    [0, 2500] and scaled to [0, 1] in float32; de-normalised (``x * 2500``) and truncated to int32;
    then ``20·log10(4095 / sqrt(MSE))``, 100 dB when the MSE is 0. The values span 0..2500, so the
    4095 peak inflates the PSNR by ``20·log10(4095/2500) ≈ 4.29 dB`` against the true range
    (``psnr(..., 2500, window=(-1024, 1476))``). Report it only to line up with that literature.

    Args:
        per_slice: ``False`` → their ``psnr-3d`` (one MSE over the volume); ``True`` → their
            ``PSNR-avg``: PSNR of every 2D slice along each axis, averaged over the slices, then
            over the three axes.
    """
    a, b = _pair(pred_hu, target_hu)
    # Squared errors summed per slice along each axis (the 3D MSE is their total), slab by slab.
    per_x, per_y, per_z = np.zeros(a.shape[0]), np.zeros(a.shape[1]), np.zeros(a.shape[2])
    for sl in _slabs(a.shape):
        p, t = ((_x2ctgan_unit(v[sl]) * np.float32(X2CTGAN_CT_MAX)).astype(np.int32) for v in (a, b))
        se = (p - t).astype(np.float64) ** 2
        per_x[sl] = se.sum(axis=(1, 2))
        per_y += se.sum(axis=(0, 2))
        per_z += se.sum(axis=(0, 1))

    def db(mse):
        mse = np.atleast_1d(np.asarray(mse, dtype=np.float64))
        out = 20 * np.log10(X2CTGAN_PIXEL_MAX / np.sqrt(np.where(mse == 0, 1e-10, mse)))
        return np.where(mse == 0, X2CTGAN_ZERO_MSE_PSNR, out)

    if not per_slice:
        return float(db(per_x.sum() / a.size)[0])
    return float(np.mean([db(sums * n / a.size).mean() for sums, n in zip((per_x, per_y, per_z), a.shape,
                                                                          strict=True)]))


# --- SSIM --------------------------------------------------------------------------------------


def _ssim_mean(a: np.ndarray, b: np.ndarray, prep: Callable[[np.ndarray], np.ndarray],
               filt: Callable[[np.ndarray], np.ndarray], radius: Sequence[int], crop: Sequence[int],
               data_range: float, k1: float, k2: float, cov_norm: float) -> float:
    """Mean of the SSIM map over the volume minus ``crop`` voxels per side, in slabs along x.

    Each slab carries ``radius[0]`` extra planes on both sides, so its filtered interior equals the
    whole volume filtered (the filters are separable and ``radius`` is their reach); at the true
    volume faces the filters' own boundary mode applies, as on the whole volume.
    """
    n0 = a.shape[0]
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    inner = tuple(slice(c, n - c) for c, n in zip(crop[1:], a.shape[1:], strict=True))
    total, count = 0.0, 0
    for sl in _slabs((n0 - 2 * crop[0],) + a.shape[1:], halo=radius[0]):
        lo, hi = sl.start + crop[0], sl.stop + crop[0]
        s0, s1 = max(0, lo - radius[0]), min(n0, hi + radius[0])
        x, y = prep(a[s0:s1]), prep(b[s0:s1])
        keep = (slice(lo - s0, hi - s0),) + inner
        ux, uy = filt(x)[keep], filt(y)[keep]
        vx = cov_norm * (filt(x * x)[keep] - ux * ux)
        vy = cov_norm * (filt(y * y)[keep] - uy * uy)
        vxy = cov_norm * (filt(x * y)[keep] - ux * uy)
        s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
        total += float(s.sum())
        count += s.size
    return total / count


def ssim3d(pred, target, data_range: float, *, window=None, sigma: float = 1.5,
           k1: float = 0.01, k2: float = 0.03) -> float:
    """3D SSIM with a Gaussian window (Wang et al. 2004 in 3D), float64.

    Equal to ``skimage.metrics.structural_similarity(pred, target, data_range=data_range,
    gaussian_weights=True, sigma=sigma, use_sample_covariance=False, channel_axis=None)`` on the
    3D arrays: Gaussian weights truncated at 3.5 σ (11 taps for σ 1.5), 'reflect' boundaries,
    population covariances, ``C1 = (k1·L)²``, ``C2 = (k2·L)²``, and the mean taken over the
    volume less the filter radius on every side.

    Args:
        data_range: ``L`` in the inputs' units (HU: state it, as for :func:`psnr`).
        window: optional ``(lo, hi)``: both clipped to it first.
    """
    r = _positive(data_range, "data_range")
    sigma = _positive(sigma, "sigma")
    a, b = _pair(pred, target)
    win = _window(window)
    radius = int(3.5 * sigma + 0.5)  # as scipy.ndimage and skimage
    if min(a.shape) < 2 * radius + 1:
        raise InputError("pred", f"needs at least {2 * radius + 1} voxels along each axis for SSIM "
                                 f"(sigma {sigma}), got shape {a.shape}")
    return _ssim_mean(a, b, lambda v: _as_float(v, win),
                      lambda v: ndi.gaussian_filter(v, sigma, mode="reflect", truncate=3.5),
                      (radius,) * 3, (radius,) * 3, r, k1, k2, cov_norm=1.0)


def ssim_x2ctgan(pred_hu, target_hu, *, per_axis: bool = False):
    """SSIM as X2CT-GAN's ``test.py`` computes it: 2D SSIM per slice, averaged — on [0, 1].

    Our reading of kylekma/X2CT ``Structural_Similarity``: the volume mapped to [0, 1] as their
    network sees it (``clip((HU + 1024) / 2500, 0, 1)``); for each of the three axes, the volume
    is transposed so that axis is last and passed to ``compare_ssim(..., data_range=1,
    multichannel=True)`` — i.e. every slice along that axis is a channel: a 2D SSIM per slice with
    the old scikit-image defaults (7×7 uniform window, sample covariance, K1 0.01, K2 0.03,
    3-pixel border ignored), averaged over the slices. The three axis means are averaged
    (``SSIM-avg``). Computed here directly (scikit-image is not a runtime dependency); equal to
    ``structural_similarity(..., data_range=1, channel_axis=k)`` averaged over ``k``.

    Returns the average, or with ``per_axis`` a dict ``{"x", "y", "z", "mean"}``.
    """
    a, b = _pair(pred_hu, target_hu)
    if min(a.shape) < 7:
        raise InputError("pred", f"needs at least 7 voxels along each axis for 2D SSIM, got {a.shape}")
    cov_norm = 49.0 / 48.0  # sample covariance over the 7×7 window
    prep = lambda v: _x2ctgan_unit(v).astype(np.float64)  # noqa: E731
    out = {}
    for k, name in enumerate("xyz"):
        size = [7, 7, 7]
        size[k] = 1  # filter within the slices across axis k only
        radius, crop = [3, 3, 3], [3, 3, 3]
        radius[k] = crop[k] = 0
        out[name] = _ssim_mean(a, b, prep, lambda v, s=tuple(size): ndi.uniform_filter(v, s, mode="reflect"),
                               radius, crop, 1.0, 0.01, 0.03, cov_norm)
    out["mean"] = (out["x"] + out["y"] + out["z"]) / 3
    return out if per_axis else out["mean"]


# --- segmentation metrics -----------------------------------------------------------------------------


def dice(a_mask, b_mask) -> float:
    """Dice ``2|A∩B| / (|A| + |B|)`` of two masks (non-zero = inside); 1.0 when both are empty."""
    a, b = _pair(a_mask, b_mask, ("a_mask", "b_mask"))
    inter = size = 0
    for sl in _slabs(a.shape):
        x, y = a[sl] != 0, b[sl] != 0
        inter += int(np.count_nonzero(x & y))
        size += int(np.count_nonzero(x)) + int(np.count_nonzero(y))
    return 1.0 if size == 0 else 2.0 * inter / size


def _fill_axial(mask: np.ndarray) -> np.ndarray:
    """Holes filled in every axial (z) slice: the lungs and the trachea are holes of the body."""
    out = np.empty_like(mask)
    for z in range(mask.shape[2]):
        out[:, :, z] = ndi.binary_fill_holes(mask[:, :, z])
    return out


def lung_mask(hu, *, lo: float = -950.0, hi: float = -500.0, max_components: int = 2,
              min_fraction: float = 0.05) -> np.ndarray:
    """Threshold-segmented lungs, bool ``X×Y×Z``.

    1. Body: voxels above ``hi`` with the holes of every axial slice filled (per slice, because
       the trachea opens to the top of the volume: a 3D fill would leave the lungs "outside").
    2. Candidates: ``lo < HU < hi`` inside the body (airway lumen below ``lo`` is left out).
    3. Connected components (6-connectivity); those touching the x or y faces are dropped (air
       outside a body that the field of view cuts), z faces are allowed (a crop may cut the lungs).
    4. The ``max_components`` largest are kept, each at least ``min_fraction`` of the largest
       (two lungs; drops gas rims in the stomach and the like).
    """
    v = _array(hu, "hu")
    body = _fill_axial(v > hi)
    cand = body & (v > lo) & (v < hi)
    labels, num = ndi.label(cand)
    if num == 0:
        return cand
    sizes = np.bincount(labels.ravel(), minlength=num + 1)
    sizes[0] = 0
    faces = [labels[0], labels[-1], labels[:, 0], labels[:, -1]]
    sizes[np.unique(np.concatenate([f.ravel() for f in faces]))] = 0
    order = np.argsort(sizes)[::-1][:max_components]
    keep = [i for i in order if sizes[i] > 0 and sizes[i] >= min_fraction * sizes[order[0]]]
    return np.isin(labels, keep)


def thorax_region(lungs) -> np.ndarray:
    """Lungs and mediastinum, bool: along every x row (fixed y, z), from the first lung voxel to
    the last — everything between the two lungs, nothing lateral to them (chest wall, ribs)."""
    m = _array(lungs, "lungs") != 0
    return np.logical_or.accumulate(m, axis=0) & np.logical_or.accumulate(m[::-1], axis=0)[::-1]


_IN_PLANE = np.zeros((3, 3, 3), dtype=bool)
_IN_PLANE[:, :, 1] = ndi.generate_binary_structure(2, 1)  # 4-connectivity within axial slices


def vessel_mask(hu, lo: float = 200.0, hi: float = 600.0, *, region=None) -> np.ndarray:
    """Contrast-filled vessels (and enhanced heart chambers), bool ``X×Y×Z``.

    ``lo <= HU <= hi`` inside ``region`` (default: :func:`thorax_region` of this volume's
    :func:`lung_mask`), bone removed by connectivity within axial slices: bone seeds are voxels
    above ``hi`` (cortex) with the holes of each axial slice filled, grown by two voxels in-plane;
    every 2D (4-connected) piece of the candidate mask that touches them is dropped — the
    cancellous interior of vertebrae and sternum (200-330 HU) overlaps contrast, but it is
    attached to cortex. Per slice, not in 3D, so that one contact between a vessel and bone
    costs only that slice of the vessel, never the whole connected tree. Needs voxels fine
    enough (≲ 3 mm) for cortex to exceed ``hi``; on coarser grids some bone leaks in (for
    prediction and target alike).
    """
    v = _array(hu, "hu")
    if region is None:
        region = thorax_region(lung_mask(v))
    else:
        region = _array(region, "region") != 0
        if region.shape != v.shape:
            raise InputError("region", f"shape {region.shape} does not match hu shape {v.shape}")
    cand = (v >= lo) & (v <= hi) & region
    bone = ndi.binary_dilation(_fill_axial(v > hi), structure=_IN_PLANE, iterations=2)
    labels, _ = ndi.label(cand, structure=_IN_PLANE)
    touching = np.unique(labels[bone & cand])
    return cand & ~np.isin(labels, touching[touching > 0])


def dice_lungs(pred_hu, target_hu) -> float:
    """Dice of :func:`lung_mask` of the prediction and of the target."""
    a, b = _pair(pred_hu, target_hu)
    return dice(lung_mask(a), lung_mask(b))


def dice_vessels(pred_hu, target_hu, lo: float = 200.0, hi: float = 600.0) -> float:
    """Dice of :func:`vessel_mask` of prediction and target, both within the *target's* thorax
    region (so that a poor lung segmentation of the prediction does not move the vessel score)."""
    a, b = _pair(pred_hu, target_hu)
    region = thorax_region(lung_mask(b))
    return dice(vessel_mask(a, lo, hi, region=region), vessel_mask(b, lo, hi, region=region))


# --- projection consistency and clot visibility ---------------------------------------------------


def _ncc(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(), b - b.mean()
    den = math.sqrt(float((a * a).sum()) * float((b * b).sum()))
    return 0.0 if den == 0 else float((a * b).sum()) / den


def projection_consistency(pred_hu, xray, spacing_mm, view: str = "pa", geometry=None,
                           **drr_kwargs) -> dict:
    """Does the output explain its input? DRR of ``pred_hu`` against the input X-ray.

    The DRR is :func:`patching.projection.drr.render_drr` with the same ``spacing_mm``, ``view``,
    ``geometry`` (default :class:`~patching.projection.drr.DRRGeometry`) and attenuation settings
    (``drr_kwargs``: ``bone_threshold_hu``, ``integral_scale``, ...) that made the X-ray.

    Returns ``{"psnr": dB on [0, 1] (data range 1, inf if equal), "ncc": zero-mean normalised
    cross-correlation in [-1, 1] (0 when either image is constant)}``.
    """
    from patching.projection.drr import DRRGeometry, render_drr

    geometry = DRRGeometry() if geometry is None else geometry
    if not isinstance(geometry, DRRGeometry):
        raise InputError("geometry", f"needs a patching.projection.drr.DRRGeometry, got {type(geometry).__name__}")
    vol = _array(pred_hu, "pred_hu")
    img = _array(xray, "xray", ndim=2).astype(np.float64)
    if img.min() < 0 or img.max() > 1:
        raise InputError("xray", f"needs values in [0, 1] (bone bright), got [{img.min():.3g}, {img.max():.3g}]")
    if img.shape != (geometry.height, geometry.width):
        raise InputError("xray", f"shape {img.shape} does not match the geometry's detector "
                                 f"{(geometry.height, geometry.width)}")
    if vol.dtype not in (np.int16, np.int32, np.float32, np.float64):
        vol = vol.astype(np.float32)
    with torch.no_grad():
        drr = render_drr(torch.from_numpy(np.ascontiguousarray(vol)), spacing_mm, view, geometry,
                         **drr_kwargs).double().numpy()
    mse = float(np.mean((drr - img) ** 2))
    return {"psnr": math.inf if mse == 0 else 10.0 * math.log10(1.0 / mse), "ncc": _ncc(drr, img)}


def embolus_contrast(pred_hu, embolus_mask, *, vessel=None, shell_voxels: int = 2,
                     lo: float = 200.0, hi: float = 600.0, min_std_hu: float = 1.0) -> dict | None:
    """Can a reader still see the clot? Contrast of the embolus against the vessel around it.

    Shell: the mask dilated by ``shell_voxels`` (26-connected steps), minus the mask, restricted to
    contrast-filled lumen — ``vessel`` when given (e.g. :func:`vessel_mask` of the target, so every
    method is measured on the same voxels), else this output's own voxels with
    ``lo <= HU <= hi``.

    Returns ``None`` for an empty mask, else ``{"contrast_hu": shell mean - clot mean,
    "cnr": contrast_hu / shell std (floored at min_std_hu), "clot_hu", "shell_hu", "shell_std_hu",
    "num_clot", "num_shell"}``. No contrast-filled lumen around the clot means nothing to see:
    contrast and CNR are then 0 (``shell_hu`` = ``clot_hu``, ``num_shell`` 0).
    """
    v = _array(pred_hu, "pred_hu")
    m = _array(embolus_mask, "embolus_mask") != 0
    if m.shape != v.shape:
        raise InputError("embolus_mask", f"shape {m.shape} does not match pred_hu shape {v.shape}")
    if not m.any():
        return None
    if isinstance(shell_voxels, bool) or int(shell_voxels) != shell_voxels or shell_voxels < 1:
        raise InputError("shell_voxels", f"needs a positive integer, got {shell_voxels!r}")
    # Only the clot's bounding box (plus the shell) is touched: masks of whole volumes are large.
    idx = np.nonzero(m)
    box = tuple(slice(max(0, int(i.min()) - shell_voxels), int(i.max()) + shell_voxels + 1) for i in idx)
    vb, mb = v[box].astype(np.float64), m[box]
    ring = ndi.binary_dilation(mb, ndi.generate_binary_structure(3, 3), iterations=int(shell_voxels)) & ~mb
    if vessel is None:
        lumen = (vb >= lo) & (vb <= hi)
    else:
        lumen = _array(vessel, "vessel") != 0
        if lumen.shape != v.shape:
            raise InputError("vessel", f"shape {lumen.shape} does not match pred_hu shape {v.shape}")
        lumen = lumen[box]
    clot, shell = vb[mb], vb[ring & lumen]
    clot_hu = float(clot.mean())
    if shell.size == 0:
        return {"contrast_hu": 0.0, "cnr": 0.0, "clot_hu": clot_hu, "shell_hu": clot_hu,
                "shell_std_hu": 0.0, "num_clot": int(clot.size), "num_shell": 0}
    shell_hu, shell_std = float(shell.mean()), float(shell.std())
    contrast = shell_hu - clot_hu
    return {"contrast_hu": contrast, "cnr": contrast / max(shell_std, float(min_std_hu)),
            "clot_hu": clot_hu, "shell_hu": shell_hu, "shell_std_hu": shell_std,
            "num_clot": int(clot.size), "num_shell": int(shell.size)}


# --- 2.5D LPIPS-style distance: patching/metrics/lpips.py, re-exported here ----------------------------------

from patching.metrics.lpips import FeatureNet, load_feature_net, lpips25d  # noqa: E402,F401

# --- summaries -----------------------------------------------------------------------------------


def bootstrap_ci(values, num: int = 1000, alpha: float = 0.05, seed: int = 0) -> tuple[float, float, float]:
    """Mean and percentile-bootstrap ``1 - alpha`` confidence interval: ``(mean, lo, hi)``.

    ``num`` resamples of the values with replacement (a seeded ``numpy`` generator, no global
    state); ``lo``/``hi`` are the ``alpha/2`` and ``1 - alpha/2`` quantiles of the resampled means.
    Values must be finite (an ``inf`` PSNR from identical volumes is refused, not averaged).
    """
    x = np.asarray([float(v) for v in np.ravel(np.asarray(values, dtype=object))], dtype=np.float64)
    if x.size == 0:
        raise InputError("values", "needs at least one value")
    if not np.isfinite(x).all():
        raise InputError("values", f"{int((~np.isfinite(x)).sum())} of {x.size} values are NaN or infinite")
    if isinstance(num, bool) or int(num) != num or num < 1:
        raise InputError("num", f"needs a positive number of resamples, got {num!r}")
    if not 0 < float(alpha) < 1:
        raise InputError("alpha", f"needs 0 < alpha < 1, got {alpha!r}")
    rng = np.random.default_rng(int(seed))
    means = np.empty(int(num))
    step = max(1, (1 << 22) // x.size)
    for i in range(0, int(num), step):
        k = min(int(num), i + step) - i
        means[i:i + k] = x[rng.integers(0, x.size, size=(k, x.size))].mean(axis=1)
    lo, hi = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return float(x.mean()), float(lo), float(hi)
