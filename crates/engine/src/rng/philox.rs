//! torch's CUDA generator computed on the CPU: what
//! `torch.randn(n, generator=torch.Generator("cuda").manual_seed(seed), device="cuda")` returns
//! for successive calls.
//!
//! The pieces (all from public sources):
//! - Philox4x32-10 with key = the 64-bit seed, counter = (Philox block, subsequence)
//!   (curand_philox4x32_x.h, curand_kernel.h `curand_init`).
//! - torch's launch layout (aten/src/ATen/native/cuda/DistributionTemplates.h): element `e`
//!   belongs to thread `e % T` (its subsequence) where `T` is the number of threads launched;
//!   the thread's `k`-th `curand_normal4` call uses Philox block `offset + k` and gives four
//!   normals, handed to elements `e`, `e + T`, `e + 2T`, `e + 3T`. `T` is the element count
//!   rounded up to 256, capped at the GPU's resident threads (SMs × max threads per SM), so
//!   tensors larger than the GPU's thread count depend on the GPU. After each call the offset
//!   moves on by the number of Philox blocks a thread used (1 unless `n > 4T`).
//! - curand's Box-Muller (`_curand_box_muller`): `u = x·2⁻³² + 2⁻³³`, `v = y·2π·2⁻³² + π·2⁻³²`,
//!   `s = sqrt(−2 ln u)`, normals `s·sin v` then `s·cos v`.
//!
//! What is verified against what:
//! - Bit-exact against `scripts/make_rng_fixtures.py`'s independent numpy implementation
//!   (`tests/fixtures/rng/philox.json`), both arithmetics below, including GPU-sized layouts.
//! - Against real torch 2.11 on an H100 (`tests/fixtures/rng/philox_torch_cuda.json`, from
//!   `scripts/philox_torch_reference.py`): every value within 1.1e-6 of torch's, about a quarter
//!   of them bit-identical. The Philox stream, the layout, the offset advance and the seed
//!   handling are therefore right; the remaining difference is the GPU's `__sincosf`, a
//!   hardware approximation (MUFU.SIN/COS, absolute error up to ~2⁻²¹) that no CPU code
//!   reproduces bit for bit and that may differ between GPU generations.
//!
//! Two arithmetics for the Box-Muller step ([`PhiloxArithmetic`]):
//! - [`PhiloxArithmetic::TorchCuda`] (default): curand's float32 steps exactly (fused
//!   multiply-adds, libdevice's `logf`, `sqrtf`); sin/cos are evaluated accurately at the
//!   argument the hardware receives (`v·(1/2π)` rounded toward zero, in turns). Closest to what
//!   torch on an NVIDIA GPU gives (A1111's default "GPU" RNG there).
//! - [`PhiloxArithmetic::A1111`]: A1111's `modules/rng_philox.py` (its "NV" RNG setting) does the
//!   same in float64 numpy and rounds to float32; this reproduces it bit for bit (up to libm
//!   differences in the last bit of a double, which essentially never survive the rounding).

use super::NoiseGenerator;

/// How the Box-Muller step rounds; see the module documentation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PhiloxArithmetic {
    /// curand's float32 arithmetic (what a CUDA GPU computes, up to its sin/cos hardware).
    #[default]
    TorchCuda,
    /// A1111's numpy port (`modules/rng_philox.py`): float64, then rounded to float32.
    A1111,
}

/// Threads per block in torch's distribution kernels (`block_size_bound`).
pub const TORCH_BLOCK_SIZE: u64 = 256;

/// torch's CUDA `randn` on the CPU. See the module documentation.
#[derive(Debug, Clone)]
pub struct PhiloxGenerator {
    key: [u32; 2],
    /// The generator's offset in Philox blocks (torch counts it in 32-bit values, 4 per block).
    offset_blocks: u64,
    /// Resident threads of the GPU being imitated; `None` = as many as there are elements.
    gpu_threads: Option<u64>,
    arithmetic: PhiloxArithmetic,
}

impl PhiloxGenerator {
    /// Same as `torch.Generator("cuda").manual_seed(seed)`; the whole 64-bit seed is the key.
    ///
    /// Uses [`PhiloxArithmetic::TorchCuda`] and assumes the GPU has at least as many resident
    /// threads as a call asks for elements (an RTX 3060 has 43 008, an RTX 4090 196 608, an
    /// H100 270 336), which is also A1111's layout. Use [`Self::with_gpu_threads`] to imitate a
    /// particular GPU for larger tensors.
    pub fn new(seed: u64) -> Self {
        Self {
            key: [seed as u32, (seed >> 32) as u32],
            offset_blocks: 0,
            gpu_threads: None,
            arithmetic: PhiloxArithmetic::TorchCuda,
        }
    }

