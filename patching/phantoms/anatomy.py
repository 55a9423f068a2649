"""The chest phantom's anatomy, in world millimetres, independent of any voxel grid.

Coordinates are RAS+ (nibabel's canonical orientation): **+x points to the patient's RIGHT**
(so the patient's left, where the heart apex, the aortic arch and the descending aorta lie, has
negative x), **+y points anterior**, **+z points superior**. The origin is near the centre of the
chest. The spacing-free description is drawn once per seed by :func:`sample_chest`; the shapes
below are plain numpy functions of broadcastable coordinates, so the same code evaluates a
handful of points (tree growth) or a voxel block (rendering).

Shapes are signed distances (mm, positive inside) or close approximations of them: an ellipse's
``(1 - rho) * b`` is exact on its minor axis and within a factor a/b elsewhere, which is all the
one-voxel antialiasing ramp and the layer thicknesses need.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from patching.phantoms.body import BodyShape
from patching.phantoms.trees import Attractors, grow_tree, sample_inside


def catmull_rom(points, step_mm: float = 6.0) -> np.ndarray:
    """A smooth curve through ``points`` (K,3), sampled about every ``step_mm``."""
    p = np.asarray(points, float)
    ext = np.vstack([2 * p[0] - p[1], p, 2 * p[-1] - p[-2]])
    out = [p[:1]]
    for i in range(1, len(ext) - 2):
        p0, p1, p2, p3 = ext[i - 1], ext[i], ext[i + 1], ext[i + 2]
        n = max(1, int(np.ceil(np.linalg.norm(p2 - p1) / step_mm)))
        t = (np.arange(1, n + 1) / n)[:, None]
        out.append(0.5 * ((2 * p1) + (-p0 + p2) * t + (2 * p0 - 5 * p1 + 4 * p2 - p3) * t * t
                          + (-p0 + 3 * p1 - 3 * p2 + p3) * t ** 3))
    return np.vstack(out)


def polyline_segments(points, r0: float, r1: float | None = None) -> np.ndarray:
    """Segment rows ``x0 y0 z0 x1 y1 z1 r0 r1`` along a polyline, radius linear r0 -> r1."""
    p = np.asarray(points, float)
    r1 = r0 if r1 is None else r1
    rs = np.linspace(r0, r1, len(p))
    return np.hstack([p[:-1], p[1:], rs[:-1, None], rs[1:, None]])


def points_to_segments_distance(pts: np.ndarray, segs: np.ndarray) -> np.ndarray:
    """Distance from each point (N,3) to the surface of each tube (M rows): (N, M), + outside."""
    p0, p1 = segs[:, 0:3], segs[:, 3:6]
    d = p1 - p0
    l2 = np.maximum(np.einsum("ij,ij->i", d, d), 1e-9)
    v = pts[:, None, :] - p0[None]
    t = np.clip(np.einsum("nmk,mk->nm", v, d) / l2, 0.0, 1.0)
    r = segs[:, 6] + (segs[:, 7] - segs[:, 6]) * t
    closest = v - t[..., None] * d[None]
    return np.sqrt(np.einsum("nmk,nmk->nm", closest, closest)) - r


@dataclass
class Chest(BodyShape):
    """Every anatomical parameter of one phantom (mm, HU). Built by :func:`sample_chest`.

    The outline functions (cage, wall, arms, breasts, lungs) are in
    :class:`patching.phantoms.body.BodyShape`.
    """

    hu: dict
    # rib cage: ellipse semi-axes at its widest (ca lateral, c_ant / c_post from y = yc),
    # fractions of them at the thoracic inlet, cut flat at y = cav_back_y
    yc: float
    ca: float
    c_ant: float
    c_post: float
    fin_x: float
    fin_ant: float
    fin_post: float
    skin: float
    fat: float
    muscle_lat: float
    muscle_ant: float
    muscle_post: float
    pec: float  # extra anterior wall (pectoral muscles) at the upper chest
    scap_pad: float  # extra posterior wall over the scapulae
    belly: float  # extra anterior wall over the abdomen
    z_apex: float  # lung apex
    z_widest: float  # where the rib cage is widest
    z_dome_r: float  # top of the right hemidiaphragm
    z_dome_l: float
    dome_k: float
    dome_x: float
    dome_w: float
    lung_gap: float  # half width of the mediastinum between the lungs
    vb_rx: float  # vertebral body semi-axes
    vb_ry: float
    vb_period: float  # vertebra + disc height
    vb_disc: float
    vb_phase: float
    kyphosis: float
    cav_back_y: float = 0.0
    back_y: float = 0.0
    arms: list = field(default_factory=list)  # (humeral head, arm end, r head, r end) per side
    breasts: list = field(default_factory=list)  # (centre, semi-axes) per side, or none
    scapulae: list = field(default_factory=list)  # per side: triangle (|x|, z) corners, depth
    heart_center: np.ndarray = field(default_factory=lambda: np.zeros(3))
    heart_semi: tuple = (55.0, 40.0, 38.0)
    heart_rot: np.ndarray = field(default_factory=lambda: np.eye(3))
    tubes: dict = field(default_factory=dict)  # name -> segment rows (x0..z1, r0, r1[, gen])
    chambers: np.ndarray = field(default_factory=lambda: np.zeros((4, 6)))  # RA RV LA LV
    landmarks: dict = field(default_factory=dict)  # named points (mm)
    artery_side: np.ndarray = field(default_factory=lambda: np.zeros(0))  # +1 right, -1 left
    ribs: list = field(default_factory=list)  # per rib: (bone segments, cartilage segments)
    z_car: float = 0.0
    liver_height: float = 140.0

    # ----------------------------------------------------------------- diaphragm
    def dome(self, x, y):
        """Height of the diaphragm: two paraboloid domes, the right one higher (liver); they
        fall off gently anteriorly (the xiphoid level) and steeply posteriorly, where the
        costophrenic recesses reach lowest."""
        yd = self.yc - 10.0
        ry = ((y - yd) * np.where(y > yd, 0.6 / self.dome_w, 1.0 / self.dome_w)) ** 2
        right = self.z_dome_r - self.dome_k * (((x - self.dome_x) * (1.0 / self.dome_w)) ** 2 + ry)
        left = self.z_dome_l - self.dome_k * (((x + self.dome_x) * (1.0 / self.dome_w)) ** 2 + ry)
        return np.maximum(np.maximum(right, left), self.z_dome_r - 115.0)

    def sd_heart(self, x, y, z):
        """The heart: an egg along its long axis (base at the atria, narrower apex)."""
        c, (sa, sb, sc), rot = self.heart_center, self.heart_semi, self.heart_rot
        px, py, pz = x - float(c[0]), y - float(c[1]), z - float(c[2])
        u, v, w = ((px * float(r[0]) + py * float(r[1])) + pz * float(r[2]) for r in rot)
        taper = 1.0 - 0.3 * np.clip(u * (1.0 / sa), 0.0, 1.0)  # towards the apex
        q = (u * (1.0 / sa)) ** 2 + (v / (sb * taper)) ** 2 + (w / (sc * taper)) ** 2
        return (1.0 - np.sqrt(q)) * float(min(sb, sc))

    # ----------------------------------------------------------------- spine
    def y_vb(self, z):
        """Vertebral-body centre y: thoracic kyphosis bows the spine backwards mid-chest."""
        zm = self.z_apex - 120.0
        return self.cav_back_y + 0.6 * self.vb_ry + self.kyphosis * ((z - zm) / 180.0) ** 2

    def y_pm(self, z) -> float:
        """Anterior surface of the vertebral bodies (back of the posterior mediastinum)."""
        return float(self.y_vb(z) + self.vb_ry)


def _u(rng, lo, hi) -> float:
    return float(rng.uniform(lo, hi))


def _materials(rng: np.random.Generator) -> dict:
    """HU of each material for this phantom (before blur and noise). The ranges follow
    values published for chest CT(PA); ``benchmarks/phantom_hu.py`` checks the rendered
    phantoms against them and docs/data.md lists the sources."""
    pa = _u(rng, 290, 430)
    aorta = _u(rng, 160, 240)
    return {
        "air": -1000.0, "skin": _u(rng, 25, 50), "fat": _u(rng, -115, -90),
        "mediastinal_fat": _u(rng, -100, -75), "muscle": _u(rng, 42, 58),
        "soft_tissue": _u(rng, 30, 48), "abdomen": _u(rng, 25, 40), "myocardium": _u(rng, 42, 58),
        "liver": _u(rng, 50, 66), "spleen": _u(rng, 45, 55), "stomach": _u(rng, 5, 20),
        "lung": _u(rng, -890, -860), "lung_gradient": _u(rng, 25, 60),
        "lung_texture": _u(rng, 6, 12),
        "airway": _u(rng, -1000, -985), "pulmonary_artery": pa,
        "right_heart": float(np.clip(pa - _u(rng, 0, 40), 260, 450)),
        "svc": float(np.clip(pa + _u(rng, 0, 40), 260, 450)),
        "aorta": aorta, "left_heart": float(np.clip(aorta + _u(rng, -10, 10), 150, 250)),
        "ivc": _u(rng, 40, 60),
        "cortical": _u(rng, 1300, 1700), "rib_cortical": _u(rng, 1150, 1450),
        "cancellous": _u(rng, 130, 260), "disc": _u(rng, 70, 100), "cartilage": _u(rng, 100, 160),
        "spinal_canal": _u(rng, 15, 30), "embolus": _u(rng, 22, 38),
        "glandular": _u(rng, 20, 45),
    }


def _frame(u: np.ndarray) -> np.ndarray:
    """Rows: u, and two unit vectors completing a right-handed frame."""
    u = u / np.linalg.norm(u)
    v = np.cross([0.0, 0.0, 1.0], u)
    v /= np.linalg.norm(v)
    return np.stack([u, v, np.cross(u, v)])


def sample_chest(rng: np.random.Generator) -> Chest:
    """Draw one chest: body habitus, organ positions and sizes, vessel and airway trees."""
    hu = _materials(rng)
    z_dome_r = _u(rng, -95, -65)
    c_post = _u(rng, 64, 78)
    ch = Chest(
        hu=hu, yc=_u(rng, -8, 8), ca=_u(rng, 114, 138), c_ant=_u(rng, 74, 92), c_post=c_post,
        fin_x=_u(rng, 0.42, 0.52), fin_ant=_u(rng, 0.45, 0.6), fin_post=_u(rng, 0.8, 0.92),
        skin=_u(rng, 1.5, 2.5), fat=_u(rng, 5, 25), muscle_lat=_u(rng, 10, 16),
        muscle_ant=_u(rng, 9, 15), muscle_post=_u(rng, 32, 45), pec=_u(rng, 8, 22),
        scap_pad=_u(rng, 8, 18), belly=_u(rng, 0, 35),
        z_apex=z_dome_r + _u(rng, 190, 225), z_widest=z_dome_r + _u(rng, 5, 35),
        z_dome_r=z_dome_r, z_dome_l=z_dome_r - _u(rng, 8, 22), dome_k=_u(rng, 60, 85),
        dome_x=_u(rng, 55, 70), dome_w=_u(rng, 85, 100), lung_gap=_u(rng, 24, 32),
        vb_rx=_u(rng, 17, 21), vb_ry=_u(rng, 13, 16), vb_period=_u(rng, 22, 27),
        vb_disc=_u(rng, 4, 6.5), vb_phase=_u(rng, 0, 30), kyphosis=_u(rng, 0, 14),
    )
    ch.cav_back_y = ch.yc - 0.8 * c_post
    ch.back_y = ch.cav_back_y - ch.wall[2]
    ch.z_car = ch.z_apex - _u(rng, 95, 115)
    ch.liver_height = _u(rng, 120, 165)
    _place_girdle(ch, rng)
    _place_heart_and_vessels(ch, rng)
    _place_ribs(ch, rng)
    _grow_lung_trees(ch, rng)
    return ch


def _place_girdle(ch: Chest, rng: np.random.Generator) -> None:
    """Raised arms (humeral heads), scapulae and, in about half the phantoms, breasts."""
    a0 = float(ch.cage(ch.z_apex)[0])
    hx, hy, hz = a0 + _u(rng, 40, 52), ch.yc - 0.3 * ch.c_post, ch.z_apex + _u(rng, -5, 25)
    spread, fwd = _u(rng, 0.25, 0.45), _u(rng, -0.05, 0.15)
    r_head, r_arm = _u(rng, 44, 52), _u(rng, 36, 44)
    for s in (1, -1):
        head = np.array([s * hx, hy, hz])
        d = np.array([s * spread, fwd, 1.0])
        ch.arms.append((head, head + 350.0 * d / np.linalg.norm(d), r_head, r_arm))
        # Scapula: a triangle in (|x|, z) on the posterior chest wall; corners: superior
        # angle, inferior angle, lateral angle (the glenoid, next to the humeral head).
        ch.scapulae.append(np.array([[_u(rng, 48, 60), ch.z_apex + _u(rng, 0, 15)],
                                     [_u(rng, 68, 88), ch.z_apex - _u(rng, 125, 150)],
                                     [hx - 24.0, hz - 8.0]]))
    ch.landmarks["humeral_heads"] = [a[0] for a in ch.arms]
    if rng.random() < 0.45:
        zb = ch.z_dome_r + _u(rng, 40, 75)
        rb, proj = _u(rng, 55, 80), _u(rng, 25, 55)
        xb = _u(rng, 0.5, 0.62) * ch.ca
        a, ba, _ = ch.cage(zb)
        wl, wa, _ = ch.wall_at(zb)
        yf = ch.yc + float(ba + wa) * np.sqrt(max(0.0, 1.0 - (xb / float(a + wl)) ** 2))
        for s in (1, -1):
            c = np.array([s * (xb + _u(rng, -4, 4)), yf - 0.4 * proj, zb - 0.25 * rb])
            ch.breasts.append((c, (rb, proj, 0.9 * rb)))


def _place_heart_and_vessels(ch: Chest, rng: np.random.Generator) -> None:
    zc = ch.z_car
    ypm = ch.y_pm(zc)
    hc = np.array([-_u(rng, 12, 25), ypm + _u(rng, 56, 66), ch.z_dome_r + _u(rng, 30, 42)])
    axis = np.array([-0.55, 0.5, -0.55]) + rng.normal(0, 0.08, 3)
    ch.heart_center, ch.heart_rot = hc, _frame(axis)
    ch.heart_semi = (_u(rng, 52, 62), _u(rng, 38, 44), _u(rng, 36, 42))
    f = ch.heart_semi[0] / 57.0
    ch.chambers = np.array([  # centre offset from the heart centre (x, y, z), semi-axes; × f
        [+32, -8, +10, 22, 22, 24],  # right atrium
        [+5, +22, -5, 28, 14, 26],  # right ventricle
        [+8, -30, +18, 24, 14, 16],  # left atrium
        [-22, -2, -10, 20, 20, 28],  # left ventricle
    ], float) * f
    top = ch.z_apex + 250.0  # beyond any field of view
    bottom = ch.z_dome_r - 400.0
    y_tr = ypm + 26.0
    r_tr = _u(rng, 8, 10)
    carina = np.array([2.0, y_tr, zc])
    ch.tubes["trachea"] = polyline_segments(
        [[2.0, y_tr + 10, top], [2.0, y_tr + 6, zc + 60], carina], r_tr)
    rb_end = np.array([_u(rng, 40, 48), ypm + 20, zc - _u(rng, 28, 36)])
    lb_end = np.array([-_u(rng, 44, 52), ypm + 16, zc - _u(rng, 24, 32)])
    ch.tubes["bronchi"] = np.vstack([
        polyline_segments(catmull_rom([carina, carina + [14, -1, -14], rb_end]),
                          0.75 * r_tr, 0.6 * r_tr),
        polyline_segments(catmull_rom([carina, carina + [-22, -2, -12], lb_end]),
                          0.7 * r_tr, 0.55 * r_tr),
    ])
    ch.landmarks.update(carina=carina, right_bronchus=rb_end, left_bronchus=lb_end)
    ch.tubes["esophagus"] = polyline_segments(catmull_rom(
        [[-6, ypm + 9, top], [-6, ypm + 9, zc], [-12, ypm + 12, ch.z_dome_l + 10],
         [-40, ypm + 35, ch.z_dome_l - 25]], 12.0), 7.0)
    # Great vessels, anchored on the heart (valves) and the carina.
    av = hc + f * np.array([12, 2, 30])
    pv = hc + f * np.array([-2, 24, 30])
    bpa = np.array([-12.0, ypm + 45, zc - 12])
    r_asc, r_desc = _u(rng, 13, 16), _u(rng, 10, 12.5)
    xd = -(r_desc + 11.0)
    aorta = catmull_rom([av, av + [6, 8, 0.5 * (zc - 10 - av[2])], [av[0] + 4, av[1] + 6, zc - 5],
                         [0, ypm + 62, zc + 25], [-20, ypm + 45, zc + 36], [xd, ypm + 18, zc + 24],
                         [xd, ypm + r_desc - 1, zc - 20], [xd + 6, ypm + r_desc, ch.z_dome_l],
                         [-6, ypm + r_desc + 4, bottom]], 8.0)
    n = len(aorta)
    radii = np.interp(np.arange(n), [0, n // 3, n - 1], [r_asc, 0.9 * r_asc, r_desc])
    ch.tubes["aorta"] = np.hstack([aorta[:-1], aorta[1:], radii[:-1, None], radii[1:, None]])
    ch.tubes["arch_branches"] = np.vstack([
        polyline_segments([[8, ypm + 62, zc + 30], [18, ypm + 58, zc + 70],
                           [30, ypm + 50, top]], 6.5),
        polyline_segments([[-8, ypm + 55, zc + 38], [-12, ypm + 50, top]], 5.0),
        polyline_segments([[-18, ypm + 45, zc + 36], [-30, ypm + 38, zc + 70],
                           [-45, ypm + 30, top]], 5.5),
    ])
    ra = hc + ch.chambers[0, :3]
    ch.tubes["svc"] = polyline_segments(catmull_rom([[36, ypm + 62, top], [34, ypm + 62, zc + 20],
                                                     ra + [0, 5, 10]]), _u(rng, 9, 11))
    ch.tubes["ivc"] = polyline_segments(catmull_rom(
        [[24, ypm + 30, bottom], [24, ypm + 34, ch.z_dome_r - 20], ra + [-5, -5, -15]]),
        _u(rng, 11, 13))
    r_mpa = _u(rng, 12, 15)
    ch.tubes["mpa"] = polyline_segments(catmull_rom([pv, 0.5 * (pv + bpa) + [-6, 6, 0], bpa]),
                                        r_mpa, 0.9 * r_mpa)
    rh = np.array([_u(rng, 52, 60), ypm + 38, zc - 22])
    lh = np.array([-_u(rng, 50, 58), ypm + 26, zc - 4])
    r_rpa, r_lpa = _u(rng, 9, 11.5), _u(rng, 9, 11)
    ch.tubes["rpa"] = polyline_segments(catmull_rom([bpa, bpa + [24, -6, -6], rh]),
                                        r_rpa, 0.9 * r_rpa)
    ch.tubes["lpa"] = polyline_segments(catmull_rom([bpa, bpa + [-20, -8, 8], lh]),
                                        r_lpa, 0.9 * r_lpa)
    ch.landmarks.update(right_hilum=rh, left_hilum=lh, right_hilum_r=0.9 * r_rpa,
                        left_hilum_r=0.9 * r_lpa, left_atrium=hc + ch.chambers[2, :3])


def _place_ribs(ch: Chest, rng: np.random.Generator) -> None:
    drop0 = _u(rng, 50, 80)  # how far the ribs descend from back to front ("rib angle")
    r_rib = _u(rng, 4.0, 5.5)
    z1 = ch.z_apex + _u(rng, 0, 10)
    period = ch.vb_period * _u(rng, 0.95, 1.05)
    ends = [2.75, 2.8, 2.85, 2.85, 2.85, 2.8, 2.75, 2.45, 2.25, 2.05, 1.7, 1.35]
    for k in range(12):
        zk = z1 - k * period
        drop = drop0 * (0.7 + 0.08 * k) if k < 10 else drop0 * 0.5
        phi_end = ends[k] + _u(rng, -0.05, 0.05)
        phis = np.linspace(0.22, phi_end, 12)
        frac = (phis - phis[0]) / (np.pi - phis[0])
        for side in (1, -1):
            pts = [np.array([side * (ch.vb_rx + 6.0), ch.y_vb(zk) - 4.0, zk + 3.0])]
            for ph, fr in zip(phis, frac, strict=True):
                z = zk - drop * fr ** 1.15
                p = ch.cavity_point(ph, z, out=r_rib + 2.5)
                pts.append(np.array([side * p[0], p[1], z]))
            bone = polyline_segments(catmull_rom(pts, 10.0), r_rib)
            cart = np.zeros((0, 8))
            if k < 7:  # costal cartilage to the sternum
                cphis = np.linspace(phi_end, np.pi - 0.16, 4)
                cfr = (cphis - phis[0]) / (np.pi - phis[0])
                cpts = []
                for ph, fr in zip(cphis, cfr, strict=True):
                    z = zk - drop * min(fr, 1.0) ** 1.15 + 12.0 * (ph - phi_end)
                    p = ch.cavity_point(ph, z, out=r_rib + 2.5)
                    cpts.append([side * p[0], p[1], z])
                cart = polyline_segments(cpts, 0.9 * r_rib)
            ch.ribs.append((bone, cart))


def _coarsen(segs: np.ndarray, every: int = 4) -> np.ndarray:
    """Fewer, longer segments along a polyline (radius: the largest it replaces)."""
    pts = np.vstack([segs[:, :3], segs[-1:, 3:6]])
    idx = np.unique(np.r_[np.arange(0, len(pts), every), len(pts) - 1])
    r = np.maximum(segs[:, 6], segs[:, 7])
    rmax = [r[i:j].max() for i, j in zip(idx[:-1], idx[1:], strict=True)]
    return np.column_stack([pts[idx[:-1]], pts[idx[1:]], rmax, rmax])


def _keepout(ch: Chest) -> np.ndarray:
    """Mediastinal tubes that lung trees must not enter (coarse, chest part only)."""
    t = ch.tubes
    spine = np.array([[0, ch.y_vb(ch.z_apex + 100), ch.z_apex + 100,
                       0, ch.y_vb(ch.z_dome_r - 200), ch.z_dome_r - 200, 28, 28]], float)
    names = ("aorta", "mpa", "svc", "ivc", "trachea", "esophagus")
    segs = np.vstack([_coarsen(t[k]) for k in names]
                     + [t["arch_branches"], spine])
    zlo, zhi = ch.z_dome_r - 130.0, ch.z_apex + 10.0
    zmin, zmax = np.minimum(segs[:, 2], segs[:, 5]), np.maximum(segs[:, 2], segs[:, 5])
    return segs[(zmax >= zlo) & (zmin <= zhi)]


def _heart_exit(ch: Chest, start: np.ndarray, d: np.ndarray) -> np.ndarray:
    """First point along ``d`` from ``start`` that is 3 mm outside the heart."""
    steps = start + np.arange(1, 80)[:, None] * 2.0 * d
    out = np.flatnonzero(ch.sd_heart(steps[:, 0], steps[:, 1], steps[:, 2]) < -3.0)
    return steps[out[0]] if len(out) else steps[-1]


def _grow_lung_trees(ch: Chest, rng: np.random.Generator) -> None:
    keep = _keepout(ch)

    def inside_for(side):
        def inside(pts, margin):
            margin = np.broadcast_to(np.asarray(margin, float), (len(pts),))
            ok = ch.sd_lung(pts[:, 0], pts[:, 1], pts[:, 2], side) > margin
            idx = np.flatnonzero(ok)  # the costlier tests only for points inside the lung
            q, m = pts[idx], margin[idx]
            good = ch.sd_heart(q[:, 0], q[:, 1], q[:, 2]) < -m - 2.0
            good &= points_to_segments_distance(q, keep).min(axis=1) > m
            ok[idx] = good
            return ok
        return inside

    lm = ch.landmarks
    trees: dict[str, list] = {"artery_tree": [], "vein_tree": [], "airway_tree": []}
    trunks: list = []
    for side in (1, -1):
        name = "right" if side > 0 else "left"
        inside = inside_for(side)
        cx, cy, ax, by, apex = ch.lung_params(side)
        lo = [cx - ax, cy - by, ch.z_dome_r - 120]
        hi = [cx + ax, cy + by, apex]
        cloud = sample_inside(rng, inside, lo, hi, 800, margin=4.0)

        def jit(v):
            return np.asarray(v, float) + rng.normal(0, 0.15, 3)

        # Lobar branches: upper lobe up and out, middle lobe / lingula forward, lower lobe
        # down and back (x mirrored per side). Arteries leave the hilum, airways the bronchus.
        lobes = [jit([0.35 * side, 0.1, 0.95]), jit([0.55 * side, 0.65, -0.35]),
                 jit([0.35 * side, -0.45, -0.85])]
        hilum, r_h = lm[f"{name}_hilum"], lm[f"{name}_hilum_r"]
        art_roots = [(hilum, d, r_h * f) for d, f in zip(lobes, (0.8, 0.65, 0.85), strict=True)]
        trees["artery_tree"].append(grow_tree(rng, art_roots, inside, Attractors(cloud.copy()),
                                              r_min=0.5, max_generation=16, max_segments=3000))
        bronchus = lm[f"{name}_bronchus"]
        aw_roots = [(bronchus, d, 6.0 * f) for d, f in zip(lobes, (0.75, 0.6, 0.8), strict=True)]
        trees["airway_tree"].append(grow_tree(rng, aw_roots, inside, Attractors(cloud.copy()),
                                              r_min=0.9, max_generation=9, max_segments=500))
        # Superior and inferior pulmonary veins: trunks from the left atrium out of the heart.
        v_roots = []
        for dz in (8.0, -8.0):
            d = jit([side, -0.1, 0.5 * np.sign(dz)])
            d /= np.linalg.norm(d)
            start = lm["left_atrium"] + [0.0, 0.0, dz]
            ostium = _heart_exit(ch, start, d)
            rv = _u(rng, 5.5, 7.0)
            trunks.append([*start, *ostium, rv, rv])
            v_roots.append((ostium, d, rv))
        trees["vein_tree"].append(grow_tree(rng, v_roots, inside, Attractors(cloud.copy()),
                                            r_min=0.5, max_generation=15, max_segments=2000))
    for k, v in trees.items():
        ch.tubes[k] = np.vstack(v)  # (N, 9): segment rows and generation
    ch.tubes["pulmonary_veins"] = np.array(trunks, float)
    ch.artery_side = np.concatenate([np.full(len(t), s)
                                     for t, s in zip(trees["artery_tree"], (1, -1), strict=True)])
