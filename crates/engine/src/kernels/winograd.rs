//! 3×3 stride-1 convolution by Winograd's method: F(2×2,3×3), 4 multiplications per output
//! instead of 9, for the U-Net's convolutions from 16×16 up, and F(4×4,3×3), 2.25, for
//! images of 32×32 and more (the U-Net's two upper levels, the whole VAE decoder) in f32.
//!
//! On a CPU whose GEMM already runs at the FMA units' peak (the `gemm` crate does, with
//! AVX-512), fewer multiplications is the only way left to make f32 convolutions faster. Each
//! m×m output tile is computed from an (m+2)×(m+2) input tile: inputs and weights go to the
//! Winograd domain (`V = Bᵀ d B`, `U = G g Gᵀ`), the (m+2)² positions ξ become independent
//! GEMMs `M_ξ = U_ξ · V_ξ` over channels, and `Y = Aᵀ M A` brings the tiles back. These are the
//! standard matrices (Lavin & Gray, 2015); the rounding error is a few ulp of the activations
//! for F(2,3), somewhat more for F(4,3) (its points ±2 scale values by up to 8), well inside
//! what the conformance tests allow against diffusers.
//!
//! The image is processed in bands of tile rows so the transformed buffers stay bounded
//! (a 512×512 VAE activation would otherwise need four copies of itself in each domain);
//! small images go several to a band, so each GEMM has more columns per weight read.

use std::cell::RefCell;
use std::mem::MaybeUninit;
use std::ops::Range;

use rayon::prelude::*;

use super::simd_math::multiversion;
use super::{matmul, resize_scratch, uninit_scratch, Operand, SyncPtr};

/// Bytes of transformed input + GEMM output per band of tile rows within one image.
const BAND_BYTES: usize = 16 << 20;
/// The same for a band of several whole images: larger, so that at the U-Net's 16×16 level
/// both CFG images share one band and each GEMM reads the transformed weights once for twice
/// the columns. (Not for large images: the VAE's peak memory would grow for no gain.)
const GROUP_BYTES: usize = 40 << 20;
/// Transformed weights held at once. Transformed, a 3×3 filter bank grows 16/9 (F(2×2)) or 4×
/// (F(4×4)): the U-Net's 2560→1280 convolution at 16×16 would take 210 MB and its 1920→640 at
/// 32×32 177 MB, the largest buffers of a denoising step (found with a counting allocator). Past
/// this size the output channels are done a group at a time, each group's filters transformed
/// just before its GEMMs; the arithmetic per output is unchanged (the same bits, tested).
const WEIGHT_BYTES: usize = 48 << 20;
/// [`WEIGHT_BYTES`] for a convolution done in one band (the U-Net's 16×16 and 32×32 levels,
/// where a step's memory peaks), or whose filters take more than [`WEIGHT_BYTES`] and so are
/// grouped anyway: each group's filters are then transformed once per band whatever the group
/// size, so smaller groups cost only GEMMs with fewer rows. A convolution with several bands
/// whose filters fit (the VAE's large images) keeps them whole, transformed once.
const WEIGHT_BYTES_ONE_BAND: usize = 16 << 20;

thread_local! {
    /// The bf16 mode's products, kept between calls on the calling thread (the f32 path takes
    /// fresh, uninitialised buffers per call instead, see [`conv3x3_tiled`]).
    static SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    /// The bf16 mode's transformed weights and inputs (bf16 pairs).
    #[cfg(target_arch = "x86_64")]
    static SCRATCH_BF16: RefCell<(Vec<u32>, Vec<super::bf16::Panels>)> = const { RefCell::new((Vec::new(), Vec::new())) };
}

/// Drops this thread's scratch buffers (they are refilled on the next call).
pub(crate) fn release_scratch() {
    SCRATCH.with_borrow_mut(|m| *m = Vec::new());
    #[cfg(target_arch = "x86_64")]
    SCRATCH_BF16.with_borrow_mut(|(u, v)| {
        *u = Vec::new();
        *v = Vec::new();
    });
}

/// The 3×3 filters, (c_out, c_in, 3, 3) row-major: f32, f16 as a checkpoint stored them, or the
/// bf16 mode's bf16 pairs (the last two widened exactly while transforming, so no f32 copy of
/// the weights is made per call).
#[derive(Clone, Copy)]
pub enum Filters<'a> {
    F32(&'a [f32]),
    F16(&'a [half::f16]),
    Bf16Pairs(&'a [u32]),
}

impl Filters<'_> {
    /// The c_in filters of output channel `o` (c_in·9 values) as f32: f32 filters as they are,
    /// the others widened into `buf` in one pass.
    fn output_channel<'b>(&'b self, o: usize, c_in: usize, buf: &'b mut Vec<f32>) -> &'b [f32] {
        let range = o * c_in * 9..(o + 1) * c_in * 9;
        match self {
            Self::F32(w) => &w[range],
            Self::F16(w) => {
                buf.resize(range.len(), 0.0);
                half::slice::HalfFloatSliceExt::convert_to_f32_slice(&w[range], buf);
                buf
            }
            Self::Bf16Pairs(pairs) => {
                buf.resize(range.len(), 0.0);
                widen_bf16_pairs(pairs, range.start, buf);
                buf
            }
        }
    }
}

multiversion! {
    /// Elements `first .. first + out.len()` of a bf16-pair array, widened (exactly) to f32:
    /// a plain loop over whole pairs so that it vectorises (the weight transform's input).
    fn widen_bf16_pairs(pairs: &[u32], first: usize, out: &mut [f32]) {
        let widen = |pair: u32, high: bool| f32::from_bits(if high { pair & 0xFFFF_0000 } else { pair << 16 });
        let mut out = out;
        let mut at = first;
        if !at.is_multiple_of(2) && !out.is_empty() {
            out[0] = widen(pairs[at / 2], true);
            out = &mut out[1..];
            at += 1;
        }
        let whole = out.len() / 2;
        for (dst, &pair) in out.chunks_exact_mut(2).zip(&pairs[at / 2..at / 2 + whole]) {
            dst[0] = widen(pair, false);
            dst[1] = widen(pair, true);
        }
        if out.len() % 2 == 1 {
            out[out.len() - 1] = widen(pairs[at / 2 + whole], false);
        }
    }
}

/// The output tile: F(2×2,3×3) (4×4 input tiles, 16 GEMMs, 4 multiplications per output) or
/// F(4×4,3×3) (6×6 input tiles, 36 GEMMs, 2.25 multiplications per output, with transformed
/// weights 4× the size of the filters and a larger, still small, rounding error).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tile {
    F2,
    F4,
}

