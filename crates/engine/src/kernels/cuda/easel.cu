// Easel's CUDA kernels: what candle composes from many generic kernels (group norm, GEGLU) or
// materialises in full (attention scores), fused into one pass each. Compiled to PTX by
// build.rs with the `cuda` feature and loaded through candle's custom-kernel cache.
#include <cuda_fp16.h>
#include <stdint.h>

__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
template <typename T> __device__ __forceinline__ T from_f(float v);
template <> __device__ __forceinline__ float from_f<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_f<__half>(float v) { return __float2half(v); }

// ---- Group norm -----------------------------------------------------------------------------
// Pass 1: per (batch, group) sum and sum of squares, in f64 (so E[x²] − E[x]² does not cancel),
// accumulated from many blocks per group: a VAE group at 512×512 holds a million values, and
// one block per group would leave most of the GPU idle. `stats` is zeroed by the caller.
template <typename T>
__device__ void group_norm_stats(const T* x, double* stats, int group_elems, int chunk) {
  const int bg = blockIdx.y;
  const T* xg = x + (size_t)bg * group_elems;
  const int start = blockIdx.x * chunk;
  const int end = min(start + chunk, group_elems);
  float s = 0.f, ss = 0.f;
  for (int i = start + threadIdx.x; i < end; i += blockDim.x) {
    const float v = to_f(xg[i]);
    s += v;
    ss += v * v;
  }
  double ds = s, dss = ss;
  for (int o = 16; o > 0; o >>= 1) {
    ds += __shfl_xor_sync(0xffffffffu, ds, o);
    dss += __shfl_xor_sync(0xffffffffu, dss, o);
  }
  __shared__ double partial[2][32];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) {
    partial[0][warp] = ds;
    partial[1][warp] = dss;
  }
  __syncthreads();
  if (warp == 0) {
    const int warps = blockDim.x / 32;
    ds = lane < warps ? partial[0][lane] : 0.0;
    dss = lane < warps ? partial[1][lane] : 0.0;
    for (int o = 16; o > 0; o >>= 1) {
      ds += __shfl_xor_sync(0xffffffffu, ds, o);
      dss += __shfl_xor_sync(0xffffffffu, dss, o);
    }
    if (lane == 0) {
      atomicAdd(&stats[2 * bg], ds);
      atomicAdd(&stats[2 * bg + 1], dss);
    }
  }
}

// Pass 2: normalise, scale and shift, optionally SiLU. Grid: y over the (batch, channel) rows,
// x over each row's spatial positions.
template <typename T>
__device__ void group_norm_apply(const T* x, const double* stats, const T* weight, const T* bias, T* y,
                                 int channels, int groups, int hw, int rows, float eps, int silu) {
  const int per_group = channels / groups;
  const double count = (double)per_group * hw;
  for (int row = blockIdx.y; row < rows; row += gridDim.y) {
    const int c = row % channels;
    const int bg = (row / channels) * groups + c / per_group;
    const double mean = stats[2 * bg] / count;
    const double var = fmax(stats[2 * bg + 1] / count - mean * mean, 0.0);
    const float rstd = rsqrtf((float)var + eps);
    const float scale = rstd * to_f(weight[c]);
    const float shift = to_f(bias[c]) - (float)mean * scale;
    const T* xr = x + (size_t)row * hw;
    T* yr = y + (size_t)row * hw;
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < hw; i += gridDim.x * blockDim.x) {
      float v = to_f(xr[i]) * scale + shift;
      if (silu) v = v / (1.f + __expf(-v));
      yr[i] = from_f<T>(v);
    }
  }
}

// ---- GEGLU ----------------------------------------------------------------------------------
// y[r, j] = x[r, j] · gelu_erf(x[r, inner + j]) for x: (rows, 2·inner), y: (rows, inner).
template <typename T>
__device__ void geglu(const T* x, T* y, int rows, int inner) {
  for (int r = blockIdx.y; r < rows; r += gridDim.y) {
    const T* xr = x + (size_t)r * 2 * inner;
    T* yr = y + (size_t)r * inner;
    for (int j = blockIdx.x * blockDim.x + threadIdx.x; j < inner; j += gridDim.x * blockDim.x) {
      const float a = to_f(xr[j]);
      const float g = to_f(xr[inner + j]);
      yr[j] = from_f<T>(a * 0.5f * g * (1.f + erff(g * 0.70710678118654752f)));
    }
  }
}

