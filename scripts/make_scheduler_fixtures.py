#!/usr/bin/env python3
"""Record diffusers' samplers as fixtures for the Rust schedulers (crates/engine/src/schedulers).

Run with the reference venv:  /work/pyref/bin/python scripts/make_scheduler_fixtures.py

For every scheduler config (the five real ones in tests/fixtures/scheduler_configs/ plus a few
synthetic ones that switch on the less common options) and every sampler, the scheduler is built
the way a diffusers user switching samplers builds it:

    base = <_class_name>.from_pretrained(dir_with_the_verbatim_file)
    sched = Target.from_config(base.config, **overrides)

which keeps diffusers' `_use_default_values` semantics (a key absent from the file takes the
target class's default). Recorded:

- for steps in STEP_COUNTS: timesteps, sigmas (if the class has them), init_noise_sigma;
- for RUN_STEPS (and LONG_RUN_STEPS for LONG_RUNS): a whole denoising loop on a seeded
  latent with a deterministic fake model (see `fake_model`, mirrored in the Rust test), the noise
  every `step` draws (by wrapping diffusers' randn_tensor, generator seeded with NOISE_SEED), and
  per step the scale_model_input output, prev_sample and the x0 estimate.

Tensors are stored as base64 of little-endian float32 so the fixtures stay small; scalars as
JSON numbers (float32 values printed with repr of the exact float, so they round-trip).
"""

import base64
import json
import math
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

import diffusers
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    LCMScheduler,
)

ROOT = Path(__file__).resolve().parent.parent
REAL_CONFIGS = ROOT / "crates/engine/tests/fixtures/scheduler_configs"
OUT = ROOT / "crates/engine/tests/fixtures/schedulers"
SYNTH_CONFIGS = OUT / "synthetic_configs"

SAMPLER_IDS = ["euler", "euler_a", "ddim", "dpmpp_2m", "dpmpp_2m_karras", "lcm"]
# 61: np.arange(1000, 0, -1000/61) has 62 elements, so "trailing" gives 62 timesteps
STEP_COUNTS = [1, 2, 4, 20, 30, 61]
RUN_STEPS = 4
LONG_RUN_STEPS = 20
# config -> samplers that also get a LONG_RUN_STEPS run (multistep history, many steps)
LONG_RUNS = {
    "sdxl": set(SAMPLER_IDS),
    "x_dpm_variants": {"dpmpp_2m", "dpmpp_2m_karras"},
    "x_dpm_ode3": {"dpmpp_2m", "dpmpp_2m_karras"},
}
# configs whose step loops are recorded for some samplers only (schedules are for all)
RUN_SAMPLERS = {"x_dpm_ode3": {"dpmpp_2m", "dpmpp_2m_karras"}}
SHAPE = (1, 4, 8, 8)
SMALL_SHAPE = (1, 4, 4, 4)
LATENT_SEED = 0
NOISE_SEED = 7

# sampler id -> (diffusers class, from_config overrides)
SAMPLERS = {  # keys in SAMPLER_IDS order
    "euler": (EulerDiscreteScheduler, {}),
    "euler_a": (EulerAncestralDiscreteScheduler, {}),
    "ddim": (DDIMScheduler, {}),
    "dpmpp_2m": (DPMSolverMultistepScheduler, {"use_karras_sigmas": False}),
    "dpmpp_2m_karras": (DPMSolverMultistepScheduler, {"use_karras_sigmas": True}),
    "lcm": (LCMScheduler, {}),
}

