#!/usr/bin/env python3
"""Corpus of broken / unsupported model files for Easel's loader tests.

Writes tests/fixtures/bad/ (rewritten on each run, deterministic, a few KB per case):
  <case files and folders>
  expected.json   file -> {"what": ..., "error_contains_any": [...]}  (for a table-driven test)
  README.md       the same as a table

Nothing here runs or imports model code: the pickle payloads are written opcode by opcode and never
unpickled (not even to check them; `pickletools.dis` only disassembles).

  /work/pyref/bin/python scripts/make_bad_models.py
"""

import argparse
import io
import json
import os
import pickletools
import shutil
import struct
import zipfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

DT = {"F16": np.float16, "F32": np.float32, "I64": np.int64, "I32": np.int32}


# --------------------------------------------------------------------------
# a minimal safetensors writer (so that every byte is under our control)
# --------------------------------------------------------------------------
def st_parts(tensors, metadata=None):
    """tensors: {name: (dtype str, np.ndarray)} -> (header dict, data bytes); data in the given order."""
    header, data, off = {}, b"", 0
    if metadata is not None:
        header["__metadata__"] = metadata
    for name, (dt, arr) in tensors.items():
        b = np.ascontiguousarray(arr).astype(np.dtype(DT[dt]).newbyteorder("<")).tobytes()
        header[name] = {"dtype": dt, "shape": list(arr.shape), "data_offsets": [off, off + len(b)]}
        data += b
        off += len(b)
    return header, data


def st_bytes(header, data, header_text=None, header_len=None):
    """Serialize. header_text overrides the JSON text, header_len the 8-byte length prefix."""
    h = header_text if header_text is not None else json.dumps(header, separators=(",", ":")).encode()
    if header_text is None:
        h += b" " * (-len(h) % 8)
    n = len(h) if header_len is None else header_len
    return struct.pack("<Q", n) + h + data


def rng(seed):
    return np.random.default_rng(seed)


def randn(g, *shape):
    return (g.standard_normal(shape) * 0.05).astype(np.float32)


# --------------------------------------------------------------------------
# stubs with real key names (tiny shapes: these files are rejected before anything is computed)
# --------------------------------------------------------------------------
def stub_sd1(g, in_channels=4, unet=True, conv_in_shape=None):
    t = {}
    if unet:
        shape = conv_in_shape or (32, in_channels, 3, 3)
        t["model.diffusion_model.input_blocks.0.0.weight"] = ("F16", randn(g, *shape))
        t["model.diffusion_model.input_blocks.0.0.bias"] = ("F16", randn(g, 32))
        t["model.diffusion_model.time_embed.0.bias"] = ("F16", randn(g, 128))
        t["model.diffusion_model.out.2.weight"] = ("F16", randn(g, 4, 32, 3, 3))
        t["model.diffusion_model.out.2.bias"] = ("F16", randn(g, 4))
    t["first_stage_model.post_quant_conv.weight"] = ("F16", randn(g, 4, 4, 1, 1))
    t["first_stage_model.post_quant_conv.bias"] = ("F16", randn(g, 4))
    t["first_stage_model.decoder.conv_in.weight"] = ("F16", randn(g, 8, 4, 3, 3))
    t["cond_stage_model.transformer.text_model.final_layer_norm.weight"] = ("F16", randn(g, 64) + 1)
    t["cond_stage_model.transformer.text_model.embeddings.position_embedding.weight"] = ("F16", randn(g, 77, 8))
    return t


