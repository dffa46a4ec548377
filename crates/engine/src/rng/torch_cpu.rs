//! torch's CPU generator: `torch.Generator("cpu").manual_seed(seed)` followed by
//! `torch.randn(shape, generator=g)` in float32, reproduced bit for bit.
//!
//! Verified against real torch (2.15, x86-64) by `tests/fixtures/rng/torch_cpu.json`, written by
//! `scripts/make_rng_fixtures.py`.
//!
//! How torch draws `n` normals (aten/src/ATen/native/cpu/DistributionTemplates.h, `normal_kernel`):
//! - `n < 16`: one at a time, Box-Muller on doubles from 53-bit uniforms. Each pair yields two
//!   normals; the second is cached in the generator and handed out by the next scalar draw,
//!   across `randn` calls.
//! - `n >= 16`: fill with 24-bit float uniforms, then Box-Muller on each block of 16 (values
//!   `j` and `j + 8` pair up). When `n % 16 != 0` the last 16 values are drawn afresh and
//!   transformed again, overlapping the last full block.
//!
//! The `n >= 16` transform is the AVX2 kernel torch runs on every x86-64 CPU with AVX2 (also
//! under its AVX-512 dispatch): `log256_ps` / `sincos256_ps` from avx_mathfun.h, compiled by GCC
//! with multiply-adds contracted into FMAs. It is ported here lane by lane with the same
//! roundings, so the result does not depend on the CPU running Easel. torch builds without AVX2
//! (Apple Silicon, `ATEN_CPU_CAPABILITY=default`) use libm's `logf`/`sinf`/`cosf` instead and
//! differ from these values in the last bit of some elements.

use super::NoiseGenerator;

/// Mersenne Twister MT19937 as torch seeds and steps it (`at::mt19937`).
#[derive(Clone)]
struct Mt19937 {
    state: [u32; Self::N],
    next: usize,
}

impl Mt19937 {
    const N: usize = 624;
    const M: usize = 397;

    /// torch keeps only the low 32 bits of the seed (`init_with_uint32`).
    fn new(seed: u64) -> Self {
        let mut state = [0u32; Self::N];
        state[0] = seed as u32;
        for i in 1..Self::N {
            let previous = state[i - 1];
            state[i] = 1_812_433_253u32.wrapping_mul(previous ^ (previous >> 30)).wrapping_add(i as u32);
        }
        Self { state, next: Self::N }
    }

    fn regenerate(&mut self) {
        const UPPER: u32 = 0x8000_0000;
        const LOWER: u32 = 0x7fff_ffff;
        const MATRIX_A: u32 = 0x9908_b0df;
        for i in 0..Self::N {
            let mixed = (self.state[i] & UPPER) | (self.state[(i + 1) % Self::N] & LOWER);
            let mut value = self.state[(i + Self::M) % Self::N] ^ (mixed >> 1);
            if mixed & 1 != 0 {
                value ^= MATRIX_A;
            }
            self.state[i] = value;
        }
        self.next = 0;
    }

    fn next_u32(&mut self) -> u32 {
        if self.next >= Self::N {
            self.regenerate();
        }
        let mut y = self.state[self.next];
        self.next += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^ (y >> 18)
    }
}

/// torch's CPU generator with the float32 `randn` on top of it.
#[derive(Clone)]
pub struct TorchCpuGenerator {
    engine: Mt19937,
    /// The second normal of the last scalar Box-Muller pair (`next_double_normal_sample`).
    cached_normal: Option<f64>,
}

impl TorchCpuGenerator {
    /// Same as `torch.Generator("cpu").manual_seed(seed)`. Any 64-bit seed is accepted; torch's
    /// MT19937 uses only its low 32 bits, so `seed` and `seed + 2^32` give the same noise.
    pub fn new(seed: u64) -> Self {
        Self { engine: Mt19937::new(seed), cached_normal: None }
    }

    /// `random64()`: two draws, the first one the high word.
    fn next_u64(&mut self) -> u64 {
        let high = u64::from(self.engine.next_u32());
        let low = u64::from(self.engine.next_u32());
        (high << 32) | low
    }

    /// `uniform_real_distribution<double>(0, 1)`: 53 random bits, in [0, 1).
    fn uniform_f64(&mut self) -> f64 {
        const MASK: u64 = (1 << 53) - 1;
        (self.next_u64() & MASK) as f64 / (1u64 << 53) as f64
    }

    /// `uniform_real_distribution<float>(0, 1)`: 24 random bits, in [0, 1).
    fn uniform_f32(&mut self) -> f32 {
        const MASK: u32 = (1 << 24) - 1;
        (self.engine.next_u32() & MASK) as f32 / (1u32 << 24) as f32
    }

    /// `normal_distribution<double>(0, 1)`, the scalar path.
    fn normal_f64(&mut self) -> f64 {
        if let Some(cached) = self.cached_normal.take() {
            return cached;
        }
        let u1 = self.uniform_f64();
        let u2 = self.uniform_f64();
        let radius = (-2.0 * (-u2).ln_1p()).sqrt();
        let theta = 2.0 * std::f64::consts::PI * u1;
        self.cached_normal = Some(radius * theta.sin());
        radius * theta.cos()
    }

    fn fill_uniform(&mut self, values: &mut [f32]) {
        for value in values {
            *value = self.uniform_f32();
        }
    }
}

impl NoiseGenerator for TorchCpuGenerator {
    fn randn(&mut self, n: usize) -> Vec<f32> {
        if n < 16 {
            return (0..n).map(|_| self.normal_f64() as f32).collect();
        }
        let mut values = vec![0.0f32; n];
        self.fill_uniform(&mut values);
        for block in values.chunks_exact_mut(16) {
            box_muller_16(block);
        }
        let has_partial_block = !values.chunks_exact(16).remainder().is_empty();
        if has_partial_block {
            let tail = &mut values[n - 16..];
            self.fill_uniform(tail);
            box_muller_16(tail);
        }
        values
    }
}