impl Tile {
    /// Output tile side.
    fn m(self) -> usize {
        match self {
            Self::F2 => 2,
            Self::F4 => 4,
        }
    }

    /// Input tile side.
    fn t(self) -> usize {
        self.m() + 2
    }

    /// Winograd-domain positions ξ: one GEMM each.
    fn positions(self) -> usize {
        self.t() * self.t()
    }
}

/// Below this many output pixels f32 convolutions use F(2×2,3×3): F(4×4,3×3) transforms 2.25×
/// as many weight values per call and runs GEMMs with a quarter of the columns, which the
/// 16×16 level does not earn back. Measured at batch 2 on 2 cores (`kernel_bench`,
/// EASEL_BENCH_CONV=all, twice each), F(2,3) vs F(4,3): 640→640 at 32×32 42 vs 32–34 ms,
/// 1280→1280 at 32×32 156–168 vs 118 ms; 1280→1280 at 16×16 52 vs 62–65 ms, 2560→1280 at
/// 16×16 105 vs 108–110 ms. (Before the weight transform was vectorised F(4,3) lost at 32×32
/// too: 180 vs 259 ms for 1280→1280.)
const F4_MIN_PIXELS: usize = 32 * 32;

/// `out` (batch, c_out, h, w) = conv3×3(x, weight, padding 1) + bias, `out` pre-sized.
#[allow(clippy::too_many_arguments)]
pub fn conv3x3(
    x: &[f32],
    weight: Filters,
    bias: &[f32],
    batch: usize,
    c_in: usize,
    c_out: usize,
    h: usize,
    w: usize,
    out: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    if let Filters::Bf16Pairs(_) = weight {
        if c_in.is_multiple_of(2) && super::bf16::supported() {
            SCRATCH_BF16.with_borrow_mut(|(u, v)| {
                SCRATCH.with_borrow_mut(|m| conv3x3_bf16(x, weight, bias, (batch, c_in, c_out, h, w), out, u, v, m))
            });
            return;
        }
    }
    let tile = if h * w >= F4_MIN_PIXELS { Tile::F4 } else { Tile::F2 };
    conv3x3_tiled(x, weight, bias, (batch, c_in, c_out, h, w), tile, out);
}

/// [`conv3x3`] in f32 with the given output tile.
pub(crate) fn conv3x3_tiled(
    x: &[f32],
    weight: Filters,
    bias: &[f32],
    dims: (usize, usize, usize, usize, usize),
    tile: Tile,
    out: &mut [f32],
) {
    // Buffers of this call only, given back to the allocator at its end: kept between calls
    // they held ~95 MB through the whole step (the largest transform of any layer), where the
    // allocator can lend the same memory to the next layer's activations. They are never
    // zero-filled (see `uninit_scratch`), so a fresh buffer costs nothing over a kept one.
    let (mut u, mut v, mut m) = (Vec::new(), Vec::new(), Vec::new());
    conv3x3_with(x, weight, bias, dims, tile, out, &mut u, &mut v, &mut m);
}

/// [`conv3x3`] for the bf16 mode: the 16 GEMMs on the bf16 kernel, with the weights and the
/// transformed inputs rounded to bf16 pairs as they are transformed (no separate conversion
/// pass, half the bytes of the f32 buffers); products and the output transform stay f32.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
fn conv3x3_bf16(
    x: &[f32],
    weight: Filters,
    bias: &[f32],
    (batch, c_in, c_out, h, w): (usize, usize, usize, usize, usize),
    out: &mut [f32],
    u: &mut Vec<u32>,
    v: &mut Vec<super::bf16::Panels>,
    m: &mut Vec<f32>,
) {
    use super::bf16::{self, Panels, PANEL};

    let c_pairs = c_in / 2;
    // U[ξ][o][i/2]: pairs of adjacent input channels, the bf16 GEMM's row operand.
    resize_scratch(u, 16 * c_out * c_pairs);
    let u_ptr = SyncPtr(u.as_mut_ptr());
    for_each_transformed_row(weight, c_in, 0..c_out, Tile::F2, |xi, o, row| {
        // SAFETY: [ξ][o][..c_pairs] is output channel o's own row of U.
        let dst = unsafe { std::slice::from_raw_parts_mut(u_ptr.get().add((xi * c_out + o) * c_pairs), c_pairs) };
        bf16::pairs_into(row, dst);
    });
    v.resize_with(16, || Panels { data: Vec::new(), n: 0, k_pairs: 0 });
    for_each_band(x, out, (batch, c_in, c_out, h, w), Tile::F2, |x_group, out_group, band| {
        let tiles = band.tiles;
        for panels in v.iter_mut() {
            panels.n = tiles;
            panels.k_pairs = c_pairs;
            resize_scratch(&mut panels.data, tiles.div_ceil(PANEL) * c_pairs * PANEL);
        }
        transform_input_bf16(x_group, c_in, h, w, band, v);
        resize_scratch(m, 16 * c_out * tiles);
        let m_ptr = SyncPtr(m.as_mut_ptr());
        (0..16).into_par_iter().for_each(|xi| {
            let u_xi = &u[xi * c_out * c_pairs..(xi + 1) * c_out * c_pairs];
            // SAFETY: bf16 kernels run only when supported (checked by the caller); each ξ
            // writes only its own c_out × tiles block of M.
            unsafe { bf16::gemm_into(c_out, u_xi, c_pairs, &v[xi], m_ptr.get().add(xi * c_out * tiles), tiles, false) };
        });
        transform_output(m, bias, 0..c_out, c_out, h, w, band, Tile::F2, out_group);
    });
}

/// Which tiles one band holds: tile rows `ty0 .. ty0 + rows` of each of `images` consecutive
/// images (several images only when each is whole, `ty0` = 0), `tiles` tiles in all, numbered
/// image by image, then row by row.
#[derive(Clone, Copy)]
struct Band {
    images: usize,
    ty0: usize,
    rows: usize,
    tiles: usize,
}

impl Band {
    /// Calls `f(image, ty, first_tile)` for every tile row of the band.
    fn for_each_row(&self, tiles_x: usize, mut f: impl FnMut(usize, usize, usize)) {
        for image in 0..self.images {
            for ty in 0..self.rows {
                f(image, self.ty0 + ty, (image * self.rows + ty) * tiles_x);
            }
        }
    }
}

