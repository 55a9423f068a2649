"""Every network saves and loads like a diffusers model (patching.artifacts.pretrained.Pretrained).

A model saved with ``save_pretrained`` and loaded with its own class's ``from_pretrained`` in a
plain Python process (no CLI, no project loader) gives bit-identical outputs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from patching.errors import InputError

ROOT = Path(__file__).resolve().parents[2]


def _networks():
    """``name -> (class path, model, inputs)``; weights perturbed so no zero-init layer hides a bug."""
    from gan_baselines import cncl, s_xr2ct, x_recon
    from gan_baselines.x2ct_gan import cpu_demo as x2ct_cpu_demo
    from gan_baselines.x2ct_gan.model import X2CTGenerator
    from gan_baselines.x_recon.model import XReconGenerator
    from stage1_vqgan.config import VQGANConfig
    from stage1_vqgan.model import VQGAN
    from stage2_diffusion.config import preset
    from stage2_diffusion.unet import LatentUNet3d
    from stage2_diffusion.xray_encoder import XrayEncoder

    g = torch.Generator().manual_seed(0)
    s2 = preset("cpu-demo")
    xg, xr, sx = x2ct_cpu_demo().model, x_recon.cpu_demo().model, s_xr2ct.cpu_demo().model
    enc = s2.encoder
    tokens = torch.randn(1, enc.num_tokens, enc.token_dim, generator=g)
    nets = {
        "vqgan": ("stage1_vqgan.model:VQGAN", VQGAN(VQGANConfig(base_channels=8, channel_mults=(1, 2), norm_groups=4,
                                                                  codebook_size=16, latent_dim=4)),
                  {"x": torch.rand(1, 1, 8, 8, 8, generator=g) * 2 - 1}),
        "unet": ("stage2_diffusion.unet:LatentUNet3d", LatentUNet3d(s2.unet),
                 {"x": torch.randn(1, s2.unet.latent_channels, 4, 4, 4, generator=g), "t": torch.tensor([7]),
                  "tokens": tokens}),
        "xray_encoder": ("stage2_diffusion.xray_encoder:XrayEncoder", XrayEncoder(enc),
                         {"xrays": torch.rand(1, len(enc.views), enc.image_size, enc.image_size, generator=g)}),
        "x2ct_generator": ("gan_baselines.x2ct_gan.model:X2CTGenerator", X2CTGenerator(xg),
                           {v: torch.rand(1, 1, xg.xray_size, xg.xray_size, generator=g) for v in xg.views}),
        "xrecon_generator": ("gan_baselines.x_recon.model:XReconGenerator", XReconGenerator(xr),
                             {v: torch.rand(1, 1, xr.xray_size, xr.xray_size, generator=g) for v in xr.views}),
        "sxr2ct_generator": ("gan_baselines.s_xr2ct.model:SXR2CTGenerator", s_xr2ct.SXR2CTGenerator(sx),
                             {"pa": torch.rand(1, 1, sx.xray_size, sx.xray_size, generator=g)}),  # template perturbed too
        "cncl_generator": ("gan_baselines.cncl.model:CNCLGenerator", cncl.CNCLGenerator(cncl.cpu_demo().model),
                           {"x": torch.rand(1, 1, 32, 32, generator=g) * 2 - 1}),
    }
    with torch.no_grad():
        for _, model, _ in nets.values():
            for p in model.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=g))
            model.eval()
    return nets


def _output(model, inputs):
    out = model(**inputs)
    return out.recon if hasattr(out, "recon") else out


# Runs in a fresh interpreter: imports only the model's own class.
_PLAIN = """
import importlib, json, sys, torch
from safetensors.torch import load_file, save_file
torch.set_num_threads(int(sys.argv[3]))  # the same kernels as the test process
for name, ref in json.loads(sys.argv[1]).items():
    mod, cls = ref.split(":")
    model = getattr(importlib.import_module(mod), cls).from_pretrained(sys.argv[2] + "/" + name).eval()
    inputs = load_file(sys.argv[2] + "/" + name + ".inputs.safetensors")
    with torch.no_grad():
        out = model(**inputs)
    save_file({"out": getattr(out, "recon", out).contiguous()}, sys.argv[2] + "/" + name + ".out.safetensors")
"""


def test_save_pretrained_then_from_pretrained_in_a_plain_process_gives_identical_outputs(tmp_path):
    nets = _networks()
    expected = {}
    for name, (_, model, inputs) in nets.items():
        model.save_pretrained(tmp_path / name)
        assert sorted(p.name for p in (tmp_path / name).iterdir()) == ["config.json",
                                                                       "diffusion_pytorch_model.safetensors"]
        save_file({k: v.contiguous() for k, v in inputs.items()}, str(tmp_path / f"{name}.inputs.safetensors"))
        with torch.no_grad():
            expected[name] = _output(model, inputs)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    refs = json.dumps({name: ref for name, (ref, _, _) in nets.items()})
    subprocess.run([sys.executable, "-c", _PLAIN, refs, str(tmp_path), str(torch.get_num_threads())], check=True, cwd=ROOT, env=env, timeout=300)
    for name, want in expected.items():
        got = load_file(str(tmp_path / f"{name}.out.safetensors"))["out"]
        assert want.abs().max() > 0, name
        assert torch.equal(got, want), name


def test_config_json_round_trips_the_typed_config_strictly(tmp_path):
    from stage1_vqgan.config import VQGANConfig
    from stage1_vqgan.model import VQGAN

    cfg = VQGANConfig(base_channels=8, channel_mults=(1, 2), norm_groups=4, codebook_size=16, latent_dim=4)
    VQGAN(cfg).save_pretrained(tmp_path)
    loaded = VQGAN.from_pretrained(tmp_path)
    assert loaded.cfg == cfg and isinstance(loaded.cfg.channel_mults, tuple)
    doc = json.loads((tmp_path / "config.json").read_text())
    doc["cfg"]["no_such_key"] = 1
    (tmp_path / "config.json").write_text(json.dumps(doc))
    with pytest.raises(InputError, match="no_such_key"):
        VQGAN.from_pretrained(tmp_path)