/// `normal_fill_16` (AVX2): turns 16 uniforms in [0, 1) into 16 normals in place.
fn box_muller_16(block: &mut [f32]) {
    // `_mm256_set1_ps(2.0f * c10::pi<double>)`: computed in double, then rounded to float.
    const TWO_PI: f32 = (2.0 * std::f64::consts::PI) as f32;
    for j in 0..8 {
        let u1 = 1.0 - block[j]; // (0, 1], so the log is finite
        let u2 = block[j + 8];
        let radius = (-2.0 * avx_log(u1)).sqrt();
        let (sin, cos) = avx_sincos(TWO_PI * u2);
        // torch finishes with fma(x, std = 1, mean = 0), which turns -0.0 into +0.0.
        block[j] = radius * cos + 0.0;
        block[j + 8] = radius * sin + 0.0;
    }
}

// avx_mathfun.h constants (cephes). The header writes them as double literals that C converts
// to float, so they go through f64 here too: parsing straight to f32 could round differently.
// Some have more digits than an f64 holds; they stay as written.
const fn from_double(value: f64) -> f32 {
    value as f32
}
// cephes_SQRTHF, 0.707106781186547524: the same double as FRAC_1_SQRT_2.
const SQRT_HALF: f32 = from_double(std::f64::consts::FRAC_1_SQRT_2);
const LOG_POLY: [f32; 9] = [
    from_double(7.0376836292E-2),
    from_double(-1.1514610310E-1),
    from_double(1.1676998740E-1),
    from_double(-1.2420140846E-1),
    from_double(1.4249322787E-1),
    from_double(-1.6668057665E-1),
    from_double(2.0000714765E-1),
    from_double(-2.4999993993E-1),
    from_double(3.3333331174E-1),
];
const LOG_Q1: f32 = from_double(-2.12194440e-4);
const LOG_Q2: f32 = from_double(0.693359375);

/// `log256_ps` for one lane, for normal positive `x` (Box-Muller only passes (0, 1]).
fn avx_log(x: f32) -> f32 {
    let bits = x.max(f32::MIN_POSITIVE).to_bits();
    let mut exponent = ((bits >> 23) as i32 - 0x7f) as f32 + 1.0;
    // Mantissa scaled into [0.5, 1).
    let mut m = f32::from_bits((bits & !0x7f80_0000) | 0.5f32.to_bits());
    let below_sqrt_half = m < SQRT_HALF;
    let doubled_part = if below_sqrt_half { m } else { 0.0 };
    m -= 1.0;
    if below_sqrt_half {
        exponent -= 1.0;
    }
    m += doubled_part;
    let m2 = m * m;
    // GCC contracts each `y = y * x; y = y + p` into one FMA.
    let mut y = LOG_POLY[0];
    for &coefficient in &LOG_POLY[1..] {
        y = y.mul_add(m, coefficient);
    }
    y *= m;
    y = y.mul_add(m2, exponent * LOG_Q1);
    y = (-m2).mul_add(0.5, y);
    let sum = m + y;
    exponent.mul_add(LOG_Q2, sum)
}

const FOUR_OVER_PI: f32 = from_double(1.27323954473516);
const MINUS_DP1: f32 = from_double(-0.78515625);
#[allow(clippy::excessive_precision)]
const MINUS_DP2: f32 = from_double(-2.4187564849853515625e-4);
#[allow(clippy::excessive_precision)]
const MINUS_DP3: f32 = from_double(-3.77489497744594108e-8);
const SIN_POLY: [f32; 3] = [from_double(-1.9515295891E-4), from_double(8.3321608736E-3), from_double(-1.6666654611E-1)];
const COS_POLY: [f32; 3] =
    [from_double(2.443315711809948E-005), from_double(-1.388731625493765E-003), from_double(4.166664568298827E-002)];

/// `sincos256_ps` for one lane: (sin x, cos x) for the angles Box-Muller uses, [0, 2π).
fn avx_sincos(x: f32) -> (f32, f32) {
    let sin_negative_input = x.is_sign_negative();
    let x = x.abs();
    // Octant, rounded up to even (cephes).
    let octant = (((x * FOUR_OVER_PI) as i32) + 1) & !1;
    let y = octant as f32;
    let sin_flip = (octant & 4) != 0;
    let use_sin_poly_for_sin = (octant & 2) == 0;
    let cos_flip = (!(octant - 2) & 4) != 0;
    // Extended-precision reduction, each step one FMA after contraction.
    let r = y.mul_add(MINUS_DP1, x);
    let r = y.mul_add(MINUS_DP2, r);
    let r = y.mul_add(MINUS_DP3, r);
    let z = r * r;

    let mut cos_poly = COS_POLY[0].mul_add(z, COS_POLY[1]);
    cos_poly = cos_poly.mul_add(z, COS_POLY[2]);
    cos_poly *= z;
    cos_poly = cos_poly.mul_add(z, -(z * 0.5));
    cos_poly += 1.0;

    let mut sin_poly = SIN_POLY[0].mul_add(z, SIN_POLY[1]);
    sin_poly = sin_poly.mul_add(z, SIN_POLY[2]);
    sin_poly *= z;
    sin_poly = sin_poly.mul_add(r, r);

    let (sin, cos) = if use_sin_poly_for_sin { (sin_poly, cos_poly) } else { (cos_poly, sin_poly) };
    let sin = if sin_negative_input != sin_flip { -sin } else { sin };
    let cos = if cos_flip { -cos } else { cos };
    (sin, cos)
}
