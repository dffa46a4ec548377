#!/usr/bin/env python3
"""LoRA / LyCORIS references on the tiny test models.

Writes crates/engine/tests/fixtures/lora/:
  <model>-<kind>.safetensors   random adapters with the real key names of each format:
      kohya   kohya-ss LoRA: lora_unet_* (SD 1.x: diffusers module names; SDXL: SGM names),
              lora_te_* / lora_te1_* / lora_te2_*, alpha
      locon   kohya LoCon: the LoRA's layers plus the resnets' 3×3 convolutions
      peft    diffusers / PEFT: unet.*.lora_A / lora_B, text_encoder.*.lora_A / lora_B, no alpha
      loha    LyCORIS LoHa (hada_w1_a … hada_w2_b, alpha) on the U-Net's attention layers
      lokr    LyCORIS LoKr (lokr_w1, lokr_w2_a, lokr_w2_b, alpha) on the same layers
  reference.json, reference.safetensors   per case `<case>.latents` and `<case>.image`

kohya and PEFT files go through diffusers' own `load_lora_weights` + `fuse_lora(lora_scale=w)`
(two at once: `set_adapters`); LoHa and LoKr are merged into the weights here by the published
LyCORIS formulas (ΔW = (w1a·w1b) ⊙ (w2a·w2b) · alpha/rank; ΔW = w1 ⊗ (w2a·w2b) · alpha/rank).
Every run is text to image, 6 Euler steps (LCM-LoRA-like case: 4 LCM steps, guidance 1).

  /work/pyref/bin/python scripts/make_lora_fixtures.py
"""

import copy
import json
import os
import sys

import torch
from safetensors.torch import save_file

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

from make_fixtures import SPECS, make_sampler, tiny_tokenizers, deterministic_and_quiet  # noqa: E402
from make_img2img_fixtures import decoded_pixels  # noqa: E402
from make_prompt_fixtures import load_txt2img  # noqa: E402
from make_tokenizer import load_clip_bpe  # noqa: E402

OUT = os.path.join(ROOT, "crates/engine/tests/fixtures/lora")
PROMPT, NEGATIVE = "a red fox in the snow", "blurry"
STEPS, GUIDANCE, SEED, SIZE = 6, 7.5, 11, 64
RANK, ALPHA = 2, 1.0


def sgm_name(name, layers_per_block):
    """diffusers U-Net module name → the SGM (LDM) name kohya's SDXL files use."""
    parts = name.split(".")
    per = layers_per_block + 1
    resnet = {"conv1": "in_layers.2", "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1",
              "conv_shortcut": "skip_connection"}
    if parts[0] == "down_blocks":
        b, kind, j, rest = int(parts[1]), parts[2], int(parts[3]), parts[4:]
        if kind == "attentions":
            return ".".join([f"input_blocks.{1 + b * per + j}.1"] + rest)
        return ".".join([f"input_blocks.{1 + b * per + j}.0", resnet[rest[0]]] + rest[1:])
    if parts[0] == "up_blocks":
        b, kind, j, rest = int(parts[1]), parts[2], int(parts[3]), parts[4:]
        if kind == "attentions":
            return ".".join([f"output_blocks.{b * per + j}.1"] + rest)
        return ".".join([f"output_blocks.{b * per + j}.0", resnet[rest[0]]] + rest[1:])
    if parts[0] == "mid_block":
        kind, j, rest = parts[1], int(parts[2]), parts[3:]
        if kind == "attentions":
            return ".".join(["middle_block.1"] + rest)
        return ".".join([f"middle_block.{2 * j}", resnet[rest[0]]] + rest[1:])
    raise ValueError(name)


def targets(pipe, xl):
    """(component, module name, module) for the layers each kind adapts."""
    attn = [("unet", n, m) for n, m in pipe.unet.named_modules()
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and ".attentions." in n]
    convs = [("unet", n, m) for n, m in pipe.unet.named_modules()
             if isinstance(m, torch.nn.Conv2d) and ".resnets." in n and n.endswith(("conv1", "conv2"))]
    encoders = [("text_encoder", pipe.text_encoder)] + ([("text_encoder_2", pipe.text_encoder_2)] if xl else [])
    # transformers 5 names CLIPTextModel's modules without `text_model.`, but not
    # CLIPTextModelWithProjection's: both are written here without it.
    te = [(c, n.removeprefix("text_model."), m) for c, enc in encoders for n, m in enc.named_modules()
          if isinstance(m, torch.nn.Linear) and n.removeprefix("text_model.").startswith("encoder.layers.")]
    return attn, convs, te


