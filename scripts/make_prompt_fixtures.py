#!/usr/bin/env python3
"""References for prompts as artists write them: emphasis, BREAK, long prompts, clip skip.

AUTOMATIC1111's rules, written here from its description and code (`prompt_parser.py`'s
`parse_prompt_attention`, `sd_hijack_clip.py`'s `tokenize_line` / `process_tokens`,
`sd_emphasis.py`), applied to the tiny models' own transformers text encoders; the embeddings
then drive diffusers' pipelines through `prompt_embeds` (SDXL: and the pooled embeddings).
A prompt and a negative prompt with different chunk counts run as A1111 runs them by default:
one U-Net call each per step (a hand-written Euler loop over diffusers' U-Net and scheduler).

Writes crates/engine/tests/fixtures/prompts/:
  reference.json          the cases (prompt, negative, emphasis, clip skip, chunk counts)
  reference.safetensors   `<case>.<model>.positive` / `.negative` (1, 77·chunks, width) f32,
                          `.pooled` (SDXL, 2 rows: negative, prompt), and for image cases
                          `.latents` and `.image` (u8 HWC)

  /work/pyref/bin/python scripts/make_prompt_fixtures.py
"""

import json
import os
import re
import sys

import torch
from safetensors.torch import save_file

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

from make_fixtures import SPECS, make_sampler, load_tiny_pipeline, tiny_tokenizers, deterministic_and_quiet  # noqa: E402
from make_img2img_fixtures import decoded_pixels  # noqa: E402
from make_tokenizer import load_clip_bpe  # noqa: E402

OUT = os.path.join(ROOT, "crates/engine/tests/fixtures/prompts")
MODELS = ["sd1-tiny", "sd2v-tiny", "sdxl-tiny"]
STEPS, GUIDANCE, SEED, SIZE = 6, 7.5, 11, 64
BOS, EOS, COMMA = 49406, 49407, 267

WEIGHTED = "a (red:1.3) fox in [deep] snow, ((masterpiece)), (unbalanced"
LONG = ", ".join(f"a {c} {s} with {m} light" for c, s, m in zip(
    ["red", "blue", "green", "golden", "silver", "violet", "amber", "white", "black", "pink", "teal", "grey",
     "orange", "brown", "cyan", "ivory", "olive", "coral", "navy", "plum"],
    ["fox", "house", "tree", "river", "mountain", "castle", "ship", "bird", "cloud", "flower", "horse", "tower",
     "bridge", "garden", "forest", "lake", "road", "field", "moon", "star"],
    ["soft", "warm", "cold", "bright", "dim", "morning", "evening", "winter", "summer", "misty", "stormy", "clear",
     "hazy", "golden", "blue", "pale", "deep", "faint", "strong", "gentle"],
))
CASES = [
    dict(name="weighted", prompt=WEIGHTED, negative="blurry, (low quality:1.2)", emphasis="a1111", clip_skip=1),
    dict(name="no-norm", prompt=WEIGHTED, negative="blurry, (low quality:1.2)", emphasis="a1111-no-norm", clip_skip=1),
    dict(name="comfyui", prompt=WEIGHTED, negative="blurry, (low quality:1.2)", emphasis="comfyui", clip_skip=1),
    dict(name="break", prompt="a red fox BREAK in the deep snow", negative="blurry BREAK dark", emphasis="a1111",
         clip_skip=1),
    dict(name="long", prompt=LONG, negative=LONG.replace("light", "shadow, ugly"), emphasis="a1111", clip_skip=1),
    dict(name="clip-skip-2", prompt="a photo of a cat, (masterpiece)", negative="blurry", emphasis="a1111",
         clip_skip=2),
    # Different chunk counts: one U-Net call each (A1111's default), so only SD 1.x's loop is run.
    dict(name="unequal", prompt=LONG, negative="blurry", emphasis="a1111", clip_skip=1),
]

def load_txt2img(name, tokenizers):
    return load_tiny_pipeline(name, tokenizers)


# --- A1111's prompt language ------------------------------------------------------------------
RE_ATTENTION = re.compile(r"""
\\\(|\\\)|\\\[|\\]|\\\\|\\|\(|\[|:\s*([+-]?[.\d]+)\s*\)|\)|]|[^\\()\[\]:]+|:
""", re.X)
RE_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)


