"""Painting a sampled :class:`~patching.phantoms.anatomy.Chest` onto a :class:`Canvas`.

The order is the anatomy's layering: later structures cover earlier ones. Body wall and
cavity first, then the abdomen below the diaphragm, the lungs, the mediastinum (heart, great
vessels, airways), bones, and last the pulmonary arteries and their emboli. Painting the
arteries last means nothing drawn afterwards can cover an arterial voxel, which is what keeps
every embolus inside an arterial lumen.
"""

from __future__ import annotations

import numpy as np

from patching.phantoms.anatomy import Chest, catmull_rom, polyline_segments
from patching.phantoms.body import smoothstep
from patching.phantoms.render import (
    Canvas,
    SmoothNoise,
    ellipsoid_sd,
    paint_ellipsoid,
    paint_tubes,
    ramp,
    segment_sd,
)

# Tissue classes of the optional label map (``synth_chest(..., return_labels=True)``).
TISSUE_CLASSES = {
    "air": 0, "skin": 1, "fat": 2, "muscle": 3, "lung": 4, "airway": 5, "soft_tissue": 6,
    "myocardium": 7, "pulmonary_artery": 8, "right_heart": 9, "left_heart": 10, "aorta": 11,
    "cortical_bone": 12, "cancellous_bone": 13, "cartilage": 14, "spinal_canal": 15,
    "liver": 16, "embolus": 17, "glandular": 18,
}
T = TISSUE_CLASSES
_EVERYWHERE = ([-1e9] * 3, [1e9] * 3)


def render_chest(cv: Canvas, ch: Chest, texture: SmoothNoise) -> None:
    hu = ch.hu
    _paint_body(cv, ch, texture)
    _paint_abdomen(cv, ch)
    for side in (1, -1):
        _paint_lung(cv, ch, side, texture)
    paint_tubes(cv, ch.tubes["esophagus"], hu["soft_tissue"], T["soft_tissue"])
    _paint_heart(cv, ch)
    for name in ("aorta", "arch_branches", "svc", "mpa"):  # a rim of mediastinal fat
        paint_tubes(cv, ch.tubes[name], hu["mediastinal_fat"], T["fat"], grow=4.0)
    paint_tubes(cv, ch.tubes["aorta"], hu["aorta"], T["aorta"])
    paint_tubes(cv, ch.tubes["arch_branches"], hu["aorta"], T["aorta"])
    paint_tubes(cv, ch.tubes["svc"], hu["svc"], T["right_heart"])
    paint_tubes(cv, ch.tubes["ivc"], hu["ivc"], T["soft_tissue"])
    paint_tubes(cv, ch.tubes["pulmonary_veins"], hu["left_heart"], T["left_heart"])
    paint_tubes(cv, ch.tubes["vein_tree"][:, :8], hu["left_heart"], T["left_heart"])
    _paint_airways(cv, ch)
    _paint_spine(cv, ch)
    _paint_ribs_sternum(cv, ch)
    _paint_girdle(cv, ch)
    for name in ("mpa", "rpa", "lpa"):
        paint_tubes(cv, ch.tubes[name], hu["pulmonary_artery"], T["pulmonary_artery"])
    paint_tubes(cv, ch.tubes["artery_tree"][:, :8], hu["pulmonary_artery"], T["pulmonary_artery"])


