"""Reference streams for Easel's noise generators (crates/engine/src/rng/).

    /work/pyref/bin/python scripts/make_rng_fixtures.py            # writes tests/fixtures/rng/*.json
    /work/pyref/bin/python scripts/make_rng_fixtures.py --check-torch-cuda tests/fixtures/rng/philox_torch_cuda.json

torch_cpu.json comes from real torch: torch.Generator("cpu").manual_seed(seed), then successive
torch.randn(n, generator=g) calls (float32). torch's CPU randn has two code paths for n >= 16
(an AVX2 one and a scalar one that differs in the last bit); the file records which one ran.

philox.json comes from the independent numpy implementation below (there is no GPU where this
runs). It is written from the published algorithms, not from the Rust code:
  - Philox4x32-10 (Salmon et al. 2011; curand_philox4x32_x.h), counter = (offset block, thread),
  - torch's CUDA launch layout (aten/src/ATen/native/cuda/DistributionTemplates.h:
    calc_execution_policy, distribution_elementwise_grid_stride_kernel),
  - two Box-Muller arithmetics:
      "torch_cuda": curand's _curand_box_muller in float32 (fmaf, libdevice's logf, sqrtf); its
                    __sincosf is GPU hardware (MUFU) that no CPU code reproduces bit for bit, so
                    it is modelled as sin/cos of the argument reduced the way the hardware is fed
                    (v * 1/(2 pi) rounded toward zero) and evaluated accurately;
      "a1111":      A1111's modules/rng_philox.py (float64 numpy arithmetic, then float32).
philox_torch_cuda.json (from scripts/philox_torch_reference.py on a real GPU) holds what torch
itself returns; --check-torch-cuda compares the numpy model with it.
"""

import argparse
import os
import struct
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from rng_fixture_format import (  # noqa: E402
    H100_THREADS,
    PHILOX_CASES,
    PHILOX_WIDE_CASES,
    summarize_call,
    write_fixture,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "crates", "engine", "tests", "fixtures", "rng")

F32 = np.float32
F64 = np.float64
U32 = np.uint32
U64 = np.uint64


def bits_of(values):
    return [int(b) for b in np.asarray(values, dtype=F32).view(U32)]


# ----------------------------------------------------------------------------------- torch CPU

TORCH_CPU_CASES = [
    # One size per fresh generator: the scalar path (n < 16), whole blocks of 16, and a tail.
    ("fresh_1", 0, [1]),
    ("fresh_7", 0, [7]),
    ("fresh_15", 0, [15]),
    ("fresh_16", 0, [16]),
    ("fresh_17", 0, [17]),
    ("fresh_100", 0, [100]),
    ("fresh_256", 0, [1 * 4 * 8 * 8]),
    ("fresh_1024", 0, [1024]),
    ("sd15_latent", 0, [4 * 64 * 64]),
    ("sdxl_latent", 0, [4 * 128 * 128]),
    # Successive calls of mixed sizes on one generator.
    ("mixed_sizes", 1234, [1, 7, 15, 16, 17, 100, 1024, 4 * 64 * 64, 4 * 128 * 128, 256, 3]),
    # An odd number of scalar-path values leaves a cached normal that the next scalar call uses
    # first, even after vectorised calls in between.
    ("scalar_cache", 42, [3, 1, 16, 1, 5, 17, 2, 1]),
    # Ancestral samplers draw a latent-sized tensor every step.
    ("repeated_latents", 7, [4 * 64 * 64] * 3),
    # torch keeps only the low 32 bits of the seed for MT19937.
    ("seed_0_for_wide_seeds", 0, [7, 100]),
    ("seed_2_pow_32", 2**32, [7, 100]),
    ("seed_2_pow_32_plus_5", 2**32 + 5, [20]),
    ("max_seed", 2**64 - 1, [5, 33]),
]


def torch_cpu_fixture():
    import torch

    cases = []
    for name, seed, sizes in TORCH_CPU_CASES:
        generator = torch.Generator("cpu").manual_seed(seed)
        calls = []
        for n in sizes:
            values = torch.randn(n, generator=generator, dtype=torch.float32)
            calls.append(summarize_call(bits_of(values.numpy())))
        cases.append({"name": name, "seed": seed, "calls": calls})
    capability = torch.backends.cpu.get_cpu_capability()
    source = "torch %s, CPU capability %s (%s path for n >= 16)" % (
        torch.__version__,
        capability,
        "AVX2 avx_mathfun" if capability in ("AVX2", "AVX512") else "scalar",
    )
    return source, cases


# -------------------------------------------------------------------------------- Philox (numpy)

PHILOX_M0 = U64(0xD2511F53)
PHILOX_M1 = U64(0xCD9E8D57)
PHILOX_W0 = 0x9E3779B9
PHILOX_W1 = 0xBB67AE85