def parse_prompt_attention(text):
    res, round_brackets, square_brackets = [], [], []

    def multiply_range(start, multiplier):
        for p in range(start, len(res)):
            res[p][1] *= multiplier

    for m in RE_ATTENTION.finditer(text):
        text, weight = m.group(0), m.group(1)
        if text.startswith("\\"):
            res.append([text[1:], 1.0])
        elif text == "(":
            round_brackets.append(len(res))
        elif text == "[":
            square_brackets.append(len(res))
        elif weight is not None and round_brackets:
            multiply_range(round_brackets.pop(), float(weight))
        elif text == ")" and round_brackets:
            multiply_range(round_brackets.pop(), 1.1)
        elif text == "]" and square_brackets:
            multiply_range(square_brackets.pop(), 1 / 1.1)
        else:
            for i, part in enumerate(re.split(RE_BREAK, text)):
                if i > 0:
                    res.append(["BREAK", -1])
                res.append([part, 1.0])
    for pos in round_brackets:
        multiply_range(pos, 1.1)
    for pos in square_brackets:
        multiply_range(pos, 1 / 1.1)
    if not res:
        res = [["", 1.0]]
    i = 0
    while i + 1 < len(res):
        if res[i][1] == res[i + 1][1]:
            res[i][0] += res[i + 1][0]
            res.pop(i + 1)
        else:
            i += 1
    return res


def tokenize_line(tokenizer, line, emphasis, pad):
    """A1111's chunks: (tokens, multipliers) lists of 77, and the token count."""
    parsed = [[line, 1.0]] if emphasis == "none" else parse_prompt_attention(line)
    tokenized = tokenizer([t for t, _ in parsed], truncation=False, add_special_tokens=False)["input_ids"]
    chunks, chunk_tokens, chunk_mults = [], [], []
    state = dict(count=0, last_comma=-1)

    def next_chunk(is_last=False):
        nonlocal chunk_tokens, chunk_mults
        state["count"] += len(chunk_tokens) if is_last else 75
        to_add = 75 - len(chunk_tokens)
        tokens = [BOS] + chunk_tokens + [EOS] * to_add + [EOS]
        mults = [1.0] + chunk_mults + [1.0] * to_add + [1.0]
        first_eos = tokens.index(EOS)
        tokens = tokens[: first_eos + 1] + [pad] * (len(tokens) - first_eos - 1)
        chunks.append((tokens, mults))
        state["last_comma"] = -1
        chunk_tokens, chunk_mults = [], []

    for tokens, (text, weight) in zip(tokenized, parsed):
        if text == "BREAK" and weight == -1:
            next_chunk()
            continue
        for token in tokens:
            if token == COMMA:
                state["last_comma"] = len(chunk_tokens)
            elif len(chunk_tokens) == 75 and state["last_comma"] != -1 and len(chunk_tokens) - state["last_comma"] <= 20:
                at = state["last_comma"] + 1
                reloc_t, reloc_m = chunk_tokens[at:], chunk_mults[at:]
                chunk_tokens, chunk_mults = chunk_tokens[:at], chunk_mults[:at]
                next_chunk()
                chunk_tokens, chunk_mults = reloc_t, reloc_m
            if len(chunk_tokens) == 75:
                next_chunk()
            chunk_tokens.append(token)
            chunk_mults.append(weight)
    if chunk_tokens or not chunks:
        next_chunk(is_last=True)
    return chunks, state["count"]


def states(encoder, ids, penultimate, clip_skip):
    out = encoder(torch.tensor(ids), output_hidden_states=True)
    if penultimate:
        return out.hidden_states[-(clip_skip + 1)], out
    if clip_skip > 1:
        norm = getattr(encoder, "text_model", encoder).final_layer_norm
        return norm(out.hidden_states[-clip_skip]), out
    return out.last_hidden_state, out


