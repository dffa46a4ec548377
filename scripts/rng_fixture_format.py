"""The fixture format shared by make_rng_fixtures.py and philox_torch_reference.py.

Pure Python (no numpy): philox_torch_reference.py must run on a GPU machine that may only
have torch.

A fixture file is JSON:

    {"generator": "...", "source": "...", "cases": [case, ...]}
    case = {"name": str, "seed": int, "calls": [call, ...], ...extra keys per generator}
    call = {"n": int, "fnv1a64": "16 hex digits", "sum": float, and either
            "values": [bits, ...]                       (n <= FULL_LIMIT: every value) or
            "head": [bits x 64], "tail": [bits x 64],
            "stride": int, "strided": [bits of values[0], values[stride], ...]}

Each call is one successive `randn(n)` on the same generator. `bits` are the float32 bit
patterns as unsigned 32-bit integers, so comparisons are exact. `fnv1a64` is FNV-1a (64-bit)
run over the 32-bit words (word-wise, not byte-wise) and covers every value; `sum` is only for
people reading the file.
"""

import json
import struct

FULL_LIMIT = 1024
EDGE = 64
STRIDED_SAMPLES = 256

FNV_OFFSET = 0xCBF29CE484222325
FNV_PRIME = 0x100000001B3
MASK64 = (1 << 64) - 1


def fnv1a64(bits):
    h = FNV_OFFSET
    for word in bits:
        h ^= word
        h = (h * FNV_PRIME) & MASK64
    return "%016x" % h


def bits_to_float(word):
    return struct.unpack("<f", struct.pack("<I", word))[0]


def summarize_call(bits):
    """bits: list of float32 bit patterns (ints in [0, 2^32)) of one randn(n) call."""
    n = len(bits)
    call = {
        "n": n,
        "fnv1a64": fnv1a64(bits),
        "sum": sum(bits_to_float(b) for b in bits),
    }
    if n <= FULL_LIMIT:
        call["values"] = list(bits)
    else:
        stride = max(1, n // STRIDED_SAMPLES)
        call["head"] = list(bits[:EDGE])
        call["tail"] = list(bits[-EDGE:])
        call["stride"] = stride
        call["strided"] = list(bits[::stride])
    return call


def write_fixture(path, generator, source, cases):
    with open(path, "w") as f:
        json.dump({"generator": generator, "source": source, "cases": cases}, f, separators=(",", ":"))
        f.write("\n")


# Successive randn(n) calls per case, shared by the numpy reference and the torch CUDA script so
# their fixtures line up case by case.
PHILOX_CASES = [
    # A1111's rng_philox.py docstring example: Generator(seed=0).randn((3, 4)).
    ("a1111_docstring", 0, [12]),
    # The offset must advance by one Philox block per call whatever the size.
    ("mixed_sizes", 0, [1, 7, 15, 16, 17, 100, 1024, 256, 16384, 65536, 5]),
    ("sd15_latent", 1234567890, [4 * 64 * 64]),
    ("sdxl_latent", 42, [4 * 128 * 128]),
    # Seeds wider than 32 bits: the high word is the second key word.
    ("high_seed_bits", 2**32 + 5, [100, 16]),
    ("max_seed", 2**64 - 1, [33]),
]

# More elements than a GPU has resident threads: torch's grid-stride loop then hands a thread
# several elements (curand_normal4's y/z/w lanes and further Philox blocks), so the result depends
# on the GPU's thread count (SMs x max threads per SM).
PHILOX_WIDE_CASES = [
    ("beyond_gpu_threads", 7, [300000, 1100000, 64]),
]
H100_THREADS = 132 * 2048
