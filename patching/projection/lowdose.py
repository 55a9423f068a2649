"""Low-dose CT simulation with the physics of a scan: project, count photons, log, reconstruct.

Each axial slice (an ``x × y`` plane of a RAS+ ``[x, y, z]`` volume) goes through:

1. HU → linear attenuation ``μ = μ_water · (1 + HU / 1000)`` per mm (``μ_water`` = 0.0192 mm⁻¹,
   water at ≈70 keV, the effective energy of a 120 kVp beam), clipped at 0 (air);
2. parallel-beam forward projection ``p = ∫ μ dl`` (line integrals; :func:`radon`);
3. photon counts ``N ~ Poisson(I₀ · dose · e^{-p}) + Normal(0, σ_e²)`` (quantum noise plus the
   detector's electronic noise), clamped at ``min_count`` so the log exists;
4. ``p̃ = log(I₀ · dose / N)``;
5. filtered back-projection with the ramp filter (:func:`fbp`) of the *noise sinogram*
   ``p̃ − p``, → ``Δμ`` → ``ΔHU = 1000 · Δμ / μ_water``, added to the input.

Step 5 is exactly ``FBP(p̃) − FBP(p)`` (FBP is linear), i.e. the low-dose reconstruction minus
the noiseless one, added to the input: the input CT plays the full-dose *reconstruction*, as in
the AAPM Low Dose CT Grand Challenge, whose quarter-dose images were made by inserting noise
into the full-dose projections. Reconstructing ``p̃`` alone would also blur the input by a
second projection/back-projection on its own voxel grid, so input and output would differ by
more than the dose. ``dose = 1.0`` is the simulator's full dose (``I₀`` photons per ray);
``dose = 0.25`` is the challenge's quarter dose. While electronic noise is negligible against
the counts, the noise standard deviation scales as ``1/√dose`` (quarter dose ≈ 2× full dose;
tested).

Why the projector is written here (in torch) and not taken from ``skimage.transform``: the
algorithms are scikit-image's — ``radon`` rotates the zero-padded image by each angle
(bilinear, zeros outside) and sums the columns; ``iradon`` filters each projection with its
ramp filter (designed in the spatial domain, Kak & Slaney eq. 61) and back-projects with
linear interpolation — and the tests check both against scikit-image. But scikit-image warps
one angle at a time in Python: 32 s per 512² slice with 804 views on this machine, hours for a
604-slice CT. Batched ``grid_sample`` over angles and slices does the same arithmetic in one
call per chunk.

Randomness: slice ``z`` of a volume draws from ``SeedSequence([seed, z])``, so a volume's
low-dose version does not depend on how it is cut up; a training sample passes its own
generator.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange

from patching.errors import InputError

MU_WATER_PER_MM = 0.0192  # water at ~70 keV (NIST XCOM: 0.1929 cm^-1 at 70 keV)
QUARTER_DOSE = 0.25  # the AAPM Low Dose CT Grand Challenge's quarter dose
_CHUNK_SAMPLES = 1 << 24  # bilinear samples per grid_sample call (~64 MB of float32 output)


# --- HU <-> attenuation ---------------------------------------------------------------------------


def hu_to_mu(hu, mu_water: float = MU_WATER_PER_MM):
    """Linear attenuation per mm from HU, ``μ_water · (1 + HU/1000)``, clipped at 0 (torch or numpy)."""
    mu = mu_water * (1.0 + hu / 1000.0)
    return mu.clamp(min=0.0) if isinstance(mu, torch.Tensor) else np.clip(mu, 0.0, None)


def mu_to_hu(mu, mu_water: float = MU_WATER_PER_MM):
    """The inverse of :func:`hu_to_mu` (without the clip): ``1000 · (μ/μ_water − 1)``."""
    return 1000.0 * (mu / mu_water - 1.0)


# --- projector (scikit-image's algorithms, batched in torch) --------------------------------------


def default_angles(size: int) -> np.ndarray:
    """``ceil(π/2 · size)`` angles evenly over [0°, 180°): the views that sample a ``size``-wide
    slice without angular aliasing (an 804-view scanner for a 512² grid)."""
    return np.linspace(0.0, 180.0, max(2, math.ceil(math.pi / 2 * size)), endpoint=False)


def _padded(images: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Zero-pad ``B×N×N`` to the square that holds every rotation (scikit-image's ``circle=False``)."""
    n = images.shape[-1]
    diagonal = math.sqrt(2) * n
    pad = int(math.ceil(diagonal - n))
    before = (n + pad) // 2 - n // 2
    return F.pad(images, (before, pad - before, before, pad - before)), n + pad


