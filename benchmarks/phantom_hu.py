"""Per-tissue HU of the chest phantoms against values published for real chest CT(PA).

Renders a few phantoms (default: seeds 0-3, 192³ over 360 mm, i.e. 1.9 mm voxels, with the
default scanner blur and noise) with their tissue labels, pools each tissue's voxels — eroded by
one voxel to keep partial volume out where enough remain — and prints median, interquartile
range and the published range with its source. A tissue passes when its median lies in the
published range. Sources (full references in docs/data.md):

* [P] Prokop M, Galanski M. Spiral and Multislice Computed Tomography of the Body. Thieme 2003
  (HU table: lung in inspiration −910…−850, fat −100…−50, liver 45…65, spleen 35…55,
  blood 45…65, bone 700…3000).
* [A] Aubrey J et al. Measurement of skeletal muscle radiation attenuation and basis of its
  biological variation. Acta Physiol 2014;210:489-97 (segmentation ranges: adipose −190…−30,
  muscle −29…+150).
* [G] Goodpaster BH et al. J Appl Physiol 2000;89:104-10 (mean muscle attenuation 49 ± 3 HU
  lean, 39 ± 8 obese, 34 ± 4 obese with type 2 diabetes).
* [L] Lloyd S, Sahu A, Riordan R. Hong Kong J Radiol 2012;15:162-9 (main pulmonary artery
  ≥ 211 HU for adequate CTPA enhancement); [K] Kara M et al. Iran J Radiol 2018;15:e57928
  (> 350 HU targeted at 80-100 kV).
* [J] Jang S et al. Radiology 2019;291:360-7 (L1 trabecular bone: 226 ± 44 HU under 30 years,
  89 ± 38 HU at 90 years and over).

Run: ``.venv/bin/python benchmarks/phantom_hu.py`` (about a minute; exit status 1 if a median
falls outside its published range).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import record  # noqa: E402
from patching.phantoms.chest import TISSUE_CLASSES, synth_chest  # noqa: E402

# tissue class -> (low, high, source); None: reported, no published range checked.
PUBLISHED = {
    "air": (-1010, -990, "air −1000 by definition of the scale"),
    "fat": (-120, -50, "[P] −100…−50; [A] adipose −190…−30"),
    "muscle": (30, 60, "[G] 34-49 HU means; [A] −29…+150"),
    "lung": (-910, -800, "[P] −910…−850 in inspiration; dependent lung denser"),
    "airway": (-1010, -950, "air in the airways"),
    "liver": (45, 70, "[P] 45…65 unenhanced; early-phase enhancement adds a few HU"),
    "pulmonary_artery": (211, 600, "[L] ≥ 211 adequate; [K] > 350 targeted"),
    "right_heart": (211, 600, "right heart fills with the PA bolus [L]"),
    "cancellous_bone": (90, 270, "[J] L1 trabecular 89 (≥ 90 y) … 226 (< 30 y) HU"),
    "cortical_bone": None,  # at 1.9 mm mostly partial volume: see the 0.5 mm row
    "cortical_bone_0.5mm": (700, 3000, "[P] bone 700…3000"),
    "soft_tissue": None, "myocardium": None, "left_heart": None, "aorta": None,
    "cartilage": None, "spinal_canal": None, "embolus": None, "skin": None, "glandular": None,
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    ap.add_argument("--size", type=int, default=192)
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args()
    pooled: dict[str, list[np.ndarray]] = {k: [] for k in [*TISSUE_CLASSES, "cortical_bone_0.5mm"]}
    for seed in args.seeds:
        ph = synth_chest((args.size,) * 3, seed=seed, emboli=True, return_labels=True)
        for name, label in TISSUE_CLASSES.items():
            mask = ph.tissue == label
            core = ndi.binary_erosion(mask)
            pooled[name].append(ph.hu[core if core.sum() >= 50 else mask])
        # Cortical shells are 1-1.5 mm thick: at this grid they are mostly partial volume, as
        # in a thick-slice scan. Measure them also on a 0.5 mm grid around the spine (what a
        # thin-slice bone kernel shows), with the same blur and noise.
        bone = np.argwhere(ph.tissue == TISSUE_CLASSES["cancellous_bone"])
        ax = [(np.arange(n) - (n - 1) / 2.0) * s for n, s in zip(ph.hu.shape, ph.spacing_mm,
                                                                 strict=True)]
        mid = bone[np.abs(ax[0][bone[:, 0]]) < 15.0]
        centre = (0.0, float(np.median(ax[1][mid[:, 1]])), float(np.median(ax[2][mid[:, 2]])))
        zoom = synth_chest((64, 96, 48), seed=seed, fov_mm=(32.0, 48.0, 24.0), center_mm=centre,
                           return_labels=True)
        cort = zoom.tissue == TISSUE_CLASSES["cortical_bone"]
        pooled["cortical_bone_0.5mm"].append(zoom.hu[ndi.binary_erosion(cort) if cort.sum() > 0 else cort])
    rows, failed = {}, []
    print(f"{'tissue':18s} {'voxels':>8s} {'median':>7s} {'IQR':>15s}   published (source)")
    for name in pooled:
        v = np.concatenate(pooled[name]) if pooled[name] else np.zeros(0)
        if v.size == 0:
            continue
        q1, med, q3 = (float(x) for x in np.percentile(v, [25, 50, 75]))
        ref = PUBLISHED.get(name)
        ok = None if ref is None else bool(ref[0] <= med <= ref[1])
        if ok is False:
            failed.append(name)
        verdict = "" if ok is None else ("ok  " if ok else "OUT ")
        ref_txt = "not checked" if ref is None else f"{ref[0]}…{ref[1]} ({ref[2]})"
        print(f"{name:18s} {v.size:8d} {med:7.0f} {q1:7.0f}…{q3:<7.0f} {verdict}{ref_txt}")
        rows[name] = {"voxels": int(v.size), "median": round(med, 1), "q1": round(q1, 1),
                      "q3": round(q3, 1), "published": None if ref is None else list(ref[:2]),
                      "source": None if ref is None else ref[2], "in_range": ok}
    print("all checked medians in range" if not failed else f"OUT OF RANGE: {', '.join(failed)}")
    if not args.no_record:
        print("recorded:", record("phantom-hu", {"seeds": args.seeds, "size": args.size,
                                                "tissues": rows, "failed": failed}))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
