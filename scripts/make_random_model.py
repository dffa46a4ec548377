#!/usr/bin/env python3
"""Full-size random-weight SD 1.5 / SD 2.1 / SDXL models in diffusers layout (benchmarks only).

    /work/pyref/bin/python scripts/make_random_model.py --family sd15 [--out DIR] [--seed 0] [--dtype float32]

The folder looks like the real Hub repo: the real config.json contents for the
unet / vae / text encoder(s) (as published, minimal keys), the verbatim
scheduler_config.json, real safetensors key names (text_model.* prefix), a
tokenizer/ folder (vocab.json, merges.txt, special_tokens_map.json,
tokenizer_config.json built from open_clip's CLIP BPE) so that
`DiffusionPipeline.from_pretrained(DIR)` works offline. Weights are the
default random initialisation of diffusers / transformers, seeded.

Never commit the output (default: bench-models/<family>-random, git-ignored).
Sizes (float32): sd15 ~4.3 GB, sd21 ~5.2 GB, sdxl ~14 GB (needs ~2x that in RAM
for the U-Net while saving; use --dtype float16 to halve it, which writes
*.fp16.safetensors variant files like the Hub repos).
"""

import argparse
import gc
import json
import os
import shutil
import sys
import time

import torch
from safetensors.torch import save_file

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

from make_fixtures import SCHEDULER_CONFIGS, SPECIAL_TOKENS_MAP_BANG  # noqa: E402
from make_tokenizer import load_clip_bpe  # noqa: E402

DOWN4 = ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"]
UP4 = ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]


def vae_config(version, sample_size, scaling_factor=None, force_upcast=None):
    c = {
        "_class_name": "AutoencoderKL",
        "_diffusers_version": version,
        "act_fn": "silu",
        "block_out_channels": [128, 256, 512, 512],
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "in_channels": 3,
        "latent_channels": 4,
        "layers_per_block": 2,
        "norm_num_groups": 32,
        "out_channels": 3,
        "sample_size": sample_size,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
    }
    if force_upcast is not None:
        c["force_upcast"] = force_upcast
    if scaling_factor is not None:
        c["scaling_factor"] = scaling_factor
    return dict(sorted(c.items()))


def clip_config(hidden, inter, heads, layers, act, proj, arch, tf_version, dtype="float32"):
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
        "projection_dim": proj,
        "torch_dtype": dtype,
        "transformers_version": tf_version,
        "vocab_size": 49408,
    }


