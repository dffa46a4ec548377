//! 2-D convolution (NCHW, f32) as GEMMs straight into the output, bias fused.
//!
//! * 1×1, stride 1: `out[b] = W · x[b]`, one GEMM per image, no copy at all.
//! * Anything else: the output is cut into tiles of whole rows; each tile builds its im2col
//!   block in the `(C_in·kh·kw) × pixels` order that matches the weight's own memory layout
//!   (so the weight is used as stored, never reshuffled), row by row with `copy_from_slice`,
//!   and multiplies it into its slice of the NCHW output. Tiles run in parallel with a
//!   single-threaded GEMM each, which keeps the im2col work on every core too; when there
//!   are too few tiles to go round, they run one after the other with a parallel GEMM.
//!
//! The bias is written into the output first and the GEMM accumulates onto it, which is the
//! same sum as adding it afterwards, without another pass over the activation.

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape};
use rayon::prelude::*;

use super::half_weights::WeightData;
use super::{contiguous_f32, matmul, threads, winograd, Operand, SyncPtr};

/// Below this many output pixels the per-call weight transform of Winograd's method costs more
/// than it saves (the U-Net's 16×16 and 8×8 levels have the most channels and fewest pixels).
/// Measured at batch 2 on 2 cores (`kernel_bench`, EASEL_BENCH_CONV=all), im2col vs Winograd,
/// f32: 640→640 at 32×32 49 vs 46 ms; 1280→1280 at 16×16 78–95 vs 76 ms; 2560→1280 at 16×16
/// 153 vs 144 ms; 1280→1280 at 8×8 21 vs 49 ms. bf16: 1280→1280 at 16×16 63 vs 44 ms,
/// 2560→1280 at 16×16 158 vs 86 ms, 1280→1280 at 8×8 11 vs 34 ms. Whole f32 U-Net step with
/// CFG at 512×512 (`easel bench`), threshold 16×16 vs 32×32: 8.9/8.3 s vs 9.5/10.2 s.
pub(crate) const WINOGRAD_MIN_PIXELS_F32: usize = 16 * 16;
pub(crate) const WINOGRAD_MIN_PIXELS_BF16: usize = 16 * 16;

/// Upper bound on one tile's im2col block (bytes); small enough for several to stay in cache.
const TILE_BYTES: usize = 4 << 20;

/// Images of at most this many output pixels are convolved in one GEMM over all their columns
/// (all images, no tiles): at the U-Net's 8×8 level the weights (up to 118 MB in f32) dwarf
/// the im2col block, and a GEMM per tile of 24–64 columns streamed them once per tile and
/// filled half of the bf16 kernel's 64-column panels. Measured (`kernel_bench`, EASEL_BENCH_CONV=all,
/// batch 2, 2 cores, three alternated runs), per tile vs joined: 2560→1280 3×3 at 8×8 bf16
/// 38/39/37 vs 24/23/23 ms, f32 49/48/52 vs 39/42/51 ms; the stride-2 1280→1280 to 8×8 bf16
/// 13/16/14 vs 10/10/10 ms. Not for 1×1 convolutions: they already run one GEMM per image
/// on the input as it lies, and the copy made them slower (2560→1280 at 8×8 f32 4.1 vs 4.6 ms).
const JOIN_MAX_PIXELS: usize = 16 * 16;
/// ... as long as the joined im2col block stays within this many bytes.
const JOIN_MAX_BYTES: usize = 64 << 20;

#[derive(Debug, Clone, Copy)]
pub struct Conv2dOp {
    pub stride: usize,
    pub padding: usize,
}

/// Sizes of one convolution.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Geometry {
    batch: usize,
    c_in: usize,
    h: usize,
    w: usize,
    c_out: usize,
    kh: usize,
    kw: usize,
    stride: usize,
    padding: usize,
    pub h_out: usize,
    pub w_out: usize,
}

