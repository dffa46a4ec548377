"""torch.randn on a CUDA device, written in the fixture format of tests/fixtures/rng/philox.json.

Run on a machine with an NVIDIA GPU (needs only torch):

    python scripts/philox_torch_reference.py tests/fixtures/rng/philox_torch_cuda.json

Every case in rng_fixture_format.PHILOX_CASES and PHILOX_WIDE_CASES is run with
torch.Generator("cuda").manual_seed(seed) and successive torch.randn(n, generator=g,
device="cuda", dtype=torch.float32) calls. The file records the GPU's resident thread count
(multiProcessorCount x (maxThreadsPerMultiProcessor // 256 x 256)), which decides how torch lays
tensors larger than that onto Philox subsequences.
"""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from rng_fixture_format import PHILOX_CASES, PHILOX_WIDE_CASES, summarize_call, write_fixture  # noqa: E402

BLOCK_SIZE = 256  # block_size_bound in aten/src/ATen/native/cuda/DistributionTemplates.h


def gpu_threads():
    props = torch.cuda.get_device_properties(0)
    blocks_per_sm = props.max_threads_per_multi_processor // BLOCK_SIZE
    return props.multi_processor_count * blocks_per_sm * BLOCK_SIZE


def run_case(name, seed, sizes, threads):
    generator = torch.Generator("cuda").manual_seed(seed)
    calls = []
    for n in sizes:
        values = torch.randn(n, generator=generator, device="cuda", dtype=torch.float32)
        bits = [b & 0xFFFFFFFF for b in values.cpu().view(torch.int32).tolist()]
        calls.append(summarize_call(bits))
    return {"name": name, "seed": seed, "box_muller": "torch_cuda", "threads": threads, "calls": calls}


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else "philox_torch_cuda.json"
    threads = gpu_threads()
    cases = [run_case(name, seed, sizes, threads) for name, seed, sizes in PHILOX_CASES + PHILOX_WIDE_CASES]
    source = "torch %s, %s, CUDA %s" % (torch.__version__, torch.cuda.get_device_name(0), torch.version.cuda)
    write_fixture(out, "philox", source, cases)
    print("wrote", out, "threads", threads, source)


if __name__ == "__main__":
    main()