def vae_only(g):
    """standalone VAE file (like sd-vae-ft-mse / sdxl_vae .safetensors): LDM VAE names without a prefix"""
    t = {}
    c = 4
    for part in ("encoder", "decoder"):
        t[f"{part}.conv_in.weight"] = ("F16", randn(g, c, 3 if part == "encoder" else 4, 3, 3))
        t[f"{part}.conv_in.bias"] = ("F16", randn(g, c))
        for blk in ("block_1", "block_2"):
            for p in ("norm1", "norm2"):
                t[f"{part}.mid.{blk}.{p}.weight"] = ("F16", randn(g, c) + 1)
                t[f"{part}.mid.{blk}.{p}.bias"] = ("F16", randn(g, c))
            for p in ("conv1", "conv2"):
                t[f"{part}.mid.{blk}.{p}.weight"] = ("F16", randn(g, c, c, 3, 3))
                t[f"{part}.mid.{blk}.{p}.bias"] = ("F16", randn(g, c))
        for p in ("q", "k", "v", "proj_out"):
            t[f"{part}.mid.attn_1.{p}.weight"] = ("F16", randn(g, c, c, 1, 1))
            t[f"{part}.mid.attn_1.{p}.bias"] = ("F16", randn(g, c))
        t[f"{part}.mid.attn_1.norm.weight"] = ("F16", randn(g, c) + 1)
        t[f"{part}.mid.attn_1.norm.bias"] = ("F16", randn(g, c))
        t[f"{part}.norm_out.weight"] = ("F16", randn(g, c) + 1)
        t[f"{part}.norm_out.bias"] = ("F16", randn(g, c))
    for i in range(4):
        t[f"encoder.down.{i}.block.0.conv1.weight"] = ("F16", randn(g, c, c, 3, 3))
        t[f"decoder.up.{i}.block.0.conv1.weight"] = ("F16", randn(g, c, c, 3, 3))
    t["encoder.conv_out.weight"] = ("F16", randn(g, 8, c, 3, 3))
    t["decoder.conv_out.weight"] = ("F16", randn(g, 3, c, 3, 3))
    t["quant_conv.weight"] = ("F16", randn(g, 8, 8, 1, 1))
    t["post_quant_conv.weight"] = ("F16", randn(g, 4, 4, 1, 1))
    return dict(sorted(t.items()))


def lora(g):
    """kohya-ss LoRA for SD 1.x (the most common civitai download after checkpoints)"""
    t = {}
    r, c = 4, 32
    for name in (
        "lora_unet_down_blocks_0_attentions_0_proj_in",
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k",
        "lora_unet_mid_block_attentions_0_proj_out",
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj",
        "lora_te_text_model_encoder_layers_0_mlp_fc1",
    ):
        conv = name.endswith("proj_in") or name.endswith("proj_out")
        t[f"{name}.lora_down.weight"] = ("F16", randn(g, r, c, 1, 1) if conv else randn(g, r, c))
        t[f"{name}.lora_up.weight"] = ("F16", randn(g, c, r, 1, 1) if conv else randn(g, c, r))
        t[f"{name}.alpha"] = ("F16", np.array(r, dtype=np.float32))
    meta = {"ss_network_module": "networks.lora", "ss_network_dim": "4", "ss_network_alpha": "4.0",
            "ss_base_model_version": "sd_v1", "modelspec.architecture": "stable-diffusion-v1/lora"}
    return dict(sorted(t.items())), meta


def sd3_like(g):
    t = {}
    d = 8
    t["model.diffusion_model.x_embedder.proj.weight"] = ("F16", randn(g, d, 16, 2, 2))
    t["model.diffusion_model.pos_embed"] = ("F16", randn(g, 1, 16, d))
    t["model.diffusion_model.context_embedder.weight"] = ("F16", randn(g, d, 32))
    t["model.diffusion_model.t_embedder.mlp.0.weight"] = ("F16", randn(g, d, 32))
    for blk in ("context_block", "x_block"):
        t[f"model.diffusion_model.joint_blocks.0.{blk}.adaLN_modulation.1.weight"] = ("F16", randn(g, 6 * d, d))
        t[f"model.diffusion_model.joint_blocks.0.{blk}.adaLN_modulation.1.bias"] = ("F16", randn(g, 6 * d))
        t[f"model.diffusion_model.joint_blocks.0.{blk}.attn.qkv.weight"] = ("F16", randn(g, 3 * d, d))
        t[f"model.diffusion_model.joint_blocks.0.{blk}.mlp.fc1.weight"] = ("F16", randn(g, 4 * d, d))
    t["model.diffusion_model.final_layer.linear.weight"] = ("F16", randn(g, 64, d))
    t["first_stage_model.decoder.conv_in.weight"] = ("F16", randn(g, 4, 16, 3, 3))  # SD3 VAE: 16 latent channels
    t["text_encoders.clip_l.transformer.text_model.final_layer_norm.weight"] = ("F16", randn(g, 64) + 1)
    return dict(sorted(t.items()))