# Synthetic configs: each switches on options the real ones leave off, so every branch the Rust
# code implements (or rejects) is compared with diffusers.
TRAINED_BETAS = [float(np.float32(0.0009 + 0.0002 * i + 1e-6 * (i % 7))) for i in range(100)]
SYNTHETIC = {
    # DPM-Solver options: SDE variant, third order, heun, sigma_min final, clipped lambda.
    "x_dpm_variants": {
        "_class_name": "DPMSolverMultistepScheduler",
        "_diffusers_version": "0.27.0",
        "algorithm_type": "sde-dpmsolver++",
        "beta_end": 0.02,
        "beta_schedule": "linear",
        "beta_start": 0.0001,
        "euler_at_final": False,
        "final_sigmas_type": "sigma_min",
        "lambda_min_clipped": -4.5,
        "lower_order_final": False,
        "num_train_timesteps": 1000,
        "prediction_type": "v_prediction",
        "solver_order": 3,
        "solver_type": "heun",
        "steps_offset": 0,
        "timestep_spacing": "trailing",
        "trained_betas": None,
    },
    # The ODE solver's other branches: third order, heun, Euler at the final step, leading
    # spacing with an offset, sample prediction.
    "x_dpm_ode3": {
        "_class_name": "DPMSolverMultistepScheduler",
        "_diffusers_version": "0.27.0",
        "algorithm_type": "dpmsolver++",
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "beta_start": 0.00085,
        "euler_at_final": True,
        "lower_order_final": False,
        "num_train_timesteps": 1000,
        "prediction_type": "sample",
        "solver_order": 3,
        "solver_type": "heun",
        "steps_offset": 1,
        "timestep_spacing": "leading",
    },
    # Zero terminal SNR, cosine betas, clipping and alpha-to-one, as in v-prediction fine-tunes.
    "x_zsnr": {
        "_class_name": "DDIMScheduler",
        "_diffusers_version": "0.21.0",
        "beta_schedule": "squaredcos_cap_v2",
        "clip_sample": True,
        "clip_sample_range": 1.5,
        "num_train_timesteps": 1000,
        "prediction_type": "v_prediction",
        "rescale_betas_zero_snr": True,
        "set_alpha_to_one": True,
        "steps_offset": 0,
        "timestep_spacing": "trailing",
    },
    # Karras sigmas in Euler, an explicit sigma_min, sample prediction, trained betas.
    "x_karras_sample": {
        "_class_name": "EulerDiscreteScheduler",
        "_diffusers_version": "0.27.0",
        "final_sigmas_type": "sigma_min",
        "num_train_timesteps": 100,
        "prediction_type": "sample",
        "sigma_min": 0.1,
        "steps_offset": 0,
        "timestep_spacing": "linspace",
        "trained_betas": TRAINED_BETAS,
        "use_karras_sigmas": True,
    },
}


def b64(t):
    a = np.ascontiguousarray(t.detach().to(torch.float32).cpu().numpy().reshape(-1), dtype="<f4")
    return base64.b64encode(a.tobytes()).decode("ascii")


def f32_list(t):
    return [float(v) for v in t.detach().to(torch.float32).cpu().numpy().reshape(-1)]


def load(config_path, target, overrides):
    """Base class from the verbatim file, then Target.from_config, as a diffusers user does."""
    raw = json.loads(config_path.read_text())
    base_cls = getattr(diffusers, raw["_class_name"])
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copy(config_path, Path(tmp) / "scheduler_config.json")
        base = base_cls.from_pretrained(tmp)
    return target.from_config(base.config, **overrides)


def fake_model(x, t):
    """A deterministic stand-in for the U-Net, exactly reproducible in float32:
    0.9*x - 0.05*(x*x) + c(t)*P, with c(t) = f32(0.3*sin(t/97)) (float64 libm sin) and
    P[i] = ((i*37) % 17)/8 - 1 (exact in float32)."""
    x = x.to(torch.float32)
    n = x.numel()
    p = torch.tensor([((i * 37) % 17) / 8.0 - 1.0 for i in range(n)], dtype=torch.float32).reshape(x.shape)
    c = torch.tensor(np.float32(0.3 * math.sin(float(t) / 97.0)))
    return (x * 0.9 - (x * x) * 0.05) + p * c


class NoiseRecorder:
    """Wraps diffusers' randn_tensor in the scheduler modules so every draw is recorded."""

    def __init__(self):
        self.draws = []
        self.modules = [
            diffusers.schedulers.scheduling_euler_ancestral_discrete,
            diffusers.schedulers.scheduling_euler_discrete,
            diffusers.schedulers.scheduling_ddim,
            diffusers.schedulers.scheduling_dpmsolver_multistep,
            diffusers.schedulers.scheduling_lcm,
        ]
        self.orig = {m: m.randn_tensor for m in self.modules}

    def __enter__(self):
        def wrapped(*args, orig=None, **kwargs):
            out = orig(*args, **kwargs)
            self.draws.append(out.detach().clone())
            return out

        for m in self.modules:
            m.randn_tensor = lambda *a, _o=self.orig[m], **k: wrapped(*a, orig=_o, **k)
        return self

    def __exit__(self, *exc):
        for m, f in self.orig.items():
            m.randn_tensor = f


