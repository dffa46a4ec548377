#!/usr/bin/env python3
"""Reference U-Net calls and a VAE decode at a larger latent size (36×36) for the tiny models.

The main fixtures use 8×8 latents, where Easel's CPU kernels take their small-image paths; at
36×36 the top U-Net level (1296 pixels) and every VAE level use the Winograd convolution, and
self-attention spans several query blocks. Reads the existing tiny models (written by
make_fixtures.py), so run that first; writes

  tests/fixtures/reference/large/reference.safetensors   (f32, ~1.3 MB)

    /work/pyref/bin/python scripts/make_large_fixtures.py
"""

import os

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from safetensors.torch import save_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = ["sd1-tiny", "sd2v-tiny", "sdxl-tiny"]
LATENT = 36
TIMESTEP = 500.0


def load(cls, model, sub):
    folder = os.path.join(ROOT, "crates/engine/tests/fixtures/models", model)
    try:
        return cls.from_pretrained(folder, subfolder=sub, torch_dtype=torch.float32)
    except (OSError, EnvironmentError):
        # sd2v-tiny is stored only as fp16 variant files; upcast exactly like Easel does.
        return cls.from_pretrained(folder, subfolder=sub, variant="fp16").to(torch.float32)


def main():
    torch.manual_seed(0)
    out = {}
    with torch.inference_mode():
        for model in MODELS:
            unet = load(UNet2DConditionModel, model, "unet").eval()
            g = torch.Generator().manual_seed(7)
            sample = torch.randn((2, unet.config.in_channels, LATENT, LATENT), generator=g)
            context = torch.randn((2, 77, unet.config.cross_attention_dim), generator=g)
            kw = {}
            if unet.config.addition_embed_type == "text_time":
                pooled_dim = unet.add_embedding.linear_1.in_features - 6 * unet.config.addition_time_embed_dim
                text_embeds = torch.randn((2, pooled_dim), generator=g)
                side = float(LATENT * 8)
                time_ids = torch.tensor([[side, side, 0.0, 0.0, side, side]] * 2)
                kw["added_cond_kwargs"] = {"text_embeds": text_embeds, "time_ids": time_ids}
                out[f"{model}.unet.text_embeds"] = text_embeds
                out[f"{model}.unet.time_ids"] = time_ids
            out[f"{model}.unet.sample"] = sample
            out[f"{model}.unet.encoder_hidden_states"] = context
            out[f"{model}.unet.out"] = unet(sample, torch.tensor(TIMESTEP), encoder_hidden_states=context, **kw).sample

        vae = load(AutoencoderKL, "sd1-tiny", "vae").eval()
        latents = torch.randn((1, 4, LATENT, LATENT), generator=torch.Generator().manual_seed(8))
        out["sd1-tiny.vae.latents"] = latents
        # decode_latents in Easel takes the sampler's latents and divides by the scaling factor itself.
        image = vae.decode(latents / vae.config.scaling_factor).sample
        out["sd1-tiny.vae.image"] = image
    folder = os.path.join(ROOT, "crates/engine/tests/fixtures/reference/large")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "reference.safetensors")
    save_file({k: v.contiguous().float() for k, v in out.items()}, path, metadata={"timestep": str(TIMESTEP)})
    print(f"wrote {path} ({os.path.getsize(path) / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