def sdxl_refiner_like(g):
    t = {}
    t["model.diffusion_model.input_blocks.0.0.weight"] = ("F16", randn(g, 32, 4, 3, 3))
    t["model.diffusion_model.label_emb.0.0.weight"] = ("F16", randn(g, 16, 40))  # real: [1536, 2560]
    t["conditioner.embedders.0.model.positional_embedding"] = ("F16", randn(g, 77, 16))
    t["conditioner.embedders.0.model.text_projection"] = ("F16", randn(g, 16, 16))
    t["conditioner.embedders.0.model.transformer.resblocks.0.attn.in_proj_weight"] = ("F16", randn(g, 48, 16))
    t["first_stage_model.decoder.conv_in.weight"] = ("F16", randn(g, 8, 4, 3, 3))
    return dict(sorted(t.items()))


def controlnet(g):
    t = {}
    t["control_model.input_hint_block.0.weight"] = ("F16", randn(g, 16, 3, 3, 3))
    t["control_model.input_blocks.0.0.weight"] = ("F16", randn(g, 32, 4, 3, 3))
    t["control_model.zero_convs.0.0.weight"] = ("F16", randn(g, 32, 32, 1, 1))
    t["control_model.middle_block_out.0.weight"] = ("F16", randn(g, 32, 32, 1, 1))
    t["control_model.time_embed.0.weight"] = ("F16", randn(g, 128, 32))
    return dict(sorted(t.items()))


def textual_inversion(g):
    return {"emb_params": ("F16", randn(g, 4, 768))}


# --------------------------------------------------------------------------
# pickle payloads (hand-assembled opcodes; NEVER loaded)
# --------------------------------------------------------------------------
PICKLE_MARKER = "/tmp/easel-bad-pickle-was-unpickled"


def evil_pickle():
    """pickle protocol 2: os.system("touch /tmp/easel-bad-pickle-was-unpickled"). Harmless if it ever ran,
    and a test can assert that the marker file does not appear."""
    cmd = f"touch {PICKLE_MARKER}".encode()
    p = b"\x80\x02"  # PROTO 2
    p += b"cos\nsystem\n"  # GLOBAL os.system
    p += b"X" + struct.pack("<I", len(cmd)) + cmd  # BINUNICODE
    p += b"\x85"  # TUPLE1
    p += b"R"  # REDUCE  -> would call os.system(cmd)
    p += b"."  # STOP
    return p


def evil_torch_zip():
    """the torch.save zip layout (archive/data.pkl + archive/version) around the same payload"""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as z:
        for name, data in (("archive/data.pkl", evil_pickle()), ("archive/version", b"3\n"), ("archive/byteorder", b"little")):
            zi = zipfile.ZipInfo(name, date_time=(2020, 1, 1, 0, 0, 0))
            z.writestr(zi, data)
    return buf.getvalue()


# --------------------------------------------------------------------------
# the corpus
# --------------------------------------------------------------------------
CASES = []  # (name, what, words)


def case(name, what, words):
    CASES.append((name, what, words))


