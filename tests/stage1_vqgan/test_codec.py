"""Tiled codec: round-trip shapes, blending choice, HU input, out of core, bad inputs, seams."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch
import zarr

from patching.data.spec import hu_to_unit
from patching.errors import InputError
from patching.phantoms.chest import synth_chest
from patching.tiling.seams import seam_ratio, tile_border_planes
from patching.tiling.stitch import sliding_window
from stage1_vqgan.codec import decode_latent, encode_volume, load_vqgan_weights
from stage1_vqgan.config import VQGANConfig
from stage1_vqgan.model import VQGAN

WINDOW = (-1024.0, 1600.0)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny 3D convolutions are dominated by thread synchronisation on a shared 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def model() -> VQGAN:
    torch.manual_seed(0)
    cfg = VQGANConfig(base_channels=8, channel_mults=(1, 2, 4), num_res_blocks=1, latent_dim=4, codebook_size=64,
                      norm_groups=4)
    return VQGAN(cfg).eval()


def _vol(shape, seed=0) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _in_codebook(latent: torch.Tensor, model: VQGAN) -> torch.Tensor:
    """Per latent voxel: is its vector exactly a codebook row?"""
    rows = latent.reshape(latent.shape[0], -1).T  # (N, D)
    return (rows[:, None, :] == model.quantizer.embed[None]).all(-1).any(1)  # exact, (N,)


# -- shapes and round trips ---------------------------------------------------------------------


@pytest.mark.parametrize("shape, tile, latent_tile", [
    ((1, 32, 16, 24), (16, 16, 16), (4, 4, 4)),
    ((40, 24, 16), (16, 16, 16), (3, 5, 4)),  # no channel axis; odd latent tile
    ((1, 8, 16, 12), (16, 16, 16), (4, 4, 4)),  # smaller than a tile: padded and cropped back
])
def test_round_trip_shapes(model, shape, tile, latent_tile):
    vol = _vol(shape)
    latent, idx = encode_volume(model, vol, tile, 0.25, batch_size=3, return_indices=True)
    spatial = shape[-3:]
    assert tuple(latent.shape) == (4, *(s // 4 for s in spatial)) and latent.dtype == torch.float32
    assert tuple(idx.shape) == tuple(s // 4 for s in spatial)
    recon = decode_latent(model, latent, latent_tile, 0.25, batch_size=2)
    assert tuple(recon.shape) == (1, *spatial) and torch.isfinite(recon).all()


def test_one_tile_equals_the_model_and_latents_are_codes(model):
    vol = _vol((1, 16, 16, 16))
    latent, idx = encode_volume(model, vol, 16, 0.25, return_indices=True)
    with torch.no_grad():
        _, ref_idx, _ = model.encode(vol[None])  # its z_q is straight-through: z + (q - z), q up to rounding
        codes = model.quantizer.lookup(ref_idx)
        ref_img = model.decode(codes)
    assert torch.equal(idx, ref_idx[0]) and torch.equal(latent, codes[0])
    assert torch.allclose(decode_latent(model, latent, 4), ref_img[0], atol=1e-5)


def test_blending_before_quantization_keeps_latents_on_the_codebook(model):
    """The chosen order (blend z_e, then quantize) vs. the alternative (blend quantized tiles)."""
    vol = _vol((1, 32, 32, 32), seed=1)
    latent, idx = encode_volume(model, vol, 16, 0.25, return_indices=True)
    assert _in_codebook(latent, model).all()
    with torch.no_grad():
        from_indices = model.decode_indices(idx[None])[0]
        assert torch.equal(from_indices, model.decode(latent[None])[0])

    def quantized_tiles(t):
        return model.quantizer.quantize(model.encode_pre_quant(t))[0]

    blended_codes = sliding_window(vol, quantized_tiles, 16, 0.25, scale=Fraction(1, 4))
    off = ~_in_codebook(blended_codes, model)
    assert off.any()  # averages of different codes in the overlaps: vectors in no codebook


def test_hu_input_with_a_window_matches_unit_input(model):
    hu = synth_chest((32, 16, 16), seed=3).hu  # int16 (X, Y, Z)
    a = encode_volume(model, hu, 16, 0.25, hu_window=WINDOW)
    b = encode_volume(model, torch.from_numpy(hu_to_unit(hu, WINDOW))[None], 16, 0.25)
    assert torch.equal(a, b)
    img = decode_latent(model, a, 4, hu_window=WINDOW)
    assert WINDOW[0] - 0.01 <= float(img.min()) and float(img.max()) <= WINDOW[1] + 0.01  # blending round-off


def test_out_of_core_matches_in_memory(model, tmp_path):
    vol = _vol((1, 24, 32, 16), seed=2)
    ref_latent, ref_idx = encode_volume(model, vol, 16, 0.25, return_indices=True)
    src = zarr.create_array(store=str(tmp_path / "ct.zarr"), data=vol.numpy(), chunks=(1, 8, 8, 8))
    lat = zarr.create_array(store=str(tmp_path / "latent.zarr"), shape=(4, 6, 8, 4), chunks=(4, 2, 8, 4),
                            dtype="float32")
    ind = zarr.create_array(store=str(tmp_path / "idx.zarr"), shape=(6, 8, 4), chunks=(2, 8, 4), dtype="int64")
    assert encode_volume(model, src, 16, 0.25, out=lat, indices_out=ind) is None
    assert torch.allclose(torch.from_numpy(lat[...]), ref_latent, atol=1e-6)
    assert np.array_equal(ind[...], ref_idx.numpy())

    ref_img = decode_latent(model, ref_latent, 4, 0.25)
    img = zarr.create_array(store=str(tmp_path / "img.zarr"), shape=(24, 32, 16), chunks=(8, 8, 8), dtype="float32")
    assert decode_latent(model, lat, 4, 0.25, out=img) is None  # zarr latent in, (X, Y, Z) zarr out
    assert torch.allclose(torch.from_numpy(img[...]), ref_img[0], atol=1e-5)


# -- bad inputs ---------------------------------------------------------------------------------


def test_bad_inputs_raise_one_line_input_errors(model, tmp_path):
    cases = [
        (lambda: encode_volume(model, _vol((16, 16)), 16), r"^volume: needs shape \(1, X, Y, Z\)"),
        (lambda: encode_volume(model, _vol((2, 16, 16, 16)), 16), r"^volume: needs shape"),
        (lambda: encode_volume(model, _vol((1, 18, 16, 16)), 16),
         r"^volume: spatial sizes \(18, 16, 16\) must be multiples of the VQ-GAN's downsampling factor 4 .*\(20, 16, 16\)"),
        (lambda: encode_volume(model, _vol((1, 16, 16, 16)), 14), r"^tile: tile sizes"),
        (lambda: encode_volume(model, _vol((1, 16, 16, 16)), 16, out=torch.zeros(4, 4, 4, 3)), r"^out: has shape"),
        (lambda: encode_volume(model, _vol((1, 16, 16, 16)), 16, indices_out=torch.zeros(4, 4, 4)),
         r"^indices_out: needs out="),
        (lambda: encode_volume(model, _vol((1, 16, 16, 16)), 16, overlap=1.0), r"^overlap"),
        (lambda: decode_latent(model, _vol((4, 4, 4)), 4), r"^latent: needs shape \(4, x, y, z\)"),
        (lambda: decode_latent(model, _vol((8, 4, 4, 4)), 4), r"latent_dim=4\), got \(8, 4, 4, 4\)"),
        (lambda: decode_latent(model, _vol((4, 4, 4, 4)), 4, out=torch.zeros(1, 8, 8, 8)), r"^out: has shape"),
        (lambda: load_vqgan_weights(model, VQGAN(VQGANConfig(latent_dim=8, norm_groups=4)).state_dict(), "b.pt"),
         r"^b\.pt: does not match this VQ-GAN config"),
    ]
    for call, pattern in cases:
        with pytest.raises(InputError, match=pattern) as err:
            call()
        assert "\n" not in str(err.value)


# -- seams --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_tiled_reconstruction_has_no_seams():
    """Seam ratio = mean |x̂ - x| in bands 2 voxels either side of every interior tile border,
    over the mean elsewhere, pooled over five 48³ windows of a 64³ phantom shifted by 0-16
    voxels (so each anatomical place is in a band for some shifts and not for others: the
    content's own variation cancels). Model: tiny, trained briefly on 16³ crops of the phantom;
    codec: 24³ image tiles / 6³ latent tiles, 25 % overlap (both grids share their borders)."""
    big_n, n, crop, tile, f = 64, 48, 16, 24, 4
    # 480 mm over 64 voxels: the 7.5 mm voxels of synth_chest((48,)*3), with a wider field of view
    big = torch.from_numpy(hu_to_unit(synth_chest((big_n,) * 3, seed=0, fov_mm=(480.0,) * 3).hu.astype(np.float32),
                                      WINDOW))
    torch.manual_seed(0)
    cfg = VQGANConfig(base_channels=8, channel_mults=(1, 1, 2), num_res_blocks=1, latent_dim=16, codebook_size=256,
                      norm_groups=4, ema_decay=0.9, restart_threshold=0.01)
    model = VQGAN(cfg).train()
    opt = torch.optim.Adam(model.parameters(), 5e-4)
    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        starts = (torch.randint(0, (big_n - crop) // f + 1, (2, 3), generator=g) * f).tolist()
        x = torch.stack([big[a:a + crop, b:b + crop, c:c + crop] for a, b, c in starts])[:, None]
        out = model(x, g)
        loss = (out.recon - x).abs().mean() + out.stats["commitment_loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def pooled_ratio(overlap):
        # the encoder's image grid lies on the latent lattice, so it equals the decoder's grid × f
        planes = tile_border_planes(n, tile, overlap, f)
        assert planes == [b * f for b in tile_border_planes(n // f, tile // f, overlap)]
        pairs, sq, shifts = [], 0.0, range(0, big_n - n + 1, 4)
        for s in shifts:
            vol = big[s:s + n, s:s + n, s:s + n]
            recon = decode_latent(model, encode_volume(model, vol, tile, overlap, batch_size=4), tile // f, overlap,
                                  batch_size=4)[0]
            pairs.append((recon.numpy(), vol.numpy()))
            sq += float((recon - vol).square().mean())
        return seam_ratio(pairs, [planes] * 3), 10 * math.log10(4.0 / (sq / len(shifts))), planes

    ratio, psnr, planes = pooled_ratio(0.25)
    abut_ratio, abut_psnr, abut_planes = pooled_ratio(0.0)
    print(f"\nseam ratio {ratio:.3f} (PSNR {psnr:.2f} dB, borders {planes}); "
          f"abutting tiles: {abut_ratio:.3f} (PSNR {abut_psnr:.2f} dB, borders {abut_planes})")
    assert ratio <= 1.2
    assert abut_ratio > ratio + 0.1  # the metric sees seams where tiles merely abut
