#!/usr/bin/env python3
"""Image-to-image references from diffusers on the tiny test models.

Writes crates/engine/tests/fixtures/img2img/:
  init.png                 the 64x64 init image (drawn here, deterministic)
  reference.json           the cases: model, sampler, strength, the timesteps diffusers ran
  reference.safetensors    per case: `<case>.latents` (f32, as `output_type="latent"` returns
                           them) and `<case>.image` (u8 HWC, `vae.decode(latents / scaling)`
                           rounded as diffusers' `numpy_to_pil`)

Each case is diffusers' StableDiffusionImg2ImgPipeline (SDXL: StableDiffusionXLImg2ImgPipeline)
built from the text-to-image pipeline's components, the sampler from_config(<the model's
scheduler_config.json>), `torch.Generator("cpu").manual_seed(SEED)`, default arguments otherwise.

  /work/pyref/bin/python scripts/make_img2img_fixtures.py
"""

import json
import os
import sys

import numpy as np
import torch
from PIL import Image, ImageDraw
from safetensors.torch import save_file

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

from make_fixtures import NEGATIVE, PROMPT, SAMPLERS, SPECS, make_sampler, load_tiny_pipeline, tiny_tokenizers, deterministic_and_quiet  # noqa: E402
from make_tokenizer import load_clip_bpe  # noqa: E402

MODELS = ["sd1-tiny", "sd2v-tiny", "sdxl-tiny"]
STRENGTHS = [0.3, 0.6, 1.0]
STEPS = 6
GUIDANCE = 7.5
SEED = 11
SIZE = 64


def init_image():
    """A gradient with a disc and a bar: structure the VAE keeps, so the strength shows."""
    y, x = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32) / (SIZE - 1)
    array = np.stack([200 * x + 30, 180 * y + 40, 120 + 60 * (1 - x)], -1).astype(np.uint8)
    image = Image.fromarray(array, "RGB")
    draw = ImageDraw.Draw(image)
    draw.ellipse([10, 12, 34, 36], fill=(230, 40, 40))
    draw.rectangle([38, 30, 58, 52], fill=(30, 60, 200))
    return image


def decoded_pixels(pipe, latents):
    """`vae.decode(latents / scaling)` as u8 HWC, rounded as diffusers' `numpy_to_pil`."""
    decoded = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
    return ((decoded[0].permute(1, 2, 0) / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)


def load(name, tokenizers):
    return load_tiny_pipeline(name, tokenizers, task="img2img")


HIRES_STEPS = 4
HIRES_SCALE = 2
HIRES_DENOISE = 0.5


@torch.no_grad()
def hires_cases(encoder, merges, tensors):
    """AUTOMATIC1111's hires fix in diffusers' terms: text to image (`output_type="latent"`), the
    latents upscaled by `F.interpolate` (or the decoded picture by PIL's Lanczos), then the img2img
    pipeline with those latents (or that picture) as `image` and a generator seeded again."""

    cases = []
    for name in ["sd1-tiny", "sdxl-tiny"]:
        spec = SPECS[name]
        toks = tiny_tokenizers(name, encoder, merges)
        pipe = load(name, toks)
        components = {k: v for k, v in pipe.components.items()}
        from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

        base_cls = StableDiffusionXLPipeline if "XL" in type(pipe).__name__ else StableDiffusionPipeline
        for upscaler in ["latent", "latent-nearest", "lanczos"]:
            sampler = make_sampler("euler", dict(pipe.scheduler.config))
            components["scheduler"] = sampler
            base = base_cls(**components)
            base.set_progress_bar_config(disable=True)
            common = dict(prompt=PROMPT, negative_prompt=NEGATIVE, guidance_scale=GUIDANCE, output_type="latent")
            small = base(
                **common, num_inference_steps=HIRES_STEPS, width=SIZE, height=SIZE,
                generator=torch.Generator("cpu").manual_seed(SEED),
            ).images
            side = SIZE * HIRES_SCALE // 8
            if upscaler == "lanczos":
                decoded = pipe.vae.decode(small / pipe.vae.config.scaling_factor).sample
                picture = pipe.image_processor.postprocess(decoded, output_type="pil")[0]
                image = picture.resize((side * 8, side * 8), Image.LANCZOS)
            else:
                mode = "bilinear" if upscaler == "latent" else "nearest"
                image = torch.nn.functional.interpolate(small, size=(side, side), mode=mode)
            pipe.scheduler = sampler
            latents = pipe(
                **common, image=image, strength=HIRES_DENOISE, num_inference_steps=HIRES_STEPS,
                generator=torch.Generator("cpu").manual_seed(SEED),
            ).images
            pixels = decoded_pixels(pipe, latents)
            key = f"hires.{name}.{upscaler}"
            tensors[f"{key}.latents"] = latents.float().contiguous()
            tensors[f"{key}.image"] = pixels.contiguous()
            cases.append(dict(model=name, upscaler=upscaler, sampler="euler", steps=HIRES_STEPS, scale=HIRES_SCALE,
                              denoise=HIRES_DENOISE))
            print(f"{key}: {list(latents.shape)}")
    return cases


@torch.no_grad()
def main():
    import diffusers

    deterministic_and_quiet()
    out = os.path.join(ROOT, "crates/engine/tests/fixtures/img2img")
    os.makedirs(out, exist_ok=True)
    image = init_image()
    image.save(os.path.join(out, "init.png"))

    encoder, merges = load_clip_bpe()
    tensors, cases = {}, []
    for name in MODELS:
        spec = SPECS[name]
        toks = tiny_tokenizers(name, encoder, merges)
        pipe = load(name, toks)
        config = dict(pipe.scheduler.config)
        for sampler in SAMPLERS:
            for strength in STRENGTHS:
                pipe.scheduler = make_sampler(sampler, config)
                ran = []

                def record(p, i, t, kwargs):
                    ran.append(float(t))
                    return kwargs

                latents = pipe(
                    PROMPT,
                    negative_prompt=NEGATIVE,
                    image=image,
                    strength=strength,
                    num_inference_steps=STEPS,
                    guidance_scale=GUIDANCE,
                    generator=torch.Generator("cpu").manual_seed(SEED),
                    output_type="latent",
                    callback_on_step_end=record,
                ).images
                pixels = decoded_pixels(pipe, latents)
                key = f"{name}.{sampler}.{strength}"
                tensors[f"{key}.latents"] = latents.float().contiguous()
                tensors[f"{key}.image"] = pixels.contiguous()
                cases.append(dict(model=name, sampler=sampler, strength=strength, timesteps=ran))
                print(f"{key}: {len(ran)} steps {ran}")
    hires = hires_cases(encoder, merges, tensors)
    reference = dict(
        prompt=PROMPT,
        negative_prompt=NEGATIVE,
        steps=STEPS,
        guidance_scale=GUIDANCE,
        seed=SEED,
        width=SIZE,
        height=SIZE,
        init_image="tests/fixtures/img2img/init.png",
        versions=dict(torch=torch.__version__, diffusers=diffusers.__version__),
        cases=cases,
        hires=hires,
    )
    with open(os.path.join(out, "reference.json"), "w") as f:
        json.dump(reference, f, indent=1)
        f.write("\n")
    save_file(tensors, os.path.join(out, "reference.safetensors"))


if __name__ == "__main__":
    main()
