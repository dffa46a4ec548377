//! bf16 × bf16 → f32 matrix products on AVX-512-BF16 (`vdpbf16ps`), for the opt-in bf16 mode.
//!
//! `vdpbf16ps` multiplies pairs of bf16 values and adds both products into one f32 lane, twice
//! the multiply rate of f32 FMAs on the same unit, with f32 accumulation. No crate offers it
//! (the `gemm` crate has f16 only, computed in f32), hence this kernel.
//!
//! Layout: both operands hold bf16 values in pairs along k, one pair per u32 (`lo | hi << 16`).
//! The "broadcast" operand is row-major (m × k/2 pairs, any row stride); the "panel" operand is
//! packed in panels of 64 columns, `[panel][pair][64]`, zero-padded, so one pair row of a panel
//! is four 512-bit loads. The micro-kernel keeps a 6 × 64 block of C in 24 registers.

use std::arch::x86_64::*;

use rayon::prelude::*;

use super::simd_math::multiversion;
use super::SyncPtr;

/// Columns per packed panel (four 16-lane vectors).
pub const PANEL: usize = 64;
/// Rows per micro-kernel call.
const MR: usize = 6;
/// Pairs of k per cache block.
const KC: usize = 256;
/// Rows per parallel task.
const ROWS_PER_TASK: usize = 8 * MR;

/// Whether this CPU can run the bf16 kernels.
pub fn supported() -> bool {
    super::avx512() && std::arch::is_x86_feature_detected!("avx512bf16")
}

