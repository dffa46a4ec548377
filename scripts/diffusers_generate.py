#!/usr/bin/env python3
"""Generate one image with diffusers (CPU, float32) -- the reference for `easel generate`.

    /work/pyref/bin/python scripts/diffusers_generate.py --model DIR --prompt "a cat" \\
        [--negative-prompt "blurry"] --steps 20 --guidance 7.5 --seed 42 \\
        --width 512 --height 512 --sampler euler --out ref.png

Sampler ids (scheduler built with `Cls.from_config(<the model's scheduler config>)`):
  default          the model's own scheduler_config.json, unchanged
  euler            EulerDiscreteScheduler
  euler_a          EulerAncestralDiscreteScheduler
  ddim             DDIMScheduler (eta 0)
  dpmpp_2m         DPMSolverMultistepScheduler
  dpmpp_2m_karras  DPMSolverMultistepScheduler(use_karras_sigmas=True)
  lcm              LCMScheduler
--scheduler-config FILE replaces the model's scheduler config as the base (e.g.
tests/fixtures/scheduler_configs/sd_turbo.json with --sampler default for SD-Turbo).

Noise comes from torch.Generator("cpu").manual_seed(seed). Without
--negative-prompt the pipeline gets negative_prompt=None (SD 1.x/2.x encode ""
for it; SDXL with force_zeros_for_empty_prompt uses all-zero embeddings).

Model folders without tokenizer files (like the test fixtures) get the CLIP
tokenizer built from open_clip's BPE; pad_token comes from
<tokenizer>/special_tokens_map.json if present, else "<|endoftext|>".
Folders with only *.fp16.safetensors weights are loaded with variant="fp16"
and upcast to float32.
"""

import argparse
import glob
import json
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from make_fixtures import make_sampler  # noqa: E402


def build_tokenizer(folder):
    from transformers import CLIPTokenizer

    from make_tokenizer import load_clip_bpe

    pad = "<|endoftext|>"
    stm = os.path.join(folder, "special_tokens_map.json")
    if os.path.exists(stm):
        p = json.load(open(stm)).get("pad_token", pad)
        pad = p["content"] if isinstance(p, dict) else p
    encoder, merges = load_clip_bpe()
    return CLIPTokenizer(vocab=encoder, merges=list(merges), pad_token=pad, model_max_length=77)


def needs_fp16_variant(model_dir):
    full = glob.glob(os.path.join(model_dir, "unet", "diffusion_pytorch_model.safetensors")) + glob.glob(
        os.path.join(model_dir, "unet", "diffusion_pytorch_model.bin")
    )
    half = glob.glob(os.path.join(model_dir, "unet", "diffusion_pytorch_model.fp16.*"))
    return not full and bool(half)


def load_pipeline(model_dir):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    index = json.load(open(os.path.join(model_dir, "model_index.json")))
    kw = dict(dtype=torch.float32)
    if needs_fp16_variant(model_dir):
        kw["variant"] = "fp16"
    for sub in ("tokenizer", "tokenizer_2"):
        folder = os.path.join(model_dir, sub)
        if sub in index and not os.path.exists(os.path.join(folder, "vocab.json")) and not os.path.exists(
            os.path.join(folder, "tokenizer.json")
        ):
            kw[sub] = build_tokenizer(folder)
    name = index["_class_name"]
    if name == "StableDiffusionPipeline":
        pipe = StableDiffusionPipeline.from_pretrained(model_dir, safety_checker=None, requires_safety_checker=False, **kw)
    elif name == "StableDiffusionXLPipeline":
        pipe = StableDiffusionXLPipeline.from_pretrained(model_dir, add_watermarker=False, **kw)
    else:
        raise SystemExit(f"unsupported pipeline {name}")
    return pipe


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--prompt", required=True)
    ap.add_argument("--negative-prompt", default=None)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--width", type=int, default=None, help="default: unet sample_size * 8")
    ap.add_argument("--height", type=int, default=None, help="default: unet sample_size * 8")
    ap.add_argument(
        "--sampler",
        default="default",
        choices=["default", "euler", "euler_a", "ddim", "dpmpp_2m", "dpmpp_2m_karras", "lcm"],
    )
    ap.add_argument("--scheduler-config", help="scheduler_config.json to use instead of the model's")
    ap.add_argument("--out", required=True, help="output PNG")
    ap.add_argument("--save-latents", help="also save the final latents (before VAE decode) to this .safetensors")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.time()
    pipe = load_pipeline(args.model)
    pipe.set_progress_bar_config(disable=True)
    if args.scheduler_config:
        from diffusers import SchedulerMixin  # noqa: F401
        import diffusers

        cfg = json.load(open(args.scheduler_config))
        pipe.scheduler = getattr(diffusers, cfg["_class_name"]).from_config(
            getattr(diffusers, cfg["_class_name"]).load_config(args.scheduler_config)
        )
    if args.sampler != "default":
        pipe.scheduler = make_sampler(args.sampler, pipe.scheduler.config)
    t_load = time.time() - t0

    final = {}

    def cb(p, i, t, kwargs):
        final["latents"] = kwargs["latents"].detach().clone()
        return kwargs

    t1 = time.time()
    with torch.no_grad():
        image = pipe(
            args.prompt,
            negative_prompt=args.negative_prompt,
            num_inference_steps=args.steps,
            guidance_scale=args.guidance,
            width=args.width,
            height=args.height,
            generator=torch.Generator("cpu").manual_seed(args.seed),
            output_type="pil",
            callback_on_step_end=cb,
        ).images[0]
    t_gen = time.time() - t1
    image.save(args.out)
    if args.save_latents:
        from safetensors.torch import save_file

        save_file({"latents": final["latents"].float().contiguous()}, args.save_latents)
    print(
        f"{type(pipe.scheduler).__name__} timesteps={[round(float(t), 3) for t in pipe.scheduler.timesteps]}\n"
        f"wrote {args.out} ({image.size[0]}x{image.size[1]}); load {t_load:.1f}s, generate {t_gen:.1f}s"
    )


if __name__ == "__main__":
    main()
