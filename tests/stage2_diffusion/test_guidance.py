"""Projection guidance at sampling: the output conversion, the correction lowering the DRR error,
and the option on the reconstructor and the command line."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from launch.cli import main
from patching.data.store import Store
from patching.errors import InputError
from patching.phantoms.chest import synth_chest
from patching.projection.drr import chest_geometry, render_drr
from stage2_diffusion.config import DiffusionConfig, SamplerConfig
from stage2_diffusion.guidance import ProjectionGuidance, corrected_output
from stage2_diffusion.pipeline import DiffusionReconstructor
from stage2_diffusion.schedules import sample_scheduler
from tests.stage2_diffusion.test_task import encoded_store, trained_run


@pytest.mark.parametrize("kind", ["v_prediction", "epsilon"])
def test_corrected_output_predicts_the_corrected_estimate(kind):
    sched = sample_scheduler(DiffusionConfig(prediction_type=kind), "ddim")
    sched.set_timesteps(10)
    t = sched.timesteps[3]
    g = torch.Generator().manual_seed(0)
    x_t, out = torch.randn(2, 3, 4, 4, 4, generator=g), torch.randn(2, 3, 4, 4, 4, generator=g)
    # Identity correction: the same output; a shift of x̂0 by d moves the scheduler's x̂0 by d.
    assert torch.allclose(corrected_output(sched, t, x_t, out, lambda x0: x0), out, atol=1e-5)
    seen = {}

    def shift(x0):
        seen["x0"] = x0
        return x0 + 0.5

    new = corrected_output(sched, t, x_t, out, shift)
    a = float(sched.alphas_cumprod[int(t)])
    x0_new = (a ** 0.5 * x_t - (1 - a) ** 0.5 * new) if kind == "v_prediction" else (x_t - (1 - a) ** 0.5 * new) / a ** 0.5
    assert torch.allclose(x0_new, seen["x0"] + 0.5, atol=1e-4)


def test_projection_guidance_brings_the_drrs_towards_the_xrays():
    ph = synth_chest((32, 32, 32), seed=1)
    hu = torch.from_numpy(ph.hu.astype(np.float32))
    xrays = {v: render_drr(hu, ph.spacing_mm, v, chest_geometry(32, 32)) for v in ("pa", "lateral")}
    start = (hu * 0.6)[None, None]  # a washed-out estimate

    guide = ProjectionGuidance(lambda x: x, xrays, ph.spacing_mm, iters=30, lr=20.0)
    before = float(guide.loss(start))
    after = float(guide.loss(guide(start)))
    assert after < 0.2 * before
    with pytest.raises(InputError, match="at least one X-ray"):
        ProjectionGuidance(lambda x: x, {}, ph.spacing_mm, iters=1, lr=1.0)


def test_reconstructor_with_drr_guidance_matches_the_xrays_better(tmp_path_factory):
    run = trained_run(tmp_path_factory)
    store, _ = encoded_store(tmp_path_factory)
    st = Store(store)
    case = st.case(st.case_ids("test")[0])
    xrays = {v: np.asarray(case.xray(v), np.float32) for v in ("pa", "lateral")}

    def drr_error(rec) -> float:
        hu = rec.reconstruct(xrays, seed=1)[0].astype(np.float32)
        return float(sum(np.mean((render_drr(torch.from_numpy(hu), rec.spacing_mm, v, chest_geometry(*x.shape)).numpy()
                                  - x) ** 2) for v, x in xrays.items()))

    assert DiffusionReconstructor(run, steps=3).drr_guidance_iters == 1  # the cpu-demo preset's setting
    plain = DiffusionReconstructor(run, steps=3, drr_guidance=0)
    guided = DiffusionReconstructor(run, steps=3, drr_guidance=3)
    guided.cfg.sampler.drr_guidance_lr = 0.3
    assert plain.drr_guidance_iters == 0 and guided.info()["drr_guidance_iters"] == 3
    assert drr_error(guided) < 0.85 * drr_error(plain)  # 0.27 vs 0.36 with this 2-step VQ-GAN
    with pytest.raises(InputError, match="drr-guidance"):
        DiffusionReconstructor(run, drr_guidance=-1)


def test_sampler_config_and_cli_reject_bad_drr_guidance(tmp_path_factory, tmp_path, capsys):
    with pytest.raises(InputError, match="drr_guidance_iters"):
        SamplerConfig(drr_guidance_iters=-2)
    with pytest.raises(InputError, match="drr_guidance_lr"):
        SamplerConfig(drr_guidance_lr=0.0)
    run = trained_run(tmp_path_factory)
    store, _ = encoded_store(tmp_path_factory)
    st = Store(store)
    np.save(tmp_path / "pa.npy", st.case(st.case_ids()[0]).xray("pa"))
    code = main(["sample", "--checkpoint", str(run), "--pa", str(tmp_path / "pa.npy"), "--out", str(tmp_path / "o"),
                 "--drr-guidance", "-1"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "drr-guidance" in err
    assert not (tmp_path / "o").exists()
