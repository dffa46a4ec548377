"""Train Easel Mini: a small SD 1.x-architecture model that draws the grammar in grammar.py.

Stages (each resumable; a finished stage is skipped when run again):
  vae      AutoencoderKL, 128x128 RGB <-> 16x16x4 latents (8x downscale), L1 + MSE + tiny KL
  latents  a fixed data set: N pictures encoded once by the trained encoder, captions tokenized
  decoder  the VAE's decoder fine-tuned on whole pictures with the encoder frozen
  unet     U-Net and CLIP text encoder trained jointly on the diffusion loss (epsilon
           prediction, SD 1.5's noise schedule, min-SNR weighting, 10% empty captions for
           classifier-free guidance, EMA weights)
  export   the EMA weights as an ordinary diffusers folder, f16 safetensors

    /work/pyref/bin/python scripts/train_mini/train.py --work out/train-mini --out assets/models/easel-mini

Deterministic for a given seed and thread count (CPU only). Interrupt at any time: the next run
continues from the last checkpoint.

The text encoder is trained jointly with the U-Net rather than contrastively first: the grammar's
meaning (which colour goes with which shape, which side "above" is) is exactly what the
denoising loss needs, and a contrastive stage would need an image tower and time of its own.
"""

import argparse
import json
import math
import os
import random
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(ROOT, "scripts"))

import grammar  # noqa: E402

TOKENIZER_JSON = os.path.join(ROOT, "assets/tokenizer/clip-vit-large-patch14/tokenizer.json")

VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    block_out_channels=[24, 48, 64, 64],
    layers_per_block=1,
    norm_num_groups=8,
    latent_channels=4,
    sample_size=grammar.SIZE,
)
UNET_CONFIG = dict(
    sample_size=grammar.SIZE // 8,
    in_channels=4,
    out_channels=4,
    # Attention at 8x8 and 4x4 only: at 16x16 it was a third of a training step on the CPU,
    # and where things are and which words go with them is decided at the coarse levels.
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    block_out_channels=[32, 64, 128],
    layers_per_block=1,
    attention_head_dim=4,  # heads (SD 1.x's name for it): 16 and 32 channels per head
    cross_attention_dim=128,
    norm_num_groups=16,
)
TEXT_CONFIG = dict(
    vocab_size=49408,
    hidden_size=128,
    intermediate_size=512,
    num_hidden_layers=3,
    num_attention_heads=2,  # 64 channels per head, the CLIP convention
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    bos_token_id=49406,
    eos_token_id=49407,
    pad_token_id=49407,
    projection_dim=128,
)


def log(msg):
    print(msg, flush=True)


class Progress:
    """One line per stage: step, loss (running mean), it/s and ETA."""

    def __init__(self, name, total, start):
        self.name, self.total, self.start_step = name, total, start
        self.t0 = time.time()
        self.loss = None
        self.last_print = 0.0

    def update(self, step, loss):
        self.loss = loss if self.loss is None else 0.98 * self.loss + 0.02 * loss
        now = time.time()
        if now - self.last_print < 5 and step < self.total:
            return
        self.last_print = now
        done = step - self.start_step
        rate = done / max(now - self.t0, 1e-9)
        eta = (self.total - step) / rate if rate > 0 else float("inf")
        bar = "#" * int(30 * step / self.total)
        line = (f"[{self.name}] {bar:<30} {step}/{self.total} loss {self.loss:.5f} "
                f"{rate:.2f} it/s ETA {eta / 60:.1f} min")
        print("\r" + line if sys.stdout.isatty() else line, end="" if sys.stdout.isatty() else "\n", flush=True)


def set_lr(optimizer, base, step, total, warmup, floor):
    """Linear warm-up over `warmup` steps, then cosine from `base` down to `floor` x `base`."""
    lr = base * min(1.0, (step + 1) / warmup) * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * step / total)))
    for group in optimizer.param_groups:
        group["lr"] = lr


