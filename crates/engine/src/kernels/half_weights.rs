//! Weights kept in f16, as most checkpoints store them, and widened to f32 as each layer runs.
//!
//! diffusers in f32 widens an f16 checkpoint once at load, so its weights take twice the file's
//! size for as long as the model is loaded (4.3 GB instead of 2.1 GB for SD 1.5). Widening
//! f16 → f32 is exact, so doing it per call gives the very same numbers; the 3×3 convolutions
//! widen inside their Winograd weight transform (which reads every weight once per call anyway),
//! the rest into a scratch buffer that is reused from call to call.

use std::cell::RefCell;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape};
use half::{f16, slice::HalfFloatSliceExt};
use rayon::prelude::*;

use super::{contiguous_f32, matmul, small_linear, threads, Operand, SyncPtr};

thread_local! {
    /// The last widened weight's buffer, reused: fresh buffers of tens of MB per layer would
    /// cost the kernel's page zeroing on every call.
    static WIDENED: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Drops this thread's scratch buffer (see [`crate::memory`]).
pub(crate) fn release_scratch() {
    WIDENED.with_borrow_mut(|buffer| *buffer = Vec::new());
}

/// A layer's weight as an op receives it: f32, or f16 kept as stored.
#[derive(Clone, Copy)]
pub(crate) enum WeightData<'a> {
    F32(&'a [f32]),
    F16(&'a [f16]),
}

impl<'a> WeightData<'a> {
    /// The contents of a contiguous f32 or f16 weight.
    pub(crate) fn new(storage: &'a CpuStorage, layout: &Layout, op: &str) -> Result<Self> {
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("{op}: weight is not contiguous")
        };
        match storage {
            CpuStorage::F32(data) => Ok(Self::F32(&data[start..end])),
            CpuStorage::F16(data) => Ok(Self::F16(&data[start..end])),
            other => candle_core::bail!("{op}: expected an f32 or f16 weight, got {:?}", other.dtype()),
        }
    }

    /// Number of elements.
    pub(crate) fn len(self) -> usize {
        match self {
            Self::F32(w) => w.len(),
            Self::F16(w) => w.len(),
        }
    }

    /// Runs `f` on the weight as f32: the data itself, or its widened copy in this thread's
    /// scratch buffer.
    pub(crate) fn with_f32<R>(self, f: impl FnOnce(&[f32]) -> R) -> R {
        match self {
            Self::F32(w) => f(w),
            Self::F16(w) => WIDENED.with(|cell| match cell.try_borrow_mut() {
                Ok(mut buffer) => {
                    widen(w, &mut buffer);
                    f(&buffer)
                }
                // Only if `f` itself widened another weight on this thread: a buffer of its own.
                Err(_) => {
                    let mut buffer = Vec::new();
                    widen(w, &mut buffer);
                    f(&buffer)
                }
            }),
        }
    }
}

/// `dst` = `src` widened to f32, on every core (F16C where the CPU has it).
pub(crate) fn widen(src: &[f16], dst: &mut Vec<f32>) {
    const CHUNK: usize = 1 << 15;
    dst.resize(src.len(), 0.0);
    dst.par_chunks_mut(CHUNK).zip(src.par_chunks(CHUNK)).for_each(|(d, s)| s.convert_to_f32_slice(d));
}

/// `x · Wᵀ (+ b)` over the last axis of x, f32 activations, the weight (out × in) f32 or f16.
/// Through [`candle_core::Tensor::apply_op2_no_bwd`] without a bias, `apply_op3_no_bwd` with one.
#[derive(Debug, Clone, Copy)]
pub struct LinearOp;

impl LinearOp {
    fn run(
        &self,
        xs: (&CpuStorage, &Layout),
        weight: (&CpuStorage, &Layout),
        bias: Option<(&CpuStorage, &Layout)>,
    ) -> Result<(CpuStorage, Shape)> {
        let name = "easel-linear";
        let w = WeightData::new(weight.0, weight.1, name)?;
        let bias = bias.map(|(storage, layout)| contiguous_f32(storage, layout, name)).transpose()?;
        linear_forward(xs, w, weight.1.shape().dims(), bias)
    }
}

/// Linear layers with this few rows give each core a slice of the outputs and a single-threaded
/// GEMM: the `gemm` crate's own split ran the text encoders' 154-row products on one core or
/// little better. Measured on 2 cores (f32, rows × in → out, its split vs by output columns):
/// 154×3072→768 14.1 vs 7.4 ms, 154×768→768 1.50 vs 1.33 ms, 154×768→1280 2.11 vs 1.90 ms,
/// 308×3072→768 17.6 vs 11.3 ms, 1024×1280→1280 18.7 vs 17.5 ms; from 2048 rows its own split
/// wins (2048×640→5120 68 vs 79 ms), and for a couple of rows (time embeddings) it does not matter.
const SPLIT_OUTPUTS_MAX_ROWS: usize = 1024;
const SPLIT_OUTPUTS_MIN_ROWS: usize = 16;

/// Up to this many rows the split tasks take [`small_linear`]'s dot products instead of a GEMM
/// (2 cores, f32 / f16 weights, dot products vs GEMM: 154×3072→768 6.0/5.3 vs 6.9/7.1 ms,
/// 154×768→320 0.5/0.6 vs 0.9/1.4 ms, 128×1280→1280 3.4/2.8 vs 2.9/4.2 ms; at 512 rows the GEMM
/// wins, 512×1280→10240 101 vs 73 ms).
const SMALL_LINEAR_MAX_ROWS: usize = 256;

/// `x · Wᵀ (+ b)` for a weight of `weight_dims` (out, in) however the caller holds it: a candle
/// tensor ([`LinearOp`]) or the memory-mapped checkpoint (`models::mapped`).
pub(crate) fn linear_forward(
    (x_storage, x_layout): (&CpuStorage, &Layout),
    w: WeightData,
    weight_dims: &[usize],
    bias: Option<&[f32]>,
) -> Result<(CpuStorage, Shape)> {
    let name = "easel-linear";
    let x = contiguous_f32(x_storage, x_layout, name)?;
    let mut dims = x_layout.shape().dims().to_vec();
    let &[out_dim, in_dim] = weight_dims else {
        candle_core::bail!("{name}: weight of shape {weight_dims:?}, expected 2 dimensions")
    };
    if dims.last() != Some(&in_dim) || w.len() != out_dim * in_dim {
        candle_core::bail!("{name}: input {dims:?}, weight ({out_dim}, {in_dim})");
    }
    let rows = x.len() / in_dim.max(1);
    let mut out = match bias {
        Some(bias) => {
            if bias.len() != out_dim {
                candle_core::bail!("{name}: bias of {} for {out_dim} outputs", bias.len());
            }
            bias.repeat(rows)
        }
        None => vec![0f32; rows * out_dim],
    };
    let accumulate = bias.is_some();
    let tasks = threads();
    let split = tasks > 1 && (SPLIT_OUTPUTS_MIN_ROWS..=SPLIT_OUTPUTS_MAX_ROWS).contains(&rows) && out_dim >= 64 * tasks;
    let chunk = if split { out_dim.div_ceil(tasks).next_multiple_of(16) } else { out_dim };
    let dst = SyncPtr(out.as_mut_ptr());
    if split && rows <= SMALL_LINEAR_MAX_ROWS && small_linear::supported() {
        (0..out_dim.div_ceil(chunk)).into_par_iter().for_each(|task| {
            let first = task * chunk;
            // SAFETY: AVX-512 checked; x is rows × in_dim, w is out_dim × in_dim and `out`
            // rows × out_dim (all checked above); each task writes its own columns.
            unsafe {
                small_linear::accumulate(x, rows, in_dim, w, first..out_dim.min(first + chunk), dst.get(), out_dim)
            }
        });
    } else {
        w.with_f32(|w| {
            let columns = |first: usize, threads: usize| {
                let n = chunk.min(out_dim - first);
                // SAFETY: `out` is rows × out_dim, x is rows × in_dim, w is out_dim × in_dim (checked);
                // each task writes its own columns [first, first + n) of `out`.
                unsafe {
                    matmul(
                        rows,
                        n,
                        in_dim,
                        dst.get().add(first),
                        out_dim,
                        accumulate,
                        Operand::rows(x, in_dim),
                        Operand::transposed(&w[first * in_dim..], in_dim),
                        1.0,
                        threads,
                    )
                }
            };
            if split {
                (0..out_dim.div_ceil(chunk)).into_par_iter().for_each(|task| columns(task * chunk, 1));
            } else {
                columns(0, tasks);
            }
        });
    }
    if let Some(last) = dims.last_mut() {
        *last = out_dim;
    }
    Ok((CpuStorage::F32(out), Shape::from(dims)))
}

impl CustomOp2 for LinearOp {
    fn name(&self) -> &'static str {
        "easel-linear"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        self.run((s1, l1), (s2, l2), None)
    }
}