def philox4x32_10(counter, key):
    """counter: four uint32 arrays; key: (k0, k1) ints. Returns the four output words."""
    c0, c1, c2, c3 = [np.asarray(c, dtype=U32).copy() for c in counter]
    k0, k1 = key
    for _ in range(10):
        p0 = c0.astype(U64) * PHILOX_M0
        p1 = c2.astype(U64) * PHILOX_M1
        hi0, lo0 = (p0 >> U64(32)).astype(U32), (p0 & U64(0xFFFFFFFF)).astype(U32)
        hi1, lo1 = (p1 >> U64(32)).astype(U32), (p1 & U64(0xFFFFFFFF)).astype(U32)
        c0, c1, c2, c3 = hi1 ^ c1 ^ U32(k0), lo1, hi0 ^ c3 ^ U32(k1), lo0
        k0 = (k0 + PHILOX_W0) & 0xFFFFFFFF
        k1 = (k1 + PHILOX_W1) & 0xFFFFFFFF
    return c0, c1, c2, c3


def fmaf(a, b, c):
    """float32 fused multiply-add, exactly rounded: the product is exact in float64, the sum is
    made exact with TwoSum and rounded to odd, so the final rounding to float32 is correct."""
    a, b, c = (np.asarray(v, dtype=F32).astype(F64) for v in (a, b, c))
    p = a * b
    s = p + c
    bb = s - p
    err = (p - (s - bb)) + (c - bb)
    even = (s.view(U64) & U64(1)) == 0
    s = np.where((err != 0) & even, np.nextafter(s, np.where(err > 0, np.inf, -np.inf)), s)
    return s.astype(F32)


def f32_from_double_hex(h):
    return F32(struct.unpack(">d", bytes.fromhex(h))[0])


# libdevice's __nv_logf (CUDA's logf), non-FTZ variant, constants as printed by llvm-dis.
LOGF_COEFFS = [
    f32_from_double_hex(h)
    for h in [
        "BFC0AA04E0000000",
        "3FC2073EC0000000",
        "BFBF19B980000000",
        "3FC1E52AA0000000",
        "BFC55B1720000000",
        "3FC99DA160000000",
        "BFCFFFE440000000",
        "3FD5554F00000000",
    ]
]
LN2_F32 = f32_from_double_hex("3FE62E4300000000")


def cuda_logf(a):
    """Only for finite a > 0 (curand's u is in (0, 1])."""
    a = np.asarray(a, dtype=F32)
    subnormal = a < F32(2.0**-126)
    a = np.where(subnormal, a * F32(2.0**23), a)
    i = np.where(subnormal, F32(-23.0), F32(0.0))
    bits = a.view(np.int32)
    e = (bits - np.int32(0x3F2AAAAB)) & np.int32(-8388608)
    m = (bits - e).view(F32)
    i = fmaf(e.astype(F32), F32(2.0**-23), i)
    f = m - F32(1.0)
    r = fmaf(f, LOGF_COEFFS[0], LOGF_COEFFS[1])
    for coeff in LOGF_COEFFS[2:]:
        r = fmaf(r, f, coeff)
    r = fmaf(r, f, F32(-0.5))
    r = r * f
    r = fmaf(r, f, f)
    return fmaf(i, LN2_F32, r)


CURAND_2POW32_INV = F32(2.3283064e-10)
CURAND_2POW32_INV_2PI = F32(CURAND_2POW32_INV * F32(6.2831855))
INV_2PI_F32 = F32(0.15915493667125701904)


def mul_toward_zero(a, b):
    exact = np.asarray(a, dtype=F32).astype(F64) * F64(b)
    nearest = exact.astype(F32)
    too_far = np.abs(nearest.astype(F64)) > np.abs(exact)
    return np.where(too_far, np.nextafter(nearest, F32(0.0)), nearest)


def box_muller_torch_cuda(x, y):
    """curand's _curand_box_muller for uint32 arrays x, y -> (s*sin v, s*cos v) float32."""
    u = fmaf(x.astype(F32), CURAND_2POW32_INV, CURAND_2POW32_INV / F32(2))
    v = fmaf(y.astype(F32), CURAND_2POW32_INV_2PI, CURAND_2POW32_INV_2PI / F32(2))
    s = np.sqrt(F32(-2.0) * cuda_logf(u))
    turns = mul_toward_zero(v, INV_2PI_F32).astype(F64)
    sin = np.sin(2.0 * np.pi * turns).astype(F32)
    cos = np.cos(2.0 * np.pi * turns).astype(F32)
    return s * sin, s * cos


def box_muller_a1111(x, y):
    """modules/rng_philox.py: numpy float64 arithmetic with float32 constants, then float32."""
    two_pow32_inv = np.array([2.3283064e-10], dtype=F32)
    two_pow32_inv_2pi = np.array([2.3283064e-10 * 6.2831855], dtype=F32)
    u = x * two_pow32_inv + two_pow32_inv / 2
    v = y * two_pow32_inv_2pi + two_pow32_inv_2pi / 2
    s = np.sqrt(-2.0 * np.log(u))
    return (s * np.sin(v)).astype(F32), (s * np.cos(v)).astype(F32)