def seed_all(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def images_to_tensor(images):
    array = np.stack([np.asarray(im, dtype=np.float32) for im in images]) / 127.5 - 1.0
    return torch.from_numpy(array).permute(0, 3, 1, 2).contiguous()


def save_checkpoint(path, **state):
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


def latest_checkpoint(folder, prefix):
    if not os.path.isdir(folder):
        return None
    found = sorted(f for f in os.listdir(folder) if f.startswith(prefix) and f.endswith(".pt"))
    return os.path.join(folder, found[-1]) if found else None


# --------------------------------------------------------------------------
# stage 1: the VAE
# --------------------------------------------------------------------------
def train_vae(args):
    from diffusers import AutoencoderKL

    final = os.path.join(args.work, "vae-final.pt")
    if os.path.exists(final):
        log("[vae] done already")
        return
    if args.init_from:
        # The exported VAE: its encoder is the one the data set was encoded with (the decoder
        # stage freezes it), its decoder the fine-tuned one; both stages are then done.
        vae = AutoencoderKL.from_pretrained(os.path.join(args.init_from, "vae")).float()
        model = {k: v for k, v in vae.state_dict().items()}
        save_checkpoint(final, model=model)
        save_checkpoint(os.path.join(args.work, "vae-decoder-final.pt"), model=model)
        log(f"[vae] taken from {args.init_from}")
        return
    folder = os.path.join(args.work, "vae-ckpt")
    os.makedirs(folder, exist_ok=True)
    seed_all(args.seed)
    vae = AutoencoderKL(**VAE_CONFIG)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    step = 0
    rng = random.Random(args.seed + 1)
    resume = latest_checkpoint(folder, "step-")
    if resume:
        state = torch.load(resume, weights_only=False)
        vae.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step, rng = state["step"], state["rng"]
        torch.set_rng_state(state["torch_rng"])
        log(f"[vae] resumed at step {step}")
    vae.train()
    progress = Progress("vae", args.vae_steps, step)
    while step < args.vae_steps:
        set_lr(optimizer, args.vae_lr, step, args.vae_steps, warmup=100, floor=0.1)
        # Random 64x64 crops: the VAE is convolutional, and a quarter of the pixels is a
        # quarter of the time (its mid-block attention sees 8x8 instead of 16x16 latents).
        full = images_to_tensor([grammar.sample(rng)[1] for _ in range(args.vae_batch)])
        crops = []
        for image in full:
            y, x = rng.randrange(0, grammar.SIZE - 63, 8), rng.randrange(0, grammar.SIZE - 63, 8)
            crops.append(image[:, y : y + 64, x : x + 64])
        batch = torch.stack(crops)
        posterior = vae.encode(batch).latent_dist
        recon = vae.decode(posterior.sample()).sample
        loss = F.l1_loss(recon, batch) + F.mse_loss(recon, batch) + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        step += 1
        progress.update(step, loss.item())
        if step % args.checkpoint_every == 0 or step == args.vae_steps:
            save_checkpoint(os.path.join(folder, f"step-{step:07d}.pt"), model=vae.state_dict(),
                            optimizer=optimizer.state_dict(), step=step, rng=rng, torch_rng=torch.get_rng_state())
    vae.eval()
    save_checkpoint(final, model=vae.state_dict())
    log("[vae] finished")


def load_vae(args, decoder=True):
    """The trained VAE; with `decoder`, the fine-tuned decoder when there is one."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(**VAE_CONFIG)
    tuned = os.path.join(args.work, "vae-decoder-final.pt")
    path = tuned if decoder and os.path.exists(tuned) else os.path.join(args.work, "vae-final.pt")
    vae.load_state_dict(torch.load(path, weights_only=False)["model"])
    return vae.eval()


def train_decoder(args):
    """The decoder alone, on whole pictures, with the encoder frozen (as Stability fine-tuned
    SD's decoder): the latents the U-Net learns stay the same while colours and edges sharpen."""
    final = os.path.join(args.work, "vae-decoder-final.pt")
    if os.path.exists(final):
        log("[decoder] done already")
        return
    folder = os.path.join(args.work, "decoder-ckpt")
    os.makedirs(folder, exist_ok=True)
    seed_all(args.seed + 5)
    vae = load_vae(args, decoder=False)
    trainable = list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())
    for p in vae.parameters():
        p.requires_grad_(False)
    for p in trainable:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(trainable, lr=args.decoder_lr, weight_decay=0.0, fused=True)
    step, rng = 0, random.Random(args.seed + 6)
    resume = latest_checkpoint(folder, "step-")
    if resume:
        state = torch.load(resume, weights_only=False)
        vae.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step, rng = state["step"], state["rng"]
        log(f"[decoder] resumed at step {step}")
    vae.decoder.train()
    progress = Progress("decoder", args.decoder_steps, step)
    while step < args.decoder_steps:
        set_lr(optimizer, args.decoder_lr, step, args.decoder_steps, warmup=50, floor=0.05)
        batch = images_to_tensor([grammar.sample(rng)[1] for _ in range(args.decoder_batch)])
        with torch.no_grad():
            latents = vae.encode(batch).latent_dist.mean
        recon = vae.decode(latents).sample
        loss = F.l1_loss(recon, batch) + F.mse_loss(recon, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        step += 1
        progress.update(step, loss.item())
        if step % args.checkpoint_every == 0 or step == args.decoder_steps:
            save_checkpoint(os.path.join(folder, f"step-{step:07d}.pt"), model=vae.state_dict(),
                            optimizer=optimizer.state_dict(), step=step, rng=rng)
    save_checkpoint(final, model=vae.state_dict())
    log("[decoder] finished")


# --------------------------------------------------------------------------
# stage 2: the latent data set
# --------------------------------------------------------------------------
def tokenizer():
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(TOKENIZER_JSON)
    return tok


def tokenize(tok, captions):
    """CLIP ids padded with EOS to 77, as SD 1.x's tokenizer does (and as Easel does)."""
    ids = []
    for caption in captions:
        row = tok.encode(caption).ids[:77]
        if len(row) == 77:
            row[-1] = 49407
        ids.append(row + [49407] * (77 - len(row)))
    return torch.tensor(ids, dtype=torch.int64)


def shard_rng(args, shard):
    """Shard 0 draws what a one-process run draws; the others their own streams."""
    return random.Random(args.seed + 2 if shard == 0 else (args.seed + 2) * 1_000_003 + shard)


def encode_shard(args, shard, count):
    """`count` pictures of shard `shard`, drawn and encoded in this process (one thread), saved
    to the work folder so that an interrupted data set continues where it stopped."""
    path = os.path.join(args.work, f"latents-shard-{shard}-of-{args.workers}.pt")
    if os.path.exists(path):
        return path
    torch.set_num_threads(1)
    vae = load_vae(args, decoder=False)
    rng = shard_rng(args, shard)
    latents, captions = [], []
    progress = Progress(f"latents {shard + 1}/{args.workers}", count, 0)
    with torch.no_grad():
        for start in range(0, count, 64):
            n = min(64, count - start)
            samples = [grammar.sample(rng) for _ in range(n)]
            batch = images_to_tensor([s[1] for s in samples])
            latents.append(vae.encode(batch).latent_dist.mean)
            captions += [s[0] for s in samples]
            progress.update(start + n, 0.0)
    save_checkpoint(path, latents=torch.cat(latents), captions=captions)
    return path


def build_latents(args):
    path = os.path.join(args.work, "latents.pt")
    if os.path.exists(path):
        log("[latents] done already")
        return
    counts = [args.dataset_size // args.workers + (i < args.dataset_size % args.workers) for i in range(args.workers)]
    if args.workers == 1:
        shards = [encode_shard(args, 0, counts[0])]
    else:
        import multiprocessing

        # spawn, not fork: a forked child inherits torch's thread pool in an undefined state.
        with multiprocessing.get_context("spawn").Pool(args.workers) as pool:
            shards = pool.starmap(encode_shard, [(args, i, n) for i, n in enumerate(counts)])
    parts = [torch.load(p, weights_only=False) for p in shards]
    means = torch.cat([p["latents"] for p in parts])
    captions = [c for p in parts for c in p["captions"]]
    # Like SD's 0.18215: the factor that gives the latents unit variance (a warm start keeps
    # the factor its U-Net was trained with).
    scaling_factor = float(1.0 / means[: 40 * 64].std())
    if args.init_from:
        with open(os.path.join(args.init_from, "vae", "config.json")) as f:
            scaling_factor = json.load(f)["scaling_factor"]
    ids = tokenize(tokenizer(), captions)
    save_checkpoint(path, latents=means.half(), ids=ids, captions=captions, scaling_factor=scaling_factor)
    for p in shards:
        os.remove(p)
    log(f"[latents] {len(captions)} samples, scaling factor {scaling_factor:.5f}")


# --------------------------------------------------------------------------
# stage 3: U-Net + text encoder
# --------------------------------------------------------------------------
def sd15_alphas_cumprod(zero_terminal_snr=False):
    """SD 1.5's schedule; with `zero_terminal_snr`, rescaled as diffusers' `rescale_betas_zero_snr`
    does (Lin et al. 2023): the last timestep is pure noise, so the layout must come from the text."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    alphas_cumprod = torch.cumprod(1 - betas, 0)
    if zero_terminal_snr:
        root = alphas_cumprod.sqrt()
        first, last = root[0].clone(), root[-1].clone()
        alphas_cumprod = ((root - last) * first / (first - last)) ** 2
    return alphas_cumprod


def load_init_weights(folder):
    """U-Net and text-encoder weights of an exported model (f16 on disk, f32 here)."""
    from safetensors.torch import load_file

    unet = {k: v.float() for k, v in load_file(os.path.join(folder, "unet", "diffusion_pytorch_model.safetensors")).items()}
    text = load_file(os.path.join(folder, "text_encoder", "model.safetensors"))
    text = {k.removeprefix("text_model."): v.float() for k, v in text.items()}
    return unet, text


def train_unet(args):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    final = os.path.join(args.work, "unet-final.pt")
    if os.path.exists(final):
        log("[unet] done already")
        return
    data = torch.load(os.path.join(args.work, "latents.pt"), weights_only=False)
    latents_all = data["latents"].float() * data["scaling_factor"]
    ids_all = data["ids"]
    empty_ids = tokenize(tokenizer(), [""])[0]
    folder = os.path.join(args.work, "unet-ckpt")
    os.makedirs(folder, exist_ok=True)
    seed_all(args.seed + 3)
    unet = UNet2DConditionModel(**UNET_CONFIG)
    text = CLIPTextModel(CLIPTextConfig(**TEXT_CONFIG))
    params = list(unet.parameters()) + list(text.parameters())
    # fused: the unfused AdamW took a third of a step (the 6.3 M-row token embedding).
    optimizer = torch.optim.AdamW(params, lr=args.unet_lr, weight_decay=1e-2, fused=True)
    ema_unet = {k: v.detach().clone() for k, v in unet.state_dict().items()}
    ema_text = {k: v.detach().clone() for k, v in text.state_dict().items()}
    step = 0
    generator = torch.Generator().manual_seed(args.seed + 4)
    resume = latest_checkpoint(folder, "step-")
    if resume:
        state = torch.load(resume, weights_only=False)
        unet.load_state_dict(state["unet"])
        text.load_state_dict(state["text"])
        optimizer.load_state_dict(state["optimizer"])
        ema_unet, ema_text, step = state["ema_unet"], state["ema_text"], state["step"]
        generator.set_state(state["generator"])
        if state.get("objective", "epsilon") != args.objective:
            raise SystemExit(f"[unet] {resume} was trained with --objective {state.get('objective', 'epsilon')}")
        log(f"[unet] resumed at step {step}")
    elif args.init_from:
        # Warm start: what an earlier model learnt (colours, shapes, the words) carries over,
        # also when the objective changes; the optimizer and EMA start afresh from it.
        unet_init, text_init = load_init_weights(args.init_from)
        unet.load_state_dict(unet_init)
        missing, unexpected = text.load_state_dict(text_init, strict=False)
        if [k for k in missing if not k.endswith("position_ids")] or unexpected:
            raise SystemExit(f"[unet] {args.init_from}: text encoder keys differ: {missing} {unexpected}")
        ema_unet = {k: v.detach().clone() for k, v in unet.state_dict().items()}
        ema_text = {k: v.detach().clone() for k, v in text.state_dict().items()}
        log(f"[unet] starting from the weights in {args.init_from}")
    log(f"[unet] U-Net {sum(p.numel() for p in unet.parameters()) / 1e6:.2f} M parameters, "
        f"text encoder {sum(p.numel() for p in text.parameters()) / 1e6:.2f} M, {len(ids_all)} samples")
    v_objective = args.objective == "v-zero-snr"
    alphas_cumprod = sd15_alphas_cumprod(zero_terminal_snr=v_objective).float()
    unet.train()
    text.train()
    progress = Progress("unet", args.unet_steps, step)
    while step < args.unet_steps:
        set_lr(optimizer, args.unet_lr, step, args.unet_steps, warmup=args.unet_warmup, floor=0.1)
        index = torch.randint(0, len(ids_all), (args.unet_batch,), generator=generator)
        x0 = latents_all[index]
        ids = ids_all[index].clone()
        drop = torch.rand(args.unet_batch, generator=generator) < 0.1
        ids[drop] = empty_ids
        t = torch.randint(0, 1000, (args.unet_batch,), generator=generator)
        if args.high_noise_fraction > 0:
            # Where things go and which colour goes with which word is settled in the noisiest
            # half of the schedule (the late steps only sharpen edges): drawing more timesteps
            # there spends the CPU on what the captions decide.
            high = torch.randint(500, 1000, (args.unet_batch,), generator=generator)
            pick = torch.rand(args.unet_batch, generator=generator) < args.high_noise_fraction
            t = torch.where(pick, high, t)
        noise = torch.randn(x0.shape, generator=generator)
        if not v_objective:
            # Offset noise: lets the model move a picture's mean colour, which SD's schedule
            # otherwise leaves to the starting noise (zero terminal SNR does this by itself).
            noise = noise + 0.1 * torch.randn((x0.shape[0], x0.shape[1], 1, 1), generator=generator)
        a = alphas_cumprod[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * x0 + (1 - a).sqrt() * noise
        context = text(input_ids=ids).last_hidden_state
        pred = unet(noisy, t, encoder_hidden_states=context).sample
        snr = a / (1 - a)
        if v_objective:
            # v = sqrt(a) eps - sqrt(1 - a) x0; its loss is (1 + snr) times the x0 error, so
            # min(1, 6 / (1 + snr)) caps the nearly clean steps as min-SNR-5 does, while the pure
            # noise step (snr = 0, where min-SNR would give weight 0) keeps its full weight: there
            # the model must draw the whole layout from the caption.
            target = a.sqrt() * noise - (1 - a).sqrt() * x0
            weight = torch.clamp(6.0 / (1 + snr), max=1.0)
        else:
            target = noise
            weight = torch.clamp(snr, max=5.0) / snr  # min-SNR-5 for epsilon prediction
        loss = (weight * (pred - target) ** 2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        step += 1
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for ema, model in ((ema_unet, unet), (ema_text, text)):
                current = model.state_dict()
                keys = [k for k, v in current.items() if v.dtype.is_floating_point]
                averaged = [ema[k] for k in keys]
                torch._foreach_mul_(averaged, decay)
                torch._foreach_add_(averaged, [current[k].detach() for k in keys], alpha=1 - decay)
        progress.update(step, loss.item())
        if step % args.checkpoint_every == 0 or step == args.unet_steps:
            path = os.path.join(folder, f"step-{step:07d}.pt")
            save_checkpoint(path, unet=unet.state_dict(), text=text.state_dict(), optimizer=optimizer.state_dict(),
                            ema_unet=ema_unet, ema_text=ema_text, step=step, generator=generator.get_state(),
                            objective=args.objective)
            for old in sorted(os.listdir(folder))[:-2]:
                os.remove(os.path.join(folder, old))
    save_checkpoint(final, unet=ema_unet, text=ema_text, scaling_factor=data["scaling_factor"], objective=args.objective)
    log("[unet] finished")


# --------------------------------------------------------------------------
# stage 4: export
# --------------------------------------------------------------------------
def export(args):
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from make_fixtures import SCHEDULER_CONFIGS
    from make_tokenizer import load_clip_bpe
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    final = os.path.join(args.work, "unet-final.pt")
    if os.path.exists(final):
        state = torch.load(final, weights_only=False)
    else:
        # A preview of a run still in progress: the EMA weights of its last checkpoint.
        latest = latest_checkpoint(os.path.join(args.work, "unet-ckpt"), "step-")
        if latest is None:
            raise SystemExit("[export] no U-Net trained yet")
        checkpoint = torch.load(latest, weights_only=False)
        scaling = torch.load(os.path.join(args.work, "latents.pt"), weights_only=False)["scaling_factor"]
        state = dict(unet=checkpoint["ema_unet"], text=checkpoint["ema_text"], scaling_factor=scaling,
                     objective=checkpoint.get("objective", "epsilon"))
        log(f"[export] from {latest} (training not finished)")
    out = args.out
    os.makedirs(out, exist_ok=True)
    unet = UNet2DConditionModel(**UNET_CONFIG)
    unet.load_state_dict(state["unet"])
    vae = AutoencoderKL(**VAE_CONFIG, scaling_factor=round(state["scaling_factor"], 5), force_upcast=False)
    vae.load_state_dict(load_vae(args).state_dict())
    text = CLIPTextModel(CLIPTextConfig(**TEXT_CONFIG))
    text.load_state_dict(state["text"])
    for module in (unet, vae):
        module.half().save_pretrained(os.path.join(out, module.__class__.__name__ == "AutoencoderKL" and "vae" or "unet"),
                                      safe_serialization=True)
    # Real checkpoints keep the `text_model.` prefix that transformers 5 drops.
    weights = {("text_model." + k): v.half().contiguous() for k, v in text.state_dict().items()
               if not k.endswith("position_ids")}
    os.makedirs(os.path.join(out, "text_encoder"), exist_ok=True)
    save_file(dict(sorted(weights.items())), os.path.join(out, "text_encoder", "model.safetensors"),
              metadata={"format": "pt"})
    config = dict(TEXT_CONFIG, architectures=["CLIPTextModel"], model_type="clip_text_model", torch_dtype="float16")
    with open(os.path.join(out, "text_encoder", "config.json"), "w") as f:
        json.dump(config, f, indent=2)
        f.write("\n")
    os.makedirs(os.path.join(out, "scheduler"), exist_ok=True)
    scheduler_config = json.loads(SCHEDULER_CONFIGS["sd15"])
    if state.get("objective", "epsilon") == "v-zero-snr":
        # What the model was trained on; "trailing" so that sampling starts at the pure-noise step.
        scheduler_config.update(prediction_type="v_prediction", rescale_betas_zero_snr=True, timestep_spacing="trailing")
    with open(os.path.join(out, "scheduler", "scheduler_config.json"), "w") as f:
        json.dump(scheduler_config, f, indent=2)
        f.write("\n")
    encoder, merges = load_clip_bpe()
    tok = CLIPTokenizer(vocab=encoder, merges=list(merges), pad_token="<|endoftext|>", model_max_length=77)
    scheduler = PNDMScheduler.from_pretrained(out, subfolder="scheduler")
    pipe = StableDiffusionPipeline(vae=vae.float(), text_encoder=text, tokenizer=tok, unet=unet.float(),
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_config(out)
    tok.save_pretrained(os.path.join(out, "tokenizer"))
    write_preview_factors(vae.float(), state["scaling_factor"], os.path.join(out, "vae", "latent_rgb.json"))
    write_heldout(os.path.join(out, "heldout.json"))
    log(f"[export] wrote {out}")


@torch.no_grad()
def write_preview_factors(vae, scaling_factor, path, count=512):
    """The linear map from (scaled) latents to RGB in [-1, 1] that live previews use, fitted by
    least squares on pictures of the grammar against their 8x8-averaged pixels: the SD 1.x
    factors belong to SD's VAE, not to this one."""
    rng = random.Random(12345)
    pictures = images_to_tensor([grammar.sample(rng)[1] for _ in range(count)])
    latents = torch.cat([vae.encode(pictures[i : i + 64]).latent_dist.mean for i in range(0, count, 64)])
    latents = latents * round(scaling_factor, 5)
    target = F.avg_pool2d(pictures, 8)
    x = latents.permute(0, 2, 3, 1).reshape(-1, latents.shape[1]).double()
    y = target.permute(0, 2, 3, 1).reshape(-1, 3).double()
    x1 = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
    solution = torch.linalg.lstsq(x1, y).solution
    factors, bias = solution[:-1], solution[-1]
    error = (x1 @ solution - y).abs().mean().item()
    with open(path, "w") as f:
        json.dump({"factors": [[round(v, 4) for v in row] for row in factors.tolist()],
                   "bias": [round(v, 4) for v in bias.tolist()],
                   "note": f"latents x scaling_factor -> RGB in [-1, 1], least squares on {count} pictures "
                           f"(mean abs error {error:.3f})"}, f, indent=1)
        f.write("\n")
    log(f"[export] preview factors, mean abs error {error:.3f}")


def write_heldout(path):
    """The semantic tests' captions (never drawn in training) and the colours to look for."""
    with open(path, "w") as f:
        json.dump({"size": grammar.SIZE, "colours": grammar.COLOURS, "cases": grammar.HELDOUT_CASES}, f, indent=1)
        f.write("\n")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="out/train-mini", help="checkpoints and the latent data set")
    parser.add_argument("--out", default="assets/models/easel-mini")
    parser.add_argument("--stage", default="all", choices=["all", "vae", "decoder", "latents", "unet", "export"])
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--vae-steps", type=int, default=2000)
    parser.add_argument("--vae-batch", type=int, default=16)
    parser.add_argument("--vae-lr", type=float, default=1e-3)
    parser.add_argument("--decoder-steps", type=int, default=1500)
    parser.add_argument("--decoder-batch", type=int, default=8)
    parser.add_argument("--decoder-lr", type=float, default=5e-4)
    parser.add_argument("--dataset-size", type=int, default=30000)
    parser.add_argument("--unet-steps", type=int, default=8000)
    parser.add_argument("--unet-batch", type=int, default=32)
    parser.add_argument("--unet-lr", type=float, default=5e-4)
    parser.add_argument("--ema", type=float, default=0.999)
    parser.add_argument("--checkpoint-every", type=int, default=250)
    parser.add_argument("--objective", default="v-zero-snr", choices=["v-zero-snr", "epsilon"],
                        help="v prediction on a zero-terminal-SNR schedule, or SD 1.5's epsilon")
    parser.add_argument("--init-from", help="an exported model folder to start the VAE and U-Net stages from")
    parser.add_argument("--unet-warmup", type=int, default=500)
    parser.add_argument("--high-noise-fraction", type=float, default=0.0,
                        help="share of each batch whose timesteps are drawn from the noisier half")
    parser.add_argument("--workers", type=int, default=1,
                        help="processes that draw and encode the latent data set (one thread each)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.makedirs(args.work, exist_ok=True)
    # The decoder's fine-tuning only needs the frozen encoder: it can run beside the U-Net.
    stages = ["vae", "latents", "decoder", "unet", "export"] if args.stage == "all" else [args.stage]
    run = {"vae": train_vae, "decoder": train_decoder, "latents": build_latents, "unet": train_unet, "export": export}
    for stage in stages:
        run[stage](args)


if __name__ == "__main__":
    main()