impl CustomOp3 for LinearOp {
    fn name(&self) -> &'static str {
        "easel-linear"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.run((s1, l1), (s2, l2), Some((s3, l3)))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Tensor};

    use super::*;
    use crate::kernels::test_values;

    /// Weights that f16 holds exactly, so the f32 and f16 runs see the same numbers.
    fn f16_exact(len: usize, seed: u32) -> Vec<f32> {
        test_values(len, seed).into_iter().map(|v| f16::from_f32(v).to_f32()).collect()
    }

    /// `out` (rows × out) is `x (rows × in) · wᵀ + b` to within f32 rounding, by an f64 definition.
    fn assert_is_linear(out: &[f32], x: &[f32], w: &[f32], b: &[f32]) {
        let (out_dim, in_dim) = (b.len(), w.len() / b.len());
        for (r, row) in x.chunks(in_dim).enumerate() {
            for o in 0..out_dim {
                let weights = &w[o * in_dim..(o + 1) * in_dim];
                let exact = b[o] as f64 + row.iter().zip(weights).map(|(&x, &w)| x as f64 * w as f64).sum::<f64>();
                let got = out[r * out_dim + o] as f64;
                assert!((got - exact).abs() < 1e-4, "({r},{o}): {got} vs {exact}");
            }
        }
    }

    #[test]
    fn widening_is_exact_on_every_chunk() {
        let values: Vec<f16> = (0..100_003u32).map(|i| f16::from_bits((i % 0x7c00) as u16)).collect();
        let mut widened = vec![1.0; 7];
        widen(&values, &mut widened);
        assert_eq!(widened.len(), values.len());
        assert!(values.iter().zip(&widened).all(|(h, w)| h.to_f32().to_bits() == w.to_bits()));
    }

    #[test]
    fn linear_matches_the_definition_and_f16_weights_give_the_f32_result() {
        let dev = Device::Cpu;
        let (rows, in_dim, out_dim) = (37, 70, 45);
        let x = test_values(rows * in_dim, 1);
        let w = f16_exact(out_dim * in_dim, 2);
        let b = test_values(out_dim, 3);
        let xs = Tensor::from_vec(x.clone(), (1, rows, in_dim), &dev).unwrap();
        let w32 = Tensor::from_vec(w.clone(), (out_dim, in_dim), &dev).unwrap();
        let w16 = w32.to_dtype(DType::F16).unwrap();
        let bias = Tensor::from_vec(b.clone(), out_dim, &dev).unwrap();

        let with_f32 = xs.apply_op3_no_bwd(&w32, &bias, &LinearOp).unwrap();
        let with_f16 = xs.apply_op3_no_bwd(&w16, &bias, &LinearOp).unwrap();
        assert_eq!(with_f32.dims(), [1, rows, out_dim]);
        let (a, h) = (with_f32.flatten_all().unwrap().to_vec1::<f32>().unwrap(), with_f16.flatten_all().unwrap());
        assert_eq!(a, h.to_vec1::<f32>().unwrap(), "f16 weights must give the f32 result bit for bit");
        assert_is_linear(&a, &x, &w, &b);

        let no_bias = xs.apply_op2_no_bwd(&w16, &LinearOp).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for (i, (with, without)) in a.iter().zip(&no_bias).enumerate() {
            assert!((with - without - b[i % out_dim]).abs() < 1e-5);
        }
    }

    /// Few rows and many outputs: each core takes a slice of the output columns (three here,
    /// the last one shorter), which must still be the whole product, bias included.
    #[test]
    fn a_linear_layer_split_by_output_columns_matches_the_definition() {
        let (rows, in_dim, out_dim) = (40, 70, 200);
        let x = test_values(rows * in_dim, 1);
        let w = test_values(out_dim * in_dim, 2);
        let b = test_values(out_dim, 3);
        let xs = Tensor::from_vec(x.clone(), (rows, in_dim), &Device::Cpu).unwrap();
        let weight = Tensor::from_vec(w.clone(), (out_dim, in_dim), &Device::Cpu).unwrap();
        let bias = Tensor::from_vec(b.clone(), out_dim, &Device::Cpu).unwrap();
        let pool = rayon::ThreadPoolBuilder::new().num_threads(3).build().unwrap();
        let out = pool.install(|| xs.apply_op3_no_bwd(&weight, &bias, &LinearOp)).unwrap();
        let out = out.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_is_linear(&out, &x, &w, &b);
    }

    #[test]
    fn mismatched_shapes_are_errors() {
        let dev = Device::Cpu;
        let xs = Tensor::zeros((2, 8), DType::F32, &dev).unwrap();
        let w = Tensor::zeros((4, 9), DType::F16, &dev).unwrap();
        assert!(xs.apply_op2_no_bwd(&w, &LinearOp).is_err());
        let w = Tensor::zeros((4, 8), DType::BF16, &dev).unwrap();
        assert!(xs.apply_op2_no_bwd(&w, &LinearOp).is_err());
    }
}