def schedule_record(sched):
    rec = {"timesteps": [float(v) for v in sched.timesteps.cpu().numpy()]}
    rec["timestep_dtype"] = str(sched.timesteps.dtype).replace("torch.", "")
    sig = getattr(sched, "sigmas", None)
    rec["sigmas"] = f32_list(sig) if isinstance(sig, torch.Tensor) else None
    ins = sched.init_noise_sigma
    rec["init_noise_sigma"] = float(ins)
    return rec


def run_loop(sched, steps, shape):
    sched.set_timesteps(steps)
    g_latent = torch.Generator("cpu").manual_seed(LATENT_SEED)
    init_noise = torch.randn(shape, generator=g_latent, dtype=torch.float32)
    latents = init_noise * sched.init_noise_sigma
    gen = torch.Generator("cpu").manual_seed(NOISE_SEED)
    out_steps = []
    for i, t in enumerate(sched.timesteps):
        with NoiseRecorder() as rec:
            model_in = sched.scale_model_input(latents, t)
            model_out = fake_model(model_in, t)
            res = sched.step(model_out, t, latents, generator=gen)
        # The Rust API passes the step index explicitly; diffusers tracks its own.
        if hasattr(sched, "step_index"):
            assert sched.step_index == i + 1, (sched.step_index, i)
        if hasattr(res, "pred_original_sample") and res.pred_original_sample is not None:
            x0 = res.pred_original_sample
        elif hasattr(res, "denoised") and res.denoised is not None:  # LCM
            x0 = res.denoised
        else:  # DPM-Solver: the converted model output is its x0 estimate
            x0 = sched.model_outputs[-1]
        step = {
            "t": float(t),
            "model_input": None if torch.equal(model_in, latents) else b64(model_in),
            "noise": [b64(d) for d in rec.draws],
            "prev_sample": b64(res.prev_sample),
            "pred_original_sample": b64(x0),
        }
        out_steps.append(step)
        latents = res.prev_sample
    return {"init_noise": b64(init_noise), "records": out_steps}


def record_config(name, config_path):
    out = {
        "config": name,
        "config_file": str(config_path.relative_to(ROOT / "crates/engine")),  # relative to the engine crate
        "diffusers_version": diffusers.__version__,
        "torch_version": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }
    schedules, runs = [], []
    alphas = None
    for sampler, (cls, overrides) in SAMPLERS.items():
        for steps in STEP_COUNTS:
            rec = {"sampler": sampler, "steps": steps}
            try:
                sched = load(config_path, cls, overrides)
                if alphas is None:
                    alphas = sched.alphas_cumprod
                sched.set_timesteps(steps)
                rec.update(schedule_record(sched))
            except Exception as e:  # recorded: the Rust side must refuse too
                rec["error"] = f"{type(e).__name__}: {e}"
            schedules.append(rec)
        if sampler not in RUN_SAMPLERS.get(name, SAMPLERS):
            continue
        # synthetic configs use the small shape too, to keep the fixtures under ~1 MB
        run_steps = [(RUN_STEPS, SMALL_SHAPE if name in SYNTHETIC else SHAPE)]
        if sampler in LONG_RUNS.get(name, ()):
            run_steps.append((LONG_RUN_STEPS, SMALL_SHAPE))
        for steps, shape in run_steps:
            rec = {"sampler": sampler, "steps": steps, "shape": list(shape)}
            try:
                sched = load(config_path, cls, overrides)
                rec.update(run_loop(sched, steps, shape))
            except Exception as e:
                rec["error"] = f"{type(e).__name__}: {e}"
            runs.append(rec)
    out["alphas_cumprod"] = b64(alphas)
    out["schedules"] = schedules
    out["runs"] = runs
    return out


def main():
    torch.set_num_threads(1)
    diffusers.utils.logging.set_verbosity_error()
    OUT.mkdir(parents=True, exist_ok=True)
    SYNTH_CONFIGS.mkdir(parents=True, exist_ok=True)
    configs = [(p.stem, p) for p in sorted(REAL_CONFIGS.glob("*.json"))]
    for name, cfg in SYNTHETIC.items():
        path = SYNTH_CONFIGS / f"{name}.json"
        path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        configs.append((name, path))
    for name, path in configs:
        data = record_config(name, path)
        dest = OUT / f"{name}.json"
        dest.write_text(json.dumps(data, separators=(",", ":")) + "\n")
        errors = [f"{r['sampler']}/{r['steps']}" for r in data["schedules"] + data["runs"] if "error" in r]
        print(f"{dest.relative_to(ROOT)}: {dest.stat().st_size} bytes; errors: {errors}", file=sys.stderr)


if __name__ == "__main__":
    main()
