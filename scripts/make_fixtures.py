#!/usr/bin/env python3
"""Tiny random-weight Stable Diffusion models + diffusers reference outputs.

Writes (relative to the repository root, everything rewritten on each run):

  tests/fixtures/scheduler_configs/{sd15,sd21,sdxl,sd_turbo,sdxl_turbo}.json
      verbatim scheduler_config.json files of the real Hub repos
  tests/fixtures/models/{sd1-tiny,sd2v-tiny,sdxl-tiny}/
      diffusers folder layout, random weights, real key names
  tests/fixtures/reference/<model>/reference.safetensors   (f32 tensors)
  tests/fixtures/reference/<model>/reference.json          (everything else)

All reference outputs are computed by diffusers pipelines loaded back *from the
written folders* (so they use exactly the stored weights and the verbatim
scheduler configs), on CPU in float32. Run with the pinned venv:

  /work/pyref/bin/python scripts/make_fixtures.py
"""

import argparse
import json
import os
import shutil
import sys
import time

import numpy as np
import torch
from safetensors.torch import load_file, save_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from make_tokenizer import load_clip_bpe  # noqa: E402

# --------------------------------------------------------------------------
# verbatim scheduler configs (byte-for-byte as in the Hub repos)
# --------------------------------------------------------------------------
SCHEDULER_CONFIGS = {
    # runwayml/stable-diffusion-v1-5
    "sd15": """{
  "_class_name": "PNDMScheduler",
  "_diffusers_version": "0.6.0",
  "beta_end": 0.012,
  "beta_schedule": "scaled_linear",
  "beta_start": 0.00085,
  "num_train_timesteps": 1000,
  "set_alpha_to_one": false,
  "skip_prk_steps": true,
  "steps_offset": 1,
  "trained_betas": null,
  "clip_sample": false
}
""",
    # stabilityai/stable-diffusion-2-1
    "sd21": """{
  "_class_name": "DDIMScheduler",
  "_diffusers_version": "0.8.0",
  "beta_end": 0.012,
  "beta_schedule": "scaled_linear",
  "beta_start": 0.00085,
  "clip_sample": false,
  "num_train_timesteps": 1000,
  "prediction_type": "v_prediction",
  "set_alpha_to_one": false,
  "skip_prk_steps": true,
  "steps_offset": 1,
  "trained_betas": null
}
""",
    # stabilityai/stable-diffusion-xl-base-1.0
    "sdxl": """{
  "_class_name": "EulerDiscreteScheduler",
  "_diffusers_version": "0.19.0.dev0",
  "beta_end": 0.012,
  "beta_schedule": "scaled_linear",
  "beta_start": 0.00085,
  "clip_sample": false,
  "interpolation_type": "linear",
  "num_train_timesteps": 1000,
  "prediction_type": "epsilon",
  "sample_max_value": 1.0,
  "set_alpha_to_one": false,
  "skip_prk_steps": true,
  "steps_offset": 1,
  "timestep_spacing": "leading",
  "trained_betas": null,
  "use_karras_sigmas": false
}
""",
    # stabilityai/sd-turbo
    "sd_turbo": """{
  "_class_name": "EulerDiscreteScheduler",
  "_diffusers_version": "0.24.0.dev0",
  "beta_end": 0.012,
  "beta_schedule": "scaled_linear",
  "beta_start": 0.00085,
  "clip_sample": false,
  "interpolation_type": "linear",
  "num_train_timesteps": 1000,
  "prediction_type": "epsilon",
  "sample_max_value": 1.0,
  "set_alpha_to_one": false,
  "skip_prk_steps": true,
  "steps_offset": 1,
  "timestep_spacing": "trailing",
  "trained_betas": null,
  "use_karras_sigmas": false
}
""",
    # stabilityai/sdxl-turbo
    "sdxl_turbo": """{
  "_class_name": "EulerAncestralDiscreteScheduler",
  "_diffusers_version": "0.24.0.dev0",
  "beta_end": 0.012,
  "beta_schedule": "scaled_linear",
  "beta_start": 0.00085,
  "clip_sample": false,
  "interpolation_type": "linear",
  "num_train_timesteps": 1000,
  "prediction_type": "epsilon",
  "sample_max_value": 1.0,
  "set_alpha_to_one": false,
  "skip_prk_steps": true,
  "steps_offset": 1,
  "timestep_spacing": "trailing",
  "trained_betas": null
}
""",
}