def _paint_body(cv: Canvas, ch: Chest, texture: SmoothNoise) -> None:
    """Skin, subcutaneous fat and muscle by depth below the skin (breasts: skin and fat only,
    their glandular tissue painted after), then the cavity inside the rib cage."""
    hu = ch.hu
    half = 0.5 * cv.width
    arms_z = ch.arms_low_z() if ch.arms else np.inf
    bbox = ch.breast_box()
    min_wall = min(ch.wall_at(np.linspace(ch.z_apex + 60.0, ch.z_dome_r - 200.0, 60))[0])
    for sl, x, y, z in cv.blocks(*_EVERYWHERE):
        sd_m = ch.sd_trunk(x, y, z)  # where the muscle layer is (trunk and arms)
        if float(z.max()) > arms_z:
            sd_m = np.maximum(sd_m, ch.sd_arms(x, y, z))
        sd = sd_m
        if bbox is not None and _overlaps(x, y, z, *bbox):
            sd = np.maximum(sd_m, ch.sd_breasts(x, y, z))
        if sd.max() <= -half:
            continue  # outside the body: the canvas is already air
        t_skin = ch.skin
        t_fat = t_skin + ch.fat * (1.0 + 0.5 * ch._bands(z)[2])  # (1, 1, bz): more over the abdomen
        view = cv.hu[sl]
        if sd_m.min() >= float(np.max(t_fat)) + half:
            view[...] = hu["muscle"]
            if cv.labels is not None:
                cv.labels[sl] = T["muscle"]
        else:
            acc = np.full(sd.shape, hu["air"], np.float32)
            for depth, dv, d in ((0.0, hu["skin"] - hu["air"], sd),
                                 (t_skin, hu["fat"] - hu["skin"], sd),
                                 (t_fat, hu["muscle"] - hu["fat"], sd_m)):
                a = ramp(d - depth, cv.width)
                a *= np.float32(dv)
                acc += a
            view[...] = acc
            if cv.labels is not None:  # 0 air, 1 skin, 2 fat, 3 muscle
                cv.labels[sl] = (sd > 0).view(np.uint8) + (sd > t_skin) + (sd_m > t_fat)
        if sd_m.max() > min_wall - cv.width:  # the cavity lies at least one wall deep
            cv.paint(sl, ch.sd_cavity(x, y, z), hu["mediastinal_fat"], T["fat"])
    for c, semi in ch.breasts:  # fibroglandular tissue: mottled blobs inside the breast fat
        inner = (c + np.array([0.0, 0.15 * semi[1], 0.05 * semi[2]]),
                 (0.62 * semi[0], 0.55 * semi[1], 0.55 * semi[2]))

        def blobs(x, y, z):
            sd = np.minimum((texture(x, y, z) + 0.3) * 5.0,
                            ch.sd_breasts(x, y, z) - (ch.skin + 4.0))
            return np.minimum(sd, (ch.skin + ch.fat) - ch.sd_trunk(x, y, z))  # not in muscle

        paint_ellipsoid(cv, *inner, hu["glandular"], T["glandular"], clip=blobs)


def _overlaps(x, y, z, lo, hi) -> bool:
    return (float(x.max()) >= lo[0] and float(x.min()) <= hi[0] and float(y.max()) >= lo[1]
            and float(y.min()) <= hi[1] and float(z.max()) >= lo[2] and float(z.min()) <= hi[2])


def _cavity_box(ch: Chest, zlo=-1e9, zhi=1e9):
    return [-ch.a, ch.back_y, zlo], [ch.a, ch.y_front, zhi]


def _paint_abdomen(cv: Canvas, ch: Chest) -> None:
    hu = ch.hu
    zr = ch.z_dome_r
    for sl, x, y, z in cv.blocks(*_cavity_box(ch, zhi=zr + 5)):
        dome = ch.dome(x, y)
        sd = np.minimum(ch.sd_cavity(x, y, z), (dome + 3.0) - z)  # up to the diaphragm's top
        cv.paint(sl, sd, hu["abdomen"], T["soft_tissue"])
    # Liver: under the right dome, its left edge and lower edge slanting.
    lo, hi = [-90, ch.back_y, zr - ch.liver_height - 80], [ch.a, ch.y_front, zr + 2]
    for sl, x, y, z in cv.blocks(lo, hi):
        sd = np.minimum(ch.sd_cavity(x, y, z) - 2.0, (ch.dome(x, y) - 1.0) - z)
        sd = np.minimum(sd, (x + 50.0) - 0.35 * (zr - z))
        sd = np.minimum(sd, z - (zr - ch.liver_height - 0.3 * x))
        cv.paint(sl, sd, hu["liver"], T["liver"])

    def under_dome(x, y, z):
        return np.minimum((ch.dome(x, y) - 1.0) - z, ch.sd_cavity(x, y, z) - 2.0)

    ca = 0.95 * ch.ca
    spleen_c = (-(ca - 30.0), ch.cav_back_y + 40.0, ch.z_dome_l - 45.0)
    paint_ellipsoid(cv, spleen_c, (22.0, 40.0, 45.0), hu["spleen"], T["soft_tissue"],
                    clip=under_dome)
    st_c = (-50.0, ch.cav_back_y + 85.0, ch.z_dome_l - 40.0)
    st_semi = (36.0, 30.0, 30.0)
    paint_ellipsoid(cv, st_c, st_semi, hu["stomach"], T["soft_tissue"], clip=under_dome)
    paint_ellipsoid(cv, st_c, st_semi, hu["air"], T["air"],
                    clip=lambda x, y, z: np.minimum(under_dome(x, y, z), z - (st_c[2] + 10.0)))


