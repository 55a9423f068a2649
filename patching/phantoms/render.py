"""Rasterising the chest phantom: a float32 HU canvas painted block by block.

Every structure is an approximate signed distance ``sd`` in millimetres (positive inside),
evaluated only on voxels of its bounding box and there in cache-sized blocks, with coordinates
passed as broadcastable axis vectors ``x (bx,1,1)``, ``y (1,by,1)``, ``z (1,1,bz)`` so that terms
depending on one or two axes stay small and only the final combinations touch every voxel.
Painting blends ``hu += alpha * (value - hu)`` with ``alpha`` a linear ramp of one voxel across
the boundary (antialiasing; the scanner blur comes later in :mod:`patching.phantoms.chest`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np

BLOCK_VOXELS = 1 << 16  # ~256 KiB of float32 per temporary: keeps the elementwise work in cache
# Tubes whose box has fewer voxels are painted together, vectorised over all their voxels: for
# them the ~30 numpy calls of a per-tube box would cost more than the arithmetic.
SMALL_BOX_VOXELS = 1024
BLOCK_Z, BLOCK_Y = 128, 32  # compact blocks: more of them lie wholly inside or outside a shape

Block = tuple[tuple[slice, slice, slice], np.ndarray, np.ndarray, np.ndarray]


class Canvas:
    """The voxel grid, the HU being painted and (optionally) a tissue label map.

    World coordinates are RAS+ millimetres with the volume centre at ``center_mm`` (the grid of
    :func:`patching.data.spec.centred_affine` shifted by ``center_mm``).
    """

    def __init__(self, shape, spacing_mm, center_mm=(0.0, 0.0, 0.0), *, with_labels: bool,
                 background_hu: float = -1000.0):
        self.shape = tuple(int(n) for n in shape)
        self.spacing = tuple(float(s) for s in spacing_mm)
        self.axes = [((np.arange(n) - (n - 1) / 2.0) * s + c).astype(np.float32)  # world mm
                     for n, s, c in zip(self.shape, self.spacing, center_mm, strict=True)]
        self.hu = np.full(self.shape, background_hu, dtype=np.float32)
        self.labels = np.zeros(self.shape, dtype=np.uint8) if with_labels else None
        # Antialiasing ramp width: one (mean) voxel.
        self.width = float(np.mean(self.spacing))
        self._inv_w = np.float32(1.0 / self.width)
        self._x = self.axes[0][:, None, None]
        self._y = self.axes[1][None, :, None]
        self._z = self.axes[2][None, None, :]

    # ---------------------------------------------------------------- iteration over boxes
    def index_range(self, axis: int, lo: float, hi: float) -> tuple[int, int]:
        """Voxel index range ``[i0, i1)`` of the centres inside ``[lo, hi]`` mm along ``axis``."""
        a0, s, n = float(self.axes[axis][0]), self.spacing[axis], self.shape[axis]
        i0 = max(0, math.ceil((lo - a0) / s))
        i1 = min(n, math.floor((hi - a0) / s) + 1)
        return i0, i1

    def blocks(self, lo, hi) -> Iterator[Block]:
        """Yield ``(slices, x, y, z)`` blocks covering the box ``[lo, hi]`` (mm, per axis)."""
        (x0, x1), (y0, y1), (z0, z1) = (self.index_range(a, lo[a], hi[a]) for a in range(3))
        if x1 <= x0 or y1 <= y0 or z1 <= z0:
            return
        bz = min(z1 - z0, BLOCK_Z)
        by = min(y1 - y0, BLOCK_Y, max(1, BLOCK_VOXELS // bz))
        bx = min(x1 - x0, max(1, BLOCK_VOXELS // (by * bz)))
        for i in range(x0, x1, bx):
            si = slice(i, min(i + bx, x1))
            for j in range(y0, y1, by):
                sj = slice(j, min(j + by, y1))
                for k in range(z0, z1, bz):
                    sk = slice(k, min(k + bz, z1))
                    yield (si, sj, sk), self._x[si], self._y[:, sj], self._z[:, :, sk]

    # ---------------------------------------------------------------- painting
    def paint(self, sl, sd: np.ndarray, value, label: int, gain: float = 1.0) -> None:
        """Blend ``value`` into the block ``sl`` with coverage ramp(sd) * gain."""
        half = 0.5 * self.width
        if sd.max() <= -half:
            return  # the block lies outside the structure
        view = self.hu[sl]
        if gain >= 1.0 and sd.min() >= half:  # fully inside: plain assignment
            view[...] = value
            if self.labels is not None:
                self.labels[sl] = label
            return
        a = sd * self._inv_w
        a += 0.5
        _clip01(a)
        if gain < 1.0:
            a *= np.float32(gain)
        t = np.subtract(value, view, dtype=np.float32)
        t *= a
        view += t
        if self.labels is not None:
            self.labels[sl][a > 0.5] = label


def _clip01(a: np.ndarray) -> np.ndarray:
    """In-place clip to [0, 1] (the ufuncs directly: np.clip's wrapper costs ~10 µs a call)."""
    np.maximum(a, 0.0, out=a)
    return np.minimum(a, 1.0, out=a)


def ramp(sd: np.ndarray, width: float) -> np.ndarray:
    """Coverage in [0, 1] of a boundary at sd = 0 with a linear ramp ``width`` mm wide."""
    a = sd * np.float32(1.0 / width)
    a += 0.5
    return _clip01(a)


# -------------------------------------------------------------------- primitives
def ellipsoid_sd(x, y, z, center, semi, rot=None):
    """Approximate signed distance (mm, + inside) to an ellipsoid, possibly rotated.

    ``rot`` (3×3) maps world offsets to the ellipsoid's frame (rows are its axes).
    """
    # Python floats, not numpy float64 scalars, so that float32 blocks stay float32.
    center, semi = [float(c) for c in center], [float(s) for s in semi]
    px, py, pz = x - center[0], y - center[1], z - center[2]
    if rot is None:
        q = (px * (1.0 / semi[0])) ** 2 + (py * (1.0 / semi[1])) ** 2
        q = q + (pz * (1.0 / semi[2])) ** 2
    else:
        q = None
        for i in range(3):
            u = (px * float(rot[i, 0]) + py * float(rot[i, 1])) + pz * float(rot[i, 2])
            u *= 1.0 / semi[i]
            u = u * u
            q = u if q is None else q + u
    rho = np.sqrt(q)
    return (1.0 - rho) * min(semi)


def paint_ellipsoid(cv: Canvas, center, semi, value, label, *, rot=None, clip=None) -> None:
    """Paint an ellipsoid; ``clip(x, y, z)`` gives another sd to intersect with."""
    r = max(semi) + cv.width
    lo = [c - r for c in center]
    hi = [c + r for c in center]
    for sl, x, y, z in cv.blocks(lo, hi):
        sd = ellipsoid_sd(x, y, z, center, semi, rot)
        if clip is not None:
            sd = np.minimum(sd, clip(x, y, z))
        cv.paint(sl, sd, value, label)


def segment_sd(x, y, z, p0, p1, r0, r1):
    """Signed distance (mm) to a capsule / truncated cone from ``p0`` (radius r0) to ``p1``."""
    x0, y0, z0 = float(p0[0]), float(p0[1]), float(p0[2])  # Python floats keep blocks float32
    dx, dy, dz = float(p1[0]) - x0, float(p1[1]) - y0, float(p1[2]) - z0
    r0, r1 = float(r0), float(r1)
    l2 = max(dx * dx + dy * dy + dz * dz, 1e-12)
    px, py, pz = x - x0, y - y0, z - z0
    s = (px * dx + py * dy) + pz * dz  # (p - p0)·d, full block
    t = s * (1.0 / l2)
    _clip01(t)
    pp = (px * px + py * py) + pz * pz  # |p - p0|²
    # |p - p0 - t d|² = |p - p0|² + t (t |d|² - 2 s)
    u = t * l2
    u -= s
    u -= s
    u *= t
    u += pp
    np.maximum(u, 0.0, out=u)
    d = np.sqrt(u, out=u)
    if r0 == r1:
        return np.subtract(r0, d, out=d)
    rt = t * (r1 - r0)
    rt += r0
    rt -= d
    return rt


def split_segments(segs: np.ndarray, max_len_factor: float = 3.0, min_len: float = 12.0):
    """Split long segments (rows ``x0 y0 z0 x1 y1 z1 r0 r1``) so bounding boxes stay tight."""
    segs = np.asarray(segs, dtype=np.float64)[:, :8]
    if len(segs) == 0:
        return segs
    length = np.linalg.norm(segs[:, 3:6] - segs[:, :3], axis=1)
    limit = np.maximum(min_len, max_len_factor * segs[:, 6:8].max(axis=1))
    n = np.maximum(1, np.ceil(length / limit)).astype(int)
    if (n == 1).all():
        return segs
    rows = np.repeat(segs, n, axis=0)
    k = np.arange(len(rows)) - np.repeat(np.cumsum(n) - n, n)  # piece index within its segment
    nn = np.repeat(n, n)
    a, b = (k / nn)[:, None], ((k + 1) / nn)[:, None]
    p0, p1, r = rows[:, :3], rows[:, 3:6], rows[:, 6:8]
    return np.hstack([p0 + a * (p1 - p0), p0 + b * (p1 - p0),
                      r[:, :1] + a * (r[:, 1:] - r[:, :1]), r[:, :1] + b * (r[:, 1:] - r[:, :1])])


def paint_tubes(cv: Canvas, segs: np.ndarray, value, label, *, grow: float = 0.0,
                min_radius_vox: float = 0.1) -> None:
    """Paint tubes (segment rows ``x0 y0 z0 x1 y1 z1 r0 r1``), radii enlarged by ``grow`` mm.

    Tubes thinner than a voxel are painted with reduced contrast (their partial volume), and
    those under ``min_radius_vox`` voxels are skipped: they would not change the image.
    """
    w = cv.width
    segs = split_segments(segs)
    if len(segs) == 0:
        return
    p0, p1 = segs[:, :3], segs[:, 3:6]
    r0, r1 = segs[:, 6] + grow, segs[:, 7] + grow
    rmax = np.maximum(r0, r1)
    m = (rmax + w)[:, None]
    lo = np.minimum(p0, p1) - m
    hi = np.maximum(p0, p1) + m
    # Voxel index boxes for all segments at once.
    origin = np.array([a[0] for a in cv.axes], np.float64)
    sp = np.array(cv.spacing)
    i0 = np.maximum(0, np.ceil((lo - origin) / sp)).astype(int)
    i1 = np.minimum(cv.shape, np.floor((hi - origin) / sp) + 1).astype(int)
    keep = (i1 > i0).all(axis=1) & (rmax >= min_radius_vox * w)
    gains = np.minimum(1.0, (2.0 * rmax / w) ** 2)
    small = keep & ((i1 - i0).prod(axis=1) <= SMALL_BOX_VOXELS)
    if small.any():
        _paint_small_tubes(cv, p0[small], p1[small], r0[small], r1[small], gains[small],
                           i0[small], i1[small], value, label)
    for k in np.flatnonzero(keep & ~small):
        a, b = i0[k], i1[k]
        args = (p0[k], p1[k], float(r0[k]), float(r1[k]))
        if (b - a).prod() <= 4 * BLOCK_VOXELS:  # the common case: one block, no generator
            sl = (slice(a[0], b[0]), slice(a[1], b[1]), slice(a[2], b[2]))
            x, y, z = cv._x[sl[0]], cv._y[:, sl[1]], cv._z[:, :, sl[2]]
            cv.paint(sl, segment_sd(x, y, z, *args), value, label, gains[k])
        else:
            for sl, x, y, z in cv.blocks(lo[k], hi[k]):
                cv.paint(sl, segment_sd(x, y, z, *args), value, label, gains[k])


def _paint_small_tubes(cv: Canvas, p0, p1, r0, r1, gain, i0, i1, value: float, label: int,
                       max_elems: int = 1 << 21) -> None:
    """Paint many small tubes at once: every voxel of every box in one flat array; a voxel
    covered by several tubes gets the largest coverage (their union)."""
    dims = i1 - i0
    sizes = dims.prod(axis=1)
    ends = np.cumsum(sizes)
    first = 0
    hu = cv.hu.reshape(-1)
    labels = None if cv.labels is None else cv.labels.reshape(-1)
    ny, nz = cv.shape[1], cv.shape[2]
    inv_w = 1.0 / cv.width
    while first < len(sizes):
        base = ends[first - 1] if first else 0
        last = max(first + 1, int(np.searchsorted(ends, base + max_elems, side="right")))
        sl = slice(first, last)
        first = last
        n_each = sizes[sl]
        seg = np.repeat(np.arange(len(n_each)), n_each)
        local = np.arange(len(seg)) - np.repeat(np.cumsum(n_each) - n_each, n_each)
        d = dims[sl][seg]
        c = local % d[:, 2]
        t = local // d[:, 2]
        ix = i0[sl][seg, 0] + t // d[:, 1]
        iy = i0[sl][seg, 1] + t % d[:, 1]
        iz = i0[sl][seg, 2] + c
        a0, b0 = p0[sl].astype(np.float32), (p1[sl] - p0[sl]).astype(np.float32)
        px = cv.axes[0][ix] - a0[seg, 0]
        py = cv.axes[1][iy] - a0[seg, 1]
        pz = cv.axes[2][iz] - a0[seg, 2]
        dx, dy, dz = b0[seg, 0], b0[seg, 1], b0[seg, 2]
        l2 = np.maximum(np.einsum("ij,ij->i", b0, b0), 1e-12)[seg]
        tt = _clip01((px * dx + py * dy + pz * dz) / l2)
        px -= tt * dx
        py -= tt * dy
        pz -= tt * dz
        dist = np.sqrt(px * px + py * py + pz * pz)
        ra, rb = r0[sl].astype(np.float32), r1[sl].astype(np.float32)
        alpha = ra[seg] + (rb - ra)[seg] * tt - dist
        alpha *= np.float32(inv_w)
        alpha += 0.5
        _clip01(alpha)
        alpha *= gain[sl].astype(np.float32)[seg]
        hit = alpha > 0
        if not hit.any():
            continue
        flat = (ix[hit] * ny + iy[hit]) * nz + iz[hit]
        alpha = alpha[hit]
        order = np.argsort(flat, kind="stable")
        flat, alpha = flat[order], alpha[order]
        starts = np.flatnonzero(np.r_[True, flat[1:] != flat[:-1]])
        amax = np.maximum.reduceat(alpha, starts)
        vox = flat[starts]
        cur = hu[vox]
        hu[vox] = cur + amax * (np.float32(value) - cur)
        if labels is not None:
            labels[vox[amax > 0.5]] = label


class SmoothNoise:
    """A smooth random field: Gaussian lattice noise every ``cell_mm``, blurred, trilinearly
    interpolated. Defined in world millimetres (independent of the voxel grid)."""

    def __init__(self, rng: np.random.Generator, *, cell_mm: float = 6.0, half_extent_mm=260.0):
        from scipy.ndimage import gaussian_filter

        n = int(2 * half_extent_mm / cell_mm) + 2
        lat = rng.standard_normal((n, n, n)).astype(np.float32)
        lat = gaussian_filter(lat, 1.0, mode="wrap")
        lat /= max(float(lat.std()), 1e-6)
        self.lattice = lat
        self.origin = -half_extent_mm
        self.cell = cell_mm

    def _axis(self, coords: np.ndarray):
        f = (np.asarray(coords, np.float64).ravel() - self.origin) / self.cell
        f = np.clip(f, 0, self.lattice.shape[0] - 1.001)
        i = np.floor(f).astype(np.intp)
        return i, (f - i).astype(np.float32)

    def __call__(self, x, y, z) -> np.ndarray:
        """Field on the grid ``x (bx,1,1), y (1,by,1), z (1,1,bz)`` → (bx, by, bz)."""
        (ix, wx), (iy, wy), (iz, wz) = self._axis(x), self._axis(y), self._axis(z)
        a, b = ix.min(), iy.min()
        c = iz.min()
        sub = self.lattice[a:ix.max() + 2, b:iy.max() + 2, c:iz.max() + 2]
        ix, iy, iz = ix - a, iy - b, iz - c
        t = sub[ix] * (1 - wx)[:, None, None] + sub[ix + 1] * wx[:, None, None]
        t = t[:, iy] * (1 - wy)[None, :, None] + t[:, iy + 1] * wy[None, :, None]
        return t[:, :, iz] * (1 - wz) + t[:, :, iz + 1] * wz