def kohya_prefix(component, xl):
    if component == "unet":
        return "lora_unet_"
    if not xl:
        return "lora_te_"
    return "lora_te1_" if component == "text_encoder" else "lora_te2_"


def kohya_key(component, name, xl, lpb):
    if component == "unet":
        return kohya_prefix(component, xl) + (sgm_name(name, lpb) if xl else name).replace(".", "_")
    return kohya_prefix(component, xl) + ("text_model." + name).replace(".", "_")


def low_rank(module, g, conv_down_kernel=None):
    w = module.weight
    out, inp = w.shape[0], w.shape[1]
    if w.dim() == 4:
        k = w.shape[2] if conv_down_kernel is None else conv_down_kernel
        down = torch.randn((RANK, inp, k, k), generator=g) * 0.4
        up = torch.randn((out, RANK, 1, 1), generator=g) * 0.4
    else:
        down = torch.randn((RANK, inp), generator=g) * 0.4
        up = torch.randn((out, RANK), generator=g) * 0.4
    return down, up


def make_kohya(pipe, xl, lpb, with_convs, seed):
    attn, convs, te = targets(pipe, xl)
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for component, name, module in attn + te + (convs if with_convs else []):
        key = kohya_key(component, name, xl, lpb)
        down, up = low_rank(module, g)
        tensors[f"{key}.lora_down.weight"] = down.contiguous()
        tensors[f"{key}.lora_up.weight"] = up.contiguous()
        tensors[f"{key}.alpha"] = torch.tensor(ALPHA)
    return tensors


def make_peft(pipe, xl, seed):
    attn, _, te = targets(pipe, xl)
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for component, name, module in attn + te:
        prefix = component + "." + ("text_model." + name if component != "unet" else name)
        down, up = low_rank(module, g)
        tensors[f"{prefix}.lora_A.weight"] = down.contiguous()
        tensors[f"{prefix}.lora_B.weight"] = up.contiguous()
    return tensors