impl Geometry {
    /// A square `kernel`; the caller has checked the padded input is at least kernel-sized.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        batch: usize,
        c_in: usize,
        h: usize,
        w: usize,
        c_out: usize,
        kernel: usize,
        stride: usize,
        padding: usize,
    ) -> Self {
        let stride = stride.max(1);
        Self {
            batch,
            c_in,
            h,
            w,
            c_out,
            kh: kernel,
            kw: kernel,
            stride,
            padding,
            h_out: (h + 2 * padding - kernel) / stride + 1,
            w_out: (w + 2 * padding - kernel) / stride + 1,
        }
    }

    fn patch_len(&self) -> usize {
        self.c_in * self.kh * self.kw
    }

    /// Whether this convolution takes the Winograd path (at least `min_pixels` output pixels).
    pub(crate) fn winograd(&self, min_pixels: usize) -> bool {
        self.kh == 3 && self.kw == 3 && self.stride == 1 && self.padding == 1 && self.h_out * self.w_out >= min_pixels
    }
}

/// `dst (c_out × n, row stride dst_rs) += W · rhs (k × n, row stride rhs_rs)`, for the weight
/// in whatever form the caller holds it; the last argument is the threads one product may use.
type Product<'a> = dyn Fn(*mut f32, usize, &[f32], usize, usize, usize) + Sync + 'a;

impl CustomOp3 for Conv2dOp {
    fn name(&self) -> &'static str {
        "easel-conv2d"
    }

    fn cpu_fwd(
        &self,
        x_storage: &CpuStorage,
        x_layout: &Layout,
        w_storage: &CpuStorage,
        w_layout: &Layout,
        b_storage: &CpuStorage,
        b_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let weight = WeightData::new(w_storage, w_layout, self.name())?;
        let bias = contiguous_f32(b_storage, b_layout, self.name())?;
        let x = (x_storage, x_layout);
        conv2d_forward(x, weight, w_layout.shape().dims(), bias, self.stride, self.padding)
    }
}

/// The f32 convolution of a contiguous NCHW input with a weight of `weight_dims`
/// (out, in, kh, kw) however the caller holds it: a candle tensor ([`Conv2dOp`]) or the
/// memory-mapped checkpoint (`models::mapped`).
pub(crate) fn conv2d_forward(
    (x_storage, x_layout): (&CpuStorage, &Layout),
    weight: WeightData,
    weight_dims: &[usize],
    bias: &[f32],
    stride: usize,
    padding: usize,
) -> Result<(CpuStorage, Shape)> {
    let name = "easel-conv2d";
    let x = contiguous_f32(x_storage, x_layout, name)?;
    let (batch, c_in, h, w) = x_layout.shape().dims4()?;
    let &[c_out, w_c_in, kh, kw] = weight_dims else {
        candle_core::bail!("{name}: weight of shape {weight_dims:?}, expected 4 dimensions")
    };
    if w_c_in != c_in || bias.len() != c_out || weight.len() != c_out * c_in * kh * kw {
        candle_core::bail!("{name}: input {:?}, weight {weight_dims:?}, bias {}", x_layout.shape(), bias.len());
    }
    let stride = stride.max(1);
    if h + 2 * padding < kh || w + 2 * padding < kw {
        candle_core::bail!("{name}: kernel {kh}×{kw} larger than the padded {h}×{w} input");
    }
    if kh != kw {
        candle_core::bail!("{name}: only square kernels, got {kh}×{kw}");
    }
    let geometry = Geometry::new(batch, c_in, h, w, c_out, kh, stride, padding);
    let out = conv2d(x, weight, bias, &geometry);
    Ok((CpuStorage::F32(out), Shape::from((batch, c_out, geometry.h_out, geometry.w_out))))
}