def _paint_lung(cv: Canvas, ch: Chest, side: int, texture: SmoothNoise) -> None:
    hu = ch.hu
    w = cv.width
    cx, cy, ax, by, apex = ch.lung_params(side)
    front, back = ch.cavity_front_y(0.0), ch.cav_back_y
    lo = [cx - ax, cy - by, ch.z_dome_r - 130.0]
    hi = [cx + ax, cy + by, apex + 1.0]
    for sl, x, y, z in cv.blocks(lo, hi):
        sd = ch.sd_lung(x, y, z, side)
        if sd.max() <= -0.5 * w:
            continue
        # Gravity: the dependent (posterior, supine) lung is denser.
        dep = np.clip((front - y) * (1.0 / (front - back)), 0.0, 1.0) * hu["lung_gradient"]
        value = texture(x, y, z)
        value *= np.float32(hu["lung_texture"])
        value += (dep + hu["lung"]).astype(np.float32)
        np.clip(value, -900.0, -700.0, out=value)
        cv.paint(sl, sd, value, T["lung"])


def _paint_heart(cv: Canvas, ch: Chest) -> None:
    hu = ch.hu
    c, semi, rot = ch.heart_center, ch.heart_semi, ch.heart_rot

    def above(shift):
        return lambda x, y, z: z - ch.dome(x, y) - shift

    fat_semi = tuple(s + 3.0 for s in semi)
    paint_ellipsoid(cv, c, fat_semi, hu["mediastinal_fat"], T["fat"], rot=rot, clip=above(2.0))
    paint_ellipsoid(cv, c, semi, hu["myocardium"], T["myocardium"], rot=rot, clip=above(3.0))

    def in_heart(x, y, z):  # chambers stay 4 mm inside the myocardium
        return np.minimum(ellipsoid_sd(x, y, z, c, semi, rot) - 4.0, z - ch.dome(x, y) - 6.0)

    # CTPA timing: contrast fills the right atrium and ventricle; the left heart is less dense.
    names = ("right_heart", "right_heart", "left_heart", "left_heart")  # RA, RV, LA, LV
    for row, name in zip(ch.chambers, names, strict=True):
        paint_ellipsoid(cv, c + row[:3], row[3:], hu[name], T[name], clip=in_heart)


def _paint_airways(cv: Canvas, ch: Chest) -> None:
    hu = ch.hu
    big = np.vstack([ch.tubes["trachea"], ch.tubes["bronchi"]])
    tree = ch.tubes["airway_tree"][:, :8]
    walls = tree.copy()
    walls[:, 6:8] = walls[:, 6:8] * 1.2 + 0.4
    paint_tubes(cv, big, hu["soft_tissue"], T["soft_tissue"], grow=2.0)
    paint_tubes(cv, walls, hu["soft_tissue"], T["soft_tissue"])
    paint_tubes(cv, big, hu["airway"], T["airway"])
    paint_tubes(cv, tree, hu["airway"], T["airway"])


def _paint_bone_tubes(cv: Canvas, segs: np.ndarray, cortical: float, hu: dict,
                      shell: float) -> None:
    """Cortical tubes, then their marrow: the union of the outer tubes minus that of the inner
    ones, so joints between segments show no cortical seams."""
    paint_tubes(cv, segs, cortical, T["cortical_bone"])
    inner = segs.copy()
    inner[:, 6:8] -= shell
    paint_tubes(cv, inner, hu["cancellous"], T["cancellous_bone"])