def make_lycoris(pipe, kind, seed, xl, lpb):
    """LoHa or LoKr on the U-Net's attention linear layers; returns (file tensors, ΔW per module)."""
    attn, _, _ = targets(pipe, xl)
    g = torch.Generator().manual_seed(seed)
    tensors, deltas = {}, {}
    for _, name, module in attn:
        if not isinstance(module, torch.nn.Linear):
            continue
        key = kohya_key("unet", name, xl, lpb)
        out, inp = module.weight.shape
        if kind == "loha":
            w1a, w1b = torch.randn((out, RANK), generator=g) * 0.5, torch.randn((RANK, inp), generator=g) * 0.5
            w2a, w2b = torch.randn((out, RANK), generator=g) * 0.5, torch.randn((RANK, inp), generator=g) * 0.5
            for n, t in [("hada_w1_a", w1a), ("hada_w1_b", w1b), ("hada_w2_a", w2a), ("hada_w2_b", w2b)]:
                tensors[f"{key}.{n}"] = t.contiguous()
            delta = (w1a @ w1b) * (w2a @ w2b) * (ALPHA / RANK)
        else:
            a = 2 if out % 2 == 0 else 1
            b = 2 if inp % 2 == 0 else 1
            w1 = torch.randn((a, b), generator=g) * 0.5
            w2a = torch.randn((out // a, RANK), generator=g) * 0.5
            w2b = torch.randn((RANK, inp // b), generator=g) * 0.5
            for n, t in [("lokr_w1", w1), ("lokr_w2_a", w2a), ("lokr_w2_b", w2b)]:
                tensors[f"{key}.{n}"] = t.contiguous()
            delta = torch.kron(w1, w2a @ w2b) * (ALPHA / RANK)
        tensors[f"{key}.alpha"] = torch.tensor(ALPHA)
        deltas[name] = delta
    return tensors, deltas


def run(pipe, sampler="euler", steps=STEPS, guidance=GUIDANCE):
    pipe.scheduler = make_sampler(sampler, dict(pipe.scheduler.config))
    return pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=steps, guidance_scale=guidance, width=SIZE,
                height=SIZE, generator=torch.Generator("cpu").manual_seed(SEED), output_type="latent").images


def changed_layers(before, pipe):
    after = {**{f"unet.{k}": v for k, v in pipe.unet.state_dict().items()},
             **{f"te.{k}": v for k, v in pipe.text_encoder.state_dict().items()},
             **{f"te2.{k}": v for k, v in getattr(pipe, "text_encoder_2", torch.nn.Module()).state_dict().items()}}
    after = {k.replace(".base_layer", ""): v for k, v in after.items() if "lora_" not in k}
    return sum(1 for k, v in after.items() if k in before and k.endswith("weight") and not torch.equal(before[k], v))


@torch.no_grad()
def main():
    import diffusers

    deterministic_and_quiet()
    os.makedirs(OUT, exist_ok=True)
    encoder, merges = load_clip_bpe()
    tensors, cases = {}, []

    def record(key, pipe, latents, **case):
        tensors[f"{key}.latents"] = latents.float().contiguous()
        tensors[f"{key}.image"] = decoded_pixels(pipe, latents).contiguous()
        cases.append(dict(key=key, **case))
        print(key, case)

    for name in ["sd1-tiny", "sdxl-tiny"]:
        spec = SPECS[name]
        toks = tiny_tokenizers(name, encoder, merges)
        pipe = load_txt2img(name, toks)
        xl = "XL" in type(pipe).__name__
        lpb = pipe.unet.config.layers_per_block
        files = {"kohya": make_kohya(pipe, xl, lpb, False, 1), "peft": make_peft(pipe, xl, 2),
                 "locon": make_kohya(pipe, xl, lpb, True, 3)}
        for kind, t in files.items():
            save_file(t, os.path.join(OUT, f"{name}-{kind}.safetensors"))
        record(f"{name}.base", pipe, run(pipe), model=name, loras=[])
        before = {**{f"unet.{k}": v.clone() for k, v in pipe.unet.state_dict().items()},
                  **{f"te.{k}": v.clone() for k, v in pipe.text_encoder.state_dict().items()},
                  **{f"te2.{k}": v.clone() for k, v in getattr(pipe, "text_encoder_2", torch.nn.Module()).state_dict().items()}}
        for kind, weight in [("kohya", 0.8), ("peft", 0.7), ("locon", 0.6)]:
            file = f"{name}-{kind}.safetensors"
            pipe.load_lora_weights(OUT, weight_name=file, adapter_name=kind)
            pipe.fuse_lora(lora_scale=weight, adapter_names=[kind])
            modules = len({k.rsplit(".lora", 1)[0].removesuffix(".alpha") for k in files[kind]})
            changed = changed_layers(before, pipe)
            # Every module of the file changed its layer in diffusers.
            assert changed == modules, (kind, changed, modules)
            record(f"{name}.{kind}", pipe, run(pipe), model=name, loras=[[file, weight]], modules=modules)
            pipe.unfuse_lora()
            pipe.unload_lora_weights()
        # Two at once, stacked.
        pipe.load_lora_weights(OUT, weight_name=f"{name}-kohya.safetensors", adapter_name="a")
        pipe.load_lora_weights(OUT, weight_name=f"{name}-peft.safetensors", adapter_name="b")
        pipe.set_adapters(["a", "b"], adapter_weights=[0.6, 0.5])
        record(f"{name}.stacked", pipe, run(pipe), model=name,
               loras=[[f"{name}-kohya.safetensors", 0.6], [f"{name}-peft.safetensors", 0.5]])
        if not xl:
            # A distillation-style LoRA with the LCM sampler, guidance 1, 4 steps.
            pipe.set_adapters(["b"], adapter_weights=[1.0])
            record(f"{name}.lcm", pipe, run(pipe, "lcm", 4, 1.0), model=name,
                   loras=[[f"{name}-peft.safetensors", 1.0]], sampler="lcm", steps=4, guidance=1.0)
        pipe.unload_lora_weights()
        if True:
            for kind, weight in [("loha", 0.9), ("lokr", 0.9)]:
                t, deltas = make_lycoris(pipe, kind, 4 if kind == "loha" else 5, xl, lpb)
                file = f"{name}-{kind}.safetensors"
                save_file(t, os.path.join(OUT, file))
                saved = copy.deepcopy(pipe.unet.state_dict())
                modules = dict(pipe.unet.named_modules())
                for module, delta in deltas.items():
                    modules[module].weight += weight * delta
                record(f"{name}.{kind}", pipe, run(pipe), model=name, loras=[[file, weight]])
                pipe.unet.load_state_dict(saved)
    reference = dict(prompt=PROMPT, negative_prompt=NEGATIVE, steps=STEPS, guidance_scale=GUIDANCE, seed=SEED,
                     width=SIZE, height=SIZE, sampler="euler",
                     versions=dict(torch=torch.__version__, diffusers=diffusers.__version__), cases=cases)
    with open(os.path.join(OUT, "reference.json"), "w") as f:
        json.dump(reference, f, indent=1)
        f.write("\n")
    save_file(tensors, os.path.join(OUT, "reference.safetensors"))


if __name__ == "__main__":
    main()
