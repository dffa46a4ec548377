//! Hand-written CPU kernels for the operations that dominate diffusion on a CPU.
//!
//! candle's CPU backend runs convolutions through a scalar im2col with a per-call weight
//! reshuffle and a scattered output copy, and GroupNorm as a chain of a dozen separate tensor
//! ops; profiling the SD 1.5 U-Net showed less than a third of the time in the GEMM itself.
//! These kernels keep the math of diffusers (same operations, f32 throughout) but do each
//! layer in one or two passes over memory, on every core, calling the `gemm` crate directly.
//! They plug into candle as custom ops, so the model code stays ordinary candle code and
//! other devices and dtypes take candle's own path.

pub mod attention;
#[cfg(target_arch = "x86_64")]
pub mod bf16;
pub mod bf16_layers;
pub mod conv2d;
pub mod cuda;
pub mod geglu;
pub mod group_norm;
pub mod half_weights;
pub mod residual;
pub mod simd_math;
pub mod small_linear;
pub mod winograd;

pub use attention::AttentionOp;
pub use bf16_layers::{Conv2dBf16Op, LinearBf16Op};
pub use conv2d::Conv2dOp;
pub use geglu::GegluOp;
pub use group_norm::GroupNormOp;
pub use half_weights::LinearOp;
pub use residual::add_residual;

/// Deterministic test inputs in [-1, 1) from a small LCG (no dependency).
#[cfg(test)]
pub(crate) fn test_values(len: usize, seed: u32) -> Vec<f32> {
    let mut state = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
    (0..len)
        .map(|_| {
            state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (state >> 8) as f32 / (1u32 << 23) as f32 - 1.0
        })
        .collect()
}

/// Sets a scratch buffer's length to `len` without `Vec`'s doubling growth: scratch buffers
/// stay at their largest size while the denoising loop runs, so growing one from 30 to 31 MB
/// must not reserve 60 MB (a counting allocator found a 59 MB Winograd buffer holding ~30 MB).
/// The old contents are not kept when it grows; callers overwrite what they use.
pub(crate) fn resize_scratch<T: Clone + Default>(buf: &mut Vec<T>, len: usize) {
    if len > buf.capacity() {
        *buf = Vec::new();
        buf.reserve_exact(len);
    }
    buf.resize(len, T::default());
}

/// Room for `len` values in `buf`'s allocation, not initialised, for scratch that is written in
/// full before any of it is read: zero-filling tens of MB per convolution would cost ~5% of a
/// U-Net step once buffers are no longer kept between calls. After writing every value, the
/// caller makes them readable with `buf.set_len(len)`.
pub(crate) fn uninit_scratch<T>(buf: &mut Vec<T>, len: usize) -> &mut [std::mem::MaybeUninit<T>] {
    buf.clear();
    buf.reserve_exact(len);
    &mut buf.spare_capacity_mut()[..len]
}

/// Drops the calling thread's kernel scratch buffers (see [`crate::memory`]).
pub(crate) fn release_scratch() {
    winograd::release_scratch();
    half_weights::release_scratch();
}

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, Layout};

/// A raw pointer that may cross threads: each parallel task writes a disjoint region of
/// the buffer it points into, which the borrow checker cannot see through `gemm`'s pointers.
#[derive(Clone, Copy)]
pub(crate) struct SyncPtr<T>(pub *mut T);
// SAFETY: used only to hand disjoint output regions to rayon tasks (see call sites).
unsafe impl<T> Send for SyncPtr<T> {}
unsafe impl<T> Sync for SyncPtr<T> {}

impl<T> SyncPtr<T> {
    /// Through a method, so closures capture the whole (Sync) wrapper, not the raw field.
    pub(crate) fn get(self) -> *mut T {
        self.0
    }
}

/// A matrix operand for [`matmul`]: where it starts and how far apart rows and columns are.
#[derive(Clone, Copy)]
pub(crate) struct Operand {
    pub ptr: *const f32,
    pub row_stride: usize,
    pub col_stride: usize,
}