/// An initialised buffer as the write-only target the transforms take.
fn as_uninit(values: &mut [f32]) -> &mut [MaybeUninit<f32>] {
    // SAFETY: same layout; the transforms only ever store initialised values through it, so
    // `values` stays initialised.
    unsafe { std::slice::from_raw_parts_mut(values.as_mut_ptr().cast(), values.len()) }
}

/// Whether [`for_each_band`] does the whole convolution in one band.
fn one_band((batch, c_in, c_out, h, w): (usize, usize, usize, usize, usize), tile: Tile) -> bool {
    let (tiles_y, tiles_x) = (h.div_ceil(tile.m()), w.div_ceil(tile.m()));
    let row_bytes = (4 * tile.positions() * (c_in + c_out) * tiles_x).max(1);
    row_bytes * tiles_y * batch <= GROUP_BYTES
}

/// Calls `band(x_group, out_group, band)` for each band, with the input and output of the
/// band's images; bands are sized so the transformed input and the products stay within
/// [`BAND_BYTES`] (or [`GROUP_BYTES`] for several whole images).
fn for_each_band(
    x: &[f32],
    out: &mut [f32],
    (batch, c_in, c_out, h, w): (usize, usize, usize, usize, usize),
    tile: Tile,
    mut band: impl FnMut(&[f32], &mut [f32], Band),
) {
    let (tiles_y, tiles_x) = (h.div_ceil(tile.m()), w.div_ceil(tile.m()));
    #[cfg(test)]
    let (band_bytes, group_bytes) = tests::BAND_BYTES_OVERRIDE.get().map_or((BAND_BYTES, GROUP_BYTES), |b| (b, b));
    #[cfg(not(test))]
    let (band_bytes, group_bytes) = (BAND_BYTES, GROUP_BYTES);
    let row_bytes = (4 * tile.positions() * (c_in + c_out) * tiles_x).max(1);
    let (x_size, out_size) = (c_in * h * w, c_out * h * w);
    if row_bytes * tiles_y <= group_bytes {
        let per_band = (group_bytes / (row_bytes * tiles_y)).clamp(1, batch);
        let mut image = 0;
        while image < batch {
            let images = per_band.min(batch - image);
            let (x_group, out_group) = (
                &x[image * x_size..(image + images) * x_size],
                &mut out[image * out_size..(image + images) * out_size],
            );
            band(x_group, out_group, Band { images, ty0: 0, rows: tiles_y, tiles: images * tiles_y * tiles_x });
            image += images;
        }
        return;
    }
    let band_rows = (band_bytes / row_bytes).clamp(1, tiles_y);
    for image in 0..batch {
        let x_image = &x[image * x_size..(image + 1) * x_size];
        let out_image = &mut out[image * out_size..(image + 1) * out_size];
        let mut ty0 = 0;
        while ty0 < tiles_y {
            let rows = band_rows.min(tiles_y - ty0);
            band(x_image, out_image, Band { images: 1, ty0, rows, tiles: rows * tiles_x });
            ty0 += rows;
        }
    }
}

/// [`transform_input`] into the bf16 GEMM's panels: V_ξ with tiles as columns (64 per panel)
/// and pairs of adjacent input channels along k; parallel over channel pairs.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
fn transform_input_bf16(x: &[f32], c_in: usize, h: usize, w: usize, band: Band, v: &mut [super::bf16::Panels]) {
    use super::bf16::PANEL;

    let tiles_x = w.div_ceil(2);
    let padded = 2 * tiles_x + 2;
    let c_pairs = c_in / 2;
    let v_ptrs: Vec<SyncPtr<u32>> = v.iter_mut().map(|p| SyncPtr(p.data.as_mut_ptr())).collect();
    (0..c_pairs).into_par_iter().for_each_init(
        || vec![0f32; 2 * (8 * padded + 16 * tiles_x)],
        |scratch, ip| {
            let (first, second) = scratch.split_at_mut(8 * padded + 16 * tiles_x);
            band.for_each_row(tiles_x, |image, ty, first_tile| {
                for (channel_scratch, i) in [(&mut *first, 2 * ip), (&mut *second, 2 * ip + 1)] {
                    let channel = &x[(image * c_in + i) * h * w..][..h * w];
                    let (input_rows, rest) = channel_scratch.split_at_mut(4 * padded);
                    let (mixed, transformed) = rest.split_at_mut(4 * padded);
                    mix_tile_row(channel, h, w, ty, Tile::F2, input_rows, mixed);
                    for a in 0..4 {
                        for b in 0..4 {
                            let xi = a * 4 + b;
                            columns_transform(
                                &mixed[a * padded..(a + 1) * padded],
                                as_uninit(&mut transformed[xi * tiles_x..(xi + 1) * tiles_x]),
                                b,
                            );
                        }
                    }
                }
                let lo_all = &first[8 * padded..];
                let hi_all = &second[8 * padded..];
                for (xi, v_xi) in v_ptrs.iter().enumerate() {
                    let (lo, hi) =
                        (&lo_all[xi * tiles_x..(xi + 1) * tiles_x], &hi_all[xi * tiles_x..(xi + 1) * tiles_x]);
                    for (tx, (&l, &hv)) in lo.iter().zip(hi).enumerate() {
                        let t = first_tile + tx;
                        let at = ((t / PANEL) * c_pairs + ip) * PANEL + t % PANEL;
                        // SAFETY: inside V_ξ's panels (sized for `tiles` columns and c_in/2 pairs);
                        // each channel pair ip writes only its own pair rows.
                        unsafe { *v_xi.get().add(at) = super::bf16::pair(l, hv) };
                    }
                }
            });
        },
    );
}