SPECIAL_TOKENS_MAP_BANG = """{
  "bos_token": "<|startoftext|>",
  "eos_token": "<|endoftext|>",
  "pad_token": "!",
  "unk_token": "<|endoftext|>"
}
"""

PROMPT = "a photo of a cat, (masterpiece), 8k"
NEGATIVE = "blurry, low quality"
H = W = 64
SEED = 42
GUIDANCE = 7.5
STEPS = 6
UNET_TIMESTEP = 500.0
SAMPLERS = ["euler", "euler_a", "ddim", "dpmpp_2m", "dpmpp_2m_karras", "lcm"]


def make_sampler(sampler_id, config):
    """Sampler id -> diffusers scheduler built with from_config(<pipeline's scheduler config>)."""
    from diffusers import (
        DDIMScheduler,
        DPMSolverMultistepScheduler,
        EulerAncestralDiscreteScheduler,
        EulerDiscreteScheduler,
        LCMScheduler,
    )

    if sampler_id == "euler":
        return EulerDiscreteScheduler.from_config(config)
    if sampler_id == "euler_a":
        return EulerAncestralDiscreteScheduler.from_config(config)
    if sampler_id == "ddim":
        return DDIMScheduler.from_config(config)  # eta = 0 (pipeline default)
    if sampler_id == "dpmpp_2m":
        return DPMSolverMultistepScheduler.from_config(config)
    if sampler_id == "dpmpp_2m_karras":
        return DPMSolverMultistepScheduler.from_config(config, use_karras_sigmas=True)
    if sampler_id == "lcm":
        return LCMScheduler.from_config(config)
    raise ValueError(sampler_id)


# --------------------------------------------------------------------------
# tiny model specs
# --------------------------------------------------------------------------
def clip_text_config(hidden, heads, layers, inter, act, projection_dim, arch):
    """config.json in the layout of the real SD repos (transformers 4.x style)."""
    return {
        "architectures": [arch],
        "attention_dropout": 0.0,
        "bos_token_id": 0,
        "dropout": 0.0,
        "eos_token_id": 2,
        "hidden_act": act,
        "hidden_size": hidden,
        "initializer_factor": 1.0,
        "initializer_range": 0.02,
        "intermediate_size": inter,
        "layer_norm_eps": 1e-05,
        "max_position_embeddings": 77,
        "model_type": "clip_text_model",
        "num_attention_heads": heads,
        "num_hidden_layers": layers,
        "pad_token_id": 1,
        "projection_dim": projection_dim,
        "torch_dtype": "float32",
        "transformers_version": "5.23.0",
        "vocab_size": 49408,
    }