def _paint_spine(cv: Canvas, ch: Chest) -> None:
    """Vertebral bodies with cortical shells and end plates, discs, the neural arch (pedicles,
    laminae, transverse and spinous processes) and the spinal canal."""
    hu = ch.hu
    rx, ry, period, disc = ch.vb_rx, ch.vb_ry, ch.vb_period, ch.vb_disc
    rc, t_arch, shell = 8.0, 6.0, 1.3
    zs = cv.axes[2]
    yv = ch.y_vb(zs)
    lo = [-40.0, float(yv.min()) - ry - rc - 48.0, -1e9]
    hi = [40.0, float(yv.max()) + ry + 2.0, 1e9]
    for sl, x, y, z in cv.blocks(lo, hi):
        dy = y - ch.y_vb(z)  # (1, by, bz)
        dz = np.mod(z - ch.vb_phase, period)
        dz = np.minimum(dz - 0.5 * disc, (period - 0.5 * disc) - dz)  # > 0 within a vertebra
        xb = (x * (1.0 / rx)) ** 2
        rho = np.sqrt(xb + (dy * (1.0 / ry)) ** 2)
        sd_xy = (1.0 - rho) * ry
        body = np.minimum(sd_xy, dz)
        yc = dy + (ry + rc + 1.5)  # y relative to the canal centre
        dist_c = np.sqrt(x * x + yc * yc)
        arch = np.minimum((rc + t_arch) - dist_c, dz + 1.0)
        post = -yc  # mm behind the canal centre, (1, by, bz)
        dzs = np.mod(z + 0.45 * (post - rc) - ch.vb_phase, period)
        dzs = np.minimum(dzs - 0.5 * disc, (period - 0.5 * disc) - dzs) - 3.0
        tip = (ch.y_vb(z) - (ry + rc + 1.5)) - (ch.back_y + ch.skin + ch.fat + 4.0)  # (1,1,bz)
        spinous = np.minimum(np.minimum(post - (rc + 2.0), tip - post), dzs)
        spinous = np.minimum(spinous, 3.5 - np.abs(x))
        # Transverse processes: ~10 mm tall bars at mid-height of the vertebra.
        mid_band = dz - (0.5 * (period - disc) - 5.0)
        trans = np.minimum(np.minimum(5.0 - np.abs(yc - 2.0), mid_band), 28.0 - np.abs(x))
        bone = np.maximum(np.maximum(body, arch), np.maximum(spinous, trans))
        cv.paint(sl, bone, hu["cortical"], T["cortical_bone"])
        bone -= shell
        cv.paint(sl, bone, hu["cancellous"], T["cancellous_bone"])
        cv.paint(sl, np.minimum(sd_xy, -dz), hu["disc"], T["cartilage"])
        cv.paint(sl, rc - dist_c, hu["spinal_canal"], T["spinal_canal"])


def _paint_ribs_sternum(cv: Canvas, ch: Chest) -> None:
    hu = ch.hu
    bones = np.vstack([b for b, _ in ch.ribs])
    carts = np.vstack([c for _, c in ch.ribs if len(c)])
    _paint_bone_tubes(cv, bones, hu["rib_cortical"], hu, 1.2)
    paint_tubes(cv, carts, hu["cartilage"], T["cartilage"])
    # Sternum: manubrium (wider) from the jugular notch down to the xiphoid.
    z_top, z_xi = ch.z_car + 45.0, ch.z_dome_r + 5.0
    fy = ch.cavity_front_y(np.array([z_xi, z_top]))
    lo = [-30.0, float(fy.min()) - 2.0, z_xi]
    hi = [30.0, float(fy.max()) + 16.0, z_top]
    for sl, x, y, z in cv.blocks(lo, hi):
        ys = ch.cavity_front_y(z) + 7.0
        wz = 13.0 + 10.0 * smoothstep((z - (z_top - 45.0)) * (1.0 / 30.0))
        rho = np.sqrt((x * x) / (wz * wz) + ((y - ys) * (1.0 / 6.0)) ** 2)
        sd = np.minimum((1.0 - rho) * 6.0, np.minimum(z - z_xi, z_top - z))
        cv.paint(sl, sd, hu["cortical"], T["cortical_bone"])
        sd -= 1.3
        cv.paint(sl, sd, hu["cancellous"], T["cancellous_bone"])


