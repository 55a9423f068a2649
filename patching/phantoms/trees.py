"""Branching tubular trees (pulmonary arteries, veins, airways) grown in millimetres.

A tree grows breadth-first from root branches: each branch runs a few radii, then bifurcates
with Murray's law (r³ = r1³ + r2³) into an unequal pair at random angles in a random plane.
Children are steered towards unclaimed attractor points sampled inside the lung (a small
space-colonisation step), so the branches spread through the lung instead of bunching, and a
branch stops when its end would leave the lung or enter a keep-out tube (heart, mediastinal
vessels). Everything is drawn from the generator passed in; nothing depends on the voxel grid.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy.spatial import cKDTree

Inside = Callable[[np.ndarray, float], np.ndarray]  # (points (N,3), margin mm) -> bool (N,)


class Attractors:
    """Points inside the lung that pull nearby growing branches and are used up as they do."""

    def __init__(self, points: np.ndarray, kill_mm: float = 6.0, reach_mm: float = 50.0):
        self.points = points
        self.alive = np.ones(len(points), dtype=bool)
        self.kill2 = kill_mm ** 2
        self.reach2 = reach_mm ** 2

    def steer(self, pos: np.ndarray, d: np.ndarray, weight: float = 0.6) -> np.ndarray:
        """Bend unit directions ``d`` (N,3) at ``pos`` (N,3) towards the attractors ahead."""
        pts = self.points[self.alive]
        if len(pts) == 0 or len(pos) == 0:
            return d
        v = pts[None, :, :] - pos[:, None, :]  # (N, M, 3)
        d2 = np.einsum("nmk,nmk->nm", v, v)
        inv = 1.0 / np.sqrt(np.maximum(d2, 1e-9))
        cos = np.einsum("nmk,nk->nm", v, d) * inv
        ok = (cos > 0.55) & (d2 < self.reach2)
        m = np.einsum("nm,nmk->nk", ok * inv, v)  # sum of unit vectors to the chosen points
        norm = np.linalg.norm(m, axis=1, keepdims=True)
        m = np.where(norm > 1e-9, m / np.maximum(norm, 1e-9), 0.0)
        return _units(d + weight * m)

    def consume(self, pos: np.ndarray) -> None:
        """Retire the attractors within the kill distance of any of the points ``pos``."""
        idx = np.flatnonzero(self.alive)
        if len(pos) == 0 or len(idx) == 0:
            return
        dist, _ = cKDTree(pos).query(self.points[idx], distance_upper_bound=np.sqrt(self.kill2))
        self.alive[idx[np.isfinite(dist)]] = False


def _units(v: np.ndarray) -> np.ndarray:
    return v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-9)


def grow_tree(rng: np.random.Generator, roots, inside: Inside, attractors: Attractors, *,
              r_min: float, max_generation: int, max_segments: int,
              length_per_radius=(3.0, 6.0), max_length: float = 35.0,
              taper: float = 0.95, steer_radius: float = 1.0) -> np.ndarray:
    """Grow a tree, one generation at a time (vectorised over the generation's branches).

    ``roots``: iterable of ``(start point, direction, radius)``; root branches may start
    outside the lung (in the mediastinum), only their ends must lie inside.
    Returns segment rows ``x0 y0 z0 x1 y1 z1 r0 r1 generation``.
    """
    roots = list(roots)
    p = np.array([r[0] for r in roots], float).reshape(-1, 3)
    d = _units(np.array([r[1] for r in roots], float).reshape(-1, 3))
    r = np.array([r[2] for r in roots], float)
    out: list[np.ndarray] = []
    count = 0
    for gen in range(max_generation + 1):
        n = len(p)
        if n == 0 or count >= max_segments:
            break
        length = np.clip(r * rng.uniform(*length_per_radius, size=n), 3.0, max_length)
        placed = np.zeros(n, dtype=bool)
        drawn = length.copy()
        # Try the drawn length, then half of it; root branches (which start in the
        # mediastinum) may also reach further to get into the lung.
        for f in ((1.0, 1.5, 2.0, 2.5, 0.5) if gen == 0 else (1.0, 0.5)):
            todo = ~placed
            if not todo.any():
                break
            length[todo] = f * drawn[todo]
            e = p[todo] + length[todo, None] * d[todo]
            ok = inside(e, r[todo] + 0.5)
            if gen > 0:
                ok &= inside(p[todo] + 0.5 * length[todo, None] * d[todo], r[todo] + 0.5)
            placed[np.flatnonzero(todo)[ok]] = True
        if count + placed.sum() > max_segments:
            placed[np.flatnonzero(placed)[max_segments - count:]] = False
        p, d, r, length = p[placed], d[placed], r[placed], length[placed]
        e = p + length[:, None] * d
        out.append(np.column_stack([p, e, r, taper * r, np.full(len(p), gen)]))
        count += len(p)
        attractors.consume(e)
        # Bifurcation: Murray's law with an unequal pair at random angles in a random plane.
        r_end = taper * r
        q = rng.uniform(0.65, 1.0, size=len(p))
        r1 = r_end * (1.0 + q ** 3) ** (-1.0 / 3.0)
        r2 = q * r1
        perp = rng.standard_normal((len(p), 3))
        perp = _units(perp - np.einsum("nk,nk->n", perp, d)[:, None] * d)
        th1 = (rng.uniform(0.12, 0.45, size=len(p)) * (1.2 - 0.4 * q))[:, None]
        th2 = rng.uniform(0.55, 1.05, size=len(p))[:, None]
        d1 = np.cos(th1) * d + np.sin(th1) * perp
        d2 = np.cos(th2) * d - np.sin(th2) * perp
        p = np.vstack([e, e])
        d = _units(np.vstack([d1, d2]))
        r = np.concatenate([r1, r2])
        keep = r >= r_min
        p, d, r = p[keep], d[keep], r[keep]
        big = r >= steer_radius  # twigs keep their branching angles; steering costs N×M
        if big.any():
            d[big] = attractors.steer(p[big], d[big])
    if not out:
        return np.zeros((0, 9))
    return np.vstack(out)


def sample_inside(rng: np.random.Generator, inside: Inside, lo, hi, num: int,
                  margin: float = 2.0) -> np.ndarray:
    """``num`` (or fewer) points uniformly inside the region, by rejection from a box."""
    lo, hi = np.asarray(lo, float), np.asarray(hi, float)
    pts = rng.uniform(lo, hi, size=(num * 6, 3))
    pts = pts[inside(pts, margin)]
    return pts[:num]
