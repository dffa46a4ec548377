#!/usr/bin/env python3
"""Inpainting and outpainting references from diffusers on the tiny test models.

Writes crates/engine/tests/fixtures/inpaint/:
  <model>-inpaint-unet/    9-channel U-Nets for sd1-tiny, sd2v-tiny and sdxl-tiny: the base
                           U-Net's weights, conv_in widened to latents + mask + masked-image
                           latents (the extra 5 input channels seeded random). A test builds the
                           whole inpainting model by putting one of these in place of the base
                           model's unet/ (the text encoders, VAE and scheduler are the base's).
  mask.png                 64x64, white = repaint (a box over the disc of img2img/init.png)
  small-mask.png           64x64, a small box near the top right (for "only masked")
  reference.json           the cases
  reference.safetensors    per case `<case>.image` (u8 HWC, the pipeline's PIL output) and, for
                           cases without an overlay, `<case>.latents`

Each case is diffusers' StableDiffusionInpaintPipeline (SDXL: StableDiffusionXLInpaintPipeline)
built from the model's components, the sampler from_config(<the model's scheduler config>),
`torch.Generator("cpu").manual_seed(SEED)`, the init image of img2img/init.png, default
arguments otherwise. Mask blur cases blur the mask with `mask_processor.blur` and lay the
output over the init image with `image_processor.apply_overlay` (what Easel's --mask-blur does);
"only masked" cases pass `padding_mask_crop`; outpainting cases pass the init image on a larger
canvas (edges repeated, numpy's pad "edge") with the new border as the mask.

  /work/pyref/bin/python scripts/make_inpaint_fixtures.py
"""

import json
import os
import shutil
import sys
import tempfile

import numpy as np
import torch
from PIL import Image, ImageDraw
from safetensors.torch import save_file

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

from make_fixtures import NEGATIVE, PROMPT, SAMPLERS, SPECS, make_sampler, load_tiny_pipeline, tiny_tokenizers, deterministic_and_quiet  # noqa: E402
from make_img2img_fixtures import GUIDANCE, SEED, SIZE, STEPS, init_image  # noqa: E402
from make_tokenizer import load_clip_bpe  # noqa: E402

FIXTURES = os.path.join(ROOT, "crates/engine/tests/fixtures")
OUT = os.path.join(FIXTURES, "inpaint")
MODELS = ["sd1-tiny", "sd2v-tiny", "sdxl-tiny"]
STRENGTHS_4 = [0.3, 0.6, 1.0]
STRENGTHS_9 = [0.6, 1.0]
OUTPAINT = (32, 0, 0, 32)  # left, top, right, bottom: 64x64 -> 96x96


def box_mask(x1, y1, x2, y2):
    mask = Image.new("L", (SIZE, SIZE), 0)
    ImageDraw.Draw(mask).rectangle([x1, y1, x2 - 1, y2 - 1], fill=255)
    return mask


def inpaint_unet_dir(name):
    return os.path.join(OUT, f"{name.removesuffix('-tiny')}-inpaint-unet")


def make_inpaint_unet(name):
    """The base U-Net with conv_in widened to 9 input channels, saved as the base stores it."""
    from diffusers import UNet2DConditionModel

    spec = SPECS[name]
    folder = os.path.join(FIXTURES, "models", name, "unet")
    kw = dict(variant="fp16") if spec["dtype"] == "float16" else {}
    base = UNet2DConditionModel.from_pretrained(folder, torch_dtype=torch.float32, **kw)
    config = dict(base.config)
    config["in_channels"] = 9
    unet = UNet2DConditionModel.from_config(config)
    state = base.state_dict()
    w = state["conv_in.weight"]
    g = torch.Generator().manual_seed(9)
    extra = torch.randn((w.shape[0], 5, *w.shape[2:]), generator=g) * w.std()
    state["conv_in.weight"] = torch.cat([w, extra], 1)
    unet.load_state_dict(state)
    out = inpaint_unet_dir(name)
    shutil.rmtree(out, ignore_errors=True)
    if spec["dtype"] == "float16":
        unet.to(torch.float16).save_pretrained(out, variant="fp16")
    else:
        unet.save_pretrained(out)


def assemble(name, nine, into):
    """The model folder diffusers loads: the base model, with the 9-channel U-Net when `nine`."""
    src = os.path.join(FIXTURES, "models", name)
    dst = os.path.join(into, name + ("-inpaint" if nine else ""))
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst)
    if nine:
        shutil.rmtree(os.path.join(dst, "unet"))
        shutil.copytree(inpaint_unet_dir(name), os.path.join(dst, "unet"))
    return dst


