"""Sliding-window inference: run ``fn`` on overlapping tiles and blend the results.

The output is ``Σ_t w_t · fn(tile_t) / Σ_t w_t`` with the weights of :mod:`patching.tiling.blend` on the
grid of :mod:`patching.tiling.grid` (design and measurements: ``docs/patching.md``). One loop, two
accumulators:

- in memory: the weighted numerator is summed in place into the float32 result itself;
- out of core (``out`` given): only a slab one output tile deep along one axis (the axis whose
  slab is smallest) lives in RAM. Tiles run slab by slab, so once the last tile with a given
  start on that axis has been added, every plane before the next start is final: it is
  normalised and written to ``out`` (whole chunks of ``out`` at a time), and the slab slides on.

Neither keeps a volume of summed weights: the normaliser of finished planes is rebuilt from the
grid when they are flushed, in cache-sized boxes — an outer product of 1-D sums when the
weights are separable (constant mode), otherwise (MONAI's clamped Gaussian) by adding the
weight map of every tile that meets the box.

Work that does not need the result of ``fn`` runs on one helper thread (``prefetch=True``), in
order: reading, casting and ``input_map`` of the next batch while ``fn`` and the accumulation of
the current one run, normalising finished planes, and writing them out of core. Tiles of lazily
read volumes (Zarr, …) come from an input slab that follows the output slab, so each stored
plane is read (and decoded) once instead of once per overlapping tile.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from fractions import Fraction

import numpy as np
import torch

from patching.data.zarr_direct import region_writer
from patching.errors import InputError
from patching.tiling.blend import BlendWeights, blend_weights
from patching.tiling.stitch_geometry import _Geometry
from patching.tiling.stitch_input import Feeder, TileReader

_CHUNK_ELEMS = 1 << 21  # voxels normalised per step when planes are finished (~8 MB of float32)


def sliding_window(
    volume,
    fn: Callable[[torch.Tensor], torch.Tensor],
    tile: int | Sequence[int],
    overlap: float | Sequence[float] = 0.25,
    mode: str = "gaussian",
    sigma_scale: float | Sequence[float] = 0.125,
    out=None,
    *,
    batch_size: int = 1,
    scale: int | float | Fraction = 1,
    out_channels: int | None = None,
    pad_value: float | None = None,
    progress: bool = False,
    device: torch.device | str | None = None,
    input_map: Callable[[torch.Tensor], torch.Tensor] | None = None,
    prefetch: bool = True,
) -> torch.Tensor | np.ndarray | None:
    """Apply ``fn`` tile by tile over ``volume`` and blend the overlapping outputs.

    Args:
        volume: ``(C, X, Y, Z)`` or ``(X, Y, Z)`` torch tensor, numpy array, zarr array or any
            array with numpy slicing, of any real dtype (e.g. int16 HU): tiles are cast to
            float32 as they are read. Numpy arrays and tensors are sliced tile by tile; other
            arrays (Zarr, …) are read through an input slab one tile deep along the slab axis,
            so that every stored plane is read and decoded once. (Any number of spatial axes
            works: their count is ``len(tile)``; an int ``tile`` means 3.)
        fn: maps a float32 batch ``(B, C, *tile)`` to ``(B, C_out, *(tile·scale))``, under
            ``torch.no_grad()``. It must neither modify its input in place nor keep it after
            returning (returning it, or a view of it, is fine): like MONAI, a batch of one tile
            of an in-memory float32 volume is a view of the volume, and other batches are a
            buffer that the next batch reuses.
        tile: tile size in input voxels. Axes of ``volume`` shorter than the tile are padded
            up to it (centred) and the output cropped back, so ``fn`` always sees full tiles.
        overlap: fraction of a tile shared by neighbours, in ``[0, 1)``; stride is
            ``max(1, floor(tile·(1 - overlap)))`` (see :mod:`patching.tiling.grid`).
        mode, sigma_scale: blending weights (:func:`patching.tiling.blend.blend_weights`, computed on
            the *output* tile).
        out: ``None`` for an in-memory result; otherwise an array with numpy slice assignment
            (a zarr array, a memmap, a tensor) of shape ``(C_out, *out_shape)`` (or
            ``out_shape`` when ``C_out == 1``), filled slab by slab with bounded RAM. It may be
            ``volume`` itself (same shape): planes are written only once no later tile reads them.
        batch_size: tiles per ``fn`` call.
        scale: output voxels per input voxel: a positive integer (e.g. latent→image) or the
            reciprocal of one (image→latent; then tiles, starts and sizes are multiples of
            ``1/scale`` — the grid is laid on the coarse lattice).
        out_channels: ``C_out``, to check ``out`` before the first call; inferred otherwise.
        pad_value: value for padding short axes; ``None`` repeats the edge voxel.
        progress: show a tqdm bar over tiles.
        device: where ``fn`` runs (tiles are moved there; results come back to the CPU,
            where they are accumulated). Defaults to the device of a torch ``volume``.
        input_map: applied to each float32 batch ``(B, C, *tile)`` (tiles cast from the
            volume's dtype, padded) before it is moved to ``device`` and given to ``fn``, e.g.
            :func:`window_to_unit` to map HU to ``[-1, 1]``. Its argument is the stitcher's own
            buffer, never a view of the volume, so it may work in place and return it; what it
            returns is what ``fn`` gets. With ``prefetch`` it runs on the helper thread.
        prefetch: run reading, casting and ``input_map`` of the next batch, the normalisation of
            finished planes and (out of core) their writing on one helper thread, overlapping
            ``fn`` and the accumulation. ``False`` does everything in the calling thread.

    Returns:
        In memory: float32 result of shape ``(C_out, *out_shape)`` — a torch tensor for a torch
        input, else numpy — without the channel axis when ``volume`` had none and
        ``C_out == 1``. Out of core: ``None``.
    """
    geo = _Geometry(volume, tile, overlap, scale, out_of_core=out is not None)
    if isinstance(batch_size, bool) or int(batch_size) != batch_size or batch_size < 1:
        raise InputError("batch_size", f"must be a positive integer, got {batch_size}")
    if input_map is not None and not callable(input_map):
        raise InputError("input_map", f"must be a callable or None, got {type(input_map).__name__}")
    batch_size = int(batch_size)
    weights = blend_weights(geo.out_tile, mode, sigma_scale)
    c_out = _check_out(out, geo, out_channels)
    read_device = volume.device if isinstance(volume, torch.Tensor) else torch.device("cpu")
    device = read_device if device is None else torch.device(device)

    ax = geo.slab_axis
    tiles = geo.tile_order()  # slab axis outermost
    batches = [tiles[b0 : b0 + batch_size] for b0 in range(0, len(tiles), batch_size)]
    last_of_slab = {idx[ax]: n for n, idx in enumerate(tiles)}  # slab = tiles sharing a start on ax
    w_dense = None if weights.floor == 1.0 and weights.separable else weights.dense()  # None: all ones
    feeder = Feeder(TileReader(volume, geo, pad_value), geo, min(batch_size, len(tiles)), read_device, input_map)
    helper = _Helper(prefetch)
    acc = None
    bar = _progress(len(tiles), progress)
    ok = False
    try:
        pending = helper.submit(feeder.batch, batches[0])
        for k, batch_idx in enumerate(batches):
            batch = pending.result()  # (B, C, *tile) float32
            x = batch.to(device, non_blocking=True)
            busy = x is batch and feeder.owns(batch)  # fn reads the buffer the next batch goes to
            nxt = batches[k + 1] if k + 1 < len(batches) else None
            if nxt is not None and not busy:
                pending = helper.submit(feeder.batch, nxt)
            with torch.no_grad():
                pred = fn(x)
            del x, batch
            c_out = _check_pred(pred, len(batch_idx), geo, c_out)
            pred = pred.detach().to("cpu", torch.float32)  # (B, C_out, *out_tile)
            after = busy and feeder.owns(pred)  # fn returned (a view of) its input: add it first
            if nxt is not None and busy and not after:
                pending = helper.submit(feeder.batch, nxt)
            if acc is None:
                acc = _Accumulator(c_out, geo, weights, w_dense, out, helper)
            for n, (idx, p) in enumerate(zip(batch_idx, pred, strict=True), start=k * batch_size):
                acc.add(idx, p)
                if last_of_slab[idx[ax]] == n:  # no later tile reaches before the next start
                    nxt_start = idx[ax] + 1
                    acc.finish(geo.entries[ax][nxt_start][0] if nxt_start < len(geo.starts[ax]) else geo.out_shape[ax])
            del pred, p  # (p, a view, would keep this output alive while fn makes the next one)
            if nxt is not None and after:
                pending = helper.submit(feeder.batch, nxt)
            bar.update(len(batch_idx))
        acc.close()
        ok = True
    finally:
        helper.close(cancel=not ok)
        bar.close()
    if out is not None:
        return None
    result = acc.buf  # (C_out, *out_shape), normalised in place
    if not geo.has_channels and c_out == 1:
        result = result[0]
    return result if isinstance(volume, torch.Tensor) else result.numpy()


def window_to_unit(window: tuple[float, float] = (-1024.0, 1600.0)) -> Callable[[torch.Tensor], torch.Tensor]:
    """An ``input_map`` taking values in ``window`` (e.g. HU) to ``[-1, 1]``, clipped, in place.

    The map is ``clamp(x, lo, hi) · 2/(hi - lo) - 1 - lo · 2/(hi - lo)``: two in-place passes
    over the batch, the affine part fused into one ``torch.add`` (``patching.data.spec.hu_to_unit``
    computes the same up to float32 rounding, with four full-size temporaries).
    """
    try:
        lo, hi = (float(v) for v in window)
    except (TypeError, ValueError):
        raise InputError("window", f"needs two numbers (lo, hi), got {window!r}") from None
    if not (math.isfinite(lo) and math.isfinite(hi) and hi > lo):
        raise InputError("window", f"needs finite (lo, hi) with hi > lo, got {window!r}")
    scale = 2.0 / (hi - lo)
    offset = torch.tensor(-1.0 - lo * scale, dtype=torch.float32)

    def to_unit(batch: torch.Tensor) -> torch.Tensor:
        if not batch.is_floating_point():
            raise InputError("input_map", f"window_to_unit needs a float tensor, got {batch.dtype}")
        # offset + scale · clamp(x): one fused pass instead of mul_ and add_ (1.3× faster)
        return torch.add(offset.to(batch.device), batch.clamp_(lo, hi), alpha=scale, out=batch)

    return to_unit


def _check_out(out, geo: _Geometry, out_channels) -> int | None:
    """Validate ``out`` and ``out_channels`` before any work; return C_out when known."""
    if out_channels is not None and (int(out_channels) != out_channels or out_channels < 1):
        raise InputError("out_channels", f"must be a positive integer, got {out_channels}")
    if out is None:
        return out_channels
    shape = tuple(getattr(out, "shape", ()))
    if shape[1:] == geo.out_shape and len(shape) == len(geo.out_shape) + 1:
        if out_channels is not None and out_channels != shape[0]:
            raise InputError("out", f"has {shape[0]} channels, out_channels is {out_channels}")
        return shape[0]
    if shape == geo.out_shape and out_channels in (None, 1):
        return 1
    raise InputError("out", f"has shape {shape}, expected (C_out, *{geo.out_shape}) for this volume and scale")


def _check_pred(pred, batch: int, geo: _Geometry, c_out) -> int:
    if not isinstance(pred, torch.Tensor):
        raise InputError("fn", f"must return a torch tensor, got {type(pred).__name__}")
    shape = tuple(pred.shape)
    if len(shape) != len(geo.out_tile) + 2 or shape[0] != batch or shape[2:] != geo.out_tile:
        raise InputError("fn", f"returned shape {shape}, expected ({batch}, C_out, *{geo.out_tile})")
    if c_out is not None and shape[1] != c_out:
        raise InputError("fn", f"returned {shape[1]} channels, expected {c_out} (out / out_channels)")
    return shape[1]


class _Helper:
    """One helper thread running submitted jobs in order (or each job at once when disabled).

    Its torch ops run on one intra-op thread: they are cache-sized or memory-bound, and on a busy
    machine a multi-threaded op can wait a scheduler slice at its barrier (see ``_one_thread``).
    """

    def __init__(self, enabled: bool):
        self._threads = torch.get_num_threads()
        self.pool = None
        if enabled:
            self.pool = ThreadPoolExecutor(1, "sliding_window", initializer=torch.set_num_threads, initargs=(1,))

    def submit(self, job, *args) -> Future:
        if self.pool is not None:
            return self.pool.submit(job, *args)
        done = Future()
        done.set_result(job(*args))  # errors raise here, in the caller
        return done

    def close(self, cancel: bool = False) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=cancel)
            # set_num_threads(1) in the helper also set the count that threads started later
            # begin with; give them this thread's count back.
            torch.set_num_threads(self._threads)


class _Accumulator:
    """Weighted sums for the planes ``[base, base + depth)`` along the slab axis ``ax``.

    In memory ``buf`` is the whole result (``base`` stays 0); out of core it is one output tile
    deep along ``ax`` (plus up to one chunk of ``out`` less a plane, see ``hold``) and slides
    along it, written to ``out`` as planes are finished.

    Finished planes are normalised on the helper thread. In memory that overlaps the
    accumulation of later tiles (they touch later planes only). Out of core the normalisation is
    waited for before the next tile is added; the finished planes are then copied out, written
    by the helper from the copy, and the slab slides at once.
    """

    def __init__(self, channels: int, geo: _Geometry, weights: BlendWeights, dense, out, helper: _Helper):
        self.geo, self.out, self.ax, self.helper = geo, out, geo.slab_axis, helper
        ax, shape = self.ax, geo.out_shape
        chunks = getattr(out, "shards", None) or getattr(out, "chunks", None)
        self.write_step = int(chunks[len(chunks) - len(shape) + ax]) if chunks else 0
        # Out of core, only whole chunks (shards) of `out` along ax are written, but the last:
        # writing part of one makes Zarr read, merge and rewrite it, once per flush that meets
        # it. Finished planes of an incomplete chunk stay in the slab until it is complete,
        # which makes the slab up to write_step - 1 planes deeper (only when chunks are no
        # deeper than a tile; otherwise the partial writes are cheaper than the RAM).
        self.hold = out is not None and 0 < self.write_step <= geo.out_tile[ax]
        depth = min(geo.out_tile[ax] + (self.write_step - 1 if self.hold else 0), shape[ax])
        if out is None:
            depth = shape[ax]
        # torch.zeros faults the pages in with one sequential fill. (A calloc'd buffer, faulted
        # in later by the strided, multi-threaded tile additions, measured 3× the system time.)
        self.buf = torch.zeros((channels, *shape[:ax], depth, *shape[ax + 1 :]), dtype=torch.float32)
        self.base = 0  # index along ax of the first plane in buf
        self.done = 0  # planes before this are final (normalised or being normalised)
        self.written = 0  # out of core: planes before this are written (or being written)
        self.sums = None
        if weights.separable:  # normaliser = outer product of per-axis sums of the factors
            self.sums = []
            for f, axis, n in zip(weights.factors, geo.entries, shape, strict=True):
                acc = torch.zeros(n, dtype=torch.float64)
                for o0, o1, l0, l1 in axis:
                    acc[o0:o1] += f[l0:l1]
                self.sums.append(acc)
        self.dense = dense  # (out_tile) float32, the map the numerator was weighted with
        self._wbuf = torch.empty(0)  # normaliser scratch (helper thread only)
        self._jobs: list[Future] = []  # in memory: normalisations in flight
        self._pending = None  # out of core: (normalisation in flight, upto), not yet written
        self._copy = None  # out of core: finished planes being written
        self._write_job = None
        self._direct_write = None if out is None else region_writer(out)  # patching.data.zarr_direct

    def _along(self, sl: slice, lead: int = 1) -> tuple[slice, ...]:
        """Index selecting ``sl`` along the slab axis (after ``lead`` leading axes)."""
        return (slice(None),) * (lead + self.ax) + (sl,)

    def add(self, idx, pred: torch.Tensor) -> None:
        """Add tile ``idx``'s output ``(C_out, *out_tile)``, weighted, into the sums."""
        o_sl, l_sl = self.geo.tile_slices(idx)
        self._settle()
        ax, s = self.ax, o_sl[self.ax]
        assert self.base <= s.start and s.stop <= self.base + self.buf.shape[1 + ax], (s, self.base)
        local = slice(s.start - self.base, s.stop - self.base)
        region = self.buf[(slice(None), *o_sl[:ax], local, *o_sl[ax + 1 :])]  # (C_out, *tile part inside)
        part = pred[(slice(None), *l_sl)]
        with _one_thread():
            if self.dense is None:  # constant weights: all ones
                region.add_(part)
            else:
                region.addcmul_(part, self.dense[l_sl])

    def finish(self, upto: int) -> None:
        """Planes ``[done, upto)`` are final: no later tile touches them. Normalise (and write) them."""
        if upto <= self.done:
            return
        job = self.helper.submit(self._normalise, self.done, upto, self.base)
        self.done = upto
        if self.out is None:
            self._jobs.append(job)
        else:
            self._pending = (job, upto)

    def close(self) -> None:
        """Wait for all background work; write the last planes out of core."""
        self._settle()
        for job in self._jobs:
            job.result()
        if self._write_job is not None:
            self._write_job.result()

    def _settle(self) -> None:
        """Out of core: once the pending normalisation is done, write what is whole and slide."""
        if self._pending is None:
            return
        job, upto = self._pending
        self._pending = None
        job.result()
        total, step = self.geo.out_shape[self.ax], self.write_step
        end = upto if upto == total or not self.hold else upto // step * step
        if end > self.written:
            if self._write_job is not None:
                self._write_job.result()  # the copy buffer is free again
            if self._copy is None:
                self._copy = torch.empty_like(self.buf)
            n = end - self.written
            data = self._copy[self._along(slice(0, n))]
            data.copy_(self.buf[self._along(slice(self.written - self.base, end - self.base))])
            self._write_job = self.helper.submit(self._write, data, self.written, end)
            self.written = end
        if self.written < total:
            self._slide(self.written)

    def _normalise(self, p0: int, p1: int, base: int) -> None:
        """Divide planes ``[p0, p1)`` (``buf`` starting at plane ``base``) by their normaliser."""
        shape, ax = self.geo.out_shape, self.ax
        # Boxes of about _CHUNK_ELEMS voxels cut along axis 0, so that they stay cache-sized and
        # their innermost runs long whatever the slab axis is.
        box = [(0, n) for n in shape]
        box[ax] = (p0, p1)
        row = math.prod(hi - lo for lo, hi in box[1:])
        step = max(1, _CHUNK_ELEMS // max(row, 1))
        lo0, hi0 = box[0]
        with _one_thread():
            for c0 in range(lo0, hi0, step):
                box[0] = (c0, min(c0 + step, hi0))
                local = [slice(lo, hi) for lo, hi in box]
                local[ax] = slice(local[ax].start - base, local[ax].stop - base)
                self.buf[(slice(None), *local)].div_(self._normaliser(box))  # broadcast over channels

    def _normaliser(self, box: Sequence[tuple[int, int]]) -> torch.Tensor:
        """Σ of the weights of every tile over the output box ``[(lo, hi) per axis]``."""
        nd = len(box)
        if self.sums is not None:
            w = None
            for d, (acc, (lo, hi)) in enumerate(zip(self.sums, box, strict=True)):
                part = acc[lo:hi].reshape(*([1] * d), -1, *([1] * (nd - d - 1)))
                w = part if w is None else w * part  # broadcast outer product
            return w.to(torch.float32)
        size = [hi - lo for lo, hi in box]
        if self._wbuf.numel() < math.prod(size):
            self._wbuf = torch.empty(math.prod(size), dtype=torch.float32)
        w = self._wbuf[: math.prod(size)].view(size).zero_()  # reused: no fresh pages per box
        parts = []  # per axis: (box slice, tile-local slice) of every tile that meets the box
        for (lo, hi), axis in zip(box, self.geo.entries, strict=True):
            parts.append([
                (slice(max(o0, lo) - lo, min(o1, hi) - lo), slice(max(o0, lo) - o0 + l0, min(o1, hi) - o0 + l0))
                for o0, o1, l0, _ in axis
                if max(o0, lo) < min(o1, hi)
            ])
        for combo in itertools.product(*parts):
            w[tuple(c[0] for c in combo)].add_(self.dense[tuple(c[1] for c in combo)])  # in place on a view
        return w

    def _write(self, data: torch.Tensor, x0: int, x1: int) -> None:
        if self.geo.out_shape == tuple(self.out.shape):  # out has no channel axis (C_out == 1)
            key, data = self._along(slice(x0, x1), lead=0), data[0]
        else:
            key = self._along(slice(x0, x1))
        if isinstance(self.out, torch.Tensor):
            self.out[key] = data
        elif self._direct_write is not None:  # an uncompressed local Zarr 3 array: chunk files directly
            self._direct_write(key, data.numpy())
        else:
            self.out[key] = data.numpy()

    def _slide(self, new_base: int) -> None:
        """Move the planes from ``new_base`` on to the front of ``buf`` without a full-size temporary."""
        shift, depth = new_base - self.base, self.buf.shape[1 + self.ax]
        if shift <= 0:
            return
        keep = max(depth - shift, 0)
        for p in range(0, keep, shift):  # source and target pieces never overlap
            q = min(p + shift, keep)
            self.buf[self._along(slice(p, q))] = self.buf[self._along(slice(p + shift, q + shift))]
        self.buf[self._along(slice(keep, depth))].zero_()
        self.base = new_base


@contextlib.contextmanager
def _one_thread():
    """Run many small (cache-sized) or memory-bound ops on one thread: on a busy machine each
    multi-threaded op can wait a scheduler slice at its barrier, which made the normaliser 10-50×
    slower and the per-tile passes 2-5× slower in measurements."""
    n = torch.get_num_threads()
    if n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _progress(total: int, enabled: bool):
    if enabled:
        from tqdm.auto import tqdm

        return tqdm(total=total, desc="tiles", unit="tile")

    class _Null:
        def update(self, n):
            pass

        def close(self):
            pass

    return _Null()