SPECS = {
    "sd1-tiny": dict(
        pipeline="StableDiffusionPipeline",
        scheduler="sd15",
        dtype="float32",
        text_encoders={
            "text_encoder": clip_text_config(6, 2, 2, 24, "quick_gelu", 6, "CLIPTextModel"),
        },
        pads={"tokenizer": "<|endoftext|>"},
        unet=dict(
            sample_size=8,
            in_channels=4,
            out_channels=4,
            block_out_channels=[16, 24],
            down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
            up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
            mid_block_type="UNetMidBlock2DCrossAttn",
            layers_per_block=2,
            attention_head_dim=2,
            cross_attention_dim=6,
            norm_num_groups=8,
            use_linear_projection=False,
        ),
        vae=dict(
            block_out_channels=[8, 8, 16, 16],
            down_block_types=["DownEncoderBlock2D"] * 4,
            up_block_types=["UpDecoderBlock2D"] * 4,
            layers_per_block=1,
            norm_num_groups=4,
            latent_channels=4,
            sample_size=64,
            scaling_factor=0.18215,
        ),
    ),
    "sd2v-tiny": dict(
        pipeline="StableDiffusionPipeline",
        scheduler="sd21",
        dtype="float16",  # stored ONLY as fp16 variant files
        text_encoders={
            "text_encoder": clip_text_config(8, 4, 2, 32, "gelu", 8, "CLIPTextModel"),
        },
        pads={"tokenizer": "!"},
        unet=dict(
            sample_size=8,
            in_channels=4,
            out_channels=4,
            block_out_channels=[16, 32],
            down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
            up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
            mid_block_type="UNetMidBlock2DCrossAttn",
            layers_per_block=2,
            attention_head_dim=[2, 4],
            cross_attention_dim=8,
            norm_num_groups=8,
            use_linear_projection=True,
            upcast_attention=True,
        ),
        vae=dict(
            block_out_channels=[8, 16, 16, 16],
            down_block_types=["DownEncoderBlock2D"] * 4,
            up_block_types=["UpDecoderBlock2D"] * 4,
            layers_per_block=1,
            norm_num_groups=8,
            latent_channels=4,
            sample_size=64,
            scaling_factor=0.18215,
        ),
    ),
    "sdxl-tiny": dict(
        pipeline="StableDiffusionXLPipeline",
        scheduler="sdxl",
        dtype="float32",
        text_encoders={
            "text_encoder": clip_text_config(4, 2, 2, 16, "quick_gelu", 4, "CLIPTextModel"),
            "text_encoder_2": clip_text_config(6, 2, 3, 24, "gelu", 12, "CLIPTextModelWithProjection"),
        },
        pads={"tokenizer": "<|endoftext|>", "tokenizer_2": "!"},
        unet=dict(
            sample_size=8,
            in_channels=4,
            out_channels=4,
            block_out_channels=[16, 24],
            down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
            up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"],
            mid_block_type="UNetMidBlock2DCrossAttn",
            layers_per_block=2,
            attention_head_dim=[2, 4],
            transformer_layers_per_block=[1, 2],
            cross_attention_dim=10,  # 4 (text_encoder) + 6 (text_encoder_2)
            norm_num_groups=8,
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=12 + 6 * 8,  # text_encoder_2 projection_dim + 6*time dim
        ),
        vae=dict(
            block_out_channels=[8, 8, 16, 16],
            down_block_types=["DownEncoderBlock2D"] * 4,
            up_block_types=["UpDecoderBlock2D"] * 4,
            layers_per_block=1,
            norm_num_groups=4,
            latent_channels=4,
            sample_size=64,
            scaling_factor=0.13025,
            force_upcast=True,
        ),
    ),
}


# --------------------------------------------------------------------------
# building / saving
# --------------------------------------------------------------------------
@torch.no_grad()
def perturb(module, gen):
    """Default inits leave norm weights at 1 and biases at 0; jitter every 1-D parameter
    so that a swapped/ignored weight or bias is visible in the outputs."""
    for _, p in sorted(module.named_parameters()):
        if p.ndim == 1:
            p.add_(0.1 * torch.randn(p.shape, generator=gen))