def load(name, folder, tokenizers):
    return load_tiny_pipeline(name, tokenizers, folder=folder, task="inpaint")


def run(pipe, sampler, config, image, mask, strength, output_type="latent", **extra):
    pipe.scheduler = make_sampler(sampler, config)
    return pipe(
        PROMPT,
        negative_prompt=NEGATIVE,
        image=image,
        mask_image=mask,
        strength=strength,
        num_inference_steps=STEPS,
        guidance_scale=GUIDANCE,
        width=image.width,
        height=image.height,
        generator=torch.Generator("cpu").manual_seed(SEED),
        output_type=output_type,
        **extra,
    ).images


def decoded_pixels(pipe, latents):
    decoded = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
    return ((decoded[0].permute(1, 2, 0) / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)


def pil_tensor(image):
    return torch.from_numpy(np.array(image.convert("RGB"))).contiguous()


@torch.no_grad()
def main():
    import diffusers

    deterministic_and_quiet()
    os.makedirs(OUT, exist_ok=True)
    image = init_image()
    mask = box_mask(8, 10, 38, 40)
    small = box_mask(44, 6, 58, 18)
    mask.save(os.path.join(OUT, "mask.png"))
    small.save(os.path.join(OUT, "small-mask.png"))
    left, top, right, bottom = OUTPAINT
    wide = Image.fromarray(np.pad(np.array(image), ((top, bottom), (left, right), (0, 0)), mode="edge"))
    border = np.full((wide.height, wide.width), 255, np.uint8)
    border[top : top + SIZE, left : left + SIZE] = 0
    border = Image.fromarray(border, "L")

    encoder, merges = load_clip_bpe()
    tensors, cases = {}, []
    tmp = tempfile.mkdtemp(prefix="easel-inpaint-")

    def record(key, pipe, latents=None, picture=None, **case):
        if latents is not None:
            tensors[f"{key}.latents"] = latents.float().contiguous()
            tensors[f"{key}.image"] = decoded_pixels(pipe, latents).contiguous()
        else:
            tensors[f"{key}.image"] = pil_tensor(picture)
        cases.append(dict(key=key, **case))
        print(key)

    for name in MODELS:
        make_inpaint_unet(name)
        spec = SPECS[name]
        toks = tiny_tokenizers(name, encoder, merges)
        for nine in [False, True]:
            pipe = load(name, assemble(name, nine, tmp), toks)
            config = dict(pipe.scheduler.config)
            kind = "9ch" if nine else "4ch"
            common = dict(model=name, inpainting_model=nine, mask="mask.png", mask_blur=0, area="whole", padding=0)
            for sampler in SAMPLERS:
                for strength in STRENGTHS_9 if nine else STRENGTHS_4:
                    latents = run(pipe, sampler, config, image, mask, strength)
                    record(f"{name}.{kind}.{sampler}.{strength}", pipe, latents, sampler=sampler, strength=strength,
                           **common)
            if name == "sd2v-tiny":
                continue
            # Mask blur 4: the blurred mask in, the output laid over the init image through it.
            blurred = pipe.mask_processor.blur(mask, blur_factor=4)
            out = run(pipe, "euler", config, image, blurred, 0.75, output_type="pil")[0]
            out = pipe.image_processor.apply_overlay(blurred, image, out)
            record(f"{name}.{kind}.blur4", pipe, picture=out, sampler="euler", strength=0.75,
                   **{**common, "mask_blur": 4})
            # Only masked, 8 pixels of padding: diffusers' padding_mask_crop.
            out = run(pipe, "euler", config, image, small, 0.75, output_type="pil", padding_mask_crop=8)[0]
            record(f"{name}.{kind}.masked", pipe, picture=out, sampler="euler", strength=0.75,
                   **{**common, "mask": "small-mask.png", "area": "masked", "padding": 8})
            # Outpainting the left and bottom.
            latents = run(pipe, "euler", config, wide, border, 1.0)
            record(f"{name}.{kind}.outpaint", pipe, latents, sampler="euler", strength=1.0,
                   **{**common, "mask": None, "outpaint": list(OUTPAINT)})
    shutil.rmtree(tmp, ignore_errors=True)
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
    )
    with open(os.path.join(OUT, "reference.json"), "w") as f:
        json.dump(reference, f, indent=1)
        f.write("\n")
    save_file(tensors, os.path.join(OUT, "reference.safetensors"))


if __name__ == "__main__":
    main()
