"""Digitally reconstructed radiographs (DRRs): a differentiable, batched torch projector.

Conventions (docs/architecture.md, "Conventions"):

- Volumes are indexed ``[x, y, z]`` in RAS+ (``nibabel.as_closest_canonical``): index ``x`` grows
  towards the patient's **Right**, ``y`` towards **Anterior**, ``z`` towards **Superior**. Models
  hand volumes over as ``B×C×X×Y×Z``. World coordinates here are mm with the origin at the
  volume centre (the isocentre), as in :func:`patching.data.spec.centred_affine`.
- Images are ``[row, col]`` as a radiologist reads them; row 0 is superior in every view.
  Every view is the picture seen from behind the detector looking back at the source, which
  gives the reading conventions: ``pa`` (beam posterior→anterior, source behind the patient):
  patient's right on the image left; ``lateral`` (beam right→left, source on the patient's
  right): anterior on the image left; ``ap`` (beam anterior→posterior): the left-right mirror of
  ``pa`` for a parallel beam, i.e. patient's right on the image *right* (a clinical viewer
  flips AP films to the PA orientation; do that with ``img.flip(-1)`` if wanted).

Method: cone-beam (and parallel-beam) line integrals by Joseph's method. Because the beam's main
axis is fixed per view (the default chest geometry's rays are within 10° of it; the method wants
them within 45°), every ray crosses every slice perpendicular to that axis exactly once; we sample each slice bilinearly where the ray
crosses it (one ``grid_sample`` over all slices of a chunk of detector rows) and weight the sum
by the ray's path length per slice, ``spacing_beam × |ray| / |ray · beam|``. The step is thus
one voxel along the beam axis, and the samples are the trilinear interpolant of the volume at the
crossing points. Everything is torch, so it is differentiable w.r.t. the volume and runs on the
volume's device. :func:`raymarch_line_integrals` is a slow, independent reference (every ray
marched at a fixed step through the trilinear interpolant with a 3D ``grid_sample``).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor

from patching.errors import InputError

MU_WATER_PER_MM = 0.0206  # linear attenuation of water at ~70 keV effective energy, 1/mm
DEFAULT_INTEGRAL_SCALE = 4.0  # line integral that maps to 1 - 1/e; see integrals_to_image
DEFAULT_CHUNK_RAYS = 16384  # rays per chunk (whole detector rows): ~50 MB of float32 at 256 slices, B=1
VIEWS = ("pa", "ap", "lateral")


@dataclass(frozen=True)
class _ViewAxes:
    beam_dim: int  # spatial axis (0 = x, 1 = y) the beam travels along
    beam_sign: int  # +1: the beam travels towards increasing index along beam_dim
    col_dim: int  # spatial axis that runs along the detector's columns
    col_sign: int  # +1: increasing column index = increasing index along col_dim
    # Rows always run along z, superior (high z) at row 0.


# RAS+: +x = patient's right, +y = anterior, +z = superior.
_VIEW_AXES = {
    "pa": _ViewAxes(beam_dim=1, beam_sign=+1, col_dim=0, col_sign=-1),  # P->A; right on the left
    "ap": _ViewAxes(beam_dim=1, beam_sign=-1, col_dim=0, col_sign=+1),  # A->P; mirror of PA
    "lateral": _ViewAxes(beam_dim=0, beam_sign=-1, col_dim=1, col_sign=-1),  # R->L; anterior on the left
}


@dataclass(frozen=True)
class DRRGeometry:
    """Detector and source placement of a chest radiograph.

    Args:
        sdd_mm: source-to-detector distance (a chest stand: 1800 mm).
        sid_mm: source-to-isocentre distance, the isocentre being the volume centre. The chest
            is against the detector and the patient's centre ~150 mm in front of it, hence
            ``1800 - 150 = 1650`` (magnification 1.09 at the centre).
        height, width: detector pixels (rows, columns).
        pixel_mm: detector pixel pitch; the default is a 430 mm detector over 256 pixels.
        delx_mm, dely_mm: column (horizontal) and row (vertical) pitch when they differ;
            ``None`` means ``pixel_mm``.
        parallel: rays parallel to the beam axis through each pixel centre (no source; the
            distances are then unused and pixels map 1:1 to mm at the isocentre).
    """

    sdd_mm: float = 1800.0
    sid_mm: float = 1650.0
    height: int = 256
    width: int = 256
    pixel_mm: float = 430.0 / 256
    delx_mm: float | None = None
    dely_mm: float | None = None
    parallel: bool = False

    def __post_init__(self) -> None:
        for name in ("sdd_mm", "sid_mm", "pixel_mm", "delx_mm", "dely_mm"):
            value = getattr(self, name)
            if value is None and name in ("delx_mm", "dely_mm"):
                continue
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value <= 0:
                raise InputError(f"geometry.{name}", f"needs a positive distance in mm, got {value!r}")
            object.__setattr__(self, name, float(value))
        if not self.sdd_mm > self.sid_mm:
            raise InputError("geometry.sdd_mm", f"must exceed sid_mm (the isocentre lies between source and "
                             f"detector), got sdd {self.sdd_mm} <= sid {self.sid_mm}")
        for name in ("height", "width"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or int(value) != value or value < 1:
                raise InputError(f"geometry.{name}", f"needs a positive number of pixels, got {value!r}")
            object.__setattr__(self, name, int(value))
        object.__setattr__(self, "parallel", bool(self.parallel))

    @property
    def col_mm(self) -> float:
        """Column pitch (detector x), mm."""
        return self.pixel_mm if self.delx_mm is None else self.delx_mm

    @property
    def row_mm(self) -> float:
        """Row pitch (detector y), mm."""
        return self.pixel_mm if self.dely_mm is None else self.dely_mm

    @property
    def magnification(self) -> float:
        """Magnification at the isocentre (1 for a parallel beam)."""
        return 1.0 if self.parallel else self.sdd_mm / self.sid_mm


DETECTOR_MM = 430.0  # the chest detector's width: DRRGeometry's default pitch is this over 256 pixels


def chest_geometry(height: int, width: int) -> DRRGeometry:
    """The default chest geometry with its 430 mm detector spread over ``height × width`` pixels:
    what ``xray2ct data synth`` renders with, and what an X-ray's size alone implies."""
    return DRRGeometry(height=int(height), width=int(width), pixel_mm=DETECTOR_MM / int(width))