def encode(tokenizer, encoder, text, emphasis, clip_skip, penultimate, pad):
    chunks, count = tokenize_line(tokenizer, text, emphasis, pad)
    ids = [t for t, _ in chunks]
    weighted = any(m != 1.0 for _, ms in chunks for m in ms)
    if emphasis == "comfyui" and weighted:
        ids = ids + [[BOS, EOS] + [pad] * 75]
    z_all, out = states(encoder, ids, penultimate, clip_skip)
    parts = []
    for i, (_, mults) in enumerate(chunks):
        z = z_all[i : i + 1]
        if any(m != 1.0 for m in mults) and emphasis != "none":
            w = torch.tensor(mults, dtype=torch.float32).reshape(1, 77, 1)
            if emphasis == "a1111":
                before = z.mean()
                z = z * w
                z = z * (before / z.mean())
            elif emphasis == "a1111-no-norm":
                z = z * w
            else:
                empty = z_all[-1:]
                z = z.clone()
                for j, m in enumerate(mults):
                    if m != 1.0:
                        z[0, j] = (z[0, j] - empty[0, j]) * m + empty[0, j]
        parts.append(z)
    pooled = out.text_embeds[:1] if hasattr(out, "text_embeds") and out.text_embeds is not None else None
    return torch.cat(parts, 1), pooled, len(chunks), count


TI_PROMPT = "a photo of inkwash fox in the snow"