FAMILIES = {
    # runwayml/stable-diffusion-v1-5
    "sd15": dict(
        pipeline="StableDiffusionPipeline",
        scheduler="sd15",
        unet={
            "_class_name": "UNet2DConditionModel",
            "_diffusers_version": "0.6.0",
            "act_fn": "silu",
            "attention_head_dim": 8,
            "block_out_channels": [320, 640, 1280, 1280],
            "center_input_sample": False,
            "cross_attention_dim": 768,
            "down_block_types": DOWN4,
            "downsample_padding": 1,
            "flip_sin_to_cos": True,
            "freq_shift": 0,
            "in_channels": 4,
            "layers_per_block": 2,
            "mid_block_scale_factor": 1,
            "norm_eps": 1e-05,
            "norm_num_groups": 32,
            "out_channels": 4,
            "sample_size": 64,
            "up_block_types": UP4,
        },
        vae=vae_config("0.6.0", 512, scaling_factor=0.18215),
        text_encoders={"text_encoder": clip_config(768, 3072, 12, 12, "quick_gelu", 768, "CLIPTextModel", "4.22.0.dev0")},
        tokenizers={"tokenizer": "<|endoftext|>"},
    ),
    # stabilityai/stable-diffusion-2-1 (768-v)
    "sd21": dict(
        pipeline="StableDiffusionPipeline",
        scheduler="sd21",
        unet={
            "_class_name": "UNet2DConditionModel",
            "_diffusers_version": "0.10.0.dev0",
            "act_fn": "silu",
            "attention_head_dim": [5, 10, 20, 20],
            "block_out_channels": [320, 640, 1280, 1280],
            "center_input_sample": False,
            "cross_attention_dim": 1024,
            "down_block_types": DOWN4,
            "downsample_padding": 1,
            "dual_cross_attention": False,
            "flip_sin_to_cos": True,
            "freq_shift": 0,
            "in_channels": 4,
            "layers_per_block": 2,
            "mid_block_scale_factor": 1,
            "norm_eps": 1e-05,
            "norm_num_groups": 32,
            "num_class_embeds": None,
            "only_cross_attention": False,
            "out_channels": 4,
            "sample_size": 96,
            "up_block_types": UP4,
            "upcast_attention": True,
            "use_linear_projection": True,
        },
        vae=vae_config("0.10.0.dev0", 768),
        text_encoders={"text_encoder": clip_config(1024, 4096, 16, 23, "gelu", 512, "CLIPTextModel", "4.25.0.dev0")},
        tokenizers={"tokenizer": "!"},
    ),
    # stabilityai/stable-diffusion-xl-base-1.0
    "sdxl": dict(
        pipeline="StableDiffusionXLPipeline",
        scheduler="sdxl",
        unet={
            "_class_name": "UNet2DConditionModel",
            "_diffusers_version": "0.19.0.dev0",
            "act_fn": "silu",
            "addition_embed_type": "text_time",
            "addition_embed_type_num_heads": 64,
            "addition_time_embed_dim": 256,
            "attention_head_dim": [5, 10, 20],
            "block_out_channels": [320, 640, 1280],
            "center_input_sample": False,
            "class_embed_type": None,
            "class_embeddings_concat": False,
            "conv_in_kernel": 3,
            "conv_out_kernel": 3,
            "cross_attention_dim": 2048,
            "cross_attention_norm": None,
            "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
            "downsample_padding": 1,
            "dual_cross_attention": False,
            "encoder_hid_dim": None,
            "encoder_hid_dim_type": None,
            "flip_sin_to_cos": True,
            "freq_shift": 0,
            "in_channels": 4,
            "layers_per_block": 2,
            "mid_block_only_cross_attention": None,
            "mid_block_scale_factor": 1,
            "mid_block_type": "UNetMidBlock2DCrossAttn",
            "norm_eps": 1e-05,
            "norm_num_groups": 32,
            "num_attention_heads": None,
            "num_class_embeds": None,
            "only_cross_attention": False,
            "out_channels": 4,
            "projection_class_embeddings_input_dim": 2816,
            "resnet_out_scale_factor": 1.0,
            "resnet_skip_time_act": False,
            "resnet_time_scale_shift": "default",
            "sample_size": 128,
            "time_cond_proj_dim": None,
            "time_embedding_act_fn": None,
            "time_embedding_dim": None,
            "time_embedding_type": "positional",
            "timestep_post_act": None,
            "transformer_layers_per_block": [1, 2, 10],
            "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
            "upcast_attention": None,
            "use_linear_projection": True,
        },
        vae=vae_config("0.20.0.dev0", 1024, scaling_factor=0.13025, force_upcast=True),
        text_encoders={
            "text_encoder": clip_config(768, 3072, 12, 12, "quick_gelu", 768, "CLIPTextModel", "4.32.0.dev0"),
            "text_encoder_2": clip_config(
                1280, 5120, 20, 32, "gelu", 1280, "CLIPTextModelWithProjection", "4.32.0.dev0"
            ),
        },
        tokenizers={"tokenizer": "<|endoftext|>", "tokenizer_2": "!"},
    ),
}


def write_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


