"""Evaluation metrics: exact formulas, scikit-image references, phantom behaviour, error paths."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import ndimage as ndi

from patching import checks
from patching.errors import InputError
from patching.metrics import scores as M
from patching.phantoms.chest import TISSUE_CLASSES, synth_chest
from patching.projection.drr import DRRGeometry, render_drr

skimage_metrics = pytest.importorskip("skimage.metrics")
X2CT_OFFSET_DB = 20 * math.log10(4095 / 2500)  # ≈ 4.29 dB


@pytest.fixture(scope="module")
def chest48():
    return synth_chest((48, 48, 48), seed=1)


@pytest.fixture(scope="module")
def chest64():
    return synth_chest((64, 64, 64), seed=1)


@pytest.fixture(scope="module")
def emboli_pair():
    """The same patient with emboli and without (the clots 'filled' with contrast), same noise."""
    return synth_chest((64, 64, 64), seed=2, emboli=True), synth_chest((64, 64, 64), seed=2, emboli=False)


def noisy(hu, sigma, seed=0):
    return hu + np.random.default_rng(seed).normal(0.0, sigma, hu.shape)


# --- PSNR, MAE ------------------------------------------------------------------------------------


def test_psnr_constant_offset_is_the_exact_formula():
    target = np.random.default_rng(0).uniform(-1000, 1000, (12, 10, 8))
    for offset in (1.0, 25.0, -300.0):
        assert M.psnr(target + offset, target, 2000) == pytest.approx(20 * math.log10(2000 / abs(offset)), abs=1e-9)
    assert M.mae_hu(target + 25.0, target) == pytest.approx(25.0)
    # An explicit range moves the PSNR by 20·log10 of the ratio, nothing else.
    pred = noisy(target, 40.0)
    assert M.psnr(pred, target, 2624) - M.psnr(pred, target, 2000) == pytest.approx(20 * math.log10(2624 / 2000))


def test_psnr_window_clips_both_first_and_identical_is_inf():
    target = np.full((8, 8, 8), -2000.0)
    pred = np.full((8, 8, 8), -1500.0)
    assert M.psnr(pred, target, 2000) == pytest.approx(20 * math.log10(2000 / 500))
    assert M.psnr(pred, target, 2000, window=(-1024, 1600)) == math.inf  # both clip to -1024
    assert M.mae_hu(pred, target, window=(-1024, 1600)) == 0.0
    assert M.psnr(target, target, 2000) == math.inf


def test_inputs_as_tensors_and_with_leading_singleton_axes(chest48):
    hu = chest48.hu
    pred = noisy(hu, 20.0)
    ref = M.psnr(pred, hu, 2000)
    assert M.psnr(torch.from_numpy(pred)[None, None], torch.from_numpy(hu.astype(np.float32)), 2000) == pytest.approx(ref)


def test_x2ctgan_psnr_is_inflated_by_4_29_db(chest48):
    hu = chest48.hu.astype(np.int32)
    pred = np.rint(noisy(hu, 50.0, seed=3)).astype(np.int32)
    # Their data: HU + 1024 in [0, 2500]; the true range of that data is 2500.
    true_range = M.psnr(pred, hu, 2500, window=(-1024, 1476))
    assert M.psnr_x2ctgan(pred, hu) - true_range == pytest.approx(X2CT_OFFSET_DB, abs=0.01)
    assert 4.28 < X2CT_OFFSET_DB < 4.30
    assert M.psnr_x2ctgan(hu, hu) == 100.0  # their value for identical volumes
    assert M.psnr_x2ctgan(hu, hu, per_slice=True) == 100.0


def test_x2ctgan_per_slice_psnr_averages_slices_then_axes():
    rng = np.random.default_rng(1)
    target = rng.integers(-900, 1000, (9, 10, 11))
    pred = target + rng.integers(-80, 80, target.shape)
    p = ((np.clip((pred + 1024) / 2500, 0, 1)).astype(np.float32) * np.float32(2500)).astype(np.int32)
    t = ((np.clip((target + 1024) / 2500, 0, 1)).astype(np.float32) * np.float32(2500)).astype(np.int32)
    se = (p - t).astype(np.float64) ** 2
    axes = [np.mean(20 * np.log10(4095 / np.sqrt(se.mean(axis=tuple(j for j in range(3) if j != k)))))
            for k in range(3)]
    assert M.psnr_x2ctgan(pred, target, per_slice=True) == pytest.approx(np.mean(axes), abs=1e-9)
    assert M.psnr_x2ctgan(pred, target) == pytest.approx(20 * np.log10(4095 / np.sqrt(se.mean())), abs=1e-9)


# --- SSIM ------------------------------------------------------------------------------------------


def skimage_ssim3d(a, b, data_range):
    return skimage_metrics.structural_similarity(a.astype(np.float64), b.astype(np.float64), data_range=data_range,
                                                 gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                                 channel_axis=None)


def test_ssim3d_matches_skimage_on_random_data():
    rng = np.random.default_rng(0)
    a = rng.random((23, 17, 29))
    b = a + 0.2 * rng.standard_normal(a.shape)
    assert M.ssim3d(a, b, 1.0) == pytest.approx(skimage_ssim3d(a, b, 1.0), abs=1e-4)


def test_ssim3d_matches_skimage_on_a_phantom_and_is_one_for_identical(chest48):
    hu = chest48.hu
    pred = noisy(hu, 40.0)
    assert M.ssim3d(pred, hu, 2000) == pytest.approx(skimage_ssim3d(pred, hu, 2000), abs=1e-4)
    window = (-1024, 1600)
    clipped = [np.clip(v.astype(np.float64), *window) for v in (pred, hu)]
    assert M.ssim3d(pred, hu, 2624, window=window) == pytest.approx(skimage_ssim3d(*clipped, 2624), abs=1e-4)
    assert M.ssim3d(hu, hu, 2000) == pytest.approx(1.0, abs=1e-12)


def test_slab_by_slab_equals_whole_volume(monkeypatch):
    rng = np.random.default_rng(2)
    a = rng.random((30, 14, 13)) * 1000
    b = a + 300 * rng.random(a.shape)
    names = ("ssim3d", "ssim_x2ctgan", "psnr", "psnr_x2ctgan", "mae_hu")
    whole = [M.ssim3d(a, b, 1000.0), M.ssim_x2ctgan(a, b), M.psnr(a, b, 2000), M.psnr_x2ctgan(a, b, per_slice=True),
             M.mae_hu(a, b)]
    monkeypatch.setattr(checks, "SLAB_VOXELS", 14 * 13 * 12)  # 2 planes plus SSIM's 5-plane halo per side
    slabs = [M.ssim3d(a, b, 1000.0), M.ssim_x2ctgan(a, b), M.psnr(a, b, 2000), M.psnr_x2ctgan(a, b, per_slice=True),
             M.mae_hu(a, b)]
    for name, x, y in zip(names, whole, slabs, strict=True):
        assert x == pytest.approx(y, abs=1e-10), name
    assert whole[0] == pytest.approx(skimage_ssim3d(a, b, 1000.0), abs=1e-4)


def test_ssim_x2ctgan_is_per_axis_slice_ssim_on_unit_range(chest48):
    hu = chest48.hu
    pred = noisy(hu, 60.0, seed=5)
    unit = [np.clip((v.astype(np.float32) + 1024) / 2500, 0, 1).astype(np.float64) for v in (pred, hu)]
    ref = [skimage_metrics.structural_similarity(*unit, data_range=1.0, channel_axis=k) for k in range(3)]
    got = M.ssim_x2ctgan(pred, hu, per_axis=True)
    assert [got["x"], got["y"], got["z"]] == pytest.approx(ref, abs=1e-6)
    assert got["mean"] == pytest.approx(np.mean(ref), abs=1e-6) == M.ssim_x2ctgan(pred, hu)
    assert M.ssim_x2ctgan(hu, hu) == pytest.approx(1.0)


# --- segmentation ---------------------------------------------------------------------------------


def test_dice_values():
    a = np.zeros((6, 6, 6), bool)
    b = np.zeros((6, 6, 6), bool)
    assert M.dice(a, b) == 1.0  # both empty: they agree
    a[:3] = True
    assert M.dice(a, a) == 1.0 and M.dice(a, b) == 0.0
    b[:, :3] = True
    assert M.dice(a, b) == pytest.approx(2 * 54 / (108 + 108))


def test_lung_dice_blurred_copy_high_soft_tissue_zero(chest64):
    hu = chest64.hu
    lungs = M.lung_mask(hu)
    assert lungs.sum() > 0.03 * lungs.size
    assert not lungs[0].any() and not lungs[:, 0].any()  # no outside air
    blurred = ndi.gaussian_filter(hu.astype(np.float64), 1.0)
    assert M.dice_lungs(blurred, hu) > 0.9
    assert M.dice_lungs(np.full(hu.shape, 40.0), hu) == 0.0
    assert M.dice_lungs(hu, hu) == 1.0


def test_lung_mask_matches_the_phantom_labels():
    ph = synth_chest((64, 64, 64), seed=3, return_labels=True)
    assert M.dice(M.lung_mask(ph.hu), ph.tissue == TISSUE_CLASSES["lung"]) > 0.9


def test_vessel_mask_finds_the_contrast_arteries():
    ph = synth_chest((96, 96, 96), seed=1, return_labels=True)
    t = TISSUE_CLASSES
    vessels = M.vessel_mask(ph.hu)
    found = ph.tissue[vessels]
    enhanced = np.isin(found, [t["pulmonary_artery"], t["right_heart"], t["left_heart"], t["aorta"]])
    assert vessels.sum() > 500 and enhanced.mean() > 0.8  # mostly contrast lumen, little bone
    artery = ph.tissue == t["pulmonary_artery"]
    assert (vessels & artery).sum() > 0.5 * artery.sum()  # the partial-volume rim is below 200 HU
    assert M.dice_vessels(ph.hu, ph.hu) == 1.0
    assert M.dice_vessels(np.full(ph.hu.shape, 40.0), ph.hu) == 0.0


# --- projection consistency, clot visibility -------------------------------------------------------------


def test_projection_consistency(chest48):
    hu, spacing = chest48.hu, chest48.spacing_mm
    geometry = DRRGeometry(height=48, width=48, pixel_mm=8.0)
    xray = render_drr(torch.from_numpy(hu), spacing, "pa", geometry).numpy()
    own = M.projection_consistency(hu, xray, spacing, "pa", geometry)
    assert own["ncc"] == pytest.approx(1.0, abs=1e-9) and own["psnr"] > 60
    close = M.projection_consistency(noisy(hu, 30.0), xray, spacing, "pa", geometry)
    assert close["ncc"] > 0.99 and close["psnr"] > 30
    blank = M.projection_consistency(np.full(hu.shape, -1024.0), xray, spacing, "pa", geometry)
    assert blank["ncc"] < 0.1 and blank["psnr"] < close["psnr"] - 10
    lateral = M.projection_consistency(hu, xray, spacing, "lateral", geometry)  # wrong view
    assert lateral["ncc"] < own["ncc"]
    with pytest.raises(InputError, match="xray"):
        M.projection_consistency(hu, xray[:40], spacing, "pa", geometry)


def test_embolus_contrast_sees_the_clot_and_not_a_filled_one(emboli_pair):
    with_clot, filled = emboli_pair
    mask = with_clot.embolus_mask
    assert mask is not None and mask.any()
    seen = M.embolus_contrast(with_clot.hu, mask)
    assert seen["contrast_hu"] > 150 and seen["cnr"] > 2 and seen["num_shell"] > 0
    gone = M.embolus_contrast(filled.hu, mask)  # clot replaced by contrast: nothing to see
    assert abs(gone["contrast_hu"]) < 75 and seen["contrast_hu"] - gone["contrast_hu"] > 200
    # The same shell for every method: the target's vessels.
    shared = M.embolus_contrast(with_clot.hu, mask, vessel=M.vessel_mask(filled.hu))
    assert shared["contrast_hu"] > 150
    assert all(math.isfinite(v) for v in seen.values())
    assert M.embolus_contrast(with_clot.hu, np.zeros_like(mask)) is None
    flat = M.embolus_contrast(np.full(mask.shape, 40.0), mask)  # no vessel around: invisible
    assert flat["contrast_hu"] == 0.0 and flat["cnr"] == 0.0 and flat["num_shell"] == 0


# --- LPIPS-style ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def feature_weights(tmp_path_factory):
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    shapes = {"stages.0.0": (8, 1), "stages.0.2": (8, 8), "stages.1.0": (16, 8)}
    sd = {}
    for name, (c_out, c_in) in shapes.items():
        sd[f"{name}.weight"] = torch.randn(c_out, c_in, 3, 3, generator=g) * (2.0 / (9 * c_in)) ** 0.5
        sd[f"{name}.bias"] = torch.zeros(c_out)
    path = tmp_path_factory.mktemp("lpips") / "features.safetensors"
    save_file(sd, str(path))
    return path


def test_lpips25d_orders_distortions_and_is_zero_for_identical(chest48, feature_weights):
    hu = chest48.hu[8:40, 8:40, 8:40].astype(np.float32)
    kw = dict(slices_per_axis=4)
    assert M.lpips25d(hu, hu, feature_weights, **kw) == pytest.approx(0.0, abs=1e-9)
    small = M.lpips25d(noisy(hu, 20.0), hu, feature_weights, **kw)
    large = M.lpips25d(noisy(hu, 200.0), hu, feature_weights, **kw)
    assert 0 < small < large
    net = M.load_feature_net(feature_weights)  # load once, score many
    assert M.lpips25d(noisy(hu, 20.0), hu, net, **kw) == pytest.approx(small)


def test_feature_net_reads_the_perceptual_loss_weights(tmp_path):
    losses = pytest.importorskip("stage1_vqgan.losses")
    from safetensors.torch import save_file

    ref = losses.SliceFeatureNet(channels=(4, 8), convs_per_stage=(2, 1))
    path = tmp_path / "perceptual.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))
    x = torch.randn(2, 1, 16, 16)
    for a, b in zip(M.load_feature_net(path)(x), ref(x), strict=True):
        torch.testing.assert_close(a, b)


def test_lpips25d_bad_weights(tmp_path, chest48):
    hu = chest48.hu
    with pytest.raises(InputError, match="not found"):
        M.lpips25d(hu, hu, tmp_path / "missing.safetensors")
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x00\x01 not a safetensors file" * 10)
    with pytest.raises(InputError, match="corrupt.safetensors"):
        M.lpips25d(hu, hu, corrupt)
    from safetensors.torch import save_file

    other = tmp_path / "other.safetensors"
    save_file({"encoder.weight": torch.zeros(3, 3)}, str(other))
    with pytest.raises(InputError, match="not a slice feature network"):
        M.load_feature_net(other)


# --- bootstrap ------------------------------------------------------------------------------------


def test_bootstrap_ci_contains_the_mean_and_narrows():
    rng = np.random.default_rng(0)
    few, many = rng.normal(25.0, 2.0, 20), rng.normal(25.0, 2.0, 500)
    mean, lo, hi = M.bootstrap_ci(few)
    assert lo < mean < hi and mean == pytest.approx(few.mean())
    mean2, lo2, hi2 = M.bootstrap_ci(many)
    assert lo2 < mean2 < hi2 and (hi2 - lo2) < 0.5 * (hi - lo)
    assert M.bootstrap_ci(few, seed=0) == M.bootstrap_ci(few, seed=0)  # seeded, no global state
    assert M.bootstrap_ci([3.0]) == (3.0, 3.0, 3.0)
    assert (M.bootstrap_ci(few, alpha=0.5)[2] - M.bootstrap_ci(few, alpha=0.5)[1]) < hi - lo


# --- errors ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("fn", [
    lambda a, b: M.psnr(a, b, 2000), lambda a, b: M.psnr_x2ctgan(a, b), lambda a, b: M.ssim3d(a, b, 2000),
    lambda a, b: M.ssim_x2ctgan(a, b), M.mae_hu, M.dice, M.dice_lungs, M.dice_vessels,
])
def test_bad_inputs_raise_input_error(fn):
    good = np.zeros((12, 12, 12))
    with pytest.raises(InputError, match="does not match"):
        fn(good, np.zeros((12, 12, 11)))
    bad = good.copy()
    bad[3, 4, 5] = np.nan
    with pytest.raises(InputError, match="NaN"):
        fn(bad, good)
    with pytest.raises(InputError, match="X×Y×Z"):
        fn(np.zeros((12, 12)), np.zeros((12, 12)))


def test_bad_arguments_raise_input_error():
    v = np.zeros((12, 12, 12))
    with pytest.raises(InputError, match="data_range"):
        M.psnr(v, v, 0)
    with pytest.raises(InputError, match="window"):
        M.psnr(v, v, 2000, window=(100, -100))
    with pytest.raises(InputError, match="at least 11"):
        M.ssim3d(np.zeros((12, 12, 8)), np.zeros((12, 12, 8)), 2000)
    with pytest.raises(InputError, match="values"):
        M.bootstrap_ci([1.0, math.inf])
    with pytest.raises(InputError, match="values"):
        M.bootstrap_ci([])
    with pytest.raises(InputError, match="embolus_mask"):
        M.embolus_contrast(v, np.ones((12, 12, 11)))