class PhiloxReference:
    """torch.randn(n, device="cuda", generator=torch.Generator("cuda").manual_seed(seed)).

    threads: the GPU's resident thread count; None means at least n (A1111's layout)."""

    def __init__(self, seed, box_muller, threads=None):
        self.key = (seed & 0xFFFFFFFF, seed >> 32)
        self.offset_blocks = 0
        self.box_muller = box_muller
        self.threads = threads

    def randn(self, n):
        if n == 0:
            return np.zeros(0, dtype=F32)
        stride = n if self.threads is None or n <= self.threads else self.threads
        element = np.arange(n, dtype=U64)
        thread = element % U64(stride)
        pass_index = element // U64(stride)  # which of the thread's outputs this element is
        block = U64(self.offset_blocks) + pass_index // U64(4)
        lane = (pass_index % U64(4)).astype(np.int64)
        counter = (
            (block & U64(0xFFFFFFFF)).astype(U32),
            (block >> U64(32)).astype(U32),
            (thread & U64(0xFFFFFFFF)).astype(U32),
            (thread >> U64(32)).astype(U32),
        )
        w0, w1, w2, w3 = philox4x32_10(counter, self.key)
        sin01, cos01 = self.box_muller(w0, w1)
        sin23, cos23 = self.box_muller(w2, w3)
        lanes = np.stack([sin01, cos01, sin23, cos23])
        values = lanes[lane, np.arange(n)]
        self.offset_blocks += (n - 1) // (4 * stride) + 1
        return values.astype(F32)


BOX_MULLERS = {"torch_cuda": box_muller_torch_cuda, "a1111": box_muller_a1111}


def philox_case(name, seed, sizes, box_muller, threads):
    generator = PhiloxReference(seed, BOX_MULLERS[box_muller], threads)
    calls = [summarize_call(bits_of(generator.randn(n))) for n in sizes]
    return {"name": name, "seed": seed, "box_muller": box_muller, "threads": threads, "calls": calls}


def philox_fixture():
    cases = []
    for box_muller in ("torch_cuda", "a1111"):
        for name, seed, sizes in PHILOX_CASES:
            cases.append(philox_case(name, seed, sizes, box_muller, None))
    for name, seed, sizes in PHILOX_WIDE_CASES:
        # H100 (132 SMs x 2048 threads) to line up with philox_torch_cuda.json, and a small GPU
        # (RTX 3060: 28 SMs x 1536 threads) where an SDXL latent already spills.
        cases.append(philox_case(name + "_h100", seed, sizes, "torch_cuda", H100_THREADS))
        cases.append(philox_case(name + "_rtx3060", seed, [65536, 64], "torch_cuda", 28 * 1536))
    source = "numpy reference in scripts/make_rng_fixtures.py (numpy %s)" % np.__version__
    return source, cases


# ------------------------------------------------------------------- comparison with real torch


def call_samples(call):
    """(index, bits) pairs the fixture holds for one call."""
    if "values" in call:
        return list(enumerate(call["values"]))
    n, stride = call["n"], call["stride"]
    pairs = list(enumerate(call["head"]))
    pairs += [(n - len(call["tail"]) + i, b) for i, b in enumerate(call["tail"])]
    pairs += [(i * stride, b) for i, b in enumerate(call["strided"])]
    return pairs


def check_torch_cuda(path):
    import json

    with open(path) as f:
        torch_fixture = json.load(f)
    print("torch:", torch_fixture["source"])
    worst = 0.0
    exact = total = 0
    for case in torch_fixture["cases"]:
        generator = PhiloxReference(case["seed"], box_muller_torch_cuda, case["threads"])
        for call in case["calls"]:
            mine = generator.randn(call["n"])
            for index, bits in call_samples(call):
                theirs = np.array([bits], dtype=U32).view(F32)[0]
                worst = max(worst, abs(float(theirs) - float(mine[index])))
                exact += int(mine[index].view(U32)) == bits
                total += 1
    print("compared %d values: %.1f%% bit-identical, max |difference| %.3g" % (total, 100.0 * exact / total, worst))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--check-torch-cuda", metavar="JSON")
    args = parser.parse_args()
    if args.check_torch_cuda:
        check_torch_cuda(args.check_torch_cuda)
        return
    os.makedirs(FIXTURES, exist_ok=True)
    source, cases = torch_cpu_fixture()
    write_fixture(os.path.join(FIXTURES, "torch_cpu.json"), "torch_cpu", source, cases)
    source, cases = philox_fixture()
    write_fixture(os.path.join(FIXTURES, "philox.json"), "philox", source, cases)
    print("wrote", FIXTURES)


if __name__ == "__main__":
    main()
