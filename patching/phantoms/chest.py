"""Procedural chest CTPA phantoms: the embedded default dataset and every test's data.

``synth_chest(shape, seed=...)`` draws a chest in millimetres (a torso whose rib cage and wall
change along z, raised arms, breasts in some phantoms; lungs with airways and vessel trees;
contrast-filled pulmonary arteries; an egg-shaped heart with enhanced right-sided chambers;
aorta; vertebrae, ribs, sternum, clavicles, scapulae, humeri; liver, stomach, spleen under a
domed diaphragm), renders it on the requested grid, then applies scanner blur and noise. The
anatomy and its tests are described in docs/data.md.

Orientation: the array is indexed ``[x, y, z]`` in RAS+ (nibabel's ``as_closest_canonical``):
x increases towards the patient's RIGHT, y towards ANTERIOR, z towards SUPERIOR. The heart apex
and the descending aorta are therefore at negative x (patient's left), the liver dome at
positive x. The volume centre is world (0, 0, 0) unless ``center_mm`` says otherwise, matching
:func:`patching.data.spec.centred_affine`.

The anatomy depends only on the seed, not on the grid: the same seed at another shape or
field of view is the same patient. Three independent random streams are derived from the
seed (anatomy, emboli, noise), so ``emboli=True`` and ``emboli=False`` give the same patient
with and without clots, under the same noise.

Speed: structures are signed-distance functions evaluated only inside their bounding boxes, in
cache-sized blocks (see :mod:`patching.phantoms.render`); 512×512×604 takes under 30 s of CPU on
one core (``benchmarks/bench_phantom.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from patching.data.spec import centred_affine
from patching.errors import InputError
from patching.phantoms.anatomy import sample_chest
from patching.phantoms.paint import TISSUE_CLASSES, choose_emboli, paint_emboli, render_chest
from patching.phantoms.render import Canvas, SmoothNoise

__all__ = ["Phantom", "synth_chest", "TISSUE_CLASSES"]

HU_MIN, HU_MAX = -1024, 3071  # the stored int16 range (12-bit CT)


@dataclass
class Phantom:
    """One synthetic chest CTPA.

    Attributes:
        hu: int16 ``(X, Y, Z)`` Hounsfield units, RAS+ (x to the patient's right, y anterior,
            z superior).
        spacing_mm: voxel size along ``(x, y, z)``.
        embolus_mask: uint8 ``(X, Y, Z)``, 1 inside emboli; ``None`` without emboli.
        labels: plain JSON data: ``embolus``, ``num_emboli``, ``seed``, the emboli's positions
            and sizes, and the generation settings.
        tissue: uint8 ``(X, Y, Z)`` tissue classes (:data:`TISSUE_CLASSES`) when requested with
            ``return_labels=True``, else ``None``. Taken before blur and noise.
    """

    hu: np.ndarray
    spacing_mm: tuple[float, float, float]
    embolus_mask: np.ndarray | None
    labels: dict
    tissue: np.ndarray | None = None

    def affine(self, center_mm=(0.0, 0.0, 0.0)) -> np.ndarray:
        """4×4 RAS+ voxel-to-world affine (volume centre at ``center_mm``)."""
        aff = centred_affine(self.hu.shape, self.spacing_mm)
        aff[:3, 3] += np.asarray(center_mm, dtype=float)
        return aff


def _check_triple(name: str, value, *, positive: bool, integer: bool) -> tuple:
    try:
        items = tuple(value)
    except TypeError:
        raise InputError(name, f"needs three values, got {value!r}") from None
    if len(items) != 3:
        raise InputError(name, f"needs three values (x, y, z), got {len(items)}: {value!r}")
    out = []
    for v in items:
        if integer:
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or (positive and v < 1):
                raise InputError(name, f"needs three positive integers, got {value!r}")
            out.append(int(v))
        else:
            try:
                f = float(v)
            except (TypeError, ValueError):
                raise InputError(name, f"needs three numbers, got {value!r}") from None
            if not np.isfinite(f) or (positive and f <= 0):
                raise InputError(name, f"needs three positive finite numbers, got {value!r}")
            out.append(f)
    return tuple(out)


def _nonneg(name: str, value) -> float:
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise InputError(name, f"needs a number, got {value!r}") from None
    if not np.isfinite(f) or f < 0:
        raise InputError(name, f"needs a finite number >= 0, got {value!r}")
    return f


def synth_chest(shape=(64, 64, 64), *, seed: int, emboli: bool = False,
                fov_mm=(360.0, 360.0, 360.0), noise_hu: float = 12.0, blur_mm: float = 1.0,
                center_mm=(0.0, 0.0, 0.0), return_labels: bool = False) -> Phantom:
    """Synthesise one chest CTPA phantom.

    Args:
        shape: voxels along ``(x, y, z)``; any positive sizes.
        seed: non-negative integer; the same seed gives the same patient at any shape.
        emboli: place 1-3 pulmonary emboli (filling defects of 20-40 HU) in arterial branches.
        fov_mm: field of view along ``(x, y, z)``; spacing is ``fov_mm / shape``.
        noise_hu: standard deviation of the additive Gaussian noise (0 for none).
        blur_mm: sigma of the Gaussian scanner blur (0 for none).
        center_mm: world position of the volume centre (to zoom into a region).
        return_labels: also return the tissue label map (``Phantom.tissue``).

    Raises:
        InputError: a shape that is not three positive integers, a non-positive field of view,
            a negative seed, noise or blur.
    """
    shape = _check_triple("synth_chest.shape", shape, positive=True, integer=True)
    fov = _check_triple("synth_chest.fov_mm", fov_mm, positive=True, integer=False)
    center = _check_triple("synth_chest.center_mm", center_mm, positive=False, integer=False)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise InputError("synth_chest.seed", f"needs a non-negative integer, got {seed!r}")
    noise_hu = _nonneg("synth_chest.noise_hu", noise_hu)
    blur_mm = _nonneg("synth_chest.blur_mm", blur_mm)
    spacing = tuple(f / n for f, n in zip(fov, shape, strict=True))

    anat_ss, emb_ss, noise_ss = np.random.SeedSequence(int(seed)).spawn(3)
    anat_rng = np.random.default_rng(anat_ss)
    chest = sample_chest(anat_rng)
    texture = SmoothNoise(anat_rng)

    cv = Canvas(shape, spacing, center, with_labels=return_labels)
    render_chest(cv, chest, texture)
    mask, clots = None, []
    if emboli:
        clots = choose_emboli(chest, np.random.default_rng(emb_ss), max(spacing))
        mask = paint_emboli(cv, clots, chest.hu["embolus"])
        # A clot too small to cover one voxel centre (only on very coarse grids) is not reported.
        clots = [c for c in clots if c["voxels"] > 0]
        if not clots:
            mask = None
    hu = _finish(cv.hu, spacing, blur_mm, noise_hu, np.random.default_rng(noise_ss))

    labels = {
        "embolus": bool(clots), "num_emboli": len(clots), "seed": int(seed),
        "emboli": [{"vessel": c["vessel"],
                    "center_mm": [round(float(v), 2) for v in c["center_mm"]],
                    "radius_mm": round(float(c["radius_mm"]), 2),
                    "length_mm": round(float(c["length_mm"]), 2), "voxels": int(c["voxels"])}
                   for c in clots],
        "generator": "patching.phantoms.chest", "orientation": "RAS+",
        "shape": list(shape), "spacing_mm": [float(s) for s in spacing],
        "fov_mm": list(fov), "center_mm": list(center), "noise_hu": noise_hu, "blur_mm": blur_mm,
        "anatomy": {
            "body_width_mm": round(2 * chest.a, 1),
            "body_depth_mm": round(chest.y_front - chest.back_y, 1),
            "breasts": bool(chest.breasts),
            "heart_center_mm": [round(float(v), 1) for v in chest.heart_center],
            "carina_z_mm": round(chest.z_car, 1), "right_dome_z_mm": round(chest.z_dome_r, 1),
            "contrast_pa_hu": round(chest.hu["pulmonary_artery"], 1),
            "contrast_aorta_hu": round(chest.hu["aorta"], 1),
        },
    }
    return Phantom(hu=hu, spacing_mm=spacing, embolus_mask=mask, labels=labels, tissue=cv.labels)


def _finish(hu: np.ndarray, spacing, blur_mm: float, noise_hu: float,
            rng: np.random.Generator) -> np.ndarray:
    """Scanner blur, noise, rounding to int16 — in place on the float canvas, chunked in x."""
    if blur_mm > 0:
        from scipy.ndimage import gaussian_filter

        sigma = [blur_mm / s for s in spacing]
        gaussian_filter(hu, sigma, output=hu, mode="nearest", truncate=3.0)
    out = np.empty(hu.shape, dtype=np.int16)
    table = _normal_table(noise_hu) if noise_hu > 0 else None
    step = max(1, (1 << 20) // max(1, hu.shape[1] * hu.shape[2]))
    for i in range(0, hu.shape[0], step):
        chunk = hu[i:i + step]
        if table is not None:
            # Gaussian noise by inverse-CDF lookup of 16-bit uniforms: ~4x faster than
            # standard_normal, exact to 1/65536 in probability.
            chunk += table[rng.integers(0, 1 << 16, size=chunk.shape, dtype=np.uint16)]
        np.clip(chunk, HU_MIN, HU_MAX, out=chunk)
        np.rint(chunk, out=chunk)
        out[i:i + step] = chunk
    return out


def _normal_table(sigma: float) -> np.ndarray:
    from scipy.special import ndtri

    return (ndtri((np.arange(1 << 16) + 0.5) / (1 << 16)) * sigma).astype(np.float32)