def f16_exact(module):
    """Round the weights to float16 values (kept in float32)."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(p.half().float())


def save_text_encoder(model, cfg, folder, fp16):
    """Save with the real checkpoint key layout: text_model.* (+ text_projection.weight)."""
    os.makedirs(folder, exist_ok=True)
    sd = model.state_dict()
    out = {}
    for k, v in sd.items():
        if k.endswith("position_ids"):
            continue
        if cfg["architectures"][0] == "CLIPTextModel":
            k = "text_model." + k  # transformers 5 drops this prefix; real checkpoints have it
        out[k] = v.detach().to(torch.float16 if fp16 else torch.float32).contiguous()
    assert all(k.startswith("text_model.") or k == "text_projection.weight" for k in out), list(out)
    assert "text_model.embeddings.token_embedding.weight" in out
    assert "text_model.final_layer_norm.weight" in out
    assert "text_model.encoder.layers.0.self_attn.q_proj.weight" in out
    name = "model.fp16.safetensors" if fp16 else "model.safetensors"
    save_file(dict(sorted(out.items())), os.path.join(folder, name), metadata={"format": "pt"})
    c = dict(cfg)
    c["torch_dtype"] = "float16" if fp16 else "float32"
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(c, f, indent=2)
        f.write("\n")


def save_diffusers_model(model, folder, fp16):
    if fp16:
        model.half().save_pretrained(folder, variant="fp16", safe_serialization=True)
        model.float()
    else:
        model.save_pretrained(folder, safe_serialization=True)


def build_model(name, spec, model_dir, tokenizers):
    from diffusers import AutoencoderKL, StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    fp16 = spec["dtype"] == "float16"
    seed_base = {"sd1-tiny": 1000, "sd2v-tiny": 2000, "sdxl-tiny": 3000}[name]
    comps = {}
    for i, (sub, cfg) in enumerate(spec["text_encoders"].items()):
        torch.manual_seed(seed_base + i)
        tcfg = CLIPTextConfig(**{k: v for k, v in cfg.items() if k not in ("architectures", "torch_dtype", "transformers_version", "model_type")})
        cls = CLIPTextModel if cfg["architectures"][0] == "CLIPTextModel" else CLIPTextModelWithProjection
        comps[sub] = cls(tcfg).eval()
    torch.manual_seed(seed_base + 10)
    comps["unet"] = UNet2DConditionModel(**spec["unet"]).eval()
    torch.manual_seed(seed_base + 20)
    comps["vae"] = AutoencoderKL(**spec["vae"]).eval()
    gen = torch.Generator().manual_seed(seed_base + 30)
    for k in sorted(comps):
        perturb(comps[k], gen)
        if fp16:
            f16_exact(comps[k])

    # ---- write the folder
    for sub, cfg in spec["text_encoders"].items():
        save_text_encoder(comps[sub], cfg, os.path.join(model_dir, sub), fp16)
    save_diffusers_model(comps["unet"], os.path.join(model_dir, "unet"), fp16)
    save_diffusers_model(comps["vae"], os.path.join(model_dir, "vae"), fp16)
    os.makedirs(os.path.join(model_dir, "scheduler"), exist_ok=True)
    with open(os.path.join(model_dir, "scheduler", "scheduler_config.json"), "w") as f:
        f.write(SCHEDULER_CONFIGS[spec["scheduler"]])
    for tok_sub, pad in spec["pads"].items():
        if pad == "!":  # like the real SD 2.x / SDXL repos: special_tokens_map.json says pad "!"
            os.makedirs(os.path.join(model_dir, tok_sub), exist_ok=True)
            with open(os.path.join(model_dir, tok_sub, "special_tokens_map.json"), "w") as f:
                f.write(SPECIAL_TOKENS_MAP_BANG)

    # model_index.json exactly as diffusers' save_pretrained writes it
    from diffusers import DDIMScheduler, EulerDiscreteScheduler, PNDMScheduler

    sched_cls = {"sd15": PNDMScheduler, "sd21": DDIMScheduler, "sdxl": EulerDiscreteScheduler}[spec["scheduler"]]
    sched = sched_cls.from_pretrained(model_dir, subfolder="scheduler")
    if spec["pipeline"] == "StableDiffusionPipeline":
        pipe = StableDiffusionPipeline(
            vae=comps["vae"],
            text_encoder=comps["text_encoder"],
            tokenizer=tokenizers["tokenizer"],
            unet=comps["unet"],
            scheduler=sched,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    else:
        pipe = StableDiffusionXLPipeline(
            vae=comps["vae"],
            text_encoder=comps["text_encoder"],
            text_encoder_2=comps["text_encoder_2"],
            tokenizer=tokenizers["tokenizer"],
            tokenizer_2=tokenizers["tokenizer_2"],
            unet=comps["unet"],
            scheduler=sched,
            force_zeros_for_empty_prompt=True,
        )
    pipe.save_config(model_dir)
    return comps


def load_pipeline(name, spec, model_dir, tokenizers, built):
    """Load the folder back the way a user would and check every weight."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    kw = dict(dtype=torch.float32)
    if spec["dtype"] == "float16":
        kw["variant"] = "fp16"
    if spec["pipeline"] == "StableDiffusionPipeline":
        pipe = StableDiffusionPipeline.from_pretrained(model_dir, tokenizer=tokenizers["tokenizer"], **kw)
    else:
        pipe = StableDiffusionXLPipeline.from_pretrained(
            model_dir, tokenizer=tokenizers["tokenizer"], tokenizer_2=tokenizers["tokenizer_2"], add_watermarker=False, **kw
        )
    pipe.set_progress_bar_config(disable=True)
    for sub, module in built.items():
        loaded = getattr(pipe, sub)
        a, b = module.state_dict(), loaded.state_dict()
        assert a.keys() == b.keys(), (sub, set(a) ^ set(b))
        for k in a:
            assert b[k].dtype == torch.float32, (sub, k, b[k].dtype)
            assert torch.equal(a[k].float(), b[k]), f"{name}/{sub}: {k} differs after reload"
    assert type(pipe.scheduler).__name__ == json.loads(SCHEDULER_CONFIGS[spec["scheduler"]])["_class_name"]
    return pipe


