#!/usr/bin/env python3
"""diffusers reference timings on a GPU, matching `easel bench --device cuda`: fp16 U-Net and text
encoders, SDPA (default), Euler sampler, CFG 7, same prompts. Medians of --runs after warm-up;
torch.cuda.synchronize. Used by scripts/cuda/run_on_gpu.sh."""
import argparse, json, statistics, time

import torch
from diffusers import DiffusionPipeline, EulerDiscreteScheduler
from diffusers.utils import logging as dlog

dlog.set_verbosity_error()

ap = argparse.ArgumentParser()
ap.add_argument("--model", required=True)
ap.add_argument("--width", type=int, default=512)
ap.add_argument("--height", type=int, default=512)
ap.add_argument("--steps", type=int, default=20)
ap.add_argument("--runs", type=int, default=3)
ap.add_argument("--device", default="cuda")
ap.add_argument("--dtype", default="float16")
ap.add_argument("--json")
a = ap.parse_args()

dev = torch.device(a.device)
dt = getattr(torch, a.dtype)
cuda = dev.type == "cuda"
sync = torch.cuda.synchronize if cuda else (lambda: None)
PROMPT, NEG = "a photograph of an astronaut riding a horse", "blurry, low quality"

t0 = time.perf_counter()
try:
    pipe = DiffusionPipeline.from_pretrained(a.model, torch_dtype=dt, variant="fp16")
except Exception:
    pipe = DiffusionPipeline.from_pretrained(a.model, torch_dtype=dt)
pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
pipe.set_progress_bar_config(disable=True)
pipe.to(dev)
sync()
load_s = time.perf_counter() - t0
sdxl = hasattr(pipe, "text_encoder_2")
attn = type(pipe.unet.attn_processors[next(iter(pipe.unet.attn_processors))]).__name__


def timed(f, runs=a.runs, warm=2):
    for _ in range(warm):
        f()
    sync()
    ts = []
    for _ in range(runs):
        s = time.perf_counter()
        f()
        sync()
        ts.append(time.perf_counter() - s)
    return statistics.median(ts)


with torch.inference_mode():
    def enc():
        return pipe.encode_prompt(PROMPT, device=dev, num_images_per_prompt=1,
                                  do_classifier_free_guidance=True, negative_prompt=NEG)
    text_s = timed(enc)
    out = enc()
    if sdxl:
        pe, ne, pp, npool = out
        ctx = torch.cat([ne, pe])
        pooled = torch.cat([npool, pp])
        tid = torch.tensor([[a.height, a.width, 0, 0, a.height, a.width]] * 2, device=dev, dtype=dt)
    else:
        pe, ne = out
        ctx = torch.cat([ne, pe])
    h, w = a.height // 8, a.width // 8
    t = torch.tensor(500.0, device=dev)

    def unet(batch):
        x = torch.randn(batch, 4, h, w, device=dev, dtype=dt)
        kw = {}
        if sdxl:
            kw["added_cond_kwargs"] = {"text_embeds": pooled[2 - batch:], "time_ids": tid[2 - batch:]}
        return timed(lambda: pipe.unet(x, t, encoder_hidden_states=ctx[2 - batch:], return_dict=False, **kw))

    unet_cfg_s = unet(2)
    unet_nocfg_s = unet(1)

    def vae_time(vdt):
        vae = pipe.vae.to(vdt)
        z = torch.randn(1, 4, h, w, device=dev, dtype=vdt)
        r = timed(lambda: vae.decode(z / vae.config.scaling_factor, return_dict=False))
        pipe.vae.to(dt)
        return r

    # what the pipeline itself uses: fp16, or fp32 when the VAE config says force_upcast (SDXL)
    upcast = bool(getattr(pipe.vae.config, "force_upcast", False)) and dt == torch.float16
    vae_pipeline_s = vae_time(torch.float32 if upcast else dt)
    vae_fp32_s = vae_time(torch.float32)

    def e2e():
        g = torch.Generator("cpu").manual_seed(0)
        pipe(PROMPT, negative_prompt=NEG, num_inference_steps=a.steps, guidance_scale=7.0,
             height=a.height, width=a.width, generator=g, output_type="np")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    e2e_s = timed(e2e, runs=a.runs, warm=1)

r = {
    "impl": f"diffusers {__import__('diffusers').__version__}, torch {torch.__version__}",
    "gpu": torch.cuda.get_device_name(0) if cuda else "cpu",
    "dtype": a.dtype, "attention_processor": attn, "sdxl": sdxl,
    "width": a.width, "height": a.height, "steps": a.steps, "sampler": "euler",
    "model_load_s": load_s,
    "text_encoding_s": text_s,
    "unet_step_cfg_s": unet_cfg_s,
    "unet_step_no_cfg_s": unet_nocfg_s,
    "unet_cfg_it_per_s": 1 / unet_cfg_s,
    "vae_decode_s": vae_pipeline_s,
    "vae_decode_dtype": "float32" if upcast else a.dtype,
    "vae_decode_fp32_s": vae_fp32_s,
    "end_to_end_s": e2e_s,
    "end_to_end_it_per_s": a.steps / e2e_s,
    "peak_allocated_bytes_e2e": torch.cuda.max_memory_allocated() if cuda else None,
    "peak_reserved_bytes_e2e": torch.cuda.max_memory_reserved() if cuda else None,
}
print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}))
if a.json:
    with open(a.json, "w") as f:
        json.dump(r, f, indent=2)
