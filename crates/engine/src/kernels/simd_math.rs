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
                #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")]
                unsafe fn v4($($arg: $ty),*) $(-> $ret)? { body($($arg),*) }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn v3($($arg: $ty),*) $(-> $ret)? { body($($arg),*) }
                if std::arch::is_x86_feature_detected!("avx512f") {
                    // SAFETY: the CPU supports every feature v4 was compiled for.
                    return unsafe { v4($($arg),*) };
                }
                if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
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