#[allow(clippy::too_many_arguments)]
fn conv3x3_with(
    x: &[f32],
    weight: Filters,
    bias: &[f32],
    (batch, c_in, c_out, h, w): (usize, usize, usize, usize, usize),
    tile: Tile,
    out: &mut [f32],
    u: &mut Vec<f32>,
    v: &mut Vec<f32>,
    m: &mut Vec<f32>,
) {
    let positions = tile.positions();
    let grouped_anyway = 4 * positions * c_in * c_out > WEIGHT_BYTES;
    let weight_bytes =
        if grouped_anyway || one_band((batch, c_in, c_out, h, w), tile) { WEIGHT_BYTES_ONE_BAND } else { WEIGHT_BYTES };
    #[cfg(test)]
    let weight_bytes = tests::WEIGHT_BYTES_OVERRIDE.get().unwrap_or(weight_bytes);
    let per_channel = 4 * positions * c_in;
    // Groups of whole GEMM micro-panels (16 rows) where there is room for one.
    let mut group = (weight_bytes / per_channel.max(1)).clamp(1, c_out.max(1));
    if (16..c_out).contains(&group) {
        group -= group % 16;
    }
    let groups: Vec<Range<usize>> = (0..c_out).step_by(group).map(|o| o..(o + group).min(c_out)).collect();
    // One group: its weights are transformed once, whatever the number of bands.
    let whole = groups.len() == 1;
    if whole {
        transform_weights(weight, c_in, 0..c_out, tile, u);
    }
    for_each_band(x, out, (batch, c_in, c_out, h, w), tile, |x_group, out_group, band| {
        let v_len = positions * c_in * band.tiles;
        transform_input(x_group, c_in, h, w, band, tile, uninit_scratch(v, v_len));
        // SAFETY: `transform_input` wrote every value of V (each ξ, channel and tile of the band).
        unsafe { v.set_len(v_len) };
        for channels in &groups {
            if !whole {
                transform_weights(weight, c_in, channels.clone(), tile, u);
            }
            let m_len = positions * channels.len() * band.tiles;
            if c_in == 0 {
                // No products to write M: it is all zeros.
                resize_scratch(m, m_len);
                m.fill(0.0);
            } else {
                multiply(u, v, uninit_scratch(m, m_len), c_in, channels.len(), band.tiles, positions);
                // SAFETY: every ξ's GEMM wrote its whole c_out × tiles block (without reading it).
                unsafe { m.set_len(m_len) };
            }
            transform_output(m, bias, channels.clone(), c_out, h, w, band, tile, out_group);
        }
    });
}

/// U[ξ][o][i] = (G g Gᵀ)_ξ for every filter g = weight[o][i] (3×3) of the output channels
/// `channels`, into `u` (resized; o counted from the first of them).
fn transform_weights(weight: Filters, c_in: usize, channels: Range<usize>, tile: Tile, u: &mut Vec<f32>) {
    let (positions, first, count) = (tile.positions(), channels.start, channels.len());
    let len = positions * count * c_in;
    let u_ptr = SyncPtr(uninit_scratch(u, len).as_mut_ptr().cast::<f32>());
    for_each_transformed_row(weight, c_in, channels, tile, |xi, o, row| {
        // SAFETY: [ξ][o - first][..c_in] is output channel o's own row of U, inside its `len`.
        unsafe { std::ptr::copy_nonoverlapping(row.as_ptr(), u_ptr.get().add((xi * count + o - first) * c_in), c_in) };
    });
    // SAFETY: every (ξ, output channel) row of U was written above.
    unsafe { u.set_len(len) };
}

/// Transforms the filters of the output channels `channels`, in parallel over them, and hands
/// each position's row of c_in transformed values to `write(ξ, o, row)`.
fn for_each_transformed_row(
    weight: Filters,
    c_in: usize,
    channels: Range<usize>,
    tile: Tile,
    write: impl Fn(usize, usize, &[f32]) + Sync,
) {
    channels.into_par_iter().for_each_init(
        || (Vec::new(), vec![0f32; tile.positions() * c_in]),
        |(buf, transformed), o| {
            transform_channel(weight.output_channel(o, c_in, buf), tile, transformed);
            for (xi, row) in transformed.chunks_exact(c_in).enumerate() {
                write(xi, o, row);
            }
        },
    );
}

/// Filters transformed per vector: the filters are read transposed, one filter per lane, so
/// every step of G g Gᵀ is one vector operation on this many filters.
const FILTER_LANES: usize = 16;

type Lanes = [f32; FILTER_LANES];

/// The value of `f` for every lane (a plain loop: `array::from_fn` is not always inlined, and
/// out of line it runs without the caller's vector features).
#[inline(always)]
fn lanes(f: impl Fn(usize) -> f32) -> Lanes {
    let mut out = [0f32; FILTER_LANES];
    for (l, value) in out.iter_mut().enumerate() {
        *value = f(l);
    }
    out
}

/// G of F(2×2,3×3) applied to a column (g0, g1, g2): (g0, ½(g0+g1+g2), ½(g0−g1+g2), g2).
#[inline(always)]
fn g_times_f2(g0: &Lanes, g1: &Lanes, g2: &Lanes) -> [Lanes; 4] {
    [*g0, lanes(|l| 0.5 * (g0[l] + g1[l] + g2[l])), lanes(|l| 0.5 * (g0[l] - g1[l] + g2[l])), *g2]
}

/// Lavin & Gray's G for F(4×4,3×3) applied to a column, with reciprocals multiplied rather
/// than divided by (vector division is several times slower, and this is most of the work).
#[inline(always)]
fn g_times_f4(g0: &Lanes, g1: &Lanes, g2: &Lanes) -> [Lanes; 6] {
    const SIXTH: f32 = 1.0 / 6.0;
    const TWELFTH: f32 = 1.0 / 12.0;
    const TWENTY_FOURTH: f32 = 1.0 / 24.0;
    [
        lanes(|l| g0[l] * 0.25),
        lanes(|l| -(g0[l] + g1[l] + g2[l]) * SIXTH),
        lanes(|l| -(g0[l] - g1[l] + g2[l]) * SIXTH),
        lanes(|l| g0[l] * TWENTY_FOURTH + g1[l] * TWELFTH + g2[l] * SIXTH),
        lanes(|l| g0[l] * TWENTY_FOURTH - g1[l] * TWELFTH + g2[l] * SIXTH),
        *g2,
    ]
}

/// G g Gᵀ of a block of filters (`g[e]`: element e of each): G down the filters' three columns,
/// then along each resulting row; `store(ξ, values)` receives each position's values.
#[inline(always)]
fn g_g_gt<const T: usize>(
    g: &[Lanes; 9],
    g_times: impl Fn(&Lanes, &Lanes, &Lanes) -> [Lanes; T],
    store: &mut impl FnMut(usize, &Lanes),
) {
    let [c0, c1, c2] = [g_times(&g[0], &g[3], &g[6]), g_times(&g[1], &g[4], &g[7]), g_times(&g[2], &g[5], &g[8])];
    for (a, ((r0, r1), r2)) in c0.iter().zip(&c1).zip(&c2).enumerate() {
        g_times(r0, r1, r2).iter().enumerate().for_each(|(b, values)| store(a * T + b, values));
    }
}