impl Operand {
    /// A row-major matrix with `row_stride` floats per row.
    pub(crate) fn rows(data: &[f32], row_stride: usize) -> Self {
        Self { ptr: data.as_ptr(), row_stride, col_stride: 1 }
    }

    /// The transpose of a row-major matrix with `row_stride` floats per row.
    pub(crate) fn transposed(data: &[f32], row_stride: usize) -> Self {
        Self { ptr: data.as_ptr(), row_stride: 1, col_stride: row_stride }
    }
}

/// `dst (m × n, row-major, dst_row_stride) = [dst +] scale · lhs (m × k) · rhs (k × n)`, through
/// the `gemm` crate; `accumulate` keeps what `dst` holds (a bias written there first).
/// `threads` > 1 splits this one product over the rayon pool; inside parallel tasks pass 1.
///
/// # Safety
/// `dst` must be valid for writes of the m × n block and not touched by anyone else meanwhile;
/// `lhs` and `rhs` must be valid for reads of their m × k and k × n extents.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn matmul(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    dst_row_stride: usize,
    accumulate: bool,
    lhs: Operand,
    rhs: Operand,
    scale: f32,
    threads: usize,
) {
    let parallelism = if threads > 1 { gemm::Parallelism::Rayon(threads) } else { gemm::Parallelism::None };
    gemm::gemm(
        m,
        n,
        k,
        dst,
        1,
        dst_row_stride as isize,
        accumulate,
        lhs.ptr,
        lhs.col_stride as isize,
        lhs.row_stride as isize,
        rhs.ptr,
        rhs.col_stride as isize,
        rhs.row_stride as isize,
        if accumulate { 1.0 } else { 0.0 },
        scale,
        false,
        false,
        false,
        parallelism,
    );
}

/// The f32 contents of a contiguous tensor, or an error naming the op (callers make inputs
/// contiguous first; anything else is a bug, reported rather than mis-read).
pub(crate) fn contiguous_f32<'a>(storage: &'a CpuStorage, layout: &Layout, op: &str) -> candle_core::Result<&'a [f32]> {
    let data = match storage {
        CpuStorage::F32(data) => data.as_slice(),
        other => candle_core::bail!("{op}: expected f32, got {:?}", other.dtype()),
    };
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => candle_core::bail!("{op}: input is not contiguous"),
    }
}

/// Whether the AVX-512 paths run: the build has the `avx512` feature (the default) and the CPU
/// has AVX-512 F/BW/DQ/VL (Intel Skylake-SP and later, AMD Zen 4). Every AVX-512 choice in the
/// kernels goes through here, so that a build without the feature is exactly what a CPU without
/// AVX-512 runs (AVX2 + FMA, or the portable code).
#[inline]
pub fn avx512() -> bool {
    #[cfg(all(target_arch = "x86_64", feature = "avx512"))]
    {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512dq")
            && std::arch::is_x86_feature_detected!("avx512vl")
    }
    #[cfg(not(all(target_arch = "x86_64", feature = "avx512")))]
    {
        false
    }
}

/// Whether the CPU has AVX2 and FMA: the level of the kernels' second variants and of the AVX2
/// micro-kernels, for CPUs (or builds) without AVX-512.
#[inline]
pub fn avx2_fma() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The vector instructions the CPU kernels run with here, for benchmark reports.
pub fn cpu_vector_isa() -> &'static str {
    #[cfg(target_arch = "x86_64")]
    {
        if bf16_supported() {
            "AVX-512 + BF16"
        } else if avx512() {
            "AVX-512"
        } else if avx2_fma() {
            "AVX2 + FMA"
        } else {
            "SSE (portable code)"
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        std::env::consts::ARCH
    }
}

/// Whether this CPU can run the bf16 mode (AVX-512 BF16).
pub fn bf16_supported() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        bf16::supported()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether the hand-written kernels can run on `xs`: a CPU f32 tensor.
pub(crate) fn applies_to(xs: &candle_core::Tensor) -> bool {
    xs.device().is_cpu() && xs.dtype() == candle_core::DType::F32
}

/// Threads rayon will use (candle and our kernels share its pool).
pub(crate) fn threads() -> usize {
    rayon::current_num_threads().max(1)
}