/// The f32 convolution: Winograd where it pays (widening f16 weights in its weight transform),
/// else GEMMs over im2col tiles.
pub(crate) fn conv2d(x: &[f32], weight: WeightData, bias: &[f32], g: &Geometry) -> Vec<f32> {
    if g.winograd(WINOGRAD_MIN_PIXELS_F32) {
        let filters = match weight {
            WeightData::F32(w) => winograd::Filters::F32(w),
            WeightData::F16(w) => winograd::Filters::F16(w),
        };
        return conv2d_winograd(x, filters, bias, g);
    }
    weight.with_f32(|weight| conv2d_im2col(x, bias, g, TILE_BYTES, true, &f32_product(weight, g)))
}

/// The Winograd path (`g.winograd(…)` must hold) for f32 or bf16 filters.
pub(crate) fn conv2d_winograd(x: &[f32], filters: winograd::Filters, bias: &[f32], g: &Geometry) -> Vec<f32> {
    let mut out = vec![0f32; g.batch * g.c_out * g.h_out * g.w_out];
    winograd::conv3x3(x, filters, bias, g.batch, g.c_in, g.c_out, g.h, g.w, &mut out);
    out
}

fn f32_product<'a>(
    weight: &'a [f32],
    g: &'a Geometry,
) -> impl Fn(*mut f32, usize, &[f32], usize, usize, usize) + Sync + 'a {
    move |dst, dst_rs, rhs, rhs_rs, n, threads| {
        let k = weight.len() / g.c_out;
        // SAFETY: see `Product`; the callers pass disjoint destination blocks.
        unsafe {
            matmul(g.c_out, n, k, dst, dst_rs, true, Operand::rows(weight, k), Operand::rows(rhs, rhs_rs), 1.0, threads)
        }
    }
}

/// The bf16-weight convolution (weights as bf16 pairs per output channel) through im2col
/// tiles and the AVX-512-BF16 kernel.
#[cfg(target_arch = "x86_64")]
pub(crate) fn conv2d_bf16(x: &[f32], weight_pairs: &[u32], bias: &[f32], g: &Geometry) -> Vec<f32> {
    use super::bf16::{gemm, Panels};
    let lda = weight_pairs.len() / g.c_out;
    let product = move |dst: *mut f32, dst_rs: usize, rhs: &[f32], rhs_rs: usize, n: usize, threads: usize| {
        let mut panels = Panels { data: Vec::new(), n: 0, k_pairs: 0 };
        Panels::from_f32(rhs, 2 * lda, n, rhs_rs, &mut panels);
        // SAFETY: layers are built in bf16 only when `bf16::supported()`; disjoint `dst` blocks.
        unsafe { gemm(g.c_out, weight_pairs, lda, &panels, dst, dst_rs, threads > 1) }
    };
    conv2d_im2col(x, bias, g, TILE_BYTES, true, &product)
}