multiversion! {
    /// (G g Gᵀ)_ξ of one output channel's filters (c_in·9 values, see
    /// [`Filters::output_channel`]) into `transformed`, laid out [ξ][i].
    ///
    /// Written per lane block rather than per filter because this runs on every weight of every
    /// 3×3 convolution on every call (the transformed weights are 1.8–4× the filters' size, too
    /// much memory to keep): one filter at a time it was ~9% of a U-Net step. The arithmetic is
    /// the same, in the same order, as the one-filter definition (tests check bit equality).
    fn transform_channel(channel: &[f32], tile: Tile, transformed: &mut [f32]) {
        let c_in = channel.len() / 9;
        let mut i0 = 0;
        while i0 < c_in {
            let n = FILTER_LANES.min(c_in - i0);
            // g[e][l]: element e (row-major 3×3) of filter i0 + l.
            let mut g = [[0f32; FILTER_LANES]; 9];
            for l in 0..n {
                for (e, ge) in g.iter_mut().enumerate() {
                    ge[l] = channel[(i0 + l) * 9 + e];
                }
            }
            let mut store = |xi: usize, values: &Lanes| {
                transformed[xi * c_in + i0..xi * c_in + i0 + n].copy_from_slice(&values[..n]);
            };
            match tile {
                Tile::F2 => g_g_gt(&g, g_times_f2, &mut store),
                Tile::F4 => g_g_gt(&g, g_times_f4, &mut store),
            }
            i0 += n;
        }
    }
}

/// V[ξ][i][t] = (Bᵀ d B)_ξ for the input tile d of each tile t of the band.
fn transform_input(x: &[f32], c_in: usize, h: usize, w: usize, band: Band, tile: Tile, v: &mut [MaybeUninit<f32>]) {
    let (m, t) = (tile.m(), tile.t());
    let tiles_x = w.div_ceil(m);
    let tiles = band.tiles;
    // Padded input rows: one zero column on the left, enough on the right for ragged widths.
    let padded = m * tiles_x + 2;
    let v_ptr = SyncPtr(v.as_mut_ptr());
    (0..c_in).into_par_iter().for_each_init(
        || vec![0f32; 2 * t * padded],
        |scratch, i| {
            let (input_rows, mixed) = scratch.split_at_mut(t * padded);
            band.for_each_row(tiles_x, |image, ty, first_tile| {
                let channel = &x[(image * c_in + i) * h * w..][..h * w];
                mix_tile_row(channel, h, w, ty, tile, input_rows, mixed);
                for a in 0..t {
                    let u_row = &mixed[a * padded..(a + 1) * padded];
                    for b in 0..t {
                        let xi = a * t + b;
                        // SAFETY: [ξ][i][first_tile ..] is this channel's own row of V.
                        let dst = unsafe {
                            std::slice::from_raw_parts_mut(
                                v_ptr.get().add((xi * c_in + i) * tiles + first_tile),
                                tiles_x,
                            )
                        };
                        match tile {
                            Tile::F2 => columns_transform(u_row, dst, b),
                            Tile::F4 => columns_transform_f4(u_row, dst, b),
                        }
                    }
                }
            });
        },
    );
}

/// The t input rows of tile row `ty` (rows m·ty − 1 … m·ty + m, zero outside the image, one
/// zero column on the left) into `input_rows`, then Bᵀ down them into `mixed` (t rows each).
fn mix_tile_row(channel: &[f32], h: usize, w: usize, ty: usize, tile: Tile, input_rows: &mut [f32], mixed: &mut [f32]) {
    let padded = input_rows.len() / tile.t();
    for (r, row) in input_rows.chunks_exact_mut(padded).enumerate() {
        let iy = (tile.m() * ty + r) as isize - 1;
        row.fill(0.0);
        if iy >= 0 && (iy as usize) < h {
            row[1..1 + w].copy_from_slice(&channel[iy as usize * w..(iy as usize + 1) * w]);
        }
    }
    match tile {
        Tile::F2 => rows_transform(input_rows, mixed, padded),
        Tile::F4 => rows_transform_f4(input_rows, mixed, padded),
    }
}

/// Bᵀ of F(4×4,3×3) applied to one 6-vector d.
#[inline(always)]
fn input_mix_f4(d: [f32; 6]) -> [f32; 6] {
    [
        4.0 * d[0] - 5.0 * d[2] + d[4],
        -4.0 * (d[1] + d[2]) + d[3] + d[4],
        4.0 * (d[1] - d[2]) - d[3] + d[4],
        2.0 * (d[3] - d[1]) - d[2] + d[4],
        2.0 * (d[1] - d[3]) - d[2] + d[4],
        4.0 * d[1] - 5.0 * d[3] + d[5],
    ]
}

multiversion! {
    /// Bᵀ (F(4×4,3×3)) applied down the 6 input rows, over every column at once.
    fn rows_transform_f4(input: &[f32], mixed: &mut [f32], n: usize) {
        let rows: [&[f32]; 6] = std::array::from_fn(|r| &input[r * n..(r + 1) * n]);
        let (m0, rest) = mixed.split_at_mut(n);
        let (m1, rest) = rest.split_at_mut(n);
        let (m2, rest) = rest.split_at_mut(n);
        let (m3, rest) = rest.split_at_mut(n);
        let (m4, m5) = rest.split_at_mut(n);
        for j in 0..n {
            let out = input_mix_f4(std::array::from_fn(|r| rows[r][j]));
            (m0[j], m1[j], m2[j], m3[j], m4[j], m5[j]) = (out[0], out[1], out[2], out[3], out[4], out[5]);
        }
    }
}