def build(out):
    g = rng(7)
    base_t = stub_sd1(g)
    header, data = st_parts(base_t, {"format": "pt"})
    good = st_bytes(header, data)
    hl = struct.unpack("<Q", good[:8])[0]

    def w(name, b):
        with open(os.path.join(out, name), "wb") as f:
            f.write(b)

    # ---- container: sizes and truncation
    w("zero-bytes.safetensors", b"")
    case("zero-bytes.safetensors", "0-byte file", ["empty", "too small", "truncated"])
    w("short-4-bytes.safetensors", good[:4])
    case("short-4-bytes.safetensors", "4 bytes: not even the 8-byte header length", ["too small", "truncated", "header"])
    w("truncated-in-header.safetensors", good[: 8 + hl // 2])
    case("truncated-in-header.safetensors", "cut in the middle of the JSON header", ["truncated", "header"])
    w("truncated-mid-data.safetensors", good[: 8 + hl + len(data) // 2])
    case("truncated-mid-data.safetensors", "cut in the middle of the tensor data (header intact)", ["truncated", "data"])
    w("truncated-last-byte.safetensors", good[:-1])
    case("truncated-last-byte.safetensors", "the last byte of the data is missing", ["truncated", "data"])
    w("trailing-bytes.safetensors", good + b"\0" * 16)
    case("trailing-bytes.safetensors", "16 extra bytes after the last tensor (safetensors-rs: MetadataIncompleteBuffer)",
         ["size", "trailing", "incomplete", "length"])

    # ---- container: the header length
    w("header-len-u64-max.safetensors", struct.pack("<Q", 2**64 - 1) + good[8:])
    case("header-len-u64-max.safetensors", "header length 2^64-1 (8 + n overflows u64)", ["header"])
    w("header-len-oversized.safetensors", struct.pack("<Q", 200 * 2**20) + good[8:])
    case("header-len-oversized.safetensors", "header length 200 MiB: more than the file and than any sane header",
         ["header"])
    w("header-len-zero.safetensors", struct.pack("<Q", 0) + good[8:])
    case("header-len-zero.safetensors", "header length 0", ["header"])

    # ---- container: the header text
    junk = b"this is not JSON at all, just text pretending to be a header.    "
    w("header-not-json.safetensors", st_bytes(None, data, header_text=junk))
    case("header-not-json.safetensors", "header bytes are not JSON", ["json", "header"])
    w("header-json-array.safetensors", st_bytes(None, data, header_text=b"[1, 2, 3]       "))
    case("header-json-array.safetensors", "header is JSON but an array, not an object", ["object", "header", "json"])
    bad_utf8 = json.dumps(header, separators=(",", ":")).encode().replace(b"\"format\"", b"\"f\xff\xfermat\"", 1)
    bad_utf8 += b" " * (-len(bad_utf8) % 8)
    w("header-invalid-utf8.safetensors", st_bytes(None, data, header_text=bad_utf8))
    case("header-invalid-utf8.safetensors", "header contains bytes that are not UTF-8", ["utf-8", "utf8", "header", "json"])
    dup = json.dumps(header, separators=(",", ":"))
    k0 = "model.diffusion_model.input_blocks.0.0.bias"
    entry = json.dumps(header[k0], separators=(",", ":"))
    dup = dup[:-1] + f',"{k0}":{entry}}}'
    dup_b = dup.encode()
    dup_b += b" " * (-len(dup_b) % 8)
    w("duplicate-key.safetensors", st_bytes(None, data, header_text=dup_b))
    case("duplicate-key.safetensors", f"the header names `{k0}` twice (serde_json maps keep the last silently)",
         ["duplicate"])
    w("no-tensors.safetensors", st_bytes({"__metadata__": {"format": "pt"}}, b""))
    case("no-tensors.safetensors", "a valid safetensors container with no tensors at all", ["no tensors", "empty", "no model", "not a"])

    # ---- container: tensor entries
    def with_entry(fn):
        h = json.loads(json.dumps(header))
        fn(h)
        return st_bytes(h, data)

    kA = "model.diffusion_model.input_blocks.0.0.weight"
    kB = "model.diffusion_model.out.2.weight"
    w("offsets-out-of-range.safetensors",
      with_entry(lambda h: h[kB].update(data_offsets=[h[kB]["data_offsets"][0] + len(data), h[kB]["data_offsets"][1] + len(data)])))
    case("offsets-out-of-range.safetensors", f"`{kB}` points past the end of the data", ["offset", "out of range", "bounds", "truncated"])
    w("offsets-overlap.safetensors",
      with_entry(lambda h: h[kB].update(data_offsets=[h[kA]["data_offsets"][0] + 8, h[kA]["data_offsets"][0] + 8 + (h[kB]["data_offsets"][1] - h[kB]["data_offsets"][0])])))
    case("offsets-overlap.safetensors", f"`{kB}` overlaps `{kA}` (and leaves a hole)", ["overlap"])
    w("offsets-reversed.safetensors",
      with_entry(lambda h: h[kA].update(data_offsets=[h[kA]["data_offsets"][1], h[kA]["data_offsets"][0]])))
    case("offsets-reversed.safetensors", f"`{kA}` has begin > end", ["offset"])
    w("shape-size-mismatch.safetensors", with_entry(lambda h: h[kA].update(shape=[32, 4, 3, 4])))
    case("shape-size-mismatch.safetensors", f"`{kA}` shape [32,4,3,4] needs 3072 bytes, its offsets span 2304",
         ["size", "shape", "offset"])
    w("dtype-unknown.safetensors", with_entry(lambda h: h[kA].update(dtype="F17")))
    case("dtype-unknown.safetensors", f"`{kA}` has dtype \"F17\"", ["dtype"])
    w("shape-negative.safetensors", with_entry(lambda h: h[kA].update(shape=[-32, 4, 3, 3])))
    case("shape-negative.safetensors", f"`{kA}` has a negative dimension", ["shape"])
    w("shape-overflow.safetensors", with_entry(lambda h: h[kA].update(shape=[2**40, 2**40, 3, 3])))
    case("shape-overflow.safetensors", f"`{kA}` has 2^80·9 elements (the byte count overflows u64)",
         ["overflow", "shape", "size"])
    w("entry-missing-dtype.safetensors", with_entry(lambda h: h[kA].pop("dtype")))
    case("entry-missing-dtype.safetensors", f"`{kA}` has no \"dtype\" field", ["dtype"])

    # ---- not safetensors at all
    w("text-file.safetensors", b"Stable Diffusion model - download it from civitai.com\nversion 1.0\n" * 3)
    case("text-file.safetensors", "a plain text file named .safetensors (its first 8 bytes read as a huge header length)",
         ["header", "not a safetensors"])
    ev = evil_pickle()
    pickletools.dis(ev, out=io.StringIO())  # disassemble only: checks the opcodes are well formed
    w("pickle-os-system.ckpt", ev)
    case("pickle-os-system.ckpt",
         f"raw pickle whose unpickling calls os.system(\"touch {PICKLE_MARKER}\"); must never be unpickled",
         ["pickle", "ckpt", "not supported", "unsupported"])
    w("pickle-os-system-torchzip.ckpt", evil_torch_zip())
    case("pickle-os-system-torchzip.ckpt",
         "the same payload in torch.save's zip layout (archive/data.pkl), as real .ckpt files are",
         ["pickle", "ckpt", "not supported", "unsupported"])

    # ---- folders
    os.makedirs(os.path.join(out, "no-model"))
    with open(os.path.join(out, "no-model", "notes.txt"), "w") as f:
        f.write("this folder holds no model\n")
    case("no-model/", "a folder with no model (no model_index.json, no weights)", ["no model", "model_index.json", "not a model"])
    d = os.path.join(out, "diffusers-no-unet")
    os.makedirs(os.path.join(d, "scheduler"))
    with open(os.path.join(d, "model_index.json"), "w") as f:
        json.dump({"_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.42.1",
                   "scheduler": ["diffusers", "EulerDiscreteScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
                   "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
                   "vae": ["diffusers", "AutoencoderKL"]}, f, indent=2)
    shutil.copy(os.path.join(ROOT, "crates/engine/tests/fixtures/scheduler_configs/sd15.json"), os.path.join(d, "scheduler", "scheduler_config.json"))
    case("diffusers-no-unet/", "diffusers folder whose model_index.json names a unet, but there is no unet/ (nor vae/, text_encoder/)",
         ["unet"])

    # ---- model level (stubs: rejected at family detection, before completeness checks)
    def model_file(name, tensors, meta=None):
        h, dat = st_parts(tensors, meta if meta is not None else {"format": "pt"})
        w(name, st_bytes(h, dat))

    model_file("missing-unet.safetensors", stub_sd1(rng(11), unet=False))
    case("missing-unet.safetensors", "VAE and text-encoder keys but no model.diffusion_model.* at all",
         ["unet", "u-net", "model.diffusion_model", "diffusion model"])
    model_file("unet-incomplete.safetensors", stub_sd1(rng(12)))
    case("unet-incomplete.safetensors",
         "SD 1.x key prefixes, but the U-Net has only conv_in, time_embed.0.bias and out.2 (input/middle/output blocks missing; "
         "VAE and text encoder are stubs too)", ["missing"])
    model_file("unet-conv-in-wrong-rank.safetensors", stub_sd1(rng(13), conv_in_shape=(32, 4, 9)))
    case("unet-conv-in-wrong-rank.safetensors",
         "model.diffusion_model.input_blocks.0.0.weight is 3-D [32, 4, 9] instead of [C, in, 3, 3] (read first, to detect inpainting)",
         ["shape", "input_blocks.0.0.weight"])
    model_file("unsupported-in-channels-8.safetensors", stub_sd1(rng(14), in_channels=8))
    case("unsupported-in-channels-8.safetensors",
         "U-Net conv_in takes 8 channels (instruct-pix2pix); only 4 (txt2img) and 9 (inpainting) are supported",
         ["in_channels", "input channels", "instruct", "pix2pix", "unsupported", "not supported"])
    model_file("unsupported-sd3.safetensors", sd3_like(rng(15)))
    case("unsupported-sd3.safetensors", "SD3-like key set (model.diffusion_model.joint_blocks.*, x_embedder, pos_embed)",
         ["sd3", "sd 3", "stable diffusion 3", "unsupported", "not supported"])
    model_file("unsupported-sdxl-refiner.safetensors", sdxl_refiner_like(rng(16)))
    case("unsupported-sdxl-refiner.safetensors",
         "SDXL refiner key set (conditioner.embedders.0.model.* is OpenCLIP, no CLIP-L)",
         ["refiner", "unsupported", "not supported"])
    model_file("controlnet.safetensors", controlnet(rng(17)))
    case("controlnet.safetensors", "a ControlNet (control_model.*), not a checkpoint",
         ["controlnet", "unsupported", "not supported", "not a"])
    model_file("vae-only.safetensors", vae_only(rng(18)))
    case("vae-only.safetensors", "a standalone VAE (encoder.* / decoder.* / quant_conv, no prefix), not a checkpoint",
         ["vae"])
    lt, lm = lora(rng(19))
    model_file("lora.safetensors", lt, lm)
    case("lora.safetensors", "a kohya LoRA (lora_unet_* / lora_te_* with lora_down/lora_up/alpha), not a checkpoint",
         ["lora"])
    model_file("textual-inversion.safetensors", textual_inversion(rng(20)), {})
    case("textual-inversion.safetensors", "a textual-inversion embedding (emb_params [4, 768]), not a checkpoint",
         ["embedding", "textual inversion", "not a"])


def safetensors_says(out, name):
    """What the reference implementation (safetensors, Rust core) does with the file: informative only."""
    from safetensors import safe_open

    p = os.path.join(out, name)
    if os.path.isdir(p) or not name.endswith(".safetensors"):
        return None
    try:
        with safe_open(p, "np") as f:
            for k in f.keys():
                f.get_tensor(k)
            return f"loads: {len(list(f.keys()))} tensors"
    except Exception as e:  # noqa: BLE001
        return f"error: {type(e).__name__}: {str(e)[:160]}"


def write_docs(out):
    exp = {}
    for name, what, words in CASES:
        exp[name] = {"what": what, "error_contains_any": words}
        said = safetensors_says(out, name)
        if said is not None:
            exp[name]["safetensors_0.8_python"] = said
    with open(os.path.join(out, "expected.json"), "w") as f:
        json.dump(exp, f, indent=1)
        f.write("\n")
    rows = "\n".join(
        f"| `{name}` | {size(out, name)} | {what} | {' / '.join(f'`{x}`' for x in words)} |" for name, what, words in CASES
    )
    text = f"""# Bad model inputs

Generated by `scripts/make_bad_models.py` (deterministic). Every entry must make Easel's loader return an
error (never panic, never crash with SIGBUS, never allocate what a header claims, never unpickle). The
error text, lower-cased, should contain at least one of the listed words; `expected.json` holds the same
table for a table-driven test.

The model-level files are *stubs*: they carry real key names with tiny shapes and are meant to be rejected
when the family is detected (from key prefixes and the shape of `model.diffusion_model.input_blocks.0.0.weight`),
before the components are checked for completeness. A complete file with one wrong shape deep inside
cannot be a few KB (the 49408 × 64 token embedding alone is 6.3 MB): make it in the test from
`tests/fixtures/single_file/sd1-single.safetensors` by rewriting its header in a temp copy, e.g.
`"model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight":{{"dtype":"F16","shape":[32,64]`
→ `[64,32]` (same length, same byte size: only the shape is wrong), or by deleting a key's entry (then the
data is no longer fully covered, so prefer renaming the key, e.g. `to_k` → `to_x`, which makes it both
missing and unexpected).

The pickle files would run `touch {PICKLE_MARKER}` if unpickled: a test can check that this file does not appear.

| file | bytes | what is wrong | error should contain one of |
|---|---|---|---|
{rows}
"""
    with open(os.path.join(out, "README.md"), "w") as f:
        f.write(text)


def size(out, name):
    p = os.path.join(out, name)
    if os.path.isdir(p):
        return "dir"
    return str(os.path.getsize(p))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default=ROOT)
    args = ap.parse_args()
    out = os.path.join(args.root, "crates/engine/tests/fixtures/bad")
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    build(out)
    write_docs(out)
    total = sum(os.path.getsize(os.path.join(dp, f)) for dp, _, fs in os.walk(out) for f in fs)
    print(f"{len(CASES)} cases in {out}, {total / 1e3:.1f} kB")


if __name__ == "__main__":
    main()