def hu_to_mu(hu: Tensor, mu_water: float = MU_WATER_PER_MM, bone_threshold_hu: float | None = None,
             bone_boost: float = 1.0) -> Tensor:
    """Linear attenuation (1/mm) from HU: ``mu_water * (1 + HU/1000)``, clipped at 0.

    With ``bone_threshold_hu`` set, the slope above the threshold is multiplied by ``bone_boost``
    (continuous in HU, so no jump in the image or the gradient), mimicking bone's stronger
    photo-electric absorption at diagnostic energies. Integer input is promoted to float32.
    """
    _check_attenuation(mu_water, bone_boost)
    k = mu_water / 1000.0
    # A fresh tensor, then in place: on a 256×256×302 volume each allocating pass costs ~2× an
    # in-place one (first-touch page faults).
    mu = hu * k if hu.is_floating_point() else hu.to(torch.float32).mul_(k)
    mu.add_(mu_water).relu_()
    if bone_threshold_hu is not None and bone_boost != 1.0:
        mu = mu + ((bone_boost - 1.0) * k) * torch.relu(hu - bone_threshold_hu)
    return mu


def _mu_in_water_milli(hu: Tensor, bone_threshold_hu: float | None, bone_boost: float) -> Tensor:
    """:func:`hu_to_mu` divided by ``mu_water / 1000``: one pass fewer; the factor goes on the image."""
    x = hu + 1000.0 if hu.is_floating_point() else hu.to(torch.float32).add_(1000.0)
    x.relu_()
    if bone_threshold_hu is not None and bone_boost != 1.0:
        x = x + (bone_boost - 1.0) * torch.relu(hu - bone_threshold_hu)
    return x


