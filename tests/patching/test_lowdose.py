"""The low-dose simulator: the projector against scikit-image, FBP inverts the projection, noise
std ∝ 1/√dose measured against the noiseless reconstruction, electronic noise, seeding."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from skimage.transform import iradon
from skimage.transform import radon as sk_radon

from patching.errors import InputError
from patching.projection.lowdose import (
    LowDoseScanner,
    check_dose,
    default_angles,
    fbp,
    hu_to_mu,
    mu_to_hu,
    noise_hu,
    radon,
    reconstruct_hu,
    scan,
    simulate_volume,
)


@pytest.mark.parametrize("n", [33, 48])
def test_projector_equals_scikit_image(n):
    img = np.random.default_rng(n).random((n, n))
    angles = default_angles(n)
    want = sk_radon(img, angles, circle=False).T  # A×D
    got = radon(torch.from_numpy(img)[None].float(), angles)[0].numpy()
    assert got.shape == want.shape and np.abs(got - want).max() < 1e-4 * np.abs(want).max()
    rec_want = iradon(want.T, angles, output_size=n, circle=False, filter_name="ramp")
    rec = fbp(torch.from_numpy(want)[None].float(), angles, n)[0].numpy()
    assert np.abs(rec - rec_want).max() < 1e-4


def disk(n: int, radius: float, hu: float = 0.0) -> torch.Tensor:
    yy, xx = np.mgrid[:n, :n] - (n - 1) / 2
    return torch.from_numpy(np.where(xx**2 + yy**2 < radius**2, hu, -1000.0).astype(np.float32))


def test_fbp_inverts_the_projection_and_hu_mu_round_trip():
    hu = disk(64, 24, 40.0)[None]
    angles = default_angles(64)
    line = radon(hu_to_mu(hu), angles) * 2.0  # 2 mm pixels
    rec = reconstruct_hu(line, angles, 64, 2.0)
    inner = (slice(None), slice(24, 40), slice(24, 40))
    assert abs(float(rec[inner].mean()) - 40.0) < 5.0 and float(rec[inner].std()) < 5.0
    x = torch.tensor([-1000.0, -500.0, 0.0, 1000.0])
    assert torch.allclose(mu_to_hu(hu_to_mu(x)), x) and float(hu_to_mu(torch.tensor(-1024.0))) == 0.0


def _noise_std(dose: float, scanner: LowDoseScanner, slices: int = 6) -> float:
    """Std of (low-dose FBP − noiseless FBP) in the middle of a 100 mm water disk (2 mm pixels)."""
    hu = disk(64, 25)[None].expand(slices, -1, -1).contiguous()
    gens = [np.random.default_rng(s) for s in range(slices)]
    angles, line, noisy = scan(hu, 2.0, dose, gens, scanner)
    diff = reconstruct_hu(noisy, angles, 64, 2.0, scanner) - reconstruct_hu(line, angles, 64, 2.0, scanner)
    return float(diff[:, 22:42, 22:42].std())


def test_noise_std_scales_as_one_over_sqrt_dose():
    scanner = LowDoseScanner()
    full, quarter, half = (_noise_std(d, scanner) for d in (1.0, 0.25, 0.5))
    print(f"noise std: full {full:.2f} HU, half {half:.2f}, quarter {quarter:.2f}; ratio {quarter / full:.3f}")
    assert 1.9 < quarter / full < 2.1
    assert 1.33 < half / full < 1.5  # √2 = 1.414
    # noise_hu is the same difference, made in one FBP
    hu = disk(64, 25)[None]
    a = noise_hu(hu, 2.0, 0.25, [np.random.default_rng(0)])
    angles, line, noisy = scan(hu, 2.0, 0.25, [np.random.default_rng(0)])
    b = reconstruct_hu(noisy, angles, 64, 2.0) - reconstruct_hu(line, angles, 64, 2.0)
    assert torch.allclose(a, b, atol=0.05)


def test_electronic_noise_matters_at_low_counts():
    quiet = LowDoseScanner(photons=2000.0, electronic_std=0.0)
    loud = LowDoseScanner(photons=2000.0, electronic_std=20.0)
    assert _noise_std(0.25, loud, 2) > 1.2 * _noise_std(0.25, quiet, 2)


def test_simulate_volume_is_seeded_per_slice_and_keeps_shape():
    hu = np.stack([disk(24, 9).numpy()[:, :20]] * 5, axis=-1)  # 24×20×5: non-square slices
    a = simulate_volume(hu, (3.0, 3.0, 3.0), 0.25, seed=1, slices_per_batch=2)
    b = simulate_volume(hu, (3.0, 3.0, 3.0), 0.25, seed=1, slices_per_batch=5)
    c = simulate_volume(hu, (3.0, 3.0, 3.0), 0.25, seed=2)
    assert a.shape == hu.shape and a.dtype == np.float32 and np.array_equal(a, b) and not np.array_equal(a, c)
    assert 1.0 < float(np.std(a - hu)) < 500.0


@pytest.mark.parametrize("dose", [0, -1, 1.5, math.nan, "x"])
def test_bad_doses_are_input_errors(dose):
    with pytest.raises(InputError, match="--dose"):
        check_dose(dose)
    with pytest.raises(InputError, match="scanner.photons"):
        LowDoseScanner(photons=0)