def _paint_girdle(cv: Canvas, ch: Chest) -> None:
    """Clavicles, scapulae and humeri (the arms are raised)."""
    hu = ch.hu
    z_top = ch.z_car + 45.0  # jugular notch
    front = float(ch.cavity_front_y(z_top))
    segs = []
    for s, (head, tip, _, _) in zip((1, -1), ch.arms, strict=True):
        hx, hy, hz = (float(v) for v in head)
        # An S-shaped clavicle from the manubrium to the acromion above the humeral head.
        pts = [[s * 16.0, front + 9.0, z_top + 4.0], [s * 45.0, front + 12.0, z_top + 12.0],
               [s * (abs(hx) - 40.0), hy + 28.0, hz + 12.0], [s * (abs(hx) - 8.0), hy + 6.0, hz + 22.0]]
        segs.append(polyline_segments(catmull_rom(pts, 8.0), 6.0, 5.0))
        d = (tip - head) / np.linalg.norm(tip - head)
        segs.append(np.array([[*head, *head, 22.0, 22.0], [*head, *(head + 300.0 * d), 11.0, 10.0]]))
    _paint_bone_tubes(cv, np.vstack(segs), hu["rib_cortical"], hu, 1.5)
    for s, tri in zip((1, -1), ch.scapulae, strict=True):
        _paint_scapula(cv, ch, s, tri)


def _paint_scapula(cv: Canvas, ch: Chest, s: int, tri: np.ndarray) -> None:
    """A triangular blade halfway through the posterior chest wall, thicker along its lateral
    border and at the glenoid (corners ``tri``: superior, inferior, lateral angle in (|x|, z))."""
    hu = ch.hu
    (ux, uz), (vx, vz) = tri[1] - tri[0], tri[2] - tri[0]
    if ux * vz - uz * vx < 0:
        tri = tri[[0, 2, 1]]  # counter-clockwise in (|x|, z)
    edges = []
    for i in range(3):
        p, q = tri[i], tri[(i + 1) % 3]
        n = np.array([-(q - p)[1], (q - p)[0]]) / np.linalg.norm(q - p)  # inward normal
        edges.append((float(n[0]), float(n[1]), float(n @ p)))
    lat = int(np.argmax(tri[:, 0]))  # the glenoid corner
    gx, gz = (float(v) for v in tri[lat])
    lo_x, hi_x = float(tri[:, 0].min()) - 4.0, float(tri[:, 0].max()) + 12.0
    xs = (lo_x, hi_x) if s > 0 else (-hi_x, -lo_x)
    lo = [xs[0], ch.back_y, float(tri[:, 1].min()) - 4.0]
    hi = [xs[1], ch.yc, float(tri[:, 1].max()) + 12.0]
    for sl, x, y, z in cv.blocks(lo, hi):
        ax = x * float(s)
        inplane = None
        for nx, nz, c in edges:
            d = (ax * nx + z * nz) - c
            inplane = d if inplane is None else np.minimum(inplane, d)
        glen = np.sqrt((ax - gx) ** 2 + (z - gz) ** 2)
        half_t = 2.0 + 6.0 * np.clip(1.0 - glen * (1.0 / 30.0), 0.0, 1.0)
        # Depth: halfway between the rib cage (sd_cavity = 0) and the skin (sd_trunk = 0).
        mid = 0.5 * (-ch.sd_cavity(x, y, z) - ch.sd_trunk(x, y, z))
        sd = np.minimum(np.minimum(half_t - np.abs(mid), inplane), (ch.yc - 5.0) - y)
        cv.paint(sl, sd, hu["rib_cortical"], T["cortical_bone"])
        sd -= 1.5
        cv.paint(sl, sd, hu["cancellous"], T["cancellous_bone"])


# ------------------------------------------------------------------------- emboli
def _resample(points: np.ndarray, s0: float, s1: float, step: float = 4.0) -> np.ndarray:
    seg = np.linalg.norm(np.diff(points, axis=0), axis=1)
    s = np.concatenate([[0.0], np.cumsum(seg)])
    q = np.linspace(s0, s1, max(2, int(np.ceil((s1 - s0) / step)) + 1))
    return np.stack([np.interp(q, s, points[:, k]) for k in range(3)], axis=1)


