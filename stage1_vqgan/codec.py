"""Tiled codec: encode and decode volumes of any size through overlapping, Gaussian-blended tiles.

Both directions run :func:`patching.tiling.stitch.sliding_window` — the encoder with ``scale = 1/f``
(image tile → latent tile), the decoder with ``scale = f`` — so memory is one batch of tiles on
the device plus the result, or one slab of it with ``out=`` (a zarr array: out of core).

Encoding blends the *continuous* encoder output ``z_e`` and quantizes afterwards, voxel by
voxel. Blending quantized tiles instead would average codes of neighbouring tiles in the
overlaps: vectors that are in no codebook, that the decoder never saw in training, with no
index. Quantizing after blending gives a latent made of codebook vectors only, consistent with
its index map (``decode_indices(indices) == decode(latent)``) and continuous across tile borders
up to the quantization step. See ``docs/stage1_vqgan.md`` for the seam measurement.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from fractions import Fraction

import torch

from patching.data.spec import hu_to_unit, unit_to_hu
from patching.errors import InputError
from patching.tiling.grid import as_tile
from patching.tiling.stitch import sliding_window

from .model import VQGAN, load_vqgan_weights

__all__ = ["encode_volume", "decode_latent", "load_vqgan_weights"]

_SLAB_VOXELS = 1 << 20  # latent voxels quantized per step after blending


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module):
    was = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was)


def _device(model: torch.nn.Module, device) -> torch.device:
    if device is not None:
        return torch.device(device)
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _autocast(device: torch.device, amp_dtype: torch.dtype | None):
    if amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=amp_dtype)


def _spatial(name: str, volume, num_channels: int) -> tuple[int, int, int]:
    shape = tuple(int(s) for s in getattr(volume, "shape", ()))
    if len(shape) == 4 and shape[0] == num_channels:
        return shape[1:]
    if len(shape) == 3 and num_channels == 1:
        return shape
    want = f"({num_channels}, X, Y, Z)" + (" or (X, Y, Z)" if num_channels == 1 else "")
    raise InputError(name, f"needs shape {want}, got {shape}")


def _check_multiple(name: str, sizes: Sequence[int], f: int, what: str) -> None:
    if any(s % f for s in sizes):
        fixed = tuple(math.ceil(s / f) * f for s in sizes)
        raise InputError(name, f"{what} {tuple(sizes)} must be multiples of the VQ-GAN's downsampling factor {f} "
                               f"per axis (pad or crop, e.g. to {fixed})")


@torch.no_grad()
def _quantize_blended(model: VQGAN, src, dst, indices_out, device: torch.device) -> None:
    """Replace blended ``z_e`` ``(D, x, y, z)`` by its nearest codes, slab by slab along x."""
    _, nx, ny, nz = src.shape
    slab = max(1, _SLAB_VOXELS // (ny * nz))
    for x0 in range(0, nx, slab):
        x1 = min(x0 + slab, nx)
        z_e = torch.as_tensor(src[:, x0:x1]).to(device, torch.float32)  # (D, s, y, z)
        z_q, idx = model.quantizer.quantize(z_e[None])  # (1, D, s, y, z), (1, s, y, z)
        z_q, idx = z_q[0].cpu(), idx[0].cpu()
        dst[:, x0:x1] = z_q if isinstance(dst, torch.Tensor) else z_q.numpy()
        if indices_out is not None:
            indices_out[x0:x1] = idx if isinstance(indices_out, torch.Tensor) else idx.numpy()


def encode_volume(
    model: VQGAN,
    volume,
    tile: int | Sequence[int],
    overlap: float | Sequence[float] = 0.25,
    *,
    hu_window: tuple[float, float] | None = None,
    out=None,
    indices_out=None,
    return_indices: bool = False,
    batch_size: int = 1,
    device: torch.device | str | None = None,
    amp_dtype: torch.dtype | None = None,
    progress: bool = False,
):
    """Encode a whole volume into its quantized latent through overlapping tiles.

    Args:
        model: the VQ-GAN (run in eval mode; its codebook is not updated).
        volume: ``(C, X, Y, Z)`` or, for one channel, ``(X, Y, Z)``: a torch tensor, numpy
            array or zarr array (tiles are read lazily). Values in ``[-1, 1]``, or HU when
            ``hu_window`` is given (mapped per tile; an int16 store is never copied whole).
            X, Y, Z must be multiples of the downsampling factor ``f``; axes shorter than the
            tile are padded (edge values) and cropped back.
        tile: image tile, multiples of ``f`` (e.g. the training tile).
        overlap: fraction of a tile shared by neighbours (Gaussian blending, sigma 0.125·tile).
        hu_window: ``(lo, hi)`` when ``volume`` is in HU.
        out: optional array ``(D, X/f, Y/f, Z/f)`` (e.g. zarr) that receives the latent slab by
            slab (out of core); ``None`` returns it.
        indices_out: optional array ``(X/f, Y/f, Z/f)`` for the code indices (with ``out``).
        return_indices: in memory, also return the index map.
        batch_size: tiles per encoder call.
        device: where the model runs (default: the model's device).
        amp_dtype: e.g. ``torch.bfloat16`` to encode under autocast.
        progress: tqdm bar over tiles.

    Returns:
        ``latent``, a float32 CPU tensor ``(D, X/f, Y/f, Z/f)`` of codebook vectors
        (``(latent, indices)`` with ``return_indices``; indices int64 ``(X/f, Y/f, Z/f)``), or
        ``None`` when ``out`` is given.
    """
    cfg, f = model.cfg, model.cfg.downsample
    spatial = _spatial("volume", volume, cfg.in_channels)
    _check_multiple("volume", spatial, f, "spatial sizes")
    tile = as_tile(tile, 3)
    _check_multiple("tile", tile, f, "tile sizes")
    latent_shape = (cfg.latent_dim, *(s // f for s in spatial))
    if out is not None and tuple(getattr(out, "shape", ())) != latent_shape:
        raise InputError("out", f"has shape {tuple(getattr(out, 'shape', ()))}, expected {latent_shape}")
    if indices_out is not None and (out is None or tuple(getattr(indices_out, "shape", ())) != latent_shape[1:]):
        raise InputError("indices_out", f"needs out= and shape {latent_shape[1:]}")
    device = _device(model, device)

    def fn(batch: torch.Tensor) -> torch.Tensor:  # (B, C, *tile) → (B, D, *tile / f)
        if hu_window is not None:
            batch = hu_to_unit(batch, hu_window)
        with _autocast(device, amp_dtype):
            return model.encode_pre_quant(batch).float()

    with _eval_mode(model):
        z_e = sliding_window(volume, fn, tile, overlap, out=out, batch_size=batch_size, scale=Fraction(1, f),
                             out_channels=cfg.latent_dim, progress=progress, device=device)
        if out is None:
            z_e = torch.as_tensor(z_e)  # numpy (numpy/zarr input) → tensor, no copy
            if z_e.ndim == 3:  # latent_dim 1: the stitcher drops a single channel of a 3-D input
                z_e = z_e[None]
            indices = torch.empty(z_e.shape[1:], dtype=torch.int64) if return_indices else None
            _quantize_blended(model, z_e, z_e, indices, device)  # in place: (D, X/f, Y/f, Z/f)
            return (z_e, indices) if return_indices else z_e
        _quantize_blended(model, out, out, indices_out, device)
    return None


def decode_latent(
    model: VQGAN,
    latent,
    tile_latent: int | Sequence[int],
    overlap: float | Sequence[float] = 0.25,
    *,
    out=None,
    hu_window: tuple[float, float] | None = None,
    batch_size: int = 1,
    device: torch.device | str | None = None,
    amp_dtype: torch.dtype | None = None,
    progress: bool = False,
):
    """Decode a whole latent ``(D, x, y, z)`` into ``(C, f·x, f·y, f·z)`` through overlapping tiles.

    Args:
        model: the VQ-GAN (run in eval mode).
        latent: ``(D, x, y, z)`` tensor, numpy or zarr array with ``D = model.cfg.latent_dim``.
            Axes shorter than the tile are padded (edge values) and cropped back.
        tile_latent: latent tile (``training tile / f`` decodes what the decoder was trained on).
        overlap: fraction of a tile shared by neighbours (Gaussian blending).
        out: optional array ``(C, f·x, f·y, f·z)`` (or ``(f·x, f·y, f·z)`` for one channel),
            e.g. a float32 zarr array, filled slab by slab (out of core); ``None`` returns it.
        hu_window: return HU (float32) instead of ``[-1, 1]`` (each tile mapped before blending;
            the map is affine, so blending commutes with it up to the clip at the window).
        batch_size, device, amp_dtype, progress: as :func:`encode_volume`.

    Returns:
        float32 tensor ``(C, f·x, f·y, f·z)`` on the CPU, or ``None`` when ``out`` is given.
    """
    cfg, f = model.cfg, model.cfg.downsample
    shape = tuple(int(s) for s in getattr(latent, "shape", ()))
    if len(shape) != 4 or shape[0] != cfg.latent_dim:
        raise InputError("latent", f"needs shape ({cfg.latent_dim}, x, y, z) for this VQ-GAN "
                                   f"(latent_dim={cfg.latent_dim}), got {shape}")
    tile_latent = as_tile(tile_latent, 3, source="tile_latent")
    device = _device(model, device)

    def fn(batch: torch.Tensor) -> torch.Tensor:  # (B, D, *tile) → (B, C, *tile · f)
        with _autocast(device, amp_dtype):
            img = model.decode(batch).float()
        return unit_to_hu(img, hu_window) if hu_window is not None else img

    with _eval_mode(model):
        result = sliding_window(latent, fn, tile_latent, overlap, out=out, batch_size=batch_size, scale=f,
                                out_channels=cfg.in_channels, progress=progress, device=device)
    return None if result is None else torch.as_tensor(result)
