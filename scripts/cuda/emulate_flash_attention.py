#!/usr/bin/env python3
"""Runs the index arithmetic of `flash_attention` in crates/engine/src/kernels/cuda/easel.cu on
the CPU, lane by lane, with mma.sync.m16n8k16 emulated from the PTX ISA's fragment layouts, and
compares the result with softmax(q·kᵀ·scale)·v. It checks the kernel's fragment bookkeeping,
masking and online softmax where no GPU is available; it cannot check the hardware itself.

    python3 scripts/cuda/emulate_flash_attention.py      (numpy only)
"""
import numpy as np

WARPS, KEYS = 4, 64


def mma(c, a, b):
    """c (32 lanes × 4 f32) += A(16×16) · B(16×8) with A given as 32 lanes × 4 regs × 2 halves
    and B as 32 lanes × 2 regs × 2 halves, in the PTX ISA's m16n8k16 layouts."""
    A = np.zeros((16, 16), np.float32)
    B = np.zeros((16, 8), np.float32)
    for lane in range(32):
        g, t = lane // 4, lane % 4
        for r in range(4):
            row, k = g + 8 * (r % 2), 2 * t + 8 * (r // 2)
            A[row, k], A[row, k + 1] = a[lane][r]
        for r in range(2):
            k = 2 * t + 8 * r
            B[k, g], B[k + 1, g] = b[lane][r]
    D = A @ B
    for lane in range(32):
        g, t = lane // 4, lane % 4
        for r in range(4):
            c[lane][r] += D[g + 8 * (r // 2), 2 * t + r % 2]


def pair(m, rows, cols, row, col):
    if row >= rows or col >= cols:
        return (0.0, 0.0)
    return (float(m[row, col]), float(m[row, col + 1]))


def flash_attention(q, k, v, scale):
    nq, d = q.shape
    nk = k.shape[0]
    DP = (d + 15) // 16 * 16
    out = np.zeros((nq, d), np.float32)
    scale_log2 = scale * 1.4426950408889634
    for block in range((nq + WARPS * 16 - 1) // (WARPS * 16)):
        for warp in range(WARPS):
            lanes = range(32)
            row0 = [block * WARPS * 16 + warp * 16 + l // 4 for l in lanes]
            qa = [[[pair(q, nq, d, row0[l] + 8 * (r % 2), ks * 16 + (l % 4) * 2 + 8 * (r // 2)) for r in range(4)]
                   for ks in range(DP // 16)] for l in lanes]
            acc = [[[0.0] * 4 for _ in range(DP // 8)] for _ in lanes]
            mx = [[-np.inf, -np.inf] for _ in lanes]
            sm = [[0.0, 0.0] for _ in lanes]
            for key0 in range(0, nk, KEYS):
                ktile = np.zeros((KEYS, DP), np.float16)
                vt = np.zeros((DP, KEYS), np.float16)
                for r in range(KEYS):
                    for c in range(0, DP, 2):
                        ktile[r, c:c + 2] = pair(k, nk, d, key0 + r, c)
                        vt[c, r], vt[c + 1, r] = pair(v, nk, d, key0 + r, c)
                s = [[[0.0] * 4 for _ in range(KEYS // 8)] for _ in lanes]
                for j in range(KEYS // 8):
                    for ks in range(DP // 16):
                        b = [[(ktile[j * 8 + l // 4, ks * 16 + (l % 4) * 2 + 8 * r], ktile[j * 8 + l // 4, ks * 16 + (l % 4) * 2 + 8 * r + 1]) for r in range(2)] for l in lanes]
                        cj = [s[l][j] for l in lanes]
                        mma(cj, [qa[l][ks] for l in lanes], b)
                tile_max = [[-np.inf, -np.inf] for _ in lanes]
                for l in lanes:
                    t = l % 4
                    for j in range(KEYS // 8):
                        for e in range(4):
                            key = key0 + j * 8 + t * 2 + (e & 1)
                            s[l][j][e] = s[l][j][e] * scale_log2 if key < nk else -np.inf
                        tile_max[l][0] = max(tile_max[l][0], s[l][j][0], s[l][j][1])
                        tile_max[l][1] = max(tile_max[l][1], s[l][j][2], s[l][j][3])
                for o in (1, 2):  # __shfl_xor_sync
                    tile_max = [[max(tile_max[l][h], tile_max[l ^ o][h]) for h in range(2)] for l in lanes]
                for l in lanes:
                    new = [max(mx[l][h], tile_max[l][h]) for h in range(2)]
                    alpha = [np.exp2(mx[l][h] - new[h]) for h in range(2)]
                    mx[l] = new
                    sm[l] = [sm[l][h] * alpha[h] for h in range(2)]
                    for n in range(DP // 8):
                        for e in range(4):
                            acc[l][n][e] *= alpha[e // 2]
                for kk in range(KEYS // 16):
                    pa = []
                    for l in lanes:
                        p = [[np.exp2(s[l][2 * kk + h][e] - mx[l][e // 2]) for e in range(4)] for h in range(2)]
                        for h in range(2):
                            sm[l][0] += p[h][0] + p[h][1]
                            sm[l][1] += p[h][2] + p[h][3]
                        p16 = [[float(np.float16(x)) for x in ph] for ph in p]
                        pa.append([(p16[0][0], p16[0][1]), (p16[0][2], p16[0][3]), (p16[1][0], p16[1][1]), (p16[1][2], p16[1][3])])
                    for n in range(DP // 8):
                        b = [[(vt[n * 8 + l // 4, kk * 16 + (l % 4) * 2 + 8 * r], vt[n * 8 + l // 4, kk * 16 + (l % 4) * 2 + 8 * r + 1]) for r in range(2)] for l in lanes]
                        mma([acc[l][n] for l in lanes], pa, b)
            for o in (1, 2):
                sm = [[sm[l][h] + sm[l ^ o][h] for h in range(2)] for l in lanes]
            for l in lanes:
                t = l % 4
                for n in range(DP // 8):
                    col = n * 8 + t * 2
                    if col >= d:
                        continue
                    for h, row in enumerate((row0[l], row0[l] + 8)):
                        if row < nq:
                            out[row, col] = acc[l][n][2 * h] / sm[l][h]
                            out[row, col + 1] = acc[l][n][2 * h + 1] / sm[l][h]
    return out


def main():
    rng = np.random.default_rng(0)
    for nq, nk, d in [(20, 77, 40), (70, 130, 64), (9, 5, 80)]:
        q, k, v = (rng.uniform(-2, 2, (n, d)).astype(np.float16) for n in (nq, nk, nk))
        scale = 1 / np.sqrt(d)
        s = q.astype(np.float32) @ k.astype(np.float32).T * scale
        p = np.exp(s - s.max(1, keepdims=True))
        ref = (p / p.sum(1, keepdims=True)) @ v.astype(np.float32)
        got = flash_attention(q, k, v, scale)
        err = np.abs(got - ref).max()
        print(f"nq {nq} nk {nk} d {d}: max |emulated - reference| = {err:.2e}")
        assert err < 4e-3, err
    print("ok")


if __name__ == "__main__":
    main()
