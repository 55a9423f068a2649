"""Tile grid, Gaussian blending, stitching (in memory / out of core), streaming tiles."""