multiversion! {
    /// Column b of B (F(4×4,3×3)) along one mixed row, one value per tile (tiles every 4 columns).
    fn columns_transform_f4(row: &[f32], dst: &mut [MaybeUninit<f32>], b: usize) {
        let at = |t: usize, c: usize| row[4 * t + c];
        match b {
            0 => dst.iter_mut().enumerate().for_each(|(t, d)| _ = d.write(4.0 * at(t, 0) - 5.0 * at(t, 2) + at(t, 4))),
            1 => dst.iter_mut().enumerate().for_each(|(t, d)| _ = d.write(-4.0 * (at(t, 1) + at(t, 2)) + at(t, 3) + at(t, 4))),
            2 => dst.iter_mut().enumerate().for_each(|(t, d)| _ = d.write(4.0 * (at(t, 1) - at(t, 2)) - at(t, 3) + at(t, 4))),
            3 => dst.iter_mut().enumerate().for_each(|(t, d)| _ = d.write(2.0 * (at(t, 3) - at(t, 1)) - at(t, 2) + at(t, 4))),
            4 => dst.iter_mut().enumerate().for_each(|(t, d)| _ = d.write(2.0 * (at(t, 1) - at(t, 3)) - at(t, 2) + at(t, 4))),
            _ => dst.iter_mut().enumerate().for_each(|(t, d)| _ = d.write(4.0 * at(t, 1) - 5.0 * at(t, 3) + at(t, 5))),
        }
    }
}

multiversion! {
    /// Bᵀ applied down the 4 input rows, over every column at once.
    fn rows_transform(input: &[f32], mixed: &mut [f32], n: usize) {
        let (r0, rest) = input.split_at(n);
        let (r1, rest) = rest.split_at(n);
        let (r2, r3) = rest.split_at(n);
        let (m0, rest) = mixed.split_at_mut(n);
        let (m1, rest) = rest.split_at_mut(n);
        let (m2, m3) = rest.split_at_mut(n);
        for j in 0..n {
            m0[j] = r0[j] - r2[j];
            m1[j] = r1[j] + r2[j];
            m2[j] = r2[j] - r1[j];
            m3[j] = r1[j] - r3[j];
        }
    }
}

multiversion! {
    /// Column b of B applied along one mixed row, one value per tile (tiles start every 2 columns).
    fn columns_transform(row: &[f32], dst: &mut [MaybeUninit<f32>], b: usize) {
        match b {
            0 => dst.iter_mut().enumerate().for_each(|(t, d)| _ = d.write(row[2 * t] - row[2 * t + 2])),
            1 => dst.iter_mut().enumerate().for_each(|(t, d)| _ = d.write(row[2 * t + 1] + row[2 * t + 2])),
            2 => dst.iter_mut().enumerate().for_each(|(t, d)| _ = d.write(row[2 * t + 2] - row[2 * t + 1])),
            _ => dst.iter_mut().enumerate().for_each(|(t, d)| _ = d.write(row[2 * t + 1] - row[2 * t + 3])),
        }
    }
}

/// M_ξ = U_ξ · V_ξ for every position, as independent single-threaded GEMMs on all cores.
fn multiply(
    u: &[f32],
    v: &[f32],
    m: &mut [MaybeUninit<f32>],
    c_in: usize,
    c_out: usize,
    tiles: usize,
    positions: usize,
) {
    debug_assert!(m.len() >= positions * c_out * tiles);
    // The GEMMs write M without reading it (`accumulate` false).
    let m_ptr = SyncPtr(m.as_mut_ptr().cast::<f32>());
    let gemm_one = |xi: usize| {
        let u_xi = &u[xi * c_out * c_in..(xi + 1) * c_out * c_in];
        let v_xi = &v[xi * c_in * tiles..(xi + 1) * c_in * tiles];
        // SAFETY: each ξ writes only its own c_out × tiles block of M.
        unsafe {
            matmul(
                c_out,
                tiles,
                c_in,
                m_ptr.get().add(xi * c_out * tiles),
                tiles,
                false,
                Operand::rows(u_xi, c_in),
                Operand::rows(v_xi, tiles),
                1.0,
                1,
            )
        }
    };
    (0..positions).into_par_iter().for_each(gemm_one);
}

/// Y = Aᵀ M A + bias for every tile of the band and the output channels `channels` (M holds
/// only theirs), written into the NCHW output of `c_out` channels.
#[allow(clippy::too_many_arguments)]
fn transform_output(
    m: &[f32],
    bias: &[f32],
    channels: Range<usize>,
    c_out: usize,
    h: usize,
    w: usize,
    band: Band,
    tile: Tile,
    out: &mut [f32],
) {
    if tile == Tile::F4 {
        return transform_output_f4(m, bias, channels, c_out, h, w, band, out);
    }
    let tiles_x = w.div_ceil(2);
    let tiles = band.tiles;
    let (first, count) = (channels.start, channels.len());
    let out_ptr = SyncPtr(out.as_mut_ptr());
    channels.into_par_iter().for_each_init(
        || vec![0f32; 4 * 2 * tiles_x],
        |scratch, o| {
            band.for_each_row(tiles_x, |image, ty, first_tile| {
                let at = |xi: usize| &m[(xi * count + o - first) * tiles + first_tile..][..tiles_x];
                // Aᵀ down the rows of the tile: p[0][b] = m0b + m1b + m2b, p[1][b] = m1b − m2b − m3b.
                let (top, bottom) = scratch.split_at_mut(4 * tiles_x);
                for b in 0..4 {
                    output_rows(
                        at(b),
                        at(4 + b),
                        at(8 + b),
                        at(12 + b),
                        &mut top[b * tiles_x..(b + 1) * tiles_x],
                        &mut bottom[b * tiles_x..(b + 1) * tiles_x],
                    );
                }
                for (half, p) in [&*top, &*bottom].into_iter().enumerate() {
                    let y = 2 * ty + half;
                    if y >= h {
                        continue;
                    }
                    // SAFETY: row y of channel o; each o writes only its own channel.
                    let dst = unsafe {
                        std::slice::from_raw_parts_mut(out_ptr.get().add(((image * c_out + o) * h + y) * w), w)
                    };
                    output_columns(
                        &p[..tiles_x],
                        &p[tiles_x..2 * tiles_x],
                        &p[2 * tiles_x..3 * tiles_x],
                        &p[3 * tiles_x..],
                        bias[o],
                        dst,
                    );
                }
            });
        },
    );
}

multiversion! {
    fn output_rows(m0: &[f32], m1: &[f32], m2: &[f32], m3: &[f32], top: &mut [f32], bottom: &mut [f32]) {
        for t in 0..top.len() {
            top[t] = m0[t] + m1[t] + m2[t];
            bottom[t] = m1[t] - m2[t] - m3[t];
        }
    }
}