# --------------------------------------------------------------------------
# references
# --------------------------------------------------------------------------
def sched_info(s):
    cfg = {k: v for k, v in dict(s.config).items() if not k.startswith("_")}
    info = {
        "class": type(s).__name__,
        "config": cfg,
        "config_defaults_used": sorted(s.config.get("_use_default_values", [])),
    }
    if s.timesteps is not None and getattr(s, "num_inference_steps", None):  # after set_timesteps
        info["timesteps"] = [float(t) for t in s.timesteps]
        info["init_noise_sigma"] = float(s.init_noise_sigma)
        sig = getattr(s, "sigmas", None)
        if sig is not None:
            info["sigmas"] = [float(x) for x in sig]
    return info


def json_safe(x):
    """JSON has no Infinity/NaN (serde_json rejects them): write them as strings."""
    if isinstance(x, float) and not np.isfinite(x):
        return "nan" if np.isnan(x) else ("inf" if x > 0 else "-inf")
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    return x


def tok_ids(tokenizer, text):
    return tokenizer(text, padding="max_length", max_length=tokenizer.model_max_length, truncation=True).input_ids


def run_pipe(pipe, xl, **kw):
    """Run the pipeline, returning (output, per-step latents)."""
    traj = []

    def cb(p, i, t, kwargs):
        traj.append(kwargs["latents"].detach().clone())
        return kwargs

    out = pipe(
        PROMPT,
        height=H,
        width=W,
        generator=torch.Generator("cpu").manual_seed(SEED),
        callback_on_step_end=cb,
        **kw,
    ).images
    return out, torch.stack(traj, 0)


