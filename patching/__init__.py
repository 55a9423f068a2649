"""The data and patch layer shared by every model: store, ingest, phantoms, DRR, X-ray input,
tile grid, Gaussian blending, stitching, streaming tiles and metrics."""

from patching.errors import InputError
from patching.tiling.stitch import sliding_window

__all__ = ["InputError", "sliding_window"]