/// The im2col path: small images joined into one GEMM when `join` (see [`JOIN_MAX_PIXELS`]),
/// else tiles of at most `tile_bytes` of im2col each.
fn conv2d_im2col(x: &[f32], bias: &[f32], g: &Geometry, tile_bytes: usize, join: bool, product: &Product) -> Vec<f32> {
    let pixels = g.h_out * g.w_out;
    let pointwise = g.kh == 1 && g.kw == 1 && g.stride == 1 && g.padding == 0;
    let joined_bytes = 4 * g.patch_len() * g.batch * pixels;
    if join && !pointwise && pixels <= JOIN_MAX_PIXELS && joined_bytes > 0 && joined_bytes <= JOIN_MAX_BYTES {
        return conv2d_joined(x, bias, g, product);
    }
    let mut out = Vec::with_capacity(g.batch * g.c_out * pixels);
    for _ in 0..g.batch {
        for &b in bias {
            out.extend(std::iter::repeat_n(b, pixels));
        }
    }
    let out_ptr = SyncPtr(out.as_mut_ptr());

    if pointwise {
        for image in 0..g.batch {
            let src = &x[image * g.c_in * pixels..(image + 1) * g.c_in * pixels];
            // `out` holds batch·c_out·pixels floats; this image's block is c_out × pixels.
            product(out_ptr.get().wrapping_add(image * g.c_out * pixels), pixels, src, pixels, pixels, threads());
        }
        return out;
    }

    let patch = g.patch_len();
    let rows_per_tile = (tile_bytes / (4 * patch * g.w_out).max(1)).clamp(1, g.h_out);
    let tiles_per_image = g.h_out.div_ceil(rows_per_tile);
    let tiles: Vec<(usize, usize)> =
        (0..g.batch).flat_map(|image| (0..tiles_per_image).map(move |t| (image, t * rows_per_tile))).collect();

    let run_tile = |&(image, row0): &(usize, usize), col: &mut Vec<f32>, gemm_threads: usize| {
        let rows = rows_per_tile.min(g.h_out - row0);
        let n = rows * g.w_out;
        col.clear();
        super::resize_scratch(col, patch * n);
        im2col_rows(x, g, image, row0, rows, col);
        // Tiles cover disjoint column ranges [row0·w_out, row0·w_out + n) of this image's
        // c_out × pixels output block, so concurrent tiles never write the same float.
        let dst = out_ptr.get().wrapping_add(image * g.c_out * pixels + row0 * g.w_out);
        product(dst, pixels, col, n, n, gemm_threads);
    };

    let workers = threads();
    if tiles.len() >= 2 * workers {
        tiles.par_iter().for_each_init(Vec::new, |col, tile| run_tile(tile, col, 1));
    } else {
        let mut col = Vec::new();
        for tile in &tiles {
            run_tile(tile, &mut col, workers);
        }
    }
    out
}

/// All images at once: one im2col block of (c_in·kh·kw) × (batch·pixels), image after image
/// along the columns, built in parallel over channels; one GEMM over all the columns into
/// (c_out × batch·pixels); then each image's c_out × pixels block copied into NCHW order.
fn conv2d_joined(x: &[f32], bias: &[f32], g: &Geometry, product: &Product) -> Vec<f32> {
    let pixels = g.h_out * g.w_out;
    let columns = g.batch * pixels;
    let plane = g.h * g.w;
    let per_channel = g.kh * g.kw * columns;
    let mut col = vec![0f32; g.patch_len() * columns];
    col.par_chunks_mut(per_channel).enumerate().for_each(|(c, dst)| {
        for image in 0..g.batch {
            let channel = &x[(image * g.c_in + c) * plane..][..plane];
            im2col_channel(channel, g, 0, g.h_out, dst, columns, image * pixels);
        }
    });
    let mut joined = Vec::with_capacity(g.c_out * columns);
    for &b in bias {
        joined.extend(std::iter::repeat_n(b, columns));
    }
    product(joined.as_mut_ptr(), columns, &col, columns, columns, threads());
    let mut out = vec![0f32; g.batch * g.c_out * pixels];
    for (image, out_image) in out.chunks_exact_mut(g.c_out * pixels).enumerate() {
        for (o, dst) in out_image.chunks_exact_mut(pixels).enumerate() {
            dst.copy_from_slice(&joined[o * columns + image * pixels..][..pixels]);
        }
    }
    out
}

/// Fills `col` ((c_in·kh·kw) × (rows·w_out), row-major) with the input patches of output rows
/// `row0..row0 + rows` of one image. Row order (channel, ky, kx) is the weight's own layout.
fn im2col_rows(x: &[f32], g: &Geometry, image: usize, row0: usize, rows: usize, col: &mut [f32]) {
    let n = rows * g.w_out;
    let plane = g.h * g.w;
    let image_x = &x[image * g.c_in * plane..(image + 1) * g.c_in * plane];
    for (c, dst) in col.chunks_exact_mut(g.kh * g.kw * n).take(g.c_in).enumerate() {
        im2col_channel(&image_x[c * plane..(c + 1) * plane], g, row0, rows, dst, n, 0);
    }
}

