"""The VQ-GAN's codec PSNR on a store's held-out cases: each case's stored latent decoded with the
VQ-GAN's tiled codec, scored against the ground truth like ``xray2ct evaluate`` scores a method
(clipped to the preset's HU window, data range its width), beside the mean training volume.

The ceiling of the latent-diffusion pipeline: a perfect stage 2 would score this.

    .venv/bin/python benchmarks/codec_psnr.py --store demo_out/phantoms.zarr --vqgan demo_out/runs/vqgan
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from patching.data.store import Store  # noqa: E402
from patching.metrics.scores import bootstrap_ci, psnr  # noqa: E402
from stage1_vqgan.codec import decode_latent  # noqa: E402
from stage1_vqgan.encode import load_vqgan  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--store", type=Path, required=True)
    p.add_argument("--vqgan", type=Path, required=True, help="the VQ-GAN whose latents the store holds")
    p.add_argument("--split", default="test")
    args = p.parse_args()
    store, vq = Store(args.store), load_vqgan(args.vqgan, device="cpu")
    lo, hi = vq.hu_window
    train = [np.clip(np.asarray(store.case(c).ct[...], np.float32), lo, hi) for c in store.case_ids("train")]
    mean = np.mean(train, axis=0)
    codec, base = [], []
    for cid in store.case_ids(args.split):
        case = store.case(cid)
        truth = np.clip(np.asarray(case.ct[...], np.float32), lo, hi)
        rec = decode_latent(vq.model, np.asarray(case.latent[...]), vq.codec.tile_latent, vq.codec.overlap,
                            hu_window=vq.hu_window, batch_size=vq.codec.batch_size, device="cpu")
        codec.append(psnr(np.clip(rec[0].numpy(), lo, hi), truth, hi - lo))
        base.append(psnr(mean, truth, hi - lo))
    out = {"split": args.split, "n": len(codec), "vqgan_step": vq.reference.get("step"),
           "codec_psnr_db": [round(v, 3) for v in bootstrap_ci(codec)],
           "mean_train_volume_psnr_db": [round(v, 3) for v in bootstrap_ci(base)]}
    print(json.dumps(out))
    print(f"codec PSNR {out['codec_psnr_db'][0]:.2f} dB [{out['codec_psnr_db'][1]:.2f}, {out['codec_psnr_db'][2]:.2f}]"
          f" vs mean training volume {out['mean_train_volume_psnr_db'][0]:.2f} dB, {len(codec)} {args.split} cases")
    return 0


if __name__ == "__main__":
    sys.exit(main())