    /// A1111's "NV" generator (`modules/rng_philox.py`) bit for bit.
    pub fn a1111(seed: u64) -> Self {
        Self::new(seed).with_arithmetic(PhiloxArithmetic::A1111)
    }

    pub fn with_arithmetic(mut self, arithmetic: PhiloxArithmetic) -> Self {
        self.arithmetic = arithmetic;
        self
    }

    /// Lay calls out as torch does on a GPU with this many resident threads:
    /// `multiProcessorCount × (maxThreadsPerMultiProcessor / 256) × 256`
    /// (e.g. H100 SXM 132 × 2048 = 270 336; RTX 3060 28 × 1536 = 43 008). Only calls with more
    /// elements than this are affected. A value of 0 is treated as 1.
    pub fn with_gpu_threads(mut self, threads: u64) -> Self {
        self.gpu_threads = Some(threads.max(1));
        self
    }

    /// The generator's offset as torch reports it (`philox_offset_per_thread`, in 32-bit values).
    pub fn offset(&self) -> u64 {
        self.offset_blocks * 4
    }

    fn box_muller(&self, x: u32, y: u32) -> (f32, f32) {
        match self.arithmetic {
            PhiloxArithmetic::TorchCuda => box_muller_cuda(x, y),
            PhiloxArithmetic::A1111 => box_muller_a1111(x, y),
        }
    }
}

impl NoiseGenerator for PhiloxGenerator {
    fn randn(&mut self, n: usize) -> Vec<f32> {
        if n == 0 {
            // torch returns before touching the generator.
            return Vec::new();
        }
        let count = n as u64;
        let threads = match self.gpu_threads {
            Some(limit) if count > limit => limit,
            _ => count,
        };
        let blocks_per_thread = (count - 1) / (4 * threads) + 1;
        let mut values = vec![0.0f32; n];
        for pass in 0..blocks_per_thread {
            let block = self.offset_blocks.wrapping_add(pass);
            for thread in 0..threads {
                // The four normals of this thread's pass go to elements `first + lane·threads`.
                let first = 4 * pass * threads + thread;
                if first >= count {
                    break;
                }
                let words =
                    philox4x32_10([block as u32, (block >> 32) as u32, thread as u32, (thread >> 32) as u32], self.key);
                let (sin01, cos01) = self.box_muller(words[0], words[1]);
                let mut lanes = [sin01, cos01, 0.0, 0.0];
                if first + 2 * threads < count {
                    let (sin23, cos23) = self.box_muller(words[2], words[3]);
                    lanes[2] = sin23;
                    lanes[3] = cos23;
                }
                for (lane, value) in lanes.into_iter().enumerate() {
                    let element = first + lane as u64 * threads;
                    if element < count {
                        values[element as usize] = value;
                    }
                }
            }
        }
        self.offset_blocks = self.offset_blocks.wrapping_add(blocks_per_thread);
        values
    }
}

/// Philox4x32 with 10 rounds (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3").
fn philox4x32_10(mut counter: [u32; 4], mut key: [u32; 2]) -> [u32; 4] {
    const MULTIPLIERS: [u64; 2] = [0xD251_1F53, 0xCD9E_8D57];
    const WEYL: [u32; 2] = [0x9E37_79B9, 0xBB67_AE85];
    for round in 0..10 {
        if round > 0 {
            key[0] = key[0].wrapping_add(WEYL[0]);
            key[1] = key[1].wrapping_add(WEYL[1]);
        }
        let product0 = MULTIPLIERS[0] * u64::from(counter[0]);
        let product1 = MULTIPLIERS[1] * u64::from(counter[2]);
        counter = [
            (product1 >> 32) as u32 ^ counter[1] ^ key[0],
            product1 as u32,
            (product0 >> 32) as u32 ^ counter[3] ^ key[1],
            product0 as u32,
        ];
    }
    counter
}

// curand_globals.h: float literals, and the 2π one is a float product.
const CURAND_2POW32_INV: f32 = 2.328_306_4e-10;
const CURAND_2POW32_INV_2PI: f32 = CURAND_2POW32_INV * 6.283_185_5;