multiversion! {
    /// Aᵀ along the columns: output columns 2t and 2t+1 of one image row.
    fn output_columns(p0: &[f32], p1: &[f32], p2: &[f32], p3: &[f32], bias: f32, dst: &mut [f32]) {
        let mut pairs = dst.chunks_exact_mut(2);
        for (t, pair) in (&mut pairs).enumerate() {
            pair[0] = p0[t] + p1[t] + p2[t] + bias;
            pair[1] = p1[t] - p2[t] - p3[t] + bias;
        }
        if let Some(last) = pairs.into_remainder().first_mut() {
            let t = p0.len() - 1;
            *last = p0[t] + p1[t] + p2[t] + bias;
        }
    }
}

/// [`transform_output`] for F(4×4,3×3): Y = Aᵀ M A + bias.
#[allow(clippy::too_many_arguments)]
fn transform_output_f4(
    m: &[f32],
    bias: &[f32],
    channels: Range<usize>,
    c_out: usize,
    h: usize,
    w: usize,
    band: Band,
    out: &mut [f32],
) {
    let tiles_x = w.div_ceil(4);
    let tiles = band.tiles;
    let (first, count) = (channels.start, channels.len());
    let out_ptr = SyncPtr(out.as_mut_ptr());
    channels.into_par_iter().for_each_init(
        // p[r][b][t]: Aᵀ down the tile's rows, for output row r and Winograd column b.
        || vec![0f32; 4 * 6 * tiles_x],
        |scratch, o| {
            band.for_each_row(tiles_x, |image, ty, first_tile| {
                let at = |xi: usize| &m[(xi * count + o - first) * tiles + first_tile..][..tiles_x];
                for b in 0..6 {
                    // The scratch holds the 4 output rows, 6 Winograd columns of `tiles_x` each.
                    let span = b * tiles_x..(b + 1) * tiles_x;
                    let (r0, rest) = scratch.split_at_mut(6 * tiles_x);
                    let (r1, rest) = rest.split_at_mut(6 * tiles_x);
                    let (r2, r3) = rest.split_at_mut(6 * tiles_x);
                    let p = [&mut r0[span.clone()], &mut r1[span.clone()], &mut r2[span.clone()], &mut r3[span]];
                    output_rows_f4(std::array::from_fn(|a| at(a * 6 + b)), p);
                }
                for (r, p) in scratch.chunks_exact(6 * tiles_x).enumerate() {
                    let y = 4 * ty + r;
                    if y >= h {
                        continue;
                    }
                    // SAFETY: row y of channel o; each o writes only its own channel.
                    let dst = unsafe {
                        std::slice::from_raw_parts_mut(out_ptr.get().add(((image * c_out + o) * h + y) * w), w)
                    };
                    output_columns_f4(std::array::from_fn(|b| &p[b * tiles_x..(b + 1) * tiles_x]), bias[o], dst);
                }
            });
        },
    );
}

/// Aᵀ of F(4×4,3×3) applied to one 6-vector.
#[inline(always)]
fn output_mix_f4(m: [f32; 6]) -> [f32; 4] {
    let (sum12, diff12) = (m[1] + m[2], m[1] - m[2]);
    let (sum34, diff34) = (m[3] + m[4], m[3] - m[4]);
    [m[0] + sum12 + sum34, diff12 + 2.0 * diff34, sum12 + 4.0 * sum34, diff12 + 8.0 * diff34 + m[5]]
}

multiversion! {
    fn output_rows_f4(m: [&[f32]; 6], p: [&mut [f32]; 4]) {
        let [p0, p1, p2, p3] = p;
        for t in 0..p0.len() {
            let y = output_mix_f4(std::array::from_fn(|a| m[a][t]));
            (p0[t], p1[t], p2[t], p3[t]) = (y[0], y[1], y[2], y[3]);
        }
    }
}

