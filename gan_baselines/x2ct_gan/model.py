"""X2CT-GAN networks (Ying et al., CVPR 2019): 2D DenseNet encoders → 3D decoder, 3D PatchGAN.

Per view, a *branch*: a 2D DenseNet-like encoder of the X-ray; **connection A** (a fully
connected layer from the pooled code to a small 3D grid) starts the 3D decoder; **connection B**
lifts each encoder level's 2D feature map into 3D (1×1 conv, repeat along the view's depth axis,
3×3×3 conv) and feeds it to the decoder level of the same size as a skip. The biplanar model
runs a PA and a lateral branch side by side and, at every decoder level, **connection C**
permutes both branches' 3D features into the volume frame ``[x, y, z]`` and averages them; the
average goes back into both branches and into a third, *fusion* decoder whose output is the CT.

Frames: a branch works in its own frame ``B×C×D×R×K`` (depth along its beam, the X-ray's row
and col); :func:`gan_baselines.common.branch_to_volume` is connection C's permutation. The
output is always ``B×1×X×Y×Z`` in RAS+, values in ``cfg.value_range`` ([0, 1] in the paper).

Layer recipe as in the released code (kylekma/X2CT ``dense_generator_multiview.py``): stem
reflect-pad + 7×7 conv; each encoder level norm-ReLU-3×3/2 conv, a dense block (norm-ReLU-1×1,
norm-ReLU-3×3, concatenate), a 1×1 transition halving the channels (the last level: global
average pool instead); decoder levels: [concat skip → 3×3×3 conv] → n × 3×3×3 conv →
3×3×3/2 transposed conv; every norm InstanceNorm (2D in encoders, 3D in decoders), ReLU.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor, nn

from patching.artifacts.pretrained import Pretrained
from patching.errors import InputError

from ..common import branch_to_volume, check_xrays, expand_to_branch, init_weights, volume_to_branch
from .config import X2CTGANModelConfig


def norm2d(channels: int) -> nn.Module:
    return nn.InstanceNorm2d(channels, affine=False)


def norm3d(channels: int) -> nn.Module:
    return nn.InstanceNorm3d(channels, affine=False)


def output_activation(name: str) -> nn.Module:
    return {"relu": nn.ReLU, "leaky_relu": nn.LeakyReLU, "sigmoid": nn.Sigmoid, "tanh": nn.Tanh,
            "identity": nn.Identity}[name]()


def conv3d_block(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv3d(cin, cout, 3, padding=1), norm3d(cout), nn.ReLU(inplace=True)]


def up3d_block(cin: int, cout: int) -> list[nn.Module]:
    """×2 upsampling: 3×3×3 transposed conv, stride 2 (the paper's ``upsample_mode='transposed'``)."""
    return [nn.ConvTranspose3d(cin, cout, 3, stride=2, padding=1, output_padding=1), norm3d(cout),
            nn.ReLU(inplace=True)]


# --- 2D encoder ------------------------------------------------------------------------------


class DenseLayer2D(nn.Module):
    """norm-ReLU-1×1 conv (bottleneck) → norm-ReLU-3×3 conv (growth); output concatenated to input."""

    def __init__(self, cin: int, growth: int, bottleneck: int):
        super().__init__()
        mid = bottleneck * growth
        self.body = nn.Sequential(norm2d(cin), nn.ReLU(inplace=False), nn.Conv2d(cin, mid, 1),
                                  norm2d(mid), nn.ReLU(inplace=True), nn.Conv2d(mid, growth, 3, padding=1))

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([x, self.body(x)], dim=1)


class ViewEncoder(nn.Module):
    """A view's 2D DenseNet encoder: ``B×1×S×S`` → per-level feature maps and a pooled code.

    ``skip_channels[i]`` is the width of the map entering level ``i`` (side ``S / 2**i``),
    ``code_channels`` that of the pooled ``B×C`` code after the last level.
    """

    def __init__(self, cfg: X2CTGANModelConfig):
        super().__init__()
        c = cfg.stem_channels
        self.stem = nn.Sequential(nn.ReflectionPad2d(3), nn.Conv2d(1, c, 7), norm2d(c), nn.ReLU(inplace=True))
        self.levels = nn.ModuleList()
        self.skip_channels: list[int] = []
        last = len(cfg.num_dense_layers) - 1
        for i, num_layers in enumerate(cfg.num_dense_layers):
            self.skip_channels.append(c)
            layers: list[nn.Module] = [norm2d(c), nn.ReLU(inplace=False), nn.Conv2d(c, c, 3, stride=2, padding=1)]
            for j in range(num_layers):
                layers.append(DenseLayer2D(c + j * cfg.growth_rate, cfg.growth_rate, cfg.bottleneck_factor))
            c += num_layers * cfg.growth_rate
            if i == last:
                layers.append(nn.AdaptiveAvgPool2d(1))  # B×C×1×1
            else:  # transition: halve the channels
                layers += [norm2d(c), nn.ReLU(inplace=True), nn.Conv2d(c, c // 2, 1)]
                c //= 2
            self.levels.append(nn.Sequential(*layers))
        self.code_channels = c

    def forward(self, xray: Tensor) -> tuple[list[Tensor], Tensor]:
        h = self.stem(xray)
        skips = []
        for level in self.levels:
            skips.append(h)
            h = level(h)
        return skips, rearrange(h, "b c 1 1 -> b c")


# --- 2D → 3D connections ---------------------------------------------------------------------


class ConnectionA(nn.Module):
    """Fully connected bottleneck: code ``B×C`` → ``B×C3×s×s×s`` in the branch frame."""

    def __init__(self, code_channels: int, channels: int, size: int, dropout: float):
        super().__init__()
        self.channels, self.size = channels, size
        self.fc = nn.Sequential(nn.Linear(code_channels, channels * size**3), nn.Dropout(dropout),
                                nn.ReLU(inplace=True))

    def forward(self, code: Tensor) -> Tensor:
        s = self.size
        return rearrange(self.fc(code), "b (c d r k) -> b c d r k", c=self.channels, d=s, r=s, k=s)


class ConnectionB(nn.Module):
    """2D skip → 3D: 1×1 conv (+norm, ReLU), repeat along the depth axis, 3×3×3 conv (+norm, ReLU)."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.compress = nn.Sequential(nn.Conv2d(cin, cout, 1), norm2d(cout), nn.ReLU(inplace=True))
        self.conv = nn.Sequential(*conv3d_block(cout, cout))

    def forward(self, features: Tensor) -> Tensor:
        h = self.compress(features)  # B×C×R×K
        return self.conv(expand_to_branch(h, depth=h.shape[-2]))  # B×C×D×R×K, D = R (square input)


# --- one view branch -------------------------------------------------------------------------


class ViewBranch(nn.Module):
    """Encoder, connections A and B, and the branch's own decoder levels, for one view.

    Decoder level ``k`` has side ``volume_size / 2**k``; ``k = J`` is connection A's grid. At
    level ``k < J`` the branch concatenates its connection-B skip and compresses back
    (``compress[k]``); ``stage[k]`` (``k ≥ 1``) then applies its convs and upsamples to level
    ``k − 1``. ``final`` (single-view only) is level 0's convs.
    """

    def __init__(self, cfg: X2CTGANModelConfig, with_final: bool):
        super().__init__()
        chans, num_convs = cfg.decoder_channels, cfg.num_branch_convs
        self.top = len(chans) - 1  # J
        self.encoder = ViewEncoder(cfg)
        self.connection_a = ConnectionA(self.encoder.code_channels, chans[-1], cfg.start_size, cfg.fc_dropout)
        offset = (cfg.xray_size // cfg.volume_size).bit_length() - 1  # encoder level i ↔ decoder level i - offset
        self.skip_index = {k: k + offset for k in range(self.top)}
        self.connection_b = nn.ModuleDict({
            str(k): ConnectionB(self.encoder.skip_channels[i], chans[k]) for k, i in self.skip_index.items()})
        self.compress = nn.ModuleDict({str(k): nn.Sequential(*conv3d_block(2 * chans[k], chans[k]))
                                       for k in range(self.top)})
        self.stage = nn.ModuleDict({
            str(k): nn.Sequential(*[m for _ in range(num_convs[k]) for m in conv3d_block(chans[k], chans[k])],
                                  *up3d_block(chans[k], chans[k - 1]))
            for k in range(1, self.top + 1)})
        self.final = nn.Sequential(*[m for _ in range(num_convs[0]) for m in conv3d_block(chans[0], chans[0])]) \
            if with_final else None

    def encode(self, xray: Tensor) -> tuple[Tensor, dict[int, Tensor]]:
        """``B×1×S×S`` → (connection A's grid at level J, connection-B skips by level), branch frame."""
        skips, code = self.encoder(xray)
        links = {k: self.connection_b[str(k)](skips[i]) for k, i in self.skip_index.items()}
        return self.connection_a(code), links


class X2CTGenerator(Pretrained):
    """X2CT-GAN's generator: ``forward(pa, lateral=None) → B×1×X×Y×Z`` (cubic, RAS+).

    Single-view configs (``views=("pa",)``) take only ``pa``; biplanar ones need both. X-rays
    are ``B×1×xray_size×xray_size`` in [0, 1]; bad input raises :class:`InputError`.
    """

    config_class = X2CTGANModelConfig

    def __init__(self, cfg: X2CTGANModelConfig):
        super().__init__()
        cfg = self.cfg = self.init_config(cfg)
        chans = cfg.decoder_channels
        self.top = len(chans) - 1
        self.branches = nn.ModuleDict({v: ViewBranch(cfg, with_final=not cfg.biplanar) for v in cfg.views})
        head_in = chans[0]
        if cfg.biplanar:
            self.fusion = nn.ModuleDict()  # the fusion decoder, level by level
            for k in range(self.top, -1, -1):
                layers = [] if k == self.top else conv3d_block(2 * chans[k], chans[k])  # concat(fused, main)
                for _ in range(cfg.num_fusion_convs[k]):
                    layers += conv3d_block(chans[k], chans[k])
                if k > 0:
                    layers += up3d_block(chans[k], chans[k - 1])
                self.fusion[str(k)] = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.Conv3d(head_in, 1, 7, padding=3), output_activation(cfg.output_activation))
        init_weights(self, cfg.init_std)

    def forward(self, pa: Tensor | None = None, lateral: Tensor | None = None) -> Tensor:
        xrays = check_xrays(pa, lateral, self.cfg.views, self.cfg.xray_size)
        encoded = [self.branches[v].encode(x) for v, x in zip(self.cfg.views, xrays, strict=True)]
        if not self.cfg.biplanar:
            return self._single(self.cfg.views[0], *encoded[0])
        return self._biplanar(encoded)

    def _single(self, view: str, h: Tensor, links: dict[int, Tensor]) -> Tensor:
        branch = self.branches[view]
        for k in range(self.top, -1, -1):
            if k < self.top:
                h = branch.compress[str(k)](torch.cat([h, links[k]], dim=1))
            h = branch.stage[str(k)](h) if k > 0 else branch.final(h)
        return branch_to_volume(self.head(h), view)  # branch frame → B×1×X×Y×Z

    def _biplanar(self, encoded: list[tuple[Tensor, dict[int, Tensor]]]) -> Tensor:
        views = self.cfg.views
        hs = {v: e[0] for v, e in zip(views, encoded, strict=True)}
        links = {v: e[1] for v, e in zip(views, encoded, strict=True)}
        main = None
        for k in range(self.top, -1, -1):
            if k < self.top:
                hs = {v: self.branches[v].compress[str(k)](torch.cat([hs[v], links[v][k]], dim=1)) for v in views}
            fused = connection_c(hs)  # B×C×X×Y×Z
            hs = {v: volume_to_branch(fused, v) for v in views}  # the fused features go back to each branch
            main = self.fusion[str(k)](fused if main is None else torch.cat([fused, main], dim=1))
            if k > 0:
                hs = {v: self.branches[v].stage[str(k)](hs[v]) for v in views}
        return self.head(main)


def connection_c(branch_features: dict[str, Tensor]) -> Tensor:
    """Connection C: permute each branch's ``B×C×D×R×K`` into ``B×C×X×Y×Z`` and average."""
    volumes = [branch_to_volume(t, view) for view, t in branch_features.items()]
    return torch.stack(volumes).mean(dim=0)


# --- discriminator ---------------------------------------------------------------------------


def patch_size(volume_size: int, num_layers: int) -> int:
    """Side of the PatchGAN's output grid: ``num_layers`` convs k4 s2 p2, then two k4 s1 p2."""
    n = volume_size
    for _ in range(num_layers):
        n = n // 2 + 1
    return n + 2


class PatchDiscriminator3D(nn.Module):
    """The paper's 3D PatchGAN (pix2pix's NLayer discriminator in 3D), LSGAN logits per patch.

    ``forward(volume, cond=None) → B×1×P×P×P``. With ``cfg.conditional_d`` the conditioning
    volume ``cond`` (``B×len(views)×X×Y×Z``, see :func:`gan_baselines.x2ct_gan.losses.condition`)
    is concatenated to the input channels. ``coord_channels`` extra input channels are for
    subclasses that append coordinates (X-Recon's CoordConv discriminator).
    """

    def __init__(self, cfg: X2CTGANModelConfig, coord_channels: int = 0):
        super().__init__()
        self.cfg = cfg
        self.num_cond = len(cfg.views) if cfg.conditional_d else 0
        c = cfg.d_channels
        layers: list[nn.Module] = [nn.Conv3d(1 + self.num_cond + coord_channels, c, 4, stride=2, padding=2),
                                   nn.LeakyReLU(0.2, inplace=True)]
        mult = 1
        for n in range(1, cfg.num_d_layers):
            prev, mult = mult, min(2**n, 8)
            layers += [nn.Conv3d(c * prev, c * mult, 4, stride=2, padding=2, bias=False), norm3d(c * mult),
                       nn.LeakyReLU(0.2, inplace=True)]
        prev, mult = mult, min(2**cfg.num_d_layers, 8)
        layers += [nn.Conv3d(c * prev, c * mult, 4, stride=1, padding=2, bias=False), norm3d(c * mult),
                   nn.LeakyReLU(0.2, inplace=True), nn.Conv3d(c * mult, 1, 4, stride=1, padding=2)]
        self.model = nn.Sequential(*layers)
        init_weights(self, cfg.init_std)

    def inputs(self, volume: Tensor, cond: Tensor | None) -> Tensor:
        if self.num_cond == 0:
            return volume
        if cond is None or cond.shape[1] != self.num_cond or cond.shape[2:] != volume.shape[2:]:
            got = None if cond is None else tuple(cond.shape)
            raise InputError("cond", f"this discriminator is conditional: needs B×{self.num_cond}×"
                             f"{'×'.join(map(str, volume.shape[2:]))} X-ray volumes, got {got}")
        return torch.cat([volume, cond.to(volume.dtype)], dim=1)  # B×(1+V)×X×Y×Z

    def forward(self, volume: Tensor, cond: Tensor | None = None) -> Tensor:
        return self.model(self.inputs(volume, cond))


def build(cfg: X2CTGANModelConfig) -> tuple[X2CTGenerator, PatchDiscriminator3D]:
    """The generator and discriminator of ``cfg``, initialised as in the paper."""
    return X2CTGenerator(cfg), PatchDiscriminator3D(cfg)