def integrals_to_image(integrals: Tensor, integral_scale: float = DEFAULT_INTEGRAL_SCALE) -> Tensor:
    """Map line integrals of mu to a bone-bright image in [0, 1): ``1 - exp(-integral / scale)``.

    ``exp(-integral)`` is the transmitted fraction (Beer-Lambert), so ``scale = 1`` is the
    physical absorbed fraction; the default 4 widens the contrast of chest integrals (lungs ~2,
    mediastinum and spine ~6-10 in PA) that would otherwise crowd near 1. The map is fixed (the
    same for every volume, so images are comparable), smooth and monotone.
    """
    if not integral_scale > 0:
        raise InputError("integral_scale", f"needs a positive scale, got {integral_scale}")
    return -torch.expm1(-integrals / integral_scale)


def _view_axes(view: str) -> _ViewAxes:
    if view not in _VIEW_AXES:
        raise InputError("view", f"unknown view {view!r}; expected one of {', '.join(VIEWS)}")
    return _VIEW_AXES[view]


def _check_spacing(spacing_mm) -> tuple[float, float, float]:
    try:
        spacing = tuple(float(s) for s in spacing_mm)
    except (TypeError, ValueError):
        raise InputError("spacing_mm", f"needs three spacings in mm, got {spacing_mm!r}") from None
    if len(spacing) != 3 or any(not math.isfinite(s) or s <= 0 for s in spacing):
        raise InputError("spacing_mm", f"needs three positive spacings in mm, got {spacing_mm!r}")
    return spacing  # type: ignore[return-value]


def _check_volume(volume: Tensor, need_float: bool) -> None:
    if not isinstance(volume, Tensor) or volume.dim() != 5 or volume.shape[1] != 1:
        shape = tuple(volume.shape) if isinstance(volume, Tensor) else type(volume).__name__
        raise InputError("volume", f"needs a B×1×X×Y×Z tensor, got {shape}")
    if min(volume.shape[2:]) < 2:
        raise InputError("volume", f"needs at least 2 voxels along each axis, got {tuple(volume.shape[2:])}")
    if need_float and not volume.is_floating_point():
        raise InputError("volume", f"needs a floating-point tensor (or a to_mu map), got {volume.dtype}")


def _check_attenuation(mu_water: float, bone_boost: float) -> None:
    if not mu_water > 0:
        raise InputError("mu_water", f"needs a positive attenuation, got {mu_water}")
    if not bone_boost >= 0:
        raise InputError("bone_boost", f"needs a factor >= 0, got {bone_boost}")


def _detector_offsets(geometry: DRRGeometry) -> tuple[Tensor, Tensor]:
    """Pixel-centre offsets from the detector centre, mm, float64: (v over rows, u over columns)."""
    v = (torch.arange(geometry.height, dtype=torch.float64) - (geometry.height - 1) / 2) * geometry.row_mm
    u = (torch.arange(geometry.width, dtype=torch.float64) - (geometry.width - 1) / 2) * geometry.col_mm
    return v, u


def _z_band(z_index: Tensor, num_z: int) -> tuple[int, int] | None:
    """Voxels [lo, hi] (at least two) that bilinear samples at these z indices read; None if none."""
    z_min, z_max = float(z_index.min()), float(z_index.max())
    if z_max <= -1 or z_min >= num_z:
        return None
    lo = max(0, math.floor(z_min))
    hi = min(num_z - 1, math.floor(z_max) + 1)
    if hi == lo:
        lo, hi = (lo, lo + 1) if lo + 1 < num_z else (lo - 1, lo)
    return lo, hi