/// f32 → bf16 bits, rounding to nearest even (what torch's `.to(torch.bfloat16)` does).
#[inline(always)]
pub fn bf16_bits(x: f32) -> u32 {
    let bits = x.to_bits();
    (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
}

/// Two f32 values as one bf16 pair (`lo | hi << 16`).
#[inline(always)]
pub fn pair(lo: f32, hi: f32) -> u32 {
    bf16_bits(lo) | (bf16_bits(hi) << 16)
}

/// Rows of f32 values (`rows` × `k`, k even, row stride `stride`) as bf16 pairs, row-major.
pub fn pairs_from_f32(xs: &[f32], rows: usize, k: usize, stride: usize, out: &mut Vec<u32>) {
    out.clear();
    if k < 2 {
        return;
    }
    out.resize(rows * k / 2, 0);
    for (r, dst) in out.chunks_exact_mut(k / 2).enumerate() {
        pairs_into(&xs[r * stride..r * stride + k], dst);
    }
}

multiversion! {
    /// `values` (even length) as bf16 pairs into `out`, compiled for the CPU's vector units
    /// (the weight transform's and the linear layers' inputs, on every call).
    pub fn pairs_into(values: &[f32], out: &mut [u32]) {
        for (dst, p) in out.iter_mut().zip(values.chunks_exact(2)) {
            *dst = pair(p[0], p[1]);
        }
    }
}

/// Operand packed in 64-column panels: `[panel][pair][64]`.
#[derive(Debug, Clone)]
pub struct Panels {
    pub data: Vec<u32>,
    pub n: usize,
    pub k_pairs: usize,
}

impl Panels {
    fn panels(&self) -> usize {
        self.n.div_ceil(PANEL)
    }

    fn panel(&self, index: usize) -> &[u32] {
        let len = self.k_pairs * PANEL;
        &self.data[index * len..(index + 1) * len]
    }

    /// Panels whose column j is row j of a row-major bf16 matrix (`n` × `k`, as raw bits):
    /// a linear layer's weight, so that `x · Wᵀ` needs no transpose.
    pub fn from_bf16_rows(w: &[u16], n: usize, k: usize) -> Self {
        let k_pairs = k / 2;
        let panels = n.div_ceil(PANEL);
        let mut data = vec![0u32; panels * k_pairs * PANEL];
        data.par_chunks_mut(k_pairs * PANEL).enumerate().for_each(|(panel, dst)| {
            for jj in 0..PANEL.min(n - panel * PANEL) {
                let row = &w[(panel * PANEL + jj) * k..(panel * PANEL + jj + 1) * k];
                for (p, pr) in row.chunks_exact(2).enumerate() {
                    dst[p * PANEL + jj] = pr[0] as u32 | ((pr[1] as u32) << 16);
                }
            }
        });
        Self { data, n, k_pairs }
    }

    /// Panels whose column j is row j of a row-major f32 matrix (`n` × `k`, k even), rounded to
    /// bf16: attention's keys, so that `q · kᵀ` needs no transpose.
    pub fn from_f32_rows(x: &[f32], n: usize, k: usize) -> Self {
        let k_pairs = k / 2;
        let mut data = vec![0u32; n.div_ceil(PANEL) * k_pairs * PANEL];
        for (panel, dst) in data.chunks_exact_mut(k_pairs * PANEL).enumerate() {
            for jj in 0..PANEL.min(n - panel * PANEL) {
                let row = &x[(panel * PANEL + jj) * k..(panel * PANEL + jj + 1) * k];
                for (p, pr) in row.chunks_exact(2).enumerate() {
                    dst[p * PANEL + jj] = pair(pr[0], pr[1]);
                }
            }
        }
        Self { data, n, k_pairs }
    }

    /// Panels of an f32 matrix (`k` × `n`, row stride `stride`), converted to bf16: im2col blocks.
    pub fn from_f32(b: &[f32], k: usize, n: usize, stride: usize, out: &mut Panels) {
        let k_pairs = k / 2;
        let panels = n.div_ceil(PANEL);
        out.n = n;
        out.k_pairs = k_pairs;
        out.data.clear();
        out.data.resize(panels * k_pairs * PANEL, 0);
        for (panel, dst) in out.data.chunks_exact_mut(k_pairs * PANEL).enumerate() {
            let cols = PANEL.min(n - panel * PANEL);
            for p in 0..k_pairs {
                let lo = &b[2 * p * stride + panel * PANEL..][..cols];
                let hi = &b[(2 * p + 1) * stride + panel * PANEL..][..cols];
                interleave(&mut dst[p * PANEL..p * PANEL + cols], lo, hi);
            }
        }
    }
}

multiversion! {
    fn interleave(dst: &mut [u32], lo: &[f32], hi: &[f32]) {
        for ((d, &l), &h) in dst.iter_mut().zip(lo).zip(hi) {
            *d = pair(l, h);
        }
    }
}

/// `C (m × n, row stride ldc) += A · B` with A as bf16 pairs (m × k_pairs, row stride `lda`
/// pairs) and B packed in panels. Parallel over blocks of rows and panels when `parallel`.
///
/// # Safety
/// The CPU must support AVX-512-BF16 ([`supported`]); `c` must be valid for the m × n block with
/// row stride `ldc` and not be touched by anyone else meanwhile; `a` must hold m rows of
/// `b.k_pairs` pairs at stride `lda`.
pub unsafe fn gemm(m: usize, a: &[u32], lda: usize, b: &Panels, c: *mut f32, ldc: usize, parallel: bool) {
    gemm_impl(m, a, lda, b, c, ldc, parallel, true)
}

/// [`gemm`] that overwrites C (`C = A · B`) instead of adding to it: no zeroing pass first.
///
/// # Safety
/// As for [`gemm`].
pub unsafe fn gemm_into(m: usize, a: &[u32], lda: usize, b: &Panels, c: *mut f32, ldc: usize, parallel: bool) {
    gemm_impl(m, a, lda, b, c, ldc, parallel, false)
}

#[allow(clippy::too_many_arguments)]
unsafe fn gemm_impl(
    m: usize,
    a: &[u32],
    lda: usize,
    b: &Panels,
    c: *mut f32,
    ldc: usize,
    parallel: bool,
    accumulate: bool,
) {
    debug_assert!(m == 0 || a.len() >= (m - 1) * lda + b.k_pairs);
    let c = SyncPtr(c);
    let row_blocks = m.div_ceil(ROWS_PER_TASK);
    let task = |t: usize| {
        let (rb, panel) = (t / b.panels(), t % b.panels());
        let row0 = rb * ROWS_PER_TASK;
        let rows = ROWS_PER_TASK.min(m - row0);
        let cols = PANEL.min(b.n - panel * PANEL);
        let panel_data = b.panel(panel);
        let mut k0 = 0;
        while k0 < b.k_pairs {
            let kc = KC.min(b.k_pairs - k0);
            let mut r = 0;
            while r < rows {
                let mr = MR.min(rows - r);
                let a_ptr = a.as_ptr().add((row0 + r) * lda + k0);
                let b_ptr = panel_data.as_ptr().add(k0 * PANEL);
                let c_ptr = c.get().add((row0 + r) * ldc + panel * PANEL);
                block(mr, kc, a_ptr, lda, b_ptr, c_ptr, ldc, cols, accumulate || k0 > 0);
                r += mr;
            }
            k0 += kc;
        }
    };
    let tasks = row_blocks * b.panels();
    if parallel {
        (0..tasks).into_par_iter().for_each(task);
    } else {
        (0..tasks).for_each(task);
    }
}

/// One MR-row strip (`C += ` or, with `add` false, `C = `): full panels store straight into C,
/// a partial last panel through a buffer.
#[allow(clippy::too_many_arguments)]
unsafe fn block(
    mr: usize,
    kc: usize,
    a: *const u32,
    lda: usize,
    b: *const u32,
    c: *mut f32,
    ldc: usize,
    cols: usize,
    add: bool,
) {
    if cols == PANEL {
        micro_dispatch(mr, kc, a, lda, b, c, ldc, add);
        return;
    }
    let mut tmp = [0f32; MR * PANEL];
    micro_dispatch(mr, kc, a, lda, b, tmp.as_mut_ptr(), PANEL, true);
    for i in 0..mr {
        for j in 0..cols {
            let dst = c.add(i * ldc + j);
            *dst = if add { *dst + tmp[i * PANEL + j] } else { tmp[i * PANEL + j] };
        }
    }
}

#[allow(clippy::too_many_arguments)]
unsafe fn micro_dispatch(
    mr: usize,
    kc: usize,
    a: *const u32,
    lda: usize,
    b: *const u32,
    c: *mut f32,
    ldc: usize,
    add: bool,
) {
    match mr {
        6 => micro::<6>(kc, a, lda, b, c, ldc, add),
        5 => micro::<5>(kc, a, lda, b, c, ldc, add),
        4 => micro::<4>(kc, a, lda, b, c, ldc, add),
        3 => micro::<3>(kc, a, lda, b, c, ldc, add),
        2 => micro::<2>(kc, a, lda, b, c, ldc, add),
        _ => micro::<1>(kc, a, lda, b, c, ldc, add),
    }
}

#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn micro<const R: usize>(
    kc: usize,
    a: *const u32,
    lda: usize,
    b: *const u32,
    c: *mut f32,
    ldc: usize,
    add: bool,
) {
    let mut acc = [[_mm512_setzero_ps(); 4]; R];
    for p in 0..kc {
        let bp = b.add(p * PANEL);
        let b0: __m512bh = std::mem::transmute(_mm512_loadu_si512(bp as *const _));
        let b1: __m512bh = std::mem::transmute(_mm512_loadu_si512(bp.add(16) as *const _));
        let b2: __m512bh = std::mem::transmute(_mm512_loadu_si512(bp.add(32) as *const _));
        let b3: __m512bh = std::mem::transmute(_mm512_loadu_si512(bp.add(48) as *const _));
        for (i, row) in acc.iter_mut().enumerate() {
            let ai: __m512bh = std::mem::transmute(_mm512_set1_epi32(a.add(i * lda + p).read_unaligned() as i32));
            row[0] = _mm512_dpbf16_ps(row[0], ai, b0);
            row[1] = _mm512_dpbf16_ps(row[1], ai, b1);
            row[2] = _mm512_dpbf16_ps(row[2], ai, b2);
            row[3] = _mm512_dpbf16_ps(row[3], ai, b3);
        }
    }
    for (i, row) in acc.iter().enumerate() {
        for (q, v) in row.iter().enumerate() {
            let cp = c.add(i * ldc + q * 16);
            _mm512_storeu_ps(cp, if add { _mm512_add_ps(_mm512_loadu_ps(cp), *v) } else { *v });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round(x: f32) -> f32 {
        f32::from_bits(bf16_bits(x) << 16)
    }

    #[test]
    fn rounding_is_to_nearest_even() {
        assert_eq!(bf16_bits(1.0), 0x3F80);
        // 1 + 2^-8 is halfway between two bf16 values: ties go to the even one (1.0).
        assert_eq!(bf16_bits(1.0 + 1.0 / 256.0), 0x3F80);
        assert_eq!(bf16_bits(1.0 + 3.0 / 256.0), 0x3F82);
        assert_eq!(round(-2.5), -2.5);
    }

    #[test]
    fn products_match_f64_on_bf16_rounded_inputs() {
        if !supported() {
            eprintln!("skipped: this CPU has no AVX-512-BF16");
            return;
        }
        let mut state = 12345u32;
        let mut next = || {
            state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (state >> 8) as f32 / (1u32 << 23) as f32 - 1.0
        };
        // Shapes with partial row strips, partial panels and several k blocks.
        for (m, n, k) in [(13, 70, 10), (50, 128, 600), (7, 64, 2), (100, 200, 1030)] {
            let a: Vec<f32> = (0..m * k).map(|_| next()).collect();
            let b: Vec<f32> = (0..k * n).map(|_| next()).collect();
            let mut a_pairs = Vec::new();
            pairs_from_f32(&a, m, k, k, &mut a_pairs);
            let mut panels = Panels { data: Vec::new(), n: 0, k_pairs: 0 };
            Panels::from_f32(&b, k, n, n, &mut panels);
            let mut c = vec![0.5f32; m * n];
            unsafe { gemm(m, &a_pairs, k / 2, &panels, c.as_mut_ptr(), n, true) };
            // The same product from a weight-style operand (rows of Bᵀ as bf16 bits).
            let bt_bits: Vec<u16> = (0..n)
                .flat_map(|j| (0..k).map(move |kk| (j, kk)))
                .map(|(j, kk)| bf16_bits(b[kk * n + j]) as u16)
                .collect();
            let panels_t = Panels::from_bf16_rows(&bt_bits, n, k);
            let mut c2 = vec![0.5f32; m * n];
            unsafe { gemm(m, &a_pairs, k / 2, &panels_t, c2.as_mut_ptr(), n, false) };
            for i in 0..m {
                for j in 0..n {
                    let want: f64 =
                        0.5 + (0..k).map(|kk| round(a[i * k + kk]) as f64 * round(b[kk * n + j]) as f64).sum::<f64>();
                    for (name, got) in [("panels", c[i * n + j]), ("weight panels", c2[i * n + j])] {
                        assert!(
                            (got as f64 - want).abs() < 1e-4 * (k as f64).sqrt(),
                            "{name} {m}x{n}x{k} [{i},{j}]: {got} vs {want}"
                        );
                    }
                }
            }
        }
    }
}