@torch.no_grad()
def make_reference(name, spec, pipe, ref_dir):
    xl = spec["pipeline"] == "StableDiffusionXLPipeline"
    T, J = {}, {}
    J.update(
        {
            "model": name,
            "model_dir": f"tests/fixtures/models/{name}",
            "pipeline": spec["pipeline"],
            "prompt": PROMPT,
            "negative_prompt": NEGATIVE,
            "height": H,
            "width": W,
            "seed": SEED,
            "guidance_scale": GUIDANCE,
            "steps": STEPS,
            "weights_dtype_on_disk": spec["dtype"],
        }
    )
    device = torch.device("cpu")

    # ---- tokens and text embeddings
    tok_subs = ["tokenizer", "tokenizer_2"] if xl else ["tokenizer"]
    for sub in tok_subs:
        tk = getattr(pipe, sub)
        J[f"tokens.{sub}.pad_token"] = tk.pad_token
        J[f"tokens.{sub}.cond"] = tok_ids(tk, PROMPT)
        J[f"tokens.{sub}.uncond"] = tok_ids(tk, NEGATIVE)
    if xl:
        pe, ne, pp, npool = pipe.encode_prompt(
            PROMPT, device=device, num_images_per_prompt=1, do_classifier_free_guidance=True, negative_prompt=NEGATIVE
        )
        T["text.cond_pooled"], T["text.uncond_pooled"] = pp, npool
        # negative_prompt="" (a string, not None) is encoded like any prompt
        _, e, _, ep = pipe.encode_prompt(
            PROMPT, device=device, num_images_per_prompt=1, do_classifier_free_guidance=True, negative_prompt=""
        )
        T["text.empty"], T["text.empty_pooled"] = e, ep
        for sub in tok_subs:
            J[f"tokens.{sub}.empty"] = tok_ids(getattr(pipe, sub), "")
        te2_proj = pipe.text_encoder_2.config.projection_dim
        add_time_ids = pipe._get_add_time_ids((H, W), (0, 0), (H, W), dtype=pe.dtype, text_encoder_projection_dim=te2_proj)
        T["add_time_ids"] = add_time_ids
        J["add_time_ids"] = [float(x) for x in add_time_ids[0]]
        # what the pipeline does when negative_prompt is None (force_zeros_for_empty_prompt=True)
        _, ne0, _, np0 = pipe.encode_prompt(PROMPT, device=device, num_images_per_prompt=1, do_classifier_free_guidance=True)
        J["sdxl.negative_none_gives_zeros"] = bool((ne0 == 0).all() and (np0 == 0).all())
    else:
        pe, ne = pipe.encode_prompt(PROMPT, device, 1, True, negative_prompt=NEGATIVE)
        # negative_prompt=None is encoded as "" by StableDiffusionPipeline
        _, T["text.empty"] = pipe.encode_prompt(PROMPT, device, 1, True, negative_prompt=None)
        for sub in tok_subs:
            J[f"tokens.{sub}.empty"] = tok_ids(getattr(pipe, sub), "")
    T["text.cond"], T["text.uncond"] = pe, ne

    # ---- one U-Net call
    g = torch.Generator().manual_seed(1234)
    sample = torch.randn((2, 4, H // 8, W // 8), generator=g)
    ehs = torch.cat([ne, pe])
    T["unet.sample"], T["unet.encoder_hidden_states"] = sample, ehs
    J["unet.timestep"] = UNET_TIMESTEP
    kw = {}
    if xl:
        T["unet.text_embeds"] = torch.cat([npool, pp])
        T["unet.time_ids"] = torch.cat([add_time_ids, add_time_ids])
        kw["added_cond_kwargs"] = {"text_embeds": T["unet.text_embeds"], "time_ids": T["unet.time_ids"]}
    T["unet.out"] = pipe.unet(sample, torch.tensor(UNET_TIMESTEP), encoder_hidden_states=ehs, **kw).sample

    # ---- initial noise of the pipelines (before * init_noise_sigma)
    T["noise.initial"] = torch.randn((1, 4, H // 8, W // 8), generator=torch.Generator("cpu").manual_seed(SEED))

    # ---- samplers
    base_config = pipe.scheduler.config
    for k, v in sched_info(pipe.scheduler).items():
        J[f"scheduler.{k}"] = v
    common = dict(negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=GUIDANCE)
    for sid in SAMPLERS:
        pipe.scheduler = make_sampler(sid, base_config)
        lat, traj = run_pipe(pipe, xl, output_type="latent", **common)
        T[f"sampler.{sid}.latents"] = lat
        T[f"sampler.{sid}.trajectory"] = traj
        info = sched_info(pipe.scheduler)
        for k, v in info.items():
            J[f"sampler.{sid}.{k}"] = v
        if sid == "euler":
            img, _ = run_pipe(pipe, xl, output_type="np", **common)
            T["sampler.euler.image"] = torch.from_numpy(np.ascontiguousarray(img))
            sf = pipe.vae.config.scaling_factor
            T["vae.latents"] = lat
            T["vae.image"] = pipe.vae.decode(lat / sf).sample
            J["vae.scaling_factor"] = sf
            # the pipeline's np image is exactly the postprocessed vae.image
            ref = (T["vae.image"] / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1)
            assert torch.allclose(ref, T["sampler.euler.image"], atol=1e-6)

    # ---- turbo
    from diffusers import EulerAncestralDiscreteScheduler, EulerDiscreteScheduler

    if name == "sd2v-tiny":
        cfg_path = os.path.join(ROOT, "crates/engine/tests/fixtures/scheduler_configs/sd_turbo.json")
        turbo_steps = [1, 2]
        cls = EulerDiscreteScheduler
        J["turbo.scheduler_config"] = "tests/fixtures/scheduler_configs/sd_turbo.json"
    elif name == "sdxl-tiny":
        cfg_path = os.path.join(ROOT, "crates/engine/tests/fixtures/scheduler_configs/sdxl_turbo.json")
        turbo_steps = [2]
        cls = EulerAncestralDiscreteScheduler
        J["turbo.scheduler_config"] = "tests/fixtures/scheduler_configs/sdxl_turbo.json"
    else:
        turbo_steps = []
    for n in turbo_steps:
        pipe.scheduler = cls.from_config(cls.load_config(cfg_path))
        lat, traj = run_pipe(pipe, xl, output_type="latent", num_inference_steps=n, guidance_scale=0.0)
        T[f"turbo.steps{n}.latents"] = lat
        T[f"turbo.steps{n}.trajectory"] = traj
        for k, v in sched_info(pipe.scheduler).items():
            J[f"turbo.steps{n}.{k}"] = v
    if turbo_steps:
        J["turbo.guidance_scale"] = 0.0

    # ---- write
    T = {k: v.detach().to(torch.float32).clone().contiguous() for k, v in T.items()}
    for k, v in T.items():
        assert torch.isfinite(v).all(), k
    J["tensors"] = {k: list(v.shape) for k, v in sorted(T.items())}
    os.makedirs(ref_dir, exist_ok=True)
    save_file(dict(sorted(T.items())), os.path.join(ref_dir, "reference.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(ref_dir, "reference.json"), "w") as f:
        json.dump(json_safe(J), f, indent=1, allow_nan=False)
        f.write("\n")
    return T, J


def du(path):
    total = 0
    for dp, _, fns in os.walk(path):
        for fn in fns:
            total += os.path.getsize(os.path.join(dp, fn))
    return total


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default=ROOT)
    ap.add_argument("--only", nargs="*", choices=list(SPECS), help="only these models")
    args = ap.parse_args()

    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(True)
    import diffusers
    import transformers
    from transformers import CLIPTokenizer

    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.set_verbosity_error()

    fx = os.path.join(args.root, "crates/engine/tests/fixtures")
    sc_dir = os.path.join(fx, "scheduler_configs")
    shutil.rmtree(sc_dir, ignore_errors=True)
    os.makedirs(sc_dir)
    for k, v in SCHEDULER_CONFIGS.items():
        json.loads(v)
        with open(os.path.join(sc_dir, f"{k}.json"), "w") as f:
            f.write(v)

    encoder, merges = load_clip_bpe()

    def tokenizer(pad):
        t = CLIPTokenizer(vocab=encoder, merges=list(merges), pad_token=pad, model_max_length=77)
        assert len(t.get_vocab()) == 49408 and t.model_max_length == 77
        return t

    for name in args.only or list(SPECS):
        t0 = time.time()
        spec = SPECS[name]
        model_dir = os.path.join(fx, "models", name)
        ref_dir = os.path.join(fx, "reference", name)
        shutil.rmtree(model_dir, ignore_errors=True)
        shutil.rmtree(ref_dir, ignore_errors=True)
        toks = {sub: tokenizer(pad) for sub, pad in spec["pads"].items()}
        built = build_model(name, spec, model_dir, toks)
        pipe = load_pipeline(name, spec, model_dir, toks, built)
        T, J = make_reference(name, spec, pipe, ref_dir)
        print(f"== {name}: model {du(model_dir) / 1e6:.2f} MB, reference {du(ref_dir) / 1e6:.2f} MB, {time.time() - t0:.1f}s")
        for k, v in sorted(T.items()):
            print(f"   {k:32s} {str(list(v.shape)):18s} mean {v.mean().item():+.4f} std {v.std().item():.4f}")
    print(f"tests/fixtures total: {du(fx) / 1e6:.2f} MB")


def tiny_tokenizers(name, encoder, merges):
    """The CLIP tokenizers of tiny model `name` (one per text encoder, with its pad token)."""
    from transformers import CLIPTokenizer

    return {
        sub: CLIPTokenizer(vocab=encoder, merges=list(merges), pad_token=pad, model_max_length=77)
        for sub, pad in SPECS[name]["pads"].items()
    }


def load_tiny_pipeline(name, tokenizers, folder=None, task=""):
    """Tiny model `name` (or the folder given) in diffusers: its text-to-image pipeline, or with
    `task` "img2img" / "inpaint" that pipeline built from the same components."""
    import diffusers

    spec = SPECS[name]
    folder = folder or os.path.join(ROOT, "crates/engine/tests/fixtures/models", name)
    kw = dict(torch_dtype=torch.float32)
    if spec["dtype"] == "float16":
        kw["variant"] = "fp16"
    xl = spec["pipeline"] != "StableDiffusionPipeline"
    if xl:
        pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(
            folder, tokenizer=tokenizers["tokenizer"], tokenizer_2=tokenizers["tokenizer_2"], add_watermarker=False, **kw
        )
    else:
        pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder, tokenizer=tokenizers["tokenizer"], **kw)
    if task:
        wrapper = {
            ("img2img", False): "StableDiffusionImg2ImgPipeline",
            ("img2img", True): "StableDiffusionXLImg2ImgPipeline",
            ("inpaint", False): "StableDiffusionInpaintPipeline",
            ("inpaint", True): "StableDiffusionXLInpaintPipeline",
        }[(task, xl)]
        extra = dict(add_watermarker=False) if xl else {}
        pipe = getattr(diffusers, wrapper)(**pipe.components, **extra)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def deterministic_and_quiet():
    """The fixture scripts' common start: 2 threads, deterministic torch, no library chatter."""
    import diffusers
    import transformers

    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(True)
    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.set_verbosity_error()


if __name__ == "__main__":
    main()
