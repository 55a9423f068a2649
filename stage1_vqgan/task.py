"""The 3D VQ-GAN on the shared training engine (``xray2ct train vqgan``).

The task protocol is in docs/training.md; this module never imports ``launch``. One step::

    out = models["vqgan"](x, ctx.generator)                   # recon, indices, quantizer stats
    if disc_active(step):                                     # delayed start (disc.start_step)
        ctx.backward(hinge_d(D(x), D(x̂.detach())), "disc")   # real + fake in one D forward
    with ctx.frozen("disc"):                                  # D gets no weight gradient here
        g_adv = -D(x̂)                                         # through the just-updated D
    ctx.backward(L1 + commit + λ_adaptive·g_adv, "vqgan")     # λ at ctx.unwrap("vqgan").last_layer

Distributed care: both updates call ``models[name](...)`` (DDP arms its gradient sync in
``forward``); the discriminator's second forward runs inside ``ctx.frozen`` (no reducer armed);
the quantizer all-reduces its codebook statistics inside the VQ-GAN's forward, which therefore
runs on every rank every micro-batch; no BatchNorm anywhere.

Resume: the codebook (``embed``, ``cluster_size``, ``embed_avg``) and its ``initialized`` flag
are buffers of the VQ-GAN, saved with its weights (and with its EMA weights), so a resumed run
never re-initialises the codebook. The quantizer draws its restart candidates from
``ctx.generator`` (checkpointed by the engine). The task's own extra state is the data spec the
model was trained with (HU window, voxel spacing): ``xray2ct encode`` reads it from the
checkpoint or export to map HU exactly as in training.

Validation (every ``train.val_every`` steps, EMA weights): ``data.num_val_tiles`` grid tiles of
the ``data.val_split`` split spread evenly over its cases; PSNR on [-1, 1] (data range 2.0), PSNR
in HU (data range = the HU window width), MAE in HU, 3D SSIM (:func:`patching.metrics.scores.ssim3d`),
codebook usage and perplexity over those tiles, and a tri-planar preview (input above
reconstruction) of the first tile.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from patching.data.preview import triplanar_image
from patching.data.spec import VolumeSpec, unit_to_hu
from patching.data.store import SPLITS, Store
from patching.errors import InputError
from patching.metrics.scores import ssim3d
from patching.tiling.tiles import TileDataset, hu_tile_to_unit

from .config import Stage1Config, _finite, _need, _triple
from .config import preset as stage1_preset
from .discriminator import PatchDiscriminator3d
from .losses import build_perceptual, disc_active, discriminator_loss, generator_loss
from .model import VQGAN

# --- configuration ----------------------------------------------------------------------------------


@dataclass
class VQGANDataConfig:
    """Training and validation tiles (``data.*``).

    Args:
        tile: training tile ``(x, y, z)``; ``None`` trains on the codec tile (``codec.tile``),
            which is what encoding uses.
        overlap: overlap of the tile grid that training jitters around and validation samples.
        cache_mb: decoded-chunk cache per DataLoader worker (:class:`patching.tiling.tiles.TileDataset`).
        val_split: split that validation reads (skipped with a note when it has no cases).
        num_val_tiles: grid tiles per validation, spread evenly over the split (0: all of them).
    """

    tile: tuple[int, int, int] | None = None
    overlap: float = 0.25
    cache_mb: int = 256
    val_split: str = "val"
    num_val_tiles: int = 16

    def __post_init__(self) -> None:
        if self.tile is not None:
            self.tile = tuple(self.tile)
            _need(_triple(self.tile), "data.tile", "needs three positive integers (or none)", self.tile)
        _need(_finite(self.overlap) and 0 <= self.overlap < 1, "data.overlap", "must be in [0, 1)", self.overlap)
        _need(isinstance(self.cache_mb, int) and self.cache_mb >= 0, "data.cache_mb", "must be an integer >= 0",
              self.cache_mb)
        _need(self.val_split in SPLITS, "data.val_split", f"must be one of {SPLITS}", self.val_split)
        _need(isinstance(self.num_val_tiles, int) and self.num_val_tiles >= 0, "data.num_val_tiles",
              "must be an integer >= 0", self.num_val_tiles)


@dataclass
class VQGANTaskConfig(Stage1Config):
    """The stage-1 sections (``model``, ``disc``, ``loss``, ``codec``) plus ``data``."""

    data: VQGANDataConfig = field(default_factory=VQGANDataConfig)

    def __post_init__(self) -> None:
        super().__post_init__()
        tile, f = self.train_tile, self.model.downsample
        if any(t % f for t in tile):
            raise InputError("data.tile", f"sizes {tile} must be multiples of the downsampling factor {f}")
        if min(tile) < self.disc.min_tile:
            raise InputError("data.tile", f"sides {tile} are smaller than the discriminator's minimum "
                                          f"{self.disc.min_tile} for disc.num_layers={self.disc.num_layers}")

    @property
    def train_tile(self) -> tuple[int, int, int]:
        return self.data.tile if self.data.tile is not None else self.codec.tile


# The engine's `train.*` defaults per preset (the presets' names are those of
# stage1_vqgan.config.PRESETS; no code branches on them).
TRAIN_DEFAULTS: dict[str, dict[str, Any]] = {
    # lr 5e-4: the model developer's overfit runs (2e-3 stalled at ~24 dB). Batch 2: torch
    # runs batch-1 3D convs this small on a slow native kernel. A short EMA for runs of a
    # few hundred steps, warmed up (train.ema_warmup) so it leaves the initialisation within
    # tens of steps; cosine decay to 10 % over the run's max_steps, so a step-budgeted run ends
    # averaged rather than at full rate (docs/results.md, "what was tried").
    "cpu-demo": {"lr": 5e-4, "batch_size": 2, "num_workers": 1, "ema_decay": 0.98, "val_every": 200,
                 "clip_grad": 0.0, "lr_decay": "cosine", "ema_warmup": True},
    # Medical Diffusion's vq_gan_3d.yaml (lr 3e-4); one 256×256×128 tile per GPU (the
    # preset's grad_accum of 4 makes 4 tiles per step per GPU); the engine's clip at 1.0
    # stays as a guard for the long adversarial phase.
    "ctpa-512": {"lr": 3e-4, "batch_size": 1, "ema_decay": 0.999, "val_every": 2000},
}


def task_config(preset: str) -> VQGANTaskConfig:
    base = stage1_preset(preset)
    return VQGANTaskConfig(model=base.model, disc=base.disc, loss=base.loss, codec=base.codec)


# --- the task ----------------------------------------------------------------------------------------


def _collate(samples: list[dict]) -> dict[str, Tensor]:
    """Only what training needs: the X-rays and case ids stay on the host."""
    return {"image": torch.stack([s["image"] for s in samples]),  # (B, 1, x, y, z) in [-1, 1]
            "start": torch.stack([s["start"] for s in samples])}


class VQGANTask:
    """Patch-wise 3D VQ-GAN (``stage1_vqgan``): presets ``cpu-demo`` and ``ctpa-512``
    (:mod:`stage1_vqgan.config`)."""

    name = "vqgan"
    ema_models = ("vqgan",)
    # Exported as diffusers-style folders (launch/export.py): model name → {key prefix in its state
    # dict: (folder, the Pretrained class, the config section that builds it)}.
    networks = {"vqgan": {"": ("vqgan", VQGAN, "model")}}

    def __init__(self) -> None:
        self.cfg: Any = None
        self.store: str | None = None
        self.spec: VolumeSpec | None = None
        self.perceptual: nn.Module | None = None
        self._val: tuple[TileDataset, list] | None = None

    # --- configuration ---------------------------------------------------------------------------

    def default_config(self, preset: str) -> VQGANTaskConfig:
        return task_config(preset)

    def train_defaults(self, preset: str) -> dict[str, Any]:
        return dict(TRAIN_DEFAULTS[preset])

    # --- models and optimisers ---------------------------------------------------------------------

    def build_models(self, cfg) -> dict[str, nn.Module]:
        self.cfg = cfg
        self.perceptual = build_perceptual(cfg.loss)  # frozen, not a model: never saved or exported
        return {"vqgan": VQGAN(cfg.model, seed=cfg.train.seed),
                "disc": PatchDiscriminator3d(cfg.disc, in_channels=cfg.model.in_channels)}

    def build_optimizers(self, cfg, models) -> dict[str, torch.optim.Optimizer]:
        betas = (0.5, 0.9)  # taming-transformers' VQGAN, both networks
        return {"vqgan": torch.optim.Adam(models["vqgan"].parameters(), lr=cfg.train.lr, betas=betas),
                "disc": torch.optim.Adam(models["disc"].parameters(), lr=cfg.train.lr, betas=betas)}

    # --- data -----------------------------------------------------------------------------------

    def build_dataset(self, cfg, store, preset, split, rank, world_size, seed) -> TileDataset:
        self.cfg, self.store, self.spec = cfg, str(store), preset
        d = cfg.data
        return TileDataset(store, split=split, tile=cfg.train_tile, hu_window=preset.hu_window, overlap=d.overlap,
                           mode="jitter", seed=seed, rank=rank, world_size=world_size,
                           batch_size=cfg.train.batch_size, num_workers=cfg.train.num_workers, cache_mb=d.cache_mb)

    def collate_fn(self, samples: list[dict]) -> dict[str, Tensor]:
        return _collate(samples)

    # --- one step --------------------------------------------------------------------------------

    def train_step(self, batch, models, step, ctx) -> dict[str, Tensor]:
        cfg = self.cfg
        x = batch["image"]  # (B, 1, x, y, z) in [-1, 1]
        out = models["vqgan"](x, ctx.generator)
        zero = x.new_zeros((), dtype=torch.float32)
        d_logs = {"loss_d": zero, "logits_real": zero, "logits_fake": zero}
        if disc_active(step, cfg.disc):  # host-side decision, the same on every rank
            d_loss, d_logs = discriminator_loss(models["disc"], x, out.recon, step=step, disc_cfg=cfg.disc)
            ctx.backward(d_loss, "disc")  # D steps here (end of the accumulation window)

        def frozen_disc(img: Tensor) -> Tensor:
            with ctx.frozen("disc"):
                return models["disc"](img)

        if self.perceptual is not None:
            self.perceptual.to(x.device)
        with ctx.autocast():  # the perceptual network is not an engine model: autocast it here
            g_loss, g_logs = generator_loss(
                x, out.recon, out.stats, frozen_disc, step=step, loss_cfg=cfg.loss, disc_cfg=cfg.disc,
                last_layer=ctx.unwrap("vqgan").last_layer, perceptual=self.perceptual, generator=ctx.generator)
        ctx.backward(g_loss, "vqgan")
        stats = {k: out.stats[k].detach() for k in ("perplexity", "usage", "ema_usage", "restarted")}
        return {**g_logs, **d_logs, **{f"codebook_{k}": v for k, v in stats.items()}}

    # --- state ---------------------------------------------------------------------------------------

    def extra_state(self) -> dict:
        """The data spec the model was trained with (the codebook lives in the model's buffers)."""
        spec = self.spec
        if spec is None:
            return {}
        return {"hu_window": [float(v) for v in spec.hu_window], "spacing_mm": [float(v) for v in spec.spacing_mm]}

    def load_extra_state(self, state: dict) -> None:
        saved = state.get("hu_window")
        if saved is not None and self.spec is not None and tuple(float(v) for v in saved) != self.spec.hu_window:
            raise InputError("--preset", f"the checkpoint was trained with HU window {tuple(saved)}, this preset "
                                         f"maps HU with {self.spec.hu_window}")

    # --- validation ------------------------------------------------------------------------------

    def _val_tiles(self) -> tuple[TileDataset, list] | None:
        if self._val is None:
            d = self.cfg.data
            if not Store(self.store).case_ids(d.val_split):
                print(f"[xray2ct] vqgan: no {d.val_split!r} cases in {self.store}; validation skipped",
                      file=sys.stderr, flush=True)
                self._val = (None, [])
            else:
                ds = TileDataset(self.store, split=d.val_split, tile=self.cfg.train_tile, hu_window=self.spec.hu_window,
                                 overlap=d.overlap, mode="grid", shuffle=False, cache_mb=d.cache_mb)
                items = ds.epoch_items()
                n = len(items) if d.num_val_tiles == 0 else min(d.num_val_tiles, len(items))
                pick = np.unique(np.linspace(0, len(items) - 1, n).round().astype(int))  # spread over the cases
                self._val = (ds, [items[i] for i in pick])
        return self._val if self._val[1] else None

    def validate(self, models, step, ctx) -> dict[str, Tensor]:
        """Reconstruction metrics of the EMA VQ-GAN on validation grid tiles.

        Every rank evaluates the same tiles (no collective; identical numbers on every rank and
        the same number of forwards, which FSDP's all-gathers need).
        """
        val = self._val_tiles() if self.store is not None else None
        if val is None:
            return {}
        ds, items = val
        model, window = models["vqgan"], self.spec.hu_window
        width = window[1] - window[0]
        se_unit = se_hu = ae_hu = ssim_sum = torch.zeros((), dtype=torch.float64)
        voxels = 0
        counts = torch.zeros(model.cfg.codebook_size, dtype=torch.float64)
        preview = None
        with_ssim = min(ds.tile) >= 11  # its Gaussian window (σ 1.5) spans 11 voxels
        bs = max(1, self.cfg.codec.batch_size)  # batches: torch's batch-1 CPU 3D convs are slow
        with ctx.ema_weights():
            for b0 in range(0, len(items), bs):
                chunk = items[b0:b0 + bs]
                tiles = [hu_tile_to_unit(ds.read_tile(it.case_index, it.start), window) for it in chunk]
                x = torch.stack(tiles)[:, None].to(ctx.device)  # (b, 1, x, y, z)
                with ctx.autocast():
                    out = model(x)  # eval mode: the codebook is not updated
                rec = out.recon.float().clamp(-1, 1)
                hu_x, hu_rec = unit_to_hu(x, window), unit_to_hu(rec, window)
                se_unit = se_unit + ((rec - x).double() ** 2).sum().cpu()
                se_hu = se_hu + ((hu_rec - hu_x).double() ** 2).sum().cpu()
                ae_hu = ae_hu + (hu_rec - hu_x).double().abs().sum().cpu()
                for j in range(x.shape[0] if with_ssim else 0):  # scikit-image's 3D SSIM, float64, CPU
                    ssim_sum = ssim_sum + ssim3d(hu_rec[j, 0], hu_x[j, 0], width, window=window)
                voxels += x.numel()
                counts += torch.bincount(out.indices.flatten().cpu(), minlength=counts.numel()).double()
                if b0 == 0:
                    it = chunk[0]
                    preview = self._preview(hu_x[0, 0].cpu().numpy(), hu_rec[0, 0].cpu().numpy(),
                                            f"{ds.case_ids[it.case_index]} {tuple(it.start)}")
        probs = counts / counts.sum().clamp_min(1.0)
        out = {
            "psnr": (10 * torch.log10(4.0 / (se_unit / voxels).clamp_min(1e-20))).float(),
            "psnr_hu_window": (10 * torch.log10(width**2 / (se_hu / voxels).clamp_min(1e-20))).float(),
            "mae_hu": (ae_hu / voxels).float(),
            "ssim": (ssim_sum / len(items)).float(),
            "codebook_usage": (counts > 0).float().mean(),
            "codebook_perplexity": torch.exp(-(probs * torch.log(probs + 1e-12)).sum()).float(),
            "preview": preview,
        }
        if not with_ssim:
            del out["ssim"]
        return out

    def _preview(self, hu_in: np.ndarray, hu_rec: np.ndarray, title: str) -> Tensor:
        """Input tile above its reconstruction, as an H×W image in [0, 1]."""
        rows = [np.asarray(triplanar_image(vol, self.spec.spacing_mm, height=128, title=t), dtype=np.float32)
                for vol, t in ((hu_in, f"input {title}"), (hu_rec, "VQ-GAN reconstruction (EMA)"))]
        width = max(r.shape[1] for r in rows)
        rows = [np.pad(r, ((0, 0), (0, width - r.shape[1]))) for r in rows]
        return torch.from_numpy(np.concatenate(rows, axis=0) / 255.0)

