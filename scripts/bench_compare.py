#!/usr/bin/env python3
"""Easel and diffusers side by side on the same model, machine and thread count.

Runs `easel bench` and the same measurements in diffusers (each in its own process, so each
peak-memory figure is its own), then prints both with the ratio Easel / diffusers.

    python scripts/bench_compare.py --model /path/to/sd15-random --width 512 --height 512

The model is a diffusers folder; for CPU numbers use the full-size random-weight SD 1.5 made by
`scripts/make_random_model.py --family sd15`. Versions: scripts/requirements-reference.txt.
What is timed, in both: text encoding of prompt + negative prompt; one U-Net call at t=500 on a
batch of 2 (classifier-free guidance) and of 1; one VAE decode; one whole generation
(`--steps` Euler steps, CFG 7, decode included). Medians of `--runs` after warm-up runs.
Peak memory is the process's peak resident set (ru_maxrss / VmHWM) after all of that; both map
the weights from the files, so it counts their pages. "Private memory" is the peak of the rest
(RssAnon, sampled every 10 ms): the memory each program allocates itself.

On a shared machine whose speed drifts by 10–20% over minutes, one Easel run and one diffusers
run a few minutes apart give a ratio about that uncertain. `--rounds N` runs the pair N times,
alternating which goes first, and reports each round's ratio and their median (paired ratios:
each compares two runs made back to back).
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROMPT, NEGATIVE = "a photograph of an astronaut riding a horse", "blurry, low quality"


class PrivateMemorySampler:
    """Peak RssAnon of this process, sampled every 10 ms on a thread (Linux)."""

    def __init__(self):
        import threading
        self.peak = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    @staticmethod
    def rss_anon():
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("RssAnon:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        return 0

    def _run(self):
        while not self.stop.is_set():
            self.peak = max(self.peak, self.rss_anon())
            self.stop.wait(0.01)

    def finish(self):
        self.stop.set()
        self.thread.join()
        return max(self.peak, self.rss_anon()) or None


def diffusers_bench(a):
    import torch
    from diffusers import DiffusionPipeline, EulerDiscreteScheduler
    from diffusers.utils import logging as dlog

    dlog.set_verbosity_error()
    torch.set_num_threads(a.threads)
    dev = torch.device(a.device)
    dtype = getattr(torch, a.dtype)
    cuda = dev.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    start = time.perf_counter()
    private = PrivateMemorySampler()
    pipe = DiffusionPipeline.from_pretrained(a.model, torch_dtype=dtype)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    pipe.to(dev)
    sync()
    load_s = time.perf_counter() - start
    sdxl = hasattr(pipe, "text_encoder_2") and pipe.text_encoder_2 is not None

    def timed(f, runs=a.runs, warm=1):
        for _ in range(warm):
            f()
        sync()
        times = []
        for _ in range(runs):
            s = time.perf_counter()
            f()
            sync()
            times.append(time.perf_counter() - s)
        return statistics.median(times)

    with torch.inference_mode():
        def encode():
            return pipe.encode_prompt(PROMPT, device=dev, num_images_per_prompt=1,
                                      do_classifier_free_guidance=True, negative_prompt=NEGATIVE)

        text_s = timed(encode)
        out = encode()
        h, w = a.height // 8, a.width // 8
        if sdxl:
            pe, ne, pp, npool = out
            pooled = torch.cat([npool, pp])
            time_ids = torch.tensor([[a.height, a.width, 0, 0, a.height, a.width]] * 2, device=dev, dtype=dtype)
        else:
            pe, ne = out[:2]
        context = torch.cat([ne, pe])
        t = torch.tensor(500.0, device=dev)

        def unet(batch):
            x = torch.randn(batch, 4, h, w, device=dev, dtype=dtype)
            kw = {}
            if sdxl:
                kw["added_cond_kwargs"] = {"text_embeds": pooled[2 - batch:], "time_ids": time_ids[2 - batch:]}
            return timed(lambda: pipe.unet(x, t, encoder_hidden_states=context[2 - batch:], return_dict=False, **kw))

        unet_cfg_s = unet(2)
        unet_no_cfg_s = unet(1)
        z = torch.randn(1, 4, h, w, device=dev, dtype=pipe.vae.dtype)
        vae_s = timed(lambda: pipe.vae.decode(z / pipe.vae.config.scaling_factor, return_dict=False))

        def generate():
            g = torch.Generator("cpu").manual_seed(0)
            pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=a.steps, guidance_scale=7.0,
                 height=a.height, width=a.width, generator=g, output_type="np")

        e2e_s = timed(generate, runs=1, warm=0)

    import diffusers
    return {
        "impl": f"diffusers {diffusers.__version__}, torch {torch.__version__}",
        "threads": torch.get_num_threads(),
        # ATEN_CPU_CAPABILITY / ONEDNN_MAX_CPU_ISA / MKL_ENABLE_INSTRUCTIONS limit it (docs/PERFORMANCE.md).
        "cpu_vector_isa": torch.backends.cpu.get_cpu_capability(),
        "model_load_s": load_s,
        "text_encoding_s": text_s,
        "unet_step_cfg_s": unet_cfg_s,
        "unet_step_no_cfg_s": unet_no_cfg_s,
        "vae_decode_s": vae_s,
        "end_to_end_s": e2e_s,
        "peak_memory_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "peak_private_memory_bytes": private.finish(),
    }


def easel_bench(a):
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "easel.json"
        cmd = [a.easel, "bench", "--model", a.model, "--width", str(a.width), "--height", str(a.height),
               "--steps", str(a.steps), "--runs", str(a.runs), "--device", a.device, "--json", str(out)]
        cmd += a.easel_arg
        env = dict(os.environ, RAYON_NUM_THREADS=str(a.threads))
        subprocess.run(cmd, check=True, env=env, stdout=sys.stderr)
        return json.loads(out.read_text())


ROWS = [
    ("model load", "model_load_s", "s"),
    ("text encoding", "text_encoding_s", "s"),
    ("U-Net step, CFG (batch 2)", "unet_step_cfg_s", "s"),
    ("U-Net step (batch 1)", "unet_step_no_cfg_s", "s"),
    ("VAE decode", "vae_decode_s", "s"),
    ("latent preview (per step)", "preview_s", "s"),
    ("end to end", "end_to_end_s", "s"),
    ("peak memory", "peak_memory_bytes", "GB"),
    ("private memory (RssAnon)", "peak_private_memory_bytes", "GB"),
]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--height", type=int, default=512)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=1, help="Easel/diffusers pairs, alternating which runs first")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", help="diffusers' dtype (float32 on the CPU, float16 on a GPU)")
    ap.add_argument("--easel", default="target/release/easel")
    ap.add_argument("--easel-arg", action="append", default=[], help="extra argument for `easel bench` (repeatable)")
    ap.add_argument("--json", help="write both results here")
    ap.add_argument("--only", choices=["diffusers", "easel"], help=argparse.SUPPRESS)
    a = ap.parse_args()

    if a.only == "diffusers":
        print(json.dumps(diffusers_bench(a)))
        return

    def reference():
        # diffusers in a child process so its peak memory is not Easel's and vice versa.
        child = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--only", "diffusers"],
                               check=True, capture_output=True, text=True)
        return json.loads(child.stdout.strip().splitlines()[-1])

    rounds = []
    for r in range(a.rounds):
        if r % 2 == 0:
            ref = reference()
            ours = easel_bench(a)
        else:
            ours = easel_bench(a)
            ref = reference()
        rounds.append({"easel": ours, "diffusers": ref})
        print(f"round {r + 1}/{a.rounds}: U-Net CFG {ours['unet_step_cfg_s']:.2f} vs {ref['unet_step_cfg_s']:.2f} s",
              file=sys.stderr)

    def median_of(who, key):
        values = [r[who][key] for r in rounds if r[who].get(key) is not None]
        return statistics.median(values) if values else None

    ref = rounds[0]["diffusers"]
    print(f"\n{a.width}x{a.height}, {a.steps} steps, {a.threads} threads, device {a.device}; {ref['impl']} ({a.dtype})")
    if a.device == "cpu":
        easel_isa = rounds[0]["easel"].get("cpu_vector_isa", "?")
        print(f"CPU vector instructions: Easel {easel_isa}, torch {ref.get('cpu_vector_isa', '?')}")
    many = len(rounds) > 1
    print(f"{'':28}{'Easel':>10}{'diffusers':>11}{'ratio':>8}" + ("   each round" if many else ""))
    for label, key, unit in ROWS:
        e, d = median_of("easel", key), median_of("diffusers", key)
        scale = 1e9 if unit == "GB" else 1
        fmt = lambda v: f"{v / scale:8.2f} {unit}" if v is not None else f"{'—':>10}"
        paired = [r["easel"][key] / r["diffusers"][key] for r in rounds
                  if r["easel"].get(key) is not None and r["diffusers"].get(key)]
        ratio = f"{statistics.median(paired):7.2f}×" if paired else ""
        each = "   " + " ".join(f"{p:.2f}" for p in paired) if many and paired else ""
        print(f"{label:28}{fmt(e)}{fmt(d):>11}{ratio:>8}{each}")
    if many:
        print("(times: medians over rounds; ratio: the median of the rounds' paired ratios)")
    if a.json:
        Path(a.json).write_text(json.dumps({"rounds": rounds, "args": vars(a)}, indent=2))


if __name__ == "__main__":
    main()