#define INSTANTIATE_ELEMENTWISE(T, SUFFIX)                                                           \
  extern "C" __global__ void group_norm_stats_##SUFFIX(const T* x, double* stats, int group_elems,  \
                                                        int chunk) {                                 \
    group_norm_stats<T>(x, stats, group_elems, chunk);                                               \
  }                                                                                                  \
  extern "C" __global__ void group_norm_apply_##SUFFIX(const T* x, const double* stats,             \
                                                        const T* weight, const T* bias, T* y,        \
                                                        int channels, int groups, int hw, int rows,  \
                                                        float eps, int silu) {                       \
    group_norm_apply<T>(x, stats, weight, bias, y, channels, groups, hw, rows, eps, silu);           \
  }                                                                                                  \
  extern "C" __global__ void geglu_##SUFFIX(const T* x, T* y, int rows, int inner) {                \
    geglu<T>(x, y, rows, inner);                                                                     \
  }

INSTANTIATE_ELEMENTWISE(float, f32)
INSTANTIATE_ELEMENTWISE(__half, f16)

// ---- Flash attention (f16, f32 accumulation) -------------------------------------------------
// softmax(q·kᵀ·scale)·v without the score matrix: each warp owns 16 query rows and walks the
// keys 64 at a time with an online softmax (running max and sum per row), in registers, on the
// tensor cores through mma.sync.m16n8k16 — the fragment layouts are the PTX ISA's, which lets
// the score accumulators be reused as the A operand of P·V without a trip through memory.
// q: (BH, Nq, d), k, v: (BH, Nk, d), o: (BH, Nq, d), contiguous; d even, DP = d rounded up to 16.
#define FA_WARPS 4
#define FA_ROWS (16 * FA_WARPS)
#define FA_KEYS 64

__device__ __forceinline__ void mma_16816(float* c, const uint32_t* a, uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ uint32_t pack_half2(float lo, float hi) {
  __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&h);
}

// Two consecutive halves of row `row`, columns `col`, `col + 1` (zero outside the matrix).
__device__ __forceinline__ uint32_t load_pair(const __half* m, int rows, int cols, int row, int col) {
  if (row >= rows || col >= cols) return 0u;
  return *reinterpret_cast<const uint32_t*>(m + (size_t)row * cols + col);
}