@torch.no_grad()
def textual_inversion(encoder, merges, tensors):
    """A 2-vector embedding named `inkwash` per model (SDXL: clip_l + clip_g), through
    diffusers' `load_textual_inversion`. SDXL's pooled output is taken at EOS, as A1111 does
    (the tiny encoders' legacy `eos_token_id` would make transformers pool at the new token)."""

    from safetensors.torch import save_file as save

    cases = []
    for name in MODELS:
        spec = SPECS[name]
        toks = tiny_tokenizers(name, encoder, merges)
        pipe = load_txt2img(name, toks)
        xl = "XL" in type(pipe).__name__
        g = torch.Generator().manual_seed(21)
        widths = [pipe.text_encoder.config.hidden_size] + ([pipe.text_encoder_2.config.hidden_size] if xl else [])
        vectors = [torch.randn((2, w), generator=g) for w in widths]
        folder = os.path.join(OUT, "embeddings", name)
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, "inkwash.safetensors")
        if xl:
            save({"clip_l": vectors[0].contiguous(), "clip_g": vectors[1].contiguous()}, path)
            pipe.load_textual_inversion(vectors[0], token="inkwash", text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
            pipe.load_textual_inversion(vectors[1], token="inkwash", text_encoder=pipe.text_encoder_2,
                                        tokenizer=pipe.tokenizer_2)
        else:
            save({"emb_params": vectors[0].contiguous()}, path)
            pipe.load_textual_inversion(path, token="inkwash")
        generator = torch.Generator("cpu").manual_seed(SEED)
        pipe.scheduler = make_sampler("euler", dict(pipe.scheduler.config))
        common = dict(num_inference_steps=STEPS, guidance_scale=GUIDANCE, width=SIZE, height=SIZE, generator=generator,
                      output_type="latent")
        key = f"ti.{name}"
        if xl:
            pos, neg, pos_pooled, neg_pooled = pipe.encode_prompt(TI_PROMPT, negative_prompt="blurry")
            text = pipe.maybe_convert_prompt(TI_PROMPT, pipe.tokenizer_2)
            ids = pipe.tokenizer_2(text, padding="max_length", max_length=77, return_tensors="pt").input_ids
            out = pipe.text_encoder_2(ids, output_hidden_states=True)
            eos = int((ids[0] == EOS).nonzero()[0])
            pos_pooled = pipe.text_encoder_2.text_projection(out.last_hidden_state[:, eos])
            latents = pipe(prompt_embeds=pos, negative_prompt_embeds=neg, pooled_prompt_embeds=pos_pooled,
                           negative_pooled_prompt_embeds=neg_pooled, **common).images
            tensors[f"{key}.pooled"] = torch.cat([neg_pooled, pos_pooled], 0).float().contiguous()
        else:
            pos, neg = pipe.encode_prompt(TI_PROMPT, "cpu", 1, True, negative_prompt="blurry")
            latents = pipe(TI_PROMPT, negative_prompt="blurry", **common).images
        tensors[f"{key}.positive"] = pos.float().contiguous()
        tensors[f"{key}.negative"] = neg.float().contiguous()
        tensors[f"{key}.latents"] = latents.float().contiguous()
        tensors[f"{key}.image"] = decoded_pixels(pipe, latents).contiguous()
        cases.append(dict(key=key, model=name, prompt=TI_PROMPT, negative="blurry", emphasis="none", clip_skip=1,
                          embedding=f"tests/fixtures/prompts/embeddings/{name}/inkwash.safetensors",
                          chunks=[1, 1], tokens=None, image=True))
        print(key)
    return cases


@torch.no_grad()
def main():
    import diffusers

    deterministic_and_quiet()
    os.makedirs(OUT, exist_ok=True)
    encoder, merges = load_clip_bpe()
    tensors, cases = {}, []
    for name in MODELS:
        spec = SPECS[name]
        toks = tiny_tokenizers(name, encoder, merges)
        pipe = load_txt2img(name, toks)
        xl = "XL" in type(pipe).__name__
        towers = [(pipe.tokenizer, pipe.text_encoder)] + ([(pipe.tokenizer_2, pipe.text_encoder_2)] if xl else [])
        for case in CASES:
            key = f"{case['name']}.{name}"
            enc = {}
            for side in ["prompt", "negative"]:
                outs = [
                    encode(tok, te, case[side], case["emphasis"], case["clip_skip"], xl, tok.pad_token_id)
                    for tok, te in towers
                ]
                enc[side] = (torch.cat([o[0] for o in outs], 2), outs[-1][1], outs[0][2], outs[0][3])
            pos, pos_pooled, pos_chunks, count = enc["prompt"]
            neg, neg_pooled, neg_chunks, _ = enc["negative"]
            tensors[f"{key}.positive"] = pos.float().contiguous()
            tensors[f"{key}.negative"] = neg.float().contiguous()
            if xl:
                tensors[f"{key}.pooled"] = torch.cat([neg_pooled, pos_pooled], 0).float().contiguous()
            entry = dict(key=key, model=name, chunks=[neg_chunks, pos_chunks], tokens=count, image=False, **case)
            generator = torch.Generator("cpu").manual_seed(SEED)
            pipe.scheduler = make_sampler("euler", dict(pipe.scheduler.config))
            if pos_chunks == neg_chunks:
                kw = dict(prompt_embeds=pos, negative_prompt_embeds=neg)
                if xl:
                    kw.update(pooled_prompt_embeds=pos_pooled, negative_pooled_prompt_embeds=neg_pooled)
                latents = pipe(**kw, num_inference_steps=STEPS, guidance_scale=GUIDANCE, width=SIZE, height=SIZE,
                               generator=generator, output_type="latent").images
            elif not xl:
                # A1111 without padding: one U-Net call each for the negative prompt and the prompt.
                sched = pipe.scheduler
                sched.set_timesteps(STEPS)
                shape = (1, pipe.unet.config.in_channels, SIZE // 8, SIZE // 8)
                latents = torch.randn(shape, generator=generator) * sched.init_noise_sigma
                for t in sched.timesteps:
                    x = sched.scale_model_input(latents, t)
                    u = pipe.unet(x, t, encoder_hidden_states=neg).sample
                    c = pipe.unet(x, t, encoder_hidden_states=pos).sample
                    latents = sched.step(u + GUIDANCE * (c - u), t, latents).prev_sample
            else:
                latents = None
            if latents is not None:
                tensors[f"{key}.latents"] = latents.float().contiguous()
                tensors[f"{key}.image"] = decoded_pixels(pipe, latents).contiguous()
                entry["image"] = True
            cases.append(entry)
            print(key, "chunks", entry["chunks"], "tokens", count, "image", entry["image"])
    cases += textual_inversion(encoder, merges, tensors)
    reference = dict(steps=STEPS, guidance_scale=GUIDANCE, seed=SEED, width=SIZE, height=SIZE, sampler="euler",
                     versions=dict(torch=torch.__version__, diffusers=diffusers.__version__), cases=cases)
    with open(os.path.join(OUT, "reference.json"), "w") as f:
        json.dump(reference, f, indent=1)
        f.write("\n")
    save_file(tensors, os.path.join(OUT, "reference.safetensors"))


if __name__ == "__main__":
    main()