def radon(images: torch.Tensor, angles_deg: Sequence[float]) -> torch.Tensor:
    """Parallel-beam projections of square images: ``B×N×N`` → sinograms ``B×A×D``.

    ``D = N + ceil(√2·N − N)`` detector bins of one pixel, ``A = len(angles_deg)``; equal to
    ``skimage.transform.radon(image, angles_deg, circle=False).T`` per image (float32
    rounding). Values are sums of pixel values along each ray (multiply by the pixel size in
    mm to get line integrals of a per-mm attenuation).
    """
    if images.dim() != 3 or images.shape[-1] != images.shape[-2]:
        raise InputError("radon", f"needs B×N×N square images, got {tuple(images.shape)}")
    padded, d = _padded(images.float())
    b = padded.shape[0]
    theta = torch.deg2rad(torch.as_tensor(np.asarray(angles_deg, dtype=np.float64)))
    # scikit-image's warp maps output pixel (col c, row r) to input (c', r') with
    # c' - m = cos·(c - m) + sin·(r - m),  r' - m = -sin·(c - m) + cos·(r - m),  m = d // 2;
    # in grid_sample's normalised coordinates (align_corners=True) m sits at u_m = 2m/(d-1) - 1.
    u_m = 2.0 * (d // 2) / (d - 1) - 1.0
    cos, sin = theta.cos(), theta.sin()
    affine = torch.stack([torch.stack([cos, sin, u_m * (1 - cos - sin)], -1),
                          torch.stack([-sin, cos, u_m * (1 + sin - cos)], -1)], 1).float()  # A×2×3
    out = padded.new_empty(b, len(theta), d)
    step = max(1, _CHUNK_SAMPLES // (b * d * d))
    for a0 in range(0, len(theta), step):
        k = min(step, len(theta) - a0)
        grid = F.affine_grid(affine[a0:a0 + k], [k, b, d, d], align_corners=True)  # A×D×D×2
        inputs = rearrange(padded, "b h w -> 1 b h w").expand(k, -1, -1, -1)
        rotated = F.grid_sample(inputs, grid, mode="bilinear", padding_mode="zeros", align_corners=True)  # A×B×D×D
        out[:, a0:a0 + k] = rearrange(rotated.sum(dim=2), "a b d -> b a d")  # sum over rows
    return out


def ramp_filter(size: int) -> torch.Tensor:
    """scikit-image's ramp filter in the Fourier domain (spatially designed, Kak & Slaney eq. 61)
    for projections zero-padded to ``size`` bins (even), float64."""
    n = np.concatenate((np.arange(1, size / 2 + 1, 2, dtype=int), np.arange(size / 2 - 1, 0, -2, dtype=int)))
    f = np.zeros(size)
    f[0] = 0.25
    f[1::2] = -1.0 / (np.pi * n) ** 2
    return torch.from_numpy(2.0 * np.real(np.fft.fft(f)))


def fbp(sinograms: torch.Tensor, angles_deg: Sequence[float], size: int) -> torch.Tensor:
    """Filtered back-projection: sinograms ``B×A×D`` (as :func:`radon` makes them) → ``B×size×size``.

    Equal to ``skimage.transform.iradon(sino.T, angles_deg, output_size=size, filter_name="ramp",
    circle=False)`` up to float32 rounding: projections padded to ``max(64, 2^⌈log2 2D⌉)`` bins,
    ramp-filtered by FFT, back-projected with linear interpolation (zero outside the detector),
    scaled by ``π / (2A)``.
    """
    if sinograms.dim() != 3 or sinograms.shape[1] != len(angles_deg):
        raise InputError("fbp", f"needs B×{len(angles_deg)}×D sinograms, got {tuple(sinograms.shape)}")
    b, a, d = sinograms.shape
    pad = max(64, int(2 ** math.ceil(math.log2(2 * d))))
    spectrum = torch.fft.fft(F.pad(sinograms.double(), (0, pad - d)), dim=-1) * ramp_filter(pad)
    filtered = torch.fft.ifft(spectrum, dim=-1).real[..., :d].float()  # B×A×D
    theta = torch.deg2rad(torch.as_tensor(np.asarray(angles_deg, dtype=np.float64)))
    # Pixel (row i, col j) of the output sits at t = (j - R)·cos - (i - R)·sin on the detector
    # (R = size // 2, scikit-image's ``ypr·cos - xpr·sin``), detector index t + d // 2. As
    # grid_sample coordinates of an output grid (u = col, v = row, both in [-1, 1]) this is affine.
    k = 2.0 / (d - 1)
    half, r = (size - 1) / 2.0, size // 2
    cos, sin = theta.cos(), theta.sin()
    gx = torch.stack([k * cos * half, -k * sin * half, k * (cos - sin) * (half - r) + k * (d // 2) - 1.0], -1)
    affine = torch.stack([gx, torch.zeros_like(gx)], 1).float()  # A×2×3; row 0 of the 1-row input
    out = filtered.new_zeros(b, size, size)
    step = max(1, _CHUNK_SAMPLES // (b * size * size))
    for a0 in range(0, a, step):
        n = min(step, a - a0)
        grid = F.affine_grid(affine[a0:a0 + n], [n, b, size, size], align_corners=True)  # A×N×N×2
        # past the last detector bin the ray contributes 0, as np.interp(left=0, right=0)
        grid[..., 0].masked_fill_(grid[..., 0].abs() > 1.0, 3.0)
        proj = rearrange(filtered[:, a0:a0 + n], "b a d -> a b 1 d")
        out += F.grid_sample(proj, grid, mode="bilinear", padding_mode="zeros", align_corners=True).sum(dim=0)
    return out * (math.pi / (2 * a))


# --- the simulator --------------------------------------------------------------------------------


@dataclass(frozen=True)
class LowDoseScanner:
    """The simulated scanner.

    Args:
        photons: incident photons per ray (detector bin and view) at full dose (``dose = 1``).
            1e5 is a usual full-dose value in low-dose simulation studies.
        electronic_std: standard deviation of the detector's electronic noise, in counts
            (√10: variance 10, a usual value in the same studies).
        min_count: counts are clamped at this before the log (a detector never reports ≤ 0).
        num_angles: views over 180°; ``None`` → :func:`default_angles` of the slice size.
        mu_water: attenuation of water per mm (the HU ↔ μ conversion).
    """

    photons: float = 1e5
    electronic_std: float = math.sqrt(10.0)
    min_count: float = 1.0
    num_angles: int | None = None
    mu_water: float = MU_WATER_PER_MM

    def __post_init__(self) -> None:
        for key in ("photons", "mu_water", "min_count"):
            value = getattr(self, key)
            if not (math.isfinite(value) and value > 0):
                raise InputError(f"scanner.{key}", f"must be a positive number, got {value!r}")
        if not (math.isfinite(self.electronic_std) and self.electronic_std >= 0):
            raise InputError("scanner.electronic_std", f"must be a number >= 0, got {self.electronic_std!r}")
        if self.num_angles is not None and self.num_angles < 2:
            raise InputError("scanner.num_angles", f"must be >= 2, got {self.num_angles!r}")

    def angles(self, size: int) -> np.ndarray:
        if self.num_angles is None:
            return default_angles(size)
        return np.linspace(0.0, 180.0, int(self.num_angles), endpoint=False)


def check_dose(dose: float, source: str = "--dose") -> float:
    try:
        d = float(dose)
    except (TypeError, ValueError):
        raise InputError(source, f"must be a number in (0, 1], got {dose!r}") from None
    if not (math.isfinite(d) and 0.0 < d <= 1.0):
        raise InputError(source, f"must be a dose fraction in (0, 1] (1 = the simulator's full dose), got {dose!r}")
    return d


def _square(hu: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int, int]]:
    """Pad ``B×X×Y`` to a square with air (the projector's input), and the pad to undo it."""
    x, y = hu.shape[-2:]
    n = max(x, y)
    pad = ((n - y) // 2, n - y - (n - y) // 2, (n - x) // 2, n - x - (n - x) // 2)
    return F.pad(hu, pad, value=-1000.0), pad


def scan(hu: torch.Tensor, pixel_mm: float, dose: float, generators: Sequence[np.random.Generator],
         scanner: LowDoseScanner = LowDoseScanner()) -> tuple[np.ndarray, torch.Tensor, torch.Tensor]:
    """Scan square HU slices ``B×N×N``: ``(angles, p, p̃)`` — the noiseless line integrals and the
    ones a ``dose`` scan measures (``log(I₀·dose / N)``), each ``B×A×D`` float64."""
    dose = check_dose(dose, "dose")
    if hu.dim() != 3 or len(generators) != hu.shape[0]:
        raise InputError("scan", f"needs B×N×N slices and B generators, got {tuple(hu.shape)}, {len(generators)}")
    angles = scanner.angles(hu.shape[-1])
    line = radon(hu_to_mu(hu.float(), scanner.mu_water), angles).double() * pixel_mm  # B×A×D, dimensionless
    mean = (scanner.photons * dose * torch.exp(-line)).numpy()
    counts = np.stack([g.poisson(m) + (g.normal(0.0, scanner.electronic_std, size=m.shape)
                                       if scanner.electronic_std > 0 else 0.0)
                       for g, m in zip(generators, mean, strict=True)])
    noisy = torch.log(scanner.photons * dose / torch.from_numpy(counts.astype(np.float64)).clamp_(min=scanner.min_count))
    return angles, line, noisy


def reconstruct_hu(sinograms: torch.Tensor, angles: np.ndarray, size: int, pixel_mm: float,
                   scanner: LowDoseScanner = LowDoseScanner()) -> torch.Tensor:
    """FBP of line integrals ``B×A×D`` → HU ``B×size×size`` (``μ = FBP / pixel_mm``, then HU)."""
    return mu_to_hu(fbp(sinograms.float(), angles, size) / pixel_mm, scanner.mu_water)


def noise_hu(hu: torch.Tensor, pixel_mm: float, dose: float, generators: Sequence[np.random.Generator],
             scanner: LowDoseScanner = LowDoseScanner()) -> torch.Tensor:
    """The reconstructed noise (HU) that a ``dose`` scan adds to each slice: ``B×X×Y`` → ``B×X×Y``.

    ``hu`` are axial slices (float, HU; non-square ones are padded with air for the projection);
    ``pixel_mm`` the in-plane voxel size (square pixels); ``generators`` one numpy generator per
    slice for its counts. ``hu + noise_hu(...)`` is the low-dose slice. The noise is
    ``FBP(p̃ − p)`` in HU, which is ``FBP(p̃) − FBP(p)``: the low-dose reconstruction minus the
    noiseless one.
    """
    if hu.dim() != 3:
        raise InputError("noise_hu", f"needs B×X×Y slices, got {tuple(hu.shape)}")
    square, (left, right, top, bottom) = _square(hu.float())
    n = square.shape[-1]
    angles, line, noisy = scan(square, pixel_mm, dose, generators, scanner)
    out = 1000.0 * fbp((noisy - line).float(), angles, n) / (pixel_mm * scanner.mu_water)
    return out[:, top:n - bottom, left:n - right]


def slice_generator(seed: int, z: int) -> np.random.Generator:
    """The generator of slice ``z`` of a volume simulated with ``seed``."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(z)]))


def simulate_volume(hu: np.ndarray, spacing_mm: Sequence[float], dose: float, *, seed: int = 0,
                    scanner: LowDoseScanner = LowDoseScanner(), slices_per_batch: int = 4,
                    progress: bool = False) -> np.ndarray:
    """The ``dose`` version of a RAS+ HU volume ``[x, y, z]`` (float32 HU, same shape).

    Slices are the ``x × y`` planes (axial); the in-plane pixel size is the mean of
    ``spacing_mm[0]`` and ``spacing_mm[1]`` (the projector has square pixels; a slightly
    anisotropic grid is treated as square). Slice ``z`` draws from :func:`slice_generator`.
    """
    dose = check_dose(dose)
    hu = np.asarray(hu)
    if hu.ndim != 3:
        raise InputError("volume", f"needs an X×Y×Z volume, got shape {hu.shape}")
    pixel = 0.5 * (float(spacing_mm[0]) + float(spacing_mm[1]))
    out = np.empty(hu.shape, dtype=np.float32)
    from tqdm.auto import tqdm

    starts = range(0, hu.shape[2], max(1, int(slices_per_batch)))
    for z0 in tqdm(starts, desc="low-dose slices", unit="batch", disable=not progress):
        z1 = min(z0 + max(1, int(slices_per_batch)), hu.shape[2])
        slab = rearrange(torch.from_numpy(np.ascontiguousarray(hu[:, :, z0:z1], dtype=np.float32)), "x y z -> z x y")
        gens = [slice_generator(seed, z) for z in range(z0, z1)]
        with torch.no_grad():
            noisy = slab + noise_hu(slab, pixel, dose, gens, scanner)
        out[:, :, z0:z1] = rearrange(noisy, "z x y -> x y z").numpy()
    return out
