"""CNCL networks: two parallel U-Net predictors fused by a 1×1 convolution, and a 2D PatchGAN.

Generator (Geng et al., MICCAI 2021, as the seed describes it)::

    x  (B×1×H×W low-dose slice, project units [-1, 1])
    ├── content U-Net  → ĉ   (the clean image)
    ├── noise U-Net    → n̂   (the noise, so x − n̂ is a second estimate of the clean image)
    └── fusion: 1×1 conv over concat(ĉ, x − n̂)  → ŷ   (B×1×H×W)

Both predictors share one architecture (:class:`UNet`, separate weights): pix2pix-style
levels of 3×3 conv + InstanceNorm + LeakyReLU(0.2), stride-2 downsampling, transposed-conv
upsampling with skip concatenation, a linear 1×1 head. InstanceNorm rather than the seed's
BatchNorm: the engine's DDP broadcasts BatchNorm buffers from rank 0 every forward
(docs/training.md), and per-image statistics suit per-slice noise. The discriminator is a
conditional 2D PatchGAN (pix2pix's ``NLayerDiscriminator``): it sees concat(low-dose, image)
and returns a map of patch logits.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from patching.artifacts.pretrained import Pretrained
from patching.errors import InputError

from ..common import init_weights
from .config import CNCLModelConfig


def conv_block(cin: int, cout: int, num: int, norm: str = "none") -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(num):
        layers.append(nn.Conv2d(cin if i == 0 else cout, cout, 3, padding=1))
        if norm == "instance":
            layers.append(nn.InstanceNorm2d(cout, affine=True))
        layers.append(nn.LeakyReLU(0.2, inplace=True))
    return nn.Sequential(*layers)


class UNet(nn.Module):
    """One predictor: ``B×1×H×W → B×1×H×W`` (``H``, ``W`` multiples of ``2**num_levels``)."""

    def __init__(self, cfg: CNCLModelConfig):
        super().__init__()
        ch, n, norm = cfg.channels(), cfg.convs_per_level, cfg.norm
        self.stem = conv_block(1, ch[0], n, norm)
        self.down = nn.ModuleList(nn.Sequential(nn.Conv2d(ch[k], ch[k], 4, stride=2, padding=1),
                                                conv_block(ch[k], ch[k + 1], n, norm))
                                  for k in range(cfg.num_levels))
        self.up = nn.ModuleList(nn.ConvTranspose2d(ch[k + 1], ch[k], 2, stride=2) for k in range(cfg.num_levels))
        self.merge = nn.ModuleList(conv_block(2 * ch[k], ch[k], n, norm) for k in range(cfg.num_levels))
        self.head = nn.Conv2d(ch[0], 1, 1)

    def forward(self, x: Tensor) -> Tensor:
        skips = [self.stem(x)]  # level 0: B×C0×H×W
        for down in self.down:
            skips.append(down(skips[-1]))  # level k+1: B×C_{k+1}×H/2^{k+1}×W/2^{k+1}
        h = skips.pop()
        for k in reversed(range(len(self.up))):
            h = self.merge[k](torch.cat([self.up[k](h), skips[k]], dim=1))  # B×2C_k → B×C_k
        return self.head(h)


class CNCLGenerator(Pretrained):
    """``forward(lowdose) → denoised`` (``B×1×H×W``, project units); :meth:`branches` also
    returns the two predictors' outputs. Saves and loads with ``save_pretrained`` /
    ``from_pretrained`` (:mod:`patching.artifacts.pretrained`)."""

    config_class = CNCLModelConfig

    def __init__(self, cfg: CNCLModelConfig):
        super().__init__()
        cfg = self.cfg = self.init_config(cfg)
        self.content = UNet(cfg)
        self.noise = UNet(cfg)
        self.fusion = nn.Conv2d(2, 1, 1)
        init_weights(self, cfg.init_std)
        # Start the fusion at the noise branch's estimate x − n̂ (≈ x, as n̂ ≈ 0 at init): the
        # generator starts as the identity, the map the task is close to. With N(0, 0.02) (≈ 0·x)
        # or an equal-weight start (0.5·ĉ + 0.5·(x − n̂) ≈ 0.5·x) the first hundreds of steps go
        # to undoing the init, since the 1×1 conv moves by ~lr per step. The content weight is
        # learned from there (its gradient is Σ ∂L/∂ŷ · ĉ).
        with torch.no_grad():
            self.fusion.weight.copy_(torch.tensor([0.0, 1.0]).view(1, 2, 1, 1))
            self.fusion.bias.zero_()

    def check(self, x: Tensor) -> None:
        m = 2 ** self.cfg.num_levels
        if not isinstance(x, Tensor) or x.dim() != 4 or x.shape[1] != 1 or x.shape[2] % m or x.shape[3] % m:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise InputError("lowdose", f"expected B×1×H×W slices with H, W multiples of {m}, got {shape}")

    def branches(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(content, noise, fused)``, each ``B×1×H×W``."""
        self.check(x)
        content, noise = self.content(x), self.noise(x)
        fused = self.fusion(torch.cat([content, x - noise], dim=1))  # B×2×H×W → B×1×H×W
        return content, noise, fused

    def forward(self, x: Tensor) -> Tensor:
        return self.branches(x)[2]


class PatchDiscriminator2D(Pretrained):
    """pix2pix's conditional PatchGAN: ``forward(lowdose, image) → B×1×h×w`` patch logits."""

    config_class = CNCLModelConfig

    def __init__(self, cfg: CNCLModelConfig):
        super().__init__()
        cfg = self.init_config(cfg)
        c = cfg.d_channels
        layers: list[nn.Module] = [nn.Conv2d(2, c, 4, stride=2, padding=1), nn.LeakyReLU(0.2, inplace=True)]
        for k in range(1, cfg.num_d_layers + 1):
            cin, cout = c * 2 ** min(k - 1, 3), c * 2 ** min(k, 3)
            stride = 2 if k < cfg.num_d_layers else 1  # the last one keeps the size (pix2pix)
            layers += [nn.Conv2d(cin, cout, 4, stride=stride, padding=1), nn.InstanceNorm2d(cout, affine=True),
                       nn.LeakyReLU(0.2, inplace=True)]
        layers.append(nn.Conv2d(c * 2 ** min(cfg.num_d_layers, 3), 1, 4, stride=1, padding=1))
        self.model = nn.Sequential(*layers)
        init_weights(self, cfg.init_std)

    def forward(self, lowdose: Tensor, image: Tensor) -> Tensor:
        return self.model(torch.cat([lowdose, image], dim=1))  # B×2×H×W → B×1×h×w


def build(cfg: CNCLModelConfig) -> tuple[CNCLGenerator, PatchDiscriminator2D]:
    return CNCLGenerator(cfg), PatchDiscriminator2D(cfg)