template <int DP>
__device__ void flash_attention(const __half* q, const __half* k, const __half* v, __half* o, int nq, int nk,
                                int d, float scale) {
  constexpr int KS = DP + 8;       // row stride of the key tile in shared memory (halves)
  constexpr int VS = FA_KEYS + 8;  // row stride of the transposed value tile
  __shared__ __align__(16) __half k_tile[FA_KEYS * KS];
  __shared__ __align__(16) __half vt_tile[DP * VS];

  const int bh = blockIdx.y;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int group = lane / 4, tig = lane % 4;
  const __half* qb = q + (size_t)bh * nq * d;
  const __half* kb = k + (size_t)bh * nk * d;
  const __half* vb = v + (size_t)bh * nk * d;
  const int row0 = blockIdx.x * FA_ROWS + warp * 16 + group;  // this thread's rows: row0, row0 + 8
  const float scale_log2 = scale * 1.4426950408889634f;

  uint32_t qa[DP / 16][4];
#pragma unroll
  for (int ks = 0; ks < DP / 16; ++ks) {
    const int col = ks * 16 + tig * 2;
    qa[ks][0] = load_pair(qb, nq, d, row0, col);
    qa[ks][1] = load_pair(qb, nq, d, row0 + 8, col);
    qa[ks][2] = load_pair(qb, nq, d, row0, col + 8);
    qa[ks][3] = load_pair(qb, nq, d, row0 + 8, col + 8);
  }
  float acc[DP / 8][4];
#pragma unroll
  for (int n = 0; n < DP / 8; ++n) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.f;
  float max0 = -INFINITY, max1 = -INFINITY, sum0 = 0.f, sum1 = 0.f;

  for (int key0 = 0; key0 < nk; key0 += FA_KEYS) {
    __syncthreads();  // the previous tile is no longer read
    for (int i = threadIdx.x; i < FA_KEYS * (DP / 2); i += blockDim.x) {
      const int r = i / (DP / 2), c = (i % (DP / 2)) * 2;
      const uint32_t kp = load_pair(kb, nk, d, key0 + r, c);
      const uint32_t vp = load_pair(vb, nk, d, key0 + r, c);
      *reinterpret_cast<uint32_t*>(&k_tile[r * KS + c]) = kp;
      const __half2 vh = *reinterpret_cast<const __half2*>(&vp);
      vt_tile[c * VS + r] = __low2half(vh);
      vt_tile[(c + 1) * VS + r] = __high2half(vh);
    }
    __syncthreads();

    float s[FA_KEYS / 8][4];
#pragma unroll
    for (int j = 0; j < FA_KEYS / 8; ++j) {
      s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
      const __half* krow = &k_tile[(j * 8 + group) * KS + tig * 2];
#pragma unroll
      for (int ks = 0; ks < DP / 16; ++ks) {
        const uint32_t b0 = *reinterpret_cast<const uint32_t*>(krow + ks * 16);
        const uint32_t b1 = *reinterpret_cast<const uint32_t*>(krow + ks * 16 + 8);
        mma_16816(s[j], qa[ks], b0, b1);
      }
    }
    // Scale into the log2 domain, mask keys past the end, and take each row's tile maximum.
    float tile_max0 = -INFINITY, tile_max1 = -INFINITY;
#pragma unroll
    for (int j = 0; j < FA_KEYS / 8; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int key = key0 + j * 8 + tig * 2 + (e & 1);
        s[j][e] = key < nk ? s[j][e] * scale_log2 : -INFINITY;
      }
      tile_max0 = fmaxf(tile_max0, fmaxf(s[j][0], s[j][1]));
      tile_max1 = fmaxf(tile_max1, fmaxf(s[j][2], s[j][3]));
    }
#pragma unroll
    for (int o = 1; o <= 2; o <<= 1) {
      tile_max0 = fmaxf(tile_max0, __shfl_xor_sync(0xffffffffu, tile_max0, o));
      tile_max1 = fmaxf(tile_max1, __shfl_xor_sync(0xffffffffu, tile_max1, o));
    }
    const float new_max0 = fmaxf(max0, tile_max0), new_max1 = fmaxf(max1, tile_max1);
    const float alpha0 = exp2f(max0 - new_max0), alpha1 = exp2f(max1 - new_max1);
    max0 = new_max0;
    max1 = new_max1;
    sum0 *= alpha0;
    sum1 *= alpha1;
#pragma unroll
    for (int n = 0; n < DP / 8; ++n) {
      acc[n][0] *= alpha0;
      acc[n][1] *= alpha0;
      acc[n][2] *= alpha1;
      acc[n][3] *= alpha1;
    }
    // Probabilities, packed as the A operand of P·V (16 keys per k-step = two score tiles).
#pragma unroll
    for (int kk = 0; kk < FA_KEYS / 16; ++kk) {
      float p[2][4];
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        p[h][0] = exp2f(s[2 * kk + h][0] - max0);
        p[h][1] = exp2f(s[2 * kk + h][1] - max0);
        p[h][2] = exp2f(s[2 * kk + h][2] - max1);
        p[h][3] = exp2f(s[2 * kk + h][3] - max1);
        sum0 += p[h][0] + p[h][1];
        sum1 += p[h][2] + p[h][3];
      }
      const uint32_t pa[4] = {pack_half2(p[0][0], p[0][1]), pack_half2(p[0][2], p[0][3]),
                              pack_half2(p[1][0], p[1][1]), pack_half2(p[1][2], p[1][3])};
#pragma unroll
      for (int n = 0; n < DP / 8; ++n) {
        const __half* vrow = &vt_tile[(n * 8 + group) * VS + kk * 16 + tig * 2];
        const uint32_t b0 = *reinterpret_cast<const uint32_t*>(vrow);
        const uint32_t b1 = *reinterpret_cast<const uint32_t*>(vrow + 8);
        mma_16816(acc[n], pa, b0, b1);
      }
    }
  }
  // Each row's sum is spread over the 4 threads that hold it.
#pragma unroll
  for (int o = 1; o <= 2; o <<= 1) {
    sum0 += __shfl_xor_sync(0xffffffffu, sum0, o);
    sum1 += __shfl_xor_sync(0xffffffffu, sum1, o);
  }
  const float inv0 = 1.f / sum0, inv1 = 1.f / sum1;
  __half* ob = o + (size_t)bh * nq * d;
#pragma unroll
  for (int n = 0; n < DP / 8; ++n) {
    const int col = n * 8 + tig * 2;
    if (col >= d) continue;
    if (row0 < nq)
      *reinterpret_cast<uint32_t*>(ob + (size_t)row0 * d + col) = pack_half2(acc[n][0] * inv0, acc[n][1] * inv0);
    if (row0 + 8 < nq)
      *reinterpret_cast<uint32_t*>(ob + (size_t)(row0 + 8) * d + col) =
          pack_half2(acc[n][2] * inv1, acc[n][3] * inv1);
  }
}

#define INSTANTIATE_FLASH(DP)                                                                      \
  extern "C" __global__ void __launch_bounds__(32 * FA_WARPS)                                      \
      flash_attention_f16_d##DP(const __half* q, const __half* k, const __half* v, __half* o, int nq, \
                                int nk, int d, float scale) {                                      \
    flash_attention<DP>(q, k, v, o, nq, nk, d, scale);                                             \
  }

INSTANTIATE_FLASH(32)
INSTANTIATE_FLASH(48)
INSTANTIATE_FLASH(64)
INSTANTIATE_FLASH(80)
INSTANTIATE_FLASH(96)
INSTANTIATE_FLASH(128)
INSTANTIATE_FLASH(160)
