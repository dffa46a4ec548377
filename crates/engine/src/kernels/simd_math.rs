//! Vectorisable f32 math for the element-wise parts of the kernels.
//!
//! `f32::exp` is a scalar libm call, which would make SiLU over a 512×512 VAE activation cost
//! more than the convolution next to it. These are branch-free versions the compiler turns into
//! AVX-512 / AVX2 code inside [`multiversion!`] functions; accuracy is a few ulp, far inside the
//! tolerance the conformance tests hold against diffusers.

/// Compiles the body once for AVX-512, once for AVX2+FMA and once for the baseline, and picks
/// the best at run time (the release binary targets baseline x86-64 so it runs anywhere).
macro_rules! multiversion {
    ($(#[$meta:meta])* $vis:vis fn $name:ident($($arg:ident : $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$meta])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn body($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[cfg(feature = "avx512")]
                #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")]
                unsafe fn v4($($arg: $ty),*) $(-> $ret)? { body($($arg),*) }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn v3($($arg: $ty),*) $(-> $ret)? { body($($arg),*) }
                #[cfg(feature = "avx512")]
                if $crate::kernels::avx512() {
                    // SAFETY: the CPU supports every feature v4 was compiled for.
                    return unsafe { v4($($arg),*) };
                }
                if $crate::kernels::avx2_fma() {
                    // SAFETY: as above, for v3.
                    return unsafe { v3($($arg),*) };
                }
            }
            body($($arg),*)
        }
    };
}
pub(crate) use multiversion;

/// eˣ with Cephes' polynomial; inputs are clamped to the finite range of f32.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split in two so that n·ln2 is exact in the high part.
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding and subtracting 1.5·2²³ rounds to the nearest integer without a branch.
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.0, 88.0);
    let t = x * LOG2E + ROUND;
    let n = t - ROUND;
    // n as an integer, read from t's mantissa (t's ulp is 1 there), instead of `n as i32`,
    // whose saturating conversion does not vectorise.
    let n_int = (t.to_bits() as i32).wrapping_sub(ROUND.to_bits() as i32);
    let r = x - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4_f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let er = p * r * r + r + 1.0;
    let scale = f32::from_bits(((n_int + 127) as u32) << 23);
    er * scale
}

/// x·σ(x), diffusers' SiLU.
#[inline(always)]
pub fn silu(x: f32) -> f32 {
    x / (1.0 + exp(-x))
}

/// erf(x) as a rational function of x on [-4, 4] (beyond, erf is ±1 in f32): the form and
/// coefficients XLA and Eigen use for their vectorised f32 erf, accurate to a few ulp.
#[inline(always)]
pub fn erf(x: f32) -> f32 {
    let x = x.clamp(-4.0, 4.0);
    let x2 = x * x;
    let mut p = -2.726_142_3e-10_f32;
    p = p * x2 + 2.770_681_4e-8;
    p = p * x2 - 2.101_024e-6;
    p = p * x2 - 5.692_506_4e-5;
    p = p * x2 - 7.349_906_3e-4;
    p = p * x2 - 2.954_6e-3;
    p = p * x2 - 1.609_603_3e-2;
    let mut q = -1.456_607_2e-5_f32;
    q = q * x2 - 2.133_740_6e-4;
    q = q * x2 - 1.682_827e-3;
    q = q * x2 - 7.373_329e-3;
    q = q * x2 - 1.426_474e-2;
    x * p / q
}

/// The exact (erf) GELU that diffusers' GEGLU uses: x·(1 + erf(x/√2))/2.
#[inline(always)]
pub fn gelu(x: f32) -> f32 {
    0.5 * x * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2))
}

multiversion! {
    /// SiLU in place over a slice.
    pub fn silu_in_place(xs: &mut [f32]) {
        for x in xs.iter_mut() {
            *x = silu(*x);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_matches_libm_over_the_useful_range() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let want = (x as f64).exp();
            let got = exp(x) as f64;
            worst = worst.max(((got - want) / want).abs());
            x += 0.013;
        }
        assert!(worst < 5e-7, "worst relative error {worst}");
    }

    #[test]
    fn erf_and_gelu_match_f64_references() {
        let mut worst_erf = 0f64;
        let mut worst_gelu = 0f64;
        let mut x = -6.0f32;
        while x < 6.0 {
            let want = libm_erf(x as f64);
            worst_erf = worst_erf.max((erf(x) as f64 - want).abs());
            let want_gelu = 0.5 * x as f64 * (1.0 + libm_erf(x as f64 / std::f64::consts::SQRT_2));
            // Absolute, scaled by |x|: in the far negative tail 1 + erf cancels, in torch too.
            worst_gelu = worst_gelu.max((gelu(x) as f64 - want_gelu).abs() / (x.abs() as f64).max(1.0));
            x += 0.0007;
        }
        assert!(worst_erf < 5e-7, "erf: worst absolute error {worst_erf}");
        assert!(worst_gelu < 5e-7, "gelu: worst error {worst_gelu}");
    }

    /// erf in f64 by its Maclaurin series (|x| ≤ 3) or continued fraction (beyond): a reference
    /// independent of the approximation under test.
    fn libm_erf(x: f64) -> f64 {
        if x.abs() > 3.0 {
            // erfc(x) ≈ e^{-x²}/(x√π) · (1 − 1/(2x²) + 3/(4x⁴)); far below f32 resolution here.
            let a = x.abs();
            let erfc = (-a * a).exp() / (a * std::f64::consts::PI.sqrt()) * (1.0 - 0.5 / (a * a) + 0.75 / a.powi(4));
            return x.signum() * (1.0 - erfc);
        }
        let mut term = x;
        let mut sum = x;
        for n in 1..200 {
            term *= -x * x / n as f64;
            sum += term / (2 * n + 1) as f64;
        }
        sum * 2.0 / std::f64::consts::PI.sqrt()
    }

    #[test]
    fn silu_is_finite_at_the_extremes_and_matches_the_definition() {
        for x in [-1e30f32, -200.0, -88.5] {
            // torch gives -0 (or a denormal) here; anything this small is the same pixel.
            assert!(silu(x).abs() < 1e-8, "silu({x}) = {}", silu(x));
        }
        for x in [-80.0f32, -10.0, -1.0, 0.0, 0.5, 3.0, 90.0, 1e30] {
            let want = x as f64 / (1.0 + (-(x as f64)).exp());
            let got = silu(x);
            assert!(got.is_finite(), "silu({x}) = {got}");
            assert!((got as f64 - want).abs() <= 1e-6 * want.abs().max(1e-30), "silu({x}) = {got}, want {want}");
        }
        let mut v: Vec<f32> = (0..1000).map(|i| i as f32 / 50.0 - 10.0).collect();
        let want: Vec<f32> = v.iter().map(|&x| silu(x)).collect();
        silu_in_place(&mut v);
        assert_eq!(v, want, "the multiversioned loop computes the same values");
    }
}
