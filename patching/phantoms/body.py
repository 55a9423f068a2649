"""The torso's outline along z: rib cage, chest wall, shoulders and raised arms, breasts, lungs.

Coordinates are RAS+ millimetres (+x the patient's right, +y anterior, +z superior), as in
:mod:`patching.phantoms.anatomy`. Every cross-section is an ellipse whose semi-axes are smooth
functions of z, so the outline changes the way a chest does:

* the **rib cage** (the thoracic cavity's boundary) is bell-shaped: narrow at the thoracic
  inlet (the first rib ring), widening quickly below it and widest at the lower ribs, then
  slightly narrower over the upper abdomen; above the inlet it closes to the neck;
* the **chest wall** (skin, subcutaneous fat, muscle) is thicker anteriorly at the upper chest
  (pectoral muscles) and posteriorly over the scapulae, with more fat over the abdomen and an
  optional abdominal protrusion;
* the **arms** are raised, as in a CT pulmonary angiogram: a capsule from each humeral head
  upwards and outwards, so the top slices show the shoulders and the axillae;
* **breasts** (in about half of the phantoms) sit on the anterior chest wall at the level of
  the 4th-6th ribs.

Signed distances are positive inside. The ellipse distance uses the first-order estimate
``(1 - rho) / |grad rho|``, accurate within a few per cent near the boundary, so layer
thicknesses (skin, fat) are in millimetres all round the outline.
"""

from __future__ import annotations

import numpy as np