/// `_curand_box_muller` as a CUDA GPU computes it (see the module documentation for sin/cos).
fn box_muller_cuda(x: u32, y: u32) -> (f32, f32) {
    // nvcc contracts `x * C + C / 2` into an FMA; `x` is first rounded to float.
    let u = (x as f32).mul_add(CURAND_2POW32_INV, CURAND_2POW32_INV / 2.0);
    let v = (y as f32).mul_add(CURAND_2POW32_INV_2PI, CURAND_2POW32_INV_2PI / 2.0);
    let s = (-2.0 * cuda_logf(u)).sqrt();
    // `__sincosf` compiles to `FMUL.RZ t, v, 0.15915494` then MUFU.SIN/COS of `t` (in turns);
    // checked with nvcc 13.0 for sm_90. The MUFU itself is approximated by accurate sin/cos.
    const INV_TWO_PI: u32 = 0x3e22_f983;
    let turns = f64::from(mul_toward_zero(v, f32::from_bits(INV_TWO_PI)));
    let angle = std::f64::consts::TAU * turns;
    (s * angle.sin() as f32, s * angle.cos() as f32)
}

/// A1111's `box_muller` (numpy): float32 constants, float64 arithmetic, float32 result.
fn box_muller_a1111(x: u32, y: u32) -> (f32, f32) {
    // `np.array([2.3283064e-10 * 6.2831855], dtype=np.float32)`: the product is taken in f64.
    const TWO_POW32_INV_2PI: f32 = (2.3283064e-10_f64 * 6.2831855_f64) as f32;
    let u = f64::from(x) * f64::from(CURAND_2POW32_INV) + f64::from(CURAND_2POW32_INV / 2.0);
    let v = f64::from(y) * f64::from(TWO_POW32_INV_2PI) + f64::from(TWO_POW32_INV_2PI / 2.0);
    let s = (-2.0 * u.ln()).sqrt();
    ((s * v.sin()) as f32, (s * v.cos()) as f32)
}

/// `a · b` rounded toward zero (the product of two floats is exact in f64).
fn mul_toward_zero(a: f32, b: f32) -> f32 {
    let exact = f64::from(a) * f64::from(b);
    let nearest = exact as f32;
    if f64::from(nearest).abs() > exact.abs() {
        // One step toward zero: for a finite nonzero float that is its magnitude minus one ulp.
        f32::from_bits(nearest.to_bits() - 1)
    } else {
        nearest
    }
}

/// libdevice's `__nv_logf` (CUDA's `logf`, non-flush-to-zero build), read from
/// `libdevice.10.bc` with llvm-dis. Only called with `u` in (0, 1].
fn cuda_logf(a: f32) -> f32 {
    // The constants as bit patterns, exactly as in the bitcode.
    const COEFFICIENTS: [u32; 8] = [
        0xbe05_5027, // -0.13018857
        0x3e10_39f6, // 0.1408461
        0xbdf8_cdcc, // -0.12148628
        0x3e0f_2955, // 0.1398061
        0xbe2a_d8b9, // -0.16684236
        0x3e4c_ed0b, // 0.200123
        0xbe7f_ff22, // -0.24999669
        0x3eaa_aa78, // 0.33333182
    ];
    const LN_2: u32 = 0x3f31_7218;
    let (a, mut exponent) = if a < f32::MIN_POSITIVE { (a * 8_388_608.0, -23.0f32) } else { (a, 0.0f32) };
    let bits = a.to_bits() as i32;
    // Split into 2^e · m with m in [2/3, 4/3).
    let e = bits.wrapping_sub(0x3f2a_aaab) & (0xff80_0000u32 as i32);
    let m = f32::from_bits(bits.wrapping_sub(e) as u32);
    exponent = (e as f32).mul_add(1.0 / 8_388_608.0, exponent);
    let f = m - 1.0;
    let coefficient = |i: usize| f32::from_bits(COEFFICIENTS[i]);
    let mut r = f.mul_add(coefficient(0), coefficient(1));
    for i in 2..COEFFICIENTS.len() {
        r = r.mul_add(f, coefficient(i));
    }
    r = r.mul_add(f, -0.5);
    r *= f;
    r = r.mul_add(f, f);
    let result = exponent.mul_add(f32::from_bits(LN_2), r);
    if a == 0.0 {
        f32::NEG_INFINITY
    } else if a.to_bits() > 0x7f7f_ffff {
        // Negative, infinite or NaN: libdevice's fma(a, +inf, +inf) gives NaN or +inf.
        a.mul_add(f32::INFINITY, f32::INFINITY)
    } else {
        result
    }
}