def choose_emboli(ch: Chest, rng: np.random.Generator, voxel_mm: float) -> list[dict]:
    """Pick 1-3 arterial hosts big enough to show a clot at this voxel size; returns clots as
    ``{"host": segment rows, "clot": segment rows, ...}`` (clots centred in the lumen)."""
    num = int(rng.integers(1, 4))
    r_lo = max(2.5, 1.5 * voxel_mm)
    tree = ch.tubes["artery_tree"]
    sides = ch.artery_side
    hosts = []
    for row, side in zip(tree, sides, strict=True):
        r, length = 0.92 * row[6], float(np.linalg.norm(row[3:6] - row[:3]))
        if r >= r_lo and length >= 2.5 * r:
            what = (f"{'right' if side > 0 else 'left'} pulmonary artery branch "
                    f"(generation {int(row[8]) + 1})")
            hosts.append((row[:8][None], what))
    if len(hosts) < num:
        for name, what in (("rpa", "right pulmonary artery"), ("lpa", "left pulmonary artery")):
            if 0.9 * ch.tubes[name][0, 6] >= r_lo or not hosts:
                hosts.append((ch.tubes[name], what))
    pick = rng.choice(len(hosts), size=min(num, len(hosts)), replace=False)
    out = []
    for i in sorted(int(k) for k in pick):
        segs, what = hosts[i]
        pts = np.vstack([segs[:, :3], segs[-1:, 3:6]])
        total = float(np.sum(np.linalg.norm(np.diff(pts, axis=0), axis=1)))
        r_host = float(min(segs[:, 6].min(), segs[:, 7].min()))
        f = max(rng.uniform(0.55, 0.85), min(0.85, 0.9 * voxel_mm / r_host))
        rc = f * r_host
        length = min(rng.uniform(1.5, 4.0) * r_host, total - 2.0 * rc - 1.0)
        length = max(length, 0.0)
        lo, hi = rc + 0.5 * length, total - rc - 0.5 * length  # end caps stay in the host
        mid = rng.uniform(lo, hi) if hi > lo else 0.5 * total
        axis = _resample(pts, mid - 0.5 * length, mid + 0.5 * length)
        clot = np.hstack([axis[:-1], axis[1:], np.full((len(axis) - 1, 2), rc)])
        out.append({"host": segs, "clot": clot, "vessel": what, "radius_mm": rc,
                    "length_mm": length + 2 * rc, "center_mm": axis[len(axis) // 2].tolist()})
    return out


def paint_emboli(cv: Canvas, clots: list[dict], value: float) -> np.ndarray:
    """Paint clots (restricted to their host lumen) and return the uint8 embolus mask."""
    mask = np.zeros(cv.shape, dtype=np.uint8)
    w = cv.width
    for c in clots:
        clot, host = c["clot"], c["host"]
        rc = float(clot[0, 6])
        lo = np.minimum(clot[:, :3], clot[:, 3:6]).min(axis=0) - rc - w
        hi = np.maximum(clot[:, :3], clot[:, 3:6]).max(axis=0) + rc + w
        near = host[(np.minimum(host[:, :3], host[:, 3:6]) <= hi + 20).all(axis=1)
                    & (np.maximum(host[:, :3], host[:, 3:6]) >= lo - 20).all(axis=1)]
        count = 0
        for sl, x, y, z in cv.blocks(lo, hi):
            sd_c = None
            for s in clot:
                d = segment_sd(x, y, z, s[:3], s[3:6], s[6], s[7])
                sd_c = d if sd_c is None else np.maximum(sd_c, d)
            sd_l = None
            for s in near:
                d = segment_sd(x, y, z, s[:3], s[3:6], s[6], s[7])
                sd_l = d if sd_l is None else np.maximum(sd_l, d)
            sd = np.minimum(sd_c, sd_l)
            cv.paint(sl, sd, value, T["embolus"])
            inside = sd > 0
            mask[sl] |= inside.view(np.uint8)
            count += int(inside.sum())
        c["voxels"] = count
    return mask