def smoothstep(t):
    t = np.clip(t, 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def ellipse_sd(x, yr, a, b_ant, b_post):
    """Approximate signed distance (mm, + inside) to an ellipse centred at the origin with
    semi-axes ``a`` (x) and ``b_ant`` / ``b_post`` (y > 0 / y < 0); broadcastable arrays."""
    b = np.where(yr > 0, b_ant, b_post)
    xt = x / a
    yt = yr / b
    r2 = xt * xt + yt * yt
    rho = np.sqrt(r2)
    g = np.sqrt((xt / a) ** 2 + (yt / b) ** 2)  # |grad rho| * rho
    return (1.0 - rho) * rho / np.maximum(g, 1e-6)


def capsule_sd(x, y, z, p0, p1, r0, r1):
    """Signed distance to a truncated cone with round caps (small arrays; not for hot loops)."""
    p0, p1 = np.asarray(p0, float), np.asarray(p1, float)
    d = p1 - p0
    l2 = float(d @ d)
    px, py, pz = x - float(p0[0]), y - float(p0[1]), z - float(p0[2])
    t = np.clip((px * float(d[0]) + py * float(d[1]) + pz * float(d[2])) * (1.0 / l2), 0.0, 1.0)
    qx, qy, qz = px - t * float(d[0]), py - t * float(d[1]), pz - t * float(d[2])
    return (float(r0) + (float(r1) - float(r0)) * t) - np.sqrt(qx * qx + qy * qy + qz * qz)


class BodyShape:
    """Mixin of :class:`patching.phantoms.anatomy.Chest`: the outline functions.

    Uses the Chest's fields ``yc ca c_ant c_post fin_x fin_ant fin_post z_apex z_widest
    skin fat muscle_lat muscle_ant muscle_post pec scap_pad belly cav_back_y back_y
    arms breasts lung_gap z_car`` and the spine's ``y_pm``.
    """

    # ------------------------------------------------------------- rib cage
    def _bands(self, z):
        """(g, neck, abdomen): the cage's widening below the inlet (0 at the inlet, 1 at its
        widest), the closing into the neck above it, and the depth into the abdomen."""
        top = self.z_apex + 10.0
        t = np.clip((top - z) * (1.0 / (top - self.z_widest)), 0.0, 1.0)
        g = 1.0 - (1.0 - t) ** 2  # quick widening just below the inlet, flat lower down
        neck = smoothstep((z - top) * (1.0 / 70.0))
        abdomen = smoothstep((self.z_widest - z) * (1.0 / 140.0))
        return g, neck, abdomen

    def cage(self, z):
        """Semi-axes (lateral, anterior, posterior) of the thoracic cavity at height z."""
        g, neck, abd = self._bands(z)
        fx = self.fin_x * (1.0 - 0.45 * neck) + (1.0 - self.fin_x) * g - 0.05 * abd
        fa = self.fin_ant * (1.0 - 0.3 * neck) + (1.0 - self.fin_ant) * g
        fp = self.fin_post + (1.0 - self.fin_post) * g
        return self.ca * fx, self.c_ant * fa, self.c_post * fp

    def wall_at(self, z):
        """Chest wall thickness (lateral, anterior, posterior) at height z, skin included."""
        g, neck, abd = self._bands(z)
        upper = smoothstep((z - (self.z_apex - 170.0)) * (1.0 / 60.0)) * (1.0 - neck)
        fat = self.fat * (1.0 + 0.5 * abd)
        sf = self.skin + fat
        lat = sf + self.muscle_lat * (1.0 - 0.5 * neck)
        ant = sf + self.muscle_ant + self.pec * upper + self.belly * abd
        post = sf + self.muscle_post + self.scap_pad * upper
        return lat, ant, post

    # ------------------------------------------------------------- outlines
    def sd_trunk(self, x, y, z):
        """The torso without arms and breasts (flat where the back lies on the table)."""
        a, ba, bp = self.cage(z)
        wl, wa, wp = self.wall_at(z)
        sd = ellipse_sd(x, y - self.yc, a + wl, ba + wa, bp + wp)
        return np.minimum(sd, y - self.back_y)

    def sd_arms(self, x, y, z):
        """Both raised arms (shoulder capsules); -inf-like far below the shoulders."""
        out = None
        for head, tip, r0, r1 in self.arms:
            d = capsule_sd(x, y, z, head, tip, r0, r1)
            out = d if out is None else np.maximum(out, d)
        return out

    def arms_low_z(self) -> float:
        return min(float(h[2]) - r0 for h, _, r0, _ in self.arms)

    def sd_breasts(self, x, y, z):
        out = None
        for c, s in self.breasts:
            px, py, pz = (x - float(c[0])) / s[0], (y - float(c[1])) / s[1], (z - float(c[2])) / s[2]
            d = (1.0 - np.sqrt(px * px + py * py + pz * pz)) * float(min(s))
            out = d if out is None else np.maximum(out, d)
        return out

    def breast_box(self):
        """(lo, hi) mm box around the breasts, or None."""
        if not self.breasts:
            return None
        lo = np.min([np.asarray(c) - np.asarray(s) for c, s in self.breasts], axis=0) - 2.0
        hi = np.max([np.asarray(c) + np.asarray(s) for c, s in self.breasts], axis=0) + 2.0
        return lo, hi

    def sd_body(self, x, y, z):
        """The whole outline: trunk, arms and breasts (their union)."""
        sd = self.sd_trunk(x, y, z)
        if self.arms and float(np.max(z)) > self.arms_low_z():
            sd = np.maximum(sd, self.sd_arms(x, y, z))
        if self.breasts:
            sd = np.maximum(sd, self.sd_breasts(x, y, z))
        return sd

    def sd_cavity(self, x, y, z):
        """The inside of the rib cage (pleural and mediastinal space, then the abdomen)."""
        a, ba, bp = self.cage(z)
        return np.minimum(ellipse_sd(x, y - self.yc, a, ba, bp), y - self.cav_back_y)

    @property
    def wall(self) -> tuple[float, float, float]:
        """Chest wall thickness at mid-chest (lateral, anterior, posterior)."""
        return tuple(float(v) for v in self.wall_at(0.5 * (self.z_apex + self.z_widest)))

    def cavity_point(self, phi, z, out: float = 0.0):
        """Point on the cavity boundary (pushed ``out`` mm outwards) at angle ``phi`` from the
        posterior midline (phi = 0 posterior, pi anterior), on the patient's right (+x)."""
        a, ba, bp = (float(v) for v in self.cage(z))
        b = (bp if np.cos(phi) > 0 else ba) + out
        x, y = (a + out) * np.sin(phi), self.yc - b * np.cos(phi)
        return np.array([x, max(y, self.cav_back_y - out), z])

    def cavity_front_y(self, z):
        return self.yc + self.cage(z)[1]

    def body_front_y(self, z):
        return self.yc + self.cage(z)[1] + self.wall_at(z)[1]

    @property
    def a(self) -> float:
        """Largest half width of the trunk (arms excluded)."""
        zs = np.linspace(self.z_widest - 150.0, self.z_apex, 40)
        a, _, _ = self.cage(zs)
        return float(np.max(a + self.wall_at(zs)[0]))

    @property
    def y_front(self) -> float:
        zs = np.linspace(self.z_widest - 200.0, self.z_apex, 40)
        return float(np.max(self.body_front_y(zs)))

    # ------------------------------------------------------------- lungs
    def lung_params(self, side: int):
        """Bounding ellipse of one lung: (centre x, centre y, semi x, semi y, apex z);
        side +1 right, -1 left. The lung is the cavity lateral to the mediastinum."""
        gap = 6.0  # the anterior junction line (mediastinum_half_width)
        ax = 0.5 * (self.ca - gap) + 2.0
        front = self.yc + self.c_ant
        cy = 0.5 * (front + self.cav_back_y)
        by = 0.5 * (front - self.cav_back_y) + 2.0
        apex = self.z_apex + (4.0 if side > 0 else 0.0)
        # Python floats: numpy float64 scalars would turn float32 voxel blocks into float64.
        return float(side * (gap + ax)), float(cy), float(ax), float(by), float(apex)

    def mediastinum_half_width(self, y, z, side: int):
        """Half width of the mediastinum between the lungs: the lungs reach the vertebral
        bodies posteriorly and almost meet behind the sternum (the anterior junction line; the
        heart pushes them aside lower down, :meth:`sd_lung`); the left lung stays clear of
        the descending aorta."""
        ypm = self.y_vb(z) + self.vb_ry  # front of the vertebral bodies, (1, 1, bz)
        t_ant = smoothstep((y - (ypm + 80.0)) * (1.0 / 20.0))
        t_post = smoothstep((ypm + 2.0 - y) * (1.0 / 15.0))
        gap = self.lung_gap + (6.0 if side < 0 else 0.0)
        return gap + (8.0 - gap) * t_ant + (self.vb_rx + 4.0 - gap) * t_post

    def sd_lung(self, x, y, z, side: int):
        gap = self.lung_gap + (6.0 if side < 0 else 0.0)
        apex = self.z_apex + (4.0 if side > 0 else 0.0)
        a0 = float(self.cage(self.z_apex)[0])
        xa = side * 0.5 * (gap + a0)
        ya = self.yc - 0.25 * self.c_post
        # Apex: a dome of ~60 mm radius over the lung top (posterior, above the first rib's
        # anterior part), then the cage, the mediastinum and the diaphragm.
        top = (apex - z) - ((x - xa) ** 2 + (y - ya) ** 2) * (1.0 / 120.0)
        sd = np.minimum(self.sd_cavity(x, y, z) - 2.0,
                        side * x - self.mediastinum_half_width(y, z, side))
        sd = np.minimum(sd, top)
        sd = np.minimum(sd, z - self.dome(x, y) - 3.0)
        # The heart and its pericardial fat push the lungs aside.
        r = float(max(self.heart_semi)) + 8.0
        c = self.heart_center
        if all(float(np.min(v)) < float(c[i]) + r and float(np.max(v)) > float(c[i]) - r
               for i, v in enumerate((x, y, z))):
            sd = np.minimum(sd, -4.0 - self.sd_heart(x, y, z))
        return sd
