#!/usr/bin/env python3
"""Copies a diffusers model folder with every weight file in float16, under the plain file names
(as a model saved with `torch_dtype=torch.float16` has them), for benchmarking f16 checkpoints:

    python scripts/to_fp16.py /tmp/sd15-random /tmp/sd15-random-fp16

Both Easel and diffusers (`from_pretrained(..., torch_dtype=torch.float32)`) load the result as
is. Versions: scripts/requirements-reference.txt.
"""
import os
import shutil
import sys

from safetensors.torch import load_file, save_file


def main(src: str, dst: str) -> None:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors"), dirs_exist_ok=True)
    for root, _, files in os.walk(src):
        for name in files:
            if name.endswith(".safetensors"):
                tensors = load_file(os.path.join(root, name))
                half = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in tensors.items()}
                out = os.path.join(dst, os.path.relpath(root, src), name)
                save_file(half, out, metadata={"format": "pt"})
                print(out, flush=True)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2])