/// One input channel's kh·kw rows of an im2col block: output rows `row0..row0 + rows`, written
/// at columns `offset..offset + rows·w_out` of rows `col_stride` apart.
fn im2col_channel(
    channel: &[f32],
    g: &Geometry,
    row0: usize,
    rows: usize,
    col: &mut [f32],
    col_stride: usize,
    offset: usize,
) {
    let n = rows * g.w_out;
    let pad = g.padding as isize;
    for ky in 0..g.kh {
        for kx in 0..g.kw {
            let row_index = ky * g.kw + kx;
            let dst_row = &mut col[row_index * col_stride + offset..][..n];
            for (r, dst) in dst_row.chunks_exact_mut(g.w_out).enumerate() {
                let iy = ((row0 + r) * g.stride + ky) as isize - pad;
                if iy < 0 || iy >= g.h as isize {
                    dst.fill(0.0);
                    continue;
                }
                let src = &channel[iy as usize * g.w..(iy as usize + 1) * g.w];
                // Output columns whose input column ix = ox·stride + kx − pad lies inside.
                let shift = kx as isize - pad;
                let first = if shift < 0 { ((-shift) as usize).div_ceil(g.stride) } else { 0 };
                let last = if (g.w as isize - shift) <= 0 {
                    0
                } else {
                    ((g.w as isize - shift) as usize).div_ceil(g.stride).min(g.w_out)
                };
                if first >= last {
                    dst.fill(0.0);
                    continue;
                }
                dst[..first].fill(0.0);
                dst[last..].fill(0.0);
                let start = (first * g.stride) as isize + shift;
                if g.stride == 1 {
                    let start = start as usize;
                    dst[first..last].copy_from_slice(&src[start..start + (last - first)]);
                } else {
                    for (o, d) in dst[first..last].iter_mut().enumerate() {
                        *d = src[start as usize + o * g.stride];
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::test_values as values;
    use candle_core::{Device, Tensor};

    /// Straightforward reference: the definition of a convolution, in f64.
    fn naive(x: &[f32], weight: &[f32], bias: &[f32], g: &Geometry) -> Vec<f32> {
        let mut out = vec![0f32; g.batch * g.c_out * g.h_out * g.w_out];
        for b in 0..g.batch {
            for o in 0..g.c_out {
                for oy in 0..g.h_out {
                    for ox in 0..g.w_out {
                        let mut acc = bias[o] as f64;
                        for c in 0..g.c_in {
                            for ky in 0..g.kh {
                                for kx in 0..g.kw {
                                    let iy = (oy * g.stride + ky) as isize - g.padding as isize;
                                    let ix = (ox * g.stride + kx) as isize - g.padding as isize;
                                    if iy < 0 || ix < 0 || iy >= g.h as isize || ix >= g.w as isize {
                                        continue;
                                    }
                                    let xv = x[((b * g.c_in + c) * g.h + iy as usize) * g.w + ix as usize];
                                    let wv = weight[((o * g.c_in + c) * g.kh + ky) * g.kw + kx];
                                    acc += xv as f64 * wv as f64;
                                }
                            }
                        }
                        out[((b * g.c_out + o) * g.h_out + oy) * g.w_out + ox] = acc as f32;
                    }
                }
            }
        }
        out
    }

    /// (batch, c_in, h, w, c_out, k, stride, padding): 3×3 same, stride-2 down (padded and the
    /// VAE encoder's unpadded form), 1×1, odd sizes, a single row, more tiles than rows, and
    /// sizes that take the Winograd paths (F(2,3) and F(4,3)) through the op itself.
    type Case = (usize, usize, usize, usize, usize, usize, usize, usize);
    const CASES: [Case; 8] = [
        (2, 3, 9, 7, 5, 3, 1, 1),
        (1, 4, 8, 8, 6, 3, 2, 1),
        (1, 4, 9, 9, 3, 3, 2, 0),
        (2, 6, 5, 11, 4, 1, 1, 0),
        (1, 2, 1, 6, 3, 3, 1, 1),
        (3, 33, 20, 24, 7, 3, 1, 1),
        (1, 8, 33, 35, 5, 3, 1, 1),
        (2, 16, 64, 64, 16, 3, 1, 1),
    ];

    #[test]
    fn f16_weights_give_the_result_of_their_f32_widening_bit_for_bit() {
        let dev = Device::Cpu;
        for (batch, c_in, h, w, c_out, k, stride, padding) in CASES {
            let op = Conv2dOp { stride, padding };
            let xt = Tensor::from_slice(&values(batch * c_in * h * w, 1), (batch, c_in, h, w), &dev).unwrap();
            let w16 = Tensor::from_slice(&values(c_out * c_in * k * k, 2), (c_out, c_in, k, k), &dev)
                .unwrap()
                .to_dtype(candle_core::DType::F16)
                .unwrap();
            let w32 = w16.to_dtype(candle_core::DType::F32).unwrap();
            let bt = Tensor::from_slice(&values(c_out, 3), c_out, &dev).unwrap();
            let run = |weight: &Tensor| {
                xt.apply_op3_no_bwd(weight, &bt, &op).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap()
            };
            let (from_f16, from_f32) = (run(&w16), run(&w32));
            assert!(
                from_f16.iter().zip(&from_f32).all(|(a, b)| a.to_bits() == b.to_bits()),
                "{:?}",
                (batch, c_in, h, w, c_out, k, stride, padding)
            );
        }
    }

    #[test]
    fn matches_the_definition_for_every_shape_the_models_use() {
        for (batch, c_in, h, w, c_out, k, stride, padding) in CASES {
            let x = values(batch * c_in * h * w, 1);
            let weight = values(c_out * c_in * k * k, 2);
            let bias = values(c_out, 3);
            let op = Conv2dOp { stride, padding };
            let dev = Device::Cpu;
            let xt = Tensor::from_slice(&x, (batch, c_in, h, w), &dev).unwrap();
            let wt = Tensor::from_slice(&weight, (c_out, c_in, k, k), &dev).unwrap();
            let bt = Tensor::from_slice(&bias, c_out, &dev).unwrap();
            let got = xt.apply_op3_no_bwd(&wt, &bt, &op).unwrap();
            let (_, _, h_out, w_out) = got.dims4().unwrap();
            let g = Geometry { batch, c_in, h, w, c_out, kh: k, kw: k, stride, padding, h_out, w_out };
            assert_eq!((h_out, w_out), ((h + 2 * padding - k) / stride + 1, (w + 2 * padding - k) / stride + 1));
            let want = naive(&x, &weight, &bias, &g);
            let got = got.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            // One-row tiles: many tiles, so the parallel path runs too.
            let tiled = conv2d_im2col(&x, &bias, &g, 1, false, &f32_product(&weight, &g));
            let joined = conv2d_joined(&x, &bias, &g, &f32_product(&weight, &g));
            let mut results = vec![("default", got), ("one-row tiles", tiled), ("images joined", joined)];
            if k == 3 && stride == 1 && padding == 1 {
                for (name, tile) in [("winograd F(2,3)", winograd::Tile::F2), ("winograd F(4,3)", winograd::Tile::F4)] {
                    let mut out = vec![f32::NAN; batch * c_out * h * w];
                    let dims = (batch, c_in, c_out, h, w);
                    winograd::conv3x3_tiled(&x, winograd::Filters::F32(&weight), &bias, dims, tile, &mut out);
                    results.push((name, out));
                }
            }
            for (name, got) in results {
                let worst = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
                assert!(
                    worst < 1e-4,
                    "{name} {:?}: max abs error {worst}",
                    (batch, c_in, h, w, c_out, k, stride, padding)
                );
            }
        }
    }
}