def write_tokenizer(folder, pad, encoder, merges):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(encoder, f, ensure_ascii=False)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    if pad == "!":
        with open(os.path.join(folder, "special_tokens_map.json"), "w") as f:
            f.write(SPECIAL_TOKENS_MAP_BANG)
    else:
        write_json(
            os.path.join(folder, "special_tokens_map.json"),
            {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": pad, "unk_token": "<|endoftext|>"},
        )
    write_json(
        os.path.join(folder, "tokenizer_config.json"),
        {
            "add_prefix_space": False,
            "bos_token": "<|startoftext|>",
            "do_lower_case": True,
            "eos_token": "<|endoftext|>",
            "errors": "replace",
            "model_max_length": 77,
            "pad_token": "<|endoftext|>",
            "tokenizer_class": "CLIPTokenizer",
            "unk_token": "<|endoftext|>",
        },
    )


def st_name(base, fp16):
    stem, ext = os.path.splitext(base)
    return f"{stem}.fp16{ext}" if fp16 else base


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", required=True, choices=sorted(FAMILIES))
    ap.add_argument("--out", help="output folder (default: bench-models/<family>-random in the repo)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", choices=["float32", "float16"], default="float32")
    args = ap.parse_args()

    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    fam = FAMILIES[args.family]
    out = args.out or os.path.join(ROOT, "bench-models", f"{args.family}-random")
    fp16 = args.dtype == "float16"
    dtype = torch.float16 if fp16 else torch.float32
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    torch.set_num_threads(os.cpu_count() or 1)
    t0 = time.time()

    # scheduler (verbatim) and tokenizers
    os.makedirs(os.path.join(out, "scheduler"))
    with open(os.path.join(out, "scheduler", "scheduler_config.json"), "w") as f:
        f.write(SCHEDULER_CONFIGS[fam["scheduler"]])
    encoder, merges = load_clip_bpe()
    for sub, pad in fam["tokenizers"].items():
        write_tokenizer(os.path.join(out, sub), pad, encoder, merges)

    # text encoders: real key layout (text_model.*), real config.json
    for i, (sub, cfg) in enumerate(fam["text_encoders"].items()):
        torch.manual_seed(args.seed * 100 + i)
        kw = {k: v for k, v in cfg.items() if k not in ("architectures", "torch_dtype", "transformers_version", "model_type")}
        cls = CLIPTextModel if cfg["architectures"][0] == "CLIPTextModel" else CLIPTextModelWithProjection
        model = cls(CLIPTextConfig(**kw))
        sd = {}
        for k, v in model.state_dict().items():
            if k.endswith("position_ids"):
                continue
            if cls is CLIPTextModel:
                k = "text_model." + k
            sd[k] = v.to(dtype).contiguous()
        del model
        os.makedirs(os.path.join(out, sub))
        save_file(dict(sorted(sd.items())), os.path.join(out, sub, st_name("model.safetensors", fp16)), metadata={"format": "pt"})
        c = dict(cfg)
        c["torch_dtype"] = args.dtype
        write_json(os.path.join(out, sub, "config.json"), c)
        del sd
        gc.collect()
        print(f"{sub}: done ({time.time() - t0:.0f}s)", flush=True)

    # unet / vae: build from the real config, save, then put the real (minimal) config.json back
    for sub, cls, cfg, i in (("vae", AutoencoderKL, fam["vae"], 50), ("unet", UNet2DConditionModel, fam["unet"], 60)):
        torch.manual_seed(args.seed * 100 + i)
        model = cls.from_config(cfg)
        if fp16:
            model = model.half()
        model.save_pretrained(os.path.join(out, sub), safe_serialization=True, variant="fp16" if fp16 else None, max_shard_size="100GB")
        write_json(os.path.join(out, sub, "config.json"), cfg)
        del model
        gc.collect()
        print(f"{sub}: done ({time.time() - t0:.0f}s)", flush=True)

    # model_index.json as a real repo has it
    index = {
        "_class_name": fam["pipeline"],
        "_diffusers_version": fam["unet"]["_diffusers_version"],
        "scheduler": ["diffusers", json.loads(SCHEDULER_CONFIGS[fam["scheduler"]])["_class_name"]],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    if fam["pipeline"] == "StableDiffusionPipeline":
        index.update({"feature_extractor": [None, None], "requires_safety_checker": False, "safety_checker": [None, None]})
    else:
        index.update(
            {
                "force_zeros_for_empty_prompt": True,
                "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
                "tokenizer_2": ["transformers", "CLIPTokenizer"],
            }
        )
    write_json(os.path.join(out, "model_index.json"), dict(sorted(index.items())))

    for dp, _, fns in os.walk(out):
        for fn in fns:
            os.chmod(os.path.join(dp, fn), 0o644)
    total = sum(os.path.getsize(os.path.join(dp, fn)) for dp, _, fns in os.walk(out) for fn in fns)
    print(f"{args.family}: wrote {out} ({total / 1e9:.2f} GB) in {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