multiversion! {
    /// Aᵀ along the columns: output columns 4t … 4t+3 of one image row.
    fn output_columns_f4(p: [&[f32]; 6], bias: f32, dst: &mut [f32]) {
        let mut quads = dst.chunks_exact_mut(4);
        for (t, quad) in (&mut quads).enumerate() {
            let y = output_mix_f4(std::array::from_fn(|b| p[b][t]));
            for (d, v) in quad.iter_mut().zip(y) {
                *d = v + bias;
            }
        }
        let rest = quads.into_remainder();
        if !rest.is_empty() {
            let y = output_mix_f4(std::array::from_fn(|b| p[b][p[0].len() - 1]));
            for (d, v) in rest.iter_mut().zip(y) {
                *d = v + bias;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;

    use super::*;
    use crate::kernels::test_values as values;

    thread_local! {
        /// Band size for this test thread, to exercise every way of cutting an image into bands.
        pub(super) static BAND_BYTES_OVERRIDE: Cell<Option<usize>> = const { Cell::new(None) };
        /// Transformed-weight budget for this test thread, to exercise groups of output channels.
        pub(super) static WEIGHT_BYTES_OVERRIDE: Cell<Option<usize>> = const { Cell::new(None) };
    }

    /// G g Gᵀ of one 3×3 filter, the 16 values in ξ order: the definition, one filter at a time.
    fn filter_transform(g: &[f32; 9]) -> [f32; 16] {
        let mut gg = [[0f32; 3]; 4];
        for c in 0..3 {
            let (g0, g1, g2) = (g[c], g[3 + c], g[6 + c]);
            gg[0][c] = g0;
            gg[1][c] = 0.5 * (g0 + g1 + g2);
            gg[2][c] = 0.5 * (g0 - g1 + g2);
            gg[3][c] = g2;
        }
        let mut u = [0f32; 16];
        for (a, row) in gg.iter().enumerate() {
            let (r0, r1, r2) = (row[0], row[1], row[2]);
            u[a * 4..a * 4 + 4].copy_from_slice(&[r0, 0.5 * (r0 + r1 + r2), 0.5 * (r0 - r1 + r2), r2]);
        }
        u
    }

    /// G g Gᵀ of one 3×3 filter for F(4×4,3×3), the 36 values in ξ order (Lavin & Gray's G).
    fn filter_transform_f4(g: &[f32; 9]) -> [f32; 36] {
        // G applied to a column (g0, g1, g2) of the filter.
        // (Division by 4, 6, 12 and 24 as multiplication by the rounded reciprocals.)
        let (sixth, twelfth, twenty_fourth) = (1.0 / 6.0, 1.0 / 12.0, 1.0 / 24.0);
        let g_times = |g0: f32, g1: f32, g2: f32| {
            [
                g0 * 0.25,
                -(g0 + g1 + g2) * sixth,
                -(g0 - g1 + g2) * sixth,
                g0 * twenty_fourth + g1 * twelfth + g2 * sixth,
                g0 * twenty_fourth - g1 * twelfth + g2 * sixth,
                g2,
            ]
        };
        let columns: [[f32; 6]; 3] = std::array::from_fn(|c| g_times(g[c], g[3 + c], g[6 + c]));
        let mut u = [0f32; 36];
        for a in 0..6 {
            u[a * 6..a * 6 + 6].copy_from_slice(&g_times(columns[0][a], columns[1][a], columns[2][a]));
        }
        u
    }

    /// The lane-blocked transform is the one-filter definition, bit for bit, for every filter of
    /// a channel count that leaves a partial block.
    #[test]
    fn weight_transform_is_the_per_filter_definition_bit_for_bit() {
        let c_in = 2 * FILTER_LANES + 5;
        let channel = values(c_in * 9, 7);
        for tile in [Tile::F2, Tile::F4] {
            let positions = tile.positions();
            let mut transformed = vec![f32::NAN; positions * c_in];
            transform_channel(&channel, tile, &mut transformed);
            for i in 0..c_in {
                let g: [f32; 9] = std::array::from_fn(|e| channel[i * 9 + e]);
                let expected = match tile {
                    Tile::F2 => filter_transform(&g).to_vec(),
                    Tile::F4 => filter_transform_f4(&g).to_vec(),
                };
                for (xi, value) in expected.iter().enumerate() {
                    assert_eq!(
                        transformed[xi * c_in + i].to_bits(),
                        value.to_bits(),
                        "{tile:?} filter {i} position {xi}"
                    );
                }
            }
        }
    }

    /// The vectorised widening reads every element of a bf16-pair array exactly, from even and
    /// odd starting points, for even and odd lengths (odd channel counts give both).
    #[test]
    fn bf16_pairs_widen_element_by_element() {
        let elements = values(41, 4);
        let pairs: Vec<u32> = elements
            .chunks(2)
            .map(|p| (p.get(1).map_or(0, |x| x.to_bits() & 0xFFFF_0000)) | (p[0].to_bits() >> 16))
            .collect();
        let element = |at: usize| {
            let pair = pairs[at / 2];
            f32::from_bits(if at.is_multiple_of(2) { pair << 16 } else { pair & 0xFFFF_0000 })
        };
        for first in 0..5 {
            for len in [0, 1, 2, 7, 18, 36] {
                let mut out = vec![f32::NAN; len];
                widen_bf16_pairs(&pairs, first, &mut out);
                for (i, got) in out.iter().enumerate() {
                    assert_eq!(got.to_bits(), element(first + i).to_bits(), "first {first}, len {len}, element {i}");
                }
            }
        }
    }

    /// Whatever the bands — one tile row each, part of an image, whole images, several images
    /// at once — every tile gets the same result (the reference for the result itself is the
    /// definition, in conv2d's tests).
    #[test]
    fn banding_does_not_change_the_result() {
        let (batch, c_in, c_out, h, w) = (3, 6, 5, 13, 10);
        let x = values(batch * c_in * h * w, 1);
        let weight = values(c_out * c_in * 9, 2);
        // bf16 pairs by truncation (low half: the even element), as `Filters::output_channel` reads them.
        let weight_pairs: Vec<u32> =
            weight.chunks(2).map(|p| (p[1].to_bits() & 0xFFFF_0000) | (p[0].to_bits() >> 16)).collect();
        let bias = values(c_out, 3);
        let cases = [
            (Filters::F32(&weight), Some(Tile::F2)),
            (Filters::F32(&weight), Some(Tile::F4)),
            (Filters::Bf16Pairs(&weight_pairs), None),
        ];
        for (filters, tile) in cases {
            let m = tile.map_or(2, Tile::m);
            let tiles_x = w.div_ceil(m);
            let row_bytes = 4 * (m + 2) * (m + 2) * (c_in + c_out) * tiles_x;
            let tiles_y = h.div_ceil(m);
            let mut results = Vec::new();
            for band_bytes in [1, 3 * row_bytes, tiles_y * row_bytes, 2 * tiles_y * row_bytes, usize::MAX / 4] {
                BAND_BYTES_OVERRIDE.set(Some(band_bytes));
                let mut out = vec![f32::NAN; batch * c_out * h * w];
                match tile {
                    Some(tile) => conv3x3_tiled(&x, filters, &bias, (batch, c_in, c_out, h, w), tile, &mut out),
                    None => conv3x3(&x, filters, &bias, batch, c_in, c_out, h, w, &mut out),
                }
                results.push(out);
            }
            BAND_BYTES_OVERRIDE.set(None);
            for other in &results[1..] {
                for (a, b) in results[0].iter().zip(other) {
                    assert!((a - b).abs() <= 1e-5 * a.abs().max(1.0), "{a} vs {b}");
                }
            }
        }
    }

    /// Output channels a group at a time (one at a time; 16 or 32 at a time, with a remainder),
    /// with one band or several: the same bits as all channels at once.
    #[test]
    fn groups_of_output_channels_give_the_same_bits() {
        let (batch, c_in, c_out, h, w) = (2, 5, 37, 9, 11);
        let x = values(batch * c_in * h * w, 4);
        let weight = values(c_out * c_in * 9, 5);
        let bias = values(c_out, 6);
        for tile in [Tile::F2, Tile::F4] {
            let per_channel = 4 * tile.positions() * c_in;
            for band_bytes in [None, Some(1)] {
                BAND_BYTES_OVERRIDE.set(band_bytes);
                let run = |weight_bytes: Option<usize>| {
                    WEIGHT_BYTES_OVERRIDE.set(weight_bytes);
                    let mut out = vec![f32::NAN; batch * c_out * h * w];
                    conv3x3_tiled(&x, Filters::F32(&weight), &bias, (batch, c_in, c_out, h, w), tile, &mut out);
                    out.into_iter().map(f32::to_bits).collect::<Vec<_>>()
                };
                let whole = run(None);
                for weight_bytes in [1, 16 * per_channel, 36 * per_channel] {
                    assert_eq!(run(Some(weight_bytes)), whole, "{weight_bytes} bytes of weights at once");
                }
            }
        }
        BAND_BYTES_OVERRIDE.set(None);
        WEIGHT_BYTES_OVERRIDE.set(None);
    }
}