def line_integrals(mu: Tensor, spacing_mm, view: str = "pa", geometry: DRRGeometry = DRRGeometry(),
                   chunk_rays: int = DEFAULT_CHUNK_RAYS, to_mu: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """Line integrals of mu (1/mm) along the rays of each detector pixel, dimensionless.

    Args:
        mu: ``B×1×X×Y×Z`` attenuation, 1/mm (any float dtype, any device; gradients flow to it),
            or anything that ``to_mu`` maps to it (HU, in any dtype).
        spacing_mm: voxel size along ``(x, y, z)``.
        view: ``"pa"``, ``"ap"`` or ``"lateral"``.
        geometry: detector and source placement; ``geometry.parallel`` for a parallel beam.
        chunk_rays: rays per chunk, rounded down to whole detector rows (at least one row);
            memory per chunk is about ``num_slices × chunk_rays × (2 + B)`` elements plus the band
            of the volume that those rows see.
        to_mu: a pointwise map applied to each band of ``mu`` just before it is sampled (e.g.
            :func:`hu_to_mu`), so that a HU volume is never converted whole: no full-size float
            copy (633 MB for 512×512×604), and small allocations that the allocator reuses.

    Returns:
        ``B×H×W`` in image convention (row 0 superior, see the module docstring).
    """
    _check_volume(mu, need_float=to_mu is None)
    spacing = _check_spacing(spacing_mm)
    axes = _view_axes(view)
    if isinstance(chunk_rays, bool) or int(chunk_rays) != chunk_rays or chunk_rays < 1:
        raise InputError("chunk_rays", f"needs a positive number of rays, got {chunk_rays!r}")
    to_mu = to_mu or (lambda band: band)
    shape = mu.shape[2:]
    num_beam, num_col, num_z = shape[axes.beam_dim], shape[axes.col_dim], shape[2]
    beam_mm, col_mm, z_mm = spacing[axes.beam_dim], spacing[axes.col_dim], spacing[2]
    height, width = geometry.height, geometry.width
    v, u = _detector_offsets(geometry)  # (H,), (W,) mm

    # Slices across the beam, as a batch of 2D images with the volumes as channels; a view, no copy.
    slices = mu[:, 0].permute(axes.beam_dim + 1, 0, axes.col_dim + 1, 3)  # A B Col Z
    col_norm = 1.0 / ((num_col - 1) / 2 * col_mm)  # mm -> grid_sample's [-1, 1] (align_corners=True)

    if geometry.parallel:
        # Every slice is sampled at the same points, so sum first and resample once (exact: both linear).
        z_block = max(1, int(chunk_rays) // num_col)
        image = torch.cat([to_mu(slices[..., z0:z0 + z_block]).sum(0) for z0 in range(0, num_z, z_block)],
                          dim=-1)[None]  # 1 B Col Z
        grid = torch.empty(height, width, 2, dtype=torch.float64)
        grid[..., 0] = (-v / ((num_z - 1) / 2 * z_mm))[:, None]  # detector down = -z
        grid[..., 1] = (axes.col_sign * u * col_norm)[None, :]
        grid = grid.to(device=mu.device, dtype=image.dtype)[None]  # 1 H W 2
        out = F.grid_sample(image, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
        return out[0] * beam_mm  # B H W

    # Cone beam: slice a sits at distance t_a from the source along the central ray; the ray through
    # pixel (v, u) crosses it at (u, v) * t_a / sdd in the slice plane.
    centre = (torch.arange(num_beam, dtype=torch.float64) - (num_beam - 1) / 2) * beam_mm
    t = axes.beam_sign * centre + geometry.sid_mm  # A
    scale = t / geometry.sdd_mm
    grid_col = (axes.col_sign * col_norm) * scale[:, None] * u[None, :]  # A W
    grid_col[t <= 0] = 3.0  # slices behind the source: sample outside the volume (zero padding)
    z_index = (num_z - 1) / 2 - scale[:, None] * v[None, :] / z_mm  # A H, continuous voxel index
    # Path length per slice along each ray, mm: beam_mm * |ray| / |ray . beam|.
    step = beam_mm * torch.sqrt(geometry.sdd_mm**2 + v[:, None] ** 2 + u[None, :] ** 2) / geometry.sdd_mm

    rows_per_chunk = max(1, min(height, int(chunk_rays) // width))
    # Bands are found on the host copy of z_index (no device sync); grids are built on the device.
    coord_dtype = torch.float64 if mu.dtype == torch.float64 else torch.float32
    z_index_dev = z_index.to(device=mu.device, dtype=coord_dtype)
    grid_col = grid_col.to(device=mu.device, dtype=coord_dtype)
    buffer = None
    sums = []
    for r0 in range(0, height, rows_per_chunk):
        r1 = min(height, r0 + rows_per_chunk)
        band = _z_band(z_index[:, r0:r1], num_z)  # the rows of this chunk see only these z voxels
        if band is None:
            sums.append(None)
            continue
        lo, hi = band
        band_mu = to_mu(slices[..., lo:hi + 1])  # A B Col nz
        # grid_sample saves its grid for backward: reuse one buffer only when no graph is recorded.
        if buffer is None or (torch.is_grad_enabled() and band_mu.requires_grad):
            buffer = torch.empty(num_beam, rows_per_chunk, width, 2, device=band_mu.device, dtype=band_mu.dtype)
            buffer[..., 1] = grid_col[:, None, :]  # depends on (slice, column) only
        grid = buffer[:, : r1 - r0]  # A h W 2
        grid[..., 0] = ((z_index_dev[:, r0:r1] - lo) * (2.0 / (hi - lo)) - 1.0)[:, :, None]
        samples = F.grid_sample(band_mu, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
        sums.append(samples.sum(0))  # A B h W -> B h W
    dtype = next((s.dtype for s in sums if s is not None), mu.dtype if mu.is_floating_point()
                 else torch.get_default_dtype())
    sums = [torch.zeros(mu.shape[0], min(rows_per_chunk, height - i * rows_per_chunk), width,
                        device=mu.device, dtype=dtype) if s is None else s for i, s in enumerate(sums)]
    return torch.cat(sums, dim=1) * step.to(device=mu.device, dtype=dtype)  # B H W


def render_drr(hu, spacing_mm, view: str = "pa", geometry: DRRGeometry = DRRGeometry(), *,
               mu_water: float = MU_WATER_PER_MM, bone_threshold_hu: float | None = None,
               bone_boost: float = 1.0, integral_scale: float = DEFAULT_INTEGRAL_SCALE,
               chunk_rays: int = DEFAULT_CHUNK_RAYS) -> Tensor:
    """A DRR from a CT in HU: :func:`hu_to_mu`, :func:`line_integrals`, :func:`integrals_to_image`.

    Args:
        hu: ``X×Y×Z`` or ``B×1×X×Y×Z`` HU, a tensor (any device, differentiable) or a numpy array.
        spacing_mm, view, geometry, chunk_rays: as in :func:`line_integrals`.
        mu_water, bone_threshold_hu, bone_boost: as in :func:`hu_to_mu`.
        integral_scale: as in :func:`integrals_to_image`.

    Returns:
        ``H×W`` for an ``X×Y×Z`` input, else ``B×H×W``; float in [0, 1), bone bright.
    """
    if not isinstance(hu, Tensor):
        try:
            hu = torch.as_tensor(hu)
        except (TypeError, ValueError, RuntimeError) as err:
            raise InputError("volume", f"cannot read as an array: {err}") from None
    single = hu.dim() == 3
    if single:
        hu = hu[None, None]
    if hu.dim() != 5 or hu.shape[1] != 1:
        raise InputError("volume", f"needs an X×Y×Z or B×1×X×Y×Z volume, got shape {tuple(hu.shape)}")
    _check_attenuation(mu_water, bone_boost)
    # HU -> mu band by band inside the projector (no full-size float copy), in units of
    # mu_water / 1000 (one elementwise pass fewer); the factor is applied to the small image.
    to_mu = partial(_mu_in_water_milli, bone_threshold_hu=bone_threshold_hu, bone_boost=bone_boost)
    integrals = line_integrals(hu, spacing_mm, view, geometry, chunk_rays, to_mu=to_mu) * (mu_water / 1000.0)
    image = integrals_to_image(integrals, integral_scale)
    return image[0] if single else image


def parallel_projection(volume: Tensor, view: str, reduce: str = "mean",
                        size: tuple[int, int] | None = None) -> Tensor:
    """Cheap parallel projection for losses: reduce along the beam axis, in image convention.

    Args:
        volume: ``B×C×X×Y×Z`` (any values, e.g. a model's [-1, 1] output).
        view: ``"pa"``, ``"ap"`` or ``"lateral"``.
        reduce: ``"mean"`` (scale independent of the volume size) or ``"sum"``.
        size: ``(H, W)`` to resample to (bilinear); ``None`` keeps one pixel per voxel.

    Returns:
        ``B×C×Z×W'`` (``W'`` = X for pa/ap, Y for lateral) or ``B×C×H×W``. With ``reduce="sum"``,
        times the beam-axis spacing, it equals :func:`line_integrals` with a parallel geometry
        whose pixels match the voxels.
    """
    if not isinstance(volume, Tensor) or volume.dim() != 5:
        shape = tuple(volume.shape) if isinstance(volume, Tensor) else type(volume).__name__
        raise InputError("volume", f"needs a B×C×X×Y×Z tensor, got {shape}")
    axes = _view_axes(view)
    if reduce not in ("mean", "sum"):
        raise InputError("reduce", f"expected 'mean' or 'sum', got {reduce!r}")
    beam = 2 + axes.beam_dim
    image = volume.mean(beam) if reduce == "mean" else volume.sum(beam)  # B C Col Z
    image = image.transpose(-1, -2)  # B C Z Col
    flips = [-2] if axes.col_sign > 0 else [-2, -1]  # row 0 superior; column direction per view
    image = image.flip(flips)
    if size is not None:
        image = F.interpolate(image, size=tuple(size), mode="bilinear", align_corners=False)
    return image


def raymarch_line_integrals(mu: Tensor, spacing_mm, view: str = "pa", geometry: DRRGeometry = DRRGeometry(),
                            step_mm: float | None = None, chunk_rays: int = 2048) -> Tensor:
    """Reference projector: every ray marched at ``step_mm`` through the trilinear interpolant.

    Independent of :func:`line_integrals` (3D ``grid_sample`` at explicit 3D points, no slice
    decomposition), slow, for tests and benchmarks. ``step_mm`` defaults to half the smallest
    spacing. The ray is integrated across the whole volume, as in :func:`line_integrals`.
    """
    _check_volume(mu, need_float=True)
    spacing = _check_spacing(spacing_mm)
    axes = _view_axes(view)
    step_mm = 0.5 * min(spacing) if step_mm is None else float(step_mm)
    if not step_mm > 0:
        raise InputError("step_mm", f"needs a positive step, got {step_mm}")
    shape = mu.shape[2:]
    eye = torch.eye(3, dtype=torch.float64)
    beam = axes.beam_sign * eye[axes.beam_dim]
    col = axes.col_sign * eye[axes.col_dim]
    row = -eye[2]
    v, u = _detector_offsets(geometry)
    offsets = (v[:, None, None] * row + u[None, :, None] * col).reshape(-1, 3)  # (H W) 3, mm
    radius = 0.5 * math.sqrt(sum(((n - 1) * s) ** 2 for n, s in zip(shape, spacing, strict=True))) + max(spacing)
    if geometry.parallel:
        origins = offsets - radius * beam
        dirs = beam.expand_as(offsets)
    else:
        source = -geometry.sid_mm * beam
        rays = source + geometry.sdd_mm * beam + offsets - source
        dirs = rays / rays.norm(dim=1, keepdim=True)
        origins = source + ((-source * dirs).sum(1, keepdim=True) - radius).clamp(min=0) * dirs
    num_steps = int(math.ceil(2 * radius / step_mm))
    t = (torch.arange(num_steps, dtype=torch.float64) + 0.5) * step_mm  # midpoint rule
    norm = torch.tensor([1.0 / ((n - 1) / 2 * s) for n, s in zip(shape, spacing, strict=True)], dtype=torch.float64)
    out = []
    for i in range(0, offsets.shape[0], chunk_rays):
        pts = origins[i:i + chunk_rays, None] + t[None, :, None] * dirs[i:i + chunk_rays, None]  # r n 3
        grid = (pts * norm).flip(-1)  # grid_sample wants (z, y, x) for an (X, Y, Z) input
        grid = grid.to(device=mu.device, dtype=mu.dtype)[None, :, :, None].expand(mu.shape[0], -1, -1, -1, -1)
        samples = F.grid_sample(mu, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
        out.append(samples.sum(dim=(1, 3, 4)) * step_mm)  # B 1 r n 1 -> B r
    return torch.cat(out, dim=1).reshape(mu.shape[0], geometry.height, geometry.width)
