#!/usr/bin/env python3
"""PSNR (dB) between two images of the same size, over all RGB channels (peak 255).

    python scripts/psnr.py A.png B.png
Prints e.g. "PSNR 41.23 dB (max abs diff 7, mean abs diff 0.412)"; "inf" for identical images.
"""

import math
import sys

import numpy as np
from PIL import Image


def load(path):
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.float64)


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    a, b = load(sys.argv[1]), load(sys.argv[2])
    if a.shape != b.shape:
        sys.exit(f"size mismatch: {a.shape} vs {b.shape}")
    d = a - b
    mse = float(np.mean(d * d))
    psnr = math.inf if mse == 0 else 10.0 * math.log10(255.0**2 / mse)
    print(f"PSNR {psnr:.2f} dB (max abs diff {int(np.abs(d).max())}, mean abs diff {np.abs(d).mean():.3f})")


if __name__ == "__main__":
    main()
