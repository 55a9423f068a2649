"""The input side of :func:`patching.tiling.stitch.sliding_window`: reading tiles (padded where they
overhang) from tensors, arrays or lazily read volumes (Zarr, through an input slab that follows the
output slab so each stored plane is decoded once), and assembling the float32 batches ``fn`` gets."""

from __future__ import annotations

import contextlib

import numpy as np
import torch

from patching.data.zarr_direct import region_reader
from patching.tiling.stitch_geometry import _Geometry


class TileReader:
    """Reads tile ``idx`` of ``volume`` into a float32 ``(C, *tile)`` buffer, padded where it overhangs."""

    def __init__(self, volume, geo: _Geometry, pad_value):
        self.volume, self.geo, self.pad_value = volume, geo, pad_value
        self.source = volume  # what tiles are sliced from: a tensor where possible
        if isinstance(volume, np.ndarray) and volume.flags.writeable:
            with contextlib.suppress(TypeError, ValueError):  # dtypes or byte orders torch lacks
                self.source = torch.from_numpy(volume)  # shares memory; its casting copy_ is faster
        # the volume as a float32 tensor when tiles can be plain views
        is_f32 = isinstance(self.source, torch.Tensor) and self.source.dtype == torch.float32
        self.tensor = self.source if is_f32 else None
        lazy = not isinstance(volume, (np.ndarray, torch.Tensor))
        self.slab = InputSlab(volume, geo) if lazy else None

    def _key(self, idx):
        real, pad = [], []
        for d, i in enumerate(idx):
            s, lo, n, t = self.geo.starts[d][i], self.geo.pads[d][0], self.geo.shape[d], self.geo.tile[d]
            a, b = max(s - lo, 0), min(s - lo + t, n)
            real.append(slice(a, b))
            pad.append((a - (s - lo), (s - lo + t) - b))
        return ((slice(None),) if self.geo.has_channels else ()) + tuple(real), pad

    def view(self, idx) -> torch.Tensor | None:
        """The tile as a view of the volume (no copy), or None when it needs a copy."""
        key, pad = self._key(idx)
        if self.tensor is None or any(p != (0, 0) for p in pad):
            return None
        block = self.tensor[key]
        return block if self.geo.has_channels else block[None]

    def copy_into(self, idx, dst: torch.Tensor) -> None:
        """Copy the tile into ``dst`` in one pass (dtype converted on the way)."""
        key, pad = self._key(idx)
        # a view of tensors, numpy arrays and the input slab
        block = self.source[key] if self.slab is None else self.slab.block(key)
        if not self.geo.has_channels:
            block = block[None]
        if any(p != (0, 0) for p in pad):  # an axis shorter than the tile: rare, a temporary is fine
            block = block.cpu().numpy() if isinstance(block, torch.Tensor) else np.asarray(block)
            kw = {"mode": "edge"} if self.pad_value is None else {"mode": "constant", "constant_values": self.pad_value}
            block = torch.from_numpy(np.pad(block, [(0, 0), *pad], **kw))
        if isinstance(block, torch.Tensor):
            dst.copy_(block)
        else:
            dst.numpy()[...] = block  # numpy assignment converts the dtype without a temporary


class InputSlab:
    """Planes ``[lo, hi)`` of a lazily read volume along the slab axis, in the volume's dtype.

    Tiles come slab by slab with non-decreasing starts on the slab axis, so when the window moves
    on, the planes it keeps are moved to the front and only the new ones are read: every stored
    plane is read once (for Zarr: each chunk decoded once, where reading tile by tile decodes the
    overlaps again — ~2.9× the volume at overlap 0.25). RAM: one input tile deep, full size
    across. Zarr 3 arrays are decoded straight into the slab (``out=``), no temporary.
    """

    def __init__(self, volume, geo: _Geometry):
        self.volume = volume
        self.axis = geo.slab_axis + (1 if geo.has_channels else 0)  # array axis of the slab axis
        shape = [int(s) for s in volume.shape]
        shape[self.axis] = min(geo.tile[geo.slab_axis], geo.shape[geo.slab_axis])
        self.buf = np.empty(shape, dtype=np.dtype(volume.dtype))
        self.lo = self.hi = 0
        self._read_into = zarr_reader(volume)

    def _along(self, a: int, b: int) -> tuple[slice, ...]:
        return (slice(None),) * self.axis + (slice(a, b),)

    def block(self, key: tuple[slice, ...]) -> np.ndarray:
        a, b = key[self.axis].start, key[self.axis].stop
        if not (self.lo <= a and b <= self.hi):
            self._advance(a, b)
        local = list(key)
        local[self.axis] = slice(a - self.lo, b - self.lo)
        return self.buf[tuple(local)]

    def _advance(self, a: int, b: int) -> None:
        keep = self.hi - a if self.lo <= a < self.hi else 0
        shift = a - self.lo
        for p in range(0, keep if shift else 0, shift or 1):  # kept planes to the front; pieces never overlap
            q = min(p + shift, keep)
            self.buf[self._along(p, q)] = self.buf[self._along(p + shift, q + shift)]
        first = a + keep
        key = self._along(first, b)
        dst = self.buf[self._along(keep, b - a)]
        if self._read_into is not None:
            self._read_into(key, dst)
        else:
            dst[...] = self.volume[key]
        self.lo, self.hi = a, b


def zarr_reader(volume):
    """``read(key, dst)`` decoding a Zarr 3 array's selection straight into ``dst``, or None.

    Arrays in the store's layout are read chunk file by chunk file with numcodecs
    (:mod:`patching.data.zarr_direct`: a third of Zarr's CPU time), others through Zarr."""
    direct = region_reader(volume)
    if direct is not None:
        return direct
    get = getattr(volume, "get_basic_selection", None)
    if get is None or not type(volume).__module__.startswith("zarr."):
        return None
    try:
        from zarr.core.buffer import default_buffer_prototype

        nd_buffer = default_buffer_prototype().nd_buffer
    except (ImportError, AttributeError):  # zarr 2: plain slicing
        return None

    def read(key, dst):
        get(key, out=nd_buffer.from_numpy_array(dst))

    return read


class Feeder:
    """Turns a batch of tile indices into the float32 batch ``fn`` gets (on the helper thread)."""

    def __init__(self, reader: TileReader, geo: _Geometry, batch_size: int, device, input_map):
        self.reader, self.geo, self.batch_size, self.device = reader, geo, batch_size, device
        self.input_map = input_map
        self.buf = None

    def batch(self, batch_idx) -> torch.Tensor:
        if len(batch_idx) == 1 and self.input_map is None:
            view = self.reader.view(batch_idx[0])
            if view is not None:
                return view[None]  # no copy, as MONAI: fn must not modify its input in place
        if self.buf is None:  # one buffer for the run: a fresh 32 MiB block per call costs page
            # faults (glibc mmaps blocks that large) as slow as the copy
            self.buf = torch.empty((self.batch_size, self.geo.channels, *self.geo.tile), device=self.device)
        batch = self.buf[: len(batch_idx)]
        for dst, idx in zip(batch, batch_idx, strict=True):
            self.reader.copy_into(idx, dst)
        return batch if self.input_map is None else self.input_map(batch)

    def owns(self, t: torch.Tensor) -> bool:
        """Whether ``t`` lives in the buffer that the next batch will be written to."""
        return self.buf is not None and t.untyped_storage().data_ptr() == self.buf.untyped_storage().data_ptr()
